"""The evidence engine: controlled comparisons of normalizations on real sequence tasks.

* :class:`RunConfig` (:mod:`.config`) describes one run; :func:`train_and_evaluate` (:mod:`.train`) runs it
  into a directory (``config.json``, ``result.json``);
* :class:`SweepSpec` and :func:`run_sweep` (:mod:`.sweep`) run a grid of configs in parallel, resumably;
* :mod:`.presets` holds the named sweeps (``default``, ``cooijmans``, ``laurent``, ``horizontal``);
* :func:`write_report` (:mod:`.report`) turns a run or sweep directory into an HTML/Markdown report;
* :mod:`.tasks` holds the tasks (``create_task``, ``list_tasks``).

Example::

    from recnorm.experiments import RunConfig, train_and_evaluate
    result = train_and_evaluate(RunConfig(task="digits", norm="layer", steps=200), "runs/example")
"""

from recnorm.experiments.config import ConfigError, RunConfig
from recnorm.experiments.presets import get_preset, list_presets
from recnorm.experiments.report import write_report
from recnorm.experiments.results import load_records
from recnorm.experiments.sweep import SweepSpec, run_sweep
from recnorm.experiments.train import RunResult, train_and_evaluate

__all__ = ["RunConfig", "ConfigError", "RunResult", "train_and_evaluate", "SweepSpec", "run_sweep",
           "get_preset", "list_presets", "write_report", "load_records"]
