"""The v2 mixer's SSM parameters as the scan takes them, and their gradients back, one launch each way.

The scan wants A = -exp(A_log), D and the dt bias in fp32, for both directions; the mixer holds A_log, A_b_log, D,
D_b, dt_proj.bias, dt_proj_b.bias in the module's dtype. As torch ops that is up to ten small kernels a forward
(casts, exp, neg) and eight a backward (dA_log = dA * A, casts back), each a round of host work: the mixer's eager
fwd+bwd is bound by host time on the GPU machine (``benchmarks/NOTES_scan.md``). Here each way is one Triton launch
into one buffer, whose slices are the six tensors.

    prepare(A_log, A_b_log, D, D_b, bias, bias_b) -> (A, A_b, D, D_b, bias, bias_b)   fp32
    grads(dA, dA_b, A, A_b, dD, dD_b, dbias, dbias_b, dtypes) -> the parameters' gradients, in ``dtypes``

``prepare_ref`` / ``grads_ref`` are the same maths as torch ops (the tests compare the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, launch, next_power_of_2

BLOCK_E = 64


@triton.jit
def _block(E, N, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows of E: their indices and mask, and those of their (E, N) elements."""
    o_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    o_n = tl.arange(0, BLOCK_N)
    m_e = o_e < E
    return o_e, m_e, o_e[:, None] * N + o_n[None, :], m_e[:, None] & (o_n < N)[None, :]


@triton.jit
def _prepare_kernel(p_alog, p_alog_b, p_d, p_d_b, p_bias, p_bias_b, p_out, E, N,
                    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """p_out (fp32): A (E, N) | A_b (E, N) | D | D_b | bias | bias_b (E each); inputs contiguous, any float dtype."""
    o_e, m_e, idx, m = _block(E, N, BLOCK_E, BLOCK_N)
    tl.store(p_out + idx, -tl.exp(tl.load(p_alog + idx, mask=m).to(tl.float32)), mask=m)
    tl.store(p_out + E * N + idx, -tl.exp(tl.load(p_alog_b + idx, mask=m).to(tl.float32)), mask=m)
    p_vec = p_out + 2 * E * N + o_e
    tl.store(p_vec, tl.load(p_d + o_e, mask=m_e).to(tl.float32), mask=m_e)
    tl.store(p_vec + E, tl.load(p_d_b + o_e, mask=m_e).to(tl.float32), mask=m_e)
    tl.store(p_vec + 2 * E, tl.load(p_bias + o_e, mask=m_e).to(tl.float32), mask=m_e)
    tl.store(p_vec + 3 * E, tl.load(p_bias_b + o_e, mask=m_e).to(tl.float32), mask=m_e)


@triton.jit
def _grads_kernel(p_da, p_da_b, p_a, p_a_b, p_dd, p_dd_b, p_dbias, p_dbias_b, p_out, E, N,
                  BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """p_out (the parameters' dtype): dA_log = dA * A (E, N) | dA_b_log (E, N) | dD | dD_b | dbias | dbias_b."""
    o_e, m_e, idx, m = _block(E, N, BLOCK_E, BLOCK_N)
    ty = p_out.dtype.element_ty
    tl.store(p_out + idx, (tl.load(p_da + idx, mask=m) * tl.load(p_a + idx, mask=m)).to(ty), mask=m)
    tl.store(p_out + E * N + idx, (tl.load(p_da_b + idx, mask=m) * tl.load(p_a_b + idx, mask=m)).to(ty), mask=m)
    p_vec = p_out + 2 * E * N + o_e
    tl.store(p_vec, tl.load(p_dd + o_e, mask=m_e).to(ty), mask=m_e)
    tl.store(p_vec + E, tl.load(p_dd_b + o_e, mask=m_e).to(ty), mask=m_e)
    tl.store(p_vec + 2 * E, tl.load(p_dbias + o_e, mask=m_e).to(ty), mask=m_e)
    tl.store(p_vec + 3 * E, tl.load(p_dbias_b + o_e, mask=m_e).to(ty), mask=m_e)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _split(buf: torch.Tensor, E: int, N: int) -> tuple:
    """The six tensors of a (2 E N + 4 E) buffer."""
    a, a_b, vecs = buf.split([E * N, E * N, 4 * E])
    return (a.view(E, N), a_b.view(E, N), *vecs.view(4, E).unbind(0))


def prepare(A_log, A_b_log, D, D_b, bias, bias_b) -> tuple:
    """(A, A_b, D, D_b, bias, bias_b) in fp32, A = -exp(A_log): one launch, slices of one buffer."""
    E, N = A_log.shape
    out = torch.empty(2 * E * N + 4 * E, device=A_log.device, dtype=torch.float32)
    launch(_prepare_kernel, (cdiv(E, BLOCK_E),),
           (*(_dense(t) for t in (A_log, A_b_log, D, D_b, bias, bias_b)), out, E, N),
           dict(BLOCK_E=BLOCK_E, BLOCK_N=next_power_of_2(N), num_warps=4))
    return _split(out, E, N)


def grads(dA, dA_b, A, A_b, dD, dD_b, dbias, dbias_b, dtypes) -> tuple:
    """(dA_log, dA_b_log, dD, dD_b, dbias, dbias_b), each in its parameter's dtype (``dtypes``, in that order):
    one launch when they share one dtype, else the fp32 results cast one by one."""
    E, N = A.shape
    shared = dtypes[0] if all(d == dtypes[0] for d in dtypes) else torch.float32
    out = torch.empty(2 * E * N + 4 * E, device=A.device, dtype=shared)
    launch(_grads_kernel, (cdiv(E, BLOCK_E),),
           (*(_dense(t) for t in (dA, dA_b, A, A_b, dD, dD_b, dbias, dbias_b)), out, E, N),
           dict(BLOCK_E=BLOCK_E, BLOCK_N=next_power_of_2(N), num_warps=4))
    return tuple(t.to(d) for t, d in zip(_split(out, E, N), dtypes))


def prepare_ref(A_log, A_b_log, D, D_b, bias, bias_b) -> tuple:
    return (-torch.exp(A_log.float()), -torch.exp(A_b_log.float()), *(t.float() for t in (D, D_b, bias, bias_b)))


def grads_ref(dA, dA_b, A, A_b, dD, dD_b, dbias, dbias_b, dtypes) -> tuple:
    return tuple(t.to(d) for t, d in zip((dA * A, dA_b * A_b, dD, dD_b, dbias, dbias_b), dtypes))
