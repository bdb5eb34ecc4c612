"""Offline datasets as numpy arrays (images NCHW float32 in [0, 1], labels int64).

Nothing downloads: Fashion-MNIST comes from Debian's `dataset-fashion-mnist`; the other sets are
read from a data folder (`$EDGEPRUNE_DATA`, else `../shared/data` next to the checkout).
"""

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgepruneError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.y_test.max()) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1,) + tuple(self.x_test.shape[1:])


def data_root() -> Path:
    env = os.environ.get("EDGEPRUNE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise EdgepruneError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise EdgepruneError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(dims)


def _require(path: Path, how: str) -> Path:
    if not path.exists():
        raise EdgepruneError(f"dataset file {path} is missing ({how})")
    return path


def _images(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)[:, None, :, :]


def fashion_mnist() -> Dataset:
    how = "install it with `make setup` (Debian package dataset-fashion-mnist)"
    d = FASHION_MNIST_DIR
    return Dataset(
        "fashion-mnist",
        _images(read_idx(_require(d / "train-images-idx3-ubyte.gz", how))),
        read_idx(_require(d / "train-labels-idx1-ubyte.gz", how)).astype(np.int64),
        _images(read_idx(_require(d / "t10k-images-idx3-ubyte.gz", how))),
        read_idx(_require(d / "t10k-labels-idx1-ubyte.gz", how)).astype(np.int64),
    )


def mnist_test() -> Dataset:
    """MNIST's 10k test set only (no train split is shipped offline); for evaluation."""
    d = data_root() / "mnist"
    how = "set EDGEPRUNE_DATA to the folder holding mnist/"
    x = _images(read_idx(_require(d / "t10k-images-idx3-ubyte.gz", how)))
    y = read_idx(_require(d / "t10k-labels-idx1-ubyte.gz", how)).astype(np.int64)
    return Dataset("mnist", None, None, x, y)


def _ucr(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(_require(path, "set EDGEPRUNE_DATA to the folder holding it"))
    labels = rows[:, 0]
    classes = np.unique(labels)
    y = np.searchsorted(classes, labels).astype(np.int64)
    return rows[:, None, None, 1:].astype(np.float32), y


def ecg200() -> Dataset:
    d = data_root() / "ecg200"
    xtr, ytr = _ucr(d / "ECG200_TRAIN.txt")
    xte, yte = _ucr(d / "ECG200_TEST.txt")
    return Dataset("ecg200", xtr, ytr, xte, yte)


LOADERS = {"fashion-mnist": fashion_mnist, "mnist": mnist_test, "ecg200": ecg200}


def load(name: str) -> Dataset:
    if name not in LOADERS:
        raise EdgepruneError(f"unknown dataset '{name}'; known: {', '.join(sorted(LOADERS))}")
    return LOADERS[name]()
