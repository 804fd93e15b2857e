"""Frozen 2D teachers of I2P-MAE (Zhang et al., CVPR 2023, §3.2-3.3).

A teacher maps the three depth views ``images (V, 3, 224, 224)`` (ImageNet-normalised) to

* ``features (V, C, 14, 14)``: the patch tokens after the final LayerNorm and projection (CLIP's
  ``ln_post`` and ``proj``, C = 512 for ViT-B/16), the 2D-semantic reconstruction target;
* ``attention (V, 14, 14)``: the last block's [CLS] → patch attention (averaged over heads), which
  guides the masking.

:class:`Teacher2D` is the interface (any frozen model returning these two maps plugs in);
:class:`CLIPVisionTeacher` is a ViT in the CLIP visual tower's layout (the reference uses OpenAI CLIP
ViT-B/16). :func:`load_clip_teacher` builds it from a checkpoint file the user supplies — open_clip /
OpenAI key names (``visual.conv1.weight``, ``visual.transformer.resblocks.N...``) or timm key names
(``patch_embed.proj.weight``, ``blocks.N...``, ``head.weight``) — and never downloads anything.
:func:`random_teacher` is a small randomly initialised ViT for tests and the embedded demo.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from threefold.datasets.errors import ConfigError, DataFormatError, MissingFileError, UnsafePickleError, require


class Teacher2D(nn.Module):
    """Interface of a frozen 2D teacher: ``forward(images (V, 3, H, W))`` -> ``(features (V, C, h, w),
    attention (V, h, w))`` in float32. ``feature_dim`` is C. Subclasses stay in eval mode and hold no
    trainable parameters (:meth:`freeze`)."""

    feature_dim: int

    def freeze(self) -> Teacher2D:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Teacher2D:  # a frozen teacher never leaves eval mode
        return super().train(False)


class QuickGELU(nn.Module):
    """``x · sigmoid(1.702 x)``, the activation of OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResidualBlock(nn.Module):
    # CLIP's ResidualAttentionBlock: names match the checkpoints (ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj).
    def __init__(self, width: int, heads: int, act: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        y = self.ln_1(x)
        out, weights = self.attn(y, y, y, need_weights=need_weights, average_attn_weights=True)
        x = x + out
        return x + self.mlp(self.ln_2(x)), weights


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualBlock(width, heads, act) for _ in range(layers))


class _Visual(nn.Module):
    # The CLIP visual tower (names as in the checkpoints: conv1, class_embedding, positional_embedding,
    # ln_pre, transformer.resblocks, ln_post, proj).
    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int, output_dim: int,
                 act: str) -> None:
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))


class CLIPVisionTeacher(Teacher2D):
    """CLIP ViT visual tower returning the patch-feature map and the last block's [CLS] → patch
    attention (the reference's modified ``clip_attn``). ViT-B/16: ``patch=16, width=768, layers=12,
    heads=12, output_dim=512, act="quick_gelu"``. Parameters are under ``visual.*``."""

    def __init__(self, image_size: int = 224, patch: int = 16, width: int = 768, layers: int = 12, heads: int = 12,
                 output_dim: int = 512, act: str = "quick_gelu") -> None:
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"CLIPVisionTeacher: act={act!r}, expected 'quick_gelu' or 'gelu'")
        if image_size % patch:
            raise ConfigError(f"CLIPVisionTeacher: image_size={image_size} is not a multiple of patch={patch}")
        self.image_size, self.patch, self.feature_dim = image_size, patch, output_dim
        self.visual = _Visual(image_size, patch, width, layers, heads, output_dim, act)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        v = self.visual
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise DataFormatError(f"CLIPVisionTeacher: images {tuple(images.shape)}, expected "
                                  f"(V, 3, {self.image_size}, {self.image_size})")
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (V, width, g, g)
        n, width, g, _ = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(n, 1, width), x], 1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        weights = None
        for i, block in enumerate(blocks):
            x, w = block(x, need_weights=i == len(blocks) - 1)
            weights = w if w is not None else weights
        feats = v.ln_post(x[:, 1:]) @ v.proj  # (V, g², C)
        feats = feats.transpose(1, 2).reshape(n, -1, g, g)
        attention = weights[:, 0, 1:].reshape(n, g, g)
        return feats.float(), attention.float()


def random_teacher(seed: int = 0, width: int = 64, layers: int = 2, heads: int = 4, output_dim: int = 32,
                   image_size: int = 224, patch: int = 16) -> CLIPVisionTeacher:
    """A small randomly initialised CLIP-layout ViT (frozen), the teacher of the tests and the embedded
    demo: it gives the model real 2D targets and attention with the right shapes, not CLIP's semantics."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        teacher = CLIPVisionTeacher(image_size, patch, width, layers, heads, output_dim, act="gelu")
    finally:
        torch.random.set_rng_state(gen_state)
    return teacher.freeze()


# ------------------------------------------------------------------------------------ checkpoints
_TIMM_TO_CLIP = (
    (r"^patch_embed\.proj\.", "conv1."),
    (r"^norm_pre\.", "ln_pre."),
    (r"^blocks\.(\d+)\.norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^blocks\.(\d+)\.norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"transformer.resblocks.\1.attn.in_proj_"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"^norm\.", "ln_post."),
)


def _timm_to_clip(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """timm ``vit_*_clip_*`` names -> CLIP visual names (the inverse of timm's ``_convert_openai_clip``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key == "head.weight":
            out["proj"] = value.t()
        elif key == "head.bias":
            if value.abs().max() > 0:
                raise DataFormatError(f"{source}: timm head.bias is non-zero; CLIP's projection has no bias")
        else:
            new = key
            for pattern, repl in _TIMM_TO_CLIP:
                new = re.sub(pattern, repl, new)
            if new == key:
                continue  # fc_norm, head_drop, ...: not part of the visual tower's feature map
            out[new] = value
    return out


def _is_torchscript(path: Path) -> bool:
    # A TorchScript archive is a zip holding <name>/constants.pkl and <name>/code/; a state dict saved by
    # torch.save is a zip without them.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def _read_state(path: Path, trust_torchscript: bool = False) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return require("safetensors.torch", extra="points").load_file(str(path))
    if _is_torchscript(path) and not trust_torchscript:
        # Loading a TorchScript archive deserialises a program, not just tensors: never for an unvetted file.
        raise UnsafePickleError(
            f"{path}: a TorchScript archive (OpenAI's original ViT-B-16.pt format) holds code as well as weights "
            "and is not loaded by default; pass trust_torchscript=True (config: teacher.trust_torchscript=true) "
            "for a file from a source you trust, or use open_clip's state dict (open_clip_pytorch_model.bin)")
    try:
        if _is_torchscript(path):  # OpenAI's original ViT-B-16.pt: a TorchScript archive of the whole CLIP
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError... on bad files
        raise DataFormatError(f"{path}: neither a torch state dict, a safetensors file nor a TorchScript archive "
                              f"({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataFormatError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_clip_teacher(path: str | Path, act: str = "quick_gelu", trust_torchscript: bool = False) -> CLIPVisionTeacher:
    """Build a frozen :class:`CLIPVisionTeacher` from a user-supplied CLIP checkpoint (no download).

    ``path``: an open_clip / OpenAI state dict (``.pt``/``.bin``; keys ``visual.*``, the text tower is
    ignored), an OpenAI TorchScript archive, or a timm ``vit_*_clip_*`` state dict (``.bin`` /
    ``.safetensors``). Widths, depth, heads, patch and output dimension are read from the tensors
    (heads = width / 64 as in CLIP). ``act``: ``"quick_gelu"`` for OpenAI weights, ``"gelu"`` for
    open_clip models trained with GELU (e.g. LAION ``ViT-B-16``). ``trust_torchscript``: load a
    TorchScript archive (it carries code; refused with :class:`UnsafePickleError` otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: CLIP checkpoint not found (teacher.checkpoint); download it yourself, e.g. "
                               "OpenAI ViT-B-16.pt or open_clip's ViT-B-16 open_clip_pytorch_model.bin")
    state = _read_state(path, trust_torchscript)
    if any(k.startswith("visual.") for k in state):
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    elif "patch_embed.proj.weight" in state:
        visual = _timm_to_clip(state, str(path))
    elif "conv1.weight" in state:
        visual = dict(state)
    else:
        raise DataFormatError(f"{path}: no CLIP visual tower (expected 'visual.conv1.weight' or timm "
                              "'patch_embed.proj.weight')")
    try:
        width, _, patch, _ = visual["conv1.weight"].shape
        tokens = visual["positional_embedding"].shape[0]
        output_dim = visual["proj"].shape[1]
    except KeyError as exc:
        raise DataFormatError(f"{path}: CLIP visual tower lacks {exc.args[0]}") from exc
    layers = len({m.group(1) for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens or layers == 0:
        raise DataFormatError(f"{path}: positional_embedding has {tokens} rows / {layers} blocks: not a ViT")
    teacher = CLIPVisionTeacher(grid * patch, patch, width, layers, width // 64, output_dim, act)
    own = teacher.visual.state_dict()
    missing = sorted(set(own) - set(visual))
    if missing:
        raise DataFormatError(f"{path}: CLIP visual tower lacks {missing[:3]}")
    teacher.visual.load_state_dict({k: visual[k] for k in own})
    return teacher.freeze()
