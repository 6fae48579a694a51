"""A robust server survives its clients: the hostile-reply corpus.

Each case feeds one bad reply to ``RobustStrategy.aggregate_train`` beside honest replies.
Specification: no exception escapes, the bad reply is rejected with the right reason, and the
new global model equals the one aggregated from the honest replies alone.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.strategy import RobustStrategy

HONEST = [101, 102, 103, 104, 105, 106]
ATTACKER = 999
SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,)}


pytestmark = pytest.mark.usefixtures("task_identity")


def global_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def weights_for(node: int) -> dict[str, np.ndarray]:
    base = {k: a.numpy() for k, a in global_arrays().items()}
    rng = np.random.default_rng(node)
    return {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}


def reply(message: Message, content) -> Message:
    return Message(content, reply_to=message)


def honest_content(node: int, num_examples: int = 50) -> RecordDict:
    arrays = ArrayRecord({k: Array(v) for k, v in weights_for(node).items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5})})


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def with_array(node: int, key: str, array: Array) -> RecordDict:
    content = honest_content(node)
    content["arrays"][key] = array
    return content


def with_metrics(node: int, metrics: dict) -> RecordDict:
    content = honest_content(node)
    content["metrics"] = MetricRecord(metrics)
    return content


def poisoned(node: int, key: str, index, value) -> RecordDict:
    w = weights_for(node)
    w[key][index] = value
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in w.items()}),
                       "metrics": MetricRecord({"num-examples": 50, "train-loss": 0.5})})


def run_round(bad: list, aggregator: str = "trimmed-mean", **kwargs):
    """One round: honest replies plus ``bad`` (content or a function of the message). Returns (arrays, record)."""
    strategy = RobustStrategy(aggregator, num_byzantine=1, seed=0, max_update_norm=5.0, **kwargs)
    nodes = HONEST + ([ATTACKER] if bad else [])
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), nodes)}
    replies = [reply(messages[n], honest_content(n)) for n in HONEST]
    for item in bad:
        replies.append(item(messages) if callable(item) else reply(messages[ATTACKER], item))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, strategy.last_record


def honest_only(aggregator: str = "trimmed-mean") -> ArrayRecord:
    strategy = RobustStrategy(aggregator, num_byzantine=1, seed=0, max_update_norm=5.0)
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), HONEST)}
    arrays, _ = strategy.aggregate_train(1, [reply(messages[n], honest_content(n)) for n in HONEST])
    return arrays


def assert_same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


W, B = "layer.weight", "layer.bias"
CASES = {
    # records
    "client error": (Error(code=3, reason="boom"), "client error 3"),
    "no arrays record": (RecordDict({"metrics": MetricRecord({"num-examples": 5})}), "missing ['arrays']"),
    "no metrics record": (RecordDict({"arrays": honest_content(ATTACKER)["arrays"]}), "missing ['metrics']"),
    "empty content": (RecordDict({}), "missing ['arrays', 'metrics']"),
    "second metric record": (RecordDict({**honest_content(ATTACKER), "metrics-2": MetricRecord({"x": 1})}), "unexpected ['metrics-2']"),
    "extra config record": (RecordDict({**honest_content(ATTACKER), "config": ConfigRecord({"a": 1})}), "unexpected ['config']"),
    "arrays is a config record": (RecordDict({"arrays": ConfigRecord({"a": 1}), "metrics": MetricRecord({"num-examples": 5})}), "not an ArrayRecord"),
    "metrics is a config record": (RecordDict({"arrays": honest_content(ATTACKER)["arrays"], "metrics": ConfigRecord({"num-examples": 5})}), "not a MetricRecord"),
    "provenance is a metric record": (RecordDict({**honest_content(ATTACKER), "provenance": MetricRecord({"a": 1})}), "'provenance' must be"),
    "provenance too long": (RecordDict({**honest_content(ATTACKER), "provenance": ConfigRecord({"data-digest": "x" * 5000})}), "'provenance' must be"),
    "provenance not text": (RecordDict({**honest_content(ATTACKER), "provenance": ConfigRecord({"data-digest": 7})}), "'provenance' must be"),
    # keys
    "missing key": (RecordDict({"arrays": ArrayRecord({W: Array(weights_for(ATTACKER)[W])}), "metrics": MetricRecord({"num-examples": 5})}), "missing ['layer.bias']"),
    "extra key": (with_array(ATTACKER, "layer.extra", Array(np.zeros(3, np.float32))), "unexpected ['layer.extra']"),
    "no arrays at all": (RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 5})}), "array keys differ"),
    # shapes and dtypes, checked on the decoded data
    "transposed weight": (with_array(ATTACKER, W, Array(np.zeros((3, 4), np.float32))), "shape (3, 4), expected (4, 3)"),
    "flattened weight": (with_array(ATTACKER, W, Array(np.zeros(12, np.float32))), "shape (12,), expected (4, 3)"),
    "scalar bias": (with_array(ATTACKER, B, Array(np.zeros((), np.float32))), "shape (), expected (4,)"),
    "bigger bias": (with_array(ATTACKER, B, Array(np.zeros(5, np.float32))), "shape (5,), expected (4,)"),
    "float64 weight": (with_array(ATTACKER, W, Array(np.zeros((4, 3), np.float64))), "dtype float64, expected float32"),
    "float16 weight": (with_array(ATTACKER, W, Array(np.zeros((4, 3), np.float16))), "dtype float16, expected float32"),
    "int32 bias": (with_array(ATTACKER, B, Array(np.zeros(4, np.int32))), "dtype int32, expected float32"),
    "bool bias": (with_array(ATTACKER, B, Array(np.zeros(4, bool))), "dtype bool, expected float32"),
    "complex bias": (with_array(ATTACKER, B, Array(np.zeros(4, np.complex64))), "dtype complex64, expected float32"),
    "declared shape lies": (with_array(ATTACKER, W, Array("float32", (4, 3), "numpy.ndarray", npy_bytes(np.zeros((2, 6), np.float32)))), "shape (2, 6), expected (4, 3)"),
    "declared dtype lies": (with_array(ATTACKER, B, Array("float32", (4,), "numpy.ndarray", npy_bytes(np.zeros(4, np.float64)))), "dtype float64"),
    "metadata lies, data right": (with_array(ATTACKER, B, Array("float64", (2, 2), "numpy.ndarray", npy_bytes(np.zeros(4, np.float32)))), "disagree with its data"),
    "garbage bytes": (with_array(ATTACKER, B, Array("float32", (4,), "numpy.ndarray", b"\x00garbage")), "undecodable"),
    "truncated bytes": (with_array(ATTACKER, B, Array("float32", (4,), "numpy.ndarray", npy_bytes(np.zeros(4, np.float32))[:-6])), "undecodable"),
    "empty bytes": (with_array(ATTACKER, B, Array("float32", (4,), "numpy.ndarray", b"")), "undecodable"),
    "pickled object array": (with_array(ATTACKER, B, Array("object", (4,), "numpy.ndarray", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (4,), }" + b" " * 60 + b"\n")), "undecodable"),
    "unknown stype": (with_array(ATTACKER, B, Array("float32", (4,), "torch.raw", np.zeros(4, np.float32).tobytes())), "undecodable"),
    # non-finite values
    "NaN weight": (poisoned(ATTACKER, W, (0, 0), np.nan), "non-finite"),
    "+Inf weight": (poisoned(ATTACKER, W, (3, 2), np.inf), "non-finite"),
    "-Inf bias": (poisoned(ATTACKER, B, 1, -np.inf), "non-finite"),
    "all NaN": (with_array(ATTACKER, W, Array(np.full((4, 3), np.nan, np.float32))), "12 non-finite"),
    # size of the update
    "huge update": (poisoned(ATTACKER, W, (0, 0), 1e6), "exceeds the bound"),
    "large uniform update": (with_array(ATTACKER, W, Array(np.full((4, 3), 50.0, np.float32))), "exceeds the bound"),
    "float32 max": (poisoned(ATTACKER, B, 0, np.finfo(np.float32).max), "exceeds the bound"),
    # num-examples, never trusted unbounded
    "num-examples missing": (with_metrics(ATTACKER, {"train-loss": 0.1}), "'num-examples' missing"),
    "num-examples zero": (with_metrics(ATTACKER, {"num-examples": 0}), "positive integer"),
    "num-examples negative": (with_metrics(ATTACKER, {"num-examples": -100}), "positive integer"),
    "num-examples fractional": (with_metrics(ATTACKER, {"num-examples": 3.5}), "positive integer"),
    "num-examples NaN": (with_metrics(ATTACKER, {"num-examples": math.nan}), "not finite"),
    "num-examples inf": (with_metrics(ATTACKER, {"num-examples": math.inf}), "not finite"),
    "num-examples list": (with_metrics(ATTACKER, {"num-examples": [1, 2]}), "positive integer"),
    "num-examples tiny negative": (with_metrics(ATTACKER, {"num-examples": -1e-9}), "positive integer"),
    "train-loss NaN": (with_metrics(ATTACKER, {"num-examples": 5, "train-loss": math.nan}), "'train-loss' is not finite"),
    "metric list with inf": (with_metrics(ATTACKER, {"num-examples": 5, "hist": [1.0, math.inf]}), "'hist' is not finite"),
    # every client value the server reads is type- and range-checked here, never cast later
    "train-loss list": (with_metrics(ATTACKER, {"num-examples": 5, "train-loss": [0.1, 0.2]}), "'train-loss' must be a number"),
    "audit count list": (with_metrics(ATTACKER, {"num-examples": 5, "audit-checked": [1, 2]}), "'audit-checked' must be a non-negative integer"),
    "audit count negative": (with_metrics(ATTACKER, {"num-examples": 5, "audit-flagged": -3}), "'audit-flagged' must be a non-negative integer"),
    "audit count fractional": (with_metrics(ATTACKER, {"num-examples": 5, "audit-dropped": 0.5}), "'audit-dropped' must be a non-negative integer"),
    "partition-id list": (with_metrics(ATTACKER, {"num-examples": 5, "partition-id": [0, 1]}), "'partition-id' must be a non-negative integer"),
    "partition-id negative": (with_metrics(ATTACKER, {"num-examples": 5, "partition-id": -1}), "'partition-id' must be a non-negative integer"),
    "too many metric keys": (with_metrics(ATTACKER, {"num-examples": 5} | {f"m{i}": 1.0 for i in range(80)}), "at most 64"),
    "long metric list": (with_metrics(ATTACKER, {"num-examples": 5, "hist": [1.0] * 2000}), "more than 1024 values"),
    "metric key with spaces": (with_metrics(ATTACKER, {"num-examples": 5, "a b": 1.0}), "not a short printable name"),
    "metric key too long": (with_metrics(ATTACKER, {"num-examples": 5, "k" * 200: 1.0}), "not a short printable name"),
    "provenance too many keys": (RecordDict({**honest_content(ATTACKER), "provenance": ConfigRecord({f"k{i}": "v" for i in range(5000)})}), "'provenance' must be"),
    "provenance too many bytes": (RecordDict({**honest_content(ATTACKER), "provenance": ConfigRecord({f"k{i}": "v" * 1000 for i in range(8)})}), "'provenance' must be"),
    "provenance key not printable": (RecordDict({**honest_content(ATTACKER), "provenance": ConfigRecord({"a\nb": "v"})}), "'provenance' must be"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_reply_is_rejected_with_its_reason_and_the_round_goes_on(case):
    content, reason = CASES[case]
    arrays, record = run_round([content])
    assert str(ATTACKER) in record["rejected"], record["rejected"]
    assert reason in record["rejected"][str(ATTACKER)]
    assert record["accepted"] == HONEST
    assert_same_arrays(arrays, honest_only())


def test_accepted_metrics_reach_the_server_as_plain_numbers():
    """Downstream code reads the validator's values: ints where Phalanx counts, floats elsewhere."""
    content = with_metrics(ATTACKER, {"num-examples": 5.0, "train-loss": 1, "audit-checked": 7.0, "hist": [1.0, 2.5],
                                      "partition-id": 3})
    _, record = run_round([content])
    assert record["accepted"] == sorted(HONEST + [ATTACKER])
    report = record["client_reports"][str(ATTACKER)]
    assert report["audit-checked"] == 7 and type(report["audit-checked"]) is int
    assert report["partition-id"] == 3 and type(report["partition-id"]) is int
    assert report["hist"] == [1.0, 2.5]


def test_a_reply_from_a_node_that_was_not_sampled_is_rejected():
    def stray(messages):
        decoy = Message(RecordDict(), message_type="train", dst_node_id=4242)
        return reply(decoy, honest_content(4242))

    arrays, record = run_round([stray])
    assert "not sampled" in record["rejected"]["4242"]
    assert_same_arrays(arrays, honest_only())


def test_a_second_reply_from_one_node_is_rejected_and_the_first_kept():
    arrays, record = run_round([lambda m: reply(m[HONEST[0]], poisoned(HONEST[0], W, (0, 0), 3.0))])
    assert "duplicate" in record["rejected"][str(HONEST[0])]
    assert record["accepted"] == HONEST
    assert_same_arrays(arrays, honest_only())


def test_a_lying_num_examples_is_capped_before_it_weights_the_mean():
    strategy = RobustStrategy("mean", seed=0, max_num_examples=100)
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), [1, 2])}
    replies = [reply(messages[1], honest_content(1, num_examples=100)),
               reply(messages[2], honest_content(2, num_examples=10**9))]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = {k: (weights_for(1)[k].astype(np.float64) + weights_for(2)[k]) / 2 for k in SHAPES}
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6)


def test_too_few_valid_replies_skip_the_round_and_keep_the_model():
    strategy = RobustStrategy("median", seed=0, min_replies=3)
    messages = strategy.prepare_round(1, global_arrays(), ConfigRecord(), [1, 2, 3])
    replies = [reply(messages[0], honest_content(1)), reply(messages[1], CASES["NaN weight"][0]),
               reply(messages[2], Error(code=1, reason="crashed"))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and strategy.last_record["skipped"]
    assert metrics["num-valid"] == 1 and metrics["num-rejected"] == 2


CORRUPTIONS = sorted(CASES)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(picks=st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=4, unique=True),
       aggregator=st.sampled_from(["mean", "median", "trimmed-mean", "krum", "geometric-median"]))
def test_several_bad_replies_at_once_are_all_rejected(picks, aggregator):
    """Random combinations of corruptions, one attacker node each, under several rules."""
    strategy = RobustStrategy(aggregator, num_byzantine=1, seed=0, max_update_norm=5.0)
    attackers = [ATTACKER + i for i in range(len(picks))]
    messages = {m.metadata.dst_node_id: m
                for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), HONEST + attackers)}
    replies = [reply(messages[n], honest_content(n)) for n in HONEST]
    replies += [reply(messages[a], CASES[p][0]) for a, p in zip(attackers, picks)]
    arrays, _ = strategy.aggregate_train(1, list(reversed(replies)))
    record = strategy.last_record
    for attacker, pick in zip(attackers, picks):
        assert CASES[pick][1] in record["rejected"][str(attacker)]
    assert record["accepted"] == HONEST
    assert_same_arrays(arrays, honest_only(aggregator))



def test_a_round_the_rule_cannot_aggregate_is_skipped_not_raised():
    """Krum needs n > 2f + 2: after rejections only 3 valid replies remain for f = 1."""
    strategy = RobustStrategy("krum", num_byzantine=1, seed=0)
    nodes = [1, 2, 3, 4, 5]
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), nodes)}
    replies = [reply(messages[n], honest_content(n)) for n in (1, 2, 3)]
    replies += [reply(messages[n], CASES["NaN weight"][0]) for n in (4, 5)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None and strategy.last_record["skipped"]
    assert "krum" in strategy.last_record["skip_reason"].lower()
    assert set(strategy.last_record["rejected"]) == {"4", "5"}


def test_excluding_flagged_nodes_replays_a_stateful_rule_from_the_round_start():
    """Centered clipping keeps a centre across rounds; aggregating again without the excluded
    nodes must start from the previous round's centre, not from one they already moved."""
    def run(nodes, policy):
        strategy = RobustStrategy("centered-clipping", seed=0, policy=policy, flag_threshold=0.5)
        messages = {m.metadata.dst_node_id: m
                    for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), nodes)}
        replies = [reply(messages[n], honest_content(n)) for n in nodes if n != ATTACKER]
        if ATTACKER in nodes:
            replies.append(reply(messages[ATTACKER], poisoned(ATTACKER, W, (0, 0), 4.0)))
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays, strategy

    excluded, strategy = run(HONEST + [ATTACKER], "exclude")
    assert strategy.last_record["excluded"] == [ATTACKER]
    honest, reference = run(HONEST, "flag")
    assert_same_arrays(excluded, honest)
    assert torch.equal(strategy.rule.state_dict()["center"], reference.rule.state_dict()["center"])
