"""Allowed host names: a page on another site cannot read the kit through DNS rebinding.

A web page the operator opens could point its own host name at the kit's address and then
read the kit's answers as its own; answering only to the kit's own names closes that. A Host
that is an IP address is always allowed (rebinding needs a name), as are the kit's names:
``localhost``, ``fieldscope.local``, the machine's host name (and ``.local``), the kit id, and
``[web] allowed_hosts``.
"""

from __future__ import annotations

import ipaddress
import platform


def allowed_names(kit_id: str, extra: list[str]) -> frozenset[str]:
    node = platform.node().lower()
    names = {"localhost", "fieldscope", "fieldscope.local", node, f"{node}.local"}
    if kit_id:
        names |= {kit_id.lower(), f"{kit_id.lower()}.local"}
    names |= {h.strip().lower().rstrip(".") for h in extra if h.strip()}
    return frozenset(n for n in names if n and n != ".local")


def host_allowed(host_header: str, names: frozenset[str]) -> bool:
    """``host_header`` as sent (``name:port``, ``[v6]:port``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in names
