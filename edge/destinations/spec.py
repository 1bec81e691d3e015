"""The shape of a destination's declaration (see the package's docstring)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..configfile import ConfigError


@dataclass(frozen=True)
class Owed:
    """One message a stored result owes a destination. ``per_sample``: a summary of the whole
    sample, one waiting at a time (a newer result replaces the waiting one)."""

    kind: str
    per_sample: bool = False


@dataclass(frozen=True)
class Stored:
    """What a destination's rule sees of a result just stored."""

    sample_code: str | None
    has_snapshot: bool


@dataclass(frozen=True)
class DestinationSpec:
    name: str  # the destination's name, and its config section's
    section: type  # the dataclass of [<name>]
    enabled: Callable[[Any], bool]  # is it turned on by this section?
    owes: Callable[[Stored], list[Owed]]  # what each stored result owes it
    check: Callable[[Any], None]  # its section's own checks (raises ConfigError)
    modules: tuple[tuple[str, str], ...]  # (module, extra) it needs once on
    sender: str  # "module:Class" of its sender in edge/outbound

    def check_section(self, section: Any) -> None:
        """Its path options name files that exist (on or off); when it is on, its modules and
        the section's own checks."""
        for f in fields(section):
            value = getattr(section, f.name)
            if f.metadata.get("path") and value and not Path(value).is_file():
                raise ConfigError(f"[{self.name}].{f.name}: no file {value}")
        if not self.enabled(section):
            return
        for module, extra in self.modules:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                raise ConfigError(f"[{self.name}] is set but {module} is not installed",
                                  f"pip install 'fieldscope[{extra}]' (or make install)")
        self.check(section)
