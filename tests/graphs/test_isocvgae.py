"""IsoC-VGAE: neighbour means, degrees, KL and the composed Inv-GNN loss against independent values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from threefold.datasets.errors import ConfigError
from threefold.graphs.isocvgae import (
    IsoCVGAE,
    PairNorm,
    gaussian_kl_to_unit_variance,
    neighbourhood_mean,
    node_degree,
)

# path 0-1-2-3 plus triangle 3-4-5, a self loop on 2 (ignored), isolated node 6
EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (3, 5)]
N = 7


def _edge_index() -> torch.Tensor:
    e = torch.tensor(EDGES).t()
    return torch.cat([e, e.flip(0), torch.tensor([[2], [2]])], 1)


def _brute_neighbour_mean(h: np.ndarray) -> np.ndarray:
    nbrs = {v: {v} for v in range(N)}
    for a, b in EDGES:
        nbrs[a].add(b)
        nbrs[b].add(a)
    return np.stack([h[sorted(nbrs[v])].mean(0) for v in range(N)])


def test_neighbourhood_mean_and_degree():
    h = torch.randn(N, 5, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(neighbourhood_mean(h, _edge_index()).numpy(), _brute_neighbour_mean(h.numpy()), rtol=1e-6, atol=1e-6)
    assert node_degree(_edge_index(), N).tolist() == [1, 2, 2, 3, 2, 2, 0]


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, log_sigma, m = (torch.randn(6, 4, generator=g) for _ in range(3))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, log_sigma.exp()), torch.distributions.Normal(m, torch.ones_like(m))
    ).mean()
    assert torch.allclose(gaussian_kl_to_unit_variance(mu, log_sigma, m), ref, atol=1e-6)


class _Const(nn.Module):
    def __init__(self, width: int, value: float) -> None:
        super().__init__()
        self.width, self.value = width, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], self.width), self.value)


def test_decoder_terms_analytic():
    """With μ-MLPs fixed to 0, log σ to c and the degree MLP to d0, every term has a closed form."""
    torch.manual_seed(0)
    x = torch.rand(N, 6)
    model = IsoCVGAE(6, hidden=(5, 4), norm="none").eval()
    dec = model.decoder
    widths = [5, 6]  # decoding layer 2 → width 5, layer 1 → width 6
    c, d0 = -20.0, 1.5
    for k, w in enumerate(widths):
        dec.self_mlp[k] = _Const(w, 0.0)
        dec.sigma_mlp[k] = _Const(w, c)
        dec.degree_mlp[k] = _Const(1, d0)
    dec.prior_mlp[0] = _Const(6, 0.0)
    with torch.no_grad():
        loss, terms, emb = model(x, _edge_index(), torch.Generator().manual_seed(3))
        h1 = model.encoder(x, _edge_index())[0]
    targets = [h1.numpy(), x.numpy()]
    sigma2 = np.exp(2 * c)
    # σ = e^-20, so z = μ = 0 up to 1e-9 and the self term is mean(t²)
    self_ref = np.mean([np.mean(t**2) for t in targets])
    kl_ref = np.mean([0.5 * np.mean(sigma2 + _brute_neighbour_mean(t) ** 2 - 1 - 2 * c) for t in targets])
    deg = np.array([1, 2, 2, 3, 2, 2, 0], dtype=float)
    deg_ref = np.mean((d0 - deg) ** 2)
    assert terms["self"].item() == pytest.approx(self_ref, abs=1e-5)
    assert terms["neighbour"].item() == pytest.approx(kl_ref, rel=1e-5)
    assert terms["degree"].item() == pytest.approx(deg_ref, rel=1e-6)
    assert loss.item() == pytest.approx(self_ref + 0.1 * kl_ref + deg_ref, rel=1e-5)
    assert emb.shape == (N, 4)


def test_encoder_layers_and_options():
    x = torch.rand(N, 6)
    for conv, norm in (("gcn", "batch"), ("gcn", "pair"), ("gin", "batch")):
        h = IsoCVGAE(6, hidden=(8, 8), conv=conv, norm=norm).encoder(x, _edge_index())
        assert [t.shape for t in h] == [(N, 8), (N, 8)]
        assert (h[0] >= 0).all()  # ReLU between layers
    assert PairNorm()(torch.rand(N, 3)).shape == (N, 3)
    with pytest.raises(ConfigError):
        IsoCVGAE(6, conv="gat")


def test_training_reduces_loss_and_groups():
    torch.manual_seed(0)
    x = torch.rand(N, 6)
    model = IsoCVGAE(6, hidden=(16, 16))
    groups = model.parameter_groups(lr=1e-2, degree_lr=1e-2)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss, _, _ = model(x, _edge_index(), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    x = torch.rand(N, 6)
    model = IsoCVGAE(6, hidden=(8, 8)).eval()
    with torch.no_grad():
        cpu = model.embed(x, _edge_index())
        gpu = model.to("cuda").embed(x.cuda(), _edge_index().cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
