"""Selective scan (Mamba S6), uni- and bidirectional: reference, Triton kernels, public interface.

reference.py  the spec (plain PyTorch loop over time)
triton_fwd.py forward kernels + launchers (time in registers, sequence segments; uni and bi)
triton_fwd_lanes.py  the uni forward with time across lanes (one pass), for long 16-bit sequences
triton_bwd.py backward kernels + launchers (from the states either forward saved)
_ops.py       torch.library custom ops (matten::selective_scan_fwd/_bwd, matten::bi_selective_scan_fwd/_bwd)
interface.py  public functions: validation and backend dispatch
cuda.py       the CUDA extension's entry points (csrc/selective_scan)
"""

from .interface import bi_selective_scan, selective_scan
from .reference import bi_selective_scan_ref, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "bi_selective_scan", "bi_selective_scan_ref"]
