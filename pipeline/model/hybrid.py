"""The hybrid architecture's CNN stem: a small ResNet whose feature map is patch-embedded.

The ViT paper's hybrid takes the patches of a CNN feature map instead of raw pixels (R50+ViT-B/16 uses a
stride-16 ResNet with 1x1 patches). This stem is a ResNet-style stack: a 7x7 stride-2 root conv, then one
residual stage per further width, each halving the resolution, so `reduction = 2 ** len(widths)`.
GroupNorm replaces BatchNorm (as in BiT) so that statistics do not depend on the per-worker batch.
"""

import math

import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; the first conv carries the stride."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_chans)
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chans != out_chans:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False), group_norm(out_chans)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return self.act(x + shortcut)


class ResNetStem(nn.Module):
    """CNN feature extractor for the hybrid ViT: (B, C, H, W) -> (B, widths[-1], H / reduction, W / reduction)."""

    def __init__(self, in_chans: int, widths: tuple[int, ...], blocks_per_stage: int = 1):
        super().__init__()
        if not widths:
            raise ValueError("a hybrid stem needs at least one width")
        self.reduction = 2 ** len(widths)
        self.out_chans = widths[-1]
        self.root = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False),
            group_norm(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        for in_width, out_width in zip(widths[:-1], widths[1:], strict=True):
            blocks = [BasicBlock(in_width, out_width, stride=2)]
            blocks += [BasicBlock(out_width, out_width, stride=1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.root(x))
