"""Mixup and CutMix on training batches: images blended with a partner, labels become soft.

    mix = BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=10)
    x, y = mix(x, y)          # (B, C, H, W), (B,) -> (B, C, H, W), (B, num_classes) float

Each batch draws one mixing weight lam ~ Beta(alpha, alpha); with both enabled, each batch
picks mixup or CutMix with probability 1/2 (timm's default). The partner of image i is image
i-1 of the same batch (torchvision's references roll by one), so under DDP partners come from
the rank's own slice: the draws (lam, box, which method) are the same on every rank because
every rank holds the same RNG state, but 1 and N processes pair images differently, so mixup
runs are not bit-identical across world sizes. The draws come from the global RNG that every
checkpoint saves, so resume stays exact.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


class BatchMix:
    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        self.mixup_alpha, self.cutmix_alpha, self.num_classes = mixup_alpha, cutmix_alpha, num_classes

    def _beta(self, alpha: float) -> float:
        # Drawn on the CPU from the global RNG: identical on every rank and after resume.
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or float(torch.rand(())) < 0.5)
        onehot = F.one_hot(y, self.num_classes).to(torch.float32)  # (B, K)
        partner_y = onehot.roll(1, 0)
        if use_cutmix:
            lam = self._beta(self.cutmix_alpha)
            h, w = x.shape[-2:]
            cut = (1 - lam) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.roll(1, 0)[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the image really kept
        else:
            lam = self._beta(self.mixup_alpha)
            x = x * lam + x.roll(1, 0) * (1 - lam)
        target = onehot * lam + partner_y * (1 - lam)  # (B, K), rows sum to 1
        return x, target
