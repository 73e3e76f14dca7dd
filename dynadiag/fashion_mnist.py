"""Fashion-MNIST from its four gzipped IDX files: reader, fixed stratified train/validation split, test set.

The files are the originals (``train-images-idx3-ubyte.gz`` ...), read directly: no download, no conversion.
Debian ships them as the package ``dataset-fashion-mnist`` under :data:`DEFAULT_ROOT`.

IDX format (big-endian): magic ``0x00 0x00 <dtype 0x08 = uint8> <ndim>``, then ``ndim`` uint32 sizes, then the
bytes. Images are ``ndim = 3`` (16-byte header: magic 2051, N, rows, cols), labels ``ndim = 1`` (8-byte header:
magic 2049, N).

Protocol: the 60,000 training images are split once into a stratified training set and a validation set of
``num_val`` images (``split_seed``, independent of the run's seed, so every run and method sees the same split);
the 10,000 test images are kept apart and evaluated once, at the end of a run.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from dynadiag.data import DatasetNotFoundError

__all__ = [
    "DEFAULT_ROOT",
    "FASHION_MEAN",
    "FASHION_STD",
    "FILES",
    "IDXFormatError",
    "load_split",
    "read_idx",
    "stratified_split",
]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
#: split -> (images file, labels file)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: statistics of the 60,000 training images (pixel values in [0, 1])
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
_MAGIC = {1: 2049, 3: 2051}  # ndim -> magic number of uint8 IDX files


class IDXFormatError(ValueError):
    """An IDX file is corrupt, truncated or not the expected kind; the message names the file."""


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read a gzipped (or plain) uint8 IDX file with ``ndim`` dimensions.

    Args:
        path: the ``.gz`` (or uncompressed) file.
        ndim: 3 for images, 1 for labels.

    Returns:
        uint8 array of the stored shape, e.g. ``[N, 28, 28]`` or ``[N]``.

    Raises:
        IDXFormatError: bad gzip stream, wrong magic number, or fewer/more bytes than the header announces.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; truncation is an EOFError
        raise IDXFormatError(f"{path} is not a readable gzip file ({exc}); reinstall or re-copy it") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte IDX header")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != _MAGIC[ndim]:
        raise IDXFormatError(f"{path} has magic number {magic}, expected {_MAGIC[ndim]} (uint8 IDX, {ndim}-D)")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise IDXFormatError(
            f"{path} holds {len(raw) - header} data bytes, its header announces {expected} "
            f"({' x '.join(map(str, dims))})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _paths(root: str, split: str) -> tuple[str, str]:
    paths = tuple(os.path.join(root, name) for name in FILES[split])
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        where = f"{root} lacks {', '.join(missing)}" if os.path.isdir(root) else f"{root} does not exist"
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: {where}; run `apt-get install dataset-fashion-mnist` (or `make fashion-data`) "
            "or point data.root at a folder holding the four standard .gz files"
        )
    return paths  # type: ignore[return-value]


def load_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64 of ``split`` (``train``: 60,000, ``test``: 10,000).

    Raises:
        DatasetNotFoundError: a file is missing (the message says how to install the data).
        IDXFormatError: a file is corrupt, or images and labels disagree in count or label range.
    """
    image_path, label_path = _paths(root, split)
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f"{image_path} holds {images.shape[0]} images but {label_path} {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{label_path} has label {labels.max()}; Fashion-MNIST labels are 0..9")
    return images, labels.astype(np.int64)


def stratified_split(labels: np.ndarray, num_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``, sorted, with ``num_val`` validation images in the classes' proportions (largest
    remainders), drawn by ``seed``: a pure function of the labels and the seed."""
    if not 0 < num_val < len(labels):
        raise ValueError(f"data.num_val must be in [1, {len(labels) - 1}] for {len(labels)} images, got {num_val}")
    classes, counts = np.unique(labels, return_counts=True)
    share = num_val * counts / len(labels)
    take = np.floor(share).astype(np.int64)
    take[np.argsort(-(share - take), kind="stable")[: num_val - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
