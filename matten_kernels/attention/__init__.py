"""Fused spatial / temporal / global video attention over frame-major tokens (SPEC.md section 3)."""

from .interface import video_attention
from .reference import video_attention_ref

__all__ = ["video_attention", "video_attention_ref"]
