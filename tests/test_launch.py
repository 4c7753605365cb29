"""The cached launch path (kernels/launch.py): its key separates every argument property Triton
specializes on, hits reuse the compiled kernel with the constexprs in signature order, and a
new specialization (a misaligned tensor, an integer that stops being divisible by 16) misses."""
import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from peftlab.kernels import launch as L  # noqa: E402

_INTS = [0, 1, 2, 15, 16, 17, 31, 32, 48, -1, -2, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31,
         2 ** 31 + 16, -2 ** 31, -2 ** 31 - 16, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 63 + 16]


def _battery():
    base = torch.empty(64, dtype=torch.float32)
    vals = list(_INTS) + [True, False, None, 0.5, 1.0, -3.0]
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int32):
        t = torch.empty(128, dtype=dt)
        vals += [t, t[1:], t[16 // t.element_size():], t[3:]]
    vals += [base.view(torch.int32), base[4:], base[2:]]
    return vals


def test_int_keys_are_memoised_as_arg_key_and_bounded():
    L._int_keys.clear()
    for a in _INTS + _INTS:
        if type(a) is int:
            assert L._int_key(a) == L.arg_key(a)
    assert len(L._int_keys) == len(set(_INTS))
    for a in range(5000):
        L._int_key(a)
    assert len(L._int_keys) <= 4096


def test_arg_key_separates_what_triton_specializes_on():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    vals = _battery()

    def spec(v):
        return native_specialize_impl(BaseBackend, v, False, True, True)

    separated = 0
    for i, a in enumerate(vals):
        for b in vals[i + 1:]:
            if spec(a) != spec(b):
                separated += 1
                assert L.arg_key(a) != L.arg_key(b), (a, b, spec(a), spec(b))
    assert separated > 500  # the battery does exercise the distinctions


class _FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("fast", grid, args))


class _Param:
    def __init__(self, constexpr):
        self.is_constexpr = constexpr


class _FakeKernel:
    arg_names = ["x_ptr", "n", "BLOCK", "MODE"]
    params = [_Param(False), _Param(False), _Param(True), _Param(True)]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return _FakeCompiled(self.log)
        return run


def test_hits_reuse_the_kernel_and_new_specializations_miss(monkeypatch):
    monkeypatch.setattr(L, "_fast_device", lambda first: 0)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    L.clear_cache()
    fn = _FakeKernel()
    x = torch.empty(64)
    L.launch(fn, (4,), x, 32, BLOCK=128, MODE=True, num_warps=4)
    L.launch(fn, (5,), x, 48, BLOCK=128, MODE=True, num_warps=4)      # 48: still divisible by 16
    assert [e[0] for e in fn.log] == ["jit", "fast"]
    assert fn.log[1] == ("fast", (5, 1, 1), (x, 48, 128, True))        # constexprs by position
    L.launch(fn, (5,), x[1:], 48, BLOCK=128, MODE=True, num_warps=4)   # misaligned pointer
    L.launch(fn, (5,), x, 49, BLOCK=128, MODE=True, num_warps=4)       # n % 16 != 0
    L.launch(fn, (5,), x, 1, BLOCK=128, MODE=True, num_warps=4)        # n == 1
    L.launch(fn, (5,), x, 48, BLOCK=256, MODE=True, num_warps=4)       # another constexpr
    L.launch(fn, (5,), x, 48, BLOCK=128, MODE=True, num_warps=8)       # another option
    L.launch(fn, (5,), x.to(torch.float64), 48, BLOCK=128, MODE=True, num_warps=4)  # dtype
    assert [e[0] for e in fn.log] == ["jit", "fast"] + ["jit"] * 6
    assert len(L._cache) == 7
    x4 = x[4:]                                                          # 16 bytes in: aligned
    L.launch(fn, (7, 2), x4, 64, BLOCK=128, MODE=True, num_warps=4)     # the first key: a hit
    assert fn.log[-1] == ("fast", (7, 2, 1), (x4, 64, 128, True))
    L.launch(fn, (7,), x, 64, BLOCK=128, MODE=1, num_warps=4)          # 1 is not True to Triton
    assert fn.log[-1][0] == "jit"
    L.clear_cache()
    for _ in range(2):                  # a constexpr passed by position: never cached
        L.launch(fn, (1,), x, 32, 128, MODE=True)
    assert [e[0] for e in fn.log[-2:]] == ["jit", "jit"] and not L._cache
    # a tensor on another device than the current one: the JIT path, whose pointer check
    # raises (the direct call would pass its address unchecked)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 1)
    for _ in range(2):
        L.launch(fn, (1,), x, 32, BLOCK=128, MODE=True)
    assert [e[0] for e in fn.log[-2:]] == ["jit", "jit"] and not L._cache


def test_switched_off_and_cpu_take_the_jit_path(monkeypatch):
    fn = _FakeKernel()
    x = torch.empty(64)
    L.clear_cache()
    for _ in range(2):                      # CPU tensor: never cached
        L.launch(fn, (1,), x, 32, BLOCK=128, MODE=False)
    assert [e[0] for e in fn.log] == ["jit", "jit"] and not L._cache
    cuda_like = torch.empty(0)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(L, "_current_device", lambda: 3)
    from peftlab.kernels import tuning

    monkeypatch.setattr(tuning, "_INTERPRET", False)   # both read from the environment at import
    monkeypatch.setattr(L, "_FAST", True)
    assert L._fast_device(cuda_like) == 3
    monkeypatch.setattr(L, "_FAST", False)                   # PEFTLAB_FAST_LAUNCH=0
    assert L._fast_device(cuda_like) is None
    monkeypatch.setattr(L, "_FAST", True)
    monkeypatch.setattr(tuning, "_INTERPRET", True)          # TRITON_INTERPRET=1
    assert L._fast_device(cuda_like) is None


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr, SQUARE: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m)
    if SQUARE:
        x = x * x
    tl.store(out_ptr + i, a * x + tl.load(y_ptr + i, mask=m), mask=m)


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else ["cpu"])
def test_real_kernel_results_through_both_paths(device):
    L.clear_cache()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g).to(device)
    y = torch.randn(1000, generator=g).to(device)
    for n, off, square in ((1000, 0, False), (992, 0, False), (992, 0, True), (997, 1, False),
                           (992, 4, True), (1000, 0, False)):
        xs, ys = x[off:off + n], y[off:off + n]
        out = torch.full((n,), float("nan"), device=device)
        L.launch(_axpy_kernel, (triton.cdiv(n, 256),), xs, ys, out, 0.5, n, BLOCK=256,
                 SQUARE=square, num_warps=4)
        want = 0.5 * (xs * xs if square else xs) + ys
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    if device == "cuda":   # the last two cases hit the entries of the first and third
        assert len(L._cache) == 4
        assert all(entry[-1] is not None for entry in L._cache.values())  # direct launcher calls
    L.clear_cache()


def test_the_direct_call_matches_this_tritons_runner_and_yields_to_hooks(monkeypatch):
    """A hit calls ``compiled.run`` as Triton's own runner does (checked against its source, so
    a Triton whose runner changed falls back to ``compiled[grid]``), and only while no launch
    hook is registered (a profiler's hook must still see every launch)."""
    from triton import knobs

    assert L.runner_is_plain()
    assert L._hooks_idle()
    hook = lambda metadata: None  # noqa: E731
    if hasattr(knobs.runtime.launch_enter_hook, "add"):      # Triton 3.6+: a HookChain
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            assert not L._hooks_idle()
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
        assert not L._hooks_idle()
    assert L._hooks_idle()


class _RunLog:
    """Stands for a CompiledKernel: records ``run`` calls."""
    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


def test_replay_swaps_the_tensor_pointers_and_yields_to_hooks_and_device_changes(monkeypatch):
    compiled = _RunLog()
    rep = L.Replay(compiled, (128, True), lambda dev: f"stream{dev}", 0, (7, 1, 1),
                   (111, 222, 48, 0.5), (0, 1))
    monkeypatch.setattr(L, "_current_device", lambda: 0)
    monkeypatch.setattr(L, "_hooks_idle", lambda: True)
    x, y = torch.empty(4), torch.empty(8)
    assert rep(x, y)
    assert compiled.calls[-1] == (7, 1, 1, "stream0", "fn", "meta", None, None, None,
                                  x.data_ptr(), y.data_ptr(), 48, 0.5, 128, True)
    with pytest.raises(TypeError, match="takes 2 tensors"):
        rep(x)
    monkeypatch.setattr(L, "_hooks_idle", lambda: False)      # a profiler hook: not replayed
    assert not rep(x, y)
    monkeypatch.setattr(L, "_hooks_idle", lambda: True)
    monkeypatch.setattr(L, "_current_device", lambda: 1)      # another current device
    assert not rep(x, y)
    assert len(compiled.calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches need CUDA")
def test_recorded_launch_replays_with_new_tensors():
    L.clear_cache()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1000, generator=g).cuda() for _ in range(2))
    out = torch.empty(1000, device="cuda")
    args = dict(BLOCK=256, SQUARE=True, num_warps=4)
    L.launch(_axpy_kernel, (4,), x, y, out, 0.5, 1000, **args)            # miss: compiles
    with L.record() as rec:
        L.launch(_axpy_kernel, (4,), x, y, out, 0.5, 1000, **args)        # hit: recorded
    assert len(rec) == 1
    x2, y2 = x.flip(0).contiguous(), y * 3
    out2 = torch.full((1000,), float("nan"), device="cuda")
    assert rec[0](x2, y2, out2)
    torch.testing.assert_close(out2, 0.5 * x2 * x2 + y2, rtol=0, atol=1e-6)
    with L.record() as rec2:                                              # a miss records nothing
        L.launch(_axpy_kernel, (4,), x, y, out, 0.5, 1000, BLOCK=256, SQUARE=False, num_warps=4)
    assert rec2 == []
    L.clear_cache()


def test_record_is_per_thread():
    import threading

    seen = {}
    with L.record() as mine:
        t = threading.Thread(target=lambda: seen.setdefault("other",
                                                            getattr(L._local, "recording", None)))
        t.start()
        t.join()
        assert L._local.recording is mine
    assert seen["other"] is None and getattr(L._local, "recording", None) is None
