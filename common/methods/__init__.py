"""The registry of federated methods: each is one ``Method`` subclass in one file of this package
(docs/DESIGN.md §4.0). Config validation, ``--help``, the experiment grid and the report's labels all
read the method names from here.

A method defined elsewhere (a research prototype, a test) is registered with ``register``; for the
clients and the coordinator of a real federation to know it, name its module in the environment
variable ``SUBSPACEFL_METHOD_MODULES`` (comma-separated), which both import before looking a method up.
"""

from __future__ import annotations

import importlib
import os

from common.methods.base import LocalObjective, Method, Recipient, ServerStep
from common.methods.fedavg import FedAvg
from common.methods.fedex_lora import FedExLora
from common.methods.fedsvd import FedSvd
from common.methods.ffa_lora import FfaLora
from common.methods.rolora import RoLora
from common.methods.subspace_reg import SubspaceReg
from common.methods.svd import Svd

PLUGIN_ENV = "SUBSPACEFL_METHOD_MODULES"

_REGISTRY: dict[str, Method] = {}
_plugins_loaded = False


def register(method: Method) -> Method:
    """Add a method under its name (names are unique)."""
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name; set the class attribute name")
    if method.name in _REGISTRY and type(_REGISTRY[method.name]) is not type(method):
        raise ValueError(f"a method named {method.name!r} is already registered; pick another name")
    _REGISTRY[method.name] = method
    return method


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (part.strip() for part in os.environ.get(PLUGIN_ENV, "").split(","))):
        importlib.import_module(module)


def method_names() -> tuple[str, ...]:
    """Every registered method, built-in ones first."""
    _load_plugins()
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError naming the known ones otherwise."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}") from None


for _builtin in (FedAvg(), Svd(), FedSvd(), SubspaceReg(), FfaLora(), RoLora(), FedExLora()):
    register(_builtin)

__all__ = ["LocalObjective", "Method", "Recipient", "ServerStep", "get_method", "method_names", "register"]
