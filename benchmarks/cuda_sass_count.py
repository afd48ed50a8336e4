"""Offline counts for the CUDA lanes kernels (no GPU): registers, spills and the SASS instruction mix, per variant.

Compiles ``csrc/selective_scan/selective_scan_{fwd,bwd}_<dtype>.cu`` for sm_90 with nvcc (``-Xptxas -v``) and each
variant's -D flags, then disassembles the object with the ``cuobjdump`` Triton ships and prints, for every lanes
kernel (forward / backward, uni / bi, N = 16 exactly or masked rows): registers, stack frame, spill stores / loads
(ptxas' report) and the counts of instructions, local-memory (LDL / STL), shared-memory (LDS / STS), MUFU.EX2 and
SHFL in its SASS. A first filter for kernel variants before they are timed on the device
(``cuda_lanes_variants.py``): session 11 found spills and instruction counts that changed without the time changing,
so these numbers predict nothing alone (``csrc/selective_scan/NOTES.md``).

Usage: python benchmarks/cuda_sass_count.py [--variants "base=;a2=-DLANES_AHEAD=2"] [--dtype bf16] [--which bwd]
Needs nvcc (CUDA 12+) on PATH or under CUDA_HOME.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_REPO, "csrc", "selective_scan")
_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-arch=sm_90", "-Xptxas", "-v", "-c"]
_COUNTED = ("LDL", "STL", "LDS", "STS", "MUFU.EX2", "SHFL")


def _tool(name: str) -> str:
    if name == "cuobjdump":
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which(name) or os.path.join(cuda_home, "bin", name)
    if not os.path.exists(found):
        raise SystemExit(f"{name} not found (PATH, CUDA_HOME or Triton's bundled tools)")
    return found


def _short(mangled: str) -> str:
    """'fwd uni exact' etc. from scan_{fwd,bwd}_lanes_kernel<T, 16, EXACT, BI>'s mangled name."""
    m = re.search(r"scan_(fwd|bwd)_lanes_kernel.*Li16ELb([01])ELb([01])E", mangled)
    if not m:
        return mangled
    return f"{m.group(1)} {'bi' if m.group(3) == '1' else 'uni'} {'exact' if m.group(2) == '1' else 'masked'}"


def compile_counts(which: str, dtype: str, flags: str) -> dict:
    """{kernel: {registers, stack, spill_st, spill_ld, instr, LDL, ...}} for the lanes kernels of one translation unit."""
    src = os.path.join(_CSRC, f"selective_scan_{which}_{dtype}.cu")
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        r = subprocess.run([_tool("nvcc"), *_FLAGS, *flags.split(), f"-I{_CSRC}", src, "-o", obj],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True).stdout
    out, current = {}, None
    for line in r.stderr.splitlines():  # ptxas -v: "Compiling entry ...", "Function properties ...", "Used ..."
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = m.group(1) if "lanes_kernel" in m.group(1) else None
            if current:
                out[current] = {}
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                         line)):
            out[current].setdefault("stack", int(m.group(1)))
            out[current].setdefault("spill_st", int(m.group(2)))
            out[current].setdefault("spill_ld", int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            out[current]["registers"] = int(m.group(1))
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if name not in out:
            continue
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", chunk)
        out[name]["instr"] = len(ops)
        for op in _COUNTED:
            out[name][op] = sum(1 for o in ops if o == op or o.startswith(op + "."))
    return {_short(k): v for k, v in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="default=", help='"name=flags;name=flags" (flags may be empty)')
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--which", default="fwd,bwd")
    args = p.parse_args()
    cols = ["registers", "stack", "spill_st", "spill_ld", "instr", *_COUNTED]
    print(f"{'variant':>10} {'kernel':<18} " + " ".join(f"{c:>9}" for c in cols))
    for item in (v for v in args.variants.split(";") if v):
        name, flags = item.split("=", 1)
        for which in args.which.split(","):
            for kernel, c in sorted(compile_counts(which, args.dtype, flags).items()):
                print(f"{name:>10} {kernel:<18} " + " ".join(f"{c.get(k, '-'):>9}" for k in cols), flush=True)


if __name__ == "__main__":
    main()
