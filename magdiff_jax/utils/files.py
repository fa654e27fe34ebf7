"""Paths that may be local or in cloud storage, and files written whole or not at all.

Every path a user gives (workdirs, exports, converted models, datasets) goes through `as_path`: an
`etils.epath.Path`, which reaches a local disk or an object store (gs://, s3://, ...) with the same methods. The
builtin `open`, `os` and `shutil` functions and `pathlib.Path` only know local disks (`pathlib.Path("gs://b/x")` is
the relative folder `gs:/b/x`), so code that may see a user's path uses epath methods or the helpers here.

Object stores have no append and no atomic rename; two things change there:

- A file that grows (`GrowingFile`: metrics.jsonl, TensorBoard events) is appended to on a local disk; in an object
  store its content is kept in memory and the whole object rewritten at each append (an object is replaced whole,
  so a reader sees the old content or the new, never a torn write).
- A folder written whole (`atomic_dir`, and `export.model.folder_written_whole` for multi-process writes: model
  folders, stage exports, converted PyTorch folders, MagDiff init folders, a run's tokenizer) is, on a local disk,
  assembled in a `.<name>.partial` sibling and renamed into place: the rename is what says it is complete, and the
  folder holds exactly the files it always did. In an object store it is written in place (an existing one removed
  first, its marker before anything else) and a completion marker, `complete.json` (`COMPLETE`), written last.
  Readers of our own folders (`export.model`, `export.stage`, and through them `init_from`, the pipelines and the
  converters' Flax inputs) call `check_complete`: an object-store folder without the marker is refused as
  incomplete, a local one is complete by its name alone. So a local folder copied into a bucket by other means
  (`gsutil cp -r`) needs a `complete.json` in it and in each model folder inside; writing it there with the tools
  (`magdiff-jax export --out gs://...`, `convert ... gs://...`) does that. PyTorch folders come from anywhere (the
  hub, diffusers' `save_pretrained`) and are read without the check; ours carry the marker in a bucket all the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from etils import epath

URI_SCHEMES = ("gs://", "s3://", "az://", "hf://")
COMPLETE = "complete.json"  # the last file of a folder written whole to an object store


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a cloud-storage URI (gs://, s3://, ...) rather than a local path."""
    return os.fspath(path).startswith(URI_SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """Any path a user gives, local or a cloud URI, as an `etils.epath.Path` (local ones made absolute, `~`
    expanded). `pathlib.Path("gs://b/run")` would be the local folder `gs:/b/run`; this keeps the URI."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def user_path(path: str | os.PathLike) -> Path | epath.Path:
    """A cloud URI as an `epath.Path`, a local path as the `pathlib.Path` given (relative kept): for readers whose
    local messages and behaviour stay those of `pathlib`."""
    return as_path(path) if is_remote(path) else Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary local file path (same suffix as `path`) to write; on success it becomes `path`, on any error
    it is removed, so `path` is never left half-written. Locally the file lies beside `path` and is renamed onto
    it; for an object store it is uploaded as one object."""
    if is_remote(path):
        path = as_path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix)
        os.close(fd)
        try:
            yield tmp
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "rb") as src, path.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        finally:
            os.remove(tmp)
        return
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


def write_bytes_whole(path: str | os.PathLike, data: bytes) -> None:
    """Write `path` whole or not at all: locally through a temporary file in the same folder and a rename; in an
    object store as one object (replaced whole)."""
    if is_remote(path):
        path = as_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class GrowingFile:
    """A file that grows by appends, each one flushed (a killed writer keeps what it wrote): appended to on a
    local disk; in an object store (no append) the content is kept and the whole object rewritten at each append.
    An existing file is continued."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)
        self.remote = is_remote(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None
        self._content = b""
        if self.remote:
            self._content = self.path.read_bytes() if self.path.exists() else b""
        else:
            self._fh = open(self.path, "ab")  # noqa: SIM115 (closed by close())

    def append(self, data: bytes) -> None:
        if self.remote:
            self._content += data
            self.path.write_bytes(self._content)
        else:
            self._fh.write(data)
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_destination(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write a folder at `path` over a file, or over a non-empty folder unless `overwrite` (whatever is
    there then goes in one piece when the new folder replaces it: `replace_dir`)."""
    path = as_path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another destination")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another destination or pass overwrite "
                              "(--overwrite) to replace it")


def replace_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished local folder `new` to `path`. An existing `path` is first renamed aside (`.<name>.old`) and
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


def mark_complete(folder: str | os.PathLike) -> None:
    """Write `folder`'s completion marker (the last file of a folder written whole to an object store)."""
    (as_path(folder) / COMPLETE).write_text(json.dumps({"format": "magdiff_jax", "complete": True}) + "\n")


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` was written whole: its marker is there, or it is a local folder (renamed into place)."""
    folder = as_path(folder)
    return (folder / COMPLETE).exists() if is_remote(folder) else folder.exists()


def check_complete(folder: str | os.PathLike, what: str = "folder") -> None:
    """Refuse an object-store folder without its completion marker (module docstring)."""
    folder = as_path(folder)
    if is_remote(folder) and folder.is_dir() and not (folder / COMPLETE).exists():
        raise FileNotFoundError(f"{folder}: incomplete {what} (no {COMPLETE}, which its writer writes last: the "
                                "write was interrupted or is still under way)")


def clear_remote_dir(path: epath.Path) -> None:
    """Remove an object-store folder, its completion marker first (a reader never sees a marked, half-removed
    folder)."""
    (path / COMPLETE).unlink(missing_ok=True)
    path.rmtree(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty folder to write `path` into (module docstring). Locally a temporary folder beside `path`
    (`.<name>.partial`, a `pathlib.Path`) that replaces `path` on success (`replace_dir`: callers decide
    beforehand whether an existing `path` may go, e.g. with `check_destination`) and is removed on any error; in an
    object store `path` itself (an `epath.Path`), an existing one removed first, its completion marker written on
    success, its objects removed on an error."""
    if is_remote(path):
        path = as_path(path)
        clear_remote_dir(path)
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
            mark_complete(path)
        except BaseException:
            path.rmtree(missing_ok=True)
            raise
        return
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


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the folder `src` to `dst` (merged into an existing one), either of them local or in an object store;
    files are streamed, never read whole."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(os.fspath(src), os.fspath(dst), dirs_exist_ok=True)
        return
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dst / child.name)
        else:
            with child.open("rb") as r, (dst / child.name).open("wb") as w:
                shutil.copyfileobj(r, w, 16 * 2**20)


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the folder `src` to `dst`: a rename on a local disk; a copy then a removal in an object store."""
    if not is_remote(src) and not is_remote(dst):
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    copy_tree(src, dst)
    as_path(src).rmtree()
