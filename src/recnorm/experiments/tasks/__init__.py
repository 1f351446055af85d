"""The task registry of the evidence engine.

Importing this package registers every built-in task (one module each) and re-exports the task API of
:mod:`recnorm.experiments.tasks.base`. Data sets are only read when a task first needs them.

Built-in tasks: ``adding``, ``adding_variable``, ``copy``, ``fashion_rows``, ``fashion_pixels``,
``fashion_permuted``, ``digits``, ``mnist1d``, ``kjv_chars``, ``kjv_verses``.
"""

from .base import TASKS, Batch, DataMissingError, Task, create_task, get_task, list_tasks, register_task

from . import adding, copy_memory, digits, fashion_mnist, kjv, kjv_verses, mnist1d_task  # noqa: E402,F401  (registration)

__all__ = ["Batch", "Task", "register_task", "get_task", "create_task", "list_tasks", "TASKS", "DataMissingError"]
