"""A compact 3D residual U-Net of the SHIVA-CMB kind (needs the optional ``train`` extra: torch).

Residual encoder-decoder with skip connections and a sigmoid output, sized to train on two
CPU cores: four resolution levels, ``base`` channels at full resolution doubling per level.
Any spatial size works (pooling rounds up, upsampling matches the skip's size), so the ONNX
export has dynamic spatial axes. Input and output are NCDHW with the spatial axes in the
model grid's [x, y, z] (R, A, S) order.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn import functional as F


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus a (projected) shortcut, then the activation."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels_in, channels_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm3d(channels_out)
        self.conv2 = nn.Conv3d(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm3d(channels_out)
        self.shortcut = (nn.Identity() if channels_in == channels_out
                         else nn.Conv3d(channels_in, channels_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        y = self.norm2(self.conv2(y))
        return F.leaky_relu(y + self.shortcut(x), 0.01)


class ResidualUNet3D(nn.Module):
    """Four-level residual U-Net; ``forward`` returns CMB probabilities (sigmoid)."""

    def __init__(self, base: int = 8, levels: int = 4) -> None:
        super().__init__()
        widths = [base * 2 ** level for level in range(levels)]
        self.encoders = nn.ModuleList(
            ResidualBlock(1 if level == 0 else widths[level - 1], widths[level]) for level in range(levels))
        self.decoders = nn.ModuleList(
            ResidualBlock(widths[level] + widths[level + 1], widths[level]) for level in range(levels - 1))
        self.head = nn.Conv3d(widths[0], 1, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for level, encoder in enumerate(self.encoders):
            if level:
                x = F.max_pool3d(x, 2, ceil_mode=True)
            x = encoder(x)
            skips.append(x)
        for level in range(len(self.decoders) - 1, -1, -1):
            skip = skips[level]
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = self.decoders[level](torch.cat([skip, x], dim=1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
