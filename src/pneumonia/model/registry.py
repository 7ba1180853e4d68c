"""The classes a config or a checkpoint may build: networks, optimisers, schedulers and the rest.

A checkpoint is data from anyone, and its hyperparameters say what to build as Hydra-style nodes,
``{"_target_": "pneumonia.model.study_cnn.StudyCNN", "image_size": 128}``. Such a node is never
handed to ``hydra.utils.instantiate`` (which imports whatever path the string names, follows
attributes into other modules, calls functions and builds nested nodes). Instead every
``_target_`` is looked up by its exact name in a registry of classes, every nested node is looked
up too, and only then is anything called. A name outside the registry, a function, a Hydra flag
(``_partial_``, ``_args_``, ...) or a value that is not plain data is refused, naming the key.

Registries:
    ``NETWORKS``: ``nn.Module`` subclasses, filled by :func:`register_network` (the study's CNN
        registers itself; register your own before loading a checkpoint that names it).
    ``OPTIMIZERS``: every ``torch.optim.Optimizer`` subclass that ``torch.optim`` exports.
    ``SCHEDULERS``: the ``torch.optim.lr_scheduler`` schedulers whose arguments are plain values
        (not those taking functions or other schedulers), and this package's own.
    ``augmentation``, ``normalization``, ``operating_point``: filled by :func:`register` from the
        modules that define them (batch augmentation, input normalisation, threshold rules).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

TARGET = "_target_"
ROLES = ("net", "optimizer", "scheduler", "augmentation", "normalization", "operating_point")
_PLAIN = (str, int, float, bool, type(None))
# Schedulers whose arguments are callables or other schedulers: never built from data.
_SCHEDULERS_TAKING_CODE = frozenset(
    {"LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"}
)


class UnsafeConfigError(ValueError):
    """A node names something outside the registry, or carries more than plain data."""


def _exported_subclasses(namespace: Any, base: type, prefix: str, skip=frozenset()) -> dict:
    return {
        f"{prefix}.{name}": obj
        for name, obj in sorted(vars(namespace).items())
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and name not in skip
        and not name.startswith("_")
    }  # fmt: skip


NETWORKS: dict[str, type[nn.Module]] = {}
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = _exported_subclasses(
    torch.optim, torch.optim.Optimizer, "torch.optim"
)
SCHEDULERS: dict[str, type[LRScheduler]] = _exported_subclasses(
    torch.optim.lr_scheduler, LRScheduler, "torch.optim.lr_scheduler", _SCHEDULERS_TAKING_CODE
)
REGISTRIES: dict[str, dict[str, type]] = {
    "net": NETWORKS,
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "augmentation": {},
    "normalization": {},
    "operating_point": {},
}
_BASES: dict[str, type] = {
    "net": nn.Module,
    "optimizer": torch.optim.Optimizer,
    "scheduler": LRScheduler,
    "augmentation": nn.Module,
    "normalization": nn.Module,
    "operating_point": object,
}

Class = TypeVar("Class", bound=type)


def register(role: str) -> Callable[[Class], Class]:
    """Class decorator factory: let configs and checkpoints build a class in ``role`` by its name.

    The name is ``f"{cls.__module__}.{cls.__qualname__}"``, the ``_target_`` a config uses::

        @register("augmentation")
        class BatchAugmentation(nn.Module): ...
    """
    if role not in REGISTRIES:
        raise ValueError(f"role {role!r} must be one of {ROLES}")

    def decorate(cls: Class) -> Class:
        if not (inspect.isclass(cls) and issubclass(cls, _BASES[role])):
            raise TypeError(
                f"only {_BASES[role].__name__} subclasses can be registered as {role}, not {cls!r}"
            )
        REGISTRIES[role][f"{cls.__module__}.{cls.__qualname__}"] = cls
        return cls

    return decorate


def register_network(cls: Class) -> Class:
    """Class decorator: let configs and checkpoints build the network ``cls`` by its full name."""
    return register("net")(cls)


def resolve(role: str, node: Any, where: str | None = None) -> Callable[..., Any]:
    """Check ``node`` completely and return a function that builds it (extra keyword arguments allowed).

    Args:
        role: one of ``ROLES``; nested nodes resolve in the same role.
        node: mapping with a ``_target_`` from ``REGISTRIES[role]`` and plain-data arguments.
        where: name of the node in error messages (default: ``role``).

    Raises:
        UnsafeConfigError: anything outside the registry or not plain data, before anything is built.
    """
    if role not in REGISTRIES:
        raise ValueError(f"role {role!r} must be one of {ROLES}")
    plan = _plan(role, node, where or role)
    return lambda **extra: _build(plan, extra)


def build(role: str, node: Mapping[str, Any], **extra: Any) -> Any:
    """Resolve ``node`` (see :func:`resolve`) and build it, passing ``extra`` keyword arguments."""
    return resolve(role, node)(**extra)


def check(role: str, node: Mapping[str, Any] | None, where: str | None = None) -> None:
    """Refuse ``node`` unless :func:`resolve` accepts it; ``None`` or empty means "none configured"."""
    if node:
        resolve(role, node, where)


MAX_DATA_NODES = 100_000
"""The most values (dict entries, list items) plain data from a checkpoint may expand to."""
MAX_DATA_DEPTH = 32


def check_bounded(value: Any, where: str) -> None:
    """Refuse plain data that nests deeper than ``MAX_DATA_DEPTH`` or expands to more than
    ``MAX_DATA_NODES`` values.

    A pickle may reuse one list at every level (``x = [x, x]`` forty times): a few hundred bytes
    that expand to 2^40 values for any code that walks them, prints them or writes them as JSON.
    The walk stops as soon as the budget is spent.

    Raises:
        UnsafeConfigError: naming ``where``.
    """
    stack, seen = [(value, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_DATA_NODES or depth > MAX_DATA_DEPTH:
            raise UnsafeConfigError(
                f"{where} nests deeper than {MAX_DATA_DEPTH} levels or holds more than "
                f"{MAX_DATA_NODES:,} values; no config of this project does"
            )
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def _plan(role: str, value: Any, where: str) -> Any:
    """``value`` with every node replaced by ``(class, {arguments})``, all checked."""
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise UnsafeConfigError(f"{where}: key {key!r} is not a string")
            if key != TARGET and key.startswith("_") and key.endswith("_"):
                raise UnsafeConfigError(
                    f"{where}.{key}: Hydra flags are not accepted here; only {TARGET} and plain "
                    "keyword arguments"
                )
        arguments = {k: _plan(role, v, f"{where}.{k}") for k, v in value.items() if k != TARGET}
        if TARGET not in value:
            return arguments
        return (_lookup(role, value[TARGET], where), arguments)
    if isinstance(value, list | tuple):
        return [_plan(role, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, _PLAIN):
        return value
    raise UnsafeConfigError(
        f"{where} is a {type(value).__name__}; only strings, numbers, booleans, lists and dicts "
        "are accepted"
    )


def _lookup(role: str, target: Any, where: str) -> type:
    registry = REGISTRIES[role]
    cls = registry.get(target) if isinstance(target, str) else None
    if cls is None:
        known = ", ".join(sorted(registry)) if len(registry) < 12 else f"{len(registry)} classes"
        raise UnsafeConfigError(
            f"{where}.{TARGET}={target!r} is not a registered {role} class (known: {known}). "
            "Only registered classes are built from configs and checkpoints; register your own "
            "network with pneumonia.model.registry.register_network"
        )
    if not (inspect.isclass(cls) and issubclass(cls, _BASES[role])):  # a tampered registry
        raise UnsafeConfigError(f"{where}.{TARGET}={target!r} is not a {_BASES[role].__name__}")
    return cls


def _build(plan: Any, extra: dict[str, Any]) -> Any:
    if isinstance(plan, tuple):
        cls, arguments = plan
        return cls(**{k: _build(v, {}) for k, v in arguments.items()}, **extra)
    if isinstance(plan, dict):
        return {k: _build(v, {}) for k, v in plan.items()}
    if isinstance(plan, list):
        return [_build(v, {}) for v in plan]
    return plan
