"""The tasks of the evidence engine, one module each, and the task API of :mod:`recnorm.experiments.tasks.base`.

Every module here (except ``base`` and those whose names start with ``_``) is a task file: the task registry
:data:`TASKS` imports them all before its first lookup, so a new task is one file (``recnorm tasks`` lists
them). Data sets are only read when a task first needs them.
"""

from .base import TASKS, Batch, DataMissingError, Task, create_task, get_task, list_tasks, register_task

__all__ = ["Batch", "Task", "register_task", "get_task", "create_task", "list_tasks", "TASKS", "DataMissingError"]
