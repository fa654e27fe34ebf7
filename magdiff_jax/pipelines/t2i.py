"""Text-to-image (MagicVideo-V2 stage 1, SD-style latent diffusion): a caption -> an image.

    images = generate_images(models, params, tokens=..., null_tokens=..., key=..., latent_size=(64, 64),
                             schedule=schedule)                                  # (B, H, W, 3) in [-1, 1]
    pipe = T2IPipeline.load("runs/t2i/export")
    images = pipe(["a red square moves left"], seeds=[0])                        # (N, H, W, 3) uint8

Classifier-free guidance on the text, e(0) + s (e(c) - e(0)), both passes in one batch; the loop is one `lax.scan`
(`diffusion.sample_loop`) with DDIM (eta 0), DPM-Solver++ 2M or Euler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion import ScheduleConfig, sample_loop
from magdiff_jax.models.vae import decode_video
from magdiff_jax.pipelines.guided import StagePipeline, guided_denoiser, per_example_jit
from magdiff_jax.pipelines.i2v import make_sampler


def generate_images(models, params, *, tokens, null_tokens, key, latent_size, schedule: ScheduleConfig,
                    num_steps: int = 25, guidance: float = 7.5, sampler: str = "ddim", progress=None):
    """Images (B, H, W, 3) in [-1, 1] for token rows (B, L) and the empty prompt's (B, L); `models`: {"unet":
    unet2d, "vae", "text_encoder"}. progress: a host function called with each step's index."""
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    text_ctx = text.apply({"params": params["text_encoder"]}, tokens).last_hidden_state
    null_ctx = text.apply({"params": params["text_encoder"]}, null_tokens).last_hidden_state
    model_fn = guided_denoiser(lambda x, t, ctx: unet.apply({"params": params["unet"]}, x, t, ctx),
                               text_ctx, null_ctx, {}, guidance=guidance)
    solver = make_sampler(sampler, schedule)
    state = solver.set_timesteps(num_steps)
    noise = jax.random.normal(key, (tokens.shape[0], *latent_size, vae.config.latent_channels), jnp.float32)
    latents = sample_loop(solver, state, model_fn, noise * state.init_noise_sigma, callback=progress)
    return decode_video(vae, params["vae"], latents[:, None])[:, 0]


class T2IPipeline(StagePipeline):
    """Images from a T2I stage: its export, or a training workdir exported on the fly.

        pipe = T2IPipeline.load("runs/t2i/export")
        images = pipe(prompts, seeds=[0, 1])                     # (N, H, W, 3) uint8 at the stage's resolution

    Each prompt has its own seed; a batch is split over the devices when it divides evenly.
    """

    TASK, NAME, REQUIRED = "t2i", "a T2I", ("unet", "vae", "text_encoder")

    def __call__(self, prompts: list[str], seeds, *, size: tuple[int, int] | None = None, num_steps: int = 25,
                 guidance: float = 7.5, sampler: str = "ddim", progress: bool = False):
        """Images (N, H, W, 3) uint8, one per prompt and seed; size (H, W): default the stage's resolution, a
        multiple of the VAE's factor times the U-Net's downsampling."""
        import numpy as np

        from magdiff_jax.data.transforms import tokenizer

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds: one each")
        size = self.resolution if size is None else tuple(int(s) for s in size)
        f = self.stage.modules["vae"].config.downsample_factor
        down = 2 ** (len(self.stage.modules["unet"].config.block_out_channels) - 1)
        if size[0] % (f * down) or size[1] % (f * down):
            raise ValueError(f"the image size {size[0]}x{size[1]} must be a multiple of {f * down} (the VAE's "
                             f"factor {f} x the U-Net's downsampling {down})")
        tok = tokenizer(self.stage.tokenizer_folder(), self.config.data.max_length)
        batch = {"tokens": np.asarray(tok(list(prompts))), "null_tokens": np.asarray(tok([""] * len(prompts)))}
        settings = (size, int(num_steps), float(guidance), sampler, bool(progress))
        if settings not in self._fns:
            self._fns[settings] = self._compile(*settings)
        return self._runner.run(self._fns[settings], self.stage.params, batch, seeds, num_steps=num_steps,
                                progress=progress)

    def _compile(self, size, num_steps, guidance, sampler, progress):
        models, schedule = self.stage.modules, self.stage.schedule
        f = models["vae"].config.downsample_factor
        latent_size = (size[0] // f, size[1] // f)

        def one(params, batch, key_data):  # one example: (1, L) token rows
            return generate_images(models, params, tokens=batch["tokens"], null_tokens=batch["null_tokens"],
                                   key=jax.random.wrap_key_data(key_data), latent_size=latent_size,
                                   schedule=schedule, num_steps=num_steps, guidance=guidance, sampler=sampler,
                                   progress=self._runner.tick if progress else None)

        return per_example_jit(one)
