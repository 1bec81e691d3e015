"""The results service: everything that is stored goes through here.

It owns the store: on-demand classifications (uploads, camera stills) with their snapshots and
samples, the live results stored now and then, the periodic retention, and every read the web
layer makes. Uploads never touch the camera; stills come through the capture loop's
``take_still``, which holds the camera for just that frame.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..inference.classifier import Classifier
from ..inference.preprocess import open_image
from ..inference.quality import assess
from .frames import encode_jpeg, prepare_frame
from .store import StorageError, Store

log = logging.getLogger(__name__)


class ResultsService:
    def __init__(
        self,
        cfg: Config,
        classifier: Classifier,
        store: Store,
        take_still: Callable[[], np.ndarray],
        source_name: Callable[[], str],
    ) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.store = store
        self._take_still = take_still
        self._source_name = source_name
        self.housekeeping_s = 3600.0

    # -- storing -------------------------------------------------------------------------------
    def capture(self, sample_code: str | None) -> dict[str, Any]:
        """Full-quality still → classify → store with snapshot; returns the stored result."""
        return self.classify_and_store(self._take_still(), "capture", sample_code)

    def classify_and_store(self, image: Any, mode: str, sample_code: str | None) -> dict[str, Any]:
        """Classify an RGB array (a camera still) or an encoded image (an upload) and store it
        with its snapshot; raises ImageError or StorageError.

        An encoded image takes exactly the path of ``classify`` and of training's evaluation
        (Classifier.prepare on the bytes: JPEG draft decoding, then the Pillow resize), so the
        same file gives the same model input however it enters. The snapshot is re-encoded
        from a full decode (which also drops the upload's metadata)."""
        p = self.cfg.pipeline
        if isinstance(image, np.ndarray):
            rgb = image
            small, times, quality = prepare_frame(self.classifier, rgb, p.min_focus,
                                                  p.max_clipped)
        else:
            small, times = self.classifier.prepare(image)
            quality = assess(small, p.min_focus, p.max_clipped)
            rgb = np.asarray(
                open_image(image, max_pixels=self.classifier.max_pixels), dtype=np.uint8
            )
        # On demand a few more invokes cost nothing a user notices: average the bundle's
        # test-time views (the live stream never does).
        result = self.classifier.infer(small, times, top_k=p.top_k, name=mode, tta=True)
        doc = result.to_dict()
        doc["quality"] = quality.to_dict()
        doc["assessable"] = quality.assessable
        jpeg = encode_jpeg(rgb, self.cfg.storage.snapshot_quality)
        doc["id"] = self.store.save(
            doc,
            mode,
            sample_code=sample_code,
            jpeg=jpeg,
            source=self._source_name() if mode == "capture" else mode,
        )
        doc["sample_code"] = sample_code
        return doc

    def store_live(self, doc: dict[str, Any]) -> None:
        """A live result, stored now and then (not acknowledged to anyone: a failure is
        reported through health, not raised)."""
        with contextlib.suppress(StorageError):
            self.store.save(doc, "live", source=self._source_name())

    def housekeeping(self, stop: threading.Event) -> None:
        """Retention while the kit runs, not only at start-up: a kit left on for months must
        still forget results past their age."""
        while not stop.wait(self.housekeeping_s):
            try:
                self.store.enforce_retention()
            except Exception:  # a locked or failing database: try again next round
                log.exception("retention failed")

    # -- reading (what the web layer may ask) ------------------------------------------------------
    def get(self, result_id: int) -> dict[str, Any] | None:
        return self.store.get(result_id)

    def list(self, limit: int = 50, before: int | None = None,
             sample_code: str | None = None) -> list[dict[str, Any]]:
        return self.store.list(limit=limit, before=before, sample_code=sample_code)

    def samples(self) -> list[dict[str, Any]]:
        return self.store.samples()

    def sample_summary(self, code: str) -> dict[str, Any] | None:
        return self.store.sample_summary(code)

    def snapshot_path(self, rel: str) -> Path | None:
        return self.store.snapshot_path(rel)

    def count(self) -> int:
        return self.store.count()

    def storage_status(self) -> dict[str, Any]:
        s = self.store
        return {
            "ok": s.last_error is None,
            "error": s.last_error,
            "free_mb": round(s.free_mb(), 1),
            "low_space": s.low_on_space(),
            "min_free_mb": s.min_free_mb,
            "clock_problem": s.clock_problem(),
        }
