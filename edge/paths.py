"""Where the project's own files are: bundled models and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    return Path(os.environ.get("FIELDSCOPE_MODELS", PROJECT_ROOT / "models"))


def default_bundle() -> Path:
    return models_dir() / os.environ.get("FIELDSCOPE_DEFAULT_MODEL", "blood-smear")


def shared_dir() -> Path:
    """Datasets and reference models (never committed): FIELDSCOPE_SHARED or ../shared."""
    return Path(os.environ.get("FIELDSCOPE_SHARED", PROJECT_ROOT.parent / "shared"))
