"""matten: the Matten video diffusion model (Mamba-Attention), its configs, training, sampling and tools.

The package import is light: the model (torch, diffusers, the kernels) loads on first use of its names, so
``python -m matten info`` and friends start fast.
"""

from .config import MATTEN_CONFIGS, MattenConfig, get_config, parameter_formula

_LAZY = {
    "MattenTransformer3DModel": "matten.model",
    "create_model": "matten.model",
    "count_parameters": "matten.model",
    "MattenPipeline": "matten.pipeline",
}

__all__ = ["MATTEN_CONFIGS", "MattenConfig", "get_config", "parameter_formula", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'matten' has no attribute {name!r}")
