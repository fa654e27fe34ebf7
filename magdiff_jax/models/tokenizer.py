"""The CLIP tokenizer of a model folder, returning fixed-length int32 id arrays for the text towers.

    tok = CLIPTokenizer.from_folder("stable-diffusion-2-1/tokenizer")   # or the pipeline root
    ids = tok(["a photo of a cat", "a dog"])                             # np.ndarray int32 (2, 77)

It wraps transformers' `CLIPTokenizer.from_pretrained` on a local folder (never the network); a folder in an object
store (gs://...) is copied to a local temporary folder first (a few small files). transformers is imported only when
a tokenizer is built, so the rest of the package imports without it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from etils import epath

from magdiff_jax.utils.files import copy_tree, is_remote, user_path

_BPE_FILES = ("vocab.json", "merges.txt")
_FAST_FILE = "tokenizer.json"


def _has_vocab(folder: Path | epath.Path) -> bool:
    return (folder / _FAST_FILE).is_file() or all((folder / f).is_file() for f in _BPE_FILES)


def resolve_tokenizer_folder(path: str | os.PathLike) -> Path | epath.Path:
    """The folder holding the tokenizer files: `path` itself, or its `tokenizer/` subfolder (a pipeline root).

    Raises FileNotFoundError naming the path when the folder does not exist or holds no vocabulary
    (`vocab.json` + `merges.txt`, or `tokenizer.json`).
    """
    folder = user_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CLIP tokenizer: {folder} is not a folder (expected a tokenizer folder with vocab.json and merges.txt)"
        )
    if _has_vocab(folder):
        return folder
    if _has_vocab(folder / "tokenizer"):
        return folder / "tokenizer"
    missing = [f for f in _BPE_FILES if not (folder / f).is_file()]
    raise FileNotFoundError(
        f"CLIP tokenizer: {folder} holds no vocabulary: missing {', '.join(missing)} (and no {_FAST_FILE}, "
        "and no tokenizer/ subfolder that has them)"
    )


class CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer: text(s) -> (B, max_length) int32 ids with bos/eos, padded with the
    folder's pad token ("max_length" padding) and truncated to `max_length` (the last id kept is eos)."""

    def __init__(self, tokenizer, max_length: int = 77, folder: Path | None = None):
        self.tokenizer = tokenizer  # transformers' CLIPTokenizer
        self.max_length = int(max_length)
        self.folder = folder

    @classmethod
    def from_folder(cls, path: str | os.PathLike, max_length: int = 77) -> CLIPTokenizer:
        """Load the tokenizer files of a local folder (a `tokenizer/` folder, or a pipeline root with one)."""
        folder = resolve_tokenizer_folder(path)
        from transformers import CLIPTokenizer as HFCLIPTokenizer

        if is_remote(folder):  # from_pretrained reads local folders only
            with tempfile.TemporaryDirectory(prefix="magdiff-tokenizer-") as local:
                copy_tree(folder, local)
                tokenizer = HFCLIPTokenizer.from_pretrained(local, local_files_only=True)
        else:
            tokenizer = HFCLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(tokenizer, max_length=max_length, folder=folder)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: str | list[str], return_attention_mask: bool = False):
        """`texts` -> int32 ids (B, max_length); with `return_attention_mask`, also the (B, max_length) int32
        mask (1 on real tokens, 0 on padding)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"CLIP tokenizer: expected a string or a list of strings, got {texts!r:.200}")
        if not texts:
            empty = np.zeros((0, self.max_length), np.int32)
            return (empty, empty.copy()) if return_attention_mask else empty
        enc = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32).reshape(len(texts), self.max_length)
        if return_attention_mask:
            mask = np.asarray(enc["attention_mask"], dtype=np.int32).reshape(len(texts), self.max_length)
            return ids, mask
        return ids


__all__ = ["CLIPTokenizer", "resolve_tokenizer_folder"]


def write_vocabulary(folder: str | os.PathLike, vocab: dict[str, int], merges: list[str], bos: str, eos: str,
                     pad: str | None = None) -> Path:
    """Write a CLIP byte-level BPE vocabulary in the file layout of an SD `tokenizer/` folder (vocab.json,
    merges.txt, special_tokens_map.json, tokenizer_config.json) that `CLIPTokenizer.from_folder` loads."""
    import json

    folder = user_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": pad or eos}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
