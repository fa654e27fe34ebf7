"""The init generator (magdiff_jax/utils/prng.py): deterministic, well spread bits, distinct and independent keys
after split and fold_in, and parameters with the initialisers' statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magdiff_jax.utils.prng import HASH_PRNG, fmix32, init_key


def _bits(key, n):
    return np.asarray(jax.random.bits(key, (n,), jnp.uint32)).astype(np.uint64)


def test_same_key_same_bits_and_every_seed_bit_matters():
    a = _bits(init_key(jax.random.key(0)), 1000)
    np.testing.assert_array_equal(a, _bits(init_key(jax.random.key(0)), 1000))
    jitted = np.asarray(jax.jit(lambda k: jax.random.bits(init_key(k), (1000,), jnp.uint32))(jax.random.key(0)))
    np.testing.assert_array_equal(a, jitted)
    for seed in (1, 2, 2**16, 2**31 - 1):  # flipping any seed bit changes about half of every word
        b = _bits(init_key(jax.random.key(seed)), 1000)
        flipped = np.unpackbits((a ^ b).astype(">u4").view(np.uint8)).mean()
        assert 0.47 < flipped < 0.53, (seed, flipped)


def test_uniform_bits():
    """1M words: each of the 32 bit positions is set half the time (4 sigma), uniform floats have mean 1/2 and
    variance 1/12, neighbouring draws are uncorrelated, and no word repeats (the hash is a bijection of the
    counter)."""
    n = 1 << 20
    words = _bits(init_key(jax.random.key(3)), n)
    per_bit = ((words[:, None] >> np.arange(32, dtype=np.uint64)) & 1).mean(axis=0)
    assert np.abs(per_bit - 0.5).max() < 4 * 0.5 / np.sqrt(n), per_bit
    u = np.asarray(jax.random.uniform(init_key(jax.random.key(3)), (n,)), np.float64)
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n) and abs(u.var() - 1 / 12) < 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 4 / np.sqrt(n)
    assert len(np.unique(words)) == n


def test_split_and_fold_in_give_distinct_independent_keys():
    key = init_key(jax.random.key(0))
    children = np.asarray(jax.random.key_data(jax.random.split(key, 4096)))
    folded = np.asarray(jax.vmap(lambda d: jax.random.key_data(jax.random.fold_in(key, d)))(jnp.arange(4096)))
    for keys in (children, folded):
        assert len({tuple(k) for k in keys}) == len(keys)
    assert not {tuple(k) for k in children} & {tuple(k) for k in folded}
    parent = _bits(key, 2)
    assert not any((tuple(k) == tuple(parent)) for k in children)  # a child is not the parent's first words
    # sibling streams (consecutive children and fold-ins, the way Flax derives each parameter's key) are uncorrelated
    for keys in (children[:64], folded[:64]):
        draws = np.stack([np.asarray(jax.random.normal(jax.random.wrap_key_data(k, impl=HASH_PRNG), (4096,)))
                          for k in keys])
        corr = np.corrcoef(draws)[np.triu_indices(len(keys), 1)]
        assert np.abs(corr).max() < 5 / np.sqrt(4096), np.abs(corr).max()


def test_fmix32_is_the_murmur3_finaliser():
    # murmur3's fmix32 (Appleby), computed here with Python integers
    def ref(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    xs = [0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 12345678]
    np.testing.assert_array_equal(np.asarray(fmix32(jnp.asarray(xs, jnp.uint32))), [ref(x) for x in xs])


def test_init_key_refuses_other_key_layouts():
    with pytest.raises(ValueError, match="two uint32 words"):
        init_key(jax.random.key(0, impl="rbg"))


def test_parameters_have_their_initialisers_statistics():
    """A Dense kernel drawn through init_key: lecun_normal's truncated normal (std sqrt(1/fan_in) after
    truncation at 2 sigma, nothing beyond), and two layers' kernels uncorrelated."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(512, name="b")(nn.Dense(512, name="a")(x))

    params = Two().init(init_key(jax.random.key(0)), jnp.zeros((1, 512)))["params"]
    a, b = (np.asarray(params[n]["kernel"], np.float64) for n in "ab")
    for k in (a, b):
        assert abs(k.std() * np.sqrt(512) - 1) < 0.01, k.std() * np.sqrt(512)
        assert abs(k.mean()) < 4 * k.std() / 512 and np.abs(k).max() * np.sqrt(512) <= 2 / 0.8796 + 1e-5
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 4 / 512
