"""Tailnet API version negotiation (Coder's ``apiversion`` rules).

The Tailnet and Agent APIs share one ``<major>.<minor>`` numbering:

* 2.0 — Coordinate, StreamDERPMaps
* 2.2 — PostTelemetry
* 2.3 — RefreshResumeToken, WorkspaceUpdates (no tailnet change after 2.3)

A client names the version it speaks (over gRPC: metadata ``tailnet-version``;
absent means ``"2.0"``). The rules, as in Coder:

1. the string must be ``"<int>.<int>"`` (else :class:`InvalidVersion`);
2. a major above the server's, or a different major with no backward-compat
   registration (we register none), is unsupported;
3. with the same major, the requested minor must be ``<=`` the server's minor.

Rule 2/3 failures raise :class:`UnsupportedVersion`. Both errors carry a message
meant for the client.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "CURRENT_MAJOR",
    "CURRENT_MINOR",
    "CURRENT_VERSION",
    "DEFAULT_CLIENT_VERSION",
    "AGENT_API_VERSION",
    "VersionError",
    "InvalidVersion",
    "UnsupportedVersion",
    "parse_version",
    "check_version",
    "format_version",
]

CURRENT_MAJOR: Final = 2
CURRENT_MINOR: Final = 3
CURRENT_VERSION: Final[tuple[int, int]] = (CURRENT_MAJOR, CURRENT_MINOR)
#: The Agent API version served on ``/api/v2/workspaceagents/me/rpc`` (Coder's
#: agents dial 2.6; the Tailnet methods on that endpoint are unchanged since 2.3).
AGENT_API_VERSION: Final[tuple[int, int]] = (2, 6)
#: What a client that sends no version is assumed to speak.
DEFAULT_CLIENT_VERSION: Final = "2.0"

_VERSION_RE = re.compile(r"^(\d{1,9})\.(\d{1,9})$")


class VersionError(ValueError):
    """A requested API version cannot be served; ``str()`` is the client message."""


class InvalidVersion(VersionError):
    """The version string is not ``<int>.<int>``."""


class UnsupportedVersion(VersionError):
    """The version is well formed but this server does not speak it."""


def format_version(version: tuple[int, int]) -> str:
    """``(2, 3)`` -> ``"2.3"``."""
    return f"{version[0]}.{version[1]}"


def parse_version(text: str) -> tuple[int, int]:
    """Parse ``"<major>.<minor>"``; raises :class:`InvalidVersion`."""
    match = _VERSION_RE.match(text.strip())
    if match is None:
        raise InvalidVersion(
            f"Unknown or unsupported API version: invalid version string {text!r}, "
            "expected <major>.<minor> such as \"2.0\""
        )
    return int(match.group(1)), int(match.group(2))


def check_version(
    requested: str | None, server: tuple[int, int] = CURRENT_VERSION
) -> tuple[int, int]:
    """Validate a client's requested version against ``server``.

    Returns the parsed version (``DEFAULT_CLIENT_VERSION`` when ``requested`` is
    ``None`` or empty). Raises :class:`InvalidVersion` or
    :class:`UnsupportedVersion`.
    """
    text = requested if requested else DEFAULT_CLIENT_VERSION
    major, minor = parse_version(text)
    smajor, sminor = server
    if major > smajor:
        raise UnsupportedVersion(
            f"Unknown or unsupported API version: server is at version "
            f"{format_version(server)}, behind requested major version {text}"
        )
    if major < smajor:
        raise UnsupportedVersion(
            f"Unknown or unsupported API version: version {text} is no longer supported "
            f"(server is at {format_version(server)})"
        )
    if minor > sminor:
        raise UnsupportedVersion(
            f"Unknown or unsupported API version: server is at version "
            f"{format_version(server)}, behind requested minor version {text}"
        )
    return major, minor
