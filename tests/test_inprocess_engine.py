"""The in-process engine: a Flower Grid that calls the ClientApp in the server's process.

Specification:

* every message crosses Flower's wire form (deflated objects, hashed, inflated): the receiver
  gets equal content and metadata and shares no object with the sender;
* the grid behaves as Flower's runtimes do: replies come from the destination node and reply to
  their instruction; a ClientApp that raises gives an error reply (CLIENT_APP_RAISED_EXCEPTION),
  never a server exception, and its state changes are not kept; each node's Context carries its
  partition and a ``state`` that persists across rounds, per node; changing ``run_config`` is an
  error; instructions to unknown nodes and replies to other messages are dropped; a client does
  not move the server's global random streams;
* node ids are 64-bit, distinct, seeded and ascending with the partition, and Flower's engine
  gets its partitions in the same order;
* for a fixed seed, per-round accuracy, loss, backdoor success and anomaly scores of Phalanx's
  federation are exactly those of Flower's Ray engine (trimmed-mean + sign-flip, krum + ALIE,
  mean + backdoor, and a sampled median run, 3 rounds each); the wire form is lossless; a rerun
  is the same run, node ids included.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import ServerApp

from simulations.harness import partitions_in_node_id_order, project_dir, run_federation, simulate
from simulations.inprocess import InProcessGrid, node_ids_for, run_inprocess, through_the_wire

from conftest import PLAIN

RUN_CONFIG = {"seed": 0, "note": "test"}


# ---------------------------------------------------------------- a real ClientApp for the grid tests

counter_app = ClientApp()


@counter_app.train()
def count_and_echo(msg: Message, context) -> Message:
    """Count this node's messages in context.state; echo the received array plus the partition."""
    seen = int(context.state["counter"]["seen"]) + 1 if "counter" in context.state else 1
    context.state["counter"] = MetricRecord({"seen": seen})
    config = msg.content["config"]
    if config.get("fail", False):
        raise RuntimeError("asked to fail")
    if config.get("touch-run-config", False):
        context.run_config["seed"] = 99
    if config.get("draw", False):  # a client using the global random streams
        torch.rand(3), np.random.rand(3), random.random()
    received = msg.content["arrays"]["x"].numpy()
    config["seen-by-client"] = True  # edits the received message: must not reach the server's
    partition = int(context.node_config["partition-id"])
    received += 1000.0  # in place: must not reach the server's copy
    reply = RecordDict({"arrays": ArrayRecord({"x": Array(received + partition)}),
                        "metrics": MetricRecord({"seen": seen, "partition": partition,
                                                 "num-partitions": int(context.node_config["num-partitions"])})})
    if config.get("reply-to-other", False):
        other = Message(RecordDict(), dst_node_id=msg.metadata.dst_node_id, message_type="train")
        other.metadata.__dict__["_message_id"] = "0" * 64
        return Message(reply, reply_to=other)
    return Message(reply, reply_to=msg)


def drive(main, num_nodes: int = 3, seed: int = 0) -> InProcessGrid:
    """Run ``main(grid, context)`` as a real ServerApp against ``num_nodes`` counter_app nodes."""
    server = ServerApp()
    server.main()(main)
    return run_inprocess(server, counter_app, RUN_CONFIG, num_nodes=num_nodes, seed=seed, app_dir=str(project_dir()))


def instruction(node: int, x: np.ndarray | None = None, **config) -> Message:
    arrays = ArrayRecord({"x": Array(np.zeros(3) if x is None else x)})
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=node,
                   message_type="train")


# ---------------------------------------------------------------- the wire


def test_a_message_crosses_the_wire_equal_and_sharing_nothing():
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.float64)}
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    message = Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"n": 3, "loss": 0.5}),
                                  "config": ConfigRecord({"name": "x", "flag": True})}),
                      dst_node_id=42, message_type="train", group_id="round-1")
    copy = through_the_wire(message)
    assert copy is not message and copy.content is not message.content
    assert copy.metadata.message_id == message.object_id != ""
    for name in ("run_id", "src_node_id", "dst_node_id", "group_id", "message_type", "ttl", "created_at"):
        assert getattr(copy.metadata, name) == getattr(message.metadata, name)
    received = copy.content["arrays"].to_torch_state_dict()
    assert received.keys() == state.keys()
    assert all(torch.equal(received[k], state[k]) and received[k].dtype == state[k].dtype for k in state)
    assert dict(copy.content["metrics"]) == {"n": 3, "loss": 0.5}
    assert dict(copy.content["config"]) == {"name": "x", "flag": True}
    received["w"].add_(1.0)  # the receiver's tensors are its own
    assert torch.equal(message.content["arrays"].to_torch_state_dict()["w"], state["w"])


# ---------------------------------------------------------------- the grid, with a real ServerApp


def test_replies_come_from_each_node_and_node_state_persists_per_node():
    seen: list[list[Message]] = []
    sent: list[np.ndarray] = []

    def main(grid, context):
        nodes = list(grid.get_node_ids())
        for _ in range(3):
            x = np.arange(3, dtype=np.float64)
            sent.append(x)
            messages = [instruction(n, x) for n in nodes]
            seen.append(list(grid.send_and_receive(messages)))
            assert np.array_equal(x, np.arange(3))  # the clients' in-place edits never reach it
            assert all("seen-by-client" not in m.content["config"] for m in messages)

    grid = drive(main, num_nodes=3, seed=5)
    nodes = node_ids_for(3, 5)
    assert grid.get_node_ids() == nodes
    for round_index, replies in enumerate(seen):
        assert [r.metadata.src_node_id for r in replies] == nodes
        for partition, reply in enumerate(replies):
            assert not reply.has_error()
            assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID and reply.metadata.reply_to_message_id != ""
            metrics = reply.content["metrics"]
            assert (metrics["partition"], metrics["num-partitions"]) == (partition, 3)
            assert metrics["seen"] == round_index + 1  # the node's own counter, kept across rounds
            assert np.array_equal(reply.content["arrays"]["x"].numpy(), np.arange(3) + 1000.0 + partition)
    assert grid.stats.messages == 18 and grid.stats.bytes > 0 and grid.stats.seconds > 0


def test_a_client_that_raises_is_an_error_reply_and_keeps_no_state():
    outcome: dict[str, list[Message]] = {}

    def main(grid, context):
        first, second = grid.get_node_ids()
        outcome["failing"] = list(grid.send_and_receive([instruction(first, fail=True), instruction(second)]))
        outcome["after"] = list(grid.send_and_receive([instruction(first), instruction(second)]))

    drive(main, num_nodes=2)
    failed, fine = outcome["failing"]
    assert failed.has_error() and not fine.has_error()
    assert failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "RuntimeError" in failed.error.reason and "asked to fail" in failed.error.reason
    assert failed.metadata.src_node_id == node_ids_for(2, 0)[0]
    # The failed call's counter update was not kept: the next message is that node's first success.
    assert [r.content["metrics"]["seen"] for r in outcome["after"]] == [1, 2]


def test_changing_run_config_is_an_error_and_bad_messages_are_dropped():
    outcome: dict[str, object] = {}

    def main(grid, context):
        node = grid.get_node_ids()[0]
        outcome["touch"] = list(grid.send_and_receive([instruction(node, **{"touch-run-config": True})]))
        outcome["unknown"] = list(grid.push_messages([instruction(123456789)]))
        outcome["other"] = list(grid.send_and_receive([instruction(node, **{"reply-to-other": True})]))

    drive(main, num_nodes=1)
    (touched,) = outcome["touch"]
    assert touched.has_error() and "run_config" in touched.error.reason
    assert outcome["unknown"] == []  # refused at push, as a SuperLink refuses an unknown node
    assert outcome["other"] == []  # a reply to another message never reaches the server


def test_a_client_does_not_move_the_servers_global_random_streams():
    draws: dict[str, tuple] = {}

    def seeded_draw() -> None:
        torch.manual_seed(1), np.random.seed(1), random.seed(1)

    def main(grid, context):
        node = grid.get_node_ids()[0]
        seeded_draw()
        draws["alone"] = (torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random())
        seeded_draw()
        grid.send_and_receive([instruction(node, draw=True)])
        draws["after a client drew"] = (torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random())

    drive(main, num_nodes=1)
    assert draws["after a client drew"] == draws["alone"]


def test_the_grid_says_it_is_a_simulation():
    assert InProcessGrid.simulation is True


# ---------------------------------------------------------------- node ids


def test_node_ids_are_distinct_64_bit_seeded_and_ascending():
    ids = node_ids_for(50, seed=3)
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert all(0 < n < 2**64 and n != SUPERLINK_NODE_ID for n in ids)
    assert ids == node_ids_for(50, seed=3) and ids != node_ids_for(50, seed=4)
    assert max(ids) > 2**62  # drawn over the whole range, not small counters
    with pytest.raises(ValueError, match="num_nodes must be >= 1, got 0"):
        node_ids_for(0, seed=0)


def test_flowers_engine_gets_partitions_in_node_id_order():
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    def register(num_nodes):
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        return vce_api._register_nodes(num_nodes=num_nodes, state_factory=factory)

    with partitions_in_node_id_order():
        mapping = register(12)
    assert [mapping[n] for n in sorted(mapping)] == list(range(12))
    assert sorted(mapping) != list(range(12))  # Flower's own random ids, only the partition order chosen
    unordered = register(12)  # outside the context Flower's registration order is back
    assert sorted(unordered.values()) == list(range(12))


# ---------------------------------------------------------------- Phalanx's federation on both engines

BASE = PLAIN | {"num-clients": 8, "num-malicious": 2, "num-byzantine": 2, "rounds": 3, "alpha": 0.5}
CELLS = {
    "trimmed-mean + sign-flip": {"aggregator": "trimmed-mean", "attack": "sign-flip"},
    "krum + alie": {"aggregator": "krum", "attack": "alie"},
    "mean + backdoor": {"aggregator": "mean", "attack": "backdoor"},
    # Half the clients sampled a round: with Flower's partition order left random the sample (drawn
    # over the sorted node ids) changes from run to run; in node-id order it is the same on both.
    "median + sign-flip, sampled": {"aggregator": "median", "attack": "sign-flip", "fraction-train": 0.5,
                                    "num-byzantine": 1},
}


def per_round(summary: dict) -> dict[str, list]:
    rounds = summary["rounds"]
    return {
        "accuracy": [r["accuracy"] for r in rounds],
        "loss": [r["loss"] for r in rounds],
        "backdoor_asr": [r.get("backdoor_asr") for r in rounds],
        # Node ids differ between engines (Flower's are random): compare scores in node-id order.
        "scores": [[r["scores"][k] for k in sorted(r["scores"], key=int)] for r in rounds],
        "accepted": [len(r["accepted"]) for r in rounds],
    }


@pytest.mark.parametrize("cell", list(CELLS))
def test_per_round_numbers_equal_flowers_ray_engine(cell, tmp_path):
    config = BASE | CELLS[cell]
    inprocess = run_federation(config | {"out": str(tmp_path / "inprocess")}, engine="inprocess")
    ray = run_federation(config | {"out": str(tmp_path / "ray")}, engine="ray")
    assert inprocess["engine"]["name"] == "inprocess" and ray["engine"]["name"] == "ray"
    assert per_round(inprocess) == per_round(ray)
    assert inprocess["final_accuracy"] > 0.15  # it trained: the comparison is between real runs


def test_the_wire_form_is_lossless_and_a_rerun_is_the_same_run(tmp_path):
    config = BASE | CELLS["krum + alie"]
    first = run_federation(config | {"out": str(tmp_path / "a")})
    again = run_federation(config | {"out": str(tmp_path / "b")})
    simulate(config | {"out": str(tmp_path / "no-wire")}, wire=False)
    unwired = json.loads((tmp_path / "no-wire" / "summary.json").read_text())
    assert _same_but_seconds(first, again)
    assert _same_but_seconds(first, unwired)
    assert first["malicious_nodes"] == again["malicious_nodes"]  # the same node ids
    wire = first["engine"]["wire"]
    assert wire["messages"] == 2 * 8 * 3 and wire["bytes"] > 8 * 3 * 4 * 1000


def _same_but_seconds(a: dict, b: dict) -> bool:
    timing = {"seconds", "aggregation_seconds"}

    def untimed(record: dict) -> dict:
        out = {k: v for k, v in record.items() if k not in timing}
        # each client reports how long it trained: wall time, not part of the run's result
        out["client_reports"] = {n: {k: v for k, v in r.items() if k != "train-seconds"}
                                 for n, r in record.get("client_reports", {}).items()}
        return out

    strip = [[untimed(r) for r in s["rounds"]] for s in (a, b)]
    return strip[0] == strip[1]
