"""Frozen 2D teachers of I2P-MAE: the ViT's last-layer [CLS] attention against an explicit computation,
checkpoint loading in the open_clip / OpenAI and timm layouts (written here from the published key
names), and the errors for missing or foreign files."""

from __future__ import annotations

import math

import pytest
import torch

from threefold.datasets.errors import DataFormatError, MissingFileError, UnsafePickleError
from threefold.geometry.i2pmae.teacher import CLIPVisionTeacher, load_clip_teacher, random_teacher


def explicit_forward(t: CLIPVisionTeacher, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP visual tower written out with plain matmuls (softmax(QKᵀ/√d)V per head)."""
    sd = {k: v.double() for k, v in t.visual.state_dict().items()}
    ln = lambda x, p: torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    x = torch.nn.functional.conv2d(images.double(), sd["conv1.weight"], stride=t.patch)
    n, w, g, _ = x.shape
    x = torch.cat([sd["class_embedding"].expand(n, 1, w), x.flatten(2).transpose(1, 2)], 1) + sd["positional_embedding"]
    x = ln(x, "ln_pre")
    layers = len(t.visual.transformer.resblocks)
    heads = t.visual.transformer.resblocks[0].attn.num_heads
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        y = ln(x, p + "ln_1")
        q, k, v = (y @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        split = lambda z: z.reshape(n, -1, heads, w // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // heads), -1)
        out = (att @ split(v)).transpose(1, 2).reshape(n, -1, w)
        x = x + out @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = torch.nn.functional.gelu(h)
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    feats = (ln(x[:, 1:], "ln_post") @ sd["proj"]).transpose(1, 2).reshape(n, -1, g, g)
    return feats, att.mean(1)[:, 0, 1:].reshape(n, g, g)


def test_random_teacher_features_and_attention_equal_the_explicit_vit():
    t = random_teacher(seed=3, width=64, layers=2, heads=4, output_dim=32)
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    t.train()
    assert not t.training  # a frozen teacher ignores train()
    images = torch.randn(3, 3, 224, 224)
    feats, attn = t(images)
    assert feats.shape == (3, 32, 14, 14) and attn.shape == (3, 14, 14) and t.feature_dim == 32
    want_f, want_a = explicit_forward(t, images)
    torch.testing.assert_close(feats.double(), want_f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attn.double(), want_a, atol=1e-6, rtol=1e-4)
    assert (attn >= 0).all() and (attn.sum((1, 2)) < 1).all()  # the [CLS]→[CLS] weight is left out
    assert torch.equal(random_teacher(seed=3, width=64, layers=2, heads=4, output_dim=32)(images)[0], feats)


def _clip_layout_state(t: CLIPVisionTeacher) -> dict[str, torch.Tensor]:
    return {f"visual.{k}": v.clone() for k, v in t.visual.state_dict().items()}


def test_open_clip_checkpoint_round_trip(tmp_path):
    src = random_teacher(seed=1, width=128, layers=2, heads=2, output_dim=48)  # CLIP: heads = width / 64
    state = _clip_layout_state(src)
    state["token_embedding.weight"] = torch.zeros(10, 8)  # the text tower is ignored
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    t = load_clip_teacher(path, act="gelu")
    images = torch.randn(2, 3, 224, 224)
    for a, b in zip(t(images), src(images)):
        torch.testing.assert_close(a, b)
    assert len(t.visual.transformer.resblocks) == 2 and t.visual.transformer.resblocks[0].attn.num_heads == 2
    quick = load_clip_teacher(path)  # OpenAI's QuickGELU: a different function of the same weights
    assert not torch.allclose(quick(images)[0], t(images)[0])


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_openai_torchscript_archive(tmp_path):
    """OpenAI distributes ViT-B-16.pt as a TorchScript archive of the whole CLIP model (``visual.*``)."""
    src = random_teacher(seed=4, width=64, layers=1, heads=1, output_dim=8)

    class Whole(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = src.visual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual.conv1(x)

    path = tmp_path / "ViT-B-16.pt"
    torch.jit.trace(Whole(), torch.randn(1, 3, 224, 224)).save(str(path))
    with pytest.raises(UnsafePickleError, match="TorchScript archive"):  # code: refused unless trusted
        load_clip_teacher(path, act="gelu")
    t = load_clip_teacher(path, act="gelu", trust_torchscript=True)
    images = torch.randn(1, 3, 224, 224)
    for a, b in zip(t(images), src(images)):
        torch.testing.assert_close(a, b)


def test_timm_checkpoint_round_trip(tmp_path):
    """timm ``vit_base_patch16_clip_224``-style names (cls_token, pos_embed, patch_embed.proj, norm_pre,
    blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head = projectionᵀ)."""
    src = random_teacher(seed=2, width=64, layers=3, heads=1, output_dim=16)
    v = src.visual.state_dict()
    timm = {"cls_token": v["class_embedding"].reshape(1, 1, -1), "pos_embed": v["positional_embedding"][None],
            "patch_embed.proj.weight": v["conv1.weight"], "norm_pre.weight": v["ln_pre.weight"],
            "norm_pre.bias": v["ln_pre.bias"], "norm.weight": v["ln_post.weight"], "norm.bias": v["ln_post.bias"],
            "head.weight": v["proj"].T.contiguous(), "head.bias": torch.zeros(16)}
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_": "attn.qkv.", "attn.out_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(3):
        for old, new in names.items():
            for suffix in ("weight", "bias"):
                key = f"transformer.resblocks.{i}.{old}{'' if old.endswith('_') else '.'}{suffix}"
                timm[f"blocks.{i}.{new}{'' if new.endswith('.') else '.'}{suffix}"] = v[key]
    path = tmp_path / "pytorch_model.bin"
    torch.save(timm, path)
    t = load_clip_teacher(path, act="gelu")
    images = torch.randn(1, 3, 224, 224)
    for a, b in zip(t(images), src(images)):
        torch.testing.assert_close(a, b)


def test_missing_and_foreign_checkpoints_are_reported(tmp_path):
    with pytest.raises(MissingFileError, match="ViT-B-16.pt"):
        load_clip_teacher(tmp_path / "ViT-B-16.pt")
    other = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(DataFormatError, match="no CLIP visual tower"):
        load_clip_teacher(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataFormatError, match="junk.pt"):
        load_clip_teacher(junk)
    state = _clip_layout_state(random_teacher(width=64, layers=1, heads=1, output_dim=8))
    del state["visual.ln_post.weight"]
    cut = tmp_path / "cut.pt"
    torch.save(state, cut)
    with pytest.raises(DataFormatError, match="ln_post"):
        load_clip_teacher(cut)
