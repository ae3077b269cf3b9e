"""Address flags of ``tailnet serve`` are validated, with errors naming where the
value came from (flag, environment variable or TOML key)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tailnet.cli import main
from tailnet.config import ConfigError, StackConfig, add_arguments, load_config


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--http-addr", "127.0.0.1:99999"),
        ("--grpc-addr", "127.0.0.1:65536"),
        ("--stun-addr", ":-1"),
        ("--stun-addr", "[::1]:70000"),
        ("--http-addr", "127.0.0.1:"),
    ],
)
def test_bad_port_names_the_flag(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_args(flag, value), env={})
    assert str(info.value).startswith(flag + ": ") and value in str(info.value)


def test_bad_port_from_env_and_toml_names_the_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^environment TAILNET_GRPC_ADDR: port 99999"):
        load_config(_args(), env={"TAILNET_GRPC_ADDR": "127.0.0.1:99999"})
    cfg = tmp_path / "t.toml"
    cfg.write_text('stun_addr = "127.0.0.1:123456"\n')
    with pytest.raises(ConfigError, match=r"^config file .*t\.toml: stun_addr: port 123456"):
        load_config(_args("--config", str(cfg)), env={})
    with pytest.raises(ConfigError, match="^http_addr: port 99999"):
        StackConfig(http_addr="127.0.0.1:99999")


def test_valid_addresses_and_off() -> None:
    c = load_config(
        _args("--http-addr", "127.0.0.1:65535", "--grpc-addr", "off", "--stun-addr", "[::1]:0"),
        env={},
    )
    assert (c.http_addr, c.grpc_addr, c.stun_addr) == ("127.0.0.1:65535", None, "[::1]:0")


def test_serve_with_bad_port_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--stun-addr", "127.0.0.1:99999", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--stun-addr: port 99999 out of range" in err
