"""The adaLN / M-AdaN elementwise ops of DiT-style blocks, as plain PyTorch (the spec of the fused kernels).

    layer_norm_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale) + shift       (DiT ``modulate(norm(x), ...)``)
    gated_residual(x, gate, y)           = x + gate * y                             (DiT ``x + gate * block(...)``)

x, y: (batch, tokens, D); shift, scale, gate: (batch, D), broadcast over the tokens. The LayerNorm has no affine
parameters (adaLN supplies them) and normalises over D with eps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift over the last dim, computed as ``torch`` composes it; result in out_dtype
    (default x.dtype)."""
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return y.to(out_dtype or x.dtype)


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with gate (batch, D) broadcast over the tokens; result in x.dtype."""
    return (x + gate.unsqueeze(1) * y).to(x.dtype)
