"""nn.Modules composed from matten's ops: the bidirectional Mamba mixer (``bimamba.py``) and its time-contiguous
projections (``channel_linear.py``)."""

from .bimamba import BiMamba
from .channel_linear import channel_linear

__all__ = ["BiMamba", "channel_linear"]
