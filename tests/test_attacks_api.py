"""The attack plugin's contract: names, building, parameter parsing and the attacker draw."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from client.hooks import AttackContext
from simulations import attacks
from simulations.attacks import Attack, build, malicious_partitions, parse_params

EXPECTED = {
    "label-flip", "targeted-label-flip", "backdoor", "corrupted-source",
    "sign-flip", "scaling", "gaussian",
    "alie", "ipm", "min-max", "min-sum", "mimic", "alie-adaptive", "ipm-adaptive",
    "model-replacement", "dba", "neurotoxin", "norm-bounded-backdoor", "fang-krum", "fang-trimmed-mean",
}
OMNISCIENT = {"alie", "ipm", "min-max", "min-sum", "mimic", "alie-adaptive", "ipm-adaptive", "fang-krum",
              "fang-trimmed-mean"}
BACKDOORS = {"backdoor", "model-replacement", "dba", "neurotoxin", "norm-bounded-backdoor"}


def test_available_lists_every_attack_sorted():
    names = attacks.available()
    assert names == sorted(names)
    assert EXPECTED <= set(names)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_attack_builds_with_defaults_and_documents_paper_and_threat_model(name):
    attack = build(name)
    assert isinstance(attack, Attack)
    assert attack.name == name
    assert attack.omniscient == (name in OMNISCIENT)
    doc = type(attack).__doc__ or ""
    assert "Threat model" in doc, f"{name}: docstring states no threat model"
    assert re.search(r"\b(19|20)\d\d\b", doc), f"{name}: docstring cites no paper (year)"


def test_every_registered_attack_is_listed_here():
    """A new attack gets its row in EXPECTED (and so the generic checks below) when it is added."""
    assert set(attacks.available()) == EXPECTED


def context(round_: int = 2, d: int = 20, previous: bool = True, **run_config) -> AttackContext:
    g = torch.Generator().manual_seed(round_)
    global_vector = torch.randn(d, generator=g)
    return AttackContext(server_round=round_, partition_id=3, attacker_index=1, num_attackers=3,
                         global_vector=global_vector,
                         previous_global=global_vector + 0.1 * torch.randn(d, generator=g) if previous else None,
                         run_config={"num-clients": 10, "fraction-train": 1.0, **run_config})


@pytest.mark.parametrize("name", sorted(EXPECTED - OMNISCIENT))
@pytest.mark.parametrize("with_context", [False, True])
def test_client_hooks_accept_a_context_or_none_and_keep_shapes_and_dtypes(name, with_context):
    """Every client-side hook takes ``context=`` (None: the caller has none) on image-shaped data."""
    attack = build(name, **({"gamma": 10.0} if name == "model-replacement" and not with_context else {}))
    ctx = context() if with_context else None
    rng = np.random.default_rng(0)
    x = (rng.random((30, 3, 8, 8)) * 0.9).astype(np.float32)
    y = (np.arange(30) % 10).astype(np.int64)
    x_out, y_out = attack.poison_data(x, y, num_classes=10, image_shape=(3, 8, 8), rng=rng, context=ctx)
    assert x_out.shape == x.shape and x_out.dtype == x.dtype and y_out.shape == y.shape and y_out.dtype == y.dtype
    update = torch.randn(20, generator=torch.Generator().manual_seed(1))
    out = attack.poison_update(update, rng=torch.Generator().manual_seed(2), context=ctx)
    assert out.shape == update.shape and out.dtype == update.dtype


@pytest.mark.parametrize("name", sorted(BACKDOORS))
def test_every_backdoor_has_a_triggered_testset_on_images(name):
    x = np.zeros((12, 3, 8, 8), dtype=np.float32)
    y = (np.arange(12) % 4).astype(np.int64)
    x_test, y_test = build(name).triggered_testset(x, y, image_shape=(3, 8, 8))
    assert x_test.shape == (9, 3, 8, 8) and (y_test == 0).all()
    assert (x_test != 0).any()


def test_only_corrupted_source_targets_honest_clients():
    assert {n for n in EXPECTED if build(n).targets_honest} == {"corrupted-source"}


def test_non_omniscient_attack_cannot_craft():
    with pytest.raises(NotImplementedError, match="sign-flip"):
        build("sign-flip").craft(torch.zeros(3, 2), 1)


def test_non_backdoor_attacks_have_no_triggered_testset():
    x, y = torch.rand(4, 64).numpy(), torch.arange(4).numpy()
    assert build("label-flip").triggered_testset(x, y, image_shape=(8, 8)) is None
    assert build("alie").triggered_testset(x, y, image_shape=(8, 8)) is None


# --- build errors ---------------------------------------------------------------------------------


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown attack 'nope'.*alie"):
        build("nope")


def test_unknown_parameter_names_the_attack_and_the_parameter():
    with pytest.raises(ValueError, match=r"'alie'.*\['scale'\]"):
        build("alie", scale=10)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("sign-flip", {"scale": -1}, "scale must be > 0"),
        ("scaling", {"scale": "big"}, "scale must be a number"),
        ("gaussian", {"std": float("nan")}, "std must be finite"),
        ("label-flip", {"mode": "random"}, "mode must be one of"),
        ("label-flip", {"target": 3}, "target only applies to mode='all-to-one'"),
        ("targeted-label-flip", {"source": 2, "target": 2}, "source and target must differ"),
        ("backdoor", {"fraction": 1.5}, r"fraction must lie in \[0, 1\]"),
        ("backdoor", {"target": 1.5}, "target must be an integer"),
        ("corrupted-source", {"mode": "noise"}, "mode must be one of"),
        ("ipm", {"epsilon": 0}, "epsilon must be > 0"),
        ("min-max", {"perturbation": "random"}, "perturbation must be one of"),
        ("ipm-adaptive", {"min_epsilon": 2.0, "max_epsilon": 1.0}, "max_epsilon"),
        ("mimic", {"index": -1}, "index must be >= 0"),
        ("model-replacement", {"gamma": 0}, "gamma must be > 0"),
        ("model-replacement", {"constrain": "maybe"}, "constrain must be true or false"),
        ("neurotoxin", {"mask_ratio": 1.5}, r"mask_ratio must lie in \[0, 1\]"),
        ("norm-bounded-backdoor", {"margin": 1.0}, "margin must be < 1"),
        ("norm-bounded-backdoor", {"norm": -1}, "norm must be > 0"),
        ("dba", {"parts": 17}, "parts=17 exceeds the 4x4 trigger's 16 pixels"),
        ("fang-krum", {"epsilon": -0.1}, "epsilon must be >= 0"),
        ("fang-trimmed-mean", {"b": 1.0}, "b must be > 1"),
    ],
)
def test_bad_parameter_values_are_refused_naming_attack_and_parameter(name, params, message):
    with pytest.raises(ValueError, match=message) as error:
        build(name, **params)
    assert name in str(error.value)


def test_dash_case_parameter_names_are_accepted():
    attack = build("min-max", **parse_params("gamma-init=5,perturbation=sign"))
    assert attack.gamma_init == 5.0 and attack.perturbation == "sign"


def test_int_parameters_are_accepted_for_float_parameters():
    assert build("sign-flip", **parse_params("scale=10")).scale == 10.0


# --- parse_params ---------------------------------------------------------------------------------


def test_parse_params_types_ints_floats_and_strings():
    parsed = parse_params("scale=10,target=0,boost=5.5,lr=1e-3,mode=all-to-one")
    assert parsed == {"scale": 10, "target": 0, "boost": 5.5, "lr": 1e-3, "mode": "all-to-one"}
    assert type(parsed["target"]) is int and type(parsed["boost"]) is float and type(parsed["lr"]) is float


def test_parse_params_matches_the_documented_example():
    assert parse_params("scale=10,target=0,boost=5") == {"scale": 10.0, "target": 0, "boost": 5.0}


def test_parse_params_ignores_whitespace_and_reads_empty_as_no_parameters():
    assert parse_params("") == {}
    assert parse_params("   ") == {}
    assert parse_params(" z = -1.5 , index=2 ") == {"z": -1.5, "index": 2}


@pytest.mark.parametrize("text", ["scale", "=3", "a=", "a=1,,b=2", "a=1,", "a=1,a=2", "a b=1", "1a=2"])
def test_parse_params_refuses_malformed_text(text):
    with pytest.raises(ValueError):
        parse_params(text)


def test_parse_params_refuses_non_strings():
    with pytest.raises(ValueError, match="must be a string"):
        parse_params({"scale": 10})  # type: ignore[arg-type]


# --- malicious_partitions -------------------------------------------------------------------------


def test_malicious_partitions_are_sorted_distinct_in_range_and_deterministic():
    drawn = malicious_partitions(20, 5, seed=7)
    assert drawn == sorted(set(drawn)) and len(drawn) == 5
    assert all(0 <= p < 20 for p in drawn)
    assert malicious_partitions(20, 5, seed=7) == drawn


def test_malicious_partitions_depend_on_the_seed():
    draws = {tuple(malicious_partitions(20, 5, seed=s)) for s in range(10)}
    assert len(draws) > 1


def test_malicious_partitions_edge_counts():
    assert malicious_partitions(6, 0, seed=1) == []
    assert malicious_partitions(6, 6, seed=1) == list(range(6))


@pytest.mark.parametrize("clients, malicious, seed", [(5, 6, 0), (5, -1, 0), (0, 0, 0), (5, 2, -1), (5, 2.0, 0), (5, True, 0)])
def test_malicious_partitions_refuse_impossible_counts(clients, malicious, seed):
    with pytest.raises(ValueError, match="malicious_partitions"):
        malicious_partitions(clients, malicious, seed)
