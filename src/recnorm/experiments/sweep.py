"""Sweeps: a grid over any config fields, run in parallel worker processes, resumable at any point.

A :class:`SweepSpec` is a base :class:`~recnorm.experiments.config.RunConfig` plus a list of grids; each
grid maps field names to lists of values and expands to their Cartesian product (a scalar is a fixed
override), and the sweep is the union of its grids. Dotted names set one entry of a dict field
(``"norm_kwargs.gain_init"``, ``"task_options.train_size"``).

On disk (see :mod:`recnorm.experiments.results`)::

    OUT/sweep.json             the manifest: the spec, the run ids in order, the fields that vary
    OUT/runs/<run_id>/         one directory per run, keyed by the run's config hash
    OUT/runs/<run_id>/result.json   present exactly when the run finished (atomic rename)
    OUT/runs/<run_id>/error.json    a run that raised (retried on the next invocation)

    OUT/sweep.lock             who holds the directory (an OS lock, released when its holder dies)

Publishing: with ``results_dir`` (``results/<study>``), every finished run of the sweep is merged into
``results_dir/runs.jsonl`` keyed by run id, with the manifest beside it
(:func:`recnorm.experiments.results.publish`), when the sweep returns, fails or is interrupted. Runs that a
killed sweep finished are published by the next invocation, which finds them finished; a run published
before is replaced by its newer result, never duplicated.

Resuming: :func:`run_sweep` skips every run whose ``result.json`` holds a valid result and wipes and redoes
any other run directory (a partial run of a killed sweep, or a result damaged since: it is named in a
warning). Killing the sweep at any moment therefore loses at most the runs in flight and never leaves a
corrupt result; re-running the same command finishes the rest.

One sweep at a time per directory: a second :func:`run_sweep` on a directory that a live process is
sweeping raises :class:`SweepBusyError` naming that process, and touches nothing.

Interrupting (Ctrl-C, ``KeyboardInterrupt``): queued runs are cancelled and the worker processes are ended
within a few seconds (the runs they had in flight are abandoned and redone next time); every finished run
is kept.

Where runs execute: in this process or local worker processes (``workers``), or on any
:class:`SweepBackend` passed as ``backend``, such as
:class:`~recnorm.experiments.ray_backend.RayBackend` (a Ray cluster). The sweep directory, its lock, the
choice of runs and the resume rules stay with this process whatever the backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from recnorm.experiments.config import EXECUTION_FIELDS, ConfigError, RunConfig, set_field
from recnorm.experiments.results import (
    SWEEP_FILE, ResultError, is_run_dir, load_run, publish, read_json, write_json_atomic)

__all__ = ["SweepSpec", "SweepOutcome", "SweepBackend", "SweepBusyError", "run_sweep", "varied_fields",
           "flatten_config", "ERROR_FILE", "LOCK_FILE"]

logger = logging.getLogger(__name__)

ERROR_FILE = "error.json"
LOCK_FILE = "sweep.lock"
#: ``progress(event, info)``: event "start" (info: total, todo, skipped, redo: one message per damaged result
#: that is run again) then "done" per finished run (info: run_id, status, seconds, error).
SweepProgressFn = Callable[[str, Dict[str, Any]], None]
#: One finished run as a backend reports it: ``(run_id, status, error or None, seconds)``.
RunOutcome = Tuple[str, str, Optional[str], float]


class SweepBackend(Protocol):
    """Where a sweep's runs execute. :func:`run_sweep` decides which runs to do and owns the sweep directory;
    a backend only executes them.

    ``run(jobs, imports, record)`` runs every job ``(config dict, run directory)``, with the modules
    ``imports`` imported first, and calls ``record(outcome)`` in this process once per job, after the job's
    files (``config.json``, then ``result.json`` or ``error.json``) are complete in its run directory. A
    job whose ``record`` was never called counts as not done.
    """

    def run(self, jobs: List[Tuple[Dict[str, Any], str]], imports: List[str],
            record: Callable[[RunOutcome], None]) -> None: ...


def compact_grids(grids: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Merge neighbouring grids that differ in one field into one grid, keeping the expansion order.

    A sweep built one run at a time (a tuned final sweep: one grid per run) expands to the same runs as far
    fewer grids. Fields are merged from the last (which varies fastest in a grid's product) to the first;
    two neighbours merge on a field when every other field is equal (as JSON, so 1 and 1.0 stay apart) and
    no field before it has more than one value, so the merged grid's product is the two grids one after the
    other. Grids with different fields (or field order) are left as they are."""
    grids = [{k: (list(v) if isinstance(v, list) else [v]) for k, v in g.items()} for g in grids]
    if not grids or any(list(g) != list(grids[0]) for g in grids):
        return grids
    keys = list(grids[0])
    dump = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731
    for i in range(len(keys) - 1, -1, -1):
        key, slower = keys[i], keys[:i]
        out: List[Dict[str, Any]] = []
        for g in grids:
            last = out[-1] if out else None
            if (last is not None and all(len(last[k]) == 1 and len(g[k]) == 1 for k in slower)
                    and all(dump(last[k]) == dump(g[k]) for k in keys if k != key)):
                out[-1] = {**last, key: last[key] + g[key]}
            else:
                out.append(g)
        grids = out
    return grids


class SweepBusyError(RuntimeError):
    """Another live process is running a sweep in the same directory."""


@dataclasses.dataclass
class SweepSpec:
    """A named grid of runs.

    Attributes:
        name: short name (used in the report's title).
        base: the config every run starts from.
        grids: list of ``{field: [values]}``; each expands to a Cartesian product, the sweep is their union
            (duplicates, by run id, are kept once, in first-seen order).
        description: what the sweep tests (shown in the report).
        imports: modules imported by every worker before it runs (to register a custom task).
        report: hints for the report, e.g. ``{"target": 0.75}`` (the metric level used for the steps- and
            seconds-to-target tables) or ``{"reference": {"init_gain": 1.0}}`` (the runs compared for
            convergence speed).
        published: how its runs are packed into ``results/<study>/runs.jsonl`` (see
            :mod:`recnorm.experiments.results`): ``{"max_points": 50, "drop": ["diagnostics.batch_stats"]}``
            keeps 50 points of each training curve and leaves those diagnostics in the run directories only.
    """

    name: str
    base: RunConfig = dataclasses.field(default_factory=RunConfig)
    grids: List[Dict[str, Any]] = dataclasses.field(default_factory=lambda: [{}])
    description: str = ""
    imports: List[str] = dataclasses.field(default_factory=list)
    report: Dict[str, Any] = dataclasses.field(default_factory=dict)
    published: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def expand(self) -> List[RunConfig]:
        """Every run of the sweep as a validated :class:`RunConfig` (raises :class:`ConfigError` first)."""
        self._import_plugins()
        base = self.base.to_dict()
        configs: List[RunConfig] = []
        seen = set()
        for i, grid in enumerate(self.grids or [{}]):
            if not isinstance(grid, dict):
                raise ConfigError(f"grids[{i}]: expected a dict of field -> list of values, got {grid!r}")
            keys = list(grid)
            values = [v if isinstance(v, list) else [v] for v in grid.values()]
            for key, vals in zip(keys, values):
                if not vals:
                    raise ConfigError(f"grids[{i}].{key}: expected a non-empty list of values, got []")
            for combo in itertools.product(*values):
                data = json.loads(json.dumps(base))
                for key, value in zip(keys, combo):
                    set_field(data, key, value)
                try:
                    config = RunConfig.from_dict(data)
                    config.validate()
                except ConfigError as exc:
                    raise ConfigError(f"sweep {self.name!r}, grids[{i}] {dict(zip(keys, combo))}: {exc}") from None
                if config.run_id not in seen:
                    seen.add(config.run_id)
                    configs.append(config)
        return configs

    def compacted(self, runs: Optional[Sequence[str]] = None) -> "SweepSpec":
        """The same sweep in fewer grids (see :func:`compact_grids`): the same runs in the same order, which
        is checked against ``runs`` (the run ids this sweep is known to expand to, e.g. a manifest's list;
        default: its own expansion). Raises ``ValueError`` when they differ."""
        out = dataclasses.replace(self, grids=compact_grids(self.grids))
        before = list(runs) if runs is not None else [c.run_id for c in self.expand()]
        if [c.run_id for c in out.expand()] != before:
            raise ValueError(f"SweepSpec.compacted: {self.name!r} expands to other runs than expected once compacted")
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "description": self.description, "base": self.base.to_dict(),
                "grids": json.loads(json.dumps(self.grids)), "imports": list(self.imports),
                "report": dict(self.report), **({"published": dict(self.published)} if self.published else {})}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SweepSpec":
        """From a dict; ``"grid"`` (one grid) is accepted for ``"grids"``."""
        data = dict(data)
        if "grid" in data:
            if "grids" in data:
                raise ConfigError("sweep spec: expected one of 'grid' or 'grids', got both")
            data["grids"] = [data.pop("grid")]
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"sweep spec: unknown key(s) {unknown}; expected a subset of {names}")
        base = data.get("base", {})
        data["base"] = base if isinstance(base, RunConfig) else RunConfig.from_dict(base)
        if not isinstance(data.get("grids", [{}]), list):
            raise ConfigError(f"sweep spec: 'grids' expected a list of dicts, got {data['grids']!r}")
        return cls(**data)

    def _import_plugins(self) -> None:
        for module in self.imports:
            importlib.import_module(module)


@dataclasses.dataclass
class SweepOutcome:
    """What one invocation of :func:`run_sweep` did."""

    out_dir: str
    run_ids: List[str]
    completed: List[str]  # runs finished by this invocation
    skipped: List[str]  # runs already finished before it
    failed: Dict[str, str]  # run id -> error message (the traceback is in the run's error.json)

    @property
    def finished(self) -> bool:
        return not self.failed and len(self.completed) + len(self.skipped) == len(self.run_ids)


def flatten_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict with dict fields spread as dotted keys (``norm_kwargs.gain_init``)."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def varied_fields(configs: Sequence[Dict[str, Any]]) -> List[str]:
    """The (flattened) fields whose values differ between ``configs``, in field order."""
    flats = [flatten_config(c) for c in configs]
    order = [f.name for f in dataclasses.fields(RunConfig)]

    def position(key: str) -> Tuple[int, str]:
        head, _, sub = key.partition(".")
        return (order.index(head) if head in order else len(order), sub)

    keys = sorted({k for f in flats for k in f}, key=position)
    marker = object()
    # how a run was executed is never a compared factor
    return [k for k in keys if k not in EXECUTION_FIELDS and len({json.dumps(f.get(k, marker), default=str) for f in flats}) > 1]


# ---------------------------------------------------------------------------------------------- running
def _watch_parent(parent_pid: int) -> None:
    # A worker whose sweep process died (killed) exits instead of finishing runs nobody waits for.
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.5)


def _worker_init(imports: List[str], parent_pid: int) -> None:
    import torch

    # Ctrl-C reaches every process of the terminal's foreground group; the sweep process alone handles it
    # (it cancels the queue and ends the workers), so that no worker prints a traceback or starts a run.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    for module in imports:
        importlib.import_module(module)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _run_one(config_data: Dict[str, Any], run_dir: str, checkpoint: Any = None) -> Tuple[str, str, Optional[str], float]:
    """Run one config into ``run_dir`` (resuming from ``checkpoint`` and saving to it, when given: see
    :mod:`recnorm.experiments.checkpoint`); never raises (an exception is written to ``error.json``)."""
    from recnorm.experiments.train import train_and_evaluate

    config = RunConfig.from_dict(config_data)
    start = time.perf_counter()
    try:
        result = train_and_evaluate(config, run_dir, checkpoint=checkpoint)
        return config.run_id, result.status, None, time.perf_counter() - start
    except Exception as exc:  # recorded, not fatal: the other runs of the sweep go on
        message = f"{type(exc).__name__}: {exc}"
        write_json_atomic(os.path.join(run_dir, ERROR_FILE),
                          {"run_id": config.run_id, "error": message, "traceback": traceback.format_exc()})
        logger.error("run %s failed: %s", config.run_id, message)
        return config.run_id, "failed", message, time.perf_counter() - start


def run_sweep(spec: SweepSpec, out_dir: str, workers: int = 1, progress: Optional[SweepProgressFn] = None,
              max_runs: Optional[int] = None, backend: Optional[SweepBackend] = None,
              results_dir: Optional[str] = None) -> SweepOutcome:
    """Run every unfinished run of ``spec`` into ``out_dir``; finished runs are skipped.

    Args:
        spec: the sweep.
        out_dir: the sweep directory (created). Runs of an earlier, different spec in the same directory
            are kept on disk but left out of the manifest.
        workers: worker processes (spawned; one torch thread each). ``1`` runs in this process.
        progress: optional callback, see :data:`SweepProgressFn`.
        max_runs: run at most this many unfinished runs now (the rest stay for a later invocation).
        backend: run the runs there instead of in local processes (``workers`` is then ignored; every run
            uses one torch thread).
        results_dir: publish the sweep's finished runs there (``results/<study>``) when this call ends, also
            by an error or Ctrl-C (see the module docstring).

    Returns:
        A :class:`SweepOutcome`. Failed runs do not raise; they are listed in ``failed`` and retried next
        time. KeyboardInterrupt stops the sweep within a few seconds (finished runs are kept).

    Raises:
        SweepBusyError: another live process is running a sweep in ``out_dir`` (nothing is touched).
    """
    if workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    options = publish_options(spec)
    configs = spec.expand()
    if workers > 1 or backend is not None:
        configs = [c.replace(threads=1) for c in configs]
    run_ids = [c.run_id for c in configs]
    if backend is not None and hasattr(backend, "connect") and any(
            not os.path.exists(os.path.join(out_dir, "runs", c.run_id, "result.json")) for c in configs):
        backend.connect()  # a cluster that does not answer fails here, before anything is written
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    with _exclusive_sweep(out_dir):
        try:
            return _run_locked(spec, configs, run_ids, out_dir, workers, progress, max_runs, backend)
        finally:
            if results_dir is not None:
                published = publish(out_dir, results_dir, **options)
                logger.info("published %d finished run(s) of %s to %s", len(published), out_dir, results_dir)


def publish_options(spec: SweepSpec) -> Dict[str, Any]:
    """The keyword arguments of :func:`recnorm.experiments.results.publish` that ``spec.published`` asks for
    (raises ConfigError on an unknown key)."""
    unknown = sorted(set(spec.published) - {"max_points", "drop"})
    if unknown:
        raise ConfigError(f"sweep {spec.name!r}: published: unknown key(s) {unknown}; expected 'max_points', 'drop'")
    return {k: (list(v) if k == "drop" else int(v)) for k, v in spec.published.items()}


@contextlib.contextmanager
def _exclusive_sweep(out_dir: str) -> Iterator[None]:
    """Hold ``out_dir`` for this process (an OS lock on ``sweep.lock``, which also records the holder's pid);
    raise :class:`SweepBusyError` naming the holder when another live process has it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no protection against a second sweep
        yield
        return
    path = os.path.join(out_dir, LOCK_FILE)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepBusyError(
                f"{out_dir} is in use by another sweep ({_holder(path)}); let it finish or stop it, then run this "
                f"command again (finished runs are kept)") from None
        try:
            handle.seek(0)
            handle.truncate()
            json.dump({"pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, handle)
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(path: str) -> str:
    """The pid and start time recorded in a held ``sweep.lock`` (its holder may still be writing them)."""
    for _ in range(20):
        try:
            with open(path) as f:
                info = json.load(f)
            return f"pid {info['pid']}, running since {info['started_at']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "pid unknown"


def _result_problem(run_dir: str, run_id: str) -> Optional[str]:
    """Why the finished-looking ``run_dir`` cannot count as done, or None."""
    try:
        record = load_run(run_dir)
    except ResultError as exc:
        return str(exc)
    if record["run_id"] != run_id:
        return f"{os.path.join(run_dir, 'result.json')}: holds run {record['run_id']!r}, expected {run_id!r}"
    return None


def _run_locked(spec: SweepSpec, configs: List[RunConfig], run_ids: List[str], out_dir: str, workers: int,
                progress: Optional[SweepProgressFn], max_runs: Optional[int],
                backend: Optional[SweepBackend] = None) -> SweepOutcome:
    manifest = {
        "name": spec.name,
        "spec": spec.to_dict(),
        "runs": run_ids,
        "varied": varied_fields([c.to_dict() for c in configs]),
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(os.path.join(out_dir, SWEEP_FILE), manifest)

    todo: List[RunConfig] = []
    skipped: List[str] = []
    redo: List[str] = []
    for config in configs:
        run_dir = os.path.join(out_dir, "runs", config.run_id)
        if is_run_dir(run_dir):
            problem = _result_problem(run_dir, config.run_id)
            if problem is None:
                skipped.append(config.run_id)
                continue
            logger.warning("%s; running it again", problem)
            redo.append(problem)
        if os.path.exists(run_dir):  # a partial run (killed or failed) or a damaged one: start it again
            logger.info("removing partial run directory %s", run_dir)
            shutil.rmtree(run_dir)
        todo.append(config)
    if max_runs is not None:
        todo = todo[:max_runs]
    logger.info("sweep %s: %d runs, %d finished before, %d to run with %d worker(s)", spec.name, len(configs),
                len(skipped), len(todo), workers)
    if progress is not None:
        progress("start", {"total": len(configs), "todo": len(todo), "skipped": len(skipped), "redo": redo})

    completed: List[str] = []
    failed: Dict[str, str] = {}

    def record(outcome: Tuple[str, str, Optional[str], float]) -> None:
        run_id, status, error, seconds = outcome
        if error is None:
            completed.append(run_id)
        else:
            failed[run_id] = error
        if progress is not None:
            progress("done", {"run_id": run_id, "status": status, "seconds": seconds, "error": error})

    jobs = [(c.to_dict(), os.path.join(out_dir, "runs", c.run_id)) for c in todo]
    if backend is not None:
        backend.run(jobs, list(spec.imports), record)
    elif workers == 1 or len(jobs) <= 1:
        for job in jobs:
            record(_run_one(*job))
    else:
        _run_pool(jobs, workers, list(spec.imports), record)
    return SweepOutcome(out_dir=os.path.abspath(out_dir), run_ids=run_ids, completed=completed, skipped=skipped,
                        failed=failed)


def _worker_main(conn: Any, imports: List[str], parent_pid: int) -> None:
    """A worker process: run each job received on ``conn`` and send back its outcome; ``None`` ends it."""
    _worker_init(imports, parent_pid)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(_run_one(*job))


def _run_pool(jobs: List[Tuple[Dict[str, Any], str]], workers: int, imports: List[str],
              record: Callable[[Tuple[str, str, Optional[str], float]], None]) -> None:
    """Run ``jobs`` in ``workers`` spawned processes, calling ``record`` with each outcome as it arrives.

    Each worker is a process with a pipe of its own: it gets one job at a time, so nothing is queued in a
    worker, and the pool has no threads or queues of its own that could hang this process's exit when it
    is interrupted. A worker that dies (killed by the OS, say) fails its run; a new one takes its place.
    """
    context = multiprocessing.get_context("spawn")
    pending = list(reversed(jobs))
    busy: Dict[Any, Tuple[Any, Tuple[Dict[str, Any], str]]] = {}  # connection -> (process, its job)

    def start_worker() -> Any:
        conn, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child, imports, os.getpid()), daemon=True)
        process.start()
        child.close()
        return conn, process

    def give(conn: Any, process: Any) -> None:
        if pending:
            job = pending.pop()
            conn.send(job)
            busy[conn] = (process, job)
        else:
            conn.send(None)  # no more work: the worker exits
            conn.close()

    processes = []
    try:
        for _ in range(min(workers, len(jobs))):
            conn, process = start_worker()
            processes.append(process)
            give(conn, process)
        while busy:
            for conn in multiprocessing.connection.wait(list(busy)):
                process, job = busy.pop(conn)
                try:
                    outcome = conn.recv()
                except (EOFError, OSError):  # the worker died in the middle of the run
                    conn.close()
                    process.join(1)
                    run_id = os.path.basename(job[1])
                    message = f"the worker process died (exit code {process.exitcode}) during the run"
                    logger.error("run %s failed: %s", run_id, message)
                    write_json_atomic(os.path.join(job[1], ERROR_FILE), {"run_id": run_id, "error": message})
                    outcome = (run_id, "failed", message, 0.0)
                    conn, process = start_worker()
                    processes.append(process)
                record(outcome)
                give(conn, process)
        for process in processes:
            process.join(10)
    except BaseException:  # KeyboardInterrupt, or an error of the pool itself
        _abandon(processes)
        raise
    _abandon(processes)  # any worker that did not exit by itself


def _abandon(processes: List[Any], grace: float = 3.0) -> None:
    """End the workers now: SIGTERM, then SIGKILL after ``grace`` seconds. The runs they had in flight leave
    no result and are redone by the next invocation. Further Ctrl-Cs are ignored meanwhile, so this cleanup
    (a few seconds at most) always completes."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        alive = [p for p in processes if p.is_alive()]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in alive:
            if p.is_alive():
                p.kill()
                p.join(1.0)
        if alive:
            logger.info("ended %d worker process(es); their runs in flight will be redone next time", len(alive))
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def load_spec(path: str) -> SweepSpec:
    """Read a sweep spec from a JSON file (or a ``sweep.json`` manifest, which embeds its spec)."""
    data = read_json(path)
    if "spec" in data and "runs" in data:
        data = data["spec"]
    return SweepSpec.from_dict(data)
