"""Dataset manifests, signatures and data validation on the client."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client import integrity
from client.data import export_partitions
from client.integrity import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    DataIntegrityError,
    DataValidationError,
    generate_signing_key,
    load_private_key,
    load_public_key,
    load_verified_npz,
    validate_arrays,
    verify_manifest,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
NUM_FEATURES = 6


def _clean_arrays(rows: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((rows, NUM_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=rows).astype(np.int64)
    return x, y


@pytest.fixture
def owner_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def data_dir(tmp_path: Path, owner_key: Ed25519PrivateKey) -> Path:
    """A signed data directory: two partitions and a nested README."""
    directory = tmp_path / "data"
    (directory / "docs").mkdir(parents=True)
    for part in range(2):
        x, y = _clean_arrays(seed=part)
        np.savez(directory / f"part-{part}.npz", x=x, y=y)
    (directory / "docs" / "README.txt").write_text("digits partitions\n")
    write_manifest(directory, private_key=owner_key)
    return directory


# --------------------------------------------------------------------------- manifests


def test_manifest_lists_every_data_file_with_its_sha256(data_dir: Path) -> None:
    manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    assert manifest["version"] == 2
    assert sorted(manifest["files"]) == ["docs/README.txt", "part-0.npz", "part-1.npz"]
    for relative, digest in manifest["files"].items():
        assert hashlib.sha256((data_dir / relative).read_bytes()).hexdigest() == digest
    assert len((data_dir / SIGNATURE_NAME).read_bytes()) == 64  # raw Ed25519 signature


def test_a_signed_manifest_verifies_and_returns_its_digest(data_dir: Path, owner_key: Ed25519PrivateKey) -> None:
    digest = verify_manifest(data_dir, public_key=owner_key.public_key(), require_signature=True)
    assert digest == hashlib.sha256((data_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    assert verify_manifest(data_dir) == digest  # the hashes alone, without checking the signature


def test_public_key_accepted_as_raw_bytes_pem_bytes_or_pem_file(
    data_dir: Path, owner_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    public = owner_key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "owner.pub.pem").write_bytes(pem)
    for form in (raw, pem, tmp_path / "owner.pub.pem"):
        verify_manifest(data_dir, public_key=form, require_signature=True)


def test_one_changed_byte_in_a_data_file_is_refused_naming_the_file(data_dir: Path) -> None:
    target = data_dir / "part-1.npz"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(DataIntegrityError, match=r"part-1\.npz: SHA-256 differs") as caught:
        verify_manifest(data_dir)
    assert caught.value.path == target


def test_a_missing_listed_file_is_refused_naming_it(data_dir: Path) -> None:
    (data_dir / "docs" / "README.txt").unlink()
    with pytest.raises(DataIntegrityError, match=r"README\.txt: listed in the manifest but missing"):
        verify_manifest(data_dir)


def test_an_extra_unlisted_file_is_refused_naming_it(data_dir: Path) -> None:
    x, y = _clean_arrays(seed=9)
    np.savez(data_dir / "part-poison.npz", x=x, y=y)
    with pytest.raises(DataIntegrityError, match=r"part-poison\.npz: not listed in the manifest"):
        verify_manifest(data_dir)


def test_a_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataIntegrityError, match=r"manifest\.json: manifest missing"):
        verify_manifest(tmp_path)


def test_a_manifest_edited_to_match_tampered_data_fails_the_signature(
    data_dir: Path, owner_key: Ed25519PrivateKey
) -> None:
    target = data_dir / "part-0.npz"
    x, y = _clean_arrays(seed=0)
    y[:] = 3  # relabel everything: a poisoning attempt
    np.savez(target, x=x, y=y)
    manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    manifest["files"]["part-0.npz"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (data_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert verify_manifest(data_dir)  # consistent hashes: only the signature can expose the edit
    with pytest.raises(DataIntegrityError, match=r"manifest\.sig: invalid signature"):
        verify_manifest(data_dir, public_key=owner_key.public_key())


def test_a_signature_from_another_key_is_refused(data_dir: Path) -> None:
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(DataIntegrityError, match=r"manifest\.sig: invalid signature"):
        verify_manifest(data_dir, public_key=stranger.public_key(), require_signature=True)


def test_an_unsigned_manifest_is_refused_when_a_signature_is_required(
    data_dir: Path, owner_key: Ed25519PrivateKey
) -> None:
    write_manifest(data_dir)  # re-written without a key: the stale signature is removed
    assert not (data_dir / SIGNATURE_NAME).exists()
    verify_manifest(data_dir)
    with pytest.raises(DataIntegrityError, match=r"manifest\.sig: signature missing"):
        verify_manifest(data_dir, public_key=owner_key.public_key(), require_signature=True)


def test_requiring_a_signature_without_a_key_is_a_usage_error(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="public_key"):
        verify_manifest(data_dir, require_signature=True)


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        ("{not json", "malformed manifest"),
        ('{"version": 3, "files": {}}', "unsupported manifest"),
        ('{"version": 1, "files": {}, "partition-id": 1}', "version 1 has no 'partition-id'"),
        ('{"version": 2, "files": {}, "partition-id": -1}', "'partition-id' must be >= 0"),
        ('{"version": 2, "files": {}, "dataset-version": "3"}', "'dataset-version' must be an integer"),
        ('{"version": 2, "files": {}, "expires": "2030-01-01T00:00:00"}', "has no time zone"),
        ('{"version": 2, "files": {}, "expires": "soon"}', "not an ISO 8601 time"),
        ('{"version": 1, "files": {"../outside.npz": "' + "0" * 64 + '"}}', "unsafe path"),
        ('{"version": 1, "files": {"/etc/passwd": "' + "0" * 64 + '"}}', "unsafe path"),
        ('{"version": 1, "files": {"part-0.npz": "xyz"}}', "malformed digest"),
    ],
)
def test_malformed_manifests_are_refused(data_dir: Path, manifest: str, reason: str) -> None:
    (data_dir / MANIFEST_NAME).write_text(manifest)
    with pytest.raises(DataIntegrityError, match=reason):
        verify_manifest(data_dir)


# --------------------------------------------------------------------------- keys


def test_generated_key_files_sign_and_verify(tmp_path: Path) -> None:
    generate_signing_key(tmp_path / "keys" / "owner.pem", tmp_path / "keys" / "owner.pub.pem")
    if sys.platform != "win32":
        assert (tmp_path / "keys" / "owner.pem").stat().st_mode & 0o077 == 0
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "a.bin").write_bytes(b"\x00\x01")
    write_manifest(directory, private_key=load_private_key(tmp_path / "keys" / "owner.pem"))
    verify_manifest(directory, public_key=tmp_path / "keys" / "owner.pub.pem", require_signature=True)


def test_public_key_material_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(b"definitely not a key")


# --------------------------------------------------------------------------- validation


def _validate(x: np.ndarray, y: np.ndarray, **overrides: object) -> None:
    options: dict = {
        "num_classes": NUM_CLASSES,
        "feature_range": (0.0, 1.0),
        "expected_features": NUM_FEATURES,
        "source": "client-3/part-0.npz",
    }
    options.update(overrides)
    validate_arrays(x, y, **options)


def test_clean_arrays_pass_validation() -> None:
    _validate(*_clean_arrays())


def test_label_out_of_range_names_file_row_and_label() -> None:
    x, y = _clean_arrays()
    y[7] = NUM_CLASSES
    y[12] = -1
    with pytest.raises(DataValidationError, match=r"client-3/part-0\.npz: row 7: label 10 outside \[0, 10\)") as caught:
        _validate(x, y)
    assert (caught.value.source, caught.value.row) == ("client-3/part-0.npz", 7)
    assert "1 more bad rows" in str(caught.value)


def test_nan_feature_names_file_row_and_column() -> None:
    x, y = _clean_arrays()
    x[4, 2] = np.nan
    with pytest.raises(DataValidationError, match=r"part-0\.npz: row 4: feature 2 is nan \(not finite\)"):
        _validate(x, y)


def test_infinite_feature_is_refused_even_without_a_range() -> None:
    x, y = _clean_arrays()
    x[9, 0] = np.inf
    with pytest.raises(DataValidationError, match=r"row 9: feature 0 is inf"):
        _validate(x, y, feature_range=None)


def test_wrong_feature_count_names_file_and_row() -> None:
    x, y = _clean_arrays()
    with pytest.raises(DataValidationError, match=r"part-0\.npz: row 0: 5 features per row, expected 6"):
        _validate(x[:, :5], y)


def test_out_of_range_feature_names_file_row_column_and_value() -> None:
    x, y = _clean_arrays()
    x[15, 3] = 1.5
    with pytest.raises(DataValidationError, match=r"row 15: feature 3 = 1\.5 outside \[0\.0, 1\.0\]"):
        _validate(x, y)
    _validate(x, y, feature_range=(0.0, 2.0))


def test_the_first_bad_row_is_named_with_all_its_problems() -> None:
    x, y = _clean_arrays()
    x[11, 1] = -3.0
    x[5, 0] = np.nan
    y[5] = 42
    with pytest.raises(DataValidationError, match=r"row 5: label 42 outside .*; feature 0 is nan") as caught:
        _validate(x, y)
    assert caught.value.row == 5


@pytest.mark.parametrize(
    ("x", "y", "reason"),
    [
        (np.zeros((4, NUM_FEATURES), np.float32), np.zeros(3, np.int64), r"row 3: 4 feature rows but 3 labels"),
        (np.zeros((4, NUM_FEATURES), np.int64), np.zeros(4, np.int64), "floating point"),
        (np.zeros((4, NUM_FEATURES), np.float32), np.zeros(4, np.float32), "labels must be integers"),
        (np.zeros((4, NUM_FEATURES), np.float32), np.zeros(4, bool), "labels must be integers"),
        (np.zeros((4, 2, 3), np.float32), np.zeros(4, np.int64), "2-D"),
        (np.zeros((0, NUM_FEATURES), np.float32), np.zeros(0, np.int64), "no samples"),
    ],
)
def test_malformed_arrays_are_refused(x: np.ndarray, y: np.ndarray, reason: str) -> None:
    with pytest.raises(DataValidationError, match=reason):
        _validate(x, y)


def test_validation_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        _validate(*_clean_arrays(), num_classes=0)
    with pytest.raises(ValueError, match="feature_range"):
        _validate(*_clean_arrays(), feature_range=(1.0, 0.0))


# --------------------------------------------------------------------------- verified loading


def test_load_verified_npz_returns_typed_arrays_and_the_manifest_digest(
    data_dir: Path, owner_key: Ed25519PrivateKey
) -> None:
    x, y, digest = load_verified_npz(
        data_dir / "part-1.npz", public_key=owner_key.public_key(), require_signature=True, num_classes=NUM_CLASSES
    )
    expected_x, expected_y = _clean_arrays(seed=1)
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, expected_x)
    np.testing.assert_array_equal(y, expected_y)
    assert digest == verify_manifest(data_dir)


def test_load_verified_npz_converts_float64_and_int32(tmp_path: Path) -> None:
    x, y = _clean_arrays()
    np.savez(tmp_path / "d.npz", x=x.astype(np.float64), y=y.astype(np.int32))
    write_manifest(tmp_path)
    loaded_x, loaded_y, _ = load_verified_npz(tmp_path / "d.npz", num_classes=NUM_CLASSES)
    assert loaded_x.dtype == np.float32 and loaded_y.dtype == np.int64
    np.testing.assert_array_equal(loaded_y, y)


def test_load_verified_npz_refuses_tampered_data_before_reading_it(data_dir: Path) -> None:
    x, y = _clean_arrays(seed=0)
    np.savez(data_dir / "part-0.npz", x=x, y=(y + 1) % NUM_CLASSES)
    with pytest.raises(DataIntegrityError, match=r"part-0\.npz"):
        load_verified_npz(data_dir / "part-0.npz", num_classes=NUM_CLASSES)


def test_load_verified_npz_names_the_file_and_row_of_invalid_data(tmp_path: Path) -> None:
    x, y = _clean_arrays()
    y[13] = 99
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    write_manifest(tmp_path)  # intact and signed-off, but still wrong: validation catches it
    with pytest.raises(DataValidationError, match=r"bad\.npz: row 13: label 99"):
        load_verified_npz(tmp_path / "bad.npz", num_classes=NUM_CLASSES)


def test_load_verified_npz_refuses_pickled_arrays_and_missing_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "pickled.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    np.savez(tmp_path / "no-labels.npz", x=np.zeros((2, 3), np.float32))
    write_manifest(tmp_path)
    with pytest.raises(DataValidationError, match=r"pickled\.npz: cannot read arrays"):
        load_verified_npz(tmp_path / "pickled.npz", num_classes=NUM_CLASSES)
    with pytest.raises(DataValidationError, match=r"no-labels\.npz: missing array\(s\) y"):
        load_verified_npz(tmp_path / "no-labels.npz", num_classes=NUM_CLASSES)


def test_load_verified_npz_refuses_values_that_overflow_float32(tmp_path: Path) -> None:
    x, y = _clean_arrays()
    x64 = x.astype(np.float64)
    x64[6, 1] = 1e300
    np.savez(tmp_path / "huge.npz", x=x64, y=y)
    write_manifest(tmp_path)
    with pytest.raises(DataValidationError, match=r"huge\.npz: row 6: .*float32"):
        load_verified_npz(tmp_path / "huge.npz", num_classes=NUM_CLASSES, feature_range=None)


# --------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.integrity", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


def test_cli_keygen_sign_and_verify(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    np.savez(directory / "part.npz", x=np.zeros((2, 2), np.float32), y=np.zeros(2, np.int64))
    private, public = tmp_path / "owner.pem", tmp_path / "owner.pub.pem"
    assert _cli("keygen", str(private), str(public)).returncode == 0
    assert _cli("sign", str(directory), "--key", str(private)).returncode == 0
    verified = _cli("verify", str(directory), "--pubkey", str(public))
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"OK: {directory} manifest sha256 ")

    (directory / "part.npz").write_bytes(b"swapped")
    refused = _cli("verify", str(directory), "--pubkey", str(public))
    assert refused.returncode == 1 and "part.npz: SHA-256 differs" in refused.stderr


def test_cli_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    private, public = tmp_path / "owner.pem", tmp_path / "owner.pub.pem"
    assert _cli("keygen", str(private), str(public)).returncode == 0
    before = private.read_bytes()
    again = _cli("keygen", str(private), str(tmp_path / "other.pub.pem"))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert private.read_bytes() == before and not (tmp_path / "other.pub.pem").exists()


# --------------------------------------------------------------------------- item 5: one read, no swap


def _poisoned_copy(data_dir: Path, staging: Path) -> dict[str, Path]:
    """What an attacker without the key stages: relabelled data and a manifest whose hashes match it.

    The old manifest.sig stays in place (the attacker cannot sign). Returns name -> staged file.
    """
    staging.mkdir()
    shutil.copytree(data_dir, staging / "dir")
    x, y = _clean_arrays(seed=1)
    np.savez(staging / "dir" / "part-1.npz", x=x, y=np.full_like(y, 3))
    signature = (staging / "dir" / SIGNATURE_NAME).read_bytes()
    write_manifest(staging / "dir")  # consistent hashes, unsigned...
    (staging / "dir" / SIGNATURE_NAME).write_bytes(signature)  # ...under the genuine, now stale, signature
    return {name: staging / "dir" / name for name in ("part-1.npz", MANIFEST_NAME)}


class _SwapAfterAccess:
    """Counts every open/read of a file under ``data_dir`` by client.integrity; after access number
    ``swap_at`` it renames the attacker's files into place (an open descriptor keeps the old inode,
    as with a real rename race)."""

    def __init__(self, data_dir: Path, staged: dict[str, Path] | None, swap_at: int | None) -> None:
        self.data_dir, self.staged, self.swap_at, self.accesses = data_dir, staged, swap_at, 0

    def _after_access(self, path: object) -> None:
        if Path(str(path)).resolve().parent != self.data_dir.resolve():
            return
        self.accesses += 1
        if self.accesses == self.swap_at and self.staged:
            for name, staged in self.staged.items():
                os.replace(staged, self.data_dir / name)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_read_bytes = builtins.open, Path.read_bytes

        def counting_open(file, *args, **kwargs):
            handle = real_open(file, *args, **kwargs)
            self._after_access(file)
            return handle

        def counting_read_bytes(path: Path) -> bytes:
            data = real_read_bytes(path)
            self._after_access(path)
            return data

        # client.integrity looks `open` up in its module globals first, then in builtins.
        monkeypatch.setattr(integrity, "open", counting_open, raising=False)
        monkeypatch.setattr(Path, "read_bytes", counting_read_bytes)


def test_files_swapped_at_any_moment_get_a_refusal_or_the_signed_data_never_other_data(
    data_dir: Path, owner_key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 14, item 5: the signature was checked over one read of manifest.json and the hashes
    # taken from a second read, so a manifest swapped in between got unsigned data accepted.
    def load(directory: Path) -> tuple[np.ndarray, np.ndarray, str]:
        return load_verified_npz(directory / "part-1.npz", public_key=owner_key.public_key(),
                                 require_signature=True, num_classes=NUM_CLASSES)

    clean = _SwapAfterAccess(data_dir, None, None)
    with monkeypatch.context() as patch:
        clean.install(patch)
        genuine_x, genuine_y, genuine_digest = load(data_dir)
    assert clean.accesses >= 3  # manifest, signature, the data files
    outcomes = []
    for swap_at in range(1, clean.accesses + 1):
        directory = tmp_path / f"swap-{swap_at}"
        shutil.copytree(data_dir, directory)
        staged = _poisoned_copy(directory, tmp_path / f"staging-{swap_at}")
        swapper = _SwapAfterAccess(directory, staged, swap_at)
        with monkeypatch.context() as patch:
            swapper.install(patch)
            try:
                x, y, digest = load(directory)
            except DataIntegrityError as refused:
                outcomes.append(("refused", swap_at, str(refused)))
                continue
        assert swapper.accesses >= swap_at, "the swap never happened"
        np.testing.assert_array_equal(y, genuine_y, err_msg=f"swap after access {swap_at}: poisoned labels accepted")
        np.testing.assert_array_equal(x, genuine_x)
        assert digest == genuine_digest
        outcomes.append(("genuine", swap_at, digest))
    assert any(kind == "refused" for kind, *_ in outcomes)


def test_the_digest_returned_is_of_the_manifest_bytes_that_were_verified(
    data_dir: Path, owner_key: Ed25519PrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    genuine = verify_manifest(data_dir, public_key=owner_key.public_key())
    staged = _poisoned_copy(data_dir, tmp_path / "staging")
    swapper = _SwapAfterAccess(data_dir, {MANIFEST_NAME: staged[MANIFEST_NAME]}, 1)  # right after the first read
    swapper.install(monkeypatch)
    manifest = integrity.read_verified_manifest(data_dir, public_key=owner_key.public_key())
    assert manifest.digest == genuine and manifest.signed
    assert (data_dir / MANIFEST_NAME).read_bytes() != b""  # the file on disk is the attacker's by now
    assert hashlib.sha256((data_dir / MANIFEST_NAME).read_bytes()).hexdigest() != genuine


# --------------------------------------------------------------------------- item 6: bindings


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def _bound_dir(tmp_path: Path, key: Ed25519PrivateKey | None, **bindings: object) -> Path:
    directory = tmp_path / "bound"
    directory.mkdir()
    x, y = _clean_arrays(seed=2)
    np.savez(directory / "train.npz", x=x, y=y)
    write_manifest(directory, private_key=key, **bindings)
    return directory


def _load_bound(directory: Path, key: Ed25519PrivateKey | None, **expected: object):
    return load_verified_npz(directory / "train.npz", public_key=key.public_key() if key else None,
                             require_signature=key is not None, num_classes=NUM_CLASSES, now=NOW, **expected)


def test_a_signed_manifest_binds_dataset_partition_version_and_expiry(
    tmp_path: Path, owner_key: Ed25519PrivateKey
) -> None:
    directory = _bound_dir(tmp_path, owner_key, dataset_id="clinic-2026", partition_id=3, version=4,
                           expires="2026-12-31T00:00:00+00:00")
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert (manifest["dataset-id"], manifest["partition-id"], manifest["dataset-version"], manifest["expires"]) == (
        "clinic-2026", 3, 4, "2026-12-31T00:00:00Z")
    _, _, digest = _load_bound(directory, owner_key, expected_dataset="clinic-2026", expected_partition=3,
                               min_version=4)
    assert digest == hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest()
    _load_bound(directory, owner_key, expected_partition="3", min_version=2)  # "3" and 3 are the same partition


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({"expected_partition": 2}, r"manifest partition-id is 3, this node expects 2"),
        ({"expected_dataset": "clinic-2025"}, r"manifest dataset-id is 'clinic-2026', this node expects 'clinic-2025'"),
        ({"min_version": 5}, r"manifest dataset-version is 4, this node expects >= 5"),
    ],
)
def test_a_binding_other_than_the_node_expects_is_refused_naming_field_and_both_values(
    tmp_path: Path, owner_key: Ed25519PrivateKey, expected: dict, message: str
) -> None:
    directory = _bound_dir(tmp_path, owner_key, dataset_id="clinic-2026", partition_id=3, version=4)
    with pytest.raises(DataIntegrityError, match=message) as caught:
        _load_bound(directory, owner_key, **expected)
    assert caught.value.path == directory / MANIFEST_NAME


def test_one_partitions_signed_folder_is_refused_as_another_partitions(
    tmp_path: Path, owner_key: Ed25519PrivateKey
) -> None:
    folders = export_partitions("digits", 3, 0.0, 0, tmp_path / "data", private_key=owner_key)
    public = owner_key.public_key()
    for partition_id, folder in enumerate(folders):
        load_verified_npz(folder / "train.npz", public_key=public, require_signature=True, num_classes=10,
                          expected_dataset="digits", expected_partition=partition_id)
    # Node 2 is handed node 0's intact, correctly signed folder.
    with pytest.raises(DataIntegrityError, match="manifest partition-id is 0, this node expects 2"):
        load_verified_npz(folders[0] / "train.npz", public_key=public, require_signature=True, num_classes=10,
                          expected_dataset="digits", expected_partition=2)


def test_an_expired_manifest_is_refused_naming_both_times(tmp_path: Path, owner_key: Ed25519PrivateKey) -> None:
    directory = _bound_dir(tmp_path, owner_key, expires=datetime(2026, 6, 1, 11, 59, tzinfo=timezone.utc))
    with pytest.raises(DataIntegrityError, match=r"expires is 2026-06-01T11:59:00Z, it is now 2026-06-01T12:00:00Z"):
        _load_bound(directory, owner_key)
    with pytest.raises(DataIntegrityError, match="expired"):
        _load_bound(directory, None)  # an expiry is honoured even when nobody checks the signature
    load_verified_npz(directory / "train.npz", num_classes=NUM_CLASSES,
                      now=datetime(2026, 6, 1, 11, 58, tzinfo=timezone.utc))


def test_a_signed_manifest_without_the_expected_binding_is_refused(
    tmp_path: Path, owner_key: Ed25519PrivateKey
) -> None:
    directory = _bound_dir(tmp_path, owner_key)  # signed, but binds nothing: any partition's, any release
    with pytest.raises(DataIntegrityError, match=r"signed manifest binds no partition-id, this node expects 1"):
        _load_bound(directory, owner_key, expected_partition=1)
    with pytest.raises(DataIntegrityError, match=r"binds no dataset-version, this node expects >= 2"):
        _load_bound(directory, owner_key, min_version=2)
    _load_bound(directory, owner_key)  # no expectation: accepted as before


def test_unsigned_manifests_keep_working_and_a_differing_binding_still_catches_a_mix_up(tmp_path: Path) -> None:
    directory = _bound_dir(tmp_path, None)
    _load_bound(directory, None, expected_dataset="digits", expected_partition=1, min_version=1)
    write_manifest(directory, partition_id=0)
    with pytest.raises(DataIntegrityError, match="partition-id is 0, this node expects 1"):
        _load_bound(directory, None, expected_partition=1)


def test_a_version_1_manifest_still_verifies(tmp_path: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "a.bin").write_bytes(b"abc")
    (directory / MANIFEST_NAME).write_text(json.dumps({"version": 1, "files": {
        "a.bin": hashlib.sha256(b"abc").hexdigest()}}))
    assert verify_manifest(directory, expected_partition=4) == hashlib.sha256(
        (directory / MANIFEST_NAME).read_bytes()).hexdigest()


def test_the_signature_covers_the_bindings(tmp_path: Path, owner_key: Ed25519PrivateKey) -> None:
    directory = _bound_dir(tmp_path, owner_key, partition_id=3, version=1)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["partition-id"], manifest["dataset-version"] = 2, 9
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(DataIntegrityError, match=r"manifest\.sig: invalid signature"):
        _load_bound(directory, owner_key, expected_partition=2)


@pytest.mark.parametrize(
    ("bindings", "error", "message"),
    [
        ({"expires": "2026-12-31T00:00:00"}, ValueError, "no time zone"),
        ({"expires": datetime(2026, 12, 31)}, ValueError, "no time zone"),
        ({"version": -1}, ValueError, "version must be an integer >= 0"),
        ({"dataset_id": ""}, ValueError, "dataset_id"),
        ({"partition_id": True}, TypeError, "partition_id"),
    ],
)
def test_malformed_bindings_are_refused_when_signing(tmp_path: Path, bindings: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        write_manifest(tmp_path, **bindings)


def test_cli_signs_bindings_and_verify_checks_them(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    np.savez(directory / "train.npz", x=np.zeros((2, 2), np.float32), y=np.zeros(2, np.int64))
    private, public = tmp_path / "owner.pem", tmp_path / "owner.pub.pem"
    assert _cli("keygen", str(private), str(public)).returncode == 0
    signed = _cli("sign", str(directory), "--key", str(private), "--dataset-id", "clinic", "--partition-id", "3",
                  "--version", "2", "--expires", "2999-01-01T00:00:00Z")
    assert signed.returncode == 0, signed.stderr
    ok = _cli("verify", str(directory), "--pubkey", str(public), "--dataset-id", "clinic", "--partition-id", "3",
              "--min-version", "2")
    assert ok.returncode == 0, ok.stderr
    wrong = _cli("verify", str(directory), "--pubkey", str(public), "--partition-id", "4")
    assert wrong.returncode == 1 and "manifest partition-id is 3, this node expects 4" in wrong.stderr
    expired = _cli("sign", str(directory), "--key", str(private), "--expires", "2000-01-01T00:00:00Z")
    assert expired.returncode == 0
    refused = _cli("verify", str(directory), "--pubkey", str(public))
    assert refused.returncode == 1 and "expired" in refused.stderr
