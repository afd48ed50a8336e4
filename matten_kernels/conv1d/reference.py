"""Plain PyTorch depthwise conv1d + SiLU, causal and bidirectional: the spec the Triton kernels are checked against.

``F.conv1d`` with ``padding=k-1`` and flips, computed in fp32 (fp64 for fp64 input, as tests use). Never optimise
this file. The anti-causal (backward-direction) conv is *defined* as Vision Mamba computes its ``conv1d_b``: the causal
conv applied to the flipped sequence, flipped back::

    x_f = silu(causal_conv(x, weight) + bias)
    x_b = flip(silu(causal_conv(flip(x), weight_b) + bias_b))

which, written in natural order, is ``x_b[t] = silu(bias_b + sum_i weight_b[k-1-i] * x[t+i])`` (x = 0 past L-1),
while ``x_f[t] = silu(bias + sum_j weight[j] * x[t-(k-1)+j])`` (x = 0 before 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv(x) + bias) in the compute dtype; x (batch, channels, L), weight (channels, k)."""
    dtype = _compute_dtype(x)
    channels, k = weight.shape
    L = x.shape[-1]
    y = F.conv1d(x.to(dtype), weight.to(dtype).unsqueeze(1), bias.to(dtype), padding=k - 1, groups=channels)
    return F.silu(y[..., :L])


def depthwise_conv1d_silu_ref(x, weight, bias):
    """Reference of :func:`matten_kernels.conv1d.depthwise_conv1d_silu`: the causal direction only.

    x: (batch, channels, L); weight: (channels, k); bias: (channels,). Returns (batch, channels, L) in x.dtype.
    """
    return _causal_conv_silu(x, weight, bias).to(x.dtype)


def bi_depthwise_conv1d_silu_ref(x, weight, bias, weight_b, bias_b):
    """Reference of :func:`matten_kernels.conv1d.bi_depthwise_conv1d_silu`.

    x: (batch, channels, L); weight, weight_b: (channels, k); bias, bias_b: (channels,).
    Returns ``(x_f, x_b)``, each (batch, channels, L) in x.dtype: the causal conv with (weight, bias) and the
    anti-causal conv with (weight_b, bias_b), defined by flips as in the module docstring.
    """
    x_f = _causal_conv_silu(x, weight, bias)
    x_b = _causal_conv_silu(x.flip(-1), weight_b, bias_b).flip(-1)
    return x_f.to(x.dtype), x_b.to(x.dtype)
