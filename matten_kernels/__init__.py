"""matten_kernels: fused kernels for Mamba-Attention video models.

Every op has a plain PyTorch reference with the same signature (``*_ref``); the fast paths are checked against it.
"""

from .selective_scan import bi_selective_scan, bi_selective_scan_ref, selective_scan, selective_scan_ref
from .attention import video_attention, video_attention_qkvpacked, video_attention_qkvpacked_ref, video_attention_ref

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "bi_selective_scan",
    "bi_selective_scan_ref",
    "video_attention",
    "video_attention_ref",
    "video_attention_qkvpacked",
    "video_attention_qkvpacked_ref",
]
