"""The IS / CLIP / DINO evaluation features: C3D against a PyTorch definition of TGAN2's C3D, DINO's ViT against a
PyTorch ViT in timm's layout, the converters, the Inception Score against the references' formulas, and the CLIP
scores against transformers' CLIPModel.

Parity: fp32, random perturbed weights, max|ours - ref| / max|ref| <= 1e-4 (TOL).
- `tests/torch_c3d.TorchC3D`: TGAN2's `C3DVersion1UCF101` forward (its "pre" step, ceil-mode pools) in torch.nn.
- `TorchDINOViT` below: timm's `VisionTransformer` as `vit_small_patch16_224.dino` configures it (pre-norm blocks
  with a fused qkv, exact GELU, LayerNorm eps 1e-6, final norm, CLS output, no head), with DINO's
  `interpolate_pos_encoding` (bicubic `interpolate` by scale factors (n_new + 0.1) / n) for other input sizes. timm
  itself does not import beside this torch build (it needs torchvision at import), so the peer is written out with
  timm's module names; its state dict is timm's and DINO's key layout.
- `transformers.CLIPModel` (`get_image_features`, `get_text_features`) for CLIPSIM.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import perturb_, rel_err
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch_c3d import TorchC3D

from magdiff_jax.convert import ConversionError, load_torch, save_torch
from magdiff_jax.convert.c3d import c3d_from_tgan2, c3d_state_dict
from magdiff_jax.convert.dino import dino_state_dict
from magdiff_jax.eval.clip_scores import (
    CLIPEmbedder,
    DINOEmbedder,
    clip_i,
    clip_preprocess,
    clipsim,
    dino_score,
    frame_consistency,
    resize_shorter_side,
    text_alignment,
)
from magdiff_jax.eval.inception_score import InceptionScore, inception_score
from magdiff_jax.models.clip import CLIPTextConfig
from magdiff_jax.models.dino import imagenet_normalise

TOL = 1e-4


def check(name: str, ours, ref) -> None:
    err = rel_err(ours, ref)
    print(f"{name}: max|diff|/max|ref| = {err:.2e}")
    assert err <= TOL, f"{name}: relative error {err:.2e} > {TOL}"


def videos_in_range(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --- C3D ------------------------------------------------------------------------------------------------------------
C3D_WIDTHS, C3D_FC, C3D_CLASSES = (4, 4, 8, 8, 8, 8, 8, 8), (16, 16), 11


@pytest.fixture(scope="module")
def c3d(tmp_path_factory):
    """TorchC3D at the reference geometry (16 x 112 x 112, so pool5 rounds 7 up to 4) with small widths, weights
    and the mean perturbed, saved as torch.save writes a state dict, and loaded with load_torch."""
    torch.manual_seed(0)
    net = perturb_(TorchC3D(C3D_WIDTHS, C3D_FC, C3D_CLASSES), scale=0.1, seed=1).eval()
    with torch.no_grad():
        net.mean.copy_(100 + 30 * torch.rand(net.mean.shape, generator=torch.Generator().manual_seed(2)))
    root = tmp_path_factory.mktemp("c3d")
    torch.save(net.state_dict(), root / "c3d.pth")
    module, params = load_torch("c3d", root / "c3d.pth")
    return dict(net=net, root=root, module=module, params=params,
                fn=jax.jit(lambda p, x: module.apply({"params": p}, x)))


def test_c3d_matches_torch_definition(c3d):
    """C3D vs tests/torch_c3d.TorchC3D (TGAN2's C3DVersion1UCF101), 64 x 48 frames resized to 112: fc8 and fc7."""
    assert c3d["module"].config.widths == C3D_WIDTHS and c3d["module"].config.num_classes == C3D_CLASSES
    x = videos_in_range((2, 16, 64, 48, 3), seed=3)
    out = c3d["fn"](c3d["params"], jnp.asarray(x))
    with torch.no_grad():
        logits, fc7 = c3d["net"](torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
    assert float(np.abs(logits.numpy()).max()) > 1e-2  # a signal, not ReLU-dead zeros
    check("c3d fc8", out.logits, logits)
    check("c3d fc7", out.fc7, fc7)


def test_c3d_round_trip_and_missing_key(c3d, tmp_path):
    ref = {k: v.numpy() for k, v in c3d["net"].state_dict().items()}
    state = c3d_state_dict(c3d["module"].config, c3d["params"])
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert np.array_equal(state[k], v), k
    save_torch("c3d", c3d["module"], c3d["params"], tmp_path / "c3d.safetensors")
    again = TorchC3D(C3D_WIDTHS, C3D_FC, C3D_CLASSES)
    from safetensors.torch import load_file

    again.load_state_dict(load_file(tmp_path / "c3d.safetensors"), strict=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in c3d["net"].state_dict().items())
    broken = {k: v for k, v in c3d["net"].state_dict().items() if k != "conv3b.bias"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ConversionError, match=r"conv3b\.bias"):
        load_torch("c3d", tmp_path / "broken.pth")


def test_c3d_from_tgan2_npz_files(c3d, tmp_path):
    """TGAN2's release layout: `conv1a/W`, `conv1a/b`, ... in conv3d_deepnetA_ucf.npz, and mean2.npz's (3, 16, H, W)
    `mean`, cropped at [8:120, 8:120]."""
    state = c3d["net"].state_dict()
    chainer = {k.replace(".weight", "/W").replace(".bias", "/b"): v.numpy() for k, v in state.items() if k != "mean"}
    np.savez(tmp_path / "weights.npz", **chainer)
    full_mean = np.random.default_rng(4).uniform(80, 120, (3, 16, 128, 171)).astype(np.float32)
    full_mean[:, :, 8:120, 8:120] = state["mean"].numpy()
    np.savez(tmp_path / "mean2.npz", mean=full_mean)
    _, params = c3d_from_tgan2(tmp_path / "weights.npz", tmp_path / "mean2.npz")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(c3d["params"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    del chainer["fc7/b"]
    np.savez(tmp_path / "weights.npz", **chainer)
    with pytest.raises(ConversionError, match=r"fc7\.bias"):
        c3d_from_tgan2(tmp_path / "weights.npz", tmp_path / "mean2.npz")
    np.savez(tmp_path / "small_mean.npz", mean=full_mean[:, :, :100, :100])
    with pytest.raises(ConversionError, match="mean"):
        c3d_from_tgan2(tmp_path / "weights.npz", tmp_path / "small_mean.npz")


def test_c3d_rejects_wrong_frame_count(c3d):
    with pytest.raises(ValueError, match="16"):
        c3d["module"].apply({"params": c3d["params"]}, jnp.zeros((1, 8, 112, 112, 3)))


# --- Inception Score ------------------------------------------------------------------------------------------------
def stylegan_v_isv(gen_probs: np.ndarray, num_splits: int) -> tuple[float, float]:
    """StyleGAN-V src/metrics/video_inception_score.py, compute_isv's scoring, transcribed."""
    gen_probs = gen_probs.copy()
    num_gen = len(gen_probs)
    scores = []
    np.random.RandomState(42).shuffle(gen_probs)
    for i in range(num_splits):
        part = gen_probs[i * num_gen // num_splits: (i + 1) * num_gen // num_splits]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        kl = np.mean(np.sum(kl, axis=1))
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def tgan2_is(ys: np.ndarray, splits: int, eps: float = 1e-20) -> tuple[float, float]:
    """TGAN2 tgan2/evaluations/inception_score.py, inception_score's scoring, transcribed."""
    n = len(ys)
    scores = np.empty(splits)
    for i in range(splits):
        part = ys[(i * n // splits):((i + 1) * n // splits), :] + eps
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores[i] = np.exp(np.mean(np.sum(kl, 1)))
    return float(np.mean(scores)), float(np.std(scores))


def random_logits(n, c, seed):
    return 3 * np.random.default_rng(seed).standard_normal((n, c))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_inception_score_matches_stylegan_v_and_tgan2():
    logits = random_logits(203, 17, seed=0)  # 203 rows: uneven splits
    probs = softmax(logits)
    ref = stylegan_v_isv(probs, 10)
    assert ref[1] > 0
    np.testing.assert_allclose(inception_score(probs, 10), ref, rtol=1e-12)
    np.testing.assert_allclose(inception_score(logits, 10, from_logits=True), ref, rtol=1e-12)
    ref = tgan2_is(probs, 3)
    np.testing.assert_allclose(inception_score(probs, 3, shuffle_seed=None, eps=1e-20), ref, rtol=1e-12)
    # the shuffle matters: the same rows scored in order differ
    assert abs(inception_score(probs, 10, shuffle_seed=None)[0] - inception_score(probs, 10)[0]) > 1e-6


def test_inception_score_hand_computed_cases():
    assert inception_score(np.full((40, 101), 1 / 101), 10) == pytest.approx((1.0, 0.0), abs=1e-12)
    k = 7
    one_hot = np.eye(k)[np.arange(8 * k) % k]  # every class equally often
    assert inception_score(one_hot, 1) == pytest.approx((k, 0.0), rel=1e-12)
    # 8 consecutive splits of k rows each hold every class once: IS k in each split, std 0
    assert inception_score(one_hot, 8, shuffle_seed=None) == pytest.approx((k, 0.0), rel=1e-12)


def test_inception_score_streaming_and_errors():
    logits = random_logits(64, 9, seed=1)
    acc = InceptionScore(num_splits=4)
    for start in range(0, 64, 10):
        acc.update(logits[start:start + 10], from_logits=True)
    assert acc.count == 64
    assert acc.compute() == inception_score(logits, 4, from_logits=True)
    with pytest.raises(ValueError, match="3 samples cannot fill 10 splits"):
        inception_score(softmax(logits[:3]), 10)
    with pytest.raises(ValueError, match="from_logits"):
        inception_score(logits, 2)
    with pytest.raises(ValueError, match="classes"):
        acc.update(logits[:, :5], from_logits=True)


# --- DINO ViT -------------------------------------------------------------------------------------------------------
class TorchAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class TorchMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TorchAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TorchMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchDINOViT(nn.Module):
    """timm's VisionTransformer layout (module docstring), forward with DINO's interpolate_pos_encoding."""

    def __init__(self, img_size, patch, dim, depth, heads, mlp_ratio=4.0):
        super().__init__()
        self.patch = patch
        self.patch_embed = TorchPatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([TorchBlock(dim, heads, int(dim * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, h, w):
        npatch, n_pos = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n_pos and h == w:
            return self.pos_embed
        dim, n = x.shape[-1], int(math.sqrt(n_pos))
        h0, w0 = h // self.patch + 0.1, w // self.patch + 0.1
        grid = F.interpolate(self.pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2),
                             scale_factor=(h0 / n, w0 / n), mode="bicubic")
        assert grid.shape[-2:] == (int(h0), int(w0))
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward(self, x):
        b, _, h, w = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


DINO_SIZE, DINO_PATCH, DINO_DIM, DINO_DEPTH = 32, 8, 128, 2  # 128-wide: two 64-wide heads, as the converter infers


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    torch.manual_seed(5)
    net = perturb_(TorchDINOViT(DINO_SIZE, DINO_PATCH, DINO_DIM, DINO_DEPTH, heads=2), scale=0.1, seed=6).eval()
    with torch.no_grad():
        net.pos_embed.mul_(10.0)  # make the position table matter against the patch features
    root = tmp_path_factory.mktemp("dino")
    torch.save(net.state_dict(), root / "dino.pth")
    module, params = load_torch("dino_vit", root / "dino.pth")
    return dict(net=net, root=root, module=module, params=params,
                fn=jax.jit(lambda p, x: module.apply({"params": p}, x)))


@pytest.mark.parametrize("size", [(DINO_SIZE, DINO_SIZE), (44, 36)], ids=["native", "interpolated"])
def test_dino_vit_matches_timm_layout(dino, size):
    """DINOViT vs TorchDINOViT at its native size and at 44 x 36 (a 5 x 4 grid, remainder dropped: DINO's bicubic
    position-table interpolation)."""
    assert dino["module"].config.num_heads == 2 and dino["module"].config.depth == DINO_DEPTH
    images = np.random.default_rng(7).uniform(0, 1, (2, *size, 3)).astype(np.float32)
    x = np.asarray(imagenet_normalise(jnp.asarray(images)))
    ours = dino["fn"](dino["params"], jnp.asarray(x))
    with torch.no_grad():
        ref = dino["net"](torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    assert ours.shape == (2, DINO_DIM)
    check(f"dino cls {size}", ours, ref)


def test_dino_round_trip_prefixes_and_missing_key(dino, tmp_path):
    ref = {k: v.numpy() for k, v in dino["net"].state_dict().items()}
    state = dino_state_dict(dino["module"].config, dino["params"])
    assert set(state) == set(ref) and all(np.array_equal(state[k], v) for k, v in ref.items())
    save_torch("dino_vit", dino["module"], dino["params"], tmp_path / "out.safetensors")
    _, again = load_torch("dino_vit", tmp_path / "out.safetensors")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(dino["params"]),
                                                      strict=True))
    # DINO's training checkpoints: `module.backbone.` prefixes and a head beside the backbone
    wrapped = {f"module.backbone.{k}": v for k, v in dino["net"].state_dict().items()}
    wrapped["head.last_layer.weight"] = torch.zeros(3, DINO_DIM)
    torch.save(wrapped, tmp_path / "wrapped.pth")
    _, params = load_torch("dino_vit", tmp_path / "wrapped.pth")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dino["params"]),
                                                      strict=True))
    broken = {k: v for k, v in dino["net"].state_dict().items() if k != "blocks.1.attn.qkv.bias"}
    broken["blocks.1.attn.qkv_bias"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.qkv\.bias(.|\n)*blocks\.1\.attn\.qkv_bias"):
        load_torch("dino_vit", tmp_path / "broken.pth")


# --- CLIP scores ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random transformers CLIPModel, its towers saved as CLIPTextModelWithProjection /
    CLIPVisionModelWithProjection folders and loaded with load_torch."""
    text = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                       eos_token_id=2,                                       projection_dim=24)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=24)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    torch.manual_seed(8)
    model = perturb_(transformers.CLIPModel(config), scale=0.1, seed=9).eval()
    root = tmp_path_factory.mktemp("clip")
    towers = {}
    for kind, cls, cfg, parts in (
        ("clip_text", transformers.CLIPTextModelWithProjection, config.text_config, ("text_model", "text_projection")),
        ("clip_vision", transformers.CLIPVisionModelWithProjection, config.vision_config,
         ("vision_model", "visual_projection")),
    ):
        tower = cls(cfg)
        for name in parts:
            setattr(tower, name, getattr(model, name))
        tower.save_pretrained(root / kind)
        towers[kind] = load_torch(kind, root / kind)
    embedder = CLIPEmbedder(*towers["clip_text"], *towers["clip_vision"], batch_size=4)
    return dict(model=model, embedder=embedder)


def test_clip_preprocess_resize_matches_pil_float_resize():
    """The shorter-side bicubic resize equals PIL's BICUBIC on a float ("F") image (PIL's filter without its 8-bit
    rounding), down and up."""
    x = np.random.default_rng(10).uniform(0, 1, (40, 56)).astype(np.float32)
    for size in (24, 64):
        ours = np.asarray(resize_shorter_side(jnp.asarray(x)[None, :, :, None], size))[0, :, :, 0]
        assert ours.shape == (size, int(size * 56 / 40))
        ref = np.asarray(Image.fromarray(x, mode="F").resize(ours.shape[::-1], Image.BICUBIC))
        assert np.abs(ours - ref).max() < 1e-5


def test_clipsim_matches_transformers_clipmodel(clip):
    """clipsim = mean over frames of cos(get_image_features(frame), get_text_features(prompt)) through
    transformers' CLIPModel on the same preprocessed frames; text_alignment is 100 x that."""
    videos = videos_in_range((2, 3, 40, 48, 3), seed=11)
    ids = np.array([[0, 5, 17, 2, 1, 1], [0, 9, 33, 60, 2, 1]], np.int32)
    ours = clipsim(clip["embedder"], videos, ids)
    pixels = np.asarray(clip_preprocess(jnp.asarray(videos.reshape(6, 40, 48, 3)), 32))
    with torch.no_grad():
        pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        img = clip["model"].get_image_features(pixel_values=pixels)
        txt = clip["model"].get_text_features(input_ids=torch.from_numpy(ids).long())
    img = getattr(img, "pooler_output", img).numpy().reshape(2, 3, -1)
    txt = getattr(txt, "pooler_output", txt).numpy()
    img = img / np.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    ref = np.einsum("bfd,bd->bf", img, txt).mean(axis=1)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(text_alignment(clip["embedder"], videos, ids)), 100 * ref, atol=1e-3)
    with pytest.raises(ValueError, match="one per video"):
        clipsim(clip["embedder"], videos, ids[:1])


def test_frame_consistency_and_clip_i(clip):
    """Identical frames: frame consistency 100 and CLIP-I 1 against that frame; different frames score less."""
    frame = videos_in_range((1, 1, 40, 48, 3), seed=12)
    still = np.repeat(frame, 5, axis=1)  # (1, 5, 40, 48, 3); with `moving`, 10 frames: batches of 4, the last padded
    moving = videos_in_range((1, 5, 40, 48, 3), seed=13)
    both = np.concatenate([still, moving])
    fc = np.asarray(frame_consistency(clip["embedder"], both))
    np.testing.assert_allclose(fc[0], 100.0, atol=1e-3)
    assert fc[1] < 99.9
    ci = np.asarray(clip_i(clip["embedder"], both, np.concatenate([frame[:, 0], frame[:, 0]])))
    np.testing.assert_allclose(ci[0], 1.0, atol=1e-5)
    assert ci[1] < 0.999


def test_dino_score(dino):
    """DINO subject fidelity: identical frames and subject score 1; several subject images average."""
    embedder = DINOEmbedder(dino["module"], dino["params"], size=DINO_SIZE, batch_size=4)
    frame = videos_in_range((1, 1, 40, 48, 3), seed=14)
    other = videos_in_range((1, 1, 40, 48, 3), seed=15)
    still = np.repeat(frame, 3, axis=1)
    same = np.asarray(dino_score(embedder, still, frame[:, 0]))
    np.testing.assert_allclose(same, 1.0, atol=1e-5)
    pair = np.concatenate([frame, other], axis=1)  # (1, 2, H, W, 3): K = 2 subject images
    mixed = float(dino_score(embedder, still, pair)[0])
    e = np.asarray(embedder.images(np.concatenate([frame[0], other[0]])))
    np.testing.assert_allclose(mixed, (1.0 + float(e[0] @ e[1])) / 2, atol=1e-5)
    assert mixed < 0.999


def test_clip_embedder_needs_projected_towers(clip):
    from magdiff_jax.models.clip import CLIPTextModel

    plain = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    e = clip["embedder"]
    with pytest.raises(ValueError, match="with_projection"):
        CLIPEmbedder(plain, None, e.vision_module, None)
