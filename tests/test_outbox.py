"""The outbox and its sender, below the real brokers of test_mqtt/test_clinic: what is queued
with a result, the bounds (age, count) and their counts, and the sender's order, retries and
drops, against a destination that records what it was given."""

from __future__ import annotations

import threading
import time

import pytest

from edge.daemon.outbox import Message, Outbox
from edge.daemon.store import Store
from edge.outbound.messages import Gone, Refused, result_message, sample_message
from edge.outbound.sender import Destination, Sender

RESULT = {"label": "Benign", "score": 0.9, "probabilities": {"Benign": 0.9, "Pro": 0.1},
          "assessable": True}


def open_store(tmp_path, destinations: tuple[str, ...], retention_days: int = 90,
               **bounds) -> tuple[Store, Outbox]:
    """A store and its outbox, as the daemon builds them (serve.build)."""
    store = Store(tmp_path, retention_days=retention_days)
    return store, Outbox(store, destinations, **bounds)


def queued(store: Store) -> list[tuple]:
    with store._lock:
        return [tuple(r) for r in store._db.execute(
            "SELECT destination, kind, result_id, sample_code FROM outbox ORDER BY id")]


def test_a_result_queues_its_messages_and_a_sample_one_summary_at_a_time(tmp_path):
    store, outbox = open_store(tmp_path, ("mqtt", "dicom"))
    a = store.save(RESULT, "upload", sample_code="S-1", jpeg=b"\xff\xd8fake")
    b = store.save(RESULT, "upload", sample_code="S-1")  # no snapshot: nothing for a PACS
    c = store.save(RESULT, "live")  # no sample: a result message only
    # The sample's one summary is queued after its newest result.
    assert queued(store) == [("mqtt", "result", a, "S-1"), ("dicom", "field", a, "S-1"),
                             ("mqtt", "result", b, "S-1"), ("mqtt", "sample", None, "S-1"),
                             ("mqtt", "result", c, None)]
    store.close()
    assert Outbox(Store(tmp_path)).status()["mqtt"]["queued"] == 4  # survives a restart


def test_a_summary_already_taken_by_the_sender_is_followed_by_a_new_one(tmp_path):
    """The sender reads a batch, then a field is added to the sample before the batch is
    acknowledged: a new summary must still be queued, or the programme never hears of it."""
    store, outbox = open_store(tmp_path, ("mqtt",))
    store.save(RESULT, "upload", sample_code="S-3")
    in_flight = outbox.due("mqtt")  # read (and its summary built) by the sender
    store.save(RESULT, "upload", sample_code="S-3")
    for msg in in_flight:
        outbox.delivered(msg)  # then acknowledged
    left = [m for m in outbox.due("mqtt") if m.kind == "sample"]
    assert len(left) == 1 and left[0].message_id not in {m.message_id for m in in_flight}
    assert sample_message(store, left[0], "kit")["fields"] == 2
    store.close()


def test_messages_carry_what_is_stored_now(tmp_path):
    store, outbox = open_store(tmp_path, ("mqtt",))
    rid = store.save(RESULT, "upload", sample_code="S-2", profile="blood-smear")
    msgs = outbox.due("mqtt")
    doc = result_message(store, msgs[0], "kit-1")
    assert doc["id"] == rid and doc["kit"] == "kit-1" and doc["profile"] == "blood-smear"
    assert doc["message_id"] == msgs[0].message_id and len(doc["message_id"]) == 32
    store.save(RESULT, "upload", sample_code="S-2")
    summary = sample_message(store, msgs[1], "kit-1")
    assert summary["fields"] == 2 and summary["code"] == "S-2"
    gone = Message(99, "mqtt", "result", "x", 12345, None, 0.0, 0)
    try:
        result_message(store, gone, "kit-1")
        raise AssertionError("a message about a removed result must be Gone")
    except Gone:
        pass


def test_bounds_drop_the_oldest_and_count_them(tmp_path):
    store, outbox = open_store(tmp_path, ("mqtt",), max_age_days=1, max_messages=100)
    for _ in range(120):
        store.save(RESULT, "live")
    now = time.time()
    assert outbox.enforce_bounds(now) == 20  # too many: the oldest go
    assert outbox.status(now)["mqtt"]["dropped"] == 20
    assert [r[2] for r in queued(store)][0] == 21
    assert outbox.enforce_bounds(now + 2 * 86400) == 100  # too old
    st = outbox.status()["mqtt"]
    assert st["queued"] == 0 and st["dropped"] == 120 and st["oldest_age_s"] is None
    store.close()


def test_no_age_drop_while_the_clock_cannot_be_trusted(tmp_path):
    store, outbox = open_store(tmp_path, ("mqtt",), max_age_days=1)
    store.save(RESULT, "live")
    # A Pi without RTC after a power cut: its clock reads 1970.
    assert outbox.enforce_bounds(now=86400.0 * 400) == 0
    assert outbox.status()["mqtt"]["queued"] == 1
    store.close()


class Recorder(Destination):
    """Fails its first ``failures`` sends, refuses result ``refuse``, records the rest."""

    name = "mqtt"

    def __init__(self, failures: int = 0, refuse: int | None = None) -> None:
        self.failures = failures
        self.refuse = refuse
        self.sent: list[int] = []
        self.opened = 0

    def open(self) -> None:
        self.opened += 1

    def send(self, msg: Message) -> None:
        if msg.result_id == self.refuse:
            raise Refused("the server refuses this one")
        if self.failures:
            self.failures -= 1
            raise ConnectionError("link down")
        self.sent.append(msg.result_id)


def run_sender(outbox: Outbox, dest: Destination, until, **options) -> None:
    stop = threading.Event()
    options = {"retry_max_s": 1.0, **options}
    sender = Sender(dest, outbox, stop, poll_s=0.05, **options)
    t = threading.Thread(target=sender.run)
    t.start()
    deadline = time.monotonic() + 20
    try:
        while not until():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        stop.set()
        outbox.notify()
        t.join(5)


def test_the_sender_retries_in_order_and_drops_what_can_never_go(tmp_path):
    store, outbox = open_store(tmp_path, ("mqtt",))
    ids = [store.save(RESULT, "live") for _ in range(5)]
    dest = Recorder(failures=2, refuse=ids[3])
    run_sender(outbox, dest, lambda: outbox.status()["mqtt"]["queued"] == 0)
    st = outbox.status()["mqtt"]
    assert dest.sent == [i for i in ids if i != ids[3]]  # in order, each once
    assert st["delivered"] == 4 and st["dropped"] == 1 and st["failed"] == 2
    assert dest.opened == 3  # reconnected after each failure
    store.close()


def test_a_message_that_keeps_failing_does_not_hold_up_the_others(tmp_path):
    """A PACS that answers 500 to one object, again and again, while it takes the rest: that
    message keeps its place for its first tries, then waits its own growing delay while the
    messages behind it are delivered; it stays queued (counted, with its error), not lost."""

    class OneBad(Recorder):
        def __init__(self, bad: int) -> None:
            super().__init__()
            self.bad, self.tries = bad, 0

        def send(self, msg: Message) -> None:
            if msg.result_id == self.bad:
                self.tries += 1
                raise ValueError("HTTP 500 for this object")
            super().send(msg)

    store, outbox = open_store(tmp_path, ("mqtt",))
    ids = [store.save(RESULT, "live") for _ in range(4)]
    dest = OneBad(bad=ids[0])
    run_sender(outbox, dest, lambda: len(dest.sent) == 3, retry_max_s=60.0, keep_order_tries=1)
    assert dest.sent == ids[1:]  # the others, in their order
    assert dest.tries == 2  # once in its place, once more; then it waited
    (attempts, next_try, error), = store._db.execute(
        "SELECT attempts, next_try, last_error FROM outbox").fetchall()
    assert attempts == 2 and next_try > time.time() and "500" in error
    st = outbox.status()["mqtt"]
    assert (st["queued"], st["delivered"], st["failed"]) == (1, 3, 2)
    store.close()


def test_a_message_held_back_takes_its_place_again_when_the_next_one_fails_too(tmp_path):
    """A message that has failed often before (held back at its next failure, for 32 s) fails
    again, and so does the next one: the fault is the destination's, so the first takes its
    place again and all are delivered in their order, without waiting out its delay."""
    store, outbox = open_store(tmp_path, ("mqtt",))
    ids = [store.save(RESULT, "live") for _ in range(3)]
    with store._lock:
        store._db.execute("UPDATE outbox SET attempts = 5 WHERE result_id = ?", (ids[0],))
    dest = Recorder(failures=2)
    run_sender(outbox, dest, lambda: len(dest.sent) == 3, retry_max_s=60.0)
    assert dest.sent == ids
    store.close()


def test_a_message_delay_never_overflows(tmp_path):
    """2.0 ** 1024 raises OverflowError: a message refused for days reaches that many tries."""
    store, outbox = open_store(tmp_path, ("mqtt",))
    sender = Sender(Recorder(), outbox, threading.Event(), retry_max_s=300.0)
    assert sender.message_delay(5000) == 300.0 and sender.message_delay(1) == 0.0
    store.close()


def test_the_sender_outlives_a_failing_store(tmp_path):
    """The card fills or turns read-only under the outbox: the sender says so in the status
    and goes on; once the store works again, what was queued is delivered."""
    import sqlite3

    store, outbox = open_store(tmp_path, ("mqtt",))
    ids = [store.save(RESULT, "live") for _ in range(2)]
    failing = threading.Event()
    failing.set()
    due = outbox.due

    def flaky_due(destination, *args, **kwargs):
        if failing.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return due(destination, *args, **kwargs)

    outbox.due = flaky_due
    dest = Recorder()

    def until() -> bool:
        if failing.is_set() and "disk is full" in (outbox.last_error.get("mqtt") or ""):
            failing.clear()  # the status said so; now the card works again
        return dest.sent == ids

    run_sender(outbox, dest, until)
    assert outbox.status()["mqtt"]["queued"] == 0 and outbox.last_error["mqtt"] is None
    store.close()


def test_a_damaged_snapshot_is_refused_by_name_not_retried():
    """A snapshot the card damaged can never become a DICOM image: the message is refused
    (dropped and counted, its reason saying which result) instead of failing for 30 days."""
    from edge.outbound.dicom import Study, field_image

    row = {"id": 7, "created": 1.0}
    with pytest.raises(Refused, match="result 7 is unreadable"):
        field_image(row, b"\x00" * 64, Study("kit", "S-1", 1.0, ""), "microscopy")


def test_a_message_whose_result_retention_removed_is_dropped(tmp_path):
    from edge.outbound.mqtt import MqttDestination

    store, outbox = open_store(tmp_path, ("mqtt",), retention_days=1)
    store.save(RESULT, "live")
    store.enforce_retention(now=time.time() + 3 * 86400)

    class NoPublishing:
        def publish(self, *args, **kwargs):
            raise AssertionError("nothing may be published for a removed result")

    class Offline(MqttDestination):
        def open(self) -> None:  # connected, as far as the sender knows
            self._client = NoPublishing()

    from edge.config import MqttSection

    dest = Offline(MqttSection(url="mqtt://127.0.0.1:1"), "kit", store)
    run_sender(outbox, dest, lambda: outbox.status()["mqtt"]["queued"] == 0)
    st = outbox.status()["mqtt"]
    assert st["dropped"] == 1 and "no longer stored" in st["last_error"]
    store.close()


def test_the_status_follows_each_change_although_it_is_cached(tmp_path):
    store, outbox = open_store(tmp_path, ("mqtt",))
    seen = []
    for _ in range(3):
        store.save(RESULT, "live")
        seen.append(outbox.status()["mqtt"]["queued"])
    msg = outbox.due("mqtt")[0]
    outbox.delivered(msg)
    st = outbox.status()["mqtt"]
    assert seen == [1, 2, 3] and (st["queued"], st["delivered"]) == (2, 1)
    store.close()


def test_every_registered_destination_is_whole():
    """Each destination of edge/destinations has its config section, its sender (a Destination
    of the same name) and its rule of what a result owes it, and config, the outbox and the
    senders find it there (none of them names a destination)."""
    import importlib
    from dataclasses import fields

    from edge.config import SECTIONS, Config
    from edge.destinations import DESTINATIONS, Owed, Stored

    assert "destination" in {f.name for f in fields(Config)}
    for spec in DESTINATIONS:
        assert SECTIONS[spec.name] is spec.section
        assert isinstance(Config().section(spec.name), spec.section)
        module, _, name = spec.sender.partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Destination) and cls.name == spec.name
        owed = spec.owes(Stored("S-1", True))
        assert owed and all(isinstance(o, Owed) for o in owed)
        assert not spec.enabled(spec.section())  # off unless configured
    assert Config().destinations == ()


def test_a_new_destination_is_one_module_found_by_its_name(tmp_path, monkeypatch):
    """A module dropped into edge/destinations is a destination (no registry line, no config
    field); one that does not declare its SPEC under its own name is refused by name."""
    import sys

    import edge.destinations as registry

    (tmp_path / "fax.py").write_text(
        "from dataclasses import dataclass\n"
        "from edge.destinations.spec import DestinationSpec, Owed\n"
        "@dataclass\n"
        "class FaxSection:\n"
        "    number: str = ''\n"
        "SPEC = DestinationSpec(name='fax', section=FaxSection, enabled=lambda s: bool(s.number),"
        " owes=lambda stored: [Owed('result')], check=lambda s: None, modules=(),"
        " sender='edge.outbound.fax:FaxDestination')\n")
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    try:
        found = {d.name: d for d in registry._discover()}
        assert set(found) == {"dicom", "fax", "mqtt"}
        assert found["fax"].enabled(found["fax"].section(number="+123"))

        (tmp_path / "pager.py").write_text("X = 1\n")
        with pytest.raises(ImportError, match="edge.destinations.pager must declare SPEC"):
            registry._discover()
    finally:  # the planted modules leave with the test, pass or fail
        sys.modules.pop("edge.destinations.fax", None)
        sys.modules.pop("edge.destinations.pager", None)
