"""Tests of the task registry (recnorm.experiments.tasks) on real data slices; no mocks of the data.

Generic contract tests run for every registered task (``list_tasks()``), so a new task is covered
automatically; give it small options in ``SMALL`` when its defaults are large.
"""

from __future__ import annotations

import gzip
import inspect
import json
import math
import os
import random
import struct

import numpy as np
import pytest
import torch

from recnorm.experiments import tasks as T
from recnorm.experiments.tasks import (Batch, DataMissingError, Task, create_task, get_task, list_tasks,
                                       register_task)
from recnorm.experiments.tasks import _common, adding, digits, fashion_mnist, kjv, mnist1d_task

BUILTIN = ["adding", "adding_variable", "copy", "digits", "fashion_permuted", "fashion_pixels", "fashion_rows",
           "kjv_chars", "mnist1d"]

# Small options so that every generic test is quick; a task missing here runs with its defaults.
SMALL = {
    "adding": dict(length=20, valid_size=24, test_size=16),
    "adding_variable": dict(length=20, valid_size=24, test_size=16),
    "copy": dict(delay=5, valid_size=24, test_size=16),
    "digits": dict(train_size=40, valid_size=24, test_size=16),
    "fashion_rows": dict(train_size=40, valid_size=24, test_size=16),
    "fashion_pixels": dict(downsample=True, train_size=40, valid_size=24, test_size=16),
    "fashion_permuted": dict(downsample=True, train_size=40, valid_size=24, test_size=16),
    "mnist1d": dict(train_size=40, valid_size=24, test_size=16),
    "kjv_chars": dict(seq_len=20, eval_chars=450, train_chars=5000),
}
EVAL_SIZES = {"valid": 24, "test": 16}  # examples per eval split under SMALL (sequence-level tasks)
B = 10

_TASKS = {}


@pytest.fixture(autouse=True)
def _no_home_cache(monkeypatch):
    # Keep the KJV decoded-text file cache out of the home directory during tests.
    monkeypatch.setenv(kjv.CACHE_DIR_ENV, "")


def small(name: str) -> Task:
    if name not in _TASKS:
        _TASKS[name] = create_task(name, **SMALL.get(name, {}))
    return _TASKS[name]


def take(it, n):
    return [b for _, b in zip(range(n), it)]


def same(a: Batch, b: Batch) -> bool:
    return (a.x.shape == b.x.shape and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
            and ((a.lengths is None and b.lengths is None)
                 or (a.lengths is not None and b.lengths is not None and torch.equal(a.lengths, b.lengths))))


def last_index(batch: Batch) -> torch.Tensor:
    if batch.lengths is None:
        return torch.full((batch.batch_size,), batch.seq_len - 1, dtype=torch.long)
    return batch.lengths - 1


def valid_mask(batch: Batch) -> torch.Tensor:
    if batch.lengths is None:
        return torch.ones(batch.seq_len, batch.batch_size, dtype=torch.bool)
    return torch.arange(batch.seq_len).unsqueeze(1) < batch.lengths.unsqueeze(0)


def _shipped_tasks():
    """Registered tasks, less those that other test files register for themselves (names starting
    with "_"), so that the generic contract tests do not depend on test collection order."""
    return [n for n in list_tasks() if not n.startswith("_")]


# --------------------------------------------------------------------------------------------------
# registry


def test_builtin_tasks_registered():
    names = list_tasks()
    assert names == sorted(names)
    assert set(BUILTIN) <= set(names)
    assert set(T.TASKS) == set(names)
    for name in names:
        assert get_task(name).name == name


def test_get_task_unknown_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_task("nope")
    for name in list_tasks():
        assert name in str(err.value)


def test_create_task_rejects_unknown_options():
    with pytest.raises(ValueError) as err:
        create_task("adding", bogus=1)
    msg = str(err.value)
    assert "bogus" in msg and "length" in msg and "variable_length" in msg


def test_register_task_rejects_duplicate_name():
    class Other(adding.AddingTask):
        name = "adding"

    with pytest.raises(ValueError, match="already registered"):
        register_task(Other)
    assert get_task("adding") is adding.AddingTask


@pytest.mark.parametrize("name,options", [
    ("adding", dict(length=1)), ("adding", dict(valid_size=0)), ("adding", dict(variable_length=1)),
    ("copy", dict(num_symbols=1)), ("digits", dict(train_size=1298)), ("digits", dict(test_size=0)),
    ("fashion_rows", dict(valid_size=60000)), ("fashion_rows", dict(train_size=55001)),
    ("fashion_pixels", dict(downsample="yes")), ("mnist1d", dict(valid_size=501)),
    ("kjv_chars", dict(seq_len=0)), ("kjv_chars", dict(eval_chars=1)),
])
def test_invalid_option_values_raise(name, options):
    with pytest.raises(ValueError):
        create_task(name, **options)


def test_bad_split_and_batch_size_raise():
    task = small("adding")
    with pytest.raises(ValueError, match="split"):
        task.batches("training", 4)
    with pytest.raises(ValueError, match="batch_size"):
        task.batches("valid", 0)


# --------------------------------------------------------------------------------------------------
# generic contract, for every registered task


@pytest.mark.parametrize("name", _shipped_tasks())
def test_attributes_and_describe(name):
    task = small(name)
    assert task.kind in ("classification", "regression", "per_step")
    assert isinstance(task.metric, str) and isinstance(task.higher_is_better, bool)
    assert task.num_outputs >= 1 and task.seq_len >= 1 and task.input_size >= 1
    if task.vocab_size is not None:
        assert task.input_size == task.vocab_size
    params = [p for p in inspect.signature(type(task).__init__).parameters if p != "self"]
    assert sorted(task.options) == sorted(params)
    for p in params:  # every option has a default
        assert inspect.signature(type(task).__init__).parameters[p].default is not inspect.Parameter.empty
    desc = json.loads(json.dumps(task.describe()))
    assert desc["name"] == name and desc["options"] == task.options
    assert type(task).__doc__ and len(type(task).__doc__) > 100


def check_batch(task: Task, batch: Batch, batch_size: int) -> None:
    assert batch.batch_size == batch_size
    T_ = batch.seq_len
    assert 1 <= T_ <= task.seq_len
    if task.vocab_size is not None:
        assert batch.x.dtype == torch.int64 and batch.x.shape == (T_, batch_size)
        assert int(batch.x.min()) >= 0 and int(batch.x.max()) < task.vocab_size
    else:
        assert batch.x.dtype == torch.float32 and batch.x.shape == (T_, batch_size, task.input_size)
        assert torch.isfinite(batch.x).all()
    if batch.lengths is None:
        assert T_ == task.seq_len or task.kind == "per_step"
    else:
        assert batch.lengths.dtype == torch.int64 and batch.lengths.shape == (batch_size,)
        assert int(batch.lengths.min()) >= 1 and int(batch.lengths.max()) <= T_
        assert int(batch.lengths.max()) == T_  # padded to the longest sequence
    if task.kind == "classification":
        assert batch.y.dtype == torch.int64 and batch.y.shape == (batch_size,)
        assert int(batch.y.min()) >= 0 and int(batch.y.max()) < task.num_outputs
    elif task.kind == "regression":
        assert batch.y.dtype == torch.float32 and batch.y.shape == (batch_size,)
    else:
        assert batch.y.dtype == torch.int64 and batch.y.shape == (T_, batch_size)
        y = batch.y[valid_mask(batch)]
        assert int(y.min()) >= 0 and int(y.max()) < task.num_outputs


@pytest.mark.parametrize("name", _shipped_tasks())
def test_batch_contract(name):
    task = small(name)
    for batch in take(task.batches("train", B, seed=0), 3):
        check_batch(task, batch, B)
    for split in ("valid", "test"):
        batches = list(task.batches(split, B))
        assert batches
        for i, batch in enumerate(batches):
            assert batch.batch_size <= B
            if i < len(batches) - 1:
                assert batch.batch_size == B
            check_batch(task, batch, batch.batch_size)
        if task.kind != "per_step" and name in SMALL:
            assert sum(b.batch_size for b in batches) == EVAL_SIZES[split]


@pytest.mark.parametrize("name", _shipped_tasks())
def test_eval_passes_deterministic(name):
    task = small(name)
    for split in ("valid", "test"):
        first = list(task.batches(split, B, seed=0))
        again = list(create_task(name, **SMALL.get(name, {})).batches(split, B, seed=123))  # seed unused
        assert len(first) == len(again) and all(same(a, b) for a, b in zip(first, again))
    assert not same(next(iter(task.batches("valid", B))), next(iter(task.batches("test", B))))


@pytest.mark.parametrize("name", _shipped_tasks())
def test_train_stream_seeded(name):
    task = small(name)
    a = take(task.batches("train", B, seed=0), 6)
    b = take(create_task(name, **SMALL.get(name, {})).batches("train", B, seed=0), 6)
    c = take(task.batches("train", B, seed=1), 6)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))
    assert not same(a[0], a[1])
    valid = next(iter(task.batches("valid", B)))
    assert not same(a[0], valid)


def perfect_outputs(task: Task, batch: Batch) -> torch.Tensor:
    """Outputs that are right where the task reads them and wrong (loudly) everywhere else."""
    T_, Bn, C = batch.seq_len, batch.batch_size, task.num_outputs
    cols = torch.arange(Bn)
    if task.kind == "classification":
        out = 20.0 * torch.nn.functional.one_hot((batch.y + 1) % C, C).float().expand(T_, Bn, C).clone()
        out[last_index(batch), cols] = 20.0 * torch.nn.functional.one_hot(batch.y, C).float()
    elif task.kind == "regression":
        out = torch.full((T_, Bn, C), 5.0)
        out[last_index(batch), cols, 0] = batch.y
    else:
        mask = valid_mask(batch)
        y = torch.where(mask, batch.y, (batch.y + 1) % C)
        out = 30.0 * torch.nn.functional.one_hot(y, C).float()
    return out


@pytest.mark.parametrize("name", _shipped_tasks())
def test_loss_and_metrics_by_hand(name):
    task = small(name)
    batches = list(task.batches("valid", B))
    batch = batches[-1] if any(b.lengths is not None for b in batches[-1:]) else batches[0]
    C = task.num_outputs

    # perfect outputs
    out = perfect_outputs(task, batch).requires_grad_(True)
    loss = task.loss(out, batch)
    assert loss.dim() == 0 and loss.item() < 1e-6
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()
    m = task.metrics(out.detach(), batch)
    assert task.metric in m and "loss" in m
    for key, (total, count) in m.items():
        assert isinstance(total, float) and isinstance(count, float) and count > 0
    value = m[task.metric][0] / m[task.metric][1]
    best = 1.0 if task.higher_is_better else 0.0
    assert value == pytest.approx(best, abs=1e-6)

    # uniform (all-zero) outputs
    zeros = torch.zeros(batch.seq_len, batch.batch_size, C)
    m = task.metrics(zeros, batch)
    assert float(task.loss(zeros, batch)) == pytest.approx(m["loss"][0] / m["loss"][1], rel=1e-5)
    if task.kind == "regression":
        assert m["mse"][0] / m["mse"][1] == pytest.approx(float((batch.y ** 2).mean()), rel=1e-5)
    else:
        assert m["loss"][0] / m["loss"][1] == pytest.approx(math.log(C), rel=1e-5)
    if task.kind == "classification":
        assert m["loss"][1] == batch.batch_size
        assert m["accuracy"][0] / m["accuracy"][1] == pytest.approx(float((batch.y == 0).float().mean()))

    # random outputs: loss() is the pooled "loss" metric of the batch
    rand = torch.randn(batch.seq_len, batch.batch_size, C, generator=torch.Generator().manual_seed(0))
    m = task.metrics(rand, batch)
    assert float(task.loss(rand, batch)) == pytest.approx(m["loss"][0] / m["loss"][1], rel=1e-5)

    with pytest.raises(ValueError):
        task.loss(torch.zeros(batch.seq_len, batch.batch_size, C + 1), batch)


def test_classification_reads_last_valid_step():
    # A hand-made variable-length batch: only step lengths-1 of each sequence counts.
    task = small("digits")
    y = torch.tensor([1, 2, 3])
    lengths = torch.tensor([2, 4, 1])
    batch = Batch(torch.zeros(4, 3, 1), y, lengths)
    out = torch.zeros(4, 3, 10)
    out[1, 0, 1] = out[3, 1, 2] = out[0, 2, 3] = 10.0
    out[3, 0, 5] = out[3, 2, 5] = 50.0  # padding steps: ignored
    assert task.metrics(out, batch)["accuracy"] == (3.0, 3.0)
    out[1, 0, 1] = 0.0
    assert task.metrics(out, batch)["accuracy"] == (2.0, 3.0)


# --------------------------------------------------------------------------------------------------
# index streams


def test_train_index_stream_epochs():
    stream = _common.train_index_stream(10, 4, seed=3)
    idx = torch.cat(take(stream, 5))  # 20 indices: two epochs
    first, second = idx[:10], idx[10:]
    assert torch.equal(first.sort().values, torch.arange(10))
    assert torch.equal(second.sort().values, torch.arange(10))
    assert not torch.equal(first, second)
    big = take(_common.train_index_stream(3, 7, seed=0), 2)  # batch larger than the data
    assert all(b.numel() == 7 for b in big)


def test_array_task_train_epoch_covers_subset():
    task = small("digits")
    examples, _ = task._arrays("train")
    feats = task._features(examples)  # (64, 40, 1)
    seen = []
    for batch in take(task.batches("train", 8, seed=5), 5):  # 40 examples: one epoch
        for b in range(batch.batch_size):
            match = (feats == batch.x[:, b:b + 1]).all(0).all(-1).nonzero().flatten()
            seen.append(int(match[0]))
    assert sorted(seen) == list(range(40))


# --------------------------------------------------------------------------------------------------
# adding


def check_adding_batch(task, batch):
    x, y = batch.x, batch.y
    lengths = batch.lengths if batch.lengths is not None else torch.full((batch.batch_size,), batch.seq_len)
    mask = valid_mask(Batch(x, y, lengths))
    marks = x[:, :, 1]
    assert set(marks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(marks.sum(0), torch.full((batch.batch_size,), 2.0))
    assert ((marks * ~mask) == 0).all()
    assert ((x[:, :, 0] * ~mask) == 0).all()  # padding value 0
    vals = x[:, :, 0][mask]
    assert float(vals.min()) >= 0.0 and float(vals.max()) <= 1.0
    assert torch.allclose(y, (x[:, :, 0] * marks).sum(0))
    pos = marks.t().nonzero()[:, 1].view(-1, 2)
    assert (pos[:, 0] < lengths // 2).all() and (pos[:, 1] >= lengths // 2).all()


@pytest.mark.parametrize("name", ["adding", "adding_variable"])
def test_adding_target_is_sum_of_marked_values(name):
    task = small(name)
    for batch in take(task.batches("train", 16, seed=0), 2) + list(task.batches("valid", 16)):
        check_adding_batch(task, batch)
        if name == "adding_variable":
            assert batch.lengths is not None
            assert int(batch.lengths.min()) >= 10 and int(batch.lengths.max()) <= 20
        else:
            assert batch.lengths is None and batch.seq_len == 20


def test_adding_variable_defaults_and_trivial_mse():
    assert create_task("adding_variable").variable_length is True
    assert create_task("adding").variable_length is False
    task = create_task("adding")  # default valid set: 1000 sequences of length 100
    lengths_task = create_task("adding_variable", length=40)
    x, y, lengths = lengths_task.eval_set("valid")
    assert set(lengths.unique().tolist()) <= set(range(20, 41)) and lengths.unique().numel() > 10
    _, y, _ = task.eval_set("valid")
    assert y.numel() == 1000
    assert float(((y - 1.0) ** 2).mean()) == pytest.approx(1 / 6, abs=0.02)  # the documented ~0.167


# --------------------------------------------------------------------------------------------------
# copy


def test_copy_targets_reproduce_first_symbols():
    task = small("copy")  # delay 5: T = 10 + 5 + 1 + 10 = 26
    assert task.seq_len == 26 and task.input_size == 10 and task.num_outputs == 9
    blank, delim = 8, 9
    for batch in take(task.batches("train", 16, seed=0), 2) + list(task.batches("test", 16)):
        x, y = batch.x, batch.y
        assert torch.equal(x.sum(-1), torch.ones(26, batch.batch_size))  # one-hot
        tokens = x.argmax(-1)
        assert (tokens[:10] < 8).all()
        assert (tokens[10:15] == blank).all() and (tokens[15] == delim).all() and (tokens[16:] == blank).all()
        assert torch.equal(y[-10:], tokens[:10])
        assert (y[:-10] == blank).all()


def test_copy_memoryless_baseline():
    task = create_task("copy")  # defaults: T = 71
    batch = next(iter(task.batches("valid", 50)))
    out = torch.zeros(71, 50, 9)
    out[:61, :, 8] = 1000.0  # blank, surely, before the recall steps
    out[61:, :, 8] = -1000.0  # uniform over the 8 symbols on the recall steps
    m = task.metrics(out, batch)
    assert task.baseline_loss == pytest.approx(10 * math.log(8) / 71)
    assert m["loss"][0] / m["loss"][1] == pytest.approx(task.baseline_loss, rel=1e-5)
    assert m["accuracy"][1] == 500
    out[61:, :, :8] = torch.nn.functional.one_hot(batch.y[61:], 9)[..., :8].float()
    assert task.metrics(out, batch)["accuracy"] == (500.0, 500.0)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_official_files_parsed():
    data = fashion_mnist.load_fashion_mnist()
    assert data["train_images"].shape == (60000, 28, 28) and data["test_images"].shape == (10000, 28, 28)
    assert data["train_images"].dtype == torch.uint8
    assert data["train_labels"][:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert data["test_labels"][:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.equal(torch.bincount(data["train_labels"]), torch.full((10,), 6000))
    assert fashion_mnist.load_fashion_mnist() is data  # cached per process


def test_fashion_splits_disjoint():
    full = create_task("fashion_rows")  # indices only; no data is read here
    tr, va, te = (full.split_indices(s) for s in ("train", "valid", "test"))
    assert tr.numel() == 55000 and va.numel() == 5000 and te.numel() == 10000
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(60000))
    assert torch.equal(te, torch.arange(10000))
    sub = small("fashion_rows")
    assert torch.equal(sub.split_indices("train"), tr[:40])
    assert set(sub.split_indices("valid").tolist()) <= set(va.tolist())
    assert not set(sub.split_indices("valid").tolist()) & set(tr.tolist())
    other = create_task("fashion_rows", valid_size=100)
    assert not set(other.split_indices("train").tolist()) & set(other.split_indices("valid").tolist())


def test_fashion_features_match_images():
    data = fashion_mnist.load_fashion_mnist()
    rows = small("fashion_rows")
    batch = next(iter(rows.batches("valid", 4)))
    idx = rows.split_indices("valid")[:4]
    images = data["train_images"][idx].float() / 255
    assert torch.allclose(batch.x, images.transpose(0, 1))
    assert torch.equal(batch.y, data["train_labels"][idx])
    assert float(batch.x.max()) <= 1.0 and float(batch.x.min()) >= 0.0

    pixels = create_task("fashion_pixels", train_size=2, valid_size=2, test_size=2)
    batch = next(iter(pixels.batches("test", 2)))
    assert batch.x.shape == (784, 2, 1)
    test_images = data["test_images"][:2].float() / 255
    assert torch.allclose(batch.x[:, :, 0].t(), test_images.reshape(2, 784))
    assert torch.allclose(batch.x[28 * 5 + 7, 1, 0], test_images[1, 5, 7])  # row-major order

    down = create_task("fashion_pixels", downsample=True, train_size=2, valid_size=2, test_size=2)
    batch = next(iter(down.batches("test", 2)))
    assert down.seq_len == 196 and batch.x.shape == (196, 2, 1)
    manual = test_images.reshape(2, 14, 2, 14, 2).mean(dim=(2, 4)).reshape(2, 196)
    assert torch.allclose(batch.x[:, :, 0].t(), manual, atol=1e-6)


@pytest.mark.parametrize("downsample", [False, True])
def test_fashion_permutation_true_and_consistent(downsample):
    opts = dict(downsample=downsample, train_size=3, valid_size=3, test_size=3)
    perm_task = create_task("fashion_permuted", **opts)
    plain = create_task("fashion_pixels", **opts)
    n = 196 if downsample else 784
    perm = perm_task.permutation
    assert perm.shape == (n,) and torch.equal(perm.sort().values, torch.arange(n))
    assert not torch.equal(perm, torch.arange(n))
    assert torch.equal(perm, torch.randperm(n, generator=torch.Generator().manual_seed(0)))
    for split in ("train", "test"):
        a = next(iter(perm_task.batches(split, 3, seed=2)))
        b = next(iter(plain.batches(split, 3, seed=2)))
        assert torch.equal(a.y, b.y)
        assert torch.equal(a.x, b.x[perm])
    other = create_task("fashion_permuted", permutation_seed=1, **opts).permutation
    assert not torch.equal(other, perm)


def _write_idx(path, magic, dims, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload)


def test_read_idx_validates_header(tmp_path):
    good = tmp_path / "good.gz"
    _write_idx(good, 0x801, (3,), bytes([1, 2, 3]))
    assert fashion_mnist.read_idx(str(good), 0x801).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="magic"):
        fashion_mnist.read_idx(str(good), 0x803)
    short = tmp_path / "short.gz"
    _write_idx(short, 0x803, (2, 2, 2), bytes(7))
    with pytest.raises(ValueError, match="bytes"):
        fashion_mnist.read_idx(str(short), 0x803)


def test_fashion_missing_data_names_install_command(tmp_path, monkeypatch):
    with pytest.raises(DataMissingError, match="apt-get install dataset-fashion-mnist"):
        create_task("fashion_rows", data_dir=str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    for name in ("fashion_rows", "fashion_pixels", "fashion_permuted"):
        with pytest.raises(DataMissingError) as err:
            create_task(name)
        assert "apt-get install dataset-fashion-mnist" in str(err.value)
    with pytest.raises(DataMissingError):
        fashion_mnist.load_fashion_mnist()


# --------------------------------------------------------------------------------------------------
# digits


def test_digits_split_and_values():
    from sklearn.datasets import load_digits

    full = create_task("digits")
    idx = {s: full.split_indices(s) for s in ("train", "valid", "test")}
    assert [idx[s].numel() for s in ("train", "valid", "test")] == [1297, 250, 250]
    assert torch.equal(torch.cat(list(idx.values())).sort().values, torch.arange(1797))
    ref = load_digits()
    batch = list(full.batches("test", 100))[-1]
    want = torch.from_numpy(ref.data[idx["test"][200:].numpy()]).float() / 16
    assert batch.x.shape == (64, 50, 1)
    assert torch.allclose(batch.x[:, :, 0].t(), want)
    assert torch.equal(batch.y, torch.from_numpy(ref.target[idx["test"][200:].numpy()]))
    assert float(batch.x.max()) <= 1.0 and float(batch.x.min()) >= 0.0
    assert torch.equal(small("digits").split_indices("train"), idx["train"][:40])


def test_digits_missing_names_install_command(monkeypatch):
    monkeypatch.setattr(digits, "SKLEARN_DATASETS_MODULE", "recnorm_no_such_module.datasets")
    monkeypatch.setattr(digits, "_CACHE", {})
    with pytest.raises(DataMissingError, match="python -m pip install scikit-learn"):
        create_task("digits")
    with pytest.raises(DataMissingError, match="python -m pip install scikit-learn"):
        digits.load_digits_arrays()


# --------------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_split_and_standardization():
    task = create_task("mnist1d")
    tr, va, te = (task.split_indices(s) for s in ("train", "valid", "test"))
    assert (tr.numel(), va.numel(), te.numel()) == (3500, 500, 1000)
    assert not set(tr.tolist()) & set(va.tolist())
    x_train, y_train = task._arrays("train")
    assert x_train.shape == (3500, 40) and x_train.dtype == torch.float32
    assert float(x_train.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(x_train.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    arrays = mnist1d_task.load_mnist1d_arrays()
    mean, std = arrays["x"][:3500].mean(), arrays["x"][:3500].std()
    batch = next(iter(task.batches("valid", 5)))
    assert torch.allclose(batch.x[:, :, 0].t(), torch.from_numpy((arrays["x"][3500:3505] - mean) / std).float())
    assert torch.equal(batch.y, torch.from_numpy(arrays["y"][3500:3505]))
    assert torch.equal(torch.bincount(y_train, minlength=10) > 300, torch.ones(10, dtype=torch.bool))


def test_mnist1d_generated_locally_and_deterministically(tmp_path, monkeypatch):
    reference = mnist1d_task.load_mnist1d_arrays()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mnist1d_task, "_CACHE", {})
    random.seed(7)
    np.random.seed(7)
    py_state, np_state = random.getstate(), np.random.get_state()
    arrays = mnist1d_task.load_mnist1d_arrays()
    assert random.getstate() == py_state  # global generators untouched
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert os.listdir(tmp_path) == []  # no pickle written into the working directory
    for key in ("x", "y", "x_test", "y_test"):
        assert np.array_equal(arrays[key], reference[key])


def test_mnist1d_missing_names_install_command(monkeypatch):
    monkeypatch.setattr(mnist1d_task, "MNIST1D_MODULE", "recnorm_no_such_module.data")
    monkeypatch.setattr(mnist1d_task, "_CACHE", {})
    with pytest.raises(DataMissingError, match="python -m pip install mnist1d"):
        create_task("mnist1d")
    with pytest.raises(DataMissingError, match="python -m pip install mnist1d"):
        mnist1d_task.load_mnist1d_arrays()


# --------------------------------------------------------------------------------------------------
# KJV


def test_kjv_decoded_text():
    text = kjv.decode_kjv()
    assert len(text) == 4_137_850
    symbols = set(text)
    assert len(symbols) == 63 and symbols == set(kjv.VOCAB)
    assert set("\n !'(),-.:;?") | set("ABCDEFGHIJKLMNOPQRSTUVWYZ") | set("abcdefghijklmnopqrstuvwxyz") == symbols
    assert "X" not in symbols
    assert text.startswith("In the beginning God created the heaven and the earth.\nAnd the earth was")
    assert text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.\n")
    assert text.count("\n") == 31102
    loaded, ids = kjv.load_kjv()
    assert loaded == text
    assert ids.numel() == len(text) and int(ids.max()) == 62
    assert "".join(kjv.VOCAB[i] for i in ids[:20].tolist()) == text[:20]


def test_kjv_splits_and_windows():
    task = small("kjv_chars")  # seq_len 20, eval_chars 450, train_chars 5000
    text, ids = kjv.load_kjv()
    n = len(text)
    bounds = [task.split_bounds(s, n) for s in ("train", "valid", "test")]
    assert bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == bounds[2][0]
    assert bounds[2][1] == n
    assert bounds[0][1] == int(0.9 * n) and bounds[1][1] == n * 19 // 20

    def chars(t):
        return "".join(kjv.VOCAB[i] for i in t.tolist())

    for batch in take(task.batches("train", 8, seed=0), 3):  # windows inside the first 5000 train chars
        for b in range(8):
            window = chars(batch.x[:, b]) + chars(batch.y[-1:, b])
            assert window in text[:5000]
            assert torch.equal(batch.x[1:, b], batch.y[:-1, b])

    start = bounds[1][0]
    batches = list(task.batches("valid", 8))  # 449 predicted chars: 22 full windows + 9
    assert [b.batch_size for b in batches] == [8, 8, 7]
    assert batches[0].lengths is None and batches[-1].lengths.tolist() == [20] * 6 + [9]
    xs = torch.cat([b.x[:, j][: (b.lengths[j] if b.lengths is not None else 20)]
                    for b in batches for j in range(b.batch_size)])
    ys = torch.cat([b.y[:, j][: (b.lengths[j] if b.lengths is not None else 20)]
                    for b in batches for j in range(b.batch_size)])
    assert torch.equal(xs, ids[start:start + 449].long())
    assert torch.equal(ys, ids[start + 1:start + 450].long())
    test_first = next(iter(task.batches("test", 2)))
    assert chars(test_first.x[:, 0]) == text[bounds[2][0]:bounds[2][0] + 20]


def test_kjv_bpc_of_uniform_is_log2_63():
    task = small("kjv_chars")
    batch = list(task.batches("valid", 8))[-1]  # the padded batch
    m = task.metrics(torch.zeros(batch.seq_len, batch.batch_size, 63), batch)
    assert m["bpc"][1] == 6 * 20 + 9
    assert m["bpc"][0] / m["bpc"][1] == pytest.approx(math.log2(63), rel=1e-6)


def test_kjv_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv(kjv.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(kjv, "_CACHE", {})
    text, _ = kjv.load_kjv()
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("kjv-") and files[0].endswith(".txt")
    monkeypatch.setattr(kjv, "_CACHE", {})
    monkeypatch.setattr(kjv, "decode_kjv", lambda: pytest.fail("the cache file was not used"))
    again, _ = kjv.load_kjv()
    assert again == text and len(again) == 4_137_850


def test_kjv_missing_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(kjv, "_CACHE", {})
    monkeypatch.setattr(kjv, "BIBLE_PROGRAM", "recnorm-no-such-bible-program")
    with pytest.raises(DataMissingError, match="apt-get install bible-kjv-text bible-kjv"):
        create_task("kjv_chars")
    monkeypatch.setattr(kjv, "BIBLE_PROGRAM", "bible")
    monkeypatch.setattr(kjv, "BIBLE_DATA", str(tmp_path / "bible.data"))
    with pytest.raises(DataMissingError, match="apt-get install bible-kjv-text bible-kjv"):
        create_task("kjv_chars")
    with pytest.raises(DataMissingError, match="apt-get install bible-kjv-text bible-kjv"):
        kjv.load_kjv()
