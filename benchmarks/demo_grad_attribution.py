"""Which kernel family puts the error into the demo model's fp32 parameter gradients (GPU)?

The demo model's training step through the Triton kernels has a 5.6% relative error in its parameter gradients
against float64 (d loss / d x_t: 0.3%), while the reference kernels with tf32 matmuls stay at 0.12%
(tests/test_model.py::test_demo_training_step_triton_matches_ref_gpu). This runs the step with Triton in the attention
blocks only, in the Mamba blocks only, and in both, and prints each one's error and its worst parameters.
Usage (GPU): PYTHONPATH=. python benchmarks/demo_grad_attribution.py
"""

import torch

from matten.data import SyntheticShapesDataset
from matten.pipeline import load_demo
from matten.train import fixed_step_inputs, step_gradients


def main():
    dev = torch.device("cuda")
    x0, labels, t, noise = fixed_step_inputs(SyntheticShapesDataset(num_frames=8, size=32), 128, dev)
    ref, _ = load_demo(dev, kernel_backend="ref")
    _, g64 = step_gradients(ref.double(), x0, labels, t, noise)
    for name, attn, mamba in (("triton everywhere", "triton", "triton"), ("triton attention only", "triton", "ref"),
                              ("triton mamba only", "ref", "triton")):
        model, _ = load_demo(dev, kernel_backend="triton")
        model.float()
        for m in model.modules():
            if hasattr(m, "axis") and hasattr(m, "backend") and hasattr(m, "qkv"):
                m.backend = attn
            if m.__class__.__name__ == "BiMamba":
                m.backend = mamba
        _, grads = step_gradients(model, x0, labels, t, noise)
        flat = lambda gr: torch.cat([gr[n].flatten() for n in g64 if n != "x_t"])  # noqa: E731
        total = ((flat(grads) - flat(g64)).norm() / flat(g64).norm()).item()
        per = sorted(((((grads[n] - g64[n]).norm() / g64[n].norm()).item(), n) for n in g64 if n != "x_t"),
                     reverse=True)[:6]
        print(f"{name:22s} all params {total:.2e}; worst: " + ", ".join(f"{n} {e:.1e}" for e, n in per), flush=True)


if __name__ == "__main__":
    main()
