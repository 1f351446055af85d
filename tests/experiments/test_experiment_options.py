"""Run options for the evidence presets: how variable-length batches are fed, sorting by length, the
train-test gap, batch statistics at the training batch size, norms between layers, compact diagnostics,
and the verse-level KJV task."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from recnorm.experiments import presets
from recnorm.experiments.config import ConfigError, RunConfig
from recnorm.experiments.model import build_model
from recnorm.experiments.results import model_label
from recnorm.experiments.tasks.base import create_task
from recnorm.experiments.train import _sorted_by_length, make_task, train_and_evaluate


def tiny(**changes) -> RunConfig:
    base = dict(task="adding_variable", task_options={"length": 12, "valid_size": 32, "test_size": 32},
                hidden_size=8, batch_size=16, steps=4, eval_every=2, eval_batch_size=32, diag_every=None,
                popstat_batches=2)
    base.update(changes)
    return RunConfig(**base)


def test_new_fields_at_their_defaults_keep_existing_run_ids():
    config = RunConfig(task="adding", task_options={"length": 8, "valid_size": 16, "test_size": 16}, hidden_size=8,
                       batch_size=8, steps=3, eval_every=1, eval_batch_size=16, diag_every=None, popstat_batches=1)
    assert config.run_id == "adding-lstm-none-default1-s0-9f9f4678ae"  # the id runs on disk already carry
    ids = {config.replace(**change).run_id for change in ({"feed": "padded"}, {"sort_by_length": 4},
                                                          {"train_eval_examples": 10})}
    assert len(ids) == 3 and config.run_id not in ids


@pytest.mark.parametrize("changes, message", [
    ({"feed": "masked"}, "feed: expected one of"),
    ({"sort_by_length": 1}, "sort_by_length: expected 0"),
    ({"train_eval_examples": 0}, "train_eval_examples: expected a value > 0"),
    ({"between_layers": "batch"}, "between_layers: expected None for a single layer"),
])
def test_option_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**changes).validate()


def test_between_layers_builds_a_stack_with_sequence_batch_norm():
    import recnorm

    config = tiny(between_layers="batch", num_layers=2)
    config.validate()
    model = build_model(config, make_task(config.task, config.task_options))
    assert isinstance(model.rnn.norm_between_l0, recnorm.SequenceBatchNorm)
    batch = next(create_task(config.task, **config.task_options).batches("train", 8, seed=0))
    out = model(batch.x, batch.lengths)
    assert torch.isfinite(out).all() and int(model.rnn.norm_between_l0.num_batches_tracked[0]) == 1


def _last_outputs(norm, feed, batch):
    torch.manual_seed(0)
    config = tiny(norm=norm, feed=feed)
    model = build_model(config, make_task(config.task, config.task_options))
    model.train()
    out = model(batch.x, batch.lengths)
    return out[batch.lengths - 1, torch.arange(batch.batch_size)]


def test_padded_feed_lets_padding_into_batch_statistics_only():
    task = create_task("adding_variable", length=12, valid_size=32, test_size=32)
    batch = next(task.batches("train", 16, seed=3))
    assert int(batch.lengths.min()) < int(batch.lengths.max())
    # Per-example statistics never see the padding after a sequence's end: packed and padded agree.
    torch.testing.assert_close(_last_outputs("layer", "packed", batch), _last_outputs("layer", "padded", batch),
                               rtol=1e-5, atol=1e-6)
    # Per-step batch statistics of the padded tensor count the padded rows: the outputs change.
    packed, padded = _last_outputs("batch", "packed", batch), _last_outputs("batch", "padded", batch)
    assert (packed - padded).abs().max() > 1e-3


def test_sorted_batches_hold_similar_lengths_and_every_sequence_once():
    task = create_task("adding_variable", length=40, valid_size=32, test_size=32)
    pool = 6
    stream = task.batches("train", 16, seed=5)
    originals = [next(stream) for _ in range(pool)]
    sorted_batches = [b for _, b in zip(range(pool), _sorted_by_length(task.batches("train", 16, seed=5), pool, 0))]
    assert Counter(torch.cat([b.y for b in originals]).tolist()) == Counter(
        torch.cat([b.y for b in sorted_batches]).tolist())

    def padding(batches):
        return sum(float(1 - b.lengths.float().mean() / b.seq_len) for b in batches) / len(batches)

    assert padding(sorted_batches) < padding(originals) / 3
    for b in sorted_batches:
        assert b.seq_len == int(b.lengths.max()) and b.x.shape[1] == 16
    with pytest.raises(ConfigError, match="variable-length"):
        next(_sorted_by_length(create_task("adding", length=8).batches("train", 4, seed=0), 2, 0))


def test_run_records_train_split_and_batch_statistics_at_training_size(tmp_path):
    config = RunConfig(task="fashion_rows", task_options={"train_size": 40, "valid_size": 32, "test_size": 32},
                       hidden_size=8, norm="batch", batch_size=8, steps=3, eval_every=3, eval_batch_size=32,
                       diag_every=None, popstat_batches=2, train_eval_examples=30)
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert set(result.final["train"]) == {"accuracy", "loss"}
    for key in ("test", "test_ema", "test_batch_stats", "test_batch_stats_train_size"):
        assert 0.0 <= result.final[key]["accuracy"] <= 1.0, key
    flow = result.diagnostics["grad_flow"][0]["norms"]["rnn.l0"]
    assert all(v is None or float(f"{v:.4g}") == v for v in flow)  # compact diagnostics
    stats = result.diagnostics["batch_stats"]["init"]
    assert stats and not any(k.endswith("_units") for entry in stats.values() for k in entry)
    with open(tmp_path / "run" / "result.json") as f:
        assert "\n" not in f.read().strip()
    with pytest.raises(ConfigError, match="no fixed training set"):
        train_and_evaluate(tiny(train_eval_examples=8), str(tmp_path / "adding"))


def test_between_layers_arm_switches_on_with_one_line(monkeypatch):
    # The layers accept between_layers= (recnorm.SequenceBatchNorm between a stack's layers): with the
    # switch on, the arm joins at 3 and 5 layers under a label of its own.
    from recnorm.experiments.studies import laurent

    monkeypatch.setattr(laurent, "LAURENT_BETWEEN_LAYERS", True)
    configs = laurent.sweep().expand()
    between = [c for c in configs if c.between_layers == "batch"]
    assert len(configs) == 45 + 10 and sorted({c.num_layers for c in between}) == [3, 5]
    assert {model_label(c.to_dict()) for c in between} == {"none+between=batch"}


def test_kjv_verses_batches():
    task = create_task("kjv_verses", max_len=60, train_verses=200, eval_verses=50)
    assert task.num_examples("train") == 200 and task.num_examples("valid") == 50
    batch = next(task.batches("train", 8, seed=1))
    assert batch.lengths is not None and int(batch.lengths.max()) == batch.seq_len <= 60
    for j in range(8):
        n = int(batch.lengths[j])
        assert torch.equal(batch.x[1:n, j], batch.y[:n - 1, j])  # the next character
    valid = list(task.batches("valid", 16))
    assert sum(b.batch_size for b in valid) == 50
    spans = {s for split in ("train", "valid", "test") for s in task.split_verses(split)}
    assert len(spans) == 200 + 50 + 50  # disjoint splits
    last = task.split_verses("valid")[0]
    uncut = create_task("kjv_verses", max_len=1000, eval_verses=1)
    b = next(uncut.batches("valid", 1))
    assert int(b.lengths[0]) == last[1] - last[0] and int(b.y[int(b.lengths[0]) - 1, 0]) == 0  # ends on "\n"
    out = torch.zeros(b.seq_len, 1, task.num_outputs)
    metrics = uncut.metrics(out, b)
    assert metrics["bpc"][1] == int(b.lengths[0])
    assert metrics["bpc"][0] / metrics["bpc"][1] == pytest.approx(torch.log2(torch.tensor(63.0)).item(), rel=1e-5)



def test_preset_docstrings_state_measured_times():
    for name in presets.list_presets():
        doc = presets.PRESETS[name].__doc__
        assert "Command:" in doc and "Running time:" in doc, name
        assert not any(p in doc for p in ("MEASURED_", "COMPUTE_", "SMOKE_")), f"{name}: fill in the measured time"

