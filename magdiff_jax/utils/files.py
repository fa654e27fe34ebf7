"""Paths that may be local or in cloud storage, and files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from etils import epath

URI_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a cloud-storage URI (gs://, s3://, ...) rather than a local path."""
    return os.fspath(path).startswith(URI_SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """Any path a user gives, local or a cloud URI, as an `etils.epath.Path` (local ones made absolute, `~`
    expanded). `pathlib.Path("gs://b/run")` would be the local folder `gs:/b/run`; this keeps the URI."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path` (same folder and suffix); on success it is renamed onto `path`, on any
    error it is removed, so `path` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_destination(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write a folder at `path` over a file, or over a non-empty folder unless `overwrite` (whatever is
    there then goes in one piece when the new folder replaces it: `replace_dir`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another destination")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another destination or pass overwrite "
                              "(--overwrite) to replace it")


def replace_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished folder `new` to `path`. An existing `path` is first renamed aside (`.<name>.old`) and
    removed only once `new` is in place, so no failure leaves `path` missing or mixes old files with new ones."""
    new, path = Path(new), Path(path)
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    if path.is_symlink() or path.exists():
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old.exists() or old.is_symlink():
            os.replace(old, path)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary folder beside `path` (`.<name>.partial`); on success it replaces `path`
    (`replace_dir`: callers decide beforehand whether an existing `path` may go, e.g. with `check_destination`), on
    any error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
