"""The README's custom aggregator, exactly as printed there, plugs in by name and by import path."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import aggregators
from simulations.harness import run_federation

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    section = README.read_text().split("### A custom aggregator", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def example_module(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rules"
    if sys.modules.pop("my_rules", None) is not None and "norm-capped-mean" in aggregators.available():
        aggregators.unregister("norm-capped-mean")


def test_the_readme_example_is_short():
    assert len(readme_example().strip().splitlines()) <= 12


def test_registered_by_name(example_module):
    __import__(example_module)
    assert "norm-capped-mean" in aggregators.available()
    updates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [100.0, 0.0]])
    out = aggregators.build("norm-capped-mean")(updates)
    # every row is scaled to at most the median norm (1), so the outlier cannot dominate
    assert torch.allclose(out.vector, torch.tensor([2.0 / 3.0, 1.0 / 3.0]))
    assert int(out.scores.argmax()) == 2 and out.selected.all()


def test_runs_end_to_end_from_the_run_config(example_module, tmp_path):
    summary = run_federation({"aggregator": f"{example_module}:NormCappedMean", "attack": "sign-flip",
                              "attack-params": "scale=10", "num-malicious": 2, "rounds": 3,
                              "out": str(tmp_path / "run")})
    assert summary["config"]["aggregator"] == "my_rules:NormCappedMean"
    accuracies = [r["accuracy"] for r in summary["rounds"]]
    assert accuracies[-1] > 0.6 and accuracies[-1] > accuracies[0]
