"""pytest-benchmark regression timings of the kernels at Matten-XL/2 sizes (GPU only; skipped without CUDA).

Run: ``python -m pytest tests/test_bench_kernels.py --benchmark-only`` on a GPU machine; compare runs with
``--benchmark-autosave`` / ``--benchmark-compare``. Each timed call ends with ``torch.cuda.synchronize()`` so the
wall clock covers the kernels. Shapes: bf16, batch 2, D = 1152 (16 heads x 72, d_inner 2304, N = 16), the sequences
of spatial (256 tokens, 32 of them), temporal (16 tokens, 512 of them) and global (4096 tokens) modelling; the adaLN
ops and the BiMamba mixer of a global block. Every test
also checks that the output is finite and shaped right, so a broken kernel fails rather than times.

One CPU test checks the benchmark baselines (benchmarks/baselines.py) compute the model's function, so the model
benchmark's "ours vs baselines" compares equal work. Tolerance: fp32 on both sides, relative error < 1e-5.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

SCAN_SHAPES = {"spatial": (32, 2304, 16, 256), "temporal": (512, 2304, 16, 16), "global": (2, 2304, 16, 4096)}


def _timed(benchmark, fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    run()  # compile / autotune outside the timing
    return benchmark.pedantic(run, rounds=20, warmup_rounds=3, iterations=1)


def _scan_inputs(batch, dim, N, L, requires_grad=False):
    dev, dt = "cuda", torch.bfloat16
    t = {k: torch.randn(batch, dim, L, device=dev, dtype=dt) for k in ("u", "delta", "z", "u_b", "delta_b")}
    t.update({k: torch.randn(batch, N, L, device=dev, dtype=dt) for k in ("B", "C", "B_b", "C_b")})
    for v in t.values():
        v.requires_grad_(requires_grad)
    A = -torch.arange(1, N + 1, dtype=torch.float32, device=dev).repeat(dim, 1)
    return t, A


def _bi_scan(t, A, dim):
    from matten_kernels import bi_selective_scan

    ones, bias = torch.ones(dim, device="cuda"), torch.full((dim,), -3.0, device="cuda")
    return bi_selective_scan(t["u"], t["delta"], A, t["B"], t["C"], ones, z=t["z"], delta_bias=bias,
                             delta_softplus=True, u_b=t["u_b"], delta_b=t["delta_b"], A_b=A, B_b=t["B_b"],
                             C_b=t["C_b"], D_b=ones, delta_bias_b=bias, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("axis", list(SCAN_SHAPES))
def test_bench_bi_scan_fwd(benchmark, axis):
    batch, dim, N, L = SCAN_SHAPES[axis]
    t, A = _scan_inputs(batch, dim, N, L)
    out = _timed(benchmark, lambda: _bi_scan(t, A, dim))
    assert out.shape == (batch, dim, L) and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("axis", list(SCAN_SHAPES))
def test_bench_bi_scan_fwdbwd(benchmark, axis):
    batch, dim, N, L = SCAN_SHAPES[axis]
    t, A = _scan_inputs(batch, dim, N, L, requires_grad=True)
    dout = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)
    inputs = list(t.values())
    grads = _timed(benchmark, lambda: torch.autograd.grad(_bi_scan(t, A, dim), inputs, dout))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", ["spatial", "temporal", "global"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_bench_video_attention(benchmark, axis, mode):
    from matten_kernels import video_attention

    qkv = torch.randn(2, 16 * 256, 3, 16, 72, device="cuda", dtype=torch.bfloat16, requires_grad=mode == "fwdbwd")
    dout = torch.randn(2, 16 * 256, 16, 72, device="cuda", dtype=torch.bfloat16)

    def fwd():
        q, k, v = qkv.unbind(2)
        return video_attention(q, k, v, num_frames=16, axis=axis, backend="triton")

    if mode == "fwd":
        with torch.no_grad():
            out = _timed(benchmark, fwd)
        assert out.shape == (2, 4096, 16, 72) and torch.isfinite(out).all()
    else:
        (g,) = _timed(benchmark, lambda: torch.autograd.grad(fwd(), qkv, dout))
        assert torch.isfinite(g).all()


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm_modulate", "gated_residual"])
def test_bench_adaln_fwdbwd(benchmark, op):
    """One block's adaLN op at Matten-XL/2 v3 size: fp32 residual (2, 4096, 1152), bf16 parameters and branch."""
    from matten_kernels.adaln import gated_residual, layer_norm_modulate

    x = torch.randn(2, 4096, 1152, device="cuda", requires_grad=True)
    p1, p2 = (torch.randn(2, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    y = torch.randn(2, 4096, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if op == "layer_norm_modulate":
        fn, inputs = (lambda: layer_norm_modulate(x, p1, p2, out_dtype=torch.bfloat16)), (x, p1, p2)
    else:
        fn, inputs = (lambda: gated_residual(x, p1, y)), (x, p1, y)
    dout = torch.randn(2, 4096, 1152, device="cuda", dtype=fn().dtype)
    grads = _timed(benchmark, lambda: torch.autograd.grad(fn(), inputs, dout))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
def test_bench_bimamba_mixer_fwdbwd(benchmark):
    """The BiMamba v2 mixer of a Matten-XL/2 global block: (2, 4096, 1152) bf16, forward and every gradient."""
    from matten_kernels.modules import BiMamba

    m = BiMamba(1152, d_state=16, bimamba="v2").cuda().to(torch.bfloat16)
    h = torch.randn(2, 4096, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(h)
    inputs = [h, *m.parameters()]
    grads = _timed(benchmark, lambda: torch.autograd.grad(m(h), inputs, dout))
    assert all(torch.isfinite(g).all() for g in grads)


def test_baselines_compute_the_same_function():
    """A tiny Matten (reference backends, fp32) with the baseline ops swapped in gives the same output."""
    from baselines import swap_in_baselines

    from matten import create_model

    model = create_model("Matten-T/2", kernel_backend="ref", depth=2, hidden_size=32, num_heads=2, num_frames=4,
                         sample_size=8, d_state=4)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero leaves gates at 0: the output would be 0 either way
            if not p.any():
                p.normal_(0.0, 0.1)
        x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([5, 700])
        ours = model(x, t).sample
        with swap_in_baselines(model):
            import matten.model as model_module

            # the swap reaches the name the attention blocks call
            assert model_module.video_attention_qkvpacked.__name__ == "sdpa_video_attention_qkvpacked"
            assert model_module.layer_norm_modulate.__name__ == "torch_layer_norm_modulate"
            assert model_module.gated_residual.__name__ == "torch_gated_residual"
            base = model(x, t).sample
        again = model(x, t).sample  # restored on exit
    err = ((base - ours).norm() / ours.norm()).item()
    print(f"baseline vs ours: rel err {err:.2e}, max abs {(base - ours).abs().max().item():.2e}")
    assert ours.abs().max() > 0
    assert err < 1e-5
    assert torch.equal(again, ours)


def test_sass_schedule_model_flags_exposed_shuffles():
    """benchmarks/cuda_sass_count.py's schedule model (CPU): a loop whose shuffle results are used at once scores a
    short shuffle-to-use distance and more modelled cycles than the same instructions with independent work between."""
    from cuda_sass_count import schedule

    def sass(lines):
        body = [f"        /*{16 * (i + 1):04x}*/                   {t} ;" for i, t in enumerate(lines)]
        body.append(f"        /*{16 * (len(lines) + 1):04x}*/                   BRA 0x10 ;")
        return "\n".join(body)

    chain = ["SHFL.UP PT, R1, R0, 0x1, RZ", "FFMA R0, R1, R2, R0"] * 4 + ["FMUL R10, R11, R12"] * 8
    spread = ["SHFL.UP PT, R1, R0, 0x1, RZ", "FMUL R10, R11, R12", "FMUL R13, R11, R12",
              "FFMA R0, R1, R2, R0"] * 4
    a, b = schedule(sass(chain)), schedule(sass(spread))
    assert a["loop_instr"] == b["loop_instr"] == 17
    assert a["shfl_use"] == 1 and b["shfl_use"] == 3
    assert a["loop_cycles"] > b["loop_cycles"]


def test_sass_histogram_counts_the_main_loop_only():
    """cuda_sass_count.py's opcode histogram (CPU): the longest backward branch's body, predicates dropped, most
    frequent first; instructions before the loop are not counted."""
    from cuda_sass_count import histogram

    lines = ["MOV R0, RZ", "LDG.E.128 R4, desc[UR4][R2.64]",  # before the loop (0x10, 0x20)
             "FFMA R0, R1, R2, R0", "@P0 FFMA R3, R1, R2, R3", "@!P1 FMUL R5, R5, R6", "SHFL.UP PT, R1, R0, 0x1, RZ",
             "FFMA R7, R1, R2, R7", "BRA 0x30", "EXIT"]
    sass = "\n".join(f"        /*{16 * (i + 1):04x}*/                   {t} ;" for i, t in enumerate(lines))
    assert histogram(sass) == [("FFMA", 3), ("BRA", 1), ("FMUL", 1), ("SHFL.UP", 1)]


def test_sass_load_use_distances():
    """benchmarks/sass_count.py (CPU): for each global load of a loop, the instructions to the first one reading a
    register it wrote (all four of a 128-bit load; not a register whose name only begins the same; a store's data
    counts, a write of the register does not)."""
    from sass_count import load_use_distances

    body = [("LDG.E.128", "R4, desc[UR4][R2.64]"), ("FMUL", "R1, R40, R12"), ("MOV", "R5, R9"),
            ("FFMA", "R0, R7, R2, R0"), ("LDG.E", "R8, desc[UR4][R2.64]"), ("STG.E", "desc[UR4][R2.64], R8"),
            ("LDG.E", "R20, desc[UR4][R2.64]")]
    assert load_use_distances(body) == [3, 1]


def test_sass_count_names_every_lanes_kernel():
    """cuda_sass_count.py's short names (CPU) tell apart the template arguments of the lanes kernels: the forward's
    <T, NMAX, EXACT, PASS, Z, STAGE> and the backward's <T, NMAX, EXACT, PASS> (<..., STAGE> in session 19's staged
    backward, removed in session 20)."""
    from cuda_sass_count import _short

    fwd = "_ZN11matten_scan21scan_fwd_lanes_kernelI13__nv_bfloat16Li{}ELb{}ELi{}ELb{}ELb{}EEEvNS_10ScanParamsE"
    bwd = "_ZN11matten_scan21scan_bwd_lanes_kernelI13__nv_bfloat16Li{}ELb{}ELi{}ELb{}EEEvNS_10ScanParamsE"
    assert _short(fwd.format(16, 1, 0, 0, 0)) == "fwd uni exact"
    assert _short(fwd.format(16, 1, 0, 1, 1)) == "fwd uni exact z staged"
    assert _short(fwd.format(8, 0, 2, 0, 0)) == "fwd bi-fwd masked n8"
    bwd4 = "_ZN11matten_scan21scan_bwd_lanes_kernelI13__nv_bfloat16Li{}ELb{}ELi{}EEEvNS_10ScanParamsE"
    assert _short(bwd4.format(16, 1, 1)) == "bwd bi-rev exact"
    assert _short(bwd4.format(8, 0, 2)) == "bwd bi-fwd masked n8"
    assert _short(bwd.format(16, 1, 1, 0)) == "bwd bi-rev exact"
    assert _short(bwd.format(8, 1, 0, 1)) == "bwd uni exact staged n8"
    assert _short("some_other_kernel") == "some_other_kernel"


def test_sass_normalized_ignores_addresses_and_encodings():
    """cuda_sass_count.py's --same-as compares kernels by their SASS without addresses and encodings (CPU): two dumps
    that differ only there compare equal, a changed register does not."""
    from cuda_sass_count import normalized

    a = ("        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x00000a0000017a02 */\n"
         "                                                                   /* 0x000fe40000000f00 */\n"
         "        /*0010*/                   FFMA R0, R1, R2, R0 ;           /* 0x0000000201007223 */\n")
    b = a.replace("/*0010*/", "/*0410*/").replace("0x000fe40000000f00", "0x000fc80000000f00")
    assert normalized(a) == normalized(b) == "MOV R1, c[0x0][0x28] \nFFMA R0, R1, R2, R0 "
    assert normalized(a) != normalized(a.replace("FFMA R0, R1, R2", "FFMA R0, R3, R2"))


def test_row_log_keeps_rows_of_a_cut_run(tmp_path):
    """The benchmarks' row log: each logged row lands in NAME-GPU-COMMIT.rows.jsonl as it is measured (what a run
    cut by a timeout keeps), and the final JSON replaces it."""
    import json

    import _scan_common as sc

    info = dict(gpu="Some GPU", commit="abc1234")
    sc.start_row_log("bench_x", info, str(tmp_path))
    log = tmp_path / "bench_x-Some-GPU-abc1234.rows.jsonl"
    rows = [dict(shape="global XL", fwd_ms=0.25), dict(shape="long", error="RuntimeError: x")]
    for r in rows:
        sc.log_row(r)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines == [dict(info=info)] + rows
    path = sc.write_results("bench_x", rows, info, str(tmp_path))
    assert json.loads(open(path).read()) == dict(info=info, rows=rows)
    assert not log.exists()
    sc.log_row(dict(shape="after"))  # no log open any more: printed only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_x-Some-GPU-abc1234.json"]
