"""Safe defaults: nothing attacks unless asked, attacks stay in simulation, bad settings stop before training.

Specification: the default run config names no attack; attack settings on a grid that is not a
simulation engine are refused before any message is sent, unless
``allow-attacks-outside-simulation`` says so; impossible settings (``max-num-examples = 0``,
``clip-norm = inf`` under central DP) are refused before any client trains.
"""

from __future__ import annotations

import pytest
from flwr.clientapp import ClientApp

import client.app as phalanx_client
from client.config import RunSettings
from server.app import app as phalanx_server
from server.app import check_attack_allowed
from simulations.harness import default_config, project_dir
from simulations.inprocess import InProcessGrid, node_ids_for, run_inprocess


class DeployedGrid(InProcessGrid):
    """The same in-process nodes, presented as a real federation (no ``simulation`` flag)."""

    simulation = False


def test_the_default_config_attacks_nobody():
    config = default_config()
    assert config["attack"] == "none" and config["num-malicious"] == 0
    assert not RunSettings.from_run_config(config).attack_enabled


def test_attack_settings_are_refused_outside_simulation_unless_overridden():
    attacking = RunSettings(attack="sign-flip", num_malicious=2)
    deployed = DeployedGrid(phalanx_client.app, node_ids_for(3, 0), default_config())
    with pytest.raises(ValueError, match="not Flower's simulation engine.*allow-attacks-outside-simulation"):
        check_attack_allowed(attacking, deployed)
    check_attack_allowed(RunSettings(), deployed)  # no attack: fine anywhere
    check_attack_allowed(RunSettings(attack="sign-flip", num_malicious=2, allow_attacks_outside_simulation=True),
                         deployed)
    check_attack_allowed(attacking, InProcessGrid(phalanx_client.app, node_ids_for(3, 0), default_config()))


def counting_app(calls: list) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg, context):
        calls.append(context.node_config["partition-id"])
        return phalanx_client.train(msg, context)

    return app


@pytest.mark.parametrize("overrides, message", [
    ({"max-num-examples": 0}, "max-num-examples must be >= 1"),
    ({"dp": "central", "clip-norm": float("inf"), "noise-multiplier": 1.0}, "clip-norm must be a finite number"),
    ({"attack": "sign-flip"}, "needs num-malicious >= 1"),
])
def test_impossible_settings_stop_the_run_before_any_client_trains(tmp_path, overrides, message):
    calls: list = []
    overrides = overrides | {"num-clients": 3, "rounds": 1, "out": str(tmp_path / "run")}
    with pytest.raises(Exception, match=message):
        run_inprocess(phalanx_server, counting_app(calls), default_config() | overrides, num_nodes=3, seed=0,
                      app_dir=str(project_dir()), override_config=overrides)
    assert calls == []
