"""A user's own modules, imported by name in every process of a run before anything is built.

A project registers its backbones, groupings, attention, schedulers and datasets in msgc's
registries with decorators that run when its module is imported. The command lines import such
modules by name (``--import my_project.tiny``, or the config key ``IMPORTS``), so that a project
needs no copy of ``tools/train_net.py``. The processes that a run starts import them too:

- :func:`msgc.engine.launch` passes :func:`imported_modules` to every rank it spawns, which imports
  them first (:func:`import_pairs`);
- :func:`msgc.data.build_loader` passes them to its data-loader workers, which import them in their
  ``worker_init_fn``: with the "spawn" or "forkserver" start methods a worker inherits nothing;
- under ``torchrun`` every rank runs the whole command line itself.

The current working folder is importable (as with ``python -m``), so ``--import my_project.tiny``
works from the folder that holds ``my_project/``. A module that cannot be found or that raises while
it is imported is a one-line :class:`ModuleImportError` that names the module and where it was asked
for (``--import``, or ``IMPORTS`` in which config file).
"""
import importlib
import os
import sys
import traceback

from .errors import UserError, one_line

__all__ = ["ModuleImportError", "import_modules", "imported_modules", "import_pairs"]

#: ``(module, where it was asked for)`` of the modules this process imported through
#: :func:`import_modules`, in order: what the processes it starts import again.
_IMPORTED = []


class ModuleImportError(UserError, ImportError):
    """A user module (``--import`` or ``IMPORTS``) cannot be found or raised while it was imported."""


def import_modules(modules, where: str) -> list:
    """Import each module named in ``modules`` (dotted names) and return them.

    Args:
        modules: module names, e.g. ``["my_project.tiny"]``; one already imported is not imported again.
        where: where they were asked for, for the error message, e.g. ``"--import"`` or ``"IMPORTS in
            configs/my.yaml"``.

    Raises:
        ModuleImportError: naming the module, ``where``, and the exception with the line that raised it.
    """
    modules = list(modules)
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``python -m`` does
    imported = []
    for name in modules:
        imported.append(_import(name, where))
        if name not in [n for n, _ in _IMPORTED]:
            _IMPORTED.append((name, where))
    return imported


def imported_modules() -> list:
    """``(module, where)`` of the modules :func:`import_modules` imported in this process, in order.

    Hand them to a child process that does not inherit this one's imports, which gives them to
    :func:`import_pairs` before it builds anything.
    """
    return list(_IMPORTED)


def import_pairs(pairs):
    """Import the ``(module, where)`` pairs of :func:`imported_modules` (of this or a parent process)."""
    for name, where in pairs:
        import_modules([name], where)


def _import(name: str, where: str):
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
        raise ModuleImportError(f"{where}: {name!r} is not a module name; give a dotted name such as "
                                "my_project.tiny (for my_project/tiny.py), not a file path")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ModuleImportError(f"no module named '{name}' ({where}): '{e.name}' is not found from "
                                    f"{os.getcwd()} or sys.path; run from the folder that holds it, or add that "
                                    "folder to PYTHONPATH") from None
        raise _raised(name, where, e) from None
    except Exception as e:
        raise _raised(name, where, e) from None


def _raised(name: str, where: str, error: Exception) -> ModuleImportError:
    """The error for an exception raised while module ``name`` was imported, naming the line that raised it."""
    return ModuleImportError(f"importing module '{name}' ({where}) raised {type(error).__name__}: "
                             f"{one_line(error)} ({_origin(name, error)})")


def _origin(name: str, error: Exception) -> str:
    """``file, line N`` of the deepest frame of ``name``'s package in the traceback (else the deepest);
    for a SyntaxError, the line that does not parse."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{os.path.relpath(error.filename)}, line {error.lineno}"
    frames = list(traceback.walk_tb(error.__traceback__))
    top = name.split(".")[0]
    own = [(f, n) for f, n in frames if str(f.f_globals.get("__name__", "")).split(".")[0] == top]
    frame, line = (own or frames or [(None, 0)])[-1]
    if frame is None:
        return "no traceback"
    return f"{os.path.relpath(frame.f_code.co_filename)}, line {line}"
