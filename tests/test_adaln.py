"""adaLN ops (LayerNorm + modulate, gated residual): Triton (the interpreter on CPU) and ref vs a float64 reference,
forward and every gradient, awkward sizes, strided parameter views, the custom-op registration (opcheck), bad input.

Tolerance rule (fp32 arithmetic, sums over D channels for the row statistics and over the tokens for the parameter
gradients): max |out - ref64| <= 8 * eps_fp32 * n * (1 + max |ref64|), n the number of terms of the longest sum that
feeds the output (D for y and dx, tokens for the parameter gradients). GPU (16-bit y and parameters, fp32 residual):
the error vs float64 is at most 2x that of the PyTorch composition at the same precision, plus 1e-6 * (1 + max |ref|).
"""

from __future__ import annotations

import logging

import pytest
import torch

from matten_kernels.adaln import gated_residual, gated_residual_ref, layer_norm_modulate, layer_norm_modulate_ref

logger = logging.getLogger(__name__)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
SIZES = [(1, 1, 8), (2, 17, 48), (3, 130, 100), (2, 257, 1152)]  # (batch, tokens, D)


def _check(name, got, ref, n_terms, tol=None):
    err = (got.double() - ref).abs()
    tol = 8 * EPS32 * n_terms * (1 + ref.abs().max().item()) if tol is None else tol
    logger.info("%s: max err %.3e mean err %.3e (tol %.3e)", name, err.max().item(), err.mean().item(), tol)
    assert err.max().item() <= tol, f"{name}: max error {err.max().item():.3e} > {tol:.3e}"


def _params(batch, D, dtype=torch.float32, device=DEVICE):
    """shift/scale/gate as the model makes them: chunks (strided views) of one (batch, k*D) adaLN output."""
    return torch.randn(batch, 3 * D, dtype=dtype, device=device).chunk(3, dim=1)


def _grads(fn, inputs, cot):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    (out.double() * cot).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("batch,T,D", SIZES, ids=lambda v: str(v))
def test_layer_norm_modulate_vs_float64(batch, T, D):
    x = torch.randn(batch, T, D, device=DEVICE) * 3 + 1
    shift, scale, _ = _params(batch, D)
    cot = torch.randn(batch, T, D, dtype=torch.float64, device=DEVICE)
    out, grads = _grads(lambda *a: layer_norm_modulate(*a, backend="triton"), (x, shift, scale), cot)
    ref, ref_grads = _grads(lambda *a: layer_norm_modulate_ref(*a), [t.double() for t in (x, shift, scale)], cot)
    _check("y", out, ref, D)
    for name, g, r, n in zip(("dx", "dshift", "dscale"), grads, ref_grads, (D, T, T)):
        _check(name, g, r, n)


@pytest.mark.parametrize("batch,T,D", SIZES, ids=lambda v: str(v))
def test_gated_residual_vs_float64(batch, T, D):
    x, y = torch.randn(batch, T, D, device=DEVICE), torch.randn(batch, T, D, device=DEVICE)
    _, _, gate = _params(batch, D)
    cot = torch.randn(batch, T, D, dtype=torch.float64, device=DEVICE)
    out, grads = _grads(lambda *a: gated_residual(*a, backend="triton"), (x, gate, y), cot)
    ref, ref_grads = _grads(lambda *a: gated_residual_ref(*a), [t.double() for t in (x, gate, y)], cot)
    _check("out", out, ref, 2)
    for name, g, r, n in zip(("dx", "dgate", "dy"), grads, ref_grads, (1, T, 1)):
        _check(name, g, r, n)


def test_ref_backend_is_the_composition():
    x = torch.randn(2, 5, 8)
    shift, scale, gate = _params(2, 8, device="cpu")
    y = torch.randn(2, 5, 8)
    ln = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    assert torch.equal(layer_norm_modulate(x, shift, scale, backend="ref"),
                       ln * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
    assert torch.equal(gated_residual(x, gate, y, backend="ref"), x + gate.unsqueeze(1) * y)


def test_opcheck():
    from matten_kernels.adaln import interface

    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    shift, scale, gate = (t.detach().requires_grad_(True) for t in _params(2, 8))
    y = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(interface._ln_mod_fwd, (x, shift, scale, 1e-6, torch.float32))
    torch.library.opcheck(interface._gres_fwd, (x, gate, y))
    _, mean, rstd = interface._ln_mod_fwd(x.detach(), shift.detach(), scale.detach(), 1e-6, torch.float32)
    dy = torch.randn(2, 5, 8, device=DEVICE)
    torch.library.opcheck(interface._ln_mod_bwd, (dy, x.detach(), scale.detach(), mean, rstd))
    torch.library.opcheck(interface._gres_bwd, (dy, gate.detach(), y.detach()))


def test_bad_input():
    x = torch.randn(2, 5, 8)
    shift, scale, gate = _params(2, 8, device="cpu")
    with pytest.raises(ValueError, match="x must have 3"):
        layer_norm_modulate(x[0], shift, scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        layer_norm_modulate(x, shift, scale[:, :4])
    with pytest.raises(TypeError, match="shift must have dtype"):
        layer_norm_modulate(x, shift.long(), scale)
    with pytest.raises(TypeError, match="out_dtype"):
        layer_norm_modulate(x, shift, scale, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="eps"):
        layer_norm_modulate(x, shift, scale, eps=0.0)
    with pytest.raises(ValueError, match="y must have shape"):
        gated_residual(x, gate, x[:, :4])
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_residual(x, gate[:1], x)
    with pytest.raises(ValueError, match="unknown backend"):
        gated_residual(x, gate, x, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,T,D", [(2, 4096, 1152), (3, 257, 100)], ids=lambda v: str(v))
def test_16bit_matches_composition_gpu(dtype, batch, T, D):
    """As the model runs under autocast: fp32 residual x, 16-bit adaLN parameters and branch output, y in 16 bits."""
    x = torch.randn(batch, T, D, device="cuda") * 3 + 1
    shift, scale, gate = _params(batch, D, dtype=dtype)
    yb = torch.randn(batch, T, D, device="cuda", dtype=dtype)
    cot = torch.randn(batch, T, D, dtype=torch.float64, device="cuda")
    cases = [("layer_norm_modulate", lambda *a: layer_norm_modulate(*a, out_dtype=dtype),
              lambda *a: layer_norm_modulate_ref(*a, out_dtype=dtype), layer_norm_modulate_ref, (x, shift, scale)),
             ("gated_residual", gated_residual, gated_residual_ref, gated_residual_ref, (x, gate, yb))]
    for name, fast, ref_lp, ref64, inputs in cases:
        out, grads = _grads(fast, inputs, cot)
        out_lp, grads_lp = _grads(ref_lp, inputs, cot)
        out64, grads64 = _grads(ref64, [t.double() for t in inputs], cot)
        for what, g, lp, r in zip(("out", "d0", "d1", "d2"), [out, *grads], [out_lp, *grads_lp], [out64, *grads64]):
            tol = 2 * (lp.double() - r).abs().max().item() + 1e-6 * (1 + r.abs().max().item())
            _check(f"{name} {what}", g, r, 1, tol=tol)
