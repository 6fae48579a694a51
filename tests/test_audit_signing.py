"""Audit authenticity: signed records and an anchor kept outside the run directory.

Specification (issue 14, item 7):
- with the server's Ed25519 key, every record carries ``key_id`` and a signature over its hash;
  a log edited and re-chained by someone without the key fails ``verify(public_key=...)`` at the
  first record changed, and so does a log signed by another key;
- after every append the new head goes to an anchor outside the run directory; against that
  anchor a truncated log, a log rewritten from its first record and a record appended after the
  last anchoring all fail, each naming the log line;
- an edited anchor entry is detected; cutting the log *and* the anchor together is not (the
  documented limit: keep the anchor where the run cannot write);
- unsigned logs verify exactly as before; resume and ``open_at`` need the key, and never drop a
  record the anchor vouches for; ``repair_torn_tail`` drops at most one torn trailing line;
- keys are created 0600 without following symlinks and never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from client.keyfiles import key_fingerprint
from server.audit import (
    GENESIS,
    AnchorError,
    AuditError,
    AuditLog,
    CommandAnchor,
    FileAnchor,
    anchor_from_spec,
    canonical_json,
    load_signing_key,
    read_anchor_file,
    repair_torn_tail,
    verify,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_RECORDS = 6


def _round_record(round_number: int) -> dict:
    return {"round": round_number, "config_hash": "c" * 64, "accepted": {11: "a" * 64},
            "scores": {11: 0.125, 12: 0.9}, "alerts": []}


@pytest.fixture(scope="module")
def server_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def anchor_path(tmp_path: Path) -> Path:
    (tmp_path / "operator").mkdir()
    return tmp_path / "operator" / "heads.jsonl"


@pytest.fixture
def signed_log(run_dir: Path, anchor_path: Path, server_key: Ed25519PrivateKey) -> Path:
    log = AuditLog(run_dir / "audit.jsonl", signing_key=server_key, anchor=FileAnchor(anchor_path))
    for round_number in range(1, NUM_RECORDS + 1):
        log.append(_round_record(round_number))
    return log.path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="ascii").splitlines(keepends=True)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="ascii")


def _rechain(lines: list[str], start: int, edit=lambda record: record, keep_sig: bool = True) -> list[str]:
    """What a forger without the key does: edit record ``start`` (0-based) and recompute every hash
    from there on, so the chain is consistent again. Signatures are kept (now stale) or dropped."""
    out = lines[:start]
    prev = json.loads(lines[start - 1])["hash"] if start else GENESIS
    for index in range(start, len(lines)):
        record = json.loads(lines[index])
        record = edit(record) if index == start else record
        record["prev"] = prev
        body = {k: v for k, v in record.items() if k not in ("hash", "sig")}
        record = {**body, "hash": hashlib.sha256(canonical_json(body).encode()).hexdigest()}
        old_sig = json.loads(lines[index]).get("sig")
        if keep_sig and old_sig:
            record["sig"] = old_sig
        out.append(canonical_json(record) + "\n")
        prev = record["hash"]
    return out


# --------------------------------------------------------------------------- signatures


def test_signed_records_carry_the_key_id_and_a_signature_and_verify(
    signed_log: Path, server_key: Ed25519PrivateKey, anchor_path: Path
) -> None:
    key_id = key_fingerprint(server_key)
    for line in _lines(signed_log):
        record = json.loads(line)
        assert record["key_id"] == key_id and len(record["sig"]) == 128
    result = verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path)
    assert result.ok and result.records == NUM_RECORDS and result.key_id == key_id
    assert result.anchored == NUM_RECORDS
    assert verify(signed_log).ok  # the chain alone still verifies without the key


def test_a_forged_and_rechained_log_fails_with_the_public_key_at_the_first_record_changed(
    signed_log: Path, server_key: Ed25519PrivateKey
) -> None:
    def lower_a_score(record: dict) -> dict:
        return {**record, "scores": {"11": 0.125, "12": 0.0}}

    _write_lines(signed_log, _rechain(_lines(signed_log), 2, lower_a_score))
    assert verify(signed_log).ok  # every hash recomputed: the unkeyed chain cannot tell
    result = verify(signed_log, public_key=server_key.public_key())
    assert (result.ok, result.bad_line, result.records) == (False, 3, 2)
    assert "invalid signature" in result.reason and "without the server key" in result.reason


def test_a_log_rewritten_from_scratch_without_signatures_fails_at_line_1(
    signed_log: Path, server_key: Ed25519PrivateKey
) -> None:
    def unsigned(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "key_id"}

    lines = [canonical_json(unsigned(json.loads(line))) + "\n" for line in _lines(signed_log)]
    _write_lines(signed_log, _rechain(lines, 0, keep_sig=False))
    assert verify(signed_log).ok
    result = verify(signed_log, public_key=server_key.public_key())
    assert (result.ok, result.bad_line) == (False, 1)
    assert "not signed" in result.reason


def test_a_log_signed_by_another_key_fails(run_dir: Path, server_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    impostor = Ed25519PrivateKey.generate()
    log = AuditLog(run_dir / "audit.jsonl", signing_key=impostor)
    for round_number in range(1, 4):
        log.append(_round_record(round_number))
    result = verify(log.path, public_key=server_key.public_key())
    assert (result.ok, result.bad_line) == (False, 1)
    assert f"signed by key {key_fingerprint(impostor)}, expected key {key_fingerprint(server_key)}" in result.reason
    # Relabelling the impostor's records with the server's key_id changes their hash: still refused.
    lines = _rechain(_lines(log.path), 0, lambda r: {**r, "key_id": key_fingerprint(server_key)})
    _write_lines(log.path, lines)
    relabelled = verify(log.path, public_key=server_key.public_key())
    assert (relabelled.ok, relabelled.bad_line) == (False, 1) and "invalid signature" in relabelled.reason


def test_the_public_key_is_accepted_as_a_pem_file(signed_log: Path, server_key: Ed25519PrivateKey, tmp_path: Path):
    from cryptography.hazmat.primitives import serialization

    pem = server_key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "audit.pub.pem").write_bytes(pem)
    assert verify(signed_log, public_key=tmp_path / "audit.pub.pem").ok


def test_append_refuses_the_fields_the_log_writes(tmp_path: Path, server_key: Ed25519PrivateKey) -> None:
    log = AuditLog(tmp_path / "a.jsonl", signing_key=server_key)
    for name in ("sig", "key_id"):
        with pytest.raises(ValueError, match=name):
            log.append({"round": 1, name: "x"})
    assert log.length == 0 and (tmp_path / "a.jsonl").read_bytes() == b""


@settings(max_examples=40, deadline=None)
@given(edit_at=st.integers(0, NUM_RECORDS - 1), cut=st.integers(0, NUM_RECORDS - 1), new_score=st.floats(0, 1))
def test_no_edit_and_rechain_or_cut_survives_the_key_and_the_anchor(
    tmp_path_factory: pytest.TempPathFactory, server_key: Ed25519PrivateKey, edit_at: int, cut: int, new_score: float
) -> None:
    base = tmp_path_factory.mktemp("prop")
    anchor = base / "heads.jsonl"
    log = AuditLog(base / "run" / "audit.jsonl", signing_key=server_key, anchor=FileAnchor(anchor))
    for round_number in range(1, NUM_RECORDS + 1):
        log.append(_round_record(round_number))
    lines = _rechain(_lines(log.path), edit_at, lambda r: {**r, "scores": {"11": new_score, "12": -1.0}})
    _write_lines(log.path, lines[: NUM_RECORDS - cut] if cut else lines)
    assert not verify(log.path, public_key=server_key.public_key(), anchor=anchor).ok


# --------------------------------------------------------------------------- the anchor


def test_every_append_anchors_the_new_head(signed_log: Path, anchor_path: Path, server_key) -> None:
    entries = read_anchor_file(anchor_path)
    records = [json.loads(line) for line in _lines(signed_log)]
    assert [(e.index, e.hash, e.sig, e.time) for e in entries] == [
        (r["index"], r["hash"], r["sig"], r["time"]) for r in records]
    assert {e.chain for e in entries} == {records[0]["hash"]}
    assert {e.key_id for e in entries} == {key_fingerprint(server_key)}


def test_a_truncated_log_passes_its_signatures_but_fails_against_the_anchor(
    signed_log: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    _write_lines(signed_log, _lines(signed_log)[:4])
    assert verify(signed_log, public_key=server_key.public_key()).ok  # a prefix is validly signed
    result = verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path)
    assert (result.ok, result.bad_line, result.records) == (False, 5, 4)
    assert "records missing at the end" in result.reason and "vouches for record 6" in result.reason


def test_an_emptied_log_fails_against_the_anchor(signed_log: Path, anchor_path: Path) -> None:
    signed_log.write_bytes(b"")
    result = verify(signed_log, anchor=anchor_path)
    assert (result.ok, result.bad_line) == (False, 1) and "records were removed" in result.reason


def test_without_the_key_the_anchor_alone_catches_a_rewritten_tail_and_a_replaced_log(
    run_dir: Path, anchor_path: Path
) -> None:
    log = AuditLog(run_dir / "audit.jsonl", anchor=FileAnchor(anchor_path))  # unsigned, anchored
    for round_number in range(1, NUM_RECORDS + 1):
        log.append(_round_record(round_number))
    honest = _lines(log.path)
    _write_lines(log.path, _rechain(honest, 3, lambda r: {**r, "alerts": ["hidden"]}))
    tail = verify(log.path, anchor=anchor_path)
    assert (tail.ok, tail.bad_line) == (False, 4) and "rewritten" in tail.reason
    _write_lines(log.path, _rechain(honest, 0, lambda r: {**r, "round": 0}))
    replaced = verify(log.path, anchor=anchor_path)
    assert (replaced.ok, replaced.bad_line) == (False, 1) and "holds no head of this log's chain" in replaced.reason


def test_a_record_appended_after_the_last_anchoring_fails(
    signed_log: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    # Whoever holds the key but not the anchor (a stolen key) can sign a new record, not anchor it.
    AuditLog(signed_log, resume=True, signing_key=server_key).append(_round_record(99))
    result = verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path)
    assert (result.ok, result.bad_line) == (False, NUM_RECORDS + 1)
    assert f"record {NUM_RECORDS + 1} is not anchored" in result.reason


def test_an_edited_anchor_entry_is_detected(signed_log: Path, anchor_path: Path, server_key) -> None:
    lines = _lines(anchor_path)
    forged = json.loads(lines[2])
    forged["hash"] = "e" * 64
    _write_lines(anchor_path, lines[:2] + [canonical_json(forged) + "\n"] + lines[3:])
    with_key = verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path)
    assert not with_key.ok and f"{anchor_path}:3" in with_key.reason and "anchor tampered" in with_key.reason
    without_key = verify(signed_log, anchor=anchor_path)
    assert (without_key.ok, without_key.bad_line) == (False, 3)

    _write_lines(anchor_path, lines[:1] + ["{not json\n"] + lines[1:])
    with pytest.raises(AuditError, match=rf"{anchor_path.name}:2: malformed anchor entry"):
        verify(signed_log, anchor=anchor_path)


def test_cutting_the_log_and_the_anchor_together_is_the_documented_limit(
    signed_log: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    # docs/deployment.md: an anchor the run can rewrite proves nothing; keep it out of the run's reach.
    _write_lines(signed_log, _lines(signed_log)[:3])
    _write_lines(anchor_path, _lines(anchor_path)[:3])
    assert verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path).ok


def test_an_anchor_shared_by_runs_checks_each_log_against_its_own_chain(
    tmp_path: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    shared = FileAnchor(anchor_path)
    first = AuditLog(tmp_path / "run-a" / "audit.jsonl", signing_key=server_key, anchor=shared)
    second = AuditLog(tmp_path / "run-b" / "audit.jsonl", signing_key=server_key, anchor=shared)
    for round_number in range(1, 4):
        first.append(_round_record(round_number))
        second.append(_round_record(round_number + 10))
    for log in (first, second):
        result = verify(log.path, public_key=server_key.public_key(), anchor=anchor_path)
        assert result.ok and result.anchored == 3


def test_an_anchor_inside_the_run_directory_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run_dir.mkdir()
    with pytest.raises(ValueError, match="inside the run directory.*rewrite the anchor beside it"):
        AuditLog(run_dir / "audit.jsonl", anchor=FileAnchor(run_dir / "anchor.jsonl"))
    (tmp_path / "link").symlink_to(run_dir)
    with pytest.raises(ValueError, match="inside the run directory"):  # also through a symlinked directory
        AuditLog(run_dir / "audit.jsonl", anchor=FileAnchor(tmp_path / "link" / "anchor.jsonl"))


def test_a_file_anchor_refuses_a_symlink_and_a_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "anchor.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="symlink"):
        FileAnchor(tmp_path / "anchor.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        FileAnchor(tmp_path / "no-such-dir" / "anchor.jsonl")


def test_a_torn_anchor_line_does_not_swallow_the_next_head(tmp_path: Path, anchor_path: Path) -> None:
    log = AuditLog(tmp_path / "run" / "audit.jsonl", anchor=FileAnchor(anchor_path))
    log.append(_round_record(1))
    with open(anchor_path, "ab") as file:
        file.write(b'{"chain":"ab')  # a crash mid-write
    log.append(_round_record(2))
    lines = _lines(anchor_path)
    assert lines[1] == '{"chain":"ab\n'  # the fragment is a line of its own...
    assert (json.loads(lines[2])["index"], json.loads(lines[2])["hash"]) == (1, log.head)  # ...the head intact
    with pytest.raises(AuditError, match=r":2: malformed anchor entry"):  # reported, for the operator to inspect
        verify(log.path, anchor=anchor_path)


def _recording_command(tmp_path: Path, status: int = 0, sleep: float = 0.0) -> list[str]:
    script = ("import sys, time\n"
              f"time.sleep({sleep})\n"
              f"open({str(tmp_path / 'posted.jsonl')!r}, 'a').write(sys.stdin.read())\n"
              f"sys.stderr.write('service said no')\nsys.exit({status})\n")
    return [sys.executable, "-c", script]


def test_a_command_anchor_receives_each_head_on_stdin(tmp_path: Path, server_key: Ed25519PrivateKey) -> None:
    log = AuditLog(tmp_path / "run" / "audit.jsonl", signing_key=server_key,
                   anchor=CommandAnchor(_recording_command(tmp_path)))
    log.append(_round_record(1))
    head = log.append(_round_record(2))
    posted = [json.loads(line) for line in _lines(tmp_path / "posted.jsonl")]
    assert [(p["index"], p["hash"]) for p in posted] == [(0, log.chain), (1, head)]
    assert verify(log.path, public_key=server_key.public_key(), anchor=tmp_path / "posted.jsonl").ok


def test_a_failing_or_hanging_anchor_command_is_a_clear_error_and_the_record_stays(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "run" / "audit.jsonl", anchor=CommandAnchor(_recording_command(tmp_path, status=3)))
    with pytest.raises(AnchorError, match=r"(?s)record 1 is in .* but its head was not anchored: .*exited with status 3: "
                                          r"service said no"):
        log.append(_round_record(1))
    assert log.length == 1 and verify(log.path).records == 1
    slow = AuditLog(tmp_path / "run2" / "audit.jsonl",
                    anchor=CommandAnchor(_recording_command(tmp_path, sleep=5), timeout=0.5))
    with pytest.raises(AnchorError, match="did not finish within 0.5 s"):
        slow.append(_round_record(1))
    with pytest.raises(ValueError, match="not found"):
        CommandAnchor(["no-such-anchor-program-xyz"])


def test_anchor_specs_from_the_run_config(tmp_path: Path) -> None:
    assert anchor_from_spec("") is None and anchor_from_spec("  ") is None
    assert isinstance(anchor_from_spec(str(tmp_path / "a.jsonl")), FileAnchor)
    assert anchor_from_spec(f"file:{tmp_path / 'a.jsonl'}").path == tmp_path / "a.jsonl"
    command = anchor_from_spec(f"command:{sys.executable} -c 'import sys'")
    assert isinstance(command, CommandAnchor) and command.argv[1:] == ["-c", "import sys"]


# --------------------------------------------------------------------------- resume


def test_resume_with_the_key_continues_a_signed_anchored_log(
    signed_log: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    log = AuditLog(signed_log, resume=True, signing_key=server_key, anchor=FileAnchor(anchor_path))
    assert len(read_anchor_file(anchor_path)) == NUM_RECORDS  # the head was anchored already: no duplicate
    log.append(_round_record(7))
    assert json.loads(_lines(signed_log)[-1])["key_id"] == key_fingerprint(server_key)
    assert verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path).records == NUM_RECORDS + 1


def test_resume_refuses_a_signed_log_without_its_key_or_with_another(
    signed_log: Path, server_key: Ed25519PrivateKey
) -> None:
    with pytest.raises(AuditError, match="signed by key .*continue it with that signing key"):
        AuditLog(signed_log, resume=True)
    with pytest.raises(AuditError, match=r"audit\.jsonl:1: .*signed by key"):
        AuditLog(signed_log, resume=True, signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(AuditError, match="signed by key"):
        AuditLog.open_at(signed_log, length=2, head=json.loads(_lines(signed_log)[1])["hash"])


def test_resume_republishes_a_head_the_server_died_before_anchoring(
    signed_log: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    _write_lines(anchor_path, _lines(anchor_path)[:-1])  # died between writing record 6 and anchoring it
    assert not verify(signed_log, anchor=anchor_path).ok
    AuditLog(signed_log, resume=True, signing_key=server_key, anchor=FileAnchor(anchor_path))
    assert verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path).ok


def test_resume_refuses_a_log_cut_below_an_anchored_head(
    signed_log: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    _write_lines(signed_log, _lines(signed_log)[:4])
    with pytest.raises(AuditError, match=r"audit\.jsonl:5: cannot continue: the anchor vouches for record 6"):
        AuditLog(signed_log, resume=True, signing_key=server_key, anchor=FileAnchor(anchor_path))


def test_open_at_signs_after_reopening_and_never_drops_an_anchored_record(
    signed_log: Path, anchor_path: Path, server_key: Ed25519PrivateKey
) -> None:
    head_after_four = json.loads(_lines(signed_log)[3])["hash"]
    before = signed_log.read_bytes()
    with pytest.raises(AuditError, match="cannot drop records after 4: the anchor .* vouches for record 6"):
        AuditLog.open_at(signed_log, length=4, head=head_after_four, signing_key=server_key,
                         anchor=FileAnchor(anchor_path))
    assert signed_log.read_bytes() == before
    # Without the anchor's say (its last two heads were never published) the cut is allowed.
    _write_lines(anchor_path, _lines(anchor_path)[:4])
    log = AuditLog.open_at(signed_log, length=4, head=head_after_four, signing_key=server_key,
                           anchor=FileAnchor(anchor_path))
    assert (log.length, log.head, log.head_at(4), log.head_at(0)) == (4, head_after_four, head_after_four, GENESIS)
    log.append(_round_record(5))
    assert verify(signed_log, public_key=server_key.public_key(), anchor=anchor_path).records == 5


# --------------------------------------------------------------------------- torn tails


@pytest.mark.parametrize("torn", [b'{"index":6,"prev":"ab', b"\0\0\0\0\0\0", b"\0\0\0\n", b"{half a record\n"])
def test_repair_drops_one_torn_trailing_record(signed_log: Path, torn: bytes) -> None:
    with open(signed_log, "ab") as file:
        file.write(torn)
    assert not verify(signed_log).ok
    assert repair_torn_tail(signed_log) is True
    assert verify(signed_log).ok and verify(signed_log).records == NUM_RECORDS
    assert repair_torn_tail(signed_log) is False  # nothing torn left: a complete record is never dropped


def test_repair_drops_at_most_one_line_and_keeps_a_parseable_tampered_record(signed_log: Path) -> None:
    with open(signed_log, "ab") as file:
        file.write(b"garbage one\n\0\0\0")
    assert repair_torn_tail(signed_log) is True
    assert _lines(signed_log)[-1] == "garbage one\n"  # the second torn-looking line stays: verify names it
    assert verify(signed_log).bad_line == NUM_RECORDS + 1

    lines = _lines(signed_log)[:NUM_RECORDS]
    lines[-1] = lines[-1].replace('"round":6', '"round":7')  # valid JSON, wrong hash: tampering, not tearing
    _write_lines(signed_log, lines)
    assert repair_torn_tail(signed_log) is False
    assert verify(signed_log).bad_line == NUM_RECORDS


def test_repair_leaves_missing_and_empty_files_alone(tmp_path: Path) -> None:
    assert repair_torn_tail(tmp_path / "absent.jsonl") is False
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert repair_torn_tail(tmp_path / "empty.jsonl") is False
    (tmp_path / "one.jsonl").write_bytes(b"torn")
    assert repair_torn_tail(tmp_path / "one.jsonl") is True and (tmp_path / "one.jsonl").read_bytes() == b""


# --------------------------------------------------------------------------- keys and the command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.audit", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)


def test_keygen_writes_a_private_key_only_the_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    private, public = tmp_path / "keys" / "audit.pem", tmp_path / "keys" / "audit.pub.pem"
    made = _cli("keygen", "--private", str(private), "--public", str(public))
    assert made.returncode == 0, made.stderr
    assert private.stat().st_mode & 0o777 == 0o600
    key = load_signing_key(private, run_dir=tmp_path / "run")
    assert f"key_id {key_fingerprint(key)}" in made.stdout
    before = private.read_bytes()
    again = _cli("keygen", "--private", str(private), "--public", str(tmp_path / "other.pub.pem"))
    assert again.returncode == 1 and "already exists" in again.stderr and private.read_bytes() == before

    (tmp_path / "victim").write_text("precious")
    (tmp_path / "planted.pem").symlink_to(tmp_path / "victim")
    planted = _cli("keygen", "--private", str(tmp_path / "planted.pem"), "--public", str(tmp_path / "p.pub.pem"))
    assert planted.returncode == 1 and "symlink" in planted.stderr
    assert (tmp_path / "victim").read_text() == "precious"


def test_load_signing_key_refuses_a_key_in_the_run_directory_or_readable_by_others(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert _cli("keygen", "--private", str(run / "audit.pem"), "--public", str(run / "audit.pub.pem")).returncode == 0
    with pytest.raises(ValueError, match="inside the run directory"):
        load_signing_key(run / "audit.pem", run_dir=run)
    os.chmod(run / "audit.pem", 0o644)
    with pytest.raises(ValueError, match="mode 0644: other users can read"):
        load_signing_key(run / "audit.pem")


def test_cli_verify_with_the_public_key_and_the_anchor(
    tmp_path: Path, run_dir: Path, anchor_path: Path
) -> None:
    private, public = tmp_path / "audit.pem", tmp_path / "audit.pub.pem"
    assert _cli("keygen", "--private", str(private), "--public", str(public)).returncode == 0
    key = load_signing_key(private)
    log = AuditLog(run_dir / "audit.jsonl", signing_key=key, anchor=FileAnchor(anchor_path))
    for round_number in range(1, NUM_RECORDS + 1):
        log.append(_round_record(round_number))
    path = str(log.path)

    intact = _cli("verify", path, "--public-key", str(public), "--anchor", str(anchor_path))
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == (f"OK: {NUM_RECORDS} records, head {log.head}, signed by key "
                                     f"{key_fingerprint(key)}, matches {NUM_RECORDS} anchored head(s)")

    honest = _lines(log.path)
    _write_lines(log.path, _rechain(honest, 1, lambda r: {**r, "alerts": ["edited"]}))
    assert _cli("verify", path).returncode == 0  # the unkeyed chain is fooled
    forged = _cli("verify", path, "--public-key", str(public))
    assert forged.returncode == 1 and forged.stderr.startswith(f"{path}:2: invalid signature")

    _write_lines(log.path, honest[:3])
    truncated = _cli("verify", path, "--public-key", str(public), "--anchor", str(anchor_path))
    assert truncated.returncode == 1 and truncated.stderr.startswith(f"{path}:4: records missing at the end")

    _write_lines(anchor_path, ["{broken\n"])
    damaged = _cli("verify", path, "--anchor", str(anchor_path))
    assert damaged.returncode == 1 and "anchor damaged" in damaged.stderr
    missing = _cli("verify", path, "--anchor", str(tmp_path / "no-anchor.jsonl"))
    assert missing.returncode == 1 and "no-anchor.jsonl: no such file" in missing.stderr
