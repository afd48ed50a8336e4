"""Fused spatial / temporal / global video attention over frame-major tokens (SPEC.md section 3)."""

from .interface import video_attention, video_attention_qkvpacked
from .reference import video_attention_qkvpacked_ref, video_attention_ref

__all__ = ["video_attention", "video_attention_qkvpacked", "video_attention_qkvpacked_ref", "video_attention_ref"]
