"""Bad input never crashes a run: it is skipped, counted, logged and reported, until there is too much of it.

A loader raises `BadInput` (or `VideoError`) naming the file and the reason; the pipeline turns it into a marker,
drops it, and records it in a `BadInputReport`. The report is written as JSON next to the output
(`bad_inputs.json`) and raises `TooManyBadInputs`, naming the first bad files, once the bad fraction of the
dataset passes the threshold (default 1%).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

from magdiff_jax.utils.files import as_path, is_remote

DEFAULT_MAX_BAD_FRACTION = 0.01
REPORT_NAME = "bad_inputs.json"


class BadInput(ValueError):
    """One unusable example: `key` names it (a file or row), `reason` says why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


class TooManyBadInputs(ValueError):
    """The bad fraction passed the threshold; the message names the first bad files."""


@dataclasses.dataclass
class BadInputReport:
    """Unique bad examples out of `total` (the dataset this process reads). `add` logs each new one once."""

    total: int
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    path: str | os.PathLike | None = None  # where the JSON report is (re)written on every new bad example (local or
    # a cloud URI)
    bad: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> reason, in order of discovery

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    @property
    def fraction(self) -> float:
        return len(self.bad) / max(self.total, 1)

    def add(self, key: str, reason: str, check: bool = True) -> None:
        """Record a bad example (repeats of a known key are ignored), rewrite the report, and raise
        TooManyBadInputs once the unique bad count passes `max_bad_fraction * total`."""
        if key in self.bad:
            return
        self.bad[key] = reason
        logging.warning("skipping bad input %s: %s", key, reason)
        if self.path is not None:
            self.write()
        if check:
            self.check()

    def check(self) -> None:
        if len(self.bad) > self.max_bad_fraction * self.total:
            first = "; ".join(f"{k}: {r}" for k, r in list(self.bad.items())[:5])
            where = f" (report: {self.path})" if self.path is not None else ""
            raise TooManyBadInputs(
                f"{len(self.bad)} of {self.total} inputs are bad ({self.fraction:.1%}), more than the allowed "
                f"{self.max_bad_fraction:.1%} (--max-bad-fraction); first: {first}{where}"
            )

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "num_bad": len(self.bad),
            "bad_fraction": self.fraction,
            "max_bad_fraction": self.max_bad_fraction,
            "bad": [{"key": k, "reason": r} for k, r in self.bad.items()],
        }

    def write(self, path: str | os.PathLike | None = None):
        """Write the JSON report whole (locally a temporary file and a rename; in cloud storage, gs://..., one
        object upload): never half-written."""
        path = path if path is not None else self.path
        if is_remote(path):
            path = as_path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_dict(), indent=1))
            return path
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)
        os.replace(tmp, path)
        return path
