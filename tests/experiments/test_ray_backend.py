"""The Ray backend against a local Ray instance with 2 CPUs: a sweep, and a driver killed and resumed.

One Ray instance serves the whole module (starting one takes ~10 s); its processes must be gone after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

if os.environ.get("RECNORM_REQUIRE_RAY") == "1":  # ./run test (and so CI): a missing Ray fails, not skips
    import psutil
    import ray
else:
    ray = pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")

from recnorm.cli import main  # noqa: E402
from recnorm.experiments.config import RunConfig  # noqa: E402
from recnorm.experiments.ray_backend import RayBackend, write_run_files  # noqa: E402
from recnorm.experiments.results import load_records  # noqa: E402
from recnorm.experiments.sweep import SweepSpec, load_spec, run_sweep  # noqa: E402
from recnorm.experiments.train import train_and_evaluate  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs for the module; afterwards none of its processes may survive."""
    assert not ray.is_initialized()
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = SRC + (os.pathsep + env_path if env_path else "")  # the workers import this tree
    # Children this process had before (a multiprocessing resource tracker of an earlier test, say) are not Ray's.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 * 1024,
             logging_level="warning")
    children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ["PYTHONPATH"] = env_path
        gone, alive = psutil.wait_procs(children, timeout=20)
        for p in alive:  # only processes this fixture's Ray started
            p.kill()
        assert not alive, f"Ray processes survived ray.shutdown(): {[p.pid for p in alive]}"


def small_spec(steps: int = 3, seeds=(0, 1)) -> SweepSpec:
    base = RunConfig(task="adding", task_options={"length": 8, "valid_size": 16, "test_size": 16}, hidden_size=8,
                     batch_size=8, steps=steps, eval_every=max(1, steps // 2), eval_batch_size=16, diag_every=None,
                     popstat_batches=1)
    return SweepSpec(name="small", base=base, grids=[{"norm": [None, "layer"], "seed": list(seeds)}])


def finished(out_dir: str) -> dict:
    return {r["run_id"]: r["timing"]["started_at"] for r in load_records(out_dir)} if os.path.exists(out_dir) else {}


def test_ray_sweep_matches_local_runs(cluster, tmp_path):
    spec = small_spec()
    out = str(tmp_path / "sweep")
    outcome = run_sweep(spec, out, backend=RayBackend())
    assert outcome.finished and len(outcome.completed) == 4
    records = {r["run_id"]: r for r in load_records(out)}
    assert sorted(records) == sorted(c.run_id for c in spec.expand())
    for config in spec.expand()[:2]:  # the files came back whole: the same results as a run in this process
        local = train_and_evaluate(config.replace(threads=1), str(tmp_path / "local" / config.run_id))
        assert records[config.run_id]["train"]["loss"] == local.train["loss"]
        assert records[config.run_id]["final"] == local.final
    again = run_sweep(spec, out, backend=RayBackend())
    assert again.completed == [] and sorted(again.skipped) == sorted(records)


def test_killed_driver_resumes_without_losing_or_repeating_runs(cluster, tmp_path):
    spec = small_spec(steps=40, seeds=(0, 1, 2, 3))
    ids = [c.run_id for c in spec.expand()]
    spec_path = str(tmp_path / "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec.to_dict(), f)
    out = str(tmp_path / "sweep")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "recnorm", "sweep", "--spec", spec_path, "--out", out,
                             "--backend", "ray", "--address", cluster, "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(finished(out)) < 2 and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the driver finished before it could be killed; make the runs longer"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only; Ray cancels its tasks
        proc.wait(10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done_before = finished(out)
    assert 2 <= len(done_before) < len(ids)
    time.sleep(1.0)
    assert finished(out) == done_before  # workers never write into the sweep directory

    outcome = run_sweep(load_spec(spec_path), out, backend=RayBackend())
    assert sorted(outcome.skipped) == sorted(done_before)  # no finished run repeated
    assert sorted(outcome.completed) == sorted(set(ids) - set(done_before))  # none lost
    after = finished(out)
    assert {k: after[k] for k in done_before} == done_before and sorted(after) == sorted(ids)


def test_returned_files_stay_inside_the_run_directory(tmp_path):
    run_dir = str(tmp_path / "run")
    write_run_files(run_dir, {"result.json": b"{}", "config.json": b"{}", "sub/x.txt": b"x"})
    assert sorted(os.listdir(run_dir)) == ["config.json", "result.json", "sub"]
    with pytest.raises(ValueError, match="outside its run directory"):
        write_run_files(run_dir, {"../escape.json": b"{}"})


def test_missing_ray_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import recnorm.experiments.ray_backend as rb

    monkeypatch.setattr(rb, "ray_available", lambda: False)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(small_spec().to_dict()))
    assert main(["sweep", "--spec", str(spec_path), "--out", str(tmp_path / "out"), "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'recnorm[ray]'" in err
    assert not (tmp_path / "out").exists()
