"""The Raspberry Pi path, run for real on an emulated arm64 Raspberry Pi OS (`make test-arm64`).

As a user would: the offline bundle is made with scripts/make-wheelhouse.sh (aarch64 wheels for
Python 3.11); a Debian 12 arm64 root (tests/arm64/root.sh, cached) gets a copy of this checkout
and the bundle; scripts/install.sh --offline installs the kit there with no network at all (a
network namespace of its own). Then, for each emulated CPU (QEMU_CPU: the Pi 4's Cortex-A72, the
Pi 3's and Zero 2 W's Cortex-A53, the Pi 5's Cortex-A76), with that Pi's /proc/cpuinfo:

- the installed daemon starts as the installed unit says (its user, working folder, environment
  and ExecStart with the installed config), replaying the bundled samples in place of the
  camera; /api/health must answer ok, an upload and a capture must be stored;
- the installed `edge classify --json` classifies both bundles' samples, with XNNPACK confirmed
  by its log line, and must agree with this machine's answers (labels, decisions, scope verdicts
  equal; probabilities within 1/256).

Three traps of qemu-user 7.2 (docs/reliability.md) are avoided on purpose: its default CPU `max`
(SVE) computes wrong answers, LiteRT's cpuinfo crashes on the host's x86 /proc/cpuinfo, and
without /sys XNNPACK is skipped without a word. Needs root, debootstrap, qemu-user-static with
binfmt (update-binfmts --enable qemu-aarch64) and zstd; .ci/run installs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.arm64.compare import Agreement, compare, parse_lines  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
XNNPACK_LINE = "Created TensorFlow Lite XNNPACK delegate"
PREFIX = "/opt/fieldscope"


@dataclass(frozen=True)
class Pi:
    """A Raspberry Pi as its kernel shows it in /proc/cpuinfo (what LiteRT's cpuinfo reads)."""

    qemu_cpu: str
    model: str
    part: str
    variant: str
    revision: str
    bogomips: str
    features: str
    board_revision: str

    def cpuinfo(self) -> str:
        cores = "".join(
            f"processor\t: {n}\nBogoMIPS\t: {self.bogomips}\nFeatures\t: {self.features}\n"
            f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {self.variant}\n"
            f"CPU part\t: {self.part}\nCPU revision\t: {self.revision}\n\n"
            for n in range(4))
        return (cores + f"Revision\t: {self.board_revision}\nSerial\t\t: 100000000000f1e1\n"
                f"Model\t\t: {self.model}\n")


PIS = {
    "cortex-a72": Pi("cortex-a72", "Raspberry Pi 4 Model B Rev 1.4", "0xd08", "0x0", "3",
                     "108.00", "fp asimd evtstrm crc32 cpuid", "d03114"),
    "cortex-a53": Pi("cortex-a53", "Raspberry Pi 3 Model B Rev 1.2", "0xd03", "0x0", "4",
                     "38.40", "fp asimd evtstrm crc32 cpuid", "a02082"),
    "cortex-a76": Pi("cortex-a76", "Raspberry Pi 5 Model B Rev 1.0", "0xd0b", "0x4", "1",
                     "108.00", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
                     "cpuid asimdrdm lrcpc dcpop asimddp", "d04170"),
}
# qemu's default CPU (SVE): LiteRT computes wrong answers on it, so `--cpu max` shows the test
# going red on a real difference (never a default).
PIS["max"] = Pi("max", "Raspberry Pi 4 Model B Rev 1.4 (qemu's max CPU)", "0xd08", "0x0", "3",
                "108.00", "fp asimd evtstrm crc32 cpuid", "d03114")


def log(msg: str) -> None:
    print(f"[arm64 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def checkout_files() -> list[str]:
    """The files a user's copy of this checkout holds (tracked and new, not ignored)."""
    out = sh(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
             capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and (REPO / p).is_file()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Root(contextlib.ExitStack):
    """An unpacked arm64 root with /proc (a Pi's cpuinfo over it), /sys and /dev mounted;
    everything is unmounted and removed on exit, also after a failure."""

    def __init__(self, tarball: Path, workdir: Path):
        super().__init__()
        self.path = workdir / "root"
        self.path.mkdir()
        self.callback(shutil.rmtree, self.path, ignore_errors=True)
        sh(["tar", "-C", str(self.path), "-I", "zstd", "-xf", str(tarball)])
        self.cpuinfo = workdir / "cpuinfo"
        self._mounted: list[Path] = []
        self.callback(self._unmount_all)

    def _mount(self, *args: str, target: Path) -> None:
        sh(["mount", *args, str(target)])
        self._mounted.append(target)

    def _unmount_all(self) -> None:
        for target in reversed(self._mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)
        self._mounted.clear()

    def mount_system(self) -> None:
        self._mount("-t", "proc", "proc", target=self.path / "proc")
        self._mount("-t", "sysfs", "sysfs", target=self.path / "sys")
        self._mount("--bind", "/dev", target=self.path / "dev")
        self.cpuinfo.write_text(PIS["cortex-a72"].cpuinfo())
        self._mount("--bind", str(self.cpuinfo), target=self.path / "proc/cpuinfo")

    def as_pi(self, pi: Pi) -> None:
        """Show this Pi's /proc/cpuinfo (the bind mount follows the file's contents)."""
        self.cpuinfo.write_text(pi.cpuinfo())

    def chroot(self, argv: list[str], pi: Pi, *, offline: bool = False,
               env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
        base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8", "HOME": "/root", "QEMU_CPU": pi.qemu_cpu}
        cmd = ["chroot", str(self.path), *argv]
        if offline:
            cmd = ["unshare", "--net", *cmd]
        return sh(cmd, env={**base, **(env or {})}, **kw)


def unit_settings(unit_text: str) -> dict[str, list[str]]:
    """The [Service] lines of a systemd unit, as key -> values (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def service_env(root: Path, unit: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in unit.get("Environment", []):
        for pair in shlex.split(item):
            key, value = pair.split("=", 1)
            env[key] = value
    for path in unit.get("EnvironmentFile", []):
        optional = path.startswith("-")
        file = root / path.lstrip("-").lstrip("/")
        if not file.exists():
            if optional:
                continue
            raise SystemExit(f"the unit's EnvironmentFile {path} is missing")
        for line in file.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip()
    return env


def http(url: str, *, data: bytes | None = None, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"{}")
        except ValueError:
            return exc.code, {"body": body[:200].decode(errors="replace")}


def multipart(field: str, filename: str, payload: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    body += payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def serve_checks(root: Root, pi: Pi, token: str) -> dict:
    """Start the installed daemon as its unit would, then health, an upload and a capture."""
    unit_file = root.path / "etc/systemd/system/fieldscope.service"
    unit = unit_settings(unit_file.read_text())
    env = service_env(root.path, unit)
    user = unit["User"][0]
    workdir = unit.get("WorkingDirectory", ["/"])[0]
    port = free_port()
    samples = f"{PREFIX}/models/blood-smear/samples"
    argv = [*shlex.split(unit["ExecStart"][0]), "--source", f"replay:{samples}",
            "--port", str(port)]
    inner = f"cd {shlex.quote(workdir)} && exec {shlex.join(argv)}"
    # setpriv execs (runuser would stay as a parent and turn SIGTERM into its own exit).
    cmd = ["chroot", str(root.path), "setpriv", f"--reuid={user}", f"--regid={user}",
           "--init-groups", "env", "-i",
           "PATH=/usr/bin:/bin", "LANG=C.UTF-8", f"QEMU_CPU={pi.qemu_cpu}",
           *[f"{k}={v}" for k, v in env.items()], "sh", "-c", inner]
    log(f"{pi.qemu_cpu}: starting the installed daemon as {user}: {shlex.join(argv)}")
    logfile = root.path.parent / f"serve-{pi.qemu_cpu}.log"
    started = time.monotonic()
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": os.environ["PATH"], "QEMU_CPU": pi.qemu_cpu})
    base = f"http://127.0.0.1:{port}"
    found: dict = {}
    try:
        deadline = time.monotonic() + 300
        health: dict = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({proc.returncode}):\n"
                                     + logfile.read_text()[-3000:])
            try:
                status, health = http(base + "/api/health", timeout=10)
                if status == 200 and health.get("status") == "ok":
                    break
            except (OSError, ValueError):
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"/api/health never answered ok: {health}\n"
                                 + logfile.read_text()[-3000:])
        found["health_s"] = round(time.monotonic() - started, 1)
        auth = {"Authorization": f"Bearer {token}"}
        image = REPO / "models/blood-smear/samples/Benign_WBC-Benign-001.jpg"
        body, ctype = multipart("image", image.name, image.read_bytes())
        status, doc = http(base + "/api/classify", data=body,
                           headers={**auth, "Content-Type": ctype})
        assert status == 201 and doc.get("label"), f"upload: {status} {doc}"
        found["upload"] = doc["label"]
        status, doc = http(base + "/api/capture", data=b"{}",
                           headers={**auth, "Content-Type": "application/json"})
        assert status == 201 and doc.get("label"), f"capture: {status} {doc}"
        found["capture"] = doc["label"]
        status, listing = http(base + "/api/results", headers=auth)
        assert status == 200, listing
    finally:
        proc.send_signal(signal.SIGTERM)  # as systemd stops it
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"the daemon stopped with {proc.returncode}:\n" \
        + logfile.read_text()[-3000:]
    log(f"{pi.qemu_cpu}: health ok after {found['health_s']} s; upload {found['upload']}, "
        f"capture {found['capture']}; stopped cleanly")
    return found


def bundles() -> list[str]:
    return sorted(p.parent.name for p in (REPO / "models").glob("*/manifest.json"))


def classify_x86(bundle: str, threads: int) -> dict[str, dict]:
    out = sh([sys.executable, "-m", "edge", "classify", "--json", "--threads", str(threads),
              "--model", f"models/{bundle}", f"models/{bundle}/samples"],
             cwd=REPO, capture_output=True, text=True)
    return parse_lines(out.stdout)


def classify_pi(root: Root, pi: Pi, bundle: str, threads: int) -> tuple[dict[str, dict], str]:
    out = root.chroot(["setpriv", "--reuid=fieldscope", "--regid=fieldscope", "--init-groups",
                       f"{PREFIX}/.venv/bin/python", "-m",
                       "edge", "classify", "--json", "--threads", str(threads), "--model",
                       f"{PREFIX}/models/{bundle}", f"{PREFIX}/models/{bundle}/samples"],
                      pi, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise AssertionError(f"{pi.qemu_cpu}: edge classify failed ({out.returncode}):\n"
                             + out.stderr[-3000:])
    return parse_lines(out.stdout), out.stderr


def install(root: Root, wheelhouse: Path) -> float:
    src = root.path / "home/pi/fieldscope"
    for rel in checkout_files():
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    usb = root.path / "media/usb/fieldscope-offline"
    shutil.copytree(wheelhouse, usb)
    started = time.monotonic()
    log("installing with scripts/install.sh --offline (no network in its namespace)")
    root.chroot(["bash", "/home/pi/fieldscope/scripts/install.sh", "--offline",
                 "/media/usb/fieldscope-offline", "--yes"], PIS["cortex-a72"], offline=True)
    took = time.monotonic() - started
    wants = root.path / "etc/systemd/system/multi-user.target.wants/fieldscope.service"
    assert wants.is_symlink(), "install.sh did not enable fieldscope.service"
    assert (root.path / "etc/fieldscope/fieldscope.toml").is_file(), "no installed config"
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="append", choices=sorted(PIS),
                    help="emulated CPU(s) (default: all three)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", type=Path, default=REPO / "dist/arm64-report.json")
    args = ap.parse_args(argv)
    cpus = args.cpu or ["cortex-a72", "cortex-a53", "cortex-a76"]
    if os.geteuid() != 0:
        raise SystemExit("the arm64 test needs root (chroot, mounts)")
    began = time.monotonic()
    report: dict = {"cpus": {}}

    t = time.monotonic()
    tarball = Path(sh(["bash", str(REPO / "tests/arm64/root.sh")], capture_output=True,
                      text=True).stdout.strip())
    report["root_s"] = round(time.monotonic() - t, 1)
    log(f"root: {tarball} ({report['root_s']} s)")

    with tempfile.TemporaryDirectory(prefix="fieldscope-arm64-") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        wheelhouse = work / "fieldscope-offline"
        sh(["bash", str(REPO / "scripts/make-wheelhouse.sh"), str(wheelhouse)], cwd=REPO,
           env={**os.environ, "PYTHON": os.environ.get("FIELDSCOPE_HOST_PYTHON", "python3")})
        report["wheelhouse_s"] = round(time.monotonic() - t, 1)
        wheels = sorted(p.name for p in (wheelhouse / "wheels").glob("*.whl"))
        x86 = [w for w in wheels if "x86_64" in w or "amd64" in w]
        assert not x86, f"the Pi's wheelhouse holds x86 wheels: {x86}"
        log(f"wheelhouse: {len(wheels)} wheels ({report['wheelhouse_s']} s)")

        reference = {b: classify_x86(b, args.threads) for b in bundles()}
        failures: list[str] = []
        with Root(tarball, work) as root:
            root.mount_system()
            report["install_s"] = round(install(root, wheelhouse), 1)
            log(f"installed in {report['install_s']} s")
            env_file = root.path / "etc/fieldscope/environment"
            token = secrets.token_urlsafe(24)
            env_file.write_text(f"FIELDSCOPE_API_TOKEN={token}\n")
            for cpu in cpus:
                pi = PIS[cpu]
                root.as_pi(pi)
                t = time.monotonic()
                entry: dict = {"pi": pi.model, "serve": serve_checks(root, pi, token)}
                for bundle in bundles():
                    got, stderr = classify_pi(root, pi, bundle, args.threads)
                    agreement: Agreement = compare(reference[bundle], got)
                    xnnpack = XNNPACK_LINE in stderr
                    entry[bundle] = {"agreed": agreement.agreed, "compared": agreement.compared,
                                     "max_difference": agreement.max_difference,
                                     "xnnpack": xnnpack, "problems": agreement.problems}
                    log(f"{cpu}: {bundle}: {agreement.agreed}/{agreement.compared} agree with "
                        f"x86, max probability difference {agreement.max_difference:.2g}, "
                        f"XNNPACK {'on' if xnnpack else 'NOT on'}")
                    if not xnnpack:
                        failures.append(f"{cpu} {bundle}: no XNNPACK line:\n{stderr[-1500:]}")
                    if not agreement.ok:
                        failures.append(f"{cpu} {bundle}: " + "\n  ".join(agreement.problems))
                entry["seconds"] = round(time.monotonic() - t, 1)
                report["cpus"][cpu] = entry
    report["total_s"] = round(time.monotonic() - began, 1)
    report["ok"] = not failures
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    log(f"report: {args.report}; total {report['total_s']} s")
    if failures:
        print("arm64 test FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    log("the emulated Pi agrees with x86 on every sample, on every CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
