"""Count the SASS instructions of the scan kernels' loops, offline (no GPU): compile for sm_90 and disassemble.

The launchers are run on CPU tensors with `launch` replaced by a recorder, so each kernel is compiled with exactly the
arguments, meta-parameters and specialisations (16-byte alignment, ints divisible by 16 or equal to 1) the launcher
would give it on a GPU. Then every loop of the SASS (a backward branch to a label) is listed with its instruction
count and its opcode histogram, the per-element cost of the main loop, and how far ahead of their first use its
global loads are issued.

Usage: PYTHONPATH=.:/tmp/t36 python benchmarks/sass_count.py [--shape global_xl] [--kernel fwd|lanes|bwd|lanes_bwd]
       [--bi] [--save STEPS] [--meta "{'WORDS': True}"] [--dump FILE]
(Triton 3.6 is the device's version: `pip install --target /tmp/t36 triton==3.6.0`; its layouts differ from 3.9's.)
Needs ptxas and nvdisasm (Triton ships both).
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from matten_kernels.selective_scan import triton_bwd, triton_bwd_lanes, triton_fwd, triton_fwd_lanes

SHAPES = {"global_xl": (2, 2304, 16, 4096), "global_s": (8, 768, 16, 4096), "spatial_xl": (32, 2304, 16, 256),
          "temporal_xl": (512, 2304, 16, 16), "long": (1, 2304, 16, 16384)}
_TY = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}


def record(fn, *args, **kwargs):
    """Run a launcher with ``launch`` replaced; returns [(kernel, grid, args, meta)]."""
    calls = []
    mods = (triton_fwd, triton_bwd, triton_fwd_lanes, triton_bwd_lanes)
    saved = [m.launch for m in mods]
    for m in mods:
        m.launch = lambda k, g, a, mm: calls.append((k, g, a, mm))
    try:
        fn(*args, **kwargs)
    finally:
        for m, f in zip(mods, saved):
            m.launch = f
    return calls


def compile_sass(kernel, args, meta):
    """(SASS text, registers, shared memory bytes) of ``kernel`` specialised as Triton would for ``args`` (CPU
    tensors stand for the GPU ones)."""
    fn = kernel
    names = fn.arg_names
    sig, attrs, constexprs = {}, {}, {}
    params = [p for p in names if p not in meta]
    assert len(params) == len(args), (len(params), len(args))
    for i, (name, a) in enumerate(zip(params, args)):
        idx = names.index(name)
        if isinstance(a, torch.Tensor):
            sig[name] = _TY[a.dtype]
            attrs[(idx,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                sig[name], constexprs[(idx,)] = "constexpr", 1
                continue
            sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(a)}")
    options = {}
    for k, v in meta.items():
        if k in ("num_warps", "num_stages", "maxnreg"):
            options[k] = v
        else:
            sig[k] = "constexpr"
            constexprs[(names.index(k),)] = v
    src = ASTSource(fn, sig, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", path], check=True, capture_output=True,
                              text=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True).stdout
        regs = re.search(r"REG:(\d+)", usage)
        return sass, int(regs.group(1)) if regs else None, compiled.metadata.shared


def loops(sass: str):
    """[(label, [opcodes])] for each backward branch: the instructions from the label to the branch."""
    lines = sass.splitlines()
    label_at, instrs = {}, []
    for line in lines:
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            label_at[m.group(1)] = len(instrs)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if m:
            instrs.append((m.group(2), m.group(3)))
    out = []
    for i, (op, rest) in enumerate(instrs):
        if op.startswith("BRA"):
            t = re.search(r"(\.L_x_\d+)", rest)
            if t and t.group(1) in label_at and label_at[t.group(1)] <= i:
                out.append((t.group(1), instrs[label_at[t.group(1)]:i + 1]))
    return out, len(instrs)


def load_use_distances(instrs) -> list:
    """For each global load (LDG) of a loop: the instructions from it to the first one reading a register it writes
    (where the warp waits for it; loads whose value is not read inside the loop are left out). Short distances mean
    the compiler placed a load next to its use: its latency is exposed (session 31: the bidirectional forward's
    reverse launch with word loads, median 21 against 221 with element loads, ran 38% slower)."""
    dists = []
    for i, (op, rest) in enumerate(instrs):
        if not op.startswith("LDG"):
            continue
        m = re.match(r"R(\d+)", rest)
        width = {"128": 4, "64": 2}.get(op.rsplit(".", 1)[-1], 1)
        regs = [f"R{int(m.group(1)) + k}" for k in range(width)] if m else []
        for j in range(i + 1, len(instrs)):
            o, r = instrs[j]
            srcs = r if o.startswith(("ST", "RED", "ATOM")) else r.partition(",")[2]
            if any(re.search(rf"\b{x}\b", srcs) for x in regs):
                dists.append(j - i)
                break
    return dists


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="global_xl", choices=sorted(SHAPES))
    p.add_argument("--kernel", default="fwd", choices=["fwd", "lanes", "bwd", "lanes_bwd"],
                   help="fwd: the segment forward; lanes: the one-pass forward (triton_fwd_lanes.py); bwd: the "
                        "segment backward; lanes_bwd: the lanes backward (triton_bwd_lanes.py)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--bi", action="store_true", help="lanes / lanes_bwd: the bidirectional scan's two launches (Vim "
                                                       "v2 inputs, z)")
    p.add_argument("--save", type=int, default=0, help="lanes / lanes_bwd: the saved states' spacing (default: the "
                                                       "op's for the lanes backward)")
    p.add_argument("--dump", default=None, help="write the SASS of each kernel to FILE.<i>.sass")
    p.add_argument("--meta", default=None, help="meta-parameter overrides as a dict literal, e.g. \"{'maxnreg': 240}\" "
                                                 "(the lanes kernels' overrides; fwd / bwd: their main pass's)")
    args = p.parse_args()
    if args.meta:
        over = dict(lanes=triton_fwd_lanes.META_OVERRIDES, lanes_bwd=triton_bwd_lanes._META_OVERRIDES,
                    fwd=triton_fwd.MAIN_META_OVERRIDES, bwd=triton_bwd.MAIN_META_OVERRIDES)[args.kernel]
        over.update(ast.literal_eval(args.meta))
    batch, dim, N, L = SHAPES[args.shape]
    dt = getattr(torch, args.dtype)
    u = torch.zeros(batch, dim, L, dtype=dt)
    delta = torch.zeros_like(u)
    A = torch.zeros(dim, N)
    B = torch.zeros(batch, N, L, dtype=dt)
    C = torch.zeros_like(B)
    D = torch.zeros(dim)
    bias = torch.zeros(dim)
    save = args.save or triton_bwd_lanes.lanes_save_steps(u, B, C)
    v2 = (u, delta, A, B, C, D, bias)  # the backward direction's inputs (the same tensors: only the code matters)
    if args.kernel == "fwd":
        calls = record(triton_fwd.selective_scan_fwd, u, delta, A, B, C, D, None, bias, None, True)
    elif args.kernel == "lanes" and args.bi:
        calls = record(triton_fwd_lanes.bi_selective_scan_fwd_lanes, u, delta, A, B, C, D, torch.zeros_like(u), bias,
                       *v2, True, False, save=save)
    elif args.kernel == "lanes":
        calls = record(triton_fwd_lanes.selective_scan_fwd_lanes, u, delta, A, B, C, D, None, bias, None, True)
    elif args.kernel == "lanes_bwd" and args.bi:
        states = torch.zeros(batch, dim, triton_fwd.kept_states(L, save), N)
        calls = record(triton_bwd_lanes.bi_selective_scan_bwd_lanes, torch.zeros_like(u), u, delta, A, B, C, D,
                       torch.zeros_like(u), bias, *v2, states, states, True, False)
    elif args.kernel == "lanes_bwd":
        states = torch.zeros(batch, dim, triton_fwd.kept_states(L, save), N)
        calls = record(triton_bwd_lanes.selective_scan_bwd_lanes, torch.zeros_like(u), None, u, delta, A, B, C, D,
                       None, bias, None, states, True)
    else:
        states = torch.zeros(batch, dim, triton_fwd.kept_states(L), N)
        calls = record(triton_bwd.selective_scan_bwd, torch.zeros_like(u), None, u, delta, A, B, C, D, None, bias,
                       None, states, True, deterministic=False)
    for i, (kernel, grid, kargs, meta) in enumerate(calls):
        sass, n_regs, smem = compile_sass(kernel, kargs, meta)
        if args.dump:
            with open(f"{args.dump}.{i}.sass", "w") as fh:
                fh.write(sass)
        found, total = loops(sass)
        # (t, n) elements a thread handles per iteration of the chunk (segment kernels) or window (lanes) loop
        if "VEC" in meta:  # the lanes backward
            elems = meta["VEC"] * meta["BLOCK_N"]
        else:
            elems = meta["W"] // 32 * meta["BLOCK_N"] if "W" in meta else meta["CHUNK"] * meta["NH"]
        print(f"== launch {i}: grid {grid}, meta { {k: v for k, v in meta.items() if k.isupper() or k == 'num_warps'} }")
        print(f"   registers {n_regs}, shared memory {smem} bytes, SASS instructions {total}")
        for label, body in found:
            ops = [o for o, _ in body]
            hist = collections.Counter(o.split(".")[0] for o in ops)
            top = ", ".join(f"{k} {v}" for k, v in hist.most_common(12))
            print(f"   loop {label}: {len(ops)} instructions ({len(ops) / elems:.1f} per element if a chunk loop); {top}")
            dists = sorted(load_use_distances(body))
            if dists:
                print(f"      global load -> first use: median {dists[len(dists) // 2]}, min {dists[0]} instructions "
                      f"({len(dists)} loads)")


if __name__ == "__main__":
    main()
