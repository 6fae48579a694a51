"""Clients verify their data before training; the server records which data each update used.

Specification: a client whose data file was tampered with after its manifest was written
refuses to train and replies with an error naming the file; the server rejects that reply with
the reason and goes on; the audit trail records each accepted update's data digests.
"""

from __future__ import annotations

import json

from client.data import export_partitions
from simulations.harness import run_federation


def test_a_tampered_data_file_is_refused_and_named(tmp_path):
    folders = export_partitions("digits", 4, 0.0, 0, tmp_path / "data")
    tampered = folders[2] / "train.npz"
    raw = bytearray(tampered.read_bytes())
    raw[-40] ^= 0xFF
    tampered.write_bytes(bytes(raw))

    summary = run_federation({"num-clients": 4, "num-malicious": 0, "attack": "none", "aggregator": "median",
                              "num-byzantine": 0, "rounds": 2, "data-dir": str(tmp_path / "data" / "{partition-id}"),
                              "out": str(tmp_path / "run")})

    for record in summary["rounds"]:
        assert len(record["accepted"]) == 3
        (reason,) = record["rejected"].values()
        assert "client error" in reason and str(tampered) in reason
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    reports = audit[0]["client_reports"]
    assert len(reports) == 3
    sources = sorted(r["data-source"] for r in reports.values())
    assert sources == sorted(str(f / "train.npz") for i, f in enumerate(folders) if i != 2)
    assert all(len(r["manifest-digest"]) == 64 and len(r["data-digest"]) == 64 for r in reports.values())
