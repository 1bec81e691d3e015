"""HTML pages: Live, Samples (list, detail, printable report), Model, System."""

from __future__ import annotations

import os
import platform
import shutil
import time

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_file,
)

from .. import hardware
from .api import SAMPLE_CODE, switch_to
from .auth import safe_next

bp = Blueprint("pages", __name__)


def _ctx():
    ext = current_app.extensions["fieldscope"]
    return ext["pipeline"], ext["cfg"]


@bp.get("/")
def live():
    pipe, cfg = _ctx()
    status = pipe.status()
    b = pipe.model
    return render_template(
        "live.html",
        bundle=b,
        status=status,
        names=b.manifest.get("label_names", {}),
        min_focus=pipe.cfg.pipeline.min_focus,
        profiles=pipe.profiles(),
        max_upload_mb=cfg.web.max_upload_mb,
    )


@bp.post("/profile")
def profile():
    """The page's one-tap profile switch (a plain form: it works without JavaScript)."""
    answer, code = switch_to(request.form.get("profile"))
    if code != 200:
        flash(answer["error"])
    return redirect(safe_next(request.form.get("next", "/")))


@bp.get("/samples")
def samples():
    pipe, _ = _ctx()
    names = {p["id"]: p["name"] for p in pipe.profiles()}
    return render_template("samples.html", samples=pipe.results.samples(), names=names)


def _summary_or_404(pipe, code: str) -> dict:
    summary = pipe.results.sample_summary(code) if SAMPLE_CODE.fullmatch(code) else None
    if not summary:
        abort(404)
    return summary


@bp.get("/samples/<code>")
def sample(code: str):
    pipe, _ = _ctx()
    summary = _summary_or_404(pipe, code)
    return render_template("sample.html", s=summary, profile=_profile_name(pipe, summary))


def _profile_name(pipe, summary: dict) -> str | None:
    names = {p["id"]: p["name"] for p in pipe.profiles()}
    pid = summary.get("profile")
    return names.get(pid, pid) if pid else None


@bp.get("/samples/<code>/report")
def report(code: str):
    pipe, _ = _ctx()
    summary = _summary_or_404(pipe, code)
    # The model and rule of the profile that made the sample, which may not be the running one.
    return render_template(
        "report.html",
        s=summary,
        bundle=pipe.bundles(summary.get("profile")),
        profile=_profile_name(pipe, summary),
        models=sorted({r["model"] for r in summary["results"] if r["model"]}),
        backends=sorted({r["backend"] for r in summary["results"] if r["backend"]}),
        printed=time.strftime("%Y-%m-%d %H:%M"),
    )


@bp.get("/model")
def model():
    pipe, _ = _ctx()
    from .card import card_html

    b = pipe.model
    return render_template(
        "model.html", bundle=b, backend=pipe.backend(), card=card_html(b.file("card"))
    )


@bp.get("/model/files/<name>")
def model_file(name: str):
    """The card's plots (PNG files at the bundle's top level only)."""
    pipe, _ = _ctx()
    b = pipe.model
    if b.root is None or "/" in name or not name.endswith(".png"):
        abort(404)
    path = b.root / name
    if not path.is_file():
        abort(404)
    return send_file(path, mimetype="image/png")


def _meminfo() -> dict:
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0]) // 1024
    except OSError:
        pass
    return out


@bp.get("/system")
def system():
    pipe, cfg = _ctx()
    from ..doctor import run_checks
    from ..inference.backends.edgetpu import runtime_version

    try:  # a vanished data folder (an unmounted card) is what this page must diagnose
        usage = shutil.disk_usage(cfg.data_dir)
        disk = f"{usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f} GB"
    except OSError as exc:
        disk = f"data folder {cfg.data_dir} unreadable ({exc.strerror or exc})"
    mem = _meminfo()
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            rss = next((int(ln.split()[1]) // 1024 for ln in fh if ln.startswith("VmRSS")), None)
    except OSError:
        rss = None
    flags = hardware.pi_throttled()
    status = pipe.status()
    info = {
        "uptime": _uptime(time.time() - pipe.started),
        "host": platform.node(),
        "cpu": hardware.cpu_model(),
        "temperature": hardware.cpu_temperature_c(),
        "throttled": (hardware.decode_throttled(flags) or ["none"]) if flags is not None else None,
        "disk": disk,
        "memory": f"{mem.get('MemAvailable', 0)} MB available of {mem.get('MemTotal', 0)} MB",
        "rss": f"{rss} MB" if rss is not None else "?",
        "runtime": status["runtime"],
        "libedgetpu": runtime_version() or "not installed",
        "results": pipe.results.count(),
    }
    checks = run_checks(data_dir=str(cfg.data_dir))
    from .auth import active_sessions

    return render_template("system.html", info=info, checks=checks, status=status,
                           sessions=active_sessions(), now=time.time())


def _uptime(seconds: float) -> str:
    """7 d 03:12:09 (a day count, so it does not wrap every 24 h)."""
    days, rest = divmod(int(max(0, seconds)), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days} d {clock}" if days else clock
