"""A tamper-evident, hash-chained round record (``audit.jsonl``).

Each line of the file is one JSON object in canonical form (see :func:`canonical_json`). Every
record carries

* ``index`` -- its 0-based position in the chain,
* ``prev`` -- the ``hash`` of the record before it (:data:`GENESIS` for the first record),
* ``time`` -- when it was written (UTC, ISO 8601), unless the writer supplied one,
* ``hash`` -- ``sha256(canonical_json(record without "hash"))`` as 64 lowercase hex digits,

plus whatever the writer put in it (the strategy writes the round, config hash, participants,
update digests, rejections, scores, the aggregate's digest and alerts). Because each hash covers
the previous hash, editing, inserting, deleting or reordering any record breaks the chain at
the first line touched, and :func:`verify` names that line.

What a chain alone cannot prove is its own tail: removing the last ``k`` records leaves a
shorter chain that is perfectly valid. Whoever needs to detect that must remember the head
(and length) somewhere else -- the server stores both in its checkpoint -- and pass them as
``expected_head`` / ``expected_length``. The same holds for an attacker who rewrites the tail
and recomputes every hash after the edit: only a remembered head exposes it.

Command line::

    python -m server.audit verify FILE [--head HASH] [--length N]
    python -m server.audit show FILE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: `python -m server.audit verify` should start fast
    import torch

#: The ``prev`` of the first record, and the head of an empty chain.
GENESIS = "0" * 64

#: Version tag mixed into :func:`sha256_tensor`, so that a future change of framing cannot
#: produce digests that collide with today's.
TENSOR_DIGEST_TAG = b"phalanx.sha256_tensor.v1"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHAIN_FIELDS = ("index", "prev", "hash")


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
        The first bad line, 1-based; None when ``ok``. When records are missing at the end it
        is the line where the first missing record should be.
    reason : str
        What is wrong ("intact" when ``ok``).
    head : str
        Hash of the last intact record (:data:`GENESIS` when there is none).
    """

    ok: bool
    records: int
    bad_line: int | None
    reason: str
    head: str = GENESIS


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


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} (not valid JSON)")


def _check_line(raw: bytes, expected_index: int, prev: str) -> tuple[str | None, str]:
    """Check one line; return (problem or None, the record's hash)."""
    if not raw.endswith(b"\n"):
        return "last line has no newline (torn write or appended data)", ""
    text_bytes = raw[:-1]
    if not text_bytes.strip():
        return "blank line", ""
    try:
        text = text_bytes.decode("ascii")
    except UnicodeDecodeError as exc:
        return f"malformed record: non-ASCII byte at column {exc.start + 1}", ""
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        return f"malformed JSON: {exc}", ""
    if not isinstance(record, dict):
        return f"malformed record: expected a JSON object, found {type(record).__name__}", ""
    missing = [name for name in _CHAIN_FIELDS if name not in record]
    if missing:
        return f"malformed record: missing field(s) {', '.join(missing)}", ""
    stored_hash = record["hash"]
    if not isinstance(stored_hash, str) or not _HEX64.fullmatch(stored_hash):
        return "malformed record: 'hash' is not 64 lowercase hex digits", ""
    # The line must be exactly the canonical text, so that no byte can change unnoticed
    # (whitespace, key order or number spelling would not change the parsed record).
    try:
        canonical = canonical_json(record)
    except ValueError as exc:  # e.g. 1e999, which parses as infinity
        return f"malformed record: {exc}", stored_hash
    if canonical != text:
        return "record is not in canonical form (edited)", stored_hash
    body = {key: value for key, value in record.items() if key != "hash"}
    if _record_hash(body) != stored_hash:
        return "hash mismatch: record content or hash was edited", stored_hash
    index = record["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        return f"'index' must be an integer, found {index!r}", stored_hash
    if index != expected_index:
        return (
            f"index {index} where {expected_index} was expected (record inserted, deleted or moved)",
            stored_hash,
        )
    if record["prev"] != prev:
        return "'prev' does not match the previous record's hash (record inserted, deleted or moved)", stored_hash
    return None, stored_hash


def _scan(path: Path, *, limit: int | None = None, look_for: str | None = None) -> _Scan:
    """Walk the chain in ``path``, stopping at the first bad line or after ``limit`` records."""
    head = GENESIS
    records = 0
    offset = 0
    seen_at: int | None = None
    with open(path, "rb") as file:
        for lineno, raw in enumerate(file, start=1):
            if limit is not None and records >= limit:
                break
            problem, record_hash = _check_line(raw, records, head)
            if problem is not None:
                return _Scan(VerifyResult(False, records, lineno, problem, head), offset, seen_at)
            head = record_hash
            records += 1
            offset += len(raw)
            if look_for is not None and record_hash == look_for:
                seen_at = lineno
    return _Scan(VerifyResult(True, records, None, "intact", head), offset, seen_at)


def verify(
    path: str | Path, *, expected_head: str | None = None, expected_length: int | None = None
) -> VerifyResult:
    """Check every record of an audit log and, optionally, where the chain must end.

    Detected: any edited byte in a record (canonical form / hash mismatch), an inserted,
    deleted or moved record (index or ``prev`` mismatch), malformed lines and appended garbage.
    Records missing at the end are detected only with ``expected_head`` or ``expected_length``:
    a truncated chain is still a valid chain, so only a head remembered elsewhere (the
    checkpoint) can prove that nothing was cut.

    Parameters
    ----------
    path : str or Path
        The ``audit.jsonl`` file.
    expected_head : str, optional
        Hash the last record must have.
    expected_length : int, optional
        Number of records the file must hold.

    Returns
    -------
    VerifyResult
        ``ok`` and, when not, the first bad line (1-based) and the reason.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When ``expected_head`` is not 64 hex digits or ``expected_length`` is negative.
    """
    path = Path(path)
    if expected_head is not None:
        _check_head_format(expected_head, "expected_head")
    if expected_length is not None and (not isinstance(expected_length, int) or expected_length < 0):
        raise ValueError(f"expected_length must be a non-negative integer, got {expected_length!r}")
    scan = _scan(path, look_for=expected_head)
    found = scan.result
    if not found.ok:
        return found
    n = found.records
    if expected_length is not None and n != expected_length:
        if n < expected_length:
            reason = f"expected {expected_length} records, found {n}: records missing at the end"
            return VerifyResult(False, n, n + 1, reason, found.head)
        reason = f"expected {expected_length} records, found {n}: records after the expected end"
        return VerifyResult(False, expected_length, expected_length + 1, reason, found.head)
    if expected_head is not None and found.head != expected_head:
        if scan.head_seen_at is not None:
            line = scan.head_seen_at + 1
            reason = f"records follow the expected head {expected_head} (line {scan.head_seen_at})"
            return VerifyResult(False, scan.head_seen_at, line, reason, expected_head)
        reason = (
            f"chain ends with head {found.head}, expected {expected_head}: "
            "records missing at the end, or the chain was rewritten"
        )
        return VerifyResult(False, n, n + 1, reason, found.head)
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


def _fsync_directory(directory: Path) -> None:
    """Persist a directory entry (new or renamed file); a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open directories; its rename is durable enough there.
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the file itself is synced
    finally:
        os.close(fd)


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class AuditLog:
    """An append-only writer of a hash-chained log, durable after every append.

    Parameters
    ----------
    path : str or Path
        The ``audit.jsonl`` file.
    resume : bool, default False
        False: start a new, empty log (parent directories are created, an existing file is
        truncated). True: verify the existing file and continue its chain from its head (a
        missing file starts empty).

    Raises
    ------
    AuditError
        With ``resume=True``, when the existing file is damaged; the message names the first
        bad line. After a crash mid-append, use :meth:`open_at` with the head stored in the
        checkpoint instead: it verifies only the records the checkpoint vouches for.

    Attributes
    ----------
    path : Path
    head : str
        Hash of the last record (:data:`GENESIS` when empty).
    length : int
        Number of records.
    """

    def __init__(self, path: str | Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.head = GENESIS
        self.length = 0
        if resume and self.path.exists():
            found = _scan(self.path).result
            if not found.ok:
                raise AuditError(self.path, found.bad_line, f"cannot resume a damaged audit log: {found.reason}")
            self.head, self.length = found.head, found.records
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb") as file:
            os.fsync(file.fileno())
        _fsync_directory(self.path.parent)

    @classmethod
    def open_at(cls, path: str | Path, *, length: int, head: str) -> AuditLog:
        """Reopen a log at the point a checkpoint recorded, dropping any records after it.

        Only the first ``length`` records are verified; anything after them (a record written
        before the crash but after the checkpoint, possibly torn) is discarded.

        Parameters
        ----------
        path : str or Path
            The ``audit.jsonl`` file.
        length : int
            Number of records the checkpoint vouches for.
        head : str
            Hash of the last of them, as stored in the checkpoint.

        Raises
        ------
        AuditError
            When the file is missing, its first ``length`` records are damaged, it is shorter, or
            the record at ``length`` does not have hash ``head``.
        """
        log = cls.__new__(cls)
        log.path = Path(path)
        if not log.path.exists():
            raise AuditError(log.path, None, "audit log missing but the checkpoint expects one")
        log.head, log.length = GENESIS, 0
        log._cut(length, head, limit_to_current=False)
        return log

    def append(self, record: dict[str, Any]) -> str:
        """Chain ``record`` onto the log, write it durably, and return its hash.

        Adds ``index`` and ``prev`` (and ``time``, UTC ISO 8601, when absent) to a copy of
        ``record``, computes ``hash`` over the canonical JSON of the rest, writes one line, then
        flushes and fsyncs before returning.

        Parameters
        ----------
        record : dict
            JSON data (see :func:`canonical_json`); must not contain ``hash``. ``index`` and
            ``prev``, when present, must equal the values the chain assigns.

        Returns
        -------
        str
            The new head.

        Raises
        ------
        ValueError
            On NaN/infinity anywhere in the record, a ``hash`` key, or a wrong ``index``/``prev``.
        TypeError
            On a record that is not a dict or holds non-JSON values.
        """
        if not isinstance(record, dict):
            raise TypeError(f"audit record must be a dict, got {type(record).__name__}")
        if "hash" in record:
            raise ValueError("audit record must not contain 'hash': the log computes it")
        body = dict(record)
        for name, value in (("index", self.length), ("prev", self.head)):
            if name in body and body[name] != value:
                raise ValueError(f"audit record has {name}={body[name]!r}, but the chain's next {name} is {value!r}")
            body[name] = value
        body.setdefault("time", _utc_now_iso())
        # Normalise through the canonical tree first, so the stored line and the hash agree
        # exactly with what verify() will recompute from the parsed line.
        body = json.loads(canonical_json(body))
        record_hash = _record_hash(body)
        line = canonical_json({**body, "hash": record_hash}) + "\n"
        with open(self.path, "ab") as file:
            file.write(line.encode("ascii"))
            file.flush()
            os.fsync(file.fileno())
        self.head, self.length = record_hash, self.length + 1
        return record_hash

    def truncate_to(self, length: int, head: str) -> None:
        """Drop the records after the first ``length``, after checking that record's hash is ``head``.

        For checkpoint resume: a server killed after writing round k+1's record but before its
        checkpoint resumes from round k's checkpoint, whose (length, head) identify the record
        to continue from.

        Raises
        ------
        AuditError
            When the log holds fewer than ``length`` records or the hash at ``length`` is not
            ``head``.
        """
        self._cut(length, head, limit_to_current=True)

    def _cut(self, length: int, head: str, *, limit_to_current: bool) -> None:
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"length must be a non-negative integer, got {length!r}")
        _check_head_format(head, "head")
        if limit_to_current and length > self.length:
            raise AuditError(self.path, None, f"cannot truncate to {length} records: the log holds {self.length}")
        scan = _scan(self.path, limit=length)
        found = scan.result
        if not found.ok:
            raise AuditError(self.path, found.bad_line, found.reason)
        if found.records < length:
            raise AuditError(
                self.path, found.records + 1, f"log holds {found.records} records, the checkpoint expects {length}"
            )
        if found.head != head:
            raise AuditError(
                self.path, length or None, f"record {length} has hash {found.head}, the checkpoint expects {head}"
            )
        with open(self.path, "r+b") as file:
            file.truncate(scan.end_offset)
            file.flush()
            os.fsync(file.fileno())
        self.head, self.length = found.head, found.records


# --------------------------------------------------------------------------- command line


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.audit", description="Check or show a Phalanx audit log.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="verify the hash chain; exit 0 when intact, 1 otherwise")
    check.add_argument("file", type=Path)
    check.add_argument("--head", help="hash the last record must have (e.g. from the checkpoint)")
    check.add_argument("--length", type=int, help="number of records the file must hold")
    show = commands.add_parser("show", help="pretty-print the records (without verifying)")
    show.add_argument("file", type=Path)
    args = parser.parse_args(argv)

    if args.command == "show":
        try:
            for record in iter_records(args.file):
                print(json.dumps(record, indent=2, sort_keys=True))
        except (OSError, AuditError) as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        return 0

    try:
        found = verify(args.file, expected_head=args.head, expected_length=args.length)
    except FileNotFoundError:
        print(f"{args.file}: no such file", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    if found.ok:
        print(f"OK: {found.records} records, head {found.head}")
        return 0
    print(f"{args.file}:{found.bad_line}: {found.reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(_main())
