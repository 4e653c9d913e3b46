"""The op contracts and the layering rules that keep the house easy to extend.

Every compiled op is declared once (schema, fake, autograd formula) in its op module under
gacd_fast/ops/ and defined from there in each compiled backend's namespace, so the backends cannot
disagree; the fakes check their inputs; kernels import nothing above them; constants live in one place.
"""
from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gacd_fast.ops import cext_backend, cext_build, cosine_similarity, info_nce, l2_normalize, pgd_step
from gacd_fast.ops import reference, torch_backend, triton_backend

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"torch": torch_backend, "triton": triton_backend, "cext": cext_backend}
SHARED_OPS = [c for op in reference.OPS if {"triton", "cext"} <= set(op.compiled_in) for c in op.compiled]
TRITON_OPS = [c for op in reference.OPS if "triton" in op.compiled_in for c in op.compiled]
CEXT_OPS = [c for op in reference.OPS if "cext" in op.compiled_in for c in op.compiled]
NAMESPACES = [triton_backend.NAMESPACE, cext_backend.NAMESPACE]


def _schema(namespace: str, op) -> str:
    return str(op.resolve(namespace).default._schema).split("::", 1)[1]


@pytest.mark.parametrize("op", SHARED_OPS, ids=lambda op: op.name)
def test_compiled_backends_share_one_schema(op):
    assert _schema(triton_backend.NAMESPACE, op) == _schema(cext_backend.NAMESPACE, op)
    assert _schema(triton_backend.NAMESPACE, op).startswith(op.name + "(")


def _has_kernel(qualname: str, key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))


def test_every_triton_op_has_its_kernel():
    for op in TRITON_OPS:
        assert _has_kernel(op.qualname(triton_backend.NAMESPACE), "CPU"), op.name


def test_every_cext_op_has_its_kernel():
    problem = cext_build.build_problem()
    if problem is not None and not cext_build.is_built():
        pytest.skip(f"cannot build the C++ extension here: {problem}")
    cext_build.load()
    for op in CEXT_OPS:
        # the library registers kernels only; torch checked each C++ signature against the schema
        assert cext_build.has_kernel(op.name, "CPU"), op.name


def _positional(fn) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


@pytest.mark.parametrize("op", reference.OPS, ids=lambda op: op.name)
def test_every_backend_builds_its_entries_from_the_op(op):
    """Each backend has the op's entry exactly where the op's contract says, taking the reference's
    positional arguments; an op's files are named after it."""
    want = _positional(op.reference)
    for name, module in BACKENDS.items():
        present = name == "torch" or name in op.compiled_in or op.torch_elsewhere
        assert hasattr(module, op.entry) == present, (name, op.entry)
        if present:
            assert _positional(getattr(module, op.entry)) == want, (name, op.entry)
    assert (ROOT / "gacd_fast" / "ops" / f"{op.name}.py").is_file()
    if "triton" in op.compiled_in:
        assert (ROOT / "kernels" / f"{op.name}.py").is_file()
    if "cext" in op.compiled_in:
        assert (ROOT / "csrc" / "cpu" / f"{op.name}.cpp").is_file() and (ROOT / "csrc" / "cuda" / f"{op.name}.cu").is_file()


def test_every_op_a_compiled_backend_runs_has_a_first_use_check():
    for op in reference.OPS:
        if op.compiled_in or op.torch_elsewhere:
            assert op.self_check is not None, op.name


def test_backward_operators_are_named_after_their_op():
    for op in reference.OPS:
        for compiled in op.compiled:
            assert compiled.name.startswith(op.name), compiled.name
            assert compiled.name == f"{op.name}_backward" or "backward" not in compiled.name, compiled.name


def test_triton_runs_float64_and_l2_starts_on_the_torch_implementations():
    """The declared policy: the Triton kernels compute in fp32, so float64 calls (and the random
    start's l2, which has no kernel) run the torch backend's implementations; no kernel is launched,
    so this holds without the interpreter."""
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(triton_backend.l2_normalize(x), reference.l2_normalize(x))
    assert torch.equal(triton_backend.cosine_similarity(x, x.flip(0)), reference.cosine_similarity(x, x.flip(0)))
    images = torch.rand(2, 3, 4)
    got = triton_backend.pgd_random_start(images, 0.1, "l2", torch.Generator().manual_seed(0))
    assert torch.equal(got, reference.pgd_random_start(images, 0.1, "l2", torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_fakes_check_their_inputs(namespace):
    with FakeTensorMode():
        q, n = torch.empty(4, 8), torch.empty(10, 8)
        fwd = info_nce.FORWARD.resolve(namespace)
        loss, lse, dq = fwd(q, torch.empty(4, 8), n, torch.empty(4, 3, dtype=torch.int64), 0.1, True, True)
        assert loss.shape == lse.shape == (4,) and dq.shape == (4, 8) and loss.dtype == torch.float32
        with pytest.raises(RuntimeError, match="positive"):
            fwd(q, torch.empty(4, 7), n, None, 0.1, True, False)
        with pytest.raises(RuntimeError, match="negatives"):
            fwd(q, torch.empty(4, 8), torch.empty(10, 5), None, 0.1, True, False)
        with pytest.raises(RuntimeError, match="neg_index"):
            fwd(q, torch.empty(4, 8), n, torch.empty(3, 2, dtype=torch.int64), 0.1, True, False)
        with pytest.raises(RuntimeError, match="x must be 2-D"):
            l2_normalize.FORWARD.resolve(namespace)(torch.empty(2, 3, 4))
        with pytest.raises(RuntimeError, match="b must have a's shape"):
            cosine_similarity.FORWARD.resolve(namespace)(torch.empty(2, 3), torch.empty(3, 3))
        x = torch.empty(2, 3, 4)
        with pytest.raises(RuntimeError, match="alpha_t must be"):
            pgd_step.STEP.resolve(namespace)(x, torch.empty(2, 3, 4), torch.empty(2, 3, 4), torch.empty(3), 0.0,
                                             None, 0.1, 0.0, 1.0, "linf")


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against ``package``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_kernels_import_nothing_above_them():
    for path in (ROOT / "kernels").glob("*.py"):
        ours = {m for m in _imported_modules(path, "gacd_fast.kernels") if m.startswith("gacd_fast")}
        above = {m for m in ours if not m.startswith(("gacd_fast.kernels", "gacd_fast._numerics"))}
        assert not above, f"{path.name} imports {sorted(above)}"


@pytest.mark.parametrize("module", ["loss", "memory", "attacks", "weighting", "functional", "feature_tap"])
def test_modules_reach_ops_only_through_the_registry(module):
    imported = _imported_modules(ROOT / "gacd_fast" / f"{module}.py", "gacd_fast")
    backends = {m for m in imported if m.endswith("_backend") or m.startswith("gacd_fast.kernels")}
    assert not backends, f"{module}.py imports {sorted(backends)}"


def test_numeric_constants_are_defined_once():
    """NORM_EPS and LOG2E are written only in gacd_fast/_numerics.py (C++ has its own in csrc/common.h)."""
    constants = {1e-12, math.log2(math.e), math.log(2.0)}
    files = [*(ROOT / "gacd_fast").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
    for path in files:
        if path.name == "_numerics.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, float):
                assert not any(math.isclose(node.value, c, rel_tol=1e-9) for c in constants), (
                    f"{path.relative_to(ROOT)}:{node.lineno} writes out {node.value}; import it from gacd_fast._numerics"
                )
