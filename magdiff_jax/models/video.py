"""What the video U-Nets share around their blocks: input checks and per-frame conditioning."""

from __future__ import annotations

import jax.numpy as jnp

from magdiff_jax.layers.embeddings import TimestepEmbedding, timestep_embedding


def check_video_inputs(sample, encoder_hidden_states, in_channels: int) -> tuple[int, int, int, int]:
    """(B, F, H, W) of a (B, F, H, W, in_channels) video with one (B, L, D) text context per video."""
    if sample.ndim != 5 or sample.shape[-1] != in_channels:
        raise ValueError(f"sample must be a (B, F, H, W, {in_channels}) video, got shape {sample.shape}")
    b, f, h, w, _ = sample.shape
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
        raise ValueError(f"encoder_hidden_states must be (B={b}, L, D): one context per video, got shape "
                         f"{encoder_hidden_states.shape}")
    return b, f, h, w


def per_frame_conditioning(cfg, timesteps, encoder_hidden_states, num_frames: int, timestep_cond, dt):
    """The time embedding (one per video, as the `time_embedding` submodule of the calling model) and the text
    context, each repeated per frame, frame-major within each video as diffusers: (B*F, T), (B*F, L, D).
    Call it from inside the video U-Net's `__call__`."""
    b = encoder_hidden_states.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
    emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, cond_proj_dim=cfg.time_cond_proj_dim, dtype=dt,
                            name="time_embedding")(t_emb.astype(dt or jnp.float32), timestep_cond)
    emb = jnp.repeat(emb, num_frames, axis=0)
    context = jnp.repeat(encoder_hidden_states.astype(dt), num_frames, axis=0)
    return emb, context
