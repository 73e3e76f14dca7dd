"""Fashion-MNIST: the IDX reader on tiny files written here in the real format, the fixed stratified split, the test
set evaluated once at the end of a run, and one-line errors for missing or corrupt files."""

from __future__ import annotations

import functools
import gzip
import json
import os
import struct

import numpy as np
import pytest
import timm.optim
import torch

from dynadiag.data import DataConfig, DatasetNotFoundError, build_datasets, build_loaders
from dynadiag.fashion_mnist import (
    FASHION_MEAN,
    FASHION_STD,
    FILES,
    IDXFormatError,
    load_split,
    read_idx,
    stratified_split,
)
from dynadiag.loggers import build_logger
from dynadiag.lr_schedule import LRSchedule
from dynadiag.methods.base import SparseMethod
from dynadiag.models import create_model
from dynadiag.trainer import Trainer, TrainerConfig


def _idx_bytes(array: np.ndarray) -> bytes:
    """The uint8 IDX encoding: magic (0, 0, 0x08, ndim), big-endian uint32 sizes, then the bytes."""
    header = struct.pack(f">{1 + array.ndim}I", 0x0800 + array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: str, payload: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


def write_fashion(root: str, per_class_train: int = 6, per_class_test: int = 2, size: int = 28) -> dict:
    """The four standard files with random images; labels cycle through the 10 classes."""
    rng = np.random.default_rng(0)
    written = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, size=(len(labels), size, size), dtype=np.uint8)
        image_file, label_file = FILES[split]
        _write(os.path.join(root, image_file), _idx_bytes(images))
        _write(os.path.join(root, label_file), _idx_bytes(labels))
        written[split] = (images, labels)
    return written


def config(root: str, **kw) -> DataConfig:
    base = dict(name="fashion_mnist", root=root, img_size=28, patch_size=7, num_val=10, batch_size=10)
    return DataConfig(**{**base, **kw})


def test_read_idx_round_trips_images_and_labels(tmp_path):
    written = write_fashion(str(tmp_path))
    images, labels = load_split(str(tmp_path), "train")
    assert images.shape == (60, 28, 28) and labels.dtype == np.int64
    assert np.array_equal(images, written["train"][0]) and np.array_equal(labels, written["train"][1])
    assert read_idx(os.path.join(tmp_path, FILES["test"][1]), 1).shape == (20,)


def test_split_is_stratified_fixed_and_independent_of_the_run_seed(tmp_path):
    write_fashion(str(tmp_path))
    train, val = build_datasets(config(str(tmp_path)))
    assert len(train) == 50 and len(val) == 10
    assert torch.bincount(val.labels, minlength=10).tolist() == [1] * 10  # stratified
    a = build_loaders(config(str(tmp_path)), seed=0)
    b = build_loaders(config(str(tmp_path)), seed=7)
    assert torch.equal(a.val_loader.dataset.images, b.val_loader.dataset.images)  # the run seed does not move it
    other = build_loaders(config(str(tmp_path), split_seed=1), seed=0)
    assert not torch.equal(a.val_loader.dataset.images, other.val_loader.dataset.images)
    # training and validation images are disjoint and together are the 60 training images
    seen = torch.cat([train.images, val.images]).flatten(1)
    assert torch.unique(seen, dim=0).shape[0] == 60


def test_stratified_split_keeps_uneven_class_shares():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    train, val = stratified_split(labels, 30, seed=3)
    assert np.bincount(labels[val]).tolist() == [21, 6, 3] and len(train) == 70
    assert np.array_equal(val, stratified_split(labels, 30, seed=3)[1])
    with pytest.raises(ValueError, match=r"data\.num_val"):
        stratified_split(labels, 100, seed=0)


def test_test_set_is_separate_and_normalised(tmp_path):
    written = write_fashion(str(tmp_path))
    bundle = build_loaders(config(str(tmp_path)), seed=0)
    test = bundle.test_loader.dataset
    assert len(test) == 20 and test.images.shape == (20, 1, 28, 28)
    raw = written["test"][0][0, 3, 5]
    assert test.images[0, 0, 3, 5].item() == pytest.approx((raw / 255.0 - FASHION_MEAN) / FASHION_STD, abs=1e-5)
    assert build_loaders(DataConfig(name="synthetic", num_train=64), seed=0).test_loader is None


def test_missing_folder_or_file_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"does not exist.*apt-get install dataset-fashion-mnist"):
        build_datasets(config(str(tmp_path / "nowhere")))
    write_fashion(str(tmp_path))
    os.remove(os.path.join(tmp_path, FILES["train"][1]))
    with pytest.raises(DatasetNotFoundError, match=r"lacks train-labels-idx1-ubyte.gz.*data.root") as err:
        build_datasets(config(str(tmp_path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "holds 500 data bytes, its header announces 47040"),
        ("magic", "magic number 2049, expected 2051"),
        ("not_gzip", "not a readable gzip file"),
        ("cut_gzip", "not a readable gzip file"),
        ("header", "shorter than its 16-byte IDX header"),
    ],
)
def test_corrupt_files_give_one_clear_line(tmp_path, damage, message):
    write_fashion(str(tmp_path))
    path = os.path.join(tmp_path, FILES["train"][0])
    with gzip.open(path, "rb") as fh:
        payload = fh.read()
    if damage == "truncate":
        _write(path, payload[: 16 + 500])
    elif damage == "magic":
        _write(path, struct.pack(">I", 2049) + payload[4:])
    elif damage == "header":
        _write(path, payload[:10])
    elif damage == "not_gzip":
        with open(path, "wb") as fh:
            fh.write(payload)
    else:
        with open(path, "rb") as fh:
            packed = fh.read()
        with open(path, "wb") as fh:
            fh.write(packed[: len(packed) // 2])
    with pytest.raises(IDXFormatError, match=message) as err:
        build_datasets(config(str(tmp_path)))
    assert "\n" not in str(err.value) and path in str(err.value)


def test_labels_and_images_must_agree(tmp_path):
    write_fashion(str(tmp_path))
    _write(os.path.join(tmp_path, FILES["test"][1]), _idx_bytes(np.zeros(7, dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match=r"20 images but .* 7 labels"):
        load_split(str(tmp_path), "test")


def test_trainer_reports_the_test_split_once_at_the_end(tmp_path):
    os.makedirs(tmp_path / "data")
    write_fashion(str(tmp_path / "data"), per_class_train=4, per_class_test=3)
    data = build_loaders(config(str(tmp_path / "data"), batch_size=10), seed=0)  # 3 steps per epoch
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 10, 1, 28, 7, embed_dim=16, depth=1, num_heads=2)
    trainer = Trainer(
        model,
        SparseMethod(),
        functools.partial(timm.optim.create_optimizer_v2, opt="adamw", lr=1e-3),
        LRSchedule(warmup_epochs=0),
        data,
        TrainerConfig(epochs=2, progress="off", final_inference_iters=1, save_checkpoints=False),
        torch.device("cpu"),
        str(tmp_path),
        logger=build_logger(str(tmp_path), ["jsonl"]),
    )
    summary = trainer.fit()
    assert summary["test_images"] == 30 and 0.0 <= summary["test_top1"] <= 100.0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_top1"] == summary["test_top1"] and on_disk["val_top1_final"] is not None
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert sum("test/top1" in r for r in records) == 1  # evaluated once, after training
