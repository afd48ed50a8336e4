"""CUDA C++ selective scan (csrc/selective_scan, backend="cuda").

CPU (CI): every kernel .cu compiles with plain ``nvcc -c`` for sm_80 and sm_90 (no torch headers; skipped with a
message where nvcc is missing), and backend="cuda" without a GPU raises a RuntimeError that gives the build command.

GPU (marker ``gpu``): cuda vs the float64 reference (``selective_scan_ref`` on upcast inputs), forward and every
gradient, uni- and bidirectional, fp32/fp16/bf16, awkward sizes; the sequence split across blocks (forced through
MATTEN_SCAN_SPLITS) and the alternative N=16 configuration; and cuda vs triton where the Triton backend exists.

Tolerance rule (mamba-ssm's table, elementwise ``|x - ref| <= atol * max(1, max|ref|) + rtol * |ref|``):
    forward    fp32 (6e-4, 2e-3)   fp16 (3e-3, 5e-3)   bf16 (3e-2, 5e-2)      as (rtol, atol)
    gradients  the same table times 5 (gradients sum over L, dim or batch, so they carry more rounding);
               dA, dD and ddelta_bias (sums over batch and L of many terms) times 10.
The inputs are rounded to the test dtype first, so the reference sees exactly what the kernel sees.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

from matten_kernels import bi_selective_scan, bi_selective_scan_ref, selective_scan, selective_scan_ref

logger = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "selective_scan")
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
GRAD_MULT = 5.0
REDUCED_GRAD_MULT = 10.0  # dA, dD, ddelta_bias
DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------------------- CPU / CI
def _kernel_sources():
    return sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))


def test_kernel_files_include_no_torch():
    """Kernel .cu files and their headers compile without torch: only CUDA headers and our own headers."""
    for name in os.listdir(CSRC):
        if name.endswith((".cu", ".cuh", ".h")):
            text = open(os.path.join(CSRC, name)).read()
            for bad in ("<torch/", "<ATen/", "<c10/", "<pybind11"):
                assert bad not in text, f"{name} includes {bad}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: cannot check that the .cu files compile")
def test_cu_files_compile_sm80_sm90():
    """Each .cu goes through nvcc's front end for sm_80 and sm_90 without an error or a warning (one `nvcc -ptx`
    per file and architecture, two at a time). PTX, not object code: ptxas took three quarters of the time on two CPU
    cores (315 -> 60 s for the test), and the GPU tests below build the extension with it."""
    sources = _kernel_sources()
    assert len(sources) == 6, sources

    def compile_one(job):
        name, arch = job
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["nvcc", "-ptx", "-std=c++17", "-O3", "-I", CSRC, f"-arch=compute_{arch}",
                   os.path.join(CSRC, name), "-o", os.path.join(tmp, name + ".ptx")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            return f"{name} (sm_{arch})", res.returncode, res.stderr

    jobs = [(name, arch) for name in sources for arch in (80, 90)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(compile_one, jobs))
    for name, rc, err in results:
        assert rc == 0, f"nvcc failed on {name}:\n{err}"
        assert "warning" not in err.lower(), f"nvcc warned on {name}:\n{err}"


def test_rows_keeps_channel_slices_and_copies_other_layouts():
    """z, B, C go to the extension as they are when only their batch stride is not contiguous (no copy), else as a
    contiguous copy."""
    from matten_kernels.selective_scan.cuda import _grouped, _rows

    x = torch.randn(2, 10, 32)
    assert _rows(x[:, 4:]).data_ptr() == x[:, 4:].data_ptr()
    assert _grouped(x[:, 2:6]).shape == (2, 1, 4, 32) and _grouped(x[:, 2:6]).data_ptr() == x[:, 2:6].data_ptr()
    t = x.transpose(1, 2)
    assert _rows(t).is_contiguous() and _rows(t).data_ptr() != t.data_ptr()
    assert _rows(x[:, :, ::2]).is_contiguous()
    assert _rows(None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path without a GPU")
def test_cuda_backend_without_gpu_raises_with_build_command():
    from matten_kernels.selective_scan import cuda as cuda_mod

    assert cuda_mod.is_available() is False
    assert "MATTEN_BUILD_CUDA=1 pip install -e . --no-build-isolation" in cuda_mod.build_command()
    u = torch.randn(1, 2, 5)
    A = -torch.rand(2, 4)
    B = torch.randn(1, 4, 5)
    with pytest.raises(RuntimeError) as info:
        selective_scan(u, u.clone(), A, B, B.clone(), backend="cuda")
    assert cuda_mod.build_command() in str(info.value)
    with pytest.raises(RuntimeError) as info:
        bi_selective_scan(u, u.clone(), A, B, B.clone(), backend="cuda")
    assert cuda_mod.build_command() in str(info.value)


def test_auto_backend_takes_prebuilt_cuda_on_lanes_shapes(monkeypatch):
    """backend=None: ref for CPU tensors; for CUDA tensors the CUDA extension only when it was installed ahead of
    time (PREBUILT) and the shape is one its lanes kernels serve (N <= 16, L >= 256) outside deterministic mode, else
    triton; explicit backends are kept. (The resolver alone: no tensor is made.)"""
    from matten_kernels.selective_scan import cuda as cuda_mod
    from matten_kernels.selective_scan.interface import scan_backend

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(cuda_mod, "PREBUILT", False)
    assert scan_backend(None, gpu, 16, 4096, "t") == "triton"
    monkeypatch.setattr(cuda_mod, "PREBUILT", True)
    assert scan_backend(None, gpu, 16, 4096, "t") == "cuda"  # global XL
    assert scan_backend(None, gpu, 8, 256, "t") == "cuda"  # spatial rows
    assert scan_backend(None, gpu, 16, 16, "t") == "triton"  # temporal XL: Triton is faster there
    assert scan_backend(None, gpu, 17, 4096, "t") == "triton"  # N > 16: not the lanes kernels
    assert scan_backend("triton", gpu, 16, 4096, "t") == "triton"
    assert scan_backend(None, cpu, 16, 4096, "t") == "ref"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert scan_backend(None, gpu, 16, 4096, "t") == "triton"


# ------------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_auto_backend_runs_the_prebuilt_extension(monkeypatch):
    """With the extension taken as prebuilt, backend=None runs it on a lanes shape: the forward output equals
    backend="cuda"'s bit for bit (uni, bi and the BiMamba mixer), and it is not Triton's; a short row stays on
    Triton (equal to backend="triton")."""
    from matten_kernels.modules import BiMamba
    from matten_kernels.selective_scan import cuda as cuda_mod

    if not cuda_mod.is_available():
        pytest.skip("CUDA extension not buildable here")
    cuda_mod._load()
    monkeypatch.setattr(cuda_mod, "PREBUILT", True)
    x = _inputs(2, 64, 16, 1024, torch.bfloat16)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    run = lambda f, b: f(*args, True, backend=b)  # noqa: E731
    for f in (selective_scan, bi_selective_scan):
        auto, cuda_out, triton_out = run(f, None), run(f, "cuda"), run(f, "triton")
        assert torch.equal(auto, cuda_out) and not torch.equal(auto, triton_out), f.__name__
    short = _inputs(4, 64, 16, 16, torch.bfloat16)
    sargs = [short[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    assert torch.equal(selective_scan(*sargs, True), selective_scan(*sargs, True, backend="triton"))
    torch.manual_seed(0)
    mixer = BiMamba(64).cuda()
    h = torch.randn(2, 512, 64, device="cuda")
    with torch.no_grad():
        auto = mixer(h)
        mixer.backend = "cuda"
        assert torch.equal(auto, mixer(h))


def _check(name, x, ref, dtype, mult=1.0):
    rtol, atol = TOL[dtype]
    rtol, atol = rtol * mult, atol * mult
    x, ref = x.double(), ref.double()
    err = (x - ref).abs()
    scale = max(1.0, ref.abs().max().item())
    logger.info("%-14s max err %.3e  mean err %.3e  (max|ref| %.3e)", name, err.max().item(), err.mean().item(),
                ref.abs().max().item())
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    bad = err > atol * scale + rtol * ref.abs()
    assert not bad.any(), (f"{name}: {bad.sum().item()} of {bad.numel()} elements off; max err {err.max().item():.3e} "
                           f"(rtol {rtol:g}, atol {atol:g} * {scale:.3g})")


def _inputs(batch, dim, N, L, dtype, *, groups=None, softplus=True, has_D=True, has_z=True, has_bias=True,
            has_init=False, noncontig=False, sliced=False, device="cuda"):
    """Random inputs already rounded to `dtype` (fp32 for A, D, delta_bias, initial_state). ``sliced``: z, B and C are
    channel slices of larger tensors (any batch stride, as the mixer passes them), which the extension reads in place."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    u = rnd(batch, L, dim).transpose(1, 2) if noncontig else rnd(batch, dim, L)
    delta = (rnd(batch, dim, L, scale=0.5) if softplus
             else (torch.rand(batch, dim, L, device=device) * 0.3).to(dtype))
    A = -(0.5 + torch.rand(dim, N, device=device)) * torch.exp(torch.randn(dim, N, device=device) * 0.3)
    bc_shape = (batch, N, L) if groups is None else (batch, groups, N, L)
    B, C = rnd(*bc_shape), rnd(*bc_shape)
    if sliced:  # B, C: slices of one (batch, 2 * rows + 5, ...) tensor, like [dt; B; C]; z: the second half of xz
        rows = bc_shape[1]
        big = rnd(batch, 2 * rows + 5, *bc_shape[2:])
        B, C = big[:, 5:5 + rows], big[:, 5 + rows:]
    D = torch.randn(dim, device=device) if has_D else None
    z = (rnd(batch, 2 * dim, L)[:, dim:] if sliced else rnd(batch, dim, L)) if has_z else None
    bias = torch.randn(dim, device=device) * 0.5 if has_bias else None
    init = torch.randn(batch, dim, N, device=device) if has_init else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, initial_state=init)


def _leaves(tensors, dtype64=False):
    """Leaves for autograd.grad: float64 copies, or copies in the same layout (a channel slice stays a slice of a copy
    of its base, so the extension sees the batch stride)."""
    out = {}
    for k, v in tensors.items():
        if v is None:
            out[k] = None
        elif dtype64:
            out[k] = v.detach().double().requires_grad_(True)
        elif v._base is not None and not v.is_contiguous():
            base = v._base.detach().clone()
            out[k] = base.as_strided(v.shape, v.stride(), v.storage_offset()).requires_grad_(True)
        else:
            out[k] = v.detach().clone().requires_grad_(True)
    return out


UNI_CASES = [  # (batch, dim, N, L, options)
    pytest.param(2, 5, 16, 1, dict(), id="L1"),
    pytest.param(1, 3, 1, 17, dict(has_z=False, has_D=False), id="N1-L17"),
    pytest.param(2, 8, 16, 257, dict(has_init=True, last=True), id="N16-L257-init-last"),
    pytest.param(2, 6, 16, 300, dict(groups=2, softplus=False, has_bias=False), id="grouped-G2-nosoftplus"),
    pytest.param(1, 4, 64, 129, dict(has_init=True, last=True), id="N64"),
    pytest.param(1, 2, 256, 40, dict(), id="N256"),
    pytest.param(3, 19, 16, 16, dict(noncontig=True), id="L16-noncontig"),
    pytest.param(1, 4, 16, 2049, dict(last=True), id="L2049"),
    pytest.param(2, 6, 16, 100, dict(sliced=True, groups=2), id="sliced-zBC-G2-L100"),
    pytest.param(2, 8, 16, 512, dict(sliced=True, last=True), id="sliced-zBC-L512"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("batch, dim, N, L, opts", UNI_CASES)
def test_selective_scan_cuda_vs_ref(batch, dim, N, L, opts, dtype):
    opts = dict(opts)
    last = opts.pop("last", False)
    softplus = opts.get("softplus", True)
    x = _inputs(batch, dim, N, L, dtype, **opts)
    kw = dict(delta_softplus=softplus, return_last_state=last)

    xc = _leaves(x)
    res = selective_scan(xc["u"], xc["delta"], xc["A"], xc["B"], xc["C"], xc["D"], xc["z"], xc["delta_bias"],
                         initial_state=xc["initial_state"], backend="cuda", **kw)
    x64 = _leaves(x, dtype64=True)
    ref = selective_scan_ref(x64["u"], x64["delta"], x64["A"], x64["B"], x64["C"], x64["D"], x64["z"],
                             x64["delta_bias"], initial_state=x64["initial_state"], **kw)
    out, out64 = (res[0], ref[0]) if last else (res, ref)
    assert out.dtype == dtype and out.shape == (batch, dim, L)
    _check("out", out, out64, dtype)
    if last:
        assert res[1].dtype == torch.float32
        _check("last_state", res[1], ref[1], torch.float32 if dtype == torch.float32 else dtype)

    g_out = torch.randn_like(out64)
    outs, outs64, grads = [out], [out64], [g_out.to(dtype)]
    if last:
        g_last = torch.randn_like(ref[1])
        outs.append(res[1]), outs64.append(ref[1]), grads.append(g_last.float())
        grads64 = [g_out, g_last]
    else:
        grads64 = [g_out]
    names = [k for k, v in x.items() if v is not None]
    gc = torch.autograd.grad(outs, [xc[k] for k in names], grads)
    g64 = torch.autograd.grad(outs64, [x64[k] for k in names], grads64)
    for k, a, b in zip(names, gc, g64):
        assert a is not None, f"no gradient for {k}"
        mult = REDUCED_GRAD_MULT if k in ("A", "D", "delta_bias") else GRAD_MULT
        _check("d" + k, a, b, dtype, mult)


BI_CASES = [  # (batch, dim, N, L, mode)
    pytest.param(2, 6, 16, 77, "v2", id="v2-L77"),
    pytest.param(1, 8, 16, 1, "v2", id="v2-L1"),
    pytest.param(2, 4, 16, 33, "v1", id="v1-onlyA_b"),
    pytest.param(1, 6, 8, 64, "v2-grouped", id="v2-G3-vs-G1"),
    pytest.param(2, 5, 16, 300, "none", id="no-b-inputs-divide"),
    pytest.param(2, 6, 16, 77, "v2-sliced", id="v2-sliced-zBC-L77"),
    pytest.param(2, 8, 16, 1024, "v2-sliced", id="v2-sliced-zBC-L1024"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("batch, dim, N, L, mode", BI_CASES)
def test_bi_selective_scan_cuda_vs_ref(batch, dim, N, L, mode, dtype):
    sliced = mode.endswith("-sliced")  # z, B, C and B_b, C_b as channel slices (the mixer's layout)
    mode = mode.removesuffix("-sliced")
    x = _inputs(batch, dim, N, L, dtype, groups=3 if mode == "v2-grouped" else None, sliced=sliced)
    x.pop("initial_state")
    b = _inputs(batch, dim, N, L, dtype, has_z=False, sliced=sliced)
    bkeys = {"v2": ("u", "delta", "A", "B", "C", "D", "delta_bias"), "v2-grouped": ("u", "delta", "A", "B", "C", "D"),
             "v1": ("A",), "none": ()}[mode]
    for k in bkeys:
        x[k + "_b"] = b[k]
    divide = mode in ("none", "v2")

    def run(t, fn, **extra):
        fwd = {k: t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
        bwd = {k: t[k] for k in t if k.endswith("_b")}
        return fn(**fwd, **bwd, delta_softplus=True, divide_out=divide, **extra)

    xc, x64 = _leaves(x), _leaves(x, dtype64=True)
    out = run(xc, bi_selective_scan, backend="cuda")
    out64 = run(x64, bi_selective_scan_ref)
    _check("out", out, out64, dtype)
    g = torch.randn_like(out64)
    names = [k for k, v in x.items() if v is not None]
    gc = torch.autograd.grad(out, [xc[k] for k in names], g.to(dtype))
    g64 = torch.autograd.grad(out64, [x64[k] for k in names], g)
    for k, a, r in zip(names, gc, g64):
        mult = REDUCED_GRAD_MULT if k.removesuffix("_b") in ("A", "D", "delta_bias") else GRAD_MULT
        _check("d" + k, a, r, dtype, mult)


SPLIT_CASES = [  # (splits, config, batch, dim, N, L, kind)
    pytest.param(2, 3, 2, 8, 16, 300, "uni", id="split2-uni-init-last"),
    pytest.param(5, 3, 1, 6, 16, 1000, "uni", id="split5-uni"),
    pytest.param(3, None, 2, 6, 16, 77, "bi", id="split3-bi"),
    pytest.param(2, None, 1, 4, 64, 129, "uni", id="split2-N64"),
    pytest.param(4, 4, 2, 6, 16, 300, "bi", id="split4-cfg4-bi"),
    pytest.param(1, 4, 2, 8, 16, 257, "uni", id="nosplit-cfg4-uni"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("splits, config, batch, dim, N, L, kind", SPLIT_CASES)
def test_cuda_split_sequence_and_configs(splits, config, batch, dim, N, L, kind, dtype, monkeypatch):
    """Blocks that each scan one split of the sequence (composing the other splits' summaries) give the same
    function and gradients; so does configuration 4 (8 threads x 2 states per channel)."""
    from matten_kernels.selective_scan import cuda as cuda_mod

    monkeypatch.setenv("MATTEN_SCAN_SPLITS", str(splits))
    monkeypatch.setattr(cuda_mod, "config_override", config)
    x = _inputs(batch, dim, N, L, dtype, has_init=kind == "uni", groups=2 if kind == "bi" else None)
    if kind == "bi":
        x.pop("initial_state")
        b = _inputs(batch, dim, N, L, dtype, has_z=False)
        for key in ("u", "delta", "A", "B", "C", "D", "delta_bias"):
            x[key + "_b"] = b[key]
    xc, x64 = _leaves(x), _leaves(x, dtype64=True)

    def run(t, backend):
        kw = {k: v for k, v in t.items() if k.endswith("_b")}
        args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
        if kind == "bi":
            fn = bi_selective_scan if backend else bi_selective_scan_ref
            return [fn(*args, **kw, divide_out=True, **({"backend": backend} if backend else {}))]
        fn = selective_scan if backend else selective_scan_ref
        return list(fn(*args, True, initial_state=t["initial_state"], **({"backend": backend} if backend else {})))

    outs, outs64 = run(xc, "cuda"), run(x64, None)
    for name, a, r in zip(("out", "last_state"), outs, outs64):
        _check(name, a, r, dtype)
    cot = [torch.randn_like(o) for o in outs64]
    names = [k for k, v in x.items() if v is not None]
    gc = torch.autograd.grad(outs, [xc[k] for k in names], [c.to(o.dtype) for c, o in zip(cot, outs)])
    g64 = torch.autograd.grad(outs64, [x64[k] for k in names], cot)
    for k, a, r in zip(names, gc, g64):
        mult = REDUCED_GRAD_MULT if k.removesuffix("_b") in ("A", "D", "delta_bias") else GRAD_MULT
        _check("d" + k, a, r, dtype, mult)


def _force_lanes_config(monkeypatch, fwd_kernel=None):
    """Config 9 (lanes) for every call of the test; fwd_kernel: its forward forced (MATTEN_SCAN_FWD_KERNEL 1 lanes,
    2 seq), else the default choice."""
    from matten_kernels.selective_scan import cuda as cuda_mod

    monkeypatch.setattr(cuda_mod, "config_override", cuda_mod.LANES_CONFIG)
    if fwd_kernel is not None:
        monkeypatch.setenv("MATTEN_SCAN_FWD_KERNEL", fwd_kernel)


LANES_CASES = [  # (batch, dim, N, L, options): the lanes kernels forced (config 9), partial windows included
    pytest.param(2, 5, 16, 1, dict(), id="L1"),
    pytest.param(1, 3, 1, 17, dict(has_z=False, has_D=False), id="N1-L17"),
    pytest.param(2, 6, 5, 130, dict(has_init=True, last=True), id="N5-L130-init-last"),
    pytest.param(2, 6, 16, 300, dict(groups=2, softplus=False, has_bias=False), id="G2-L300-nosoftplus"),
    pytest.param(1, 5, 8, 512, dict(has_init=True, last=True), id="N8-L512"),
    pytest.param(2, 8, 8, 1100, dict(has_init=True, last=True), id="N8-exact-blockreduce-L1100"),
    pytest.param(2, 8, 4, 1030, dict(last=True), id="N4-L1030"),
    pytest.param(2, 9, 16, 4096, dict(last=True), id="L4096"),
    pytest.param(1, 4, 16, 4100, dict(groups=2, noncontig=True), id="L4100-G2-noncontig"),
    pytest.param(2, 6, 16, 600, dict(sliced=True, groups=2), id="sliced-zBC-G2-L600"),
    pytest.param(3, 4, 16, 2048, dict(sliced=True, last=True), id="sliced-zBC-L2048"),
    # dim % 4 == 0, N = 16, L % 8 == 0 (16-byte rows): full windows staged (16-bit: the pair layout), a partial one
    pytest.param(2, 8, 16, 1096, dict(has_init=True, last=True), id="N16-staged-L1096-init-last"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("batch, dim, N, L, opts", LANES_CASES)
def test_cuda_lanes_vs_ref(batch, dim, N, L, opts, dtype, monkeypatch):
    """The lanes kernels (one warp per channel, time across the lanes) against the float64 reference."""
    _force_lanes_config(monkeypatch, "1")
    test_selective_scan_cuda_vs_ref(batch, dim, N, L, opts, dtype)


LANES_BI_CASES = [  # (batch, dim, N, L, mode): the bidirectional lanes kernels, partial windows included
    pytest.param(2, 6, 16, 77, "v2", id="v2-L77"),
    pytest.param(1, 8, 16, 1, "v2", id="v2-L1"),
    pytest.param(2, 4, 16, 300, "v1", id="v1-onlyA_b-L300"),
    pytest.param(1, 6, 8, 512, "v2-grouped", id="v2-G3-vs-G1-L512"),
    pytest.param(2, 5, 16, 4096, "none", id="no-b-inputs-divide-L4096"),
    pytest.param(1, 3, 5, 600, "v2", id="v2-N5-L600"),
    pytest.param(2, 8, 8, 1024, "v2", id="v2-N8-exact-blockreduce-L1024"),
    pytest.param(2, 4, 16, 768, "v2-sliced", id="v2-sliced-zBC-L768"),
    pytest.param(2, 8, 16, 1288, "v2", id="v2-N16-staged-L1288"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("batch, dim, N, L, mode", LANES_BI_CASES)
def test_cuda_lanes_bi_vs_ref(batch, dim, N, L, mode, dtype, monkeypatch):
    _force_lanes_config(monkeypatch, "1")
    test_bi_selective_scan_cuda_vs_ref(batch, dim, N, L, mode, dtype)


SEQ_CASES = [  # (batch, dim, N, L, options): the seq forward (time sequential per lane) forced; needs L % 32 == 0
    pytest.param(2, 8, 16, 32, dict(last=True), id="L32-one-chunk"),
    pytest.param(2, 16, 16, 288, dict(has_init=True, last=True), id="L288-init-last"),
    pytest.param(1, 16, 5, 256, dict(groups=2, softplus=False, has_bias=False), id="N5-G2-nosoftplus"),
    pytest.param(1, 16, 16, 1024, dict(noncontig=True, has_z=False), id="L1024-noncontig-noz"),
    pytest.param(2, 24, 16, 4096, dict(last=True), id="L4096"),
    pytest.param(2, 16, 16, 256, dict(sliced=True), id="sliced-zBC-L256"),
]
SEQ_BI_CASES = [  # (batch, dim, N, L, mode)
    pytest.param(2, 8, 16, 32, "v2", id="v2-L32"),
    pytest.param(1, 16, 16, 288, "v1", id="v1-L288-odd-chunks"),
    pytest.param(1, 24, 8, 512, "v2-grouped", id="v2-G3-N8-L512"),
    pytest.param(2, 8, 16, 4096, "none", id="none-L4096"),
    pytest.param(2, 16, 16, 256, "v2-sliced", id="v2-sliced-zBC-L256"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("batch, dim, N, L, opts", SEQ_CASES)
def test_cuda_seq_fwd_vs_ref(batch, dim, N, L, opts, dtype, monkeypatch):
    """The seq forward (selective_scan_seq.cuh) forced, with the lanes backward; forcing it where it does not apply is
    an error, so these cases ran it."""
    _force_lanes_config(monkeypatch, "2")
    test_selective_scan_cuda_vs_ref(batch, dim, N, L, opts, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
@pytest.mark.parametrize("batch, dim, N, L, mode", SEQ_BI_CASES)
def test_cuda_seq_bi_fwd_vs_ref(batch, dim, N, L, mode, dtype, monkeypatch):
    _force_lanes_config(monkeypatch, "2")
    test_bi_selective_scan_cuda_vs_ref(batch, dim, N, L, mode, dtype)


@pytest.mark.gpu
def test_cuda_seq_fwd_refuses_what_it_cannot_run(monkeypatch):
    """Forcing the seq forward at a length that is not a multiple of its chunk raises, naming what it needs."""
    _force_lanes_config(monkeypatch, "2")
    x = _inputs(1, 8, 16, 300, torch.bfloat16)
    with pytest.raises(ValueError, match="seq forward, which needs"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="cuda")


@pytest.mark.gpu
def test_cuda_extension_errors_raise():
    """The op called directly with B of the wrong shape raises a ValueError naming B. Run in a subprocess: before
    session 12 the extension's checks threw c10::Error, which kills the process on the device machine's torch."""
    import subprocess
    import sys

    code = ("import torch\nfrom matten_kernels.selective_scan import cuda\ncuda._load()\n"
            "u = torch.randn(1, 8, 300, device='cuda'); B = torch.randn(1, 1, 16, 300, device='cuda')\n"
            "try:\n    torch.ops.matten_cuda.selective_scan_fwd(u, u, torch.zeros(8, 3, device='cuda'), B, B, "
            "*([None] * 11), True, False, True, 9)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-300:])
    assert r.stdout.startswith("ValueError") and "B must have shape" in r.stdout, r.stdout[-300:]


@pytest.mark.gpu
@pytest.mark.parametrize("L", [300, 1024])
def test_cuda_raw_bi_reads_slices_and_writes_dz_in_place(L):
    """The mixer's raw path (``bi_scan_fwd_raw`` / ``bi_scan_bwd_raw``): z = xz[:, E:] and B, C slices of [dt; B; C]
    read in place; with ``dz_out`` (the z half of a d(xz) buffer) dz is written there, the x half untouched, and every
    gradient equals the one computed from contiguous copies. Bad layouts of z / dz_out raise ValueErrors naming them."""
    from matten_kernels.selective_scan import cuda as cuda_mod

    if not cuda_mod.is_available():
        pytest.skip("CUDA extension not buildable here")
    torch.manual_seed(0)
    n, E, N, R = 2, 16, 16, 5
    dev, dt = "cuda", torch.bfloat16
    xz = torch.randn(n, 2 * E, L, device=dev, dtype=dt)
    u, z = xz[:, :E].contiguous(), xz[:, E:]
    xdbl, xdbl_b = (torch.randn(n, R + 2 * N, L, device=dev, dtype=dt) for _ in range(2))
    delta, delta_b = ((0.5 * torch.randn(n, E, L, device=dev)).to(dt) for _ in range(2))
    A, A_b = (-torch.rand(E, N, device=dev) - 0.5 for _ in range(2))
    D, D_b, bias, bias_b = (torch.randn(E, device=dev) for _ in range(4))

    def call(contiguous: bool, dz_out=None):
        c = (lambda t: t.contiguous()) if contiguous else (lambda t: t)  # noqa: E731
        args = (u, delta, A, c(xdbl[:, R:R + N]), c(xdbl[:, R + N:]), D, c(z), bias, u.flip(-1).contiguous(),
                delta_b, A_b, c(xdbl_b[:, R:R + N]), c(xdbl_b[:, R + N:]), D_b, bias_b)
        y, saved = cuda_mod.bi_scan_fwd_raw(*args, True, True, True)
        dy = torch.randn(y.shape, device=dev, generator=torch.Generator(dev).manual_seed(1)).to(dt)
        return y, cuda_mod.bi_scan_bwd_raw(dy, *args, saved, True, True, dz_out=dz_out)

    y_ref, g_ref = call(True)
    dxz = torch.full_like(xz, float("nan"))
    y, g = call(False, dz_out=dxz[:, E:])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert g["z"].numel() == 0 and torch.isnan(dxz[:, :E]).all()
    torch.testing.assert_close(dxz[:, E:], g_ref["z"], rtol=0, atol=0)
    for k in ("u", "delta", "A", "B", "C", "D", "delta_bias", "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b",
              "delta_bias_b"):  # dB/dC, dA... by atomics: summed in another order, not bit-identical
        torch.testing.assert_close(g[k].float(), g_ref[k].float(), rtol=1e-2, atol=1e-2, msg=k)
    with pytest.raises(ValueError, match="z must be contiguous but for its batch stride"):
        torch.ops.matten_cuda.selective_scan_fwd(u, delta, A, xdbl[:, None, R:R + N], xdbl[:, None, R + N:], D, bias,
                                                 z.transpose(1, 2).contiguous().transpose(1, 2), *([None] * 8),
                                                 True, False, True, -1)
    with pytest.raises(ValueError, match="dz_out must have shape"):  # selective_scan_bwd_into
        call(False, dz_out=dxz[:, E + 1:])


@pytest.mark.gpu
@pytest.mark.parametrize("L", [16, 256, 1000])
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_cuda_saves_no_first_state(L, bi):
    """Memory: the forward saves the state entering every chunk / window but each direction's first (initial_state
    or zero, read by the backward itself): (ndir, batch, dim, ceil(L / chunk) - 1, N), nothing for a one-chunk row
    (L = 16: the tile kernels' chunk of 16; 256 and 1000: the lanes kernels' 256-step windows)."""
    from matten_kernels.selective_scan import cuda as cuda_mod

    dev, batch, dim, N = "cuda", 2, 8, 16
    u, delta = torch.randn(batch, dim, L, device=dev), torch.rand(batch, dim, L, device=dev)
    A, B = -torch.rand(dim, N, device=dev) - 0.5, torch.randn(batch, 1, N, L, device=dev)
    twins = [u.flip(-1).contiguous(), delta, A, B, B] if bi else [None] * 5
    cuda_mod._load()
    cfg = cuda_mod._choose_config(N, L, bi)
    _, _, states, _ = torch.ops.matten_cuda.selective_scan_fwd(u, delta, A, B, B, None, None, None, None, *twins,
                                                               None, None, True, False, True, cfg)
    chunk = cuda_mod._config_table[cfg][2]
    assert chunk == (256 if L >= 256 else 16), (cfg, chunk)
    assert states.shape == (2 if bi else 1, batch, dim, -(-L // chunk) - 1, N), states.shape


@pytest.mark.gpu
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_cuda_default_forward_is_seq_for_many_channels_only(bi, monkeypatch):
    """The default forward of the lanes config: the seq kernel where there are >= 32 of its warps per SM (per
    direction, bidirectional: a launch each; its output bit for bit, and not the lanes kernel's), the lanes kernel
    with few channels."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    many = 32 * 8 * sms  # channels for that many seq warps per SM (8 channels a warp)
    for dim, expect in ((many, "2"), (64, "1")):
        torch.manual_seed(0)
        x = _inputs(1, dim, 16, 256, torch.bfloat16)
        args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
        outs = {}
        for k in ("0", "1", "2"):
            monkeypatch.setenv("MATTEN_SCAN_FWD_KERNEL", k)
            with torch.no_grad():
                outs[k] = (bi_selective_scan(*args, backend="cuda") if bi else
                           selective_scan(*args, backend="cuda"))
        other = "1" if expect == "2" else "2"
        assert torch.equal(outs["0"], outs[expect]), (dim, expect)
        assert not torch.equal(outs["0"], outs[other]), f"seq and lanes forwards agree bit for bit at dim {dim}"


@pytest.mark.gpu
def test_cuda_lanes_is_default_and_deterministic_mode_avoids_it(monkeypatch):
    from matten_kernels.selective_scan import cuda as cuda_mod

    cuda_mod._load()
    assert cuda_mod._choose_config(16, 4096) == cuda_mod.LANES_CONFIG
    assert cuda_mod._choose_config(16, 4096, bidirectional=True) == cuda_mod.LANES_CONFIG
    assert cuda_mod._choose_config(16, 16) != cuda_mod.LANES_CONFIG
    assert cuda_mod._choose_config(64, 4096) != cuda_mod.LANES_CONFIG
    with torch.no_grad():
        u = torch.randn(1, 2, 300, device="cuda")
        monkeypatch.setattr(cuda_mod, "config_override", cuda_mod.LANES_CONFIG)
        with pytest.raises(ValueError, match="N <= 16"):
            selective_scan(u, u, -torch.rand(2, 17, device="cuda"), torch.randn(1, 17, 300, device="cuda"),
                           torch.randn(1, 17, 300, device="cuda"), backend="cuda")
    monkeypatch.setattr(cuda_mod, "config_override", None)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert cuda_mod._choose_config(16, 4096) != cuda_mod.LANES_CONFIG
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_ID[d])
def test_cuda_matches_triton(dtype):
    """The two fast backends agree (forward and gradients) on one mid-size case, uni and bidirectional."""
    try:
        from matten_kernels.selective_scan import _ops  # noqa: F401  (the Triton backend)
    except ImportError as e:
        pytest.skip(f"Triton backend not importable: {e}")
    x = _inputs(2, 64, 16, 1000, dtype)
    x.pop("initial_state")
    for bi in (False, True):
        res = {}
        for backend in ("cuda", "triton"):
            t = _leaves(x)
            fn = bi_selective_scan if bi else selective_scan
            out = fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True,
                     backend=backend)
            g = torch.autograd.grad(out, [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")],
                                    torch.ones_like(out))
            res[backend] = (out, *g)
        for name, a, b in zip(("out", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"), res["cuda"],
                              res["triton"]):
            _check(("bi " if bi else "") + name, a, b, dtype, 1.0 if name == "out" else REDUCED_GRAD_MULT)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [200, 500])
def test_cuda_deterministic_and_no_grad_path(L):
    """Bit-identical gradients under torch.use_deterministic_algorithms (the per-block partial sums: the tile kernels
    below L = 256 and instead of the lanes kernels above; by default both add dB/dC and dA with atomics)."""
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        _deterministic_and_no_grad(L)
    finally:
        torch.use_deterministic_algorithms(prev)


def _deterministic_and_no_grad(L):
    x = _inputs(2, 32, 16, L, torch.bfloat16)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    with torch.no_grad():
        o1 = selective_scan(*args, backend="cuda")
    o2 = selective_scan(*args, backend="cuda")
    assert torch.equal(o1, o2)
    t1, t2 = _leaves(x), _leaves(x)
    g1 = torch.autograd.grad(selective_scan(t1["u"], t1["delta"], t1["A"], t1["B"], t1["C"], t1["D"], t1["z"],
                                            t1["delta_bias"], True, backend="cuda").sum(), [t1["B"], t1["A"]])
    g2 = torch.autograd.grad(selective_scan(t2["u"], t2["delta"], t2["A"], t2["B"], t2["C"], t2["D"], t2["z"],
                                            t2["delta_bias"], True, backend="cuda").sum(), [t2["B"], t2["A"]])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2)), "backward is not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("L", [200, 512])
def test_cuda_eager_path_matches_custom_op(bi, L):
    """Eager calls go through an autograd.Function over the extension ops; torch.compile goes through the registered
    custom op (fake kernel + register_autograd). Both give the same output and gradients: bit for bit but for dB, dC
    and dA, to fp32 rounding of their atomic sums."""
    x = _inputs(2, 32, 16, L, torch.bfloat16)
    x.pop("initial_state")
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    fn = bi_selective_scan if bi else selective_scan

    def f(u, delta, A, B, C, D, z, delta_bias):
        return fn(u, delta, A, B, C, D, z, delta_bias, True, backend="cuda")

    res = []
    for run in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        t = _leaves(x)
        out = run(*(t[k] for k in names))
        res.append((out, *torch.autograd.grad(out, [t[k] for k in names], torch.ones_like(out))))
    for name, a, b in zip(("out",) + tuple("d" + k for k in names), *res):
        if name not in ("dA", "dB", "dC"):
            assert torch.equal(a, b), f"{name}: eager and compiled paths differ"
        else:
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2, msg=f"{name}: eager and compiled paths differ")


@pytest.mark.gpu
@pytest.mark.parametrize("L", [512, 1000])
def test_cuda_bi_backward_on_two_streams_in_a_cuda_graph(L):
    """The bidirectional lanes backward runs its backward direction on a second stream when a direction has fewer than
    two waves of blocks (every shape here): captured in a CUDA graph (the fork and join become graph edges) and
    replayed, it gives the eager gradients (to fp32 rounding of the atomic dA/dB/dC sums), and both match the float64
    reference."""
    dtype = torch.bfloat16
    x = _inputs(2, 32, 16, L, dtype)
    x.pop("initial_state")
    b = _inputs(2, 32, 16, L, dtype, has_z=False)
    for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"):
        x[k + "_b"] = b[k]
    names = list(x)

    def run(t, fn, **extra):
        fwd = {k: t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
        return fn(**fwd, **{k: t[k] for k in t if k.endswith("_b")}, delta_softplus=True, **extra)

    g = torch.randn(2, 32, L, device="cuda").to(dtype)
    t = _leaves(x)
    eager = torch.autograd.grad(run(t, bi_selective_scan, backend="cuda"), [t[k] for k in names], g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph expects
        torch.autograd.grad(run(t, bi_selective_scan, backend="cuda"), [t[k] for k in names], g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.autograd.grad(run(t, bi_selective_scan, backend="cuda"), [t[k] for k in names], g)
    graph.replay()
    torch.cuda.synchronize()
    x64 = _leaves(x, dtype64=True)
    ref = torch.autograd.grad(run(x64, bi_selective_scan_ref), [x64[k] for k in names], g.double())
    for k, a, c, r in zip(names, eager, captured, ref):
        if k.removesuffix("_b") in ("A", "B", "C"):
            torch.testing.assert_close(c, a, rtol=1e-2, atol=1e-2, msg=f"d{k}: graph replay and eager differ")
        else:
            assert torch.equal(c, a), f"d{k}: graph replay and eager differ"
        mult = REDUCED_GRAD_MULT if k.removesuffix("_b") in ("A", "D", "delta_bias") else GRAD_MULT
        _check("d" + k, c, r, dtype, mult)
