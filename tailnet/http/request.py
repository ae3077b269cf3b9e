"""The request object handlers see, and credential extraction.

Credentials, in order of precedence (Coder's ``codersdk`` conventions):
``Coder-Session-Token: <t>`` header, ``Authorization: Bearer <t>`` header, the
``coder_session_token`` cookie. An empty value counts as absent.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie

import h11

__all__ = ["Request", "SESSION_COOKIE", "request_from_h11", "extract_token"]

SESSION_COOKIE = "coder_session_token"


@dataclass(slots=True)
class Request:
    """A parsed HTTP request (only the login form has a body)."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    cookies: dict[str, str] = field(default_factory=dict)
    remote: object = None
    body: bytes = b""
    """The request body (at most :data:`tailnet.http.server.MAX_BODY` bytes)."""

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    @property
    def is_websocket(self) -> bool:
        return self.header("upgrade").lower() == "websocket"

    def accepts_json(self) -> bool:
        return "application/json" in self.header("accept").lower()


def request_from_h11(ev: h11.Request, remote: object = None, body: bytes = b"") -> Request:
    """Build a :class:`Request` from an h11 event (query: first value wins)."""
    target = ev.target.decode("latin-1")
    split = urllib.parse.urlsplit(target)
    query: dict[str, str] = {}
    for k, v in urllib.parse.parse_qsl(split.query, keep_blank_values=True):
        query.setdefault(k, v)
    headers: dict[str, str] = {}
    cookie_parts: list[str] = []
    for name, value in ev.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key == "cookie":
            cookie_parts.append(text)
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    cookies: dict[str, str] = {}
    for part in cookie_parts:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(part)
        except CookieError:
            continue
        for k, morsel in jar.items():
            cookies.setdefault(k, morsel.value)
    path = urllib.parse.unquote(split.path) or "/"
    return Request(
        ev.method.decode("latin-1").upper(), target, path, query, headers, cookies, remote, body
    )


def extract_token(req: Request) -> str | None:
    """The caller's session token, or ``None`` if no credential was sent."""
    tok = req.header("coder-session-token").strip()
    if tok:
        return tok
    auth = req.header("authorization").strip()
    scheme, _, rest = auth.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    cookie = req.cookies.get(SESSION_COOKIE, "").strip()
    return cookie or None
