"""One denoiser forward replayed as a CUDA graph: sampling without the host's per-kernel launch cost.

A Matten-XL/2 forward launches ~1,500 kernels; on the H100 machine the host needs longer to issue them (Python, the
ops' validation and launchers, cuBLAS) than the GPU needs to run them, so an eager sampling step is host-bound
(benchmarks/README.md). Sampling calls the same forward with the same shapes at every step, so it is captured once
and replayed: the inputs are copied into the captured buffers, the graph runs, the output buffer is read.

Semantics are those of ``model(hidden_states, timestep, class_labels=...).sample`` under the autocast state of the
call; the graph is re-captured when the shapes, dtypes or autocast state change.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class CUDAGraphForward:
    """``model(x, t, class_labels).sample`` of a no-grad forward, as a captured CUDA graph (CUDA tensors only).

    Call it like the model; it returns a new tensor (a copy of the graph's output buffer) each call. Capture runs the
    forward three times first on a side stream (kernel compilation, cuBLAS workspaces, lazy initialisation), then
    records it. Anything in the forward that needs the host mid-way (a ``.item()``, a data-dependent Python branch)
    makes the capture fail with CUDA's error; it is re-raised with that context.
    """

    def __init__(self, model: torch.nn.Module, warmup: int = 3):
        self.model, self.warmup = model, warmup
        self.graph = self.key = self.inputs = self.output = None

    @staticmethod
    def _key(x, t, labels):
        spec = lambda v: None if v is None else (tuple(v.shape), v.dtype, v.device)  # noqa: E731
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        return spec(x), spec(t), spec(labels), autocast

    def _capture(self, x, t, labels):
        self.inputs = [None if v is None else v.clone() for v in (x, t, labels)]
        sx, st, sl = self.inputs
        kwargs = {} if sl is None else {"class_labels": sl}
        # The caller's autocast state, with its weight-cast cache off: cached casts live until the caller's autocast
        # context exits, and a graph that read them would replay from freed memory; uncached, the casts are recorded.
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), autocast, torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(sx, st, **kwargs)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), autocast, torch.cuda.graph(graph):
                self.output = self.model(sx, st, **kwargs).sample
        except RuntimeError as e:
            raise RuntimeError(f"CUDAGraphForward: capturing the model's forward failed ({e}); sample without the "
                               "CUDA graph (MattenPipeline(..., cuda_graph=False), `matten sample --no-cuda-graph`)"
                               ) from e
        self.graph = graph
        logger.info("captured the denoiser forward as a CUDA graph: x %s, autocast %s", tuple(x.shape),
                    torch.is_autocast_enabled("cuda"))

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not hidden_states.is_cuda:
            raise ValueError(f"CUDAGraphForward: hidden_states must be a CUDA tensor, got {hidden_states.device}")
        timestep = timestep.to(hidden_states.device).reshape(-1).expand(hidden_states.shape[0])  # (B,)
        key = self._key(hidden_states, timestep, class_labels)
        if key != self.key:
            self._capture(hidden_states, timestep, class_labels)
            self.key = key
        for static, v in zip(self.inputs, (hidden_states, timestep, class_labels)):
            if static is not None:
                static.copy_(v)
        self.graph.replay()
        return self.output.clone()
