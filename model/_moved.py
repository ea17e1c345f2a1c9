"""Old import paths of modules that moved in 0.2.0, kept for one release.

0.2.0 laid `vaewatch.model` out by concept (network/, estimation/, data/, training/,
calibration/) and merged two modules into their neighbours. Each old path still imports, with a
DeprecationWarning naming the new one; they go in 0.3.0 (CHANGELOG.md lists every move).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new} in vaewatch 0.2.0; the old path goes in 0.3.0",
        DeprecationWarning,
        stacklevel=4,
    )


def forward_module(old: str, new: str):
    """The `__getattr__` of a module left at an old path: warns once, on import, and serves
    every name of the module that replaced it."""
    _warn(old, new)
    target = importlib.import_module(new)

    def __getattr__(name: str):
        return getattr(target, name)

    return __getattr__


def forward_package(package: str, old_module: str):
    """The `__getattr__` of a package that took the place of a module of the same name: its
    submodules import as usual; a name of the old module resolves, with a warning, from
    `old_module`, where it lives now."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        target = importlib.import_module(old_module)
        if not hasattr(target, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        _warn(f"{package}.{name}", f"{old_module}.{name}")
        return getattr(target, name)

    return __getattr__


def deprecated_defaults(module: str, names: dict[str, str]):
    """The `__getattr__` of a module that used to alias defaults (`DEFAULT_K = defaults.K`):
    the old name still reads the value, with a warning naming `vaewatch.model.defaults.NAME`."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        from vaewatch.model import defaults

        _warn(f"{module}.{name}", f"vaewatch.model.defaults.{names[name]}")
        return getattr(defaults, names[name])

    return __getattr__


def renamed(module: str, names: dict[str, str]):
    """The `__getattr__` of a module where a name was replaced: the old name resolves to its
    replacement (`names`: old -> dotted path of the new), with a warning."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        path, _, attribute = names[name].rpartition(".")
        _warn(f"{module}.{name}", names[name])
        return getattr(importlib.import_module(path), attribute)

    return __getattr__
