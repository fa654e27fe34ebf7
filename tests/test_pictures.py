"""Pictures a person reads at a glance (magdiff_jax/utils/images.py, utils/plots.py and the demos' use of them):
contact grids whose frames are enlarged pixel for pixel and whose labels are wrapped and drawn inside the picture,
matplotlib line and bar plots, and the picture-writing parts of the I2V, V2V and VFI demos run on stand-in training
and pipelines (the MagDiff demo's are checked by tests/test_magdiff_demo.py after real training)."""

import json

import numpy as np
import pytest
from PIL import Image

from magdiff_jax.utils.images import contact_grid, contact_sheet, grid_figure, render
from magdiff_jax.utils.plots import BAR_PANEL_IN, DPI, PANEL_IN, bar_plot, line_plot

LONG = ("a caption far longer than any cell is wide, which must wrap onto several lines rather than run off "
        "the picture, ending in aworddeliberatelytoolongtofitonanysinglelineofthislabelcolumnatall")


def marked_clip(rng, frames=6, size=8):
    """Random frames (T, size, size, 3) uint8 whose pixel (0, 0) of frame t is the marker (1, 2, 3 + t): a colour
    that neither the white background nor the grey anti-aliased text has."""
    clip = rng.integers(20, 236, (frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        clip[t, 0, 0] = (1, 2, 3 + t)
    return clip


def find(image, colour):
    """(y, x) of the first pixel of `colour` in `image`, or None."""
    hits = np.argwhere(np.all(image == np.asarray(colour, np.uint8), axis=-1))
    return tuple(hits[0]) if len(hits) else None


def test_frames_are_enlarged_pixel_for_pixel_and_evenly_picked():
    rng = np.random.default_rng(0)
    clip = marked_clip(rng)  # 8 px frames, cell_px 24: each pixel a 3x3 block
    image = contact_grid([[clip, None]], ["clip"], ["three of six frames", "empty"], frames=3, cell_px=24)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    shown = []
    for t in range(6):
        at = find(image, (1, 2, 3 + t))
        if at is not None:
            y, x = at
            np.testing.assert_array_equal(image[y:y + 24, x:x + 24], clip[t].repeat(3, 0).repeat(3, 1))
            shown.append((t, x))
    assert [t for t, _ in shown] == [0, 2, 5]  # evenly spaced (linspace 0..5, 3 frames)
    assert shown[0][1] < shown[1][1] < shown[2][1]  # side by side, in order
    assert image.shape[1] > 3 * 24 + 24  # frames, an empty column and a row label


def test_floats_single_images_and_large_frames():
    image = np.full((10, 12, 3), -1.0, np.float32)  # black in [-1, 1]
    image[0, 0] = (1.0, -1.0, 1.0)  # magenta
    big = np.zeros((2, 200, 100, 3), np.uint8)  # 200 px at cell_px 48: reduced 4x to 50 px
    out = contact_grid([[image, big]], None, None, cell_px=48)
    y, x = find(out, (255, 0, 255))
    assert np.all(out[y:y + 5, x:x + 5] == (255, 0, 255)) and np.all(out[y + 5, x + 5] == 0)  # 5x enlarged
    dark = np.all(out < 5, axis=-1)
    rows = np.flatnonzero(dark.any(axis=1))
    assert rows.max() - rows.min() + 1 == 50  # the tallest cell: 200 / 4


def test_every_label_is_wrapped_inside_the_picture_and_off_the_frames():
    rng = np.random.default_rng(1)
    clips = [marked_clip(rng, 4, 32) for _ in range(4)]
    fig = grid_figure([clips[:2], clips[2:]], [LONG, "short"], [LONG, "right"], title=LONG * 2, frames=2,
                      cell_labels=[[LONG, None], [None, "ok"]])
    image = render(fig)
    renderer = fig.canvas.get_renderer()
    h, w = image.shape[:2]
    images = [im.get_extent() for im in fig.images]  # (x0, x1, y0, y1) in pixels
    assert len(images) == 4
    texts = [t for t in fig.texts if t.get_text()]
    assert len(texts) == 7
    for t in texts:
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= w and box.y1 <= h, (t.get_text()[:30], box, (w, h))
        for x0, x1, y0, y1 in images:
            assert box.x1 <= x0 or box.x0 >= x1 or box.y1 <= y0 or box.y0 >= y1, (t.get_text()[:30], box)
    assert all("\n" in t.get_text() for t in texts if t.get_text().replace("\n", " ").startswith(LONG[:20]))
    assert "".join(texts[0].get_text().split()).startswith("".join(LONG.split())[:60])  # wrapped, not cut
    short = contact_grid([clips[:2], clips[2:]], ["a", "b"], ["l", "r"], frames=2)
    assert image.shape[0] > short.shape[0]  # the wrapped lines made room for themselves


def test_bad_grids_are_named():
    clip = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="no rows"):
        contact_grid([], [], ["a"])
    with pytest.raises(ValueError, match=r"row 1 has 1 cells but there are 2 columns \(2 column labels\)"):
        contact_grid([[clip, clip], [clip]], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match=r"row 1 has 3 cells but there are 2 columns \(row 0's 2 cells\)"):
        contact_grid([[clip, clip], [clip, clip, clip]], None, None)
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        contact_grid([[clip], [clip]], ["a"], ["x"])
    with pytest.raises(ValueError, match=r"cell \(0, 1\) has shape \(8, 8\)"):
        contact_grid([[clip, np.zeros((8, 8))]], None, None)
    with pytest.raises(ValueError, match="cell_labels must be 1 rows of 1 labels"):
        contact_grid([[clip]], None, None, cell_labels=[["a", "b"]])
    with pytest.raises(ValueError, match="frames and cell_px must be >= 1"):
        contact_grid([[clip]], None, None, frames=0)
    with pytest.raises(ValueError, match="contact_sheet: no clips"):
        contact_sheet([])


def test_contact_sheet_is_a_one_column_grid():
    rng = np.random.default_rng(2)
    clips = [marked_clip(rng, 8, 32) for _ in range(3)]
    sheet = contact_sheet(clips, ["one", "two", LONG], cell=96, max_frames=4)
    assert sheet.shape[0] > 3 * 96 and sheet.shape[1] > 4 * 96  # a row of four 3x-enlarged frames per clip
    y, x = find(sheet, (1, 2, 3))
    np.testing.assert_array_equal(sheet[y:y + 96, x:x + 96], clips[0][0].repeat(3, 0).repeat(3, 1))
    assert contact_sheet(clips).shape[0] > 3 * 96  # without captions


def ink(path):
    """The image at `path` and its fraction of non-white pixels."""
    image = np.asarray(Image.open(path).convert("RGB"))
    return image, float(np.mean(np.any(image < 200, axis=-1)))


def test_line_and_bar_plots(tmp_path):
    steps = np.arange(1, 41)
    series = {"vae": {"loss": list(zip(steps, 1 / steps))},
              "magdiff": {"loss": list(zip(steps, 2 - steps / 40)), "eval": [(10, 1.5), (40, 1.0)]}}
    image, drawn = ink(line_plot(series, tmp_path / "loss.png", ylabel="loss (MSE)", smooth=5))
    assert image.shape == (PANEL_IN[1] * 2 * DPI, PANEL_IN[0] * DPI, 3) and 0.01 < drawn < 0.5
    assert np.any(np.all(image == (31, 119, 180), axis=-1))  # the first curve's colour (matplotlib's C0)
    image, _ = ink(line_plot(series, tmp_path / "log.png", logy=True, title="losses"))
    assert image.shape == (round((PANEL_IN[1] * 2 + 0.3) * DPI), PANEL_IN[0] * DPI, 3)
    values = {"V2V": {"V2V": 32.5, "bicubic": 32.9}, "I2V colour": {"I2V": 0.92}}
    image, drawn = ink(bar_plot(values, tmp_path / "bars.png", ylabel={"V2V": "PSNR (dB)", "I2V colour": "fraction"},
                                baseline={"I2V colour": ("chance", 1 / 6)}))
    assert image.shape == (BAR_PANEL_IN[1] * DPI, round(BAR_PANEL_IN[0] * 2 * DPI), 3) and drawn > 0.05
    assert not list(tmp_path.glob(".*"))  # written whole: no temporary files left

    for bad, match in (({}, "no panels"), ({"a": {}}, "panel 'a' has no curves"),
                       ({"a": {"c": []}}, "curve 'c' of panel 'a' must be a non-empty list of \\(x, y\\) pairs"),
                       ({"a": {"c": [1, 2, 3]}}, "curve 'c' of panel 'a'")):
        with pytest.raises(ValueError, match=match):
            line_plot(bad, tmp_path / "x.png")
    with pytest.raises(ValueError, match="curve 'c' of panel 'a' has y <= 0 on a logarithmic axis"):
        line_plot({"a": {"c": [(0, 1.0), (1, 0.0)]}}, tmp_path / "x.png", logy=True)
    for kwargs, match in (({"values": {}}, "no panels"), ({"values": {"a": {}}}, "panel 'a' has no bars"),
                          ({"values": {"a": {"x": float("nan")}}}, "bar 'x' of panel 'a' is nan"),
                          ({"ylabel": {"V2V": "dB", "zz": "?"}}, r"ylabel for panels \['zz'\]"),
                          ({"ylabel": {"V2V": "dB"}}, r"no ylabel for panels \['I2V colour'\]"),
                          ({"baseline": {"VFI": ("blend", 1.0)}}, r"baseline for panels \['VFI'\]")):
        args = {"values": values, "ylabel": "y", **kwargs}
        with pytest.raises(ValueError, match=match):
            bar_plot(args.pop("values"), tmp_path / "x.png", **args)
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def stand_ins(monkeypatch):
    """The trainer writes a short metrics.jsonl instead of training; `load` of the I2V, V2V and VFI pipelines gives
    stand-ins with their call signatures: I2V repeats the reference (it never moves), V2V enlarges its input
    pixel for pixel, VFI returns the first given frame in between."""
    from magdiff_jax.pipelines.i2v import I2VPipeline
    from magdiff_jax.pipelines.v2v import V2VPipeline
    from magdiff_jax.pipelines.vfi import VFIPipeline

    def train(config, workdir):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n"
                                                       for s in range(1, 13)))

    def i2v(references, prompts, seeds, num_steps, guidance):
        return np.stack([np.stack([r, r]) for r in references])

    def v2v(low_res, references, prompts, seeds, num_steps, guidance):
        return low_res.repeat(2, axis=2).repeat(2, axis=3)

    def vfi(ends, factor):
        return np.concatenate([ends[:, :1], ends[:, :1], ends[:, :1], ends[:, 1:]], axis=1)

    monkeypatch.setattr("magdiff_jax.train.trainer.train", train)
    for cls, fn in ((I2VPipeline, i2v), (V2VPipeline, v2v), (VFIPipeline, vfi)):
        monkeypatch.setattr(cls, "load", staticmethod(lambda path, fn=fn: fn))


def test_the_stage_demos_write_their_grids_and_plots(stand_ins, tmp_path):
    from magdiff_jax.demo import run_i2v_demo, run_v2v_demo, run_vfi_demo

    runs = {"i2v": (run_i2v_demo, {"num_subjects": 2}, 2 + 1, 5),  # rows (+ header), columns
            "v2v": (run_v2v_demo, {"num_clips": 2}, 2 + 1, 4),
            "vfi": (run_vfi_demo, {"num_clips": 2}, 2 + 1, 3)}
    for name, (run, kwargs, rows, cols) in runs.items():
        workdir = tmp_path / name
        summary = run(workdir, **({} if name == "vfi" else {"models": tmp_path}), **kwargs)
        assert json.loads((workdir / "summary.json").read_text()) == summary
        sheet, drawn = ink(summary["contact_sheet"])
        assert sheet.shape[0] > rows * 96 and sheet.shape[1] > cols * 96, (name, sheet.shape)
        loss, drawn = ink(summary["loss_plot"])
        assert loss.shape == (round((PANEL_IN[1] + 0.3) * DPI), PANEL_IN[0] * DPI, 3) and drawn > 0.01, name
