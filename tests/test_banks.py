"""The negative-bank interface (gacd_fast.memory) and how GACDLoss uses it: each kind learns on a
tiny problem, prefill is exact, stored rows are validated (nothing written on a bad call)."""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gacd_fast import GACDLoss
from gacd_fast.memory import BatchNegatives, FeatureQueue, MemoryBank, NegativeBank

BANK_KINDS = ("memory", "queue", "batch")


@pytest.mark.parametrize("bank", BANK_KINDS)
def test_every_kind_implements_the_interface(bank):
    crit = GACDLoss(6, 5, num_data=20, embed_dim=4, num_negatives=7, bank=bank, weighting="none")
    assert isinstance(crit.bank_t, NegativeBank) and crit.bank_t.kind == bank
    keys = F.normalize(torch.randn(3, 4), dim=1)
    rows, neg_index = crit.bank_t.negatives(keys, torch.tensor([0, 5, 9]))
    assert rows.shape[1] == 4
    if neg_index is not None:
        assert neg_index.shape[0] == 3 and int(neg_index.max()) < rows.shape[0]


@pytest.mark.slow
@pytest.mark.parametrize("bank", BANK_KINDS)
def test_each_kind_learns_on_a_tiny_problem(bank):
    """GACD loss alone: a student learns a fixed teacher's features; the loss falls over a few steps
    for every bank kind with the default frozen teacher head (the trained head degenerated)."""
    torch.manual_seed(0)
    n, dim = 96, 16
    x = torch.randn(n, dim)
    teacher = torch.nn.Linear(dim, 12)
    student = torch.nn.Linear(dim, 10)
    crit = GACDLoss(10, 12, num_data=n, embed_dim=8, num_negatives=32, bank=bank, weighting="none", temperature=0.2)
    with torch.no_grad():
        crit.prefill(teacher(x), torch.arange(n))
    opt = torch.optim.Adam(list(student.parameters()) + list(crit.parameters()), lr=1e-2)
    losses = []
    for step in range(40):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(step))[:32]
        with torch.no_grad():
            f_t = teacher(x[idx])
        loss = crit(student(x[idx]), f_t, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (bank, first, last)


def test_frozen_teacher_head_keeps_memory_exact():
    """With the frozen head, a prefilled memory row equals the teacher embedding the loss uses."""
    crit = GACDLoss(6, 5, num_data=10, embed_dim=4, num_negatives=3, weighting="none")
    f_t = torch.randn(10, 5)
    crit.prefill(f_t, torch.arange(10))
    torch.testing.assert_close(crit.bank_t.rows, crit.embed_t(f_t))
    before = crit.embed_t.linear.weight.clone()
    crit(torch.randn(4, 6, requires_grad=True), f_t[:4], torch.arange(4)).backward()
    assert crit.embed_t.linear.weight.grad is None and torch.equal(crit.embed_t.linear.weight, before)
    crit.bank_t.update(crit.embed_t(f_t[:4]), torch.arange(4))  # momentum of an exact row with itself
    torch.testing.assert_close(crit.bank_t.rows, crit.embed_t(f_t))


def test_queue_prefill_keeps_the_last_rows():
    q = FeatureQueue(4, 3)
    v = F.normalize(torch.randn(6, 3), dim=1)
    q.prefill(v)
    assert torch.equal(q.rows, v[2:]) and int(q.ptr) == 0  # the last 4 rows, written from slot 0


def test_sample_contrast_index_is_crd_format():
    crit = GACDLoss(6, 5, num_data=30, embed_dim=4, num_negatives=9, weighting="none")
    idx = torch.tensor([3, 0, 29])
    ci = crit.sample_contrast_index(idx)
    assert ci.shape == (3, 10) and torch.equal(ci[:, 0], idx)
    assert not (ci[:, 1:] == idx[:, None]).any(), "a sample's own row is never its negative"
    assert GACDLoss(6, 5, embed_dim=4, num_negatives=9, bank="queue", weighting="none").sample_contrast_index(idx) is None


@pytest.mark.parametrize("bank", ("memory", "queue"))
def test_non_finite_rows_are_refused_and_nothing_is_written(bank):
    """issue 11 row 5: one NaN batch must not poison the bank forever."""
    crit = GACDLoss(6, 5, num_data=20, embed_dim=8, num_negatives=7, bank=bank, weighting="none")
    before = {k: v.clone() for k, v in crit.bank_t.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        crit(torch.randn(4, 6), torch.full((4, 5), float("nan")), torch.arange(4))
    for k, v in crit.bank_t.state_dict().items():
        assert torch.equal(v, before[k]), k
    loss = crit(torch.randn(4, 6), torch.randn(4, 5), torch.arange(4))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("call,exc,match", [
    (lambda b: b.update(torch.randn(4), torch.arange(1)), ValueError, "keys"),  # [D] would broadcast over rows
    (lambda b: b.update(torch.ones(2, 4, dtype=torch.int64), torch.arange(2)), TypeError, "keys"),
    (lambda b: b.update(torch.ones(2, 4, dtype=torch.complex64), torch.arange(2)), TypeError, "keys"),
    (lambda b: b.update(torch.randn(2, 3), torch.arange(2)), ValueError, "keys"),
    (lambda b: b.update(torch.randn(2, 4), torch.tensor([0, 10])), IndexError, "index"),
    (lambda b: b.update(torch.randn(2, 4), torch.tensor([0.0, 1.0])), TypeError, "index"),
    (lambda b: b.update(torch.randn(2, 4), [0, 1]), TypeError, "index"),
    (lambda b: b.update(torch.randn(2, 4), torch.arange(3)), ValueError, "index"),
    (lambda b: b.sample_negatives(torch.tensor([10]), 3), IndexError, "index"),
    (lambda b: b.sample_negatives(torch.tensor([1]), 0), ValueError, "k"),
])
def test_memory_bank_direct_calls_are_checked(call, exc, match):
    """issue 11 row 11: MemoryBank's own methods validate like the functional API."""
    bank = MemoryBank(10, 4)
    before = bank.rows.clone()
    with pytest.raises(exc, match=match):
        call(bank)
    assert torch.equal(bank.rows, before)


def test_memory_bank_accepts_int32_index():
    bank = MemoryBank(10, 4, momentum=0.0)
    v = F.normalize(torch.randn(2, 4), dim=1)
    bank.update(v, torch.tensor([3, 7], dtype=torch.int32))
    torch.testing.assert_close(bank.rows[[3, 7]], v)
    assert bank.sample_negatives(torch.tensor([1], dtype=torch.int32), 5).dtype == torch.int64


@pytest.mark.parametrize("values,exc", [
    (torch.randn(4), ValueError), (torch.ones(2, 4, dtype=torch.int64), TypeError), (torch.randn(2, 5), ValueError),
    (torch.tensor([[float("inf")] * 4]), ValueError),
])
def test_feature_queue_enqueue_is_checked(values, exc):
    q = FeatureQueue(6, 4)
    before = q.rows.clone()
    with pytest.raises(exc, match="values"):
        q.enqueue(values)
    assert torch.equal(q.rows, before) and int(q.ptr) == 0


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(symmetric="no"), TypeError, "symmetric"),
    (dict(backend="bogus"), ValueError, "bogus"),
    (dict(backend=3), TypeError, "backend"),
    (dict(teacher_head="ema"), ValueError, "teacher_head"),
    (dict(temperature=1e-300), ValueError, "temperature"),
])
def test_constructor_rejects_bad_options(kwargs, exc, match):
    """issue 11 row 14: bad options fail in the constructor, not at the first forward."""
    with pytest.raises(exc, match=match):
        GACDLoss(6, 5, num_data=20, **kwargs)


def test_update_bank_must_be_a_bool():
    crit = GACDLoss(6, 5, num_data=20, embed_dim=4, num_negatives=3, weighting="none")
    before = crit.bank_t.rows.clone()
    with pytest.raises(TypeError, match="update_bank"):
        crit(torch.randn(2, 6), torch.randn(2, 5), torch.arange(2), update_bank="no")
    assert torch.equal(crit.bank_t.rows, before)


def test_index_as_list_is_a_type_error():
    crit = GACDLoss(6, 5, num_data=20, embed_dim=4, num_negatives=3, weighting="none")
    with pytest.raises(TypeError, match="index"):
        crit(torch.randn(2, 6), torch.randn(2, 5), [0, 1])


def test_batch_negatives_store_nothing():
    b = BatchNegatives()
    b.update(torch.randn(3, 4))
    assert not list(b.buffers())


def test_the_bank_registry_is_the_one_source_of_kinds():
    """BANKS (memory.py) holds the classes; GACDLoss's bank= and the CLI's --bank derive from it."""
    from gacd_fast.distill import config
    from gacd_fast.memory import BANKS

    assert BANKS == {"memory": MemoryBank, "queue": FeatureQueue, "batch": BatchNegatives}
    assert all(cls.kind == kind for kind, cls in BANKS.items())
    assert config.BANK_CHOICES == tuple(BANKS)
    with pytest.raises(ValueError, match=r"bank must be one of \['memory', 'queue', 'batch'\], got 'ring'"):
        GACDLoss(6, 5, num_data=20, bank="ring")
    for kind, cls in BANKS.items():
        bank = cls.from_options(num_data=20, dim=4, momentum=0.5, num_negatives=7, dtype=torch.bfloat16)
        assert type(bank) is cls and bank.rows_dtype in (None, torch.bfloat16)
    assert BANKS["queue"].from_options(num_data=None, dim=4, momentum=0.5, num_negatives=7,
                                       dtype=torch.float32).rows.shape == (7, 4)


class FeaturesAndLogits(torch.nn.Module):
    """A (features, logits) teacher with dropout and BatchNorm, so eval mode matters."""

    def __init__(self, dim_in: int = 6, width: int = 5) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(dim_in, width), torch.nn.BatchNorm1d(width),
                                        torch.nn.Dropout(0.5))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def _loader(x, batch=4):
    """(x, y, index) batches over ``x``, as a training loop's loader yields them."""
    n = x.shape[0]
    return [(x[i:i + batch], torch.zeros(min(batch, n - i), dtype=torch.long), torch.arange(i, min(i + batch, n)))
            for i in range(0, n, batch)]


@pytest.mark.parametrize("bank", BANK_KINDS)
def test_prefill_from_writes_the_teachers_embeddings_of_the_loader(bank):
    torch.manual_seed(0)
    n = 10
    x = torch.randn(n, 6)
    teacher = FeaturesAndLogits()
    teacher.train()
    teacher.body[1].eval()  # a mixed state, restored module by module
    crit = GACDLoss(4, 5, num_data=n, embed_dim=3, num_negatives=4, bank=bank, weighting="none")
    crit.prefill_from(teacher, _loader(x))
    assert teacher.training and teacher.body[0].training and not teacher.body[1].training
    with torch.no_grad():
        teacher.eval()
        want = crit.embed_t(teacher(x)[0])
    if bank == "memory":
        torch.testing.assert_close(crit.bank_t.rows, want)
    elif bank == "queue":  # the last num_negatives samples, in order
        torch.testing.assert_close(crit.bank_t.rows, want[-4:].roll(n % 4, 0))
    assert crit.bank_t.filled == (bank != "batch")
    assert not any(p.grad is not None for p in teacher.parameters())


def test_prefill_from_takes_a_features_only_teacher_and_moves_nothing_else():
    teacher = torch.nn.Linear(6, 5)
    crit = GACDLoss(4, 5, num_data=8, embed_dim=3, num_negatives=4, weighting="none")
    x = torch.randn(8, 6)
    crit.prefill_from(teacher, ((x[i:i + 3], None, torch.arange(i, min(i + 3, 8)), "contrast_idx") for i in (0, 3, 6)))
    torch.testing.assert_close(crit.bank_t.rows, crit.embed_t(teacher(x)).detach())


def test_prefill_from_refuses_bad_arguments():
    crit = GACDLoss(4, 5, num_data=8, embed_dim=3, num_negatives=4, weighting="none")
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module, got function"):
        crit.prefill_from(lambda x: x, [])
    with pytest.raises(ValueError, match=r"loader must yield \(x, y, index, \.\.\.\) batches; batch 0 is a tuple of 2"):
        crit.prefill_from(torch.nn.Linear(6, 5), [(torch.randn(2, 6), torch.zeros(2))])
    teacher = FeaturesAndLogits()
    with pytest.raises(IndexError, match="index"):  # the bank's own check: rows out of range
        crit.prefill_from(teacher, [(torch.randn(2, 6), None, torch.tensor([0, 8]))])
    assert teacher.training, "restored after an error too"


def _train_step(crit, n=6):
    crit(torch.randn(3, 4), torch.randn(3, 5), torch.arange(3) % n)


@pytest.mark.parametrize("bank", ["memory", "queue"])
def test_an_unfilled_bank_warns_once_when_training_starts(bank):
    crit = GACDLoss(4, 5, num_data=6, embed_dim=3, num_negatives=4, bank=bank, weighting="none")
    crit.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(crit)  # no update outside training: no warning
        crit(torch.randn(3, 4), torch.randn(3, 5), torch.arange(3), update_bank=False)
    crit.train()
    with pytest.warns(UserWarning, match=rf"unfilled {bank} bank.*crit.prefill_from\(teacher, loader\)") as record:
        _train_step(crit)
        _train_step(crit)
    assert len([w for w in record if "unfilled" in str(w.message)]) == 1, "once per loss object"


@pytest.mark.parametrize("how", ["prefill_from", "prefill", "load_state_dict", "batch bank", "crd", "train head"])
def test_a_filled_bank_or_a_bank_without_rows_does_not_warn(how):
    kwargs = dict(num_data=6, embed_dim=3, num_negatives=4, weighting="none")
    if how == "crd":
        crit = GACDLoss.from_crd_opt(SimpleNamespace(s_dim=4, t_dim=5, feat_dim=3, nce_k=4, nce_t=0.07, nce_m=0.5,
                                                     n_data=6))
    else:
        crit = GACDLoss(4, 5, bank="batch" if how == "batch bank" else "memory",
                        teacher_head="train" if how == "train head" else "frozen", **kwargs)
    if how == "prefill_from":
        crit.prefill_from(torch.nn.Linear(6, 5), _loader(torch.randn(6, 6)))
    elif how == "prefill":
        crit.prefill(torch.randn(6, 5), torch.arange(6))
    elif how == "load_state_dict":  # a resumed run's bank
        crit.load_state_dict(GACDLoss(4, 5, **kwargs).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(crit)
