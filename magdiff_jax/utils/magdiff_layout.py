"""The on-disk layout of a MagDiff PyTorch export (`convert.magdiff`), shared by the JAX converter and the PyTorch
port (`torch_port`), which must not import JAX: plain constants only."""

FORMAT = "magdiff_torch"
FORMAT_VERSION = 1
META_FILE = "magdiff.json"
UNET_DIR = "unet"
IP_ADAPTER_FILE = "ip_adapter.safetensors"
PYRAMID_FILE = "entity_pyramid.safetensors"
PYRAMID_LAYERS = ("scale_0", "scale_1", "fuse", "scale_2", "proj_out")
SCALARS = ("text_scale", "image_scale")  # () in Flax, (1,) in the file and in PyTorch
IMAGE_TOKEN_MODES = ("all", "own_and_first")  # which image tokens each frame attends to (models.unet3d)
