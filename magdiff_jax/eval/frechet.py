"""The Frechet distance between Gaussians fitted to features, and a streaming accumulator of feature statistics.

    stats = FeatureStats(network="i3d", network_fingerprint=fp, protocol="fvd2048_16f", protocol_fingerprint=pfp)
    stats.update(features)                  # (N, D) per batch; float64 running sums
    stats.save("real.npz"); stats = FeatureStats.load("real.npz")   # resume an interrupted evaluation
    mu, sigma = stats.mean_cov()            # (D,), (D, D)
    d = frechet_distance(mu1, sigma1, mu2, sigma2)

The Frechet (2-Wasserstein) distance of N(mu1, S1) and N(mu2, S2):

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

computed in float64 numpy. tr((S1 S2)^(1/2)) has two routes (`method`):
  "eigh" (default)  S1 S2 is similar to the symmetric positive semi-definite M = S1^(1/2) S2 S1^(1/2), so the trace is
                    sum_i sqrt(max(lambda_i(M), 0)) with S1^(1/2) from S1's eigen-decomposition (negative rounding
                    eigenvalues clipped to 0). Real by construction and stable for the rank-deficient covariances of
                    fewer samples than dimensions (the usual case for FVD's 400-d logits at small sample counts).
  "sqrtm"           scipy.linalg.sqrtm(S1 S2) (FID's / StyleGAN-V's / cd-fvd's route); when the result is not finite
                    the product is retried as (S1 + eps I)(S2 + eps I), and an imaginary part above `imag_tol` (relative
                    to the largest real entry) is an error; below it, the real part is kept.
Both agree to float64 rounding on well-conditioned covariances (tested, with scipy and with cd-fvd).

The statistics are those of StyleGAN-V's / cd-fvd's `FeatureStats`: the running sum and sum of outer products of the
features in float64, mean = sum / N and covariance = sum_outer / N - mean mean^T (the biased, divide-by-N estimate
those implementations use). `max_items` caps the count: a batch that crosses it is cut, as theirs is.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from magdiff_jax.utils.files import user_path, write_bytes_whole

FORMAT_VERSION = 1


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), both matrices symmetric PSD."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float, imag_tol: float) -> float:
    """tr(sqrtm(S1 S2)) through scipy, with the eps I retry and the imaginary-part check (module docstring)."""
    from scipy import linalg

    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(root)):
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        imag = np.max(np.abs(root.imag))
        scale = max(np.max(np.abs(root.real)), np.finfo(np.float64).tiny)
        if imag > imag_tol * scale:
            raise ValueError(f"sqrtm(S1 S2) has an imaginary part of {imag:.3g} (largest real entry {scale:.3g}); "
                             "the covariances are not positive semi-definite, or use method='eigh'")
        root = root.real
    return float(np.trace(root))


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh", eps: float = 1e-6,
                     imag_tol: float = 1e-3) -> float:
    """The Frechet distance (module docstring) of N(mu1, sigma1) and N(mu2, sigma2): means (D,), covariances (D, D),
    as float64. `method`: "eigh" (default) or "sqrtm"; `eps` and `imag_tol` apply to "sqrtm"."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    for name, x, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)),
                           ("sigma2", sigma2, (d, d))):
        if x.shape != shape:
            raise ValueError(f"frechet_distance: {name} has shape {x.shape}, expected {shape} (mu1 is {(d,)})")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"frechet_distance: {name} holds non-finite values")
    if method == "eigh":
        tr_root = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_root = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps, imag_tol)
    else:
        raise ValueError(f"unknown method {method!r}; use 'eigh' or 'sqrtm'")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_root)


class StatsMismatchError(ValueError):
    """Two feature statistics (or a statistics file and an evaluation) from different networks or protocols."""


class FeatureStats:
    """Streaming float64 feature statistics (module docstring) with what produced them: the feature network's
    name and fingerprint (its config and weights) and the protocol's name and fingerprint. `num_features` is set by
    the first update when not given; `max_items` caps the count (None: no cap)."""

    def __init__(self, num_features: int | None = None, *, network: str = "", network_fingerprint: str = "",
                 protocol: str = "", protocol_fingerprint: str = "", max_items: int | None = None):
        self.network, self.network_fingerprint = network, network_fingerprint
        self.protocol, self.protocol_fingerprint = protocol, protocol_fingerprint
        self.max_items = max_items
        self.count = 0
        self.num_features = None
        self.sum = self.sum_outer = None
        if num_features is not None:
            self._allocate(int(num_features))

    def _allocate(self, d: int) -> None:
        self.num_features = d
        self.sum = np.zeros((d,), np.float64)
        self.sum_outer = np.zeros((d, d), np.float64)

    @property
    def full(self) -> bool:
        return self.max_items is not None and self.count >= self.max_items

    def update(self, features) -> int:
        """Add (N, D) features (cut at `max_items`); returns how many were taken."""
        x = np.asarray(features)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats.update expects (N, D) features, got shape {x.shape}")
        if self.num_features is None:
            self._allocate(x.shape[1])
        elif x.shape[1] != self.num_features:
            raise ValueError(f"FeatureStats.update: features of width {x.shape[1]}, the statistics hold "
                             f"{self.num_features}")
        if self.max_items is not None:
            x = x[:max(self.max_items - self.count, 0)]
        if not np.all(np.isfinite(x)):
            raise ValueError("FeatureStats.update: non-finite features")
        x = x.astype(np.float64)
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        self.count += x.shape[0]
        return x.shape[0]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), covariance (D, D)) in float64, the covariance divided by N (module docstring)."""
        if self.count == 0:
            raise ValueError("FeatureStats.mean_cov: no features accumulated")
        mean = self.sum / self.count
        return mean, self.sum_outer / self.count - np.outer(mean, mean)

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "network": self.network, "network_fingerprint": self.network_fingerprint,
                "protocol": self.protocol, "protocol_fingerprint": self.protocol_fingerprint, "count": self.count,
                "num_features": self.num_features, "max_items": self.max_items}

    def check_compatible(self, *, network_fingerprint: str | None = None, protocol_fingerprint: str | None = None,
                         other: FeatureStats | None = None, what: str = "statistics") -> None:
        """A `StatsMismatchError` naming the differing network or protocol (against given fingerprints, or
        against `other`)."""
        if other is not None:
            network_fingerprint, protocol_fingerprint = other.network_fingerprint, other.protocol_fingerprint
            theirs = f"({other.network} {other.network_fingerprint}, protocol {other.protocol} " \
                     f"{other.protocol_fingerprint})"
        else:
            theirs = ""
        problems = []
        if network_fingerprint is not None and network_fingerprint != self.network_fingerprint:
            problems.append(f"feature network {self.network!r} fingerprint {self.network_fingerprint!r}, expected "
                            f"{network_fingerprint!r}")
        if protocol_fingerprint is not None and protocol_fingerprint != self.protocol_fingerprint:
            problems.append(f"protocol {self.protocol!r} fingerprint {self.protocol_fingerprint!r}, expected "
                            f"{protocol_fingerprint!r}")
        if problems:
            raise StatsMismatchError(f"{what} come from another " + " and another ".join(problems)
                                     + (f" {theirs}" if theirs else ""))

    def save(self, path: str | os.PathLike) -> None:
        """Write .npz (written whole or not at all): `sum`, `sum_outer` and the JSON `metadata`."""
        if self.num_features is None:
            raise ValueError("FeatureStats.save: nothing accumulated yet (no feature width)")
        buf = io.BytesIO()
        np.savez(buf, sum=self.sum, sum_outer=self.sum_outer,
                 metadata=np.asarray(json.dumps(self.metadata())))
        write_bytes_whole(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a file `save` wrote (no pickle: plain arrays and a JSON string); a malformed one is an error
        naming the file."""
        path = user_path(path)
        try:
            with path.open("rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
                meta = json.loads(str(z["metadata"]))
                total, outer = np.asarray(z["sum"], np.float64), np.asarray(z["sum_outer"], np.float64)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: not a feature statistics file ({type(e).__name__}: {e})") from e
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: statistics format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        d = meta["num_features"]
        if total.shape != (d,) or outer.shape != (d, d):
            raise ValueError(f"{path}: sum {total.shape} / sum_outer {outer.shape} do not match num_features {d}")
        stats = cls(d, network=meta["network"], network_fingerprint=meta["network_fingerprint"],
                    protocol=meta["protocol"], protocol_fingerprint=meta["protocol_fingerprint"],
                    max_items=meta["max_items"])
        stats.sum, stats.sum_outer, stats.count = total, outer, int(meta["count"])
        return stats
