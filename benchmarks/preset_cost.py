"""Estimated compute of a preset: measured CPU cost per training step and per evaluation, times the
preset's steps and evaluations.

For every distinct model of the preset (one seed each), it builds the task and the model exactly as a run
does, times a few training steps (forward, backward, clipping, optimizer) and one evaluation on the valid
split (plus, for batch norms, one exact recomputation of the population statistics, which every
evaluation does), and multiplies out; the evaluation is timed on a few batches and scaled to the split. Times are CPU seconds of this process (``time.process_time``) with
one torch thread, so other jobs on a shared machine slow the measurement little; wall-clock time on an
idle core is about the same.

Usage::

    python benchmarks/preset_cost.py cooijmans_paper [--steps 5]

It prints one line per model and the total in core-hours; the paper-scale presets' docstrings quote it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict

import torch


def _cpu(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(config: Any, steps: int) -> Dict[str, float]:
    from recnorm.experiments.config import uses_batch_statistics
    from recnorm.experiments.model import build_model
    from recnorm.experiments.train import _make_optimizer, _recompute, _resolve_steps, evaluate, make_task

    torch.set_num_threads(1)
    task = make_task(config.task, dict(config.task_options))
    torch.manual_seed(config.seed)
    model = build_model(config, task)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(config, params)
    stream = task.batches("train", config.batch_size, seed=config.seed)

    def step() -> None:
        batch = next(stream)
        loss = task.loss(model(batch.x, batch.lengths), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip or float("inf"))
        optimizer.step()

    model.train()
    step()  # warm-up: extension loading, allocator
    per_step = sum(_cpu(step) for _ in range(steps)) / steps
    # One evaluation: timed on at most 2 valid batches and 4 population-statistics batches, scaled up.
    n_valid = sum(1 for _ in task.batches("valid", config.eval_batch_size))
    if config.eval_batches is not None:
        n_valid = min(n_valid, config.eval_batches)
    timed = min(n_valid, 2)
    per_eval = _cpu(lambda: evaluate(model, task, "valid", config.eval_batch_size, timed)) * n_valid / timed
    if uses_batch_statistics(config):
        pop = [next(stream) for _ in range(min(config.popstat_batches, 4))]
        per_eval += _cpu(lambda: _recompute(model, pop)) * config.popstat_batches / len(pop)
    total_steps = _resolve_steps(config, task)
    n_evals = total_steps // config.eval_every + 2  # step 0, every eval_every, and the final evaluation
    return {"per_step": per_step, "per_eval": per_eval, "steps": total_steps, "evals": n_evals,
            "total": total_steps * per_step + n_evals * per_eval}


def main() -> None:
    from recnorm.experiments.presets import get_preset
    from recnorm.experiments.results import model_label

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per model (after one warm-up)")
    args = parser.parse_args()
    configs = get_preset(args.preset).expand()
    seeds = len({c.seed for c in configs})
    seen: Dict[str, Dict[str, float]] = {}
    total = 0.0
    for config in configs:
        key = config.replace(seed=0).run_id
        if key not in seen:
            seen[key] = measure(config.replace(threads=1), args.steps)
            m = seen[key]
            where = f"{config.task} {config.cell}x{config.num_layers} H={config.hidden_size} {model_label(config.to_dict())}"
            print(f"{where}: {m['per_step']:.3f} s/step x {m['steps']} steps + {m['per_eval']:.1f} s/eval x "
                  f"{m['evals']} = {m['total'] / 3600:.2f} core-hours per run", flush=True)
        total += seen[key]["total"]
    print(f"{args.preset}: {len(configs)} runs ({len(seen)} models x {seeds} seeds), {total / 3600:.2f} core-hours "
          f"in total on this CPU (one thread per run)", flush=True)


if __name__ == "__main__":
    main()
