"""Secret files are written atomically with mode 0600 (derp.keys.write_secret_file)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from derp.keys import PrivateKey, load_or_create_server_key, write_secret_file


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_stale_tmp_file_does_not_set_the_mode(tmp_path: Path) -> None:
    """A pre-existing ``derper.key.tmp`` (0644 seen in the field) is not reused."""
    key_path = tmp_path / "derper.key"
    stale = tmp_path / "derper.key.tmp"
    stale.write_text("stale")
    stale.chmod(0o644)
    key = load_or_create_server_key(key_path)
    assert _mode(key_path) == 0o600
    assert stale.read_text() == "stale" and _mode(stale) == 0o644  # untouched
    assert load_or_create_server_key(key_path).public == key.public
    assert sorted(p.name for p in tmp_path.iterdir()) == ["derper.key", "derper.key.tmp"]


def test_symlink_where_a_tmp_file_would_go_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "derper.key.tmp").symlink_to(victim)
    load_or_create_server_key(tmp_path / "derper.key")
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "derper.key").is_symlink()


def test_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_secret_file(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    old = os.umask(0o077)
    try:
        write_secret_file(tmp_path / "b", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a") == _mode(tmp_path / "b") == 0o600


def test_replace_and_create_once(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "secret"
    write_secret_file(p, b"one", replace=False)
    assert p.read_bytes() == b"one" and _mode(p.parent) == 0o700
    with pytest.raises(FileExistsError):
        write_secret_file(p, b"two", replace=False)
    assert p.read_bytes() == b"one"
    p.chmod(0o644)
    write_secret_file(p, b"three")
    assert p.read_bytes() == b"three" and _mode(p) == 0o600
    assert [c.name for c in p.parent.iterdir()] == ["secret"]  # no temporary files left


def test_key_file_created_by_another_process_first_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes creating the key at once both end up with the key on disk."""
    p = tmp_path / "derper.key"
    theirs = PrivateKey.generate()
    real_link = os.link

    def racing_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        # the other process's file lands between our read and our link
        dst_path = Path(dst)
        dst_path.write_text(json.dumps({"PrivateKey": theirs.text()}))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert load_or_create_server_key(p).public == theirs.public
    assert [c.name for c in tmp_path.iterdir()] == ["derper.key"]
