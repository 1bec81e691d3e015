"""A camera frame on its way through the daemon, and the one way a frame is prepared."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..inference.classifier import Classifier
from ..inference.quality import Quality, assess


@dataclass
class Frame:
    """A camera frame; ``small`` (model-size), ``times`` and ``quality`` are filled by the
    capture thread for the frames it hands to the worker."""

    id: int
    rgb: np.ndarray
    at: float
    small: np.ndarray | None = None
    times: dict[str, float] = field(default_factory=dict)
    quality: Quality | None = None


def prepare_frame(
    classifier: Classifier, rgb: np.ndarray, min_focus: float, max_clipped: float
) -> tuple[np.ndarray, dict[str, float], Quality]:
    """The model-size input, its stage times and its quality (on whichever thread)."""
    small, times = classifier.prepare(rgb)
    return small, times, assess(small, min_focus, max_clipped)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
