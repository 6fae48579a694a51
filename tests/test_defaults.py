"""The defaults: pyproject.toml's ``[tool.flwr.app.config]`` and ``RunSettings`` say the same thing.

Specification: the two hold the same keys with the same default values (``flwr run`` reads the
first, the experiment CLI and the tests the second); the defence keys are the recommended recipe of
docs/results.md (``benchmarks/recipe_search.py``'s ``DEFAULT_RECIPE``), every defence key given.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from benchmarks.recipe_search import DEFAULT_RECIPE, RECIPES
from client.config import RunSettings

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_and_run_settings_hold_the_same_defaults():
    settings = RunSettings().to_run_config()
    config = app_config()
    assert set(config) == set(settings)
    for field in fields(RunSettings):
        key = field.name.replace("_", "-")
        assert config[key] == settings[key], f"{key}: pyproject {config[key]!r}, RunSettings {settings[key]!r}"


def test_the_default_defence_is_the_recommended_recipe():
    config = app_config()
    recipe = RECIPES[DEFAULT_RECIPE]
    assert {key: config[key] for key in recipe} == recipe
