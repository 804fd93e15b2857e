"""Graph self-supervision pipelines of issue #9: ``planetoid-isocvgae``, ``tu-isocvgae`` and
``planetoid-selftask``. Each trains over ``num_seeds`` seeds and returns mean ± std tables with the
baselines the issue asks for (randomly initialised encoder with the same probe, PyG's VGAE, the
supervised GCN / GIN), hyper-parameters and seeds next to the numbers.

Without ``--data`` the embedded default is a deterministic stochastic-block-model graph
(:mod:`threefold.datasets.sbm`) — for the planetoid pipelines one 3-block graph, for ``tu-isocvgae``
a set of 2-class SBM graphs — so every pipeline runs anywhere.

The pretrained model is fitted with ``ctx.fit`` (Lightning: logs, atomic checkpoints, resume);
baselines and probes are small and run in plain loops. The whole graph (or, for TU, all graphs as
one disjoint union) is one batch; on several devices every rank sees the full batch, so gradients
agree, and evaluation runs once on rank 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import lightning as L
import numpy as np
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import NormalizeFeatures

from threefold.datasets.errors import ConfigError
from threefold.datasets.graph_splits import graph_class_split, graph_kfold, link_split, sample_non_edges
from threefold.datasets.sbm import sbm_graph_dataset, stochastic_block_model
from threefold.datasets.splits import seed_everything
from threefold.graphs.baselines import train_pyg_vgae, train_supervised_gcn
from threefold.graphs.isocvgae import IsoCVGAE
from threefold.graphs.probes import HadamardLinkProbe, dot_product_scores, linear_probe, mlp_probe, svm_probe
from threefold.graphs.selftask import REFERENCE_LAMBDA, TASKS, build_task
from threefold.graphs.selftask.joint import SelfTaskGCN
from threefold.pipelines.config import RunConfig, config_to_dict
from threefold.pipelines.engine import RunContext, write_metrics
from threefold.pipelines.metrics import BinaryRankingMetrics, MulticlassAccuracy
from threefold.pipelines.planetoid_gcn import shallow_copy
from threefold.pipelines.registry import Pipeline, register_pipeline


# ----------------------------------------------------------------------------------------- data
class OneBatch(L.LightningDataModule):
    """Serves one ``Data`` (a graph or a disjoint union of graphs) as the single batch of each epoch."""

    def __init__(self, graph: Data) -> None:
        super().__init__()
        self.graph = graph

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.graph], batch_size=None, collate_fn=shallow_copy)


def load_planetoid_graph(data_root: Path | None, dataset: str) -> tuple[Data, str]:
    """Row-normalised Planetoid graph from ``--data`` or the embedded SBM graph; (graph, name)."""
    if data_root is None:
        return NormalizeFeatures()(stochastic_block_model()), "sbm"
    from threefold.datasets.planetoid import load_planetoid

    return NormalizeFeatures()(load_planetoid(data_root, dataset)), dataset.lower()


def _idx(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).flatten()


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(a.size)}


def _tables(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """per_seed[i][metric][method] → {metric: {method: {mean, std, n}}} (std: population, ddof=0)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric in per_seed[0]:
        out[metric] = {m: _summary([r[metric][m] for r in per_seed if m in r[metric]]) for m in per_seed[0][metric]}
    return out


def markdown_table(tables: dict[str, dict[str, dict[str, float]]], scale: float = 100.0) -> str:
    """Rows = metrics, columns = methods, cells ``mean ± std`` (× ``scale``)."""
    methods = sorted({m for t in tables.values() for m in t})
    lines = ["| metric | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for metric, row in tables.items():
        cells = [f"{scale * row[m]['mean']:.1f} ± {scale * row[m]['std']:.1f}" if m in row else "n/a" for m in methods]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finish(ctx: RunContext, name: str, per_seed: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
    tables = _tables([r["metrics"] for r in per_seed])
    (ctx.run_dir / "results.md").write_text(markdown_table(tables) + "\n")
    return {"pipeline": name, **extra, "seeds": [r["seed"] for r in per_seed], "tables": tables, "per_seed": per_seed}


def _resume_or_run(ctx: RunContext, seed: int, fn) -> dict[str, Any]:
    sub = ctx.child(f"seed{seed}")
    done = sub.run_dir / "metrics.json"
    if ctx.resume and done.is_file():  # finished before the interruption
        return json.loads(done.read_text())
    seed_everything(seed)
    result = {"seed": seed, "metrics": fn(sub, seed)}
    write_metrics(done, result)
    return result


def _data_path(run_dir: Path) -> Path | None:
    """The run's ``--data`` (written by the CLI to ``data_path.txt``), None for the embedded default."""
    f = run_dir / "data_path.txt"
    return Path(f.read_text().strip()) if f.is_file() else None


def _table_figure(run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
    from threefold.pipelines.figures import figures_dir
    from threefold.pipelines.figures_graphs import plot_method_table

    return [plot_method_table(figures_dir(run_dir) / "results.png", metrics["tables"])] if metrics.get("tables") else []


# ----------------------------------------------------------------------------------- IsoC-VGAE
@dataclass
class IsoCModelConfig:
    hidden: list[int] = field(default_factory=lambda: [512, 512])
    conv: str = "gcn"  # gcn (node / link) | gin (graph)
    norm: str = "batch"  # batch | pair | none
    dropout: float = 0.0
    weights: list[float] = field(default_factory=lambda: [1.0, 0.1, 1.0])  # λ_self, λ_neighbour, λ_degree


@dataclass
class IsoCOptimConfig:
    lr: float = 5e-6
    degree_lr: float = 1e-2
    weight_decay: float = 3e-4


@dataclass
class BaselineConfig:
    enabled: bool = True
    vgae_epochs: int = 200
    gcn_hidden: int = 16
    gcn_epochs: int = 200


@dataclass
class PlanetoidIsoCConfig(RunConfig):
    dataset: str = "cora"  # cora | citeseer | pubmed (with --data)
    num_seeds: int = 5
    tasks: list[str] = field(default_factory=lambda: ["node", "link"])
    link_val: float = 0.05
    link_test: float = 0.10
    model: IsoCModelConfig = field(default_factory=IsoCModelConfig)
    optim: IsoCOptimConfig = field(default_factory=IsoCOptimConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)


class IsoCModule(L.LightningModule):
    """IsoC-VGAE trained full-batch on the graph(s) of the batch; plain-dict hyper-parameters."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        m = hparams["config"]["model"]
        if len(m["weights"]) != 3:
            raise ConfigError(f"model.weights={m['weights']}: expected three numbers (self, neighbour, degree)")
        self.model = IsoCVGAE(hparams["in_dim"], tuple(m["hidden"]), m["conv"], m["norm"], m["dropout"], tuple(m["weights"]))
        self._gen: torch.Generator | None = None

    def _generator(self) -> torch.Generator:
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(device=self.device).manual_seed(int(self.hparams["seed"]))
        return self._gen

    def training_step(self, batch: Data, batch_idx: int) -> torch.Tensor:
        loss, terms, _ = self.model(batch.x, batch.edge_index, self._generator())
        self.log("train_loss", loss, batch_size=1)
        for k, v in terms.items():
            self.log(f"loss_{k}", v, batch_size=1)
        return loss

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        return torch.optim.Adam(self.model.parameter_groups(o["lr"], o["degree_lr"], o["weight_decay"]))


def fit_isoc(ctx: RunContext, cfg: Any, graph: Data, seed: int) -> IsoCModule:
    module = IsoCModule({"config": config_to_dict(cfg), "in_dim": int(graph.num_features), "seed": seed})
    ctx.fit(module, OneBatch(graph), use_distributed_sampler=False)
    return module.eval()


def random_isoc(cfg: Any, graph: Data, seed: int) -> IsoCModule:
    """The same architecture, untrained: parameters drawn with ``seed`` (BatchNorm in eval mode
    uses its initial running statistics, so the embedding is a fixed random map)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IsoCModule({"config": config_to_dict(cfg), "in_dim": int(graph.num_features), "seed": seed}).eval()


@torch.no_grad()
def _embed(module: IsoCModule, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    module = module.to(x.device)
    return module.model.embed(x, edge_index)


def _isoc_from_checkpoint(path: Path) -> IsoCModule:
    from threefold.pipelines.engine import load_checkpoint

    ckpt = load_checkpoint(path)
    module = IsoCModule(ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def _node_metrics(embs: dict[str, torch.Tensor], graph: Data, gen: torch.Generator) -> dict[str, dict[str, float]]:
    tr, va, te = _idx(graph.train_mask), _idx(graph.val_mask), _idx(graph.test_mask)
    full = _idx(~(graph.val_mask | graph.test_mask))  # the IsoC-VGAE reference's probe protocol
    out: dict[str, dict[str, float]] = {"node/linear[public]": {}, "node/linear[full]": {}, "node/mlp[full]": {}, "node/mlp-raw[full]": {}}
    for name, z in embs.items():
        out["node/linear[public]"][name] = linear_probe(z, graph.y, tr, va, te)["test_acc"]
        out["node/linear[full]"][name] = linear_probe(z, graph.y, full, va, te)["test_acc"]
        out["node/mlp[full]"][name] = mlp_probe(z, graph.y, full, va, te, gen)["test_acc"]
        out["node/mlp-raw[full]"][name] = mlp_probe(z, graph.y, full, va, te, gen, standardise=False)["test_acc"]
    return out


def _link_metrics(embs: dict[str, torch.Tensor], split, num_nodes: int, seed: int) -> dict[str, dict[str, float]]:
    keys = ("dot", "hadamard-mlp", "hadamard-mlp-raw")
    out: dict[str, dict[str, float]] = {f"link/{k}[{m}]": {} for k in keys for m in ("ROC-AUC", "AP")}
    half = split.train_edge_index[:, : split.train_edge_index.shape[1] // 2]
    train_neg = torch.from_numpy(sample_non_edges(split.train_edge_index, num_nodes, half.shape[1], np.random.default_rng(seed)))
    pairs = torch.cat([split.test_pos, split.test_neg], 1)
    target = torch.cat([torch.ones(split.test_pos.shape[1]), torch.zeros(split.test_neg.shape[1])]).long()
    for name, z in embs.items():
        z = z.cpu()
        probe = lambda std: HadamardLinkProbe(z.shape[1], standardise=std).fit(  # noqa: E731
            z, half, train_neg, torch.Generator().manual_seed(seed))(z, pairs).detach()
        for key, scores in (("dot", dot_product_scores(z, pairs)), ("hadamard-mlp", probe(True)), ("hadamard-mlp-raw", probe(False))):
            acc = BinaryRankingMetrics(sync_on_compute=False)  # every rank scores all pairs itself
            acc.update(scores, target)
            res = acc.compute()
            out[f"link/{key}[ROC-AUC]"][name] = float(res["ROC-AUC"])
            out[f"link/{key}[AP]"][name] = float(res["AP"])
    return out


@register_pipeline
class PlanetoidIsoCVGAE(Pipeline):
    name = "planetoid-isocvgae"
    description = "IsoC-VGAE (Inv-GNN decoder) on Planetoid: node-classification and link-prediction probes with baselines"
    config_class = PlanetoidIsoCConfig

    def run(self, cfg: PlanetoidIsoCConfig, ctx: RunContext) -> dict[str, Any]:
        unknown = set(cfg.tasks) - {"node", "link"}
        if unknown:
            raise ConfigError(f"tasks={cfg.tasks}: unknown {sorted(unknown)}; expected node and/or link")
        graph, dataset = load_planetoid_graph(ctx.data, cfg.dataset)

        def one_seed(sub: RunContext, seed: int) -> dict[str, dict[str, float]]:
            metrics: dict[str, dict[str, float]] = {}
            if "node" in cfg.tasks:
                node_ctx = sub.child("node")
                embs = {"isocvgae": _embed(fit_isoc(node_ctx, cfg, graph, seed), graph.x, graph.edge_index).cpu(),
                        "random-init": _embed(random_isoc(cfg, graph, seed), graph.x, graph.edge_index).cpu()}
                if cfg.baselines.enabled:
                    embs["pyg-vgae"] = train_pyg_vgae(graph.x, graph.edge_index, seed, cfg.baselines.vgae_epochs).cpu()
                metrics.update(_node_metrics(embs, graph, torch.Generator().manual_seed(seed)))
                if cfg.baselines.enabled:
                    _, logits = train_supervised_gcn(graph.x, graph.edge_index, graph.y, graph.train_mask, seed,
                                                     cfg.baselines.gcn_hidden, epochs=cfg.baselines.gcn_epochs)
                    acc = MulticlassAccuracy()
                    acc.update(logits.argmax(1)[graph.test_mask], graph.y[graph.test_mask])
                    metrics["node/supervised[public]"] = {"gcn": float(acc.compute())}
            if "link" in cfg.tasks:
                split = link_split(graph.edge_index, graph.num_nodes, cfg.link_val, cfg.link_test, seed)
                train_graph = Data(x=graph.x, edge_index=split.train_edge_index, num_nodes=graph.num_nodes)
                embs = {"isocvgae": _embed(fit_isoc(sub.child("link"), cfg, train_graph, seed), graph.x, split.train_edge_index),
                        "random-init": _embed(random_isoc(cfg, train_graph, seed), graph.x, split.train_edge_index)}
                if cfg.baselines.enabled:
                    embs["pyg-vgae"] = train_pyg_vgae(graph.x, split.train_edge_index, seed, cfg.baselines.vgae_epochs)
                metrics.update(_link_metrics(embs, split, graph.num_nodes, seed))
            return metrics

        per_seed = [_resume_or_run(ctx, s, one_seed) for s in range(cfg.seed, cfg.seed + cfg.num_seeds)]
        return _finish(ctx, self.name, per_seed, {
            "dataset": dataset,
            "protocols": {
                "node/linear[public]": "logistic regression on frozen embeddings, public split (20 per class), C on val",
                "node/linear[full]": "logistic regression, trained on every node outside public val/test (IsoC-VGAE reference)",
                "node/mlp[full]": "the IsoC-VGAE reference's MLP probe on standardised embeddings, same training nodes",
                "node/mlp-raw[full]": "the same MLP probe on raw embeddings, exactly as the reference",
                "node/supervised[public]": f"2-layer GCN hidden {cfg.baselines.gcn_hidden}, CE on the public split, last epoch",
                "link": f"{100 * (1 - cfg.link_val - cfg.link_test):.0f}/{100 * cfg.link_val:.0f}/{100 * cfg.link_test:.0f} edge split, test ROC-AUC / AP",
            },
        })


    def figures(self, cfg: PlanetoidIsoCConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves, the result table as bars, and PCA / t-SNE of the first seed's trained IsoC-VGAE node
        embedding (node task: trained on the full graph) for all nodes, coloured by class."""
        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_graphs import plot_embeddings

        paths = super().figures(cfg, run_dir, metrics) + _table_figure(run_dir, metrics)
        seed = (metrics.get("seeds") or [cfg.seed])[0]
        ckpt = run_dir / f"seed{seed}" / "node" / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            return paths
        graph, dataset = load_planetoid_graph(_data_path(run_dir), cfg.dataset)
        z = _embed(_isoc_from_checkpoint(ckpt), graph.x, graph.edge_index).cpu().numpy()
        return paths + plot_embeddings(figures_dir(run_dir), z, graph.y.numpy(), f"IsoC-VGAE node embedding ({dataset}, "
                                       f"seed {seed}, final checkpoint, all {graph.num_nodes} nodes)", seed)


# ------------------------------------------------------------------------------- TU IsoC-VGAE
@dataclass
class TUIsoCConfig(RunConfig):
    dataset: str = "MUTAG"
    num_seeds: int = 5
    folds: int = 10
    pool: str = "mean"  # mean | sum
    model: IsoCModelConfig = field(default_factory=lambda: IsoCModelConfig(conv="gin"))
    optim: IsoCOptimConfig = field(default_factory=IsoCOptimConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    supervised_epochs: int = 100


def _pool(z: torch.Tensor, batch: torch.Tensor, num_graphs: int, how: str) -> torch.Tensor:
    from torch_geometric.nn import global_add_pool, global_mean_pool

    if how not in ("mean", "sum"):
        raise ConfigError(f"pool={how!r}: expected mean or sum")
    return (global_mean_pool if how == "mean" else global_add_pool)(z, batch, num_graphs)


def _graph_metrics(embs: dict[str, np.ndarray], y: np.ndarray, seed: int, folds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"graph/svm[50/20/30]": {}, f"graph/svm[{folds}-fold]": {}}
    tr, va, te = graph_class_split(y, seed=seed)
    for name, z in embs.items():
        out["graph/svm[50/20/30]"][name] = svm_probe(z[tr], y[tr], z[va], y[va], z[te], y[te])["test_acc"]
        accs = []
        for ftr, fte in graph_kfold(y, folds, seed):
            # C is chosen on a stratified 20 % of the training fold
            inner_tr, inner_va, inner_rest = graph_class_split(y[ftr], (0.8, 0.1, 0.1), seed)
            inner_va = np.concatenate([inner_va, inner_rest])
            accs.append(svm_probe(z[ftr][inner_tr], y[ftr][inner_tr], z[ftr][inner_va], y[ftr][inner_va], z[fte], y[fte])["test_acc"])
        out[f"graph/svm[{folds}-fold]"][name] = float(np.mean(accs))
    return out


class SupervisedGIN(torch.nn.Module):
    def __init__(self, cfg: TUIsoCConfig, in_dim: int, num_classes: int) -> None:
        super().__init__()
        from threefold.graphs.isocvgae import IsoCEncoder

        m = cfg.model
        self.encoder = IsoCEncoder(in_dim, tuple(m.hidden), m.conv, m.norm, m.dropout)
        self.head = torch.nn.Linear(m.hidden[-1], num_classes)
        self.pool = cfg.pool

    def forward(self, batch: Data) -> torch.Tensor:
        return self.head(_pool(self.encoder(batch.x, batch.edge_index)[-1], batch.batch, batch.num_graphs, self.pool))


def train_supervised_gin(cfg: TUIsoCConfig, graphs: list[Data], y: np.ndarray, seed: int) -> float:
    """The encoder + a linear head trained end-to-end (CE, Adam 1e-3, full batch) on the 50 % train
    split; test accuracy at the epoch of best validation accuracy."""
    tr, va, te = graph_class_split(y, seed=seed)
    parts = {k: Batch.from_data_list([graphs[i] for i in idx]) for k, idx in (("tr", tr), ("va", va), ("te", te))}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SupervisedGIN(cfg, graphs[0].num_features, int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    yt = {k: torch.from_numpy(y[idx]) for k, idx in (("tr", tr), ("va", va), ("te", te))}
    best, test_at_best = -1.0, 0.0
    for _ in range(cfg.supervised_epochs):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(parts["tr"]), yt["tr"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            va_acc = (model(parts["va"]).argmax(1) == yt["va"]).float().mean().item()
            if va_acc > best:
                best, test_at_best = va_acc, (model(parts["te"]).argmax(1) == yt["te"]).float().mean().item()
    return test_at_best


@register_pipeline
class TUIsoCVGAE(Pipeline):
    name = "tu-isocvgae"
    description = "IsoC-VGAE (GIN encoder) on TU graph classification: SVM probe on pooled embeddings with baselines"
    config_class = TUIsoCConfig

    @staticmethod
    def _graphs(data: Path | None, cfg: TUIsoCConfig) -> tuple[list[Data], Batch, str]:
        """The graphs, their disjoint union (one batch) and the data set's name."""
        if data is None:
            graphs, dataset = sbm_graph_dataset(), "sbm-graphs"
        else:
            from threefold.datasets.tu import load_tu

            graphs, dataset = load_tu(data, cfg.dataset), cfg.dataset
        union = Batch.from_data_list([Data(x=g.x, edge_index=g.edge_index, y=g.y, num_nodes=g.num_nodes) for g in graphs])
        return graphs, union, dataset

    def figures(self, cfg: TUIsoCConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves, the result table as bars, and PCA / t-SNE of the first seed's pooled graph
        embeddings (trained IsoC-VGAE encoder, ``pool``) for every graph, coloured by graph class."""
        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_graphs import plot_embeddings

        paths = super().figures(cfg, run_dir, metrics) + _table_figure(run_dir, metrics)
        seed = (metrics.get("seeds") or [cfg.seed])[0]
        ckpt = run_dir / f"seed{seed}" / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            return paths
        _, union, dataset = self._graphs(_data_path(run_dir), cfg)
        z = _pool(_embed(_isoc_from_checkpoint(ckpt), union.x, union.edge_index).cpu(), union.batch, union.num_graphs, cfg.pool)
        return paths + plot_embeddings(figures_dir(run_dir), z.numpy(), union.y.numpy(), f"{cfg.pool}-pooled IsoC-VGAE "
                                       f"graph embedding ({dataset}, seed {seed}, final checkpoint, all {union.num_graphs} graphs)",
                                       seed)

    def run(self, cfg: TUIsoCConfig, ctx: RunContext) -> dict[str, Any]:
        graphs, union, dataset = self._graphs(ctx.data, cfg)
        y = union.y.numpy()

        def one_seed(sub: RunContext, seed: int) -> dict[str, dict[str, float]]:
            def pooled(module: IsoCModule) -> np.ndarray:
                z = _embed(module, union.x, union.edge_index).cpu()
                return _pool(z, union.batch, union.num_graphs, cfg.pool).numpy()

            embs = {"isocvgae": pooled(fit_isoc(sub, cfg, union, seed)), "random-init": pooled(random_isoc(cfg, union, seed))}
            if cfg.baselines.enabled:
                z = train_pyg_vgae(union.x, union.edge_index, seed, cfg.baselines.vgae_epochs)
                embs["pyg-vgae"] = _pool(z, union.batch, union.num_graphs, cfg.pool).numpy()
            metrics = _graph_metrics(embs, y, seed, cfg.folds)
            if cfg.baselines.enabled:
                metrics["graph/supervised[50/20/30]"] = {"gin": train_supervised_gin(cfg, graphs, y, seed)}
            return metrics

        per_seed = [_resume_or_run(ctx, s, one_seed) for s in range(cfg.seed, cfg.seed + cfg.num_seeds)]
        return _finish(ctx, self.name, per_seed, {
            "dataset": dataset,
            "protocols": {
                "graph/svm[50/20/30]": "RBF SVC on pooled frozen embeddings, stratified 50/20/30 split (IsoC-VGAE), C on val",
                f"graph/svm[{cfg.folds}-fold]": f"the same probe, stratified {cfg.folds}-fold CV, C on 20 % of each training fold",
                "graph/supervised[50/20/30]": "the encoder + linear head trained end-to-end, test at best val epoch",
            },
        })


# ------------------------------------------------------------------------------------ SelfTask
@dataclass
class SelfTaskModelConfig:
    hidden: int = 128
    dropout: float = 0.5


@dataclass
class SelfTaskOptimConfig:
    lr: float = 0.01
    weight_decay: float = 5e-4  # every parameter, as the reference


@dataclass
class PlanetoidSelfTaskConfig(RunConfig):
    dataset: str = "cora"
    task: str = "contextlabel"  # one of graphs.selftask.TASKS
    method: str = "ica"  # pseudo-labels of contextlabel / correctedlabel: ica | lp
    lambda_: Union[float, None] = None  # None: the reference's λ for task and dataset
    alpha: float = 1.5  # correctedlabel
    two_stage: bool = False  # pretrain on the pretext task, then fine-tune with CE
    pretrain_epochs: int = 200
    num_seeds: int = 5
    baseline: bool = True  # also train the plain GCN (same backbone, λ = 0) on every seed
    model: SelfTaskModelConfig = field(default_factory=SelfTaskModelConfig)
    optim: SelfTaskOptimConfig = field(default_factory=SelfTaskOptimConfig)


class SelfTaskModule(L.LightningModule):
    """Joint (CE + λ·SSL) or two-stage training of :class:`SelfTaskGCN` on one graph.

    Model selection as the reference's ``train_ssl.py`` (early stopping on validation accuracy with
    patience = the number of epochs): after every epoch the model is scored on the validation nodes,
    and the test accuracy of the first epoch with the best validation accuracy is reported (during
    two-stage pretraining, from the fine-tuning stage on)."""

    def __init__(self, hparams: dict[str, Any], graph: Data | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        c = hparams["config"]
        task = None
        if hparams["use_task"]:
            options: dict[str, Any] = {}
            if c["task"] in ("contextlabel", "correctedlabel"):
                options["method"] = c["method"]
            if c["task"] == "correctedlabel":
                options["alpha"] = c["alpha"]
            task = build_task(c["task"], c["model"]["hidden"], hparams["num_classes"], hparams["dataset"], **options)
        self.model = SelfTaskGCN(hparams["in_dim"], c["model"]["hidden"], hparams["num_classes"], c["model"]["dropout"], task)
        self.graph = graph
        self._gen: torch.Generator | None = None
        self.best = {"val_acc": -1.0, "test_acc": float("nan"), "epoch": -1}

    def on_fit_start(self) -> None:
        self._gen = torch.Generator().manual_seed(int(self.hparams["seed"]))
        if self.model.task is not None and self.graph is not None:
            self.model.task.prepare(self.graph.to(self.device), self._gen)
            self.model.task.to(self.device)

    def _pretraining(self) -> bool:
        c = self.hparams["config"]
        return bool(c["two_stage"]) and self.model.task is not None and self.current_epoch < c["pretrain_epochs"]

    def training_step(self, batch: Data, batch_idx: int) -> torch.Tensor:
        ce, ssl = self.model.losses(batch, self._gen)
        lam = self.hparams["lambda"]
        if self.hparams["config"]["two_stage"] and self.model.task is not None:
            loss = lam * ssl if self._pretraining() else ce
        else:
            loss = ce + lam * ssl
        self.log_dict({"train_loss": loss, "train_ce": ce, "train_ssl": ssl}, batch_size=1)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._pretraining() or self.graph is None:
            return
        g = self.graph.to(self.device)
        self.model.eval()
        with torch.no_grad():
            pred = self.model(g.x, g.edge_index)[0].argmax(1)
        self.model.train()
        val = MulticlassAccuracy().to(self.device)
        val.update(pred[g.val_mask], g.y[g.val_mask])
        val_acc = float(val.compute())
        self.log("val_acc", val_acc, batch_size=1)
        if val_acc > self.best["val_acc"]:
            test = MulticlassAccuracy().to(self.device)
            test.update(pred[g.test_mask], g.y[g.test_mask])
            self.best = {"val_acc": val_acc, "test_acc": float(test.compute()), "epoch": int(self.current_epoch)}

    def configure_optimizers(self):
        o = self.hparams["config"]["optim"]
        # the reference decays every parameter (backbone and pretext head) with 5e-4
        return torch.optim.Adam(self.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])


@register_pipeline
class PlanetoidSelfTask(Pipeline):
    name = "planetoid-selftask"
    description = "SelfTask-GNN pretext tasks (ContextLabel, ...) jointly trained with a GCN on the public Planetoid split"
    config_class = PlanetoidSelfTaskConfig

    def run(self, cfg: PlanetoidSelfTaskConfig, ctx: RunContext) -> dict[str, Any]:
        if cfg.task not in TASKS:
            raise ConfigError(f"task={cfg.task!r}: choose one of {', '.join(sorted(TASKS))}")
        graph, dataset = load_planetoid_graph(ctx.data, cfg.dataset)
        lam = cfg.lambda_ if cfg.lambda_ is not None else REFERENCE_LAMBDA[cfg.task].get(dataset, 10.0)
        epochs = cfg.trainer.max_epochs + (cfg.pretrain_epochs if cfg.two_stage else 0)

        def train(sub: RunContext, seed: int, use_task: bool) -> float:
            seed_everything(seed)
            hp = {"config": config_to_dict(cfg), "in_dim": int(graph.num_features), "num_classes": int(graph.y.max()) + 1,
                  "dataset": dataset, "seed": seed, "use_task": use_task, "lambda": float(lam)}
            module = SelfTaskModule(hp, graph)
            sub.fit(module, OneBatch(graph), use_distributed_sampler=False, max_epochs=epochs)
            return module.best

        method = cfg.task if cfg.task not in ("contextlabel", "correctedlabel") else f"{cfg.task}[{cfg.method}]"

        def one_seed(sub: RunContext, seed: int) -> dict[str, dict[str, float]]:
            runs = {method: train(sub.child(cfg.task), seed, True)}
            if cfg.baseline:
                runs["gcn"] = train(sub.child("gcn"), seed, False)
            return {key: {m: r[field] for m, r in runs.items()}
                    for key, field in (("node/test_acc[public]", "test_acc"), ("node/val_acc[public]", "val_acc"))}

        per_seed = [_resume_or_run(ctx, s, one_seed) for s in range(cfg.seed, cfg.seed + cfg.num_seeds)]
        out = _finish(ctx, self.name, per_seed, {
            "dataset": dataset, "task": cfg.task, "lambda": lam, "two_stage": cfg.two_stage,
            "protocol": f"public split, GCN hidden {cfg.model.hidden}, {cfg.trainer.max_epochs} epochs, "
                        "test accuracy at the epoch of best validation accuracy (reference train_ssl.py)",
        })
        if cfg.baseline:
            t = out["tables"]["node/test_acc[public]"]
            out["beats_gcn_by_one_std"] = bool(t[method]["mean"] > t["gcn"]["mean"] + t["gcn"]["std"])
        return out

    def figures(self, cfg: PlanetoidSelfTaskConfig, run_dir: Path, metrics: dict[str, Any]) -> list[Path]:
        """Curves, the result table as bars, and PCA / t-SNE of the first seed's GCN hidden layer
        (jointly trained with the pretext task, final checkpoint, eval mode) for all nodes."""
        from threefold.pipelines.engine import load_checkpoint
        from threefold.pipelines.figures import figures_dir
        from threefold.pipelines.figures_graphs import plot_embeddings

        paths = super().figures(cfg, run_dir, metrics) + _table_figure(run_dir, metrics)
        seed = (metrics.get("seeds") or [cfg.seed])[0]
        ckpt = run_dir / f"seed{seed}" / cfg.task / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            return paths
        graph, dataset = load_planetoid_graph(_data_path(run_dir), cfg.dataset)
        stored = load_checkpoint(ckpt)
        module = SelfTaskModule(stored["hyper_parameters"], graph)
        module.on_fit_start()  # the pretext task builds its parameters from the graph
        module.load_state_dict(stored["state_dict"])
        module.eval()
        with torch.no_grad():
            hidden = module.model(graph.x, graph.edge_index)[1].numpy()
        return paths + plot_embeddings(figures_dir(run_dir), hidden, graph.y.numpy(), f"GCN hidden layer trained with "
                                       f"{cfg.task} ({dataset}, seed {seed}, final checkpoint, all {graph.num_nodes} nodes)",
                                       seed)
