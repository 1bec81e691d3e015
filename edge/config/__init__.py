"""Daemon configuration: one TOML file, validated with clear messages; CLI flags override it.

In three parts, one job each: ``sections`` (the daemon's own tables, each a dataclass with its
checks), ``schema`` (the whole: sections, destinations, profiles, and the checks across them)
and ``load`` (file, overrides, profiles, paths). See ``docs/fieldscope.example.toml`` for every
option with a comment.
"""

from __future__ import annotations

from ..configfile import ConfigError, check_table, read_toml
from ..destinations.dicom import DicomSection
from ..destinations.mqtt import MqttSection
from .load import PATH_KEYS, load_config, password_from_env
from .schema import OWN_SECTIONS, SECTIONS, Config, Profile, validate
from .sections import (
    GENERIC_HOSTNAMES,
    KitSection,
    ModelSection,
    OutboxSection,
    PipelineSection,
    SourceSection,
    StorageSection,
    WebSection,
    default_kit_id,
    parse_source,
)

__all__ = [
    "GENERIC_HOSTNAMES", "OWN_SECTIONS", "PATH_KEYS", "SECTIONS", "Config", "ConfigError",
    "DicomSection", "KitSection", "ModelSection", "MqttSection", "OutboxSection",
    "PipelineSection", "Profile", "SourceSection", "StorageSection", "WebSection",
    "check_table", "default_kit_id", "load_config", "parse_source", "password_from_env",
    "read_toml", "validate",
]
