"""CLIP and DINO scores of generated videos: CLIPSIM, CLIP-I, DINO subject fidelity, and MagDiff's DAVIS text
alignment and frame consistency (PAPERS.md A.11).

    clip = CLIPEmbedder(text_module, text_params, vision_module, vision_params)   # towers with projection
    dino = DINOEmbedder(dino_module, dino_params)
    clipsim(clip, videos, input_ids)                 # (B,) mean_f cos(image_f, text)
    text_alignment(clip, videos, input_ids)          # (B,) 100 x the same (MagDiff's DAVIS "Textual-align")
    frame_consistency(clip, videos)                  # (B,) 100 x mean_f cos(image_f, image_f+1)
    clip_i(clip, videos, subject_images)             # (B,) mean_{f,k} cos(image_f, subject_k)
    dino_score(dino, videos, subject_images)         # (B,) the same with DINO's CLS features

videos (B, F, H, W, 3) and subject images (B, H, W, 3) or (B, K, H, W, 3) are RGB in [-1, 1], of any size;
input_ids (B, L) int are the CLIP tokenizer's ids of one prompt per video (`magdiff_jax.models.tokenizer`). Each
score is per video: average over videos (or report the spread) at the call site. cos(a, b) = a.b / (|a| |b|) of
CLIP's projected embeddings (`image_embeds`, `text_embeds`: transformers' `get_image_features` /
`get_text_features`), or of DINO's final-norm CLS token.

Preprocessing, as CLIP's and DINO's evaluation transforms (the images' [-1, 1] mapped to [0, 1]):
- resize the shorter side to `size` (CLIP: the vision tower's image_size, 224 for ViT-B/32; DINO: 224), bicubic
  with antialiasing (the cubic convolution with A = -0.5 stretched by the downscale factor, PIL's BICUBIC filter,
  through `jax.image.resize`), the longer side to int(size * long / short) as transformers' CLIPImageProcessor;
- clip to [0, 1] (an 8-bit image cannot overshoot), centre-crop size x size at ((h - size) // 2, (w - size) // 2);
- normalise with CLIP's mean / std, or ImageNet's for DINO.
The one difference from CLIPImageProcessor / torchvision on PIL images: PIL resamples 8-bit images in two passes
(horizontal, then vertical) and rounds to 8 bits after each, about +-1/255 per pass; here the result stays float.

Everything runs in fixed-size batches (`batch_size` images; the last batch is padded), one compiled program per
image shape and tower, pure jnp inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.eval.fingerprint import network_fingerprint
from magdiff_jax.models.dino import IMAGENET_MEAN, IMAGENET_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_SIZE = 224


def resize_shorter_side(images: jax.Array, size: int) -> jax.Array:
    """(N, H, W, C) -> (N, h, w, C) with min(h, w) = size and the other side int(size * long / short), bicubic
    with antialiasing (module docstring)."""
    n, h, w, c = images.shape
    if h <= w:
        out = (size, int(size * w / h))
    else:
        out = (int(size * h / w), size)
    if out == (h, w):
        return images
    return jax.image.resize(images, (n, *out, c), method="bicubic", antialias=True)


def centre_crop(images: jax.Array, size: int) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C), the window at ((H - size) // 2, (W - size) // 2)."""
    h, w = images.shape[1:3]
    if h < size or w < size:
        raise ValueError(f"centre crop: {size} x {size} does not fit in {h} x {w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def preprocess(images: jax.Array, size: int, mean, std) -> jax.Array:
    """(N, H, W, 3) RGB in [-1, 1] -> (N, size, size, 3): resize the shorter side, clip, centre-crop, normalise."""
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    x = jnp.clip(resize_shorter_side(x, size), 0.0, 1.0)
    x = centre_crop(x, size)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def clip_preprocess(images: jax.Array, size: int = 224) -> jax.Array:
    """CLIP's evaluation transform (module docstring) with CLIP's mean and std."""
    return preprocess(images, size, CLIP_MEAN, CLIP_STD)


def dino_preprocess(images: jax.Array, size: int = DINO_SIZE) -> jax.Array:
    """The same transform with ImageNet's mean and std, DINO's normalisation."""
    return preprocess(images, size, IMAGENET_MEAN, IMAGENET_STD)


def unit(x: jax.Array) -> jax.Array:
    """x / ||x||_2 over the last axis (float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def mean_cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, F, D) and (B, K, D) unit vectors -> (B,) the mean of a_f . b_k over every f, k."""
    return jnp.einsum("bfd,bkd->bfk", a, b, precision=jax.lax.Precision.HIGHEST).mean(axis=(1, 2))


def consecutive_cosine(e: jax.Array) -> jax.Array:
    """(B, F, D) unit vectors with F >= 2 -> (B,) the mean of e_f . e_{f+1} over f < F - 1."""
    return jnp.sum(e[:, :-1] * e[:, 1:], axis=-1).mean(axis=1)


class _Embedder:
    """Unit-normalised image features in fixed-size batches, one jitted program per image shape."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def _image_fn(self, params, images):  # (N, H, W, 3) in [-1, 1] -> (N, D) unit vectors
        raise NotImplementedError

    def images(self, images) -> jax.Array:
        """(N, H, W, 3) RGB in [-1, 1] -> (N, D) unit-normalised features."""
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (N, H, W, 3) RGB in [-1, 1], got shape {images.shape}")
        n, bs = images.shape[0], self.batch_size
        out = []
        for start in range(0, n, bs):
            chunk = images[start:start + bs]
            pad = bs - chunk.shape[0]
            if pad:
                chunk = jnp.concatenate([chunk, jnp.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out.append(self._jitted_images(self._image_params, chunk)[:bs - pad])
        return jnp.concatenate(out)

    def videos(self, videos) -> jax.Array:
        """(B, F, H, W, 3) -> (B, F, D): every frame's features."""
        videos = jnp.asarray(videos)
        if videos.ndim != 5:
            raise ValueError(f"expected videos (B, F, H, W, 3) RGB in [-1, 1], got shape {videos.shape}")
        b, f = videos.shape[:2]
        return self.images(videos.reshape(b * f, *videos.shape[2:])).reshape(b, f, -1)

    def subjects(self, images) -> jax.Array:
        """(B, H, W, 3) or (B, K, H, W, 3) subject images -> (B, K, D)."""
        images = jnp.asarray(images)
        return self.videos(images[:, None] if images.ndim == 4 else images)


class CLIPEmbedder(_Embedder):
    """CLIP's joint-space embeddings from the Flax towers (`magdiff_jax.models.clip`, converted with
    `load_torch("clip_text" / "clip_vision", ...)` from CLIPTextModelWithProjection / CLIPVisionModelWithProjection
    folders): `images` gives the unit `image_embeds` of the preprocessed frames, `texts` the unit `text_embeds`. The
    text tower may be None for the image-only scores (CLIP-I, frame consistency)."""

    def __init__(self, text_module, text_params, vision_module, vision_params, batch_size: int = 32):
        super().__init__(batch_size)
        if not vision_module.config.with_projection or (text_module is not None
                                                        and not text_module.config.with_projection):
            raise ValueError("CLIP scores compare projected embeddings: the towers need with_projection=True "
                             "(CLIPTextModelWithProjection / CLIPVisionModelWithProjection weights)")
        if text_module is not None and text_module.config.projection_dim != vision_module.config.projection_dim:
            raise ValueError(f"the text tower projects to {text_module.config.projection_dim} dimensions and the "
                             f"vision tower to {vision_module.config.projection_dim}: not one CLIP model")
        self.text_module, self.text_params, self.vision_module = text_module, text_params, vision_module
        self._image_params = vision_params
        towers = (vision_module, vision_params) + ((text_module, text_params) if text_module is not None else ())
        self.fingerprint = network_fingerprint(*towers)  # caches of scores are keyed on it
        size = vision_module.config.image_size

        def image_fn(params, images):
            return unit(vision_module.apply({"params": params}, clip_preprocess(images, size)).image_embeds)

        self._jitted_images = jax.jit(image_fn)
        if text_module is not None:
            self._jitted_texts = jax.jit(lambda p, ids: unit(text_module.apply({"params": p}, ids).text_embeds))

    def texts(self, input_ids) -> jax.Array:
        """(B, L) int token ids -> (B, D) unit-normalised text embeddings."""
        if self.text_module is None:
            raise ValueError("this CLIPEmbedder has no text tower")
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"expected token ids (B, L), got shape {input_ids.shape}")
        return self._jitted_texts(self.text_params, jnp.asarray(input_ids, jnp.int32))


class DINOEmbedder(_Embedder):
    """DINO's CLS features (`magdiff_jax.models.dino.DINOViT`, unit-normalised) of images preprocessed at `size`."""

    def __init__(self, module, params, size: int = DINO_SIZE, batch_size: int = 32):
        super().__init__(batch_size)
        self.module, self._image_params = module, params
        self.fingerprint = f"{network_fingerprint(module, params)}-{size}"
        self._jitted_images = jax.jit(lambda p, x: unit(module.apply({"params": p}, dino_preprocess(x, size))))


def _check_batch(videos, other, what: str) -> None:
    if np.shape(other)[0] != np.shape(videos)[0]:
        raise ValueError(f"{np.shape(videos)[0]} videos but {np.shape(other)[0]} {what}: one per video")


def clipsim(clip: CLIPEmbedder, videos, input_ids, scale: float = 1.0) -> jax.Array:
    """CLIPSIM: (B,) the mean over frames of the cosine between each frame's and its video's prompt's CLIP
    embeddings, times `scale` (100 for the x100 form)."""
    _check_batch(videos, input_ids, "prompts")
    return scale * mean_cosine(clip.videos(videos), clip.texts(input_ids)[:, None])


def text_alignment(clip: CLIPEmbedder, videos, input_ids) -> jax.Array:
    """MagDiff's DAVIS "Textual-align": CLIP text-frame similarity x 100, the mean over frames (= clipsim x 100)."""
    return clipsim(clip, videos, input_ids, scale=100.0)


def frame_consistency(clip: CLIPEmbedder, videos) -> jax.Array:
    """MagDiff's DAVIS "Frame-consistency": (B,) 100 x the mean CLIP image cosine of consecutive frames (a video of
    identical frames scores 100). Needs at least two frames."""
    if np.shape(videos)[1] < 2:
        raise ValueError(f"frame consistency compares consecutive frames: got videos of {np.shape(videos)[1]} frame")
    return 100.0 * consecutive_cosine(clip.videos(videos))


def clip_i(clip: CLIPEmbedder, videos, subject_images) -> jax.Array:
    """CLIP-I subject fidelity: (B,) the mean cosine between every frame's and every subject image's CLIP image
    embeddings (subject_images (B, H, W, 3) or (B, K, H, W, 3))."""
    _check_batch(videos, subject_images, "subject image sets")
    return mean_cosine(clip.videos(videos), clip.subjects(subject_images))


def dino_score(dino: DINOEmbedder, videos, subject_images) -> jax.Array:
    """DINO subject fidelity: (B,) the mean cosine between every frame's and every subject image's DINO CLS
    features."""
    _check_batch(videos, subject_images, "subject image sets")
    return mean_cosine(dino.videos(videos), dino.subjects(subject_images))
