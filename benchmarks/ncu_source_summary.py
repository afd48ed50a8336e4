"""Where a kernel's warps wait: a summary of Nsight Compute's per-instruction (SASS) warp-state samples.

Reads the CSV that ``ncu -i REPORT --page source --csv --print-source sass`` writes for a report taken with
``--section SourceCounters --section WarpStateStats`` (device run, e.g. over ``benchmarks/ncu_scan.py``), and prints
the share of the samples each stall reason has, the samples by how often the instruction ran (one row per loop level:
per group of states, per window, per warp), and the instructions with the most samples of one reason, each with the
load (LDG / LDL / LDS / SHFL ...) that last wrote one of its operands before it.

Usage: python benchmarks/ncu_source_summary.py bwd-sass.csv [--reason stall_long_sb] [--top 20]
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

_LOADS = ("LDG", "LDL", "LDS", "LDSM", "SHFL", "MUFU", "LDC", "S2R", "ATOM", "RED")


def _writer(rows, src_col, i, regs, window=400):
    """The nearest load-like instruction before row i that writes one of `regs` (its index and text), if any."""
    for j in range(i - 1, max(-1, i - window), -1):
        text = re.sub(r"^@!?U?P\w+\s+", "", rows[j][src_col].strip())
        op, _, rest = text.partition(" ")
        dst = set(re.findall(r"\bR\d+\b", rest.split(",")[0])) if rest else set()
        if dst & regs:
            return (j, text) if op.startswith(_LOADS) else None
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--reason", default="stall_long_sb", help="the stall reason whose top instructions are listed")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        table = list(csv.reader(f))
    header = next(r for r in table if "Source" in r)
    rows = table[table.index(header) + 1:]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "(Not" not in h]

    def num(r, k):
        try:
            return float(r[col[k]])
        except (ValueError, IndexError):
            return 0.0

    total = collections.Counter()
    for r in rows:
        for k in reasons:
            total[k] += num(r, k)
    n = sum(total.values()) or 1.0
    print(f"{int(n)} samples")
    for k, v in total.most_common():
        if v:
            print(f"  {k:<24} {v / n:6.1%}")
    by_count = collections.Counter()
    for r in rows:
        by_count[int(num(r, "Instructions Executed"))] += sum(num(r, k) for k in reasons)
    print("samples by executions of the instruction (one row per loop level):")
    for count, v in sorted(by_count.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  executed {count:>9}: {v / n:6.1%}")
    print(f"top instructions by {args.reason}:")
    src = col["Source"]
    ranked = sorted(range(len(rows)), key=lambda i: -num(rows[i], args.reason))[:args.top]
    for i in ranked:
        v = num(rows[i], args.reason)
        if not v:
            break
        text = rows[i][src].strip()
        regs = set(re.findall(r"\bR\d+\b", text.split(",", 1)[1] if "," in text else ""))
        w = _writer(rows, src, i, regs)
        print(f"  {v / n:6.1%}  [{i:5d}] {text[:56]:<56} x{int(num(rows[i], 'Instructions Executed'))}"
              + (f"   <- [{w[0]}] {w[1][:48]}" if w else ""))


if __name__ == "__main__":
    main()
