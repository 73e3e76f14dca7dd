"""Datasets and loaders: scikit-learn digits, Fashion-MNIST (IDX files), CIFAR-10/100 (pickle format), ImageFolder,
synthetic.

Every dataset is described by one :class:`DataConfig` (plain values, built from the Hydra ``data`` group).
:func:`build_loaders` returns the train/val loaders (and a test loader where the dataset has a held-out test set
that is not the validation set: Fashion-MNIST) plus the Mixup/CutMix function and the loss that fit
the augmentation choice, so the trainer never needs to know which dataset it trains on.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dynadiag.distributed import rank_seed
from dynadiag.extras import require

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataConfig",
    "DatasetNotFoundError",
    "build_datasets",
    "build_loaders",
    "build_test_dataset",
]

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetNotFoundError(ValueError):
    """The dataset's files are not where the config says; the message says how to get them."""


@dataclass
class DataConfig:
    """What to load and how to augment it. ``img_size``/``in_chans``/``num_classes``/``patch_size`` are read
    by the model config too, so every model runs on every dataset."""

    name: str = "digits"
    root: str = "data"
    download: bool = False
    img_size: int = 16
    in_chans: int = 1
    num_classes: int = 10
    patch_size: int = 4
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    val_fraction: float = 0.2  # digits/synthetic: held-out share (stratified for digits)
    split_seed: int = 0  # the split never changes with the training seed, so seeds are comparable
    num_folds: int = 0  # digits: > 1 = stratified k-fold cross-validation (val_fraction is then unused)
    fold: int = 0  # digits: which of the num_folds folds is the validation set
    # augmentation
    random_crop_padding: int = 0  # tensor datasets: random translation by up to this many pixels
    hflip: float = 0.0
    auto_augment: str | None = None  # imagenet: timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0  # imagenet: random erasing probability
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    # synthetic: sizes of the generated sets; fashion_mnist: num_val = validation images held out of the 60,000
    num_train: int = 512
    num_val: int = 128

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset '{self.name}'; choose one of {list(DATASETS)}")
        for field in ("img_size", "in_chans", "num_classes", "batch_size", "eval_batch_size"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"data.{field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.num_folds == 1 or self.num_folds < 0:
            raise ValueError(f"data.num_folds must be 0 (one held-out split) or >= 2, got {self.num_folds}")
        if self.num_folds and not 0 <= self.fold < self.num_folds:
            raise ValueError(f"data.fold must be in [0, {self.num_folds}), got {self.fold}")


@dataclass
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: ResumableSampler
    mixup_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    train_loss: nn.Module
    num_classes: int
    #: the held-out test set (evaluated once, after training) where the dataset has one apart from validation
    test_loader: DataLoader | None = None


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also used with one process) whose order depends only on ``seed`` and the epoch,
    and which can start an epoch part-way through (:meth:`skip`), for exact mid-epoch resume."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip(self, num_samples: int) -> None:
        """Drop the first ``num_samples`` indices of the next epoch's order (this epoch only)."""
        self._skip = int(num_samples)

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class TensorImageDataset(Dataset):
    """Images already in memory as a float tensor ``[N, C, H, W]``, with optional random translation/flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 0, hflip: float = 0.0) -> None:
        self.images, self.labels = images, labels.long()
        self.padding, self.hflip = int(padding), float(hflip)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]  # [C, H, W]
        if self.padding > 0:
            h, w = x.shape[-2:]
            x = F.pad(x, [self.padding] * 4)
            top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
            x = x[:, top : top + h, left : left + w]
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            x = x.flip(-1)
        return x, self.labels[i]


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:  # [N, C, H, W] -> [N, C, size, size]
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _digits(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    sklearn_datasets = require("sklearn.datasets", "scikit-learn", "the digits data set (data=digits)")
    from sklearn.model_selection import train_test_split

    digits = sklearn_datasets.load_digits()  # 1,797 real 8x8 images with values 0..16, bundled with scikit-learn
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.long)
    x = _resize(x, cfg.img_size)
    if cfg.in_chans != 1:
        x = x.expand(-1, cfg.in_chans, -1, -1).contiguous()
    mean, std = x.mean().item(), x.std().item()
    x = (x - mean) / std
    if cfg.num_folds:
        # Stratified k-fold: over the folds every image is validated exactly once, so k runs see all the data.
        from sklearn.model_selection import StratifiedKFold

        folds = StratifiedKFold(n_splits=cfg.num_folds, shuffle=True, random_state=cfg.split_seed)
        idx_train, idx_val = list(folds.split(np.zeros(len(y)), y.numpy()))[cfg.fold]
    else:
        idx_train, idx_val = train_test_split(
            np.arange(len(y)), test_size=cfg.val_fraction, stratify=y.numpy(), random_state=cfg.split_seed
        )
    train = TensorImageDataset(x[idx_train], y[idx_train], cfg.random_crop_padding, cfg.hflip)
    val = TensorImageDataset(x[idx_val], y[idx_val])
    return train, val


def _synthetic(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Class-conditional Gaussian images: learnable, so smoke runs can show the loss going down."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
    means = torch.randn(cfg.num_classes, *shape, generator=g)

    def make(n: int) -> TensorImageDataset:
        y = torch.randint(0, cfg.num_classes, (n,), generator=g)
        return TensorImageDataset(means[y] + 2.0 * torch.randn(n, *shape, generator=g), y)

    return make(cfg.num_train), make(cfg.num_val)


def read_cifar(root: str, num_classes: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read the python-pickle CIFAR format (``cifar-10-batches-py`` / ``cifar-100-python``).

    Returns:
        images ``[N, 32, 32, 3]`` uint8 and labels ``[N]`` int64.
    """
    if num_classes == 10:
        folder, files, key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        if not train:
            files = ["test_batch"]
    else:
        folder, files, key = "cifar-100-python", ["train" if train else "test"], b"fine_labels"
    base = os.path.join(root, folder)
    missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-{num_classes} not found: {base} lacks {', '.join(missing)}; run with data.download=true "
            f"(needs a network) or extract the python version of the dataset into {root}"
        )
    images, labels = [], []
    for f in files:
        with open(os.path.join(base, f), "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[key])
    return np.concatenate(images).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def _cifar(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    if cfg.download:
        from torchvision import datasets

        (datasets.CIFAR10 if cfg.num_classes == 10 else datasets.CIFAR100)(cfg.root, train=True, download=True)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if cfg.num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    out = []
    for train in (True, False):
        images, labels = read_cifar(cfg.root, cfg.num_classes, train)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, 32, 32]
        x = _normalize(_resize(x, cfg.img_size), mean, std)
        if train:
            out.append(TensorImageDataset(x, torch.from_numpy(labels), cfg.random_crop_padding, cfg.hflip))
        else:
            out.append(TensorImageDataset(x, torch.from_numpy(labels)))
    return out[0], out[1]


def _imagenet(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    dirs = {split: os.path.join(cfg.root, split) for split in ("train", "val")}
    for split, path in dirs.items():
        if not os.path.isdir(path):
            raise DatasetNotFoundError(
                f"ImageNet {split} split not found at {path}: put the ILSVRC-2012 images there in ImageFolder "
                f"layout ({split}/<class>/<image>.JPEG) and set data.root"
            )
    common = dict(input_size=(cfg.in_chans, cfg.img_size, cfg.img_size), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train_tf = create_transform(
        **common,
        is_training=True,
        auto_augment=cfg.auto_augment,
        re_prob=cfg.re_prob,
        hflip=cfg.hflip,
        interpolation=cfg.interpolation,
    )
    val_tf = create_transform(**common, is_training=False, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
    return ImageFolder(dirs["train"], transform=train_tf), ImageFolder(dirs["val"], transform=val_tf)


def _fashion_images(images: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> normalised float ``[N, in_chans, img_size, img_size]``."""
    from dynadiag.fashion_mnist import FASHION_MEAN, FASHION_STD

    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)  # [N, 1, 28, 28]
    x = _resize(x, cfg.img_size).sub_(FASHION_MEAN).div_(FASHION_STD)
    return x.expand(-1, cfg.in_chans, -1, -1).contiguous() if cfg.in_chans != 1 else x


def _fashion_mnist(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The fixed stratified train/validation split of the 60,000 training images (the test set stays apart)."""
    from dynadiag.fashion_mnist import load_split, stratified_split

    images, labels = load_split(cfg.root, "train")
    idx_train, idx_val = stratified_split(labels, cfg.num_val, cfg.split_seed)
    x, y = _fashion_images(images, cfg), torch.from_numpy(labels)
    train = TensorImageDataset(x[idx_train], y[idx_train], cfg.random_crop_padding, cfg.hflip)
    return train, TensorImageDataset(x[idx_val], y[idx_val])


def build_test_dataset(cfg: DataConfig) -> Dataset | None:
    """The held-out test set, for datasets that have one apart from the validation set (Fashion-MNIST's 10,000
    test images); ``None`` otherwise (CIFAR and ImageNet validate on their test/val split, digits on a held-out
    share)."""
    if cfg.name != "fashion_mnist":
        return None
    from dynadiag.fashion_mnist import load_split

    images, labels = load_split(cfg.root, "test")
    return TensorImageDataset(_fashion_images(images, cfg), torch.from_numpy(labels))


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Return ``(train, val)`` datasets yielding ``(image [C, H, W] float, label int)``."""
    if cfg.name == "digits":
        return _digits(cfg)
    if cfg.name == "fashion_mnist":
        return _fashion_mnist(cfg)
    if cfg.name == "synthetic":
        return _synthetic(cfg)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    return _imagenet(cfg)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the main process: Slurm signals every process of a job, and a worker
    killed mid-step would crash the loop before the trainer can checkpoint (:mod:`dynadiag.preemption`)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_loaders(cfg: DataConfig, seed: int = 0, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Build the loaders. With ``world_size > 1`` each rank reads its own shard (``DistributedSampler``) and
    ``batch_size`` is the per-rank batch."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    train_ds, val_ds = build_datasets(cfg)
    if len(train_ds) < cfg.batch_size * world_size:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} x {world_size} rank(s) exceeds the {len(train_ds)} training images"
        )
    sampler = ResumableSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    loader_kw: dict[str, Any] = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    if cfg.num_workers > 0:
        loader_kw["worker_init_fn"] = _ignore_stop_signals
    # drop_last: every step sees a full batch, so steps per epoch is fixed and a resumed run can skip exactly
    # Own generators: creating a loader iterator draws a worker base seed, which must not move the global RNG
    # (it drives augmentation), or a run resumed mid-epoch would diverge from an uninterrupted one.
    # Per rank: the workers' seeds come from this generator, so each rank augments with its own stream.
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(rank_seed(seed, rank)),
        **loader_kw,
    )
    val_sampler = DistributedSampler(val_ds, world_size, rank, shuffle=False) if world_size > 1 else None
    val_loader = DataLoader(
        val_ds,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        sampler=val_sampler,
        generator=torch.Generator().manual_seed(seed),
        **loader_kw,
    )
    test_ds, test_loader = build_test_dataset(cfg), None
    if test_ds is not None:
        test_sampler = DistributedSampler(test_ds, world_size, rank, shuffle=False) if world_size > 1 else None
        test_loader = DataLoader(
            test_ds,
            batch_size=cfg.eval_batch_size,
            shuffle=False,
            sampler=test_sampler,
            generator=torch.Generator().manual_seed(seed),
            num_workers=cfg.num_workers,
        )
    mixup_fn = None
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            label_smoothing=cfg.label_smoothing,
            num_classes=cfg.num_classes,
        )
        loss: nn.Module = SoftTargetCrossEntropy()
    elif cfg.label_smoothing > 0:
        loss = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    else:
        loss = nn.CrossEntropyLoss()
    return DataBundle(train_loader, val_loader, sampler, mixup_fn, loss, cfg.num_classes, test_loader)
