"""Loaders: digits, synthetic, CIFAR (real pickle format, written here), ImageFolder (real images), resumable order."""

from __future__ import annotations

import os
import pickle
import signal

import numpy as np
import pytest
import torch

from dynadiag.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataConfig,
    DatasetNotFoundError,
    ResumableSampler,
    build_datasets,
    build_loaders,
    read_cifar,
)


def test_digits_is_real_stratified_and_resized():
    train, val = build_datasets(DataConfig(name="digits", img_size=16, val_fraction=0.2))
    assert len(train) + len(val) == 1797 and len(val) == 360
    x, y = val[0]
    assert x.shape == (1, 16, 16) and 0 <= int(y) < 10
    # stratified: every class holds its share of the validation set (classes have 174-183 images)
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37
    # deterministic split, independent of the training seed
    _, val2 = build_datasets(DataConfig(name="digits", img_size=16))
    assert torch.equal(val.images, val2.images)


def test_digits_random_crop_translates():
    train, _ = build_datasets(DataConfig(name="digits", random_crop_padding=2))
    torch.manual_seed(0)
    views = torch.stack([train[0][0] for _ in range(8)])
    assert views.shape == (8, 1, 16, 16)
    assert not all(torch.equal(views[0], v) for v in views[1:])


def test_synthetic_loader_shapes_and_full_batches():
    cfg = DataConfig(name="synthetic", img_size=8, in_chans=3, patch_size=4, batch_size=16, num_train=50, num_val=20)
    bundle = build_loaders(cfg, seed=0)
    batches = list(bundle.train_loader)
    assert len(batches) == 3 and all(x.shape == (16, 3, 8, 8) for x, _ in batches)  # drop_last
    assert sum(len(y) for _, y in bundle.val_loader) == 20


class _SignalProbe(torch.utils.data.Dataset):
    """Reports, from inside a loader worker, whether SIGTERM and SIGUSR1 are ignored there."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1)]
        return torch.tensor(ignored)


def test_each_rank_seeds_its_own_loader_workers_and_workers_leave_signals_to_the_trainer():
    cfg = DataConfig(name="synthetic", img_size=8, batch_size=8, num_train=64, num_val=16, num_workers=1)
    loaders = [build_loaders(cfg, seed=5, rank=r, world_size=2).train_loader for r in (0, 1)]
    seeds = [loader.generator.initial_seed() for loader in loaders]
    assert seeds[0] == 5 and seeds[1] != 5  # rank 0 as a single process; rank 1 its own worker seeds
    probe = torch.utils.data.DataLoader(_SignalProbe(), num_workers=1, worker_init_fn=loaders[0].worker_init_fn)
    assert next(iter(probe)).tolist() == [[True, True]]


def _write_cifar(root: str, num_classes: int, n_train: int = 10, n_test: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    written = {}
    if num_classes == 10:
        folder = os.path.join(root, "cifar-10-batches-py")
        files = [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]
    else:
        folder = os.path.join(root, "cifar-100-python")
        files = [("train", n_train), ("test", n_test)]
    os.makedirs(folder)
    for name, n in files:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows: 1024 R, 1024 G, 1024 B
        labels = rng.integers(0, num_classes, size=n).tolist()
        entry = {b"batch_label": name.encode(), b"data": data, key: labels, b"filenames": [b"x.png"] * n}
        if num_classes == 100:
            entry[b"coarse_labels"] = [lab // 5 for lab in labels]
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(entry, fh)
        written[name] = data
    return written


def test_cifar10_reads_real_pickle_format(tmp_path):
    written = _write_cifar(str(tmp_path), 10)
    images, labels = read_cifar(str(tmp_path), 10, train=True)
    assert images.shape == (50, 32, 32, 3) and labels.shape == (50,)
    first = written["data_batch_1"][0]
    assert images[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]  # HWC from channel-planar rows
    assert images[0, 0, 1, 0] == first[1]
    cfg = DataConfig(name="cifar10", root=str(tmp_path), img_size=32, in_chans=3, num_classes=10, batch_size=8)
    train, test = build_datasets(cfg)
    assert len(train) == 50 and len(test) == 6
    x, _ = test[0]
    raw = written["test_batch"][0]
    expected_r00 = (raw[0] / 255.0 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]
    assert x.shape == (3, 32, 32) and x[0, 0, 0].item() == pytest.approx(expected_r00, abs=1e-5)


def test_cifar100_fine_labels(tmp_path):
    _write_cifar(str(tmp_path), 100, n_train=12)
    cfg = DataConfig(name="cifar100", root=str(tmp_path), img_size=16, in_chans=3, num_classes=100, batch_size=4)
    train, _ = build_datasets(cfg)
    assert len(train) == 12 and train[0][0].shape == (3, 16, 16)
    assert all(0 <= int(train.labels[i]) < 100 for i in range(12))


def test_missing_cifar_says_how_to_get_it(tmp_path):
    cfg = DataConfig(name="cifar10", root=str(tmp_path), img_size=32, in_chans=3, num_classes=10)
    with pytest.raises(DatasetNotFoundError, match=r"data\.download=true"):
        build_datasets(cfg)


def _write_image_folder(root: str, classes=("cat", "dog"), per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            os.makedirs(os.path.join(root, split, cls))
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, cls, f"{i}.JPEG"), format="JPEG")


def test_image_folder_with_deit_augmentation_and_mixup(tmp_path):
    _write_image_folder(str(tmp_path))
    cfg = DataConfig(
        name="imagenet",
        root=str(tmp_path),
        img_size=32,
        in_chans=3,
        num_classes=2,
        patch_size=16,
        batch_size=4,
        eval_batch_size=6,
        hflip=0.5,
        auto_augment="rand-m9-mstd0.5-inc1",
        re_prob=0.25,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
    )
    bundle = build_loaders(cfg, seed=0)
    train_ds = bundle.train_loader.dataset
    assert train_ds.classes == ["cat", "dog"] and len(train_ds) == 6
    images, labels = next(iter(bundle.train_loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    _, soft = bundle.mixup_fn(images, labels)
    assert soft.shape == (4, 2) and torch.allclose(soft.sum(1), torch.ones(4))
    assert bundle.train_loss(torch.randn(4, 2), soft).ndim == 0
    val_images, val_labels = next(iter(bundle.val_loader))
    assert val_images.shape == (6, 3, 32, 32) and sorted(val_labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_missing_image_folder_says_where(tmp_path):
    cfg = DataConfig(name="imagenet", root=str(tmp_path / "nope"), img_size=32, in_chans=3, num_classes=2)
    with pytest.raises(DatasetNotFoundError, match="ImageFolder layout"):
        build_datasets(cfg)


def test_resumable_sampler_skip_continues_the_same_order():
    data = list(range(20))
    a = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    a.set_epoch(2)
    full = list(a)
    b = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    b.set_epoch(2)
    b.skip(7)
    assert list(b) == full[7:]
    assert list(b) == full  # skipping applies to one epoch only
    a.set_epoch(3)
    assert list(a) != full


def test_bad_data_config_values():
    with pytest.raises(ValueError, match="unknown dataset"):
        DataConfig(name="mnist")
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="exceeds"):
        build_loaders(DataConfig(name="synthetic", num_train=8, batch_size=16))
