"""The self-contained HTML review report (``python -m server.report RUN_DIR``)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.monitor import TrainingMonitor
from server.report import flagged_rows, gather, load_summary, main, write_report
from server.reputation import Reputation
from server.scoring import detection_quality, score_updates, write_scores_csv

REPO = Path(__file__).resolve().parents[1]
SECTION_IDS = ("overview", "heatmap", "reputation", "curves", "alerts", "flagged", "config")
HOSTILE_REASON = '<script>alert("x")</script> metric "num-examples" is not a number'
HOSTILE_SOURCE = "<img src=x onerror=alert(1)> my data"


def simulated_run(run_dir: Path, rounds: int = 6) -> dict:
    """A small run computed for real: 8 nodes, nodes 107 and 108 sign-flip; scores, reputation, monitor."""
    g = torch.Generator().manual_seed(1)
    node_ids = list(range(101, 109))
    malicious = {107, 108}
    reputation = Reputation("exclude", threshold=0.5)
    monitor = TrainingMonitor()
    direction = torch.randn(200, generator=g)
    records = []
    for r in range(1, rounds + 1):
        updates = direction + 0.5 * torch.randn(len(node_ids), 200, generator=g)
        for i, node in enumerate(node_ids):
            if node in malicious:
                updates[i] = -updates[i]
        aggregate = updates.median(dim=0).values
        scores = score_updates(updates, aggregate)
        flagged = reputation.observe(r, node_ids, scores.combined)
        excluded = reputation.excluded(r, node_ids, scores.combined)
        loss = 2.0 * 0.7 ** r + (3.0 if r == 5 else 0.0)  # a poisoned-looking jump in round 5
        accuracy = 0.9 - 0.6 * 0.7 ** r
        monitor.observe(r, loss, accuracy)
        records.append({
            "round": r, "accuracy": accuracy, "loss": loss,
            "accepted": [n for n in node_ids if n not in excluded],
            "rejected": {"109": HOSTILE_REASON} if r == 2 else {},
            "scores": {str(n): float(c) for n, c in zip(node_ids, scores.combined)},
            "flagged": sorted(flagged),
            "reputation": {str(n): reputation.reputations[n] for n in node_ids},
            "features": {str(row.pop("node_id")): row for row in scores.as_rows(node_ids)},
            "client_reports": {str(n): {"partition-id": n - 101, "data-source": f"digits partition {n - 101}/8"}
                               for n in node_ids} | ({"109": {"data-source": HOSTILE_SOURCE}} if r == 2 else {}),
        })
    summary = {
        "config": {"aggregator": "median", "attack": "sign-flip", "policy": "exclude", "flag-threshold": 0.5,
                   "rounds": rounds},
        "final_accuracy": records[-1]["accuracy"], "best_accuracy": max(r["accuracy"] for r in records),
        "clean_accuracy": None, "backdoor_asr": None,
        "detection": detection_quality(records, malicious), "privacy": None, "wall_seconds": 1.5,
        "malicious_nodes": sorted(malicious), "alerts": monitor.alerts, "rounds": records,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    write_scores_csv(records, run_dir / "scores.csv")
    return summary


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.report", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def built_report(tmp_path_factory) -> tuple[Path, dict, str]:
    run_dir = tmp_path_factory.mktemp("run")
    summary = simulated_run(run_dir)
    result = run_cli(str(run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run_dir / "report.html")
    return run_dir, summary, (run_dir / "report.html").read_text(encoding="utf-8")


def test_the_simulated_run_is_a_meaningful_fixture(built_report):
    _, summary, _ = built_report
    assert summary["detection"]["auroc"] == 1.0
    assert [a["round"] for a in summary["alerts"]] == [5]


def test_cli_writes_a_report_with_every_section(built_report):
    run_dir, _, page = built_report
    assert page.startswith("<!DOCTYPE html>")
    for section in SECTION_IDS:
        assert f'id="{section}"' in page, section


def test_figures_are_inline_pngs(built_report):
    _, _, page = built_report
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # heatmap, reputation, curves
    for encoded in images:
        assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    for section in ("heatmap", "reputation", "curves"):
        start = page.index(f'id="{section}"')
        assert "data:image/png;base64," in page[start:page.index("</section>", start)], section


def test_report_needs_no_network(built_report):
    _, _, page = built_report
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower()  # the hostile reason is escaped, and the report has no script
    assert "<link" not in page.lower()


def test_client_strings_are_escaped(built_report):
    _, _, page = built_report
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_flagged_table_lists_the_attackers_with_evidence(built_report):
    run_dir, summary, page = built_report
    table = page[page.index('id="flagged"'):]
    table = table[:table.index("</section>")]
    rows = flagged_rows(gather(summary))
    attackers = [row for row in rows if row["attacker"]]
    assert {row["node"] for row in attackers} == {107, 108}
    for row in attackers:
        assert row["rounds_flagged"] == [1, 2, 3, 4, 5, 6]
        assert row["features"]["cosine_z"] > 4.5  # sign flip: pointing away from the aggregate
        # The partition a node reported says which simulated client the 63-bit node id is; nothing
        # verifies it, so the report shows it as the client's claim.
        assert f"<td>{row['node']}</td><td>claims partition {row['node'] - 101}</td><td>yes</td><td>6: 1-6</td>" in table
    assert "data (as the client claims)" in table
    rejected = [row for row in rows if row["node"] == 109]
    assert rejected and rejected[0]["rejections"] == [(2, HOSTILE_REASON)]
    assert "r2: &lt;script&gt;" in table
    assert "<td>&lt;img src=x onerror=alert(1)&gt; my data</td>" in table
    assert "<img src=x" not in table


def test_alert_messages_are_listed(built_report):
    _, summary, page = built_report
    section = page[page.index('id="alerts"'):]
    assert summary["alerts"][0]["message"].split(":")[0] in section[:section.index("</section>")]


def test_scores_csv_fills_in_what_the_summary_lacks(tmp_path):
    simulated_run(tmp_path, rounds=3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for record in summary["rounds"]:
        del record["features"], record["reputation"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = write_report(tmp_path).read_text()
    reputation = page[page.index('id="reputation"'):]
    assert "data:image/png;base64," in reputation[:reputation.index("</section>")]
    data = gather(load_summary(tmp_path))
    assert data.cells[(1, 107)].get("reputation") is None  # only the CSV had it


def test_minimal_summary_still_renders_every_section(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"config": {}, "rounds": []}))
    page = write_report(tmp_path).read_text()
    for section in SECTION_IDS:
        assert f'id="{section}"' in page
    assert "No anomaly scores were recorded." in page


def test_missing_or_bad_summary_exits_2_naming_the_file(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "summary.json: no such file" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text('{"rounds": {"1": {}}}')
    with pytest.raises(ValueError, match="'rounds' must be a list"):
        write_report(tmp_path)
    (tmp_path / "summary.json").write_text('{"rounds": [{"round": 1, "scores": {"abc": 0.5}}]}')
    with pytest.raises(ValueError, match="rounds\\[0\\].scores: node id or round 'abc' is not an integer"):
        write_report(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report(tmp_path)
    assert main([]) == 2 and "usage" in capsys.readouterr().err
