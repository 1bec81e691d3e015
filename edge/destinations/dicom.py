"""[dicom]: each field of a sample, image and report, to the clinic's PACS by DICOMweb."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..configfile import PATH, ConfigError
from .spec import DestinationSpec, Owed, Stored


@dataclass
class DicomSection:
    stow_url: str = ""  # DICOMweb root, e.g. http://pacs:8042/dicom-web; empty: off
    username: str = ""
    password: str = ""
    ca_file: str = field(default="", metadata=PATH)  # https: the server's CA (default: system)
    institution: str = ""  # InstitutionName in every object
    timeout_s: float = 30.0


def check(dc: DicomSection) -> None:
    u = urlsplit(dc.stow_url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"[dicom].stow_url: {dc.stow_url!r} is not an http(s) URL")
    if dc.timeout_s <= 0:
        raise ConfigError("[dicom].timeout_s must be positive")


def owes(stored: Stored) -> list[Owed]:
    # A field of a sample with its snapshot: the PACS files it under the sample's study.
    return [Owed("field")] if stored.sample_code and stored.has_snapshot else []


SPEC = DestinationSpec(
    name="dicom", section=DicomSection, enabled=lambda s: bool(s.stow_url), owes=owes,
    check=check, modules=(("dicomweb_client", "clinic"), ("highdicom", "clinic")),
    sender="edge.outbound.dicom:StowDestination",
)
