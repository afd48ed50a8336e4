import cProfile, pstats, sys, io, torch
sys.path.insert(0, "benchmarks")
import bi_short_sweep as b
f, bb, z = b.v2_inputs(1024)
dout = torch.randn(2, 2304, 1024, device="cuda", dtype=torch.bfloat16)
leaves = [f[k] for k in f] + [bb[k] for k in bb] + [z]
def step():
    for t in leaves: t.grad = None
    b.call(f, bb, z).backward(dout)
for _ in range(5): step()
torch.cuda.synchronize()
pr = cProfile.Profile(); pr.enable()
for _ in range(50): step()
torch.cuda.synchronize()
pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue()[:7000])
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(30); print(s.getvalue()[:6000])
