"""Batch augmentations by name, applied on the device to whole training batches.

    aug = AUGMENTS.build("crop")        # callable: (B, C, H, W) -> (B, C, H, W)

Each call draws the random numbers for the whole global batch and keeps this rank's slice
(`start`, `total`): every rank holds the same RNG state, so N processes augment exactly as one
process would. The draws come from the device's global RNG, which every checkpoint saves, so a
resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolkit.registry import Registry

AUGMENTS = Registry("augmentation")


@AUGMENTS.register("none")
def none():
    return None


def random_crop(x: torch.Tensor, pad: int, start: int = 0, total: int | None = None) -> torch.Tensor:
    """Pad each side by `pad` (edge values) and crop back at a random offset per sample.

    x is samples start..start+B of a global batch of `total`."""
    b, _, h, w = x.shape
    total = b if total is None else total
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (total,), device=x.device)[start:start + b]
    dx = torch.randint(0, 2 * pad + 1, (total,), device=x.device)[start:start + b]
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class Crop:
    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, x: torch.Tensor, start: int = 0, total: int | None = None) -> torch.Tensor:
        return random_crop(x, self.pad, start, total)


@AUGMENTS.register("crop")
def crop(pad: int = 4):
    """Random translation by up to `pad` pixels (torchvision's RandomCrop(size, padding))."""
    return Crop(pad)
