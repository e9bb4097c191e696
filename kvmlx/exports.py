"""Lazy package exports (PEP 562): a package names what it exports and the module each comes from,
and a name's module is imported when the name is first used. `import kvmlx` then costs the errors
alone, and a command imports only the modules it runs (`kvmlx generate ARTIFACT` never imports the
store, the agent or the prefix cache: ~20 ms of a 1.6 s command)."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, namespace: dict, modules: dict[str, tuple[str, ...]]):
    """(__getattr__, __dir__) for the package `package` whose globals are `namespace`: each name that
    `modules` lists under a module (relative to the package) is imported from it on first use, then kept."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
