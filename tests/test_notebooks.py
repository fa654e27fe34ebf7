"""The notebooks of notebooks/, executed headlessly as a user runs them: papermill with parameters, in a Jupyter
kernel of this Python (a kernelspec written to a temporary prefix, this checkout first on the kernel's PYTHONPATH),
on tiny inputs. A cell that raises fails the test (papermill's PapermillExecutionError names the cell).

- magdiff_sample.ipynb on a tiny random MagDiff stage export (configs/magdiff.py:tiny's models with a one-level U-Net
  and one-layer CLIP towers, every parameter N(0, 0.1^2): `helpers.random_model`; written by
  `export.stage.save_stage`), a 48x48 synthetic subject PNG and mask,
  a 4-frame synthetic source mp4 and its PNG masks; 2 DDIM steps, two seeds, an edit at strength 0.5 (one step of
  DDIM inversion): every mp4 it promises is written (2 frames of 32x32 each), each video cell displays <video>s,
  the kernel imported this checkout's magdiff_jax, and off Colab the set-up cell does nothing;
- magicvideo.ipynb on the tiny random MagicVideo-V2 stages of `helpers.tiny_magicvideo_stages` (16 px references
  and keyframes, x2 to 32 px by V2V), two prompts, 2 steps per stage, 3 keyframes, then a second run with the VFI
  factor changed (the cheapest change that exercises the resume cell): every stage's files written at the promised
  sizes, summary.json complete, each stage's section showing its frames for both prompts, the timing table printed;
  the second run skipped T2I, I2V and V2V and wrote final videos of the new length in its own folder;
- the readers the notebook shares with `magdiff-jax sample` / `edit` (`pipelines.magdiff.read_subject`,
  `read_edit_source`) name a bad input;
- each notebook's set-up cell's Colab branch, run in-process with a stand-in `google.colab` module and `subprocess.run`
  recorded: Drive is mounted for a Drive path, and pip installs the repository with the JAX extra of the runtime;
- every committed notebook is registered here (so it is executed), carries no outputs, has one `parameters`-tagged
  cell before its set-up cell, and defaults its paths into Google Drive.
"""

import ast
import json
import os
import re
import sys
import types
from pathlib import Path

import nbformat
import numpy as np
import pytest
from helpers import (
    cell_text,
    cell_videos,
    notebook_cell,
    notebook_kernel,
    random_model,
    run_notebook,
    tiny_magicvideo_stages,
)

REPO = Path(__file__).parents[1]
NOTEBOOKS = REPO / "notebooks"
STAGE_MODELS = {"unet": "magdiff", "vae": "vae", "text_encoder": "clip_text", "image_encoder": "clip_vision"}
SEEDS = [3, 5]
MV_PROMPTS = ["a red circle moves left", "a blue square moves up"]
# a parameter that names a path
PATH_PARAMETERS = ("STAGES", "EXPORT", "IMAGE", "MASK", "VIDEO", "MASKS", "_DIR", "_FILE")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with notebook_kernel(tmp_path_factory.mktemp("jupyter")) as name:
        yield name


@pytest.fixture(scope="module")
def magdiff_inputs(tmp_path_factory):
    """A tiny random MagDiff stage export (2 frames of 32x32), a subject image + mask and a source video + masks."""
    from etils import epath
    from PIL import Image

    from magdiff_jax.data.synthetic import SyntheticConfig, make_clip, write_tokenizer
    from magdiff_jax.data.video_io import write_video
    from magdiff_jax.demo import load_config
    from magdiff_jax.export.stage import Stage, save_stage

    root = tmp_path_factory.mktemp("magdiff_nb")
    config = load_config("magdiff", "tiny")
    # smaller still, for a shorter compile: one U-Net level, one layer in each CLIP tower
    config.model.unet.unet.update(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock3D",),
                                  up_block_types=("CrossAttnUpBlock3D",))
    config.model.text_encoder.num_hidden_layers = config.model.image_encoder.num_hidden_layers = 1
    modules, params = {}, {}
    for n, (name, kind) in enumerate(STAGE_MODELS.items()):
        modules[name], params[name] = random_model(kind, config.model[name].to_dict(), seed=n)
    tokenizer = write_tokenizer(root / "tokenizer")
    stage = Stage("magdiff", 1, config, dict(STAGE_MODELS), modules, params, epath.Path(tokenizer), epath.Path(root))
    save_stage(stage, root / "export")

    clip = make_clip(0, SyntheticConfig(num_frames=4, size=48, shape_size=0.4, travel=0.2))
    Image.fromarray(clip.frames[0]).save(root / "subject.png")
    Image.fromarray(clip.masks[0].astype(np.uint8) * 255).save(root / "subject_mask.png")
    write_video(root / "source.mp4", clip.frames)
    (root / "masks").mkdir()
    for k, m in enumerate(clip.masks):
        Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / f"{k:03d}.png")
    return root


@pytest.fixture(scope="module")
def magicvideo_stages(tmp_path_factory):
    """The four tiny random MagicVideo-V2 stage exports (t2i/ i2v/ v2v/ vfi/ in one folder)."""
    return tiny_magicvideo_stages(tmp_path_factory.mktemp("magicvideo_nb"))


def test_magdiff_sample_generates_and_edits(kernel, magdiff_inputs, tmp_path):
    from magdiff_jax.data.video_io import read_video

    root = magdiff_inputs
    params = dict(REPO_URL="", EXPORT=str(root / "export"), SUBJECT_IMAGE=str(root / "subject.png"),
                  SUBJECT_MASK=str(root / "subject_mask.png"), PROMPT="a red circle moves left", SEEDS=SEEDS,
                  EDIT_VIDEO=str(root / "source.mp4"), EDIT_MASKS=str(root / "masks"),
                  EDIT_PROMPT="a blue square moves up", EDIT_STRENGTH=0.5, NUM_STEPS=2, GUIDANCE=3.0,
                  OUTPUT_DIR=str(tmp_path / "outputs"), DISPLAY_HEIGHT=64)
    nb = run_notebook("magdiff_sample.ipynb", kernel, params, tmp_path)

    expected = [tmp_path / "outputs" / f"generated_seed{s}.mp4" for s in SEEDS] + [tmp_path / "outputs" / "edited.mp4"]
    for path in expected:
        assert read_video(path).shape == (2, 32, 32, 3), path
    assert cell_text(notebook_cell(nb, "outputs")).split() == [str(p) for p in expected]
    assert cell_videos(notebook_cell(nb, "generate")) == len(SEEDS)
    assert cell_videos(notebook_cell(nb, "edit")) == 3  # source, kept region, edited
    assert sum(o.get("data", {}).get("text/html", "").count("<img") for o in notebook_cell(nb, "inputs").outputs) == 2
    assert f"magdiff_jax from {REPO / 'magdiff_jax'}" in cell_text(notebook_cell(nb, "imports"))
    assert notebook_cell(nb, "setup").outputs == []  # off Colab: nothing mounted, nothing installed


def _table(text: str) -> list[list[str]]:
    """The stage table a cell printed (its header and the next four rows), each row's first and last word."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:3] == ["stage", "output", "seconds"])
    return [[line.split()[0], line.split()[-1]] for line in lines[start:start + 5]]


def test_magicvideo_shows_each_stage_and_resumes(kernel, magicvideo_stages, tmp_path):
    from PIL import Image

    from magdiff_jax.data.video_io import read_video

    out, rerun = tmp_path / "clips", tmp_path / "clips_rerun"
    # test_magicvideo.py's prompts and settings: in the suite the persistent compilation cache serves both
    params = dict(REPO_URL="", STAGES=str(magicvideo_stages), PROMPTS=MV_PROMPTS, SEEDS=[7, 8], OUTPUT_DIR=str(out),
                  T2I_STEPS=2, I2V_STEPS=2, V2V_STEPS=2, T2I_GUIDANCE=7.5, I2V_GUIDANCE=3.0, V2V_GUIDANCE=1.0,
                  FRAMES=3, FACTOR=3, PROGRESS=False, RERUN={"factor": 2}, RERUN_DIR=str(rerun), DISPLAY_HEIGHT=64)
    nb = run_notebook("magicvideo.ipynb", kernel, params, tmp_path)

    for k in range(2):
        assert np.asarray(Image.open(out / f"reference_{k}.png")).shape == (16, 16, 3)
        assert read_video(out / f"keyframes_{k}.mp4").shape == (3, 16, 16, 3)
        assert read_video(out / f"hires_{k}.mp4").shape == (3, 32, 32, 3)
        assert read_video(out / f"final_{k}.mp4").shape == (7, 32, 32, 3)  # 3 keyframes + 2 x 2 interpolated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["prompts"] == MV_PROMPTS and summary["seeds"] == [7, 8]
    assert list(summary["stages"]) == ["t2i", "i2v", "v2v", "vfi"]
    assert not any(stage["skipped"] for stage in summary["stages"].values())
    assert summary["stages"]["v2v"]["settings"]["v2v_steps"] == 2 and summary["settings"]["i2v_guidance"] == 3.0

    # one section per stage, each showing that stage's frames for both prompts
    assert sum(o.get("data", {}).get("text/html", "").count("<img") for o in notebook_cell(nb, "t2i").outputs) == 2
    for name in ("i2v", "v2v", "vfi"):
        assert cell_videos(notebook_cell(nb, name)) == 2, name
    assert f"magdiff_jax from {REPO / 'magdiff_jax'}" in cell_text(notebook_cell(nb, "imports"))
    assert "magicvideo [4/4] vfi" in cell_text(notebook_cell(nb, "run"))  # the pipeline's progress lines are shown
    timings = cell_text(notebook_cell(nb, "timings"))
    assert _table(timings) == [["stage", "run"], ["t2i", "ran"], ["i2v", "ran"], ["v2v", "ran"], ["vfi", "ran"]]
    assert "  2x3x16x16x3  " in timings.splitlines()[2]
    written = timings.split("written:\n")[1].split()
    assert written == [str(out / f"{name}_{k}.{ext}") for name, ext in (
        ("reference", "png"), ("keyframes", "mp4"), ("hires", "mp4"), ("final", "mp4")) for k in range(2)] + [
        str(out / "summary.json")]
    assert notebook_cell(nb, "setup").outputs == []

    # the second run: a VFI setting changed, so every stage before VFI is skipped; the first run's folder is kept
    again = json.loads((rerun / "summary.json").read_text())
    assert [again["stages"][s]["skipped"] for s in ("t2i", "i2v", "v2v", "vfi")] == [True, True, True, False]
    assert _table(cell_text(notebook_cell(nb, "rerun")))[1:] == [["t2i", "skipped"], ["i2v", "skipped"],
                                                                  ["v2v", "skipped"], ["vfi", "ran"]]
    for k in range(2):
        assert read_video(rerun / f"final_{k}.mp4").shape == (5, 32, 32, 3)
        assert read_video(out / f"final_{k}.mp4").shape == (7, 32, 32, 3)
    assert cell_videos(notebook_cell(nb, "rerun")) == 4  # both prompts' final videos, before and after the change


def test_the_readers_name_a_bad_input(magdiff_inputs, tmp_path):
    """`read_subject` / `read_edit_source` (the notebook's and the CLI's readers): masks resized to the frames, and
    a mask of another size or a source too short is an error naming the file."""
    from PIL import Image

    from magdiff_jax.data.video_io import VideoError
    from magdiff_jax.pipelines.magdiff import read_edit_source, read_subject

    root = magdiff_inputs
    image, mask = read_subject(root / "subject.png", root / "subject_mask.png")
    assert image.shape == (48, 48, 3) and mask.shape == (48, 48) and mask.max() == 255
    assert read_subject(root / "subject.png")[1] is None
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "small.png")
    message = f"{tmp_path / 'small.png'}: the mask is 24x16, the subject image {root / 'subject.png'} is 48x48"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        read_subject(root / "subject.png", tmp_path / "small.png")

    (tmp_path / "masks").mkdir()
    for k in range(3):
        Image.fromarray(np.full((24, 24), 255 * (k % 2), np.uint8)).save(tmp_path / "masks" / f"{k:03d}.png")
    frames, masks = read_edit_source(root / "source.mp4", tmp_path / "masks", 3)
    assert frames.shape == (3, 48, 48, 3) and masks.shape == (3, 48, 48)
    assert masks[0].max() == 0 and masks[1].min() == 255
    with pytest.raises(VideoError, match=f"^{re.escape(str(root / 'source.mp4'))}: has 4 frames, frame 4 "):
        read_edit_source(root / "source.mp4", root / "masks", 5)
    with pytest.raises(VideoError, match=f"^{re.escape(str(tmp_path / 'masks'))}: has 3 frames, frame 3 "):
        read_edit_source(root / "source.mp4", tmp_path / "masks", 4)


class _Drive(types.ModuleType):
    def __init__(self):
        super().__init__("google.colab.drive")
        self.mounted = []

    def mount(self, path):
        self.mounted.append(path)


def _path_parameters(nb) -> dict:
    """The parameters cell's defaults that name a path."""
    code = next(c for c in nb.cells if c.cell_type == "code")
    defaults = {t.id: ast.literal_eval(s.value) for s in ast.parse(code.source).body if isinstance(s, ast.Assign)
                for t in s.targets if isinstance(t, ast.Name)}
    return {k: v for k, v in defaults.items() if k.endswith(PATH_PARAMETERS)}


@pytest.mark.parametrize("notebook", ["magdiff_sample.ipynb", "magicvideo.ipynb", "evaluate.ipynb"])
@pytest.mark.parametrize(("runtime", "extra", "drive"), [("gpu", "[cuda]", True), ("tpu", "[tpu]", False),
                                                       ("cpu", "", False)])
def test_the_colab_setup_mounts_drive_and_installs(monkeypatch, notebook, runtime, extra, drive):
    """The set-up cell as Colab runs it (a `google.colab` module imported): Drive mounted when a path is on it, pip
    given the repository URL with the extra of the runtime's accelerator, and no restart when nothing imported
    changed version."""
    import shutil
    import subprocess

    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    fake = _Drive()
    colab = types.ModuleType("google.colab")
    colab.drive = fake
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", fake)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(
        returncode=0, stdout="", stderr=""))
    gpu = runtime == "gpu"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu and name == "nvidia-smi" else None)
    exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: runtime == "tpu" if p == "/dev/accel0" else exists(p))
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("the runtime was restarted"))
    namespace = {}
    exec(notebook_cell(nb, "parameters").source, namespace)
    if not drive:
        for name in _path_parameters(nb):
            namespace[name] = f"/tmp/{name.lower()}"
    namespace["REPO_URL"] = "git+https://example.com/magdiff_jax.git"
    exec(notebook_cell(nb, "setup").source, namespace)
    assert fake.mounted == (["/content/drive"] if drive else [])
    assert calls == [[sys.executable, "-m", "pip", "install", "-q",
                      f"magdiff_jax{extra} @ git+https://example.com/magdiff_jax.git"]]


# every notebook of notebooks/ and the test that executes it
EXECUTED = {"magdiff_sample.ipynb": "test_notebooks.py::test_magdiff_sample_generates_and_edits",
            "magicvideo.ipynb": "test_notebooks.py::test_magicvideo_shows_each_stage_and_resumes",
            "evaluate.ipynb": "test_eval_suite.py::test_the_evaluate_notebook_scores_and_shows_the_report"}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_are_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert path.name in EXECUTED, f"{path.name} is executed by no test: add it to EXECUTED"
    file, test = EXECUTED[path.name].split("::")
    defined = {f.name for f in ast.parse((REPO / "tests" / file).read_text()).body if isinstance(f, ast.FunctionDef)}
    assert test in defined, f"{EXECUTED[path.name]}: no such test"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {cell.id} has outputs"
    tagged = [k for k, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [0], f"{path.name}: the first code cell, and only it, must be tagged 'parameters'"
    assert '"google.colab" in sys.modules' in code[1].source, f"{path.name}: the set-up must follow the parameters"
    paths = _path_parameters(nb)
    assert paths and all(v.startswith("/content/drive/MyDrive/") for v in paths.values()), paths
    assert json.loads(path.read_text())["metadata"]["kernelspec"]["name"] == "python3"
