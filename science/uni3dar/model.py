"""The Uni-3DAR decoder: masked next-token prediction over octree tokens, plain PyTorch.

Lu et al., "Uni-3DAR" (2025), Sec. 3.2: a decoder-only transformer reads the sequence of
:mod:`~threefold.science.uni3dar.sequence` under causal attention; the output at each ``[MASK]``
predicts the item at that position: a tree token (255 classes) for a node, or for an atom its type
then the x, y, z in-cell bins, each conditioned on the previous ones by adding the embedding of the
earlier choice (the reference's autoregressive prediction head, ``AutoRegressivePredictionHead``).
Every head is, as in the reference's ``TaskHead``, a two-layer MLP (Linear D->D, GELU, Linear); the
non-linearity is what lets the y head use the x just chosen (and z use x, y) *together with* the
context: with a single linear layer the logits of y would be ``W h + W e(x)``, the effect of x the
same in every molecule, so y could not follow the bond geometry given x (see ``mlp_heads``).
Positions enter through a 3D rotary embedding on the physical position in 0.01 Å units (the head
dimension split over x, y, z), plus learned level and in-cell-offset embeddings. Pre-norm blocks
with RMSNorm and SwiGLU; attention is ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient kernels on GPU when the inputs allow), so the flash-attn package is not
needed. Loss weights as in the reference: tree 1, atom type 1, each coordinate 0.1.

Shapes: B structures, L positions, D = ``d_model``; all tensors follow the input's device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from threefold.datasets.errors import ConfigError
from threefold.science.uni3dar.sequence import KIND_ATOM, KIND_TREE, SequenceBatch


@dataclass
class Uni3DARConfig:
    """Model size and loss weights. The reference's large model is ``layers=12, d_model=768, heads=12``."""

    vocab_size: int = 442
    bins: int = 24
    depth: int = 6
    num_trees: int = 1  # 2 for crystals: lattice-corner tree, then atom tree
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    ffn_mult: float = 8 / 3
    dropout: float = 0.0  # residual, attention, embedding and head dropout (all 0.1 in the reference)
    rope_theta: float = 10000.0
    tree_weight: float = 1.0
    type_weight: float = 1.0
    xyz_weight: float = 0.1
    # two-layer MLP heads as the reference's TaskHead; False: single linear heads (the layout before
    # this fix; checkpoints without the key load with False)
    mlp_heads: bool = True
    # "type": each token type's mean CE, weighted; "token": the reference's normalisation, the weighted
    # sum of every predicted token's CE divided by the number of predicted items (tree nodes + atoms)
    loss_norm: str = "type"

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32, scaled in x's dtype (one fused kernel where PyTorch has one)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rope_3d(pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotations (cos θ, sin θ) (float32, (B, L, 1, 1, head_dim/2, 2)) of a 3D rotary embedding: each axis
    gets ``head_dim/2 // 3`` frequency pairs on its coordinate (pos (B, L, 3), 0.01 Å units); leftover pairs
    rotate by 0. The two singleton dimensions broadcast over (q/k, heads) in :func:`apply_rope`."""
    per_axis = (head_dim // 2) // 3
    freqs = 1.0 / theta ** (torch.arange(per_axis, device=pos.device, dtype=torch.float32) * 2 / (2 * per_axis))
    angles = (pos.float()[..., :, None] * freqs).flatten(-2)  # (B, L, 3 * per_axis)
    pad = head_dim // 2 - angles.shape[-1]
    angles = F.pad(angles, (0, pad))
    return torch.stack([angles.cos(), angles.sin()], -1)[:, :, None, None]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x (B, L, ..., Dh) by the rotations ``rot`` of
    :func:`rope_3d` (broadcastable to (B, L, ..., Dh/2, 2)), in float32. Eager: one complex multiply instead
    of four real ones and a stack (the GPU step is bound by elementwise kernels); under ``torch.compile`` the
    real form, which the compiler fuses (it generates no code for complex operators)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        (x1, x2), (c, s) = pairs.unbind(-1), rot.unbind(-1)
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.view_as_complex(rot))
    return out.flatten(-2).type_as(x)


class TaskHead(nn.Module):
    """Prediction head of the reference (``uni3dar/models/layers.py`` ``TaskHead``): dropout, Linear
    D->D without bias, GELU, Linear D->``out`` without bias. x (N, D) -> logits (N, out). The hidden
    layer starts at fan-in scale (std D^-1/2, the reference's default ``Linear`` init), the output
    layer at N(0, 0.02) like the rest of the model instead of the reference's zeros (ties in
    untrained greedy sampling otherwise)."""

    def __init__(self, dim: int, out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, out, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        return self.out(F.gelu(self.dense(x)))


class Block(nn.Module):
    def __init__(self, cfg: Uni3DARConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model)
        hidden = int(round(cfg.ffn_mult * cfg.d_model / 8)) * 8
        self.ffn = SwiGLU(cfg.d_model, hidden)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads)
        q, k = apply_rope(qkv[:, :, :2], rope).unbind(2)  # q and k rotated together
        q, k, v = (t.transpose(1, 2) for t in (q, k, qkv[:, :, 2]))  # (B, H, L, Dh)
        drop = self.dropout if self.training else 0.0
        if cache is None:
            att = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            if "k" in cache:
                k = torch.cat([cache["k"], k], 2)
                v = torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            past = k.shape[2] - L
            allowed = torch.ones(L, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + F.dropout(self.proj(att.transpose(1, 2).reshape(B, L, D)), drop, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), drop, self.training)


class Uni3DAR(nn.Module):
    """Decoder-only transformer with the tree head and the autoregressive atom head (type, x, y, z)."""

    def __init__(self, cfg: Uni3DARConfig) -> None:
        super().__init__()
        if cfg.loss_norm not in ("type", "token"):
            raise ConfigError(f"Uni3DARConfig.loss_norm={cfg.loss_norm!r}: expected 'type' or 'token'")
        self.cfg = cfg
        D = cfg.d_model
        self.token_emb = nn.Embedding(cfg.vocab_size, D)
        self.level_emb = nn.Embedding(cfg.depth + 1, D)
        self.tree_emb = nn.Embedding(cfg.num_trees, D) if cfg.num_trees > 1 else None
        self.xyz_emb = nn.ModuleList(nn.Embedding(cfg.bins + 1, D) for _ in range(3))  # index bins = none
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self._compiled_blocks: list[nn.Module] | None = None  # compile_blocks(); a plain list: no state_dict keys
        self.norm = RMSNorm(D)
        if cfg.mlp_heads:
            self.tree_head = TaskHead(D, 255, cfg.dropout)
            self.type_head = TaskHead(D, cfg.vocab_size, cfg.dropout)
            self.coord_heads = nn.ModuleList(TaskHead(D, cfg.bins, cfg.dropout) for _ in range(3))
        else:
            self.tree_head = nn.Linear(D, 255)
            self.type_head = nn.Linear(D, cfg.vocab_size)
            self.coord_heads = nn.ModuleList(nn.Linear(D, cfg.bins) for _ in range(3))
        self.type_cond = nn.Embedding(cfg.vocab_size, D)
        self.coord_cond = nn.ModuleList(nn.Embedding(cfg.bins, D) for _ in range(2))
        self.apply(self._init)
        # hidden layer of the MLP heads at fan-in scale (pre-activations ~ N(0, 1)): at N(0, 0.02) a small
        # model's head starts as a near-linear product of two tiny matrices and learns slowly
        for m in self.modules():
            if isinstance(m, TaskHead):
                nn.init.normal_(m.dense.weight, std=D**-0.5)

    def compile_blocks(self) -> None:
        """Use ``torch.compile``d transformer blocks (dynamic sequence length) for training forwards; the
        weights stay the blocks' own (same state_dict keys), evaluation and cached sampling stay eager. The
        first steps pay the compilation (tens of seconds)."""
        self._compiled_blocks = [torch.compile(b, dynamic=True) for b in self.blocks]

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def hidden(
        self,
        tokens: torch.Tensor,
        level: torch.Tensor,
        pos: torch.Tensor,
        xyz_in: torch.Tensor,
        cache: list[dict[str, torch.Tensor]] | None = None,
        tree_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, L, D) of the positions given (the new ones only, with a cache)."""
        x = self.token_emb(tokens) + self.level_emb(level)
        if self.tree_emb is not None and tree_index is not None:
            x = x + self.tree_emb(tree_index)
        for axis in range(3):
            x = x + self.xyz_emb[axis](xyz_in[..., axis])
        x = F.dropout(x, self.cfg.dropout, self.training)  # the reference's embedding dropout
        rope = rope_3d(pos, self.cfg.d_model // self.cfg.heads, self.cfg.rope_theta)
        compiled = self._compiled_blocks is not None and cache is None and self.training
        for i, block in enumerate(self._compiled_blocks if compiled else self.blocks):
            x = block(x, rope, None if cache is None else cache[i])
        return self.norm(x)

    def atom_logits(
        self, h: torch.Tensor, type_id: torch.Tensor | None = None, xyz: torch.Tensor | None = None, step: int = 0
    ) -> torch.Tensor:
        """Logits of atom field ``step`` (0 type, 1 x, 2 y, 3 z) at mask states h (N, D), conditioned
        on the earlier fields (type_id (N,), xyz (N, 3)) by adding their embeddings (dropped out with
        ``dropout`` in training, as the reference's ``emb_dropout``)."""
        if step == 0:
            return self.type_head(h)
        drop = self.cfg.dropout if self.training else 0.0
        h = h + F.dropout(self.type_cond(type_id), drop, self.training)
        for axis in range(step - 1):
            h = h + F.dropout(self.coord_cond[axis](xyz[:, axis]), drop, self.training)
        return self.coord_heads[step - 1](h)

    def loss(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Weighted cross-entropy and its parts (nats per predicted token of each type: tree, type,
        x, y, z). ``loss_norm="type"``: ``w_tree·CE_tree + w_type·CE_type + w_xyz·(CE_x + CE_y + CE_z)``
        of the per-type means; ``"token"`` (reference ``ARLoss``): the same weights on the per-token
        sums, divided by the number of predicted items (tree nodes + atoms)."""
        h = self.hidden(batch.tokens, batch.level, batch.pos, batch.xyz_in, tree_index=batch.tree_index)
        tree_m, atom_m = batch.kind == KIND_TREE, batch.kind == KIND_ATOM
        parts = {"tree": F.cross_entropy(self.tree_head(h[tree_m]).float(), batch.tree_target[tree_m])}
        ha, ty, xyz = h[atom_m], batch.type_target[atom_m], batch.xyz_target[atom_m]
        parts["type"] = F.cross_entropy(self.atom_logits(ha, step=0).float(), ty)
        for axis, name in enumerate("xyz"):
            parts[name] = F.cross_entropy(self.atom_logits(ha, ty, xyz, step=axis + 1).float(), xyz[:, axis])
        c = self.cfg
        n_tree, n_atom = tree_m.sum(), atom_m.sum()
        if c.loss_norm == "token":
            total = (c.tree_weight * parts["tree"] * n_tree + c.type_weight * parts["type"] * n_atom
                     + c.xyz_weight * (parts["x"] + parts["y"] + parts["z"]) * n_atom) / (n_tree + n_atom)  # fmt: skip
        elif c.loss_norm == "type":
            total = c.tree_weight * parts["tree"] + c.type_weight * parts["type"]
            total = total + c.xyz_weight * (parts["x"] + parts["y"] + parts["z"])
        else:
            raise ConfigError(f"Uni3DARConfig.loss_norm={c.loss_norm!r}: expected 'type' or 'token'")
        return {"loss": total, **parts}
