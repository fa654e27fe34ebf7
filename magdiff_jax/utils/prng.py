"""The random-number generator that parameters are initialised from: a counter hash, cheap for XLA to compile.

JAX's default threefry generator is about a hundred integer ops per random word. An init program draws each
parameter from its own key, and XLA's CPU backend compiles every draw as a kernel of its own: the init program of
the tiny MagDiff U-Net (configs/magdiff.py:tiny, 511 leaves) took longer to compile than its forward pass. This
generator hashes a 32-bit counter with two rounds of the murmur3 finaliser (`fmix32`: full avalanche, a bijection of
the counter under each key), about a tenth of the ops per word, so init programs compile several times faster
(`benchmarks/init_compile.py`; figures in benchmarks/results/init_compile_cpu.json).

    key = init_key(jax.random.key(seed))        # inside or outside jit: the same bits, another generator
    params = module.init(key, *example_inputs)

Everything that initialises model parameters (the trainer, `sharding.init_sharded`, `inflate`, the MagDiff
initialiser) draws through `init_key`, so a seed still gives the same parameters everywhere. Sampling, dropout and
the training step's noise keep threefry.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend.random import define_prng_impl

_U32 = jnp.uint32
_GOLDEN = 0x9E3779B9  # 2^32 / phi: spreads consecutive counters and data words


def fmix32(x: jax.Array) -> jax.Array:
    """The murmur3 32-bit finaliser: a bijection of uint32 in which every input bit flips each output bit with
    probability ~1/2."""
    x = x ^ (x >> 16)
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> 16)


def _stream(k0, k1, n: int) -> jax.Array:
    """n words of key (k0, k1): fmix32(fmix32(golden * counter + k0) ^ k1), a permutation of the counters for each
    key."""
    if n > 2**32:
        raise ValueError(f"the init generator draws at most 2^32 words per key; {n} asked for")
    counter = jax.lax.iota(_U32, n)
    return fmix32(fmix32(counter * _U32(_GOLDEN) + k0) ^ k1)


def _seed(seed: jax.Array) -> jax.Array:
    seed = jnp.asarray(seed)
    lo = seed.astype(_U32)
    hi = (seed >> 32).astype(_U32) if seed.dtype.itemsize == 8 else _U32(0)
    return jnp.stack([fmix32(lo ^ _U32(0x2545F491)), fmix32(fmix32(hi + _U32(0x6A09E667)) ^ lo)])


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # the key's words swapped and one of them flipped: children are not the words random_bits would give
    n = math.prod(shape)
    return _stream(key[1], key[0] ^ _U32(0x5BD1E995), 2 * n).reshape(*shape, 2)


def _fold_in(key: jax.Array, data) -> jax.Array:
    d = jnp.asarray(data).astype(_U32)
    return jnp.stack([fmix32(key[0] ^ fmix32(d + _U32(0x3C6EF372))),
                      fmix32(key[1] + fmix32(d * _U32(_GOLDEN) ^ _U32(0xA54FF53A)))])


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    n = math.prod(shape)
    if bit_width == 64:
        words = _stream(key[0], key[1], 2 * n).reshape(2, n)
        return (words[0].astype(jnp.uint64) << 32 | words[1].astype(jnp.uint64)).reshape(shape)
    words = _stream(key[0], key[1], n).reshape(shape)
    return words if bit_width == 32 else words.astype({8: jnp.uint8, 16: jnp.uint16}[bit_width])


HASH_PRNG = define_prng_impl(key_shape=(2,), seed=_seed, split=_split, random_bits=_random_bits, fold_in=_fold_in,
                             name="fmix32x2", tag="fm")


def init_key(key: jax.Array) -> jax.Array:
    """`key` (a typed key of any generator with two 32-bit words, e.g. `jax.random.key(seed)`) as a key of the
    init generator: the same bits, so one seed gives one initialisation."""
    data = jax.random.key_data(key)
    if data.shape[-1:] != (2,) or data.dtype != jnp.uint32:
        raise ValueError(f"init_key takes a key of two uint32 words (threefry's), got key data {data.dtype}"
                         f"{list(data.shape)}")
    return jax.random.wrap_key_data(data, impl=HASH_PRNG)
