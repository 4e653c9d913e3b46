"""The C++ extension backend ("cext"), what only it has: a bank of several chunks, the bank updated
in place, opcheck, torch.compile, determinism, its own argument checks, build/auto/announce.
Values and gradients at small odd shapes on every backend are in tests/test_conformance.py.

The extension is built (or loaded from torch's cache) once per test session.
"""
import pytest
import torch

import gacd_fast
import oracles
from checks import check_info_nce
from gacd_fast.ops import cext_backend, cext_build
from inputs import info_nce_inputs
from tolerances import assert_close


@pytest.fixture(scope="session")
def ops():
    problem = cext_build.build_problem()
    if problem is not None and not cext_backend.is_built():
        pytest.skip(f"cannot build the C++ extension here: {problem}")
    cext_backend.load()
    return torch.ops.gacd_fast


@pytest.mark.parametrize("M", [None, 3])
@pytest.mark.parametrize("bank_grad", [True, False])
def test_bank_of_several_chunks(ops, M, bank_grad):
    """K = 9000: more than one bank chunk (8192 rows), merged in group order."""
    check_info_nce("cext", *info_nce_inputs(5, 9000, 7, M), need=(True, True, bank_grad), temperature=0.2,
                   reduction="none")


def test_bank_updated_in_place_after_forward(ops):
    """With the query's gradient folded into the forward, the bank is not saved for backward."""
    q, p, n, _ = info_nce_inputs(4, 50, 8, None, grad=(True, True, False))
    rows = cext_backend.info_nce_rows(q, p, n, None, 0.1, True)
    q64 = q.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(oracles.info_nce_rows(q64, p.double(), n.double(), None, 0.1, True).sum(), q64)
    n.mul_(0.5).add_(1.0)  # a momentum update of the memory bank
    rows.sum().backward()
    assert_close(q.grad, want, torch.float32, "dq")


@pytest.mark.slow
def test_opcheck(ops):
    B, K, D, M = 3, 37, 5, 4
    for mode in ("shared", "index64"):
        for bank_grad in (True, False):
            q, p, n, idx = info_nce_inputs(B, K, D, M if mode == "index64" else None, grad=(True, True, bank_grad))
            for normalize in (True, False):
                compute_dq = not bank_grad
                torch.library.opcheck(ops.info_nce_forward.default, (q, p, n, idx, 0.2, normalize, compute_dq))
    q, p, n, idx = info_nce_inputs(B, K, D, None, torch.float64)
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
    q, p, n, _ = info_nce_inputs(5, 70, 12, None, grad=(True, True, False))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(q, p, n):
        return cext_backend.info_nce_rows(q, p, n, None, 0.1, True).mean()

    got = loss_fn(q, p, n)
    (dq,) = torch.autograd.grad(got, (q,))
    q64 = q.detach().double().requires_grad_()
    ref = oracles.info_nce_rows(q64, p.double(), n.double(), None, 0.1, True).mean()
    (dq_ref,) = torch.autograd.grad(ref, (q64,))
    assert_close(got, ref, torch.float32, "compiled loss")
    assert_close(dq, dq_ref, torch.float32, "compiled dq")


def test_deterministic(ops):
    q, p, n, idx = info_nce_inputs(9, 600, 16, 40, grad=(True, True, True))
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


@pytest.mark.slow
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
