"""BiMamba mixer: Vim state-dict compatibility, equality with an explicit Vim-style composition (flips), the fast path
(Triton conv + Triton bidirectional scan) against the slow path, shapes and bad input.

Tolerance rules:
  * fp64 slow path vs the fp64 Vim-style composition: the same maths in another order, so max abs error <= 1e-10.
  * fast path (Triton, fp32; the interpreter on CPU) vs the slow path in float64 on the same weights: max abs error
    of the output and of every parameter gradient <= 2e-4 * (1 + max |reference|) (fp32 accumulation over L <= 33
    steps and a few hundred-term matmuls; the observed error is ~1e-6 relative).
  * GPU, Matten shape (d_model=1152, L=4096, batch 2): fp32 fast vs fp32 slow: relative Frobenius error <= 1e-3 for
    the output and every gradient; bf16 fast vs the fp32 slow path: relative Frobenius error <= 2x that of the bf16
    slow path (plain PyTorch in bf16 with an fp32 scan) vs the same fp32 reference, plus 1e-3 of slack.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from matten_kernels._backend import triton_interpreting
from matten_kernels.modules import BiMamba
from matten_kernels.selective_scan import interface as scan_interface
from matten_kernels.selective_scan import selective_scan_ref

logger = logging.getLogger(__name__)

HAS_TRITON_DEVICE = torch.cuda.is_available() or triton_interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def vim_v2_state_dict_shapes(d_model, d_state=16, d_conv=4, expand=2, dt_rank=None):
    """Key names and shapes of Vision Mamba's mixer ``Mamba(bimamba_type="v2")`` (mamba_simple.py in hustvl/Vim),
    with its defaults bias=False (in_proj/out_proj) and conv_bias=True."""
    E, N, k = expand * d_model, d_state, d_conv
    R = math.ceil(d_model / 16) if dt_rank is None else dt_rank
    return {
        "A_log": (E, N), "D": (E,),
        "A_b_log": (E, N), "D_b": (E,),
        "in_proj.weight": (2 * E, d_model),
        "conv1d.weight": (E, 1, k), "conv1d.bias": (E,),
        "x_proj.weight": (R + 2 * N, E),
        "dt_proj.weight": (E, R), "dt_proj.bias": (E,),
        "conv1d_b.weight": (E, 1, k), "conv1d_b.bias": (E,),
        "x_proj_b.weight": (R + 2 * N, E),
        "dt_proj_b.weight": (E, R), "dt_proj_b.bias": (E,),
        "out_proj.weight": (d_model, E),
    }


def vim_style_forward(m: BiMamba, hidden: torch.Tensor) -> torch.Tensor:
    """Vision Mamba's slow composition: the causal path on xz and on flip(xz), flip back, add; then out_proj."""
    L = hidden.shape[1]
    xz = m.in_proj(hidden).transpose(1, 2)  # (b, 2E, L)

    def direction(xz, conv, x_proj, dt_proj, A_log, D):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :L])  # nn.Conv1d with padding k-1, truncated: causal
        x_dbl = x_proj(x.transpose(1, 2))
        dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(x, dt, -torch.exp(A_log.double()), B.transpose(1, 2), C.transpose(1, 2),
                                  D.double(), z=z, delta_bias=dt_proj.bias.double(), delta_softplus=True)

    out = direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    if m.bimamba == "v2":
        out_b = direction(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b)
        out = out + out_b.flip(-1)
    elif m.bimamba == "v1":  # Vim's bimamba_inner_fn: the flipped causal conv output, shared projections, own A_b
        out = out + direction_v1_backward(m, xz, L)
    if m.divide_out and m.bimamba != "none":
        out = out / 2
    return m.out_proj(out.transpose(1, 2))


def direction_v1_backward(m, xz, L):
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :L])
    x_dbl = m.x_proj(x.transpose(1, 2))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.t()).transpose(1, 2)
    flip = lambda t: t.flip(-1)  # noqa: E731
    out_b = selective_scan_ref(flip(x), flip(dt), -torch.exp(m.A_b_log.double()), flip(B.transpose(1, 2)),
                               flip(C.transpose(1, 2)), m.D.double(), z=flip(z), delta_bias=m.dt_proj.bias.double(),
                               delta_softplus=True)
    return out_b.flip(-1)


def _randomise(m: BiMamba):
    """Move every parameter off its structured init so that a swapped or unused weight would show."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("A_log", "A_b_log")):
                p.add_(0.3 * torch.rand_like(p))
            elif name.startswith("dt_proj") and name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))


# ------------------------------------------------------------------------------------------------------------- CPU
def test_vim_state_dict_loads_strict():
    d_model = 24
    shapes = vim_v2_state_dict_shapes(d_model)
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    m = BiMamba(d_model, bimamba="v2")
    missing_unexpected = m.load_state_dict(sd, strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    own = m.state_dict()
    assert set(own) == set(shapes)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32


def test_parameter_shapes_and_init():
    m = BiMamba(40, d_state=8, d_conv=3, expand=2)
    E, R = 80, 3  # dt_rank auto = ceil(40 / 16)
    assert m.d_inner == E and m.dt_rank == R
    for k, s in vim_v2_state_dict_shapes(40, d_state=8, d_conv=3).items():
        assert tuple(m.state_dict()[k].shape) == s, k
    A = torch.arange(1, 9, dtype=torch.float32).repeat(E, 1)
    assert torch.allclose(m.A_log, torch.log(A)) and torch.allclose(m.A_b_log, torch.log(A))
    assert torch.all(m.D == 1) and torch.all(m.D_b == 1)
    for proj in (m.dt_proj, m.dt_proj_b):
        dt = F.softplus(proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        assert proj.weight.abs().max() <= R ** -0.5
    for name in ("A_log", "A_b_log", "D", "D_b"):
        assert getattr(m, name)._no_weight_decay is True
    v1 = BiMamba(40, bimamba="v1")
    assert {k for k in v1.state_dict()} == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                                            "dt_proj.weight", "dt_proj.bias", "A_log", "D", "A_b_log",
                                            "out_proj.weight"}
    none = BiMamba(40, bimamba="none")
    assert "A_b_log" not in none.state_dict()


@pytest.mark.parametrize("bimamba", ["v2", "v1", "none"])
@pytest.mark.parametrize("divide_out", [False, True], ids=["sum", "divide_out"])
def test_slow_path_equals_vim_style_composition(bimamba, divide_out):
    m = BiMamba(16, bimamba=bimamba, divide_out=divide_out, use_fast_path=False).double()
    _randomise(m)
    hidden = torch.randn(2, 11, 16, dtype=torch.float64)
    out = m(hidden)
    ref = vim_style_forward(m, hidden)
    err = (out - ref).abs()
    logger.info("slow vs Vim-style %s divide_out=%s: max %.3e mean %.3e", bimamba, divide_out, err.max(), err.mean())
    assert out.shape == hidden.shape
    assert err.max() <= 1e-10


def test_shapes_dtypes_and_backends():
    m = BiMamba(16, use_fast_path=False)
    for L in (1, 5):
        out = m(torch.randn(3, L, 16))
        assert out.shape == (3, L, 16) and out.dtype == torch.float32
    # backend=None on CPU resolves to "ref", which is the slow path
    m_auto = BiMamba(16, backend=None)
    m_auto.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(m_auto(x), m(x), rtol=0, atol=0)


def test_bad_input():
    m = BiMamba(16, use_fast_path=False)
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 7, 15))
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(7, 16))
    with pytest.raises(TypeError, match="hidden_states"):
        m(torch.randint(0, 3, (2, 7, 16)))
    with pytest.raises(TypeError, match="hidden_states"):
        m([[0.0] * 16])
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 0, 16))
    with pytest.raises(ValueError, match="bimamba"):
        BiMamba(16, bimamba="v3")
    with pytest.raises(ValueError, match="backend"):
        BiMamba(16, backend="cuda-graphs")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        BiMamba(16, backend="cuda")(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="d_model"):
        BiMamba(0)


def _fast_vs_slow(m_fast: BiMamba, hidden: torch.Tensor, ref_dtype=torch.float64):
    """Run m_fast (fast path) and a copy of it in ref_dtype on the slow path with one random cotangent.

    Returns {name: (fast tensor, reference tensor)} for the output, the input gradient and every parameter gradient."""
    m_ref = copy.deepcopy(m_fast).to(ref_dtype)
    m_ref.use_fast_path = False
    x = hidden.detach().clone().requires_grad_(True)
    x_ref = hidden.detach().to(ref_dtype).requires_grad_(True)
    out = m_fast(x)
    out_ref = m_ref(x_ref)
    cot = torch.randn_like(out_ref)
    (out.float() * cot.float()).sum().backward()
    (out_ref * cot).sum().backward()
    pairs = {"out": (out, out_ref), "d_hidden": (x.grad, x_ref.grad)}
    params_ref = dict(m_ref.named_parameters())
    for name, p in m_fast.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        pairs["d_" + name] = (p.grad, params_ref[name].grad)
    return pairs


def _count_core_calls(monkeypatch) -> list:
    """A list that gets an entry each time the mixer runs its fused core (BiMambaCore)."""
    import matten_kernels.modules.bimamba as bimamba_mod

    calls = []
    apply = bimamba_mod.BiMambaCore.apply
    monkeypatch.setattr(bimamba_mod.BiMambaCore, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


FAST_CASES = [  # (bimamba, L, divide_out, fused); d_model 16 (d_inner 32, dt_rank 1), batch 2
    ("v2", 9, False, False),  # v2 as a composition of the public ops (torch.compile's path)
    ("v1", 9, True, False),
    ("none", 9, False, False),
    ("v2", 33, True, True),  # v2 eager: conv + projections + scan as one node (BiMambaCore)
]


SSM_DTYPE_CASES = [
    (torch.float32,) * 6,
    (torch.float64,) * 6,
    (torch.float32, torch.float64, torch.float32, torch.float64, torch.float32, torch.float64),  # mixed
]


@pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="the SSM parameter kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtypes", SSM_DTYPE_CASES, ids=["fp32", "fp64", "mixed"])
@pytest.mark.parametrize("E,N", [(1, 1), (37, 5), (130, 16)])
def test_ssm_params_kernels_match_torch(E, N, dtypes):
    """The mixer core's parameter preparation and gradient kernels (one launch each) against the same maths as torch
    ops, on sizes that are not multiples of the kernels' blocks; the gradients come back in each parameter's dtype."""
    from matten_kernels.modules import ssm_params

    shapes = [(E, N), (E, N), (E,), (E,), (E,), (E,)]
    params = [torch.randn(s, device=DEVICE, dtype=d) for s, d in zip(shapes, dtypes)]
    got, ref = ssm_params.prepare(*params), ssm_params.prepare_ref(*params)
    for name, g, r in zip(("A", "A_b", "D", "D_b", "bias", "bias_b"), got, ref):
        assert g.dtype == torch.float32 and g.shape == r.shape and g.is_contiguous(), name
        torch.testing.assert_close(g, r, rtol=1e-6, atol=0, msg=name)
    A, A_b = ref[:2]
    upstream = [torch.randn(s, device=DEVICE) for s in shapes]
    args = (upstream[0], upstream[1], A, A_b, *upstream[2:])
    got, ref = ssm_params.grads(*args, dtypes), ssm_params.grads_ref(*args, dtypes)
    for name, g, r, d in zip(("dA_log", "dA_b_log", "dD", "dD_b", "dbias", "dbias_b"), got, ref, dtypes):
        assert g.dtype == d and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-6, atol=0, msg=name)


def _check_fast_vs_slow(bimamba, L, divide_out, fused, monkeypatch):
    calls = _count_core_calls(monkeypatch)
    m = BiMamba(16, bimamba=bimamba, divide_out=divide_out, backend="triton", fuse_core=fused).to(DEVICE)
    _randomise(m)
    pairs = _fast_vs_slow(m, torch.randn(2, L, 16, device=DEVICE))
    # on CUDA an unaligned L goes through bi_selective_scan's padding, not the fused node (BiMamba._fused_core)
    padded = L % scan_interface.BI_ALIGN and DEVICE in scan_interface.BI_PAD_DEVICES
    assert len(calls) == int(fused and not padded)
    for name, (got, ref) in pairs.items():
        err = (got.double() - ref).abs()
        tol = 2e-4 * (1 + ref.abs().max().item())
        logger.info("%s: max err %.3e mean err %.3e (tol %.3e)", name, err.max(), err.mean(), tol)
        assert got.shape == ref.shape, name
        assert err.max().item() <= tol, f"{name}: max error {err.max().item():.3e} > {tol:.3e}"


@pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="the fast path needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bimamba,L,divide_out,fused", FAST_CASES,
                         ids=[f"{b}-L{L}-div{int(d)}-{'fused' if f else 'ops'}" for b, L, d, f in FAST_CASES])
def test_fast_path_matches_slow_path(bimamba, L, divide_out, fused, monkeypatch):
    """Triton conv + Triton bidirectional scan (fp32) vs the slow path in float64 on the same weights, through the
    fused core or the composition of ops (checked: the fused node runs exactly when expected)."""
    _check_fast_vs_slow(bimamba, L, divide_out, fused, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [48, 1008])
def test_fused_core_matches_slow_path_fp32_gpu(L, monkeypatch):
    """The same check through the fused node on CUDA, where it needs L a multiple of 16 (1008: a partial window)."""
    _check_fast_vs_slow("v2", L, False, True, monkeypatch)


# ------------------------------------------------------------------------------------------------------------- GPU
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _fused_vs_composition(m: BiMamba, hidden: torch.Tensor, monkeypatch):
    """The eager v2 fast path (one BiMambaCore node) and the composition of public ops on the same module and
    cotangent: {name: (fused, composition)} for the output, the input gradient and every parameter gradient."""
    calls = _count_core_calls(monkeypatch)
    cot = None
    results = []
    for fused in (True, False):
        if not fused:
            m.fuse_core = False
        m.zero_grad(set_to_none=True)
        x = hidden.detach().clone().requires_grad_(True)
        out = m(x)
        cot = torch.randn_like(out) if cot is None else cot
        (out.float() * cot.float()).sum().backward()
        results.append({"out": out, "d_hidden": x.grad,
                        **{"d_" + k: p.grad.clone() for k, p in m.named_parameters()}})
    assert calls == [1], "the fused path did not run exactly once"
    return {k: (results[0][k], results[1][k]) for k in results[0]}


@pytest.mark.gpu
@pytest.mark.parametrize("bimamba", ["v2", "v1"])
def test_fast_vs_slow_matten_shape_fp32_gpu(bimamba):
    """Matten-XL global block: d_model 1152 (d_inner 2304), L 4096, batch 2, fp32 both paths."""
    m = BiMamba(1152, bimamba=bimamba, backend="triton", divide_out=bimamba == "v1").cuda()
    pairs = _fast_vs_slow(m, torch.randn(2, 4096, 1152, device="cuda"), ref_dtype=torch.float32)
    for name, (got, ref) in pairs.items():
        rel = _rel(got, ref)
        logger.info("fp32 %s: relative error %.3e", name, rel)
        assert torch.isfinite(got).all(), name
        assert rel <= 1e-3, f"{name}: relative error {rel:.3e} > 1e-3"


@pytest.mark.gpu
def test_fast_vs_slow_matten_shape_bf16_gpu():
    """bf16 fast path vs the fp32 slow path on the same (bf16-valued) weights; the bar is the bf16 slow path's own
    error against that fp32 reference: at most 2x it, plus 1e-3."""
    m = BiMamba(1152, bimamba="v2", backend="triton").cuda().to(torch.bfloat16)
    hidden = torch.randn(2, 4096, 1152, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(1)
    fast = _fast_vs_slow(m, hidden, ref_dtype=torch.float32)
    m_slow = copy.deepcopy(m)
    m_slow.use_fast_path = False
    torch.manual_seed(1)  # the same cotangent
    slow = _fast_vs_slow(m_slow, hidden, ref_dtype=torch.float32)
    for name, (got, ref) in fast.items():
        base = _rel(slow[name][0], slow[name][1])
        rel = _rel(got, ref)
        logger.info("bf16 %s: fast %.3e, bf16 slow path %.3e", name, rel, base)
        assert torch.isfinite(got).all(), name
        assert rel <= 2 * base + 1e-3, f"{name}: relative error {rel:.3e} > 2 x {base:.3e} + 1e-3"


@pytest.mark.gpu
@pytest.mark.parametrize("L", [257, 512])
def test_cuda_scan_backend_matches_slow_path_gpu(L):
    """backend="cuda": Triton conv + the CUDA C++ scan, fp32, against the fp32 slow path (output and every gradient);
    L = 512 takes the fused core on the CUDA scan, 257 the composition (the scan pads the rows)."""
    m = BiMamba(64, bimamba="v2", backend="cuda").cuda()
    pairs = _fast_vs_slow(m, torch.randn(2, L, 64, device="cuda"), ref_dtype=torch.float32)
    for name, (got, ref) in pairs.items():
        rel = _rel(got, ref)
        logger.info("cuda backend %s: relative error %.3e", name, rel)
        assert rel <= 1e-3, f"{name}: relative error {rel:.3e} > 1e-3"


@pytest.mark.gpu
def test_cuda_scan_backend_seq_forward_spatial_shape_gpu(monkeypatch):
    """A Matten-XL spatial Mamba block (batch 32, 256 tokens, d_model 1152) on backend="cuda", fp32, against the fp32
    slow path: the fused core with the seq forward forced (MATTEN_SCAN_FWD_KERNEL=2 raises where it cannot run; it is
    also the default at this many channels)."""
    from matten_kernels.selective_scan import cuda as scan_cuda

    if not scan_cuda.is_available():
        pytest.skip("the CUDA scan extension is not available here")
    monkeypatch.setenv("MATTEN_SCAN_FWD_KERNEL", "2")
    m = BiMamba(1152, bimamba="v2", backend="cuda").cuda()
    pairs = _fast_vs_slow(m, torch.randn(32, 256, 1152, device="cuda"), ref_dtype=torch.float32)
    for name, (got, ref) in pairs.items():
        rel = _rel(got, ref)
        logger.info("cuda backend, seq forward, spatial %s: relative error %.3e", name, rel)
        assert rel <= 1e-3, f"{name}: relative error {rel:.3e} > 1e-3"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_core_matches_composition_bf16_gpu(backend, monkeypatch):
    """Matten-XL global block in bf16 on both scan backends: the fused core against the composition of the same
    kernels. The fused path rounds once where the composition rounds twice (the x_proj input gradient added in the
    GEMM epilogue), so the bar is relative: Frobenius error <= 1e-2 for the output and every gradient."""
    if backend == "cuda":
        from matten_kernels.selective_scan import cuda as scan_cuda

        if not scan_cuda.is_available():
            pytest.skip("the CUDA scan extension is not available here")
    m = BiMamba(1152, bimamba="v2", backend=backend).cuda().to(torch.bfloat16)
    pairs = _fused_vs_composition(m, torch.randn(2, 4096, 1152, device="cuda", dtype=torch.bfloat16), monkeypatch)
    for name, (got, want) in pairs.items():
        rel = _rel(got, want)
        logger.info("bf16 %s fused vs composition %s: %.3e", backend, name, rel)
        assert torch.isfinite(got).all(), name
        assert rel <= 1e-2, f"{name}: relative difference {rel:.3e} > 1e-2"
