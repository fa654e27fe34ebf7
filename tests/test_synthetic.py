"""The synthetic dataset: deterministic clips whose captions tell the truth about shape, colour and motion, and
its on-disk form (mp4 + mask PNGs + captions.csv) written whole or not at all."""

import csv
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from magdiff_jax.data.synthetic import COLORS, MOTIONS, SyntheticConfig, attributes, make_clip, write_synthetic
from magdiff_jax.data.video_io import VideoError, read_video


def test_clips_are_deterministic_and_seeded():
    a, b = make_clip(5), make_clip(5)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    c = make_clip(5, SyntheticConfig(seed=1))
    assert not np.array_equal(a.frames, c.frames)


def test_every_attribute_combination_appears_once_per_72_clips():
    combos = [attributes(i) for i in range(72)]
    assert len(set(combos)) == 72


@pytest.mark.parametrize("index", range(0, 72, 7))
def test_caption_matches_the_pixels(index):
    """The subject's colour inside its mask is the named palette colour (nearest of the six), and its centroid
    travels in the named direction."""
    clip = make_clip(index)
    assert clip.caption.endswith(f"{clip.color} {clip.shape} moves {clip.motion}")
    assert clip.frames.shape == (16, 64, 64, 3) and clip.masks.shape == (16, 64, 64)
    assert all(m.sum() > 50 for m in clip.masks)
    mean = clip.frames[clip.masks].reshape(-1, 3).mean(0)
    nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - np.asarray(COLORS[c])))
    assert nearest == clip.color
    ys, xs = zip(*(np.argwhere(m).mean(0) for m in clip.masks[[0, -1]]))
    dy, dx = MOTIONS[clip.motion]
    moved = np.array([ys[1] - ys[0], xs[1] - xs[0]])
    assert moved @ np.array([dy, dx]) > 15  # about 0.4 * 64 pixels along the named direction
    assert abs(moved @ np.array([dx, dy])) < 2  # and not across it


def test_one_subject_in_the_middle_with_each_motion():
    """The evaluation clips: the same first frame (subject, colour, background) for every motion asked for, and a
    path that goes that way; a start or a size that would leave the frame is refused, naming the allowed range."""
    config = SyntheticConfig(num_frames=4, size=32, shape_size=0.3, travel=0.3)
    clips = {m: make_clip(3, config, motion=m, start=(0.5, 0.5)) for m in MOTIONS}
    first = clips["left"].frames[0]
    for motion, clip in clips.items():
        assert np.array_equal(clip.frames[0], first) and clip.caption.endswith(f"moves {motion}")
        box = np.argwhere(clip.masks[0])
        assert np.abs((box.min(0) + box.max(0)) / 2 - 15.5).max() < 1  # the bounding box's centre
        (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in clip.masks[[0, -1]])
        assert np.array([y1 - y0, x1 - x0]) @ np.array(MOTIONS[motion]) > 8  # 0.3 * 32 pixels
    with pytest.raises(ValueError, match=r"start \(0.2, 0.5\) puts the path of a subject moving up outside"):
        make_clip(3, config, motion="up", start=(0.2, 0.5))
    with pytest.raises(ValueError, match="motion must be one of"):
        make_clip(3, config, motion="sideways")
    with pytest.raises(ValueError, match=r"shape_size 0\.5 cannot travel 0\.5 of a 32-pixel frame"):
        SyntheticConfig(size=32, shape_size=0.5, travel=0.5)


def test_independent_start_says_nothing_of_the_motion():
    """With independent_start every clip starts where it could move any way: the first frames' subject centres of
    all four directions share one region (here 13.8..18.2 px of 32 on both axes), and the paths still go their way."""
    config = SyntheticConfig(num_frames=4, size=32, shape_size=0.3, travel=0.25, independent_start=True)
    centres = {m: [] for m in MOTIONS}
    for i in range(48):
        clip = make_clip(i, config)
        box = np.argwhere(clip.masks[0])
        centres[clip.motion].append((box.min(0) + box.max(0)) / 2 + 0.5)
        (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in clip.masks[[0, -1]])
        assert np.array([y1 - y0, x1 - x0]) @ np.array(MOTIONS[clip.motion]) > 6  # 0.25 * 32 pixels
    for motion, points in centres.items():
        points = np.asarray(points)
        assert len(points) >= 8 and points.min() > 13.8 - 1 and points.max() < 18.2 + 1, (motion, points)
    with pytest.raises(ValueError, match="in every direction: shape_size \\+ 2 \\* travel must be at most"):
        SyntheticConfig(size=32, shape_size=0.3, travel=0.4, independent_start=True)


def test_written_dataset_round_trips(tmp_path):
    out = write_synthetic(tmp_path / "synth", 3)
    with open(out / "captions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["caption"] for r in rows] == [make_clip(i).caption for i in range(3)]
    for i, row in enumerate(rows):
        clip = make_clip(i)
        video = read_video(out / row["video"])
        assert video.shape == clip.frames.shape
        assert np.abs(video.astype(int) - clip.frames).mean() < 6  # H.264 at crf 12
        masks = np.stack([iio.imread(p) > 127 for p in sorted((out / row["mask"]).glob("*.png"))])
        assert np.array_equal(masks, clip.masks)
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic(out, 1)
    assert not list(tmp_path.glob(".*partial"))


def test_bad_videos_are_named(tmp_path):
    bad = tmp_path / "random.mp4"
    bad.write_bytes(np.random.RandomState(0).bytes(2000))
    with pytest.raises(VideoError, match=r"random\.mp4"):
        read_video(bad)
    good = write_synthetic(tmp_path / "one", 1) / "videos" / "00000.mp4"
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(VideoError, match=r"truncated\.mp4"):
        read_video(truncated)


def test_cli_data_synth(tmp_path):
    repo = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "-m", "magdiff_jax.cli", "data", "synth", "--out", str(tmp_path / "d"),
                        "--num", "2", "--frames", "4", "--size", "32"], capture_output=True, text=True, cwd=repo,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_video(tmp_path / "d" / "videos" / "00001.mp4").shape == (4, 32, 32, 3)


def test_the_synthetic_tokenizer_gives_each_caption_word_one_token(tmp_path):
    """BPE merges by rank across a word, so a naive merge list splits words ("r i" of "right" inside "triangle");
    each word must be one token, and BOS/EOS must be the ids configs/t2i.py:tiny's text encoder expects."""
    from magdiff_jax.data.synthetic import caption_words, write_tokenizer
    from magdiff_jax.demo import load_config
    from magdiff_jax.models.tokenizer import CLIPTokenizer

    write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_folder(tmp_path, max_length=16)
    ids = {}
    for word in caption_words():
        row = [int(i) for i in tok([word])[0]]
        assert row[0] == tok.bos_token_id and row[2] == tok.eos_token_id, (word, row)  # BOS, the word, EOS
        ids[word] = row[1]
    assert len(set(ids.values())) == len(ids)
    words = ["a", "purple", "triangle", "moves", "right"]
    row = [int(i) for i in tok([" ".join(words)])[0]]
    assert row[:7] == [tok.bos_token_id, *(ids[w] for w in words), tok.eos_token_id]
    text = load_config("t2i").model.text_encoder
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                         tok.pad_token_id)
    assert text.vocab_size > max(tok.eos_token_id, *ids.values())
