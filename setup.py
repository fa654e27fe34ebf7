"""magdiff_jax: JAX/Flax MagDiff and MagicVideo-V2 (training, sampling, evaluation, PyTorch export).

Install:  pip install -e .            (core: JAX on CPU, no torch)
          pip install -e ".[test]"    (adds the PyTorch parity peers and the test runners)
          pip install -e ".[cuda]"    (JAX for CUDA 13 GPUs)
          pip install -e ".[tpu]"     (JAX for TPU VMs; includes the gcs extra)
          pip install -e ".[torch]"   (reads pickle-based .bin/.ckpt weights, with torch.load(weights_only=True))
          pip install -e ".[gcs]"     (gs:// workdirs, datasets and exports, through etils.epath)
"""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "numpy==2.4.6",
    "tokenizers==0.23.3",
    "transformers==5.23.0",  # CLIPTokenizer only; its torch models are imported lazily, never by the core
    "huggingface-hub==2.4.0",
    "safetensors==0.8.0",
    "av==18.1.0",
    "imageio==2.38.1",
    "imageio-ffmpeg==0.7.0",
    "mediapy==1.2.7",
    "matplotlib==3.11.2",  # the demos' loss and metric plots
    "absl-py",
    "etils[epath]==1.15.0",  # local and cloud-storage paths (gs://...), as Orbax and TFDS reach them
]

TORCH = ["torch==2.13.0"]  # pinned: an unpinned torch pulls several GB of CUDA packages

TEST = [
    *TORCH,
    "diffusers==0.42.1",
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",  # the suite runs on 2 workers: compile-bound tests parallelise well
    "ruff",
    "tensorboardX==2.6.5",  # the official event protos, to check the TensorFlow-free event writer
    "ipykernel==7.4.0",
    "nbformat==5.11.1",
    "nbclient==0.11.0",
    "nbconvert==7.17.2",
    "papermill==2.7.0",
    "scikit-image==0.26.0",  # the reference PSNR/SSIM (tests/test_image_metrics.py)
    "einops==0.8.2",  # imported by cd-fvd (NO_DEPS_TEST); its requests, tqdm and scipy come with the packages above
]

# Parity peers installed apart, with `pip install --no-deps`: cd-fvd 0.1.1 (tests/test_fvd.py: its I3D port,
# preprocessing and Frechet distance) lists torchvision, which pip resolves to a CUDA build with its own torch that
# does not import beside the pinned CPU torch; the cd-fvd modules the tests use import torch alone.
NO_DEPS_TEST = ["cd-fvd==0.1.1"]

# etils.epath reaches gs:// through fsspec's gcsfs (no TensorFlow here); gcsfs 2026.10.1 needs fsspec>=2026.9.0
GCS = [
    "gcsfs==2026.10.1",
    "google-cloud-storage==3.17.2",
]

setup(
    name="magdiff_jax",
    version="0.1.0",
    description="JAX/Flax MagDiff and MagicVideo-V2 video diffusion, parity-proven against diffusers",
    python_requires=">=3.11",
    packages=find_packages(include=["magdiff_jax", "magdiff_jax.*"]),
    install_requires=CORE,
    extras_require={
        "test": TEST,
        "cuda": ["jax[cuda13]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2", *GCS],
        "gcs": GCS,
        "torch": TORCH,
    },
    entry_points={"console_scripts": ["magdiff-jax=magdiff_jax.cli:run"]},
)
