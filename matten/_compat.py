"""The diffusers classes the model builds on, with a minimal stand-in where diffusers is not installed.

The GPU machine that runs the benchmarks has torch and triton but no diffusers; the model must still build, run,
checkpoint its gradients and save/load safetensors there. With diffusers installed (CI, users) the real
``ModelMixin``/``ConfigMixin``/``register_to_config``/``Transformer2DModelOutput`` are used and nothing below the
``except`` runs.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

try:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    HAS_DIFFUSERS = True
except ImportError:  # pragma: no cover - exercised on the GPU machine
    HAS_DIFFUSERS = False

# Transformer2DModelOutput moved: diffusers >= 0.29 has it in models.modeling_outputs; older releases kept it next to
# Transformer2DModel (models.transformers.transformer_2d, before that models.transformer_2d).
Transformer2DModelOutput = None
if HAS_DIFFUSERS:
    for _path in ("diffusers.models.modeling_outputs", "diffusers.models.transformers.transformer_2d",
                  "diffusers.models.transformer_2d"):
        try:
            Transformer2DModelOutput = getattr(__import__(_path, fromlist=["Transformer2DModelOutput"]),
                                               "Transformer2DModelOutput")
            break
        except (ImportError, AttributeError):
            continue

if Transformer2DModelOutput is None:  # pragma: no cover

    @dataclass
    class Transformer2DModelOutput:
        """Stand-in for diffusers' output class: ``.sample``, ``[0]`` and ``to_tuple()``."""

        sample: torch.Tensor

        def __getitem__(self, i):
            return self.to_tuple()[i]

        def to_tuple(self):
            return (self.sample,)


if not HAS_DIFFUSERS:  # pragma: no cover
    _WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

    class _FrozenConfig(dict):
        """Read-only dict with attribute access, like diffusers' FrozenDict."""

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError as e:
                raise AttributeError(name) from e

    class ConfigMixin:
        config_name = "config.json"
        ignore_for_config: list = []

        def register_to_config(self, **kwargs):
            self._internal_dict = _FrozenConfig({k: v for k, v in kwargs.items() if not k.startswith("_")})

        @property
        def config(self):
            return self._internal_dict

    def register_to_config(init):
        @functools.wraps(init)
        def inner_init(self, *args, **kwargs):
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            values.pop("self")
            values.update(values.pop("kwargs", {}))
            self.register_to_config(**values)
            init(self, *args, **kwargs)

        return inner_init

    class ModelMixin(nn.Module):
        """Stand-in for diffusers' ModelMixin: gradient checkpointing switches and safetensors save/load."""

        _supports_gradient_checkpointing = False

        def enable_gradient_checkpointing(self, gradient_checkpointing_func=None):
            if not self._supports_gradient_checkpointing:
                raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
            func = gradient_checkpointing_func or (
                lambda module, *args: torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False))
            for module in self.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module._gradient_checkpointing_func = func
                    module.gradient_checkpointing = True

        def disable_gradient_checkpointing(self):
            for module in self.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False

        @property
        def is_gradient_checkpointing(self):
            return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

        def save_pretrained(self, save_directory, **_):
            from safetensors.torch import save_file

            os.makedirs(save_directory, exist_ok=True)
            with open(os.path.join(save_directory, self.config_name), "w") as f:
                json.dump({"_class_name": type(self).__name__, **self.config}, f, indent=2, sort_keys=True)
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, os.path.join(save_directory, _WEIGHTS_NAME))

        @classmethod
        def from_pretrained(cls, pretrained_model_path, torch_dtype=None, **overrides):
            """Config fields in ``overrides`` replace the saved ones (``kernel_backend="ref"``), as in diffusers."""
            from safetensors.torch import load_file

            with open(os.path.join(pretrained_model_path, cls.config_name)) as f:
                config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
            config.update({k: v for k, v in overrides.items() if k in config})
            model = cls(**config)
            model.load_state_dict(load_file(os.path.join(pretrained_model_path, _WEIGHTS_NAME)), strict=True)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
            return model.eval()

        @property
        def device(self):
            return next(self.parameters()).device

        @property
        def dtype(self):
            return next(self.parameters()).dtype


__all__ = ["HAS_DIFFUSERS", "ConfigMixin", "ModelMixin", "Transformer2DModelOutput", "register_to_config"]
