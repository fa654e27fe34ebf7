"""Pictures for people: contact grids of clips (a row per subject or clip, a column per motion or stage, frames
enlarged so that a 32 px clip is visible, labels that are never cut off; drawn with matplotlib's Agg canvas, nothing
global touched), written as PNG atomically (locally or to an object store); CLIP's pixel normalisation; bicubic
upsampling of videos on device.

Used by `magdiff-jax data inspect`, the trainer's preview samples and the demos; `utils.plots` draws their curves.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath

from magdiff_jax.utils.files import atomic_path

# the pixel normalisation of every CLIP vision tower (OpenAI's and OpenCLIP's): (x / 255 - mean) / std per channel
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def upscale_video(video, size):
    """Videos (..., H, W, C) in [-1, 1] -> (..., size[0], size[1], C), bicubic (Keys, a = -0.5, as PIL and
    torch's `bicubic`; half-pixel centres) and clipped to [-1, 1], in float32: the super-resolution stage's input
    and the baseline it is measured against."""
    import jax
    import jax.numpy as jnp

    video = jnp.asarray(video, jnp.float32)
    shape = (*video.shape[:-3], int(size[0]), int(size[1]), video.shape[-1])
    return jnp.clip(jax.image.resize(video, shape, "bicubic"), -1.0, 1.0)


# contact grids: pixel layout (display pixels at DPI) and text
DPI = 100
FONT_PT = 10  # labels; at 100 dpi about 14 px
TITLE_PT = 12
MARGIN = 10  # around the whole picture
GAP = 12  # between cells, and between the labels and the cells
FRAME_GAP = 3  # between the frames of one cell
ROW_LABEL_PX = 220  # row labels are wrapped to this width


def _as_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 as is; other integers clipped to [0, 255]; floats read as [-1, 1] (the models' pixel range)."""
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        return np.clip(x.astype(np.int64) * (255 if x.dtype == bool else 1), 0, 255).astype(np.uint8)
    return np.clip((x.astype(np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def _cell_pixels(cell, frames: int, cell_px: int, where: str) -> np.ndarray | None:
    """A cell -> the picture drawn for it, uint8 (h, w, 3): up to `frames` evenly spaced frames side by side,
    `FRAME_GAP` white pixels apart. A frame of height H < 2 * cell_px is enlarged by the integer factor
    ceil(cell_px / H) with nearest-neighbour (each pixel a visible block); a taller one is reduced by floor(H /
    cell_px) (box filter), so every frame is between cell_px and 2 * cell_px high (or H, if H is already in that
    range)."""
    if cell is None:
        return None
    video = np.asarray(cell)
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] not in (1, 3) or min(video.shape) < 1:
        raise ValueError(f"contact_grid: cell {where} has shape {tuple(np.shape(cell))}; expected a clip (T, H, W, 3), "
                         "an image (H, W, 3) or None")
    video = _as_uint8(video)
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    picks = np.unique(np.linspace(0, len(video) - 1, min(frames, len(video))).round().astype(int))
    video = video[picks]
    h = video.shape[1]
    if h < 2 * cell_px:
        factor = -(-cell_px // h)
        video = video.repeat(factor, axis=1).repeat(factor, axis=2)
    else:
        from PIL import Image

        video = np.stack([np.asarray(Image.fromarray(f).reduce(h // cell_px)) for f in video])
    k, h, w, _ = video.shape
    out = np.full((h, k * w + (k - 1) * FRAME_GAP, 3), 255, np.uint8)
    for i, frame in enumerate(video):
        out[:, i * (w + FRAME_GAP):i * (w + FRAME_GAP) + w] = frame
    return out


def _wrap(text, max_px: float, measure) -> str:
    """`text` with line breaks so that every line is at most `max_px` wide by `measure(line) -> px` (greedy by
    words; a word wider than the limit is broken between characters). Existing line breaks are kept."""
    lines = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split() or [""]:
            candidate = f"{line} {word}" if line else word
            if not line or measure(candidate) <= max_px:
                line = candidate
            else:
                lines.append(line)
                line = word
            while len(line) > 1 and measure(line) > max_px:  # one word too wide: break it
                cut = 1
                while cut < len(line) - 1 and measure(line[:cut + 1]) <= max_px:
                    cut += 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return "\n".join(lines)


def grid_figure(cells, row_labels=None, col_labels=None, *, title=None, frames: int = 4, cell_px: int = 96,
                cell_labels=None):
    """`contact_grid`'s picture as a matplotlib `Figure` (Agg canvas, nothing global touched), laid out in display
    pixels: the cells' pictures placed unscaled (`figimage`), every label wrapped to the room it has and measured
    with the renderer, so the figure is exactly as large as its content. Arguments: `contact_grid`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.transforms import IdentityTransform

    cells = [list(row) for row in cells]
    if not cells:
        raise ValueError("contact_grid: no rows (cells is empty)")
    if frames < 1 or cell_px < 1:
        raise ValueError(f"contact_grid: frames and cell_px must be >= 1, got frames={frames}, cell_px={cell_px}")
    ncols = len(col_labels) if col_labels is not None else len(cells[0])
    what = f"{len(col_labels)} column labels" if col_labels is not None else f"row 0's {ncols} cells"
    for r, row in enumerate(cells):
        if len(row) != ncols:
            raise ValueError(f"contact_grid: row {r} has {len(row)} cells but there are {ncols} columns ({what})")
    if ncols == 0:
        raise ValueError("contact_grid: no columns")
    if row_labels is not None and len(row_labels) != len(cells):
        raise ValueError(f"contact_grid: {len(row_labels)} row labels for {len(cells)} rows")
    if cell_labels is not None and (len(cell_labels) != len(cells) or any(len(r) != ncols for r in cell_labels)):
        raise ValueError(f"contact_grid: cell_labels must be {len(cells)} rows of {ncols} labels (None or a string "
                         f"each), got {[len(r) for r in cell_labels]} labels per row")
    pix = [[_cell_pixels(c, frames, cell_px, f"({r}, {k})") for k, c in enumerate(row)] for r, row in enumerate(cells)]

    fig = Figure(dpi=DPI, facecolor="white")
    renderer = FigureCanvasAgg(fig).get_renderer()
    font, bold = FontProperties(size=FONT_PT), FontProperties(size=TITLE_PT, weight="bold")

    def text(s, max_px, prop=font, **kw):  # a wrapped Text placed later, and its (width, height) in pixels
        if s is None or str(s) == "":
            return None, (0.0, 0.0)
        measure = lambda line: renderer.get_text_width_height_descent(line, prop, ismath=False)[0]
        t = fig.text(0, 0, _wrap(s, max_px, measure), fontproperties=prop, transform=IdentityTransform(), **kw)
        box = t.get_window_extent(renderer)
        return t, (box.width, box.height)

    col_w = [max([p.shape[1] for p in col if p is not None] or [cell_px]) for col in zip(*pix, strict=True)]
    img_h = [max([p.shape[0] for p in row if p is not None] or [cell_px]) for row in pix]
    rows = [text(s, ROW_LABEL_PX, ha="left", va="center") for s in (row_labels or [None] * len(cells))]
    cols = [text(s, w, ha="center", va="bottom", multialignment="center")
            for s, w in zip(col_labels or [None] * ncols, col_w, strict=True)]
    under = [[text(s, w, ha="center", va="top", multialignment="center") for s, w in zip(row, col_w, strict=True)]
             for row in (cell_labels or [[None] * ncols] * len(cells))]
    label_w = max(w for _, (w, _) in rows)
    left = MARGIN + (label_w + GAP if label_w else 0)
    width = left + sum(col_w) + GAP * (ncols - 1) + MARGIN
    head, (_, title_h) = text(title, width - 2 * MARGIN, bold, ha="left", va="top")
    header_h = max(h for _, (_, h) in cols)
    under_h = [max(h for _, (_, h) in row) for row in under]
    row_h = [max(ih + (uh + 4 if uh else 0), lh) for ih, uh, (_, (_, lh)) in zip(img_h, under_h, rows, strict=True)]
    top = MARGIN + (title_h + GAP if title_h else 0) + (header_h + 4 if header_h else 0)
    height = top + sum(row_h) + GAP * (len(cells) - 1) + MARGIN
    width, height = int(np.ceil(width)), int(np.ceil(height))
    fig.set_size_inches((width + 0.25) / DPI, (height + 0.25) / DPI)  # Agg truncates the pixel size

    if head is not None:
        head.set_position((MARGIN, height - MARGIN))
    x0 = [left + sum(col_w[:k]) + GAP * k for k in range(ncols)]
    for k, (t, _) in enumerate(cols):
        if t is not None:
            t.set_position((x0[k] + col_w[k] / 2, height - (top - 4)))
    y = top  # from the top
    for r in range(len(cells)):
        label, _ = rows[r]
        if label is not None:
            label.set_position((MARGIN, height - (y + row_h[r] / 2)))
        for k, p in enumerate(pix[r]):
            if p is not None:
                xo = int(x0[k] + (col_w[k] - p.shape[1]) // 2)
                fig.figimage(p, xo=xo, yo=height - y - p.shape[0], origin="upper")
            t, _ = under[r][k]
            if t is not None:
                t.set_position((x0[k] + col_w[k] / 2, height - (y + img_h[r] + 4)))
        y += row_h[r] + GAP
    return fig


def render(fig) -> np.ndarray:
    """A figure with an Agg canvas drawn into a uint8 RGB array (H, W, 3)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def contact_grid(cells, row_labels, col_labels, *, title: str | None = None, frames: int = 4, cell_px: int = 96,
                 cell_labels=None) -> np.ndarray:
    """A grid of clips for people: one row per subject / prompt / clip, one column per motion / stage.

    `cells`: rows (lists of equal length), each cell a clip (T, H, W, 3), an image (H, W, 3) or None (left empty);
    uint8, or floats in [-1, 1]. Each cell shows up to `frames` evenly spaced frames side by side, each enlarged by
    an integer factor with nearest-neighbour so that it is at least `cell_px` high (32 px frames at 96: 3x3 blocks;
    frames taller than 2 * `cell_px` are reduced by an integer factor instead). `row_labels` (one per row) are
    written on the left, `col_labels` (one per column) on top, `cell_labels` (optional, rows of strings or None)
    under each cell, `title` above all; every label is wrapped to the room it has and the picture grows to hold it,
    so nothing is cut off. Labels may be None (none drawn). -> uint8 RGB (height, width, 3).

    Raises ValueError, naming the culprit, for no rows, rows of another length than the column labels (or than the
    first row), label counts that do not match, and cells of another shape."""
    return render(grid_figure(cells, row_labels, col_labels, title=title, frames=frames, cell_px=cell_px,
                              cell_labels=cell_labels))


def contact_sheet(videos, captions=None, cell: int = 96, max_frames: int = 8) -> np.ndarray:
    """One row per clip (`contact_grid` with one column): up to `max_frames` evenly spaced frames, enlarged to at
    least `cell` pixels high, the caption on the left. `videos`: uint8 (T, H, W, 3) arrays (or floats in [-1, 1]).
    -> uint8 image."""
    videos = list(videos)
    if not videos:
        raise ValueError("contact_sheet: no clips")
    return contact_grid([[v] for v in videos], captions, None, frames=max_frames, cell_px=cell)


def save_png(path: str | os.PathLike, image: np.ndarray) -> epath.Path:
    """Write a uint8 image as PNG, never half-written (`utils.files.atomic_path`); `path` local or in an object
    store."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image)).save(tmp, format="PNG")
    return epath.Path(path)
