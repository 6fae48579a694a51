"""The README stays true to the run config: every key Flower accepts is documented with its default.

Specification: every key of ``[tool.flwr.app.config]`` appears in the README's run-config table
with the same default, and RunSettings' field defaults equal pyproject's (a key added in one
place and not the others fails here).
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from client.config import RunSettings
from simulations.harness import default_config

ROOT = Path(__file__).resolve().parent.parent


def readme_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Run-config keys"):]
    rows: dict[str, str] = {}
    for line in table.splitlines()[4:]:
        if not line.startswith("| `"):
            break
        keys_cell, default = (cell.strip() for cell in line.strip("|").split("|")[:2])
        names = re.findall(r"`([a-z0-9-]+)`", keys_cell)
        defaults = [d.strip().strip("`") for d in default.split(",")] if len(names) > 1 else [default.strip("`")]
        rows.update(zip(names, defaults))
    return rows


def same(documented: str, value) -> bool:
    if documented == "(none)":
        return value == ""
    if isinstance(value, bool):
        return documented == str(value).lower()
    if isinstance(value, (int, float)):
        return float(documented) == float(value)
    return documented == str(value)


def test_every_run_config_key_is_in_the_readme_with_its_default():
    documented = readme_table()
    config = default_config()
    assert sorted(set(config) - set(documented)) == []
    assert sorted(set(documented) - set(config)) == []
    wrong = {k: (documented[k], v) for k, v in config.items() if not same(documented[k], v)}
    assert wrong == {}


def test_run_settings_defaults_are_pyprojects():
    config = default_config()
    defaults = {f.name.replace("_", "-"): f.default for f in fields(RunSettings)}
    assert set(defaults) == set(config)
    assert {k: v for k, v in config.items() if defaults[k] != v} == {}
