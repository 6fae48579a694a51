"""A tamper-evident, hash-chained, optionally signed and anchored round record (``audit.jsonl``).

Each line of the file is one JSON object in canonical form (see :func:`canonical_json`). Every
record carries

* ``index`` -- its 0-based position in the chain,
* ``prev`` -- the ``hash`` of the record before it (:data:`GENESIS` for the first record),
* ``time`` -- when it was written (UTC, ISO 8601), unless the writer supplied one,
* ``hash`` -- ``sha256(canonical_json(record without "hash" and "sig"))`` as 64 lowercase hex,

plus whatever the writer put in it (the strategy writes the round, config hash, participants,
update digests, rejections, scores, the aggregate's digest and alerts). Because each hash covers
the previous hash, editing, inserting, deleting or reordering any record breaks the chain at
the first line touched, and :func:`verify` names that line.

A chain alone proves nothing against someone who can write the file: they can edit a record
and recompute every hash after it, or cut the tail. Two additions close that:

**Signatures.** A log written with an Ed25519 ``signing_key`` (kept outside the run directory)
adds to every record ``key_id`` -- the key's fingerprint, ``sha256`` of the raw 32-byte public
key, inside the hashed body -- and ``sig`` -- 128 hex digits, the Ed25519 signature of
``b"phalanx.audit.record.v1\\0" + hash.encode("ascii")``, outside the hashed body. Since the hash
covers ``prev``, each signature vouches for the whole chain up to its record. ``verify(...,
public_key=...)`` requires every record to carry a valid signature from that key: a log edited
and re-chained by anyone without the key fails at the first line touched.

**Anchor.** Signatures cannot show that records were *removed* from the end. After every
append the log publishes its new head to an :class:`AuditAnchor` the operator keeps elsewhere:
a JSON-lines file outside the run directory (:class:`FileAnchor`) or a command
(:class:`CommandAnchor`, e.g. posting to a transparency service). Each anchor entry is::

    {"chain": <hash of record 0>, "hash": <head>, "index": <its index>,
     "key_id": <fingerprint or null>, "sig": <the record's signature or null>, "time": <its time>}

``verify(..., anchor=FILE)`` requires every anchored head of the log's chain to be in the log and
the log's last record to be anchored: a truncated tail, a rewritten log, or a log replaced by
another run's is detected. What the anchor cannot detect is its own loss: whoever can cut both
the log and the anchor file can cut both (docs/deployment.md, threat model).

Unsigned, unanchored logs remain valid exactly as before when no key is given.

Command line::

    python -m server.audit verify FILE [--head HASH] [--length N] [--public-key KEY.pem] [--anchor ANCHOR]
    python -m server.audit show FILE
    python -m server.audit keygen --private KEY.pem --public KEY.pub.pem
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from client.keyfiles import (
    fsync_directory,
    generate_ed25519_key_files,
    is_inside,
    key_fingerprint,
    load_ed25519_private_key,
    load_ed25519_public_key,
)

if TYPE_CHECKING:  # torch is imported lazily: `python -m server.audit verify` should start fast
    import torch

#: The ``prev`` of the first record, and the head of an empty chain.
GENESIS = "0" * 64

#: Version tag mixed into :func:`sha256_tensor`, so that a future change of framing cannot
#: produce digests that collide with today's.
TENSOR_DIGEST_TAG = b"phalanx.sha256_tensor.v1"

#: What a record's ``sig`` signs, before the record's hash: no other Phalanx signature (a data
#: manifest's, signed with the same kind of key) can be replayed as a record's.
RECORD_SIGNATURE_TAG = b"phalanx.audit.record.v1\0"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_CHAIN_FIELDS = ("index", "prev", "hash")
#: Fields the log writes itself; a writer's record must not contain them.
RESERVED_FIELDS = ("hash", "sig", "key_id")
#: Fields outside the hashed body.
_UNHASHED_FIELDS = ("hash", "sig")


class AuditError(Exception):
    """The audit log on disk is damaged or does not match what the caller expected.

    Attributes
    ----------
    path : Path
        The log file.
    line : int | None
        The first bad line (1-based), when one can be named.
    """

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


class AnchorError(RuntimeError):
    """Publishing a head to the anchor failed (the record itself is durable in the log)."""


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`.

    Attributes
    ----------
    ok : bool
        True when every record is intact and the expectations (if any) hold.
    records : int
        Records checked and found intact (all of them when ``ok``; those before the bad line
        otherwise).
    bad_line : int | None
        The first bad line, 1-based; None when ``ok``, or when the problem is in the anchor file
        rather than at a line of the log. When records are missing at the end it is the line where
        the first missing record should be.
    reason : str
        What is wrong ("intact" when ``ok``).
    head : str
        Hash of the last intact record (:data:`GENESIS` when there is none).
    key_id : str | None
        Fingerprint of the key every record was verified against (only with ``public_key``).
    anchored : int | None
        Anchor entries of this log's chain that matched (only with ``anchor``).
    """

    ok: bool
    records: int
    bad_line: int | None
    reason: str
    head: str = GENESIS
    key_id: str | None = None
    anchored: int | None = None


# --------------------------------------------------------------------------- keys


def generate_audit_key(path_private: str | Path, path_public: str | Path) -> str:
    """Create the server's Ed25519 audit key pair (PEM); return its ``key_id``.

    The private key is created ``0600`` with ``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file
    or a symlink at either path is refused, nothing is overwritten. Keep it outside every run
    directory; hand the public key to whoever verifies the logs.

    Raises
    ------
    FileExistsError
        When either path exists (or is a symlink).
    """
    return key_fingerprint(generate_ed25519_key_files(path_private, path_public))


def load_signing_key(
    path: str | Path, *, run_dir: str | Path | None = None, password: bytes | None = None
) -> Ed25519PrivateKey:
    """Read the server's Ed25519 audit key from a PEM file, refusing an unsafe location or mode.

    Parameters
    ----------
    path : str or Path
        PKCS#8 PEM (as written by :func:`generate_audit_key`).
    run_dir : str or Path, optional
        The run directory: a key inside it is refused (whoever can write the run directory could
        read it there and sign a forged log).
    password : bytes, optional
        For an encrypted key.

    Raises
    ------
    ValueError
        When the key lies inside ``run_dir``, is readable or writable by group or others (like
        ``ssh``, a key others can read is no secret), or is not an Ed25519 private key.
    """
    path = Path(path)
    if run_dir is not None and is_inside(path, run_dir):
        raise ValueError(f"audit signing key {path} lies inside the run directory {run_dir}: whoever can write the "
                         "run directory could read it and sign a forged log; keep the key elsewhere")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ValueError(f"audit signing key {path} has mode {mode:04o}: other users can read or replace it; "
                         f"run chmod 600 {shlex.quote(str(path))}")
    return load_ed25519_private_key(path, password)


def load_public_key(key: Ed25519PublicKey | Ed25519PrivateKey | bytes | str | Path) -> Ed25519PublicKey:
    """The verifying key from an object, 32 raw bytes, PEM bytes or a PEM file."""
    return load_ed25519_public_key(key)


def _signed_message(record_hash: str) -> bytes:
    return RECORD_SIGNATURE_TAG + record_hash.encode("ascii")


def _signature_problem(record: dict[str, Any], public_key: Ed25519PublicKey, key_id: str) -> str | None:
    """Why ``record`` is not validly signed by ``public_key``, or None when it is."""
    if "sig" not in record or "key_id" not in record:
        missing = " and ".join(name for name in ("key_id", "sig") if name not in record)
        return f"record is not signed (no {missing}): written without the server key"
    if record["key_id"] != key_id:
        return f"record is signed by key {record['key_id']}, expected key {key_id}"
    try:
        public_key.verify(bytes.fromhex(record["sig"]), _signed_message(record["hash"]))
    except InvalidSignature:
        return "invalid signature: the record was forged or re-chained without the server key"
    return None


# --------------------------------------------------------------------------- canonical form


def _to_json_tree(obj: Any, where: str) -> Any:
    """Return ``obj`` as plain JSON types, refusing what has no single canonical encoding."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)  # int subclasses (IntEnum) print as their names otherwise
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"canonical_json: non-finite number {obj!r} at {where} (JSON has no NaN/Infinity)")
        return float(obj)
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            # Integer keys (Flower node ids) become strings, exactly as JSON would store them;
            # doing it here keeps the hash identical before writing and after reading back.
            if isinstance(key, str):
                name = key
            elif isinstance(key, int) and not isinstance(key, bool):
                name = str(int(key))
            else:
                raise TypeError(f"canonical_json: dict key {key!r} at {where} must be str or int")
            if name in out:
                raise ValueError(f"canonical_json: duplicate key {name!r} at {where} after converting keys to strings")
            out[name] = _to_json_tree(value, f"{where}.{name}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_json_tree(value, f"{where}[{i}]") for i, value in enumerate(obj)]
    # NumPy scalars (np.float32 scores, np.int64 counts) are common in records; .item() gives
    # the exact Python value. Imported lazily: numpy is only needed when one shows up.
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return _to_json_tree(obj.item(), where)
    raise TypeError(
        f"canonical_json: value of type {type(obj).__name__} at {where} is not JSON data "
        "(use str, int, float, bool, None, list, tuple or dict; call .item() or .tolist() on tensors)"
    )


def canonical_json(obj: Any) -> str:
    """Encode ``obj`` as canonical JSON: the one text that hashes identically everywhere.

    Keys are sorted, there is no whitespace, non-ASCII characters are escaped, floats are
    written as Python's shortest round-trip ``repr``, integer dict keys become strings and
    tuples become lists (as JSON would store them), NumPy scalars become Python numbers.

    Parameters
    ----------
    obj : Any
        JSON-like data.

    Returns
    -------
    str
        The canonical text (pure ASCII).

    Raises
    ------
    ValueError
        On NaN or infinity (JSON cannot represent them), naming where in ``obj`` it sits.
    TypeError
        On a value or key that is not JSON data.
    """
    tree = _to_json_tree(obj, "$")
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_tensor(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values, independent of device and memory layout.

    The digest is taken over, in order::

        b"phalanx.sha256_tensor.v1\\0"
        str(dtype).encode()  + b"\\0"       e.g. b"torch.float32\\0"
        ",".join(shape).encode() + b"\\0"   e.g. b"3,4\\0"; b"\\0" for a 0-d tensor
        the elements in row-major (C) order as raw bytes, native byte order

    Native byte order is little-endian on every platform PyTorch ships for (x86-64, ARM64).
    A tensor on CUDA and its CPU copy, or a strided view and its contiguous copy, have the same
    digest; the same values in another dtype or shape do not.

    Parameters
    ----------
    t : torch.Tensor
        A dense tensor on any device.

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sha256_tensor: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"sha256_tensor: only dense (strided) tensors are supported, got layout {t.layout}")
    digest = hashlib.sha256()
    digest.update(TENSOR_DIGEST_TAG + b"\0")
    digest.update(str(t.dtype).encode("ascii") + b"\0")
    digest.update(",".join(str(size) for size in t.shape).encode("ascii") + b"\0")
    flat = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        # Viewing as bytes works for every dtype, including those NumPy lacks (bfloat16).
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _record_hash(record_without_hash: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(record_without_hash).encode("ascii")).hexdigest()


def _check_head_format(head: str, name: str) -> None:
    if not isinstance(head, str) or not _HEX64.fullmatch(head):
        raise ValueError(f"{name} must be 64 lowercase hex digits, got {head!r}")


# --------------------------------------------------------------------------- reading a chain


@dataclass(frozen=True)
class _Scan:
    """What walking a chain found: a verify result plus where the intact prefix ends."""

    result: VerifyResult
    end_offset: int  # bytes up to and including the last intact line's newline
    head_seen_at: int | None  # line whose hash equals the head being looked for, if any
    hashes: tuple[str, ...] = ()  # the intact records' hashes, in order
    last: dict[str, Any] | None = None  # the last intact record
    signed_by: str | None = None  # a key_id some intact record carries (None: no record is signed)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} (not valid JSON)")


def _check_line(raw: bytes, expected_index: int, prev: str) -> tuple[str | None, str, dict[str, Any] | None]:
    """Check one line; return (problem or None, the record's hash, the record)."""
    if not raw.endswith(b"\n"):
        return "last line has no newline (torn write or appended data)", "", None
    text_bytes = raw[:-1]
    if not text_bytes.strip():
        return "blank line", "", None
    try:
        text = text_bytes.decode("ascii")
    except UnicodeDecodeError as exc:
        return f"malformed record: non-ASCII byte at column {exc.start + 1}", "", None
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        return f"malformed JSON: {exc}", "", None
    if not isinstance(record, dict):
        return f"malformed record: expected a JSON object, found {type(record).__name__}", "", None
    missing = [name for name in _CHAIN_FIELDS if name not in record]
    if missing:
        return f"malformed record: missing field(s) {', '.join(missing)}", "", None
    stored_hash = record["hash"]
    if not isinstance(stored_hash, str) or not _HEX64.fullmatch(stored_hash):
        return "malformed record: 'hash' is not 64 lowercase hex digits", "", None
    if "sig" in record and not (isinstance(record["sig"], str) and _HEX128.fullmatch(record["sig"])):
        return "malformed record: 'sig' is not 128 lowercase hex digits", stored_hash, None
    if "key_id" in record and not (isinstance(record["key_id"], str) and _HEX64.fullmatch(record["key_id"])):
        return "malformed record: 'key_id' is not 64 lowercase hex digits", stored_hash, None
    # The line must be exactly the canonical text, so that no byte can change unnoticed
    # (whitespace, key order or number spelling would not change the parsed record).
    try:
        canonical = canonical_json(record)
    except ValueError as exc:  # e.g. 1e999, which parses as infinity
        return f"malformed record: {exc}", stored_hash, None
    if canonical != text:
        return "record is not in canonical form (edited)", stored_hash, None
    body = {key: value for key, value in record.items() if key not in _UNHASHED_FIELDS}
    if _record_hash(body) != stored_hash:
        return "hash mismatch: record content or hash was edited", stored_hash, None
    index = record["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        return f"'index' must be an integer, found {index!r}", stored_hash, None
    if index != expected_index:
        return (
            f"index {index} where {expected_index} was expected (record inserted, deleted or moved)",
            stored_hash,
            None,
        )
    if record["prev"] != prev:
        return "'prev' does not match the previous record's hash (record inserted, deleted or moved)", stored_hash, None
    return None, stored_hash, record


def _scan(
    path: Path,
    *,
    limit: int | None = None,
    look_for: str | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> _Scan:
    """Walk the chain in ``path``, stopping at the first bad line or after ``limit`` records.

    With ``public_key``, a record without a valid signature from it is a bad line.
    """
    key_id = key_fingerprint(public_key) if public_key is not None else None
    head = GENESIS
    records = 0
    offset = 0
    seen_at: int | None = None
    hashes: list[str] = []
    last: dict[str, Any] | None = None
    signed_by: str | None = None

    def scan(result: VerifyResult) -> _Scan:
        return _Scan(result, offset, seen_at, tuple(hashes), last, signed_by)

    with open(path, "rb") as file:
        for lineno, raw in enumerate(file, start=1):
            if limit is not None and records >= limit:
                break
            problem, record_hash, record = _check_line(raw, records, head)
            if problem is None and public_key is not None:
                problem = _signature_problem(record, public_key, key_id)
            if problem is not None:
                return scan(VerifyResult(False, records, lineno, problem, head, key_id))
            head = record_hash
            records += 1
            offset += len(raw)
            hashes.append(record_hash)
            last = record
            signed_by = signed_by or record.get("key_id")
            if look_for is not None and record_hash == look_for:
                seen_at = lineno
    return scan(VerifyResult(True, records, None, "intact", head, key_id))


# --------------------------------------------------------------------------- anchors


@dataclass(frozen=True)
class AnchorEntry:
    """One head published to an anchor (see the module docstring for the fields)."""

    chain: str
    index: int
    hash: str
    time: str
    key_id: str | None = None
    sig: str | None = None
    line: int | None = None  # where it was read from, for messages

    def to_json(self) -> dict[str, Any]:
        """The entry as published (``line`` is not part of it)."""
        return {"chain": self.chain, "index": self.index, "hash": self.hash, "time": self.time,
                "key_id": self.key_id, "sig": self.sig}


def _parse_anchor_line(raw: bytes, where: str, lineno: int) -> AnchorEntry:
    if not raw.endswith(b"\n"):
        raise AuditError(where, lineno, "anchor line has no newline (torn write or appended data)")
    try:
        entry = json.loads(raw.decode("ascii"), parse_constant=_reject_constant)
    except ValueError as exc:
        raise AuditError(where, lineno, f"malformed anchor entry: {exc}") from exc
    if not isinstance(entry, dict):
        raise AuditError(where, lineno, "malformed anchor entry: not a JSON object")
    problems = []
    for name, pattern, optional in (("chain", _HEX64, False), ("hash", _HEX64, False),
                                    ("key_id", _HEX64, True), ("sig", _HEX128, True)):
        value = entry.get(name)
        if value is None and optional:
            continue
        if not isinstance(value, str) or not pattern.fullmatch(value):
            problems.append(f"'{name}' is {value!r}")
    index = entry.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        problems.append(f"'index' is {index!r}")
    if not isinstance(entry.get("time"), str):
        problems.append(f"'time' is {entry.get('time')!r}")
    if problems:
        raise AuditError(where, lineno, f"malformed anchor entry: {', '.join(problems)}")
    return AnchorEntry(entry["chain"], index, entry["hash"], entry["time"], entry.get("key_id"), entry.get("sig"),
                       lineno)


def read_anchor_file(path: str | Path) -> list[AnchorEntry]:
    """Every entry of a JSON-lines anchor file, in order.

    Raises
    ------
    AuditError
        On a line that is not a well-formed entry, naming the anchor file and line (a torn line
        after a crash while anchoring is reported too: inspect and remove it by hand).
    FileNotFoundError
        When the file does not exist.
    """
    path = Path(path)
    with open(path, "rb") as file:
        return [_parse_anchor_line(raw, str(path), lineno) for lineno, raw in enumerate(file, start=1)]


def _check_against_anchor(
    scan: _Scan, entries: Sequence[AnchorEntry], anchor_name: str, public_key: Ed25519PublicKey | None
) -> VerifyResult:
    """The verify result of an intact chain against the anchored heads of its chain."""
    found = scan.result
    hashes = scan.hashes
    n = len(hashes)
    if n == 0:
        if entries:
            reason = (f"the log is empty but the anchor {anchor_name} holds {len(entries)} head(s), the first at "
                      f"line {entries[0].line}: records were removed")
            return VerifyResult(False, 0, 1, reason, GENESIS, found.key_id, 0)
        return VerifyResult(True, 0, None, found.reason, GENESIS, found.key_id, 0)
    chain = hashes[0]
    mine = [entry for entry in entries if entry.chain == chain]
    key_id = found.key_id
    for entry in mine:
        where = f"{anchor_name}:{entry.line}"
        if public_key is not None:
            if entry.key_id != key_id:
                reason = f"anchor entry {where} names key {entry.key_id}, expected key {key_id} (anchor tampered)"
                return VerifyResult(False, n, None, reason, found.head, key_id, None)
            try:
                public_key.verify(bytes.fromhex(entry.sig or ""), _signed_message(entry.hash))
            except (InvalidSignature, ValueError):
                reason = f"anchor entry {where} has no valid signature from key {key_id} (anchor tampered)"
                return VerifyResult(False, n, None, reason, found.head, key_id, None)
        if entry.index >= n:
            continue  # reported below, naming the farthest record anchored
        if hashes[entry.index] != entry.hash:
            reason = (f"record differs from the head anchored at {where} ({entry.hash}): the log was rewritten, "
                      "or records the anchor vouched for were dropped and written again")
            return VerifyResult(False, entry.index, entry.index + 1, reason,
                                hashes[entry.index - 1] if entry.index else GENESIS, key_id, None)
    beyond = [entry for entry in mine if entry.index >= n]
    if beyond:
        last = max(beyond, key=lambda entry: entry.index)
        reason = (f"records missing at the end: the anchor vouches for record {last.index + 1} "
                  f"(hash {last.hash}, {anchor_name}:{last.line}) but the log holds {n}")
        return VerifyResult(False, n, n + 1, reason, found.head, key_id, None)
    if not mine:
        reason = (f"the anchor {anchor_name} holds no head of this log's chain (first record {chain}): the log was "
                  "rewritten from its first record, or it is another run's log, or the anchor is another's")
        return VerifyResult(False, 0, 1, reason, GENESIS, key_id, 0)
    last_anchored = max(entry.index for entry in mine)
    if last_anchored < n - 1:
        reason = (f"record {last_anchored + 2} is not anchored (the anchor's last head for this chain is record "
                  f"{last_anchored + 1}): written after the last anchoring, by someone else or by a server that "
                  "stopped before anchoring it")
        return VerifyResult(False, last_anchored + 1, last_anchored + 2, reason, hashes[last_anchored], key_id,
                            len(mine))
    return VerifyResult(True, n, None, found.reason, found.head, key_id, len(mine))


def verify(
    path: str | Path,
    *,
    expected_head: str | None = None,
    expected_length: int | None = None,
    public_key: Ed25519PublicKey | Ed25519PrivateKey | bytes | str | Path | None = None,
    anchor: str | Path | None = None,
) -> VerifyResult:
    """Check every record of an audit log and, optionally, its signatures and where it must end.

    Detected: any edited byte in a record (canonical form / hash mismatch), an inserted,
    deleted or moved record (index or ``prev`` mismatch), malformed lines and appended garbage.
    With ``public_key``: any record without a valid signature from that key (a log re-chained
    by someone without the key fails at the first record changed). Records missing at the end
    are detected only with ``anchor``, ``expected_head`` or ``expected_length``: a truncated
    chain is still a valid chain, so only a head remembered elsewhere can prove nothing was cut.

    Parameters
    ----------
    path : str or Path
        The ``audit.jsonl`` file.
    expected_head : str, optional
        Hash the last record must have.
    expected_length : int, optional
        Number of records the file must hold.
    public_key : Ed25519PublicKey, bytes or path, optional
        The server's audit key (object, raw bytes, PEM bytes or a PEM file).
    anchor : str or Path, optional
        A JSON-lines anchor file (what :class:`FileAnchor` writes, or the entries exported from
        the service a :class:`CommandAnchor` posted to). Every head it holds for this log's chain
        (the hash of record 0; entries of other chains are ignored) must match the log, and the
        log's last record must be anchored. With ``public_key`` each such entry must also carry
        that key's signature.

    Returns
    -------
    VerifyResult
        ``ok`` and, when not, the first bad line (1-based) and the reason.

    Raises
    ------
    FileNotFoundError
        When ``path`` or ``anchor`` does not exist.
    ValueError
        When ``expected_head`` is not 64 hex digits, ``expected_length`` is negative, or
        ``public_key`` is not an Ed25519 key.
    AuditError
        When the anchor file holds a malformed line (naming it).
    """
    path = Path(path)
    if expected_head is not None:
        _check_head_format(expected_head, "expected_head")
    if expected_length is not None and (not isinstance(expected_length, int) or expected_length < 0):
        raise ValueError(f"expected_length must be a non-negative integer, got {expected_length!r}")
    key = load_public_key(public_key) if public_key is not None else None
    entries = read_anchor_file(anchor) if anchor is not None else None
    scan = _scan(path, look_for=expected_head, public_key=key)
    found = scan.result
    if not found.ok:
        return found
    n = found.records
    if expected_length is not None and n != expected_length:
        if n < expected_length:
            reason = f"expected {expected_length} records, found {n}: records missing at the end"
            return VerifyResult(False, n, n + 1, reason, found.head, found.key_id)
        reason = f"expected {expected_length} records, found {n}: records after the expected end"
        return VerifyResult(False, expected_length, expected_length + 1, reason, found.head, found.key_id)
    if expected_head is not None and found.head != expected_head:
        if scan.head_seen_at is not None:
            line = scan.head_seen_at + 1
            reason = f"records follow the expected head {expected_head} (line {scan.head_seen_at})"
            return VerifyResult(False, scan.head_seen_at, line, reason, expected_head, found.key_id)
        reason = (
            f"chain ends with head {found.head}, expected {expected_head}: "
            "records missing at the end, or the chain was rewritten"
        )
        return VerifyResult(False, n, n + 1, reason, found.head, found.key_id)
    if entries is not None:
        return _check_against_anchor(scan, entries, str(anchor), key)
    return found


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the records of an audit log in order, without verifying them (see :func:`verify`).

    Raises
    ------
    AuditError
        On a line that is not a JSON object, naming the line.
    """
    path = Path(path)
    with open(path, "rb") as file:
        for lineno, raw in enumerate(file, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except ValueError as exc:
                raise AuditError(path, lineno, f"malformed JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise AuditError(path, lineno, "not a JSON object")
            yield record


# --------------------------------------------------------------------------- writing a chain


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class AuditAnchor:
    """Where each new head of an audit log is published, out of reach of whoever writes the run directory.

    Subclasses implement :meth:`publish`; :meth:`heads` reads the anchored heads back where that is
    possible (a file), so that resuming can refuse a log cut below an anchored head.
    """

    def publish(self, entry: AnchorEntry) -> None:
        """Record ``entry`` durably, or raise :class:`AnchorError`."""
        raise NotImplementedError

    def check_location(self, run_dir: Path) -> None:
        """Raise ValueError when the anchor lies where the run directory's writers could change it."""

    def heads(self, chain: str) -> list[AnchorEntry] | None:
        """The anchored heads of ``chain`` in order, or None when they cannot be read back."""
        return None


class FileAnchor(AuditAnchor):
    """Append heads as canonical JSON lines to a file the operator keeps outside the run directory.

    Each head is one ``write`` on a descriptor opened ``O_APPEND | O_NOFOLLOW`` (a symlink planted
    at the path is refused), followed by ``fsync``. If the file does not end with a newline (a
    write torn by a crash), a newline goes first so the new entry stays a line of its own.

    Parameters
    ----------
    path : str or Path
        The anchor file; its directory must exist. One file may serve many runs: entries name
        their log's chain. For the anchor to mean anything, the run must not be able to rewrite
        it: another disk, host or user, or a file made append-only (``chattr +a``).

    Raises
    ------
    ValueError
        When the directory is missing or the path is a symlink or not a regular file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.parent.is_dir():
            raise ValueError(f"audit anchor {self.path}: directory {self.path.parent} does not exist")
        if self.path.is_symlink():
            raise ValueError(f"audit anchor {self.path} is a symlink; refusing to follow it: give the real path")
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"audit anchor {self.path} is not a regular file")

    def __repr__(self) -> str:
        return f"FileAnchor({str(self.path)!r})"

    def check_location(self, run_dir: Path) -> None:
        if is_inside(self.path, run_dir):
            raise ValueError(
                f"audit anchor {self.path} lies inside the run directory {run_dir}: whoever can rewrite the log "
                "there can rewrite the anchor beside it; keep the anchor where the run cannot write "
                "(another disk, host or user, or an append-only file)"
            )

    def publish(self, entry: AnchorEntry) -> None:
        line = (canonical_json(entry.to_json()) + "\n").encode("ascii")
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            created = not os.path.lexists(self.path)
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise AnchorError(f"cannot open audit anchor {self.path}: {exc}") from exc
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            raise AnchorError(f"cannot append to audit anchor {self.path}: {exc}") from exc
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.path.parent)

    def heads(self, chain: str) -> list[AnchorEntry]:
        if not self.path.exists():
            return []
        return [entry for entry in read_anchor_file(self.path) if entry.chain == chain]


class CommandAnchor(AuditAnchor):
    """Run a command per head, with the entry (one canonical JSON line) on its standard input.

    E.g. ``["curl", "-fsS", "--data-binary", "@-", "https://transparency.example/append"]``, or a
    script that appends to write-once storage. The command runs without a shell.

    Parameters
    ----------
    argv : Sequence[str]
        The command and its arguments; the program must be found (on ``PATH`` or by its path).
    timeout : float, default 30
        Seconds one publication may take.

    Raises
    ------
    ValueError
        When ``argv`` is empty, the program is not found, or ``timeout`` is not positive.
    """

    def __init__(self, argv: Sequence[str], *, timeout: float = 30.0) -> None:
        argv = [str(part) for part in argv]
        if not argv or not argv[0]:
            raise ValueError("audit anchor command is empty")
        program = shutil.which(argv[0])
        if program is None:
            raise ValueError(f"audit anchor command {argv[0]!r} not found (not executable, or not on PATH)")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"audit anchor command timeout must be a positive number of seconds, got {timeout!r}")
        self.argv = [program, *argv[1:]]
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"CommandAnchor({self.argv!r})"

    def publish(self, entry: AnchorEntry) -> None:
        line = canonical_json(entry.to_json()) + "\n"
        command = shlex.join(self.argv)
        try:
            done = subprocess.run(self.argv, input=line.encode("ascii"), capture_output=True, timeout=self.timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise AnchorError(f"audit anchor command `{command}` did not finish within {self.timeout:g} s") from exc
        except OSError as exc:
            raise AnchorError(f"audit anchor command `{command}` could not run: {exc}") from exc
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip()[-500:] or "(no output on stderr)"
            raise AnchorError(f"audit anchor command `{command}` exited with status {done.returncode}: {tail}")


def anchor_from_spec(spec: str, *, timeout: float = 30.0) -> AuditAnchor | None:
    """The anchor a run-config value names: ``""`` none, ``command:ARGV`` a command, else a file path.

    ``command:`` is followed by the command line, split like a POSIX shell would split it
    (``command:/usr/local/bin/anchor-post --log phalanx``) but run without a shell. A ``file:``
    prefix is allowed for paths.
    """
    if not isinstance(spec, str):
        raise TypeError(f"audit anchor must be a string, got {type(spec).__name__}")
    spec = spec.strip()
    if not spec:
        return None
    if spec.startswith("command:"):
        return CommandAnchor(shlex.split(spec[len("command:"):]), timeout=timeout)
    if spec.startswith("file:"):
        spec = spec[len("file:"):]
    return FileAnchor(spec)


def _conflict_with_anchor(hashes: Sequence[str], entries: Sequence[AnchorEntry]) -> tuple[int, str] | None:
    """(1-based log line, reason) of the first anchored head the records ``hashes`` contradict."""
    for entry in entries:
        if entry.index < len(hashes) and hashes[entry.index] != entry.hash:
            return entry.index + 1, f"record differs from the head anchored at line {entry.line}: log rewritten"
    beyond = [entry for entry in entries if entry.index >= len(hashes)]
    if beyond:
        last = max(beyond, key=lambda entry: entry.index)
        return len(hashes) + 1, (f"the anchor vouches for record {last.index + 1} (line {last.line}) but the "
                                 f"log holds {len(hashes)}: records were removed")
    return None


def repair_torn_tail(path: str | Path) -> bool:
    """Drop the last line of ``path`` if it is torn; return whether it did. Never more than one line.

    Torn means: the file does not end with a newline (a write cut short), or its last line is not
    JSON at all (e.g. the zero bytes a crash can leave). A last line that is valid JSON is kept
    even when it fails verification: that is not a torn write, and :func:`verify` must see it.
    A missing or empty file is left alone.
    """
    path = Path(path)
    try:
        file = open(path, "r+b")
    except FileNotFoundError:
        return False
    with file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return False
        file.seek(size - 1)
        ends_with_newline = file.read(1) == b"\n"
        # Find where the last line starts: after the last newline before its own terminator.
        search_end = size - 1 if ends_with_newline else size
        position, start = search_end, 0
        while position > 0:
            step = min(1 << 16, position)
            file.seek(position - step)
            chunk = file.read(step)
            found = chunk.rfind(b"\n")
            if found >= 0:
                start = position - step + found + 1
                break
            position -= step
        if ends_with_newline:
            file.seek(start)
            try:
                json.loads(file.read(size - 1 - start).decode("ascii"))
                return False
            except (UnicodeDecodeError, ValueError):
                pass
        file.truncate(start)
        file.flush()
        os.fsync(file.fileno())
    return True


def _first_record_hash(path: Path) -> str | None:
    """The hash field of the first line, when it has one (the chain's id); no verification."""
    with open(path, "rb") as file:
        first = file.readline()
    try:
        value = json.loads(first.decode("ascii")).get("hash")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and _HEX64.fullmatch(value) else None


class AuditLog:
    """An append-only writer of a hash-chained log, durable after every append; signed and anchored on request.

    Parameters
    ----------
    path : str or Path
        The ``audit.jsonl`` file. Its directory is the run directory for the checks below.
    resume : bool, default False
        False: start a new, empty log (parent directories are created, an existing file is
        truncated). True: verify the existing file and continue its chain from its head (a
        missing file starts empty).
    signing_key : Ed25519PrivateKey, optional
        Signs every record appended (see the module docstring); load it with
        :func:`load_signing_key` from outside the run directory. With ``resume``, every existing
        record must carry a valid signature from this key; without a key, resuming a signed log
        is refused (unsigned records would follow signed ones).
    anchor : AuditAnchor, optional
        Receives the new head after every append (see :func:`anchor_from_spec`). A
        :class:`FileAnchor` inside the run directory is refused. On resume the current head is
        published again (it may not have been, if the server died between writing and
        anchoring), and a file anchor is first checked: a log cut below, or rewritten before, an
        anchored head is refused.

    Raises
    ------
    AuditError
        With ``resume=True``, when the existing file is damaged, not signed by ``signing_key``,
        or contradicts the anchor; the message names the first bad line. After a crash
        mid-append, use :func:`repair_torn_tail` (or :meth:`open_at`).
    ValueError
        When a file anchor lies inside the run directory.
    AnchorError
        When republishing the head on resume fails.

    Attributes
    ----------
    path : Path
    head : str
        Hash of the last record (:data:`GENESIS` when empty).
    length : int
        Number of records.
    key_id : str | None
        Fingerprint of the signing key (None when unsigned).
    chain : str | None
        Hash of the first record: the chain's id in the anchor (None when empty).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        resume: bool = False,
        signing_key: Ed25519PrivateKey | None = None,
        anchor: AuditAnchor | None = None,
    ) -> None:
        self._configure(path, signing_key, anchor)
        if resume and self.path.exists():
            self._adopt(self._scan_existing(None, "cannot resume a damaged audit log: "))
            self._reconcile_with_anchor()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as file:
            os.fsync(file.fileno())
        fsync_directory(self.path.parent)

    def _configure(self, path: str | Path, signing_key: Ed25519PrivateKey | None, anchor: AuditAnchor | None) -> None:
        if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(f"signing_key must be an Ed25519PrivateKey, got {type(signing_key).__name__}")
        if anchor is not None and not isinstance(anchor, AuditAnchor):
            raise TypeError(f"anchor must be an AuditAnchor (see anchor_from_spec), got {type(anchor).__name__}")
        self.path = Path(path)
        self._signing_key = signing_key
        self.key_id = key_fingerprint(signing_key) if signing_key is not None else None
        self.anchor = anchor
        if anchor is not None:
            anchor.check_location(self.path.parent)
        self.head, self.length, self.chain = GENESIS, 0, None
        self._hashes: list[str] = []
        self._last: dict[str, Any] | None = None

    def _scan_existing(self, limit: int | None, context: str) -> _Scan:
        public = self._signing_key.public_key() if self._signing_key is not None else None
        scan = _scan(self.path, limit=limit, public_key=public)
        found = scan.result
        if not found.ok:
            raise AuditError(self.path, found.bad_line, f"{context}{found.reason}")
        if self.key_id is None and scan.signed_by is not None:
            raise AuditError(self.path, None, f"the log is signed by key {scan.signed_by}: continue it with that "
                                              "signing key (unsigned records would follow signed ones)")
        return scan

    def _adopt(self, scan: _Scan) -> None:
        self._hashes = list(scan.hashes)
        self.head, self.length = scan.result.head, scan.result.records
        self.chain = self._hashes[0] if self._hashes else None
        self._last = scan.last

    def _anchored_heads(self, chain: str | None) -> list[AnchorEntry] | None:
        if self.anchor is None or chain is None:
            return None
        return self.anchor.heads(chain)

    def _reconcile_with_anchor(self) -> None:
        """On reopening: refuse a log the file anchor contradicts; publish the head again."""
        if self.anchor is None or self.length == 0:
            return
        heads = self._anchored_heads(self.chain)
        if heads is not None:
            conflict = _conflict_with_anchor(self._hashes, heads)
            if conflict is not None:
                line, reason = conflict
                raise AuditError(self.path, line, f"cannot continue: {reason} (anchor {self.anchor!r})")
            if any(entry.index == self.length - 1 for entry in heads):
                return  # the head is already anchored
        self.anchor.publish(self._head_entry())

    def _head_entry(self) -> AnchorEntry:
        last = self._last or {}
        return AnchorEntry(self.chain or GENESIS, self.length - 1, self.head, str(last.get("time", "")),
                           last.get("key_id"), last.get("sig"))

    @classmethod
    def open_at(
        cls,
        path: str | Path,
        *,
        length: int,
        head: str,
        signing_key: Ed25519PrivateKey | None = None,
        anchor: AuditAnchor | None = None,
    ) -> AuditLog:
        """Reopen a log at the point a checkpoint recorded, dropping any records after it.

        Only the first ``length`` records are verified (and, with ``signing_key``, their
        signatures); anything after them (a record written before the crash but after the
        checkpoint, possibly torn) is discarded -- unless a file ``anchor`` vouches for it:
        records the anchor holds are never dropped (the log would fork).

        Parameters
        ----------
        path : str or Path
            The ``audit.jsonl`` file.
        length : int
            Number of records the checkpoint vouches for.
        head : str
            Hash of the last of them, as stored in the checkpoint.
        signing_key, anchor
            As for :class:`AuditLog`: appends after reopening are signed and anchored.

        Raises
        ------
        AuditError
            When the file is missing, its first ``length`` records are damaged or not signed by
            ``signing_key``, it is shorter, the record at ``length`` does not have hash ``head``,
            or the anchor vouches for a record after ``length``.
        """
        log = cls.__new__(cls)
        log._configure(path, signing_key, anchor)
        if not log.path.exists():
            raise AuditError(log.path, None, "audit log missing but the checkpoint expects one")
        log._cut(length, head, limit_to_current=False)
        log._reconcile_with_anchor()
        return log

    def head_at(self, length: int) -> str:
        """The hash of record ``length`` (the head after the first ``length`` records; GENESIS for 0).

        For resuming without cutting: a checkpoint's (length, head) belong to this log when
        ``log.head_at(length) == head``.

        Raises
        ------
        AuditError
            When the log holds fewer than ``length`` records.
        """
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"length must be a non-negative integer, got {length!r}")
        if length > self.length:
            raise AuditError(self.path, self.length + 1, f"log holds {self.length} records, asked for the head "
                                                         f"after {length}")
        return self._hashes[length - 1] if length else GENESIS

    def append(self, record: dict[str, Any]) -> str:
        """Chain ``record`` onto the log, sign it, write it durably, anchor the new head; return it.

        Adds ``index`` and ``prev`` (and ``time``, UTC ISO 8601, when absent; and ``key_id`` when
        signing) to a copy of ``record``, computes ``hash`` over the canonical JSON of the rest,
        signs the hash, writes one line, flushes and fsyncs, and only then publishes the head to
        the anchor.

        Parameters
        ----------
        record : dict
            JSON data (see :func:`canonical_json`); must not contain ``hash``, ``sig`` or
            ``key_id``. ``index`` and ``prev``, when present, must equal the values the chain
            assigns.

        Returns
        -------
        str
            The new head.

        Raises
        ------
        ValueError
            On NaN/infinity anywhere in the record, a reserved key, or a wrong ``index``/``prev``;
            nothing is written then.
        TypeError
            On a record that is not a dict or holds non-JSON values.
        AnchorError
            When the anchor refuses the head. The record is in the log by then (``head`` and
            ``length`` include it); the anchor lacks it until the next append or reopening
            publishes a later head.
        """
        if not isinstance(record, dict):
            raise TypeError(f"audit record must be a dict, got {type(record).__name__}")
        reserved = [name for name in RESERVED_FIELDS if name in record]
        if reserved:
            raise ValueError(f"audit record must not contain {reserved[0]!r}: the log writes it")
        body = dict(record)
        for name, value in (("index", self.length), ("prev", self.head)):
            if name in body and body[name] != value:
                raise ValueError(f"audit record has {name}={body[name]!r}, but the chain's next {name} is {value!r}")
            body[name] = value
        body.setdefault("time", _utc_now_iso())
        if self.key_id is not None:
            body["key_id"] = self.key_id
        # Normalise through the canonical tree first, so the stored line and the hash agree
        # exactly with what verify() will recompute from the parsed line.
        body = json.loads(canonical_json(body))
        record_hash = _record_hash(body)
        stored = {**body, "hash": record_hash}
        if self._signing_key is not None:
            stored["sig"] = self._signing_key.sign(_signed_message(record_hash)).hex()
        line = canonical_json(stored) + "\n"
        with open(self.path, "ab") as file:
            file.write(line.encode("ascii"))
            file.flush()
            os.fsync(file.fileno())
        self.head, self.length = record_hash, self.length + 1
        self._hashes.append(record_hash)
        self.chain = self.chain or record_hash
        self._last = stored
        if self.anchor is not None:
            try:
                self.anchor.publish(self._head_entry())
            except AnchorError as exc:
                raise AnchorError(f"record {self.length} is in {self.path} but its head was not anchored: {exc}") from exc
        return record_hash

    def truncate_to(self, length: int, head: str) -> None:
        """Drop the records after the first ``length``, after checking that record's hash is ``head``.

        For checkpoint resume: a server killed after writing round k+1's record but before its
        checkpoint resumes from round k's checkpoint, whose (length, head) identify the record
        to continue from. Records a file anchor vouches for are never dropped.

        Raises
        ------
        AuditError
            When the log holds fewer than ``length`` records, the hash at ``length`` is not
            ``head``, or the anchor vouches for a record after ``length``.
        """
        self._cut(length, head, limit_to_current=True)

    def _cut(self, length: int, head: str, *, limit_to_current: bool) -> None:
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"length must be a non-negative integer, got {length!r}")
        _check_head_format(head, "head")
        if limit_to_current and length > self.length:
            raise AuditError(self.path, None, f"cannot truncate to {length} records: the log holds {self.length}")
        scan = self._scan_existing(length, "")
        found = scan.result
        if found.records < length:
            raise AuditError(
                self.path, found.records + 1, f"log holds {found.records} records, the checkpoint expects {length}"
            )
        if found.head != head:
            raise AuditError(
                self.path, length or None, f"record {length} has hash {found.head}, the checkpoint expects {head}"
            )
        heads = self._anchored_heads(scan.hashes[0] if scan.hashes else _first_record_hash(self.path))
        beyond = [entry for entry in heads or [] if entry.index >= length]
        if beyond:
            last = max(beyond, key=lambda entry: entry.index)
            raise AuditError(self.path, length + 1, f"cannot drop records after {length}: the anchor {self.anchor!r} "
                                                    f"vouches for record {last.index + 1} (its line {last.line}); "
                                                    "anchored records are never removed")
        with open(self.path, "r+b") as file:
            file.truncate(scan.end_offset)
            file.flush()
            os.fsync(file.fileno())
        self._adopt(scan)


# --------------------------------------------------------------------------- command line


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.audit", description="Check or show a Phalanx audit log.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="verify the hash chain; exit 0 when intact, 1 otherwise")
    check.add_argument("file", type=Path)
    check.add_argument("--head", help="hash the last record must have (e.g. from the checkpoint)")
    check.add_argument("--length", type=int, help="number of records the file must hold")
    check.add_argument("--public-key", type=Path, help="the server's Ed25519 audit key (PEM): every record must be "
                                                       "signed by it")
    check.add_argument("--anchor", type=Path, help="the anchor file (JSON lines): the log must end at an anchored "
                                                   "head and hold every head anchored for it")
    show = commands.add_parser("show", help="pretty-print the records (without verifying)")
    show.add_argument("file", type=Path)
    keygen = commands.add_parser("keygen", help="create the server's Ed25519 audit key pair (never overwrites)")
    keygen.add_argument("--private", type=Path, required=True, help="private key (PEM, 0600): keep it outside runs/")
    keygen.add_argument("--public", type=Path, required=True, help="public key (PEM) for verifiers")
    args = parser.parse_args(argv)

    if args.command == "keygen":
        try:
            key_id = generate_audit_key(args.private, args.public)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.private} (keep secret, outside every run directory) and {args.public}\nkey_id {key_id}")
        return 0

    if args.command == "show":
        try:
            for record in iter_records(args.file):
                print(json.dumps(record, indent=2, sort_keys=True))
        except (OSError, AuditError) as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        return 0

    try:
        found = verify(args.file, expected_head=args.head, expected_length=args.length, public_key=args.public_key,
                       anchor=args.anchor)
    except FileNotFoundError as exc:
        print(f"{exc.filename or args.file}: no such file", file=sys.stderr)
        return 1
    except AuditError as exc:  # a malformed anchor line
        print(f"{args.file}: anchor damaged: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    if found.ok:
        extra = f", signed by key {found.key_id}" if found.key_id else ""
        extra += f", matches {found.anchored} anchored head(s)" if found.anchored is not None else ""
        print(f"OK: {found.records} records, head {found.head}{extra}")
        return 0
    where = f"{args.file}:{found.bad_line}" if found.bad_line is not None else str(args.file)
    print(f"{where}: {found.reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(_main())
