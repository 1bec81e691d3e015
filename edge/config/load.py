"""Reading the configuration: the TOML file, command-line overrides, profiles, and paths made
absolute against the file's folder; then every check (``schema.validate``)."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..configfile import ConfigError, build, read_toml
from .schema import (
    OWN_SECTIONS,
    PROFILE_ID,
    PROFILE_KEYS,
    PROFILE_OVERRIDES,
    SECTIONS,
    Config,
    Profile,
    validate,
)
from .sections import PipelineSection, SourceSection


def _path_keys() -> tuple[tuple[str, str], ...]:
    """(section, key) of every option marked as a path (``metadata=PATH``), in every section."""
    return tuple((name, f.name) for name, cls in SECTIONS.items() for f in fields(cls)
                 if f.metadata.get("path"))


PATH_KEYS = _path_keys()


def _absolute_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the path options in ``raw`` absolute against ``base`` (a replay source's path
    too; a V4L2 device path or index is left alone)."""
    keys = list(PATH_KEYS)
    source = raw.get("source")
    if isinstance(source, dict) and source.get("kind", "replay") == "replay":
        keys.append(("source", "path"))
    for section, key in keys:
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            p = Path(table[key]).expanduser()
            table[key] = os.path.normpath(p if p.is_absolute() else (base / p))


def _profiles(raw: Any, top: dict[str, Any], base: Path | None) -> tuple[dict[str, Profile], str]:
    """Parse ``[profiles]``: ``default = ID`` and one ``[profiles.ID]`` table per profile. A
    profile's [source] and [pipeline] options are laid over the top-level ones."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[profiles]: expected a table, got {type(raw).__name__}")
    default = raw.get("default", "")
    if not isinstance(default, str):
        raise ConfigError(f"[profiles].default: expected a profile id, got {default!r}")
    profiles: dict[str, Profile] = {}
    for pid, table in raw.items():
        if pid == "default":
            continue
        where = f"[profiles.{pid}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
        if not PROFILE_ID.match(pid):
            raise ConfigError(f"{where}: a profile id is 1–32 lower-case letters, digits, - or _")
        unknown = sorted(set(table) - PROFILE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}",
                              f"known options: {', '.join(sorted(PROFILE_KEYS))}")
        for key in ("name", "bundle", "labels", "fallback_bundle"):
            if not isinstance(table.get(key, ""), str):
                raise ConfigError(f"{where}.{key}: expected a string, got {table[key]!r}")
        if not table.get("bundle"):
            raise ConfigError(f"{where}.bundle: each profile names its model bundle")
        for key in ("source", "pipeline"):
            if not isinstance(table.get(key, {}), dict):
                raise ConfigError(f"{where}.{key}: expected a table, got "
                                  f"{type(table[key]).__name__}")
        # The profile's options over the shared ones, then its paths made absolute: a replay
        # folder is a path, a V4L2 index is not, whichever table says the kind.
        own = {
            "model": {k: table[k] for k in ("bundle", "labels", "fallback_bundle") if k in table},
            "source": {**top.get("source", {}), **table.get("source", {})},
        }
        if base is not None:
            _absolute_paths(own, base)
        pipeline = {**top.get("pipeline", {}), **table.get("pipeline", {})}
        profiles[pid] = Profile(
            id=pid,
            name=table.get("name", ""),
            bundle=own["model"]["bundle"],
            labels=own["model"].get("labels", ""),
            fallback_bundle=own["model"].get("fallback_bundle", ""),
            source=build(SourceSection, own["source"], f"{where}.source"),
            pipeline=build(PipelineSection, pipeline, f"{where}.pipeline"),
        )
    if not profiles:
        raise ConfigError("[profiles]: no profile defined", "add a [profiles.<id>] table")
    if default and default not in profiles:
        raise ConfigError(f"[profiles].default: no profile {default!r}",
                          f"profiles: {', '.join(profiles)}")
    return profiles, default


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    camera: bool = True,
) -> Config:
    """The configuration, checked. ``camera`` False: for a command that never opens the
    camera (an export), a missing camera source is not an error."""
    raw: dict[str, Any] = read_toml(path) if path else {}
    profiles_raw = raw.pop("profiles", None)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}",
            f"sections are {', '.join(SECTIONS)}",
        )
    # Paths written in a config file mean the file's folder; paths given on the command line
    # (overrides) mean the working directory. Both become absolute here, so nothing later
    # (Flask's send_file, a thread that changed directory) resolves them differently.
    # A profile's source is the shared [source] with its own options laid over: its path is
    # made absolute after that merge (is "0" a V4L2 index or a replay folder? the merged kind
    # says), so the profiles get the shared table as written.
    shared_source = dict(raw.get("source", {})) if isinstance(raw.get("source"), dict) else {}
    if path:
        _absolute_paths(raw, Path(path).resolve().parent)
    given: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        if profiles_raw is not None and (dotted in PROFILE_OVERRIDES
                                         or dotted.startswith("source.")):
            raise ConfigError(
                f"{path} defines [profiles]: the model and source are chosen per profile",
                "pick one with --profile ID instead of --model/--source",
            )
        section, key = dotted.split(".", 1)
        given.setdefault(section, {})[key] = value
    _absolute_paths(given, Path.cwd())
    for section, values in given.items():
        raw.setdefault(section, {}).update(values)
    built: dict[str, Any] = {
        name: build(cls, dict(raw.get(name, {})), f"{path} [{name}]" if path else f"[{name}]")
        for name, cls in SECTIONS.items()
    }
    cfg = Config(
        **{name: built.pop(name) for name in OWN_SECTIONS},
        destination=built,  # what is left: the destinations' sections
        path=str(path or ""),
    )
    if profiles_raw is not None:
        if cfg.model.bundle or cfg.model.labels or cfg.model.fallback_bundle:
            raise ConfigError(
                "[model] bundle, labels and fallback_bundle belong in each [profiles.<id>] "
                "table when the config has profiles"
            )
        top = {"source": shared_source, "pipeline": dict(raw.get("pipeline", {}))}
        try:
            cfg.profiles, cfg.default_profile = _profiles(
                profiles_raw, top, Path(path).resolve().parent if path else None
            )
        except ConfigError as exc:
            if not path:
                raise
            raise ConfigError(f"{path}: {exc.message}", exc.hint) from exc
    password_from_env(cfg)
    where = f"{path}: " if path else ""  # which file, as the loader's own errors say
    for pid in cfg.all_profiles():
        try:
            validate(cfg.for_profile(pid), camera=camera)
        except ConfigError as exc:
            if not cfg.profiles and not where:
                raise
            own = f"profile {pid!r}: " if cfg.profiles else ""
            raise ConfigError(f"{where}{own}{exc.message}", exc.hint) from exc
    return cfg


def password_from_env(cfg: Config) -> None:
    env = os.environ.get("FIELDSCOPE_PASSWORD")
    if env and not cfg.web.password:
        cfg.web.password = env
    tokens = os.environ.get("FIELDSCOPE_API_TOKEN", "")
    cfg.web.api_tokens = list(cfg.web.api_tokens) + [t for t in tokens.split(",") if t.strip()]
