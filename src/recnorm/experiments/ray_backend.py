"""Run a sweep on a Ray cluster: each run is a Ray task, its files travel back to the driver.

:class:`RayBackend` plugs into :func:`recnorm.experiments.sweep.run_sweep` (``backend=``; on the command line
``recnorm sweep|compare --backend ray [--address ADDRESS]``). The driver (the process that calls
``run_sweep``) keeps the sweep directory and its guarantees; the cluster only computes:

* each unfinished run becomes one Ray task (one CPU, one torch thread). The task trains into a temporary
  directory on whichever node runs it and returns the contents of that directory's files; no shared file
  system is assumed, and a worker never writes to the sweep directory;
* the driver writes each returned file atomically (temporary file, rename) into the run's directory,
  ``result.json`` last, so a run counts as finished exactly when its ``result.json`` is complete on the
  driver's disk, as with local workers;
* killing the driver at any moment loses at most the runs in flight (Ray cancels a dead driver's tasks);
  re-running the same command skips every finished run and redoes the others.

Where it runs: ``address`` (or the ``RAY_ADDRESS`` environment variable) joins an existing cluster, for
example ``ray://head:10001`` (the Ray client: ``ray[client]``, which the ``ray`` extra installs) or ``auto``;
without one a local Ray instance starts for the sweep and stops after it. Every node needs the same
recnorm (``pip install 'recnorm[ray,experiments]'``), the data packages its tasks read, and a C++ compiler
for the fused kernels (see README). Ray is an optional dependency: without it, or with an installation
that fails to import, constructing the backend raises ImportError saying which, and naming the extra.

Before the runs:

* :meth:`RayBackend.connect` joins the cluster within ``$RECNORM_RAY_CONNECT_TIMEOUT`` seconds (default
  60; Ray's client takes about 40 s to report a session server that failed to start): an address nobody
  listens on fails at once, one that does not answer fails at the deadline, each with one line
  (:class:`RayConnectError`); the sweep writes nothing before the cluster has answered;
* when the runs use the fused C++ kernels, one task per node (pinned to it) builds them, or finds them
  built, before any run starts, and the backend reports each node's outcome through ``notify``: a cold
  node then compiles once, visibly, instead of inside its first run.

A run that fails on a worker reports the exception raised there (its type and message, plain text) as
its error, in ``error.json`` beside the whole traceback.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from recnorm.experiments.results import RESULT_FILE, atomic_file

__all__ = ["RayBackend", "RayConnectError", "ray_available", "ray_import_error", "INSTALL_HINT"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'recnorm[ray]'"


CONNECT_TIMEOUT = 60.0  # seconds per attempt; $RECNORM_RAY_CONNECT_TIMEOUT

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RayConnectError(ConnectionError):
    """The cluster at the given address could not be joined (nothing listens there, or it did not answer in
    time)."""


def ray_import_error() -> Optional[str]:
    """None when Ray imports; otherwise one line saying whether it is missing or installed but broken (with
    the import error), and what to install."""
    import importlib.util

    try:
        if importlib.util.find_spec("ray") is None:
            return f"Ray is not installed: {INSTALL_HINT}"
    except (ImportError, ValueError):
        return f"Ray is not installed: {INSTALL_HINT}"
    try:
        import ray  # noqa: F401
    except Exception as exc:  # ImportError of a dependency, a broken build, ...
        text = " ".join(_ANSI.sub("", str(exc)).split())
        return (f"Ray is installed but fails to import ({type(exc).__name__}: {text}); repair the installation, "
                f"e.g. pip install --force-reinstall {INSTALL_HINT.split(' ', 2)[-1]}")
    return None


def ray_available() -> bool:
    """Whether Ray can be imported."""
    return ray_import_error() is None


def _import_ray() -> Any:
    problem = ray_import_error()
    if problem is not None:
        raise ImportError(f"the ray backend needs Ray: {problem}")
    import ray

    return ray


def ray_client_error(address: Optional[str]) -> Optional[str]:
    """For a ``ray://`` address: None when the Ray client's packages import, else one line naming the extra."""
    if not address or not address.startswith("ray://"):
        return None
    try:
        import grpc  # noqa: F401  (what ray[client] adds)
    except ImportError as exc:
        return (f"the address {address} goes through the Ray client, which needs ray[client] ({exc}); "
                f"install it with {INSTALL_HINT}")
    return None


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` without terminal colour codes. A first line that ends in a colon
    introduces what follows (Ray's client puts the server's traceback there), so the last line, the
    traceback's own exception, is kept after it."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[-1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return f"{type(exc).__name__}: {text}"


def task_failure(exc: BaseException) -> Tuple[str, str]:
    """``(error, traceback)`` of a task that raised on a worker: the remote exception itself (Ray's
    ``RayTaskError.cause``) as ``Type: message``, and the whole report, both without colour codes."""
    cause = getattr(exc, "cause", None)
    error = _one_line(cause if isinstance(cause, BaseException) else exc)
    return error, _ANSI.sub("", str(exc))


#: How many times :meth:`RayBackend.connect` asks a ``ray://`` head for a session whose server failed to start.
CLIENT_SERVER_ATTEMPTS = 3


def _transient_client_server_failure(address: Optional[str], error: BaseException) -> bool:
    """Whether ``ray.init("ray://...")`` failed because the head's proxy could not start the session's server,
    a failure that the next connection need not repeat. The proxy forks that server while its own gRPC threads
    run, and the child sometimes dies at once (ray-project/ray#63202): the proxy then reports that starting it
    failed, or, where it looked at the dead child first, that the process is a zombie (``psutil.ZombieProcess``)."""
    text = str(error)
    return (address or "").startswith("ray://") and isinstance(error, ConnectionAbortedError) and \
        ("Starting Ray client server failed" in text or "ZombieProcess" in text)


def _auth_hint(address: Optional[str], error: Optional[BaseException]) -> str:
    """A note for a failed connection to a given address while this process has no Ray token mode set: since
    Ray 2.52 a cluster may require a token (``ray start`` turns it on where ``~/.ray/auth_token`` exists), and
    Ray never turns it on by itself for an explicit address; the server then drops the requests, which reads
    as a timeout."""
    if address is None or os.environ.get("RAY_AUTH_MODE"):
        return ""
    if error is not None and "timeout" not in str(error).lower() and "authenticat" not in str(error).lower():
        return ""
    return (" (a cluster with token authentication also needs RAY_AUTH_MODE=token here, and its token in "
            "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _probe(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at ``host:port`` (``ray://host:port`` or a GCS ``host:port``)."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 10.0)).close()
    except OSError as exc:
        raise RayConnectError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (check --address "
                              "and that the head node is up)") from None


class CheckpointStore:
    """A Ray actor holding the latest checkpoint of every run in flight (see
    :mod:`recnorm.experiments.checkpoint`): tasks put and get them; the driver drains the new ones to disk
    and seeds the store from disk before it submits a run."""

    def __init__(self) -> None:
        self.latest: Dict[str, bytes] = {}
        self.fresh: set = set()

    def put(self, run_id: str, data: bytes) -> None:
        self.latest[run_id] = data
        self.fresh.add(run_id)

    def seed(self, run_id: str, data: bytes) -> None:
        self.latest[run_id] = data

    def get(self, run_id: str) -> Optional[bytes]:
        return self.latest.get(run_id)

    def drain(self) -> Dict[str, bytes]:
        out = {k: self.latest[k] for k in self.fresh if k in self.latest}
        self.fresh.clear()
        return out

    def drop(self, run_id: str) -> None:
        self.latest.pop(run_id, None)
        self.fresh.discard(run_id)


def run_remote(config_data: Dict[str, Any], imports: List[str], store: Any = None, every: int = 0) -> Dict[str, Any]:
    """The body of one Ray task: train one run in a temporary directory and return its files. With a
    :class:`CheckpointStore` ``store`` and ``every > 0``, the run saves its state there every ``every`` steps
    and resumes from the latest one it finds (a retry after its node was lost, say).

    Returns ``{"run_id", "status", "error", "seconds", "files": {relative path: bytes}, "host",
    "resumed_from"}``.
    """
    import importlib
    import json

    import torch

    from recnorm.experiments.config import RunConfig
    from recnorm.experiments.sweep import ERROR_FILE, _run_one

    torch.set_num_threads(1)
    try:
        for module in imports:
            importlib.import_module(module)
    except Exception as exc:  # a module present on the driver only, say: the run fails with its cause
        config = RunConfig.from_dict(config_data)
        error = f"{type(exc).__name__}: {exc} (importing the sweep's modules {imports} on {socket.gethostname()})"
        body = {"run_id": config.run_id, "error": error, "traceback": traceback.format_exc()}
        return {"run_id": config.run_id, "status": "failed", "error": error, "seconds": 0.0, "host": socket.gethostname(),
                "files": {"config.json": json.dumps({"run_id": config.run_id, **config.to_dict()}, indent=1).encode(),
                          ERROR_FILE: json.dumps(body, indent=1).encode()}}
    checkpoint = None
    if store is not None and every:
        import ray

        from recnorm.experiments.checkpoint import BytesCheckpoint

        key = RunConfig.from_dict(config_data).run_id
        checkpoint = BytesCheckpoint(lambda data: ray.get(store.put.remote(key, data)),
                                     lambda: ray.get(store.get.remote(key)), every)
    workdir = tempfile.mkdtemp(prefix="recnorm-run-")
    try:
        run_id, status, error, seconds = _run_one(config_data, workdir, checkpoint)
        files: Dict[str, bytes] = {}
        for root, _dirs, names in os.walk(workdir):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, workdir)] = f.read()
        return {"run_id": run_id, "status": status, "error": error, "seconds": seconds, "files": files,
                "host": socket.gethostname(), "resumed_from": checkpoint.resumed_from if checkpoint else None}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build_kernels_remote() -> Dict[str, Any]:
    """The body of one node's kernel task: build (or find built) the fused C++ kernels on this node.

    Returns ``{"host", "built_before", "status": {kernel: None or reason}, "seconds"}``.
    """
    from recnorm import kernels

    start = time.perf_counter()
    before = kernels.extensions_built()
    status = kernels.build_extensions()
    return {"host": socket.gethostname(), "built_before": before, "status": status,
            "seconds": time.perf_counter() - start}


def needs_fused_kernels(configs: List[Dict[str, Any]]) -> bool:
    """Whether any of the runs uses a norm the fused C++ kernels serve (and the kernels are not switched off)."""
    if os.environ.get("RECNORM_KERNEL") == "reference":
        return False
    return any(c.get("norm") in ("layer", "batch", "shared_batch", "rms") for c in configs)


def _write_atomic(path: str, data: bytes) -> None:
    with atomic_file(path, "wb") as f:  # permissions follow the umask, as for a local run's files
        f.write(data)


def write_run_files(run_dir: str, files: Dict[str, bytes]) -> None:
    """Write a run's returned files into ``run_dir``, each atomically, ``result.json`` last."""
    root = os.path.abspath(run_dir)
    for rel in sorted(files, key=lambda p: p == RESULT_FILE):
        path = os.path.abspath(os.path.join(root, rel))
        if os.path.commonpath([root, path]) != root:
            raise ValueError(f"a run returned the file {rel!r}, which lies outside its run directory")
        _write_atomic(path, files[rel])


class RayBackend:
    """Runs a sweep's runs as Ray tasks (see the module docstring).

    Args:
        address: the cluster to join (``ray.init(address=...)``); None: ``RAY_ADDRESS``, else a local
            instance started for the sweep.
        max_in_flight: most runs submitted at once (None: all; Ray queues them on the cluster's CPUs).
        num_cpus: CPUs of a local instance started here (None: all of this machine's).
        init_kwargs: more keyword arguments for ``ray.init`` (for example ``runtime_env``).
        connect_timeout: seconds to wait for the cluster to answer (None: ``$RECNORM_RAY_CONNECT_TIMEOUT``,
            default 60), for each attempt.
        notify: called with one line per event a person should see (kernel builds on the nodes); default:
            logged at INFO.
        checkpoint_every: save each run's training state every this many steps, kept by the driver in
            ``OUT/checkpoints/<run_id>.pt`` until the run finishes; a run retried after its node was lost,
            or resubmitted by a later invocation, resumes from it (None: ``$RECNORM_CHECKPOINT_EVERY``,
            default 1000; 0: off).

    If Ray is already initialized in this process (``ray.is_initialized()``), the backend uses that
    connection and leaves it open.
    """

    name = "ray"
    #: The nodes build the fused kernels themselves (a task per node before the runs): the driver need not.
    builds_kernels = True

    def __init__(self, address: Optional[str] = None, max_in_flight: Optional[int] = None,
                 num_cpus: Optional[int] = None, init_kwargs: Optional[Dict[str, Any]] = None,
                 connect_timeout: Optional[float] = None, notify: Optional[Callable[[str], None]] = None,
                 checkpoint_every: Optional[int] = None):
        _import_ray()
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight: expected None or an int >= 1, got {max_in_flight!r}")
        self.address = address
        problem = ray_client_error(self._address())
        if problem is not None:
            raise ImportError(problem)
        self.max_in_flight = max_in_flight
        self.num_cpus = num_cpus
        self.init_kwargs = dict(init_kwargs or {})
        self.connect_timeout = float(connect_timeout if connect_timeout is not None
                                     else os.environ.get("RECNORM_RAY_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
        self.notify = notify or (lambda line: logger.info("%s", line))
        if checkpoint_every is None:
            from recnorm.experiments.checkpoint import checkpoint_every as default_every

            checkpoint_every = default_every()
        self.checkpoint_every = int(checkpoint_every)
        self._owns = False  # whether this backend started the connection (and so ends it)

    def _address(self) -> Optional[str]:
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def connect(self) -> None:
        """Join the cluster (or start a local instance) unless Ray is initialized; raises
        :class:`RayConnectError` in one line when the cluster does not answer within the time limit."""
        ray = _import_ray()
        if ray.is_initialized():
            return
        address = self._address()
        kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning",
                                  **self.init_kwargs}
        if address is None and self.num_cpus is not None:
            kwargs["num_cpus"] = self.num_cpus
        start = time.perf_counter()
        if address is not None:
            _probe(address, self.connect_timeout)
        for attempt in range(1, CLIENT_SERVER_ATTEMPTS + 1):
            error = self._init_within_limit(ray, address, kwargs)
            if error is None:
                break
            if attempt < CLIENT_SERVER_ATTEMPTS and _transient_client_server_failure(address, error):
                # The head's client proxy sometimes fails to start the session's own server (Ray 2.60: about
                # one first connection in five to a fresh `ray start --head` here); a next one starts it.
                logger.warning("ray: the head could not start this client's server (%s); connecting again",
                               _one_line(error))
                ray.shutdown()
                continue
            raise RayConnectError(f"cannot join the Ray cluster at {address or 'a new local instance'}: "
                                  f"{_one_line(error)}{_auth_hint(address, error)}") from None
        self._owns = True
        logger.info("ray: %s in %.1f s (%s CPUs)", f"joined {address}" if address else "started a local instance",
                    time.perf_counter() - start, ray.cluster_resources().get("CPU"))

    def _init_within_limit(self, ray: Any, address: Optional[str], kwargs: Dict[str, Any]
                           ) -> Optional[BaseException]:
        """``ray.init`` in a daemon thread (it retries an address that does not answer for many minutes): returns
        its error, or None when it joined; raises :class:`RayConnectError` when it did not end within the limit."""
        outcome: Dict[str, BaseException] = {}

        def init() -> None:
            quiet = _DropMessage("SIGTERM handler is not set")  # ray.init's note about running in a thread
            worker_log = logging.getLogger("ray._private.worker")
            worker_log.addFilter(quiet)
            try:
                ray.init(address=address, **kwargs)
            except BaseException as exc:  # reported by the caller's thread
                outcome["error"] = exc
            finally:
                worker_log.removeFilter(quiet)

        thread = threading.Thread(target=init, name="recnorm-ray-connect", daemon=True)
        thread.start()
        thread.join(self.connect_timeout)
        if thread.is_alive():
            raise RayConnectError(f"the Ray cluster at {address or 'a new local instance'} did not answer within "
                                  f"{self.connect_timeout:.0f} s "
                                  f"(check --address; $RECNORM_RAY_CONNECT_TIMEOUT sets the limit)"
                                  f"{_auth_hint(address, None)}")
        return outcome.get("error")

    def close(self) -> None:
        """End the connection if this backend started it."""
        if self._owns:
            self._owns = False
            _import_ray().shutdown()

    def build_kernels(self, ray: Any) -> Dict[str, Dict[str, Any]]:
        """Build the fused kernels on every alive node with CPUs, one pinned task per node, before the runs.
        Returns ``{node id: the task's report}``; a node whose task failed reports ``{"error": ...}``."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
        if not nodes:
            return {}
        self.notify(f"preparing recnorm's C++ kernels on {len(nodes)} node(s) before the runs (a node compiles "
                    "them once, about a minute per kernel; built nodes answer at once)...")
        task = ray.remote(num_cpus=1)(build_kernels_remote)
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote():
                n for n in nodes}
        reports: Dict[str, Dict[str, Any]] = {}
        for ref, node in refs.items():
            where = node.get("NodeManagerHostname") or node.get("NodeManagerAddress") or node["NodeID"][:8]
            try:
                report = ray.get(ref)
            except Exception as exc:
                error, _ = task_failure(exc)
                reports[node["NodeID"]] = {"error": error}
                self.notify(f"  {where}: could not prepare the kernels ({error}); its runs use the reference loop")
                continue
            reports[node["NodeID"]] = report
            failed = {k: v for k, v in report["status"].items() if v}
            if failed:
                self.notify(f"  {report['host']}: could not build " + ", ".join(f"{k} ({v})" for k, v in failed.items())
                            + "; those layers run the reference loop there (a C++ compiler is needed on every node)")
            elif report["built_before"]:
                self.notify(f"  {report['host']}: already built")
            else:
                self.notify(f"  {report['host']}: compiled in {report['seconds']:.0f} s")
        return reports

    # -- checkpoints of runs in flight: OUT/checkpoints/<run_id>.pt on the driver ------------------------
    @staticmethod
    def _checkpoint_path(run_dir: str) -> str:
        from recnorm.experiments.checkpoint import CHECKPOINT_DIR

        sweep_dir = os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))
        return os.path.join(sweep_dir, CHECKPOINT_DIR, os.path.basename(run_dir) + ".pt")

    def _checkpoint_store(self, ray: Any) -> Any:
        """The store actor, on the driver's node where Ray can place it there."""
        options: Dict[str, Any] = {"num_cpus": 0}
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=True)
        except Exception:  # a Ray client driver runs on no node: anywhere will do
            pass
        return ray.remote(CheckpointStore).options(**options).remote()

    def _seed_checkpoint(self, ray: Any, store: Any, run_dir: str) -> None:
        path = self._checkpoint_path(run_dir)
        if os.path.exists(path):
            with open(path, "rb") as f:
                ray.get(store.seed.remote(os.path.basename(run_dir), f.read()))

    def _save_checkpoints(self, ray: Any, store: Any, run_dirs: List[str]) -> None:
        by_id = {os.path.basename(d): d for d in run_dirs}
        for run_id, data in ray.get(store.drain.remote()).items():
            if run_id in by_id:
                path = self._checkpoint_path(by_id[run_id])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _write_atomic(path, data)

    def _drop_checkpoint(self, ray: Any, store: Any, run_dir: str) -> None:
        ray.get(store.drop.remote(os.path.basename(run_dir)))
        try:
            os.remove(self._checkpoint_path(run_dir))
        except FileNotFoundError:
            pass

    def run(self, jobs: List[Tuple[Dict[str, Any], str]], imports: List[str],
            record: Callable[[Tuple[str, str, Optional[str], float]], None]) -> None:
        """Run ``jobs`` (``(config dict, run directory)``) and ``record`` each outcome
        ``(run_id, status, error, seconds)`` as soon as its files are on disk."""
        from recnorm.experiments.sweep import ERROR_FILE
        from recnorm.experiments.results import write_json_atomic

        if not jobs:  # a finished sweep: no cluster needed
            self.close()
            return
        ray = _import_ray()
        self.connect()
        pending: Dict[Any, Tuple[Dict[str, Any], str, float]] = {}
        try:
            if jobs and needs_fused_kernels([c for c, _ in jobs]):
                self.build_kernels(ray)
            task = ray.remote(num_cpus=1)(run_remote)
            store = self._checkpoint_store(ray) if jobs and self.checkpoint_every else None
            queue = list(jobs)
            limit = self.max_in_flight or len(queue) or 1
            while queue or pending:
                while queue and len(pending) < limit:
                    config_data, run_dir = queue.pop(0)
                    if store is not None:
                        self._seed_checkpoint(ray, store, run_dir)
                    ref = task.remote(config_data, list(imports), store, self.checkpoint_every)
                    pending[ref] = (config_data, run_dir, time.perf_counter())
                done, _ = ray.wait(list(pending), num_returns=1, timeout=None if store is None else 2.0)
                if store is not None:
                    self._save_checkpoints(ray, store, [r for _, r, _ in pending.values()])
                for ref in done:
                    config_data, run_dir, submitted = pending.pop(ref)
                    try:
                        payload = ray.get(ref)
                    except Exception as exc:  # the task raised on the worker, or a worker or node died
                        message, report = task_failure(exc)
                        run_id = os.path.basename(run_dir)
                        write_json_atomic(os.path.join(run_dir, ERROR_FILE),
                                          {"run_id": run_id, "error": message, "traceback": report})
                        logger.error("run %s failed on the cluster: %s", run_id, message)
                        record((run_id, "failed", message, time.perf_counter() - submitted))
                        continue
                    write_run_files(run_dir, payload["files"])
                    if store is not None:  # finished: its checkpoint is of no more use (a lost run keeps it)
                        self._drop_checkpoint(ray, store, run_dir)
                    logger.info("run %s %s on %s in %.1f s", payload["run_id"], payload["status"], payload["host"],
                                payload["seconds"])
                    if payload.get("resumed_from"):
                        self.notify(f"run {payload['run_id']} resumed from its checkpoint at step "
                                    f"{payload['resumed_from']} on {payload['host']}")
                    if payload["status"] == "failed":
                        logger.error("run %s failed on %s: %s", payload["run_id"], payload["host"], payload["error"])
                    record((payload["run_id"], payload["status"], payload["error"], payload["seconds"]))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            self.close()
