"""Fuzzing the whole server loop: hostile clients on the real engine never end the run.

Specification (hypothesis; Phalanx's ServerApp on the in-process Flower engine, every message
through Flower's wire form): two of six nodes answer every train and evaluate message with
random record contents (records of any kind under any name, metrics of every type, lists, NaN,
64-bit extremes, long strings, thousands of keys, arrays of any shape and dtype); the other
four run Phalanx's real ClientApp. No exception escapes, every round aggregates the honest
nodes, every JSON file of the run directory parses with NaN and Infinity refused, and the audit
chain verifies.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Message
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import client.app as phalanx_client
from server.app import app as phalanx_server
from server.audit import verify
from simulations.harness import default_config, project_dir
from simulations.inprocess import run_inprocess
from test_fuzz_replies import hostile_contents

NUM_NODES, HOSTILE_PARTITIONS, ROUNDS = 6, (4, 5), 2


def _refuse_constant(name: str):
    raise ValueError(f"non-strict JSON constant {name}")


def hostile_app(contents: list) -> ClientApp:
    """A real ClientApp: Phalanx's for the honest partitions, the drawn contents for the others."""
    app = ClientApp()
    replies = iter(contents * (2 * ROUNDS))

    def answer(msg: Message, context, honest):
        if int(context.node_config["partition-id"]) not in HOSTILE_PARTITIONS:
            return honest(msg, context)
        return Message(next(replies), reply_to=msg)

    @app.train()
    def train(msg, context):
        return answer(msg, context, phalanx_client.train)

    @app.evaluate()
    def evaluate(msg, context):
        return answer(msg, context, phalanx_client.evaluate)

    return app


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(contents=st.lists(hostile_contents(), min_size=1, max_size=4),
       aggregator=st.sampled_from(["mean", "median", "trimmed-mean"]))
def test_hostile_clients_never_end_the_run_and_the_evidence_stays_strict(tmp_path_factory, contents, aggregator):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    overrides = {"num-clients": NUM_NODES, "rounds": ROUNDS, "aggregator": aggregator, "num-byzantine": 1,
                 "fraction-evaluate": 1.0, "max-update-norm": 50.0, "out": str(out)}
    run_config = default_config() | overrides
    run_inprocess(phalanx_server, hostile_app(contents), run_config, num_nodes=NUM_NODES, seed=0,
                  app_dir=str(project_dir()), override_config=overrides)
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_refuse_constant)
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    for record in summary["rounds"]:
        assert len(record["accepted"]) >= NUM_NODES - len(HOSTILE_PARTITIONS)
    for path in sorted(Path(out).rglob("*.json*")):
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            json.loads(line, parse_constant=_refuse_constant)
    assert verify(out / "audit.jsonl").ok
