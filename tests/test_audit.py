"""The hash-chained audit log: every kind of tampering is caught at the right line."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    canonical_json,
    iter_records,
    sha256_tensor,
    verify,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_RECORDS = 6


def _round_record(round_number: int) -> dict:
    """A record shaped like the strategy's: node ids as int keys, float scores, digests."""
    return {
        "round": round_number,
        "config_hash": "c" * 64,
        "participants": [11, 12, 13],
        "accepted": {11: "a" * 64, 12: "b" * 64},
        "rejected": {13: "non-finite update"},
        "scores": {11: 0.125, 12: 0.25, 13: 0.9},
        "aggregate": "d" * 64,
        "alerts": [],
    }


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "audit.jsonl"
    log = AuditLog(path)
    for round_number in range(1, NUM_RECORDS + 1):
        log.append(_round_record(round_number))
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="ascii").splitlines(keepends=True)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines), encoding="ascii")


def _rehash(record: dict) -> dict:
    """Recompute a record's hash the way a forger who knows the format would."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return {**body, "hash": hashlib.sha256(canonical_json(body).encode()).hexdigest()}


# --------------------------------------------------------------------------- canonical form


def test_canonical_json_sorts_keys_without_spaces_and_escapes_non_ascii() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"], "c": None}) == '{"a":[1.5,"\\u00e9"],"b":1,"c":null}'


def test_canonical_json_turns_int_keys_into_strings_as_json_stores_them() -> None:
    # Sorting int keys numerically (9 before 10) would give a different text after a round trip.
    assert canonical_json({10: "x", 9: "y"}) == canonical_json(json.loads(canonical_json({10: "x", 9: "y"})))
    assert canonical_json({10: "x", 9: "y"}) == '{"10":"x","9":"y"}'


def test_canonical_json_accepts_numpy_scalars() -> None:
    assert canonical_json({"s": np.float64(0.5), "n": np.int64(3)}) == '{"n":3,"s":0.5}'


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_canonical_json_refuses_non_finite_numbers_naming_where(bad: float) -> None:
    with pytest.raises(ValueError, match=r"non-finite.*\$\.scores\.7"):
        canonical_json({"scores": {7: bad}})


def test_canonical_json_refuses_tensors_and_colliding_keys() -> None:
    with pytest.raises(TypeError, match="Tensor"):
        canonical_json({"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="duplicate key"):
        canonical_json({1: "a", "1": "b"})


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
        max_leaves=15,
    )
)
def test_canonical_json_is_stable_through_a_json_round_trip(value: object) -> None:
    text = canonical_json(value)
    assert canonical_json(json.loads(text)) == text
    assert text.isascii()


# --------------------------------------------------------------------------- tensor digest


def test_sha256_tensor_ignores_layout_but_sees_dtype_shape_and_values() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    digest = sha256_tensor(base)
    assert sha256_tensor(base.t().contiguous().t()) == digest  # a strided view of the same values
    assert sha256_tensor(base.clone().requires_grad_()) == digest
    assert sha256_tensor(base.reshape(4, 3)) != digest
    assert sha256_tensor(base.double()) != digest
    changed = base.clone()
    changed[2, 3] = 11.000001
    assert sha256_tensor(changed) != digest
    assert sha256_tensor(torch.tensor(1.0)) != sha256_tensor(torch.tensor([1.0]))


def test_sha256_tensor_follows_the_documented_framing() -> None:
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16)
    expected = hashlib.sha256(
        b"phalanx.sha256_tensor.v1\0" + b"torch.int16\0" + b"2,2\0" + np.array([1, 2, 3, 4], "<i2").tobytes()
    ).hexdigest()
    assert sha256_tensor(t) == expected


def test_sha256_tensor_handles_dtypes_numpy_lacks() -> None:
    t = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert sha256_tensor(t) != sha256_tensor(t.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sha256_tensor_is_device_independent() -> None:
    t = torch.randn(100, 7)
    assert sha256_tensor(t.cuda()) == sha256_tensor(t)


# --------------------------------------------------------------------------- writing and verifying


def test_an_untouched_log_verifies(log_path: Path) -> None:
    result = verify(log_path)
    assert result.ok and result.bad_line is None
    assert result.records == NUM_RECORDS
    assert result.head == json.loads(_lines(log_path)[-1])["hash"]


def test_records_carry_index_prev_time_and_their_own_hash(log_path: Path) -> None:
    records = list(iter_records(log_path))
    assert [r["index"] for r in records] == list(range(NUM_RECORDS))
    assert records[0]["prev"] == GENESIS
    for earlier, later in zip(records, records[1:]):
        assert later["prev"] == earlier["hash"]
    for record in records:
        assert _rehash(record)["hash"] == record["hash"]
        assert record["time"].endswith("+00:00")
    assert records[0]["accepted"] == {"11": "a" * 64, "12": "b" * 64}


def test_append_returns_the_new_head_and_counts(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    assert (log.head, log.length) == (GENESIS, 0)
    first = log.append({"round": 1})
    assert (log.head, log.length) == (first, 1)
    second = log.append({"round": 2, "time": "fixed"})
    assert second != first and log.length == 2
    assert list(iter_records(tmp_path / "a.jsonl"))[1]["time"] == "fixed"


def test_a_new_log_truncates_an_existing_file(log_path: Path) -> None:
    AuditLog(log_path)
    assert log_path.read_bytes() == b""
    assert verify(log_path).records == 0


def test_nan_record_is_refused_and_nothing_is_written(log_path: Path) -> None:
    log = AuditLog(log_path, resume=True)
    before = log_path.read_bytes()
    with pytest.raises(ValueError, match="non-finite"):
        log.append({"round": 99, "scores": {3: float("nan")}})
    assert log_path.read_bytes() == before
    assert log.length == NUM_RECORDS


def test_append_refuses_a_hash_field_or_wrong_chain_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="hash"):
        log.append({"hash": "0" * 64})
    with pytest.raises(ValueError, match="index"):
        log.append({"index": 5})
    with pytest.raises(TypeError, match="dict"):
        log.append([1, 2])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tampering


def _edit_line(path: Path, line: int, edit) -> None:
    lines = _lines(path)
    lines[line - 1] = edit(lines[line - 1])
    _write_lines(path, lines)


def test_an_edited_value_is_caught_at_its_line(log_path: Path) -> None:
    _edit_line(log_path, 3, lambda text: text.replace('"13":0.9', '"13":0.1'))
    result = verify(log_path)
    assert not result.ok and result.bad_line == 3 and "hash mismatch" in result.reason
    assert result.records == 2


def test_an_edited_hash_is_caught_at_its_line(log_path: Path) -> None:
    def flip_hash(text: str) -> str:
        record = json.loads(text)
        record["hash"] = ("1" if record["hash"][0] != "1" else "2") + record["hash"][1:]
        return canonical_json(record) + "\n"

    _edit_line(log_path, 4, flip_hash)
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 4)


def test_a_record_edited_and_rehashed_breaks_the_next_line(log_path: Path) -> None:
    _edit_line(log_path, 2, lambda text: canonical_json(_rehash({**json.loads(text), "rejected": {}})) + "\n")
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 3)
    assert "prev" in result.reason


def test_a_whitespace_edit_is_caught_although_the_parsed_record_is_unchanged(log_path: Path) -> None:
    _edit_line(log_path, 5, lambda text: text.replace(",", ", ", 1))
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 5)
    assert "canonical" in result.reason


def test_a_single_edited_byte_anywhere_is_caught_at_its_line(log_path: Path) -> None:
    original = log_path.read_bytes()
    line_starts = [0] + [i + 1 for i, byte in enumerate(original) if byte == ord("\n")][:-1]
    for position in range(0, len(original), 37):
        tampered = bytearray(original)
        tampered[position] ^= 0x01
        log_path.write_bytes(bytes(tampered))
        line = sum(1 for start in line_starts if start <= position)
        result = verify(log_path)
        assert not result.ok, f"flip at byte {position} undetected"
        # A flipped newline merges or splits lines; otherwise the damaged line itself is named.
        if original[position] != ord("\n"):
            assert result.bad_line == line, (position, result)


def test_a_copied_line_inserted_is_caught_where_it_sits(log_path: Path) -> None:
    lines = _lines(log_path)
    _write_lines(log_path, lines[:3] + [lines[1]] + lines[3:])
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 4)
    assert "index 1 where 3 was expected" in result.reason


def test_a_forged_line_with_a_wrong_hash_is_caught_where_it_sits(log_path: Path) -> None:
    lines = _lines(log_path)
    previous = json.loads(lines[2])
    forged = {**_round_record(99), "index": 3, "prev": previous["hash"], "time": "t", "hash": "e" * 64}
    _write_lines(log_path, lines[:3] + [canonical_json(forged) + "\n"] + lines[3:])
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 4)
    assert "hash mismatch" in result.reason


def test_a_forged_line_chained_correctly_is_caught_at_the_record_after_it(log_path: Path) -> None:
    lines = _lines(log_path)
    previous = json.loads(lines[2])
    forged = _rehash({**_round_record(99), "index": 3, "prev": previous["hash"], "time": "t"})
    _write_lines(log_path, lines[:3] + [canonical_json(forged) + "\n"] + lines[3:])
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 5)


def test_a_forged_tail_rewritten_consistently_is_caught_only_by_the_expected_head(log_path: Path) -> None:
    honest_head = verify(log_path).head
    lines = _lines(log_path)
    rewritten = lines[:4]
    prev = json.loads(lines[3])["hash"]
    for index in range(4, NUM_RECORDS):
        record = _rehash({**_round_record(100 + index), "index": index, "prev": prev, "time": "t"})
        rewritten.append(canonical_json(record) + "\n")
        prev = record["hash"]
    _write_lines(log_path, rewritten)
    assert verify(log_path).ok
    result = verify(log_path, expected_head=honest_head, expected_length=NUM_RECORDS)
    assert not result.ok and "rewritten" in result.reason


def test_a_deleted_middle_line_is_caught_where_the_gap_is(log_path: Path) -> None:
    lines = _lines(log_path)
    _write_lines(log_path, lines[:2] + lines[3:])
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 3)
    assert "index 3 where 2 was expected" in result.reason


def test_two_swapped_lines_are_caught_at_the_first(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[2], lines[3] = lines[3], lines[2]
    _write_lines(log_path, lines)
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, 3)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        ("this is not json\n", "malformed JSON"),
        ('{"index": 6}\n', "missing field"),
        ("[1, 2]\n", "JSON object"),
        ("\n", "blank line"),
        ('{"partial": tr', "no newline"),
        ('{"hash":"' + "0" * 64 + '","index":6,"prev":"x","v":NaN}\n', "non-finite"),
    ],
)
def test_appended_garbage_is_caught_at_its_line(log_path: Path, garbage: str, reason: str) -> None:
    with open(log_path, "a", encoding="ascii") as file:
        file.write(garbage)
    result = verify(log_path)
    assert (result.ok, result.bad_line) == (False, NUM_RECORDS + 1)
    assert reason in result.reason
    assert result.records == NUM_RECORDS


def test_non_ascii_bytes_are_malformed(log_path: Path) -> None:
    with open(log_path, "ab") as file:
        file.write(b'{"x":"\xff"}\n')
    assert verify(log_path).bad_line == NUM_RECORDS + 1


def test_a_truncated_tail_passes_alone_and_is_caught_with_the_expected_head_or_length(log_path: Path) -> None:
    full = verify(log_path)
    _write_lines(log_path, _lines(log_path)[:4])
    assert verify(log_path).ok  # a chain cannot prove its own tail
    by_length = verify(log_path, expected_length=NUM_RECORDS)
    assert (by_length.ok, by_length.bad_line) == (False, 5)
    assert "missing at the end" in by_length.reason
    by_head = verify(log_path, expected_head=full.head)
    assert (by_head.ok, by_head.bad_line) == (False, 5)
    assert verify(log_path, expected_head=verify(log_path).head, expected_length=4).ok


def test_records_beyond_the_expected_head_are_named(log_path: Path) -> None:
    head_after_three = json.loads(_lines(log_path)[2])["hash"]
    by_head = verify(log_path, expected_head=head_after_three)
    assert (by_head.ok, by_head.bad_line) == (False, 4)
    by_length = verify(log_path, expected_length=3)
    assert (by_length.ok, by_length.bad_line) == (False, 4)


def test_an_empty_log_verifies_with_the_genesis_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path)
    assert verify(path, expected_head=GENESIS, expected_length=0).ok


def test_verify_rejects_a_malformed_expected_head(log_path: Path) -> None:
    with pytest.raises(ValueError, match="expected_head"):
        verify(log_path, expected_head="abc")


# --------------------------------------------------------------------------- resume and truncation


def test_resume_continues_the_chain(log_path: Path) -> None:
    log = AuditLog(log_path, resume=True)
    assert log.length == NUM_RECORDS and log.head == verify(log_path).head
    new_head = log.append(_round_record(NUM_RECORDS + 1))
    result = verify(log_path)
    assert result.ok and result.records == NUM_RECORDS + 1 and result.head == new_head


def test_resume_of_a_missing_file_starts_empty(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "new" / "audit.jsonl", resume=True)
    assert (log.length, log.head) == (0, GENESIS)
    log.append({"round": 1})
    assert verify(tmp_path / "new" / "audit.jsonl").records == 1


def test_resume_of_a_damaged_file_names_the_first_bad_line(log_path: Path) -> None:
    _edit_line(log_path, 2, lambda text: text.replace('"round":2', '"round":7'))
    with pytest.raises(AuditError, match=r"audit\.jsonl:2: .*hash mismatch") as caught:
        AuditLog(log_path, resume=True)
    assert caught.value.line == 2


def test_truncate_to_drops_records_after_the_checkpoint(log_path: Path) -> None:
    head_after_four = json.loads(_lines(log_path)[3])["hash"]
    log = AuditLog(log_path, resume=True)
    log.truncate_to(4, head_after_four)
    assert (log.length, log.head) == (4, head_after_four)
    assert verify(log_path, expected_head=head_after_four, expected_length=4).ok
    log.append(_round_record(5))
    assert verify(log_path).records == 5


def test_truncate_to_refuses_a_head_that_does_not_match(log_path: Path) -> None:
    log = AuditLog(log_path, resume=True)
    before = log_path.read_bytes()
    with pytest.raises(AuditError, match="checkpoint expects"):
        log.truncate_to(4, "f" * 64)
    with pytest.raises(AuditError, match="holds 6"):
        log.truncate_to(9, log.head)
    assert log_path.read_bytes() == before


def test_open_at_recovers_from_a_crash_that_tore_the_record_after_the_checkpoint(log_path: Path) -> None:
    # The server wrote round 4's checkpoint (4 records), then round 5's record, then died while
    # writing round 6's: the torn line makes resume=True refuse, open_at recovers.
    checkpoint_head = json.loads(_lines(log_path)[3])["hash"]
    lines = _lines(log_path)
    _write_lines(log_path, lines[:5] + [lines[5][:40]])
    with pytest.raises(AuditError, match=":6:"):
        AuditLog(log_path, resume=True)
    log = AuditLog.open_at(log_path, length=4, head=checkpoint_head)
    assert (log.length, log.head) == (4, checkpoint_head)
    log.append(_round_record(5))
    assert verify(log_path).ok and verify(log_path).records == 5


def test_open_at_refuses_a_log_damaged_before_the_checkpoint(log_path: Path) -> None:
    checkpoint_head = json.loads(_lines(log_path)[3])["hash"]
    _edit_line(log_path, 2, lambda text: text.replace('"round":2', '"round":7'))
    with pytest.raises(AuditError, match=":2:"):
        AuditLog.open_at(log_path, length=4, head=checkpoint_head)
    with pytest.raises(AuditError, match="missing"):
        AuditLog.open_at(log_path.with_name("absent.jsonl"), length=0, head=GENESIS)


# --------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.audit", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


def test_cli_verify_exit_codes(log_path: Path) -> None:
    intact = _cli("verify", str(log_path))
    assert intact.returncode == 0
    assert intact.stdout.strip() == f"OK: {NUM_RECORDS} records, head {verify(log_path).head}"

    short = _cli("verify", str(log_path), "--length", str(NUM_RECORDS + 1))
    assert short.returncode == 1 and f"{log_path}:{NUM_RECORDS + 1}:" in short.stderr

    _edit_line(log_path, 2, lambda text: text.replace('"round":2', '"round":7'))
    damaged = _cli("verify", str(log_path))
    assert damaged.returncode == 1
    assert damaged.stderr.startswith(f"{log_path}:2: hash mismatch")

    missing = _cli("verify", str(log_path.with_name("nope.jsonl")))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_cli_show_prints_the_records(log_path: Path) -> None:
    shown = _cli("show", str(log_path))
    assert shown.returncode == 0
    assert shown.stdout.count('"index"') == NUM_RECORDS
