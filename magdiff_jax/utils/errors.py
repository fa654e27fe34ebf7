"""The one error for parameters or checkpoint keys that do not fit a model, and its message format.

    raise ConversionError(mismatch_message("[unet2d] checkpoint in out/unet does not match the model config",
                                           missing=[...], unexpected=[...], misshaped=[...]))

Every loader, converter and parameter surgery (inflation, widening conv_in) reports all of its mismatches at once
in this form. Plain Python: the PyTorch port uses it without importing JAX.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

LIMIT = 50  # keys listed per kind of mismatch


class ConversionError(ValueError):
    """Parameters or checkpoint keys that do not fit their model: lists every missing, unexpected and mis-shaped
    key."""


def key_list(keys: Iterable[str], limit: int = LIMIT) -> str:
    """Keys one per indented line, the first `limit` of them."""
    keys = list(keys)
    shown = "".join(f"\n    {k}" for k in keys[:limit])
    return shown + (f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else "")


def mismatch_message(what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                     misshaped: Iterable[str] = ()) -> str:
    """`what` followed by each non-empty list: missing keys, unexpected keys, mis-shaped keys."""
    parts = [what]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        keys = list(keys)
        if keys:
            parts.append(f"\n  {label} ({len(keys)}):{key_list(keys)}")
    return "".join(parts)


def json_excerpt(value, limit: int = 80) -> str:
    """`value` as JSON spells it (true, null, "8"), cut to `limit` characters: how an error quotes a bad value."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
