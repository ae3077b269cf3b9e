"""``tailnet serve`` startup failures: one line on stderr naming what failed, exit 1,
no traceback; PostgreSQL connects within a bounded time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailnet.cli import main
from tailnet.stack import redact_dsn

pytestmark = pytest.mark.timeout(60)


def _serve(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str) -> tuple[int, str]:
    args = ["serve", "--http-addr", "127.0.0.1:0", "--grpc-addr", "off", "--stun-addr", "off",
            "--log-level", "CRITICAL", "--no-gc-tuning"]
    if "--data-dir" not in extra:
        args += ["--data-dir", str(tmp_path / "data")]
    rc = main([*args, *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tailnet: "), err
    return lines[0]


def test_data_dir_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "state"
    f.write_text("not a directory")
    rc, err = _serve(capsys, tmp_path, "--data-dir", str(f))
    assert rc == 1
    assert _one_line(err) == f"tailnet: data dir {f}: exists but is not a directory"


def test_missing_derp_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    rc, err = _serve(capsys, tmp_path, "--derp-config-path", str(missing))
    assert rc == 1
    line = _one_line(err)
    assert f"derp_config_path {missing}: cannot read" in line and "No such file" in line
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, err = _serve(capsys, tmp_path, "--derp-config-path", str(bad))
    assert rc == 1 and "not valid JSON" in _one_line(err)


def test_ports_in_use_are_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        port = tcp.getsockname()[1]
        rc, err = _serve(capsys, tmp_path, "--http-addr", f"127.0.0.1:{port}")
    assert rc == 1
    line = _one_line(err)
    assert f"HTTP address 127.0.0.1:{port} (TCP, http_addr)" in line and "in use" in line
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        uport = udp.getsockname()[1]
        rc, err = _serve(capsys, tmp_path, "--stun-addr", f"127.0.0.1:{uport}")
    assert rc == 1
    line = _one_line(err)
    assert f"STUN address 127.0.0.1:{uport} (UDP, stun_addr)" in line and "in use" in line


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()


def test_postgres_refused_and_silent(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, silent_server: int
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nobody listens here once the socket closes
    dsn = f"postgresql://tailnet:s3cret@127.0.0.1:{closed}/tailnet"
    rc, err = _serve(capsys, tmp_path, "--postgres-url", dsn)
    assert rc == 1
    line = _one_line(err)
    assert f"PostgreSQL at postgresql://tailnet:***@127.0.0.1:{closed}/tailnet" in line
    assert "s3cret" not in line and "refused" in line.lower()

    dsn = f"postgresql://tailnet:s3cret@127.0.0.1:{silent_server}/tailnet"
    t0 = time.monotonic()
    rc, err = _serve(capsys, tmp_path, "--postgres-url", dsn, "--postgres-connect-timeout", "1")
    assert time.monotonic() - t0 < 8
    assert rc == 1
    line = _one_line(err)
    assert "no answer within 1s (postgres_connect_timeout)" in line and "s3cret" not in line


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:p@h:5432/d?sslmode=require") == (
        "postgresql://u:***@h:5432/d?sslmode=require"
    )
    assert redact_dsn("postgresql://u@h/d") == "postgresql://u@h/d"
    assert redact_dsn("postgresql:///d?host=/tmp") == "postgresql:///d?host=/tmp"
    assert redact_dsn("postgresql://h/d?user=u&password=p") == (
        "postgresql://h/d?user=u&password=***"
    )
