"""Graph partition for the Distance2Clusters pretext task — a documented substitute for METIS.

SelfTask-GNN (Jin et al., arXiv 2006.10141) partitions the graph with METIS (Karypis & Kumar 1998),
which has no maintained wheel. threefold uses normalised spectral clustering instead (Ng, Jordan and
Weiss, NeurIPS 2001): the ``k`` leading eigenvectors of ``D^{-1/2}(A + I)D^{-1/2}`` (scipy ARPACK,
sparse, no N×N matrix), rows normalised to unit length, k-means (scikit-learn, seeded). Unlike METIS
it does not balance part sizes; on graphs with many components small components are grouped with
nearest neighbours in the spectral embedding. Good enough for the task's purpose (a coarse, graph-
aware set of anchor regions), and stated wherever results are reported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from threefold.datasets.errors import ConfigError


def spectral_partition(edge_index: Tensor, num_nodes: int, num_parts: int, seed: int = 0) -> Tensor:
    """Cluster id per node ``(N,) int64`` in ``[0, num_parts)``."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh
    from sklearn.cluster import KMeans

    if not 2 <= num_parts < num_nodes:
        raise ConfigError(f"num_parts={num_parts} must lie in [2, {num_nodes})")
    e = edge_index.detach().cpu().numpy()
    a = sp.coo_matrix((np.ones(e.shape[1]), (e[0], e[1])), shape=(num_nodes, num_nodes)).tocsr()
    a = ((a + a.T) > 0).astype(np.float64) + sp.identity(num_nodes, format="csr")
    d = np.asarray(a.sum(1)).ravel() ** -0.5
    norm = sp.diags(d) @ a @ sp.diags(d)
    v0 = np.random.default_rng(seed).random(num_nodes)  # ARPACK's start vector, seeded for determinism
    _, vecs = eigsh(norm, k=num_parts, which="LA", v0=v0)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
    labels = KMeans(n_clusters=num_parts, n_init=10, random_state=seed).fit_predict(vecs)
    return torch.from_numpy(labels.astype(np.int64)).to(edge_index.device)
