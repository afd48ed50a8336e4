"""Exponential moving average of model weights (kept in float32 as a full model copy, so it exports with
``save_pretrained``).

Decay schedule: ``warmup_decay`` for the first ``warmup_steps`` optimizer steps, ``decay`` afterwards. The paper's
recipe is 0.99 for the first 50k steps (``EMA.paper()``); DiT/Latte use 0.9999 throughout (``warmup_steps=0``).
"""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup_steps: int = 0, warmup_decay: float = 0.99):
        for name, d in (("decay", decay), ("warmup_decay", warmup_decay)):
            if not 0.0 <= d < 1.0:
                raise ValueError(f"EMA {name} must be in [0, 1), got {d}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        self.decay, self.warmup_steps, self.warmup_decay = decay, warmup_steps, warmup_decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @classmethod
    def paper(cls, model: torch.nn.Module) -> "EMA":
        """Matten section 4.1: decay 0.99 during the first 50k steps, then DiT's 0.9999."""
        return cls(model, decay=0.9999, warmup_steps=50_000, warmup_decay=0.99)

    def decay_at(self, step: int) -> float:
        """Decay used by the update that follows optimizer step number ``step`` (0-based)."""
        return self.warmup_decay if step < self.warmup_steps else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """``ema = decay * ema + (1 - decay) * model`` for every parameter; buffers are copied."""
        d = self.decay_at(step)
        ema_params = dict(self.model.named_parameters())
        names = [name for name, _ in model.named_parameters()]
        src = [p.detach().float() for _, p in model.named_parameters()]
        torch._foreach_lerp_([ema_params[n] for n in names], src, 1.0 - d)  # one fused launch per dtype/device group
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
