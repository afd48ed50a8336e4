"""Plain PyTorch video attention over frame-major tokens: the spec the Triton kernels are checked against.

Tokens of a clip are laid out frame-major, index ``f * S + s``. ``axis="spatial"`` attends among the S tokens of a
frame, ``"temporal"`` among the F tokens at one spatial position, ``"global"`` among all F*S tokens. SPEC.md section 3.
"""

from __future__ import annotations

from einops import rearrange
import torch


def video_attention_ref(q, k, v, *, num_frames, axis, softmax_scale=None):
    """q, k, v: (batch, F*S, heads, head_dim) -> (batch, F*S, heads, head_dim), softmax in fp32 (fp64 for fp64)."""
    batch, tokens, heads, head_dim = q.shape
    F, S = num_frames, tokens // num_frames
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    pattern = {
        "spatial": "b (f s) h d -> (b f) h s d",
        "temporal": "b (f s) h d -> (b s) h f d",
        "global": "b (f s) h d -> b h (f s) d",
    }[axis]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qs, ks, vs = (rearrange(x.to(dtype), pattern, f=F, s=S) for x in (q, k, v))
    p = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
    o = p @ vs
    inverse = " -> ".join(reversed(pattern.split(" -> ")))
    return rearrange(o, inverse, b=batch, f=F, s=S).to(q.dtype).contiguous()


def video_attention_qkvpacked_ref(qkv, *, num_frames, axis, softmax_scale=None):
    """qkv: (batch, F*S, 3, heads, head_dim), slots q, k, v -> (batch, F*S, heads, head_dim); as
    :func:`video_attention_ref` on the three slots."""
    q, k, v = qkv.unbind(2)
    return video_attention_ref(q, k, v, num_frames=num_frames, axis=axis, softmax_scale=softmax_scale)
