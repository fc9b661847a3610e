"""Exponential moving average of the weights (`train.ema_decay`), updated after every optimizer step.

    ema = ModelEma(raw_model, decay=0.999)
    ...optimizer.step(); ema.update(raw_model)
    evaluate(ema.module, ...)                  # validation, test and model.safetensors use the average

Per update: decay_t = min(decay, (1 + n) / (10 + n)) with n the updates so far (the warm-up timm
and TensorFlow's ExponentialMovingAverage use, so early averages are not dominated by the random
initialisation), then ema = decay_t * ema + (1 - decay_t) * weights for every parameter and
floating-point buffer (BatchNorm's running statistics are averaged too); integer buffers
(num_batches_tracked) are copied. One fused `_foreach_lerp_` per step, no host sync.

Every rank keeps its own copy. Parameters agree across ranks after each step (DDP), so their
averages do; BatchNorm's running statistics do not (each rank updates them from its own slice of
the batch), so with several processes the engine calls `sync_buffers` after each update: rank
0's averaged buffers, one flattened broadcast. The average lives in checkpoints as
`ema.safetensors` (toolkit/checkpoint.py), so a resumed run continues the same average.
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()  # fp32 copy on the model's device
        for p in self.module.parameters():
            p.requires_grad_(False)
        for m in self.module.modules():  # hooks of the trained model (feature taps) stay with it
            m._forward_pre_hooks.clear()
            m._forward_hooks.clear()

    def _pairs(self, model: nn.Module):
        """(ema tensors to average, model tensors), (ema tensors to copy, model tensors)."""
        ema_p = list(self.module.parameters()) + [b for b in self.module.buffers() if b.is_floating_point()]
        src_p = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        ema_i = [b for b in self.module.buffers() if not b.is_floating_point()]
        src_i = [b for b in model.buffers() if not b.is_floating_point()]
        return (ema_p, src_p), (ema_i, src_i)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """`model`: the plain module being trained (not its DDP or compile wrapper)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        (ema_p, src_p), (ema_i, src_i) = self._pairs(model)
        torch._foreach_lerp_(ema_p, [s.detach() for s in src_p], 1.0 - d)
        for e, s in zip(ema_i, src_i):
            e.copy_(s)
        self.updates += 1

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Rank 0's floating-point buffers on every rank (one broadcast; no-op without buffers)."""
        import torch.distributed as dist

        bufs = [b for b in self.module.buffers() if b.is_floating_point()]
        if not bufs or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch._utils._flatten_dense_tensors(bufs)
        dist.broadcast(flat, src=0)
        for b, f in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs)):
            b.copy_(f)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        out = {f"module.{k}": v.detach().contiguous() for k, v in self.module.state_dict().items()}
        out["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if "updates" not in state:
            raise ValueError("not an EMA state: no 'updates' entry")
        module = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
        self.module.load_state_dict(module, strict=True)
        self.updates = int(state["updates"])
