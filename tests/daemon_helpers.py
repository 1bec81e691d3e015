"""Helpers for daemon tests: a config on a replay folder, a started pipeline, a free port."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from edge.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replay_folder(dest: Path, images: list[Path]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for img in images:
        shutil.copy(img, dest / img.name)
    return dest


def make_config(bundle: Path, replay: Path, data_dir: Path, **overrides):
    base = {
        "model.bundle": str(bundle),
        "model.threads": 1,
        "source.kind": "replay",
        "source.path": str(replay),
        "source.fps": 20.0,
        "storage.data_dir": str(data_dir),
        "pipeline.store_every_s": 0.0,
    }
    base.update(overrides)
    return load_config(None, base)
