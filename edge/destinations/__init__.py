"""Where results go besides the kit: one module per destination, each declaring all of it.

A destination's module holds its config section (a dataclass, read as ``[<name>]``) with its
checks, whether a config turns it on, what a stored result owes it (the messages queued with
the result, in the same transaction), the Python modules it needs once on, and where its sender
lives (a :class:`edge.outbound.sender.Destination` in ``edge/outbound``). Config, the outbox
and the senders all read this registry; none of them names a destination. Adding one: a module
here, its sender in ``edge/outbound``, one line below, and a ``[<name>]`` table in
``docs/fieldscope.example.toml``.

This package imports nothing of the daemon, outbound or web (it sits below all three).
"""

from __future__ import annotations

from . import dicom, mqtt
from .spec import DestinationSpec, Owed, Stored

# In this order a result's messages are queued.
DESTINATIONS: tuple[DestinationSpec, ...] = (mqtt.SPEC, dicom.SPEC)
BY_NAME = {d.name: d for d in DESTINATIONS}

__all__ = ["BY_NAME", "DESTINATIONS", "DestinationSpec", "Owed", "Stored"]
