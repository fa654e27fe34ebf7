"""Models and trained stages on disk in our own form (Orbax parameters + JSON), for inference and evaluation.

    save_model / load_model      one registered model (`magdiff-jax convert to-flax` output, `init_from` folders)
    save_stage / load_stage      every model a trained stage's inference needs, with its tokenizer and scheduler
"""

from magdiff_jax.export.model import load_model, read_model_meta, save_model
from magdiff_jax.export.stage import Stage, export_workdir, load_stage, save_stage, stage_from_workdir

__all__ = ["Stage", "export_workdir", "load_model", "load_stage", "read_model_meta", "save_model", "save_stage",
           "stage_from_workdir"]
