

def test_the_trainers_own_files_in_a_bucket(tmp_path, cwd):
    """What a resume does to the workdir, in a bucket: metrics.jsonl cut back to the checkpoint (a torn last line
    dropped), an unrestorable checkpoint moved aside (no rename in an object store: copied, then removed)."""
    from magdiff_jax.train.trainer import UNRESTORABLE, _restore_newest, _truncate_metrics
    from magdiff_jax.utils.files import as_path

    class Manager:  # checkpoint 4 cannot be restored, 2 can
        def all_steps(self):
            return [2, 4]

        def restore(self, step, args):
            if step == 4:
                raise ValueError("truncated")
            return {"step": step}

        def reload(self):
            pass

    root = tmp_path / "root"
    run = root / "bucket" / "w"
    (run / "checkpoints" / "4" / "group_unet").mkdir(parents=True)
    (run / "checkpoints" / "4" / "group_unet" / "data").write_bytes(b"half")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with fake_gcs(root):
        workdir = as_path("gs://bucket/w")
        assert _restore_newest(Manager(), workdir, None, main=True) == (2, {"step": 2})
        _truncate_metrics(workdir / "metrics.jsonl", 2)
    assert not (run / "checkpoints" / "4").exists()
    assert (run / UNRESTORABLE / "4" / "group_unet" / "data").read_bytes() == b"half"
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_cli_inputs_and_outputs_in_a_bucket(tmp_path, cwd):
    """`magdiff-jax sample` / `edit` read their subject, mask, video and masks from a bucket (copied down: the image
    and video readers read local files) and upload the videos they write."""
    import contextlib

    from magdiff_jax.cli import _local_input

    root = tmp_path / "root"
    (root / "bucket" / "in" / "masks").mkdir(parents=True)
    (root / "bucket" / "in" / "dog.png").write_bytes(b"png bytes")
    (root / "bucket" / "in" / "masks" / "0.png").write_bytes(b"mask bytes")
    with fake_gcs(root), contextlib.ExitStack() as stack:
        image = _local_input("gs://bucket/in/dog.png", stack)
        masks = _local_input("gs://bucket/in/masks", stack)
        assert _local_input("local.png", stack) == "local.png"
        assert Path(image).name == "dog.png" and Path(image).read_bytes() == b"png bytes"
        assert (Path(masks) / "0.png").read_bytes() == b"mask bytes"
        with pytest.raises(FileNotFoundError, match="gs://bucket/in/cat.png"):
            _local_input("gs://bucket/in/cat.png", stack)
    assert not Path(image).exists() and not Path(masks).exists()  # removed with the stack
