"""The C++ extension backend ("cext") on CPU tensors against the reference.

The extension is built (or loaded from torch's cache) once per test session. Values and every
gradient are compared with the float64 reference; gradcheck runs in float64 through the op.
"""
import pytest
import torch

import gacd_fast
from gacd_fast import functional as gf
from gacd_fast.ops import cext_backend, cext_build, reference
from tests.tolerances import assert_close


@pytest.fixture(scope="session")
def ops():
    problem = cext_build.build_problem()
    if problem is not None and not cext_backend.is_built():
        pytest.skip(f"cannot build the C++ extension here: {problem}")
    cext_backend.load()
    return torch.ops.gacd_fast


# B, K, D, M (M: negatives per row in neg_index mode)
SHAPES = [(1, 1, 1, 1), (3, 129, 31, 5), (17, 300, 200, 17), (5, 9000, 7, 3)]
MODES = ["shared", "index64", "index32"]


def _inputs(B, K, D, M, mode, dtype=torch.float32, bank_grad=True):
    q = torch.randn(B, D, dtype=dtype).requires_grad_()
    p = (torch.randn(B, D, dtype=dtype) + 0.5).requires_grad_()
    n = torch.randn(K, D, dtype=dtype).requires_grad_(bank_grad)
    idx = None
    if mode != "shared":
        idx = torch.randint(0, K, (B, M), dtype=torch.int64 if mode == "index64" else torch.int32)
    return q, p, n, idx


def _oracle(q, p, n, idx, tau, normalize, g):
    """float64 reference rows and their gradients for the cotangent g."""
    q64, p64, n64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (q, p, n))
    rows = reference.info_nce_rows(q64, p64, n64, idx, tau, normalize)
    wrt = [t for t in (q64, p64, n64) if t.requires_grad]
    grads = torch.autograd.grad(rows, wrt, g.double())
    return rows, grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bank_grad", [True, False])
def test_info_nce_rows_values_and_grads(ops, shape, mode, normalize, bank_grad):
    B, K, D, M = shape
    q, p, n, idx = _inputs(B, K, D, M, mode, bank_grad=bank_grad)
    tau = 0.2 if normalize else 3.0
    g = torch.randn(B)  # an arbitrary cotangent, as weighted_reduce produces
    rows = cext_backend.info_nce_rows(q, p, n, idx, tau, normalize)
    assert rows.dtype == torch.float32 and rows.shape == (B,)
    ref, ref_grads = _oracle(q, p, n, idx, tau, normalize, g)
    assert_close(rows, ref, torch.float32, "rows")
    wrt = [t for t in (q, p, n) if t.requires_grad]
    grads = torch.autograd.grad(rows, wrt, g)
    for name, got, want in zip("qpn", grads, ref_grads):
        assert got.dtype == torch.float32
        assert_close(got, want, torch.float32, f"d{name}")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("mode", ["shared", "index64"])
@pytest.mark.parametrize("weights", [None, "random", "some_zero", "all_zero"])
def test_info_nce_public_api(ops, reduction, mode, weights):
    B, K, D, M = 17, 257, 33, 11
    q, p, n, idx = _inputs(B, K, D, M, mode)
    w = {None: None, "random": torch.rand(B), "some_zero": torch.rand(B) * (torch.arange(B) % 3 != 0),
         "all_zero": torch.zeros(B)}[weights]
    out = gacd_fast.info_nce(q, p, n, temperature=0.07, weights=w, neg_index=idx, reduction=reduction, backend="cext")
    q64, p64, n64 = (t.detach().double().requires_grad_() for t in (q, p, n))
    ref = gf.weighted_reduce(reference.info_nce_rows(q64, p64, n64, idx, 0.07, True), w, reduction)
    assert_close(out, ref, torch.float32, "loss")
    cot = torch.randn(out.shape)
    got = torch.autograd.grad(out, (q, p, n), cot)
    want = torch.autograd.grad(ref, (q64, p64, n64), cot.double())
    for name, a, b in zip("qpn", got, want):
        assert_close(a, b, torch.float32, f"d{name}")
    if weights == "all_zero" and reduction != "none":
        assert out.item() == 0 and all(bool((x == 0).all()) for x in got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["shared", "index64"])
def test_info_nce_low_precision(ops, dtype, mode):
    q, p, n, idx = _inputs(3, 129, 31, 5, mode, dtype=dtype)
    g = torch.randn(3)
    rows = cext_backend.info_nce_rows(q, p, n, idx, 0.5, True)
    assert rows.dtype == torch.float32
    ref, ref_grads = _oracle(q, p, n, idx, 0.5, True, g)
    assert_close(rows, ref, dtype, "rows")
    for name, got, want in zip("qpn", torch.autograd.grad(rows, (q, p, n), g), ref_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"d{name}")


@pytest.mark.parametrize("mode", ["shared", "index64"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bank_grad", [True, False])
def test_gradcheck_float64(ops, mode, normalize, bank_grad):
    q, p, n, idx = _inputs(3, 11, 5, 4, mode, dtype=torch.float64, bank_grad=bank_grad)
    tau = 0.3 if normalize else 2.0
    fn = lambda q, p, n: cext_backend.info_nce_rows(q, p, n, idx, tau, normalize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, p, n))


def test_float64_rows_are_float64(ops):
    q, p, n, idx = _inputs(3, 40, 6, 2, "shared", dtype=torch.float64)
    rows = cext_backend.info_nce_rows(q, p, n, None, 0.1, True)
    assert rows.dtype == torch.float64
    assert_close(rows, reference.info_nce_rows(q, p, n, None, 0.1, True), torch.float64, "rows")


def test_bank_updated_in_place_after_forward(ops):
    """With the query's gradient folded into the forward, the bank is not saved for backward."""
    q, p, n, _ = _inputs(4, 50, 8, 1, "shared", bank_grad=False)
    rows = cext_backend.info_nce_rows(q, p, n, None, 0.1, True)
    ref, ref_grads = _oracle(q, p, n, None, 0.1, True, torch.ones(4))
    n.mul_(0.5).add_(1.0)  # a momentum update of the memory bank
    rows.sum().backward()
    assert_close(q.grad, ref_grads[0], torch.float32, "dq")


def test_normalize_and_cosine(ops):
    for N, D in [(1, 1), (3, 31), (17, 200)]:
        a = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
        b = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(cext_backend.l2_normalize, (a,))
        assert torch.autograd.gradcheck(cext_backend.cosine_similarity, (a, b))
        a32, b32 = a.detach().float(), b.detach().float()
        assert_close(cext_backend.l2_normalize(a32), reference.l2_normalize(a.detach()), torch.float32, "normalize")
        cos = cext_backend.cosine_similarity(a32, b32)
        assert cos.dtype == torch.float32
        assert_close(cos, reference.cosine_similarity(a.detach(), b.detach()), torch.float32, "cosine")
    z = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)  # ||x|| < eps: x / eps
    assert torch.equal(cext_backend.l2_normalize(z), torch.zeros(2, 5, dtype=torch.float64))
    tiny = torch.full((2, 3), 1e-14, dtype=torch.float64, requires_grad=True)  # Jacobian I / eps there
    cot = torch.randn(2, 3, dtype=torch.float64)
    (got,) = torch.autograd.grad(cext_backend.l2_normalize(tiny), (tiny,), cot)
    (want,) = torch.autograd.grad(reference.l2_normalize(tiny), (tiny,), cot)
    assert_close(got, want, torch.float64, "normalize backward below eps")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(7, 19).to(dtype)
        out = gacd_fast.l2_normalize(x, backend="cext")
        assert out.dtype == dtype
        assert_close(out, reference.l2_normalize(x.double()), dtype, "normalize low precision")


def _pgd_args(dtype, per_sample):
    B = 5
    x_nat = torch.rand(B, 3, 7, 9).to(dtype)
    x_adv = (x_nat + 0.03 * torch.randn(x_nat.shape).to(dtype)).clamp(0, 1)
    grad = torch.randn(x_nat.shape).to(dtype)
    grad[0, 0, 0, :3] = 0  # sign(0) = 0
    grad[1] = 0  # l2: a zero-norm gradient takes no step
    if per_sample:
        return x_adv, grad, x_nat, torch.rand(B) * 0.02, torch.rand(B) * 0.05
    return x_adv, grad, x_nat, 2 / 255, 8 / 255


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pgd_linf_bitwise(ops, dtype, per_sample):
    x_adv, grad, x_nat, alpha, eps = _pgd_args(dtype, per_sample)
    want = reference.pgd_step_(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, "linf")
    got = x_adv.clone()
    out = gacd_fast.pgd_step_(got, grad, x_nat, alpha=alpha, eps=eps, backend="cext")
    assert out is got
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pgd_l2(ops, dtype, per_sample):
    x_adv, grad, x_nat, alpha, eps = _pgd_args(dtype, per_sample)
    alpha = alpha * 20 if per_sample else 0.5  # large steps: the projection is exercised
    want = reference.pgd_step_(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, "l2")
    got = gacd_fast.pgd_step_(x_adv.clone(), grad, x_nat, alpha=alpha, eps=eps, norm="l2", backend="cext")
    assert_close(got, want, dtype, "l2 step")


def test_pgd_non_contiguous(ops):
    x_nat = torch.rand(4, 6, 5).transpose(1, 2)
    x_adv = (x_nat + 0.01).clamp(0, 1)
    grad = torch.randn(4, 5, 6)
    want = reference.pgd_step_(x_adv.clone(), grad, x_nat, 0.01, 0.02, 0.0, 1.0, "linf")
    got = x_adv.clone()
    assert gacd_fast.pgd_step_(got, grad, x_nat, alpha=0.01, eps=0.02, backend="cext") is got
    assert torch.equal(got, want)


def test_opcheck(ops):
    B, K, D, M = 3, 37, 5, 4
    for mode in ("shared", "index64"):
        for bank_grad in (True, False):
            q, p, n, idx = _inputs(B, K, D, M, mode, bank_grad=bank_grad)
            for normalize in (True, False):
                compute_dq = not bank_grad
                torch.library.opcheck(ops.info_nce_forward.default, (q, p, n, idx, 0.2, normalize, compute_dq))
    q, p, n, idx = _inputs(B, K, D, M, "shared", dtype=torch.float64)
    _, lse, _ = ops.info_nce_forward(q.detach(), p.detach(), n.detach(), None, 0.2, True, False)
    torch.library.opcheck(ops.info_nce_backward.default,
                          (torch.randn(B, dtype=torch.float64), q.detach(), p.detach(), n.detach(), None, lse, None,
                           0.2, True, True, True, True))
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(ops.l2_normalize.default, (a,))
    torch.library.opcheck(ops.cosine_similarity.default, (a, b))
    x_nat = torch.rand(2, 3, 4)
    torch.library.opcheck(ops.pgd_step_.default,
                          (x_nat.clone(), torch.randn(2, 3, 4), x_nat, None, 0.01, torch.full((2,), 0.03), 0.0, 0.0,
                           1.0, "linf"))


def test_torch_compile(ops):
    q, p, n, idx = _inputs(5, 70, 12, 1, "shared", bank_grad=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(q, p, n):
        return cext_backend.info_nce_rows(q, p, n, None, 0.1, True).mean()

    got = loss_fn(q, p, n)
    (dq,) = torch.autograd.grad(got, (q,))
    ref = reference.info_nce_rows(q, p, n, None, 0.1, True).mean()
    (dq_ref,) = torch.autograd.grad(ref, (q,))
    assert_close(got, ref, torch.float32, "compiled loss")
    assert_close(dq, dq_ref, torch.float32, "compiled dq")


def test_deterministic(ops):
    q, p, n, idx = _inputs(9, 600, 16, 40, "index64")
    idx[:, :20] = 3  # many rows share bank row 3: the column-owned sum must not depend on threads
    runs = []
    for _ in range(2):
        rows = cext_backend.info_nce_rows(q, p, n, idx, 0.1, True)
        runs.append(torch.autograd.grad(rows.sum(), (q, p, n)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_bad_inputs_raise_clear_errors(ops):
    q, p, n = torch.randn(3, 4), torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="positive must have query's shape"):
        ops.info_nce_forward(q, torch.randn(2, 4), n, None, 0.1, True, False)
    with pytest.raises(RuntimeError, match="negatives must be"):
        ops.info_nce_forward(q, p, torch.randn(10, 5), None, 0.1, True, False)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.info_nce_forward(q, p, n.double(), None, 0.1, True, False)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        ops.info_nce_forward(q, p, n, None, 0.0, True, False)
    with pytest.raises(RuntimeError, match="neg_index must be int32 or int64"):
        ops.info_nce_forward(q, p, n, torch.zeros(3, 2), 0.1, True, False)
    with pytest.raises(RuntimeError, match=r"neg_index must be \[B, M\]"):
        ops.info_nce_forward(q, p, n, torch.zeros(2, 2, dtype=torch.long), 0.1, True, False)
    with pytest.raises(IndexError, match=r"neg_index must hold indices in \[0, 10\)"):
        ops.info_nce_forward(q, p, n, torch.full((3, 2), 10, dtype=torch.long), 0.1, True, False)
    with pytest.raises(RuntimeError, match="must be float16/bfloat16/float32/float64"):
        ops.l2_normalize(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops.cosine_similarity(torch.ones(3), torch.ones(3))
    x = torch.rand(2, 3)
    with pytest.raises(RuntimeError, match="norm must be 'linf' or 'l2'"):
        ops.pgd_step_(x, x, x, None, 0.1, None, 0.1, 0.0, 1.0, "l1")
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        ops.pgd_step_(x, x, x, None, 0.1, None, -0.1, 0.0, 1.0, "linf")
    with pytest.raises(RuntimeError, match=r"alpha must have shape \[B\]"):
        ops.pgd_step_(x, x, x, torch.ones(3), 0.0, None, 0.1, 0.0, 1.0, "linf")
    with pytest.raises(RuntimeError, match="clip_min must be <= clip_max"):
        ops.pgd_step_(x, x, x, None, 0.1, None, 0.1, 1.0, 0.0, "linf")


def test_backend_selection(ops):
    assert cext_backend.is_loaded() and cext_backend.is_built()
    assert cext_backend.unavailable_reason(torch.device("cpu"), auto=True) is None
    assert "cext" in gacd_fast.available_backends("cpu")
    assert "cpu and cuda" in cext_backend.unavailable_reason(torch.device("meta"))
    if torch.version.cuda is None:
        assert "no CUDA" in cext_backend.unavailable_reason(torch.device("cuda"))
    from gacd_fast import backends

    name, fn = backends.resolve("info_nce_rows", torch.device("cpu"), "cext")
    assert name == "cext" and fn is cext_backend.info_nce_rows


def test_auto_never_compiles(ops, tmp_path):
    """With nothing built, "auto" passes over cext quietly (no compile); explicit use would build."""
    if cext_build.aot_library() is not None:
        pytest.skip("an ahead-of-time build is installed: cext counts as built")
    import os
    import subprocess
    import sys

    code = (
        "import torch, gacd_fast\n"
        "from gacd_fast import backends\n"
        "from gacd_fast.ops import cext_backend as c\n"
        "print(c.unavailable_reason(torch.device('cpu'), auto=True))\n"
        "print(backends.resolve('info_nce_rows', torch.device('cpu'))[0])\n"
        "print(c.unavailable_reason(torch.device('cpu'), auto=False))\n"
        "print(c.is_loaded())\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("GACD_FAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "not built yet" in lines[0]
    assert lines[1] != "cext"
    assert lines[2] == "None"  # explicit use can build here
    assert lines[3] == "False"
    assert "compiling" not in out.stderr


def test_jit_build_is_announced(ops, monkeypatch, capsys):
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    monkeypatch.setattr(cext_build, "is_built", lambda: False)
    cext_build._jit_build(verbose=False)
    err = capsys.readouterr().err
    assert "gacd_fast: compiling the C++" in err
    assert calls and calls[0]["is_python_module"] is False
    assert all(s.endswith(".cpp") for s in calls[0]["sources"]) == (torch.version.cuda is None)
