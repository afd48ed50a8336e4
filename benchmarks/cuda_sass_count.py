"""Offline counts for the CUDA lanes kernels (no GPU): registers, spills and the SASS instruction mix, per variant.

Compiles ``csrc/selective_scan/selective_scan_{fwd,bwd}_<dtype>.cu`` for sm_90 with nvcc (``-Xptxas -v``) and each
variant's -D flags, then disassembles the object with the ``cuobjdump`` Triton ships and prints, for every lanes
kernel (forward / backward, uni / bi, N = 16 exactly or masked rows): registers, stack frame, spill stores / loads
(ptxas' report) and the counts of instructions, local-memory (LDL / STL), shared-memory (LDS / STS), MUFU.EX2 and
SHFL in its SASS. A first filter for kernel variants before they are timed on the device
(``cuda_lanes_variants.py``): session 11 found spills and instruction counts that changed without the time changing,
so these numbers predict nothing alone (``csrc/selective_scan/NOTES.md``). Per kernel also its main loop: size, the
median distance from a shuffle to the use of its result, and the cycles a crude one-warp in-order model gives an
iteration (``schedule``): it flags a schedule that stopped overlapping the states (session 18), nothing finer.

Usage: python benchmarks/cuda_sass_count.py [--variants "base=;a2=-DLANES_AHEAD=2"] [--dtype bf16] [--which bwd]
       [--hist "fwd uni exact staged"]   (also that kernel's main-loop opcode counts: where its instructions go)
       [--same-as 77be19f]               (also whether each kernel's SASS is the one that revision's sources give:
                                          a refactor or a default-off knob that must not change the default build)
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
    """'fwd uni exact z staged', 'bwd bi-rev masked n8' etc. from scan_fwd_lanes_kernel<T, NMAX, EXACT, PASS, Z, STAGE>
    and scan_bwd_lanes_kernel<T, NMAX, EXACT, PASS>'s mangled names (n8: the 8-state kernels)."""
    m = re.search(r"scan_(fwd|bwd)_lanes_kernel.*?Li(16|8)ELb([01])ELi([012])E(?:Lb([01])E)?(?:Lb([01])E)?", mangled)
    if not m:
        return mangled
    pass_ = {"0": "uni", "1": "bi-rev", "2": "bi-fwd"}[m.group(4)]
    fwd = m.group(1) == "fwd"  # forward: <..., Z, STAGE>; backward: <..., STAGE>
    z = " z" if fwd and m.group(5) == "1" else ""
    staged = " staged" if (m.group(6) if fwd else m.group(5)) == "1" else ""
    n8 = " n8" if m.group(2) == "8" else ""
    return f"{m.group(1)} {pass_} {'exact' if m.group(3) == '1' else 'masked'}{z}{staged}{n8}"


# A crude in-order model of one warp over a kernel's main loop (the longest backward branch): an instruction issues
# when its source registers are ready, one a cycle, with these latencies (cycles; 4 for the rest) and one MUFU per 8
# cycles. It does not predict the 3-10% differences between builds (session 18: a build it scored 4% faster ran 10%
# slower), but it flags a schedule that stopped overlapping the states: the bidirectional forward that ran 52% slower
# scored 9,194 cycles a window against ~3,400 (its shuffles' results used 3 instructions after them, median, against
# 15-18). csrc/selective_scan/NOTES.md, session 18.
_LATENCY = (("MUFU", 18), ("SHFL", 24), ("LDS", 30), ("LDG", 300), ("LDL", 40), ("IMAD.WIDE", 6), ("F2FP", 6))
_NO_DEST = ("ST", "RED", "BRA", "BAR", "EXIT", "NOP", "BSYNC", "BSSY", "WARPSYNC", "ATOM")


def _regs(text: str) -> set:
    out = set()
    for m in re.finditer(r"\b(R|P|UR|UP)(\d+)(\.64)?\b", text):
        out.add((m.group(1), int(m.group(2))))
        if m.group(3):
            out.add((m.group(1), int(m.group(2)) + 1))
    return out - {("R", 255)}


def main_loop(chunk: str) -> list:
    """The (address, instruction) pairs of a kernel's main loop: the longest backward branch's body."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
    body = []
    for a, t in ins:
        m = re.search(r"BRA[^0-9]*0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            cand = [x for x in ins if int(m.group(1), 16) <= x[0] <= a]
            body = cand if len(cand) > len(body) else body
    return body


def histogram(chunk: str) -> list:
    """(opcode, count) of a kernel's main loop, most frequent first (predicates dropped, modifiers kept)."""
    counts = {}
    for _, t in main_loop(chunk):
        op = re.sub(r"^@!?U?P\w+\s+", "", t).split(" ")[0]
        counts[op] = counts.get(op, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def schedule(chunk: str) -> dict:
    """Main-loop size, the median distance (instructions) from a SHFL to the first use of its result, and the modelled
    cycles a loop iteration for one warp."""
    body = main_loop(chunk)
    ready, t, last_mufu, shfl_dst, dists = {}, 0, -99, {}, []
    for i, (_, text) in enumerate(body):
        pred = re.match(r"^(@!?U?P\w+)\s+", text)
        srcs = _regs(pred.group(1)) if pred else set()
        op, _, rest = text[pred.end() if pred else 0:].partition(" ")
        ops = [o.strip() for o in rest.split(",")] if rest.strip() else []
        if op.startswith(_NO_DEST):
            dst, srcs = set(), srcs.union(*map(_regs, ops))
        elif op.startswith("SHFL"):
            dst, srcs = _regs(ops[1]), srcs.union(*map(_regs, ops[2:]))
        elif op.startswith(("ISETP", "FSETP", "PLOP3", "UISETP")):
            dst, srcs = _regs(ops[0]) | _regs(ops[1]), srcs.union(*map(_regs, ops[2:]))
        else:
            dst, srcs = (_regs(ops[0]) if ops else set()), srcs.union(*map(_regs, ops[1:]))
            width = 4 if ".128" in op else 2 if ".64" in op else 1
            if op.startswith(("LDG", "LDS", "LDL")) and width > 1:
                dst = {(k, n + w) for k, n in dst for w in range(width)}
        for r in srcs & set(shfl_dst):
            dists.append(i - shfl_dst.pop(r))
        t = max([t + 1] + [ready.get(r, 0) for r in srcs])
        if op.startswith("MUFU"):
            t = last_mufu = max(t, last_mufu + 8)
        lat = next((v for k, v in _LATENCY if op.startswith(k)), 4)
        for r in dst:
            ready[r] = t + lat
            shfl_dst.pop(r, None)
            if op.startswith("SHFL"):
                shfl_dst[r] = i
    dists.sort()
    return {"loop_instr": len(body), "shfl_use": dists[len(dists) // 2] if dists else "-",
            "loop_cycles": max([t, *ready.values()]) if body else "-"}


def normalized(chunk: str) -> str:
    """A function's SASS without addresses and encodings: equal for two builds that emit the same instructions."""
    return "\n".join(re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", chunk))


def compile_counts(which: str, dtype: str, flags: str, csrc: str = _CSRC) -> dict:
    """{kernel: {registers, stack, spill_st, spill_ld, instr, LDL, ..., "hist": main-loop opcode counts, "sass": its
    normalized SASS}} for the lanes kernels of one translation unit (of the sources in `csrc`)."""
    src = os.path.join(csrc, f"selective_scan_{which}_{dtype}.cu")
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        r = subprocess.run([_tool("nvcc"), *_FLAGS, *flags.split(), f"-I{csrc}", src, "-o", obj],
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
        out[name].update(schedule(chunk))
        out[name]["hist"] = histogram(chunk)
        out[name]["sass"] = normalized(chunk)
    return {_short(k): v for k, v in out.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="default=", help='"name=flags;name=flags" (flags may be empty)')
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--which", default="fwd,bwd")
    p.add_argument("--hist", default="", help='also the main loop\'s opcode counts of these kernels ("fwd uni exact '
                                             'staged;bwd uni exact")')
    p.add_argument("--same-as", default="", metavar="REV",
                   help="also whether each kernel's SASS is the same as REV's sources give (git archive of csrc/)")
    args = p.parse_args()
    hist = [k for k in args.hist.split(";") if k]
    ref = tempfile.TemporaryDirectory() if args.same_as else None
    if ref:
        tar = subprocess.run(["git", "-C", _REPO, "archive", args.same_as, "csrc/selective_scan"], capture_output=True,
                             check=True).stdout
        subprocess.run(["tar", "-x", "-C", ref.name], input=tar, check=True)
    cols = ["registers", "stack", "spill_st", "spill_ld", "instr", *_COUNTED, "loop_instr", "shfl_use", "loop_cycles"]
    print(f"{'variant':>10} {'kernel':<22} " + " ".join(f"{c:>11}" for c in cols))
    for item in (v for v in args.variants.split(";") if v):
        name, flags = item.split("=", 1)
        for which in args.which.split(","):
            counts = sorted(compile_counts(which, args.dtype, flags).items())
            for kernel, c in counts:
                print(f"{name:>10} {kernel:<22} " + " ".join(f"{c.get(k, '-'):>11}" for k in cols), flush=True)
            for kernel, c in counts:
                if kernel in hist:
                    print(f"{name:>10} {kernel}: main loop " + ", ".join(f"{op} {n}" for op, n in c["hist"]))
            if ref:
                old = compile_counts(which, args.dtype, flags, os.path.join(ref.name, "csrc", "selective_scan"))
                same = [k for k, c in counts if k in old and old[k]["sass"] == c["sass"]]
                print(f"{name:>10} {which}: SASS the same as {args.same_as}'s in {len(same)} of {len(counts)} kernels"
                      + "".join(f"\n{name:>10}   differs: {k}" for k, _ in counts if k not in same), flush=True)


if __name__ == "__main__":
    main()
