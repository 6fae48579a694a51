"""Fuzzing the server with hostile replies: random record contents never end a round.

Specification (hypothesis drives ``RobustStrategy.aggregate_train`` and ``aggregate_evaluate``):
whatever a client puts in its reply (records of any kind under any name, metrics of every
type Flower can carry, lists, NaN and infinities, 64-bit extremes, long strings, thousands of
keys, arrays of any shape and dtype), no exception escapes; the honest replies are aggregated
as if the hostile one was not there; and every record the round produces is strict JSON.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.run import strict_json
from server.strategy import RobustStrategy

HONEST = [21, 22, 23, 24, 25]
HOSTILE = 99
SHAPES = {"w": (3, 2), "b": (3,)}

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
numbers = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True), finite)
known_keys = st.sampled_from(["num-examples", "train-loss", "train_loss", "partition-id", "audit-checked",
                              "audit-flagged", "audit-seconds", "x"])
# Mostly the names the server reads (so the values reach the code that reads them), else any text.
keys = st.one_of(known_keys, known_keys, known_keys, st.text(min_size=0, max_size=300))
metric_values = st.one_of(numbers, st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50),
                          st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=50))
config_values = st.one_of(st.text(max_size=5000), st.binary(max_size=200), st.booleans(), numbers,
                          st.lists(st.text(max_size=50), max_size=5))


pytestmark = pytest.mark.usefixtures("task_identity")


def global_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()})


def honest(node: int) -> RecordDict:
    rng = np.random.default_rng(node)
    arrays = ArrayRecord({k: Array((a.numpy() + 0.01 * rng.normal(size=a.shape)).astype(np.float32))
                          for k, a in global_arrays().items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 30, "train-loss": 0.4})})


@st.composite
def metric_records(draw):
    record = MetricRecord()
    for key, value in draw(st.dictionaries(keys, metric_values, max_size=8)).items():
        try:
            record[key] = value
        except (TypeError, ValueError):  # Flower refuses the value itself: nothing reaches the wire
            pass
    choice = draw(st.integers(0, 2))
    try:  # a valid count half of the time, so the rest of the record reaches the aggregation
        record["num-examples"] = draw(st.integers(1, 10**6)) if choice else draw(numbers)
    except (TypeError, ValueError):
        pass
    if draw(st.integers(0, 9)) == 0:  # now and then, far too many keys
        for i in range(draw(st.integers(60, 3000))):
            record[f"k{i}"] = 1.0
    return record


@st.composite
def config_records(draw):
    record = ConfigRecord()
    for key, value in draw(st.dictionaries(keys, config_values, max_size=6)).items():
        try:
            record[key] = value
        except (TypeError, ValueError):
            pass
    return record


@st.composite
def array_records(draw):
    record = ArrayRecord()
    names = draw(st.lists(st.sampled_from(["w", "b", "extra", ""]), max_size=3, unique=True))
    for name in names:
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.float16, np.bool_]))
        shape = draw(st.sampled_from([SHAPES.get(name, (2,)), (2, 3), (), (0,), (3, 2, 1)]))
        values = draw(st.sampled_from([0.0, 1e30, np.nan, np.inf, -1.0]))
        record[name] = Array(np.full(shape, values).astype(dtype))
    return record


@st.composite
def hostile_contents(draw):
    content = RecordDict()
    for name in draw(st.lists(st.sampled_from(["arrays", "metrics", "provenance", "config", "x"]), max_size=4,
                              unique=True)):
        kind = draw(st.sampled_from([array_records, metric_records, config_records]))
        content[name] = draw(kind())
    if draw(st.booleans()):  # often a well-formed update with hostile metrics and provenance
        content["arrays"] = honest(HOSTILE)["arrays"]
        content["metrics"] = draw(metric_records())
        if draw(st.booleans()):
            content["provenance"] = draw(config_records())
        elif draw(st.booleans()):  # well-formed provenance text, of any length
            content["provenance"] = ConfigRecord({"data-source": draw(st.text(max_size=2000)),
                                                  "data-digest": draw(st.text(max_size=100))})
        else:
            content.pop("provenance", None)
    return content


def aggregate(aggregator: str, extra: list[RecordDict]):
    strategy = RobustStrategy(aggregator, num_byzantine=1, seed=0, max_update_norm=10.0, fraction_evaluate=1.0)
    nodes = HONEST + [HOSTILE + i for i in range(len(extra))]
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), nodes)}
    replies = [Message(honest(n), reply_to=messages[n]) for n in HONEST]
    replies += [Message(content, reply_to=messages[HOSTILE + i]) for i, content in enumerate(extra)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays, metrics


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(contents=st.lists(hostile_contents(), min_size=1, max_size=3),
       aggregator=st.sampled_from(["mean", "trimmed-mean", "median", "krum", "centered-clipping"]))
def test_no_reply_content_escapes_aggregate_train(contents, aggregator):
    strategy, arrays, metrics = aggregate(aggregator, contents)
    record = strategy.last_record
    assert set(HONEST) <= set(record["accepted"])
    json.dumps(strict_json(record), allow_nan=False)  # every record is strict JSON
    for node, report in record.get("client_reports", {}).items():
        assert len(json.dumps(strict_json(report))) < 20_000, "client text is bounded"
    if arrays is not None:
        assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert metrics is not None and all(not isinstance(v, float) or math.isfinite(v) for v in metrics.values())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(contents=st.lists(hostile_contents(), min_size=1, max_size=3))
def test_no_reply_content_escapes_aggregate_evaluate(contents):
    strategy = RobustStrategy("median", num_byzantine=1, seed=0, fraction_evaluate=1.0)
    nodes = HONEST + [HOSTILE + i for i in range(len(contents))]
    strategy._evaluate_sampled = set(nodes)
    evaluate = {n: Message(RecordDict({"arrays": global_arrays(), "config": ConfigRecord()}), message_type="evaluate",
                           dst_node_id=n) for n in nodes}
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.5})}),
                       reply_to=evaluate[n]) for n in HONEST]
    replies += [Message(c, reply_to=evaluate[HOSTILE + i]) for i, c in enumerate(contents)]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and set(HONEST) <= set(strategy.last_evaluate_record["accepted"])
    json.dumps(strict_json(strategy.last_evaluate_record), allow_nan=False)
