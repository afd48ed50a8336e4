"""adaLN / M-AdaN elementwise ops of the model's blocks: LayerNorm + modulation, and the gated residual.

reference.py      the spec (the plain PyTorch composition DiT writes)
triton_kernels.py  forward and backward kernels + launchers of both ops (one pass each way, fp32 arithmetic)
interface.py      torch.library custom ops (matten::layer_norm_modulate_*, matten::gated_residual_*) and the public
                  functions
"""

from .interface import gated_residual, layer_norm_modulate
from .reference import gated_residual_ref, layer_norm_modulate_ref

__all__ = ["layer_norm_modulate", "gated_residual", "layer_norm_modulate_ref", "gated_residual_ref"]
