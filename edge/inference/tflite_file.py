"""Cheap checks on a .tflite file without building an interpreter."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import ModelError

EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"
_MAX_SCAN = 64 * 1024 * 1024


def read_model_bytes(path: Path) -> bytes:
    """Read a model file, refusing what is plainly not a TFLite flatbuffer."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", "check the path or the bundle's manifest")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(
            f"{path} is not a TensorFlow Lite model (no TFL3 file identifier)",
            "point --model at a .tflite file or a model bundle folder",
        )
    return data


def is_edgetpu_compiled(data: bytes) -> bool:
    """A model compiled by edgetpu_compiler carries the custom op that only the TPU can run."""
    return EDGETPU_CUSTOM_OP in data[:_MAX_SCAN]


_DIGESTS: dict[tuple, str] = {}
HASHED = {"files": 0}  # how many files were actually read (the System page's cost, tested)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, remembered while its inode, size and modification time stay the
    same (the System page checks every bundle on each view; a Pi's SD card is slow)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    HASHED["files"] += 1
    if len(_DIGESTS) > 256:
        _DIGESTS.clear()
    _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]
