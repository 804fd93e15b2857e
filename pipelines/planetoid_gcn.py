"""``planetoid-gcn``: semi-supervised node classification with the 2-layer GCN of Kipf & Welling
(ICLR 2017) on the public Planetoid split, averaged over several seeds.

Recipe (the paper's): hidden 16, dropout 0.5, Adam lr 0.01, weight decay 5e-4 on the first layer
only, 200 epochs, row-normalised features; the model after the last epoch is tested (no early
stopping). ``dataset=cora|citeseer|pubmed`` reads the raw files from ``--data``; without ``--data``
the embedded default is PyG's inline Zachary karate club (34 nodes, 4 communities).

Distributed runs: the whole graph is one batch, so every rank trains on the full graph (gradients
are identical and DDP's average leaves them unchanged); evaluation is sharded — rank r scores the
test nodes r, r + W, r + 2W, … — and the accumulators sum their counts across ranks, so the
reported accuracy is computed once over every test node, never twice.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch_geometric.data import Data
from torch_geometric.transforms import NormalizeFeatures

from threefold.datasets.errors import ConfigError
from threefold.datasets.splits import seed_everything
from threefold.graphs.gcn import GCN
from threefold.pipelines.config import RunConfig, config_from_dict, config_to_dict
from threefold.pipelines.engine import RunContext, load_checkpoint, write_metrics
from threefold.pipelines.metrics import MulticlassAccuracy
from threefold.pipelines.registry import Pipeline, register_pipeline


@dataclass
class GCNModelConfig:
    hidden: int = 16
    dropout: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 0.01
    weight_decay: float = 5e-4  # first layer only


@dataclass
class PlanetoidGCNConfig(RunConfig):
    dataset: str = "cora"  # cora | citeseer | pubmed (ignored for the embedded karate club)
    num_seeds: int = 5  # seeds seed, seed+1, …
    model: GCNModelConfig = field(default_factory=GCNModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def karate_club() -> Data:
    """PyG's inline karate club with a fixed split: its 4 labelled nodes train, the other 30 split
    alternately into validation and test (deterministic, no download)."""
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    rest = torch.nonzero(~data.train_mask).flatten()
    data.val_mask = torch.zeros_like(data.train_mask)
    data.test_mask = torch.zeros_like(data.train_mask)
    data.val_mask[rest[0::2]] = True
    data.test_mask[rest[1::2]] = True
    return data


def load_graph(data_root: Path | None, dataset: str) -> Data:
    if data_root is None:
        graph = karate_club()
    else:
        from threefold.datasets.planetoid import load_planetoid

        graph = load_planetoid(data_root, dataset)
    return NormalizeFeatures()(graph)


def shallow_copy(graph: Data) -> Data:
    """A new ``Data`` sharing the tensors: Lightning moves a batch with ``Data.to``, which PyG does in
    place, so serving the original would leave the caller's graph on the GPU after training."""
    return copy.copy(graph)


class GraphDataModule(L.LightningDataModule):
    """One graph, served as the single batch of every epoch and split."""

    def __init__(self, graph: Data) -> None:
        super().__init__()
        self.graph = graph

    def _loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader([self.graph], batch_size=None, collate_fn=shallow_copy)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()


class NodeClassifier(L.LightningModule):
    """GCN + cross-entropy on the training mask; hyper-parameters kept as a plain dict."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        m = hparams["config"]["model"]
        self.model = GCN(hparams["in_dim"], m["hidden"], hparams["num_classes"], m["dropout"])
        self.test_acc = MulticlassAccuracy()

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.model(x, edge_index)

    def _masked(self, batch: Data, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch.x, batch.edge_index)
        return logits[mask], batch.y[mask]

    def training_step(self, batch: Data, batch_idx: int) -> torch.Tensor:
        logits, y = self._masked(batch, batch.train_mask)
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, batch_size=1)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean(), batch_size=1)
        return loss

    def validation_step(self, batch: Data, batch_idx: int) -> None:
        logits, y = self._masked(batch, batch.val_mask)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), batch_size=1)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), batch_size=1)

    def test_step(self, batch: Data, batch_idx: int) -> None:
        test_nodes = torch.nonzero(batch.test_mask).flatten()
        shard = test_nodes[self.global_rank :: self.trainer.world_size]
        logits = self(batch.x, batch.edge_index)[shard]
        self.test_acc.update(logits.argmax(-1), batch.y[shard])

    def on_test_epoch_end(self) -> None:
        # The accumulator syncs (sums) its counts across ranks itself: no sync_dist averaging here.
        acc = self.test_acc.compute()
        with self.test_acc.sync_context():
            count = self.test_acc.total.clone()
        self.log("test_acc", acc, batch_size=1)
        self.log("test_count", count.float(), batch_size=1)
        self.test_acc.reset()

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        return torch.optim.Adam(self.model.parameter_groups(o["weight_decay"]), lr=o["lr"])


def build_module(cfg: PlanetoidGCNConfig, graph: Data) -> NodeClassifier:
    hparams = {
        "config": config_to_dict(cfg),
        "in_dim": int(graph.num_features),
        "num_classes": int(graph.y.max()) + 1,
    }
    return NodeClassifier(hparams)


class GCNPredictor:
    """Inference entry point: ``predict(graph) -> (N,) int64`` class per node."""

    def __init__(self, module: NodeClassifier) -> None:
        self.module = module.eval()

    @torch.no_grad()
    def predict(self, graph: Data) -> torch.Tensor:
        graph = NormalizeFeatures()(graph.clone())
        return self.module(graph.x, graph.edge_index).argmax(-1)


def _module_from_checkpoint(checkpoint: Path) -> NodeClassifier:
    ckpt = load_checkpoint(checkpoint)
    if "hyper_parameters" not in ckpt or "config" not in ckpt["hyper_parameters"]:
        raise ConfigError(f"checkpoint {checkpoint} was not written by planetoid-gcn (no hyper_parameters.config)")
    module = NodeClassifier(ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module


@register_pipeline
class PlanetoidGCN(Pipeline):
    name = "planetoid-gcn"
    description = "Semi-supervised node classification with a 2-layer GCN (Kipf & Welling 2017), public Planetoid split"
    config_class = PlanetoidGCNConfig

    def run(self, cfg: PlanetoidGCNConfig, ctx: RunContext) -> dict[str, Any]:
        graph = load_graph(ctx.data, cfg.dataset)
        dm = GraphDataModule(graph)
        per_seed = []
        for seed in range(cfg.seed, cfg.seed + cfg.num_seeds):
            sub = ctx.child(f"seed{seed}")
            done = sub.run_dir / "metrics.json"
            if ctx.resume and done.is_file():  # finished before the interruption
                import json

                per_seed.append(json.loads(done.read_text()))
                continue
            seed_everything(seed)
            module = build_module(cfg, graph)
            trainer = sub.fit(module, dm, use_distributed_sampler=False)
            trainer.test(module, datamodule=dm, verbose=False)
            result = {
                "seed": seed,
                "test_acc": float(trainer.callback_metrics["test_acc"]),
                "test_count": int(trainer.callback_metrics["test_count"]),
                "epochs": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
            }
            if trainer.is_global_zero:
                sub.export_weights(module.model)
                write_metrics(done, result)
            per_seed.append(result)
        accs = np.array([r["test_acc"] for r in per_seed])
        return {
            "pipeline": self.name,
            "dataset": "karate" if ctx.data is None else cfg.dataset,
            "test_acc_mean": float(accs.mean()),
            "test_acc_std": float(accs.std()),
            "seeds": [r["seed"] for r in per_seed],
            "per_seed": per_seed,
            "protocol": "public split; model after the last epoch; accuracy over all test nodes",
        }

    def evaluate(self, cfg: PlanetoidGCNConfig, ctx: RunContext, checkpoint: Path) -> dict[str, Any]:
        module = _module_from_checkpoint(checkpoint)
        stored = config_from_dict(PlanetoidGCNConfig, module.hparams["config"])
        graph = load_graph(ctx.data, stored.dataset)
        trainer = ctx.trainer(logger=False, use_distributed_sampler=False)
        trainer.test(module, datamodule=GraphDataModule(graph), verbose=False)
        return {
            "pipeline": self.name,
            "checkpoint": str(checkpoint),
            "test_acc": float(trainer.callback_metrics["test_acc"]),
            "test_count": int(trainer.callback_metrics["test_count"]),
        }

    def figures(self, cfg: PlanetoidGCNConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves of every seed, then from each seed's final checkpoint: per-class test accuracy
        (mean ± std over seeds), the test confusion matrix summed over seeds, and a PCA of the first
        seed's hidden layer (``GCN.embed``, eval mode: no dropout) for all nodes coloured by class."""
        from threefold.pipelines.figures import figures_dir, plot_confusion_matrix, plot_embedding, plot_per_class
        from threefold.pipelines.metrics import ClassificationMetrics

        paths = super().figures(cfg, run_dir, metrics)
        data_file = run_dir / "data_path.txt"
        graph = load_graph(Path(data_file.read_text().strip()) if data_file.is_file() else None, cfg.dataset)
        num_classes = int(graph.y.max()) + 1
        seeds = metrics["seeds"]
        per_seed_acc, confmat, embedding = [], torch.zeros(num_classes, num_classes, dtype=torch.int64), None
        for seed in seeds:
            module = _module_from_checkpoint(run_dir / f"seed{seed}" / "checkpoints" / "last.ckpt").eval()
            with torch.no_grad():
                hidden = module.model.embed(graph.x, graph.edge_index)
                pred = module(graph.x, graph.edge_index).argmax(-1)
            if embedding is None:
                embedding = hidden.numpy()
            acc = ClassificationMetrics(num_classes)
            acc.update(pred[graph.test_mask], graph.y[graph.test_mask])
            confmat += acc.confmat
            support = acc.confmat.sum(1).double()
            per_seed_acc.append(torch.where(support > 0, acc.confmat.diagonal() / support, torch.nan))
        stacked = torch.stack(per_seed_acc).numpy()
        mean, std = stacked.mean(0), stacked.std(0)
        classes = [str(c) for c in range(num_classes)]
        out = figures_dir(run_dir)
        seeds_text = ", ".join(map(str, seeds))
        caption = f"Per-class test accuracy (recall), mean ± std over seeds {seeds_text}: " + ", ".join(
            f"class {c} {m:.4f} ± {s:.4f}" for c, m, s in zip(classes, mean, std)
        )
        paths.append(plot_per_class({"accuracy": dict(zip(classes, mean))}, out / "per_class_accuracy.png",
                                    errors={"accuracy": dict(zip(classes, std))}, caption=caption))
        paths.append(plot_confusion_matrix(
            confmat.numpy(), out / "confusion_matrix.png", classes,
            caption=f"Test-node confusion matrix summed over seeds {seeds_text} (rows: ground truth, each row "
            "divided by its number of test nodes).",
        ))
        paths.append(plot_embedding(
            embedding, graph.y.numpy(), out / "embedding_pca.png", "pca", seed=seeds[0],
            caption=f"PCA of the GCN hidden layer (seed {seeds[0]}, all {graph.num_nodes} nodes), coloured by class.",
        ))
        return paths

    def load(self, cfg: PlanetoidGCNConfig, checkpoint: Path) -> GCNPredictor:
        return GCNPredictor(_module_from_checkpoint(checkpoint))

    def predict(self, cfg: PlanetoidGCNConfig, checkpoint: Path, input: Path, out: Path) -> None:
        predictor = self.load(cfg, checkpoint)
        stored = config_from_dict(PlanetoidGCNConfig, predictor.module.hparams["config"])
        from threefold.datasets.planetoid import load_planetoid

        pred = predictor.predict(load_planetoid(input, stored.dataset))
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(out, np.stack([np.arange(len(pred)), pred.numpy()], 1), fmt="%d", delimiter=",",
                   header="node,predicted_class", comments="")
