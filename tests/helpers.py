"""Test utilities shared by the parity suites."""

from __future__ import annotations

import string

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "o f</w>"]


def perturb_(module, scale: float = 0.1, seed: int = 0):
    """Move every parameter of a PyTorch module away from its init (norm weights != 1, biases != 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (arrays, or PyTorch tensors)."""
    ours, ref = (np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, np.float64) for x in (ours, ref))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def flat_params(tree) -> dict:
    """A nested parameter tree as {"a/b/c": leaf}."""
    from flax import traverse_util

    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def nchw(x: np.ndarray):
    """channels-last numpy -> channels-first torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(t) -> np.ndarray:
    """channels-first torch tensor -> channels-last numpy."""
    return np.moveaxis(t.detach().numpy(), 1, -1)


def assert_same_state_dict(a: dict, b: dict):
    """Identical key sets and bit-identical tensors."""
    assert set(a) == set(b), (sorted(set(a) - set(b))[:10], sorted(set(b) - set(a))[:10])
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.shape == y.shape, k
        assert np.array_equal(x, y), k


def write_tokenizer(folder, pad_token: str):
    """A CLIP-style byte-level BPE vocabulary (letters and a little punctuation, with and without `</w>`, some
    merges) in the file layout of an SD `tokenizer/` folder."""
    from magdiff_jax.models.tokenizer import write_vocabulary

    vocab: dict[str, int] = {}
    chars = string.ascii_lowercase + "!,."
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    for merge in MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    write_vocabulary(folder, vocab, list(MERGES), BOS, EOS, pad_token)
    return vocab


def random_params(module, *example_args, seed: int = 0, scale: float = 0.1, **example_kwargs):
    """Random parameters shaped like `module.init(...)`'s, drawn with numpy: no init program is compiled (compiling
    a U-Net's init costs several times its forward on CPU). Every leaf is N(0, scale^2); norm scales 1 + that."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args, **example_kwargs))["params"]
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract))
    rng = np.random.RandomState(seed)
    out = {}
    for path, leaf in flat.items():
        value = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        out[path] = value + 1.0 if path[-1] == "scale" else value
    return traverse_util.unflatten_dict(out)
