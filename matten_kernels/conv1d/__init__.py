"""Depthwise conv1d + SiLU, causal and bidirectional (the Mamba mixer's short convolution).

reference.py  the spec (F.conv1d with padding and flips)
"""

from .reference import bi_depthwise_conv1d_silu_ref, depthwise_conv1d_silu_ref

__all__ = ["depthwise_conv1d_silu_ref", "bi_depthwise_conv1d_silu_ref"]
