"""Results on disk: atomic JSON writes, loading run and sweep directories, grouping and aggregation.

Layout written by the engine::

    RUN_DIR/config.json  RUN_DIR/result.json                 one run (``recnorm train``)
    SWEEP_DIR/sweep.json  SWEEP_DIR/runs/<run_id>/...         a sweep (``recnorm sweep``/``compare``)

A run is finished exactly when its ``result.json`` exists: it is written to a temporary file and renamed
into place, so a reader never sees half a result. A report rebuilds from these files alone.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

__all__ = [
    "write_json_atomic", "read_json", "load_run", "load_records", "is_run_dir", "is_sweep_dir",
    "model_label", "group_records", "aggregate", "summary", "final_metric", "valid_curve",
    "area_under_curve", "first_reach", "sanitize",
]

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
SWEEP_FILE = "sweep.json"


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


def write_json_atomic(path: str, obj: Any, indent: Optional[int] = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file in the same directory, fsync, rename.
    ``indent=None`` writes it on one line without spaces (for large files)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            separators = (",", ":") if indent is None else None
            json.dump(sanitize(obj), f, indent=indent, separators=separators, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RESULT_FILE))


def is_sweep_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SWEEP_FILE))


def load_run(run_dir: str) -> Dict[str, Any]:
    """The record of one finished run: the contents of its ``result.json`` plus ``"dir"``."""
    record = read_json(os.path.join(run_dir, RESULT_FILE))
    record["dir"] = os.path.abspath(run_dir)
    return record


def load_records(path: str) -> List[Dict[str, Any]]:
    """All finished runs under ``path``: a run directory, a sweep directory (the runs its manifest lists,
    in manifest order) or any directory (every ``result.json`` below it, sorted by path)."""
    if is_run_dir(path):
        return [load_run(path)]
    if is_sweep_dir(path):
        manifest = read_json(os.path.join(path, SWEEP_FILE))
        records = []
        for run_id in manifest.get("runs", []):
            run_dir = os.path.join(path, "runs", run_id)
            if is_run_dir(run_dir):
                records.append(load_run(run_dir))
        return records
    found = []
    for root, _dirs, files in os.walk(path):
        if RESULT_FILE in files:
            found.append(root)
    return [load_run(d) for d in sorted(found)]


# ---------------------------------------------------------------------------------------------- records
def model_label(config: Dict[str, Any]) -> str:
    """A short label for the normalization of a run: ``"none"``, ``"layer"``, ``"batch γ=0.1"``...; a norm
    between stacked layers is added (``"none+between=batch"``)."""
    norm = config.get("norm") or "none"
    gain = (config.get("norm_kwargs") or {}).get("gain_init")
    label = f"{norm} γ={gain:g}" if gain is not None else norm
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
