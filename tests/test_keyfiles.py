"""Secrets are created 0600 without following symlinks; private directories are 0700 and our own.

Specification (issue 14, item 10):
- a new secret is refused when anything is at its path: a file (whatever its mode) or a symlink,
  dangling or not; the symlink's target is never written;
- replacing a secret writes a new 0600 file and renames it over the path: a symlink there is
  replaced itself, and a permissive mode of the old file is not kept;
- the mode is exact whatever the umask;
- a private directory is made (or tightened to) 0700; a symlink, a file, another user's
  directory and a shared sticky directory such as /tmp are refused.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client.keyfiles import (
    UnsafePathError,
    ensure_private_dir,
    is_inside,
    write_private_file,
    write_public_file,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file an attacker wants overwritten (or read) by pointing a symlink at it."""
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    path.chmod(0o644)
    return path


def test_a_new_secret_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        write_private_file(tmp_path / "key", b"secret")
        write_private_file(tmp_path / "key2", b"secret", overwrite=True)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "key") == 0o600 and _mode(tmp_path / "key2") == 0o600
    assert (tmp_path / "key").read_bytes() == b"secret"


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_planted_at_a_new_secrets_path_is_refused_and_not_followed(
    tmp_path: Path, victim: Path, dangling: bool
) -> None:
    target = tmp_path / "not-yet-there" if dangling else victim
    (tmp_path / "key").symlink_to(target)
    with pytest.raises(FileExistsError, match="is a symlink"):
        write_private_file(tmp_path / "key", b"secret")
    assert victim.read_text() == "precious" and not (tmp_path / "not-yet-there").exists()
    with pytest.raises(FileExistsError, match="is a symlink"):
        write_public_file(tmp_path / "key", b"public")


def test_an_existing_permissive_file_is_refused_not_reused(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"old")
    (tmp_path / "key").chmod(0o666)
    with pytest.raises(FileExistsError, match="already exists .mode 0666."):
        write_private_file(tmp_path / "key", b"secret")
    assert (tmp_path / "key").read_bytes() == b"old"


def test_replacing_swaps_in_a_new_0600_file_and_replaces_a_symlink_itself(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "key").write_bytes(b"old")
    (tmp_path / "key").chmod(0o644)
    write_private_file(tmp_path / "key", b"new", overwrite=True)
    assert (tmp_path / "key").read_bytes() == b"new" and _mode(tmp_path / "key") == 0o600

    (tmp_path / "planted").symlink_to(victim)
    write_private_file(tmp_path / "planted", b"secret", overwrite=True)
    assert not (tmp_path / "planted").is_symlink() and _mode(tmp_path / "planted") == 0o600
    assert victim.read_text() == "precious" and _mode(victim) == 0o644
    write_public_file(tmp_path / "cert", b"pem", overwrite=True)
    assert _mode(tmp_path / "cert") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert", "key", "planted", "victim.txt"]  # no temp left


def test_a_directory_is_not_replaced_by_a_secret(tmp_path: Path) -> None:
    (tmp_path / "key").mkdir()
    with pytest.raises(IsADirectoryError):
        write_private_file(tmp_path / "key", b"secret", overwrite=True)


def test_a_private_directory_is_created_or_tightened_to_0700(tmp_path: Path) -> None:
    created = ensure_private_dir(tmp_path / "a" / "work")
    assert _mode(created) == 0o700
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o755)
    ensure_private_dir(tmp_path / "open")
    assert _mode(tmp_path / "open") == 0o700


def test_a_private_directory_refuses_a_symlink_a_file_and_a_shared_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePathError, match="is a symlink"):
        ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private_dir(tmp_path / "file")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o1777)
    with pytest.raises(UnsafePathError, match="shared directory"):
        ensure_private_dir(tmp_path / "shared")
    assert _mode(tmp_path / "shared") == 0o1777  # refused, and left as it was


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown to another user")
def test_a_private_directory_refuses_another_users_directory(tmp_path: Path) -> None:
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", 65534, 65534)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        ensure_private_dir(tmp_path / "theirs")


def test_is_inside_resolves_symlinks(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    assert is_inside(tmp_path / "alias" / "x.jsonl", tmp_path / "run")
    assert is_inside(tmp_path / "run", tmp_path / "run")
    assert not is_inside(tmp_path / "run-2" / "x", tmp_path / "run")
