"""The CUDA C++ selective scan (``csrc/selective_scan``): build/load, autograd, entry points for ``backend="cuda"``.

Layers: the kernels (``csrc/selective_scan/*.cu``) -> launchers + ``torch.library`` ops ``matten_cuda::selective_scan_fwd``
/ ``_bwd`` (``selective_scan.cpp``) -> fake kernels and autograd (here: ``register_autograd`` for torch.compile, an
autograd.Function over the same ops for eager calls) -> :func:`cuda_selective_scan`,
:func:`cuda_bi_selective_scan`, which ``interface.py`` calls after validating the inputs.

Work layout, numerics and the choice of configuration: ``csrc/selective_scan/selective_scan.h``. Two layouts:
- the lanes kernels (``selective_scan_lanes.cuh``, config ``LANES_CONFIG``): one warp per channel, the time axis across
  the lanes in windows of 256 steps, the state saved at every window start but the first (and, with z, y before the
  gate, for dz),
  dB/dC and dA added with atomics; bidirectional: one launch a direction, the backward direction first (reversed scan order
  inside the warp, no flipped copies; its y to an fp32 scratch that the forward direction adds), the backward pass's
  two launches independent (on two streams below two waves of blocks). The default for N <= 16 and L >= 256 (the
  fastest here: H100 numbers in ``csrc/selective_scan/NOTES.md``).
- the others: threads over states, time sequential in chunks; the forward saves the fp32 state at every chunk start
  but the first (CHUNK = 16 steps for N <= 16) for the backward, which recomputes inside a chunk; the sequence is split across blocks
  when batch * dim is too small to fill the GPU (``MATTEN_SCAN_SPLITS`` overrides); dB/dC and dA added with atomics,
  or, under ``torch.use_deterministic_algorithms(True)``, as per-block / per-row partial sums summed in a fixed order
  (bit-identical runs; 216 MiB of partials at (512, 2304, 16, 16)). N > 16, short sequences and deterministic mode
  use them.

The extension is either built ahead of time (``MATTEN_BUILD_CUDA=1 pip install -e . --no-build-isolation``, which puts
``_C*.so`` next to this file) or on first use through ``torch.utils.cpp_extension.load`` (ninja; cached under
``TORCH_EXTENSIONS_DIR``; for the architectures of the visible GPUs, or ``TORCH_CUDA_ARCH_LIST``). Without a GPU, nvcc
or ninja, the entry points raise a ``RuntimeError`` that gives the build command: no silent slow path.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import shutil

import torch

from .._backend import use_custom_op

logger = logging.getLogger("matten_kernels")

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
_CSRC = os.path.join(_REPO, "csrc", "selective_scan")
SOURCES = ["selective_scan.cpp"] + [f"selective_scan_{d}_{t}.cu" for d in ("fwd", "bwd") for t in ("fp32", "fp16", "bf16")]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]

_loaded = False
_config_table = None  # {config id: (tpc, npt, chunk, nwarps_fwd, nwarps_bwd)}, read from the extension
config_override = None  # benchmarks may set a config id (see csrc/selective_scan/selective_scan.h); None = default


def build_command() -> str:
    """The shell command that builds the extension ahead of time (from the repository root)."""
    return f"cd {_REPO} && MATTEN_BUILD_CUDA=1 pip install -e . --no-build-isolation"


def _prebuilt() -> str | None:
    found = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    return found[0] if found else None


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def _unavailable_reason() -> str | None:
    """Why the extension cannot be used here (None if it is loaded, prebuilt, or can be built). Never compiles."""
    if _loaded:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if _prebuilt() is not None:
        return None
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    if not os.path.isdir(_CSRC):
        return f"the CUDA sources are not in this installation ({_CSRC} is missing)"
    if _nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH) and no prebuilt extension is installed"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja was not found (pip install ninja) and no prebuilt extension is installed"
    return None


def is_available() -> bool:
    """True when ``backend="cuda"`` can run here: a GPU, and the extension loaded, prebuilt, or buildable (nvcc and
    ninja found). Cheap: it never compiles; a build that then fails raises from the first call."""
    return _unavailable_reason() is None


# An extension installed ahead of time (build_command), looked for once, at import: what backend=None may take.
PREBUILT = _prebuilt() is not None


def auto_takes(N: int, L: int) -> bool:
    """Whether ``backend=None`` runs a scan of CUDA tensors (N states, L steps) on this extension: only when it was
    installed ahead of time (an auto call never starts a build, and its choice does not change within a process when
    a ``backend="cuda"`` call builds or loads the extension), and only on the shapes its lanes kernels take (N <= 16,
    L >= 256, outside deterministic mode), where they were measured faster than the Triton kernels at every SPEC
    section 7 shape, uni- and bidirectional, bf16 and fp32 (H100 and H200: README, csrc/selective_scan/NOTES.md).
    Elsewhere the Triton kernels: short rows (temporal XL: Triton 0.23 / 1.53 ms against 0.47 / 1.90), N > 16, and
    deterministic mode."""
    return PREBUILT and N <= 16 and L >= 256 and not torch.are_deterministic_algorithms_enabled()


def _load() -> None:
    """Load the extension (prebuilt, else build it with ninja on first use) and register fake kernels and autograd."""
    global _loaded, _config_table
    if _loaded:
        return
    reason = _unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"selective_scan: backend='cuda' is not available: {reason}. Build the extension with\n    "
            f"{build_command()}\n(needs nvcc and a CUDA build of PyTorch; with nvcc and ninja installed it also builds "
            "itself on first use). Or use backend='triton' or backend='ref'."
        )
    path = _prebuilt()
    if path is not None:
        torch.ops.load_library(path)
        logger.info("selective_scan cuda: loaded prebuilt %s", path)
    else:
        from torch.utils.cpp_extension import load

        # Kernel A/B runs (benchmarks/cuda_lanes_variants.py), a separate build each: MATTEN_SCAN_NVCC_FLAGS, extra nvcc
        # flags (e.g. -DLANES_AHEAD=2); MATTEN_SCAN_CSRC, another copy of csrc/selective_scan (e.g. a revision's).
        extra = os.environ.get("MATTEN_SCAN_NVCC_FLAGS", "").split()
        csrc = os.path.abspath(os.environ.get("MATTEN_SCAN_CSRC") or _CSRC)
        tag = " ".join(extra) + ("" if csrc == _CSRC else " " + csrc)
        name = "matten_selective_scan_cuda" + ("_" + hashlib.sha1(tag.encode()).hexdigest()[:8] if tag else "")
        logger.info("selective_scan cuda: building the extension with ninja (first use; cached afterwards)")
        load(name=name, sources=[os.path.join(csrc, s) for s in SOURCES],
             extra_cflags=["-O3"] + [f for f in extra if f.startswith("-D")], extra_cuda_cflags=NVCC_FLAGS + extra,
             extra_include_paths=[csrc], is_python_module=False, verbose=False)
    flat = list(torch.ops.matten_cuda.selective_scan_configs())
    _config_table = {i // 5: tuple(flat[i:i + 5]) for i in range(0, len(flat), 5)}
    _register()
    _loaded = True
    _unavailable_reason.cache_clear()


LANES_CONFIG = 9  # kLanesConfig: time across the lanes of a warp, N <= 16, dB/dC by atomics


def _choose_config(N: int, L: int, bidirectional: bool = False) -> int:
    """Mirror of ``choose_config`` in selective_scan.h (checked against the table read from the extension).

    The lanes kernels (``selective_scan_lanes.cuh``) take scans (uni- and bidirectional) with N <= 16 and L >= 256; their
    dB/dC atomics are not bit-reproducible, so under ``torch.use_deterministic_algorithms(True)`` the per-block
    partial sums of the other configs are used instead (logged once)."""
    if config_override is not None:
        return int(config_override)
    if N <= 16 and L >= 256:
        if not torch.are_deterministic_algorithms_enabled():
            return LANES_CONFIG
        _log_deterministic_choice()
    if N <= 4:
        return 0
    if N <= 8:
        return 1
    if N <= 16:
        return 3
    for cfg, top in ((5, 32), (6, 64), (7, 128)):
        if N <= top:
            return cfg
    return 8


@functools.lru_cache(maxsize=None)
def _log_deterministic_choice() -> None:
    logger.info("selective_scan cuda: deterministic algorithms requested: the per-block partial-sum kernels, not the "
                "(faster, atomic) lanes kernels")


def _register() -> None:
    fwd, bwd = "matten_cuda::selective_scan_fwd", "matten_cuda::selective_scan_bwd"

    @torch.library.register_fake(fwd)
    def _fwd_fake(u, delta, A, B, C, D, delta_bias, z, initial_state, u_b, delta_b, A_b, B_b, C_b, D_b,
                  delta_bias_b, delta_softplus, divide_out, save_for_backward, config):
        batch, dim, L = u.shape
        N = A.shape[1]
        chunk = _config_table[config][2]
        ndir = 2 if u_b is not None else 1
        f32 = dict(dtype=torch.float32, device=u.device)
        last = u.new_empty((0,), dtype=torch.float32) if ndir == 2 else u.new_empty((batch, dim, N), **f32)
        states = (u.new_empty((ndir, batch, dim, -(-L // chunk) - 1, N), **f32) if save_for_backward
                  else u.new_empty((0,), **f32))
        keep_y = save_for_backward and z is not None
        y_saved = u.new_empty(u.shape) if keep_y else u.new_empty((0,))
        return u.new_empty(u.shape), last, states, y_saved

    @torch.library.register_fake(bwd)
    def _bwd_fake(dout, dlast_state, u, delta, A, B, C, D, delta_bias, z, initial_state, states, y_saved, u_b,
                  delta_b, A_b, B_b, C_b, D_b, delta_bias_b, delta_softplus, divide_out, config):
        none = u.new_empty((0,), dtype=torch.float32)
        out = []
        for d, (uu, AA, BB, CC, DD, bb) in enumerate(((u, A, B, C, D, delta_bias),
                                                       (u_b, A_b, B_b, C_b, D_b, delta_bias_b))):
            if uu is None:
                out += [none] * 7
                continue
            out += [uu.new_empty(uu.shape), uu.new_empty(uu.shape), AA.new_empty(AA.shape), BB.new_empty(BB.shape),
                    CC.new_empty(CC.shape), DD.new_empty(DD.shape) if DD is not None else none,
                    bb.new_empty(bb.shape) if bb is not None else none]
            if d == 0:
                out += [z.new_empty(z.shape) if z is not None else u.new_empty((0,)),
                        initial_state.new_empty(initial_state.shape) if initial_state is not None else none]
        return out

    torch.library.register_autograd(fwd, _backward, setup_context=_setup_context)


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, D, delta_bias, z, initial_state, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
     delta_softplus, divide_out, save_for_backward, config) = inputs
    _, _, states, y_saved = output
    # Saved: the inputs, the fp32 state at every chunk start but each direction's first, which is initial_state or
    # zero (ndir, batch, dim, L/chunk - 1, N: nothing for a one-chunk row), and, with z, y before the gate (for dz, as
    # mamba-ssm saves it). The backward recomputes h inside each chunk from its start state: no (batch, dim, L, N)
    # tensor.
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, z, initial_state, u_b, delta_b, A_b, B_b, C_b, D_b,
                          delta_bias_b, states, y_saved)
    ctx.flags = (delta_softplus, divide_out, config)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast_state, _dstates=None, _dy_saved=None):
    (u, delta, A, B, C, D, delta_bias, z, initial_state, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
     states, y_saved) = ctx.saved_tensors
    delta_softplus, divide_out, config = ctx.flags
    if states.dim() != 5:  # (0,) when the forward was asked not to save (a one-chunk row saves (.., 0, N))
        raise RuntimeError("selective_scan (cuda): the forward ran without saving states for the backward")
    dout = torch.zeros_like(u) if dout is None else dout.contiguous()
    if dlast_state is not None:
        dlast_state = dlast_state.contiguous()
    g = torch.ops.matten_cuda.selective_scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, delta_bias, z, initial_state, states, y_saved, u_b, delta_b,
        A_b, B_b, C_b, D_b, delta_bias_b, delta_softplus, divide_out, config)
    du, ddelta, dA, dB, dC, dD, dbias, dz, dinit, du_b, ddelta_b, dA_b, dB_b, dC_b, dD_b, dbias_b = g
    opt = lambda grad, t: grad if t is not None else None  # noqa: E731
    return (du, ddelta, dA, dB, dC, opt(dD, D), opt(dbias, delta_bias), opt(dz, z), opt(dinit, initial_state),
            opt(du_b, u_b), opt(ddelta_b, delta_b), opt(dA_b, A_b), opt(dB_b, B_b), opt(dC_b, C_b),
            opt(dD_b, D_b), opt(dbias_b, delta_bias_b), None, None, None, None)


class _ScanFunction(torch.autograd.Function):
    """Eager path over the same extension ops: the forward op called below the autograd dispatch key and this class as
    its autograd node, instead of the custom op's Python autograd layer (``register_autograd``), whose per-call argument
    handling cost ~0.3 ms of host time a fwd+bwd (H100 host, ``benchmarks/host_cuda_scan.py``). torch.compile and
    dispatch modes (FlopCounterMode...) take the registered op (``use_custom_op``)."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.matten_cuda.selective_scan_fwd.default(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0], output[1]

    @staticmethod
    def backward(ctx, dout, dlast_state):
        return _backward(ctx, dout, dlast_state)


def _scan_fwd(*args):
    """(out, last_state) of the extension's forward op: the registered op or the eager autograd.Function."""
    if use_custom_op():
        return torch.ops.matten_cuda.selective_scan_fwd(*args)[:2]
    return _ScanFunction.apply(*args)


def _contig(t):
    return None if t is None else t.contiguous()


def _rows(t):
    """``t`` itself where the extension takes it (contiguous but for the batch stride: a channel slice such as
    ``xz[:, E:]``), else a contiguous copy. For z and B, C."""
    if t is None:
        return None
    expect = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expect:
            return t.contiguous()
        expect *= size
    return t


def _grouped(X):
    """(batch, N, L) -> (batch, 1, N, L) view; (batch, G, N, L) unchanged; rows contiguous (``_rows``)."""
    return _rows(X.unsqueeze(1) if X.dim() == 3 else X)


def _check_device(op, u):
    if not u.is_cuda:
        raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {u.device}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _config(A, L, bidirectional=False) -> int:
    cfg = _choose_config(A.shape[1], L, bidirectional)
    tpc, npt = _config_table[cfg][:2]
    if cfg == LANES_CONFIG and A.shape[1] > 16:
        raise ValueError(f"selective_scan (cuda): config {cfg} (lanes) holds N <= 16 states, got N = {A.shape[1]}")
    if tpc * npt < A.shape[1]:
        raise ValueError(f"selective_scan (cuda): config {cfg} holds {tpc * npt} states < N = {A.shape[1]}")
    return cfg


def _check_forced_seq(cfg: int, u: torch.Tensor, *Bs: torch.Tensor) -> None:
    """``MATTEN_SCAN_FWD_KERNEL=2`` (tests, benchmarks) forces the seq forward (``selective_scan_seq.cuh``): raise here,
    naming what it needs, where it does not apply (mirror of ``seq_fwd_applies`` in selective_scan.h)."""
    if os.environ.get("MATTEN_SCAN_FWD_KERNEL") != "2":
        return
    dim, L, N = u.shape[1], u.shape[-1], Bs[0].shape[-2]
    groups = [b.shape[1] if b.dim() == 4 else 1 for b in Bs]
    if cfg != LANES_CONFIG or N > 16 or L % 32 or any((dim // g) % 8 for g in groups):
        raise ValueError(f"selective_scan (cuda): MATTEN_SCAN_FWD_KERNEL=2 forces the seq forward, which needs config "
                         f"{LANES_CONFIG}, N <= 16, L % 32 == 0 and (dim / G) % 8 == 0; got config {cfg}, N = {N}, "
                         f"L = {L}, dim = {dim}, G = {groups}")


def cuda_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, *, initial_state=None):
    """CUDA backend of :func:`matten_kernels.selective_scan` (same arguments, validated by the caller).

    Returns ``out`` (batch, dim, L) in u.dtype, or ``(out, last_state)`` with last_state (batch, dim, N) fp32.
    Differentiable in every tensor input, initial_state and last_state included.
    """
    _load()
    _check_device("selective_scan", u)
    save = _needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cfg = _config(A, u.shape[-1])
    _check_forced_seq(cfg, u, B)
    out, last_state = _scan_fwd(
        u.contiguous(), delta.contiguous(), A.contiguous(), _grouped(B), _grouped(C), _contig(D), _contig(delta_bias),
        _rows(z), _contig(initial_state), None, None, None, None, None, None, None, bool(delta_softplus), False,
        save, cfg)
    return (out, last_state) if return_last_state else out


def cuda_bi_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                           u_b=None, delta_b=None, A_b=None, B_b=None, C_b=None, D_b=None, delta_bias_b=None,
                           divide_out=False):
    """CUDA backend of :func:`matten_kernels.bi_selective_scan` (same arguments, validated by the caller).

    The backward direction reads the natural-order ``*_b`` inputs from the end (no flipped copies). With the lanes
    and seq kernels each direction is a launch of its own (the backward direction's y goes to an fp32 scratch that the
    forward direction's launch adds, gates and writes as the one output): one launch running both directions in each
    warp spilled and was up to 1.5x slower (``csrc/selective_scan/NOTES.md`` "Session 16"). A missing ``*_b`` input is
    passed as its forward twin, so autograd sums the twin's two gradients.
    """
    _load()
    _check_device("bi_selective_scan", u)
    twin = lambda b, f: f if b is None else b  # noqa: E731
    u_b, delta_b, A_b, B_b, C_b = twin(u_b, u), twin(delta_b, delta), twin(A_b, A), twin(B_b, B), twin(C_b, C)
    D_b, delta_bias_b = twin(D_b, D), twin(delta_bias_b, delta_bias)
    save = _needs_grad(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b)
    cfg = _config(A, u.shape[-1], bidirectional=True)
    _check_forced_seq(cfg, u, B, B_b)
    out, _ = _scan_fwd(
        u.contiguous(), delta.contiguous(), A.contiguous(), _grouped(B), _grouped(C), _contig(D), _contig(delta_bias),
        _rows(z), None, u_b.contiguous(), delta_b.contiguous(), A_b.contiguous(), _grouped(B_b), _grouped(C_b),
        _contig(D_b), _contig(delta_bias_b), bool(delta_softplus), bool(divide_out), save, cfg)
    return out


# ---------------------------------------------------------------------------------------------------------------
# raw launches for fused callers (the BiMamba mixer core): no validation, no autograd


def bi_scan_fwd_raw(u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                    delta_softplus: bool, divide_out: bool, save: bool = True):
    """The bidirectional forward on the extension, every ``*_b`` given (v2), inputs valid and contiguous (z, B, C and
    the twins may be channel slices: any batch stride). Returns ``(out, saved)``; ``saved`` (states, y_saved, config) goes back to
    :func:`bi_scan_bwd_raw` (``save`` False: nothing is saved, no backward can run)."""
    _load()
    cfg = _config(A, u.shape[-1], bidirectional=True)
    out, _, states, y_saved = torch.ops.matten_cuda.selective_scan_fwd(
        u, delta, A, _grouped(B), _grouped(C), D, delta_bias, z, None, u_b, delta_b, A_b, _grouped(B_b),
        _grouped(C_b), D_b, delta_bias_b, bool(delta_softplus), bool(divide_out), bool(save), cfg)
    return out, (states, y_saved, cfg)


def bi_scan_bwd_raw(dout, u, delta, A, B, C, D, z, delta_bias, u_b, delta_b, A_b, B_b, C_b, D_b, delta_bias_b,
                    saved, delta_softplus: bool, divide_out: bool, dz_out=None) -> dict:
    """Gradients of :func:`bi_scan_fwd_raw`'s inputs, keyed by argument name (dB/dC shaped like B/C). With ``dz_out``
    (z's shape, contiguous but for its batch stride) dz is written there and not returned."""
    states, y_saved, cfg = saved
    args = (dout.contiguous(), None, u, delta, A, _grouped(B), _grouped(C), D, delta_bias, z, None, states, y_saved,
            u_b, delta_b, A_b, _grouped(B_b), _grouped(C_b), D_b, delta_bias_b, bool(delta_softplus), bool(divide_out),
            cfg)
    g = (torch.ops.matten_cuda.selective_scan_bwd(*args) if dz_out is None
         else torch.ops.matten_cuda.selective_scan_bwd_into(*args, dz_out))
    names = ("u", "delta", "A", "B", "C", "D", "delta_bias", "z", "initial_state",
             "u_b", "delta_b", "A_b", "B_b", "C_b", "D_b", "delta_bias_b")
    grads = dict(zip(names, g))
    for k, X in (("B", B), ("C", C), ("B_b", B_b), ("C_b", C_b)):
        grads[k] = grads[k].view(X.shape)
    return grads
