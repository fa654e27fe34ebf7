"""A PyTorch definition of TGAN2's `C3DVersion1UCF101` (pfnet-research/tgan2, tgan2/models/c3d/c3d_ucf101.py), the
parity peer of `magdiff_jax.models.c3d.C3D`: the same layers under the same names, written with torch.nn.

    net = TorchC3D(widths, fc_widths, num_classes, num_frames, sample_size)
    logits, fc7 = net(videos)      # videos (B, 3, T, H, W) RGB in [-1, 1], channels-first as the reference

Its state dict is the layout `magdiff_jax.convert.c3d` reads and writes: `conv1a.weight` (out, in, 3, 3, 3),
`conv1a.bias`, ..., `fc8.weight` (out, in), `fc8.bias`, and `mean` (3, T, S, S), the BGR pixel mean. The reference's
"pre" step is written out as it computes it: the fixed 1x1x1 convolution with weight 128 on the swapped channels
(RGB -> BGR, x 128), Chainer's aligned-corner bilinear resize (`interpolate(align_corners=True)`) and its Bias link
holding 128 - mean; the pools are `MaxPool3d(ceil_mode=True)`, Chainer's `cover_all`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

CONV_NAMES = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
POOLS = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2), "conv5b": (2, 2, 2)}


class TorchC3D(nn.Module):
    def __init__(self, widths=(64, 128, 256, 256, 512, 512, 512, 512), fc_widths=(4096, 4096), num_classes=101,
                 num_frames=16, sample_size=112):
        super().__init__()
        self.sample_size = sample_size
        c_in = 3
        for name, width in zip(CONV_NAMES, widths, strict=True):
            setattr(self, name, nn.Conv3d(c_in, width, 3, 1, 1))
            c_in = width
        t, s = num_frames, sample_size
        for kt, ks, _ in POOLS.values():
            t, s = -(-t // kt), -(-s // ks)
        self.fc6 = nn.Linear(widths[-1] * t * s * s, fc_widths[0])
        self.fc7 = nn.Linear(fc_widths[0], fc_widths[1])
        self.fc8 = nn.Linear(fc_widths[1], num_classes)
        self.register_buffer("mean", torch.zeros(3, num_frames, sample_size, sample_size))
        pre = torch.zeros(3, 3, 1, 1, 1)
        pre[[0, 1, 2], [2, 1, 0]] = 128.0  # output channel c reads input channel 2 - c: RGB -> BGR, x 128
        self.register_buffer("pre_weight", pre, persistent=False)

    def forward(self, x):
        n, c, t, h, w = x.shape
        x = F.conv3d(x, self.pre_weight)
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        frames = F.interpolate(frames, size=(self.sample_size,) * 2, mode="bilinear", align_corners=True)
        x = frames.reshape(n, t, c, self.sample_size, self.sample_size).transpose(1, 2)
        x = x + (128.0 - self.mean)[None]
        for name in CONV_NAMES:
            x = F.relu(getattr(self, name)(x))
            if name in POOLS:
                x = F.max_pool3d(x, POOLS[name], POOLS[name], ceil_mode=True)
        x = F.relu(self.fc6(x.flatten(1)))
        fc7 = F.relu(self.fc7(x))
        return self.fc8(fc7), fc7
