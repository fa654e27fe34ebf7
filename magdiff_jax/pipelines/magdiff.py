"""MagDiff generation and editing: subject image(s) + text -> video, as pure functions of models and params.

    models = {"unet": MagDiffUNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
              "image_encoder": CLIPVisionModel}       (and params with the same keys)
    cond = subject_condition(models, params, subject, sizes=..., image_layer=-1)   # entity latents + CLIP tokens
    video = generate(models, params, tokens=..., null_tokens=..., cond=cond, key=..., num_frames=16,
                     latent_size=(32, 32))                                 # (B, F, H, W, 3) in [-1, 1]

The subject comes from the data pipeline's loader (`data.transforms.subject_inputs`): `subject_<size>` (B, F, s, s, 3)
for each pyramid size, largest first, and `subject_clip` (B, F, 224, 224, 3), all in the model's ranges (pixels in
[-1, 1], CLIP mean/std); frames without a subject are black. Generation gives the first frame's subject (the other
frames black), editing every frame's (the region to keep), exactly as in training (PAPERS.md A.3, A.10).

Sampling (PAPERS.md A.9): DDIM (eta 0) with classifier-free guidance. `image_guidance=None` (the paper's code) guides
on the text only: the unconditional pass keeps the same image tokens and entity latents and drops the text. With
`image_guidance=s_I` the two-scale guidance of InstructPix2Pix is used, the subject dropped as in training (black
subject images): e(0, 0) + s_I [e(c_I, 0) - e(0, 0)] + s_T [e(c_I, c_T) - e(c_I, 0)]; a stage trained without
subject dropout (`data.subject.probs.none` 0 in its config) has never seen that input, and `MagDiffPipeline` refuses
it. The denoising loop is one `lax.scan`; every pass of a step runs as one batch.

The unconditional text is `negative_prompt`, "" by default: the caption dropout of training (A.8) replaces captions
with "", so the empty prompt is the unconditional input the model learnt; the paper's evaluator may add "watermark"
(A.9), which `negative_prompt="watermark"` (`--negative-prompt watermark`) reproduces. The initial noise is i.i.d.
by default (A.9); `noise=("mixed" | "progressive", alpha)` draws PYoCo's correlated frame noise instead
(`diffusion.noise_prior.frame_noise`, the I2V prior's, with the standard deviations PYoCo defines where the
paper's code passes variances).

Editing with `init_video` and `strength` < 1 starts from the source video's latents inverted with DDIM (the text
unconditioned, the subject kept) up to the step `strength` of the way, and denoises from there; strength 1 starts
from noise (the paper's tuning-free setting).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion import DDIMInverseSampler, DDIMSampler, ScheduleConfig, sample_loop
from magdiff_jax.diffusion.noise_prior import CORRELATIONS, frame_noise
from magdiff_jax.models.magdiff import black_subject, image_layer_of, subject_condition, subject_keys
from magdiff_jax.models.vae import decode_video, encode_video
from magdiff_jax.pipelines.guided import StagePipeline, guided_denoiser, per_example_jit


def generate(models, params, *, tokens, null_tokens, cond: dict, key, num_frames: int, latent_size,
             schedule: ScheduleConfig, num_steps: int = 50, guidance: float = 7.5, image_guidance: float | None = None,
             null_cond: dict | None = None, init_video=None, strength: float = 1.0,
             noise: tuple[str, float] = ("iid", 0.0), progress=None):
    """A batch of videos (B, F, H, W, 3) in [-1, 1] (module docstring). tokens / null_tokens (B, L): the prompts
    and the unconditional (negative) prompt; cond: `subject_condition` of the subjects; null_cond: that of
    `black_subject` (needed with image_guidance); init_video (B, F, H, W, 3) with strength < 1: start from its DDIM
    inversion; noise: (correlation, alpha) of the initial noise over the frames (`frame_noise`: "iid", or PYoCo's
    "mixed" / "progressive" with alpha >= 0), scaled by the sampler's `init_noise_sigma`.
    progress: a host function called with each denoising step's index as it finishes (`jax.debug.callback`; under
    `vmap` once per example)."""
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    b = tokens.shape[0]
    text_ctx = text.apply({"params": params["text_encoder"]}, tokens).last_hidden_state
    null_ctx = text.apply({"params": params["text_encoder"]}, null_tokens).last_hidden_state
    eps = guided_denoiser(lambda x, t, ctx, **c: unet.apply({"params": params["unet"]}, x, t, ctx, **c),
                          text_ctx, null_ctx, cond, guidance=guidance, image_guidance=image_guidance,
                          null_cond=null_cond)

    sampler = DDIMSampler(schedule)
    state = sampler.set_timesteps(num_steps)
    shape = (b, num_frames, *latent_size, unet.config.latent_channels)
    start = 0
    if init_video is not None and strength < 1.0:
        start = min(round(num_steps * (1.0 - strength)), num_steps - 1)
        x = _invert(models, params, encode_video(vae, params["vae"], init_video), cond, null_ctx, schedule,
                    num_steps, num_steps - start)
    else:
        x = initial_noise(key, shape, noise) * state.init_noise_sigma
    x = sample_loop(sampler, state, eps, x, start=start, callback=progress)
    return decode_video(vae, params["vae"], x)


def initial_noise(key, shape, noise: tuple[str, float] = ("iid", 0.0)) -> jax.Array:
    """The initial noise (B, F, h, w, c), unit variance per element: i.i.d. (the paper's default, A.9; the same draw
    as `jax.random.normal(key, shape)`) or PYoCo's "mixed" / "progressive" frame correlation with alpha
    (`noise_prior.frame_noise`)."""
    kind, alpha = noise
    return frame_noise(key, shape, kind, alpha, jnp.float32)


def _invert(models, params, latents, cond, null_ctx, schedule, num_steps: int, steps: int):
    """DDIM inversion of clean latents through the first `steps` of `num_steps` (text unconditioned, subject
    kept): the latents at the timestep the sampler's step `num_steps - steps` starts from."""
    unet = models["unet"]
    inverse = DDIMInverseSampler(schedule)
    state = inverse.set_timesteps(num_steps)

    def eps(x, t):
        return unet.apply({"params": params["unet"]}, x, jnp.full((x.shape[0],), t), null_ctx, **cond)

    return sample_loop(inverse, state, eps, latents, stop=steps)


def subject_dropout(config) -> float:
    """The probability a MagDiff stage trained without a subject: its training config's `data.subject.probs.none`
    (0 where the config has none)."""
    probs = (config.get("data") or {}).get("subject", {}).get("probs") or {}
    return float(probs.get("none", 0.0))


def check_image_guidance(config, image_guidance: float | None, where) -> None:
    """Two-scale guidance drops the subject (black subject images) in one pass: refused, saying why, for a stage
    whose training `config` had no subject dropout (its "no subject" input never trained). `where` names the
    stage in the message."""
    if image_guidance is not None and subject_dropout(config) <= 0:
        raise ValueError(
            f"{where}: --image-guidance {image_guidance} needs a model trained with subject dropout, and this "
            "stage's config has data.subject.probs.none = 0: its \"no subject\" input (black subject images) never "
            "trained, so guidance away from it pushes in an arbitrary direction. Sample without image guidance "
            "(text-only guidance, as the paper's code), or train with data.subject.probs.none > 0 "
            "(configs/magdiff.py:base uses 0.05)")


def read_subject(image, mask=None):
    """The inputs of generation, read before a model loads: a subject image (PNG/JPEG/WebP/BMP, local or in an object
    store) -> (H, W, 3) uint8, and its mask (non-zero inside the subject) -> (H, W) uint8, or None (no mask: the
    whole image). An unreadable file, or a mask of another size than the image, is an error naming the file."""
    from magdiff_jax.data.video_io import read_image

    subject = read_image(image)
    masks = read_image(mask, mode="L") if mask else None
    if masks is not None and masks.shape != subject.shape[:2]:
        raise ValueError(f"{mask}: the mask is {masks.shape[1]}x{masks.shape[0]}, the subject image {image} is "
                         f"{subject.shape[1]}x{subject.shape[0]}")
    return subject, masks


def read_edit_source(video, masks, num_frames: int):
    """The inputs of editing, read before a model loads: the first `num_frames` frames of the source video (mp4, webm,
    mov or a folder of frames) -> (T, H, W, 3) uint8, and the masks of the region to keep (a folder of PNGs or a mask
    video, non-zero inside; resized to the frames) -> (T, H, W) uint8. A source with fewer frames, or an unreadable
    one, is an error naming the file."""
    from magdiff_jax.data.video_io import read_frames

    frames = read_frames(video, indices=range(num_frames))
    return frames, read_frames(masks, indices=range(num_frames), resize=frames.shape[1:3], gray=True)


class MagDiffPipeline(StagePipeline):
    """Generation and editing from a MagDiff stage (`magdiff-jax sample` / `magdiff-jax edit`): its export, or a
    training workdir exported on the fly (`export.load_stage`).

        pipe = MagDiffPipeline.load("/tmp/magdiff_tiny")                       # or /tmp/magdiff_tiny/export
        image, mask = read_subject("dog.png", "dog_mask.png")                 # (H, W, 3), (H, W) uint8
        ex = pipe.example(image[None], mask[None], "a red square moves left", mode="first")   # one subject image
        videos = pipe([ex, ex], seeds=[0, 1])                                 # (2, F, H, W, 3) uint8
        frames, masks = read_edit_source("in.mp4", "masks/", pipe.num_frames)  # editing: the region to keep
        edited = pipe([pipe.example(frames, masks, "a dog swims", mode="all")], seeds=[0], strength=0.8)

    An example is what the training loader makes of a clip (resize, centre crop, subject inputs, tokens), built by
    the same loader from in-memory frames; mode "first" keeps the first frame's subject (generation), "all" every
    frame's (editing). A batch is split over the devices when it divides evenly.
    """

    TASK, NAME, REQUIRED = "magdiff", "a MagDiff", ("unet", "vae", "text_encoder", "image_encoder")

    @property
    def num_frames(self) -> int:
        return int(self.config.data.num_frames)

    def example(self, frames, masks, prompt: str, mode: str = "first") -> dict:
        """frames (T, H, W, 3) uint8 (T=1: one subject image, repeated over the frames), masks (T, H, W) (non-zero:
        subject; None: the whole image) -> one host example."""
        import numpy as np

        from magdiff_jax.data.pipeline import loader_spec
        from magdiff_jax.data.transforms import load_example

        frames = np.asarray(frames, np.uint8)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape}")
        masks = np.full(frames.shape[:3], 255, np.uint8) if masks is None else np.asarray(masks)
        if masks.shape != frames.shape[:3]:
            raise ValueError(f"masks {masks.shape} do not match the frames {frames.shape[:3]}")
        if len(frames) == 1:
            frames = np.repeat(frames, self.num_frames, axis=0)
            masks = np.repeat(masks, self.num_frames, axis=0)
        if len(frames) < self.num_frames:
            raise ValueError(f"{len(frames)} frames given; the model makes {self.num_frames}")
        data = self.config.data.copy_and_resolve_references()
        data.subject.eval_mode = mode
        data.tokenizer = self.stage.tokenizer_folder()
        data.normalize, data.stride = False, 1
        spec = loader_spec(data, train=False)
        record = {"key": "input", "video": frames, "mask": (masks > 0).astype(np.uint8) * 255, "caption": prompt,
                  "frames": None, "fps": None}
        return load_example(record, spec, np.random.default_rng(0))

    def check_image_guidance(self, image_guidance: float | None) -> None:
        """Refuses two-scale guidance on a stage trained without subject dropout (`check_image_guidance`)."""
        check_image_guidance(self.config, image_guidance, getattr(self.stage, "path", "the stage"))

    def __call__(self, examples: list[dict], seeds, *, num_steps: int = 50, guidance: float = 7.5,
                 image_guidance: float | None = None, strength: float = 1.0, negative_prompt: str = "",
                 noise: tuple[str, float] = ("iid", 0.0), progress: bool = False):
        """Videos (N, F, H, W, 3) uint8 for the examples (their prompts and subjects), one seed each. strength < 1
        starts from the DDIM inversion of each example's own video (editing). negative_prompt: the unconditional
        text of guidance ("": the caption dropout's; the paper's evaluator may use "watermark"); noise:
        (correlation, alpha) of the initial frame noise ("iid", "mixed" or "progressive"; module docstring).
        image_guidance is refused on a stage trained without subject dropout (`check_image_guidance`). progress: a
        bar of the denoising steps on stderr while the batch runs."""
        import numpy as np

        from magdiff_jax.data.transforms import normalize_example, tokenizer

        self.check_image_guidance(image_guidance)
        kind, alpha = noise
        if kind not in CORRELATIONS:
            raise ValueError(f"noise correlation must be one of {CORRELATIONS}, got {kind!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
            raise ValueError(f"noise alpha (PYoCo's correlation strength) must be a finite number >= 0, got {alpha!r}")
        cfg = self.config
        sizes = tuple(cfg.data.subject.sizes)
        keys = ("video", "tokens", *subject_keys(sizes))
        batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}
        tok = tokenizer(self.stage.tokenizer_folder(), cfg.data.max_length)
        batch["null_tokens"] = np.asarray(tok([str(negative_prompt)] * len(examples)))
        settings = (num_steps, float(guidance), image_guidance, float(strength), (str(kind), float(alpha)),
                    bool(progress))
        if settings not in self._fns:
            self._fns[settings] = self._compile(sizes, self.stage.schedule, *settings)
        return self._runner.run(self._fns[settings], self.stage.params, normalize_example(batch), seeds,
                                num_steps=num_steps, progress=progress)

    def _compile(self, sizes, schedule, num_steps, guidance, image_guidance, strength, noise, progress):
        models, image_layer = self.stage.modules, image_layer_of(self.config.task_options)
        f = models["vae"].config.downsample_factor

        def one(params, batch, key_data):  # one example: (1, ...) arrays
            cond = subject_condition(models, params, batch, sizes=sizes, image_layer=image_layer)
            null_cond = None
            if image_guidance is not None:
                null_cond = subject_condition(models, params, black_subject({k: batch[k] for k in
                                                                             subject_keys(sizes)}), sizes=sizes,
                                              image_layer=image_layer)
            video = batch["video"]
            return generate(models, params, tokens=batch["tokens"], null_tokens=batch["null_tokens"], cond=cond,
                            key=jax.random.wrap_key_data(key_data), num_frames=video.shape[1],
                            latent_size=(video.shape[2] // f, video.shape[3] // f), schedule=schedule,
                            num_steps=num_steps, guidance=guidance, image_guidance=image_guidance, null_cond=null_cond,
                            init_video=video if strength < 1.0 else None, strength=strength, noise=noise,
                            progress=self._runner.tick if progress else None)

        return per_example_jit(one)
