"""Where results go besides the kit: one module per destination, each declaring all of it.

A destination's module holds its config section (a dataclass, read as ``[<name>]``) with its
checks, whether a config turns it on, what a stored result owes it (the messages queued with
the result, in the same transaction), the Python modules it needs once on, and where its sender
lives (a :class:`edge.outbound.sender.Destination` in ``edge/outbound``). Config, the outbox
and the senders all read this registry; none of them names a destination. Adding one: a module
here (found by its name, nothing else to register), its sender in ``edge/outbound`` (the
layer that may talk to the network), and its ``[<name>]`` table in
``docs/fieldscope.example.toml``.

This package imports nothing of the daemon, outbound or web (it sits below all three).
"""

from __future__ import annotations

import importlib
import pkgutil

from .spec import DestinationSpec, Owed, Stored


def _discover() -> tuple[DestinationSpec, ...]:
    """Every module of this package but ``spec`` declares one destination as ``SPEC``."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "spec" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, DestinationSpec) or spec.name != info.name:
            raise ImportError(f"{module.__name__} must declare SPEC = DestinationSpec(name="
                              f"{info.name!r}, ...)")
        found.append(spec)
    return tuple(found)


# By name; a result's messages are queued in this order.
DESTINATIONS: tuple[DestinationSpec, ...] = _discover()
BY_NAME = {d.name: d for d in DESTINATIONS}

__all__ = ["BY_NAME", "DESTINATIONS", "DestinationSpec", "Owed", "Stored"]
