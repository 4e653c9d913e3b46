"""First contact with a device (issue 18, section 6), and how the extension is loaded and keyed
(section 2, rows 2-3).

Before "auto" first uses a compiled backend for an op on a (device, dtype), the registry checks that
op once against the reference. Faulty kernels are injected on the CPU: Python kernels registered
for the C++ backend's operators (``torch.ops.gacd_fast.*``, CPU dispatch key) and Triton kernels
run by the interpreter, each returning a wrong value, a wrong gradient, or raising. The fault is
caught, warned about once, and the torch backend runs the op; ``GACD_FAST_SELF_CHECK=0`` skips the
check; an explicit ``backend=`` is used unchecked; ``torch.compile(fullgraph=True)`` has no graph
break with the check in place.
"""
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch

import gacd_fast
from gacd_fast import backends
from gacd_fast.ops import cext_backend, cext_build
from gacd_fast.ops import l2_normalize as normalize_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Every test starts as a new process would: no verdicts, the check on."""
    monkeypatch.setattr(backends, "_verdicts", {}, raising=False)
    monkeypatch.setattr(backends, "_seen", {}, raising=False)
    monkeypatch.setattr(backends, "_self_check", True, raising=False)


def _reference_backward(grad, x):
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        return torch.autograd.grad(normalize_op.reference(x), x, grad)[0]


def _faulty(fault, dtypes=None):
    """(forward, backward) kernels of l2_normalize with ``fault`` ("value", "gradient", "raises",
    None: correct) for inputs of ``dtypes`` (None: all)."""
    def hit(x):
        return fault is not None and (dtypes is None or x.dtype in dtypes)

    def forward(x):
        if hit(x) and fault == "raises":
            raise RuntimeError("injected kernel failure")
        y = normalize_op.reference(x)
        return y * 1.5 if hit(x) and fault == "value" else y

    def backward(grad, x):
        dx = _reference_backward(grad, x)
        return dx * 2 if hit(x) and fault == "gradient" else dx
    return forward, backward


@contextmanager
def cext_kernels(monkeypatch, fault, dtypes=None):
    """The C++ backend's l2_normalize served by Python kernels with ``fault``, with or without the real
    library (a kernel registered here overrides the library's until the block ends)."""
    if not cext_backend.is_loaded():
        monkeypatch.setattr(cext_build, "_loaded", "preloaded")
    forward, backward = _faulty(fault, dtypes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        with torch.library._scoped_library("gacd_fast", "IMPL") as lib:
            lib.impl("l2_normalize", forward, "CPU")
            lib.impl("l2_normalize_backward", backward, "CPU")
            yield


def ours(messages):
    return [str(w.message) for w in messages if "gacd_fast: backend" in str(w.message)]


def test_the_check_uses_the_conformance_tolerances():
    from gacd_fast.ops import self_check
    from tolerances import TOLERANCES

    assert self_check.TOLERANCES == TOLERANCES


def test_a_correct_kernel_passes(monkeypatch):
    x = torch.randn(4, 6)
    with cext_kernels(monkeypatch, None), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert backends.resolve("l2_normalize", CPU, None, torch.float32)[0] == "cext"
        torch.testing.assert_close(gacd_fast.l2_normalize(x), normalize_op.reference(x))
    assert not ours(seen)
    assert backends.self_check_verdicts() == {("l2_normalize", "cext", "cpu", torch.float32): True}


@pytest.mark.parametrize("fault,error", [("value", "l2_normalize: value: 65/65 values differ"),
                                         ("gradient", "l2_normalize: d x: 65/65 values differ"),
                                         ("raises", "RuntimeError: injected kernel failure")])
def test_a_faulty_cext_kernel_falls_back_to_torch_with_one_warning(monkeypatch, fault, error):
    x = torch.randn(6, 13, requires_grad=True)
    want = normalize_op.reference(x.detach())
    with cext_kernels(monkeypatch, fault), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = gacd_fast.l2_normalize(x)
        (dx,) = torch.autograd.grad(got.sum(), x)
        gacd_fast.l2_normalize(x)  # decided once: no second check, no second warning
        assert backends.resolve("l2_normalize", CPU, None, torch.float32)[0] == "torch"
        explicit_seen = len(seen)
        if fault == "raises":  # an explicit backend is used as asked, unchecked
            with pytest.raises(RuntimeError, match="injected kernel failure"):
                gacd_fast.l2_normalize(x, backend="cext")
        elif fault == "value":
            torch.testing.assert_close(gacd_fast.l2_normalize(x, backend="cext"), want * 1.5)
        assert len(seen) == explicit_seen
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dx, _reference_backward(torch.ones_like(x), x.detach()))
    (message,) = ours(seen)
    assert ("backend 'cext' failed its first-use self-check for l2_normalize on cpu (float32)" in message
            and error in message and "'auto' uses the torch backend for l2_normalize there" in message
            and "GACD_FAST_SELF_CHECK=0" in message)
    assert backends.self_check_verdicts() == {("l2_normalize", "cext", "cpu", torch.float32): False}


def test_the_verdict_is_per_dtype_and_per_op(monkeypatch):
    with cext_kernels(monkeypatch, "value", dtypes=(torch.float16,)), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert backends.resolve("l2_normalize", CPU, None, torch.float32)[0] == "cext"
        assert backends.resolve("l2_normalize", CPU, None, torch.float16)[0] == "torch"
        assert backends.resolve("l2_normalize", CPU, None, torch.bfloat16)[0] == "cext"
    (message,) = ours(seen)
    assert "(float16)" in message


def test_the_check_can_be_switched_off(monkeypatch):
    x = torch.randn(4, 6)
    backends.set_self_check(False)
    with cext_kernels(monkeypatch, "value"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.testing.assert_close(gacd_fast.l2_normalize(x), normalize_op.reference(x) * 1.5)
    assert not ours(seen)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        backends.set_self_check("no")


def test_the_environment_variable_switches_it_off(monkeypatch):
    for value, want in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("GACD_FAST_SELF_CHECK", value)
        assert backends.self_check_from_env() is want
    monkeypatch.delenv("GACD_FAST_SELF_CHECK")
    assert backends.self_check_from_env() is True


def test_the_check_leaves_the_caller_and_its_rng_alone(monkeypatch):
    """Grad mode off, inference mode, no global RNG draw: the check runs as if none of it were there."""
    x = torch.randn(4, 6)
    state = torch.get_rng_state()
    with cext_kernels(monkeypatch, None):
        with torch.inference_mode():
            y = gacd_fast.l2_normalize(x)
    assert torch.equal(torch.get_rng_state(), state) and y.is_inference()
    assert backends.self_check_verdicts()[("l2_normalize", "cext", "cpu", torch.float32)]


@pytest.mark.parametrize("fault", ["value", None])
def test_no_graph_break_with_the_check_in_place(monkeypatch, fault):
    """The check runs at trace time (inside the registry's constant-folded choice), outside the graph."""
    x = torch.randn(5, 7)
    fn = lambda x: gacd_fast.l2_normalize(x) * 2  # noqa: E731
    with cext_kernels(monkeypatch, fault), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        explained = torch._dynamo.explain(fn)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        monkeypatch.setattr(backends, "_verdicts", {})  # the compile below meets the op first
        monkeypatch.setattr(backends, "_seen", {})
        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, normalize_op.reference(x) * 2)
        assert backends.self_check_verdicts() == {("l2_normalize", "cext", "cpu", torch.float32): fault is None}


# -- through the Triton interpreter --------------------------------------------------------------

@pytest.fixture
def triton_for_auto(monkeypatch):
    """The Triton backend as "auto"'s first choice on CPU tensors (the interpreter, which "auto" never
    picks otherwise)."""
    from gacd_fast.ops import triton_backend

    if triton_backend._IMPORT_ERROR is not None or not triton_backend.interpreting():
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda device, auto=False: None)
    import gacd_fast.kernels.l2_normalize as k_norm

    return k_norm


@pytest.mark.interpreter
def test_a_faulty_triton_kernel_falls_back_to_torch(monkeypatch, triton_for_auto):
    import triton
    import triton.language as tl

    @triton.jit
    def wrong_normalize(x_ptr, y_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Compiles and runs, but writes x itself: no normalisation."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        m = (rows < N)[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        tl.store(y_ptr + off, tl.load(x_ptr + off, mask=m, other=0.0), mask=m)

    x = torch.randn(5, 13)
    monkeypatch.setattr(triton_for_auto, "_l2_normalize_fwd_kernel", wrong_normalize)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.testing.assert_close(gacd_fast.l2_normalize(x), normalize_op.reference(x))
        torch.testing.assert_close(gacd_fast.l2_normalize(x, backend="triton"), x)  # explicit: unchecked
    (message,) = ours(seen)
    assert "backend 'triton' failed its first-use self-check for l2_normalize on cpu (float32)" in message
    assert "values differ from the reference" in message


@pytest.mark.interpreter
def test_a_raising_triton_launch_falls_back_to_torch(monkeypatch, triton_for_auto):
    class Unlaunchable:
        def __getitem__(self, grid):
            raise RuntimeError("injected launch failure: no kernel image for this device")

    x = torch.randn(3, 8)
    monkeypatch.setattr(triton_for_auto, "_l2_normalize_bwd_kernel", Unlaunchable())  # the backward only
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.testing.assert_close(gacd_fast.l2_normalize(x), normalize_op.reference(x))
    (message,) = ours(seen)
    assert "RuntimeError: injected launch failure" in message and "'triton'" in message


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["info_nce_rows", "l2_normalize", "cosine_similarity", "pgd_step_", "pgd_random_start"])
def test_the_interpreted_kernels_pass_their_check(triton_for_auto, op):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.bfloat16):
            assert backends.resolve(op, CPU, None, dtype)[0] == "triton"
    assert not ours(seen)


# -- the real C++ extension: checked, loaded outside tracing, keyed by its toolchain ---------------

@pytest.fixture(scope="module")
def built():
    if cext_build.build_problem() is not None and not cext_backend.is_built():
        pytest.skip(f"cannot build the C++ extension here: {cext_build.build_problem()}")
    cext_backend.load()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_real_extension_passes_its_check(built, dtype):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for op in ("info_nce_rows", "l2_normalize", "cosine_similarity", "pgd_step_", "pgd_random_start"):
            assert backends.resolve(op, CPU, None, dtype)[0] == "cext", op
    assert not ours(seen)


FRESH_PROCESS = """
import torch, gacd_fast
from gacd_fast import GACDLoss, backends
from gacd_fast.ops import cext_build
assert not cext_build.is_loaded() and cext_build.is_built()
q, p, n = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16), torch.randn(50, 16)
loss = torch.compile(lambda q, p, n: gacd_fast.info_nce(q, p, n), fullgraph=True, backend="aot_eager")(q, p, n)
loss.backward()
x = torch.rand(4, 3, 5, 5)
adv = x.clone()
torch.compile(lambda a, g, x: gacd_fast.pgd_step_(a, g, x, alpha=0.1, eps=0.2), fullgraph=True,
              backend="aot_eager")(adv, torch.randn_like(x), x)
crit = GACDLoss(16, 12, num_data=50, embed_dim=8, num_negatives=20)
idx = torch.arange(6)
out = torch.compile(crit, fullgraph=True, backend="aot_eager")(torch.randn(6, 16), torch.randn(6, 12), idx,
                                                                crit.sample_contrast_index(idx),
                                                                teacher_logits=torch.randn(6, 3),
                                                                targets=torch.randint(3, (6,)))
out.backward()
print(backends.resolve("info_nce_rows", torch.device("cpu"), None, torch.float32)[0], cext_build.is_loaded(),
      sorted(k[0] for k, v in backends.self_check_verdicts().items() if v))
"""


@pytest.mark.slow
def test_fullgraph_first_in_a_fresh_process_after_a_build(built):
    """Section 2, row 2: the library is loaded (and checked) by the registry's choice, not inside the trace."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("GACD_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["cext", "True"]
    assert "info_nce_rows" in out.stdout and "pgd_step_" in out.stdout


def test_the_build_key_names_the_toolchain(monkeypatch, tmp_path):
    """Section 2, row 3: another compiler or another torch is another build (another folder)."""
    def key():
        cext_build.build_key.cache_clear()
        return cext_build.build_key(False)

    try:
        base = key()
        wrapper = tmp_path / "c++"
        wrapper.write_text("#!/bin/sh\nexec c++ \"$@\"\n")
        wrapper.chmod(0o755)
        monkeypatch.setenv("CXX", str(wrapper))
        other_compiler = key()
        monkeypatch.delenv("CXX")
        monkeypatch.setattr(torch, "__version__", "2.99.0")
        other_torch = key()
        monkeypatch.undo()
        assert len({base, other_compiler, other_torch}) == 3 and key() == base
        assert cext_build._jit_name(False).endswith(base[:12])
    finally:
        cext_build.build_key.cache_clear()


AUTO_WITH_ANOTHER_COMPILER = """
import torch, gacd_fast
from gacd_fast import backends
from gacd_fast.ops import cext_build
print(cext_build.is_built(), backends.resolve("info_nce_rows", torch.device("cpu"))[0])
gacd_fast.info_nce(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4))
"""


@pytest.mark.slow
def test_auto_never_compiles_for_another_toolchain(built, tmp_path):
    """With a build for c++ in the cache, "auto" under CXX=<another compiler> neither loads that build
    nor compiles one: the compiler is never run."""
    if cext_build.aot_library() is not None:
        pytest.skip("an ahead-of-time build is installed: it is used whatever the compiler")
    marker = tmp_path / "compiler_ran"
    wrapper = tmp_path / "c++"
    wrapper.write_text(f"#!/bin/sh\ntouch {marker}\nexec c++ \"$@\"\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": ROOT, "CXX": str(wrapper)}
    env.pop("GACD_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", AUTO_WITH_ANOTHER_COMPILER], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "torch"]
    assert not marker.exists() and "compiling" not in out.stderr
