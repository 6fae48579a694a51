"""Dataset manifests and data validation: a client checks its data before it trains on it.

A data owner runs :func:`write_manifest` (or ``python -m client.integrity sign DIR --key KEY.pem
--dataset-id ID --partition-id P --version V --expires WHEN``) over a data directory. It writes
``manifest.json``::

    {"dataset-id": "hospital-a-2026", "dataset-version": 3, "expires": "2026-12-31T00:00:00Z",
     "files": {"train.npz": "<sha256 hex>", "sub/labels.csv": "..."}, "partition-id": 3,
     "version": 2}

listing every regular file in the directory tree except the manifest and its signature, by
path relative to the directory (``/``-separated), and what the data is: which dataset, which
partition of it, which release (``dataset-version``) and until when it may be used
(``expires``, UTC ISO 8601). Each binding is optional. ``version`` is the manifest format (2;
format 1, with ``files`` only, still verifies). With a private key it also writes
``manifest.sig``: the raw 64-byte Ed25519 signature of the exact bytes of ``manifest.json``, so the
signature covers the bindings too.

Before training, the client calls :func:`verify_manifest` (or :func:`load_verified_npz`). Both
read ``manifest.json`` once, check the signature over those bytes and parse those same bytes
(a manifest swapped between the check and the parse cannot be used), refuse a binding that
differs from what the node expects (another partition's folder, an older release, an expired
manifest), then re-hash every file and refuse the directory when anything differs, is missing
or was added. :func:`load_verified_npz` reads its data file into memory once and both hashes
and loads those bytes. The SHA-256 of ``manifest.json`` is the dataset's identity for
provenance (the client reports it to the server, which records it in the audit log).

:func:`validate_arrays` then checks the contents: labels are integers in ``[0, num_classes)``,
features are finite floats of the expected count and within the valid range.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from client.keyfiles import generate_ed25519_key_files, load_ed25519_private_key, load_ed25519_public_key

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
#: The manifest format written; :data:`READABLE_MANIFEST_VERSIONS` are the ones verified.
MANIFEST_VERSION = 2
READABLE_MANIFEST_VERSIONS = (1, 2)
_CHUNK = 1 << 20
_BINDINGS = ("dataset-id", "partition-id", "dataset-version", "expires")


class DataIntegrityError(Exception):
    """A data directory does not match its manifest (or signature, or what the node expects).

    Attributes
    ----------
    path : Path
        The offending file (the data file, ``manifest.json`` or ``manifest.sig``).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


class DataValidationError(Exception):
    """Data that is intact but unusable (bad label, NaN, wrong shape...).

    Attributes
    ----------
    source : str
        The file (or other source) the data came from.
    row : int | None
        The first bad row, when the problem is in a row.
    """

    def __init__(self, source: str, row: int | None, reason: str) -> None:
        self.source = source
        self.row = row
        where = f"{source}: row {row}" if row is not None else source
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------- hashing and keys


def _read_bytes(path: Path) -> bytes:
    """The whole file, from one open: every check that follows uses these bytes, never a re-read."""
    with open(path, "rb") as file:
        return file.read()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_files(data_dir: Path) -> dict[str, Path]:
    """Every regular file under ``data_dir`` except the manifest and signature, by relative path."""
    found: dict[str, Path] = {}
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(data_dir).as_posix()
        if relative in (MANIFEST_NAME, SIGNATURE_NAME):
            continue
        found[relative] = path
    return found


# The data owner's key pair is an Ed25519 pair like the audit's: one implementation for both.
# generate_signing_key creates the private key 0600 with O_EXCL | O_NOFOLLOW and never overwrites.
load_private_key = load_ed25519_private_key
load_public_key = load_ed25519_public_key
generate_signing_key = generate_ed25519_key_files


# --------------------------------------------------------------------------- manifests


def _utc_iso(when: datetime | str, name: str) -> str:
    """``when`` as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); refuses a time without a time zone."""
    moment = _parse_time(when, name) if isinstance(when, str) else when
    if not isinstance(moment, datetime):
        raise TypeError(f"{name} must be a datetime or an ISO 8601 string, got {type(when).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} {moment.isoformat()!r} has no time zone: give it in UTC, e.g. 2026-12-31T00:00:00Z")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str, name: str) -> datetime:
    try:
        # Python 3.10's fromisoformat does not read a trailing "Z".
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError as exc:
        raise ValueError(f"{name} {text!r} is not an ISO 8601 time like 2026-12-31T00:00:00Z") from exc
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} {text!r} has no time zone: give it in UTC, e.g. 2026-12-31T00:00:00Z")
    return moment


def _check_partition_id(partition_id: object, name: str) -> int | str:
    if isinstance(partition_id, bool) or not isinstance(partition_id, (int, str)):
        raise TypeError(f"{name} must be an int or a str, got {type(partition_id).__name__}")
    if isinstance(partition_id, int) and partition_id < 0:
        raise ValueError(f"{name} must be >= 0, got {partition_id}")
    if isinstance(partition_id, str) and not partition_id:
        raise ValueError(f"{name} must not be empty")
    return partition_id


def write_manifest(
    data_dir: str | Path,
    *,
    private_key: Ed25519PrivateKey | None = None,
    dataset_id: str | None = None,
    partition_id: int | str | None = None,
    version: int | None = None,
    expires: datetime | str | None = None,
) -> Path:
    """Hash every data file in ``data_dir`` into ``manifest.json``; sign it when given a key.

    Parameters
    ----------
    data_dir : str or Path
        The data directory (searched recursively).
    private_key : Ed25519PrivateKey, optional
        Signs the manifest into ``manifest.sig``. Without it, a stale ``manifest.sig`` is
        removed (it could not match the new manifest).
    dataset_id : str, optional
        Which dataset this is (``dataset-id``); a node configured for another refuses it.
    partition_id : int or str, optional
        Which partition of it (``partition-id``); a node holding another partition refuses it.
    version : int, optional
        The release of the data (``dataset-version``, >= 0); a node that requires a newer
        release refuses it.
    expires : datetime or str, optional
        Until when the manifest is valid (a time-zone aware datetime or an ISO 8601 string with
        a zone); stored in UTC. Nobody accepts it afterwards.

    Returns
    -------
    Path
        The manifest's path.

    Raises
    ------
    ValueError, TypeError
        On a malformed binding (empty dataset id, negative version, a time without a zone).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataIntegrityError(data_dir, "not a directory")
    manifest: dict[str, object] = {"version": MANIFEST_VERSION}
    if dataset_id is not None:
        if not isinstance(dataset_id, str) or not dataset_id:
            raise ValueError(f"dataset_id must be a non-empty string, got {dataset_id!r}")
        manifest["dataset-id"] = dataset_id
    if partition_id is not None:
        manifest["partition-id"] = _check_partition_id(partition_id, "partition_id")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {version!r}")
        manifest["dataset-version"] = version
    if expires is not None:
        manifest["expires"] = _utc_iso(expires, "expires")
    manifest["files"] = {relative: _sha256_file(path) for relative, path in _data_files(data_dir).items()}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    manifest_path = data_dir / MANIFEST_NAME
    signature_path = data_dir / SIGNATURE_NAME
    manifest_path.write_bytes(manifest_bytes)
    if private_key is not None:
        signature_path.write_bytes(private_key.sign(manifest_bytes))
    elif signature_path.exists():
        signature_path.unlink()
    return manifest_path


@dataclass(frozen=True)
class Manifest:
    """A manifest as verified: parsed from the very bytes whose signature (if any) was checked.

    Attributes
    ----------
    path : Path
        ``manifest.json``.
    digest : str
        SHA-256 (hex) of those bytes: the dataset's provenance id.
    files : dict[str, str]
        Relative path -> SHA-256 of every listed file.
    signed : bool
        Whether a signature was checked (a public key was given) and held.
    dataset_id, partition_id, dataset_version, expires
        The bindings, None where the manifest has none.
    """

    path: Path
    digest: str
    files: dict[str, str]
    signed: bool
    dataset_id: str | None = None
    partition_id: int | str | None = None
    dataset_version: int | None = None
    expires: datetime | None = None


def _parse_manifest(manifest_path: Path, manifest_bytes: bytes, *, signed: bool) -> Manifest:
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataIntegrityError(manifest_path, f"malformed manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") not in READABLE_MANIFEST_VERSIONS:
        expected = f"expected an object with version {' or '.join(map(str, READABLE_MANIFEST_VERSIONS))}"
        raise DataIntegrityError(manifest_path, f"unsupported manifest: {expected}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise DataIntegrityError(manifest_path, "malformed manifest: 'files' must be an object")
    for relative, digest in files.items():
        parts = PurePosixPath(relative).parts
        # A listed path must stay inside the directory: no absolute paths, no "..".
        if not relative or relative.startswith("/") or ".." in parts or "\\" in relative:
            raise DataIntegrityError(manifest_path, f"unsafe path {relative!r} in manifest")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise DataIntegrityError(manifest_path, f"malformed digest for {relative!r}")
    present = [name for name in _BINDINGS if name in manifest]
    if manifest["version"] == 1 and present:
        raise DataIntegrityError(manifest_path, f"unsupported manifest: version 1 has no {present[0]!r}")
    try:
        dataset_id = manifest.get("dataset-id")
        if dataset_id is not None and (not isinstance(dataset_id, str) or not dataset_id):
            raise ValueError(f"'dataset-id' must be a non-empty string, got {dataset_id!r}")
        partition_id = manifest.get("partition-id")
        if partition_id is not None:
            _check_partition_id(partition_id, "'partition-id'")
        version = manifest.get("dataset-version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise ValueError(f"'dataset-version' must be an integer >= 0, got {version!r}")
        expires = manifest.get("expires")
        if expires is not None:
            if not isinstance(expires, str):
                raise ValueError(f"'expires' must be an ISO 8601 string, got {expires!r}")
            expires = _parse_time(expires, "'expires'")
    except (TypeError, ValueError) as exc:
        raise DataIntegrityError(manifest_path, f"malformed manifest: {exc}") from exc
    return Manifest(manifest_path, hashlib.sha256(manifest_bytes).hexdigest(), files, signed,
                    dataset_id, partition_id, version, expires)


def _check_bindings(
    manifest: Manifest,
    *,
    expected_dataset: str | None,
    expected_partition: int | str | None,
    min_version: int | None,
    now: datetime | None,
) -> None:
    """Refuse a manifest bound to other data than the node expects, naming the field and both values.

    A binding the manifest lacks is refused only when the manifest is signed: an unsigned
    manifest's fields prove nothing, so a missing one is tolerated as before (but a present one
    that differs still catches a mixed-up folder). A signed manifest without the field could be
    any partition's or an old release's, which is exactly what the binding is there to stop.
    """
    path = manifest.path
    checks = [
        ("dataset-id", manifest.dataset_id, expected_dataset, lambda have, want: have == want),
        ("partition-id", manifest.partition_id, expected_partition, lambda have, want: str(have) == str(want)),
        ("dataset-version", manifest.dataset_version, min_version, lambda have, want: have >= want),
    ]
    for field, have, want, holds in checks:
        if want is None:
            continue
        relation = f">= {want!r}" if field == "dataset-version" else repr(want)
        if have is None:
            if manifest.signed:
                raise DataIntegrityError(
                    path, f"signed manifest binds no {field}, this node expects {relation}: it could be any "
                          f"{'release' if field == 'dataset-version' else field.split('-')[0]}'s data"
                )
            continue
        if not holds(have, want):
            raise DataIntegrityError(path, f"manifest {field} is {have!r}, this node expects {relation}")
    if manifest.expires is not None:
        moment = datetime.now(timezone.utc) if now is None else now
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError(f"now {moment.isoformat()!r} must be time-zone aware (UTC)")
        if moment >= manifest.expires:
            raise DataIntegrityError(
                path, f"manifest expires is {_utc_iso(manifest.expires, 'expires')}, it is now "
                      f"{_utc_iso(moment, 'now')}: expired"
            )


def read_verified_manifest(
    data_dir: str | Path,
    *,
    public_key: Ed25519PublicKey | bytes | Path | None = None,
    require_signature: bool = False,
    expected_dataset: str | None = None,
    expected_partition: int | str | None = None,
    min_version: int | None = None,
    now: datetime | None = None,
) -> Manifest:
    """Read ``manifest.json`` once, check its signature and bindings, and parse those same bytes.

    The files it lists are not hashed here (see :func:`verify_manifest`). Parameters as for
    :func:`verify_manifest`.
    """
    data_dir = Path(data_dir)
    if require_signature and public_key is None:
        raise ValueError("require_signature=True needs the data owner's public_key to check the signature")
    manifest_path = data_dir / MANIFEST_NAME
    try:
        manifest_bytes = _read_bytes(manifest_path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise DataIntegrityError(manifest_path, "manifest missing") from exc
    if public_key is not None:
        key = load_public_key(public_key)
        signature_path = data_dir / SIGNATURE_NAME
        try:
            signature = _read_bytes(signature_path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise DataIntegrityError(signature_path, "signature missing but required") from exc
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature as exc:
            raise DataIntegrityError(
                signature_path, "invalid signature: the manifest was altered or signed with another key"
            ) from exc
    manifest = _parse_manifest(manifest_path, manifest_bytes, signed=public_key is not None)
    _check_bindings(manifest, expected_dataset=expected_dataset, expected_partition=expected_partition,
                    min_version=min_version, now=now)
    return manifest


def _check_files(data_dir: Path, listed: dict[str, str], *, skip: str | None = None) -> None:
    """Every listed file present with its hash, nothing unlisted; ``skip`` is checked by the caller."""
    present = _data_files(data_dir)
    for relative in sorted(listed):
        path = data_dir / relative
        if relative not in present:
            raise DataIntegrityError(path, "listed in the manifest but missing")
        if relative != skip and _sha256_file(path) != listed[relative]:
            raise DataIntegrityError(path, "SHA-256 differs from the manifest (file modified)")
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        others = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise DataIntegrityError(data_dir / unlisted[0], f"not listed in the manifest{others}")


def verify_manifest(
    data_dir: str | Path,
    *,
    public_key: Ed25519PublicKey | bytes | Path | None = None,
    require_signature: bool = False,
    expected_dataset: str | None = None,
    expected_partition: int | str | None = None,
    min_version: int | None = None,
    now: datetime | None = None,
) -> str:
    """Check a data directory against its manifest (and signature); return the manifest digest.

    Parameters
    ----------
    data_dir : str or Path
        The data directory.
    public_key : Ed25519PublicKey, bytes or Path, optional
        The data owner's public key (object, 32 raw bytes, PEM bytes, or a PEM file). When
        given, ``manifest.sig`` must exist and be valid: a key means the caller wants
        provenance, and an attacker could otherwise simply delete the signature.
    require_signature : bool, default False
        Demand a signature; this needs ``public_key`` (a signature no one checks proves nothing).
    expected_dataset : str, optional
        The ``dataset-id`` the manifest must carry.
    expected_partition : int or str, optional
        The ``partition-id`` the manifest must carry (compared as text: 3 and "3" agree).
    min_version : int, optional
        The oldest ``dataset-version`` accepted.
    now : datetime, optional
        The time ``expires`` is compared with (time-zone aware); the current UTC time by default.
        A manifest with an ``expires`` is refused from that moment on, whether signed or not.

    A binding the manifest lacks is refused when the manifest is signed (``public_key`` given)
    and the caller expects one; an unsigned manifest without it is accepted as before.

    Returns
    -------
    str
        SHA-256 (hex) of the exact ``manifest.json`` bytes that were verified: the dataset's
        provenance id.

    Raises
    ------
    DataIntegrityError
        Naming the file, when: the manifest is missing or malformed, a binding differs from the
        expected one (naming the field and both values) or the manifest expired, a listed file is
        missing, a file's hash differs, an unlisted file is present, or the signature is missing
        while required or invalid.
    ValueError
        When ``require_signature`` is set without a ``public_key``.
    """
    data_dir = Path(data_dir)
    manifest = read_verified_manifest(data_dir, public_key=public_key, require_signature=require_signature,
                                      expected_dataset=expected_dataset, expected_partition=expected_partition,
                                      min_version=min_version, now=now)
    _check_files(data_dir, manifest.files)
    return manifest.digest


# --------------------------------------------------------------------------- data validation


def validate_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    feature_range: tuple[float, float] | None,
    expected_features: int | None,
    source: str,
) -> None:
    """Check features and labels before training; name the first bad row and what is wrong.

    Parameters
    ----------
    x : np.ndarray
        Features, (N, F) floating point.
    y : np.ndarray
        Labels, (N,) integer.
    num_classes : int
        Labels must lie in ``[0, num_classes)``.
    feature_range : tuple[float, float] or None
        Inclusive bounds every feature must lie in; None skips the check.
    expected_features : int or None
        Required F; None skips the check.
    source : str
        Where the data came from, for error messages.

    Raises
    ------
    DataValidationError
        On a shape, dtype or length problem (no row), an empty dataset, or on the first row
        that has a label out of range, a non-finite feature or a feature out of range (all the
        problems of that row are listed).
    ValueError
        On bad arguments (``num_classes < 1``, an empty ``feature_range``).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if feature_range is not None and not feature_range[0] <= feature_range[1]:
        raise ValueError(f"feature_range must be (low, high) with low <= high, got {feature_range}")
    if x.ndim != 2:
        raise DataValidationError(source, None, f"features must be 2-D (samples, features), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataValidationError(source, None, f"features must be floating point, got dtype {x.dtype}")
    if y.ndim != 1:
        raise DataValidationError(source, None, f"labels must be 1-D, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataValidationError(source, None, f"labels must be integers, got dtype {y.dtype}")
    if len(x) != len(y):
        shorter = min(len(x), len(y))
        raise DataValidationError(source, shorter, f"{len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise DataValidationError(source, None, "no samples")
    if expected_features is not None and x.shape[1] != expected_features:
        raise DataValidationError(source, 0, f"{x.shape[1]} features per row, expected {expected_features}")

    bad_label = (y < 0) | (y >= num_classes)
    non_finite = ~np.isfinite(x)
    if feature_range is not None:
        low, high = feature_range
        # NaN compares False both ways, so it counts only as non-finite, not as out of range.
        out_of_range = ((x < low) | (x > high)) & ~non_finite
    else:
        out_of_range = np.zeros_like(non_finite)
    bad_rows = bad_label | non_finite.any(axis=1) | out_of_range.any(axis=1)
    if not bad_rows.any():
        return
    row = int(np.argmax(bad_rows))
    problems = []
    if bad_label[row]:
        problems.append(f"label {int(y[row])} outside [0, {num_classes})")
    if non_finite[row].any():
        column = int(np.argmax(non_finite[row]))
        problems.append(f"feature {column} is {x[row, column]} (not finite)")
    if feature_range is not None and out_of_range[row].any():
        column = int(np.argmax(out_of_range[row]))
        low, high = feature_range
        problems.append(f"feature {column} = {float(x[row, column])!r} outside [{low}, {high}]")
    count = int(bad_rows.sum())
    others = f" ({count - 1} more bad rows)" if count > 1 else ""
    raise DataValidationError(source, row, "; ".join(problems) + others)


def load_verified_npz(
    path: str | Path,
    *,
    public_key: Ed25519PublicKey | bytes | Path | None = None,
    require_signature: bool = False,
    num_classes: int,
    feature_range: tuple[float, float] | None = (0.0, 1.0),
    expected_dataset: str | None = None,
    expected_partition: int | str | None = None,
    min_version: int | None = None,
    now: datetime | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Verify a data directory, then load and validate one ``.npz`` from it.

    ``manifest.json`` is read once: its signature is checked over those bytes and the hashes
    come from those same bytes. The ``.npz`` is read into memory once: those bytes are hashed
    against the manifest and those bytes are loaded. Swapping either file at any moment gets
    either a refusal or the data that was signed, never other data.

    Parameters
    ----------
    path : str or Path
        A ``.npz`` holding arrays ``x`` (N, F) and ``y`` (N,), in a directory that holds
        ``manifest.json``.
    public_key, require_signature, expected_dataset, expected_partition, min_version, now
        As for :func:`verify_manifest`.
    num_classes : int
        Labels must lie in ``[0, num_classes)``.
    feature_range : tuple[float, float] or None, default (0.0, 1.0)
        Bounds for every feature; None skips the check.

    Returns
    -------
    x : np.ndarray
        float32 features.
    y : np.ndarray
        int64 labels.
    digest : str
        The manifest digest (provenance id) of the bytes verified.

    Raises
    ------
    DataIntegrityError
        When the directory does not match its manifest, signature or the expected bindings, or
        the file is not in it.
    DataValidationError
        When the arrays are missing, malformed or invalid (naming the file and row).
    """
    path = Path(path)
    data_dir = path.parent
    manifest = read_verified_manifest(data_dir, public_key=public_key, require_signature=require_signature,
                                      expected_dataset=expected_dataset, expected_partition=expected_partition,
                                      min_version=min_version, now=now)
    if path.name not in manifest.files:
        raise DataIntegrityError(path, "not listed in the manifest")
    _check_files(data_dir, manifest.files, skip=path.name)
    raw = _read_bytes(path)
    if hashlib.sha256(raw).hexdigest() != manifest.files[path.name]:
        raise DataIntegrityError(path, "SHA-256 differs from the manifest (file modified)")
    source = str(path)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
            missing = [name for name in ("x", "y") if name not in arrays.files]
            if missing:
                raise DataValidationError(source, None, f"missing array(s) {', '.join(missing)} (found {arrays.files})")
            x, y = arrays["x"], arrays["y"]
    except DataValidationError:
        raise
    except (ValueError, OSError, EOFError) as exc:  # not an npz, or object arrays (pickles)
        raise DataValidationError(source, None, f"cannot read arrays: {exc}") from exc
    validate_arrays(x, y, num_classes=num_classes, feature_range=feature_range, expected_features=None, source=source)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    # float64 values beyond float32's range would become infinite; only possible without a range.
    overflow = ~np.isfinite(x32).all(axis=1)
    if overflow.any():
        row = int(np.argmax(overflow))
        raise DataValidationError(source, row, "feature value too large for float32")
    return x32, y.astype(np.int64), manifest.digest


# --------------------------------------------------------------------------- command line


def _partition_arg(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.integrity", description="Sign or verify a data directory.")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="create an Ed25519 key pair (PEM); never overwrites a file")
    keygen.add_argument("private", type=Path)
    keygen.add_argument("public", type=Path)
    sign = commands.add_parser("sign", help="write manifest.json (and manifest.sig with --key)")
    sign.add_argument("dir", type=Path)
    sign.add_argument("--key", type=Path, help="Ed25519 private key (PEM)")
    sign.add_argument("--dataset-id", help="which dataset this is (nodes configured for another refuse it)")
    sign.add_argument("--partition-id", type=_partition_arg, help="which partition of it (e.g. 3)")
    sign.add_argument("--version", type=int, help="the data's release number (nodes may require a minimum)")
    sign.add_argument("--expires", help="UTC ISO 8601 time after which nobody accepts it, e.g. 2026-12-31T00:00:00Z")
    check = commands.add_parser("verify", help="verify a data directory against its manifest")
    check.add_argument("dir", type=Path)
    check.add_argument("--pubkey", type=Path, help="Ed25519 public key (PEM); requires a valid signature")
    check.add_argument("--dataset-id", help="the dataset-id the manifest must carry")
    check.add_argument("--partition-id", type=_partition_arg, help="the partition-id the manifest must carry")
    check.add_argument("--min-version", type=int, help="the oldest dataset-version accepted")
    args = parser.parse_args(argv)

    try:
        if args.command == "keygen":
            generate_signing_key(args.private, args.public)
            print(f"wrote {args.private} (keep secret) and {args.public}")
        elif args.command == "sign":
            key = load_private_key(args.key) if args.key else None
            manifest = write_manifest(args.dir, private_key=key, dataset_id=args.dataset_id,
                                      partition_id=args.partition_id, version=args.version, expires=args.expires)
            signed = " and manifest.sig" if key else ""
            print(f"wrote {manifest}{signed}")
        else:
            digest = verify_manifest(args.dir, public_key=args.pubkey, expected_dataset=args.dataset_id,
                                     expected_partition=args.partition_id, min_version=args.min_version)
            print(f"OK: {args.dir} manifest sha256 {digest}")
    except (DataIntegrityError, ValueError, OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
