"""``python -m matten selfcheck``: every kernel backend usable here against the float64 reference.

Small random inputs of awkward sizes, forward and every gradient, fp32 (the Triton interpreter on a CPU) or the
requested dtype on CUDA. Prints one line per (op, backend) with the max relative error, and exits non-zero on a miss.
Without CUDA the Triton kernels run in the interpreter: this command re-executes itself with ``TRITON_INTERPRET=1``
(it must be set before triton is imported).
"""

from __future__ import annotations

import os
import sys
import time


def add_arguments(parser):
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="input dtype on CUDA (the CPU interpreter supports float32 only)")
    parser.add_argument("--seed", type=int, default=0)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# Inputs that stay fp32 whatever the activation dtype (SPEC section 2): the SSM parameters.
FP32_PARAMS = {"A", "A_b", "D", "D_b", "delta_bias", "delta_bias_b", "initial_state"}


def _compare(fn, ref, inputs, dtype, device):
    """Relative error of fn vs ref (ref in float64 on the CPU), forward and every input gradient."""
    import torch

    def leaves(cast, dev):
        return {k: v.detach().to(dev, torch.float64 if cast == torch.float64 else
                                 (torch.float32 if k in FP32_PARAMS else cast)).requires_grad_(True)
                for k, v in inputs.items()}

    fast, exact = leaves(dtype, device), leaves(torch.float64, "cpu")
    out, out_ref = fn(**fast), ref(**exact)
    cotangent = torch.randn_like(out_ref)
    out.backward(cotangent.to(out.device, out.dtype))
    out_ref.backward(cotangent)
    errs = {"out": _rel(out.cpu(), out_ref)}
    errs.update({"d" + k: _rel(fast[k].grad.cpu(), exact[k].grad) for k in inputs})
    return errs


def _cases(device):
    import torch
    from functools import partial

    from matten_kernels import (bi_selective_scan, bi_selective_scan_ref, selective_scan, selective_scan_ref,
                                video_attention, video_attention_ref)

    b, d, n, L = 2, 37, 16, 130
    scan_inputs = dict(u=torch.randn(b, d, L), delta=torch.randn(b, d, L) * 0.5, A=-torch.rand(d, n) - 0.1,
                       B=torch.randn(b, n, L), C=torch.randn(b, n, L), D=torch.randn(d), z=torch.randn(b, d, L),
                       delta_bias=torch.randn(d) * 0.1)
    bi_inputs = dict(scan_inputs, u_b=torch.randn(b, d, L), A_b=-torch.rand(d, n) - 0.1)
    q, k, v = torch.randn(3, 2, 3 * 20, 2, 24).unbind(0)
    attn_inputs = dict(q=q, k=k, v=v)
    for backend in _backends(device):
        yield ("selective_scan", backend, partial(selective_scan, delta_softplus=True, backend=backend),
               partial(selective_scan_ref, delta_softplus=True), scan_inputs)
        yield ("bi_selective_scan", backend, partial(bi_selective_scan, delta_softplus=True, backend=backend),
               partial(bi_selective_scan_ref, delta_softplus=True), bi_inputs)
        if backend != "cuda":
            for axis in ("spatial", "temporal", "global"):
                yield (f"video_attention[{axis}]", backend,
                       partial(video_attention, num_frames=3, axis=axis, backend=backend),
                       partial(video_attention_ref, num_frames=3, axis=axis), attn_inputs)


def _backends(device):
    backends = ["ref", "triton"]
    try:
        from matten_kernels.selective_scan import cuda as cuda_scan

        if device.type == "cuda" and cuda_scan.is_available():
            backends.append("cuda")
    except ImportError:
        pass
    return backends


def main(args) -> int:
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "matten", "selfcheck", *sys.argv[2:]], env)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    # float32 lands far under 1e-3 against float64; tf32 matmuls (attention on GPU) near 3e-4; bf16 below ~1e-2.
    tol = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"matten selfcheck on {where}, {dtype}, tolerance {tol:g} (relative, vs float64 reference)")
    failed = 0
    for op, backend, fn, ref, inputs in _cases(device):
        t0 = time.perf_counter()
        errs = _compare(fn, ref, inputs, dtype, device)
        worst = max(errs, key=errs.get)
        ok = all(e == e and e <= tol for e in errs.values())
        failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {op:28s} {backend:7s} worst {worst:>10s} {errs[worst]:.2e}  "
              f"({time.perf_counter() - t0:.1f} s)")
    print("all backends agree with the reference" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0
