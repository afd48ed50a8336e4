"""The denoiser's forward (sampling) and a training step's forward + backward replayed as CUDA graphs: no host
per-kernel launch cost.

A Matten-XL/2 forward launches ~1,500 kernels; on the H100 machine the host needs longer to issue them (Python, the
ops' validation and launchers, cuBLAS) than the GPU needs to run them, so an eager sampling step is host-bound
(benchmarks/README.md). Sampling calls the same forward with the same shapes at every step, so it is captured once
and replayed: the inputs are copied into the captured buffers, the graph runs, the output buffer is read.

Semantics are those of ``model(hidden_states, timestep, class_labels=...).sample`` under the autocast state of the
call; the graph is re-captured when the shapes, dtypes or autocast state change.

Training has the same problem (a Matten-XL/2 training step issues ~3,000 kernels) and the same answer: every step
runs the same forward, loss and backward on a batch of the same shape, so :class:`CUDAGraphTrainStep` captures them
once; the optimizer, gradient clipping and EMA stay eager (a few fused launches), so learning-rate schedules and
logging work unchanged.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def _key(tensors) -> tuple:
    """What a capture depends on: the inputs' shapes, dtypes and devices, and the caller's CUDA autocast state."""
    spec = lambda v: None if v is None else (tuple(v.shape), v.dtype, v.device)  # noqa: E731
    return tuple(spec(v) for v in tensors) + (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


def _capture_autocast():
    """The caller's autocast state, with its weight-cast cache off: cached casts live until the caller's autocast
    context exits, and a graph that read them would replay from freed memory; uncached, the casts are recorded."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


def _capture(fn, device: torch.device, warmup: int, what: str, hint: str, warm=None):
    """Run ``warm`` (default ``fn``) ``warmup`` times on a side stream (Triton compilation, cuBLAS workspaces, lazy
    initialisation), then record ``fn``; returns (graph, fn's result from the capture)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            (warm or fn)()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            result = fn()
    except RuntimeError as e:
        raise RuntimeError(f"capturing {what} as a CUDA graph failed ({e}); {hint}") from e
    return graph, result


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

    def _capture(self, x, t, labels):
        self.inputs = [None if v is None else v.clone() for v in (x, t, labels)]
        sx, st, sl = self.inputs
        kwargs = {} if sl is None else {"class_labels": sl}

        def forward():
            with torch.no_grad(), _capture_autocast():
                return self.model(sx, st, **kwargs).sample

        self.graph, self.output = _capture(forward, x.device, self.warmup, "the model's forward",
                                           "sample without it (MattenPipeline(..., cuda_graph=False), "
                                           "`matten sample --no-cuda-graph`)")
        logger.info("captured the denoiser forward as a CUDA graph: x %s, autocast %s", tuple(x.shape),
                    torch.is_autocast_enabled("cuda"))

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if not hidden_states.is_cuda:
            raise ValueError(f"CUDAGraphForward: hidden_states must be a CUDA tensor, got {hidden_states.device}")
        timestep = timestep.to(hidden_states.device).reshape(-1).expand(hidden_states.shape[0])  # (B,)
        key = _key((hidden_states, timestep, class_labels))
        if key != self.key:
            self._capture(hidden_states, timestep, class_labels)
            self.key = key
        for static, v in zip(self.inputs, (hidden_states, timestep, class_labels)):
            if static is not None:
                static.copy_(v)
        self.graph.replay()
        return self.output.clone()


class CUDAGraphTrainStep:
    """Forward, loss and backward of a training step, captured once as a CUDA graph and replayed (CUDA tensors only).

    ``fn(*inputs)`` computes the step from tensors (``None`` allowed, e.g. no class labels) and returns a dict of
    tensors whose ``loss_key`` entry is the loss (per sample or a scalar; its mean is backpropagated). A call copies
    the inputs into the captured buffers, replays the graph and points each of ``params``' ``.grad`` at the graph's
    gradient buffers: the gradients of this step alone, as after ``zero_grad(set_to_none=True)`` and ``backward()``
    (call the optimizer afterwards as usual; clipping them in place is fine, the next replay overwrites them). It
    returns the outputs, detached copies.

    Capture (the first call, and again when the inputs' shapes or dtypes or the autocast state change): three warm-up
    steps on a side stream, then the recording; the parameters' gradients are cleared first. Whatever runs in ``fn``
    must not need the host mid-way (``.item()``, data-dependent Python branches, host RNG); random draws on the CUDA
    default generator are fine (replays draw new numbers). The parameters themselves may change between calls in place
    (optimizer steps, ``load_state_dict``), not be replaced.
    """

    def __init__(self, params, fn, loss_key: str = "loss", warmup: int = 3):
        self.params = [p for p in params if p.requires_grad]
        self.fn, self.loss_key, self.warmup = fn, loss_key, warmup
        self.graph = self.key = self.inputs = self.outputs = self.grads = None

    def _step(self):
        with _capture_autocast():
            out = self.fn(*self.inputs)
        if not isinstance(out, dict) or self.loss_key not in out:
            raise TypeError(f"CUDAGraphTrainStep: fn must return a dict with a {self.loss_key!r} tensor, got "
                            f"{type(out).__name__}")
        out[self.loss_key].mean().backward()
        return {k: v.detach() for k, v in out.items()}

    def _capture(self, inputs, device):
        self.graph = self.outputs = self.grads = None  # free the previous capture's pool first
        self.inputs = [None if v is None else v.clone() for v in inputs]
        for p in self.params:  # the recorded backward must write, not accumulate into a buffer from outside
            p.grad = None

        def warm():
            self._step()
            for p in self.params:
                p.grad = None

        self.graph, self.outputs = _capture(self._step, device, self.warmup, "a training step (forward + backward)",
                                            "train without it (no --cuda-graph)", warm=warm)
        self.grads = [p.grad for p in self.params]
        logger.info("captured a training step (forward + backward) as a CUDA graph: inputs %s, autocast %s",
                    [None if v is None else tuple(v.shape) for v in inputs], torch.is_autocast_enabled("cuda"))

    def __call__(self, *inputs) -> dict:
        device = next((v.device for v in inputs if v is not None), None)
        if device is None or device.type != "cuda":
            raise ValueError(f"CUDAGraphTrainStep: the inputs must be CUDA tensors, got {device}")
        key = _key(inputs)
        if key != self.key:
            self._capture(inputs, device)
            self.key = key
        for static, v in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(v)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return {k: v.clone() for k, v in self.outputs.items()}
