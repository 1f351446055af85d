"""Command line: ``recnorm`` (or ``python -m recnorm``). Parses arguments, then calls the library.

Subcommands::

    recnorm compare [--preset default] [--smoke] [--workers N] [--out DIR]   run a preset sweep + report
                    [--backend ray [--address ADDRESS]]                      (also for sweep: runs on Ray)
    recnorm train [--config FILE] [--task digits --norm batch ...] [--set k=v] [--out DIR]
    recnorm sweep (--spec FILE | --preset NAME) [--grid k=v1,v2] [--set k=v] [--out DIR] [--workers N]
    recnorm report DIR                                                       HTML + Markdown report
    recnorm evidence [--results DIR] [--docs DIR] [--out FILE]               the one-page answer (evidence.md)
    recnorm tasks | norms | inits | studies (alias: presets)                 listings

This module is the only one that writes to the terminal; the library logs through ``logging``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false/null, lists, dicts, quoted strings),
    ``none``/``None`` as None, otherwise the string itself."""
    if text in ("none", "None"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignment(text: str) -> tuple:
    """``key=value`` -> (key, parsed value)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def parse_grid_axis(text: str) -> tuple:
    """``key=v1,v2,...`` (or ``key=[JSON list]``) -> (key, [values])."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,..., got {text!r}")
    key, values = text.split("=", 1)
    values = values.strip()
    if values.startswith("["):
        parsed = parse_value(values)
        if not isinstance(parsed, list):
            raise argparse.ArgumentTypeError(f"expected a JSON list after {key}=, got {values!r}")
        return key.strip(), parsed
    return key.strip(), [parse_value(v) for v in values.split(",")]


def parse_json_object(text: str) -> Dict[str, Any]:
    """A JSON object (``'{"train_size": 1000}'``) -> dict; anything else is an argparse error saying so."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object in single quotes, such as '{{\"train_size\": 1000}}', got {text!r}")
    return value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per RunConfig field (values parsed by :func:`parse_value`; dict fields must
    be JSON objects)."""
    from recnorm.experiments.config import field_help, field_types

    from recnorm.experiments.config import RunConfig

    types = field_types()
    defaults = RunConfig().to_dict()
    group = parser.add_argument_group("run config fields (override --config)")
    for name, help_text in field_help().items():
        is_dict = types[name] is dict
        if "default" not in help_text and name in defaults:  # the flag's own default is "not given"
            help_text = f"{help_text} (default: {json.dumps(defaults[name]) if is_dict else defaults[name]})"
        group.add_argument("--" + name.replace("_", "-"), dest="field_" + name,
                           type=parse_json_object if is_dict else parse_value, metavar="JSON" if is_dict else "VALUE",
                           default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))


def _add_backend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="where runs execute: local worker processes (default) or Ray tasks (needs recnorm[ray])")
    parser.add_argument("--address", default=None,
                        help="with --backend ray: the cluster to join (default: $RAY_ADDRESS, else start a local "
                             "Ray instance); --workers then caps the runs in flight")


def _add_results_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="publish the finished runs to DIR/runs.jsonl when the sweep ends, e.g. results/<study> "
                             "(default: none, the runs stay in the sweep directory)")


def _make_backend(args: argparse.Namespace, todo: Sequence[Any] = (1,)) -> Any:
    """The sweep backend the flags ask for (None: local processes); it joins its cluster now when there
    are runs ``todo``."""
    if args.backend == "local":
        if args.address:
            raise ValueError("--address: expected --backend ray with it")
        return None
    from recnorm.experiments.ray_backend import RayBackend, ray_import_error

    problem = ray_import_error()
    if problem is not None:
        raise ValueError(f"--backend ray: {problem}")
    try:
        backend = RayBackend(address=args.address, max_in_flight=args.workers, notify=_out)
    except ImportError as exc:  # ray:// without the Ray client
        raise ValueError(f"--backend ray: {exc}") from None
    if todo:
        backend.connect()  # a cluster that does not answer stops here, before anything is written
    return backend


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that states every option's default: ``(default: X)`` is added where the text does not already
    say it and the option has a value by default (flags that are off and options that are unset by default
    say what happens then in their own text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or "%(default)" in text or not action.option_strings or default is None
                or default is argparse.SUPPRESS or isinstance(default, bool) or default == []
                or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


def _add_sweep_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of configs (resumable)",
        description="Train every config of a grid in parallel worker processes. Resumable: finished runs are "
                    "skipped, so re-running the same command after an interruption finishes the rest.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--spec", help="JSON sweep spec: {name, base: {...}, grids: [{field: [values]}]} (default: none; "
                                     "without --spec or --preset, the grid of --grid axes over the default config)")
    src.add_argument("--preset", help="start from a study's sweep (see `recnorm studies`) (default: none)")
    p.add_argument("--smoke", action="store_true", help="with --preset: its smoke variant")
    p.add_argument("--name", default=None,
                   help="sweep name (default: from the spec or preset, else the --out folder's name, else 'grid')")
    p.add_argument("--set", dest="sets", action="append", type=parse_assignment, default=[], metavar="KEY=VALUE",
                   help="set a field of the base config; repeatable (default: none)")
    p.add_argument("--grid", dest="grid", action="append", type=parse_grid_axis, default=[], metavar="KEY=V1,V2",
                   help="add an axis to every grid (e.g. --grid norm=none,layer,batch --grid seed=0,1,2); repeatable "
                        "(default: none)")
    p.add_argument("--out", default=None, help="sweep directory (default: runs/<name>)")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: CPU count)")
    p.add_argument("--max-runs", type=int, default=None, help="run at most this many unfinished runs now (default: all of them)")
    p.add_argument("--report", action="store_true", help="write the report when the sweep is done")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    _add_backend_flags(p)
    _add_results_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recnorm",
        description="Normalized LSTM/GRU/RNN layers and the evidence engine that tests when normalization helps.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable), so that the cells, norms and tasks it registers can "
                             "be named, e.g. `recnorm --import my_cells train --cell mgu` (a sweep spec lists its "
                             "workers' modules in its own \"imports\")")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)

    p = sub.add_parser(
        "compare", help="run a study (default: the main one) and write its report",
        description="Train every run of a study (see `recnorm studies`) in parallel worker processes "
                    "and write its report (report.html, report.md and figures/) into the output directory. "
                    "Interrupt it at any time: finished runs are kept, and the same command resumes.")
    p.add_argument("--preset", default="default", help="study name (see `recnorm studies`); default: default")
    p.add_argument("--smoke", action="store_true", help="the preset's tiny smoke variant (one step per run)")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: CPU count)")
    p.add_argument("--out", default=None, help="sweep directory (default: runs/compare, or runs/<preset>)")
    p.add_argument("--no-report", action="store_true", help="skip writing the report")
    _add_backend_flags(p)
    _add_results_flag(p)

    p = sub.add_parser(
        "train", help="train and evaluate one run",
        description="Train and evaluate one model. Writes config.json, model.pt (the trained weights, a "
                    "state_dict) and result.json (curves, final metrics, diagnostics) into the run directory.")
    p.add_argument("--config", help="JSON file with run config fields (a run's config.json or result.json), or a "
                                    "published run as results/<study>/runs.jsonl#RUN_ID (default: none; every field "
                                    "at its default below)")
    p.add_argument("--set", dest="sets", action="append", type=parse_assignment, default=[], metavar="KEY=VALUE",
                   help="set a config field; dotted keys set dict entries (task_options.train_size=1000); repeatable "
                        "(default: none)")
    p.add_argument("--out", default=None, help="run directory (default: runs/train/<run_id>)")
    p.add_argument("--report", action="store_true", help="write a report for the run")
    _add_config_flags(p)

    _add_sweep_parser(sub)

    p = sub.add_parser(
        "report", help="write report.html and report.md for a run or sweep directory",
        description="Rebuild the report of a run or sweep directory from the files on disk alone.")
    p.add_argument("run_dir", help="a run directory (result.json), a sweep directory (sweep.json) or a study's "
                                    "published runs (results/<study>)")
    p.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR)")

    p = sub.add_parser("evidence", help="write docs/evidence.md, one row per claim, from the committed runs")
    p.add_argument("--results", default="results", help="directory holding each study's runs as STUDY/runs.jsonl "
                                                         "(default: results)")
    p.add_argument("--docs", default="docs", help="the docs directory: the page goes there, and a study without "
                                                  "RESULTS/STUDY/runs.jsonl is read from its sweep directory in it "
                                                  "(default: docs)")
    p.add_argument("--out", default=None, help="the page to write (default: DOCS/evidence.md)")

    sub.add_parser("tasks", help="list the tasks with their sizes")
    sub.add_parser("norms", help="list the normalizations and their options")
    sub.add_parser("inits", help="list the initialization schemes")
    sub.add_parser("studies", aliases=["presets"], help="list the studies (their sweeps, claims and commands)")
    return parser


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser: its help states the defaults (:class:`_DefaultsFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- terminal
class _TqdmHandler(logging.Handler):
    """Log records written with ``tqdm.write`` so that they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger("recnorm")
    root.setLevel(level)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def _out(text: str = "") -> None:
    print(text)


def _sweep_with_progress(spec: Any, out_dir: str, workers: int, max_runs: Optional[int] = None,
                         backend: Any = None, results_dir: Optional[str] = None) -> Any:
    from tqdm import tqdm

    from recnorm.experiments.sweep import run_sweep

    bar: Dict[str, Any] = {}

    def progress(event: str, info: Dict[str, Any]) -> None:
        if event == "start":  # (damaged results that are run again are named by a logged warning)
            if not info["todo"]:  # nothing to run: one line, no progress bar
                _out(f"sweep {spec.name}: all {info['total']} runs already finished -> {out_dir}")
                return
            where = f"{workers} worker(s)" if backend is None else f"the {backend.name} backend"
            _out(f"sweep {spec.name}: {info['total']} runs, {info['skipped']} already finished, "
                 f"{info['todo']} to run with {where} -> {out_dir}")
            bar["bar"] = tqdm(total=info["todo"], unit="run", dynamic_ncols=True)
            bar["counts"] = {}
        else:
            counts = bar["counts"]
            counts[info["status"]] = counts.get(info["status"], 0) + 1
            bar["bar"].set_postfix(counts)
            bar["bar"].update(1)
            if info["error"]:
                bar["bar"].write(f"run {info['run_id']} failed: {info['error']}")

    try:
        return run_sweep(spec, out_dir, workers=workers, progress=progress, max_runs=max_runs, backend=backend,
                         results_dir=results_dir)
    finally:
        if "bar" in bar:
            bar["bar"].close()


def _report(path: str, out: Optional[str] = None) -> int:
    _need_extras("matplotlib")
    from recnorm.experiments.report import write_report

    paths = write_report(path, out)
    for problem in paths.get("skipped", []):
        _out(f"skipped a damaged result: {problem}")
    _out(f"report: {paths['html']}")
    _out(f"        {paths['markdown']}")
    verdicts = paths["verdicts"]
    if verdicts:
        _out("verdicts:")
        for task, claim, _evidence, effect, seeds, verdict in verdicts:
            _out(f"  [{task}] {claim}: {verdict.replace('**', '')} (seeds: {seeds})")
    return 0


# ---------------------------------------------------------------------------------------------- commands
def _cmd_compare(args: argparse.Namespace) -> int:
    _need_extras("tqdm", *(() if args.no_report else ("matplotlib",)))
    from recnorm.experiments.presets import get_preset

    spec = get_preset(args.preset, smoke=args.smoke)
    out = args.out or os.path.join("runs", ("compare" if args.preset == "default" else args.preset)
                                   + ("-smoke" if args.smoke else ""))
    todo = _unfinished(spec.expand(), out)
    backend = _make_backend(args, todo)  # a missing Ray stops here, before anything is written
    os.makedirs(out, exist_ok=True)  # an unwritable --out fails now, not after the compile
    _build_kernels_first(todo, backend)
    outcome = _sweep_with_progress(spec, out, args.workers or os.cpu_count() or 1, backend=backend,
                                   results_dir=args.results)
    if outcome.failed:
        _out(f"{len(outcome.failed)} run(s) failed (see their error.json); re-run the same command to retry")
    if not args.no_report:
        return _report(out) or (1 if outcome.failed else 0)
    return 1 if outcome.failed else 0


def _config_from_args(args: argparse.Namespace) -> Any:
    from recnorm.experiments.config import RunConfig, set_field

    data: Dict[str, Any] = {}
    if args.config:  # a config.json, a result.json, or RESULTS/runs.jsonl#RUN_ID; without the run id
        from recnorm.experiments.results import read_config

        data = read_config(args.config)
    for key, value in vars(args).items():
        if key.startswith("field_"):
            data[key[len("field_"):]] = value
    for key, value in args.sets:
        set_field(data, key, value)
    return RunConfig.from_dict(data)


def _cmd_train(args: argparse.Namespace) -> int:
    _need_extras("tqdm", *(("matplotlib",) if args.report else ()))
    from tqdm import tqdm

    from recnorm.experiments.train import train_and_evaluate

    config = _config_from_args(args).validate()
    out = args.out or os.path.join("runs", "train", config.run_id)
    os.makedirs(out, exist_ok=True)  # an unwritable --out fails now, not after the compile
    _build_kernels_first([config])
    _out(f"run {config.run_id} -> {out}")
    _out("loading the data and evaluating the untrained model...")
    bar: Dict[str, Any] = {}

    def progress(step: int, total: int, info: Dict[str, Any]) -> None:
        if "training" in info:
            # Started here and counted from the first step, so that data loading, the step-0 evaluation and
            # the first step's warm-up do not enter the estimate of the time left.
            bar["bar"] = tqdm(total=total, unit="step", dynamic_ncols=True, smoothing=0)
        elif "loss" in info:
            b = bar["bar"]
            if step == 1:
                b.reset(total=total)
                b.initial = b.n = 1
            else:
                b.update(1)
            b.set_postfix(loss=f"{info['loss']:.4f}")
        elif "valid" in info:
            text = f"step {step}: valid " + ", ".join(f"{k} {v:.4g}" for k, v in info["valid"].items() if v is not None)
            bar["bar"].write(text) if "bar" in bar else _out(text)

    try:
        result = train_and_evaluate(config, out, progress=progress)
    finally:
        if "bar" in bar:
            bar["bar"].close()
    for line in _train_summary(result, out):
        _out(line)
    if args.report:
        _report(out)
    return 0


def _train_summary(result: Any, out: str) -> List[str]:
    """The end of ``recnorm train``: what was trained, its final numbers and where the files are."""
    from recnorm.experiments.train import MODEL_FILE

    c = result.config
    norm = c["norm"] or "no norm"
    if c.get("norm_kwargs"):
        norm += " (" + ", ".join(f"{k}={v}" for k, v in c["norm_kwargs"].items()) + ")"
    seconds = result.timing["total_seconds"]
    lines = [f"{result.status if result.status != 'ok' else 'done'} in {_duration(seconds)}: "
             f"{result.steps_done} of {result.steps_planned} steps, {c['cell']} with {norm} on {c['task']}, "
             f"{result.num_params:,} parameters"]
    if result.status == "diverged":
        lines.append(f"  diverged: {result.diverged_reason}; no final metrics and no weights")
    else:
        metric = result.metric
        better = "higher" if result.higher_is_better else "lower"

        def numbers(split: str) -> str:
            values = result.final.get(split) or {}
            parts = [f"{metric} {_num(values.get(metric))}"]
            if metric != "loss" and "loss" in values:
                parts.append(f"loss {_num(values.get('loss'))}")
            return ", ".join(parts)

        lines.append(f"  valid: {numbers('valid')}")
        lines.append(f"  test:  {numbers('test')}   ({metric}: {better} is better)")
        if result.final.get("population_statistics") == "recomputed":
            ema = (result.final.get("test_ema") or {}).get(metric)
            batch = (result.final.get("test_batch_stats") or {}).get(metric)
            extra = f"; test {metric} with the running averages (what .eval() uses): {_num(ema)}"
            if batch is not None:
                extra += f", with batch statistics: {_num(batch)}"
            lines.append(f"  batch norm evaluated with population statistics recomputed exactly from "
                         f"{c['popstat_batches']} training batches{extra}")
    files = ["config.json", "result.json"] + ([MODEL_FILE] if result.status == "ok" else [])
    lines.append(f"files: {out}/ " + ", ".join(files))
    return lines


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _cmd_sweep(args: argparse.Namespace) -> int:
    from recnorm.experiments.presets import get_preset
    from recnorm.experiments.sweep import SweepSpec, load_spec

    if args.smoke and not args.preset:
        raise ValueError("--smoke: expected --preset NAME with it")
    if args.spec:
        spec = load_spec(args.spec)
    elif args.preset:
        spec = get_preset(args.preset, smoke=args.smoke)
    else:
        spec = SweepSpec(name=os.path.basename(os.path.normpath(args.out)) if args.out else "grid")
    if args.name:
        spec.name = args.name
    if args.sets:
        spec.base = spec.base.replace(**dict(args.sets))
    for key, values in args.grid:
        spec.grids = [{**g, key: values} for g in (spec.grids or [{}])]
    configs = spec.expand()
    out = args.out or os.path.join("runs", spec.name)
    if args.dry_run:
        _out(f"{len(configs)} runs -> {out}")
        for c in configs:
            _out(f"  {c.run_id}")
        return 0
    _need_extras("tqdm", *(("matplotlib",) if args.report else ()))
    todo = _unfinished(configs, out)
    backend = _make_backend(args, todo)  # a missing Ray stops here, before anything is written
    os.makedirs(out, exist_ok=True)  # an unwritable --out fails now, not after the compile
    _build_kernels_first(todo, backend)
    outcome = _sweep_with_progress(spec, out, args.workers or os.cpu_count() or 1, max_runs=args.max_runs,
                                   backend=backend, results_dir=args.results)
    _out(f"{len(outcome.completed)} run(s) finished now, {len(outcome.skipped)} before, {len(outcome.failed)} failed")
    if args.report:
        _report(out)
    return 1 if outcome.failed else 0


def _cmd_evidence(args: argparse.Namespace) -> int:
    from recnorm.experiments.evidence import write_evidence

    _out(f"evidence: {write_evidence(args.results, args.docs, args.out)}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from recnorm.experiments.tasks.base import DataMissingError, create_task, get_task, list_tasks

    rows = [["task", "kind", "metric", "T", "input", "vocab", "outputs", "train/valid/test (default options)"]]
    for name in list_tasks():
        try:
            task = create_task(name)  # builds no data: sizes come from the task's options
        except DataMissingError as exc:
            rows.append([name, get_task(name).kind, get_task(name).metric, "", "", "", "", f"data missing: {exc}"])
            continue
        rows.append([name, task.kind, task.metric, str(task.seq_len), str(task.input_size),
                     str(task.vocab_size or "-"), str(task.num_outputs), task.sizes()])
    _table(rows)
    return 0


def _cmd_norms(args: argparse.Namespace) -> int:
    import recnorm

    rows = [["norm", "options (defaults)"], ["none", "-"]]
    for name in recnorm.list_norms():
        rows.append([name, ", ".join(f"{k}={v}" for k, v in recnorm.norm_options(name).items())])
    _table(rows)
    return 0


def _cmd_inits(args: argparse.Namespace) -> int:
    from recnorm import init

    for name in init.list_inits():
        _out(name)
    return 0


def _cmd_studies(args: argparse.Namespace) -> int:
    from recnorm.experiments.studies import STUDIES, list_studies

    import shutil
    import textwrap

    width = max(60, min(110, shutil.get_terminal_size((100, 24)).columns))
    for name in list_studies():
        study = STUDIES.get(name)
        doc = _preset_doc(study.doc)
        claims = f", {len(study.designs)} claim families" if study.designs else ""
        _out(textwrap.fill(f"{name} ({len(study.spec().expand())} runs{claims}): {doc['summary']}", width,
                           subsequent_indent="    ", break_on_hyphens=False))
        for key in ("Command", "Running time"):
            if doc.get(key):
                _out(textwrap.fill(f"{key}: {doc[key]}", width, initial_indent="    ", subsequent_indent="        ",
                                   break_on_hyphens=False))
        _out()
    _out(textwrap.fill("Running times exclude the one-time compile of recnorm's C++ kernels (about a minute each, "
                       "once per torch installation), which compare and sweep do first and announce.", width))
    return 0


def _preset_doc(doc: str) -> Dict[str, str]:
    """A preset's docstring as plain text: its first paragraph (``summary``) and the whole sentences after
    ``Command:`` and ``Running time:``, with reStructuredText's double backticks removed."""
    import inspect

    paragraphs = [" ".join(p.split()).replace("``", "") for p in inspect.cleandoc(doc).split("\n\n")]
    out = {"summary": paragraphs[0] if paragraphs else ""}
    for paragraph in paragraphs[1:]:
        for key in ("Command", "Running time"):
            marker = key + ":"
            if marker in paragraph:
                text = paragraph.split(marker, 1)[1]
                for other in ("Command:", "Running time:"):
                    text = text.split(other, 1)[0]
                out[key] = text.strip().rstrip(".") if key == "Command" else text.strip()
    return out


def _table(rows: List[List[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _cmd_report(args: argparse.Namespace) -> int:
    _need_extras("matplotlib")
    _check_report_target(args.run_dir)
    return _report(args.run_dir, args.out)


def _check_report_target(path: str) -> None:
    """Refuse, in one line, a directory that is neither a run nor a sweep (instead of merging every run below it)."""
    from recnorm.experiments.results import RESULT_FILE, SWEEP_FILE, is_run_dir, is_sweep_dir

    if not os.path.isdir(path) or is_run_dir(path) or is_sweep_dir(path):
        return  # a missing path is reported by the report itself
    below = [os.path.relpath(root, path) for root, _dirs, files in os.walk(path) if SWEEP_FILE in files]
    kind = "sweep directories"
    if not below:
        below = [os.path.relpath(root, path) for root, _dirs, files in os.walk(path) if RESULT_FILE in files]
        kind = "run directories"
    hint = (f"; it holds {len(below)} {kind} below, such as {os.path.join(path, sorted(below)[0])}: pass one of them"
            if below else "; it holds no run or sweep below either")
    raise ValueError(f"{path} is neither a run directory ({RESULT_FILE}) nor a sweep directory ({SWEEP_FILE}){hint}")


_COMMANDS = {"compare": _cmd_compare, "train": _cmd_train, "sweep": _cmd_sweep,
             "report": _cmd_report, "evidence": _cmd_evidence, "tasks": _cmd_tasks,
             "norms": _cmd_norms, "inits": _cmd_inits, "studies": _cmd_studies, "presets": _cmd_studies}


# Packages of the optional extras, by the extra that installs them.
_EXTRAS = {"tqdm": "experiments", "matplotlib": "experiments", "sklearn": "experiments", "mnist1d": "experiments"}


class _MissingExtra(Exception):
    """A package of an optional extra is not installed."""


def _need_extras(*modules: str) -> None:
    """Import ``modules`` now, so that a missing extra is named before any work starts."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            extra = _EXTRAS.get(module, "experiments")
            raise _MissingExtra(
                f"this command needs {module!r} ({exc}), which comes with recnorm's {extra!r} extra: "
                f"pip install 'recnorm[{extra}]' (in a checkout: pip install -e '.[{extra}]', or ./run compare)"
            ) from None


def _os_error(exc: OSError) -> str:
    """One line for an operating-system error: what failed on which path."""
    what = exc.strerror or str(exc)
    if exc.filename is None:
        return what
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " (choose a writable directory, e.g. with --out)"
    return f"{what}: {exc.filename}{hint}"


def _unfinished(configs: Sequence[Any], out: str) -> List[Any]:
    """The configs whose run in sweep directory ``out`` has no ``result.json`` yet (what a sweep will run)."""
    from recnorm.experiments.results import RESULT_FILE

    return [c for c in configs if not os.path.exists(os.path.join(out, "runs", c.run_id, RESULT_FILE))]


def _build_kernels_first(configs: Sequence[Any], backend: Any = None) -> None:
    """Compile recnorm's C++ kernels now, with a message, when the runs need them and they are not built:
    otherwise the first run would sit silently through the compile (about a minute per kernel). A backend
    that runs elsewhere (a Ray cluster) builds them on its own nodes (``backend.builds_kernels``): this
    process then compiles nothing it will not use."""
    fused = ("layer", "rms", "batch", "shared_batch")
    if os.environ.get("RECNORM_KERNEL") == "reference" or not any(c.norm in fused for c in configs):
        return
    if backend is not None and getattr(backend, "builds_kernels", False):
        return
    import time

    from recnorm import kernels

    if kernels.extensions_built():
        return
    _out("compiling recnorm's C++ kernels: once per torch installation, about a minute each (2 kernels)...")
    start = time.perf_counter()
    status = kernels.build_extensions()
    failed = {k: v for k, v in status.items() if v}
    if failed:
        _out("could not build the fused " + ", ".join(f"{k} kernel ({v})" for k, v in failed.items()) +
             "; those layers run the reference loop, several times slower than the times quoted "
             "(a C++ compiler and the Python headers are needed: see README)")
    else:
        _out(f"compiled in {_duration(time.perf_counter() - start)}; the time estimates below do not include it")


def _ignore_further_interrupts() -> None:
    # The command is over: more Ctrl-Cs while the interpreter exits (and its thread pools are joined) would
    # only print tracebacks.
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _connect_error() -> type:
    """:class:`~recnorm.experiments.ray_backend.RayConnectError` (importing that module does not import Ray)."""
    from recnorm.experiments.ray_backend import RayConnectError

    return RayConnectError


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of a closed pipe raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor (captured)
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``recnorm`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    import importlib

    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"recnorm: error: --import {module}: {exc}", file=sys.stderr)
            return 2
    from recnorm.experiments.config import ConfigError
    from recnorm.experiments.sweep import SweepBusyError

    try:
        status = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that stopped early (`| head`) is seen here, not at interpreter exit
        return status
    except BrokenPipeError:  # output piped into a command that stopped reading: quiet, as `cat | head` is
        _silence_stdout()
        return 0
    except _MissingExtra as exc:
        print(f"recnorm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, FileNotFoundError, SweepBusyError, _connect_error()) as exc:
        print(f"recnorm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable or read-only output directory, a full disk, ...
        if args.verbose >= 2:
            raise
        print(f"recnorm {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        if args.command in ("compare", "sweep"):
            print("interrupted; finished runs are kept, re-run the same command to resume", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
