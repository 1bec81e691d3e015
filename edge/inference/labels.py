"""Label files: one label a line, optionally prefixed by its index ("0  background")."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelError

_INDEXED = re.compile(r"^\s*(\d+)[\s:]+(.+?)\s*$")


def read_labels(path: Path) -> list[str]:
    """Return labels in output order; indexed files may skip or reorder indices."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"labels file not found: {path}", "pass --labels with a labels.txt")
    lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise ModelError(f"labels file is empty: {path}")
    matches = [_INDEXED.match(ln) for ln in lines]
    if all(matches):
        indexed = {int(m.group(1)): m.group(2) for m in matches if m}
        size = max(indexed) + 1
        return [indexed.get(i, f"class_{i}") for i in range(size)]
    return [ln.strip() for ln in lines]


def write_labels(path: Path, labels: list[str]) -> None:
    Path(path).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
