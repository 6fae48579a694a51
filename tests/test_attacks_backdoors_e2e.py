"""A bounded backdoor end to end: real rounds, the real validator, the backdoor learnt anyway."""

from __future__ import annotations

from simulations.harness import run_federation

from conftest import PLAIN


def test_a_norm_bounded_backdoor_passes_the_servers_norm_check_every_round_and_is_learnt(tmp_path):
    """Scaled to just inside ``max-update-norm`` (2.5, above the honest norms of ~1.2-2.1 on
    digits), the attackers' updates are never rejected, and plain averaging learns the trigger.
    The bound is given explicitly (``norm=2.5``) so that the run needs no attack context."""
    summary = run_federation({"attack": "norm-bounded-backdoor", "num-malicious": 2, "attack-params": "norm=2.5", "max-update-norm": 2.5,
                              "aggregator": "mean", "num-byzantine": 0, "rounds": 4, "out": str(tmp_path / "run"), **PLAIN})
    attackers = {str(n) for n in summary["malicious_nodes"]}
    assert len(attackers) == 2
    for record in summary["rounds"]:
        assert not attackers & set(record["rejected"]), record["rejected"]
        assert attackers <= {str(n) for n in record["accepted"]}
    # Measured (seed 0): attack success 0.67 after 4 rounds, 1.0 after 6 and 8; a model that has
    # not learnt the trigger sends almost none of them to the target (0.003 for a centrally trained one).
    assert summary["backdoor_asr"] >= 0.4
    assert summary["final_accuracy"] >= 0.8
