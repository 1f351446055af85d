"""One-off migration: the run directories once committed under ``docs/<study>/runs/`` into
``results/<study>/runs.jsonl`` (see :mod:`recnorm.experiments.results`).

Command, from the repository root (it reads the git log for each run's commit)::

    python -m recnorm.experiments.migrate --docs docs --results results
    git rm -r -q docs/*/runs docs/*/sweep.json docs/*/sweep.lock

Every ``config.json`` + ``result.json`` pair becomes one line of ``results/<study>/runs.jsonl`` and each
study's ``sweep.json`` moves beside it. Weights (``model.pt``) and locks are not carried over.

``python -m recnorm.experiments.migrate --compact --results results`` only rewrites each published
``sweep.json`` with its grids merged (same runs, same order; see :func:`compact_manifests`).

These runs predate the fitted dispatch rule (:mod:`recnorm.kernels.autotune`) and predate provenance, so each
migrated record gets ``config.kernel = "legacy"`` (torch's op first, then the fused kernel, then the reference
loop: how ``kernel="auto"`` chose before the rule), which replays them bit for bit, and a ``provenance`` that
says what is known: the commit that committed the run (``committed_in``), and the environment that caps the
CPU's vector ISA to the AVX2 of the machine that made them (``replay_env``; verified by
``tests/experiments/test_reproduce.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from recnorm.experiments.results import (
    RESULT_FILE, SWEEP_FILE, is_sweep_dir, load_records, publish, read_json, write_json_atomic)

__all__ = ["migrate", "LEGACY_REPLAY_ENV"]

logger = logging.getLogger(__name__)

#: The environment that replays the committed runs on a CPU with more than AVX2 (set before torch loads).
LEGACY_REPLAY_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _commits(runs_dir: str) -> Dict[str, str]:
    """``{run directory name: the first commit that holds its result.json as it is now}``, from the git log
    (merges included: most runs came in through one). Runs the log does not know are left out."""
    try:
        log = subprocess.run(["git", "log", "-m", "--full-history", "--no-abbrev", "--format=commit %H", "--raw",
                              "--", runs_dir], capture_output=True, text=True, timeout=300, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    versions: Dict[str, List[tuple]] = {}  # path -> [(commit, blob)], newest first
    commit = None
    for line in log.splitlines():
        if line.startswith("commit "):
            commit = line.split()[1]
        elif line.startswith(":") and line.endswith("/" + RESULT_FILE) and commit is not None:
            fields, path = line.split("\t", 1)
            versions.setdefault(path, []).append((commit, fields.split()[3]))
    out: Dict[str, str] = {}
    for path, seen in versions.items():
        current = next((blob for _, blob in seen if set(blob) != {"0"}), None)  # newest content (not the deletion)
        first = [c for c, blob in seen if blob == current]
        if first:
            out[os.path.basename(os.path.dirname(path))] = first[-1]
    return out


def _legacy_mark(study: str, commits: Dict[str, str]) -> Any:
    def mark(record: Dict[str, Any]) -> Dict[str, Any]:
        record["config"] = {**record["config"], "kernel": "legacy"}
        record["provenance"] = {
            "commit": None, "dirty": None, "committed_in": commits.get(record["run_id"]), "kernel": "legacy",
            "kernels": None, "kernel_pin": None, "replay_env": dict(LEGACY_REPLAY_ENV),
            "migrated_from": f"docs/{study}/runs/{record['run_id']}",
            "note": "made before runs recorded provenance and before the fitted dispatch rule; "
                    "kernel 'legacy' with replay_env set replays it"}
        return record
    return mark


def migrate(docs: str, results: str, studies: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """Publish every ``docs/<study>/runs`` into ``results/<study>``; returns ``{study: runs}``."""
    done: Dict[str, int] = {}
    for study in sorted(studies or os.listdir(docs)):
        path = os.path.join(docs, study)
        if not (is_sweep_dir(path) and os.path.isdir(os.path.join(path, "runs"))):
            continue
        records = load_records(path)
        listed = {r["run_id"] for r in records}
        records += [r for r in load_records(os.path.join(path, "runs")) if r["run_id"] not in listed]
        mark = _legacy_mark(study, _commits(os.path.join(path, "runs")))
        publish(records, os.path.join(results, study), manifest=read_json(os.path.join(path, SWEEP_FILE)),
                mark=mark)
        done[study] = len(records)
        logger.info("%s: %d runs -> %s", study, len(records), os.path.join(results, study))
    return done


def compact_manifests(results: str, studies: Optional[Sequence[str]] = None) -> Dict[str, Tuple[int, int]]:
    """Rewrite each ``results/<study>/sweep.json`` with its grids merged (:meth:`SweepSpec.compacted`): the
    same runs in the same order, checked against the manifest's own run list. A sweep published by an older
    checkout (the init study's pinned runner writes one grid per run) shrinks from megabytes to kilobytes.
    Returns ``{study: (grids before, grids after)}`` for the manifests it changed."""
    from recnorm.experiments.sweep import SweepSpec

    done: Dict[str, Tuple[int, int]] = {}
    for study in sorted(studies or os.listdir(results)):
        path = os.path.join(results, study, SWEEP_FILE)
        if not os.path.isfile(path):
            continue
        manifest = read_json(path)
        spec = SweepSpec.from_dict(manifest["spec"])
        try:  # checked against the manifest's own run list where it has one
            compact = spec.compacted(manifest.get("runs"))
        except ValueError as exc:
            raise ValueError(f"{path}: its spec expands to other runs than its 'runs' list; left as it is") from exc
        if len(compact.grids) == len(spec.grids):
            continue
        write_json_atomic(path, {**manifest, "spec": compact.to_dict()})
        done[study] = (len(spec.grids), len(compact.grids))
        logger.info("%s: %d grids -> %d", path, len(spec.grids), len(compact.grids))
    return done


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recnorm.experiments.migrate", description=__doc__.split("\n")[0])
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--results", default="results")
    parser.add_argument("--compact", action="store_true",
                        help="only rewrite each results/<study>/sweep.json with its grids merged (same runs, same "
                             "order)")
    args = parser.parse_args(argv)
    if args.compact:
        for study, (before, after) in compact_manifests(args.results).items():
            print(f"{os.path.join(args.results, study, SWEEP_FILE)}: {before} grids -> {after}")
        return 0
    for study, n in migrate(args.docs, args.results).items():
        print(f"{study}: {n} runs -> {os.path.join(args.results, study, 'runs.jsonl')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
