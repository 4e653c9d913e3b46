"""Property tests over every backend (issue 11), run by tests/test_properties.py in a child process
so that a crash (a signal) fails one test instead of killing the test run.

Each example draws shapes (0-sized dims included), a dtype, a memory layout, values with NaN/inf
placements or huge magnitudes, index ranges and options, then calls the op on every available
backend: each call either returns what the reference returns (within the tolerance table, NaN and
inf matched exactly) or raises ValueError/TypeError/IndexError naming an argument, the same error
on every backend. Profiles (tests/conftest.py): the default "ci" is small; `--hypothesis-profile=long`
soaks.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, strategies as st

import gacd_fast
import oracles
from gacd_fast import functional
from gacd_fast.ops import reference
from tolerances import TOLERANCES

BACKENDS = gacd_fast.available_backends("cpu")

ARG_NAMES = ("query", "positive", "negatives", "temperature", "weights", "neg_index", "normalize", "reduction",
             "x", "a", "b", "x_adv", "grad", "x_nat", "alpha", "eps", "clip_min", "clip_max", "norm", "generator")


# --------------------------------------------------------------------------------------- inputs
@st.composite
def tensors(draw, shape, dtype, *, specials=True):
    """A float tensor of ``shape`` and ``dtype`` in a drawn layout (contiguous, transposed, strided)
    with drawn magnitudes and NaN/inf placements. Returns (tensor, tags)."""
    tags = set()
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 1e-30] + ([1e19, 1e30] if dtype == torch.float32 else [])))
    if scale > 1e10 and x.dim() == 2 and x.shape[0] > 0:
        x[draw(st.integers(0, x.shape[0] - 1))] *= scale  # one huge row
        tags.add("huge")
    elif scale < 1:
        x *= scale
    if specials and x.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 2))):
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tags.add("special")
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"])) if x.dim() == 2 else "contiguous"
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    return x, tags


def _size(n: int):
    """A dim size in [0, n], mostly >= 1 (0-sized dims are one case among many)."""
    return st.sampled_from([0] + list(range(1, n + 1)) * 3)


def _generator(data) -> torch.Generator:
    """A torch generator seeded from the draw, so that every random tensor of an example is part of
    the example (a failing case replays with @reproduce_failure, whatever the global RNG holds)."""
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="torch seed"))


def _dtypes(backend_bf16=True):
    return st.sampled_from([torch.float32, torch.float64, torch.float16] + ([torch.bfloat16] if backend_bf16 else []))


# valid choices are repeated so that most examples get past the checks and compare values
TEMPERATURES = [0.07, 0.5, 1.0, 0.07, 0.5, 1.0, 1e-30, np.float32(0.1), np.float64(0.2),
                1e-300, 0.0, -0.1, math.nan, math.inf, "0.1", True]


# ---------------------------------------------------------------------------------- comparison
def _call(fn):
    try:
        return fn(), None
    except (ValueError, TypeError, IndexError) as exc:
        return None, exc


def _assert_names_argument(exc: Exception) -> None:
    msg = str(exc)
    assert any(name in msg for name in ARG_NAMES), f"error names no argument: {type(exc).__name__}: {msg}"


def _assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str,
                    atol_extra: torch.Tensor | None = None) -> None:
    """Values close at ``dtype``'s tolerance (plus ``atol_extra``, an absolute bound like ``want``);
    NaN where the reference has NaN; inf exactly."""
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN pattern differs\n{g}\n{w}"
    inf = torch.isinf(w)
    assert torch.equal(torch.isinf(g), inf) and torch.equal(g[inf], w[inf]), f"{what}: inf differs\n{g}\n{w}"
    fin = torch.isfinite(w)
    atol, rtol = TOLERANCES[dtype]
    # the reference itself rounds at dtype (its accumulation dtype for float16/bfloat16 inputs is
    # float32): compare at the tolerance of the looser of the two
    bound = atol * 10 + rtol * 10 * w[fin].abs() + (0 if atol_extra is None else atol_extra.expand_as(w)[fin])
    assert bool(((g[fin] - w[fin]).abs() <= bound).all()), f"{what}: values differ\n{g}\n{w}"


def _check_all(backend_calls, reference_call, dtype, what, atol_extra=None):
    """Run the op on every backend; all raise the same named error, or all match the reference
    (``atol_extra``: a callable giving the extra absolute tolerance, see _assert_matches)."""
    want, want_exc = _call(reference_call)
    event(f"{what}: " + (f"raises {type(want_exc).__name__}" if want_exc is not None else "values compared"))
    for name, call in backend_calls.items():
        got, exc = _call(call)
        if want_exc is not None:
            assert exc is not None, f"{what} on {name}: returned, but the reference raised {want_exc!r}"
            assert type(exc) is type(want_exc), f"{what} on {name}: {exc!r} != reference {want_exc!r}"
            _assert_names_argument(exc)
            continue
        assert exc is None, f"{what} on {name}: raised {exc!r}, the reference returned"
        _assert_matches(got, want, dtype, f"{what} on {name}", None if atol_extra is None else atol_extra())


# ----------------------------------------------------------------------------------- the ops
@given(data=st.data())
def test_info_nce(data):
    dtype = data.draw(_dtypes(backend_bf16="triton" not in BACKENDS), label="dtype")
    B, D, K = (data.draw(_size(n), label=l) for n, l in ((4, "B"), (5, "D"), (6, "K")))
    q, p, n = (data.draw(tensors(s, dtype))[0] for s in ((B, D), (B, D), (K, D)))
    normalize = data.draw(st.booleans(), label="normalize")
    temperature = data.draw(st.sampled_from(TEMPERATURES), label="temperature")
    reduction = data.draw(st.sampled_from(["none", "sum", "mean"] * 3 + ["avg"]), label="reduction")
    weights = data.draw(st.sampled_from([None, "ones", "random"] * 3 + ["negative", "list"]), label="weights")
    gen = _generator(data)
    w = {None: None, "ones": torch.ones(B), "random": torch.rand(B, generator=gen), "negative": -torch.rand(B, generator=gen),
         "list": [1.0] * B}[weights]
    neg_index = None
    if data.draw(st.booleans(), label="use neg_index"):
        M = data.draw(_size(4), label="M")
        lo, hi = data.draw(st.sampled_from([(0, max(K - 1, 0))] * 4 + [(-2, K + 1)]), label="index range")
        idx_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), label="index dtype")
        neg_index = torch.randint(lo, hi + 1, (B, M), dtype=idx_dtype, generator=gen)
    kwargs = dict(temperature=temperature, weights=w, neg_index=neg_index, normalize=normalize, reduction=reduction)

    def ref():
        tau = functional._check_contrastive_inputs(q, p, n, temperature, w, neg_index, normalize, reduction)
        rows = reference.info_nce_rows(q, p, n, neg_index, tau, normalize)
        return oracles.weighted_reduce(rows, w, reduction)

    def rounding():
        # |logits| ~ 1e30 (tau = 1e-30) leave l = lse - s_pos known only to a unit of the logits
        unit = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        scale = oracles.logit_scale(q, p, n, neg_index, float(temperature), normalize)
        return oracles.weighted_reduce(8 * (q.shape[1] + 1) * unit * scale, w, reduction)

    calls = {b: (lambda b=b: gacd_fast.info_nce(q, p, n, backend=b, **kwargs)) for b in BACKENDS}
    _check_all(calls, ref, dtype, "info_nce", atol_extra=rounding)


@given(data=st.data())
def test_normalize_and_cosine(data):
    dtype = data.draw(_dtypes(), label="dtype")
    N, D = data.draw(_size(4), label="N"), data.draw(_size(6), label="D")
    a, b = data.draw(tensors((N, D), dtype))[0], data.draw(tensors((N, D), dtype))[0]

    def ref_norm():
        functional.check_tensor("x", a, ndim=2)
        functional.check_nonempty("x", a, (0, 1))
        return reference.l2_normalize(a)

    def ref_cos():
        functional.check_nonempty("a", a, (0, 1))
        return reference.cosine_similarity(a, b)

    _check_all({k: (lambda k=k: gacd_fast.l2_normalize(a, backend=k)) for k in BACKENDS}, ref_norm, dtype, "normalize")
    _check_all({k: (lambda k=k: gacd_fast.cosine_similarity(a, b, backend=k)) for k in BACKENDS}, ref_cos, dtype,
               "cosine_similarity")


@given(data=st.data())
def test_pgd_step(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16]), label="dtype")
    shape = data.draw(st.sampled_from([(1, 1), (2, 5), (3, 2, 3)] * 3 + [(0, 3), (2, 0)]), label="shape")
    gen = _generator(data)
    x_nat = torch.rand(shape, dtype=torch.float64, generator=gen).to(dtype)
    grad, _ = data.draw(tensors(shape, dtype))
    x_adv = (x_nat + 0.05 * torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)).clamp(0, 1)
    if x_adv.numel() and data.draw(st.booleans(), label="nan image"):
        x_adv.view(-1)[0] = math.nan
    norm = data.draw(st.sampled_from(["linf", "l2"] * 4 + ["l1"]), label="norm")
    per_sample = st.sampled_from(["float", "tensor", "numpy"] * 4 + ["nan tensor", "negative", "grad tensor"])
    values = {}
    for name, v in (("alpha", 0.03), ("eps", 0.1)):
        kind = data.draw(per_sample, label=name)
        B = shape[0]
        values[name] = {"float": v, "numpy": np.float32(v), "negative": -v, "tensor": torch.full((B,), v),
                        "nan tensor": torch.full((B,), math.nan),
                        "grad tensor": torch.full((B,), v, requires_grad=True)}[kind]
    clip = data.draw(st.sampled_from([(0.0, 1.0), (0.2, 0.8)] * 3 + [(1.0, 0.0)]), label="clip")
    kwargs = dict(clip_min=clip[0], clip_max=clip[1], norm=norm, **values)

    def ref_op():
        # the public checks (raising like every backend), then the reference op itself on a copy
        gacd_fast.pgd_step_(x_adv.clone(), grad, x_nat, backend="torch", **kwargs)
        a = values["alpha"].detach() if isinstance(values["alpha"], torch.Tensor) else float(values["alpha"])
        e = values["eps"].detach() if isinstance(values["eps"], torch.Tensor) else float(values["eps"])
        return reference.pgd_step_(x_adv.clone(), grad, x_nat, a, e, clip[0], clip[1], norm)

    calls = {b: (lambda b=b: gacd_fast.pgd_step_(x_adv.clone(), grad, x_nat, backend=b, **kwargs)) for b in BACKENDS}
    _check_all(calls, ref_op, dtype, f"pgd_step_ {norm}")


@given(data=st.data())
def test_pgd_random_start(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16]), label="dtype")
    shape = data.draw(st.sampled_from([(0, 3), (1, 1), (2, 5), (3, 2, 3)]), label="shape")
    x = torch.rand(shape, dtype=torch.float64, generator=_generator(data)).to(dtype)
    norm = data.draw(st.sampled_from(["linf", "l2"]), label="norm")
    eps = data.draw(st.sampled_from([0.0, 0.1, np.float32(0.05), -0.1, math.nan, "tensor", "nan tensor"]), label="eps")
    if isinstance(eps, str):
        eps = torch.full(shape[:1], math.nan if eps == "nan tensor" else 0.1)
    results = {}
    for b in BACKENDS:
        out, exc = _call(lambda b=b: gacd_fast.pgd_random_start(x, eps=eps, norm=norm,
                                                                 generator=torch.Generator().manual_seed(1), backend=b))
        results[b] = (out, exc)
    kinds = {type(exc) for _, exc in results.values()}
    assert len(kinds) == 1, f"backends disagree: {results}"
    for b, (out, exc) in results.items():
        if exc is not None:
            _assert_names_argument(exc)
            continue
        e = eps.view(-1, *([1] * (x.dim() - 1))) if isinstance(eps, torch.Tensor) else float(eps)
        delta = (out.double() - x.double()).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        bound = (e.flatten() if isinstance(e, torch.Tensor) else torch.full(size.shape, e)).double()
        assert bool((size <= bound * (1 + 1e-2) + 1e-3).all()), f"{b}: outside the eps-ball"
        assert bool(((out >= 0) & (out <= 1)).all()), f"{b}: outside [0, 1]"
    if "cext" in results and results["cext"][0] is not None:
        assert torch.equal(results["cext"][0], results["torch"][0])  # the same draws


def test_meta_tensors_every_op():
    """Meta tensors: shapes and dtypes are checked, values are not read."""
    q = torch.empty(3, 4, device="meta")
    idx = torch.zeros(3, 2, dtype=torch.long, device="meta")
    assert gacd_fast.info_nce(q, q, q, neg_index=idx, weights=torch.ones(3, device="meta"), backend="torch").is_meta
    with pytest.raises(ValueError, match="x must have a non-empty dim"):
        gacd_fast.l2_normalize(torch.empty(3, 0, device="meta"))
