"""Backdoors that shape their update: each attack's defining property.

model-replacement: averaging its update with near-zero ones yields the attacker's model;
dba: the attackers' local triggers are disjoint parts of the global one, each stamps only its own;
neurotoxin: the update is exactly zero outside a mask of the requested size;
norm-bounded-backdoor: the update never exceeds the server's bound and sits just inside it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregators
from client.hooks import AttackContext
from simulations.attacks import build
from simulations.attacks.triggers import Trigger


def vector(d: int, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (scale * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def context(*, attacker_index: int | None = 0, num_attackers: int = 4, global_vector=None, previous_global=None,
            **run_config) -> AttackContext:
    g = vector(50, 0) if global_vector is None else global_vector
    config = {"num-clients": 10, "fraction-train": 1.0, "max-update-norm": 0.0, "dp": "off", "clip-norm": 1.0}
    return AttackContext(server_round=3, partition_id=7, attacker_index=attacker_index, num_attackers=num_attackers,
                         global_vector=g, previous_global=previous_global, run_config=config | run_config)


def norm(t: torch.Tensor) -> float:
    return float(t.double().norm())


# --- model replacement --------------------------------------------------------------------------


@pytest.mark.parametrize("clients, fraction, server_lr", [(10, 1.0, 1.0), (20, 0.5, 1.0), (8, 1.0, 0.5)])
def test_model_replacement_under_plain_mean_turns_the_global_into_the_backdoored_model(clients, fraction, server_lr):
    """The paper's single attacker: G' = G + eta * mean(updates), others ~0, equals its model X."""
    g = vector(200, 1)
    backdoored = g + vector(200, 2, scale=0.05)          # X: the attacker's locally trained model
    n = int(round(clients * fraction))
    attack = build("model-replacement", server_lr=server_lr)
    ctx = context(num_attackers=1, **{"num-clients": clients, "fraction-train": fraction})
    sent = attack.poison_update(backdoored - g, context=ctx)
    others = vector(200 * (n - 1), 3, scale=1e-6).reshape(n - 1, 200)  # near convergence: ~zero updates
    new_global = g + server_lr * aggregators.build("mean")(torch.cat([sent[None, :], others])).vector
    torch.testing.assert_close(new_global, backdoored, atol=1e-5, rtol=0)
    assert attack.scale_for(ctx) == pytest.approx(n / server_lr)


@pytest.mark.parametrize("attackers, fraction", [(2, 1.0), (4, 1.0), (4, 0.5)])
def test_colluding_replacements_replace_the_global_by_the_average_of_their_models(attackers, fraction):
    g = vector(100, 1)
    n, a = int(round(10 * fraction)), max(1, int(round(attackers * fraction)))
    models = [g + vector(100, 10 + k, scale=0.05) for k in range(a)]
    ctx = context(num_attackers=attackers, **{"num-clients": 10, "fraction-train": fraction})
    sent = [build("model-replacement").poison_update(m - g, context=ctx) for m in models]
    updates = torch.cat([torch.stack(sent), torch.zeros(n - a, 100)])
    new_global = g + aggregators.build("mean")(updates).vector
    torch.testing.assert_close(new_global, torch.stack(models).mean(dim=0), atol=1e-5, rtol=0)


def test_model_replacement_reads_the_server_lr_from_the_run_config_and_an_explicit_gamma_wins():
    update = vector(30, 4)
    torch.testing.assert_close(build("model-replacement").poison_update(update, context=context(num_attackers=1, **{"server-lr": 2.0})),
                               update * 5.0)
    torch.testing.assert_close(build("model-replacement", gamma=3).poison_update(update, context=context(num_attackers=1)), update * 3.0)
    torch.testing.assert_close(build("model-replacement", gamma=3).poison_update(update), update * 3.0)


def test_model_replacement_without_gamma_or_context_says_what_it_needs():
    with pytest.raises(ValueError, match="model-replacement: gamma = n / eta needs the run config's num-clients"):
        build("model-replacement").poison_update(vector(5, 0))


@pytest.mark.parametrize("bound_keys", [{"max-update-norm": 2.0}, {"dp": "central", "clip-norm": 2.0},
                                        {"dp": "client", "clip-norm": 2.0, "max-update-norm": 9.0}])
def test_model_replacement_constrains_the_scaled_update_to_the_server_bound(bound_keys):
    update = vector(100, 5, scale=0.1)                   # norm ~1, scaled by 10 to ~10 > 2
    sent = build("model-replacement").poison_update(update, context=context(num_attackers=1, **bound_keys))
    assert norm(sent) <= 2.0 and norm(sent) == pytest.approx(2.0 * (1 - 1e-3), rel=1e-6)
    torch.testing.assert_close(sent / norm(sent), update / norm(update))  # the direction is kept
    unconstrained = build("model-replacement", constrain="false").poison_update(update, context=context(num_attackers=1, **bound_keys))
    torch.testing.assert_close(unconstrained, update * 10.0)


def test_model_replacement_poisons_data_like_backdoor():
    x = np.zeros((20, 1, 8, 8), dtype=np.float32)
    y = np.arange(20, dtype=np.int64) % 10
    ours = build("model-replacement", target=2).poison_data(x, y, num_classes=10, image_shape=(1, 8, 8),
                                                           rng=np.random.default_rng(0), context=context())
    theirs = build("backdoor", target=2).poison_data(x, y, num_classes=10, image_shape=(1, 8, 8), rng=np.random.default_rng(0))
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


# --- DBA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, parts", [(4, 4), (3, 4), (4, 2), (2, 4)])
def test_dba_local_patterns_are_disjoint_and_their_union_is_the_global_trigger(size, parts):
    attack = build("dba", size=size, parts=parts)
    for shape in [(3, 8, 8), (1, 8, 8)]:
        full = attack.trigger.feature_indices(shape, shape)
        local = [t.feature_indices(shape, shape) for t in attack.local_triggers()]
        assert len(local) == parts and all(len(p) > 0 for p in local)
        assert sum(len(p) for p in local) == len(full)
        np.testing.assert_array_equal(np.sort(np.concatenate(local)), np.sort(full))


def test_dba_default_local_patterns_are_the_four_rows_of_a_4x4_patch():
    attack = build("dba")
    for k, local in enumerate(attack.local_triggers()):
        plane = np.zeros((8, 8), dtype=bool)
        plane.reshape(-1)[local.feature_indices(64, (8, 8))] = True
        expected = np.zeros((8, 8), dtype=bool)
        expected[4 + k, 4:] = True
        np.testing.assert_array_equal(plane, expected)


def test_each_dba_attacker_stamps_only_its_own_part_and_the_testset_carries_the_full_trigger():
    rng = np.random.default_rng(0)
    x = (rng.random((60, 3, 8, 8)) * 0.9).astype(np.float32)
    y = (np.arange(60) % 10).astype(np.int64)
    attack = build("dba", target=5, fraction=0.5)
    full = attack.trigger.feature_indices((3, 8, 8), (3, 8, 8))
    stamped = []
    for index in range(4):
        x_out, y_out, rows = attack.poison_data_indexed(x, y, num_classes=10, image_shape=(3, 8, 8),
                                                        rng=np.random.default_rng(index), context=context(attacker_index=index))
        own = attack.local_triggers()[index]
        changed = np.flatnonzero((x_out != x).reshape(60, -1).any(axis=0))
        np.testing.assert_array_equal(changed, np.sort(own.feature_indices((3, 8, 8), (3, 8, 8))))
        assert own.present(x_out, (3, 8, 8))[rows].all() and (y_out[rows] == 5).all()
        assert not attack.trigger.present(x_out, (3, 8, 8)).any()   # no attacker trains on the full trigger
        stamped.append(set(changed.tolist()))
    assert set().union(*stamped) == set(full.tolist())
    x_test, y_test = attack.triggered_testset(x, y, image_shape=(3, 8, 8))
    assert attack.trigger.present(x_test, (3, 8, 8)).all() and (y_test == 5).all()


def test_dba_attackers_beyond_the_parts_wrap_around_and_no_context_means_the_full_trigger():
    attack = build("dba", parts=2)
    assert attack.trigger_for(context(attacker_index=3)) == attack.local_triggers()[1]
    assert attack.trigger_for(None) == attack.trigger
    assert attack.trigger_for(context(attacker_index=None)) == attack.trigger


# --- Neurotoxin -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 400), ratio=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_neurotoxin_update_is_exactly_zero_outside_a_mask_of_the_requested_size(d, ratio, seed):
    g = vector(d, seed)
    previous = g - vector(d, seed + 1, scale=0.1)
    update = vector(d, seed + 2)
    attack = build("neurotoxin", mask_ratio=ratio)
    ctx = context(global_vector=g, previous_global=previous)
    sent = attack.poison_update(update, context=ctx)
    mask = attack.mask_for(ctx)
    assert int(mask.sum()) == int(round(ratio * d)) == attack.last_mask_size
    assert torch.equal(sent[~mask], torch.zeros_like(sent[~mask]))
    assert torch.equal(sent[mask], update[mask])
    # The kept coordinates are those the benign aggregate changed least.
    change = (g.double() - previous.double()).abs()
    if 0 < mask.sum() < d:
        assert float(change[mask].max()) <= float(change[~mask].min())


def test_neurotoxin_masks_out_the_coordinates_honest_clients_change_most():
    g = torch.zeros(10)
    previous = torch.zeros(10)
    previous[[2, 7]] = 1.0                              # the benign aggregate moved only these two
    sent = build("neurotoxin", mask_ratio=0.8).poison_update(torch.ones(10), context=context(global_vector=g,
                                                                                           previous_global=previous))
    assert sent.tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 1, 1]


def test_neurotoxin_sends_its_plain_backdoor_update_in_its_first_round():
    update = vector(50, 9)
    attack = build("neurotoxin")
    assert torch.equal(attack.poison_update(update, context=context(previous_global=None)), update)
    assert attack.last_mask_size is None
    assert torch.equal(attack.poison_update(update), update)


def test_neurotoxin_stays_inside_the_server_bound_without_leaving_the_mask():
    g, previous = vector(50, 0), vector(50, 1)
    update = vector(50, 2, scale=10.0)
    ctx = context(global_vector=g, previous_global=previous, **{"max-update-norm": 1.0})
    attack = build("neurotoxin", mask_ratio=0.5)
    sent = attack.poison_update(update, context=ctx)
    mask = attack.mask_for(ctx)
    assert norm(sent) <= 1.0 and torch.equal(sent[~mask], torch.zeros(int((~mask).sum())))


def test_neurotoxin_refuses_an_update_of_another_layout():
    with pytest.raises(ValueError, match=r"neurotoxin: update of shape \(7,\) does not match the global vector's \(50,\)"):
        build("neurotoxin").poison_update(vector(7, 0), context=context(previous_global=vector(50, 1)))


# --- norm-bounded backdoor ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 300), log_scale=st.floats(-4, 4), bound=st.floats(1e-3, 1e3), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.float64]), margin=st.sampled_from([0.0, 1e-3, 0.1]))
def test_norm_bounded_backdoor_never_exceeds_the_bound_and_sits_just_inside_it(d, log_scale, bound, seed, dtype, margin):
    update = vector(d, seed, scale=10.0 ** log_scale, dtype=dtype)
    sent = build("norm-bounded-backdoor", margin=margin).poison_update(update, context=context(**{"max-update-norm": bound}))
    assert sent.dtype == dtype
    assert norm(sent) <= bound
    assert norm(sent) == pytest.approx(bound * (1 - margin), rel=1e-5)
    torch.testing.assert_close(sent.double() / norm(sent), update.double() / norm(update), rtol=1e-5, atol=1e-6)


def test_norm_bounded_backdoor_takes_the_tighter_of_max_update_norm_and_the_dp_clip():
    attack = build("norm-bounded-backdoor")
    assert attack.bound_for(context(**{"max-update-norm": 3.0})) == 3.0
    assert attack.bound_for(context(**{"dp": "central", "clip-norm": 0.5})) == 0.5
    assert attack.bound_for(context(**{"dp": "client", "clip-norm": 4.0, "max-update-norm": 3.0})) == 3.0
    assert attack.bound_for(context(**{"dp": "off", "clip-norm": 0.5})) is None      # the clip applies only with dp
    assert build("norm-bounded-backdoor", norm=7).bound_for(context(**{"max-update-norm": 3.0})) == 7.0


def test_norm_bounded_backdoor_without_a_bound_sends_its_raw_update():
    update = vector(40, 3, scale=100.0)
    attack = build("norm-bounded-backdoor")
    assert torch.equal(attack.poison_update(update, context=context()), update) and attack.last_bound is None
    assert torch.equal(attack.poison_update(update), update)


def test_norm_bounded_backdoor_is_left_untouched_by_the_servers_own_clip():
    """The bound is the one the real server enforces: its DP clip does not shorten the update."""
    from server.privacy import clip_updates

    update = vector(500, 4, scale=3.0)
    sent = build("norm-bounded-backdoor").poison_update(update, context=context(**{"dp": "central", "clip-norm": 1.0}))
    clipped, _ = clip_updates(sent[None, :], 1.0)
    torch.testing.assert_close(clipped[0], sent)


def test_norm_bounded_backdoor_zero_update_stays_zero():
    assert torch.equal(build("norm-bounded-backdoor", norm=1).poison_update(torch.zeros(5)), torch.zeros(5))


def test_a_run_config_bound_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="norm-bounded-backdoor: run config max-update-norm='big' is not a number"):
        build("norm-bounded-backdoor").poison_update(vector(5, 0), context=context(**{"max-update-norm": "big"}))


def test_trigger_parts_are_validated():
    with pytest.raises(ValueError, match="parts must lie in"):
        Trigger(2, parts=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, params", [("model-replacement", {}), ("neurotoxin", {}),
                                          ("norm-bounded-backdoor", {}), ("dba", {"boost": 2})])
def test_update_hooks_keep_a_cuda_update_on_its_device_with_a_cpu_context(name, params):
    """The context's vectors live on the CPU (the ClientApp's layout); the update may be on the GPU."""
    ctx = context(num_attackers=1, previous_global=vector(50, 1), **{"max-update-norm": 1.0})
    update = vector(50, 2).cuda()
    out = build(name, **params).poison_update(update, context=ctx)
    assert out.device == update.device and out.dtype == update.dtype
