"""Evaluation: clean / FGSM / PGD-20 / CW-inf (and optionally AutoAttack) accuracy, the structure
of the features against the teacher's (linear CKA, 10-NN agreement), a linear probe on the frozen
features (same task: the feature-only transfer), and a transfer probe (a second task, with the
CKA of its features to the teacher's there)."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import FGSM, PGD
from ..attacks import logits_of
from .cka import linear_cka
from .data import ImageDataset, iterate
from .structure import KNN_K, knn_agreement
from .train import bar


def cw_margin(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """CW's margin loss to maximise: best other logit minus the true one (mean over the batch)."""
    z = logits_of(output)
    true = z.gather(1, targets[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(targets, z.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true).mean()


def attack_suite(model: nn.Module, eps: float, alpha: float, pgd_steps: int = 20, cw_steps: int = 30,
                 seed: int = 0, device: torch.device | str = "cpu") -> dict[str, Callable | None]:
    """name -> attack (None for clean): FGSM, PGD-``pgd_steps``, CW-inf (PGD-``cw_steps`` on the margin)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {
        "clean": None,
        "fgsm": FGSM(model, eps),
        f"pgd{pgd_steps}": PGD(model, eps, alpha, pgd_steps, generator=gen),
        "cw": PGD(model, eps, alpha, cw_steps, loss=cw_margin, generator=gen),
    }


def robust_accuracy(model: nn.Module, data: ImageDataset, *, eps: float, alpha: float, pgd_steps: int = 20,
                    cw_steps: int = 30, batch_size: int = 256, device: torch.device | str = "cpu",
                    seed: int = 0, progress: bool = False, desc: str = "") -> dict[str, float]:
    """Accuracy under each attack of :func:`attack_suite` (model in eval mode)."""
    model.eval()
    attacks = attack_suite(model, eps, alpha, pgd_steps, cw_steps, seed, device)
    correct = {k: 0 for k in attacks}
    n_batches = (len(data) + batch_size - 1) // batch_size
    with bar(total=n_batches * len(attacks), desc=desc or "attacks", unit="attack", leave=False, progress=progress) as pb:
        for x, y, _ in iterate(data, batch_size, device=device):
            for name, atk in attacks.items():
                pb.set_postfix_str(name, refresh=False)
                xa = x if atk is None else atk(x, y)
                with torch.no_grad():
                    correct[name] += int((logits_of(model(xa)).argmax(1) == y).sum())
                pb.update(1)
    return {k: v / max(1, len(data)) for k, v in correct.items()}


def eps_grid(eps: float, points: int) -> list[float]:
    """``points`` radii evenly from 0 to 1.5 x ``eps`` (the robust-accuracy-vs-eps sweep)."""
    if points <= 0:
        return []
    if points == 1:
        return [float(eps)]
    return [1.5 * eps * i / (points - 1) for i in range(points)]


def eps_sweep(models: dict[str, nn.Module], data: ImageDataset, eps_values: list[float], *, steps: int = 20,
              batch_size: int = 256, device: torch.device | str = "cpu", seed: int = 0,
              progress: bool = False) -> dict[str, list[float]]:
    """name -> PGD-``steps`` accuracy at each radius of ``eps_values`` (step eps/4; eps 0: clean)."""
    out: dict[str, list[float]] = {}
    with bar(total=len(models) * len(eps_values), desc="eps sweep", unit="point", progress=progress) as pb:
        for name, model in models.items():
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            accs = []
            for e in eps_values:
                gen = torch.Generator(device=device).manual_seed(seed)
                atk = PGD(model, e, e / 4, steps, generator=gen) if e > 0 else None
                correct = 0
                for x, y, _ in iterate(data, batch_size, device=device):
                    xa = x if atk is None else atk(x, y)
                    with torch.no_grad():
                        correct += int((logits_of(model(xa)).argmax(1) == y).sum())
                accs.append(correct / max(1, len(data)))
                pb.update(1)
            out[name] = accs
    return out


@torch.no_grad()
def features_of(model: nn.Module, data: ImageDataset, *, batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features [N, D], labels [N]) on the CPU."""
    model.eval()
    fs, ys = [], []
    for x, y, _ in iterate(data, batch_size, device=device):
        fs.append(model(x)[0].float().cpu())
        ys.append(y.cpu())
    return torch.cat(fs), torch.cat(ys)


class Probed(nn.Module):
    """Frozen backbone + linear probe: (features, probe logits); attacks go through both."""

    def __init__(self, backbone: nn.Module, probe: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.backbone, self.probe = backbone, probe
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)[0]
        return f, self.probe((f - self.mean) / self.std)


def linear_probe(backbone: nn.Module, train: ImageDataset, test: ImageDataset, *, epochs: int = 60, eps: float,
                 alpha: float, pgd_steps: int = 20, batch_size: int = 256, device: torch.device | str = "cpu",
                 seed: int = 0, prefix: str = "transfer") -> dict[str, float]:
    """Train a linear classifier on the frozen backbone's (standardised) features of ``train``;
    report its clean and PGD accuracy on ``test`` (the attack goes through backbone and probe) as
    ``{prefix}_clean`` and ``{prefix}_pgd{pgd_steps}``."""
    ftr, ytr = features_of(backbone, train, batch_size=batch_size, device=device)
    mean, std = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    ftr = (ftr - mean) / std
    torch.manual_seed(seed)
    probe = nn.Linear(ftr.shape[1], test.num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(ftr.shape[0], generator=gen)
        for s in range(0, ftr.shape[0], 256):
            i = perm[s:s + 256]
            loss = F.cross_entropy(probe(ftr[i]), ytr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model = Probed(backbone, probe, mean, std).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    accs = robust_accuracy(model, test, eps=eps, alpha=alpha, pgd_steps=pgd_steps, cw_steps=0,
                           batch_size=batch_size, device=device, seed=seed)
    return {f"{prefix}_clean": accs["clean"], f"{prefix}_pgd{pgd_steps}": accs[f"pgd{pgd_steps}"]}


class _Logits(nn.Module):
    """A (features, logits) model seen as a logits-only one (what torchattacks expects)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def autoattack_accuracy(model: nn.Module, data: ImageDataset, *, eps: float, n: int, batch_size: int = 256,
                        device: torch.device | str = "cpu", seed: int = 0) -> tuple[float, int]:
    """(accuracy under AutoAttack, standard version, L-inf ``eps``; images used): torchattacks'
    AutoAttack (APGD-CE, APGD-T, FAB-T, Square) on the first ``n`` images of a seeded permutation
    of ``data``."""
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError("AutoAttack needs torchattacks: pip install --no-deps torchattacks==3.5.1 (`make` installs it)") from e
    subset = data.subset(n, seed)
    wrapped = _Logits(model).to(device).eval()
    atk = torchattacks.AutoAttack(wrapped, norm="Linf", eps=eps, version="standard", n_classes=data.num_classes, seed=seed)
    correct = 0
    for x, y, _ in iterate(subset, batch_size, device=device):
        x_adv = atk(x, y)
        with torch.no_grad():
            correct += int((wrapped(x_adv).argmax(1) == y).sum())
    return correct / max(1, len(subset)), len(subset)


def evaluate_models(
    models: dict[str, nn.Module],
    test: ImageDataset,
    *,
    teacher: nn.Module | None,
    eps: float,
    alpha: float,
    pgd_steps: int = 20,
    cw_steps: int = 30,
    transfer: tuple[ImageDataset, ImageDataset] | None = None,
    probe_epochs: int = 60,
    probe_eps: float | None = None,
    probe_train: ImageDataset | None = None,
    feature_probe_eps: float | None = None,
    autoattack: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One result row per model: accuracies (clean, fgsm, pgd, cw; "autoattack" on ``autoattack``
    test images when > 0), the structure of its penultimate test features against the teacher's
    ("cka": linear CKA; "knn_agree": the 10-nearest-neighbour agreement of
    :func:`.structure.knn_agreement`; None without a teacher), the same-task linear probe's
    clean/PGD accuracy on the frozen features ("probe_*", when ``probe_train`` is given; PGD at
    ``feature_probe_eps``) and the transfer probe's ("transfer_*", with "transfer_cka" on the
    transfer task's test images)."""
    pe = eps if probe_eps is None else probe_eps
    t_feats = features_of(teacher, test, batch_size=batch_size, device=device)[0] if teacher is not None else None
    t_transfer = (features_of(teacher, transfer[1], batch_size=batch_size, device=device)[0]
                  if teacher is not None and transfer is not None else None)
    rows = []
    for name, model in bar(models.items(), total=len(models), desc="evaluate", unit="model", progress=progress):
        t0 = time.time()
        for p in model.parameters():
            p.requires_grad_(False)  # attacks need input gradients only
        row: dict[str, Any] = {"model": name}
        row.update(robust_accuracy(model, test, eps=eps, alpha=alpha, pgd_steps=pgd_steps, cw_steps=cw_steps,
                                   batch_size=batch_size, device=device, seed=seed, progress=progress, desc=name))
        if autoattack > 0:
            row["autoattack"], row["autoattack_n"] = autoattack_accuracy(
                model, test, eps=eps, n=autoattack, batch_size=batch_size, device=device, seed=seed)
        row["cka"] = row["knn_agree"] = None
        if t_feats is not None:
            feats = features_of(model, test, batch_size=batch_size, device=device)[0]
            row["cka"] = linear_cka(feats, t_feats)
            row["knn_agree"] = knn_agreement(feats, t_feats, k=min(KNN_K, len(test) - 1))
        if probe_train is not None:
            fe = pe if feature_probe_eps is None else feature_probe_eps
            row.update(linear_probe(model, probe_train, test, epochs=probe_epochs, eps=fe, alpha=fe / 4,
                                    pgd_steps=pgd_steps, batch_size=batch_size, device=device, seed=seed, prefix="probe"))
        if transfer is not None:
            row.update(linear_probe(model, transfer[0], transfer[1], epochs=probe_epochs, eps=pe, alpha=pe / 4,
                                    pgd_steps=pgd_steps, batch_size=batch_size, device=device, seed=seed))
            if t_transfer is not None:
                row["transfer_cka"] = linear_cka(features_of(model, transfer[1], batch_size=batch_size,
                                                             device=device)[0], t_transfer)
        row["eval_s"] = round(time.time() - t0, 2)
        log(f"[eval] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "eval_s")
            + f" ({row['eval_s']:.1f}s)")
        rows.append(row)
    return rows
