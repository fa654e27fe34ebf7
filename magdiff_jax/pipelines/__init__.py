"""Inference from stage exports: one pipeline per task, each `Pipeline.load(export)` (a stage export, or a training
workdir exported on the fly).

    pipe = load_pipeline("magdiff", "runs/magdiff/export")      # MagDiffPipeline
    pipe = load_pipeline("vfi", "runs/vfi/export")              # VFIPipeline

magdiff.py (generation and editing), t2i.py, i2v.py, v2v.py, vfi.py (MagicVideo-V2's stages), magicvideo.py (the
four stages chained), guided.py (the shared stage-pipeline base and per-example jit), tiling.py.
"""

from __future__ import annotations

import importlib

# task -> (module, class) of its pipeline; modules are imported on first use
PIPELINES = {"magdiff": ("magdiff", "MagDiffPipeline"), "t2i": ("t2i", "T2IPipeline"), "i2v": ("i2v", "I2VPipeline"),
             "v2v": ("v2v", "V2VPipeline"), "vfi": ("vfi", "VFIPipeline")}


def load_pipeline(task: str, export):
    """The pipeline of `task` loaded from `export` (its class's `load`, which checks the export holds that task)."""
    if task not in PIPELINES:
        raise ValueError(f"no pipeline for task {task!r}; tasks: {', '.join(PIPELINES)}")
    module, name = PIPELINES[task]
    return getattr(importlib.import_module(f"magdiff_jax.pipelines.{module}"), name).load(export)


__all__ = ["PIPELINES", "load_pipeline"]
