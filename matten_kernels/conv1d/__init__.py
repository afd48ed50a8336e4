"""Depthwise conv1d + SiLU, causal and bidirectional (the Mamba mixer's short convolution).

reference.py    the spec (F.conv1d with padding and flips)
triton_fwd.py   forward kernel + launcher (both directions in one pass over x)
triton_bwd.py   backward kernel + launcher (dx, dweight, dbias of both directions in one pass, deterministic)
interface.py    torch.library custom ops (matten::*depthwise_conv1d_silu_fwd/_bwd) and the public functions
"""

from .interface import bi_depthwise_conv1d_silu, depthwise_conv1d_silu
from .reference import bi_depthwise_conv1d_silu_ref, depthwise_conv1d_silu_ref

__all__ = ["depthwise_conv1d_silu", "bi_depthwise_conv1d_silu", "depthwise_conv1d_silu_ref",
           "bi_depthwise_conv1d_silu_ref"]
