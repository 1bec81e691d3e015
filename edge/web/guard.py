"""Connections bounded: what keeps a phone on the clinic's Wi-Fi from freezing the kit.

waitress alone stops accepting at ``connection_limit`` (100) and closes a connection only
after ``channel_timeout`` without a byte, which each trickled byte resets: ~100 idle sockets,
or a slowloris sending one header byte a second, left every other client waiting. The guard,
applied to waitress's own server and channel objects (waitress keeps the HTTP work):

- a **header deadline**: a request line and headers must be complete within
  ``header_timeout_s`` of their first byte (or of the connection's opening, for one that sends
  nothing, or of its last answer, for a kept-alive one that sends nothing more); trickling does
  not extend it;
- a **body pace**: once past that deadline, a request's body must have arrived at
  ``min_body_bytes_per_s`` on average (4 KB/s, far below any phone's link), or it counts as
  waiting like a trickled header;
- a **body cap**: waitress refuses a body over ``max_body_bytes`` (413) from its
  Content-Length or as it arrives, before it is spooled to a temp file in full (the upload
  limit plus room for the form);
- a **per-client cap**: one address holds at most ``per_client`` connections; more are closed
  at accept;
- a **total cap that evicts** instead of refusing: at ``limit``, the connection that has waited
  longest (an idle, kept-alive or trickling one) is closed to make room, so a full house of
  idle sockets never locks out a phone with a real request. Connections busy with a request
  (an upload on pace, a live view, an answer going out) are never evicted; live views have
  their own cap (``max_streams``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer

log = logging.getLogger(__name__)


# Room beside the image in an upload's form (its field names, boundaries, the sample code).
FORM_ROOM_BYTES = 64 * 1024


@dataclass(frozen=True)
class Limits:
    limit: int = 200
    per_client: int = 32
    header_timeout_s: float = 10.0
    min_body_bytes_per_s: int = 4096
    max_body_bytes: int = 16 * 1024 * 1024 + FORM_ROOM_BYTES  # [web] max_upload_mb's default


class GuardedChannel(HTTPChannel):
    # When the request being received got its first byte (None: nothing received yet), and
    # how many bytes of it have come since.
    request_started: float | None = None
    request_bytes = 0
    limits: Limits = Limits()

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self.request_started = time.time()
            self.request_bytes = 0
        self.request_bytes += len(data)
        return super().received(data)

    def waiting_since(self, now: float | None = None) -> float | None:
        """Since when it has been waiting on its client (None: busy). Waiting: opened and
        silent, headers unfinished, kept alive with nothing more to ask, or a body behind
        its pace; busy: a request being answered, an answer going out, a body on pace."""
        if self.requests or self.total_outbufs_len:
            return None
        if self.request is None:  # between requests
            return self.creation_time if self.request_started is None else self.last_activity
        started = self.request_started or self.creation_time
        if not self.request.headers_finished:
            return started
        now = time.time() if now is None else now
        elapsed = now - started
        if (elapsed > self.limits.header_timeout_s
                and self.request_bytes < self.limits.min_body_bytes_per_s * elapsed):
            return started  # a body trickled: as good as a trickled header
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
        channel = self.channel_class(self, conn, addr, self.adj, map=self._map)
        channel.limits = self.limits

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        cutoff = now - self.limits.header_timeout_s
        for channel in list(self.active_channels.values()):
            since = channel.waiting_since(now) if isinstance(channel, GuardedChannel) else None
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
