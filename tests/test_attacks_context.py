"""The attack context a client hands to its attack hooks, and who is which attacker."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from client.hooks import AttackContext, AttackRole, attack_role
from client.wire import flat_vector
from simulations.attacks import malicious_partitions


def test_attacker_index_is_the_position_among_the_sorted_malicious_partitions():
    attackers = malicious_partitions(12, 4, seed=3)
    for partition in range(12):
        role = attack_role("dba", "", partition_id=partition, num_clients=12, num_malicious=4, seed=3)
        assert role.num_attackers == 4
        assert role.attacker_index == (attackers.index(partition) if partition in attackers else None)
        assert role.malicious == (partition in attackers)


def test_role_builds_the_context_of_a_round():
    role = attack_role("neurotoxin", "mask-ratio=0.5", partition_id=malicious_partitions(6, 2, seed=0)[1],
                       num_clients=6, num_malicious=2, seed=0)
    g, previous = torch.arange(5.0), torch.zeros(5)
    ctx = role.context(server_round=4, partition_id=9, global_vector=g, previous_global=previous,
                       run_config={"max-update-norm": 1.0})
    assert (ctx.server_round, ctx.partition_id, ctx.attacker_index, ctx.num_attackers) == (4, 9, 1, 2)
    assert ctx.global_vector is g and ctx.previous_global is previous and ctx.run_config["max-update-norm"] == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.server_round = 5  # frozen: an attack cannot rewrite what the client told it


def test_an_old_style_role_still_works():
    role = AttackRole(object(), True)
    assert role.attacker_index is None and role.num_attackers == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"global_vector": torch.zeros(2, 2)}, "global_vector must be a 1-D tensor"),
    ({"previous_global": torch.zeros(4)}, r"previous_global must match global_vector's shape \(3,\)"),
    ({"attacker_index": 2}, r"attacker_index=2 is not in \[0, num_attackers=2\)"),
])
def test_an_inconsistent_context_is_refused(kwargs, message):
    fields = dict(server_round=1, partition_id=0, attacker_index=0, num_attackers=2, global_vector=torch.zeros(3),
                  previous_global=None, run_config={})
    with pytest.raises(ValueError, match=message):
        AttackContext(**(fields | kwargs))


def test_the_flat_vector_skips_integer_buffers_and_keeps_state_dict_order():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(4, 3).double())
    state = model.state_dict()
    assert any(not torch.is_floating_point(v) for v in state.values())   # num_batches_tracked
    flat = flat_vector(state)
    expected = torch.cat([v.reshape(-1).double() for v in state.values() if torch.is_floating_point(v)])
    assert flat.dtype == torch.float64 and torch.equal(flat, expected)  # float64 as soon as one entry is
    assert flat.numel() == sum(v.numel() for k, v in state.items() if "num_batches_tracked" not in k)
