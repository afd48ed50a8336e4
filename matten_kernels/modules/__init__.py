"""nn.Modules composed from matten's ops: the bidirectional Mamba mixer (``bimamba.py``)."""

from .bimamba import BiMamba

__all__ = ["BiMamba"]
