"""The VAE against diffusers `AutoencoderKL`, the 2D resnet/sampling layers against diffusers `ResnetBlock2D`,
`Downsample2D` and `Upsample2D`, and the `vae` conversion both ways (including legacy attention names).

Parity tolerance everywhere: max|ours - diffusers| / max|diffusers| <= 1e-4 in float32, on random weights
moved away from their initial values (norm scales != 1, biases != 0).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from flax import traverse_util
from helpers import rel_err
from safetensors.torch import save_file

from magdiff_jax.convert import ConversionError, load_torch, save_torch
from magdiff_jax.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.vae import AutoencoderKLConfig, kl_divergence

TOL = 1e-4

TORCH_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.3,  # not the default: it must come from the config
    shift_factor=0.05,
)




def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def perturb_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# --- AutoencoderKL ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**TORCH_CONFIG).eval()
    perturb_(model, 1)
    folder = tmp_path_factory.mktemp("vae") / "torch"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def loaded(torch_vae):
    _, folder = torch_vae
    return load_torch("vae", folder)


@pytest.fixture(scope="module")
def fns(loaded):
    module, _ = loaded
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    return encode, decode


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(2)
    return torch.rand((2, 3, 32, 32), generator=g) * 2 - 1


@pytest.fixture(scope="module")
def torch_posterior(torch_vae, images):
    model, _ = torch_vae
    with torch.no_grad():
        dist = model.encode(images).latent_dist
        kl = dist.kl().numpy()
    return nchw_to_nhwc(dist.mean), nchw_to_nhwc(dist.logvar), kl


def test_encode_parity(loaded, fns, images, torch_posterior):
    """diffusers AutoencoderKL.encode -> latent_dist.mean / .logvar / .kl(); tolerance 1e-4 relative, fp32."""
    _, params = loaded
    encode, _ = fns
    mean, logvar = encode(params, jnp.asarray(nchw_to_nhwc(images)))
    ref_mean, ref_logvar, ref_kl = torch_posterior
    assert mean.shape == (2, 16, 16, 4) and logvar.shape == (2, 16, 16, 4)
    e_mean, e_logvar = rel_err(mean, ref_mean), rel_err(logvar, ref_logvar)
    e_kl = rel_err(kl_divergence(mean, logvar), ref_kl)
    print(f"vae encode mean rel err {e_mean:.2e}, logvar rel err {e_logvar:.2e}, kl rel err {e_kl:.2e}")
    assert e_mean <= TOL and e_logvar <= TOL and e_kl <= TOL


def test_decode_parity(torch_vae, loaded, fns):
    """diffusers AutoencoderKL.decode(z).sample; tolerance 1e-4 relative (fp32)."""
    model, _ = torch_vae
    _, params = loaded
    _, decode = fns
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = nchw_to_nhwc(model.decode(z).sample)
    out = decode(params, jnp.asarray(nchw_to_nhwc(z)))
    err = rel_err(out, ref)
    print(f"vae decode rel err {err:.2e}")
    assert out.shape == (2, 32, 32, 3)
    assert err <= TOL


def test_config_from_checkpoint(loaded, tmp_path):
    """scaling_factor / shift_factor come from config.json (non-default values) and are written back."""
    module, params = loaded
    assert module.config.scaling_factor == 0.3
    assert module.config.shift_factor == 0.05
    assert module.config.block_out_channels == (32, 64)
    assert module.config.downsample_factor == 2
    out = save_torch("vae", module, params, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["_class_name"] == "AutoencoderKL"
    assert written["scaling_factor"] == 0.3 and written["shift_factor"] == 0.05
    assert "attention_impl" not in written and "dtype" not in written


def test_round_trip(torch_vae, loaded, tmp_path):
    """save_torch -> diffusers AutoencoderKL.from_pretrained: same keys, bit-identical tensors, config."""
    model, _ = torch_vae
    module, params = loaded
    out = save_torch("vae", module, params, tmp_path / "export")
    back = TorchAutoencoderKL.from_pretrained(out)
    ref, got = model.state_dict(), back.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    for k, v in TORCH_CONFIG.items():
        want = list(v) if isinstance(v, tuple) else v
        got_v = back.config[k]
        assert (list(got_v) if isinstance(got_v, tuple) else got_v) == want, k


def _legacy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in model.state_dict().items():
        for new, old in renames.items():
            tag = f".attentions.0.{new}."
            if tag in k:
                k = k.replace(tag, f".attentions.0.{old}.")
                if k.endswith(".weight"):
                    v = v[:, :, None, None]  # stored as 1x1-conv weights, as in the original LDM checkpoints
        state[k] = v.contiguous()
    return state


def test_legacy_attention_names(torch_vae, loaded, fns, images, torch_posterior, tmp_path):
    """A file with legacy query/key/value/proj_attn names ((C, C, 1, 1) weights) loads to the same parameters
    and the same encode output as diffusers AutoencoderKL (tolerance 1e-4 relative, fp32)."""
    model, folder = torch_vae
    _, params = loaded
    state = _legacy_state(model)
    assert any(".attentions.0.proj_attn.weight" in k for k in state)
    assert not any(".to_q." in k for k in state)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folder / "config.json", legacy / "config.json")
    save_file(state, str(legacy / "diffusion_pytorch_model.safetensors"))

    _, legacy_params = load_torch("vae", legacy)
    flat, flat_legacy = traverse_util.flatten_dict(params), traverse_util.flatten_dict(legacy_params)
    assert set(flat) == set(flat_legacy)
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat_legacy[k]), np.asarray(flat[k]), err_msg="/".join(k))

    encode, _ = fns
    mean, _ = encode(legacy_params, jnp.asarray(nchw_to_nhwc(images)))
    err = rel_err(mean, torch_posterior[0])
    print(f"vae legacy-names encode mean rel err {err:.2e}")
    assert err <= TOL


def test_missing_key_is_reported(torch_vae, tmp_path):
    model, folder = torch_vae
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["decoder.mid_block.attentions.0.to_v.bias"]
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    save_file(state, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=r"decoder\.mid_block\.attentions\.0\.to_v\.bias"):
        load_torch("vae", bad)


def test_sample_posterior(loaded):
    """__call__ with sample_posterior draws mean + std * eps with the given key, and needs one."""
    module, params = loaded
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="key"):
        module.apply({"params": params}, x, sample_posterior=True)
    mean, logvar = jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 2 * np.log(0.5))
    key = jax.random.key(0)
    z = module.sample_latent(mean, logvar, key)
    np.testing.assert_allclose(np.asarray(z), 0.5 * np.asarray(jax.random.normal(key, mean.shape)), rtol=1e-6)


def test_sd_preset():
    c = AutoencoderKLConfig.sd()
    assert c.block_out_channels == (128, 256, 512, 512) and c.layers_per_block == 2
    assert c.latent_channels == 4 and c.scaling_factor == 0.18215 and c.downsample_factor == 8
    spec = get_model("vae")
    n = sum(int(np.prod(s.shape)) for s in spec.abstract_params(spec.build(c)).values())
    assert n == 83_653_863  # diffusers' SD VAE


# --- ResnetBlock2D / Downsample2D / Upsample2D, weights copied by hand --------------------------------------
def flax_params_from_torch(module: torch.nn.Module) -> dict:
    """Copy a small torch module's parameters into the Flax tree by the plain layout conventions."""
    flat = {}
    for name, p in module.state_dict().items():
        *path, leaf = name.split(".")
        x = p.detach().numpy()
        if leaf == "weight" and x.ndim == 4:
            flat[(*path, "kernel")] = np.transpose(x, (2, 3, 1, 0))
        elif leaf == "weight" and x.ndim == 2:
            flat[(*path, "kernel")] = x.T
        elif leaf == "weight":
            flat[(*path, "scale")] = x
        else:
            flat[(*path, leaf)] = x
    return traverse_util.unflatten_dict(flat)


RESNET_CASES = {
    "default": dict(
        torch=dict(
            in_channels=16,
            out_channels=32,
            temb_channels=24,
            groups=4,
            groups_out=8,
            eps=1e-5,
            non_linearity="silu",
            output_scale_factor=2.0,
        ),
        ours=dict(
            in_channels=16,
            out_channels=32,
            temb_channels=24,
            groups=4,
            groups_out=8,
            eps=1e-5,
            non_linearity="silu",
            output_scale_factor=2.0,
        ),
    ),
    "scale_shift": dict(
        torch=dict(
            in_channels=16,
            out_channels=16,
            temb_channels=24,
            groups=4,
            eps=1e-6,
            non_linearity="mish",
            time_embedding_norm="scale_shift",
            skip_time_act=True,
            use_in_shortcut=True,
            conv_shortcut_bias=False,
        ),
        ours=dict(
            in_channels=16,
            out_channels=16,
            temb_channels=24,
            groups=4,
            eps=1e-6,
            non_linearity="mish",
            time_embedding_norm="scale_shift",
            skip_time_act=True,
            use_in_shortcut=True,
            conv_shortcut_bias=False,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_resnet_block_parity(case):
    """diffusers ResnetBlock2D with a time embedding; tolerance 1e-4 relative (fp32)."""
    cfg = RESNET_CASES[case]
    torch.manual_seed(4)
    ref_block = TorchResnetBlock2D(**cfg["torch"]).eval()
    perturb_(ref_block, 5)
    x = torch.randn(2, 16, 9, 7)
    temb = torch.randn(2, 24)
    with torch.no_grad():
        ref = nchw_to_nhwc(ref_block(x, temb))
    block = ResnetBlock2D(**cfg["ours"])
    params = flax_params_from_torch(ref_block)
    out = block.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(temb.numpy()))
    err = rel_err(out, ref)
    print(f"ResnetBlock2D[{case}] rel err {err:.2e}")
    assert err <= TOL
    assert set(traverse_util.flatten_dict(params)) == set(
        traverse_util.flatten_dict(
            block.init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 24)))["params"]
        )
    )


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_parity(padding):
    """diffusers Downsample2D(use_conv=True, padding=0|1) on odd and even sizes; tolerance 1e-4 relative."""
    torch.manual_seed(6)
    ref_layer = TorchDownsample2D(8, use_conv=True, out_channels=12, padding=padding, name="op").eval()
    perturb_(ref_layer, 7)
    params = {"conv": flax_params_from_torch(ref_layer)["conv"]}
    layer = Downsample2D(12, padding=padding)
    for hw in ((9, 8), (8, 6)):
        x = torch.randn(2, 8, *hw)
        with torch.no_grad():
            ref = nchw_to_nhwc(ref_layer(x))
        out = layer.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)))
        err = rel_err(out, ref)
        print(f"Downsample2D(padding={padding}) {hw} rel err {err:.2e}")
        assert err <= TOL


@pytest.mark.parametrize("output_size", [None, (9, 7), (10, 8)])
def test_upsample_parity(output_size):
    """diffusers Upsample2D(use_conv=True) by 2 and to an explicit output_size; tolerance 1e-4 relative."""
    torch.manual_seed(8)
    ref_layer = TorchUpsample2D(8, use_conv=True, out_channels=12).eval()
    perturb_(ref_layer, 9)
    x = torch.randn(2, 8, 5, 4)
    with torch.no_grad():
        ref = nchw_to_nhwc(ref_layer(x, output_size=output_size))
    layer = Upsample2D(12)
    out = layer.apply(
        {"params": flax_params_from_torch(ref_layer)}, jnp.asarray(nchw_to_nhwc(x)), output_size=output_size
    )
    err = rel_err(out, ref)
    print(f"Upsample2D(output_size={output_size}) rel err {err:.2e}")
    assert err <= TOL
