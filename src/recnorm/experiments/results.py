"""Results on disk: atomic JSON writes, loading runs, the published run files, grouping and aggregation.

Layout written by the engine::

    RUN_DIR/config.json  RUN_DIR/result.json                 one run (``recnorm train``)
    SWEEP_DIR/sweep.json  SWEEP_DIR/runs/<run_id>/...         a sweep's working directory (``recnorm sweep``)
    results/<study>/runs.jsonl  results/<study>/sweep.json    a study's published runs (committed)

A run is finished exactly when its ``result.json`` exists and holds a valid result: it is written to a
temporary file and renamed into place, so a reader never sees half a result. A result damaged afterwards
(truncated, emptied, edited) is caught by :func:`check_result` when it is loaded: readers skip it with a
warning that names the file, and a sweep runs it again. A report rebuilds from these files alone.

**Published runs** (:func:`publish`): ``runs.jsonl`` holds one compact JSON object per line, one line per run,
keyed by ``run_id`` (the first key of each line): the run's ``result.json`` with its config, final metrics,
curves, diagnostics and provenance, packed by :func:`pack_record`:

* ``train.step`` that counts 1, 2, ... n is stored as ``{"first": 1, "last": n}``, and ``train.clipped`` as a
  string of ``0``/``1``; :func:`unpack_record` restores both exactly;
* the per-step wall-clock curves ``train.step_time`` and ``train.time`` are dropped (``timing`` keeps the
  totals and ``valid.time`` the training time at each evaluation);
* a run of more than ``max_points`` steps keeps every k-th step of its training curves (and the last), with
  ``train.step`` listing the steps kept;
* the fields a sweep names in ``SweepSpec.published["drop"]`` (dotted paths such as
  ``diagnostics.batch_stats``) are left out, and ``SweepSpec.published["max_points"]`` replaces the default
  ``max_points``: a study of thousands of runs keeps what its report reads (the run directory keeps all).

``sweep.json`` beside it is the manifest of the sweep that made the runs; as in a sweep directory, loading
the folder returns the manifest's runs in its order. No weights, no locks. Publishing the same run again
replaces its line, so re-publishing never duplicates; a line is appended (or the file rewritten atomically)
under an OS lock, and a damaged line is skipped with a warning when the file is read.

Files are created with the permissions the process's umask allows (like ``open``), not the 0600 of a
plain temporary file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import tempfile
import threading
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "write_json_atomic", "atomic_file", "read_json", "load_run", "load_records", "load_records_checked",
    "check_result", "ResultError", "is_run_dir", "is_sweep_dir",
    "model_label", "group_records", "aggregate", "summary", "final_metric", "valid_curve",
    "area_under_curve", "first_reach", "sanitize", "publish", "pack_record", "unpack_record", "read_runs_file", "read_config",
    "RUNS_FILE",
]

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
SWEEP_FILE = "sweep.json"
RUNS_FILE = "runs.jsonl"
PUBLISH_LOCK = "runs.jsonl.lock"
#: Training curves longer than this keep every k-th step when published (no committed run is longer).
MAX_CURVE_POINTS = 2000
_DROPPED_CURVES = ("step_time", "time")  # per-step wall clock: totals stay in "timing"

logger = logging.getLogger(__name__)


class ResultError(ValueError):
    """A file of the engine that cannot be used (not JSON, or missing what a result must hold); the message
    starts with the file's path."""


# ---------------------------------------------------------------------------------------------- I/O
def sanitize(obj: Any) -> Any:
    """Replace non-finite floats by None (strict JSON) and tuples by lists, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (os.umask has no read-only form)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """A file to write ``path`` through: a temporary file in the same directory, renamed over ``path``
    (after fsync) only when the block completes, so readers see the old file or the whole new one. Its
    permissions follow the umask, as for ``open``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path: str, obj: Any, indent: Optional[int] = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_file`). ``indent=None`` writes it on
    one line without spaces (for large files)."""
    separators = (",", ":") if indent is None else None
    with atomic_file(path) as f:
        json.dump(sanitize(obj), f, indent=indent, separators=separators, allow_nan=False)


def read_json(path: str) -> Any:
    """The JSON in ``path``; a file that is not JSON raises :class:`ResultError` naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ResultError(f"{path}: not valid JSON ({exc})") from None


# What a result.json must hold for the report and the sweep to use it: key -> expected type(s).
_RESULT_KEYS = {"run_id": str, "status": str, "config": dict, "task": dict, "metric": str, "higher_is_better": bool,
                "seed": int, "train": dict, "valid": dict, "final": dict, "timing": dict}
_CONFIG_KEYS = ("task", "norm", "init", "init_gain", "num_layers", "eval_every")


def check_result(data: Any) -> Optional[str]:
    """Why ``data`` (a parsed ``result.json``) is not a usable result, or None when it is."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    missing = [k for k in _RESULT_KEYS if k not in data]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}"
    for key, kind in _RESULT_KEYS.items():
        if not isinstance(data[key], kind):
            return f"{key!r}: expected {kind.__name__}, got {type(data[key]).__name__}"
    if data["status"] not in ("ok", "diverged"):
        return f"'status': expected 'ok' or 'diverged', got {data['status']!r}"
    missing = [k for k in _CONFIG_KEYS if k not in data["config"]]
    if missing:
        return f"'config' lacks {', '.join(repr(k) for k in missing)}"
    for part, keys in (("train", ("step", "loss")), ("valid", ("step", "time", data["metric"]))):
        for key in keys:
            if not isinstance(data[part].get(key), list):
                return f"'{part}.{key}': expected a list, got {type(data[part].get(key)).__name__}"
    lengths = {len(data["valid"][k]) for k in ("step", "time", data["metric"])}
    if len(lengths) != 1:
        return "'valid': its step, time and metric lists differ in length"
    if data["status"] == "ok":
        for split in ("valid", "test"):
            if not isinstance(data["final"].get(split), dict):
                return f"'final.{split}': expected the final {split} metrics of a finished run"
    for key in ("total_seconds", "seconds_per_step"):
        if not isinstance(data["timing"].get(key), (int, float)):
            return f"'timing.{key}': expected a number"
    return None


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RESULT_FILE))


def is_sweep_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SWEEP_FILE))


def load_run(run_dir: str) -> Dict[str, Any]:
    """The record of one finished run: the contents of its ``result.json`` plus ``"dir"``. Raises
    :class:`ResultError` naming the file when it is not a valid result (see :func:`check_result`)."""
    path = os.path.join(run_dir, RESULT_FILE)
    record = read_json(path)
    problem = check_result(record)
    if problem is not None:
        raise ResultError(f"{path}: not a valid result: {problem}")
    record["dir"] = os.path.abspath(run_dir)
    return record


def load_records_checked(path: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """``(records, problems)``: every valid finished run under ``path``, and one message per result that could
    not be used, naming the file (and line) and what is wrong.

    ``path`` is a run directory; a sweep directory (its manifest lists its runs in order); a published
    ``runs.jsonl`` or the folder holding it (with a ``sweep.json`` beside it: that manifest's runs in its
    order, else every run in file order); or any other directory: every ``result.json`` below it, sorted by
    path. Records from ``runs.jsonl`` are unpacked (:func:`unpack_record`) and their ``"dir"`` is the folder.
    """
    if os.path.isfile(path) and path.endswith(".jsonl"):
        return _load_runs_file(path, None)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such directory: {path!r}")
    if os.path.isfile(os.path.join(path, RUNS_FILE)):
        return _load_runs_file(os.path.join(path, RUNS_FILE), _manifest_runs(path) if is_sweep_dir(path) else None)
    if is_run_dir(path):
        run_dirs = [path]
    elif is_sweep_dir(path):
        run_dirs = [d for d in (os.path.join(path, "runs", r) for r in _manifest_runs(path)) if is_run_dir(d)]
    else:
        run_dirs = sorted(root for root, _dirs, files in os.walk(path) if RESULT_FILE in files)
    records, problems = [], []
    for run_dir in run_dirs:
        try:
            records.append(load_run(run_dir))
        except ResultError as exc:
            problems.append(str(exc))
    return records, problems


def _manifest_runs(path: str) -> List[str]:
    manifest = read_json(os.path.join(path, SWEEP_FILE))
    runs = manifest.get("runs") if isinstance(manifest, dict) else None
    if not isinstance(runs, list):
        raise ResultError(f"{os.path.join(path, SWEEP_FILE)}: expected a sweep manifest with a 'runs' list")
    return [str(r) for r in runs]


def _load_runs_file(path: str, order: Optional[List[str]]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The valid records of a ``runs.jsonl`` (the last line of a run id wins), in ``order`` when given."""
    lines, problems = read_runs_file(path)
    records: Dict[str, Dict[str, Any]] = {}
    folder = os.path.dirname(os.path.abspath(path))
    for where, record in lines:
        record = unpack_record(record)
        problem = check_result(record)
        if problem is not None:
            problems.append(f"{where}: not a valid result: {problem}")
            continue
        record["dir"] = folder
        records[record["run_id"]] = record
    ids = list(records) if order is None else [r for r in order if r in records]
    return [records[r] for r in ids], problems


def read_runs_file(path: str) -> Tuple[List[Tuple[str, Dict[str, Any]]], List[str]]:
    """``([(where, packed record)], problems)`` of a ``runs.jsonl``: ``where`` is ``path:line``; a line that is
    not a JSON object (a write cut short, an edit) is a problem naming it."""
    out, problems = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                problems.append(f"{where}: not valid JSON ({exc})")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
                problems.append(f"{where}: expected a JSON object with a 'run_id'")
                continue
            out.append((where, record))
    return out, problems


def load_records(path: str) -> List[Dict[str, Any]]:
    """All valid finished runs under ``path`` (see :func:`load_records_checked`); each result that could
    not be used is skipped with a logged warning naming the file."""
    records, problems = load_records_checked(path)
    for problem in problems:
        logger.warning("skipped %s", problem)
    return records


# ---------------------------------------------------------------------------------------------- publishing
def pack_record(record: Dict[str, Any], max_points: Optional[int] = MAX_CURVE_POINTS,
                drop: Sequence[str] = ()) -> Dict[str, Any]:
    """A result as one compact line of ``runs.jsonl`` (see the module docstring); ``run_id`` comes first and
    ``"dir"`` is left out, as is every dotted path of ``drop`` (``"diagnostics.batch_stats"``)."""
    out = {"run_id": record["run_id"], **{k: v for k, v in record.items() if k not in ("run_id", "dir")}}
    for path in drop:
        _drop_path(out, path.split("."))
    train = {k: v for k, v in (out.get("train") or {}).items() if k not in _DROPPED_CURVES}
    steps = train.get("step")
    if max_points and isinstance(steps, list) and len(steps) > max_points:
        every = math.ceil(len(steps) / max_points)
        keep = sorted(set(range(0, len(steps), every)) | {len(steps) - 1})
        train = {k: [v[i] for i in keep] if isinstance(v, list) and len(v) == len(steps) else v
                 for k, v in train.items()}
        steps = train["step"]
    if isinstance(steps, list) and steps and steps == list(range(steps[0], steps[0] + len(steps))):
        train["step"] = {"first": steps[0], "last": steps[-1]}
    clipped = train.get("clipped")
    if isinstance(clipped, list) and all(isinstance(c, bool) for c in clipped):
        train["clipped"] = "".join("1" if c else "0" for c in clipped)
    out["train"] = train
    return out


def _drop_path(record: Dict[str, Any], keys: List[str]) -> None:
    """Remove ``record[k0][k1]...`` (copying the dicts on the way, so the caller's record is untouched)."""
    node = record
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            return
        node[key] = dict(node[key])
        node = node[key]
    node.pop(keys[-1], None)


def unpack_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record a run directory's ``result.json`` would give for a line of ``runs.jsonl`` (without the
    dropped wall-clock curves)."""
    train = dict(record.get("train") or {})
    steps = train.get("step")
    if isinstance(steps, dict) and isinstance(steps.get("first"), int) and isinstance(steps.get("last"), int):
        train["step"] = list(range(steps["first"], steps["last"] + 1))
    if isinstance(train.get("clipped"), str):
        train["clipped"] = [c == "1" for c in train["clipped"]]
    return {**record, "train": train}


def publish(source: Union[str, Iterable[Dict[str, Any]]], results_dir: str, manifest: Optional[Dict[str, Any]] = None,
            mark: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
            max_points: Optional[int] = MAX_CURVE_POINTS, drop: Sequence[str] = ()) -> List[str]:
    """Merge finished runs into ``results_dir/runs.jsonl``, keyed by run id; return the ids written.

    Args:
        source: a run or sweep directory, or any directory with runs below it (every valid finished run;
            damaged ones are skipped with a warning, as :func:`load_records` does), or records.
        results_dir: the study's folder under ``results/`` (created).
        manifest: the sweep manifest to write beside the runs as ``sweep.json``; by default the source's own
            ``sweep.json`` when it is a sweep directory.
        mark: applied to each record before it is packed (the migration of old runs adds their kernel pin).
        max_points, drop: see :func:`pack_record`.

    A run already in the file is replaced in place (the file is rewritten atomically); new runs are appended.
    An OS lock on ``runs.jsonl.lock`` keeps two publishers from interleaving.
    """
    if isinstance(source, str):
        if manifest is None and is_sweep_dir(source):
            manifest = read_json(os.path.join(source, SWEEP_FILE))
        source = load_records(source)
    lines = {}
    for record in source:
        record = mark(dict(record)) if mark is not None else record
        lines[record["run_id"]] = json.dumps(sanitize(pack_record(record, max_points, drop)), separators=(",", ":"),
                                             allow_nan=False, ensure_ascii=False)
    ids = list(lines)
    os.makedirs(results_dir, exist_ok=True)
    with _publish_lock(results_dir):
        _merge_lines(os.path.join(results_dir, RUNS_FILE), lines)
        if manifest is not None:
            write_json_atomic(os.path.join(results_dir, SWEEP_FILE), manifest)
    return ids


def _merge_lines(path: str, lines: Dict[str, str]) -> None:
    """Append ``lines`` ({run_id: line}) to ``path``, or rewrite it atomically when one replaces a line."""
    if not lines:
        return
    content = ""
    if os.path.exists(path):
        with open(path) as f:
            content = f.read()
    existing = [(_line_id(line), line) for line in content.splitlines() if line.strip()]
    for run_id, line in existing:  # a run published before, unchanged: nothing to write
        if lines.get(run_id) == line:
            del lines[run_id]
    if not lines:
        return
    if {run_id for run_id, _ in existing}.isdisjoint(lines) and (not content or content.endswith("\n")):
        with open(path, "a") as f:  # the common case: new runs only
            f.write("".join(line + "\n" for line in lines.values()))
            f.flush()
            os.fsync(f.fileno())
        return
    kept = [lines.pop(run_id) if run_id in lines else line for run_id, line in existing]
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in kept + list(lines.values())))


def _line_id(line: str) -> Optional[str]:
    """The run id of a line written by :func:`publish` (its first key), without parsing the whole line."""
    prefix = '{"run_id":"'
    if line.startswith(prefix):
        end = line.find('"', len(prefix))
        return line[len(prefix):end] if end > 0 else None
    return None


@contextlib.contextmanager
def _publish_lock(results_dir: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: publishers are not serialized
        yield
        return
    with open(os.path.join(results_dir, PUBLISH_LOCK), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_config(path: str) -> Dict[str, Any]:
    """The config fields that re-run a run: from a ``config.json``, a ``result.json``, or one published run
    named as ``RESULTS/runs.jsonl#RUN_ID`` (or ``RESULTS#RUN_ID``). A record whose config asked for
    ``kernel="auto"`` gets the kernels that ran (``provenance.kernel_pin``), so the re-run uses them even
    after the dispatch rule has changed, and a record without a ``chunk_floor`` gets the one it ran with
    (``provenance.chunk_floor``; 2048 where the record predates it). The run id, if present, is left out."""
    base, _, run_id = path.partition("#")
    if run_id:
        if os.path.isdir(base):
            base = os.path.join(base, RUNS_FILE)
        found = [unpack_record(r) for _, r in read_runs_file(base)[0] if r["run_id"] == run_id]
        if not found:
            raise ResultError(f"{base}: no run {run_id!r}")
        data: Any = found[-1]
    else:
        data = read_json(base)
    if not isinstance(data, dict):
        raise ResultError(f"{path}: expected a JSON object of config fields")
    config = dict(data["config"]) if isinstance(data.get("config"), dict) else dict(data)
    config.pop("run_id", None)
    provenance = data.get("provenance") or {}
    if config.get("chunk_floor") is None and "config" in data and isinstance(data.get("provenance"), dict):
        from recnorm.kernels.fused import LEGACY_CHUNK_FLOOR

        # a run replays with its own chunk floor; runs that do not record one ran with the old floor
        config["chunk_floor"] = provenance.get("chunk_floor", LEGACY_CHUNK_FLOOR)
        if provenance.get("chunk_rows_env"):
            logger.warning("%s ran with RECNORM_FUSED_CHUNK_ROWS=%s: a re-run reproduces it only with the same "
                           "setting", path, provenance["chunk_rows_env"])
    if config.get("kernel", "auto") == "auto" and provenance.get("kernel_pin") and "config" in data:
        config["kernel"] = provenance["kernel_pin"]
    elif config.get("kernel", "auto") == "auto" and provenance.get("dispatch_rule"):
        from recnorm.experiments.provenance import rule_digest

        if provenance["dispatch_rule"] != rule_digest():
            logger.warning("%s ran under another dispatch rule (%s, now %s) and recorded no kernel pin: a re-run "
                           "may train on other kernels and end elsewhere", path, provenance["dispatch_rule"],
                           rule_digest())
    return config


# ---------------------------------------------------------------------------------------------- records
def model_label(config: Dict[str, Any]) -> str:
    """A short label for the normalization of a run: ``"none"``, ``"layer"``, ``"batch γ=0.1"``,
    ``"layer joint carried c"``...; a norm between stacked layers is added (``"none+between=batch"``)."""
    norm = config.get("norm") or "none"
    kwargs = config.get("norm_kwargs") or {}
    gain = kwargs.get("gain_init")
    label = f"{norm} γ={gain:g}" if gain is not None else norm
    if kwargs.get("joint"):  # the layer-norm variants of torchaudio and TF-Addons (recnorm.nn.norms)
        label += " joint"
    if kwargs.get("carry_cell"):
        label += " carried c"
    between = config.get("between_layers")
    return f"{label}+between={between}" if between else label


def final_metric(record: Dict[str, Any], split: str = "test") -> Optional[float]:
    """The headline metric of a finished run on ``split`` (population statistics; recomputed ones for
    batch norms), or None when the run diverged."""
    final = record.get("final") or {}
    values = final.get(split) or {}
    return values.get(record.get("metric"))


def valid_curve(record: Dict[str, Any]) -> Dict[str, List[float]]:
    """``{"step", "time", "value"}`` of the validation metric over training."""
    valid = record.get("valid") or {}
    return {"step": list(valid.get("step", [])), "time": list(valid.get("time", [])),
            "value": list(valid.get(record.get("metric"), []))}


def area_under_curve(steps: Sequence[float], values: Sequence[Optional[float]], total: float) -> Optional[float]:
    """Trapezoidal mean of ``values`` over the steps (the normalized area under a learning curve), or None
    when the curve has a missing value or stops before ``total`` (a diverged run)."""
    if len(steps) < 2 or total <= 0 or any(v is None for v in values) or steps[-1] < total:
        return None
    area = 0.0
    for (s0, v0), (s1, v1) in zip(zip(steps, values), zip(steps[1:], values[1:])):
        area += 0.5 * (v0 + v1) * (s1 - s0)
    return area / (steps[-1] - steps[0])


def first_reach(xs: Sequence[float], values: Sequence[Optional[float]], target: float,
                higher_is_better: bool) -> Optional[float]:
    """The first ``x`` at which ``value`` reaches ``target`` (None: never)."""
    for x, v in zip(xs, values):
        if v is not None and (v >= target if higher_is_better else v <= target):
            return x
    return None


def group_records(records: Iterable[Dict[str, Any]],
                  key: Callable[[Dict[str, Any]], Any]) -> Dict[Any, List[Dict[str, Any]]]:
    """Records grouped by ``key(record)`` in first-seen order."""
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return groups


def summary(values: Iterable[Optional[float]]) -> Dict[str, Any]:
    """mean, std (sample; 0 for one value), min, max and n of the finite values; n_missing counts the rest
    (None: a diverged run)."""
    values = list(values)
    vals = [v for v in values if v is not None and math.isfinite(v)]
    missing = len(values) - len(vals)
    out: Dict[str, Any] = {"n": len(vals), "n_missing": missing, "mean": None, "std": None, "min": None, "max": None}
    if vals:
        out.update(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                   min=min(vals), max=max(vals))
    return out


def aggregate(records: Iterable[Dict[str, Any]], by: Callable[[Dict[str, Any]], Any],
              value: Callable[[Dict[str, Any]], Optional[float]]) -> List[Dict[str, Any]]:
    """Per group (``by``): :func:`summary` of ``value`` over the group's runs (typically the seeds).

    Returns a list of ``{"group": key, "mean", "std", "min", "max", "n", "n_missing", "values"}``.
    """
    rows = []
    for key, group in group_records(records, by).items():
        values = [value(r) for r in group]
        rows.append({"group": key, **summary(values), "values": values})
    return rows
