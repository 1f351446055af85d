"""Train and evaluate one run: :func:`train_and_evaluate` (config, workdir) -> :class:`RunResult`.

What a run writes: ``workdir/config.json`` at the start; at the end ``workdir/model.pt`` (the trained
model's ``state_dict``, batch norms holding the population statistics its final metrics used; reload it with
:func:`load_model`) and then ``workdir/result.json``, each written atomically. ``result.json`` records:

* the resolved config, the task description, versions (python, torch, recnorm, platform) and the seed;
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
``torch.set_num_threads(config.threads)``). Diagnostics restore the RNG state and the normalization buffers
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
import platform
import random
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
from torch import Tensor

from recnorm.experiments.config import ConfigError, RunConfig, uses_batch_statistics
from recnorm.experiments.model import SequenceModel, build_model
from recnorm.experiments.results import CONFIG_FILE, RESULT_FILE, atomic_file, read_json, write_json_atomic

__all__ = ["RunResult", "train_and_evaluate", "evaluate", "versions", "load_result", "load_model", "make_task",
           "MODEL_FILE"]

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


def versions() -> Dict[str, Any]:
    """Versions of the software and the machine a run used."""
    try:
        from importlib.metadata import version

        recnorm_version = version("recnorm")
    except Exception:  # not installed (running from a source tree)
        import recnorm

        recnorm_version = getattr(recnorm, "__version__", "unknown")
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "recnorm": recnorm_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


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


def train_and_evaluate(config: RunConfig, workdir: str, progress: Optional[ProgressFn] = None,
                       checkpoint: Any = None) -> RunResult:
    """Train one model as ``config`` says and evaluate it; write ``config.json``, ``model.pt`` (when the run
    did not diverge) and ``result.json``.

    Args:
        config: the run (validated here, before anything is loaded).
        workdir: directory for the run's files (created). ``result.json`` appears only when the run is
            complete (atomic rename), so its presence marks a finished run.
        progress: optional callback ``progress(step, total_steps, info)`` (the CLI draws a bar with it).
        checkpoint: optional :class:`~recnorm.experiments.checkpoint.Checkpoint`: the training state is saved
            every ``checkpoint.every`` steps, and a run that finds one resumes from it (with the same
            numbers as an uninterrupted run).

    Returns:
        The :class:`RunResult` also written to ``workdir/result.json``. A run whose loss or gradient norm
        becomes NaN/inf is returned with ``status="diverged"`` and ``diverged_step``; it does not raise.
    """
    config.validate()
    started = time.time()
    wall0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, CONFIG_FILE), {"run_id": config.run_id, **config.to_dict()})

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
    optimizer = _make_optimizer(config, params)
    batch_norm = uses_batch_statistics(config)
    metric = task.metric
    logger.info("run %s: %d steps of %s on %s (%d parameters)", config.run_id, total_steps, config.cell,
                config.task, sum(p.numel() for p in params))

    # Separate, seeded streams: training batches, the fixed diagnostics batch, population-statistics batches.
    train_stream = task.batches("train", config.batch_size, seed=config.seed)
    if config.sort_by_length:
        train_stream = _sorted_by_length(train_stream, config.sort_by_length, config.seed)
    diag_batch = next(iter(task.batches("train", config.batch_size, seed=config.seed + 1_000_003)))

    train: Dict[str, List[Any]] = {k: [] for k in ("step", "loss", metric, "grad_norm", "clipped", "step_time", "time")}
    valid: Dict[str, List[Any]] = {"step": [], "time": []}
    grad_flow: List[Dict[str, Any]] = []
    diag_stats: Dict[str, Any] = {}
    train_seconds = eval_seconds = diag_seconds = 0.0
    status, diverged_step, diverged_reason = "ok", None, None

    # Batch-norm models are evaluated with population statistics recomputed exactly from these fixed
    # training batches, also during training: the running averages lag behind early in training (0.9^25 of
    # their initial value is still there after 25 steps at momentum 0.1), which would make a BN model's
    # validation curve look slower than the model is. The running averages are restored after each
    # evaluation, so training is unaffected; the EMA-based numbers are recorded at the end.
    pop_batches: List[Any] = []
    if batch_norm:
        pop_stream = task.batches("train", config.batch_size, seed=config.seed + 2_000_003)
        if config.sort_by_length:  # statistics of batches formed as the training batches are
            pop_stream = _sorted_by_length(pop_stream, config.sort_by_length, config.seed + 2_000_003)
        pop_batches = [next(pop_stream) for _ in range(config.popstat_batches)]

    def run_eval(step: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        if batch_norm:
            with _recomputed_statistics(model, pop_batches):
                values = evaluate(model, task, "valid", config.eval_batch_size, config.eval_batches)
        else:
            values = evaluate(model, task, "valid", config.eval_batch_size, config.eval_batches)
        eval_seconds += time.perf_counter() - t0
        valid["step"].append(step)
        valid["time"].append(_r(train_seconds))
        for k, v in values.items():
            valid.setdefault(k, []).append(v)
        if progress is not None:
            progress(step, total_steps, {"valid": values})
        logger.info("run %s step %d: valid %s", config.run_id, step, values)

    def run_diag(step: int, stats_key: Optional[str]) -> None:
        nonlocal diag_seconds
        t0 = time.perf_counter()
        entry = _gradient_flow(model, task, diag_batch, want_stats=batch_norm and stats_key is not None)
        if "batch_stats" in entry:
            diag_stats[stats_key] = entry.pop("batch_stats")
        grad_flow.append({"step": step, **entry})
        diag_seconds += time.perf_counter() - t0

    # ---- checkpoints (recnorm.experiments.checkpoint): what the loop below needs to go on from a step
    def training_state(step: int) -> Dict[str, Any]:
        return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "train": train, "valid": valid, "grad_flow": grad_flow, "diag_stats": diag_stats,
                "seconds": [train_seconds, eval_seconds, diag_seconds]}

    first = 1
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        first = int(resumed["step"]) + 1
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        for _ in range(first - 1):  # the training stream, where the interrupted run left it
            next(train_stream)
        torch.set_rng_state(resumed["rng"]["torch"])
        np.random.set_state(resumed["rng"]["numpy"])
        random.setstate(resumed["rng"]["python"])
        train, valid, grad_flow, diag_stats = resumed["train"], resumed["valid"], resumed["grad_flow"], resumed["diag_stats"]
        train_seconds, eval_seconds, diag_seconds = resumed["seconds"]
        logger.info("run %s resumes from its checkpoint at step %d", config.run_id, first - 1)
    else:
        run_eval(0)
        run_diag(0, "init")
    if progress is not None:
        progress(first - 1, total_steps, {"training": True})
    step = first - 1
    for step in range(first, total_steps + 1):
        batch = next(train_stream)
        t0 = time.perf_counter()
        outputs = model(batch.x, batch.lengths)
        loss = task.loss(outputs, batch)
        loss_value = float(loss.item())
        if not math.isfinite(loss_value):
            status, diverged_step, diverged_reason = "diverged", step, f"loss is {loss_value} at step {step}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = config.clip if config.clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            status, diverged_step, diverged_reason = "diverged", step, f"gradient norm is {grad_norm} at step {step}"
            break
        optimizer.step()
        step_time = time.perf_counter() - t0
        train_seconds += step_time

        batch_metrics = task.metrics(outputs.detach(), batch)
        s, c = batch_metrics[metric]
        train["step"].append(step)
        train["loss"].append(_r(loss_value))
        train[metric].append(_r(s / c) if c else None)
        train["grad_norm"].append(_r(grad_norm))
        train["clipped"].append(bool(config.clip is not None and grad_norm > config.clip))
        train["step_time"].append(_r(step_time, 4))
        train["time"].append(_r(train_seconds))
        if progress is not None:
            progress(step, total_steps, {"loss": loss_value})

        if step % config.eval_every == 0 or step == total_steps:
            run_eval(step)
        if step == total_steps:
            run_diag(step, "final")
        elif config.diag_every and step % config.diag_every == 0:
            run_diag(step, None)
        if checkpoint is not None and checkpoint.every and step % checkpoint.every == 0 and step < total_steps:
            checkpoint.save(training_state(step))

    steps_done = step if status == "ok" else (diverged_step or 1) - 1
    if status == "diverged":
        logger.warning("run %s diverged: %s", config.run_id, diverged_reason)

    # ---- final evaluation
    final: Dict[str, Any] = {}
    population: Dict[str, Any] = {}
    t0 = time.perf_counter()
    if status == "ok":
        if batch_norm:
            from recnorm.diagnostics import running_averages

            with running_averages(model):  # measured on purpose, beside the exact statistics: no warning
                final["valid_ema"] = evaluate(model, task, "valid", config.eval_batch_size)
                final["test_ema"] = evaluate(model, task, "test", config.eval_batch_size)
            population["ema"] = _population_stats(model, task.seq_len)
            if config.dropout == 0.0 or config.num_layers == 1:
                final["test_batch_stats"] = _evaluate_batch_stats(model, task, "test", config.eval_batch_size)
                if config.batch_size != config.eval_batch_size:  # the statistics of training-sized batches
                    final["test_batch_stats_train_size"] = _evaluate_batch_stats(model, task, "test",
                                                                                 config.batch_size)
            _recompute(model, pop_batches)
            population["recomputed"] = _population_stats(model, task.seq_len)
        final["valid"] = evaluate(model, task, "valid", config.eval_batch_size)
        final["test"] = evaluate(model, task, "test", config.eval_batch_size)
        if config.train_eval_examples:
            final["train"] = _evaluate_train_split(model, task, config.train_eval_examples,
                                                   config.eval_batch_size)
        final["population_statistics"] = "recomputed" if batch_norm else "none"
    eval_seconds += time.perf_counter() - t0

    finished = time.time()
    result = RunResult(
        run_id=config.run_id,
        status=status,
        config=config.to_dict(),
        task=task.describe(),
        metric=metric,
        higher_is_better=bool(task.higher_is_better),
        seed=config.seed,
        versions=versions(),
        steps_planned=total_steps,
        steps_done=steps_done,
        num_params=sum(p.numel() for p in params),
        train=train,
        valid=valid,
        final=final,
        diagnostics={"grad_flow": grad_flow, "batch_stats": diag_stats, "population_stats": population},
        timing={
            "train_seconds": _r(train_seconds),
            "eval_seconds": _r(eval_seconds),
            "diag_seconds": _r(diag_seconds),
            "total_seconds": _r(time.perf_counter() - wall0),
            "seconds_per_step": _r(train_seconds / max(1, len(train["step"]))),
            "threads": config.threads,
            "started_at": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
            "finished_at": datetime.datetime.fromtimestamp(finished, datetime.timezone.utc).isoformat(),
        },
        diverged_step=diverged_step,
        diverged_reason=diverged_reason,
    )
    if status == "ok":
        with atomic_file(os.path.join(workdir, MODEL_FILE), "wb") as f:
            torch.save(model.state_dict(), f)
    write_json_atomic(os.path.join(workdir, RESULT_FILE), result.to_dict(), indent=None)
    logger.info("run %s %s in %.1f s: test %s", config.run_id, status, time.perf_counter() - wall0,
                final.get("test"))
    return result
