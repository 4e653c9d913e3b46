"""Every public op rejects bad input with an error naming the argument, expected and received."""
import pytest
import torch

import gacd_fast

q = torch.randn(4, 8)
n = torch.randn(10, 8)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((q.numpy(), q, n), {}, TypeError, "query must be a torch.Tensor"),
    ((q[0], q, n), {}, ValueError, r"query must be 2-D, got shape \(8,\)"),
    ((q, q[:3], n), {}, ValueError, r"positive must have shape \(4, 8\)"),
    ((q, q, n[:, :5]), {}, ValueError, "negatives must have D=8"),
    ((q, q, n[:0]), {}, ValueError, "negatives must have a non-empty"),
    ((q[:0], q[:0], n), {}, ValueError, "query must have a non-empty"),
    ((q.long(), q.long(), n.long()), {}, TypeError, "query must have dtype in"),
    ((q, q, n.double()), {}, TypeError, "negatives has dtype torch.float64 but query"),
    ((q, q, n), dict(temperature=0), ValueError, "temperature must be > 0, got 0"),
    ((q, q, n), dict(temperature=-1.0), ValueError, "temperature"),
    ((q, q, n), dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    ((q, q, n), dict(temperature="0.1"), TypeError, "temperature must be a real number"),
    ((q, q, n), dict(weights=torch.ones(3)), ValueError, r"weights must have shape \(4,\)"),
    ((q, q, n), dict(weights=torch.ones(4, dtype=torch.long)), TypeError, "weights must have dtype"),
    ((q, q, n), dict(neg_index=torch.zeros(4, 3)), TypeError, "neg_index must have dtype in"),
    ((q, q, n), dict(neg_index=torch.zeros(3, 3, dtype=torch.long)), ValueError, r"neg_index must have shape \(4, 3\)"),
    ((q, q, n), dict(neg_index=torch.zeros(4, 0, dtype=torch.long)), ValueError, "neg_index must have a non-empty"),
    ((q, q, n), dict(neg_index=torch.full((4, 2), 10)), IndexError, r"neg_index must hold indices in \[0, 10\).*\[10, 10\]"),
    ((q, q, n), dict(neg_index=torch.full((4, 2), -1, dtype=torch.int32)), IndexError, "neg_index"),
    ((q, q, n), dict(reduction="avg"), ValueError, r"reduction must be one of \['none', 'sum', 'mean'\], got 'avg'"),
    ((q, q, n), dict(normalize=1), TypeError, "normalize must be a bool"),
])
def test_info_nce_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gacd_fast.info_nce(*args, **kwargs)


def test_device_mismatch_named():
    meta = torch.empty(10, 8, device="meta")
    with pytest.raises(ValueError, match="negatives is on meta but query is on cpu"):
        gacd_fast.info_nce(q, q, meta)


def test_nce_needs_num_data():
    with pytest.raises(ValueError, match="num_data"):
        gacd_fast.nce_loss(q, q, n, num_data=0)


def test_similarity_bad_inputs():
    with pytest.raises(ValueError, match="x must be 2-D"):
        gacd_fast.l2_normalize(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"b must have shape \(4, 8\)"):
        gacd_fast.cosine_similarity(q, q[:2])
    with pytest.raises(TypeError, match="b has dtype"):
        gacd_fast.cosine_similarity(q, q.half())


x = torch.rand(3, 2, 2)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((x.clone(), x[:2], x), dict(alpha=0.1, eps=0.1), ValueError, r"grad must have shape \(3, 2, 2\)"),
    ((x.clone(), x, x.double()), dict(alpha=0.1, eps=0.1), TypeError, "x_nat has dtype"),
    ((x.clone(), x, x), dict(alpha=0.1, eps=-0.1), ValueError, "eps must be >= 0, got -0.1"),
    ((x.clone(), x, x), dict(alpha=0.1, eps=torch.tensor([0.1, -0.2, 0.0])), ValueError, "eps must be >= 0 for every sample"),
    ((x.clone(), x, x), dict(alpha=torch.ones(2), eps=0.1), ValueError, r"alpha must have shape \(3,\)"),
    ((x.clone(), x, x), dict(alpha=0.1, eps=0.1, norm="l1"), ValueError, "norm must be one of"),
    ((x.clone(), x, x), dict(alpha=0.1, eps=0.1, clip_min=1.0, clip_max=0.0), ValueError, "clip_min must be <= clip_max"),
    ((x.clone(), x, x), dict(alpha=None, eps=0.1), TypeError, "alpha must be a real number"),
    ((x.clone().long(), x.long(), x.long()), dict(alpha=1, eps=1), TypeError, "x_adv must have dtype"),
])
def test_pgd_step_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gacd_fast.pgd_step_(*args, **kwargs)


def test_value_checks_can_be_switched_off_but_shape_checks_stay():
    idx = torch.full((4, 2), 10)
    with pytest.raises(IndexError, match="neg_index"):
        gacd_fast.info_nce(q, q, n, neg_index=idx)
    gacd_fast.set_value_checks(False)  # no device sync: the range is not read
    with pytest.raises(IndexError):  # torch's own indexing still refuses, just later
        gacd_fast.info_nce(q, q, n, neg_index=idx)
    x = torch.rand(3, 2, 2)
    adv = x.clone()
    gacd_fast.pgd_step_(adv, x, x, alpha=0.1, eps=torch.tensor([0.1, -0.2, 0.0]), backend="torch")  # not read
    with pytest.raises(ValueError, match="positive must have shape"):
        gacd_fast.info_nce(q, q[:3], n)
    with pytest.raises(TypeError, match="enabled"):
        gacd_fast.set_value_checks("no")


def test_check_bool_lives_with_the_other_checks():
    from gacd_fast._checks import check_bool

    assert check_bool("symmetric", True) is True
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match=rf"symmetric must be a bool, got {bad!r}"):
            check_bool("symmetric", bad)
    with pytest.raises(TypeError, match="symmetric must be a bool, got 1 \\(int\\)"):
        gacd_fast.GACDLoss(4, 4, num_data=10, symmetric=1)
