"""DICOM for a clinic's PACS: each field of a sample as an image, with a structured report of
the model's result, one study per sample; pushed by DICOMweb STOW-RS or written to a folder.

- Blood smears (bundle ``imaging = "microscopy"``): VL Microscopic Image, modality GM.
- Skin (``dermoscopy``) and anything else: VL Photographic Image, modality XC.
- The stored JPEG snapshot is carried as it is (JPEG Baseline transfer syntax): no second lossy
  encoding, and LossyImageCompression says it was compressed.
- The report is a Comprehensive SR (highdicom) referencing its image: the model and version,
  the label, the decision and each class's score, marked UNVERIFIED with a comment that it is
  an automated screening result, not a diagnosis.

The kit knows samples, not patients: the sample code is the Patient ID (and the Study ID and
Accession Number, shortened without collisions where it is longer than their 16 characters: see
``short_id``), and the name is left empty for the clinic's systems to reconcile. Every UID is
derived from the kit's id and what is stored (sample, result), so an export and a push of the
same field give the same objects, and a resend replaces rather than duplicates.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..daemon.outbox import Message
from ..daemon.store import Store
from ..destinations.dicom import DicomSection
from ..inference.bundle import Bundle
from .messages import Gone, Refused, short_reason, stable_uuid, unassessed_reason
from .sender import Destination

# highdicom logs each module it copies at INFO: not the daemon's business.
logging.getLogger("highdicom").setLevel(logging.WARNING)
MANUFACTURER = "FieldScope"
DISCLAIMER = ("Unverified output of an automated screening model (FieldScope); not a "
              "diagnosis. Confirm by standard review.")
IOD = {  # bundle "imaging" → (SOP class, modality)
    "microscopy": ("1.2.840.10008.5.1.4.1.1.77.1.2", "GM"),  # VL Microscopic Image
    "dermoscopy": ("1.2.840.10008.5.1.4.1.1.77.1.4", "XC"),  # VL Photographic Image
    "photography": ("1.2.840.10008.5.1.4.1.1.77.1.4", "XC"),
}


def uid(*parts: object) -> str:
    """A UID derived from ``parts``: the same inputs, the same UID. The 2.25 form (a UUID as an
    integer, PS3.5 B.2), from a name-based UUID (pydicom's generate_uid ignores its entropy
    sources without a root of our own)."""
    return f"2.25.{stable_uuid(*parts).int}"


@dataclass(frozen=True)
class Study:
    kit_id: str
    code: str
    created: float  # when the sample was made
    institution: str = ""

    @property
    def uid(self) -> str:
        return uid("study", self.kit_id, self.code, repr(self.created))


def short_id(kit_id: str, code: str) -> str:
    """A sample code for DICOM's 16-character Study ID and Accession Number: the code itself
    when it fits, else its start and a digest of the whole (with the kit), so that
    CLINIC-A-2026-12-001 and CLINIC-A-2026-12-002 never share one. The full code is the
    Patient ID (64 characters)."""
    if len(code) <= 16:
        return code
    import base64
    import hashlib

    digest = hashlib.sha256(f"{kit_id}:{code}".encode()).digest()
    return f"{code[:7]}-{base64.b32encode(digest).decode()[:8]}"


def _dt(t: float) -> tuple[str, str]:
    return time.strftime("%Y%m%d", time.gmtime(t)), time.strftime("%H%M%S", time.gmtime(t))


def _common(ds, study: Study) -> None:
    """Patient, study and equipment attributes shared by the image and the report."""
    date, tm = _dt(study.created)
    ds.PatientName = ""
    ds.PatientID = study.code
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study.uid
    ds.StudyDate, ds.StudyTime = date, tm
    ds.StudyID = ds.AccessionNumber = short_id(study.kit_id, study.code)
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "FieldScope screening"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "FieldScope kit"
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = study.kit_id
    ds.InstitutionName = study.institution
    ds.TimezoneOffsetFromUTC = "+0000"


def field_image(row: dict[str, Any], jpeg: bytes, study: Study, imaging: str):
    """A stored field as a VL Microscopic or VL Photographic image (its JPEG as it is)."""
    from PIL import Image, UnidentifiedImageError
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, JPEGBaseline8Bit

    sop_class, modality = IOD.get(imaging, IOD["photography"])
    try:
        im = Image.open(io.BytesIO(jpeg))
    except UnidentifiedImageError as exc:  # damaged on the card: no retry can mend it
        raise Refused(f"snapshot of result {row['id']} is unreadable (damaged?)") from exc
    with im:
        if im.format != "JPEG" or im.mode != "RGB":
            raise Refused(f"snapshot of result {row['id']} is not an RGB JPEG")
        width, height = im.size
    sop_uid = uid("image", study.kit_id, row["id"], repr(row["created"]))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    _common(ds, study)
    date, tm = _dt(row["created"])
    ds.Modality = modality
    ds.SeriesInstanceUID = uid("series", study.uid, modality, row.get("profile") or "")
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Fields ({row.get('profile') or 'FieldScope'})"
    ds.InstanceNumber = int(row["id"])
    ds.ContentDate, ds.ContentTime = date, tm
    ds.AcquisitionDateTime = date + tm
    ds.ImageType = ["DERIVED", "PRIMARY"]  # resized by the kit from the camera's frame
    ds.ImageComments = f"{row['mode']} · {row.get('source') or ''}"[:10240]
    ds.AcquisitionContextSequence = []
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"  # what a baseline JPEG from Pillow holds
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = height, width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenDescriptionSequence = []
    return ds


def field_report(row: dict[str, Any], image, study: Study, bundle: Bundle | None):
    """The model's result on one field as a Comprehensive SR referencing the image."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    names = (bundle.manifest.get("label_names", {}) if bundle else {})
    model_name, _, version = (row.get("model") or "unknown").partition(" ")
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(codes.DCM.AlgorithmName, model_name, relationship_type=contains),
        hd.sr.TextContentItem(codes.DCM.AlgorithmVersion, version or "unknown",
                              relationship_type=contains),
        hd.sr.TextContentItem(
            codes.DCM.Finding,
            (f"{row['label']} ({row['score']:.3f})"
             + (f"; decision: {row['decision_outcome']}" if row.get("decision_outcome") else "")
             if row["assessable"] else unassessed_reason(row)),
            relationship_type=contains),
    ]
    if row.get("group_score") is not None:
        items.append(hd.sr.NumContentItem(
            hd.sr.CodedConcept("decision_score", "99FIELDSCOPE",
                               f"Score of the decision group ({row.get('decision_outcome')})"),
            float(row["group_score"]), hd.sr.CodedConcept("1", "UCUM", "no units"),
            relationship_type=contains))
    for label, p in (row.get("probabilities") or {}).items():
        items.append(hd.sr.NumContentItem(
            hd.sr.CodedConcept(label[:16], "99FIELDSCOPE", names.get(label, label)[:64]),
            float(p), hd.sr.CodedConcept("1", "UCUM", "no units"), relationship_type=contains))
    items.append(hd.sr.TextContentItem(codes.DCM.Comment, DISCLAIMER, relationship_type=contains))
    items.append(hd.sr.ImageContentItem(
        codes.DCM.SourceImage, image.SOPClassUID, image.SOPInstanceUID,
        relationship_type=contains))
    root = hd.sr.ContainerContentItem(codes.DCM.Findings)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[image],
        content=root,
        series_instance_uid=uid("series", study.uid, "SR"),
        series_number=2,
        sop_instance_uid=uid("report", study.kit_id, row["id"], repr(row["created"])),
        instance_number=int(row["id"]),
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=study.institution or None,
    )
    sr.SeriesDescription = "FieldScope results (unverified)"
    sr.SoftwareVersions = __version__
    sr.DeviceSerialNumber = study.kit_id
    return sr


BundleFor = Callable[[str | None], Bundle | None]


def field_objects(store: Store, row: dict[str, Any] | None, kit_id: str, institution: str,
                  bundle_for: BundleFor) -> list:
    """The image and the report of one stored field, its ``row`` (Gone when it is no longer
    stored)."""
    if row is None:
        raise Gone("the result is no longer stored")
    result_id = row["id"]
    code = row.get("sample_code")
    created = store.sample_created(code) if code else None
    snap = store.snapshot_path(row["snapshot"]) if row.get("snapshot") else None
    if not code or created is None or snap is None:
        raise Gone(f"result {result_id} has no sample or no stored image")
    study = Study(kit_id, code, created, institution)
    bundle = bundle_for(row.get("profile"))
    image = field_image(row, snap.read_bytes(), study, bundle.imaging if bundle else "")
    return [image, field_report(row, image, study, bundle)]


def export_sample(store: Store, code: str, out: Path, kit_id: str, institution: str,
                  bundle_for: BundleFor) -> list[Path]:
    """Write a sample's fields (image + report each) as DICOM files, for a USB stick."""
    summary = store.sample_summary(code)
    if summary is None:
        raise Gone(f"no sample {code}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for row in reversed(summary["results"]):
        if not row.get("snapshot"):
            continue
        for ds in field_objects(store, row, kit_id, institution, bundle_for):
            kind = "report" if ds.Modality == "SR" else "image"
            path = out / f"{code}-{row['id']:06d}-{kind}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written


class StowDestination(Destination):
    """A PACS through DICOMweb STOW-RS (dicomweb-client): both objects of a field in one
    request; delivered when the server answers without a failed instance."""

    name = "dicom"

    def __init__(self, cfg: DicomSection, kit_id: str, store: Store,
                 bundle_for: BundleFor) -> None:
        self.cfg = cfg
        self.kit_id = kit_id
        self.store = store
        self.bundle_for = bundle_for
        self._client: Any = None  # a DICOMwebClient once connected

    def describe(self) -> str:
        return f"DICOMweb {self.cfg.stow_url}"

    def open(self) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if self.cfg.username:
            session.auth = (self.cfg.username, self.cfg.password)
        if self.cfg.ca_file:
            session.verify = self.cfg.ca_file
        # requests has no session-wide timeout: each call gets this one unless it names its own.
        session.request = _with_timeout(  # type: ignore[method-assign]
            session.request, self.cfg.timeout_s)
        # Reach the server before building any object: a PACS that is down costs one refused
        # connection per try, not the CPU of making images and reports again (any HTTP answer,
        # even an error, means it is there; STOW-RS then says what it thinks of the objects).
        try:
            session.get(self.cfg.stow_url.rstrip("/") + "/studies", params={"limit": "1"})
        except requests.RequestException as exc:
            raise ConnectionError(short_reason(exc)) from exc
        client = DICOMwebClient(url=self.cfg.stow_url.rstrip("/"), session=session)
        # Its own retries (exponential, minutes) would hold the sender; the outbox retries.
        client.set_http_retry_params(retry=False)
        self._client = client

    def send(self, msg: Message) -> None:
        import requests

        if msg.result_id is None:
            raise Refused("a DICOM message needs a result")
        objects = field_objects(self.store, self.store.get(msg.result_id), self.kit_id,
                                self.cfg.institution, self.bundle_for)
        try:
            answer = self._client.store_instances(objects)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if 400 <= status < 500 and status not in (401, 403, 408, 429):
                raise Refused(f"the PACS refused the objects: HTTP {status}") from exc
            raise
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = ", ".join(str(getattr(item, "FailureReason", "?")) for item in failed)
            raise Refused(f"the PACS refused {len(failed)} object(s): reason {reasons}")

    def close(self) -> None:
        self._client = None


def _with_timeout(request, timeout: float):
    def call(method, url, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return request(method, url, **kwargs)

    return call
