"""Read a whole diffusers pipeline folder (Stable Diffusion layout) into Flax.

    sd/
      model_index.json       {"unet": ["diffusers", "UNet2DConditionModel"], "vae": [...], ...}
      unet/ vae/ text_encoder/ [image_encoder/]   config.json + safetensors
      tokenizer/             vocab.json + merges.txt
      scheduler/             scheduler_config.json

Each model component goes through `load_torch` with the kind its class maps to; the tokenizer becomes our
`CLIPTokenizer` and the scheduler config our `ScheduleConfig`. Components we do not convert (a safety checker, a
feature extractor) are listed in `skipped`, never silently dropped. The folder, and the destination of
`save_extras`, may be local or in an object store (gs://...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from etils import epath

from magdiff_jax.convert.core import load_torch
from magdiff_jax.convert.safetensors_io import CheckpointFormatError
from magdiff_jax.utils.files import as_path, copy_tree, user_path

CLASS_TO_KIND = {
    "UNet2DConditionModel": "unet2d",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "clip_text",
    "CLIPTextModelWithProjection": "clip_text",
    "CLIPVisionModel": "clip_vision",
    "CLIPVisionModelWithProjection": "clip_vision",
}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


@dataclasses.dataclass
class Pipeline:
    """A converted pipeline: `models[name] = (kind, module, params)`, plus tokenizer and scheduler config."""

    path: epath.Path
    models: dict[str, tuple[str, Any, Any]]
    tokenizer: Any = None
    schedule_config: Any = None
    scheduler_class: str | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.models[name]

    def save_extras(self, dst: str | os.PathLike) -> None:
        """Copy the tokenizer and scheduler folders and write model_index.json beside converted components."""
        dst = as_path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer", "scheduler"):
            if (self.path / name).is_dir():
                copy_tree(self.path / name, dst / name)
        index = {name: kind for name, (kind, _, _) in self.models.items()}
        (dst / "model_index.json").write_text(json.dumps({"format": "magdiff_jax", "components": index}, indent=2))


def load_pipeline_torch(path: str | os.PathLike, components: tuple[str, ...] | None = None) -> Pipeline:
    """Convert every model component of a diffusers pipeline folder (or only `components`)."""
    root = user_path(path)
    index_path = root / "model_index.json"
    if not index_path.exists():
        raise CheckpointFormatError(f"{root}: no model_index.json (expected a diffusers pipeline folder)")
    index = json.loads(index_path.read_text())
    pipe = Pipeline(path=root, models={})
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        if components is not None and name not in components:
            continue
        _, cls = entry
        if cls is None:
            continue
        folder = root / name
        if cls in CLASS_TO_KIND:
            if not folder.is_dir():
                raise CheckpointFormatError(f"{root}: model_index.json lists {name!r} ({cls}) but {folder} is missing")
            kind = CLASS_TO_KIND[cls]
            module, params = load_torch(kind, folder)
            pipe.models[name] = (kind, module, params)
        elif cls in TOKENIZER_CLASSES:
            from magdiff_jax.models.tokenizer import CLIPTokenizer

            pipe.tokenizer = CLIPTokenizer.from_folder(folder)
        elif name == "scheduler":
            from magdiff_jax.diffusion.schedules import ScheduleConfig

            cfg_path = folder / "scheduler_config.json"
            if not cfg_path.exists():
                raise CheckpointFormatError(f"{folder}: no scheduler_config.json")
            pipe.schedule_config = ScheduleConfig.from_diffusers_config(json.loads(cfg_path.read_text()))
            pipe.scheduler_class = cls
        else:
            pipe.skipped[name] = cls
            logging.info("pipeline %s: component %r (%s) is not converted", root, name, cls)
    return pipe
