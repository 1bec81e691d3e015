"""FHIR R4: a sample as a DiagnosticReport with one Observation per field, in a Bundle.

Built and validated with fhir.resources' R4B models (R4B changed nothing in DiagnosticReport,
Observation or Bundle from R4, so the JSON is valid R4). Every resource is ``preliminary``: the
kit's results are unverified screening output until a person confirms them. The sample code is
the report's identifier (the kit knows samples, not patients); ids are derived from the kit's
id and what is stored, so the same sample always gives the same resource ids.
"""

from __future__ import annotations

from typing import Any

from ..daemon.store import Store
from ..inference.bundle import Bundle
from .dicom import DISCLAIMER, BundleFor
from .messages import Gone, iso, stable_uuid, unassessed_reason

SYSTEM = "urn:fieldscope"  # identifier and code system of this kit's own codes


def _id(*parts: object) -> str:
    return str(stable_uuid(*parts))


def _observation(row: dict[str, Any], kit_id: str, bundle: Bundle | None) -> dict[str, Any]:
    names = bundle.manifest.get("label_names", {}) if bundle else {}
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _id("observation", kit_id, row["id"], row["created"]),
        "status": "preliminary",
        "code": {"coding": [{"system": SYSTEM, "code": "field-result",
                             "display": "Screening result of one field"}],
                 "text": f"FieldScope {row.get('model') or ''}".strip()},
        "effectiveDateTime": iso(row["created"]),
        "device": {"display": f"FieldScope kit {kit_id}, model {row.get('model') or '?'}"},
        "note": [{"text": DISCLAIMER}],
        "identifier": [{"system": f"{SYSTEM}:{kit_id}:result", "value": str(row["id"])}],
    }
    if not row["assessable"]:
        obs["dataAbsentReason"] = {"text": unassessed_reason(row)}
        if not row.get("in_scope", True):
            obs["interpretation"] = [{
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                      "v3-ObservationInterpretation",
                            "code": "IND", "display": "Indeterminate"}],
                "text": "out of scope",
            }]
    else:
        obs["valueCodeableConcept"] = {
            "coding": [{"system": f"{SYSTEM}:label", "code": row["label"],
                        "display": names.get(row["label"], row["label"])}],
            "text": names.get(row["label"], row["label"]),
        }
        if row.get("decision_outcome"):
            obs["interpretation"] = [{
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                      "v3-ObservationInterpretation",
                            "code": "POS" if row.get("decision_positive") else "NEG",
                            "display": "Positive" if row.get("decision_positive")
                            else "Negative"}],
                "text": row["decision_outcome"],
            }]
        obs["component"] = [
            {"code": {"coding": [{"system": f"{SYSTEM}:label", "code": label}],
                      "text": f"score of {names.get(label, label)}"},
             "valueQuantity": {"value": round(float(p), 4), "unit": "1",
                               "system": "http://unitsofmeasure.org", "code": "1"}}
            for label, p in (row.get("probabilities") or {}).items()
        ]
    return obs


def sample_bundle(store: Store, code: str, kit_id: str, bundle_for: BundleFor) -> dict[str, Any]:
    """The FHIR Bundle (type collection) of a stored sample, validated; raises Gone."""
    from fhir.resources.R4B.bundle import Bundle as FhirBundle

    summary = store.sample_summary(code)
    if summary is None:
        raise Gone(f"no sample {code}")
    bundle = bundle_for(summary.get("profile"))
    fields = list(reversed(summary["results"]))
    observations = [_observation(r, kit_id, bundle) for r in fields]
    created = store.sample_created(code) or fields[0]["created"]
    report = {
        "resourceType": "DiagnosticReport",
        "id": _id("report", kit_id, code, created),
        "status": "preliminary",
        "identifier": [{"system": f"{SYSTEM}:{kit_id}:sample", "value": code}],
        "code": {"coding": [{"system": SYSTEM, "code": "sample-screening",
                             "display": "FieldScope screening of a sample"}],
                 "text": f"FieldScope screening ({summary.get('profile') or 'kit'})"},
        "effectivePeriod": {"start": iso(fields[0]["created"]), "end": iso(fields[-1]["created"])},
        "issued": iso(max(r["created"] for r in fields)),
        "result": [{"reference": f"urn:uuid:{o['id']}"} for o in observations],
        "conclusion": (
            f"{summary['flagged']} of {summary['fields']} fields flagged"
            + (f", {summary['not_assessable']} not assessable" if summary["not_assessable"]
               else "")
            + (f"; mean score {summary['mean_score']:.2f}, max {summary['max_score']:.2f}"
               if summary["mean_score"] is not None else "")
            + f". {DISCLAIMER}"
        ),
    }
    doc = {
        "resourceType": "Bundle",
        "id": _id("bundle", kit_id, code, created, len(fields)),
        "type": "collection",
        "timestamp": iso(max(r["created"] for r in fields)),
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r}
                  for r in [report, *observations]],
    }
    FhirBundle.model_validate(doc)  # raises pydantic's ValidationError naming the field
    return doc
