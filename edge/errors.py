"""Errors the kit reports to a person: each says what is wrong and how to fix it."""

from __future__ import annotations


class FieldScopeError(Exception):
    """Base error. ``hint`` is the fix, shown after the message."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RuntimeMissingError(FieldScopeError):
    """No usable TFLite interpreter package is installed."""


class ModelError(FieldScopeError):
    """A model file or bundle is unusable."""


class BundleError(ModelError):
    """A bundle's manifest or files are inconsistent."""


class EdgeTpuError(FieldScopeError):
    """The Edge TPU is absent, its runtime is missing, or it failed."""


class ImageError(FieldScopeError):
    """An input image cannot be decoded or is unsafe to decode."""

    status = 400  # HTTP status when it came from an upload


class ImageTooLargeError(ImageError):
    """More pixels than allowed: a decompression bomb, or a mistaken upload."""

    status = 413
