"""The cached launch path (matten_kernels._launch).

Its keys: every property Triton specialises a kernel on must change them, so a compiled kernel is never reused for
arguments Triton would have compiled differently. Its direct launch: taken only for the launcher layout it was checked
against, with no launch hook registered and no scratch memory, with exactly the arguments Triton's own layers would
pass; anything else must take ``compiled[grid]``. These run on the CPU with fake kernels; the GPU side (the same op
through aligned and misaligned inputs) is tests/test_selective_scan_gpu.py::test_cached_launch_respects_
specialisation."""

import re
import types

import numpy as np
import pytest
import torch

from matten_kernels import _launch
from matten_kernels._backend import triton_interpreting
from matten_kernels._launch import _spec, _value_key

INTS = [0, 1, -1, 2, 15, 16, 17, 32, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1, 2**40,
        2**63 - 1, 2**63, 2**63 + 16, 2**64 - 1]


def test_key_separates_what_triton_specialises_on():
    buf = torch.zeros(64)
    assert _spec(buf) != _spec(buf[1:])  # 16-byte aligned data pointer or not
    assert _spec(buf) != _spec(buf.half())  # dtype
    assert _spec(buf[4:]) == _spec(buf[8:])  # both aligned, same dtype
    assert len({_spec(1), _spec(16), _spec(17), _spec(32)}) == 3  # == 1, divisible by 16, neither
    assert _spec(16) == _spec(32) and _spec(17) == _spec(19)
    assert _spec(2**31 + 16) != _spec(16)  # int64 vs int32
    assert _spec(2**63 + 16) != _spec(2**40)  # uint64 vs int64
    assert _spec(True) != _spec(False) and _spec(True) != _spec(1)
    assert _spec(0.5) == _spec(2.0) and _spec(None) != _spec(0.5)


def test_class_key_agrees_with_triton():
    """Arguments with equal class keys get equal specialisations from the installed Triton's own function."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    buf = torch.zeros(64)
    values = [*INTS, True, False, 0.5, 2.0, None, buf, buf[1:], buf[4:], buf.half(), buf.half()[3:]]
    seen = {}
    for v in values:
        triton_spec = native_specialize_impl(BaseBackend, v, False, True, True)
        assert seen.setdefault(_spec(v), triton_spec) == triton_spec, v


def test_value_key_implies_class_key():
    buf = torch.zeros(64)
    param = torch.nn.Parameter(torch.zeros(64))  # a tensor subclass: through _spec
    values = [*INTS, True, False, 0.5, 2.0, np.float64(2.0), None, buf, buf[1:], buf[4:], buf.half(), param,
              param[1:]]
    keys = [_value_key((v,)) for v in values]
    for v, k in zip(values, keys):
        for w, j in zip(values, keys):
            if k == j:
                assert _spec(v) == _spec(w), (v, w)
    assert _value_key((1,)) != _value_key((True,)) and _value_key((0,)) != _value_key((False,))
    assert _value_key((1,)) != _value_key((1.0,))
    assert _value_key((buf,)) != _value_key((buf[1:],)) and _value_key((buf,)) == _value_key((buf[4:],))
    assert _value_key((buf,)) == _value_key((torch.zeros(8),))  # tensors by dtype and alignment, not identity
    assert _value_key((16,)) != _value_key((32,))  # ints by value (stricter than the class key)


def test_key_refuses_types_it_cannot_describe():
    with pytest.raises(TypeError, match="int64"):
        _spec(np.int64(16))
    with pytest.raises(TypeError, match="str"):
        _spec("x")
    with pytest.raises(TypeError, match="int64"):
        _value_key((torch.zeros(4), 3, np.int64(16)))


# --- launch() with fake kernels ----------------------------------------------------------------------------------


class CudaLauncher:
    """Stands in for Triton 3.6's launcher: the class name, module and __call__ signature _direct_launch checks."""

    __module__ = "triton.backends.nvidia.driver"

    def __init__(self, calls):
        self.launch = lambda *a: calls.append(("direct", a))
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.global_scratch_size = self.profile_scratch_size = 0

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        raise AssertionError("launch() never calls the launcher object")


class FakeCompiled:
    def __init__(self, calls):
        self.calls = calls
        self.run = CudaLauncher(calls)
        self.function, self.packed_metadata = 0xF00, (4, 1, 0)

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


class FakeKernel:
    """``kernel[grid](*args, **meta)``: Triton's path, which compiles (for a new specialisation) and launches."""

    def __init__(self, calls, compiled_factory=FakeCompiled):
        self.calls, self.compiled_factory = calls, compiled_factory
        self.params = [types.SimpleNamespace(name=n) for n in ("x", "y", "n", "scale", "BLOCK", "FLAG")]

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("triton", grid, args, meta))
            return self.compiled_factory(self.calls)
        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    """launch() as on a CUDA machine with a verified Triton: empty caches, device 0, stream 1000 + device, empty hook
    chains."""
    hook_chain = _launch._HookChain
    if hook_chain is None:  # a Triton without triton.knobs: a chain like Triton 3.6's
        class hook_chain:
            def __init__(self, reversed=False):
                self.calls = []
    runtime = types.SimpleNamespace(launch_enter_hook=hook_chain(), launch_exit_hook=hook_chain(reversed=True))
    for name, value in dict(_INTERPRETING=False, _TRITON_VERIFIED=True, _BY_CLASS={}, _BY_VALUE={},
                            _get_device=lambda: 0, _raw_stream=lambda device: 1000 + device, _HookChain=hook_chain,
                            _knobs=types.SimpleNamespace(runtime=runtime)).items():
        monkeypatch.setattr(_launch, name, value)
    return runtime


META = dict(BLOCK=64, FLAG=True, num_warps=4)


def call(kernel, x, n=17, grid=(3,), meta=META):
    _launch.launch(kernel, grid, (x, x, n, 0.5), meta)


def test_direct_launch_passes_what_triton_would(fake_gpu):
    calls = []
    kernel, x = FakeKernel(calls), torch.zeros(8)
    call(kernel, x)  # new specialisation: Triton's path
    assert [c[0] for c in calls] == ["triton"]
    call(kernel, x, grid=(3, 2))
    call(kernel, x, grid=(3, 2, 5))
    # the generated C launch's layout: grid, stream, function, cooperative, pdl, global and profile scratch, packed
    # metadata, launch metadata, enter and exit hooks, then every kernel argument (constexprs included)
    tail = (None, None, (4, 1, 0), None, None, None, x, x, 17, 0.5, 64, True)
    assert calls[1:] == [("direct", (3, 2, 1, 1000, 0xF00, False, True) + tail),
                         ("direct", (3, 2, 5, 1000, 0xF00, False, True) + tail)]


def test_keys_follow_specialisation_and_device(fake_gpu, monkeypatch):
    calls = []
    kernel, buf = FakeKernel(calls), torch.zeros(64)
    call(kernel, buf)
    call(kernel, buf[1:])  # misaligned: Triton compiles another kernel
    call(kernel, buf.half())  # another dtype
    call(kernel, buf, n=16)  # divisible by 16
    call(kernel, buf, n=2**31)  # int64
    call(kernel, buf, meta=dict(META, BLOCK=128))  # another constexpr
    monkeypatch.setattr(_launch, "_get_device", lambda: 1)
    call(kernel, buf)  # another device
    assert [c[0] for c in calls] == ["triton"] * 7
    calls.clear()
    call(kernel, buf, n=19)  # same class as 17 on device 1: no new compile, launched on device 1's stream
    monkeypatch.setattr(_launch, "_get_device", lambda: 0)
    call(kernel, buf[4:], n=33)  # same class as (aligned, 17) on device 0
    call(kernel, buf[1:])
    assert [(c[0], c[1][3]) for c in calls] == [("direct", 1001), ("direct", 1000), ("direct", 1000)]


def test_by_value_cache_is_bounded(fake_gpu, monkeypatch):
    monkeypatch.setattr(_launch, "_BY_VALUE_MAX", 3)
    calls = []
    kernel, x = FakeKernel(calls), torch.zeros(8)
    for n in range(17, 17 + 10 * 16, 16):  # ten values, one class
        call(kernel, x, n=n)
        call(kernel, x, n=n)
    assert len(_launch._BY_VALUE) <= 3 and len(_launch._BY_CLASS) == 1
    assert [c[0] for c in calls] == ["triton"] + ["direct"] * 19


@pytest.mark.parametrize("which", ["enter", "exit"])
def test_launch_hooks_take_tritons_path(fake_gpu, which):
    calls = []
    kernel, x = FakeKernel(calls), torch.zeros(8)
    call(kernel, x)
    hook = getattr(fake_gpu, f"launch_{which}_hook")
    hook.calls.append(print)  # a profiler registered a hook
    call(kernel, x)
    hook.calls.clear()
    call(kernel, x)
    setattr(fake_gpu, f"launch_{which}_hook", lambda metadata: None)  # a hook set in place of the chain
    call(kernel, x)
    setattr(fake_gpu, f"launch_{which}_hook", None)
    call(kernel, x)
    assert [c[0] for c in calls] == ["triton", "compiled", "direct", "compiled", "direct"]
    assert calls[1] == ("compiled", (3, 1, 1), (x, x, 17, 0.5, 64, True))


def _changed(**changes):
    """A FakeCompiled factory whose launcher (names starting with ``run_``) or compiled kernel has ``changes``; a
    value of None deletes the attribute."""
    def factory(calls):
        compiled = FakeCompiled(calls)
        for name, value in changes.items():
            obj, attr = (compiled.run, name[4:]) if name.startswith("run_") else (compiled, name)
            if value is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)
        return compiled
    return factory


class HIPLauncher(CudaLauncher):  # another backend's launcher
    __module__ = "triton.backends.nvidia.driver"


class NewerCudaLauncher(CudaLauncher):  # Triton 3.9's __call__ takes the metadata and hooks itself
    __module__ = "triton.backends.nvidia.driver"

    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata, launch_enter_hook,
                 launch_exit_hook, *args):
        raise AssertionError


NewerCudaLauncher.__name__ = "CudaLauncher"


@pytest.mark.parametrize("factory", [
    _changed(run_global_scratch_size=256),
    _changed(run_profile_scratch_size=64),
    _changed(run_launch_pdl=None),
    _changed(run_launch=None),
    _changed(packed_metadata=None),
    _changed(function=None),
    _changed(run=None),
    _changed(run=HIPLauncher([])),
    _changed(run=NewerCudaLauncher([])),
], ids=["global-scratch", "profile-scratch", "no-launch_pdl", "no-launch", "no-packed_metadata", "no-function",
        "no-run", "other-backend", "other-call-signature"])
def test_unexpected_internals_take_tritons_path(fake_gpu, factory):
    calls = []
    kernel, x = FakeKernel(calls, factory), torch.zeros(8)
    call(kernel, x)
    call(kernel, x)
    assert [c[0] for c in calls] == ["triton", "compiled"]


def test_unverified_triton_takes_tritons_path(fake_gpu, monkeypatch):
    monkeypatch.setattr(_launch, "_TRITON_VERIFIED", False)
    calls = []
    kernel, x = FakeKernel(calls), torch.zeros(8)
    call(kernel, x)
    call(kernel, x, grid=(3, 2))
    assert [c[:2] for c in calls] == [("triton", (3,)), ("compiled", (3, 2, 1))]


def test_uncacheable_kernels_and_the_interpreter_always_take_tritons_path(fake_gpu, monkeypatch):
    calls = []
    kernel, x = FakeKernel(calls), torch.zeros(8)
    for _ in range(2):
        call(kernel, x, meta=dict(BLOCK=64))  # FLAG left to its default
    monkeypatch.setattr(_launch, "_INTERPRETING", True)
    for _ in range(2):
        call(kernel, x)
    assert [c[0] for c in calls] == ["triton"] * 4


def test_launch_refuses_unsupported_arguments(fake_gpu):
    calls = []
    with pytest.raises(TypeError, match="str"):
        _launch.launch(FakeKernel(calls), (1,), (torch.zeros(8), "x"), META)
    assert calls == []


def test_verified_layout_matches_installed_triton():
    """On a Triton _launch calls directly, the launcher's __call__ and the generated C function's argument order are
    the ones _direct_launch was written against (read from the installed sources, no GPU needed)."""
    if not _launch._TRITON_VERIFIED:
        pytest.skip("the installed Triton does not get the direct launch")
    import inspect

    from triton.backends.nvidia import driver

    assert list(inspect.signature(driver.CudaLauncher.__call__).parameters) == _launch._LAUNCHER_CALL_PARAMS
    assert driver._BASE_ARGS_FORMAT == "iiiKKppOOOOOO"
    source = re.sub(r"\s+", "", driver.make_launcher({}, {0: "i32"}, None))
    assert ("&gridX,&gridY,&gridZ,&_stream,&_function,&launch_cooperative_grid,&launch_pdl,&global_scratch_obj,"
            "&profile_scratch_obj,&kernel_metadata,&launch_metadata,&launch_enter_hook,&launch_exit_hook") in source


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")
def test_eager_calls_take_the_autograd_function_path():
    # plain eager calls skip the torch.library dispatch layers (host time); torch.compile and dispatch modes use the
    # custom ops (covered by the opcheck / compile / FlopCounterMode tests)
    from matten_kernels import bi_selective_scan, selective_scan, video_attention
    from matten_kernels.conv1d import bi_depthwise_conv1d_silu

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = lambda *s: torch.randn(*s, device=dev, requires_grad=True)  # noqa: E731
    u, delta, B, C = r(1, 4, 16), r(1, 4, 16), r(1, 2, 16), r(1, 2, 16)  # L = 16: the bi scan pads no other length
    A = (-torch.rand(4, 2, device=dev)).requires_grad_()
    q = r(1, 4, 1, 16)
    outs = {
        "_ScanFunction": selective_scan(u, delta, A, B, C, backend="triton"),
        "_BiScanFunction": bi_selective_scan(u, delta, A, B, C, backend="triton"),
        "_ConvFunction": bi_depthwise_conv1d_silu(u, r(4, 4), r(4), r(4, 4), r(4), backend="triton")[0],
        "_VideoAttentionFunction": video_attention(q, q, q, num_frames=2, axis="temporal", backend="triton"),
    }
    for name, out in outs.items():
        assert type(out.grad_fn).__name__ == name + "Backward", (name, out.grad_fn)
