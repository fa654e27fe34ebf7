"""magdiff_jax: MagDiff and MagicVideo-V2 in JAX/Flax.

The layering, top to bottom:

    cli                 the `magdiff-jax` command
    demo                the end-to-end demo
    train/              the one trainer, tasks, parameter groups
    pipelines/  eval/   inference from stage exports (generation, editing)  |  metrics (PSNR, SSIM, LPIPS)
    data/  convert/     sources, Grain, TFDS  |  PyTorch mapping tables and safetensors, attached to registered models
    export/  cpu/       one model or a whole stage on disk (Orbax + JSON)  |  the CPU tuning, switched on once
    models/             the registry (name -> config, builder, example inputs) and the models
    layers/  diffusion/  sharding  distributed
                        building blocks  |  schedules, samplers, losses  |  mesh and logical axes  |  processes
                        (multi-host start-up, barriers, the agreed stop)
    utils/              files, images, errors, FLOPs, PRNG

Each line imports only lines below it (tests/test_layering.py reads every import statement and checks this, and that
no two packages or modules import each other in a cycle). torch_port/ (PyTorch modules that run our exports)
imports utils/ alone, and nothing in the package imports it or PyTorch.

Importing the package switches nothing on: the CPU tuning (`magdiff_jax.cpu`) is enabled by the CLI, by the trainer
on a CPU backend, or by one call (`magdiff_jax.cpu.enable()`).
"""
