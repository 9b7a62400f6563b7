"""Task registry: the built-in tasks by name, and ``load_task`` for a built-in name or a user's ``module:function``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Mapping

from mesh.errors import ConfigError
from mesh.tasks.base import Batch, Task
from mesh.tasks.charlm import charlm_task
from mesh.tasks.regression import regression_task

__all__ = ["BUILTIN_TASKS", "Batch", "Task", "load_task"]

BUILTIN_TASKS: dict[str, Callable[[], Task]] = {"regression": regression_task, "demo": charlm_task}


def load_task(spec: str, args: Mapping[str, Any] | None = None) -> Task:
    """Resolve ``--task``: a built-in name (``demo``) or ``module:function`` / ``module:TASK`` for a user task,
    called with ``args`` (``--task-arg``) as keyword arguments."""
    args = dict(args or {})
    if ":" in spec:
        return _load_user_task(spec, args)
    if spec in BUILTIN_TASKS:
        if args:
            raise ConfigError(f"built-in task {spec!r} takes no --task-arg (got {', '.join(sorted(args))})")
        return BUILTIN_TASKS[spec]()
    raise ConfigError(
        f"unknown task {spec!r}: built-ins are {', '.join(sorted(BUILTIN_TASKS))}; "
        "for your own task give module:function (e.g. mesh.examples.user_task:make_task)"
    )


def _check_arguments(spec: str, function: Callable, args: dict[str, Any]) -> None:
    """One line when ``args`` do not fit the task function's signature (unknown names, required ones missing)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or C function: let the call say
        return
    try:
        signature.bind(**args)
    except TypeError as err:
        takes = ", ".join(name for name, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise ConfigError(f"task {spec}: {err} (--task-arg; it takes: {takes or 'no arguments'})") from None


def _load_user_task(spec: str, args: dict[str, Any]) -> Task:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"task {spec!r} must look like module:function (e.g. mesh.examples.user_task:make_task)")
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        raise ConfigError(f"task module {module_name!r} is a path; give a dotted module name like mesh.examples.user_task")
    module = _import(module_name)
    if not hasattr(module, attr):
        where = getattr(module, "__file__", None) or module_name
        raise ConfigError(f"task module {module_name!r} ({where}) has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, Task):
        if args:
            raise ConfigError(f"task {spec} is a Task, not a function: it takes no --task-arg (got {', '.join(sorted(args))})")
        return obj
    if not callable(obj):
        raise ConfigError(f"task {spec} is a {type(obj).__name__}, not a Task or a function returning one")
    _check_arguments(spec, obj, args)
    try:
        task = obj(**args)
    except Exception as exc:  # the user's code: report it on one line instead of a traceback
        raise ConfigError(f"task {spec}() raised {_one_line(exc)}") from exc
    if not isinstance(task, Task):
        raise ConfigError(f"task {spec}() returned a {type(task).__name__}, expected a mesh.tasks.Task")
    return task


def _import(module_name: str) -> object:
    # The `mesh` console script does not put the working directory on sys.path (python -m does); a user running
    # from their project expects its modules to import, as uvicorn and gunicorn do.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also a SyntaxError or any error raised while the module runs
        raise ConfigError(f"cannot import task module {module_name!r}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
