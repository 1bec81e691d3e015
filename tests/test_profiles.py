"""Use profiles: a named bundle + source + settings; the daemon switches between them without a
restart, under load, without losing or mixing a result, and remembers the choice."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge.config import ConfigError, load_config
from tests.daemon_helpers import Client, eventually, free_port
from tests.test_serve_e2e import wait_http

ROOT = Path(__file__).resolve().parent.parent
BLOOD, SKIN = ROOT / "models" / "blood-smear", ROOT / "models" / "skin-lesion"


def write_config(tmp_path: Path, extra: str = "", fps: float = 10.0) -> Path:
    """Two profiles on the bundled models, each replaying its own samples."""
    path = tmp_path / "kit.toml"
    path.write_text(f"""
[profiles]
default = "blood-smear"
[profiles.blood-smear]
name = "Blood smear — microscope"
bundle = "{BLOOD}"
[profiles.blood-smear.source]
path = "{BLOOD / 'samples'}"
[profiles.skin]
name = "Skin — dermatoscope"
bundle = "{SKIN}"
[profiles.skin.source]
path = "{SKIN / 'samples'}"
[profiles.skin.pipeline]
min_focus = 2.0
{extra}
[model]
threads = 1
[source]
kind = "replay"
fps = {fps}
[pipeline]
smoothing = 1
hold = 1
store_every_s = 0.0
min_focus = 5.0
[storage]
data_dir = "{tmp_path / 'data'}"
""")
    return path


# -- configuration ---------------------------------------------------------------------------------
def test_profiles_are_read_with_their_own_source_and_settings(tmp_path):
    cfg = load_config(write_config(tmp_path))
    assert list(cfg.all_profiles()) == ["blood-smear", "skin"]
    skin = cfg.for_profile("skin")
    assert skin.bundle_path == SKIN and skin.profile == "skin"
    assert Path(skin.source.path) == SKIN / "samples"
    # A profile's [pipeline] lies over the shared one; the other profile keeps the shared one.
    assert skin.pipeline.min_focus == 2.0 and skin.pipeline.smoothing == 1
    assert cfg.for_profile("blood-smear").pipeline.min_focus == 5.0
    assert skin.source.fps == 10.0  # from the shared [source]
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        cfg.for_profile("nope")


def test_a_profile_camera_index_is_not_taken_for_a_path(tmp_path):
    """The kind may come from the shared [source]: a V4L2 index in a profile stays an index,
    a replay folder becomes a path."""
    path = tmp_path / "kit.toml"
    path.write_text(f"""
[profiles.usb]
bundle = "{BLOOD}"
[profiles.usb.source]
path = "0"
[profiles.folder]
bundle = "{BLOOD}"
[profiles.folder.source]
kind = "replay"
path = "fields"
[source]
kind = "v4l2"
""")
    cfg = load_config(path)
    assert cfg.for_profile("usb").source.path == "0"
    assert cfg.for_profile("folder").source.path == str(tmp_path / "fields")
    # The mirror case: the index in the shared [source], the kind only in the profile.
    (tmp_path / "mirror.toml").write_text(f"""
[source]
path = "0"
[profiles.usb]
bundle = "{BLOOD}"
[profiles.usb.source]
kind = "v4l2"
[profiles.folder]
bundle = "{BLOOD}"
[profiles.folder.source]
kind = "replay"
""")
    mirror = load_config(tmp_path / "mirror.toml")
    assert mirror.for_profile("usb").source.path == "0"
    assert mirror.for_profile("folder").source.path == str(tmp_path / "0")
    (tmp_path / "bad.toml").write_text(f'[profiles.x]\nbundle = "{BLOOD}"\nsource = 3\n')
    with pytest.raises(ConfigError, match=r"\[profiles.x\].source: expected a table, got int"):
        load_config(tmp_path / "bad.toml")


def test_a_config_without_profiles_has_one_implicit_profile(tmp_path):
    cfg = load_config(None, {"model.bundle": str(BLOOD), "source.path": str(tmp_path)})
    assert list(cfg.all_profiles()) == ["default"]
    assert cfg.for_profile("default").bundle_path == BLOOD


def test_shipped_demo_has_both_uses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "scripts" / "demo.toml")
    profiles = cfg.all_profiles()
    assert cfg.first_profile() == "blood-smear"
    assert {pid: cfg.for_profile(pid).bundle_path for pid in profiles} == {
        "blood-smear": BLOOD, "skin": SKIN}
    for pid in profiles:
        samples = Path(cfg.for_profile(pid).source.path)
        assert samples.parent == cfg.for_profile(pid).bundle_path
        assert len(list(samples.glob("*.jpg"))) >= 10 and (samples / "ATTRIBUTION.md").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[profiles.x]\nname = "X"\n', r"\[profiles.x\].bundle: each profile names its model"),
        ('[profiles.x]\nbundle = "b"\ncamera = 1\n', r"\[profiles.x\]: unknown option\(s\) camera"),
        ('[profiles.X]\nbundle = "b"\n', "a profile id is 1–32 lower-case"),
        ('[profiles.x]\nbundle = "b"\n[profiles.x.source]\npath = "p"\nfps = 0.0\n',
         r"profile 'x': \[source\].fps must be between 0 and 120"),
        ('[profiles.x]\nbundle = "b"\n[profiles.x.source]\npath = "p"\nfps = "fast"\n',
         r"\[profiles.x\].source.fps: expected float"),
    ],
)
def test_profile_mistakes_are_named(tmp_path, extra, message):
    path = write_config(tmp_path, extra)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)  # and the file they are in


def test_profiles_and_a_global_model_or_command_line_model_conflict(tmp_path):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="chosen per profile"):
        load_config(path, {"model.bundle": str(BLOOD)})
    path.write_text(path.read_text().replace("[model]\n", f'[model]\nbundle = "{BLOOD}"\n'))
    with pytest.raises(ConfigError, match=r"belong in each \[profiles.<id>\]"):
        load_config(path)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('default = "blood-smear"', 'default = "eye"'))
    with pytest.raises(ConfigError, match=r"\[profiles\].default: no profile 'eye'"):
        load_config(path)


# -- the store ------------------------------------------------------------------------------------
def test_an_existing_database_gains_the_profile_columns(tmp_path):
    """A kit updated in the field keeps its results: the columns are added, old rows read
    None, new rows and samples carry their profile."""
    from edge.daemon.store import Store

    (tmp_path / "snapshots").mkdir()
    db = sqlite3.connect(tmp_path / "fieldscope.db")
    db.executescript(
        "CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, "
        "mode TEXT NOT NULL, sample_code TEXT, label TEXT NOT NULL, score REAL NOT NULL, "
        "assessable INTEGER NOT NULL DEFAULT 1, decision_outcome TEXT, decision_positive "
        "INTEGER, group_score REAL, probabilities TEXT NOT NULL, quality TEXT, timings TEXT, "
        "backend TEXT, model TEXT, snapshot TEXT, source TEXT);"
        "CREATE TABLE samples (code TEXT PRIMARY KEY, created REAL NOT NULL);"
        "INSERT INTO results (created, mode, sample_code, label, score, probabilities) "
        "VALUES (1767225601, 'upload', 'OLD', 'Benign', 0.9, '{}');"
        "INSERT INTO samples VALUES ('OLD', 1767225601);"
    )
    db.commit()
    db.close()
    store = Store(tmp_path, retention_days=0)
    try:
        assert store.get(1)["profile"] is None and store.sample_profile("OLD") is None
        rid = store.save({"label": "mel", "score": 0.8}, "upload", sample_code="NEW",
                         profile="skin")
        assert store.get(rid)["profile"] == "skin" and store.sample_profile("NEW") == "skin"
        store.set_setting("profile", "skin")
        store.set_setting("profile", "blood-smear")
        assert store.setting("profile") == "blood-smear"
    finally:
        store.close()


# -- switching in a running daemon -------------------------------------------------------------
def start(tmp_path: Path, config: Path, *args: str):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--config", str(config), "--port", str(port),
         *args],
        cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/api/health")
    return proc, base


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return err


def test_switch_under_load_loses_and_mixes_nothing(tmp_path):
    """Two clients upload without pause and a third polls the status while the profile is
    switched: every upload is answered 201 and stored with the profile whose model made it, the
    status shows the new model as soon as the switch answers, and live results go on with the
    new model."""
    proc, base = start(tmp_path, write_config(tmp_path))
    try:
        blood_img = sorted((BLOOD / "samples").glob("*.jpg"))[0].read_bytes()
        client = Client(base)
        answers: list[tuple[int, dict]] = []
        polls: list[tuple[float, dict]] = []
        done = threading.Event()

        limit = time.monotonic() + 120  # the loops end by themselves whatever happens

        def upload_loop() -> None:
            me = Client(base)
            while not done.is_set() and time.monotonic() < limit:
                answers.append(me.upload(blood_img))

        def poll_loop() -> None:
            me = Client(base)
            while not done.is_set() and time.monotonic() < limit:
                polls.append((time.monotonic(), me.get_json("/api/status")[1]))
                time.sleep(0.05)

        threads = [threading.Thread(target=f) for f in (upload_loop, upload_loop, poll_loop)]
        for t in threads:
            t.start()
        # Events, not fixed sleeps: uploads answered before the switch, then after it.
        eventually(lambda: len(answers) >= 3 and polls, 60, lambda: len(answers))
        before = len(answers)
        asked = time.monotonic()
        status, body = client.post_json("/api/profile", {"profile": "skin"})
        answered = time.monotonic()
        eventually(lambda: len(answers) >= before + 3
                   and any(t > answered + 0.1 and st["last_result"]
                           and st["profile"]["id"] == "skin" for t, st in polls), 60,
                   lambda: (len(answers), before))
        done.set()
        for t in threads:
            t.join(30)
        assert status == 200 and body["active"]["id"] == "skin", body
        assert body["active"]["model"] == "skin-lesion"

        # Nothing lost: every upload answered 201, each id stored once, no other rows.
        assert before > 0 and len(answers) > before, "uploads ran before and after the switch"
        assert [s for s, _ in answers if s != 201] == [], [d for s, d in answers if s != 201]
        ids = [d["id"] for _, d in answers]
        assert len(set(ids)) == len(ids)
        stored = client.get_json("/api/results?limit=500")[1]["results"]
        assert sorted(r["id"] for r in stored) == sorted(ids)
        # Nothing mixed: each result's model is its profile's, and both profiles made some.
        model_of = {"blood-smear": "blood-smear", "skin": "skin-lesion"}
        for r in stored:
            assert r["model"].split()[0] == model_of[r["profile"]], r
        assert {r["profile"] for r in stored} == {"blood-smear", "skin"}
        skin_labels = set(json.loads((SKIN / "manifest.json").read_text())["labels"])
        after = [d for _, d in answers if d["profile"] == "skin"]
        assert after and all(set(d["probabilities"]) == skin_labels for d in after)

        # The status shows the new model as soon as the switch has answered (one poll later).
        first_skin = min(t for t, st in polls if st["profile"]["id"] == "skin")
        assert first_skin <= answered + 1.0, (first_skin - asked, answered - asked)
        assert all(st["profile"]["id"] == "skin" for t, st in polls if t > answered + 0.1)
        # Live results keep flowing, from the new model.
        late = [st for t, st in polls if t > answered + 0.1 and st["last_result"]]
        assert late and set(late[-1]["last_result"]["probabilities"]) == skin_labels
        assert late[-1]["frames_classified"] > max(
            st["frames_classified"] for t, st in polls if t < asked)
    finally:
        stop(proc)


def test_samples_remember_their_profile_and_the_choice_survives_a_restart(tmp_path):
    config = write_config(tmp_path)
    proc, base = start(tmp_path, config)
    skin_img = sorted((SKIN / "samples").glob("*.jpg"))[0].read_bytes()
    try:
        client = Client(base)
        assert client.get_json("/api/profiles")[1]["active"]["id"] == "blood-smear"
        assert client.post_json("/api/profile", {"profile": "skin"})[0] == 200
        status, doc = client.upload(skin_img, sample_code="LESION-1")
        assert status == 201 and doc["profile"] == "skin"
        assert client.get_json("/api/samples/LESION-1")[1]["profile"] == "skin"
        assert client.post_json("/api/profile", {"profile": "blood-smear"})[0] == 200
        # A sample belongs to one profile: a field from another model is refused, not mixed in.
        status, doc = client.upload(skin_img, sample_code="LESION-1")
        assert status == 409 and "made with profile 'skin'" in doc["error"]
        assert client.get_json("/api/samples/LESION-1")[1]["fields"] == 1
        # Its report names the skin model and rule although the kit runs the blood-smear one.
        with client.opener.open(base + "/samples/LESION-1/report", timeout=10) as r:
            report = r.read().decode()
        version = json.loads((SKIN / "manifest.json").read_text())["version"]
        assert "Skin — dermatoscope" in report and f"skin-lesion {version}" in report
        assert client.post_json("/api/profile", {"profile": "eye"})[0] == 404
        assert client.post_json("/api/profile", {"nothing": 1})[0] == 400
        assert client.post_json("/api/profile", {"profile": "skin"})[0] == 200
    finally:
        stop(proc)
    proc, base = start(tmp_path, config)
    try:
        assert Client(base).get_json("/api/status")[1]["profile"]["id"] == "skin"
    finally:
        stop(proc)
    proc, base = start(tmp_path, config, "--profile", "blood-smear")
    try:
        assert Client(base).get_json("/api/status")[1]["profile"]["id"] == "blood-smear"
    finally:
        stop(proc)


def test_a_profile_that_will_not_open_leaves_the_kit_on_the_old_one(tmp_path):
    """A broken bundle in one profile: the switch answers 503 with the reason, the kit is back
    on the profile it was on, classifying and storing."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(SKIN, broken)
    tflite = next(broken.glob("*.tflite"))
    tflite.write_bytes(tflite.read_bytes()[:1000])
    extra = f'[profiles.broken]\nbundle = "{broken}"\n[profiles.broken.source]\npath = "{SKIN}"\n'
    proc, base = start(tmp_path, write_config(tmp_path, extra))
    try:
        client = Client(base)
        status, body = client.post_json("/api/profile", {"profile": "broken"})
        assert status == 503 and "could not start" in body["error"]
        assert "back on 'blood-smear'" in body["error"]
        st = client.get_json("/api/status")[1]
        assert st["profile"]["id"] == "blood-smear"
        frames = st["frames_classified"]
        eventually(lambda: client.get_json("/api/status")[1]["frames_classified"] > frames, 10,
                   lambda: "live classification did not resume")
        img = sorted((BLOOD / "samples").glob("*.jpg"))[0].read_bytes()
        assert client.upload(img)[0] == 201
    finally:
        err = stop(proc)
    assert "would not open" in err


def test_a_switch_where_the_old_profile_will_not_reopen_either_ends_the_daemon(tmp_path):
    """The new profile's model is broken and, meanwhile, so is the running one's copy on disk
    (a failing card): nothing can classify any more, so the switch answers 503 naming both, and
    the daemon ends with an error for systemd to start it again (Restart=on-failure) instead of
    serving a kit that classifies nothing."""
    import os
    import shutil

    blood, broken = tmp_path / "blood", tmp_path / "broken"
    shutil.copytree(BLOOD, blood)
    shutil.copytree(SKIN, broken)
    tflite = next(broken.glob("*.tflite"))
    tflite.write_bytes(tflite.read_bytes()[:1000])
    extra = f'[profiles.broken]\nbundle = "{broken}"\n[profiles.broken.source]\npath = "{SKIN}"\n'
    config = write_config(tmp_path, extra)
    config.write_text(config.read_text().replace(f'bundle = "{BLOOD}"', f'bundle = "{blood}"'))
    proc, base = start(tmp_path, config)
    try:
        client = Client(base)
        assert client.get_json("/api/status")[1]["profile"]["id"] == "blood-smear"
        # The running model's file goes bad on disk (a new file: the open one is untouched).
        model = next(p for p in blood.glob("*.tflite") if "edgetpu" not in p.name)
        bad = model.with_suffix(".bad")
        bad.write_bytes(model.read_bytes()[:1000])
        os.replace(bad, model)
        status, body = client.post_json("/api/profile", {"profile": "broken"})
        assert status == 503, body
        assert "could not start" in body["error"] and "nor could 'blood-smear'" in body["error"]
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert "would not open again either" in err and "stopped with an error" in err


def test_a_switch_waits_for_the_upload_in_progress(tmp_path):
    """An upload inside the model when the switch is asked finishes on the model it started
    with (the switch waits for it) and is stored with that profile."""
    from edge.serve import build

    pipeline, _, store = build(load_config(write_config(tmp_path)))
    pipeline.start()
    try:
        clf = pipeline.profile.classifier
        inside, release = threading.Event(), threading.Event()
        real_infer = clf.infer

        def slow_infer(*args, **kwargs):
            if kwargs.get("name") == "upload":
                inside.set()
                release.wait(10)
            return real_infer(*args, **kwargs)

        clf.infer = slow_infer
        img = sorted((BLOOD / "samples").glob("*.jpg"))[0].read_bytes()
        stored: list[dict] = []
        upload = threading.Thread(
            target=lambda: stored.append(pipeline.results.classify_and_store(img, "upload", None)))
        upload.start()
        assert inside.wait(10)
        switch = threading.Thread(target=pipeline.switch_profile, args=("skin",))
        switch.start()
        # Waiting for the upload: still on the old profile, its model open, while the upload
        # is held; then the switch ends right after the upload is let go.
        time.sleep(1.0)
        assert switch.is_alive(), "the switch closed the model under an upload"
        assert pipeline.profile.profile.id == "blood-smear"
        assert clf.backend.interpreter is not None
        release.set()
        upload.join(10)
        switch.join(10)
        assert not switch.is_alive(), "the switch did not finish once the upload was done"
        assert stored[0]["profile"] == "blood-smear" and stored[0]["model"].startswith("blood")
        assert store.get(stored[0]["id"])["profile"] == "blood-smear"
        assert pipeline.status()["profile"]["id"] == "skin"
    finally:
        pipeline.stop()
        store.close()


def test_the_documented_example_is_a_valid_config(tmp_path):
    import re

    text = (ROOT / "docs" / "profiles.md").read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    (tmp_path / "kit.toml").write_text(example)
    cfg = load_config(tmp_path / "kit.toml")
    skin = cfg.for_profile("skin")
    assert (skin.source.kind, skin.source.fps, skin.pipeline.smoothing) == ("v4l2", 5.0, 3)
    assert cfg.for_profile("blood-smear").source.colour_gains == [1.9, 1.6]


def test_a_slow_replay_does_not_hold_up_a_stop_or_a_switch(tmp_path):
    """The demo replays at 0.5 fps: a read waiting on that pacing returns when interrupted,
    long before its next frame is due."""
    from edge.capture.replay import ReplaySource

    src = ReplaySource(BLOOD / "samples", fps=0.2)
    src.open()
    src.read()
    took: list[float] = []

    def read() -> None:
        t = time.monotonic()
        src.read()
        took.append(time.monotonic() - t)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)
    src.interrupt()
    reader.join(10)
    assert took and took[0] < 2.5, took  # the pacing alone would wait 5 s


def test_an_unnamed_profile_is_shown_by_its_bundle_name(tmp_path):
    from edge.serve import build

    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('name = "Skin — dermatoscope"\n', ""))
    pipeline, _, store = build(load_config(config))
    try:
        names = {p["id"]: p["name"] for p in pipeline.profiles()}
        assert names == {"blood-smear": "Blood smear — microscope", "skin": "skin-lesion"}
    finally:
        store.close()


def test_a_switch_with_the_worker_stuck_in_the_model_closes_it_only_after(tmp_path):
    """The live worker is inside infer (a slow Edge TPU call) past the halt's timeout: the
    switch goes ahead, the old model is closed only when that inference returns (no call on a
    closed interpreter), and its late result is not published under the new profile."""
    from edge.serve import build

    pipeline, _, store = build(load_config(write_config(tmp_path)))
    pipeline.start()
    try:
        eventually(lambda: pipeline.state.classified >= 1, 30)
        old = pipeline.profile
        clf = old.classifier
        inside, release = threading.Event(), threading.Event()
        real_invoke = clf.backend.invoke
        errors: list[BaseException] = []

        def stuck_invoke(tensor):
            inside.set()
            release.wait(15)
            try:
                return real_invoke(tensor)  # would fail on an interpreter closed under it
            except BaseException as exc:
                errors.append(exc)
                raise

        clf.backend.invoke = stuck_invoke
        assert inside.wait(15)
        pipeline.switch_profile("skin")  # returns although the old worker is still inside
        assert pipeline.status()["profile"]["id"] == "skin"
        assert clf.backend.interpreter is not None, "closed under a running inference"
        worker = next(t for t in old.threads if t.name == "inference")
        assert worker.is_alive()
        release.set()
        worker.join(15)
        eventually(lambda: clf.backend.interpreter is None, 10)  # closed once it returned
        assert not errors
        st = pipeline.state
        assert st.profile == "skin"
        assert st.result is None or st.result.get("profile") == "skin"
        eventually(lambda: pipeline.state.result and pipeline.state.result["profile"] == "skin",
                   30)
    finally:
        pipeline.stop()
        store.close()
