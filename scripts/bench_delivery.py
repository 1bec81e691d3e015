#!/usr/bin/env python3
"""How fast a backlog leaves the kit: N stored results queued for MQTT, a local Mosquitto
started on loopback, the sender timed until the outbox is empty. Prints messages per second
with the batch in flight and one message at a time (the latter is what a link's round trip
multiplies), with the machine.

With ``--rtt-ms`` the kit reaches the broker through a small proxy that holds every chunk for
half the round trip each way (a field link's latency, without its losses).

Usage: python scripts/bench_delivery.py [--results 2000] [--rtt-ms 0] [--nodelay]
       [--mosquitto /usr/sbin/mosquitto]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge import hardware  # noqa: E402
from edge.config import MqttSection  # noqa: E402
from edge.daemon.outbox import Outbox  # noqa: E402
from edge.daemon.store import Store  # noqa: E402
from edge.outbound.mqtt import MqttDestination  # noqa: E402
from edge.outbound.sender import Destination, Sender  # noqa: E402

RESULT = {"label": "Pre", "score": 0.93, "assessable": True,
          "probabilities": {"Benign": 0.03, "Early": 0.02, "Pre": 0.93, "Pro": 0.02},
          "decision": {"outcome": "refer", "positive": True, "score": 0.97},
          "quality": {"focus": 31.5, "clipped": 0.01}, "timings_ms": {"invoke": 3.4}}


def delay_proxy(target: int, rtt_ms: float) -> int:
    """A TCP proxy on loopback adding ``rtt_ms`` of round trip; returns its port."""
    import asyncio

    half = rtt_ms / 2000.0
    ready = threading.Event()
    port: list[int] = []

    async def pipe(reader, writer):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        async def later():
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if data is None:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(later())
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + half, data))
        queue.put_nowait((loop.time() + half, None))
        await task

    async def handle(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                             return_exceptions=True)

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    ready.wait(5)
    return port[0]


class OneAtATime(MqttDestination):
    """The same destination without a batch in flight."""

    def send_batch(self, batch):
        return Destination.send_batch(self, batch)


def drain(kind, port: int, n: int) -> float:
    with tempfile.TemporaryDirectory() as data:
        store = Store(Path(data))
        outbox = Outbox(store, ("mqtt",))
        for i in range(n):
            store.save(RESULT, "capture", sample_code=f"S-{i // 20}")
        queued = outbox.status()["mqtt"]["queued"]
        dest = kind(MqttSection(url=f"mqtt://127.0.0.1:{port}"), "bench", store)
        stop = threading.Event()
        sender = Sender(dest, outbox, stop)
        t0 = time.perf_counter()
        thread = threading.Thread(target=sender.run)
        thread.start()
        while outbox.status()["mqtt"]["queued"]:
            time.sleep(0.01)
        took = time.perf_counter() - t0
        stop.set()
        outbox.notify()
        thread.join(10)
        store.close()
    return queued / took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=int, default=2000)
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="added round trip (a proxy)")
    ap.add_argument("--nodelay", action="store_true",
                    help="the broker's set_tcp_nodelay (Mosquitto's default is off)")
    ap.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as conf_dir:
        conf = Path(conf_dir) / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        f"set_tcp_nodelay {'true' if args.nodelay else 'false'}\n")
        broker = subprocess.Popen([args.mosquitto, "-c", str(conf)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            if args.rtt_ms > 0:
                port = delay_proxy(port, args.rtt_ms)
            for name, kind in (("batch in flight", MqttDestination),
                               ("one at a time", OneAtATime)):
                rate = drain(kind, port, args.results)
                print(f"{name:<16} {rate:8.0f} messages/s "
                      f"({args.results} results + their sample summaries)")
        finally:
            broker.terminate()
            broker.wait(10)
    link = f"loopback + {args.rtt_ms:.0f} ms round trip" if args.rtt_ms else "loopback"
    print(f"{link}, broker set_tcp_nodelay {'on' if args.nodelay else 'off'} · "
          f"{hardware.machine_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
