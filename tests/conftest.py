"""Shared fixtures: the real data in ../shared, a built fake libedgetpu, a fake host tree."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.paths import shared_dir

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"{path} is missing: set FIELDSCOPE_SHARED to the shared data folder"
        if CI:
            pytest.fail(msg)  # CI has the data: never hide its absence behind a skip
        pytest.skip(msg)
    return path


def require_module(name: str, why: str):
    """Import ``name``; where it is missing, skip (with the reason shown by ``-rs``), except
    in CI, which installs it: there a missing module fails the run instead of hiding tests."""
    try:
        return __import__(name)
    except ImportError:
        if CI:
            pytest.fail(f"{name} is missing in CI: {why}", pytrace=False)
        pytest.skip(f"{name} not installed: {why}", allow_module_level=True)


OPT_IN = "opt-in:"  # the reason of a skip a person chose (FIELDSCOPE_SLOW=1 and the like)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every tool and module is installed: a skip that is not an explicit opt-in hides a
    missing one, so it fails the run (whatever skipped it: a fixture, importorskip, a mark)."""
    outcome = yield
    report = outcome.get_result()
    if not CI or not report.skipped or getattr(report, "wasxfail", None):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if reason.removeprefix("Skipped: ").startswith(OPT_IN):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in CI without an opt-in ({reason}): install what it needs"


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(shared_dir())


@pytest.fixture(scope="session")
def coral(shared: Path) -> Path:
    return _need(shared / "models-ref" / "coral-mobilenet-v2")


@pytest.fixture(scope="session")
def parrot(coral: Path) -> Path:
    return coral / "parrot.jpg"


@pytest.fixture(scope="session")
def coral_bundle(coral: Path, tmp_path_factory) -> Path:
    """A bundle holding Coral's CPU int8 model and its Edge TPU twin."""
    from edge.inference.bundle import write_bundle
    from edge.inference.labels import read_labels

    out = tmp_path_factory.mktemp("bundles") / "coral-mobilenet"
    manifest = {
        "name": "coral-mobilenet",
        "version": "1.0",
        "labels": read_labels(coral / "imagenet_labels.txt"),
        "label_groups": {
            "parrots": [
                "macaw",
                "lorikeet",
                "African grey, African gray, Psittacus erithacus",
                "sulphur-crested cockatoo, Kakatoe galerita, Cacatua galerita",
            ]
        },
        "decision": {
            "group": "parrots",
            "threshold": 0.5,
            "positive": "parrot",
            "negative": "not a parrot",
        },
        "input": {"size": [224, 224], "resize": "center-crop"},
        "output": "probabilities",
        "artifacts": {"int8": {"input_dtype": "uint8"}, "edgetpu": {"input_dtype": "uint8"}},
    }
    return write_bundle(
        out,
        manifest,
        {
            "int8": coral / "mobilenet_v2_1.0_224_quant.tflite",
            "edgetpu": coral / "mobilenet_v2_1.0_224_quant_edgetpu.tflite",
        },
    )


@pytest.fixture(scope="session")
def fake_libedgetpu(tmp_path_factory) -> Path:
    """Compile tests/native/fake_edgetpu_delegate.c into a libedgetpu.so.1 stand-in."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler (cc) is needed to build the fake Edge TPU delegate")
    out = tmp_path_factory.mktemp("libedgetpu") / "libedgetpu.so.1"
    src = ROOT / "tests" / "native" / "fake_edgetpu_delegate.c"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(out), str(src)], check=True
    )
    return out


class FakeLib:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.fake_delegate_last_device.restype = ctypes.c_char_p

    @property
    def prepared(self) -> int:
        return self.lib.fake_delegate_prepared()

    @property
    def created(self) -> int:
        return self.lib.fake_delegate_created()

    @property
    def attempts(self) -> int:
        """Calls to create a delegate, refused ones included."""
        return self.lib.fake_delegate_attempts()

    @property
    def last_device(self) -> str:
        return self.lib.fake_delegate_last_device().decode()


@pytest.fixture
def fake_tpu_lib(fake_libedgetpu: Path, monkeypatch) -> FakeLib:
    monkeypatch.setenv("FIELDSCOPE_EDGETPU_LIB", str(fake_libedgetpu))
    return FakeLib(fake_libedgetpu)


def make_host(root: Path, usb_ids: list[tuple[str, str]] = (), apex: int = 0) -> Path:
    """A fake /sys and /dev tree: USB devices with the given ids, /dev/apex_N nodes."""
    for i, (vid, pid) in enumerate(usb_ids):
        dev = root / "sys/bus/usb/devices" / f"2-{i + 1}"
        dev.mkdir(parents=True)
        (dev / "idVendor").write_text(vid + "\n")
        (dev / "idProduct").write_text(pid + "\n")
    (root / "sys/bus/usb/devices").mkdir(parents=True, exist_ok=True)
    (root / "dev").mkdir(parents=True, exist_ok=True)
    for i in range(apex):
        (root / "dev" / f"apex_{i}").write_text("")
    return root


@pytest.fixture
def host_with_tpu(tmp_path: Path, monkeypatch) -> Path:
    root = make_host(tmp_path / "host", [("1d6b", "0003"), ("18d1", "9302")])
    monkeypatch.setenv("FIELDSCOPE_HOST_ROOT", str(root))
    return root


@pytest.fixture
def host_without_tpu(tmp_path: Path, monkeypatch) -> Path:
    root = make_host(tmp_path / "host", [("1d6b", "0003")])
    monkeypatch.setenv("FIELDSCOPE_HOST_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def blood_bundle() -> Path:
    """The bundled blood-smear model the kit ships (committed under models/)."""
    path = ROOT / "models" / "blood-smear"
    assert (path / "manifest.json").is_file(), "models/blood-smear is part of the project"
    return path


@pytest.fixture(scope="session")
def blood_samples(blood_bundle: Path) -> list[Path]:
    files = sorted((blood_bundle / "samples").glob("*.jpg"))
    assert len(files) >= 4
    return files
