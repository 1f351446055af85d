"""Tests of sweeps: grid expansion, parallel workers, failures, and resuming after a kill or a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from recnorm.experiments.config import ConfigError, RunConfig
from recnorm.experiments.results import load_records, read_json
from recnorm.experiments.sweep import ERROR_FILE, SweepSpec, load_spec, run_sweep, varied_fields
from recnorm.experiments.train import train_and_evaluate

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def small_spec(steps: int = 3, seeds=(0, 1)) -> SweepSpec:
    base = RunConfig(task="adding", task_options={"length": 8, "valid_size": 16, "test_size": 16}, hidden_size=8,
                     batch_size=8, steps=steps, eval_every=max(1, steps // 2), eval_batch_size=16, diag_every=None,
                     popstat_batches=1)
    return SweepSpec(name="small", base=base,
                     grids=[{"norm": [None, "layer"], "seed": list(seeds)},
                            {"norm": "batch", "norm_kwargs.gain_init": [0.1, 1.0], "seed": list(seeds)}])


def curves(out_dir: str) -> dict:
    return {r["run_id"]: (r["train"]["loss"], r["final"]) for r in load_records(out_dir)}


def started(out_dir: str) -> dict:
    return {r["run_id"]: r["timing"]["started_at"] for r in load_records(out_dir)}


def test_expand_grid_product_union_and_dedup():
    spec = small_spec()
    configs = spec.expand()
    assert len(configs) == 2 * 2 + 2 * 2
    assert len({c.run_id for c in configs}) == len(configs)
    assert {c.norm_kwargs.get("gain_init") for c in configs if c.norm == "batch"} == {0.1, 1.0}
    # A duplicate grid adds nothing.
    spec.grids.append({"norm": None, "seed": [0]})
    assert [c.run_id for c in spec.expand()] == [c.run_id for c in configs]
    assert varied_fields([c.to_dict() for c in configs]) == ["norm", "norm_kwargs.gain_init", "seed"]


def test_expand_validates_before_running(tmp_path):
    spec = small_spec()
    spec.grids = [{"cell": ["lstm", "conv"]}]
    with pytest.raises(ConfigError, match=r"grids\[0\] \{'cell': 'conv'\}: cell: expected one of"):
        run_sweep(spec, str(tmp_path))
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_spec_json_roundtrip(tmp_path):
    spec = small_spec()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    again = load_spec(str(path))
    assert [c.run_id for c in again.expand()] == [c.run_id for c in spec.expand()]
    with pytest.raises(ConfigError, match="unknown key"):
        SweepSpec.from_dict({"name": "x", "gird": {}})


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    spec = small_spec()
    ids = [c.run_id for c in spec.expand()]
    full = str(tmp_path / "full")
    assert run_sweep(spec, full, workers=1).finished

    part = str(tmp_path / "part")
    first = run_sweep(spec, part, workers=1, max_runs=3)  # "killed" after three runs...
    assert len(first.completed) == 3
    # ...while a fourth was in flight: its directory holds a config and a half-written file, no result.
    partial = os.path.join(part, "runs", ids[3])
    os.makedirs(partial)
    with open(os.path.join(partial, "config.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(partial, "result.json.123.tmp"), "w") as f:
        f.write('{"trunc')
    before = started(part)

    second = run_sweep(spec, part, workers=1)
    assert sorted(second.skipped) == sorted(first.completed)  # no finished run is repeated
    assert sorted(second.completed) == sorted(set(ids) - set(first.completed))
    assert {k: v for k, v in started(part).items() if k in before} == before
    assert not os.path.exists(os.path.join(partial, "result.json.123.tmp"))  # partial dir redone cleanly
    assert curves(part) == curves(full)  # same set of results, bit for bit
    assert read_json(os.path.join(part, "sweep.json"))["runs"] == ids

    third = run_sweep(spec, part, workers=1)
    assert third.completed == [] and sorted(third.skipped) == sorted(ids)


def test_failed_run_is_recorded_and_retried(tmp_path):
    spec = small_spec(seeds=(0,))
    # length 1 passes config validation (option names) but the task rejects it when built.
    spec.grids = [{"norm": [None], "task_options.length": [8, 1]}]
    outcome = run_sweep(spec, str(tmp_path), workers=1)
    assert len(outcome.completed) == 1 and len(outcome.failed) == 1
    (bad_id, message), = outcome.failed.items()
    assert "length" in message
    error = read_json(os.path.join(tmp_path, "runs", bad_id, ERROR_FILE))
    assert "Traceback" in error["traceback"]
    assert not os.path.exists(os.path.join(tmp_path, "runs", bad_id, "result.json"))
    again = run_sweep(spec, str(tmp_path), workers=1)
    assert list(again.failed) == [bad_id] and again.skipped == outcome.completed


def _spawn_sweep(spec_path: str, out: str, workers: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "recnorm", "sweep", "--spec", spec_path, "--out", out,
                             "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def test_killed_parallel_sweep_resumes_without_repeats(tmp_path):
    spec = small_spec(steps=40, seeds=(0, 1, 2))
    ids = [c.run_id for c in spec.expand()]
    spec_path = str(tmp_path / "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec.to_dict(), f)
    out = str(tmp_path / "sweep")

    proc = _spawn_sweep(spec_path, out, workers=2)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(load_records(out) if os.path.exists(out) else []) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep finished before it could be killed; make the runs longer"
        os.kill(proc.pid, signal.SIGKILL)  # kill the sweep process only: its workers must notice and exit
        proc.wait(10)
        time.sleep(1.5)  # the workers' parent watchdog polls every 0.5 s
        done_before = started(out)
        assert 2 <= len(done_before) < len(ids)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this test's process group still alive
        except ProcessLookupError:
            pass

    # Workers exited with the sweep: nothing appears after the kill.
    time.sleep(0.5)
    assert started(out) == done_before

    outcome = run_sweep(load_spec(spec_path), out, workers=1)
    assert sorted(outcome.skipped) == sorted(done_before)
    assert sorted(outcome.completed) == sorted(set(ids) - set(done_before))
    after = started(out)
    assert {k: after[k] for k in done_before} == done_before
    assert sorted(after) == sorted(ids)
    # Results computed by spawned workers before the kill equal those computed in-process.
    by_id = {c.run_id: c for c in spec.expand()}
    for run_id in sorted(done_before)[:2]:
        reference = train_and_evaluate(by_id[run_id], str(tmp_path / "reference" / run_id))
        assert curves(os.path.join(out, "runs", run_id))[run_id] == (reference.train["loss"], reference.final)


# ---------------------------------------------------------------------------------------------- failures
def _spawn(spec: SweepSpec, tmp_path, out: str, workers: int, log_name: str = "sweep") -> tuple:
    """A real ``recnorm sweep`` in its own process group (as a terminal's foreground job), output to files."""
    spec_path = str(tmp_path / f"{log_name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec.to_dict(), f)
    stdout, stderr = open(tmp_path / f"{log_name}.out", "w+"), open(tmp_path / f"{log_name}.err", "w+")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), RECNORM_KERNEL="reference")
    proc = subprocess.Popen([sys.executable, "-m", "recnorm", "sweep", "--spec", spec_path, "--out", out,
                             "--workers", str(workers)], env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_interruptible)
    return proc, stdout, stderr


def _interruptible() -> None:
    # As in a terminal's foreground job. (A test session started in the background by a shell, `cmd &`,
    # inherits an ignored SIGINT, and Python then keeps ignoring it.)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_second_sweep_on_a_busy_directory_is_refused_and_deletes_nothing(tmp_path):
    from recnorm.experiments.sweep import LOCK_FILE, SweepBusyError

    spec = small_spec(steps=60, seeds=(0, 1))
    out = str(tmp_path / "sweep")
    proc, _, stderr = _spawn(spec, tmp_path, out, workers=1)
    try:
        # The first sweep is running: it holds the lock and has a run in flight (config.json, no result).
        _wait_for(lambda: os.path.exists(os.path.join(out, "runs")) and any(
            os.path.exists(os.path.join(out, "runs", d, "config.json")) for d in os.listdir(os.path.join(out, "runs"))))
        assert os.path.exists(os.path.join(out, LOCK_FILE))
        in_flight = set(os.listdir(os.path.join(out, "runs")))
        with pytest.raises(SweepBusyError, match=rf"in use by another sweep \(pid {proc.pid}, running since"):
            run_sweep(spec, out, workers=1)
        assert in_flight <= set(os.listdir(os.path.join(out, "runs")))  # nothing of the first sweep deleted
        assert proc.wait(180) == 0, open(stderr.name).read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(load_records(out)) == len(spec.expand())  # the first sweep finished every run
    again = run_sweep(spec, out, workers=1)  # the lock went with its holder
    assert again.completed == [] and len(again.skipped) == len(spec.expand())


def test_damaged_results_are_named_skipped_by_readers_and_run_again(tmp_path):
    from recnorm.experiments.results import load_records_checked

    spec = small_spec(seeds=(0,))
    out = str(tmp_path / "sweep")
    ids = [c.run_id for c in spec.expand()]
    assert run_sweep(spec, out, workers=1).finished
    truncated = os.path.join(out, "runs", ids[0], "result.json")
    text = open(truncated).read()
    open(truncated, "w").write(text[: len(text) // 2])
    emptied = os.path.join(out, "runs", ids[1], "result.json")
    open(emptied, "w").write("{}")

    records, problems = load_records_checked(out)
    assert len(records) == len(ids) - 2
    assert len(problems) == 2
    assert problems[0].startswith(truncated + ": not valid JSON")
    assert problems[1].startswith(emptied + ": not a valid result: missing 'run_id'")

    events = []
    outcome = run_sweep(spec, out, workers=1, progress=lambda e, info: events.append((e, info)))
    assert sorted(outcome.completed) == sorted(ids[:2])
    assert sorted(outcome.skipped) == sorted(ids[2:])
    start = events[0][1]
    assert [m.split(":")[0] for m in start["redo"]] == [truncated, emptied]
    assert len(load_records_checked(out)[0]) == len(ids) and not load_records_checked(out)[1]


def test_ctrl_c_stops_a_parallel_sweep_promptly_and_keeps_finished_runs(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it), pressed three times in
    a row (the second and third arrive while the first is being handled): the sweep exits within a few seconds with status 130 and one line, no traceback; no worker is
    left; every finished result is intact, and the next invocation runs only what is missing."""
    spec = small_spec(steps=150, seeds=(0, 1, 2))
    ids = [c.run_id for c in spec.expand()]
    out = str(tmp_path / "sweep")
    proc, _, stderr = _spawn(spec, tmp_path, out, workers=2)
    try:
        _wait_for(lambda: os.path.exists(out) and len(load_records(out)) >= 1)
        assert proc.poll() is None, "the sweep finished before it could be interrupted; make the runs longer"
        t0 = time.time()
        for _ in range(3):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.3)
        rc = proc.wait(30)
        elapsed = time.time() - t0
        _wait_for(lambda: not _group_alive(proc.pid), timeout=10)  # no worker outlives the sweep
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    err = open(stderr.name).read()
    assert rc == 130, err
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in err and "interrupted" in err, err
    finished = [r["run_id"] for r in load_records(out)]
    assert 1 <= len(finished) < len(ids)
    events = []
    outcome = run_sweep(spec, out, workers=1, max_runs=0, progress=lambda e, info: events.append(info))
    assert sorted(outcome.skipped) == sorted(finished)
    assert events[0]["skipped"] == len(finished) and events[0]["redo"] == []  # the rest runs next time


def test_a_worker_that_dies_fails_its_run_and_is_replaced(tmp_path, monkeypatch):
    """A worker killed in the middle of a run (by the OS, say) fails that run only; the others finish."""
    (tmp_path / "dying_task.py").write_text(
        "import os\n"
        "from recnorm.experiments.tasks.adding import AddingTask\n"
        "from recnorm.experiments.tasks.base import register_task\n"
        "@register_task\n"
        "class DyingTask(AddingTask):\n"
        "    name = 'dying_adding'\n"
        "    def batches(self, split, batch_size, seed=0):\n"
        "        if split == 'train':\n"
        "            os._exit(9)\n"
        "        return super().batches(split, batch_size, seed)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = small_spec(seeds=(0, 1))
    spec.imports = ["dying_task"]
    spec.grids = [{"task": ["dying_adding"], "seed": [0]}, {"task": ["adding"], "seed": [0, 1]}]
    outcome = run_sweep(spec, str(tmp_path / "sweep"), workers=2)
    assert len(outcome.completed) == 2 and len(outcome.failed) == 1
    assert all("worker process died (exit code 9)" in m for m in outcome.failed.values())
    assert all(run_id.startswith("dying_adding-") for run_id in outcome.failed)


def test_compacted_keeps_every_run_in_order_in_fewer_grids():
    from recnorm.experiments.sweep import compact_grids

    base = small_spec().base
    # built one run at a time, as a tuned final sweep is, in an order that is not one product
    spec = SweepSpec(name="s", base=base, grids=[
        {"norm": [n], "init_gain": [g], "hidden_size": [h], "seed": [s]}
        for s in (0, 1) for n in (None, "layer") for g in (0.5, 1.0, 2.0) for h in (4, 8)
        if not (s == 1 and n == "layer" and g == 1.0 and h == 8)])  # one run missing: that grid cannot merge whole
    compact = spec.compacted()
    assert [c.run_id for c in compact.expand()] == [c.run_id for c in spec.expand()]
    assert len(spec.grids) == 23 and len(compact.grids) < 8
    # 1 and 1.0 are different values in a config: never merged as if equal
    assert len(compact_grids([{"init_gain": [1], "seed": [0]}, {"init_gain": [1.0], "seed": [1]}])) == 2
    # neighbours differing in two fields do not merge into a product they are not
    pair = [{"norm": [None], "seed": [0]}, {"norm": ["layer"], "seed": [1]}]
    assert compact_grids(pair) == pair


def test_migrate_compact_rewrites_a_published_manifest(tmp_path):
    from recnorm.experiments.migrate import main
    from recnorm.experiments.results import write_json_atomic

    spec = SweepSpec(name="s", base=small_spec().base,
                     grids=[{"norm": [n], "seed": [s]} for s in range(3) for n in (None, "layer")])
    folder = tmp_path / "results" / "s"
    folder.mkdir(parents=True)
    runs = [c.run_id for c in spec.expand()]
    write_json_atomic(str(folder / "sweep.json"), {"name": "s", "spec": spec.to_dict(), "runs": runs})
    assert main(["--compact", "--results", str(tmp_path / "results")]) == 0
    manifest = read_json(str(folder / "sweep.json"))
    assert manifest["runs"] == runs and len(manifest["spec"]["grids"]) == 3  # one per seed: seeds run outermost
    assert [c.run_id for c in SweepSpec.from_dict(manifest["spec"]).expand()] == runs
    # a manifest whose run list disagrees with its spec is left as it is
    write_json_atomic(str(folder / "sweep.json"), {"name": "s", "spec": spec.to_dict(), "runs": runs[::-1]})
    with pytest.raises(ValueError, match="left as it is"):
        main(["--compact", "--results", str(tmp_path / "results")])
    assert len(read_json(str(folder / "sweep.json"))["spec"]["grids"]) == 6
