"""ClientInfo JSON shape limits: deep or container-heavy JSON is a clean handshake
error (one log line), never an uncaught RecursionError on the transport."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp.errors import HandshakeError
from derp.frames import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, decode_json_payload, encode_client_info
from derp.keys import seal
from derp.server import DerpServer
from derp.server.handshake import parse_client_info_json

from .conftest import UPGRADE_REQUEST, ClientFactory, wait_until

# --------------------------------------------------------------------------- pure


def _shape(v: Any) -> tuple[int, int]:
    """(nesting depth, number of arrays + objects) of a JSON value."""
    if isinstance(v, list):
        kids = [_shape(x) for x in v]
    elif isinstance(v, dict):
        kids = [_shape(x) for x in v.values()]
    else:
        return 0, 0
    return 1 + max((d for d, _ in kids), default=0), 1 + sum(n for _, n in kids)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=60,
)


@given(_json)
def test_decode_json_payload_agrees_with_json_or_names_the_limit(v: Any) -> None:
    data = json.dumps(v).encode()
    depth, containers = _shape(v)
    if depth <= MAX_JSON_DEPTH and containers <= MAX_JSON_CONTAINERS:
        assert decode_json_payload(data) == v
    else:
        with pytest.raises(ValueError):
            decode_json_payload(data)


@given(st.integers(1, 40), st.text(alphabet='[]{}"\\x', max_size=20))
def test_depth_limit_is_exact_and_brackets_in_strings_do_not_count(n: int, s: str) -> None:
    doc = "[" * n + json.dumps(s) + "]" * n
    if n <= MAX_JSON_DEPTH:
        assert decode_json_payload(doc.encode()) == json.loads(doc)
    else:
        with pytest.raises(ValueError, match="nested deeper than 32"):
            decode_json_payload(doc.encode())


@pytest.mark.parametrize(
    "doc, ok",
    [
        (b"[" * 32 + b"]" * 32, True),
        (b"[" * 33 + b"]" * 33, False),
        (b"[" * 200_000, False),  # would be a RecursionError in json.loads
        (b'{"a":"' + b"[" * 200_000 + b'"}', True),  # brackets inside a string
        (b'{"a":"\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\\\"}', True),  # escaped quotes
        (b"[" + b"[]," * 256 + b"[]]", False),  # 258 containers
        (b"[" + b"{}," * 254 + b"{}]", True),  # 256 containers
        (b"]" * 1000 + b"[" * 40, False),
    ],
)
def test_decode_json_payload_vectors(doc: bytes, ok: bool) -> None:
    if ok:
        assert decode_json_payload(doc) == json.loads(doc)
    else:
        with pytest.raises(ValueError):
            decode_json_payload(doc)


def test_parse_client_info_rejects_deep_json_with_handshake_error() -> None:
    deep = b'{"version":2,"x":' + b"[" * 40 + b"]" * 40 + b"}"
    with pytest.raises(HandshakeError, match="nested deeper than 32"):
        parse_client_info_json(b"k" * 32, deep)
    deeper = b'{"version":2,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(HandshakeError, match="more than 256 arrays"):
        parse_client_info_json(b"k" * 32, deeper)


# --------------------------------------------------------------------------- server


@pytest.mark.parametrize(
    "body",
    [
        b'{"version":2,"x":' + b"[" * 120_000 + b"]" * 120_000 + b"}",
        b'{"version":2,"x":[' + b"{}," * 80_000 + b"{}]}",
    ],
    ids=["deep", "many-containers"],
)
async def test_hostile_client_info_json_is_one_clean_handshake_error(
    server: DerpServer,
    connect: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    good = await connect()
    c = await connect(handshake=False)
    c.send(UPGRADE_REQUEST + b"\r\n")
    await c.read_http_head()
    await c.read_server_key()
    frame = encode_client_info(c.pub, seal(c.key, server.public_key, body))
    assert len(frame) <= 5 + 256 * 1024
    with caplog.at_level(logging.DEBUG):
        c.send(frame)
        await c.expect_closed()
        await wait_until(lambda: server.stats.handshake_failures == 1)
    lines = [r for r in caplog.records if "ClientInfo" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert "\n" not in lines[0].getMessage() and lines[0].exc_info is None
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage() or r.exc_info]
    good.send_packet(good.pub, b"still fine")
    assert await good.recv_packet() == (good.pub, b"still fine")
