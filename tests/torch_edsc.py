"""A PyTorch EDSC with the released EDSC-pytorch `networks/EDSC.py` `Network`'s parameter names, layer order,
padding and upsampling, and its CUDA `FunctionDSepconv` written with torch ops (CPU), as the parity peer of
`magdiff_jax.models.edsc` in tests/test_edsc.py.

Widths are arguments (the release: `widths=(32, 64, 128, 256, 512)`, `head_channels=(64, 32)`, ks 5) so that a
tiny network runs in the tests; `depth = len(widths)` levels as the release has five.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dsepconv(frame, vertical, horizontal, offset_x, offset_y, mask):
    """The release's `FunctionDSepconv` (channels-first): frame (B, C, H + ks - 1, W + ks - 1) already padded;
    vertical, horizontal (B, ks, H, W); offset_x, offset_y, mask (B, ks*ks, H, W) -> (B, C, H, W). As in its CUDA
    kernel, `offset_x` moves the sampling position along rows and `offset_y` along columns, tap (fy, fx) reads
    offset channel fy * ks + fx, and positions and corner indices are clamped to the padded frame separately."""
    b, c, hin, win = frame.shape
    ks, h, w = vertical.shape[1:]
    half = (ks - 1) // 2
    ys = torch.arange(h, dtype=frame.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=frame.dtype).view(1, 1, w)
    flat = frame.reshape(b, c, hin * win)
    out = torch.zeros(b, c, h, w, dtype=frame.dtype)
    for fy in range(ks):
        for fx in range(ks):
            k = fy * ks + fx
            delta_x, delta_y = offset_y[:, k], offset_x[:, k]
            raw_x = delta_x + xs + fx - half + 1
            raw_y = delta_y + ys + fy - half + 1
            pos_x, pos_y = raw_x.clamp(0, win - 1), raw_y.clamp(0, hin - 1)
            left = torch.floor(raw_x).clamp(0, win - 1)
            right = (torch.floor(raw_x) + 1).clamp(0, win - 1)
            top = torch.floor(raw_y).clamp(0, hin - 1)
            bottom = (torch.floor(raw_y) + 1).clamp(0, hin - 1)

            def pixel(row, col):
                index = (row * win + col).long().view(b, 1, h * w).expand(b, c, h * w)
                return torch.gather(flat, 2, index).view(b, c, h, w)

            value = (pixel(top, left) * ((1 + (left - pos_x)) * (1 + (top - pos_y)))[:, None]
                     + pixel(top, right) * ((1 - (right - pos_x)) * (1 + (top - pos_y)))[:, None]
                     + pixel(bottom, left) * ((1 + (left - pos_x)) * (1 - (bottom - pos_y)))[:, None]
                     + pixel(bottom, right) * ((1 - (right - pos_x)) * (1 - (bottom - pos_y)))[:, None])
            out = out + value * (vertical[:, fy] * horizontal[:, fx] * mask[:, k])[:, None]
    return out


class Efficient_HetConv2d(nn.Module):  # the release's class name
    def __init__(self, in_feats, out_feats, p=4, ks=3, pad=1):
        super().__init__()
        self.conv3x3 = nn.Conv2d(in_feats, out_feats, kernel_size=ks, padding=pad, groups=p)
        self.conv1x1_ = nn.Conv2d(in_feats, out_feats, kernel_size=1, groups=p)
        self.conv1x1 = nn.Conv2d(in_feats, out_feats, kernel_size=1)

    def forward(self, x):
        return self.conv3x3(x) + self.conv1x1(x) - self.conv1x1_(x)


class Network(nn.Module):
    """The release's `Network(Generated_ks, Het_p, useBias, isMultiple)` with configurable widths."""

    def __init__(self, widths=(32, 64, 128, 256, 512), head_channels=(64, 32), ks=5, p=4, use_bias=True,
                 multiple=True):
        super().__init__()
        self.depth, self.ks, self.use_bias, self.multiple = len(widths), ks, use_bias, multiple
        n = len(widths)
        het = lambda i, o: Efficient_HetConv2d(i, o, p=p)
        basic = lambda i, o: nn.Sequential(het(i, o), nn.ReLU(), het(o, o), nn.ReLU(), het(o, o), nn.ReLU())
        up = lambda c: nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), het(c, c),
                                     nn.ReLU())
        est_in = widths[1] + (1 if multiple else 0)
        h0, h1 = head_channels

        def head(cin, cout, sigmoid=False):
            layers = [nn.Conv2d(cin, h0, 3, 1, 1), nn.ReLU(), nn.Conv2d(h0, h1, 3, 1, 1), nn.ReLU(),
                      nn.Conv2d(h1, cout, 3, 1, 1), nn.ReLU(),
                      nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                      nn.Conv2d(cout, cout, 3, 1, 1)]
            return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))

        self.moduleConv1 = nn.Sequential(nn.Conv2d(6, widths[0], 3, 1, 1), nn.ReLU(), het(widths[0], widths[0]),
                                         nn.ReLU(), het(widths[0], widths[0]), nn.ReLU())
        for level in range(1, n):
            setattr(self, f"moduleConv{level + 1}", basic(widths[level - 1], widths[level]))
        for level in range(n - 1, 0, -1):
            setattr(self, f"moduleDeconv{level + 1}", basic(widths[min(level + 1, n - 1)], widths[level]))
            setattr(self, f"moduleUpsample{level + 1}", up(widths[level]))
        for k in (1, 2):
            setattr(self, f"moduleVertical{k}", head(est_in, ks))
            setattr(self, f"moduleHorizontal{k}", head(est_in, ks))
        for name in ("moduleOffset1x", "moduleOffset1y", "moduleOffset2x", "moduleOffset2y"):
            setattr(self, name, head(est_in, ks * ks))
        self.moduleMask1 = head(est_in, ks * ks, sigmoid=True)
        self.moduleMask2 = head(est_in, ks * ks, sigmoid=True)
        if use_bias:
            self.moduleBias = head(widths[1], 3)

    def forward(self, tensors):
        first, second = tensors[0], tensors[1]
        n = self.depth
        convs = [self.moduleConv1(torch.cat([first, second], 1))]
        for level in range(1, n):
            convs.append(getattr(self, f"moduleConv{level + 1}")(F.avg_pool2d(convs[-1], 2, 2)))
        x = F.avg_pool2d(convs[-1], 2, 2)
        for level in range(n - 1, 0, -1):
            if level < n - 1:
                x = x + convs[level + 1]
            x = getattr(self, f"moduleUpsample{level + 1}")(getattr(self, f"moduleDeconv{level + 1}")(x))
        combine = x + convs[1]
        pad = [math.floor(self.ks / 2.0)] * 4
        first = F.pad(first, pad, mode="replicate")
        second = F.pad(second, pad, mode="replicate")
        if self.multiple:
            time = tensors[2]
            in1, in2 = torch.cat([combine, time], 1), torch.cat([combine, 1.0 - time], 1)
        else:
            in1 = in2 = combine
        dot1 = dsepconv(first, self.moduleVertical1(in1), self.moduleHorizontal1(in1), self.moduleOffset1x(in1),
                        self.moduleOffset1y(in1), self.moduleMask1(in1))
        dot2 = dsepconv(second, self.moduleVertical2(in2), self.moduleHorizontal2(in2), self.moduleOffset2x(in2),
                        self.moduleOffset2y(in2), self.moduleMask2(in2))
        return dot1 + dot2 + self.moduleBias(combine) if self.use_bias else dot1 + dot2


def interpolate(net: Network, first, second, t):
    """The release's `run.py` around the network: replicate-pad the bottom and right to a multiple of
    2**depth, a time map of t at half the padded size (one t per example here), run, crop back."""
    h, w = first.shape[2:]
    m = 2**net.depth
    ph, pw = math.ceil(h / m) * m - h, math.ceil(w / m) * m - w
    first = F.pad(first, [0, pw, 0, ph], mode="replicate")
    second = F.pad(second, [0, pw, 0, ph], mode="replicate")
    inputs = [first, second]
    if net.multiple:
        b = first.shape[0]
        inputs.append(torch.as_tensor(t, dtype=first.dtype).view(b, 1, 1, 1)
                      * torch.ones(b, 1, (h + ph) // 2, (w + pw) // 2))
    return net(inputs)[:, :, :h, :w]
