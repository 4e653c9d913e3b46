"""The README's drop-in code, copied literally: each python block is run with tiny models and tiny
data defined around it (the names the README leaves to the reader: ``train_set``, ``student``,
``teacher``, ``loader``, RepDistiller's ``opt`` and batch tensors)."""
from __future__ import annotations

import re
import runpy
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(?P<indent>[ ]*)```python[ ]*$")

# The reader's side of the first drop-in block: (features, logits) models of the README's widths
# (512 and 640) on 3x4x4 images, 16 training samples, a loader of (x, y, index) batches.
PRELUDE = '''
import torch
from torch import nn

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, width), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


images, labels = torch.rand(16, 3, 4, 4), torch.arange(16) % 3
train_set = list(zip(images, labels))
student, teacher = Net(512), Net(640)
loader = [(images[i:i + 8], labels[i:i + 8], torch.arange(i, i + 8)) for i in (0, 8)]
'''


def python_blocks() -> list[tuple[str, str]]:
    """(heading, code) of every ```python block of the README, in order; the heading is the last
    markdown heading above the block, the code dedented (blocks inside bullets are indented)."""
    blocks, heading, lines = [], "", README.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            end = i + 1
            while lines[end].strip() != "```":
                end += 1
            blocks.append((heading, textwrap.dedent("\n".join(lines[i + 1:end]))))
            i = end
        elif lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        i += 1
    return blocks


def block(heading: str, number: int = 0, containing: str = "") -> str:
    """The ``number``-th python block under ``heading`` (that contains ``containing``)."""
    found = [code for h, code in python_blocks() if h == heading and containing in code]
    assert len(found) > number, f"README has no python block {number} under {heading!r} with {containing!r}"
    return found[number]


def dropin() -> str:
    return block("Drop it into an existing training loop")


def run_script(tmp_path: Path, code: str) -> dict:
    """Write ``code`` as a script and run it; its globals. A UserWarning that the bank is unfilled
    is an error here (the block must fill the bank before training)."""
    script = tmp_path / "dropin.py"
    script.write_text(code)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unfilled", category=UserWarning)
        return runpy.run_path(str(script))


@pytest.fixture(scope="module")
def dropin_run(tmp_path_factory) -> dict:
    """The globals of the first drop-in block run as a script (with the prelude)."""
    code = dropin()
    assert "prefill_from(teacher, loader)" in code, "the README's first block must fill the bank"
    return run_script(tmp_path_factory.mktemp("dropin"), PRELUDE + code)


@pytest.mark.slow
def test_the_first_dropin_block_runs_and_fills_the_bank(dropin_run):
    ns = dropin_run
    crit = ns["crit"]
    assert crit.bank_t.filled and torch.isfinite(ns["loss"]) and ns["loss"].dim() == 0
    assert ns["teacher"].training is False  # the block itself puts the teacher in eval mode


def test_the_bank_holds_the_teachers_embeddings_before_the_first_step(tmp_path):
    """The block up to its training loop: every memory row is the teacher's embedding of its sample,
    and the teacher's train/eval flag is as the reader left it (prefill_from restores it)."""
    code = dropin()
    head = code[:code.index("teacher.eval()")]
    ns = run_script(tmp_path, PRELUDE + head)
    crit, teacher = ns["crit"], ns["teacher"]
    assert teacher.training, "prefill_from restores the teacher's mode"
    teacher.eval()
    with torch.no_grad():
        want = crit.embed_t(teacher(ns["images"])[0])
    torch.testing.assert_close(crit.bank_t.rows, want)


@pytest.mark.slow
def test_without_the_prefill_line_the_block_warns(tmp_path):
    code = dropin()
    line = next(ln for ln in code.splitlines() if "prefill_from" in ln)
    with pytest.raises(UserWarning, match="unfilled memory bank"):
        run_script(tmp_path, PRELUDE + code.replace(line, ""))


@pytest.mark.slow
def test_the_guided_attack_snippet_runs_in_the_loop(dropin_run):
    """GACD's own attack, run after the first block with its last batch (x, y, index, f_t, t_logits)."""
    ns = dict(dropin_run)
    code = block("Drop it into an existing training loop", containing="guided")
    exec(compile(code, "README guided attack", "exec"), ns)
    assert torch.isfinite(ns["loss"]) and ns["loss"].dim() == 0 and ns["w"].shape == (8,)
    assert float((ns["x_adv"] - ns["x"]).abs().max()) <= 8 / 255 + 1e-6


def test_the_repdistiller_blocks_run():
    """The swap (from_crd_opt, CRDLoss's call) and the reweighting: train_student.py's line, then
    helper/loops.py's call with the teacher's logits and the labels."""
    heading = "RepDistiller (CRD): a drop-in for CRDLoss"
    torch.manual_seed(0)
    ns = dict(opt=SimpleNamespace(s_dim=12, t_dim=10, feat_dim=8, nce_k=5, nce_t=0.07, nce_m=0.5, n_data=20),
              f_s=torch.randn(4, 12), f_t=torch.randn(4, 10), index=torch.arange(4),
              contrast_idx=torch.randint(20, (4, 6)), logit_t=torch.randn(4, 3), target=torch.tensor([0, 1, 2, 0]))
    ns["contrast_idx"][:, 0] = ns["index"]
    exec(compile(block(heading, 0), "README swap", "exec"), ns)
    plain = ns["loss_kd"]
    assert ns["criterion_kd"].critic == "crd_nce" and torch.isfinite(plain)
    exec(compile(block(heading, 1), "README train_student.py", "exec"), ns)
    exec(compile(block(heading, 2), "README loops.py", "exec"), ns)
    assert ns["criterion_kd"].weighting == "confidence" and torch.isfinite(ns["loss_kd"])
