"""Classifier: bundle + backend + pre/post-processing, with Edge TPU → CPU fallback."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BundleError, EdgeTpuError
from . import postprocess
from .backends import Backend, open_backend, open_cpu, open_edgetpu
from .bundle import Bundle
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    InputAdapter,
    open_image,
    resize,
    resize_array,
    tta_views,
)
from .runtime import resolve_runtime
from .scope import ScopeModel, dequantize_map, match_taps, pooled_tap

log = logging.getLogger(__name__)
REPROBE_FIRST_S = 15.0
REPROBE_MAX_S = 600.0
FALLBACK_EVENTS_KEPT = 20


@dataclass(frozen=True)
class Member:
    """An ensemble member on the CPU: its interpreter, its input (its own size or the
    bundle's) and its own logit offsets."""

    backend: Backend
    adapter: InputAdapter
    bias: np.ndarray | None

    @property
    def size(self) -> tuple[int, int]:
        return self.adapter.size


@dataclass
class Result:
    label: str
    score: float
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    groups: dict[str, float]
    decision: dict[str, Any] | None
    backend: str
    timings_ms: dict[str, float]
    model: str = ""
    image: str | None = None
    notes: list[str] = field(default_factory=list)
    # How many model outputs were averaged: test-time views × ensemble members (1: plain).
    views: int = 1
    # {"in_scope", "score", "threshold"} when the bundle has a scope check, else None.
    scope: dict[str, Any] | None = None
    # Where the model looked (asked for with explain=True): {"size": [h, w], "class": [[...]],
    # "group": [[...]]} in logit units per location, or None.
    map: dict[str, Any] | None = None

    @property
    def in_scope(self) -> bool:
        return self.scope is None or bool(self.scope["in_scope"])

    def to_dict(self) -> dict[str, Any]:
        # Built by hand: dataclasses.asdict deep-copies recursively, a visible cost per frame.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(
            probabilities=dict(self.probabilities),
            groups=dict(self.groups),
            decision=dict(self.decision) if self.decision is not None else None,
            timings_ms=dict(self.timings_ms),
            notes=list(self.notes),
            top_k=[{"label": lab, "score": s} for lab, s in self.top_k],
            scope=dict(self.scope) if self.scope is not None else None,
            map=dict(self.map) if self.map is not None else None,
        )
        return out


class Classifier:
    """Thread-safe: one inference at a time per classifier (the interpreter is not re-entrant)."""

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "auto",
        threads: int | None = None,
        device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.bundle = bundle
        self.policy = backend
        self.threads = threads
        self.max_pixels = max_pixels
        self.runtime = resolve_runtime()
        self._lock = threading.Lock()
        self.device = device
        selection = open_backend(bundle, backend, threads, device, self.runtime)
        self.backend_reason = selection.reason
        # The last switches between TPU and CPU (bounded: a TPU that fails every few minutes
        # for months must not grow the status without end).
        self.fallback_events: deque[str] = deque(maxlen=FALLBACK_EVENTS_KEPT)
        # Set while an Edge TPU that failed mid-run is replaced by the CPU: {"since", "reason"};
        # the TPU is tried again with backoff (a USB reset re-enumerates it within seconds).
        self.degraded: dict[str, Any] | None = None
        self.reprobe_s = REPROBE_FIRST_S
        self._reprobe_at = 0.0
        # Back on the TPU after a re-probe, but no invoke has worked there yet: one that opens
        # and then fails every transfer must keep doubling its wait, not start again at 15 s.
        self._unproven = False
        self._cpu_unusable: str | None = None  # why the CPU model cannot stand in, once known
        self._use(selection.backend)
        self._members = [self._open_member(art) for art in bundle.members]
        # Decoded no smaller than the largest input of any member, so that each resizes from
        # the decoded image to its own size (as it was trained and evaluated).
        sizes = [self.adapter.size] + [m.size for m in self._members]
        self._decode_size = (max(h for h, _ in sizes), max(w for _, w in sizes))

    # -- setup ---------------------------------------------------------------------------
    def _use(self, backend: Backend) -> None:
        spec = dict(self.bundle.input_spec)
        shape = backend.input_shape
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
            raise BundleError(
                f"{backend.artifact.path.name}: input shape {list(shape)} is not [1, H, W, 3]",
                "FieldScope runs single-image RGB classifiers",
            )
        size = tuple(spec["size"])
        if size == (0, 0):  # bare .tflite: trust the model
            spec["size"] = [shape[1], shape[2]]
        elif size != (shape[1], shape[2]):
            raise BundleError(
                f"{backend.artifact.path.name}: input is {shape[1]}×{shape[2]} but the manifest "
                f"says {size[0]}×{size[1]}",
                "fix input.size in manifest.json or re-export the bundle",
            )
        want = backend.artifact.info.get("input_dtype")
        if want and np.dtype(want) != backend.input_dtype:
            raise BundleError(
                f"{backend.artifact.path.name}: input type is {backend.input_dtype}, the manifest "
                f"says {want}",
                "re-export the bundle so manifest and model agree",
            )
        n_out = backend.output_size
        if self.bundle.manifest.get("_labels_from_model"):
            self.bundle.manifest["labels"] = [f"class_{i}" for i in range(n_out)]
        if n_out != len(self.bundle.labels):
            raise BundleError(
                f"{backend.artifact.path.name} has {n_out} outputs but there are "
                f"{len(self.bundle.labels)} labels",
                "use the labels file that belongs to this model",
            )
        scope = self.bundle.scope
        try:
            self._taps = (
                match_taps(backend.tap_details, [t.shape for t in scope.taps])
                if scope is not None
                else []
            )
        except BundleError as exc:
            raise BundleError(f"{backend.artifact.path.name}: {exc.message}", exc.hint) from exc
        self.spec = spec
        self._bias = self.bundle.class_bias
        self.adapter = InputAdapter.for_model(backend.input_detail, spec)
        self.backend = backend

    def _open_member(self, art: Any) -> Member:
        """An ensemble member on the CPU: the bundle's labels and the input its entry declares
        (the bundle's unless it names its own size), or refused; with its own logit offsets
        (``class_bias``) when it declares them."""
        from .backends.cpu import CpuBackend

        backend = CpuBackend(art, self.runtime, self.threads)
        spec = self.bundle.member_input_spec(art)
        shape = backend.input_shape
        if len(shape) != 4 or tuple(shape[1:3]) != tuple(spec["size"]) or shape[3] != 3:
            backend.close()
            own = "input" in art.info
            raise BundleError(
                f"member {art.path.name}: input {list(shape[1:])}, its entry in manifest.json "
                f"says {spec['size'][0]}×{spec['size'][1]}"
                + ("" if own else " (the bundle's input)"),
                "declare the member's own size in its entry (\"input\": {\"size\": [H, W]})"
                if not own else "fix the member's input.size in manifest.json",
            )
        if backend.output_size != len(self.bundle.labels):
            backend.close()
            raise BundleError(
                f"member {art.path.name} has {backend.output_size} outputs but the bundle has "
                f"{len(self.bundle.labels)} labels",
                "an ensemble's members share the bundle's labels",
            )
        bias = art.info.get("class_bias")  # checked with the manifest (one per label)
        return Member(backend, InputAdapter.for_model(backend.input_detail, spec),
                      None if bias is None else np.asarray(bias, dtype=np.float64))

    @property
    def members(self) -> int:
        """How many models an on-demand classification averages."""
        return 1 + len(self._members)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.adapter.size

    def describe(self) -> dict[str, Any]:
        return {
            **self.backend.describe(),
            "policy": self.policy,
            "reason": self.backend_reason,
            "fallbacks": list(self.fallback_events),
            "degraded": dict(self.degraded) if self.degraded else None,
            "model": self.bundle.name,
            "model_version": self.bundle.version,
            "members": self.members,
        }

    # -- inference -----------------------------------------------------------------------
    def prepare(self, source: ImageSource | np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Decode and resize; returns the (H, W, 3) uint8 RGB input and the stage times."""
        h, w = self.adapter.size
        t0 = time.perf_counter()
        if isinstance(source, np.ndarray):  # a camera frame: no decoding
            t1 = t0
            small = self._to_size(source, (h, w))
        else:
            small, times, _ = self.prepare_encoded(source)
            return small, times
        t2 = time.perf_counter()
        return small, {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}

    def prepare_encoded(
        self, source: ImageSource, budget: Callable[[int], AbstractContextManager] | None = None
    ) -> tuple[np.ndarray, dict[str, float], Image.Image]:
        """An encoded image, decoded once: the model input, the stage times and the decoded
        RGB image (at most about KEEP_PIXELS; the daemon stores it as the snapshot)."""
        h, w = self.adapter.size
        t0 = time.perf_counter()
        dh, dw = self._decode_size
        img = open_image(source, target=(dw, dh), max_pixels=self.max_pixels, budget=budget)
        t1 = time.perf_counter()
        small = self._to_size(img, (h, w))
        t2 = time.perf_counter()
        return small, {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}, img

    def _to_size(self, image: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A decoded image or a camera frame at a model's (H, W) input size, resized the
        bundle's way: the first model's input and every member's come from here."""
        if isinstance(image, np.ndarray):
            return resize_array(np.ascontiguousarray(image, dtype=np.uint8), size,
                                self.spec["resize"])
        return np.asarray(resize(image, size, self.spec["resize"]), dtype=np.uint8)

    @contextmanager
    def exclusive(self) -> Iterator[Backend]:
        """The backend, for a caller that runs it directly (a benchmark's bare loop on the
        daemon's own interpreter); classification waits until the block ends."""
        with self._lock:
            yield self.backend

    def _run(self, tensor: np.ndarray, taps: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        if taps and self._taps:
            return self.backend.invoke_with_taps(tensor, self._taps)
        return self.backend.invoke(tensor), []

    def _invoke(
        self, rgb: np.ndarray, taps: bool = False
    ) -> tuple[tuple[np.ndarray, list[np.ndarray]], list[str]]:
        """Run one prepared input (the caller holds the lock); ``taps`` also returns the scope
        check's feature maps. Only a failure of the Edge TPU itself moves inference to the CPU:
        a bad input is the caller's error and raised as is."""
        tensor = self.adapter(rgb)  # shape or type problems surface here, before the TPU
        notes = self._maybe_reprobe()
        try:
            out = self._run(tensor, taps)
        except Exception as exc:
            if self.backend.name != "edgetpu" or self.policy != "auto":
                if self.backend.name == "edgetpu":
                    raise EdgeTpuError(f"the Edge TPU failed during inference: {exc}") from exc
                raise
            return self._fall_back(exc, rgb, taps, notes)
        if self._unproven and self.backend.name == "edgetpu":
            self._unproven = False  # it works: a later failure starts the backoff again
            self.reprobe_s = REPROBE_FIRST_S
        return out, notes

    def _fall_back(self, exc: Exception, rgb: np.ndarray, taps: bool,
                   notes: list[str]) -> tuple[tuple[np.ndarray, list[np.ndarray]], list[str]]:
        """The Edge TPU failed mid-run: the bundle's CPU model stands in, the TPU is tried again
        with backoff. A CPU model that cannot stand in (it disagrees with the manifest) leaves
        the kit degraded with both reasons, the TPU still re-probed, instead of reopening the
        CPU model at every frame."""
        if self._unproven:  # back on it, and it failed before any invoke worked
            self.reprobe_s = min(self.reprobe_s * 2, REPROBE_MAX_S)
            self._unproven = False
        why = f"the Edge TPU failed during inference ({exc}); switched to the CPU"
        if self.degraded is None:  # the re-probe is due after the backoff from the first
            self._reprobe_at = time.monotonic() + self.reprobe_s  # failure, not each frame's
        try:
            if self._cpu_unusable:
                raise BundleError(self._cpu_unusable)
            selection = open_cpu(self.bundle, self.runtime, self.threads,
                                 f"CPU fallback: {why}")
            self._use_checked(selection.backend)
        except Exception as cpu_exc:
            self._cpu_unusable = str(cpu_exc)
            why = (f"the Edge TPU failed during inference ({exc}) and the CPU model cannot "
                   f"stand in: {cpu_exc}")
            if not self.degraded or self.degraded["reason"] != why:
                log.error("%s; trying the Edge TPU again in %.0f s", why, self.reprobe_s)
                self.fallback_events.append(why)
            self.degraded = {"since": self.degraded["since"] if self.degraded else time.time(),
                             "reason": why}
            raise EdgeTpuError(why) from exc
        log.warning("%s; trying it again in %.0f s", why, self.reprobe_s)
        self.fallback_events.append(why)
        self.backend_reason = selection.reason
        self.degraded = {"since": time.time(), "reason": why}
        return self._run(self.adapter(rgb), taps), notes + [why]

    def _use_checked(self, backend: Backend) -> None:
        """Switch to ``backend`` if it fits the manifest (closing the old one), else close it
        and raise, leaving the old one in place."""
        old = self.backend
        try:
            self._use(backend)
        except Exception:
            backend.close()
            self._use(old)
            raise
        if old is not backend:
            old.close()

    def feature_maps(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Every feature output of the model for one prepared input, as float (H, W, C) maps
        (what ``training`` fits the scope check on, through the same code as the kit)."""
        with self._lock:
            _, taps = self.backend.invoke_with_taps(
                self.adapter(rgb), list(range(len(self.backend.tap_details)))
            )
            return [
                dequantize_map(t, d) for t, d in zip(taps, self.backend.tap_details, strict=True)
            ]

    def _maybe_reprobe(self) -> list[str]:
        """While degraded, try the Edge TPU again when its backoff has passed; back on it when
        it opens (the next invoke runs there), else wait twice as long (up to 10 min)."""
        if not self.degraded or time.monotonic() < self._reprobe_at:
            return []
        try:
            selection = open_edgetpu(self.bundle, self.runtime, self.threads, self.device)
        except Exception as exc:  # still gone: any failure to open means "not yet"
            self.reprobe_s = min(self.reprobe_s * 2, REPROBE_MAX_S)
            self._reprobe_at = time.monotonic() + self.reprobe_s
            log.debug("Edge TPU still unusable (%s); next try in %.0f s", exc, self.reprobe_s)
            return []
        try:
            self._use_checked(selection.backend)
        except Exception as exc:
            self.reprobe_s = min(self.reprobe_s * 2, REPROBE_MAX_S)
            self._reprobe_at = time.monotonic() + self.reprobe_s
            log.debug("Edge TPU model unusable (%s); next try in %.0f s", exc, self.reprobe_s)
            return []
        self.backend_reason = f"{selection.reason} (back after a failure)"
        note = "the Edge TPU works again; inference is back on it"
        log.warning("%s", note)
        self.fallback_events.append(note)
        self.degraded = None
        self._unproven = True  # the backoff resets once an invoke works there
        return [note]

    def classify(
        self,
        source: ImageSource | np.ndarray,
        top_k: int = 3,
        name: str | None = None,
        tta: bool = False,
        explain: bool = False,
        members: bool = True,
    ) -> Result:
        """Classify an image as a capture would: an ensemble's members over every view (the
        threshold was chosen on that mean); a single model over its views with ``tta``."""
        image: Image.Image | np.ndarray
        if isinstance(source, np.ndarray):
            rgb, times = self.prepare(source)
            image = source
        else:
            rgb, times, image = self.prepare_encoded(source)
        if name is None and isinstance(source, str):
            name = source
        return self.infer(rgb, times, top_k, name, tta=tta, explain=explain, members=members,
                          image=image)

    def infer(
        self,
        rgb: np.ndarray,
        times: dict[str, float] | None = None,
        top_k: int = 3,
        name: str | None = None,
        tta: bool = False,
        explain: bool = False,
        members: bool = False,
        image: Image.Image | np.ndarray | None = None,
    ) -> Result:
        """Classify an already prepared (H, W, 3) model-size input (see :meth:`prepare`).
        ``members``: classify as a capture does, every ensemble member over every view of the
        bundle (``tta_threshold`` is chosen on exactly that mean; no threshold is chosen on the
        members over one view); the live stream does not. A member with its own input size
        resizes ``image`` (the decoded image or camera frame ``rgb`` was made from), which it
        then needs.

        ``tta``: average the probabilities over the bundle's test-time views (a few times the
        invoke cost; for on-demand classifications, not the live stream). Without ``tta`` in
        the bundle it is a plain classification. The scope check (when the bundle has one)
        runs on the first view every time; ``explain`` adds the activation maps."""
        times = dict(times or {})
        t_start = time.perf_counter() - (times.get("decode", 0) + times.get("preprocess", 0)) / 1e3
        members = members and bool(self._members)
        views = tta_views(rgb, self.bundle.tta) if (tta or members) and self.bundle.tta else [rgb]
        member_views = []
        if members:  # resizing for members of another size is preprocessing
            t_views = time.perf_counter()
            member_views = self._member_views(views, image)
            times["preprocess"] = times.get("preprocess", 0.0) + (
                time.perf_counter() - t_views) * 1e3
        outputs = []
        notes: list[str] = []
        taps: list[np.ndarray] = []
        tap_details: list[dict[str, Any]] = []
        with self._lock:
            t0 = time.perf_counter()
            for i, view in enumerate(views):
                (raw, got), why = self._invoke(view, taps=i == 0)
                notes += why
                outputs.append((raw, self.backend.output_detail, self._bias))
                if i == 0:  # the first view's feature maps, as the model returned them
                    taps = got
                    tap_details = [self.backend.tap_details[j] for j in self._taps]
            for member, inputs in member_views:
                for view in inputs:
                    outputs.append((member.backend.invoke(member.adapter(view)),
                                    member.backend.output_detail, member.bias))
            t1 = time.perf_counter()
            backend_name = self.backend.name
        kind = self.bundle.output_kind
        each = [
            postprocess.to_probabilities(postprocess.dequantize(r, d), kind, bias)
            for r, d, bias in outputs
        ]
        probs = each[0] if len(each) == 1 else np.asarray(
            np.mean(np.stack(each), axis=0, dtype=np.float32))
        labels = self.bundle.labels
        best = postprocess.top_k(probs, labels, top_k)
        groups = postprocess.group_scores(probs, labels, self.bundle.label_groups)
        # A mean of several outputs (views, members) is judged by the threshold chosen on such
        # means; one output (the live stream: the first model, one view) by the plain one.
        decision = postprocess.decide(groups, self.bundle.decision, tta=len(outputs) > 1)
        scope = self.bundle.scope
        t2 = time.perf_counter()
        scope_result, cam = None, None
        if scope is not None and taps:
            scope_result = scope.check(
                [pooled_tap(t, d) for t, d in zip(taps, tap_details, strict=True)])
            if not scope_result["in_scope"]:
                decision = postprocess.out_of_scope(decision, self.bundle.scope_texts)
        t3 = time.perf_counter()
        if explain and scope is not None and taps:
            fmap = dequantize_map(taps[scope.cam_tap], tap_details[scope.cam_tap])
            cam = self._explain(scope, fmap, each[0], labels.index(best[0][0]))
        t4 = time.perf_counter()
        times.update(invoke=(t1 - t0) * 1e3, postprocess=(t2 - t1) * 1e3)
        if scope_result is not None:
            times["scope"] = (t3 - t2) * 1e3
        if cam is not None:
            times["map"] = (t4 - t3) * 1e3
        t2 = t4
        times["total"] = (t2 - t_start) * 1e3
        return Result(
            label=best[0][0],
            score=best[0][1],
            probabilities=dict(zip(labels, probs.tolist(), strict=True)),
            top_k=best,
            groups=groups,
            decision=decision,
            backend=backend_name,
            timings_ms={k: round(v, 3) for k, v in times.items()},
            model=f"{self.bundle.name} {self.bundle.version}",
            image=name,
            notes=notes,
            views=len(outputs),
            scope=scope_result,
            map=cam,
        )

    def _member_views(
        self, views: list[np.ndarray], image: Image.Image | np.ndarray | None
    ) -> list[tuple[Member, list[np.ndarray]]]:
        """Each member's views: the first model's ``views`` where its input is the same size,
        else those of ``image`` resized to its own size (once per size)."""
        by_size = {self.adapter.size: views}
        for member in self._members:
            if member.size in by_size:
                continue
            if image is None:
                raise ValueError(
                    f"member {member.backend.artifact.path.name} takes {member.size[0]}×"
                    f"{member.size[1]}: pass the decoded image (image=...) to resize it from")
            small = self._to_size(image, member.size)
            by_size[member.size] = tta_views(small, self.bundle.tta) if self.bundle.tta \
                else [small]
        return [(m, by_size[m.size]) for m in self._members]

    def _explain(self, scope: ScopeModel, fmap: np.ndarray, probs: np.ndarray,
                 cls: int) -> dict[str, Any] | None:
        """Activation maps for the top class and the decision group, on the first view."""
        rule = self.bundle.decision
        group = None
        if rule:
            members = set(self.bundle.label_groups.get(rule["group"], []))
            group = [i for i, lab in enumerate(self.bundle.labels) if lab in members]
        maps = scope.activation_maps(fmap, probs, cls, group)
        if maps is None:
            return None
        out: dict[str, Any] = {"size": maps["size"], "label": self.bundle.labels[cls]}
        out["class"] = np.round(maps["class"], 4).tolist()
        if "group" in maps and rule:
            out["group"] = np.round(maps["group"], 4).tolist()
            out["group_name"] = rule["group"]
        return out

    def close(self) -> None:
        """Free the interpreter (and an Edge TPU); waits for an inference in progress."""
        with self._lock:
            self.backend.close()
            for member in self._members:
                member.backend.close()
