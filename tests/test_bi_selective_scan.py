"""bi_selective_scan: ref and triton (interpreter) vs a float64 composition of two sequential scans with explicit flips.

    expected = (y_f + flip(scan(flip(inputs_b)))) [/ 2] [* silu(z)]      (scan64 of test_selective_scan, float64)

Modes: v2 (every *_b given), v1 (only A_b), shared (no *_b). Tolerance rule as test_selective_scan.py:
max |got - ref| <= 1e-4 * max(1, max |ref|) for the output and every gradient (random cotangent), errors logged first.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matten_kernels import bi_selective_scan

from test_selective_scan import check, force_segments, make_inputs, scan64

FWD = ("u", "delta", "A", "B", "C", "D", "delta_bias")
BWD = tuple(k + "_b" for k in FWD)


def composition64(x, xb, z, softplus, divide_out):
    """Vim-style: scan the forward inputs; flip the backward inputs, scan, flip back; add; gate once."""
    twin = {k: (xb.get(k + "_b") if xb.get(k + "_b") is not None else x[k]) for k in FWD}
    y_f, _ = scan64(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], softplus)
    flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
    y_b, _ = scan64(flip(twin["u"]), flip(twin["delta"]), twin["A"], flip(twin["B"]), flip(twin["C"]), twin["D"],
                    None, twin["delta_bias"], softplus)
    y = y_f + y_b.flip(-1)
    if divide_out:
        y = y / 2
    if z is not None:
        y = y * F.silu(z)
    return y


def make_bi(batch, dim, L, N, G, mode, *, D=True, z=True, bias=True):
    x = make_inputs(batch, dim, L, N, G, D=D, z=z, bias=bias, seed=0)
    other = make_inputs(batch, dim, L, N, G, D=D, z=False, bias=bias, seed=1)
    if mode == "v2":
        xb = {k + "_b": other[k] for k in FWD}
    elif mode == "v1":
        xb = {"A_b": other["A"]}
    else:
        xb = {}
    return x, xb


def run_bi(backend, x, xb, softplus, divide_out, seed=2):
    g = torch.Generator().manual_seed(seed)
    req = lambda v, dt=None: None if v is None else (v.clone() if dt is None else v.double()).requires_grad_()  # noqa
    lx = {k: req(v) for k, v in x.items() if k != "initial_state"}
    lxb = {k: req(v) for k, v in xb.items()}
    dx = {k: req(v, 1) for k, v in x.items() if k != "initial_state"}
    dxb = {k: req(v, 1) for k, v in xb.items()}
    out = bi_selective_scan(*(lx[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), softplus,
                            **lxb, divide_out=divide_out, backend=backend)
    ref = composition64({k: dx[k] for k in FWD}, dxb, dx["z"], softplus, divide_out)
    check("out", out, ref)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    ref.backward(dout.double())
    for k, v in list(lx.items()) + list(lxb.items()):
        if v is not None:
            check(f"d{k}", v.grad, (dx.get(k) if k in dx else dxb[k]).grad)


@pytest.mark.parametrize("mode", ["v2", "v1", "shared"])
@pytest.mark.parametrize("shape", [pytest.param((2, 3, 17, 4, None), id="L17"),
                                   pytest.param((1, 4, 130, 2, 2), id="L130-G2")])
def test_bi_ref_matches_composition(mode, shape):
    x, xb = make_bi(*shape, mode)
    run_bi("ref", x, xb, True, mode == "v1")


@pytest.mark.parametrize("mode, shape, opts", [
    pytest.param("v2", (2, 5, 40, 4, None), (True, True, True, True, True), id="v2-L40-dim5-all-on"),
    pytest.param("v1", (1, 4, 130, 2, 2), (True, False, True, True, False), id="v1-L130-G2-noz"),
    pytest.param("shared", (1, 3, 1, 1, None), (False, True, False, False, True), id="shared-L1-N1-z-half"),
    pytest.param("shared", (1, 3, 66, 3, None), (True, True, True, True, False), id="shared-L66-all-on"),
    pytest.param("v2", (1, 16, 72, 4, None), (True, True, True, True, False), id="v2-L72-dim16-even"),
])
@pytest.mark.interpreter
def test_bi_triton_matches_composition(mode, shape, opts):
    _run_triton(mode, shape, opts)


def _run_triton(mode, shape, opts):
    """run_bi on the Triton backend over make_bi(*shape, mode) with opts (D, z, bias, softplus, divide_out)."""
    D, z, bias, softplus, divide_out = opts
    x, xb = make_bi(*shape, mode, D=D, z=z, bias=bias)
    run_bi("triton", x, xb, softplus, divide_out)


def _launches(module, record, mode, shape, opts, monkeypatch):
    """:func:`_run_triton`, and record(grid, meta) of every launch of ``module``'s kernels, in order."""
    seen = []
    launch = module.launch
    monkeypatch.setattr(module, "launch", lambda k, g, a, m: seen.append(record(g, m)) or launch(k, g, a, m))
    _run_triton(mode, shape, opts)
    return seen


# The lanes forward's two launches (use_lanes_bi: 16-bit rows of whole windows over many channels on the GPU; forced
# here): the backward direction in reverse scan order into the scratch, then the forward one; the segment backward
# reads the states they saved. fp32 in the interpreter: windows of 128 steps (CPW 1) or 64 (CPW 2); L = 128 saves
# no first state, L = 1024 keeps it (keeps_first), with 16 blocks a direction.
@pytest.mark.parametrize("mode, shape, opts, cpw", [
    pytest.param("v2", (2, 4, 128, 3, None), (True, True, True, True, True), 1, id="v2-L128-all-on"),
    pytest.param("v1", (1, 4, 256, 2, 2), (True, False, True, True, False), 2, id="v1-L256-G2-noz-cpw2"),
    pytest.param("shared", (1, 2, 192, 4, None), (False, True, False, False, True), 2, id="shared-L192-z-half-cpw2"),
    pytest.param("v2", (1, 2, 1024, 2, None), (True, True, True, True, False), 2, id="v2-L1024-first-cpw2"),
])
@pytest.mark.interpreter
def test_bi_triton_lanes_forward_matches_composition(mode, shape, opts, cpw, monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_fwd_lanes

    monkeypatch.setattr(_ops, "use_lanes_bi", lambda *a, **k: True)
    monkeypatch.setattr(triton_fwd_lanes, "CPW_OVERRIDE", cpw)
    modes = _launches(triton_fwd_lanes, lambda g, m: (m["REV"], m["MODE"], m["CPW"]), mode, shape, opts, monkeypatch)
    assert modes == [(True, 1, cpw), (False, 2, cpw)], modes


# The lanes backward's two launches (use_lanes_bi_bwd: the uni rule with one window for both directions; forced here):
# the backward direction in reverse scan order (its y into the scratch, its du / ddelta into fp32 scratch where u /
# delta are shared), then the forward one, which adds them; from the states either forward saved a window apart.
# fp32 in the interpreter: windows of 64 steps (two channels a warp) or 128 (one: dim 3); L = 1024 keeps the first
# state.
@pytest.mark.parametrize("mode, shape, opts, lanes_fwd", [
    pytest.param("v2", (2, 4, 128, 3, None), (True, True, True, True, True), True, id="v2-L128-all-on-lanes-fwd"),
    pytest.param("v1", (1, 4, 256, 2, 2), (True, False, True, True, False), False, id="v1-L256-G2-noz"),
    pytest.param("shared", (1, 3, 256, 4, None), (False, True, False, False, True), True, id="shared-L256-dim3-z-half"),
    pytest.param("shared", (1, 8, 192, 3, None), (True, True, True, True, False), False, id="shared-L192-all-on"),
    pytest.param("v2", (1, 2, 1024, 2, None), (True, True, True, True, False), True, id="v2-L1024-first"),
])
@pytest.mark.interpreter
def test_bi_triton_lanes_backward_matches_composition(mode, shape, opts, lanes_fwd, monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_bwd_lanes

    monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: True)
    if lanes_fwd:
        monkeypatch.setattr(_ops, "use_lanes_bi", lambda *a, **k: True)
    launches = _launches(triton_bwd_lanes, lambda g, m: (m["REV"], m["MODE"], m["ACC_U"], m["ACC_DT"]), mode, shape,
                         opts, monkeypatch)
    shared = mode != "v2"
    assert launches == [(True, 1, False, False), (False, 2, shared, shared)], launches


# Both launches with a row's windows in segments (forced): the reverse launch's segments go up in time, its r
# carried forward; shared u / delta (its du / ddelta scratch added by the forward launch), z (its y scratch).
@pytest.mark.parametrize("mode, shape, opts, nseg", [
    pytest.param("shared", (1, 8, 192, 3, None), (True, True, True, True, False), 2, id="shared-L192-all-on-2seg"),
    pytest.param("v2", (2, 4, 256, 2, None), (True, True, True, True, True), 3, id="v2-L256-all-on-3seg"),
])
@pytest.mark.interpreter
def test_bi_triton_lanes_backward_segments(mode, shape, opts, nseg, monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_bwd_lanes

    monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: True)
    monkeypatch.setitem(triton_bwd_lanes._META_OVERRIDES, "NSEG", nseg)
    launches = _launches(triton_bwd_lanes, lambda g, m: (m["REV"], m["NSEG"], len(g)), mode, shape, opts, monkeypatch)
    assert launches == [(True, nseg, 1), (False, nseg, 1)], launches


@pytest.mark.interpreter
def test_bi_triton_lanes_backward_own_groups(monkeypatch):
    """B_b / C_b in their own group count (2, against ungrouped B / C): each direction's launch fits its programs to
    its groups (4 and 2 warps here) over the same window; every gradient against the float64 composition."""
    from matten_kernels.selective_scan import _ops, triton_bwd_lanes

    from test_selective_scan import make_inputs

    launches = []
    launch = triton_bwd_lanes.launch
    monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: True)
    monkeypatch.setattr(triton_bwd_lanes, "launch", lambda k, g, a, m: launches.append((m["REV"], m["NW"])) or
                        launch(k, g, a, m))
    x, xb = make_bi(1, 8, 128, 3, None, "v2")
    grouped = make_inputs(1, 8, 128, 3, 2, D=True, z=False, bias=True, seed=3)
    xb["B_b"], xb["C_b"] = grouped["B"], grouped["C"]
    run_bi("triton", x, xb, True, False)
    assert launches == [(True, 2), (False, 4)], launches


@pytest.mark.interpreter
def test_bi_opcheck_lanes_backward(monkeypatch):
    """With the lanes backward taken (forced; dim 3: one channel a warp, so its 128-step window is not SAVE_STEPS),
    the fake kernel sizes the saved states as the forward does (opcheck's schema, fake-tensor and autograd
    registration checks; L = 128: no state saved, one window a direction)."""
    from matten_kernels.selective_scan import _ops, triton_fwd

    monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: True)
    x, xb = make_bi(1, 3, 128, 1, None, "v2")
    args = tuple(v.clone().requires_grad_() for v in
                 [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [xb[k] for k in BWD])
    states = _ops.bi_selective_scan_fwd_op(*args, True, False)[1]
    assert triton_fwd.saved_layout(states, 128)[0] == 128 and states.shape[2] == 0  # SAVE_STEPS: 1 slot
    res = torch.library.opcheck(_ops.bi_selective_scan_fwd_op, args + (True, False),
                                test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.interpreter
def test_bi_padding_is_exact(monkeypatch):
    """On the GPU bi_selective_scan pads L to a multiple of 16 with u = 0 steps; forced here on the CPU (L = 17, v2,
    every option): outputs and every gradient against the float64 composition, as without padding."""
    from matten_kernels.selective_scan import interface

    monkeypatch.setattr(interface, "BI_PAD_DEVICES", ("cuda", "cpu"))
    padded = []
    monkeypatch.setattr(interface, "_log_bi_padding", lambda L, Lp: padded.append((L, Lp)))
    x, xb = make_bi(1, 3, 17, 2, None, "v2", D=True, z=True, bias=True)
    run_bi("triton", x, xb, True, False)
    assert (17, 32) in padded


@pytest.mark.interpreter
def test_bi_triton_deterministic_mode_matches():
    x, xb = make_bi(1, 4, 40, 3, None, "v2")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_bi("triton", x, xb, True, False)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.interpreter
def test_bi_triton_sequence_segments(monkeypatch):
    """Both directions split into 3 sequence segments (the GPU's config for long rows over few channels; the CPU one
    has a single segment): the summary passes of each direction and the atomic sums over segments, against float64."""
    used = force_segments(monkeypatch, 3)
    x, xb = make_bi(2, 3, 144, 3, None, "v2")  # 144: a multiple of the padding unit, 3 saved blocks
    run_bi("triton", x, xb, True, False)
    assert used == [144, 144], used


def test_bi_validation_errors():
    x, xb = make_bi(2, 4, 8, 3, None, "v2")
    base = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    cases = [("u_b", dict(u_b=torch.randn(2, 4, 9)), ValueError),
             ("A_b", dict(A_b=torch.randn(4, 3, dtype=torch.float64)), TypeError),
             ("A_b", dict(A_b=torch.randn(4, 5)), ValueError),
             ("B_b", dict(B_b=torch.randn(2, 3, 3, 8)), ValueError),
             ("D_b", dict(D_b=torch.randn(3)), ValueError),
             ("delta_bias_b", dict(delta_bias_b=torch.randn(4).half()), TypeError),
             ("divide_out", dict(divide_out=1), TypeError)]
    for name, over, exc in cases:
        with pytest.raises(exc, match=name):
            bi_selective_scan(*base, backend="ref", **over)


@pytest.mark.interpreter
def test_bi_opcheck_and_compile():
    from matten_kernels.selective_scan._ops import bi_selective_scan_fwd_op

    x, xb = make_bi(1, 3, 6, 2, None, "v1")
    args = tuple(v.clone().requires_grad_() if v is not None else None for v in
                 [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] +
                 [xb.get(k) for k in BWD]) + (True, True)
    res = torch.library.opcheck(bi_selective_scan_fwd_op, args)
    assert all(v == "SUCCESS" for v in res.values()), res

    torch._dynamo.reset()

    def f(u, delta, A, B, C, A_b):
        return bi_selective_scan(u, delta, A, B, C, A_b=A_b, delta_softplus=True, backend="triton").square().sum()

    leaves = [x[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C")] + [xb["A_b"].clone()
                                                                                     .requires_grad_()]
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    grads = [v.grad.clone() for v in leaves]
    for v in leaves:
        v.grad = None
    f(*leaves).backward()
    check("compiled loss", loss.detach(), f(*leaves).detach())
    for g1, v in zip(grads, leaves):
        check("compiled grad", g1, v.grad)


# Variants of the bidirectional lanes forward's launches (REV and MODE 1 / 2) that must change nothing, in bf16: the
# output and every gradient of both directions bit for bit against the default launches. WORDS, the word loads (an
# A/B variant here, the default only for the unidirectional scan; see
# test_selective_scan.test_triton_lanes_bf16_word_loads), in v2 and shared modes; NW, two warps a program (an A/B knob
# with STAGES; see test_selective_scan.test_triton_lanes_forward_warps_a_program), which regroups channels and
# nothing else.
@pytest.mark.parametrize("mode, over, key, seen", [
    ("v2", {"WORDS": True}, "WORDS", [True] * 2 + [False] * 2),
    ("shared", {"WORDS": True}, "WORDS", [True] * 2 + [False] * 2),
    ("v2", {"NW": 2, "STAGES": 2}, "NW", [2, 2, 1, 1]),
], ids=["words-v2", "words-shared", "nw2-v2"])
@pytest.mark.interpreter
def test_bi_triton_lanes_forward_variants_bit_for_bit(mode, over, key, seen, monkeypatch):
    from matten_kernels.selective_scan import _ops, triton_fwd_lanes

    monkeypatch.setattr(_ops, "use_lanes_bi", lambda *a, **k: True)
    monkeypatch.setattr(_ops, "use_lanes_bi_bwd", lambda *a, **k: True)
    metas = []
    launch = triton_fwd_lanes.launch
    monkeypatch.setattr(triton_fwd_lanes, "launch", lambda k, g, a, m: metas.append(m[key]) or launch(k, g, a, m))
    x, xb = make_bi(1, 4, 512, 3, None, mode)
    x = {k: (v.bfloat16() if v is not None and k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    xb = {k: (v.bfloat16() if k in ("u_b", "delta_b", "B_b", "C_b") else v) for k, v in xb.items()}
    dout = torch.randn(1, 4, 512, generator=torch.Generator().manual_seed(3)).bfloat16()
    results = []
    for o in (over, {}):
        monkeypatch.setattr(triton_fwd_lanes, "META_OVERRIDES", dict(o))
        lx = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None and k != "initial_state"}
        lxb = {k: v.clone().requires_grad_() for k, v in xb.items()}
        out = bi_selective_scan(*(lx.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), True,
                                **lxb, backend="triton")
        out.backward(dout)
        results.append([out] + [v.grad for v in list(lx.values()) + list(lxb.values())])
    assert metas == seen, metas
    for got, ref in zip(*results):
        assert torch.equal(got, ref)
