"""The results service: everything that is stored goes through here.

It owns the store: on-demand classifications (uploads, camera stills) with their snapshots and
samples, the live results stored now and then, the periodic retention, and every read the web
layer makes. Uploads never touch the camera; stills come through the capture loop's
``take_still``, which holds the camera for just that frame.

Each on-demand classification runs inside ``use()``: the running profile (model, camera,
settings) stays the same from the first step to the stored row, and a profile switch waits.
A result is stored with the profile that made it; a sample belongs to one profile.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FieldScopeError
from ..inference.postprocess import not_assessable
from ..inference.quality import assess
from .budget import DecodeBudget
from .frames import encode_jpeg, prepare_frame
from .store import StorageError, Store

if TYPE_CHECKING:
    from PIL import Image

    from .active import Active

log = logging.getLogger(__name__)
DEFAULT_DECODE_BUDGET = 192 * 2**20


class SampleProfileError(FieldScopeError):
    """A sample's fields all come from one profile: mixing models would make its counts and
    mean score meaningless."""

    status = 409


class ResultsService:
    def __init__(
        self,
        store: Store,
        use: Callable[[], AbstractContextManager[Active]],
        decode_budget: DecodeBudget | None = None,
    ) -> None:
        self.store = store
        self._use = use
        self.housekeeping_s = 3600.0
        self.decode_budget = decode_budget or DecodeBudget(DEFAULT_DECODE_BUDGET)

    # -- storing -------------------------------------------------------------------------------
    def capture(self, sample_code: str | None) -> dict[str, Any]:
        """Full-quality still → classify → store with snapshot; returns the stored result."""
        with self._use() as run:
            self._check_sample(run, sample_code)
            return self._classify_and_store(run, run.capture.take_still(), "capture", sample_code)

    def classify_and_store(self, image: Any, mode: str, sample_code: str | None) -> dict[str, Any]:
        """Classify an RGB array (a camera still) or an encoded image (an upload) with the
        running profile and store it with its snapshot; raises ImageError, StorageError or
        SampleProfileError."""
        with self._use() as run:
            self._check_sample(run, sample_code)
            return self._classify_and_store(run, image, mode, sample_code)

    def _check_sample(self, run: Active, sample_code: str | None) -> None:
        if not sample_code:
            return
        made_by = self.store.sample_profile(sample_code)
        if made_by is not None and made_by != run.profile.id:
            raise SampleProfileError(
                f"sample {sample_code} was made with profile {made_by!r}, the kit is on "
                f"{run.profile.id!r}",
                f"switch back to {made_by!r} to add fields, or use a new sample code",
            )

    def _classify_and_store(
        self, run: Active, image: Any, mode: str, sample_code: str | None
    ) -> dict[str, Any]:
        """

        An encoded image takes exactly the path of ``classify`` and of training's evaluation
        (Classifier.prepare on the bytes: JPEG draft decoding, then the Pillow resize), so the
        same file gives the same model input however it enters. The snapshot is re-encoded
        from a full decode (which also drops the upload's metadata)."""
        p, clf = run.cfg.pipeline, run.classifier
        source: np.ndarray | Image.Image
        if isinstance(image, np.ndarray):
            rgb = image
            small, times, quality = prepare_frame(clf, rgb, p.min_focus, p.max_clipped)
            source = rgb  # an ensemble member of another input size resizes from it
        else:
            # Decoded once, no larger than the snapshot needs, within the decode budget; the
            # snapshot is that image (which also drops the upload's metadata).
            small, times, decoded = clf.prepare_encoded(image, budget=self.decode_budget.hold)
            quality = assess(small, p.min_focus, p.max_clipped)
            rgb = np.asarray(decoded, dtype=np.uint8)
            source = decoded  # resized as `classify` and training's evaluation resize it
        # On demand a few more invokes cost nothing a user notices: average the bundle's
        # test-time views (the live stream never does).
        result = clf.infer(small, times, top_k=p.top_k, name=mode, tta=True, explain=True,
                           members=True, image=source)
        doc = result.to_dict()
        doc["quality"] = quality.to_dict()
        # Out of scope counts like a failed quality gate: no finding, never flagged. A field
        # the gate failed keeps its scores for the record, but not a decision either way.
        doc["assessable"] = quality.assessable and result.in_scope
        if not quality.assessable and result.in_scope and doc.get("decision"):
            doc["decision"] = not_assessable(doc["decision"], quality.reason)
        jpeg = encode_jpeg(rgb, run.cfg.storage.snapshot_quality)
        doc["id"] = self.store.save(
            doc,
            mode,
            sample_code=sample_code,
            jpeg=jpeg,
            source=run.capture.source.describe() if mode == "capture" else mode,
            profile=run.profile.id,
        )
        doc["sample_code"] = sample_code
        doc["profile"] = run.profile.id
        return doc

    def store_live(self, doc: dict[str, Any], profile: str, source: str) -> None:
        """A live result, stored now and then (not acknowledged to anyone: a failure is
        reported through health, not raised)."""
        with contextlib.suppress(StorageError):
            self.store.save(doc, "live", source=source, profile=profile)

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

    def list(
        self, limit: int = 50, before: int | None = None, sample_code: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        return self.store.list(limit=limit, before=before, sample_code=sample_code)

    def samples(self) -> builtins.list[dict[str, Any]]:
        return self.store.samples()

    def sample_summary(self, code: str) -> dict[str, Any] | None:
        return self.store.sample_summary(code)

    def snapshot_path(self, rel: str) -> Path | None:
        return self.store.snapshot_path(rel)

    def count(self) -> int:
        return self.store.count()

    def storage_status(self) -> dict[str, Any]:
        s = self.store
        try:  # read once: free_mb and low_space describe the same moment
            free: float | None = s.free_mb()
        except OSError:  # the data folder is gone (an unmounted card): as bad as full
            free = None
        gone = s.vanished()
        return {
            "ok": s.last_error is None and gone is None,
            "error": gone or s.last_error,
            "free_mb": round(free, 1) if free is not None else None,
            "low_space": free is None or free < s.min_free_mb,
            "min_free_mb": s.min_free_mb,
            "clock_problem": s.clock_problem(),
        }
