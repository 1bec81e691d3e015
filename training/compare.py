"""Which model to ship: candidates scored against the shipped bundle on the validation split,
as a capture classifies, with a paired lesion-level bootstrap of the difference.

The score is the one early stopping and every shipping decision use: the mean of accuracy,
balanced accuracy and the decision group's ROC AUC. Validation has about 1,300 images from
about 1,000 lesions, so a few thousandths either way is noise: the bootstrap says how often a
candidate's edge survives resampling the lesions, which a single figure cannot. A candidate
``A+B`` is the mean of bundles A and B, each classified as a capture (its own views, members
and input size): the ensemble ``python -m training ensemble`` would build, before building it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from edge.errors import BundleError
from edge.inference.bundle import Bundle, load_bundle

from .datasets import Sample
from .evaluate import group_indices, predict
from .metrics import headline, lesion_resamples, selection_score

log = logging.getLogger(__name__)


def capture_probs(bundle: Bundle, samples: list[Sample], cache: Path | None = None
                  ) -> np.ndarray:
    """(N, classes) probabilities of a bundle as a capture gives them (every view, every
    member), kept in ``cache`` under the digest of the manifest and of the image list."""
    assert bundle.root is not None
    key = hashlib.sha256((bundle.root / "manifest.json").read_bytes()
                         + "\n".join(str(s.path) for s in samples).encode()).hexdigest()[:16]
    path = cache / f"{bundle.name}-{bundle.version}-{key}.npy" if cache else None
    if path is not None and path.is_file():
        return np.load(path)
    art = bundle.cpu_artifact()
    if art is None:
        raise BundleError(f"{bundle.root} has no CPU artifact to classify with")
    probs, _ = predict(bundle, art.kind, samples, desc=f"{bundle.name} {bundle.version}",
                       tta=bool(bundle.tta), members=bool(bundle.members))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, probs)
    return probs


class _Probabilities:
    """Each bundle of a comparison loaded and classified once, however many candidates name
    it (the baseline included), with the baseline's labels or refused."""

    def __init__(self, labels: list[str], samples: list[Sample], cache: Path | None) -> None:
        self.labels, self.samples, self.cache = labels, samples, cache
        self._done: dict[Path, np.ndarray] = {}

    def of(self, name: str | Path) -> np.ndarray:
        key = Path(name).resolve()
        if key not in self._done:
            bundle = load_bundle(name)
            if bundle.labels != self.labels:
                raise BundleError(f"{name}: labels {bundle.labels} differ from {self.labels}",
                                  "a candidate is compared on the baseline's labels")
            self._done[key] = capture_probs(bundle, self.samples, self.cache)
        return self._done[key]

    def candidate(self, spec: str) -> np.ndarray:
        """One bundle, or the mean of several joined by ``+``."""
        return np.mean([self.of(name) for name in spec.split("+")], axis=0)


def paired_bootstrap(y: np.ndarray, groups: np.ndarray, base: np.ndarray, cand: np.ndarray,
                     group_idx: list[int], n_boot: int = 1000, seed: int = 0) -> dict:
    """The candidate's score, the baseline's, their difference and its 95 % interval over
    lesion-level resamples (both judged on the same resample), and the share of resamples in
    which the candidate scores higher (of the resamples that hold both sides of the
    decision group)."""
    diffs = np.array([selection_score(headline(y[pick], cand[pick], group_idx))
                      - selection_score(headline(y[pick], base[pick], group_idx))
                      for pick in lesion_resamples(groups, n_boot, seed)])
    # A resample without a positive (or a negative) image has no AUC: it cannot judge.
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        raise ValueError("no lesion resample holds both classes of the decision group")
    got, was = headline(y, cand, group_idx), headline(y, base, group_idx)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return {**{k: round(v, 4) for k, v in got.items()},
            "score": round(selection_score(got), 4), "baseline": round(selection_score(was), 4),
            "difference": round(selection_score(got) - selection_score(was), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "better_share": round(float((diffs > 0).mean()), 3), "resamples": len(diffs)}


def compare(baseline: Path, candidates: list[str], samples: list[Sample], n_boot: int = 1000,
            cache: Path | None = None) -> dict:
    """Each candidate against ``baseline`` on ``samples`` (the validation split)."""
    first = load_bundle(baseline)
    y = np.array([first.labels.index(s.label) for s in samples])
    groups = np.array([s.group for s in samples])
    gidx = group_indices(first)
    probs = _Probabilities(first.labels, samples, cache)
    base = probs.of(baseline)
    return {"baseline": str(baseline), "n": len(samples),
            "lesions": int(len(np.unique(groups))),
            "baseline_figures": {k: round(v, 4) for k, v in headline(y, base, gidx).items()},
            "candidates": {spec: paired_bootstrap(y, groups, base, probs.candidate(spec), gidx,
                                                  n_boot) for spec in candidates}}
