"""video_attention (ref and Triton) against float64 attention, forward and every gradient.

Tolerance rules:
* CPU (reference backend and the Triton interpreter, fp32 with ieee dots): max |out - fp64| <= 2e-5 and the same for
  each gradient (random cotangent), i.e. fp32 rounding only.
* GPU fp16/bf16 (flash-attention's rule): max error vs float64 at most 2x the max error of torch SDPA (with the
  rearranges) at the same precision, plus an absolute slack of 1e-3. fp32 on GPU runs 3xTF32 dots (fp32-level
  accuracy; plain tf32 biased the gradients, triton_fwd.dot_precision): relative (norm) error <= 1e-4.

The float64 oracle here is written independently of ``reference.py``: dense attention over all F*S tokens with a
block mask (same frame / same spatial position / everything), no rearranges.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as Fn
from einops import rearrange

from matten_kernels import (
    video_attention,
    video_attention_qkvpacked,
    video_attention_qkvpacked_ref,
    video_attention_ref,
)

log = logging.getLogger(__name__)
AXES = ("spatial", "temporal", "global")
CPU_ATOL = 2e-5


def masked_attention_fp64(q, k, v, num_frames, axis, scale=None):
    """Dense float64 attention over all tokens with the axis's block mask; (B, N, H, D) in and out."""
    B, N, H, D = q.shape
    S = N // num_frames
    idx = torch.arange(N, device=q.device)
    frame, pos = idx // S, idx % S
    if axis == "spatial":
        allowed = frame[:, None] == frame[None, :]
    elif axis == "temporal":
        allowed = pos[:, None] == pos[None, :]
    else:
        allowed = torch.ones(N, N, dtype=torch.bool, device=q.device)
    scale = D ** -0.5 if scale is None else scale
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))  # (B, H, N, D)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def packed_qkv(B, N, H, D, dtype=torch.float32, device="cpu"):
    """q, k, v as strided views of one (B, N, 3, H, D) tensor, like the model's fused projection."""
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, device=device)
    return qkv, qkv.unbind(2)


def _errors(name, got, want):
    err = (got.double() - want.double()).abs()
    log.info("%s: max err %.3e mean err %.3e", name, err.max().item(), err.mean().item())
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    return err.max().item()


def _check_fwd_bwd(backend, B, F, S, H, D, axis, scale=None, packed=False):
    """``packed``: through ``video_attention_qkvpacked(qkv)`` instead of ``video_attention(*qkv.unbind(2))``."""
    qkv, _ = packed_qkv(B, F * S, H, D)
    qkv.requires_grad_()
    if packed:
        out = video_attention_qkvpacked(qkv, num_frames=F, axis=axis, softmax_scale=scale, backend=backend)
    else:
        out = video_attention(*qkv.unbind(2), num_frames=F, axis=axis, softmax_scale=scale, backend=backend)
    assert out.shape == (B, F * S, H, D) and out.is_contiguous() and out.dtype == qkv.dtype
    cot = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, cot)
    assert grad.shape == qkv.shape

    qkv64 = qkv.detach().double().requires_grad_()
    ref = masked_attention_fp64(*qkv64.unbind(2), F, axis, scale)
    (grad64,) = torch.autograd.grad(ref, qkv64, cot.double())
    tag = f"{backend}{'/packed' if packed else ''}/{axis}/F{F}S{S}D{D}"
    assert _errors(f"{tag} out", out, ref) <= CPU_ATOL
    for i, gname in enumerate("qkv"):
        assert _errors(f"{tag} d{gname}", grad[:, :, i], grad64[:, :, i]) <= CPU_ATOL


# (F, S, D): awkward sizes. L <= 16 (PACK_MAX_LEN) runs the packed kernels, longer L the looping (flash) kernels; L = 1
# on the spatial (S = 1) and temporal (F = 1) axes.
SHAPES = [
    pytest.param(3, 5, 8, id="F3-S5-D8"),
    pytest.param(1, 7, 24, id="F1-S7-D24"),
    pytest.param(5, 1, 8, id="F5-S1-D8"),
    pytest.param(2, 21, 72, id="F2-S21-D72"),
]


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("F,S,D", SHAPES)
def test_ref_matches_fp64(F, S, D, axis):
    _check_fwd_bwd("ref", 2, F, S, 2, D, axis)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("F,S,D", SHAPES)
@pytest.mark.interpreter
def test_triton_matches_fp64(F, S, D, axis):
    _check_fwd_bwd("triton", 2, F, S, 2, D, axis)


@pytest.mark.parametrize("backend", ["ref", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("F,S,D", [SHAPES[0], SHAPES[3]])
def test_qkvpacked_matches_fp64(F, S, D, axis, backend):
    _check_fwd_bwd(backend, 2, F, S, 2, D, axis, packed=True)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.interpreter
def test_qkvpacked_equals_views_route(axis):
    """The packed entry runs the same kernels as the unbind route; only where the gradients are stored differs, so
    outputs and gradients are identical bit for bit. qkv here is a non-contiguous view (strides read as given)."""
    B, F, S, H, D = 2, 3, 6, 2, 24
    base = torch.randn(B, 3, F * S, H, D)
    qkv = base.transpose(1, 2)  # (B, N, 3, H, D), not contiguous
    cot = torch.randn(B, F * S, H, D)
    x1 = qkv.detach().requires_grad_()
    x2 = qkv.detach().requires_grad_()
    out1 = video_attention_qkvpacked(x1, num_frames=F, axis=axis, backend="triton")
    out2 = video_attention(*x2.unbind(2), num_frames=F, axis=axis, backend="triton")
    (g1,) = torch.autograd.grad(out1, x1, cot)
    (g2,) = torch.autograd.grad(out2, x2, cot)
    assert torch.equal(out1, out2) and torch.equal(g1, g2)
    ref = video_attention_qkvpacked_ref(qkv, num_frames=F, axis=axis)
    assert _errors("packed ref vs triton", out1, ref) <= CPU_ATOL


@pytest.mark.parametrize(
    "F,S,D,axis",
    [
        pytest.param(2, 67, 8, "spatial", id="spatial-S67-masked"),
        pytest.param(66, 2, 8, "temporal", id="temporal-F66-masked"),
        pytest.param(3, 32, 8, "global", id="global-96-even"),
        pytest.param(5, 37, 40, "spatial", id="spatial-S37-D40"),
        pytest.param(5, 37, 40, "global", id="global-185-D40"),
    ],
)
@pytest.mark.interpreter
def test_triton_looping_mode(F, S, D, axis):
    """Sequences longer than the packing limit: several query and key blocks, with and without ragged tails (single
    fused backward launch, L <= FUSED_BWD_MAX_LEN)."""
    _check_fwd_bwd("triton", 1, F, S, 1, D, axis)


@pytest.mark.parametrize(
    "F,S,D",
    [pytest.param(3, 100, 40, id="global-300-D40-masked"), pytest.param(5, 64, 8, id="global-320-even")],
)
@pytest.mark.interpreter
def test_triton_two_launch_backward(F, S, D):
    """L > FUSED_BWD_MAX_LEN: the dQ launch writes delta, the dK/dV launch reads it."""
    from matten_kernels.attention import triton_bwd

    assert F * S > triton_bwd.FUSED_BWD_MAX_LEN
    _check_fwd_bwd("triton", 1, F, S, 2, D, "global")


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("F,S,D", SHAPES)
@pytest.mark.interpreter
def test_triton_two_launch_backward_short(F, S, D, axis, monkeypatch):
    """The two-launch backward at short L, packed mode included (FUSED_BWD_MAX_LEN lowered): the same passes with
    delta through the buffer instead of recomputed."""
    from matten_kernels.attention import triton_bwd

    monkeypatch.setattr(triton_bwd, "FUSED_BWD_MAX_LEN", 0)
    _check_fwd_bwd("triton", 2, F, S, 2, D, axis)


class _CountingLaunch:
    """Wraps matten_kernels._launch.launch in a launcher module, recording the launched kernels' names."""

    def __init__(self, module, monkeypatch):
        self.inner, self.names = module.launch, []
        monkeypatch.setattr(module, "launch", self)

    def __call__(self, kernel, grid, args, meta):
        self.names.append((kernel.__name__, meta.get("DKDV"), meta.get("DQ")))
        self.inner(kernel, grid, args, meta)


@pytest.mark.parametrize(
    "F,S,axis,expected",
    [
        pytest.param(4, 8, "temporal", [(True, True)], id="temporal-packed-fused"),
        pytest.param(4, 24, "spatial", [(True, True)], id="spatial-looping-fused"),
        pytest.param(3, 100, "global", [(False, True), (True, False)], id="global-dq-then-dkdv"),
    ],
)
@pytest.mark.interpreter
def test_launch_structure(F, S, axis, expected, monkeypatch):
    """One forward launch; one backward launch up to FUSED_BWD_MAX_LEN, else dQ (writes delta) then dK/dV."""
    from matten_kernels.attention import triton_bwd, triton_fwd

    fwd, bwd = _CountingLaunch(triton_fwd, monkeypatch), _CountingLaunch(triton_bwd, monkeypatch)
    _, (q, k, v) = packed_qkv(1, F * S, 1, 8)
    q.requires_grad_()
    out = video_attention(q, k, v, num_frames=F, axis=axis, backend="triton")
    out.sum().backward()
    assert [n for n, _, _ in fwd.names] == ["_video_attn_fwd_kernel"]
    assert [(dkdv, dq) for _, dkdv, dq in bwd.names] == expected


@pytest.mark.interpreter
def test_launch_plans_cached_and_xl_structure():
    """Plans are computed once per shape class; at Matten-XL (B=2 F=16 S=256 H=16 hd=72) the backward is one launch
    for spatial and temporal, two for global."""
    from matten_kernels.attention import triton_bwd, triton_fwd

    qkv, (q, k, v) = packed_qkv(1, 12, 2, 8)
    video_attention(q, k, v, num_frames=3, axis="spatial", backend="triton")
    hits = triton_fwd._fwd_plan.cache_info().hits
    video_attention(q, k, v, num_frames=3, axis="spatial", backend="triton")
    assert triton_fwd._fwd_plan.cache_info().hits == hits + 1
    for axis, n in (("spatial", 1), ("temporal", 1), ("global", 2)):
        _, launches, needs_delta = triton_bwd._bwd_plan(2, 16, 4096, 72, 16, axis, 8, True, 256, 1)
        assert len(launches) == n and needs_delta == (n == 2), axis


def test_config_choice(monkeypatch):
    """Index 0 of each config list is the H100 autotuner's pick (NOTES_attention.md); MATTEN_ATTN_CONFIG (FIXED_CONFIG)
    picks another index, clamped; CONFIG_SUBSET restricts to the lowest allowed index."""
    from matten_kernels.attention import triton_bwd, triton_fwd

    def first(configs):
        c = configs[0]
        return c.kwargs, c.num_warps, c.num_stages

    assert first(triton_fwd._fwd_configs(0)) == ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3)
    assert first(triton_fwd._fwd_configs(16)) == ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 1)
    assert first(triton_bwd._dkdv_configs(0)) == ({"BLOCK_HELD": 64, "BLOCK_STREAM": 32}, 4, 3)
    assert first(triton_bwd._dq_configs(0)) == ({"BLOCK_HELD": 128, "BLOCK_STREAM": 32}, 8, 3)
    monkeypatch.setattr(triton_fwd, "triton_interpreting", lambda: False)
    configs = triton_bwd._dq_configs(0)
    pick = lambda: triton_fwd.pick_config("test", configs, None, "key")  # noqa: E731
    assert pick() is configs[0]
    monkeypatch.setattr(triton_fwd, "CONFIG_SUBSET", {2, 5})
    assert pick() is configs[2]
    monkeypatch.setattr(triton_fwd, "FIXED_CONFIG", 1)
    assert pick() is configs[1]
    monkeypatch.setattr(triton_fwd, "FIXED_CONFIG", 9)
    assert pick() is configs[-1]
    assert triton_fwd.tuned_configs()["test"]["key"] == str(configs[-1])


@pytest.mark.parametrize("axis", ["temporal", "global"])
@pytest.mark.interpreter
def test_triton_unsplit_head_dim(axis, monkeypatch):
    """Head dim 40 as one masked 64 block instead of the default 32 + 16 chunks."""
    from matten_kernels.attention import triton_fwd

    monkeypatch.setattr(triton_fwd, "SPLIT_HEAD_DIM", False)
    assert triton_fwd.head_dim_blocks(40) == (64, 0)
    _check_fwd_bwd("triton", 1, 3, 7, 2, 40, axis)


def test_head_dim_blocks():
    from matten_kernels.attention.triton_fwd import head_dim_blocks

    assert head_dim_blocks(72, split=True) == (64, 16)
    assert head_dim_blocks(72, split=False) == (128, 0)
    assert head_dim_blocks(128, split=True) == (128, 0)
    assert head_dim_blocks(24, split=True) == (32, 0)
    assert head_dim_blocks(8, split=True) == (16, 0)


@pytest.mark.interpreter
def test_triton_custom_scale():
    _check_fwd_bwd("triton", 1, 3, 4, 2, 16, "temporal", scale=0.3)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.interpreter
def test_triton_expanded_cotangent(axis):
    """out.sum() gives a cotangent with all strides 0; dO is read through its strides."""
    qkv, _ = packed_qkv(1, 3 * 20, 2, 8)
    qkv.requires_grad_()
    video_attention(*qkv.unbind(2), num_frames=3, axis=axis, backend="triton").sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    masked_attention_fp64(*qkv64.unbind(2), 3, axis).sum().backward()
    assert _errors(f"expanded {axis}", qkv.grad, qkv64.grad) <= CPU_ATOL


@pytest.mark.interpreter
def test_triton_separate_tensors_and_noncontiguous_cotangent():
    """q, k, v from different storages with different strides; the cotangent a transposed view."""
    B, F, S, H, D = 1, 2, 3, 2, 8
    q = torch.randn(B, F * S, H, D)
    k = torch.randn(B, H, F * S, D).transpose(1, 2)
    v = torch.randn(B, F * S, H, 2 * D)[..., ::2]  # head_dim stride 2
    for t in (q, k, v):
        t.requires_grad_()
    out = video_attention(q, k, v, num_frames=F, axis="spatial", backend="triton")
    cot = torch.randn(B, H, F * S, D).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = masked_attention_fp64(q64, k64, v64, F, "spatial")
    grads64 = torch.autograd.grad(ref, (q64, k64, v64), cot.double())
    assert _errors("sep out", out, ref) <= CPU_ATOL
    for g, g64 in zip(grads, grads64):
        assert g.shape == g64.shape
        assert _errors("sep grad", g, g64) <= CPU_ATOL


def test_reference_is_the_spec():
    """reference.py (rearranges) and the masked dense oracle agree in float64."""
    q, k, v = (torch.randn(2, 12, 3, 5, dtype=torch.float64) for _ in range(3))
    for axis in AXES:
        got = video_attention_ref(q, k, v, num_frames=4, axis=axis)
        assert _errors(f"spec {axis}", got, masked_attention_fp64(q, k, v, 4, axis)) <= 1e-12


@pytest.mark.interpreter
def test_opcheck():
    from matten_kernels.attention import interface  # noqa: F401  (registers the ops)

    _, (q, k, v) = packed_qkv(1, 6, 1, 8)
    torch.library.opcheck(torch.ops.matten.video_attention_fwd.default, (q, k, v, 2, "temporal", 0.35))
    o, lse = torch.ops.matten.video_attention_fwd(q, k, v, 2, "temporal", 0.35)
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.matten.video_attention_bwd.default, (do, q, k, v, o, lse, 2, "temporal", 0.35))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.matten.video_attention_fwd.default, (qg, kg, vg, 3, "spatial", 0.35),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.interpreter
def test_opcheck_qkvpacked():
    from matten_kernels.attention import interface  # noqa: F401  (registers the ops)

    qkv, _ = packed_qkv(1, 6, 1, 8)
    torch.library.opcheck(torch.ops.matten.video_attention_qkvpacked_fwd.default, (qkv, 2, "temporal", 0.35))
    o, lse = torch.ops.matten.video_attention_qkvpacked_fwd(qkv, 2, "temporal", 0.35)
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.matten.video_attention_qkvpacked_bwd.default,
                          (do, qkv, o, lse, 2, "temporal", 0.35))
    torch.library.opcheck(torch.ops.matten.video_attention_qkvpacked_fwd.default,
                          (qkv.clone().requires_grad_(), 3, "spatial", 0.35),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.interpreter
def test_torch_compile_fullgraph_cpu():
    """Dynamo traces the public function and the custom ops without graph breaks (aot_eager: no C++ toolchain)."""
    B, F, S, H, D = 1, 3, 4, 2, 8
    qkv, _ = packed_qkv(B, F * S, H, D)

    def f(qkv):
        q, k, v = qkv.unbind(2)
        x = video_attention(q, k, v, num_frames=F, axis="temporal", backend="triton")
        x = video_attention(x, k, v, num_frames=F, axis="spatial", backend="triton")
        return x + video_attention_qkvpacked(qkv * 0.5, num_frames=F, axis="global", backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qkv_e = qkv.clone().requires_grad_()
    qkv_c = qkv.clone().requires_grad_()
    out_e, out_c = f(qkv_e), compiled(qkv_c)
    cot = torch.randn_like(out_e)
    (g_e,) = torch.autograd.grad(out_e, qkv_e, cot)
    (g_c,) = torch.autograd.grad(out_c, qkv_c, cot)
    assert _errors("compile out", out_c, out_e) <= 1e-6
    assert _errors("compile grad", g_c, g_e) <= 1e-6


@pytest.mark.interpreter
def test_validation_errors():
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="not divisible by num_frames=4"):
        video_attention(q, q, q, num_frames=4, axis="spatial")
    with pytest.raises(ValueError, match="unknown axis"):
        video_attention(q, q, q, num_frames=2, axis="time")
    with pytest.raises(ValueError, match="k must have shape"):
        video_attention(q, q[:, :3], q, num_frames=2, axis="spatial")
    with pytest.raises(TypeError, match="v must have dtype"):
        video_attention(q, q, q.double(), num_frames=2, axis="spatial")
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        video_attention(q[0], q[0], q[0], num_frames=2, axis="spatial")
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(1, 2, 1, 136)
        video_attention(big, big, big, num_frames=1, axis="global")
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        video_attention(q, q, q, num_frames=0, axis="spatial")
    with pytest.raises(ValueError, match="unknown backend"):
        video_attention(q, q, q, num_frames=2, axis="spatial", backend="cuda")
    with pytest.raises(TypeError, match="backend='triton' supports"):
        qd = q.double()
        video_attention(qd, qd, qd, num_frames=2, axis="spatial", backend="triton")
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        video_attention(q.numpy(), q, q, num_frames=2, axis="spatial")


@pytest.mark.interpreter
def test_validation_errors_qkvpacked():
    qkv = torch.randn(1, 6, 3, 2, 8)
    with pytest.raises(ValueError, match="qkv must have 5 dimensions"):
        video_attention_qkvpacked(qkv[:, :, 0], num_frames=2, axis="spatial")
    with pytest.raises(ValueError, match=r"qkv must be \(batch, F\*S, 3, heads, head_dim\)"):
        video_attention_qkvpacked(qkv[:, :, :2], num_frames=2, axis="spatial")
    with pytest.raises(ValueError, match="video_attention_qkvpacked: the token count F\\*S = qkv.shape\\[1\\] = 6"):
        video_attention_qkvpacked(qkv, num_frames=4, axis="spatial")
    with pytest.raises(ValueError, match="unknown axis"):
        video_attention_qkvpacked(qkv, num_frames=2, axis="time")
    with pytest.raises(ValueError, match="head_dim"):
        video_attention_qkvpacked(torch.randn(1, 2, 3, 1, 136), num_frames=1, axis="global")
    with pytest.raises(TypeError, match="qkv must have dtype"):
        video_attention_qkvpacked(qkv.int(), num_frames=2, axis="spatial")
    with pytest.raises(TypeError, match="backend='triton' supports"):
        video_attention_qkvpacked(qkv.double(), num_frames=2, axis="spatial", backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

SDPA_PATTERN = {
    "spatial": "b (f s) h d -> (b f) h s d",
    "temporal": "b (f s) h d -> (b s) h f d",
    "global": "b (f s) h d -> b h (f s) d",
}


def sdpa_video_attention(q, k, v, num_frames, axis):
    """The baseline: rearrange to (sequences, heads, L, d), torch SDPA, rearrange back."""
    B, N, H, D = q.shape
    S = N // num_frames
    pattern = SDPA_PATTERN[axis]
    qs, ks, vs = (rearrange(x, pattern, f=num_frames, s=S) for x in (q, k, v))
    o = Fn.scaled_dot_product_attention(qs, ks, vs)
    inverse = " -> ".join(reversed(pattern.split(" -> ")))
    return rearrange(o, inverse, b=B, f=num_frames, s=S)


def _fwd_bwd(fn, qkv, cot, F, axis):
    qkv = qkv.detach().requires_grad_()
    out = fn(*qkv.unbind(2), F, axis)
    (grad,) = torch.autograd.grad(out, qkv, cot)
    return out, grad


def _matten(q, k, v, f, a):
    return video_attention(q, k, v, num_frames=f, axis=a)


# XL: Matten-XL (spatial: fused looping backward; temporal: packed fused; global: dQ + dK/dV launches). odd: ragged
# blocks, hd 40 (global L = 185: fused). odd-long: global L = 301, the two-launch backward with ragged blocks.
GPU_SHAPES = [
    pytest.param(2, 16, 256, 16, 72, id="XL"),
    pytest.param(1, 5, 37, 3, 40, id="odd"),
    pytest.param(1, 7, 43, 2, 40, id="odd-long"),
]


def _flash_rule(B, F, S, H, D, axis, dtype):
    """Max error vs float64 of out and dqkv at most 2x SDPA's + 1e-3 (the module docstring's GPU rule)."""
    qkv, _ = packed_qkv(B, F * S, H, D, dtype=dtype, device="cuda")
    cot = torch.randn(B, F * S, H, D, dtype=dtype, device="cuda")
    ours = _fwd_bwd(_matten, qkv, cot, F, axis)
    base = _fwd_bwd(sdpa_video_attention, qkv, cot, F, axis)
    ref = _fwd_bwd(lambda q, k, v, f, a: video_attention_ref(q, k, v, num_frames=f, axis=a), qkv.double(),
                   cot.double(), F, axis)
    for name, got, sdpa, want in zip(("out", "dqkv"), ours, base, ref):
        e_ours = _errors(f"ours {axis} {name}", got, want)
        e_sdpa = _errors(f"sdpa {axis} {name}", sdpa, want)
        assert e_ours <= 2 * e_sdpa + 1e-3, f"{axis} {name}: ours {e_ours:.3e} vs sdpa {e_sdpa:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("B,F,S,H,D", GPU_SHAPES)
def test_gpu_flash_rule(B, F, S, H, D, axis, dtype):
    _flash_rule(B, F, S, H, D, axis, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("B,F,S,H,D", [GPU_SHAPES[0], GPU_SHAPES[1]])
def test_gpu_two_launch_backward_short(B, F, S, H, D, axis, monkeypatch):
    """The two-launch backward (dQ writing delta, then dK/dV) where the single fused launch is the default: the
    variant a benchmark compares against by lowering FUSED_BWD_MAX_LEN."""
    from matten_kernels.attention import triton_bwd

    monkeypatch.setattr(triton_bwd, "FUSED_BWD_MAX_LEN", 0)
    _flash_rule(B, F, S, H, D, axis, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", AXES)
def test_gpu_deterministic(axis):
    """No atomics: two backward passes give bitwise-identical gradients."""
    B, F, S, H, D = 2, 16, 256, 16, 72
    qkv, _ = packed_qkv(B, F * S, H, D, dtype=torch.bfloat16, device="cuda")
    cot = torch.randn(B, F * S, H, D, dtype=torch.bfloat16, device="cuda")
    _, g1 = _fwd_bwd(_matten, qkv, cot, F, axis)
    _, g2 = _fwd_bwd(_matten, qkv, cot, F, axis)
    assert torch.equal(g1, g2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("B,F,S,H,D", GPU_SHAPES)
def test_gpu_qkvpacked_equals_views_route(B, F, S, H, D, axis, dtype):
    """Same kernels, gradients stored into one packed tensor: bitwise equal to the unbind route (whose accuracy the
    flash-rule tests check)."""
    qkv, _ = packed_qkv(B, F * S, H, D, dtype=dtype, device="cuda")
    cot = torch.randn(B, F * S, H, D, dtype=dtype, device="cuda")
    out1, g1 = _fwd_bwd(_matten, qkv, cot, F, axis)
    x = qkv.detach().requires_grad_()
    out2 = video_attention_qkvpacked(x, num_frames=F, axis=axis)
    (g2,) = torch.autograd.grad(out2, x, cot)
    assert g2.is_contiguous() and g2.shape == qkv.shape
    assert torch.equal(out1, out2) and torch.equal(g1, g2)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", AXES)
def test_gpu_fp32(axis):
    B, F, S, H, D = 1, 6, 50, 2, 72
    qkv, _ = packed_qkv(B, F * S, H, D, device="cuda")
    cot = torch.randn(B, F * S, H, D, device="cuda")
    out, grad = _fwd_bwd(_matten, qkv, cot, F, axis)
    ref, grad64 = _fwd_bwd(masked_attention_fp64, qkv.double(), cot.double(), F, axis)
    for name, got, want in (("out", out, ref), ("dqkv", grad, grad64)):
        _errors(f"fp32 {axis} {name}", got, want)
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel <= 1e-4, f"{axis} {name}: relative error {rel:.2e}"


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    B, F, S, H, D = 2, 4, 24, 4, 72
    qkv, _ = packed_qkv(B, F * S, H, D, dtype=torch.bfloat16, device="cuda")
    cot = torch.randn(B, F * S, H, D, dtype=torch.bfloat16, device="cuda")

    def f(qkv):
        q, k, v = qkv.unbind(2)
        x = video_attention(q, k, v, num_frames=F, axis="temporal")
        x = video_attention(x, k, v, num_frames=F, axis="spatial")
        return x + video_attention_qkvpacked(qkv * 0.5, num_frames=F, axis="global")

    compiled = torch.compile(f, fullgraph=True)
    qkv_e = qkv.clone().requires_grad_()
    qkv_c = qkv.clone().requires_grad_()
    out_e, out_c = f(qkv_e), compiled(qkv_c)
    (g_e,) = torch.autograd.grad(out_e, qkv_e, cot)
    (g_c,) = torch.autograd.grad(out_c, qkv_c, cot)
    assert _errors("compile out", out_c, out_e) <= 1e-2
    assert _errors("compile grad", g_c, g_e) <= 1e-2


def test_alignment_hint_covers_the_allocated_outputs():
    # inputs with 16-byte-aligned strides (views of a padded head dim) but head_dim 37: the contiguous outputs the
    # launchers allocate have head stride 37, so no alignment may be promised to the kernels
    from matten_kernels.attention.triton_fwd import alignment

    padded = torch.zeros(2, 6, 3, 40, dtype=torch.bfloat16)
    view = padded[..., :37]
    assert view.stride()[:3] == (720, 120, 40)
    assert alignment(view, view, view) == 1
    assert alignment(padded, padded, padded) == 8
