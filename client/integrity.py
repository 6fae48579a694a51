"""Dataset manifests and data validation: a client checks its data before it trains on it.

A data owner runs :func:`write_manifest` (or ``python -m client.integrity sign DIR --key
KEY.pem``) over a data directory. It writes ``manifest.json``::

    {"files": {"part-0.npz": "<sha256 hex>", "sub/labels.csv": "..."}, "version": 1}

listing every regular file in the directory tree except the manifest and its signature, by
path relative to the directory (``/``-separated). With a private key it also writes
``manifest.sig``: the raw 64-byte Ed25519 signature of the exact bytes of ``manifest.json``.

Before training, the client calls :func:`verify_manifest` (or :func:`load_verified_npz`),
which re-hashes every file and refuses the directory when anything differs, is missing or was
added, and -- with a public key -- when the signature is missing or invalid. The SHA-256 of
``manifest.json`` is the dataset's identity for provenance (the client can report it to the
server, which records it in the audit log).

:func:`validate_arrays` then checks the contents: labels are integers in ``[0, num_classes)``,
features are finite floats of the expected count and within the valid range.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path, PurePosixPath

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class DataIntegrityError(Exception):
    """A data directory does not match its manifest (or signature).

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


def load_private_key(path: str | Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from a PEM file.

    Raises
    ------
    ValueError
        When the file does not hold an Ed25519 private key (naming the file).
    """
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(key: Ed25519PublicKey | bytes | str | Path) -> Ed25519PublicKey:
    """Accept a public key as an object, 32 raw bytes, PEM bytes, or a path to a PEM/raw file.

    Raises
    ------
    ValueError
        When the material is not an Ed25519 public key.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, (str, Path)):
        source = str(key)
        material = Path(key).read_bytes()
    elif isinstance(key, bytes):
        source, material = "public key bytes", key
    else:
        raise TypeError(f"public_key must be an Ed25519PublicKey, bytes or a path, got {type(key).__name__}")
    if len(material) == 32:
        return Ed25519PublicKey.from_public_bytes(material)
    try:
        loaded = serialization.load_pem_public_key(material)
    except ValueError as exc:
        raise ValueError(f"{source}: not a PEM public key or 32 raw Ed25519 bytes") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise ValueError(f"{source}: not an Ed25519 public key ({type(loaded).__name__})")
    return loaded


def generate_signing_key(
    path_private: str | Path, path_public: str | Path, *, password: bytes | None = None
) -> None:
    """Create an Ed25519 key pair for a data owner and write it as PEM files.

    Parameters
    ----------
    path_private : str or Path
        Where the private key goes (PKCS#8 PEM, created readable by the owner only). It is
        unencrypted unless ``password`` is given.
    path_public : str or Path
        Where the public key goes (SubjectPublicKeyInfo PEM); hand this one to the clients.
    password : bytes, optional
        Encrypts the private key.
    """
    private = Ed25519PrivateKey.generate()
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path_private, path_public = Path(path_private), Path(path_public)
    path_private.parent.mkdir(parents=True, exist_ok=True)
    path_public.parent.mkdir(parents=True, exist_ok=True)
    # Created with 0o600 from the start, so the key is never readable by others, not even briefly.
    fd = os.open(path_private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(private_pem)
    path_public.write_bytes(public_pem)


# --------------------------------------------------------------------------- manifests


def write_manifest(data_dir: str | Path, *, private_key: Ed25519PrivateKey | None = None) -> Path:
    """Hash every data file in ``data_dir`` into ``manifest.json``; sign it when given a key.

    Parameters
    ----------
    data_dir : str or Path
        The data directory (searched recursively).
    private_key : Ed25519PrivateKey, optional
        Signs the manifest into ``manifest.sig``. Without it, a stale ``manifest.sig`` is
        removed (it could not match the new manifest).

    Returns
    -------
    Path
        The manifest's path.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataIntegrityError(data_dir, "not a directory")
    files = {relative: _sha256_file(path) for relative, path in _data_files(data_dir).items()}
    manifest_text = json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=2, sort_keys=True) + "\n"
    manifest_bytes = manifest_text.encode("utf-8")
    manifest_path = data_dir / MANIFEST_NAME
    signature_path = data_dir / SIGNATURE_NAME
    manifest_path.write_bytes(manifest_bytes)
    if private_key is not None:
        signature_path.write_bytes(private_key.sign(manifest_bytes))
    elif signature_path.exists():
        signature_path.unlink()
    return manifest_path


def _parse_manifest(manifest_path: Path, manifest_bytes: bytes) -> dict[str, str]:
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataIntegrityError(manifest_path, f"malformed manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        expected = f"expected an object with version {MANIFEST_VERSION}"
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
    return files


def verify_manifest(
    data_dir: str | Path,
    *,
    public_key: Ed25519PublicKey | bytes | Path | None = None,
    require_signature: bool = False,
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

    Returns
    -------
    str
        SHA-256 (hex) of the exact ``manifest.json`` bytes: the dataset's provenance id.

    Raises
    ------
    DataIntegrityError
        Naming the file, when: the manifest is missing or malformed, a listed file is missing,
        a file's hash differs, an unlisted file is present, or the signature is missing while
        required or invalid.
    ValueError
        When ``require_signature`` is set without a ``public_key``.
    """
    data_dir = Path(data_dir)
    if require_signature and public_key is None:
        raise ValueError("require_signature=True needs the data owner's public_key to check the signature")
    manifest_path = data_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataIntegrityError(manifest_path, "manifest missing")
    manifest_bytes = manifest_path.read_bytes()

    if public_key is not None:
        key = load_public_key(public_key)
        signature_path = data_dir / SIGNATURE_NAME
        if not signature_path.is_file():
            raise DataIntegrityError(signature_path, "signature missing but required")
        try:
            key.verify(signature_path.read_bytes(), manifest_bytes)
        except InvalidSignature as exc:
            raise DataIntegrityError(
                signature_path, "invalid signature: the manifest was altered or signed with another key"
            ) from exc

    listed = _parse_manifest(manifest_path, manifest_bytes)
    present = _data_files(data_dir)
    for relative in sorted(listed):
        path = data_dir / relative
        if relative not in present:
            raise DataIntegrityError(path, "listed in the manifest but missing")
        if _sha256_file(path) != listed[relative]:
            raise DataIntegrityError(path, "SHA-256 differs from the manifest (file modified)")
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        others = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise DataIntegrityError(data_dir / unlisted[0], f"not listed in the manifest{others}")
    return hashlib.sha256(manifest_bytes).hexdigest()


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
) -> tuple[np.ndarray, np.ndarray, str]:
    """Verify a data directory, then load and validate one ``.npz`` from it.

    Parameters
    ----------
    path : str or Path
        A ``.npz`` holding arrays ``x`` (N, F) and ``y`` (N,), in a directory that holds
        ``manifest.json``.
    public_key, require_signature
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
        The manifest digest (provenance id).

    Raises
    ------
    DataIntegrityError
        When the directory does not match its manifest or signature, or the file is not in it.
    DataValidationError
        When the arrays are missing, malformed or invalid (naming the file and row).
    """
    path = Path(path)
    data_dir = path.parent
    digest = verify_manifest(data_dir, public_key=public_key, require_signature=require_signature)
    listed = _parse_manifest(data_dir / MANIFEST_NAME, (data_dir / MANIFEST_NAME).read_bytes())
    # Hash the very bytes we parse: a file swapped between the check and the load is caught.
    raw = path.read_bytes()
    if listed.get(path.name) != hashlib.sha256(raw).hexdigest():
        raise DataIntegrityError(path, "changed since the manifest was verified, or not listed in it")
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
    return x32, y.astype(np.int64), digest


# --------------------------------------------------------------------------- command line


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.integrity", description="Sign or verify a data directory.")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="create an Ed25519 key pair (PEM)")
    keygen.add_argument("private", type=Path)
    keygen.add_argument("public", type=Path)
    sign = commands.add_parser("sign", help="write manifest.json (and manifest.sig with --key)")
    sign.add_argument("dir", type=Path)
    sign.add_argument("--key", type=Path, help="Ed25519 private key (PEM)")
    check = commands.add_parser("verify", help="verify a data directory against its manifest")
    check.add_argument("dir", type=Path)
    check.add_argument("--pubkey", type=Path, help="Ed25519 public key (PEM); requires a valid signature")
    args = parser.parse_args(argv)

    try:
        if args.command == "keygen":
            generate_signing_key(args.private, args.public)
            print(f"wrote {args.private} (keep secret) and {args.public}")
        elif args.command == "sign":
            key = load_private_key(args.key) if args.key else None
            manifest = write_manifest(args.dir, private_key=key)
            signed = " and manifest.sig" if key else ""
            print(f"wrote {manifest}{signed}")
        else:
            digest = verify_manifest(args.dir, public_key=args.pubkey)
            print(f"OK: {args.dir} manifest sha256 {digest}")
    except (DataIntegrityError, ValueError, OSError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
