"""The round's few-pass path (server/stacking.py) gives what a straightforward computation gives.

``RobustStrategy.aggregate_train`` decodes each reply straight into its stack row, takes norms and
the NaN/Inf screen in the same pass, hashes rows in a worker thread and scores in cache-sized
float64 blocks. These tests compare it with the plain reference: decode with ``Array.numpy()``,
subtract the global model, ``torch.stack``, ``sha256_tensor`` per row, the rule, and the scores'
features from full float64 copies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import aggregators
from server.audit import sha256_tensor
from server.params import ParamSpec, arrays_to_vector
from server.scoring import _raw_features, score_features, score_updates
from server.stacking import empty_stack, fill_row, npy_view, row_features, sha256_row
from server.strategy import RobustStrategy
from server.validation import ReplyValidator

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"conv.weight": ((8, 3, 3, 3), "float32"), "conv.bias": ((8,), "float32"),
          "bn.running_mean": ((8,), "float32"), "bn.num_batches_tracked": ((), "int64"),
          "fc.weight": ((10, 200), "float32"), "fc.bias": ((10,), "float32")}
NODES = [11, 12, 13, 14, 15, 16, 17]


def global_arrays() -> ArrayRecord:
    rng = np.random.default_rng(0)
    out = {}
    for key, (shape, dtype) in SHAPES.items():
        out[key] = (rng.normal(size=shape).astype(dtype) if dtype.startswith("float")
                    else np.array(5, dtype=dtype))
    return ArrayRecord({k: Array(v) for k, v in out.items()})


def reply_arrays(node: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    base = {k: a.numpy() for k, a in global_arrays().items()}
    rng = np.random.default_rng(node)
    out = {}
    for key, value in base.items():
        if value.dtype.kind == "f":
            out[key] = (value + scale * (1 + node % 3) * rng.normal(size=value.shape)).astype(value.dtype)
        else:
            out[key] = np.asarray(value + node % 4, dtype=value.dtype)
    return out


def content(arrays: dict[str, np.ndarray], num_examples: int = 40) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.3})})


def run(aggregator: str, contents: dict[int, RecordDict], order=None, **kwargs):
    strategy = RobustStrategy(aggregator, num_byzantine=1, seed=0, device="cpu", min_train_nodes=len(NODES), **kwargs)
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), NODES)}
    replies = [Message(contents[n], reply_to=messages[n]) for n in (order or sorted(contents))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays, strategy.last_record


def reference(aggregator: str, contents: dict[int, RecordDict]):
    """The plain computation: decode, subtract, stack, hash, aggregate, score in full float64."""
    spec = ParamSpec.of(global_arrays())
    glob = arrays_to_vector(global_arrays(), spec)
    rows, ids = [], []
    for node in sorted(contents):
        arrays = contents[node]["arrays"]
        flat = np.concatenate([np.asarray(arrays[k].numpy(), np.float32).reshape(-1) for k in spec.float_keys])
        rows.append(torch.from_numpy(flat) - glob)
        ids.append(node)
    updates = torch.stack(rows)
    hashes = {str(n): sha256_tensor(u) for n, u in zip(ids, updates)}
    result = aggregators.build(aggregator, num_byzantine=1)(updates, weights=torch.full((len(ids),), 40.0,
                                                                                          dtype=torch.float64))
    norm, cosine, distance = _raw_features(updates, result.vector, 1 << 24)
    scores = score_features(norm, cosine, distance, result.scores)
    return updates, hashes, result, scores, ids


@pytest.mark.parametrize("aggregator", ["mean", "trimmed-mean", "median", "krum"])
def test_the_round_equals_the_straightforward_computation(aggregator):
    contents = {n: content(reply_arrays(n, scale=0.5 if n == 17 else 0.01)) for n in NODES}
    strategy, arrays, record = run(aggregator, contents)
    updates, hashes, result, scores, ids = reference(aggregator, contents)
    assert record["accepted"] == ids and not record["rejected"]
    assert record["update_sha256"] == hashes
    assert record["aggregate_sha256"] == sha256_tensor(result.vector)
    got = torch.tensor([record["scores"][str(n)] for n in ids], dtype=torch.float64)
    assert torch.allclose(got, scores.combined, rtol=1e-9, atol=1e-12)
    for key, name in (("norm", "norm"), ("cosine", "cosine"), ("distance", "distance")):
        values = torch.tensor([record["features"][str(n)][key] for n in ids], dtype=torch.float64)
        # Mean and median give their distances to the output: the cosine then comes from
        # (|u|^2 + |a|^2 - |u - a|^2) / 2, within ~1e-16 (|u|/|a| + |a|/|u|) of the measured one.
        atol = 1e-12 if key == "cosine" else 1e-15
        assert torch.allclose(values, getattr(scores, name), rtol=1e-12, atol=atol), key
    spec = ParamSpec.of(global_arrays())
    expected = arrays_to_vector(global_arrays(), spec) + result.vector
    assert torch.equal(arrays_to_vector(arrays, spec), expected)


def test_arrival_order_changes_nothing_and_rejections_keep_arrival_order():
    contents = {n: content(reply_arrays(n)) for n in NODES}
    bad = reply_arrays(13)
    bad["fc.weight"][0, 0] = np.nan
    contents[13] = content(bad)
    contents[15] = content(reply_arrays(15), num_examples=-3)
    _, arrays_a, record_a = run("trimmed-mean", contents)
    _, arrays_b, record_b = run("trimmed-mean", contents, order=[16, 15, 11, 17, 13, 12, 14])
    assert record_a["update_sha256"] == record_b["update_sha256"]
    assert record_a["scores"] == record_b["scores"]
    assert list(record_b["rejected"]) == ["15", "13"]
    assert list(record_a["rejected"]) == ["13", "15"]
    assert record_a["rejected"]["13"] == "array 'fc.weight': 1 non-finite values (NaN/Inf)"
    for key in arrays_a:
        assert np.array_equal(arrays_a[key].numpy(), arrays_b[key].numpy())


def test_a_reply_with_nan_in_one_array_is_rejected_with_the_same_reason_and_the_round_goes_on():
    contents = {n: content(reply_arrays(n)) for n in NODES}
    bad = reply_arrays(14)
    bad["conv.weight"][1, 2, 0, 0] = np.inf
    bad["conv.weight"][0, 0, 0, 0] = np.nan
    contents[14] = content(bad)
    _, arrays, record = run("median", contents)
    validator = ReplyValidator(ParamSpec.of(global_arrays()))
    strategy = RobustStrategy("median", num_byzantine=1, seed=0)
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), NODES)}
    old = validator.validate(Message(contents[14], reply_to=messages[14]), strategy._global)
    assert record["rejected"] == {"14": old} and old == "array 'conv.weight': 2 non-finite values (NaN/Inf)"
    assert arrays is not None and record["accepted"] == [n for n in NODES if n != 14]
    clean = {n: c for n, c in contents.items() if n != 14}
    _, hashes, result, _, _ = reference("median", clean)
    assert record["update_sha256"] == hashes


def _validate_both(arrays_dict, declared=None, metrics=None):
    """The old one-step reason and the two-step reason (check, fill, finish) for one reply."""
    strategy = RobustStrategy("mean", seed=0)
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, global_arrays(), ConfigRecord(), [11, 12])}
    record = content({})
    record["arrays"] = ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays_dict.items()})
    if metrics is not None:
        record["metrics"] = MetricRecord(metrics)
    message = Message(record, reply_to=messages[11])
    spec = ParamSpec.of(global_arrays())
    validator = ReplyValidator(spec, max_update_norm=50.0)
    old = validator.validate(message, strategy._global)
    pending = validator.check(message)
    if isinstance(pending, str):
        return old, pending
    row = np.empty(spec.dim, np.float32)
    sq = fill_row(row, pending.parts, strategy._global.numpy())
    new = validator.finish(pending, sq, torch.from_numpy(row))
    return old, new


def _same(old, new):
    if isinstance(old, str) or isinstance(new, str):
        assert old == new
    else:
        assert (old.node_id, old.num_examples, old.metrics, old.provenance) == \
               (new.node_id, new.num_examples, new.metrics, new.provenance)
        assert old.others.keys() == new.others.keys()
        for key in old.others:
            assert np.array_equal(old.others[key], new.others[key])


@pytest.mark.parametrize("case", ["nan-then-bad-shape", "bad-dtype", "big-endian", "fortran", "float64",
                                  "norm-bound", "bad-metrics-and-nan", "truncated", "declared", "overflow"])
def test_two_step_validation_gives_the_one_step_reasons(case):
    arrays = reply_arrays(11)
    metrics = None
    if case == "nan-then-bad-shape":
        arrays["conv.weight"][0, 0, 0, 0] = np.nan
        arrays["fc.weight"] = arrays["fc.weight"][:5]
    elif case == "bad-dtype":
        arrays["fc.bias"] = arrays["fc.bias"].astype(np.float16)
    elif case == "big-endian":
        arrays["fc.weight"] = arrays["fc.weight"].astype(">f4")
    elif case == "fortran":
        arrays["fc.weight"] = np.asfortranarray(arrays["fc.weight"])
    elif case == "float64":
        arrays["conv.bias"] = arrays["conv.bias"].astype(np.float64)
    elif case == "norm-bound":
        arrays["fc.weight"] = arrays["fc.weight"] + 10.0
    elif case == "bad-metrics-and-nan":
        arrays["fc.bias"][3] = np.nan
        metrics = {"num-examples": -1}
    elif case == "truncated":
        good = Array(arrays["fc.weight"])
        arrays["fc.weight"] = Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=good.data[:-8])
    elif case == "declared":
        good = Array(arrays["conv.bias"])
        arrays["conv.bias"] = Array(dtype="float32", shape=(4, 2), stype=good.stype, data=good.data)
    elif case == "overflow":
        arrays["fc.bias"][0] = np.float32(3e38)
        arrays["fc.bias"][1] = np.float32(-3e38)
    old, new = _validate_both(arrays, metrics=metrics)
    _same(old, new)


def test_npy_view_reads_the_message_bytes_in_place_or_declines():
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(value)
    view = npy_view(array, (3, 4), "float32")
    assert view is not None and np.array_equal(view, value) and not view.flags.writeable
    assert npy_view(array, (4, 3), "float32") is None
    assert npy_view(array, (3, 4), "float64") is None
    assert npy_view(Array(value.astype(">f4")), (3, 4), "float32") is None
    assert npy_view(Array(np.asfortranarray(value)), (3, 4), "float32") is None
    short = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data[:-1])
    assert npy_view(short, (3, 4), "float32") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sha256_row_equals_sha256_tensor(dtype):
    row = torch.randn(1000).to(dtype)
    assert sha256_row(row) == sha256_tensor(row)
    stack = empty_stack(3, 700_000, torch.float32)
    stack.normal_()
    assert sha256_row(stack[1]) == sha256_tensor(stack[1].clone())
    assert sha256_row(torch.empty(0)) == sha256_tensor(torch.empty(0))


def test_fill_row_is_the_subtraction_and_its_float64_sum_of_squares():
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(300, 700)).astype(np.float32), rng.normal(size=(5,)).astype(np.float16),
             rng.normal(size=(150_001,)).astype(np.float32)]
    flat = np.concatenate([np.asarray(p, np.float32).reshape(-1) for p in parts])
    glob = rng.normal(size=flat.size).astype(np.float32)
    row = np.empty(flat.size, np.float32)
    sq = fill_row(row, parts, glob)
    expected = torch.from_numpy(flat) - torch.from_numpy(glob)
    assert torch.equal(torch.from_numpy(row), expected)
    assert math.isclose(sq, float((expected.double() ** 2).sum()), rel_tol=1e-13)
    wide = np.empty(flat.size, np.float64)
    sq64 = fill_row(wide, parts, glob.astype(np.float64))
    assert np.array_equal(wide, np.concatenate([np.asarray(p, np.float64).reshape(-1) for p in parts]) - glob)
    assert math.isclose(sq64, float((wide ** 2).sum()), rel_tol=1e-13)
    parts[2][17] = np.nan
    assert not math.isfinite(fill_row(row, parts, glob))


def test_row_features_and_shared_norms_match_the_float64_reference():
    torch.manual_seed(0)
    updates = torch.randn(9, 300_001) * 0.01
    updates[4] += 0.05
    aggregate = updates.median(dim=0).values
    sq, dot, dist = row_features(updates, aggregate)
    u, a = updates.double(), aggregate.double()
    assert torch.allclose(sq, (u ** 2).sum(1), rtol=1e-13)
    assert torch.allclose(dot, u @ a, rtol=1e-12)
    assert torch.allclose(dist, ((u - a) ** 2).sum(1), rtol=1e-13)
    plain = score_updates(updates, aggregate)
    shared = score_updates(updates, aggregate, norms=sq.sqrt())
    reference = score_features(*_raw_features(updates, aggregate, 1 << 24))
    for name in ("combined", "norm", "cosine", "distance", "evidence"):
        assert torch.allclose(getattr(plain, name), getattr(reference, name), rtol=1e-9, atol=1e-12), name
        assert torch.allclose(getattr(shared, name), getattr(reference, name), rtol=1e-9, atol=1e-12), name


def test_distances_from_the_rule_give_the_measured_features():
    torch.manual_seed(1)
    updates = torch.randn(8, 50_000) * 0.01
    updates[2] *= 30.0
    result = aggregators.build("median")(updates)
    measured = score_updates(updates, result.vector, result.scores)
    norms = torch.linalg.vector_norm(updates.double(), dim=1)
    shared = score_updates(updates, result.vector, result.scores, norms=norms, distances=result.scores)
    assert torch.allclose(shared.distance, measured.distance, rtol=1e-12)
    assert torch.allclose(shared.cosine, measured.cosine, rtol=0, atol=1e-12)
    assert torch.allclose(shared.combined, measured.combined, rtol=1e-9, atol=1e-12)
    # Non-finite distances are not trusted: the stack is read and the rows named.
    updates[5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"update rows \[5\]"):
        score_updates(updates, result.vector, result.scores, norms=norms,
                      distances=torch.full((8,), float("nan"), dtype=torch.float64))


def test_score_updates_still_names_the_non_finite_rows():
    updates = torch.randn(5, 1000)
    updates[1, 3] = float("nan")
    updates[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"update rows \[1, 3\] contain NaN or Inf"):
        score_updates(updates, torch.zeros(1000))
    with pytest.raises(ValueError, match="aggregate contains NaN or Inf"):
        score_updates(torch.randn(5, 1000), torch.full((1000,), float("nan")))


def test_an_interceptor_s_rows_are_what_is_hashed_and_scored():
    contents = {n: content(reply_arrays(n)) for n in NODES}

    def flip(server_round, updates, node_ids, metrics, rule):
        updates = updates.clone()
        updates[0] = -5 * updates[0]
        return updates

    _, _, record = run("trimmed-mean", contents, interceptor=flip)
    updates, _, _, _, ids = reference("trimmed-mean", contents)
    updates[0] = -5 * updates[0]
    assert record["update_sha256"] == {str(n): sha256_tensor(u) for n, u in zip(ids, updates)}
    norms = [record["features"][str(n)]["norm"] for n in ids]
    assert np.allclose(norms, torch.linalg.vector_norm(updates.double(), dim=1).numpy(), rtol=1e-12)


def test_the_rounds_records_are_appended_and_the_checkpoint_only_counts_them(tmp_path):
    """records.jsonl gets one line a round; the checkpoint holds their count, not the records, so
    what a round writes does not grow with the rounds done. A resumed run reads them back."""
    import json

    from server.checkpoint import load_checkpoint
    from server.run import read_run_records
    from simulations.harness import run_federation

    settings = {"aggregator": "median", "num-byzantine": 1, "attack": "sign-flip", "num-malicious": 2}
    out = tmp_path / "run"
    run_federation(settings | {"rounds": 2, "out": str(out)})
    state = load_checkpoint(out / "checkpoint.pt")
    assert "records" not in state and state["records_length"] == 2 and state["strategy"]["history"] == []
    lines = read_run_records(out)
    assert [line["round"] for line in lines] == [1, 2]
    assert all(len(line["strategy"]) == 1 for line in lines)
    resumed = run_federation(settings | {"rounds": 3, "resume": True, "out": str(out)})
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert [line["round"] for line in read_run_records(out)] == [1, 2, 3]
    fresh = run_federation(settings | {"rounds": 3, "out": str(tmp_path / "fresh")})
    for key in ("accepted", "scores", "flagged", "accuracy"):
        assert [r[key] for r in resumed["rounds"]] == [r[key] for r in fresh["rounds"]], key
    for line in (out / "records.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))


def test_a_kept_stack_is_reused_only_when_nothing_else_holds_a_view_of_it():
    from server.stacking import cached_stack_bytes, release_cached_stack

    release_cached_stack()
    first = empty_stack(4, 1_000_000, torch.float32)
    first.fill_(1.0)
    address = first.data_ptr()
    assert cached_stack_bytes() == 16_000_000
    kept_view = first[2]
    del first
    second = empty_stack(4, 1_000_000, torch.float32)  # a view of the first is alive: a new one
    assert second.data_ptr() != address and float(kept_view[0]) == 1.0
    second_address = second.data_ptr()
    del second, kept_view
    third = empty_stack(3, 1_000_000, torch.float32)  # nothing holds the kept one: reused
    assert third.data_ptr() == second_address
    del third
    release_cached_stack()
    assert cached_stack_bytes() == 0


def test_rounds_that_reuse_the_kept_stack_give_the_same_results():
    from server.stacking import release_cached_stack

    release_cached_stack()
    big = {"w": ((2000, 1000), "float32"), "b": ((1000,), "float32")}

    def arrays(seed, scale):
        rng = np.random.default_rng(seed)
        return {k: (scale * rng.normal(size=s)).astype(t) for k, (s, t) in big.items()}

    base = ArrayRecord({k: Array(v) for k, v in arrays(0, 1.0).items()})
    outputs = []
    for _ in range(2):
        strategy = RobustStrategy("median", num_byzantine=1, seed=0, device="cpu", min_train_nodes=5)
        messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, base, ConfigRecord(), [1, 2, 3, 4, 5])}
        replies = []
        for node in range(1, 6):
            values = {k: base[k].numpy() + v for k, v in arrays(node, 0.01).items()}
            replies.append(Message(content(values), reply_to=messages[node]))
        new, _ = strategy.aggregate_train(1, replies)
        outputs.append((strategy.last_record["update_sha256"], strategy.last_record["scores"],
                        {k: new[k].numpy().copy() for k in big}))
    assert outputs[0][0] == outputs[1][0] and outputs[0][1] == outputs[1][1]
    for key in big:
        assert np.array_equal(outputs[0][2][key], outputs[1][2][key])
    release_cached_stack()
