"""Connections bounded: what keeps a phone on the clinic's Wi-Fi from freezing the kit.

waitress alone stops accepting at ``connection_limit`` (100) and closes a connection only
after ``channel_timeout`` without a byte, which each trickled byte resets: ~100 idle sockets,
or a slowloris sending one header byte a second, left every other client waiting. The guard,
applied to waitress's own server and channel objects (waitress keeps the HTTP work):

- a **header deadline**: a request line and headers must be complete within
  ``header_timeout_s`` of their first byte (or of the connection's opening, for one that sends
  nothing); trickling does not extend it;
- a **per-client cap**: one address holds at most ``per_client`` connections; more are closed
  at accept;
- a **total cap that evicts** instead of refusing: at ``limit``, the connection that has waited
  longest for its headers (an idle or trickling one) is closed to make room, so a full house of
  idle sockets never locks out a phone with a real request. Connections busy with a request
  (an upload, a live view) are never evicted; live views have their own cap (``max_streams``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    limit: int = 200
    per_client: int = 32
    header_timeout_s: float = 10.0


class GuardedChannel(HTTPChannel):
    # When the request being received got its first byte (None: nothing received yet).
    request_started: float | None = None

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self.request_started = time.time()
        return super().received(data)

    def waiting_since(self) -> float | None:
        """Since when it has been waiting for headers (None: serving, or idle after one)."""
        if self.requests:
            return None  # a request is being answered
        if self.request is not None and not self.request.headers_finished:
            return self.request_started or self.creation_time
        if self.request is None and self.request_started is None:
            return self.creation_time  # opened, never spoke
        return None


class GuardedServer(BaseWSGIServer):
    """Mixed into waitress's TCP server (see :func:`guard`)."""

    limits: Limits = Limits()
    _last_warning = 0.0
    next_channel_cleanup: float  # waitress's, set in its constructor

    def readable(self) -> bool:
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return bool(self.accepting)  # never stop accepting: the total cap evicts instead

    def _warn(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            log.warning(text, *args)

    def handle_accept(self) -> None:
        try:
            pair = self.accept()
        except OSError:
            return
        if pair is None:
            return
        conn, addr = pair
        try:
            self.set_socket_options(conn)
        except OSError:
            conn.close()
            return
        addr = self.fix_addr(addr)
        host = addr[0] if isinstance(addr, tuple) else addr
        channels = list(self.active_channels.values())
        mine = sum(1 for c in channels if isinstance(c.addr, tuple) and c.addr[0] == host)
        if mine >= self.limits.per_client:
            self._warn("client %s holds %d connections: refusing more (per-client cap)",
                       host, mine)
            conn.close()
            return
        if len(channels) >= self.limits.limit:
            waiting: list[tuple[float, GuardedChannel]] = []
            for c in channels:
                since = c.waiting_since() if isinstance(c, GuardedChannel) else None
                if since is not None:
                    waiting.append((since, c))
            if not waiting:
                self._warn("%d connections all busy: refusing a new one", len(channels))
                conn.close()
                return
            _, victim = min(waiting, key=lambda pair: pair[0])
            self._warn("connection limit %d reached: closing the longest-waiting idle "
                       "connection (from %s)", self.limits.limit, victim.addr)
            victim.close()
        self.channel_class(self, conn, addr, self.adj, map=self._map)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        cutoff = now - self.limits.header_timeout_s
        for channel in list(self.active_channels.values()):
            since = channel.waiting_since() if isinstance(channel, GuardedChannel) else None
            if since is not None and since < cutoff:
                channel.will_close = True


def guard(server: Any, limits: Limits) -> Any:
    """Put the guard on a server made by ``waitress.create_server`` (one or several sockets)."""
    servers = [server] if isinstance(server, BaseWSGIServer) else [
        s for s in getattr(server, "map", {}).values() if isinstance(s, BaseWSGIServer)
    ]
    for s in servers:
        s.__class__ = type("Guarded" + type(s).__name__, (GuardedServer, type(s)), {})
        s.limits = limits
        s.channel_class = GuardedChannel
    return server
