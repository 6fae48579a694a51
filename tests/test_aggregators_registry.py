"""Registry and build(): names, parameter filtering, plug-ins, error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import aggregators
from aggregators import AggregationResult

CORE_RULES = ["mean", "median", "trimmed-mean", "krum", "multi-krum"]


def test_available_is_sorted_and_lists_core_rules() -> None:
    names = aggregators.available()
    assert names == sorted(names)
    for name in CORE_RULES:
        assert name in names


def test_result_is_frozen_dataclass() -> None:
    out = aggregators.build("mean")(torch.ones(3, 2))
    assert isinstance(out, AggregationResult)
    with pytest.raises(Exception):
        out.vector = torch.zeros(2)  # type: ignore[misc]


@pytest.mark.parametrize("name", CORE_RULES)
def test_num_byzantine_is_accepted_by_every_rule(name: str) -> None:
    # Rules that take no f (mean, median) silently ignore it, so a server can pass it always.
    rule = aggregators.build(name, num_byzantine=1)
    out = rule(torch.randn(7, 4, generator=torch.Generator().manual_seed(0)))
    assert out.vector.shape == (4,)
    assert out.scores.shape == (7,)
    assert out.selected.shape == (7,) and out.selected.dtype == torch.bool


def test_rule_receives_num_byzantine() -> None:
    assert aggregators.build("krum", num_byzantine=3).num_byzantine == 3


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown aggregation rule 'nope'.*krum"):
        aggregators.build("nope")


def test_unknown_param_names_rule_and_param() -> None:
    with pytest.raises(ValueError, match=r"krum.*\['bogus'\]"):
        aggregators.build("krum", num_byzantine=1, bogus=3)


def test_known_param_is_passed() -> None:
    rule = aggregators.build("multi-krum", num_byzantine=1, num_selected=2)
    assert rule.num_selected == 2


def test_negative_num_byzantine_rejected() -> None:
    with pytest.raises(ValueError, match="krum: num_byzantine"):
        aggregators.build("krum", num_byzantine=-1)


def test_register_decorator_makes_rule_buildable() -> None:
    @aggregators.register("test-last-row")
    class LastRow:
        def __init__(self, scale: float = 1.0) -> None:
            self.scale = scale

        def __call__(self, updates, weights=None):
            n = updates.shape[0]
            selected = torch.arange(n) == n - 1
            return AggregationResult(updates[-1] * self.scale, (~selected).double(), selected)

    try:
        assert "test-last-row" in aggregators.available()
        rule = aggregators.build("test-last-row", num_byzantine=2, scale=2.0)
        assert rule.name == "test-last-row"
        x = torch.arange(6.0).reshape(3, 2)
        assert torch.equal(rule(x).vector, torch.tensor([8.0, 10.0]))
        with pytest.raises(ValueError, match="already registered"):
            aggregators.register("test-last-row")(Path)
    finally:
        # Keep the global registry clean for other tests that iterate available().
        aggregators.unregister("test-last-row")
    assert "test-last-row" not in aggregators.available()
    with pytest.raises(ValueError, match="nothing is registered"):
        aggregators.unregister("test-last-row")


def test_import_path_class_and_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rule = aggregators.build("custom_rule_example:MedianOfMeans", num_byzantine=2, groups=3)
    assert rule.groups == 3
    x = torch.tensor([[0.0], [2.0], [10.0], [12.0], [100.0], [102.0]])
    assert torch.equal(rule(x).vector, torch.tensor([11.0]))
    first = aggregators.build("custom_rule_example:make_first_row_rule")
    assert torch.equal(first(x).vector, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="groups"):
        aggregators.build("custom_rule_example:MedianOfMeans", group=3)


def test_bad_import_paths() -> None:
    with pytest.raises(ValueError, match="cannot import module"):
        aggregators.build("no_such_module_xyz:Rule")
    with pytest.raises(ValueError, match="has no attribute"):
        aggregators.build("aggregators.krum:NoSuchRule")
