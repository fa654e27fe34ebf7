"""An evaluation's report: `report.json`, a markdown table, and plots of each score against the training step.

    rows = [{"label": "step_2000", "step": 2000, "fvd": 412.3, ...}, ...]      # one row per generated set
    write_report("eval_out", rows, scores=("fvd", "is"), meta={...})

A row is one set of generated videos (one export, checkpoint or folder) with its scores (floats, keyed by score
name) and anything else worth keeping (protocol, counts, fingerprints, skipped videos). `report.json` holds every
row and `meta` whole; `report.md` a table of the scores, one row per set; `scores.png` one panel per score against
the training step, drawn when at least two rows name a step. Files are written whole (never half-written).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from magdiff_jax.utils.files import as_path, write_bytes_whole

REPORT_JSON, REPORT_MD, SCORES_PNG = "report.json", "report.md", "scores.png"

# how a score reads in the table and on the plot's axis
SCORE_LABELS = {"fvd": "FVD (lower is better)", "is": "IS (higher is better)", "clipsim": "CLIPSIM",
                "text_alignment": "text alignment (x100)", "frame_consistency": "frame consistency (x100)",
                "clip_i": "CLIP-I", "dino": "DINO", "psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}


def step_of(label: str) -> int | None:
    """The training step a label names (`step_2000`, `ckpt-2000`, `2000`), else None."""
    m = re.fullmatch(r"(?:.*?[_\-/])?(\d+)", str(label))
    return int(m.group(1)) if m else None


def labelled_folders(values, flag: str, default_label=None) -> dict[str, str]:
    """`[LABEL=]DIR` command-line values -> {label: folder}, in order; an unlabelled folder is named by
    `default_label(folder)` (its last path component by default). A label given twice is an error naming `flag`."""
    out: dict[str, str] = {}
    for value in values:
        label, sep, folder = value.partition("=")
        if not sep:
            folder = value
            label = default_label(folder) if default_label is not None else as_path(folder).name
        if label in out:
            raise ValueError(f"{flag}: the label {label!r} is given twice (name them: {flag} LABEL=DIR)")
        out[label] = folder
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping], scores: Sequence[str]) -> str:
    """A markdown table: one line per row (its label, step, number of videos), one column per score it has."""
    present = [s for s in scores if any(s in row for row in rows)]
    head = ["set", "step", "videos", *(SCORE_LABELS.get(s, s) for s in present)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        std = {s: row.get(f"{s}_std") for s in present}
        cells = [str(row["label"]), _fmt(row.get("step", "")), _fmt(row.get("num_videos", ""))]
        for s in present:
            cell = _fmt(row[s]) if s in row else ""
            if std[s] is not None:
                cell += f" ± {_fmt(std[s])}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: str | os.PathLike, rows: Sequence[Mapping], scores: Sequence[str],
                 meta: Mapping[str, Any] | None = None) -> dict:
    """Write report.json, report.md and (with at least two stepped rows) scores.png in the folder `out`, or, when
    `out` ends in .json, that file with its .md and .png beside it; returns the JSON."""
    if str(out).endswith(".json"):
        json_path = as_path(out)
        folder, stem = json_path.parent, json_path.name[: -len(".json")]
        md_path, png_path = folder / f"{stem}.md", folder / f"{stem}.png"
    else:
        folder = as_path(out)
        json_path, md_path, png_path = folder / REPORT_JSON, folder / REPORT_MD, folder / SCORES_PNG
    folder.mkdir(parents=True, exist_ok=True)
    report = {"scores": list(scores), "rows": [dict(r) for r in rows], **(dict(meta) if meta else {})}
    write_bytes_whole(json_path, (json.dumps(report, indent=2, default=str) + "\n").encode())
    title = f"# {meta.get('title', 'Evaluation')}\n\n" if meta else "# Evaluation\n\n"
    write_bytes_whole(md_path, (title + markdown_table(rows, scores)).encode())
    stepped = [r for r in rows if r.get("step") is not None]
    if len(stepped) >= 2:
        from magdiff_jax.utils.plots import line_plot

        series = {}
        for s in scores:
            points = sorted((r["step"], r[s]) for r in stepped if s in r and math.isfinite(r[s]))
            if points:
                series[SCORE_LABELS.get(s, s)] = {s: points}
        if series:
            line_plot(series, png_path, xlabel="training step", ylabel="score",
                      title=meta.get("title") if meta else None)
    return report


__all__ = ["REPORT_JSON", "REPORT_MD", "SCORES_PNG", "labelled_folders", "markdown_table", "step_of", "write_report"]
