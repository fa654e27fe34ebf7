"""A `gs://` bucket on a local folder, for tests of cloud-storage workdirs and datasets.

    with fake_gcs(tmp_path):            # gs://bucket/a/b is tmp_path/bucket/a/b
        train(config, "gs://bucket/run")

Two routes to storage are redirected: `etils.epath` (every path the project opens, and Orbax's and Grain's
folder and metadata files) through `epath.testing.mock_epath`, and Orbax's own GCS calls: its array files, which
TensorStore writes with its GCS driver (their key-value store spec becomes the `file` driver on the local folder),
the bucket query for hierarchical namespaces (none) and its recursive delete. Orbax still takes the paths for GCS
ones (its commit-marker atomicity rather than a rename). Nothing else can reach `gs://`: a path that escapes (a
plain `open` or `os` call on a URI) fails or lands in a relative `gs:` folder, which the tests check is absent.

`python tests/fake_gcs.py ROOT -- magdiff-jax ARGS...` runs the command line in this process under the mapping
(for multi-process runs through launch/local_multiprocess.sh).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from unittest import mock

from etils import epath

PREFIX = "gs://"


def _mapper(root: Path):
    def local(path) -> str:
        s = os.fspath(path)
        return str(root / s[len(PREFIX):]) if s.startswith(PREFIX) else s

    def remote(path) -> str:
        s = os.fspath(path)
        prefix = str(root) + os.sep
        return PREFIX + s[len(prefix):] if s.startswith(prefix) else s

    return local, remote


@contextlib.contextmanager
def fake_gcs(root: str | os.PathLike):
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    local, remote = _mapper(root)

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def glob(fn, pattern):
        return [remote(p) for p in fn(local(pattern))]

    def walk(fn, top, **kwargs):
        for folder, dirs, files in fn(local(top), **kwargs):
            yield remote(folder), dirs, files

    import shutil

    from orbax.checkpoint._src.path import gcs_utils

    def kvstore(path):
        return {"driver": "file", "path": local(path)}

    def rmtree(path, *, missing_ok=False):
        if missing_ok and not os.path.exists(local(path)):
            return
        shutil.rmtree(local(path))

    with contextlib.ExitStack() as stack:
        stack.enter_context(epath.testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one, rmtree=one, stat=one,
            copy=two, rename=two, replace=two, glob=glob, walk=walk))
        stack.enter_context(mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore))
        stack.enter_context(mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False))
        stack.enter_context(mock.patch.object(gcs_utils, "rmtree", rmtree))
        yield root


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--" or argv[2] != "magdiff-jax":
        raise SystemExit("usage: python tests/fake_gcs.py ROOT -- magdiff-jax ARGS...")
    from magdiff_jax import cli, cpu

    cpu.setup_process()  # its restart (if any) runs this script again, with these arguments
    sys.argv = argv[2:]
    with fake_gcs(argv[0]):
        cli.run()


if __name__ == "__main__":
    main(sys.argv[1:])
