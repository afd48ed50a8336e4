"""selective_scan: ref and triton (interpreter on the CPU) vs an independent float64 sequential scan.

Tolerance rule: inputs are drawn in fp32; the float64 reference (written here, a plain loop over time) sees the same
values upcast. A backend passes when, for the output, last_state and every gradient,
    max |got - ref| <= TOL * max(1, max |ref|)        TOL = 1e-4 (fp32 arithmetic lands near 1e-6 here)
and nothing is NaN. Max and mean errors are logged before asserting. Gradients use random cotangents for out and
last_state. GPU dtype checks (mamba_ssm's table) live in test_selective_scan_gpu.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from matten_kernels import selective_scan, selective_scan_ref

log = logging.getLogger(__name__)
TOL = 1e-4
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, initial_state=None, reverse=False):
    """Independent float64 sequential scan: out (pre-cast, float64) and the last state. Differentiable."""
    batch, dim, L = u.shape
    N = A.shape[1]
    dt = delta + (delta_bias[:, None] if delta_bias is not None else 0)
    if softplus:
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))

    def per_channel(X):  # (batch, [G,] N, L) -> (batch, dim, N, L)
        if X.dim() == 3:
            return X[:, None].expand(batch, dim, N, L)
        G = X.shape[1]
        idx = torch.arange(dim) // (dim // G)
        return X[:, idx]

    Bc, Cc = per_channel(B), per_channel(C)
    h = initial_state if initial_state is not None else torch.zeros(batch, dim, N, dtype=u.dtype)
    ys = {}
    for t in (reversed(range(L)) if reverse else range(L)):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * Bc[..., t]
        ys[t] = (h * Cc[..., t]).sum(-1)
    y = torch.stack([ys[t] for t in range(L)], -1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def make_inputs(batch, dim, L, N, G=None, *, D=True, z=True, bias=True, h0=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, N, L) if G is None else (batch, G, N, L)
    x = dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-torch.rand(dim, N, generator=g) * 2 - 0.1,
             B=r(*bc), C=r(*bc), D=r(dim) if D else None, z=r(batch, dim, L) if z else None,
             delta_bias=0.1 * r(dim) if bias else None, initial_state=r(batch, dim, N) if h0 else None)
    return x


def check(name, got, ref, tol=TOL):
    assert got is not None and ref is not None, f"{name}: missing gradient"
    err = (got.double() - ref.double()).abs()
    scale = max(1.0, ref.abs().max().item())
    log.info("%s: max err %.2e, mean err %.2e, max|ref| %.2e", name, err.max().item(), err.mean().item(), scale)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err.max().item() <= tol * scale, f"{name}: max err {err.max().item():.3e} > {tol * scale:.3e}"


def run_case(backend, x, softplus, with_last, seed=1):
    """Forward + backward of the public op vs scan64, every present input's gradient compared."""
    g = torch.Generator().manual_seed(seed)
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    leaves64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in x.items()}
    res = selective_scan(*(leaves[k] for k in NAMES[:8]), softplus, with_last,
                         initial_state=leaves["initial_state"], backend=backend)
    out, last = res if with_last else (res, None)
    ref_out, ref_last = scan64(*(leaves64[k] for k in NAMES[:8]), softplus, leaves64["initial_state"])
    check("out", out, ref_out)
    assert out.dtype == x["u"].dtype and out.shape == x["u"].shape
    dout = torch.randn(out.shape, generator=g)
    if with_last:
        assert last.dtype == torch.float32
        check("last_state", last, ref_last)
        dlast = torch.randn(last.shape, generator=g)
        torch.autograd.backward([out, last], [dout, dlast])
        torch.autograd.backward([ref_out, ref_last], [dout.double(), dlast.double()])
    else:
        out.backward(dout)
        ref_out.backward(dout.double())
    for k in NAMES:
        if x[k] is not None:
            check(f"d{k}", leaves[k].grad, leaves64[k].grad)


# (batch, dim, L, N, G): L = 1, 17 (one partial chunk), 130 and 257 (several chunks, partial last); dim 5 is not a
# multiple of any channel tile; N = 1 and 16; G = 1 (3-d B/C) and 2 groups.
SHAPES = [
    pytest.param((1, 3, 1, 1, None), id="L1-N1"),
    pytest.param((2, 5, 17, 16, None), id="L17-N16-dim5"),
    pytest.param((1, 4, 130, 4, 2), id="L130-G2"),
    pytest.param((1, 3, 257, 2, None), id="L257"),
    # L a multiple of the 4-step chunk and dim of the channel tile (no partial chunk or tile)
    pytest.param((1, 16, 136, 16, None), id="L136-dim16-even"),
]
# options: (D, z, delta_bias, softplus, initial_state, return_last_state)
OPTIONS = [
    pytest.param((True, True, True, True, True, True), id="all-on"),
    pytest.param((False, False, False, False, False, False), id="all-off"),
    pytest.param((True, False, True, True, False, True), id="D-bias-softplus-last"),
    pytest.param((False, True, False, False, True, False), id="z-h0"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_ref_matches_float64(shape, opts):
    Dz, z, bias, sp, h0, last = opts
    x = make_inputs(*shape, D=Dz, z=z, bias=bias, h0=h0)
    run_case("ref", x, sp, last)


@pytest.mark.parametrize("shape, opts", [
    pytest.param((1, 3, 1, 1, None), OPTIONS[0].values[0], id="L1-N1-all-on"),
    pytest.param((2, 5, 17, 16, None), OPTIONS[0].values[0], id="L17-N16-dim5-all-on"),
    pytest.param((2, 5, 17, 4, None), OPTIONS[1].values[0], id="L17-dim5-all-off"),
    pytest.param((1, 4, 130, 4, 2), OPTIONS[2].values[0], id="L130-G2-D-bias-softplus-last"),
    pytest.param((1, 3, 257, 2, None), OPTIONS[3].values[0], id="L257-z-h0"),
])
@pytest.mark.interpreter
def test_triton_matches_float64(shape, opts):
    Dz, z, bias, sp, h0, last = opts
    x = make_inputs(*shape, D=Dz, z=z, bias=bias, h0=h0)
    run_case("triton", x, sp, last)


@pytest.mark.interpreter
def test_triton_noncontiguous_inputs():
    """Views with stride(-1) != 1 (a (batch, L, dim) buffer transposed) and a sliced A go through unchanged."""
    batch, dim, L, N = 2, 4, 40, 3
    x = make_inputs(batch, dim, L, N, h0=True)
    for k in ("u", "delta", "z"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    for k in ("B", "C"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    x["A"] = torch.cat([x["A"], x["A"]], 1)[:, ::2]
    assert not x["u"].is_contiguous() and not x["B"].is_contiguous() and not x["A"].is_contiguous()
    run_case("triton", x, True, True)


@pytest.mark.interpreter
def test_triton_deterministic_mode_matches():
    """torch.use_deterministic_algorithms(True): per-tile dB/dC partials instead of atomics; same values."""
    x = make_inputs(2, 5, 40, 4, G=None, h0=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_case("triton", x, True, True)
    finally:
        torch.use_deterministic_algorithms(prev)


def force_segments(monkeypatch, n_seg):
    """Make the Triton launchers split every sequence into n_seg segments; returns the list of the L they ran at."""
    from matten_kernels.selective_scan import triton_bwd, triton_fwd

    default, used = triton_fwd.scan_config, []

    def split(*args, **kw):
        used.append(args[3])  # L
        return default(*args, **kw)[:5] + (n_seg,)

    monkeypatch.setattr(triton_fwd, "scan_config", split, raising=True)
    monkeypatch.setattr(triton_bwd, "scan_config", split, raising=True)
    return used


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_sequence_segments(deterministic, monkeypatch):
    """The sequence split into segments (what the GPU does for long rows over few channels; the CPU config has one):
    the summary passes, the segments' carried states and adjoints, and dA / dD / ddelta_bias summed over segments and
    batch rows (atomics, or per-(segment, batch) partials under deterministic mode) against float64."""
    used = force_segments(monkeypatch, 3)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        run_case("triton", make_inputs(2, 3, 150, 4, h0=True), True, True)  # 3 saved blocks, one a segment
    finally:
        torch.use_deterministic_algorithms(prev)
    assert used == [150, 150], used  # the forward and the backward both ran segmented


@pytest.mark.interpreter
@pytest.mark.parametrize("lanes", [False, True], ids=["segment", "lanes"])
@pytest.mark.parametrize("L, kept", [(64, 0), (128, 1), (257, 4), (1024, 16)])
def test_triton_saved_states_shape(L, kept, lanes, monkeypatch):
    """Memory: the forward saves the state entering every 64-step block but, in rows shorter than KEEP_FIRST_MIN_L
    (1024) steps, the first (the initial state or zero, which the backward reads itself): (batch, dim,
    ceil(L / 64) - 1, N), nothing for one block. Both forward kernels; the gradients from these states are checked
    against float64 by the tests above (and test_triton_first_block_kept below)."""
    from matten_kernels.selective_scan import _ops

    monkeypatch.setattr(_ops, "use_lanes", lambda *a, **k: lanes)
    x = make_inputs(1, 2, L, 4, h0=True)
    out, last, states = _ops.selective_scan_fwd_op(*(x[k] for k in NAMES), True)
    assert states.shape == (1, 2, kept, 4) and states.dtype == torch.float32
    ref_out, ref_last = scan64(*(x[k].double() if x[k] is not None and k not in ("A", "D", "delta_bias") else x[k]
                                 for k in NAMES[:8]), True, x["initial_state"].double())
    check("out", out, ref_out)
    check("last_state", last, ref_last)


@pytest.mark.interpreter
@pytest.mark.parametrize("kernels", ["segment", "lanes"])
def test_triton_first_block_kept(kernels, monkeypatch):
    """The layout of long rows (the first block's state saved too, KEEP_FIRST_MIN_L) on a short one, the threshold
    lowered: forward and every gradient against float64, segment kernels or both lanes kernels."""
    from matten_kernels.selective_scan import _ops, triton_fwd

    monkeypatch.setattr(triton_fwd, "KEEP_FIRST_MIN_L", 0)
    if kernels == "lanes":
        monkeypatch.setattr(_ops, "use_lanes", lambda *a, **k: True)
        monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: True)
    run_case("triton", make_inputs(1, 8, 128, 2, h0=True), True, True)  # fp32: two 64-step windows a channel pair


@pytest.mark.interpreter
@pytest.mark.parametrize("keep_first", [False, True], ids=["short-row", "long-row"])
@pytest.mark.parametrize("forward", ["segment", "lanes"])
def test_triton_states_saved_for_lanes_backward(forward, keep_first, monkeypatch):
    """Memory: where the lanes backward will read the states, the forward saves one a lanes-backward window (its
    only reads) instead of one every 64 steps. fp32 in the interpreter with dim 3 (one channel a warp): 128-step
    windows, so L = 384 saves 3 states (2 without the first) where 64-step spacing saves 6 (5). Both forward kernels
    (the lanes one with one 16-byte vector a lane: 128-step windows too), forward and every gradient against
    float64."""
    from matten_kernels.selective_scan import _ops, triton_fwd

    if keep_first:
        monkeypatch.setattr(triton_fwd, "KEEP_FIRST_MIN_L", 0)
    monkeypatch.setattr(_ops, "use_lanes", lambda *a, **k: forward == "lanes")
    monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: True)
    x = make_inputs(1, 3, 384, 2, h0=True)
    _, _, states = _ops.selective_scan_fwd_op(*(x[k] for k in NAMES), True)
    assert states.shape == (1, 3, 3 if keep_first else 2, 2)
    assert triton_fwd.saved_layout(states, 384) == (128, keep_first)
    run_case("triton", x, True, True)


@pytest.mark.interpreter
def test_triton_deterministic_after_forward_recomputes_states(monkeypatch, caplog):
    """States saved for the lanes backward (one a 128-step window), then the segment backward chosen (as when
    torch's deterministic mode is turned on between forward and backward): the forward runs again with the 64-step
    spacing the segment backward reads, says so in a warning, and every gradient matches float64."""
    from matten_kernels.selective_scan import _ops

    monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: True)
    x = make_inputs(1, 3, 384, 2, h0=True)
    leaves = {k: x[k].clone().requires_grad_() for k in NAMES}
    leaves64 = {k: x[k].double().requires_grad_() for k in NAMES}
    out = selective_scan(*(leaves[k] for k in NAMES[:8]), True, initial_state=leaves["initial_state"],
                         backend="triton")
    monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: False)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="matten_kernels"):
        out.backward(dout)
    assert any("deterministic mode was turned on after the forward" in r.message for r in caplog.records)
    ref_out, _ = scan64(*(leaves64[k] for k in NAMES[:8]), True, leaves64["initial_state"])
    ref_out.backward(dout.double())
    check("out", out, ref_out)
    for k in NAMES:
        check(f"d{k}", leaves[k].grad, leaves64[k].grad)


def test_ref_against_scan64_float64_inputs():
    """The library reference run in float64 (how other tests use it) agrees with the independent loop."""
    x = make_inputs(2, 3, 33, 5, G=None, h0=True)
    x64 = {k: v.double() if v is not None and k not in ("A", "D", "delta_bias") else v for k, v in x.items()}
    out, last = selective_scan_ref(*(x64[k] for k in NAMES[:8]), True, True, initial_state=x["initial_state"])
    ref_out, ref_last = scan64(*(x[k].double() if x[k] is not None else None for k in NAMES[:8]), True,
                               x["initial_state"].double())
    check("out", out, ref_out, 1e-10)
    check("last", last, ref_last, 1e-10)


# ---------------------------------------------------------------------------------------------------------------
# validation


def _good(**over):
    x = make_inputs(2, 4, 8, 3, h0=True)
    x.update(over)
    return x


BAD = [
    ("u", dict(u=torch.randn(2, 4)), ValueError),
    ("delta", dict(delta=torch.randn(2, 4, 9)), ValueError),
    ("delta", dict(delta=torch.randn(2, 4, 8, dtype=torch.float64)), TypeError),
    ("A", dict(A=torch.randn(4, 3, dtype=torch.float64)), TypeError),
    ("A", dict(A=torch.randn(5, 3)), ValueError),
    ("A", dict(A=torch.randn(4, 257)), ValueError),
    ("B", dict(B=torch.randn(2, 3, 9)), ValueError),
    ("B", dict(B=torch.randn(2, 3, 3, 8)), ValueError),  # dim 4 % G 3 != 0
    ("C", dict(C=torch.randn(2, 8)), ValueError),
    ("C", dict(C=torch.randn(2, 3, 8).half()), TypeError),
    ("D", dict(D=torch.randn(4).half()), TypeError),
    ("D", dict(D=torch.randn(5)), ValueError),
    ("delta_bias", dict(delta_bias=torch.randn(4, dtype=torch.float64)), TypeError),
    ("z", dict(z=torch.randn(2, 4, 7)), ValueError),
    ("initial_state", dict(initial_state=torch.randn(2, 4, 4)), ValueError),
    ("initial_state", dict(initial_state=torch.randn(2, 4, 3).half()), TypeError),
    ("u", dict(u=torch.randn(2, 4, 8, dtype=torch.float64), delta=torch.randn(2, 4, 8, dtype=torch.float64)),
     TypeError),
]


@pytest.mark.parametrize("name, over, exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_validation_errors(name, over, exc):
    x = _good(**over)
    with pytest.raises(exc, match=name):
        selective_scan(*(x[k] for k in NAMES[:8]), initial_state=x["initial_state"], backend="ref")


def test_validation_L0_and_backend():
    x = _good()
    with pytest.raises(ValueError, match="L == 0"):
        e = torch.empty(2, 4, 0)
        selective_scan(e, e, x["A"], torch.empty(2, 3, 0), torch.empty(2, 3, 0), backend="ref")
    with pytest.raises(ValueError, match="backend"):
        selective_scan(*(x[k] for k in NAMES[:5]), backend="nope")
    with pytest.raises(TypeError, match="delta_softplus"):
        selective_scan(*(x[k] for k in NAMES[:5]), delta_softplus="yes", backend="ref")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    x = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        selective_scan(*(x[k] for k in NAMES[:5]), backend="triton")


def test_cuda_backend_without_extension_raises_clearly():
    x = _good()
    with pytest.raises((NotImplementedError, RuntimeError, ImportError, ValueError), match="(?i)cuda"):
        selective_scan(*(x[k] for k in NAMES[:5]), backend="cuda")


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration


@pytest.mark.interpreter
def test_opcheck_fwd_op():
    from matten_kernels.selective_scan._ops import selective_scan_fwd_op

    x = make_inputs(1, 3, 5, 2, h0=True)
    args = tuple(x[k].requires_grad_() if x[k] is not None else None for k in NAMES) + (True,)
    # test_aot_dispatch_dynamic is exercised by test_torch_compile_fullgraph below (it costs minutes here)
    res = torch.library.opcheck(selective_scan_fwd_op, args,
                                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    log.info("opcheck: %s", res)
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.interpreter
def test_torch_compile_fullgraph():
    """A function calling selective_scan traces whole (fake kernels + autograd); aot_eager keeps it fast on CPU."""
    torch._dynamo.reset()
    x = make_inputs(1, 3, 20, 2, h0=True)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}

    def f(u, delta, A, B, C, D, z, delta_bias, h0):
        out, last = selective_scan(u * 1.5, delta, A, B, C, D, z, delta_bias, True, True, initial_state=h0,
                                   backend="triton")
        return out.square().sum() + last.sum()

    args = [leaves[k] for k in NAMES]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    loss.backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    f(*args).backward()
    check("compiled loss", loss.detach(), f(*args).detach())
    for k, g1, a in zip(NAMES, grads, args):
        check(f"compiled d{k}", g1, a.grad)


# The lanes forward (triton_fwd_lanes.py) is chosen by shape (long 16-bit sequences over many channels, never in
# these CPU tests); forced here on the same float64 checks, forward and every gradient (the backward runs from the
# states it saved). Few states and channels: the interpreter runs its scans element by element. fp32 in the
# interpreter: windows of 128 steps, so L = 1 and 17 are only a partial (TAIL) window,
# 130 and 257 whole windows and a partial one, 256 two whole ones.
@pytest.mark.parametrize("shape, opts", [
    pytest.param((1, 3, 1, 1, None), OPTIONS[0].values[0], id="L1-N1-all-on"),
    pytest.param((2, 3, 17, 4, None), OPTIONS[1].values[0], id="L17-dim3-all-off"),
    pytest.param((1, 2, 130, 5, 2), OPTIONS[2].values[0], id="L130-N5-G2-D-bias-softplus-last"),
    pytest.param((1, 2, 257, 3, None), OPTIONS[3].values[0], id="L257-z-h0"),
    pytest.param((1, 1, 256, 2, None), OPTIONS[0].values[0], id="L256-whole-windows-all-on"),
])
@pytest.mark.interpreter
def test_triton_lanes_forward_matches_float64(shape, opts, monkeypatch):
    _forced_lanes_case("use_lanes", shape, opts, monkeypatch)


# The same with two channels a warp (lanes_fwd_cpw picks it where the grid allows; forced here): 16 lanes a channel,
# windows of 64 steps in fp32, B/C in one group or two of two channels; the launches must have taken CPW 2.
@pytest.mark.parametrize("shape, opts", [
    pytest.param((1, 2, 1, 1, None), OPTIONS[0].values[0], id="L1-all-on"),
    pytest.param((2, 4, 130, 5, 2), OPTIONS[2].values[0], id="L130-N5-G2-D-bias-softplus-last"),
    pytest.param((1, 2, 193, 3, None), OPTIONS[3].values[0], id="L193-z-h0"),
    pytest.param((1, 4, 128, 2, None), OPTIONS[1].values[0], id="L128-whole-windows-all-off"),
])
@pytest.mark.interpreter
def test_triton_lanes_forward_two_channels_a_warp(shape, opts, monkeypatch):
    from matten_kernels.selective_scan import triton_fwd_lanes

    cpws = []
    launch = triton_fwd_lanes.launch
    monkeypatch.setattr(triton_fwd_lanes, "CPW_OVERRIDE", 2)
    monkeypatch.setattr(triton_fwd_lanes, "launch", lambda k, g, a, m: cpws.append(m["CPW"]) or launch(k, g, a, m))
    _forced_lanes_case("use_lanes", shape, opts, monkeypatch)
    assert cpws and set(cpws) == {2}, cpws


# The lanes forward with two warps a program (NW, an A/B knob: the warps share one row of B/C, staged in shared
# memory where the window loop is pipelined, STAGES > 1; the interpreter runs the same arithmetic): one and two
# channels a warp, B/C in one group or two (each group the whole program's channels), whole and partial windows.
@pytest.mark.parametrize("cpw, shape, opts", [
    pytest.param(1, (1, 4, 130, 5, 2), OPTIONS[2].values[0], id="cpw1-L130-N5-G2-D-bias-softplus-last"),
    pytest.param(1, (2, 2, 257, 3, None), OPTIONS[3].values[0], id="cpw1-L257-z-h0"),
    pytest.param(2, (1, 4, 130, 2, None), OPTIONS[0].values[0], id="cpw2-L130-all-on"),
])
@pytest.mark.interpreter
def test_triton_lanes_forward_warps_a_program(cpw, shape, opts, monkeypatch):
    from matten_kernels.selective_scan import triton_fwd_lanes

    metas = []
    launch = triton_fwd_lanes.launch
    monkeypatch.setattr(triton_fwd_lanes, "CPW_OVERRIDE", cpw)
    monkeypatch.setattr(triton_fwd_lanes, "META_OVERRIDES", {"NW": 2, "STAGES": 2})
    monkeypatch.setattr(triton_fwd_lanes, "launch",
                        lambda k, g, a, m: metas.append((g, m["NW"], m["num_warps"])) or launch(k, g, a, m))
    _forced_lanes_case("use_lanes", shape, opts, monkeypatch)
    batch, dim = shape[:2]
    assert metas and set(metas) == {((dim // (2 * cpw), batch), 2, 2)}, metas


# ... and in bf16 (the unidirectional launch's 32-bit word loads of u, delta, B, C) bit for bit one warp a program's.
@pytest.mark.interpreter
def test_triton_lanes_forward_warps_a_program_bf16_words(monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_fwd_lanes

    monkeypatch.setattr(_ops, "use_lanes", lambda *a, **k: True)
    monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: False)
    metas = []
    launch = triton_fwd_lanes.launch
    monkeypatch.setattr(triton_fwd_lanes, "launch",
                        lambda k, g, a, m: metas.append((m["NW"], m["WORDS"])) or launch(k, g, a, m))
    x = make_inputs(1, 4, 512, 3, D=True, z=True, bias=True, h0=True)
    x = {k: (v.bfloat16() if v is not None and k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    outs = []
    for over in ({"NW": 4, "STAGES": 2}, {}):
        monkeypatch.setattr(triton_fwd_lanes, "META_OVERRIDES", dict(over))
        outs.append(selective_scan(*(x[k] for k in NAMES[:8]), True, True, initial_state=x["initial_state"],
                                   backend="triton"))
    assert metas == [(4, True), (1, True)], metas
    for got, ref in zip(*outs):
        assert torch.equal(got, ref)


def _forced_lanes_case(chooser, shape, opts, monkeypatch):
    """run_case with the lanes kernel that ``_ops.<chooser>`` picks forced on, and a check that it ran."""
    from matten_kernels.selective_scan import _ops

    chosen = []
    monkeypatch.setattr(_ops, chooser, lambda *a, **k: chosen.append(True) or True)
    Dz, z, bias, sp, h0, last = opts
    x = make_inputs(*shape, D=Dz, z=z, bias=bias, h0=h0)
    run_case("triton", x, sp, last)
    assert chosen, f"{chooser} was not consulted"


# The lanes backward (triton_bwd_lanes.py), chosen by shape like the lanes forward, forced here on the float64
# checks: every gradient, from the states either forward saved. fp32 in the interpreter: 4 steps per lane, so windows
# of 64 steps with two channels per warp (dim 8: 4 warps; dim 4 in 2 groups: 1 warp) and of 128 with one (dim 3).
@pytest.mark.parametrize("shape, opts", [
    pytest.param((1, 8, 128, 2, None), OPTIONS[0].values[0], id="L128-dim8-all-on"),
    pytest.param((2, 3, 128, 5, None), OPTIONS[1].values[0], id="L128-dim3-N5-all-off"),
    pytest.param((1, 4, 192, 3, 2), OPTIONS[2].values[0], id="L192-G2-D-bias-softplus-last"),
    pytest.param((1, 8, 64, 1, None), OPTIONS[3].values[0], id="L64-N1-z-h0"),
])
@pytest.mark.interpreter
def test_triton_lanes_backward_matches_float64(shape, opts, monkeypatch):
    _forced_lanes_case("use_lanes_bwd", shape, opts, monkeypatch)


# The same with a row's windows split into segments (lanes_bwd_segments picks them where the grid's last wave would
# idle; forced here): 3 or 5 windows of 64 steps in 2 or 3 segments of unequal length, every option on (the r carried
# between segments, dlast_state only into the first, dinitial_state only from the last, D / delta_bias summed over
# the segments' partials). The launches must be one-dimensional grids of NSEG programs a row group.
@pytest.mark.parametrize("shape, opts, nseg", [
    pytest.param((2, 8, 192, 3, None), OPTIONS[0].values[0], 2, id="L192-3-windows-2-segments-all-on"),
    pytest.param((1, 4, 320, 2, 2), OPTIONS[2].values[0], 3, id="L320-G2-5-windows-3-segments"),
])
@pytest.mark.interpreter
def test_triton_lanes_backward_segments(shape, opts, nseg, monkeypatch):
    from matten_kernels.selective_scan import triton_bwd_lanes

    grids = []
    launch = triton_bwd_lanes.launch
    monkeypatch.setitem(triton_bwd_lanes._META_OVERRIDES, "NSEG", nseg)
    monkeypatch.setattr(triton_bwd_lanes, "launch", lambda k, g, a, m: grids.append(
        (g, m["NSEG"], m["CPW"] * m["NW"])) or launch(k, g, a, m))
    _forced_lanes_case("use_lanes_bwd", shape, opts, monkeypatch)
    batch, dim = shape[:2]
    assert len(grids) == 1 and grids[0][:2] == ((nseg * batch * dim // grids[0][2],), nseg), grids


# The lanes backward's reduce-scatter of dB / dC over a warp's channel pair (RS, an A/B knob; bf16 only: 8 steps a
# lane) against the butterfly: the pair's sums are the same additions, so every gradient must match bit for bit (a
# half sent to the wrong lane, or stored at the other half's steps, does not). dim 8 (4 warps of 2 channels) and 4 in
# 2 B/C groups (2 warps), two 128-step windows.
@pytest.mark.parametrize("shape", [(1, 8, 256, 3, None), (2, 4, 256, 2, 2)], ids=["dim8", "dim4-G2"])
@pytest.mark.interpreter
def test_triton_lanes_backward_reduce_scatter_bit_for_bit(shape, monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_bwd_lanes

    monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: True)
    metas = []
    launch = triton_bwd_lanes.launch
    monkeypatch.setattr(triton_bwd_lanes, "launch",
                        lambda k, g, a, m: metas.append((m["CPW"], m["RS"])) or launch(k, g, a, m))
    x = make_inputs(*shape, D=True, z=True, bias=True, h0=True)
    x = {k: (v.bfloat16() if v is not None and k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    L = shape[2]
    results = []
    for over in ({"RS": 1}, {}):
        monkeypatch.setattr(triton_bwd_lanes, "_META_OVERRIDES", dict(over))
        leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
        out, last = selective_scan(*(leaves[k] for k in NAMES[:8]), True, True, initial_state=leaves["initial_state"],
                                   backend="triton")
        (out.float() * torch.linspace(-1, 1, L)).sum().add(last.sum()).backward()
        results.append([leaves[k].grad for k in NAMES if leaves[k] is not None])
    assert metas == [(2, 1), (2, 0)], metas
    for k, got, ref in zip([k for k in NAMES if x[k] is not None], *results):
        assert torch.equal(got, ref), k


def test_lanes_backward_segments_rule():
    """Segments where whole rows leave the last round of programs mostly empty (global XL: 576 programs on 264 slots
    of an H200 are 3 rounds, of which the last 18% full; 4 segments a row make it 2.25 rows' time), none where the
    rounds are nearly full (global S: 768 programs, 2.91) or a segment would be under 4 windows."""
    from matten_kernels.selective_scan.triton_bwd_lanes import lanes_bwd_segments

    def t(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    assert lanes_bwd_segments(t(2, 2304, 4096), t(2, 16, 4096), t(2, 16, 4096)) == 4  # global XL
    assert lanes_bwd_segments(t(8, 768, 4096), t(8, 16, 4096), t(8, 16, 4096)) == 1  # global S
    assert lanes_bwd_segments(t(1, 2304, 16384), t(1, 16, 16384), t(1, 16, 16384)) == 7  # long: 288 programs, 8/7
    assert lanes_bwd_segments(t(2, 2304, 1024), t(2, 16, 1024), t(2, 16, 1024)) == 2  # 8 windows: 2 of 4


def test_lanes_backward_choice(monkeypatch):
    """use_lanes_bwd takes the shapes it was measured faster on (SPEC section 7, bf16: global XL, global S, spatial XL,
    and long since its rows are split into segments: one whole round of programs, 2,112 channels on 132 SMs, in rows
    of 16 windows or more) and leaves the others, fp32, N > 16, partial windows and deterministic mode to the segment backward; the
    channels per warp and program fit the B/C groups and the saved states."""
    from matten_kernels.selective_scan.triton_bwd_lanes import lanes_bwd_config, use_lanes_bwd

    def u(batch, dim, L, dtype=torch.bfloat16):
        return torch.empty(batch, dim, L, dtype=dtype, device="meta")

    assert use_lanes_bwd(u(2, 2304, 4096), 16)  # global XL
    assert use_lanes_bwd(u(8, 768, 4096), 16)  # global S
    assert use_lanes_bwd(u(1, 2304, 16384), 16)  # long: 288 programs, 264 slots
    assert not use_lanes_bwd(u(1, 2048, 16384), 16)  # under one round of programs
    assert not use_lanes_bwd(u(1, 2304, 1024), 16)  # 8 windows a row: not enough for segments (not measured)
    assert use_lanes_bwd(u(2, 1600, 1024), 16)  # 24 channels an SM
    assert use_lanes_bwd(u(32, 2304, 256), 16)  # spatial XL: two windows a row
    assert not use_lanes_bwd(u(32, 2304, 16), 16)  # temporal XL: not a whole window
    assert not use_lanes_bwd(u(2, 2304, 4096, torch.float32), 16)
    assert not use_lanes_bwd(u(2, 2304, 4096), 64)
    assert not use_lanes_bwd(u(2, 2304, 4100), 16)  # a partial window
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not use_lanes_bwd(u(2, 2304, 4096), 16)
    assert lanes_bwd_config(2304, 1, 1, 2) == (2, 4)
    assert lanes_bwd_config(2304, 1, 1152, 2) == (2, 1)  # 2 channels per C group
    assert lanes_bwd_config(2304, 1, 768, 2) == (1, 1)  # 3 channels per C group
    assert lanes_bwd_config(6, 2, 1, 2) == (1, 1)
    assert lanes_bwd_config(2304, 1, 1, 4) == (2, 4)  # fp32: 16 lanes x 4 steps still start on saved states


def test_lanes_forward_choice():
    """use_lanes takes the shapes it was measured faster on (SPEC section 7, bf16, H200: global XL, global S and long)
    and leaves the others, other dtypes, N > 16, under one round of programs and misaligned rows to the segment
    kernel."""
    from matten_kernels.selective_scan.triton_fwd_lanes import use_lanes

    def u(batch, dim, L, dtype=torch.bfloat16):
        return torch.empty(batch, dim, L, dtype=dtype, device="meta")

    assert use_lanes(u(2, 2304, 4096), u(2, 2304, 4096), None, 16)  # global XL
    assert use_lanes(u(8, 768, 4096), u(8, 768, 4096), u(8, 768, 4096), 16)  # global S, with z
    assert use_lanes(u(1, 2304, 16384), u(1, 2304, 16384), None, 16)  # long: 1.45 rounds of programs
    assert not use_lanes(u(1, 1536, 16384), u(1, 1536, 16384), None, 16)  # under one round (1,584 on 132 SMs)
    assert not use_lanes(u(32, 2304, 256), u(32, 2304, 256), None, 16)  # spatial XL: short
    assert not use_lanes(u(512, 2304, 16), u(512, 2304, 16), None, 16)  # temporal XL
    assert not use_lanes(u(2, 2304, 4096, torch.float32), u(2, 2304, 4096, torch.float32), None, 16)
    assert not use_lanes(u(2, 2304, 4096), u(2, 2304, 4096), None, 64)
    assert not use_lanes(u(2, 2304, 4104), u(2, 2304, 4104), None, 16)  # rows not 16-element aligned
    t = torch.empty(2, 4096, 2304, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    assert not use_lanes(t, t, None, 16)  # time not contiguous (the op copies such inputs first)


def test_lanes_forward_bidirectional_choice():
    """use_lanes_bi: both directions' rows as use_lanes takes them, and whole windows (the reverse direction starts at
    the row's end): global XL, S and long in 16-bit dtypes; not a partial window, fp32, under one round of programs
    or a backward direction's misaligned rows."""
    from matten_kernels.selective_scan.triton_fwd_lanes import use_lanes_bi

    def u(batch, dim, L, dtype=torch.bfloat16):
        return torch.empty(batch, dim, L, dtype=dtype, device="meta")

    x = u(2, 2304, 4096)
    assert use_lanes_bi(x, x, x, x, None, 16)  # global XL
    assert use_lanes_bi(u(8, 768, 4096), u(8, 768, 4096), u(8, 768, 4096), u(8, 768, 4096), u(8, 768, 4096), 16)
    y = u(2, 2304, 4112)  # 16-element aligned, not whole 256-step windows
    assert not use_lanes_bi(y, y, y, y, None, 16)
    f = u(2, 2304, 4096, torch.float32)
    assert not use_lanes_bi(f, f, f, f, None, 16)
    t = torch.empty(2, 4096, 2304, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    assert not use_lanes_bi(x, x, t, x, None, 16)  # u_b not time contiguous
    assert use_lanes_bi(u(1, 2304, 16384), u(1, 2304, 16384), u(1, 2304, 16384), u(1, 2304, 16384), None, 16)  # long
    z = u(1, 1536, 16384)
    assert not use_lanes_bi(z, z, z, z, None, 16)  # under one round of programs


def test_lanes_backward_bidirectional_choice():
    """use_lanes_bi_bwd: the uni rule (global XL, S and long in 16-bit dtypes, not fp32) with one window for both
    directions, so that one spacing of saved states serves both; the bidirectional forward then saves a state a
    window (128 steps at two channels a warp: half the states of every 64 steps), else every SAVE_STEPS."""
    from matten_kernels.selective_scan._ops import _bi_save_steps
    from matten_kernels.selective_scan.triton_bwd_lanes import use_lanes_bi_bwd

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, B = t(2, 2304, 4096), t(2, 16, 4096)
    assert use_lanes_bi_bwd(x, B, B, B, B, 16) and _bi_save_steps(x, B, B, None, None, 16) == 128  # global XL
    assert use_lanes_bi_bwd(t(8, 768, 4096), t(8, 16, 4096), t(8, 16, 4096), t(8, 16, 4096), t(8, 16, 4096), 16)
    G768 = t(2, 768, 16, 4096)  # 3 channels a group: one channel a warp, 256-step windows
    assert not use_lanes_bi_bwd(x, B, B, B, G768, 16)
    assert _bi_save_steps(x, B, B, B, G768, 16) == 64
    assert use_lanes_bi_bwd(x, G768, G768, G768, G768, 16) and _bi_save_steps(x, G768, G768, None, None, 16) == 256
    long, Bl = t(1, 2304, 16384), t(1, 16, 16384)
    assert use_lanes_bi_bwd(long, Bl, Bl, Bl, Bl, 16) and _bi_save_steps(long, Bl, Bl, None, None, 16) == 128
    short = t(1, 2048, 16384)  # under one round of programs
    assert not use_lanes_bi_bwd(short, Bl, Bl, Bl, Bl, 16) and _bi_save_steps(short, Bl, Bl, None, None, 16) == 64
    f = t(2, 2304, 4096, dtype=torch.float32)
    assert not use_lanes_bi_bwd(f, B.float(), B.float(), B.float(), B.float(), 16)


def test_lanes_forward_channels_per_warp():
    """Two channels a warp where a pair shares its B/C groups, the half window is whole saved blocks and the grid
    loses no waves and fills one round (132 SMs, 12 one-warp programs each); one elsewhere, global XL and long
    included (measured slower there)."""
    from matten_kernels.selective_scan.triton_fwd_lanes import lanes_fwd_cpw

    W1 = 256  # bf16: 32 lanes x 8 steps
    assert lanes_fwd_cpw(2, 2304, 1, 1, W1, 128, 132) == 1  # global XL: 2304 programs are 1.45 waves
    assert lanes_fwd_cpw(8, 768, 1, 1, W1, 128, 132) == 2  # global S: 3072 programs, 1.94 waves
    assert lanes_fwd_cpw(1, 2304, 1, 1, W1, 64, 132) == 1  # long: 1152 programs, 0.73 of a round (2304 are 1.45)
    assert lanes_fwd_cpw(2, 1584, 1, 1, W1, 64, 132) == 2  # 1584 programs: one whole round (2 rounds' work either way)
    assert lanes_fwd_cpw(8, 768, 1, 1, W1, 256, 132) == 1  # states every 256 steps: the 128-step window cannot
    assert lanes_fwd_cpw(8, 768, 1, 256, W1, 128, 132) == 1  # 3 channels a C group
    assert lanes_fwd_cpw(8, 768, 384, 1, W1, 128, 132) == 2  # 2 a B group
    assert lanes_fwd_cpw(1, 64, 1, 1, W1, 64, 132) == 1  # a fraction of a wave either way: twice the work a warp


# bf16 rows loaded two elements a 32-bit word and unpacked by shift / mask (WORDS, the lanes kernels' default for
# bf16) against the element loads and Triton's conversion: the unpacking is exact, so outputs and every gradient must
# match bit for bit (a swapped half or a lost sign bit does not); and both within bf16 rounding of float64. The
# interpreter runs bf16 here (fp16 keeps the element loads). Windows of 256 (forward) and 128 (backward) steps; L = 300
# adds the forward's partial window (its TAIL launch keeps element loads).
@pytest.mark.parametrize("L, backward", [(512, True), (300, False)], ids=["L512-fwd-bwd", "L300-fwd-tail"])
@pytest.mark.interpreter
def test_triton_lanes_bf16_word_loads(L, backward, monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_fwd_lanes

    monkeypatch.setattr(_ops, "use_lanes", lambda *a, **k: True)
    monkeypatch.setattr(_ops, "use_lanes_bwd", lambda *a, **k: backward)
    words = []
    launch = triton_fwd_lanes.launch
    monkeypatch.setattr(triton_fwd_lanes, "launch", lambda k, g, a, m: words.append(m["WORDS"]) or launch(k, g, a, m))
    x = make_inputs(1, 4, L, 3, D=True, z=True, bias=True, h0=True)
    x = {k: (v.bfloat16() if v is not None and k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    results = []
    for over in ({}, {"WORDS": False}):
        monkeypatch.setattr(triton_fwd_lanes, "META_OVERRIDES", dict(over))
        leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
        out, last = selective_scan(*(leaves[k] for k in NAMES[:8]), True, True, initial_state=leaves["initial_state"],
                                   backend="triton")
        (out.float() * torch.linspace(-1, 1, L)).sum().add(last.sum()).backward()
        results.append([out, last] + [leaves[k].grad for k in NAMES if leaves[k] is not None])
    assert words[0] is True and False in words, words
    for got, ref in zip(*results):
        assert torch.equal(got, ref)
    x64 = {k: (v.double().requires_grad_() if v is not None else None) for k, v in x.items()}
    ref, ref_last = scan64(*(x64[k] for k in NAMES[:8]), softplus=True, initial_state=x64["initial_state"])
    check("out", results[0][0], ref, tol=3e-2)
    check("last_state", results[0][1], ref_last, tol=1e-2)
    (ref * torch.linspace(-1, 1, L, dtype=torch.float64)).sum().add(ref_last.sum()).backward()
    for k, got in zip([k for k in NAMES if x[k] is not None], results[0][2:]):
        check(f"d{k}", got, x64[k].grad, tol=5e-2)
