"""The (video) Inception Score, as StyleGAN-V's `isv2048_ucf` and TGAN2 compute it.

    is_mean, is_std = inception_score(probs, num_splits=10)               # probs (N, C), rows summing to 1
    is_mean, is_std = inception_score(logits, from_logits=True)           # softmax taken here
    acc = InceptionScore(num_splits=10)                                   # streaming: one batch at a time
    for videos in batches:
        acc.update(C3D(config).apply({"params": p}, videos).logits, from_logits=True)
    is_mean, is_std = acc.compute()

With p(y|x_i) the classifier's softmax for sample i and the samples split into `num_splits` consecutive parts
(part k holds rows [k N // S, (k + 1) N // S)), each part scores

    IS_k = exp( mean_{i in part k} sum_y p(y|x_i) (log p(y|x_i) - log p_k(y)) ),   p_k(y) = mean_{i in part k} p(y|x_i)

and the result is (mean_k IS_k, std_k IS_k) (population std, numpy's default). Uniform predictions score 1; N
one-hot predictions spread evenly over c classes score c.

Protocols (`shuffle_seed`, `eps`):
- StyleGAN-V (`src/metrics/video_inception_score.py`, `isv2048_ucf`: 2048 videos of 16 frames, 10 splits): the
  rows are first shuffled with `np.random.RandomState(42).shuffle`, no epsilon: `shuffle_seed=42, eps=0` (the
  defaults).
- TGAN2 (`tgan2/evaluations/inception_score.py`): no shuffle, eps = 1e-20 added to every probability before the
  logs; its UCF-101 script uses one split per call and reports mean and std over 10 calls on fresh samples:
  `shuffle_seed=None, eps=1e-20, num_splits=1`.
The score is computed in float64 (StyleGAN-V computes in the detector's float32; the difference is rounding).
"""

from __future__ import annotations

import numpy as np

STYLEGAN_V_SEED = 42


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _as_probs(x, from_logits: bool) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"inception score: expected (samples, classes) {'logits' if from_logits else 'probabilities'}"
                         f", got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("inception score: the predictions hold non-finite values")
    if from_logits:
        return _softmax(x)
    if x.size and (x.min() < 0 or np.abs(x.sum(axis=1) - 1).max() > 1e-3):
        raise ValueError("inception score: probabilities must be non-negative rows that sum to 1 (pass "
                         "from_logits=True for logits)")
    return x


def inception_score(x, num_splits: int = 10, *, from_logits: bool = False, shuffle_seed: int | None = STYLEGAN_V_SEED,
                    eps: float = 0.0) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `num_splits` parts of the N rows of `x` (module docstring): class
    probabilities (N, C), or logits with `from_logits`. An error when N < num_splits (a part would be empty)."""
    probs = _as_probs(x, from_logits)
    n = probs.shape[0]
    if num_splits < 1:
        raise ValueError(f"inception score: num_splits must be >= 1, got {num_splits}")
    if n < num_splits:
        raise ValueError(f"inception score: {n} samples cannot fill {num_splits} splits; the protocol needs at least "
                         "one sample per split (StyleGAN-V's isv2048_ucf uses 2048 videos in 10 splits)")
    if shuffle_seed is not None:
        probs = probs.copy()
        np.random.RandomState(shuffle_seed).shuffle(probs)
    scores = []
    for k in range(num_splits):
        part = probs[k * n // num_splits:(k + 1) * n // num_splits] + eps
        marginal = part.mean(axis=0, keepdims=True)
        # 0 log 0 = 0: a class with zero probability adds nothing (the reference's eps=0 form gives NaN there)
        logs = np.log(np.where(part > 0, part, 1.0)) - np.log(np.where(part > 0, marginal, 1.0))
        kl = np.sum(part * logs, axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


class InceptionScore:
    """Streaming Inception Score: `update` with each batch's logits or probabilities (only the (batch, classes)
    probabilities are kept: 2048 x 101 float64 is 1.6 MB), `compute` at the end (`inception_score`'s arguments)."""

    def __init__(self, num_splits: int = 10, *, shuffle_seed: int | None = STYLEGAN_V_SEED, eps: float = 0.0):
        self.num_splits, self.shuffle_seed, self.eps = num_splits, shuffle_seed, eps
        self._parts: list[np.ndarray] = []

    @property
    def count(self) -> int:
        return sum(len(p) for p in self._parts)

    def update(self, x, *, from_logits: bool = False) -> None:
        probs = _as_probs(x, from_logits)
        if self._parts and probs.shape[1] != self._parts[0].shape[1]:
            raise ValueError(f"inception score: a batch of {probs.shape[1]} classes after batches of "
                             f"{self._parts[0].shape[1]}")
        self._parts.append(probs)

    def compute(self) -> tuple[float, float]:
        if not self._parts:
            raise ValueError("inception score: no predictions were added")
        return inception_score(np.concatenate(self._parts), self.num_splits, shuffle_seed=self.shuffle_seed,
                               eps=self.eps)
