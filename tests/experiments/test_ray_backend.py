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
    auth_mode = os.environ.get("RAY_AUTH_MODE")  # a new local instance sets it to "token" in this process
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
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode
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


def _free_ports(n: int) -> list:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tails(folder: str, pattern: str, lines: int = 15) -> str:
    import glob

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "**", pattern), recursive=True)):
        with open(path, errors="replace") as f:
            out.append(f"== {path}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(out)


def test_ray_client_addresses_work_with_the_extra(tmp_path):
    """``--address ray://HOST:PORT`` against a head started the way users start one (``ray start --head``, whose
    Ray client server listens on ``--ray-client-server-port``). The head is this test's own, on free ports and
    in its own temporary folder, not the module's shared instance: a client session on that instance once failed
    to initialize in CI after other tests had used it. A failure prints the client servers' logs."""
    import shutil
    import socket
    import tempfile

    import secrets

    gcs, client, *others = _free_ports(8)
    temp = tempfile.mkdtemp(prefix="rn-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # as Ray's docs set up a cluster
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **auth}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard", "false",
         "--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024), "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--ray-client-server-port", str(client), "--temp-dir", temp,
         *[f"--{name}={port}" for name, port in zip(
             ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "node-manager-port", "object-manager-port"], others)]],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, f"ray start exited with {head.returncode}\n{_tails(temp, '*.err')}"
                assert time.time() < deadline, f"no Ray client server after 180 s\n{_tails(temp, '*.err')}"
                time.sleep(0.5)
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(json.dumps(small_spec(steps=1, seeds=(0,)).to_dict()))
        out = tmp_path / "out"
        args = ["sweep", "--spec", str(spec_path), "--out", str(out), "--backend", "ray", "--address",
                f"ray://127.0.0.1:{client}"]
        # no token mode here: the head drops the requests, and the one line says what a token cluster needs
        refused, _ = _cli(args, timeout=300, RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=None,
                          RECNORM_RAY_CONNECT_TIMEOUT="20")
        assert refused.returncode == 2 and not out.exists(), refused.stderr[-3000:]
        assert "also needs RAY_AUTH_MODE=token here" in _errors(refused.stderr)[-1], refused.stderr[-3000:]
        proc, _ = _cli(args, timeout=600, RECNORM_RAY_CONNECT_TIMEOUT="120", **auth)  # a busy CI machine
        assert proc.returncode == 0, proc.stderr[-3000:] + "\n" + _tails(temp, "ray_client_server*.err")
        assert "2 run(s) finished now, 0 before, 0 failed" in proc.stdout
        assert len(load_records(str(out))) == 2
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops the node's processes on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        left = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in p.info["cmdline"] or [])]
        for p in left:
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"the head's processes survived: {[p.info['cmdline'][:2] for p in left]}"


class _FakeRay:
    """ray's connection calls, with ray.init's outcomes in order (an exception raises, None joins)."""

    def __init__(self, outcomes):
        self.outcomes, self.inits, self.shutdowns = list(outcomes), 0, 0

    def is_initialized(self):
        return False

    def init(self, address=None, **kwargs):
        self.inits += 1
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome

    def shutdown(self):
        self.shutdowns += 1

    def cluster_resources(self):
        return {"CPU": 2.0}


SERVER_START_FAILED = ConnectionAbortedError(
    "Initialization failure from server:\nTraceback (most recent call last):\n  File \"proxier.py\", line 772\n"
    "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err for detailed logs.\n")


#: The same failure where the proxy looked at the dead server first (seen in a full test run, 2026-12-07).
SERVER_ZOMBIE = ConnectionAbortedError(
    "Initialization failure from server: psutil.ZombieProcess: PID still exists but it's a zombie (pid=13516)")


@pytest.mark.parametrize("address, outcomes, joins, inits", [
    ("ray://127.0.0.1:{port}", [SERVER_START_FAILED, None], True, 2),  # the proxy's failure: once more
    ("ray://127.0.0.1:{port}", [SERVER_ZOMBIE, None], True, 2),  # the same, seen as a zombie
    ("ray://127.0.0.1:{port}", [SERVER_START_FAILED, SERVER_ZOMBIE, None], True, 3),
    ("ray://127.0.0.1:{port}", [SERVER_START_FAILED] * 3, False, 3),  # not a fourth time
    ("127.0.0.1:{port}", [SERVER_START_FAILED], False, 1),  # only a ray:// address goes through the proxy
    ("ray://127.0.0.1:{port}", [ConnectionAbortedError("Initialization failure from server:\nValueError: x")],
     False, 1),  # any other failure of the server: at once
])
def test_a_client_server_that_failed_to_start_is_asked_again(monkeypatch, caplog, address, outcomes, joins, inits):
    import socket

    import recnorm.experiments.ray_backend as rb

    fake = _FakeRay(outcomes)
    monkeypatch.setattr(rb, "_import_ray", lambda: fake)
    listening = socket.socket()  # what the fail-fast probe looks for
    listening.bind(("127.0.0.1", 0))
    listening.listen(4)
    try:
        backend = rb.RayBackend(address=address.format(port=listening.getsockname()[1]), connect_timeout=10)
        if joins:
            with caplog.at_level("WARNING", logger="recnorm.experiments.ray_backend"):
                backend.connect()
            assert backend._owns and fake.shutdowns == inits - 1
            assert "the head could not start this client's server (ConnectionAbortedError: Initialization " \
                   "failure from server: " in caplog.text
        else:
            with pytest.raises(rb.RayConnectError, match="cannot join the Ray cluster at") as info:
                backend.connect()
            assert "\n" not in str(info.value) and not backend._owns
    finally:
        listening.close()
    assert fake.inits == inits and fake.outcomes == []


def test_a_refused_or_silent_connection_names_token_authentication_only_where_it_may_be_the_cause(monkeypatch):
    from recnorm.experiments.ray_backend import _auth_hint

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    timeout = ConnectionError("ray client connection timeout")  # what Ray's client says when the head drops it
    assert "RAY_AUTH_MODE=token" in _auth_hint("ray://head:10001", timeout)
    assert "RAY_AUTH_MODE=token" in _auth_hint("head:6379", None)  # recnorm's own deadline
    assert "RAY_AUTH_MODE=token" in _auth_hint("head:6379", RuntimeError("Invalid or missing authentication token"))
    assert _auth_hint("ray://head:10001", ConnectionAbortedError("Initialization failure")) == ""  # another cause
    assert _auth_hint(None, timeout) == ""  # a local instance sets its own mode
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert _auth_hint("ray://head:10001", timeout) == ""  # the mode is set: a token is not what is missing


def test_a_connection_error_keeps_the_cause_a_ray_server_sends_after_a_colon():
    from recnorm.experiments.ray_backend import _one_line

    server = ("Initialization failure from server:\nTraceback (most recent call last):\n  File \"proxier.py\", "
              "line 780, in Datapath\n    raise RuntimeError(\nRuntimeError: Proxy failed to Connect to backend!\n")
    assert _one_line(ConnectionAbortedError(server)) == (
        "ConnectionAbortedError: Initialization failure from server: RuntimeError: Proxy failed to Connect to "
        "backend!")
    assert _one_line(ValueError("first\nsecond")) == "ValueError: first"  # no colon: the first line alone
    assert _one_line(ConnectionAbortedError("\x1b[31mcut:\x1b[0m\n")) == "ConnectionAbortedError: cut:"
    assert _one_line(KeyError()) == "KeyError"


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

    monkeypatch.setattr(rb, "ray_import_error", lambda: f"Ray is not installed: {rb.INSTALL_HINT}")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(small_spec().to_dict()))
    assert main(["sweep", "--spec", str(spec_path), "--out", str(tmp_path / "out"), "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'recnorm[ray]'" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the rough edges (issue 19)
def _cli(args, timeout=300, **env):
    """``python -m recnorm ARGS`` on this tree; a variable given as None is unset."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    env.pop("RAY_ADDRESS", None)
    env = {k: v for k, v in env.items() if v is not None}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "recnorm", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


def _errors(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("recnorm ") or "Traceback" in line]


def test_a_broken_ray_install_is_one_line_naming_the_import_error(tmp_path):
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libray_core.so: cannot open shared object file')\n")
    out = tmp_path / "out"
    proc, _ = _cli(["sweep", "--grid", "norm=none", "--out", str(out), "--backend", "ray"],
                   PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{SRC}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "Ray is installed but fails to import (ImportError: libray_core.so: cannot open shared object file)" in lines[0]
    assert "not installed" not in lines[0] and "pip install --force-reinstall 'recnorm[ray]'" in lines[0]
    assert not out.exists()


def test_a_wrong_address_fails_within_the_limit_and_writes_nothing(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        refused = s.getsockname()[1]
    out = tmp_path / "out"
    proc, seconds = _cli(["sweep", "--grid", "norm=none", "--out", str(out), "--backend", "ray", "--address",
                          f"127.0.0.1:{refused}"])
    assert proc.returncode == 2 and seconds < 60
    assert _errors(proc.stderr) == [f"recnorm sweep: error: cannot reach the Ray cluster at 127.0.0.1:{refused}: "
                                    "Connection refused (check --address and that the head node is up)"]
    assert not out.exists()

    silent = socket.socket()  # listens, accepts, never answers: what ray.init retried for many minutes
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        proc, seconds = _cli(["compare", "--smoke", "--out", str(out), "--backend", "ray", "--address",
                              f"127.0.0.1:{port}"], RECNORM_RAY_CONNECT_TIMEOUT="5", RAY_AUTH_MODE="token")
        unset, _ = _cli(["sweep", "--grid", "norm=none", "--out", str(out), "--backend", "ray", "--address",
                         f"127.0.0.1:{port}"], RECNORM_RAY_CONNECT_TIMEOUT="5", RAY_AUTH_MODE=None)
    finally:
        silent.close()
    assert proc.returncode == 2 and seconds < 60, proc.stderr
    assert _errors(proc.stderr) == [f"recnorm compare: error: the Ray cluster at 127.0.0.1:{port} did not answer "
                                    "within 5 s (check --address; $RECNORM_RAY_CONNECT_TIMEOUT sets the limit)"]
    # without a token mode here, a timeout may be a cluster that drops unauthenticated requests: the line says so
    assert _errors(unset.stderr) == [f"recnorm sweep: error: the Ray cluster at 127.0.0.1:{port} did not answer "
                                     "within 5 s (check --address; $RECNORM_RAY_CONNECT_TIMEOUT sets the limit) (a "
                                     "cluster with token authentication also needs RAY_AUTH_MODE=token here, and its "
                                     "token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"]
    assert not out.exists()


def test_ray_client_addresses_need_the_client_extra(monkeypatch, tmp_path, capsys):
    import recnorm.experiments.ray_backend as rb

    monkeypatch.setitem(sys.modules, "grpc", None)  # as without ray[client]
    with pytest.raises(ImportError, match=r"needs ray\[client\].*pip install 'recnorm\[ray\]'"):
        rb.RayBackend(address="ray://head:10001")
    out = tmp_path / "out"
    assert main(["sweep", "--grid", "norm=none", "--out", str(out), "--backend", "ray", "--address",
                 "ray://127.0.0.1:10001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the address ray://127.0.0.1:10001 goes through the Ray client" in err
    assert not out.exists()


def test_the_ray_extra_installs_the_client():
    import tomllib

    with open(os.path.join(os.path.dirname(SRC), "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.startswith("ray[client]") for req in extras["ray"]), extras["ray"]
    import grpc  # noqa: F401  (installed by it, so ray:// works where the extra is installed)


def test_a_failed_task_reports_its_cause(cluster, tmp_path):
    from recnorm.experiments.ray_backend import task_failure

    @ray.remote
    def boom():
        raise ValueError("the cause, on the worker")

    with pytest.raises(Exception) as info:
        ray.get(boom.remote())
    error, report = task_failure(info.value)
    assert error == "ValueError: the cause, on the worker"
    assert "\x1b[" not in report and "the cause, on the worker" in report


def test_a_module_only_on_the_driver_fails_the_run_with_its_cause(cluster, tmp_path, monkeypatch, capsys):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "driver_only_plugin.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(plugin))  # importable here, not on the workers
    spec = small_spec(steps=1, seeds=(0,))
    spec.grids = [{"norm": [None]}]
    spec.imports = ["driver_only_plugin"]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec_path), "--out", str(out), "--backend", "ray", "--address", cluster]) == 1
    text = capsys.readouterr().out
    run_id = spec.expand()[0].run_id
    cause = "ModuleNotFoundError: No module named 'driver_only_plugin'"
    assert f"run {run_id} failed: {cause}" in text and "\x1b[" not in text
    error = json.load(open(out / "runs" / run_id / "error.json"))
    assert error["error"].startswith(cause) and "Traceback" in error["traceback"] and "\x1b[" not in error["error"]


def test_kernels_are_prepared_once_per_node_before_the_runs_and_not_on_the_driver(cluster, tmp_path, monkeypatch,
                                                                                  capsys):
    from recnorm import kernels

    monkeypatch.setattr(kernels, "build_extensions", lambda: pytest.fail("the driver compiled the kernels"))
    monkeypatch.setattr(kernels, "extensions_built", lambda: pytest.fail("the driver checked the kernels"))
    spec = small_spec(steps=1)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    out = str(tmp_path / "out")
    assert main(["sweep", "--spec", str(spec_path), "--out", out, "--backend", "ray", "--address", cluster]) == 0
    text = capsys.readouterr().out
    assert text.count("preparing recnorm's C++ kernels on 1 node(s) before the runs") == 1
    assert ": already built" in text or ": compiled in" in text
    assert text.index("preparing recnorm's C++ kernels") < text.index("4 run(s) finished now")
    assert len(load_records(out)) == 4
    # nothing left to run: no kernel task either
    assert main(["sweep", "--spec", str(spec_path), "--out", out, "--backend", "ray", "--address", cluster]) == 0
    assert "preparing" not in capsys.readouterr().out


def test_a_run_whose_worker_dies_resumes_from_its_checkpoint(cluster, tmp_path, caplog):
    """The worker process of a long run is killed after the run's checkpoint reached the driver (what a
    lost node does to it): Ray retries the task, which resumes from that checkpoint and ends with the same
    numbers as an uninterrupted run; the checkpoint is removed once the result is written."""
    spec = small_spec(steps=4000, seeds=(0,))
    spec.base = spec.base.replace(eval_every=1000)
    spec.grids = [{"norm": ["layer"]}]
    out = tmp_path / "sweep"
    lines = []
    backend = RayBackend(checkpoint_every=100, notify=lines.append)
    import threading

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("sweep", run_sweep(spec, str(out), backend=backend)))
    thread.start()
    ckpt_dir = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt_dir.exists() and os.listdir(ckpt_dir)) and thread.is_alive():
        time.sleep(0.05)
    assert thread.is_alive(), "the run finished before its first checkpoint reached the driver"
    victims = [p for p in psutil.process_iter(["cmdline"]) if "ray::run_remote" in " ".join(p.info["cmdline"] or [])]
    assert len(victims) == 1, victims
    victims[0].kill()
    thread.join(600)
    assert not thread.is_alive()
    sweep = outcome["sweep"]
    assert sweep.finished and len(sweep.completed) == 1, sweep.failed
    resumed = [line for line in lines if "resumed from its checkpoint at step" in line]
    assert len(resumed) == 1 and int(resumed[0].split("at step ")[1].split()[0]) >= 100, lines
    assert os.listdir(ckpt_dir) == []
    config = spec.expand()[0]
    record = load_records(str(out))[0]
    local = train_and_evaluate(config.replace(threads=1), str(tmp_path / "local"))
    assert record["train"]["loss"] == local.train["loss"] and record["final"] == local.final


def test_a_finished_sweep_needs_no_cluster(tmp_path, monkeypatch, capsys):
    """Re-running a finished sweep with --backend ray joins no cluster (nothing to run), however far it is."""
    out = tmp_path / "sweep"
    spec = small_spec(steps=1, seeds=(0,))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    assert main(["sweep", "--spec", str(spec_path), "--out", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(RayBackend, "connect", lambda self: pytest.fail("joined a cluster with nothing to run"))
    assert main(["sweep", "--spec", str(spec_path), "--out", str(out), "--backend", "ray", "--address",
                 "127.0.0.1:1"]) == 0
    assert "all 2 runs already finished" in capsys.readouterr().out
