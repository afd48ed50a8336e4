"""Build mamba-ssm's selective-scan CUDA extension (``selective_scan_cuda``) from a source checkout, for comparison.

Usage: python benchmarks/build_mamba_scan.py PATH_TO_MAMBA_SSM_SOURCE BUILD_DIR [ARCH]

PATH is an unpacked mamba-ssm source distribution (e.g. ``pip download --no-deps --no-binary :all: mamba-ssm==2.3.2.post1``);
nothing of it is part of this repository. Builds only that extension, only for one architecture (default: the current
GPU's, e.g. 90), with the nvcc flags of mamba-ssm's setup.py, through torch.utils.cpp_extension (ninja, parallel).
The module lands in BUILD_DIR; put BUILD_DIR on sys.path (the benchmarks accept --mamba-build BUILD_DIR).
"""

import os
import sys
import time
from pathlib import Path


def main():
    src, build = Path(sys.argv[1]) / "csrc" / "selective_scan", Path(sys.argv[2])
    import torch
    from torch.utils.cpp_extension import load

    arch = sys.argv[3] if len(sys.argv) > 3 else "%d%d" % torch.cuda.get_device_capability()
    build.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    names = ["selective_scan.cpp"] + [f"selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")] + [
        f"selective_scan_bwd_{t}_{k}.cu" for t in ("fp32", "fp16", "bf16") for k in ("real", "complex")]
    flags = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
             "--expt-extended-lambda", "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    t0 = time.time()
    load(name="selective_scan_cuda", sources=[str(src / n) for n in names], extra_cflags=["-O3", "-std=c++17"],
         extra_cuda_cflags=flags, extra_include_paths=[str(src)], build_directory=str(build), verbose=False)
    print(f"built selective_scan_cuda for sm_{arch} in {time.time() - t0:.0f} s into {build}")


if __name__ == "__main__":
    main()
