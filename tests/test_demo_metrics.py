"""The demo's measurements (magdiff_jax/demo.py), checked on real synthetic clips where the answer is known: the
subject's colour (mean inside the first-frame mask, nearest palette colour) and its motion (centroid of its colour's
pixels, first to last frame, projected on the four directions)."""

import numpy as np

from magdiff_jax.data.pipeline import synthetic_config
from magdiff_jax.data.synthetic import COLORS, MOTIONS, make_clip
from magdiff_jax.demo import (
    above_chance,
    load_config,
    loss_plot,
    subject_colour_accuracy,
    subject_motion,
    subject_motion_accuracy,
)

CLIPS = [make_clip(i, synthetic_config(load_config("magdiff").data.synthetic)) for i in range(24)]  # 32x32, 4 frames


def test_motion_of_real_clips_is_their_caption_and_reversed_clips_move_back():
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    colours, motions = [c.color for c in CLIPS], [c.motion for c in CLIPS]
    assert set(motions) == set(MOTIONS)
    for frames in (2, 4):  # the suite's demo makes 2 frames: a shorter path
        videos = [c.frames[:frames] for c in CLIPS]
        accuracy, detected = subject_motion_accuracy(videos, colours, motions)
        assert accuracy == 1.0, list(zip(detected, motions))
        back, _ = subject_motion_accuracy([v[::-1] for v in videos], colours, [opposite[m] for m in motions])
        assert back == 1.0


def test_motion_is_none_without_the_subject_or_without_movement():
    clip = CLIPS[0]
    assert subject_motion(np.repeat(clip.frames[:1], 4, axis=0), clip.color) is None  # still
    other = next(c for c in COLORS if c != clip.color and np.linalg.norm(
        np.subtract(COLORS[c], COLORS[clip.color])) > 120)
    assert subject_motion(clip.frames, other) is None  # that colour is not in the clip
    grey = np.full((4, 32, 32, 3), 128, np.uint8)
    assert subject_motion(grey, clip.color) is None


def test_colour_accuracy_of_real_clips_and_of_wrong_labels(tmp_path):
    videos = np.stack([c.frames[:4] for c in CLIPS])
    masks = np.stack([c.masks[0] for c in CLIPS])
    accuracy, nearest = subject_colour_accuracy(videos, masks, [c.color for c in CLIPS])
    assert accuracy == 1.0 and nearest == [c.color for c in CLIPS]
    shifted = [list(COLORS)[(list(COLORS).index(c.color) + 1) % len(COLORS)] for c in CLIPS]
    assert subject_colour_accuracy(videos, masks, shifted)[0] == 0.0
    path = loss_plot({"a": [(1, 1.0), (2, 0.5), (3, 0.4)], "b": [(1, 2.0), (5, 1.0)]}, tmp_path / "loss.png")
    from PIL import Image

    plot = np.asarray(Image.open(path))  # utils.plots.line_plot: 700 x 280 px a panel, 30 px of title
    assert plot.shape == (2 * 280 + 30, 700, 3) and np.mean(np.any(plot < 200, axis=-1)) > 0.01


def test_above_chance_is_the_binomial_tail():
    """P(X >= hits), X ~ Binomial(n, chance): the demo's p-values of its accuracies against chance."""
    assert above_chance(0, 12, 0.25) == 1.0
    assert above_chance(12, 12, 0.25) == 0.25**12
    assert abs(above_chance(6, 12, 0.25) - 0.0544) < 1e-3 and abs(above_chance(7, 12, 0.25) - 0.0143) < 1e-3
    rng = np.random.default_rng(0)
    draws = rng.binomial(12, 1 / 6, size=200_000)
    assert abs(above_chance(4, 12, 1 / 6) - np.mean(draws >= 4)) < 0.005
