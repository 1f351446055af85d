"""Published runs (results/<study>/runs.jsonl), provenance, kernel pins, and the trainer's step hook."""

from __future__ import annotations

import json
import os

import pytest
import torch

from recnorm.experiments.config import ConfigError, RunConfig
from recnorm.experiments.provenance import kernel_dispatch, parse_kernel_pin
from recnorm.experiments.results import (
    RUNS_FILE, SWEEP_FILE, load_records, load_records_checked, pack_record, publish, read_config, unpack_record)
from recnorm.experiments.sweep import SweepSpec, run_sweep, varied_fields
from recnorm.experiments.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(**changes) -> RunConfig:
    base = RunConfig(task="adding", task_options={"length": 8, "valid_size": 16, "test_size": 16}, hidden_size=8,
                     batch_size=8, steps=4, eval_every=2, eval_batch_size=16, diag_every=None, popstat_batches=1)
    return base.replace(**changes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs in a sweep directory (no norm and layer norm)."""
    out = str(tmp_path_factory.mktemp("sweep"))
    run_sweep(SweepSpec(name="tiny", base=tiny(), grids=[{"norm": [None, "layer"]}]), out)
    return out


def _without_wall_clock(record):
    record = dict(record, train={k: v for k, v in record["train"].items() if k not in ("step_time", "time")})
    record.pop("dir")
    return record


# ---------------------------------------------------------------------------------------------- the file
def test_pack_unpack_restores_steps_and_clipping_exactly():
    record = {"run_id": "r", "dir": "/x", "train": {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0],
                                                     "clipped": [True, False, True], "step_time": [0.1] * 3,
                                                     "time": [0.1, 0.2, 0.3]}}
    packed = pack_record(record)
    assert list(packed)[0] == "run_id" and "dir" not in packed
    assert packed["train"] == {"step": {"first": 1, "last": 3}, "loss": [3.0, 2.0, 1.0], "clipped": "101"}
    assert unpack_record(packed)["train"] == {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0],
                                              "clipped": [True, False, True]}


def test_long_curves_keep_every_kth_step_and_the_last():
    n = 10
    record = {"run_id": "r", "train": {"step": list(range(1, n + 1)), "loss": [float(i) for i in range(n)],
                                       "clipped": [False] * n}}
    train = unpack_record(pack_record(record, max_points=4))["train"]
    assert train["step"] == [1, 4, 7, 10]
    assert train["loss"] == [0.0, 3.0, 6.0, 9.0]
    assert train["clipped"] == [False] * 4


def test_published_runs_load_as_the_sweep_directory_gives_them(runs, tmp_path):
    results = str(tmp_path / "results" / "tiny")
    ids = publish(runs, results)
    assert sorted(os.listdir(results)) == sorted([RUNS_FILE, SWEEP_FILE, "runs.jsonl.lock"])
    before = load_records(runs)
    for path in (results, os.path.join(results, RUNS_FILE)):
        after = load_records(path)
        assert [r["run_id"] for r in after] == [r["run_id"] for r in before] == ids
        assert [_without_wall_clock(r) for r in after] == [_without_wall_clock(r) for r in before]
        assert all(r["dir"] == os.path.abspath(results) for r in after)


def test_publishing_again_replaces_and_never_duplicates(runs, tmp_path):
    results = str(tmp_path / "tiny")
    publish(runs, results)
    first = open(os.path.join(results, RUNS_FILE)).read()
    publish(runs, results)
    assert open(os.path.join(results, RUNS_FILE)).read() == first  # unchanged runs: nothing written
    record = load_records(runs)[0]
    record["final"]["test"]["mse"] = 123.0
    publish([record], results)
    lines = open(os.path.join(results, RUNS_FILE)).read().splitlines()
    assert len(lines) == 2
    assert [r["final"]["test"]["mse"] for r in load_records(results) if r["run_id"] == record["run_id"]] == [123.0]


def test_the_manifest_orders_and_filters_the_published_runs(runs, tmp_path):
    results = str(tmp_path / "tiny")
    publish(runs, results)
    manifest = json.load(open(os.path.join(results, SWEEP_FILE)))
    ids = manifest["runs"]
    manifest["runs"] = [ids[1], "not-published"]
    json.dump(manifest, open(os.path.join(results, SWEEP_FILE), "w"))
    assert [r["run_id"] for r in load_records(results)] == [ids[1]]
    assert [r["run_id"] for r in load_records(os.path.join(results, RUNS_FILE))] == ids  # the file alone: all


def test_a_damaged_line_is_skipped_with_a_problem_naming_it(runs, tmp_path):
    results = str(tmp_path / "tiny")
    publish(runs, results)
    path = os.path.join(results, RUNS_FILE)
    with open(path, "a") as f:
        f.write('{"run_id":"cut-short","sta')  # a write cut short
    records, problems = load_records_checked(path)
    assert len(records) == 2
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3: not valid JSON")
    publish([dict(load_records(runs)[0], run_id="another")], results)  # appending after it keeps lines whole
    records, problems = load_records_checked(path)
    assert [r["run_id"] for r in records][-1] == "another" and len(problems) == 1


def test_the_committed_studies_are_published_and_small():
    """Every committed study loads cleanly; a run costs at most 100 kB of runs.jsonl (10 kB in a study of more
    than 300 runs, which must thin its records through SweepSpec.published), and results/ stays under 30 MB
    (the init study's ~2000 runs at its full design take about 13 MB)."""
    total = 0
    for study in sorted(os.listdir(os.path.join(ROOT, "results"))):
        folder = os.path.join(ROOT, "results", study)
        records, problems = load_records_checked(folder)
        assert records and not problems, (study, problems[:3])
        size = os.path.getsize(os.path.join(folder, RUNS_FILE))
        assert size / len(records) <= (10_000 if len(records) > 300 else 100_000), (study, size / len(records))
        total += size + os.path.getsize(os.path.join(folder, SWEEP_FILE))
    assert total <= 30_000_000
    for path in ("docs",):
        for root, _dirs, files in os.walk(os.path.join(ROOT, path)):
            assert not {"result.json", "model.pt", "sweep.lock"} & set(files), root


# ---------------------------------------------------------------------------------------------- kernels
def test_kernel_pin_values_are_validated():
    assert parse_kernel_pin("legacy") == {"*": "legacy"}
    assert parse_kernel_pin("l0.train=fused,l1_reverse.eval=native") == {"l0.train": "fused",
                                                                          "l1_reverse.eval": "native"}
    for bad in ("fast", "l0.train=auto", "l0=fused", "l0.test=fused"):
        with pytest.raises(ConfigError, match="kernel: expected one of"):
            tiny(kernel=bad).validate()


def test_the_kernel_is_not_part_of_the_run_id_nor_a_compared_factor():
    assert tiny(kernel="legacy").run_id == tiny().run_id
    assert varied_fields([tiny().to_dict(), tiny(kernel="reference").to_dict()]) == []


def test_dispatch_records_what_ran_and_legacy_puts_torchs_op_first():
    import recnorm
    from recnorm import kernels

    model = torch.nn.Sequential(recnorm.LSTM(3, 4, num_layers=2, bidirectional=True))
    x = torch.randn(5, 2, 3)
    with kernel_dispatch(model, "legacy") as log:
        model(x)[0].sum().backward()
        with torch.no_grad():
            model(x)
    assert log.kernels() == {layer: {"eval": ["native"], "train": ["native"]}
                             for layer in ("l0", "l0_reverse", "l1", "l1_reverse")}
    assert log.pin() == ",".join(f"{layer}.{phase}=native" for layer in ("l0", "l0_reverse", "l1", "l1_reverse")
                                 for phase in ("eval", "train"))
    with kernel_dispatch(model, "l0.train=reference,l1.eval=fused") as log:
        model(x)[0].sum().backward()
        with torch.no_grad():
            model(x)
    assert log.kernels()["l0"]["train"] == ["reference"] and log.kernels()["l1"]["eval"] == ["fused"]
    assert not kernels._ROUTES  # the policy is gone after the block


def test_a_run_records_provenance_and_its_config_replays_its_kernels(tmp_path):
    result = train_and_evaluate(tiny(), str(tmp_path))
    p = result.provenance
    assert set(p) >= {"commit", "dirty", "versions", "cpu", "host", "ray_node", "kernel", "kernels", "kernel_pin"}
    assert p["commit"] is None or len(p["commit"]) == 40
    assert p["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert p["ray_node"] is None and p["kernel"] == "auto"
    assert set(p["kernels"]) == {"l0"} and set(p["kernels"]["l0"]) == {"train", "eval"}
    assert json.load(open(tmp_path / "config.json"))["kernel"] == p["kernel_pin"]
    assert read_config(str(tmp_path / "result.json"))["kernel"] == p["kernel_pin"]
    again = train_and_evaluate(RunConfig.from_dict(read_config(str(tmp_path / "config.json"))), str(tmp_path / "b"))
    assert again.final == result.final and again.provenance["kernels"] == p["kernels"]


def test_a_run_records_the_fused_kernels_gemm_settings(tmp_path, monkeypatch):
    """The settings that round the fused kernels' products differently (MKL's packed W_hh, the transposed
    weight gradients, the oneDNN rule, each extension's vector build) are recorded as the extension that ran
    had them, not as constants."""
    from recnorm.kernels import fused

    monkeypatch.delenv("RECNORM_FUSED_ONEDNN", raising=False)
    ext = fused.load_extension("lstm")
    if ext is None:
        pytest.skip("the fused LSTM extension is not available")
    result = train_and_evaluate(tiny(kernel="fused"), str(tmp_path / "a"))
    # the build that ran is the suffix of the loaded module's name; one not loaded is what a build would be
    builds = {family: e.module.__name__.rsplit("_", 1)[1] if e.module is not None else fused.build_flags(family)[0]
              for family, e in fused.EXTENSIONS.items()}
    assert result.provenance["gemm"] == {"mkl_pack": ext.gemm_packed(), "wgrad_transposed": ext.wgrad_transposed(),
                                         "onednn_rule": "current", "build": builds}
    before = ext.wgrad_transposed()
    ext.set_wgrad_transposed(not before)
    try:
        flipped = train_and_evaluate(tiny(kernel="fused"), str(tmp_path / "b"))
    finally:
        ext.set_wgrad_transposed(before)
    assert flipped.provenance["gemm"]["wgrad_transposed"] is (not before)
    legacy = train_and_evaluate(tiny(kernel="legacy"), str(tmp_path / "c"))  # replays with the rule it ran with
    assert legacy.provenance["gemm"]["onednn_rule"] == "2026-12-04"
    monkeypatch.setenv("RECNORM_FUSED_ONEDNN", "0")
    assert fused.gemm_setting()["onednn_env"] == "0"


def test_a_run_records_its_chunk_floor_and_replays_with_it(tmp_path, monkeypatch):
    from recnorm.kernels import fused

    monkeypatch.delenv("RECNORM_FUSED_CHUNK_ROWS", raising=False)
    chunks = []
    real = fused._chunk_rows
    monkeypatch.setattr(fused, "_chunk_rows", lambda n: chunks.append((n, real(n))) or chunks[-1][1])
    result = train_and_evaluate(tiny(kernel="fused"), str(tmp_path / "a"))
    assert result.provenance["chunk_floor"] == fused.CHUNK_FLOOR and "chunk_rows_env" not in result.provenance
    assert chunks and all(c == max(fused.CHUNK_FLOOR, n // 4) for n, c in chunks)
    assert json.load(open(tmp_path / "a" / "config.json"))["chunk_floor"] == fused.CHUNK_FLOOR
    assert read_config(str(tmp_path / "a" / "result.json"))["chunk_floor"] == fused.CHUNK_FLOOR
    # a run asking for its own floor trains with it (64 rows: a quarter is 16, so a floor of 40 decides)
    chunks.clear()
    result = train_and_evaluate(tiny(kernel="fused", chunk_floor=40), str(tmp_path / "b"))
    assert chunks and {c for _, c in chunks} == {40} and result.provenance["chunk_floor"] == 40
    assert fused._CHUNK_FLOOR == fused.CHUNK_FLOOR  # restored after the run
    # the floor is how the run is executed, not what it computes: the run id does not change
    assert tiny(chunk_floor=40).run_id == tiny().run_id
    with pytest.raises(ConfigError, match="chunk_floor: expected None or an int >= 1, got 0"):
        tiny(chunk_floor=0).validate()


def test_a_record_without_a_chunk_floor_replays_with_the_old_floor(tmp_path, caplog):
    from recnorm.kernels.fused import LEGACY_CHUNK_FLOOR

    path = str(tmp_path / "result.json")
    record = {"run_id": "r", "config": {k: v for k, v in tiny().to_dict().items() if k != "chunk_floor"},
              "provenance": {"kernel_pin": "l0.train=fused,l0.eval=fused"}}
    json.dump(record, open(path, "w"))
    assert LEGACY_CHUNK_FLOOR == 2048 and read_config(path)["chunk_floor"] == 2048
    record["provenance"].update(chunk_floor=512, chunk_rows_env="9")
    json.dump(record, open(path, "w"))
    with caplog.at_level("WARNING", logger="recnorm.experiments.results"):
        assert read_config(path)["chunk_floor"] == 512
    assert "RECNORM_FUSED_CHUNK_ROWS=9" in caplog.text
    # a config the user wrote (no provenance) keeps the library's floor
    json.dump(tiny().to_dict(), open(path, "w"))
    assert read_config(path)["chunk_floor"] is None


def test_read_config_names_a_published_run(runs, tmp_path):
    results = str(tmp_path / "tiny")
    publish(runs, results)
    record = load_records(results)[1]
    for ref in (f"{results}#{record['run_id']}", f"{results}/{RUNS_FILE}#{record['run_id']}"):
        config = read_config(ref)
        assert RunConfig.from_dict(config).run_id == record["run_id"]
        assert config["kernel"] == record["provenance"]["kernel_pin"]
    with pytest.raises(ValueError, match="no run 'nope'"):
        read_config(f"{results}#nope")


# ---------------------------------------------------------------------------------------------- sweeps
def test_a_sweep_publishes_its_finished_runs_even_when_interrupted(tmp_path, monkeypatch):
    from recnorm.experiments import sweep

    spec = SweepSpec(name="tiny", base=tiny(), grids=[{"seed": [0, 1, 2]}])
    results, out = str(tmp_path / "results"), str(tmp_path / "out")
    real, calls = sweep._run_one, []

    def interrupted_after_two(config, run_dir):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(config)
        return real(config, run_dir)

    monkeypatch.setattr(sweep, "_run_one", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, results_dir=results)
    assert len(load_records(results)) == 2
    monkeypatch.setattr(sweep, "_run_one", real)
    run_sweep(spec, out, results_dir=results)
    assert len(load_records(results)) == 3
    assert len(open(os.path.join(results, RUNS_FILE)).read().splitlines()) == 3


# ---------------------------------------------------------------------------------------------- the hook
def test_the_step_hook_sees_every_step_records_its_output_and_leaves_the_trajectory(tmp_path):
    config = tiny(norm="batch", steps=4, h0_noise=0.1)  # training draws from the RNG at every step
    plain = train_and_evaluate(config, str(tmp_path / "plain"))

    def hook(step, model, info):
        model(info["batch"].x)  # a training-mode forward moves the running averages,
        torch.rand(3)  # this moves the RNG,
        model.eval()  # and this the mode: none of them may reach the training
        return {"loss": info["loss"]} if step % 2 == 0 else None

    hooked = train_and_evaluate(config, str(tmp_path / "hooked"), on_step=hook)
    assert hooked.train["loss"] == plain.train["loss"] and hooked.final == plain.final
    assert hooked.extras == {"on_step": [{"step": 2, "loss": pytest.approx(plain.train["loss"][1], rel=1e-5)},
                                         {"step": 4, "loss": pytest.approx(plain.train["loss"][3], rel=1e-5)}]}
    assert plain.extras == {}


def test_every_function_of_the_run_files_is_at_most_80_lines():
    import ast

    for name in ("train", "results", "sweep", "provenance", "migrate"):
        path = os.path.join(ROOT, "src", "recnorm", "experiments", f"{name}.py")
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, (name, node.name)


def test_recnorm_train_re_runs_a_published_run(runs, tmp_path):
    from recnorm.cli import main

    results = str(tmp_path / "tiny")
    publish(runs, results)
    record = load_records(results)[0]
    assert main(["train", "--config", f"{results}/{RUNS_FILE}#{record['run_id']}", "--out", str(tmp_path / "re")]) == 0
    again = load_records(str(tmp_path / "re"))[0]
    assert again["run_id"] == record["run_id"] and again["final"] == record["final"]


def test_the_ray_node_and_the_host_are_recorded(monkeypatch):
    import socket
    import sys
    import types

    from recnorm.experiments import provenance

    assert provenance.collect("auto")["ray_node"] is None or "ray" in sys.modules
    context = types.SimpleNamespace(get_node_id=lambda: "f00d")
    fake = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake)
    info = provenance.collect("auto")
    assert info["ray_node"] == "f00d" and info["host"] == socket.gethostname()


def test_recnorm_sweep_publishes_with_results(runs, tmp_path):
    from recnorm.cli import main

    results = str(tmp_path / "results" / "tiny")
    spec = os.path.join(runs, SWEEP_FILE)  # a manifest embeds its spec; its runs are finished: nothing to run
    assert main(["sweep", "--spec", spec, "--out", runs, "--workers", "1", "--results", results]) == 0
    assert [r["run_id"] for r in load_records(results)] == [r["run_id"] for r in load_records(runs)]


def test_a_run_without_a_pin_from_another_dispatch_rule_is_named_on_re_run(tmp_path, caplog):
    from recnorm.experiments.provenance import rule_digest

    record = {"run_id": "r", "config": tiny().to_dict(), "provenance": {"kernel_pin": None, "dispatch_rule": "0" * 10}}
    path = str(tmp_path / "result.json")
    json.dump(record, open(path, "w"))
    with caplog.at_level("WARNING", logger="recnorm.experiments.results"):
        assert read_config(path)["kernel"] == "auto"
    assert "ran under another dispatch rule" in caplog.text
    caplog.clear()
    record["provenance"]["dispatch_rule"] = rule_digest()
    json.dump(record, open(path, "w"))
    with caplog.at_level("WARNING", logger="recnorm.experiments.results"):
        read_config(path)
    assert caplog.text == ""


def test_a_sweep_declares_what_its_published_records_keep(tmp_path):
    """SweepSpec.published thins the curves and drops named fields of runs.jsonl; the run directory keeps all."""
    record = {"run_id": "r", "train": {"step": list(range(1, 101)), "loss": [float(i) for i in range(100)]},
              "diagnostics": {"batch_stats": {"init": [1, 2]}, "grad_flow": [3]}, "final": {"test": {"accuracy": 0.5}}}
    packed = pack_record(record, 10, ["diagnostics.batch_stats", "diagnostics.absent", "nothing.here"])
    assert packed["diagnostics"] == {"grad_flow": [3]} and "batch_stats" in record["diagnostics"]  # input untouched
    assert len(packed["train"]["loss"]) == 11 and packed["train"]["loss"][-1] == 99.0 and packed["final"] == record["final"]
    base = RunConfig(task="digits", hidden_size=4, steps=3, eval_every=3, batch_size=8, eval_batch_size=16,
                     task_options={"train_size": 32, "valid_size": 16, "test_size": 16}, diag_every=None)
    spec = SweepSpec(name="thin", base=base, grids=[{"seed": [0]}],
                     published={"max_points": 2, "drop": ["diagnostics", "provenance.cpu"]})
    assert SweepSpec.from_dict(spec.to_dict()).published == spec.published
    run_sweep(spec, str(tmp_path / "sweep"), results_dir=str(tmp_path / "results"))
    line = json.loads(open(tmp_path / "results" / RUNS_FILE).readline())
    assert "diagnostics" not in line and "cpu" not in line["provenance"] and "commit" in line["provenance"]
    assert len(line["train"]["step"]) <= 3
    full = load_records(str(tmp_path / "sweep"))[0]
    assert "diagnostics" in full and "cpu" in full["provenance"]
    with pytest.raises(ConfigError, match="published: unknown key"):
        run_sweep(SweepSpec(name="bad", base=base, published={"points": 2}), str(tmp_path / "bad"))


def test_legacy_replays_the_fused_lstm_gemm_rule_it_ran_with():
    """Runs marked "legacy" predate the fused LSTM's current oneDNN rule; inside their dispatch block the
    kernel follows the earlier rule (GEMMs through oneDNN and MKL round differently), and only there."""
    import recnorm
    from recnorm.kernels import fused

    model = torch.nn.Sequential(recnorm.LSTM(3, 4, norm="layer"))
    with kernel_dispatch(model, "legacy"):
        assert fused._ONEDNN_RULE == "2026-12-04"
    with kernel_dispatch(model, "fused"):
        assert fused._ONEDNN_RULE == "current"
    assert fused._ONEDNN_RULE == "current"
