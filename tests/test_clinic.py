"""Results to a clinic's systems: fields pushed to a real Orthanc (Debian's orthanc and
orthanc-dicomweb, loopback) through the outbox, found again by QIDO-RS with the right
patient/study/series structure and SOP classes; the USB export read back by pydicom; the FHIR
bundle validated by fhir.resources; a destination that is down costs classification nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import require_module
from tests.daemon_helpers import Client, eventually
from tests.servers import Orthanc
from tests.test_profiles import BLOOD, ROOT, SKIN, start, stop, write_config

require_module("pydicom", "DICOM export (the clinic extra)")
require_module("dicomweb_client", "DICOMweb push (the clinic extra)")
require_module("fhir", "FHIR export (the clinic extra)")

VL_MICROSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.2"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


PACS_USER = ("kit-12", "pacs-pass-1")


def clinic_config(tmp_path: Path, stow_url: str) -> Path:
    return write_config(tmp_path, extra=f"""
[kit]
id = "kit-12"
[outbox]
retry_max_s = 2.0
[dicom]
stow_url = "{stow_url}"
username = "{PACS_USER[0]}"
password = "{PACS_USER[1]}"
institution = "District Hospital Lab"
timeout_s = 10.0
""")


def outbox(client: Client, destination: str) -> dict:
    return client.get_json("/api/status")[1]["outbox"][destination]


def test_samples_reach_the_pacs_after_it_comes_up_and_export_the_same(tmp_path):
    """The PACS requires a login (HTTP basic, as Orthanc's RegisteredUsers)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    pacs = Orthanc(tmp_path / "orthanc", users=dict([PACS_USER]))
    config = clinic_config(tmp_path, pacs.dicomweb)
    proc, base = start(tmp_path, config)  # the PACS is not up yet
    try:
        client = Client(base)
        blood = sorted((BLOOD / "samples").glob("*.jpg"))
        smear = [client.upload(p.read_bytes(), sample_code="SMEAR-9")[1]["id"] for p in blood[:2]]
        assert client.post_json("/api/profile", {"profile": "skin"})[0] == 200
        lesion = client.upload(sorted((SKIN / "samples").glob("*.jpg"))[0].read_bytes(),
                               sample_code="LESION-4")[1]["id"]
        # A smear field in the lesion's sample: out of scope for the skin model.
        status, odd = client.upload(blood[1].read_bytes(), sample_code="LESION-4")
        assert status == 201 and odd["scope"]["in_scope"] is False
        client.upload(blood[0].read_bytes())  # no sample code: nothing for a PACS
        eventually(lambda: outbox(client, "dicom")["failed"] >= 1, 20,
                   lambda: outbox(client, "dicom"))
        waiting = outbox(client, "dicom")
        assert waiting["queued"] == 4 and not waiting["connected"]
        pacs.start()
        eventually(lambda: outbox(client, "dicom")["queued"] == 0, 60,
                   lambda: outbox(client, "dicom"))
        done = outbox(client, "dicom")
        assert done["delivered"] == 4 and done["dropped"] == 0

        session = requests.Session()
        session.auth = PACS_USER
        web = DICOMwebClient(pacs.dicomweb, session=session)
        assert requests.get(pacs.dicomweb + "/studies", timeout=10).status_code == 401
        for code, ids, sop_class, modality in (("SMEAR-9", smear, VL_MICROSCOPIC, "GM"),
                                               ("LESION-4", [lesion, odd["id"]],
                                                VL_PHOTOGRAPHIC, "XC")):
            studies = web.search_for_studies(search_filters={"PatientID": code})
            assert len(studies) == 1
            study_uid = studies[0]["0020000D"]["Value"][0]
            series = web.search_for_series(study_uid)
            by_modality = {s["00080060"]["Value"][0]: s for s in series}
            assert set(by_modality) == {modality, "SR"}
            instances = web.search_for_instances(study_uid)
            classes = sorted(i["00080016"]["Value"][0] for i in instances)
            assert classes == sorted([sop_class] * len(ids) + [COMPREHENSIVE_SR] * len(ids))
            if code == "LESION-4":  # the PACS holds the out-of-scope field's SR as such
                reports = [web.retrieve_instance(study_uid, i["0020000E"]["Value"][0],
                                                 i["00080018"]["Value"][0])
                           for i in instances if i["00080016"]["Value"][0] == COMPREHENSIVE_SR]
                findings = [str(r) for r in reports]
                assert sum("out of scope" in f for f in findings) == 1, findings

        # The same sample exported for a USB stick: the very objects the PACS has.
        out = tmp_path / "usb"
        subprocess.run([sys.executable, "-m", "edge", "export", "dicom", "--sample", "SMEAR-9",
                        "--out", str(out), "--config", str(config)],
                       check=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=120)
        check_exported(out, web, smear)
    finally:
        stop(proc)
        pacs.stop()


def check_exported(out: Path, web, ids: list[int]) -> None:
    import pydicom

    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2 * len(ids)
    images = [pydicom.dcmread(f) for f in files if f.name.endswith("-image.dcm")]
    reports = [pydicom.dcmread(f) for f in files if f.name.endswith("-report.dcm")]
    assert len(images) == len(reports) == len(ids) >= 1  # the loops below check every one
    study_uids = {ds.StudyInstanceUID for ds in images + reports}
    assert len(study_uids) == 1
    for ds in images:
        assert ds.SOPClassUID == VL_MICROSCOPIC and ds.PatientID == "SMEAR-9"
        assert ds.InstitutionName == "District Hospital Lab"
        rgb = ds.pixel_array  # the JPEG decodes
        assert rgb.shape == (ds.Rows, ds.Columns, 3)
        # The PACS holds this very instance (same UIDs: a resend replaces, never duplicates).
        assert web.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                              ds.SOPInstanceUID)
    for sr in reports:
        assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.VerificationFlag == "UNVERIFIED"
        texts = [item.TextValue for item in sr.ContentSequence if "TextValue" in item]
        assert "blood-smear" in texts and any("not a diagnosis" in t for t in texts)
        ref = [item for item in sr.ContentSequence if item.ValueType == "IMAGE"][0]
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in {
            ds.SOPInstanceUID for ds in images}


def test_fhir_bundle_of_a_sample_validates(tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    config = write_config(tmp_path, extra='[kit]\nid = "kit-3"\n')
    proc, base = start(tmp_path, config)
    try:
        client = Client(base)
        for p in sorted((BLOOD / "samples").glob("*.jpg"))[:3]:
            assert client.upload(p.read_bytes(), sample_code="SMEAR-5")[0] == 201
        with client.opener.open(base + "/api/samples/SMEAR-5/fhir", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/fhir+json")
            doc = json.loads(r.read())
        status, _ = client.get_json("/api/samples")
        assert status == 200
    finally:
        stop(proc)
    bundle = Bundle.model_validate(doc)
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert kinds == ["DiagnosticReport"] + ["Observation"] * 3
    report = bundle.entry[0].resource
    assert report.status == "preliminary" and report.identifier[0].value == "SMEAR-5"
    assert {r.reference for r in report.result} == {e.fullUrl for e in bundle.entry[1:]}
    obs = bundle.entry[1].resource
    assert obs.valueCodeableConcept.coding[0].code in {"Benign", "Early", "Pre", "Pro"}
    assert len(obs.component) == 4
    # The command line gives the same bundle, read beside (after) the daemon.
    out = tmp_path / "smear.json"
    subprocess.run([sys.executable, "-m", "edge", "export", "fhir", "--sample", "SMEAR-5",
                    "--out", str(out), "--config", str(config)],
                   check=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert json.loads(out.read_text()) == doc
    # With the data folder alone (no config: no camera to validate), the same bundle: the
    # kit's id comes from the store.
    bare = tmp_path / "bare.json"
    subprocess.run([sys.executable, "-m", "edge", "export", "fhir", "--sample", "SMEAR-5",
                    "--out", str(bare), "--data-dir", str(tmp_path / "data")],
                   check=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert json.loads(bare.read_text()) == doc
    missing = subprocess.run(
        [sys.executable, "-m", "edge", "export", "fhir", "--sample", "NOPE", "--out", "-",
         "--config", str(config)], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no sample NOPE" in missing.stderr


def frames_in_a_window(folder: Path, down: bool) -> int:
    """Frames the daemon classifies in 3 s while 5 uploads are stored (and, with ``down``,
    queued for an MQTT broker and a PACS that are not there)."""
    from tests.daemon_helpers import free_port

    folder.mkdir()
    extra = "[outbox]\nretry_max_s = 1.0\n"
    if down:
        extra += (f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\ntimeout_s = 1.0\n'
                  f'[dicom]\nstow_url = "http://127.0.0.1:{free_port()}/dicom-web"\n')
    config = write_config(folder, extra=extra, fps=30.0)
    config.write_text(config.read_text().replace("store_every_s = 0.0", "store_every_s = 0.2"))
    proc, base = start(folder, config)
    try:
        client = Client(base)
        time.sleep(1.0)
        before = client.get_json("/api/status")[1]["frames_classified"]
        img = sorted((BLOOD / "samples").glob("*.jpg"))[0].read_bytes()
        for _ in range(5):
            assert client.upload(img, sample_code="LOAD-1")[0] == 201
        time.sleep(3.0)
        st = client.get_json("/api/status")[1]
        if down:
            assert st["outbox"]["mqtt"]["queued"] > 5 and st["outbox"]["dicom"]["queued"] == 5
            assert st["outbox"]["mqtt"]["failed"] >= 1
        return st["frames_classified"] - before
    finally:
        stop(proc)


def test_destinations_that_are_down_cost_classification_nothing(tmp_path):
    """Counted, not timed: with both destinations pointing at closed ports the daemon
    classifies as many frames in the same window as with none."""
    without = frames_in_a_window(tmp_path / "none", down=False)
    with_down = frames_in_a_window(tmp_path / "down", down=True)
    assert without > 20
    assert with_down >= 0.8 * without, (with_down, without)


def test_long_sample_codes_get_study_ids_that_do_not_collide():
    from edge.outbound.dicom import short_id

    a = short_id("kit-1", "CLINIC-A-2026-12-001")
    b = short_id("kit-1", "CLINIC-A-2026-12-002")
    assert a != b and len(a) == len(b) == 16
    assert short_id("kit-1", "P-17") == "P-17"  # a code that fits is kept as it is
    assert short_id("kit-1", "X" * 64) == short_id("kit-1", "X" * 64)  # stable for resends
