"""QuantModel persistence/validation, the golden model's exactness, and PTQ accuracy."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeprune import data, models
from edgeprune.errors import EdgepruneError
from edgeprune.quantize import packing, ptq, qmodel, reference
from edgeprune.quantize.train_utils import quick_train
from edgeprune.quantize.wquant import levels, project

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fmnist():
    return data.load("fashion-mnist")


@pytest.fixture(scope="module")
def trained_cnn(fmnist):
    model, shape = models.build("cnn")
    quick_train(model, fmnist, samples=6000, epochs=3.0, lr=0.1)
    return model, shape


def test_ptq_accuracy_close_to_float(fmnist, trained_cnn):
    model, shape = trained_cnn
    x, y = fmnist.x_test[:1000], fmnist.y_test[:1000]
    with torch.no_grad():
        acc_f = 100.0 * float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:300])
    acc_q = reference.accuracy(qm, x, y)
    assert acc_f > 60.0, acc_f
    assert abs(acc_f - acc_q) <= 1.5, (acc_f, acc_q)


def test_save_load_round_trip(tmp_path, fmnist, trained_cnn):
    model, shape = trained_cnn
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:100],
                          weight_cfg={"features_2_0": ("pow2", 4), "fc": ("int", 4)},
                          act_dtypes={"features_0_0": "int16"})
    qm.save(tmp_path / "q")
    back = qmodel.load(tmp_path / "q")
    assert back.to_json() == json.loads(json.dumps(qm.to_json()))
    assert set(back.params) == set(qm.params)
    for k in qm.params:
        assert back.params[k].dtype == qm.params[k].dtype
        assert np.array_equal(back.params[k], qm.params[k])
    xq = reference.quantize_input(qm, fmnist.x_test[:20])
    assert np.array_equal(reference.run(qm, xq), reference.run(back, xq))
    assert back.tensors["features_0_0"].dtype == "int16"


def test_load_errors_name_the_file(tmp_path, fmnist, trained_cnn):
    with pytest.raises(EdgepruneError, match="not a quantized model folder"):
        qmodel.load(tmp_path / "nope")
    model, shape = trained_cnn
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:50])
    d = qm.save(tmp_path / "q")
    (d / "weights.npz").write_bytes(b"garbage")
    with pytest.raises(EdgepruneError, match="weights.npz"):
        qmodel.load(d)
    (d / "weights.npz").unlink()
    with pytest.raises(EdgepruneError, match="weights.npz is missing"):
        qmodel.load(d)
    qm.save(d)
    (d / "qmodel.json").write_text("{not json")
    with pytest.raises(EdgepruneError, match="qmodel.json: corrupt JSON"):
        qmodel.load(d)


def test_validate_names_op_and_numbers(fmnist, trained_cnn):
    model, shape = trained_cnn
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:50], weight_cfg={"fc": ("int", 4)})
    qm.params["fc.weight"] = qm.params["fc.weight"].copy()
    qm.params["fc.weight"][0, 0] = 100
    with pytest.raises(EdgepruneError, match=r"op 'fc'.*\[-7, 7\]"):
        qmodel.validate(qm)


def test_reference_float64_path_is_exact(fmnist, trained_cnn):
    model, shape = trained_cnn
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:50], act_dtypes={"features_2_0": "int16"})
    xq = reference.quantize_input(qm, fmnist.x_test[:16])
    a = reference.run(qm, xq, return_all=True)
    b = reference.run(qm, xq, return_all=True, exact_int64=True)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_reference_conv_matches_torch_integer_conv():
    # An independent check of the im2col/groups/dilation/stride/padding bookkeeping.
    rng = np.random.default_rng(1)
    for groups, stride, pad, dil in [(1, 1, [1, 1, 1, 1], 1), (4, 2, [0, 1, 2, 1], 1),
                                     (2, (2, 1), [2, 0, 1, 0], 2)]:
        x = rng.integers(-128, 128, (2, 4, 9, 8))
        w = rng.integers(-127, 128, (6 if groups != 4 else 8, 4 // groups, 3, 2))
        qm = qmodel.QuantModel("x", "y", {"x": qmodel.TensorInfo("x", list(x.shape), "int8", 1.0, 3)},
                               [], {})
        op = qmodel.Op("conv2d", "c", ["x"], "y", {"strides": list(np.broadcast_to(stride, 2)),
                                                   "padding": pad, "dilation": [dil, dil],
                                                   "groups": groups})
        qm.params = {"c.weight": w.astype(np.int8), "c.bias": np.arange(w.shape[0], dtype=np.int32)}
        acc = reference.conv_accumulator(qm, op, x)
        pt, pl, pb, pr = pad
        xt = torch.nn.functional.pad(torch.tensor(x - 3, dtype=torch.float64), (pl, pr, pt, pb))
        want = torch.nn.functional.conv2d(xt, torch.tensor(w, dtype=torch.float64),
                                          torch.arange(w.shape[0], dtype=torch.float64),
                                          stride, 0, dil, groups)
        assert np.array_equal(acc, want.numpy().astype(np.int64))


@pytest.mark.parametrize("fmt,bits", [("int", 4), ("int", 2), ("pow2", 4), ("ternary", 2)])
def test_pack_unpack_and_projection(fmt, bits):
    rng = np.random.default_rng(0)
    lv = levels(fmt, bits)
    v = rng.choice(lv, 999)
    b = 4 if bits > 2 else 2
    p = packing.pack(v, fmt, b)
    assert p.size == (999 * b + 7) // 8
    assert np.array_equal(packing.unpack(p, 999, fmt, b), v)
    w = rng.normal(size=(4, 3, 3, 3))
    q, a = project(w, fmt, bits)
    assert set(np.unique(q)) <= set(lv.tolist())
    # the alternation never does worse than the plain max-abs scale
    base_a = np.abs(w).reshape(4, -1).max(1) / lv.max()
    from edgeprune.quantize.wquant import nearest_level
    base_q = nearest_level(w.reshape(4, -1) / base_a[:, None], lv)
    err = ((w.reshape(4, -1) - a[:, None] * q.reshape(4, -1)) ** 2).sum()
    assert err <= ((w.reshape(4, -1) - base_a[:, None] * base_q) ** 2).sum() + 1e-12


def test_extract_rejects_unsupported_with_node_name():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return torch.cumsum(self.c(x), 2)
    with pytest.raises(EdgepruneError, match="cumsum"):
        ptq.extract(Bad().eval(), (1, 1, 8, 8))
