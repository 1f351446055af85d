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
example ``ray://head:10001`` or ``auto``; without one a local Ray instance starts for the sweep and stops
after it. Every node needs the same recnorm (``pip install 'recnorm[ray,experiments]'``) and the data
packages its tasks read (see README). Ray is an optional dependency: without it, constructing the backend
raises ImportError naming the extra to install.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from recnorm.experiments.results import RESULT_FILE, atomic_file

__all__ = ["RayBackend", "ray_available", "INSTALL_HINT"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'recnorm[ray]'"


def ray_available() -> bool:
    """Whether Ray can be imported."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"the ray backend needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


def run_remote(config_data: Dict[str, Any], imports: List[str]) -> Dict[str, Any]:
    """The body of one Ray task: train one run in a temporary directory and return its files.

    Returns ``{"run_id", "status", "error", "seconds", "files": {relative path: bytes}, "host"}``.
    """
    import importlib

    import torch

    from recnorm.experiments.sweep import _run_one

    torch.set_num_threads(1)
    for module in imports:
        importlib.import_module(module)
    workdir = tempfile.mkdtemp(prefix="recnorm-run-")
    try:
        run_id, status, error, seconds = _run_one(config_data, workdir)
        files: Dict[str, bytes] = {}
        for root, _dirs, names in os.walk(workdir):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, workdir)] = f.read()
        return {"run_id": run_id, "status": status, "error": error, "seconds": seconds, "files": files,
                "host": socket.gethostname()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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

    If Ray is already initialized in this process (``ray.is_initialized()``), the backend uses that
    connection and leaves it open.
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, max_in_flight: Optional[int] = None,
                 num_cpus: Optional[int] = None, init_kwargs: Optional[Dict[str, Any]] = None):
        _import_ray()
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight: expected None or an int >= 1, got {max_in_flight!r}")
        self.address = address
        self.max_in_flight = max_in_flight
        self.num_cpus = num_cpus
        self.init_kwargs = dict(init_kwargs or {})

    def _connect(self, ray: Any) -> bool:
        """Initialize Ray unless it is; return whether this call started the connection."""
        if ray.is_initialized():
            return False
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning",
                                  **self.init_kwargs}
        if address is None and self.num_cpus is not None:
            kwargs["num_cpus"] = self.num_cpus
        start = time.perf_counter()
        ray.init(address=address, **kwargs)
        logger.info("ray: %s in %.1f s (%s CPUs)", f"joined {address}" if address else "started a local instance",
                    time.perf_counter() - start, ray.cluster_resources().get("CPU"))
        return True

    def run(self, jobs: List[Tuple[Dict[str, Any], str]], imports: List[str],
            record: Callable[[Tuple[str, str, Optional[str], float]], None]) -> None:
        """Run ``jobs`` (``(config dict, run directory)``) and ``record`` each outcome
        ``(run_id, status, error, seconds)`` as soon as its files are on disk."""
        from recnorm.experiments.sweep import ERROR_FILE
        from recnorm.experiments.results import write_json_atomic

        ray = _import_ray()
        started = self._connect(ray)
        task = ray.remote(num_cpus=1)(run_remote)
        queue = list(jobs)
        pending: Dict[Any, Tuple[Dict[str, Any], str, float]] = {}
        limit = self.max_in_flight or len(queue) or 1
        try:
            while queue or pending:
                while queue and len(pending) < limit:
                    config_data, run_dir = queue.pop(0)
                    pending[task.remote(config_data, list(imports))] = (config_data, run_dir, time.perf_counter())
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    config_data, run_dir, submitted = pending.pop(ref)
                    try:
                        payload = ray.get(ref)
                    except Exception as exc:  # the task itself never raises: a worker or node died
                        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                        run_id = os.path.basename(run_dir)
                        write_json_atomic(os.path.join(run_dir, ERROR_FILE),
                                          {"run_id": run_id, "error": message, "traceback": str(exc)})
                        logger.error("run %s failed on the cluster: %s", run_id, message)
                        record((run_id, "failed", message, time.perf_counter() - submitted))
                        continue
                    write_run_files(run_dir, payload["files"])
                    logger.info("run %s %s on %s in %.1f s", payload["run_id"], payload["status"], payload["host"],
                                payload["seconds"])
                    record((payload["run_id"], payload["status"], payload["error"], payload["seconds"]))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()
