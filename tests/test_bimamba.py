"""BiMamba mixer: Vim state-dict compatibility, equality with an explicit Vim-style composition (flips), the fast path
(Triton conv + Triton bidirectional scan) against the slow path, shapes and bad input.

Tolerance rules:
  * fp64 slow path vs the fp64 Vim-style composition: the same maths in another order, so max abs error <= 1e-10.
  * fast path (Triton, fp32; the interpreter on CPU) vs the slow path in float64 on the same weights: max abs error
    of the output and of every parameter gradient <= 2e-4 * (1 + max |reference|) (fp32 accumulation over L <= 33
    steps and a few hundred-term matmuls; the observed error is ~1e-6 relative).
  * GPU, Matten shape (d_model=1152, L=4096, batch 2): fp32 fast vs fp32 slow: relative Frobenius error <= 1e-3 for
    the output and every gradient; bf16 fast vs the fp32 slow path: relative Frobenius error <= 2x that of the bf16
    slow path (plain PyTorch in bf16 with an fp32 scan) vs the same fp32 reference, plus 1e-3 of slack.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from matten_kernels._backend import triton_interpreting
from matten_kernels.modules import BiMamba
from matten_kernels.selective_scan import selective_scan_ref

logger = logging.getLogger(__name__)

HAS_TRITON_DEVICE = torch.cuda.is_available() or triton_interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def vim_v2_state_dict_shapes(d_model, d_state=16, d_conv=4, expand=2, dt_rank=None):
    """Key names and shapes of Vision Mamba's mixer ``Mamba(bimamba_type="v2")`` (mamba_simple.py in hustvl/Vim),
    with its defaults bias=False (in_proj/out_proj) and conv_bias=True."""
    E, N, k = expand * d_model, d_state, d_conv
    R = math.ceil(d_model / 16) if dt_rank is None else dt_rank
    return {
        "A_log": (E, N), "D": (E,),
        "A_b_log": (E, N), "D_b": (E,),
        "in_proj.weight": (2 * E, d_model),
        "conv1d.weight": (E, 1, k), "conv1d.bias": (E,),
        "x_proj.weight": (R + 2 * N, E),
        "dt_proj.weight": (E, R), "dt_proj.bias": (E,),
        "conv1d_b.weight": (E, 1, k), "conv1d_b.bias": (E,),
        "x_proj_b.weight": (R + 2 * N, E),
        "dt_proj_b.weight": (E, R), "dt_proj_b.bias": (E,),
        "out_proj.weight": (d_model, E),
    }


def vim_style_forward(m: BiMamba, hidden: torch.Tensor) -> torch.Tensor:
    """Vision Mamba's slow composition: the causal path on xz and on flip(xz), flip back, add; then out_proj."""
    L = hidden.shape[1]
    xz = m.in_proj(hidden).transpose(1, 2)  # (b, 2E, L)

    def direction(xz, conv, x_proj, dt_proj, A_log, D):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :L])  # nn.Conv1d with padding k-1, truncated: causal
        x_dbl = x_proj(x.transpose(1, 2))
        dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(x, dt, -torch.exp(A_log.double()), B.transpose(1, 2), C.transpose(1, 2),
                                  D.double(), z=z, delta_bias=dt_proj.bias.double(), delta_softplus=True)

    out = direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    if m.bimamba == "v2":
        out_b = direction(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b)
        out = out + out_b.flip(-1)
    elif m.bimamba == "v1":  # Vim's bimamba_inner_fn: the flipped causal conv output, shared projections, own A_b
        out = out + direction_v1_backward(m, xz, L)
    if m.divide_out and m.bimamba != "none":
        out = out / 2
    return m.out_proj(out.transpose(1, 2))


def direction_v1_backward(m, xz, L):
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :L])
    x_dbl = m.x_proj(x.transpose(1, 2))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.t()).transpose(1, 2)
    flip = lambda t: t.flip(-1)  # noqa: E731
    out_b = selective_scan_ref(flip(x), flip(dt), -torch.exp(m.A_b_log.double()), flip(B.transpose(1, 2)),
                               flip(C.transpose(1, 2)), m.D.double(), z=flip(z), delta_bias=m.dt_proj.bias.double(),
                               delta_softplus=True)
    return out_b.flip(-1)


def _randomise(m: BiMamba):
    """Move every parameter off its structured init so that a swapped or unused weight would show."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("A_log", "A_b_log")):
                p.add_(0.3 * torch.rand_like(p))
            elif name.startswith("dt_proj") and name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))


# ------------------------------------------------------------------------------------------------------------- CPU
def test_vim_state_dict_loads_strict():
    d_model = 24
    shapes = vim_v2_state_dict_shapes(d_model)
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    m = BiMamba(d_model, bimamba="v2")
    missing_unexpected = m.load_state_dict(sd, strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    own = m.state_dict()
    assert set(own) == set(shapes)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32


def test_parameter_shapes_and_init():
    m = BiMamba(40, d_state=8, d_conv=3, expand=2)
    E, R = 80, 3  # dt_rank auto = ceil(40 / 16)
    assert m.d_inner == E and m.dt_rank == R
    for k, s in vim_v2_state_dict_shapes(40, d_state=8, d_conv=3).items():
        assert tuple(m.state_dict()[k].shape) == s, k
    A = torch.arange(1, 9, dtype=torch.float32).repeat(E, 1)
    assert torch.allclose(m.A_log, torch.log(A)) and torch.allclose(m.A_b_log, torch.log(A))
    assert torch.all(m.D == 1) and torch.all(m.D_b == 1)
    for proj in (m.dt_proj, m.dt_proj_b):
        dt = F.softplus(proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        assert proj.weight.abs().max() <= R ** -0.5
    for name in ("A_log", "A_b_log", "D", "D_b"):
        assert getattr(m, name)._no_weight_decay is True
    v1 = BiMamba(40, bimamba="v1")
    assert {k for k in v1.state_dict()} == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                                            "dt_proj.weight", "dt_proj.bias", "A_log", "D", "A_b_log",
                                            "out_proj.weight"}
    none = BiMamba(40, bimamba="none")
    assert "A_b_log" not in none.state_dict()


@pytest.mark.parametrize("bimamba", ["v2", "v1", "none"])
@pytest.mark.parametrize("divide_out", [False, True], ids=["sum", "divide_out"])
def test_slow_path_equals_vim_style_composition(bimamba, divide_out):
    m = BiMamba(16, bimamba=bimamba, divide_out=divide_out, use_fast_path=False).double()
    _randomise(m)
    hidden = torch.randn(2, 11, 16, dtype=torch.float64)
    out = m(hidden)
    ref = vim_style_forward(m, hidden)
    err = (out - ref).abs()
    logger.info("slow vs Vim-style %s divide_out=%s: max %.3e mean %.3e", bimamba, divide_out, err.max(), err.mean())
    assert out.shape == hidden.shape
    assert err.max() <= 1e-10


def test_shapes_dtypes_and_backends():
    m = BiMamba(16, use_fast_path=False)
    for L in (1, 5):
        out = m(torch.randn(3, L, 16))
        assert out.shape == (3, L, 16) and out.dtype == torch.float32
    # backend=None on CPU resolves to "ref", which is the slow path
    m_auto = BiMamba(16, backend=None)
    m_auto.load_state_dict(m.state_dict())
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(m_auto(x), m(x), rtol=0, atol=0)


def test_bad_input():
    m = BiMamba(16, use_fast_path=False)
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 7, 15))
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(7, 16))
    with pytest.raises(TypeError, match="hidden_states"):
        m(torch.randint(0, 3, (2, 7, 16)))
    with pytest.raises(TypeError, match="hidden_states"):
        m([[0.0] * 16])
    with pytest.raises(ValueError, match="hidden_states"):
        m(torch.randn(2, 0, 16))
    with pytest.raises(ValueError, match="bimamba"):
        BiMamba(16, bimamba="v3")
    with pytest.raises(ValueError, match="backend"):
        BiMamba(16, backend="cuda")
    with pytest.raises(ValueError, match="d_model"):
        BiMamba(0)
