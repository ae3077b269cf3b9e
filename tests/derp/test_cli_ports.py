"""Port flags of ``derper`` are validated (1-65535, -1 where "off" is documented)
with an error naming the flag; a valid STUN port is used exactly."""

from __future__ import annotations

import asyncio
import socket

import pytest

from derp.cli import main
from derp.mesh import parse_mesh_peer
from derp.stunserver import stun_request

from .test_cli import WAIT, Derper, derpers, start_derper  # noqa: F401 (fixture)


@pytest.mark.parametrize("value", ["99999", "65536", "-2", "x", ""])
def test_bad_stun_port_is_a_usage_error_naming_the_flag(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--dev", "--stun-port", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--stun-port" in err and ("1-65535" in err or "not a port" in err), err


def test_stun_port_accepts_its_documented_range() -> None:
    from derp.cli import build_parser

    for value, want in (("-1", -1), ("0", 0), ("1", 1), ("65535", 65535)):
        assert build_parser().parse_args(["--stun-port", value]).stun_port == want


@pytest.mark.parametrize("addr", ["127.0.0.1:99999", ":65536", "127.0.0.1:-1"])
def test_bad_listen_port_exits_1_naming_the_flag(
    addr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--dev", "-a", addr]) == 1
    err = capsys.readouterr().err
    assert err.startswith("derper: -a/--addr: ") and addr in err, err


@pytest.mark.parametrize(
    "entry", ["derp1:0", "derp1:65536", "https://derp1:0", "http://derp1:99999/derp"]
)
def test_bad_mesh_peer_port(entry: str) -> None:
    with pytest.raises(ValueError, match="bad mesh peer"):
        parse_mesh_peer(entry)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_valid_stun_port_is_used_exactly(derpers: list[Derper]) -> None:
    port = _free_udp_port()
    d = await start_derper("--dev", "-a", "127.0.0.1:0", "--stun-port", str(port))
    derpers.append(d)
    await d.listening()
    await d.wait_stderr(f"UDP 127.0.0.1:{port}".encode())
    addr = await asyncio.wait_for(stun_request("127.0.0.1", port, timeout=WAIT), WAIT)
    assert addr is not None
