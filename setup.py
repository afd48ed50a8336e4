"""Optional ahead-of-time build of the CUDA selective scan (csrc/selective_scan).

Everything about the package lives in pyproject.toml; this file only adds the extension, and only when asked:

    MATTEN_BUILD_CUDA=1 pip install -e . --no-build-isolation     # needs nvcc and a CUDA build of PyTorch

It builds matten_kernels/selective_scan/_C*.so (for TORCH_CUDA_ARCH_LIST, or the visible GPUs' architectures), which
matten_kernels.selective_scan.cuda loads instead of compiling on first use. Without MATTEN_BUILD_CUDA=1 nothing is
compiled and the plain (pure Python) install is unchanged.
"""

import os

from setuptools import setup

if os.environ.get("MATTEN_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = os.path.join("csrc", "selective_scan")
    sources = ["selective_scan.cpp"] + [f"selective_scan_{d}_{t}.cu" for d in ("fwd", "bwd")
                                        for t in ("fp32", "fp16", "bf16")]
    setup(
        ext_modules=[
            CUDAExtension(
                name="matten_kernels.selective_scan._C",
                sources=[os.path.join(csrc, s) for s in sources],
                include_dirs=[os.path.abspath(csrc)],
                extra_compile_args={"cxx": ["-O3"],
                                    "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            )
        ],
        cmdclass={"build_ext": BuildExtension},
    )
else:
    setup()
