"""Who may use the server: browser origins and the bearer token, as pure checks.

Browsers send ``Origin`` with every WebSocket handshake and let any page open
a socket to any host, so a server that allowed every origin could be driven
by any web page its user visits.  By default the server allows its own
origin (the demo page it serves, whatever host name it is reached by) and
loopback origins (a page served on the same machine); ``--origin`` adds
others and ``--origin '*'`` allows all.  A request without ``Origin`` is not
from a browser page and is not restricted by it (the token is for those).
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import parse_qs, urlsplit

__all__ = ["ANY_ORIGIN", "origin_allowed", "request_token", "token_ok"]

ANY_ORIGIN = "*"


def _key(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin, lowercased; None if it is not one."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    default = 443 if parts.scheme.lower() == "https" else 80
    return parts.scheme.lower(), parts.hostname.lower(), port or default


def _loopback(hostname: str) -> bool:
    if hostname == "localhost" or hostname.endswith(".localhost"):  # RFC 6761
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:  # a name, e.g. 127.0.0.1.evil.example
        return False


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a handshake with ``Origin: origin`` may proceed.

    ``host``: the request's ``Host`` header (the server's own origin is any
    scheme on it); ``allowed``: extra origins (``"*"``: any).  Scheme and host
    compare case-insensitively; an origin's default port may be left out."""
    if origin is None or ANY_ORIGIN in allowed:
        return True
    key = _key(origin)
    if key is None:  # "null" (a file: page, a sandboxed frame) or junk
        return False
    scheme, hostname, port = key
    if _loopback(hostname):
        return True
    if host:
        for own_scheme in ("http", "https"):
            if _key(f"{own_scheme}://{host}") == key:
                return True
    return any(_key(a) == key for a in allowed)


def request_token(authorization: str | None, path: str) -> str:
    """The token a request carries: the ``Authorization: Bearer`` header's if
    the header is present (an empty one does not fall through), else the
    ``?token=`` query parameter's (browsers cannot set WebSocket headers)."""
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""
    return parse_qs(urlsplit(path).query).get("token", [""])[0]


def token_ok(expected: str | None, authorization: str | None, path: str) -> bool:
    """Whether the request may pass: no token required, or the right one given
    (compared in constant time)."""
    if expected is None:
        return True
    given = request_token(authorization, path)
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
