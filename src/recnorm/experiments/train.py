"""Train and evaluate one run: :func:`train_and_evaluate` (config, workdir) -> :class:`RunResult`.

What a run writes: ``workdir/config.json`` at the start (at the end, a run with ``kernel="auto"`` rewrites it
with the kernels that ran, ``provenance.kernel_pin``, so that ``recnorm train --config`` replays them); at the end ``workdir/model.pt`` (the trained
model's ``state_dict``, batch norms holding the population statistics its final metrics used; reload it with
:func:`load_model`) and then ``workdir/result.json``, each written atomically. ``result.json`` records:

* the resolved config, the task description, versions (python, torch, recnorm, platform) and the seed;
* provenance (:mod:`recnorm.experiments.provenance`): the git commit and whether the tree was dirty, the
  CPU model and vector ISA, the host, the Ray node, and the kernel that ran each layer in training and in
  evaluation, with ``kernel_pin``, the ``RunConfig.kernel`` value that replays those kernels;
* per training step: loss, the task metric on the batch, global gradient norm (before clipping), whether
  clipping fired, wall time of the step and cumulative training time;
* validation metrics at step 0, every ``eval_every`` steps and at the end (population statistics; for
  batch-norm models recomputed exactly from ``popstat_batches`` fixed training batches at every evaluation,
  because the running averages lag early in training);
* final valid and test metrics. For batch-norm models the population statistics are recomputed exactly
  (``recnorm.recompute_population_statistics`` over ``popstat_batches`` training batches) before the final
  evaluation; the numbers with the running (EMA) statistics and with batch statistics (of evaluation
  batches, and of batches of the training batch size) are kept beside them; with ``train_eval_examples``,
  also the metrics on that many training examples (eval mode), for the train-test gap;
* gradient flow: ``||dL/dh_t||`` for every t and every layer/direction, at init, every ``diag_every`` steps
  and at the end, on a fixed training batch; for batch-norm models the per-step batch statistics (at init
  and the end) and the population statistics (EMA and recomputed), as feature averages of the mean, the
  variance and their absolute values per step. Diagnostics keep 4 significant digits and ``result.json``
  is written without indentation, so that run directories stay small enough to commit;
* divergence: a non-finite loss or gradient norm stops the run with status ``"diverged"`` and the step.

Determinism: for a given config the run is bitwise repeatable on CPU (seeded torch, seeded data streams,
``torch.set_num_threads(config.threads)``) on the same kernels (``config.kernel``; see
:mod:`recnorm.experiments.provenance`) and a CPU with the same vector ISA. Diagnostics restore the RNG state and the normalization buffers
they touch, so ``diag_every`` does not change the training trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import random
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from recnorm.experiments.config import ConfigError, RunConfig, uses_batch_statistics
from recnorm.experiments.model import SequenceModel, build_model
from recnorm.experiments.provenance import collect as collect_provenance
from recnorm.experiments.provenance import kernel_dispatch, versions
from recnorm.experiments.results import CONFIG_FILE, RESULT_FILE, atomic_file, read_json, write_json_atomic

__all__ = ["RunResult", "train_and_evaluate", "evaluate", "versions", "load_result", "load_model", "make_task",
           "MODEL_FILE", "StepFn"]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"

#: ``progress(step, total_steps, info)``: called after every training step (info has "loss"), after every
#: evaluation (info has "valid"), and once just before the first training step (info has "training": True;
#: the time before it is data loading and the evaluation at step 0, not training).
ProgressFn = Callable[[int, int, Dict[str, Any]], None]

_DIAG_DIGITS = 4  # significant digits kept in the diagnostics (gradient norms, statistics)


@dataclasses.dataclass
class RunResult:
    """Everything one run produced; ``to_dict`` is exactly what ``result.json`` holds."""

    run_id: str
    status: str  # "ok" or "diverged"
    config: Dict[str, Any]
    task: Dict[str, Any]
    metric: str
    higher_is_better: bool
    seed: int
    versions: Dict[str, Any]
    steps_planned: int
    steps_done: int
    num_params: int
    train: Dict[str, List[Any]]
    valid: Dict[str, List[Any]]
    final: Dict[str, Any]
    diagnostics: Dict[str, Any]
    timing: Dict[str, Any]
    diverged_step: Optional[int] = None
    diverged_reason: Optional[str] = None
    provenance: Dict[str, Any] = dataclasses.field(default_factory=dict)
    extras: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def load_result(workdir: str) -> RunResult:
    """Read ``workdir/result.json``."""
    return RunResult.from_dict(read_json(os.path.join(workdir, RESULT_FILE)))


def load_model(workdir: str) -> SequenceModel:
    """The trained model of a finished run, rebuilt from ``workdir/config.json`` with the weights of
    ``workdir/model.pt``, in eval mode (the task's data is loaded to size the model)."""
    data = read_json(os.path.join(workdir, CONFIG_FILE))
    data.pop("run_id", None)
    config = RunConfig.from_dict(data).validate()
    model = build_model(config, make_task(config.task, dict(config.task_options)))
    model.load_state_dict(torch.load(os.path.join(workdir, MODEL_FILE), map_location="cpu", weights_only=True))
    return model.eval()


# ---------------------------------------------------------------------------------------------- tasks
_TASK_CACHE: Dict[str, Any] = {}


def make_task(name: str, options: Dict[str, Any]) -> Any:
    """``create_task(name, **options)``, cached per process (tasks are stateless between ``batches``
    calls, and loading real data is the slow part of a small run)."""
    from recnorm.experiments.tasks.base import create_task

    key = json.dumps([name, options], sort_keys=True, default=str)
    if key not in _TASK_CACHE:
        if len(_TASK_CACHE) >= 8:
            _TASK_CACHE.pop(next(iter(_TASK_CACHE)))
        _TASK_CACHE[key] = create_task(name, **options)
    return _TASK_CACHE[key]


def _resolve_steps(config: RunConfig, task: Any) -> int:
    if config.steps is not None:
        return config.steps
    count = getattr(task, "num_examples", None)
    if count is None:
        raise ConfigError(f"epochs: task {config.task!r} does not report its training-set size "
                          f"(no num_examples()); set steps instead")
    return max(1, math.ceil(config.epochs * count("train") / config.batch_size))


# ---------------------------------------------------------------------------------------------- evaluation
def _forward(model: SequenceModel, batch: Any) -> Tensor:
    return model(batch.x, batch.lengths)


@torch.no_grad()
def evaluate(model: SequenceModel, task: Any, split: str, batch_size: int,
             max_batches: Optional[int] = None) -> Dict[str, Optional[float]]:
    """Pooled metrics of ``split`` with the model in eval mode (population statistics); the model's mode is
    restored. Returns ``{metric: value}`` (None for a non-finite value)."""
    batches = task.batches(split, batch_size, seed=0)
    return _pooled_metrics(model, task, batches if max_batches is None else itertools.islice(batches, max_batches))


def _pooled_metrics(model: SequenceModel, task: Any, batches: Iterable[Any]) -> Dict[str, Optional[float]]:
    """Each metric pooled over ``batches`` (its sums over its counts), the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    sums: Dict[str, List[float]] = {}
    try:
        for batch in batches:
            for name, (s, c) in task.metrics(_forward(model, batch), batch).items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
    finally:
        model.train(was_training)
    return {k: _finite(s / c) if c else None for k, (s, c) in sums.items()}


def _slice_batch(batch: Any, k: int) -> Any:
    """The first ``k`` sequences of a batch (``y`` is ``(B,)`` or time-major ``(T, B)``)."""
    y = batch.y[:k] if batch.y.dim() == 1 else batch.y[:, :k]
    lengths = None if batch.lengths is None else batch.lengths[:k]
    return dataclasses.replace(batch, x=batch.x[:, :k], y=y, lengths=lengths)


@torch.no_grad()
def _evaluate_train_split(model: SequenceModel, task: Any, examples: int, batch_size: int
                          ) -> Dict[str, Optional[float]]:
    """Metrics (eval mode) on ``examples`` training examples: the first of one fixed shuffle of the training
    set, each example once when ``examples`` is at most the set's size."""
    examples = min(examples, task.num_examples("train"))

    def first_examples() -> Iterator[Any]:
        seen = 0
        for batch in task.batches("train", min(batch_size, examples), seed=0):
            if seen >= examples:
                return
            if seen + batch.batch_size > examples:
                batch = _slice_batch(batch, examples - seen)
            seen += batch.batch_size
            yield batch

    return _pooled_metrics(model, task, first_examples())


def _sorted_by_length(stream: Iterator[Any], pool: int, seed: int) -> Iterator[Any]:
    """Batches re-formed by length: take ``pool`` batches, sort their sequences by length, cut them into
    ``pool`` batches of neighbouring lengths (each trimmed to its longest sequence) and yield those in a
    seeded random order. Padding within a batch then shrinks to the spread of neighbouring lengths."""
    gen = torch.Generator().manual_seed(int(seed) + 3_000_017)
    while True:
        batches = [next(stream) for _ in range(pool)]
        if any(b.lengths is None for b in batches):
            raise ConfigError("sort_by_length: expected a task with variable-length batches (lengths set), got "
                              "batches of equal length")
        T = max(b.seq_len for b in batches)

        def pad(t: Tensor) -> Tensor:  # time-major tensor (T_i, B, ...) -> (T, B, ...)
            return torch.cat([t, t.new_zeros((T - t.shape[0],) + tuple(t.shape[1:]))]) if t.shape[0] < T else t

        x = torch.cat([pad(b.x) for b in batches], dim=1)
        per_step = batches[0].y.dim() == 2
        y = torch.cat([pad(b.y) for b in batches], dim=1) if per_step else torch.cat([b.y for b in batches])
        lengths = torch.cat([b.lengths for b in batches])
        order = torch.sort(lengths, stable=True).indices
        size = batches[0].batch_size
        for i in torch.randperm(pool, generator=gen).tolist():
            idx = order[i * size:(i + 1) * size]
            width = int(lengths[idx].max())
            yield dataclasses.replace(batches[0], x=x[:width, idx], y=y[:width, idx] if per_step else y[idx],
                                      lengths=lengths[idx])


@torch.no_grad()
def _evaluate_batch_stats(model: SequenceModel, task: Any, split: str, batch_size: int) -> Dict[str, Optional[float]]:
    """Metrics with the recurrent stack in training mode (batch statistics), restoring its buffers."""
    buffers = _snapshot_buffers(model)
    was_training = model.training
    sums: Dict[str, List[float]] = {}
    try:
        model.eval()
        model.rnn.train()
        for batch in task.batches(split, batch_size, seed=0):
            for name, (s, c) in task.metrics(_forward(model, batch), batch).items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
    finally:
        _restore_buffers(model, buffers)
        model.train(was_training)
    return {k: _finite(s / c) if c else None for k, (s, c) in sums.items()}


# ---------------------------------------------------------------------------------------------- diagnostics
def _snapshot_buffers(model: torch.nn.Module) -> Dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _restore_buffers(model: torch.nn.Module, saved: Dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in saved:
                b.copy_(saved[name])


def _summarize_stats(stats: Dict[str, Dict[str, Tensor]], max_len: Optional[int] = None) -> Dict[str, Any]:
    """``{module: {"mean": (T, F), "var": (T, F)}}`` -> per-step averages over features plus a few units."""
    out: Dict[str, Any] = {}
    for name, d in stats.items():
        entry: Dict[str, Any] = {}
        for key in ("mean", "var"):
            t = d.get(key)
            if t is None:
                continue
            t = t.detach().double()
            if t.dim() == 1:
                t = t.unsqueeze(0)  # statistics shared over time: one "step"
            t = t.reshape(t.shape[0], -1)
            if max_len is not None:
                t = t[:max_len]
            entry[key] = [_diag(v) for v in t.mean(1).tolist()]
            entry[f"{key}_abs"] = [_diag(v) for v in t.abs().mean(1).tolist()]
        out[name] = entry
    return out


def _gradient_flow(model: SequenceModel, task: Any, batch: Any, want_stats: bool) -> Dict[str, Any]:
    """``||dL/dh_t||`` per layer on ``batch`` (training mode), leaving no trace on the model or the RNG."""
    from recnorm import diagnostics

    buffers = _snapshot_buffers(model)
    rng = torch.get_rng_state()
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        with diagnostics.capture(model) as cap:
            loss = task.loss(_forward(model, batch), batch)
            loss.backward()
        norms = {k: [_diag(v) for v in t.detach().double().tolist()] for k, t in cap.hidden_grad_norms().items()}
        entry: Dict[str, Any] = {"loss": _finite(loss.item()), "norms": norms}
        if want_stats:
            entry["batch_stats"] = _summarize_stats(cap.batch_stats())
    finally:
        model.zero_grad(set_to_none=True)
        _restore_buffers(model, buffers)
        torch.set_rng_state(rng)
        model.train(was_training)
    return entry


def _recompute(model: SequenceModel, batches: List[Any]) -> None:
    """Exact population statistics from ``batches`` (no gradients; the RNG is left untouched)."""
    import recnorm

    rng = torch.get_rng_state()
    with torch.no_grad():
        recnorm.recompute_population_statistics(model, batches, forward_fn=_forward)
    torch.set_rng_state(rng)


@contextlib.contextmanager
def _recomputed_statistics(model: SequenceModel, batches: List[Any]) -> Iterator[None]:
    """Inside the block the batch norms hold exact population statistics; afterwards their running
    averages (and every other buffer) are restored."""
    saved = _snapshot_buffers(model)
    try:
        _recompute(model, batches)
        yield
    finally:
        _restore_buffers(model, saved)


def _population_stats(model: SequenceModel, max_len: int) -> Dict[str, Any]:
    from recnorm import diagnostics

    return _summarize_stats(diagnostics.population_stats(model), max_len)


# ---------------------------------------------------------------------------------------------- training
def _make_optimizer(config: RunConfig, params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum)


def _finite(x: float) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _r(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def _diag(x: float) -> Optional[float]:
    """A diagnostic value: None when not finite, else rounded to ``_DIAG_DIGITS`` significant digits."""
    x = float(x)
    return _r(x, _DIAG_DIGITS) if math.isfinite(x) else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- one run
#: ``on_step(step, model, info)``: called after every optimizer step (``info``: "loss", "grad_norm", "batch",
#: "task", "total_steps"). A dict it returns is kept in ``result.json`` under ``extras["on_step"]`` (with the
#: step). It runs without gradients, and the RNG state, the model's mode and its buffers are restored after
#: it, so it cannot change the training trajectory.
StepFn = Callable[[int, SequenceModel, Dict[str, Any]], Optional[Dict[str, Any]]]


class _Diverged(Exception):
    """A non-finite loss or gradient norm; the message says which, and at which step."""


@dataclasses.dataclass
class _Run:
    """One run in progress: what it trains, with what, and what it has recorded so far."""

    config: RunConfig
    task: Any
    model: SequenceModel
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    total_steps: int
    batch_norm: bool
    train_stream: Iterator[Any]
    diag_batch: Any
    pop_batches: List[Any]
    progress: Optional[ProgressFn] = None
    on_step: Optional[StepFn] = None
    checkpoint: Any = None  # a recnorm.experiments.checkpoint.Checkpoint, or None
    train: Dict[str, List[Any]] = dataclasses.field(default_factory=dict)
    valid: Dict[str, List[Any]] = dataclasses.field(default_factory=lambda: {"step": [], "time": []})
    grad_flow: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    diag_stats: Dict[str, Any] = dataclasses.field(default_factory=dict)
    step_extras: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: Dict[str, float] = dataclasses.field(default_factory=lambda: {"train": 0.0, "eval": 0.0, "diag": 0.0})
    best: Optional[Dict[str, Any]] = None  # early stopping: the best evaluation's value, step and weights
    stopped_step: Optional[int] = None  # early stopping: the step it stopped at (None: ran the whole budget)

    @property
    def metric(self) -> str:
        return self.task.metric


def _setup(config: RunConfig, progress: Optional[ProgressFn], on_step: Optional[StepFn]) -> _Run:
    """The task, the seeded model and optimizer, and the run's separate seeded data streams: training
    batches, the fixed diagnostics batch and, for batch-norm models, the population-statistics batches."""
    torch.set_num_threads(config.threads)
    task = make_task(config.task, dict(config.task_options))
    if config.train_eval_examples and not hasattr(task, "num_examples"):
        raise ConfigError(f"train_eval_examples: task {config.task!r} has no fixed training set (no "
                          f"num_examples()); expected None, got {config.train_eval_examples!r}")
    total_steps = _resolve_steps(config, task)
    _seed_everything(config.seed)
    model = build_model(config, task)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    train_stream = task.batches("train", config.batch_size, seed=config.seed)
    if config.sort_by_length:
        train_stream = _sorted_by_length(train_stream, config.sort_by_length, config.seed)
    diag_batch = next(iter(task.batches("train", config.batch_size, seed=config.seed + 1_000_003)))
    batch_norm = uses_batch_statistics(config)
    run = _Run(config, task, model, params, _make_optimizer(config, params), total_steps, batch_norm,
               train_stream, diag_batch, _population_batches(config, task) if batch_norm else [], progress, on_step)
    run.train = {k: [] for k in ("step", "loss", task.metric, "grad_norm", "clipped", "step_time", "time")}
    logger.info("run %s: %d steps of %s on %s (%d parameters)", config.run_id, total_steps, config.cell,
                config.task, sum(p.numel() for p in params))
    return run


def _population_batches(config: RunConfig, task: Any) -> List[Any]:
    """The fixed training batches that batch-norm models recompute their population statistics from, at every
    evaluation: the running averages lag behind early in training (0.9^25 of their initial value is still
    there after 25 steps at momentum 0.1), which would make a BN model's validation curve look slower than the
    model is. The running averages are restored after each evaluation, so training is unaffected."""
    stream = task.batches("train", config.batch_size, seed=config.seed + 2_000_003)
    if config.sort_by_length:  # statistics of batches formed as the training batches are
        stream = _sorted_by_length(stream, config.sort_by_length, config.seed + 2_000_003)
    return [next(stream) for _ in range(config.popstat_batches)]


def _train_step(run: _Run, batch: Any, step: int) -> None:
    """One optimizer step on ``batch``, recorded in ``run.train``; raises :class:`_Diverged`."""
    config, t0 = run.config, time.perf_counter()
    outputs = run.model(batch.x, batch.lengths)
    loss = run.task.loss(outputs, batch)
    loss_value = float(loss.item())
    if not math.isfinite(loss_value):
        raise _Diverged(f"loss is {loss_value} at step {step}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = config.clip if config.clip is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    if not math.isfinite(grad_norm):
        raise _Diverged(f"gradient norm is {grad_norm} at step {step}")
    run.optimizer.step()
    step_time = time.perf_counter() - t0
    run.seconds["train"] += step_time
    s, c = run.task.metrics(outputs.detach(), batch)[run.metric]
    for key, value in (("step", step), ("loss", _r(loss_value)), (run.metric, _r(s / c) if c else None),
                       ("grad_norm", _r(grad_norm)), ("clipped", bool(config.clip is not None and grad_norm > config.clip)),
                       ("step_time", _r(step_time, 4)), ("time", _r(run.seconds["train"]))):
        run.train[key].append(value)
    if run.progress is not None:
        run.progress(step, run.total_steps, {"loss": loss_value})
    if run.on_step is not None:
        _call_on_step(run, step, batch, loss_value, grad_norm)


def _call_on_step(run: _Run, step: int, batch: Any, loss: float, grad_norm: float) -> None:
    """``run.on_step`` without a trace on the trajectory: no gradients; RNG, mode and buffers restored."""
    rng, buffers, was_training = torch.get_rng_state(), _snapshot_buffers(run.model), run.model.training
    try:
        with torch.no_grad():
            extra = run.on_step(step, run.model, {"loss": loss, "grad_norm": grad_norm, "batch": batch,
                                                  "task": run.task, "total_steps": run.total_steps})
    finally:
        _restore_buffers(run.model, buffers)
        torch.set_rng_state(rng)
        run.model.train(was_training)
    if extra is not None:
        run.step_extras.append({"step": step, **extra})


def _run_eval(run: _Run, step: int) -> None:
    """Validation metrics at ``step`` (population statistics, recomputed exactly for batch-norm models)."""
    config, t0 = run.config, time.perf_counter()
    with _recomputed_statistics(run.model, run.pop_batches) if run.batch_norm else contextlib.nullcontext():
        values = evaluate(run.model, run.task, "valid", config.eval_batch_size, config.eval_batches)
    run.seconds["eval"] += time.perf_counter() - t0
    run.valid["step"].append(step)
    run.valid["time"].append(_r(run.seconds["train"]))
    for k, v in values.items():
        run.valid.setdefault(k, []).append(v)
    if run.progress is not None:
        run.progress(step, run.total_steps, {"valid": values})
    logger.info("run %s step %d: valid %s", config.run_id, step, values)


def _run_diag(run: _Run, step: int, stats_key: Optional[str]) -> None:
    """Gradient flow on the fixed diagnostics batch (and, under ``stats_key``, the batch statistics)."""
    t0 = time.perf_counter()
    entry = _gradient_flow(run.model, run.task, run.diag_batch, want_stats=run.batch_norm and stats_key is not None)
    if "batch_stats" in entry:
        run.diag_stats[stats_key] = entry.pop("batch_stats")
    run.grad_flow.append({"step": step, **entry})
    run.seconds["diag"] += time.perf_counter() - t0


def _no_progress(run: _Run, step: int) -> bool:
    """Early stopping (``config.patience``): keep the best evaluation's weights; True once the validation
    metric has not improved for ``patience`` evaluations."""
    value, sign = run.valid[run.metric][-1], 1.0 if run.task.higher_is_better else -1.0
    if value is not None and math.isfinite(value) and (run.best is None or sign * (value - run.best["value"]) > 0):
        state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        run.best = {"value": value, "step": step, "state": state}
    since = sum(s > (run.best["step"] if run.best else -1) for s in run.valid["step"])
    return since >= run.config.patience


def early_stopping_record(run: _Run) -> Dict[str, Any]:
    """What a run with a patience records: whether it stopped early, at which step, and its best step."""
    return {"patience": run.config.patience, "max_steps": run.total_steps, "stopped_early": run.stopped_step is not None,
            "stopped_step": run.stopped_step, "best_step": run.best["step"] if run.best else None,
            "best_valid": run.best["value"] if run.best else None}


def _train_loop(run: _Run) -> Tuple[int, Optional[int], Optional[str]]:
    """Evaluate at 0, every ``eval_every`` steps and at the end, with diagnostics at 0, every ``diag_every``
    steps and at the end. Returns ``(steps_done, diverged_step, diverged_reason)``."""
    config, total = run.config, run.total_steps
    first = _resume(run) + 1
    if first == 1:
        _run_eval(run, 0)
        if config.patience:
            _no_progress(run, 0)
        _run_diag(run, 0, "init")
    if run.progress is not None:
        run.progress(first - 1, total, {"training": True})
    step = first - 1
    for step in range(first, total + 1):
        try:
            _train_step(run, next(run.train_stream), step)
        except _Diverged as exc:
            logger.warning("run %s diverged: %s", config.run_id, exc)
            return step - 1, step, str(exc)
        if step % config.eval_every == 0 or step == total:
            _run_eval(run, step)
            if config.patience and _no_progress(run, step) and step < total:
                run.stopped_step = step
                logger.info("run %s stopped early at step %d (best step %d)", config.run_id, step, run.best["step"])
                _run_diag(run, step, "final")
                break
        if step == total:
            _run_diag(run, step, "final")
        elif config.diag_every and step % config.diag_every == 0:
            _run_diag(run, step, None)
        if run.checkpoint is not None and run.checkpoint.every and step % run.checkpoint.every == 0 and step < total:
            run.checkpoint.save(_training_state(run, step))
    return step, None, None


# ---------------------------------------------------------------------------------------------- checkpoints
def _training_state(run: _Run, step: int) -> Dict[str, Any]:
    """What the loop needs to go on after ``step`` (recnorm.experiments.checkpoint)."""
    return {"step": step, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "train": run.train, "valid": run.valid, "grad_flow": run.grad_flow, "diag_stats": run.diag_stats,
            "step_extras": run.step_extras, "seconds": dict(run.seconds), "best": run.best}


def _resume(run: _Run) -> int:
    """Restore the run from its checkpoint, if it has one; returns the step it resumes after (0: none). The
    training stream is replayed up to that step, so the run goes on with an uninterrupted run's numbers."""
    state = run.checkpoint.load() if run.checkpoint is not None else None
    if state is None:
        return 0
    done = int(state["step"])
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    for _ in range(done):  # the training stream, where the interrupted run left it
        next(run.train_stream)
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    run.train, run.valid, run.grad_flow, run.diag_stats = state["train"], state["valid"], state["grad_flow"], state["diag_stats"]
    run.step_extras = state.get("step_extras", [])
    run.seconds = dict(state["seconds"])
    run.best = state.get("best")  # early stopping's best evaluation so far
    logger.info("run %s resumes from its checkpoint at step %d", run.config.run_id, done)
    return done


def _final_evaluation(run: _Run) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(final, population)``: the final metrics of a finished run, and for batch-norm models the
    population statistics (their running averages, then recomputed exactly, which the final metrics use)."""
    config, model, task = run.config, run.model, run.task
    if run.best is not None:  # early stopping: evaluate the weights of the best validation step
        model.load_state_dict(run.best["state"])
    size = config.eval_batch_size
    final: Dict[str, Any] = {}
    population: Dict[str, Any] = {}
    t0 = time.perf_counter()
    if run.batch_norm:
        from recnorm.diagnostics import running_averages

        with running_averages(model):  # measured on purpose, beside the exact statistics: no warning
            final["valid_ema"] = evaluate(model, task, "valid", size)
            final["test_ema"] = evaluate(model, task, "test", size)
        population["ema"] = _population_stats(model, task.seq_len)
        if config.dropout == 0.0 or config.num_layers == 1:
            final["test_batch_stats"] = _evaluate_batch_stats(model, task, "test", size)
            if config.batch_size != size:  # the statistics of training-sized batches
                final["test_batch_stats_train_size"] = _evaluate_batch_stats(model, task, "test", config.batch_size)
        _recompute(model, run.pop_batches)
        population["recomputed"] = _population_stats(model, task.seq_len)
    final["valid"] = evaluate(model, task, "valid", size)
    final["test"] = evaluate(model, task, "test", size)
    if config.norm == "shared_batch":  # the same weights with one exact statistic per step (shared BN's eval effect)
        final["test_per_step_statistics"] = _evaluate_per_step(run)
    if config.train_eval_examples:
        final["train"] = _evaluate_train_split(model, task, config.train_eval_examples, size)
    final["population_statistics"] = "recomputed" if run.batch_norm else "none"
    run.seconds["eval"] += time.perf_counter() - t0
    return final, population


def _evaluate_per_step(run: _Run) -> Dict[str, Optional[float]]:
    """A shared-BN model's test metrics with exact per-step population statistics: its weights in a per-step BN
    model (``norm="batch"``: same parameters, one statistic per step), recomputed from the population batches."""
    twin = build_model(run.config.replace(norm="batch"), run.task)
    twin.load_state_dict(run.model.state_dict())
    _recompute(twin, run.pop_batches)
    return evaluate(twin, run.task, "test", run.config.eval_batch_size)


def _summary(run: _Run, outcome: Tuple[int, Optional[int], Optional[str]], final: Dict[str, Any],
             population: Dict[str, Any], provenance: Dict[str, Any], started: float, wall0: float) -> RunResult:
    """The :class:`RunResult` of a run that ended (finished or diverged)."""
    steps_done, diverged_step, diverged_reason = outcome
    config, secs = run.config, run.seconds
    timing = {"train_seconds": _r(secs["train"]), "eval_seconds": _r(secs["eval"]), "diag_seconds": _r(secs["diag"]),
              "total_seconds": _r(time.perf_counter() - wall0),
              "seconds_per_step": _r(secs["train"] / max(1, len(run.train["step"]))), "threads": config.threads,
              "started_at": _iso(started), "finished_at": _iso(time.time())}
    return RunResult(
        run_id=config.run_id, status="ok" if diverged_step is None else "diverged", config=config.to_dict(),
        task=run.task.describe(), metric=run.metric, higher_is_better=bool(run.task.higher_is_better),
        seed=config.seed, versions=provenance["versions"], steps_planned=run.total_steps, steps_done=steps_done,
        num_params=sum(p.numel() for p in run.params), train=run.train, valid=run.valid, final=final,
        diagnostics={"grad_flow": run.grad_flow, "batch_stats": run.diag_stats, "population_stats": population},
        timing=timing, diverged_step=diverged_step, diverged_reason=diverged_reason, provenance=provenance,
        extras={**({"on_step": run.step_extras} if run.step_extras else {}),
                **({"early_stopping": early_stopping_record(run)} if config.patience else {})})


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()


def train_and_evaluate(config: RunConfig, workdir: str, progress: Optional[ProgressFn] = None,
                       on_step: Optional[StepFn] = None, checkpoint: Any = None) -> RunResult:
    """Train one model as ``config`` says and evaluate it; write ``config.json``, ``model.pt`` (when the run
    did not diverge) and ``result.json``.

    Args:
        config: the run (validated here, before anything is loaded).
        workdir: directory for the run's files (created). ``result.json`` appears only when the run is
            complete (atomic rename), so its presence marks a finished run.
        progress: optional callback ``progress(step, total_steps, info)`` (the CLI draws a bar with it).
        on_step: optional callback after every optimizer step, see :data:`StepFn`.
        checkpoint: optional :class:`~recnorm.experiments.checkpoint.Checkpoint`: the training state is saved
            every ``checkpoint.every`` steps, and a run that finds one resumes from it (with the same
            numbers as an uninterrupted run).

    Returns:
        The :class:`RunResult` also written to ``workdir/result.json``. A run whose loss or gradient norm
        becomes NaN/inf is returned with ``status="diverged"`` and ``diverged_step``; it does not raise.
    """
    config.validate()
    started, wall0 = time.time(), time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, CONFIG_FILE), {"run_id": config.run_id, **config.to_dict()})
    provenance = collect_provenance(config.kernel)
    run = _setup(config, progress, on_step)
    run.checkpoint = checkpoint
    with kernel_dispatch(run.model, config.kernel, config.chunk_floor) as dispatch:
        outcome = _train_loop(run)
        final, population = _final_evaluation(run) if outcome[1] is None else ({}, {})
    provenance.update(kernels=dispatch.kernels(), kernel_pin=dispatch.pin(), **dispatch.chunks, gemm=dispatch.gemm)
    replay = {}  # config.json replays the kernels that ran and their chunk floor
    if config.kernel == "auto" and provenance["kernel_pin"]:
        replay["kernel"] = provenance["kernel_pin"]
    if config.chunk_floor is None:
        replay["chunk_floor"] = provenance["chunk_floor"]
    if replay:
        write_json_atomic(os.path.join(workdir, CONFIG_FILE), {"run_id": config.run_id, **config.to_dict(), **replay})
    result = _summary(run, outcome, final, population, provenance, started, wall0)
    if result.status == "ok":
        with atomic_file(os.path.join(workdir, MODEL_FILE), "wb") as f:
            torch.save(run.model.state_dict(), f)
    write_json_atomic(os.path.join(workdir, RESULT_FILE), result.to_dict(), indent=None)
    logger.info("run %s %s in %.1f s: test %s", config.run_id, result.status, time.perf_counter() - wall0,
                final.get("test"))
    return result
