"""Do two runs of `edge classify --json` give the same answers?

The arm64 test classifies the bundles' samples on the emulated Pi and on this x86 machine and
compares them here: per image the label, the decision and the scope verdict must be equal and every
probability within one int8 step (1/256) of the other side. Stdlib only: it runs on either side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

PROBABILITY_TOLERANCE = 1 / 256


@dataclass
class Agreement:
    """What a comparison found: images compared, images that agreed, the largest probability
    difference and one line per disagreement."""

    compared: int = 0
    agreed: int = 0
    max_difference: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.compared > 0 and not self.problems


def parse_lines(text: str) -> dict[str, dict]:
    """The JSON lines of `edge classify --json`, keyed by image file name (the two sides keep the
    samples in different folders)."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        doc = json.loads(line)
        out[PurePosixPath(doc["image"]).name] = doc
    return out


def _verdict(doc: dict) -> tuple:
    decision = doc.get("decision") or {}
    scope = doc.get("scope") or {}
    verdict = scope.get("verdict") if isinstance(scope, dict) else scope
    return (doc.get("label"), decision.get("outcome"), decision.get("positive"), verdict,
            tuple(doc.get("notes") or ()))


def compare(reference: dict[str, dict], other: dict[str, dict],
            tolerance: float = PROBABILITY_TOLERANCE) -> Agreement:
    """Compare `other` (the Pi) against `reference` (x86), image by image."""
    found = Agreement()
    for name in sorted(set(reference) | set(other)):
        if name not in other:
            found.problems.append(f"{name}: missing on the emulated Pi")
            continue
        if name not in reference:
            found.problems.append(f"{name}: only on the emulated Pi")
            continue
        found.compared += 1
        ref, got = reference[name], other[name]
        bad = []
        if _verdict(ref) != _verdict(got):
            bad.append(f"answer {_verdict(got)} != x86 {_verdict(ref)}")
        ref_p, got_p = ref.get("probabilities", {}), got.get("probabilities", {})
        if set(ref_p) != set(got_p):
            bad.append(f"labels {sorted(got_p)} != x86 {sorted(ref_p)}")
        for label in set(ref_p) & set(got_p):
            diff = abs(float(ref_p[label]) - float(got_p[label]))
            found.max_difference = max(found.max_difference, diff)
            if diff > tolerance:
                bad.append(f"p({label}) {got_p[label]:.4f} vs x86 {ref_p[label]:.4f}")
        if bad:
            found.problems.append(f"{name}: " + "; ".join(bad))
        else:
            found.agreed += 1
    return found
