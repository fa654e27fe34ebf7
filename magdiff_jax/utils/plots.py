"""Plots for people: training curves and per-stage metric comparisons, drawn with matplotlib (axes with labels and
units, a legend) on an Agg canvas of their own (`matplotlib.figure.Figure`; no backend chosen, nothing global
touched) and written as PNG atomically (`utils.images.save_png`, locally or to an object store).

    line_plot({"vae": {"loss": [(1, 0.9), (2, 0.7)]}, "magdiff": {...}}, "loss.png", ylabel="loss (per batch)")
    bar_plot({"V2V (dB)": {"V2V": 32.5, "bicubic": 32.9}, "I2V colour": {"I2V": 0.92}}, "stages.png",
             ylabel={"V2V (dB)": "PSNR to the truth (dB)", "I2V colour": "fraction right"},
             baseline={"I2V colour": ("chance", 1 / 6)})
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from etils import epath

from magdiff_jax.utils.images import render, save_png

DPI = 100
PANEL_IN = (7.0, 2.8)  # one line-plot panel, inches at DPI (700 x 280 px)
BAR_PANEL_IN = (3.4, 3.2)  # one bar-plot panel


def _figure(size_in: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size_in, dpi=DPI, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start): y (N,) -> (N,)."""
    c = np.cumsum(np.insert(np.asarray(y, np.float64), 0, 0.0))
    n = np.arange(1, len(y) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def line_plot(series: Mapping[str, Mapping[str, list]], path: str | os.PathLike, *, xlabel: str = "training step",
              ylabel: str = "loss", title: str | None = None, logy: bool = False,
              smooth: int = 0) -> epath.Path:
    """Curves in panels, one panel per key of `series` (stacked, each with its own axes), written as PNG at `path`.

    `series`: {panel title: {curve label: [(x, y), ...]}}; each panel has a legend and its axes labelled `xlabel`,
    `ylabel` (say the units there, e.g. "PSNR (dB)"). `logy`: a logarithmic y axis (every y must be > 0). `smooth`
    > 1: each curve of at least 4 * `smooth` points drawn faintly with its trailing moving average over `smooth`
    points on top (noisy per-batch losses), the legend naming both. The picture is PANEL_IN (700 x 280 px at DPI)
    per panel, 30 px more with a title. Returns the path written.

    Raises ValueError naming the culprit for no panels, a panel without curves, a curve without points or points
    that are not (x, y) pairs, and y <= 0 with `logy`."""
    if not series:
        raise ValueError("line_plot: no panels (series is empty)")
    data = {}
    for panel, curves in series.items():
        if not curves:
            raise ValueError(f"line_plot: panel {panel!r} has no curves")
        for label, points in curves.items():
            xy = np.asarray(points, np.float64)
            if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
                raise ValueError(f"line_plot: curve {label!r} of panel {panel!r} must be a non-empty list of (x, y) "
                                 f"pairs, got an array of shape {xy.shape}")
            if logy and not np.all(xy[:, 1] > 0):
                raise ValueError(f"line_plot: curve {label!r} of panel {panel!r} has y <= 0 on a logarithmic axis "
                                 f"(min {xy[:, 1].min():g})")
            data[panel, label] = xy
    fig = _figure((PANEL_IN[0], PANEL_IN[1] * len(series) + (0.3 if title else 0.0)))
    axes = fig.subplots(len(series), 1, squeeze=False)[:, 0]
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    for ax, (panel, curves) in zip(axes, series.items(), strict=True):
        for k, label in enumerate(curves):
            x, y = data[panel, label].T
            colour = f"C{k % 10}"
            if smooth > 1 and len(y) >= 4 * smooth:  # fewer points: the mean would only lag
                mean = moving_average(y, smooth)
                ax.plot(x, y, color=colour, alpha=0.3, linewidth=1, label=str(label))
                ax.plot(x, mean, color=colour, linewidth=2,
                        label=f"{label}, moving mean of {smooth}: {mean[0]:.3g} \u2192 {mean[-1]:.3g}")
            else:
                ax.plot(x, y, color=colour, linewidth=1.5, marker="o" if len(y) < 20 else None, markersize=3,
                        label=f"{label}: {y[0]:.3g} \u2192 {y[-1]:.3g}")
        if logy:
            ax.set_yscale("log")
        ax.set_title(str(panel), fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9, loc="best")
    return save_png(path, render(fig))


def bar_plot(values: Mapping[str, Mapping[str, float]], path: str | os.PathLike, *,
             ylabel: str | Mapping[str, str], baseline: Mapping[str, tuple[str, float]] | None = None,
             title: str | None = None) -> epath.Path:
    """Measured values against their baselines, one panel per stage side by side, written as PNG at `path`.

    `values`: {panel title: {bar label: value}} (e.g. {"V2V": {"V2V": 32.5, "bicubic": 32.9}}): the first bar of a
    panel is drawn as the measured result, the others as references, each with its value written above it.
    `ylabel`: the y-axis label with units, one for all panels or {panel: label}. `baseline`: {panel: (label,
    value)}, a dashed horizontal line (e.g. ("chance", 1/6)). Each panel is BAR_PANEL_IN (340 x 320 px at DPI).
    Returns the path written.

    Raises ValueError naming the culprit for no panels, a panel without bars, a value that is not a finite number,
    and `ylabel` / `baseline` entries for panels that do not exist (or a panel without a `ylabel`)."""
    if not values:
        raise ValueError("bar_plot: no panels (values is empty)")
    panels = list(values)
    for panel, bars in values.items():
        if not bars:
            raise ValueError(f"bar_plot: panel {panel!r} has no bars")
        for label, v in bars.items():
            if not isinstance(v, (int, float, np.number)) or not math.isfinite(float(v)):
                raise ValueError(f"bar_plot: bar {label!r} of panel {panel!r} is {v!r}, not a finite number")
    labels = {p: ylabel for p in panels} if isinstance(ylabel, str) else dict(ylabel)
    baseline = dict(baseline or {})
    for name, given in (("ylabel", labels), ("baseline", baseline)):
        if unknown := sorted(set(given) - set(panels)):
            raise ValueError(f"bar_plot: {name} for panels {unknown} that are not in values (panels: {panels})")
    if missing := [p for p in panels if p not in labels]:
        raise ValueError(f"bar_plot: no ylabel for panels {missing}")
    fig = _figure((BAR_PANEL_IN[0] * len(panels), BAR_PANEL_IN[1] + (0.3 if title else 0.0)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    for ax, panel in zip(axes, panels, strict=True):
        names, v = list(values[panel]), np.asarray([float(x) for x in values[panel].values()])
        colours = ["C0"] + ["0.6"] * (len(v) - 1)
        bars = ax.bar(range(len(v)), v, color=colours, width=0.6)
        ax.bar_label(bars, labels=[f"{x:.4g}" for x in v], padding=2, fontsize=9)
        ax.set_xticks(range(len(v)), names)
        ax.set_xlim(-0.75, len(v) - 0.25)
        if panel in baseline:
            name, value = baseline[panel]
            ax.axhline(float(value), color="C3", linestyle="--", linewidth=1.5, label=f"{name}: {float(value):.4g}")
            ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)  # under the axes
        top = max(float(v.max()), float(baseline[panel][1]) if panel in baseline else -np.inf, 0.0)
        bottom = min(float(v.min()), 0.0)
        ax.set_ylim(bottom, top + 0.12 * (top - bottom or 1.0))  # room for the values above the bars
        ax.set_title(str(panel), fontsize=11)
        ax.set_ylabel(labels[panel])
        ax.grid(True, axis="y", alpha=0.3)
    return save_png(path, render(fig))
