"""A compact 3D residual U-Net of the SHIVA-CMB kind (needs the optional ``train`` extra: torch).

Residual encoder-decoder with skip connections and a sigmoid output, sized to train on two
CPU cores: one resolution level per entry of ``widths`` (channels), 8-16-32-64 by default;
``widen`` grows a trained network's channels without changing what it computes. Any spatial
size works (pooling rounds up, upsampling matches the skip's size), so the ONNX export has
dynamic spatial axes. Input and output are NCDHW with the spatial axes in the
model grid's [x, y, z] (R, A, S) order.
"""

from __future__ import annotations

from typing import List, Sequence

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


WIDTHS = (8, 16, 32, 64)


class ResidualUNet3D(nn.Module):
    """Residual U-Net with ``widths[level]`` channels per level; ``forward`` returns CMB probabilities (sigmoid)."""

    def __init__(self, widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        self.widths = tuple(int(width) for width in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths {list(widths)}: at least two levels of at least one channel")
        self.encoders = nn.ModuleList(
            ResidualBlock(1 if level == 0 else widths[level - 1], widths[level]) for level in range(len(widths)))
        self.decoders = nn.ModuleList(
            ResidualBlock(widths[level] + widths[level + 1], widths[level]) for level in range(len(widths) - 1))
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

    @property
    def architecture(self) -> str:
        """What ``model.json`` records of the network."""
        return f"ResidualUNet3D(widths={'-'.join(map(str, self.widths))}), batch norm, sigmoid output"


def widths_of(state: dict) -> List[int]:
    """The widths of the network whose ``state_dict`` this is."""
    levels = sorted(int(name.split(".")[1]) for name in state
                    if name.startswith("encoders.") and name.endswith("conv1.weight"))
    return [int(state[f"encoders.{level}.conv1.weight"].shape[0]) for level in levels]


def widen(model: ResidualUNet3D, widths: Sequence[int]) -> ResidualUNet3D:
    """A copy of ``model`` with more channels per level that computes exactly what ``model`` computes.

    Every old weight is kept; the weights from a new channel into an old one are zero, and the new
    channels get fresh random weights from everything before them, so they start silent in the
    output but carry signal (and gradient) from the first training step. Norms of new channels start
    as identities (weight 1, bias 0, mean 0, variance 1).
    """
    old_widths = model.widths
    if len(widths) != len(old_widths) or any(new < old for new, old in zip(widths, old_widths)):
        raise ValueError(f"widths {list(widths)}: one per level of {list(old_widths)}, none narrower")
    wide = ResidualUNet3D(widths)
    with torch.no_grad():
        for level, (old, new) in enumerate(zip(model.encoders, wide.encoders)):
            groups = ([1], [1]) if level == 0 else ([old_widths[level - 1]], [widths[level - 1]])
            _copy_block(old, new, *groups)
        for level, (old, new) in enumerate(zip(model.decoders, wide.decoders)):
            _copy_block(old, new, [old_widths[level], old_widths[level + 1]], [widths[level], widths[level + 1]])
        _copy_conv(model.head, wide.head, _positions([old_widths[0]], [widths[0]]))
    return wide.train(model.training)


def _positions(old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Where the channels of concatenated groups of the ``old`` sizes land among groups of the ``new`` sizes."""
    starts = [sum(new[:group]) for group in range(len(new))]
    return torch.cat([torch.arange(size) + start for size, start in zip(old, starts)])


def _copy_conv(old: nn.Conv3d, new: nn.Conv3d, inputs: torch.Tensor) -> None:
    kept = old.out_channels
    new.weight[:kept] = 0
    new.weight[:kept, inputs] = old.weight
    if old.bias is not None:
        new.bias[:kept] = old.bias


def _copy_norm(old: nn.BatchNorm3d, new: nn.BatchNorm3d) -> None:
    kept = old.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name)[:kept] = getattr(old, name)


def _copy_block(old: ResidualBlock, new: ResidualBlock, old_inputs: Sequence[int], new_inputs: Sequence[int]) -> None:
    inputs = _positions(old_inputs, new_inputs)
    _copy_conv(old.conv1, new.conv1, inputs)
    _copy_conv(old.conv2, new.conv2, torch.arange(old.conv2.in_channels))
    _copy_norm(old.norm1, new.norm1)
    _copy_norm(old.norm2, new.norm2)
    if isinstance(old.shortcut, nn.Conv3d) and isinstance(new.shortcut, nn.Conv3d):
        _copy_conv(old.shortcut, new.shortcut, inputs)
    elif not (isinstance(old.shortcut, nn.Identity) and isinstance(new.shortcut, nn.Identity)):
        raise ValueError("widen: a block whose shortcut changes kind (identity and projection)")
