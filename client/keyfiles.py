"""Key files and private directories: created without following symlinks, never left readable by others.

One small module for every secret Phalanx writes (the data owner's and the audit's Ed25519 keys,
the deployment's TLS and SuperNode keys) and the directories that hold them:

* :func:`write_private_file` creates a file with mode ``0600`` from the first byte on. Without
  ``overwrite`` it opens with ``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file, or a symlink
  planted at the path (dangling or not), is refused, so neither its target nor its old
  permissive mode is ever used. With ``overwrite`` it writes a fresh ``0600`` temporary file in
  the same directory and renames it over the path: ``rename`` replaces a symlink itself, never its
  target, and the old file's mode goes with the old file.
* :func:`write_public_file` is the same with mode ``0644`` (certificates, public keys): a symlink
  planted at a public key's path must not make Phalanx clobber the file it points to either.
* :func:`ensure_private_dir` makes (or tightens) a directory to ``0700``; it refuses a symlink, a
  non-directory and a directory owned by another user (someone who pre-created ``/tmp/work``
  could otherwise read or swap what goes in it), and will not tighten a shared sticky directory
  such as ``/tmp`` itself.
* :func:`generate_ed25519_key_files`, :func:`load_ed25519_private_key`,
  :func:`load_ed25519_public_key` and :func:`key_fingerprint` are the Ed25519 key helpers that
  ``client.integrity`` (data owners) and ``server.audit`` (the server's audit key) share.

Only the standard library and ``cryptography``: ``python -m server.audit`` imports this and must
start fast.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: 0 where the platform lacks the flag (Windows): there symlink planting needs privileges anyway.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


class UnsafePathError(OSError):
    """A path Phalanx refuses to write a secret to, or to keep secrets in (the message says why)."""


# --------------------------------------------------------------------------- files


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(directory: str | Path) -> None:
    """Persist a directory entry (new or renamed file); a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY)
    except OSError:  # Windows cannot open directories; its rename is durable enough there.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the file itself is synced
    finally:
        os.close(fd)


def _describe_existing(path: Path) -> str:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "appeared while it was being created"
    if stat.S_ISLNK(info.st_mode):
        return f"is a symlink (to {os.readlink(path)!r}); refusing to follow it"
    return f"already exists (mode {stat.S_IMODE(info.st_mode):04o}); refusing to overwrite it"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise FileExistsError(exc.errno, f"{path} {_describe_existing(path)}") from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # a umask may have removed owner bits; the mode must be exactly `mode`
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    fsync_directory(path.parent)


def _replace(path: Path, data: bytes, mode: int) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise IsADirectoryError(f"{path} is a directory; refusing to replace it with a file")
    except FileNotFoundError:
        pass
    # mkstemp opens with O_CREAT | O_EXCL and mode 0600 under a random name in the same directory.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, path)  # replaces a symlink at `path` itself, never what it points to
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_private_file(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a secret readable by its owner only (``0600`` from creation on, whatever the umask).

    Parameters
    ----------
    path : str or Path
        The file. Its directory must exist.
    data : bytes
        The content.
    overwrite : bool, default False
        False: refuse when anything (a file, a symlink, even a dangling one) is at ``path``.
        True: atomically replace whatever is there by a new ``0600`` file; a symlink at ``path``
        is replaced itself, its target is left untouched.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        Without ``overwrite``, when ``path`` exists or is a symlink (the message says which).
    """
    path = Path(path)
    (_replace if overwrite else _write_new)(path, bytes(data), PRIVATE_FILE_MODE)
    return path


def write_public_file(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a non-secret file (``0644``) with the same refusal of symlinks as :func:`write_private_file`."""
    path = Path(path)
    (_replace if overwrite else _write_new)(path, bytes(data), PUBLIC_FILE_MODE)
    return path


# --------------------------------------------------------------------------- directories


def ensure_private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) or tighten it to mode ``0700``.

    The mode is set through a descriptor opened with ``O_NOFOLLOW | O_DIRECTORY``, so a directory
    swapped for a symlink between the check and the ``chmod`` is refused, not followed. Parents
    that had to be created get the default mode; only ``path`` itself is made private.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    UnsafePathError
        When ``path`` is a symlink, not a directory, owned by another user, or a shared sticky
        directory (mode 1777, like ``/tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePathError(f"{path} is a symlink (to {os.readlink(path)!r}); refusing to keep secrets "
                                  "behind it: pass the real directory") from exc
        raise UnsafePathError(f"{path} is not a directory ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePathError(f"{path} is not a directory")
        if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
            raise UnsafePathError(f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}): "
                                  "whoever owns it can read or replace what is written there")
        if info.st_mode & stat.S_ISVTX and info.st_mode & stat.S_IWOTH:
            # Tightening /tmp (or another shared sticky directory) would break every other user of it.
            raise UnsafePathError(f"{path} is a shared directory (mode {stat.S_IMODE(info.st_mode):04o}); "
                                  "use a directory of your own inside it")
        if stat.S_IMODE(info.st_mode) != PRIVATE_DIR_MODE and hasattr(os, "fchmod"):
            os.fchmod(fd, PRIVATE_DIR_MODE)
    finally:
        os.close(fd)
    return path


def is_inside(path: str | Path, directory: str | Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it, after resolving symlinks in both."""
    resolved, base = Path(path).resolve(), Path(directory).resolve()
    return resolved == base or base in resolved.parents


# --------------------------------------------------------------------------- Ed25519 keys


def generate_ed25519_key_files(
    path_private: str | Path, path_public: str | Path, *, password: bytes | None = None
) -> Ed25519PrivateKey:
    """Create an Ed25519 key pair as PEM files; refuse to overwrite either file.

    Parameters
    ----------
    path_private : str or Path
        PKCS#8 PEM, mode ``0600`` (see :func:`write_private_file`); encrypted when ``password``
        is given. Parent directories are created.
    path_public : str or Path
        SubjectPublicKeyInfo PEM, mode ``0644``.
    password : bytes, optional
        Encrypts the private key.

    Returns
    -------
    Ed25519PrivateKey
        The new key.

    Raises
    ------
    FileExistsError
        When either path exists or is a symlink; nothing is written then.
    """
    path_private, path_public = Path(path_private), Path(path_public)
    if path_private.resolve() == path_public.resolve():
        raise ValueError(f"the private and public key paths are the same file: {path_private}")
    for path in (path_private, path_public):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} {_describe_existing(path)}")
    private = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path_private.parent.mkdir(parents=True, exist_ok=True)
    path_public.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(path_private, private_pem)
    try:
        write_public_file(path_public, public_pem)
    except BaseException:
        path_private.unlink(missing_ok=True)  # half a key pair is worse than none
        raise
    return private


def load_ed25519_private_key(path: str | Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from a PEM file.

    Raises
    ------
    ValueError
        When the file does not hold an Ed25519 private key (naming the file).
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def load_ed25519_public_key(key: Ed25519PublicKey | Ed25519PrivateKey | bytes | str | Path) -> Ed25519PublicKey:
    """Accept a public key as an object, 32 raw bytes, PEM bytes, or a path to a PEM/raw file.

    A private key object is accepted too (its public half is used).

    Raises
    ------
    ValueError
        When the material is not an Ed25519 public key.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
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


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """SHA-256 (64 hex digits) of the raw 32-byte Ed25519 public key: which key signed something."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
