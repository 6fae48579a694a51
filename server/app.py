"""The Phalanx ServerApp: the run config's task, robust rounds, central evaluation and the run's evidence.

Everything is read from the run config (``client.config.RunSettings``, checked before any client
trains): the task (model and data, :mod:`client.task`), the aggregation rule, the reputation
policy, differential privacy, and, in simulation only, the attack. The rounds run through
:class:`server.run.RobustRun`, the same object a user's own ServerApp uses.
"""

from __future__ import annotations

import sys

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from client.data import ArrayDataset
from client.task import Task, as_arrays, load_task
from client.wire import dtypes_of, load_arrays, to_arrays
from server.hooks import SimulatedAttack, simulated_attack
from server.optimizer import ServerOptimizer
from server.run import RobustRun
from server.scoring import detection_quality
from server.settings import RunSettings
from server.strategy import PrivacySettings, RobustStrategy

app = ServerApp()

#: Seconds the server waits for the replies of one round.
ROUND_TIMEOUT = 600.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds the run config asks for; write the run directory."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    check_attack_allowed(settings, grid)
    run_server(grid, settings)


def in_simulation(grid: Grid) -> bool:
    """True on Flower's simulation engine (its InMemoryGrid) or a grid that says it simulates."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid) or bool(getattr(grid, "simulation", False))


def check_attack_allowed(settings: RunSettings, grid: Grid) -> None:
    """Refuse simulated attacks on a real federation unless the config overrides it explicitly.

    Attack settings make real ClientApps poison their updates. On Flower's simulation engine
    that is the point; on a real federation it is almost certainly a mistake (a copied config),
    so it needs ``allow-attacks-outside-simulation = true``.
    """
    if settings.attack_enabled and not settings.allow_attacks_outside_simulation and not in_simulation(grid):
        raise ValueError(
            f"attack={settings.attack!r} (num-malicious={settings.num_malicious}) on a grid that is not Flower's "
            "simulation engine: real clients would poison their updates. Set attack='none', or "
            "allow-attacks-outside-simulation=true if this is a deliberate red-team exercise")


def build_strategy(settings: RunSettings, attack: SimulatedAttack | None, model_dtypes: dict | None = None
                   ) -> RobustStrategy:
    """The strategy a run config describes."""
    privacy = PrivacySettings(
        mode=settings.dp,
        clip_norm=settings.clip_norm,
        noise_multiplier=settings.noise_multiplier,
        delta=settings.delta,
        adaptive=settings.adaptive_clip,
        target_epsilon=settings.target_epsilon if settings.target_epsilon > 0 else float("inf"),
    )
    return RobustStrategy(
        settings.aggregator,
        settings.num_byzantine,
        pre_aggregation=settings.pre_aggregation_list,
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=settings.num_clients,
        min_replies=settings.min_replies,
        max_update_norm=settings.update_norm_bound,
        max_num_examples=settings.max_num_examples,
        policy=settings.policy,
        flag_threshold=settings.flag_threshold,
        privacy=privacy,
        seed=settings.seed,
        interceptor=attack.intercept if attack is not None else None,
        model_dtypes=model_dtypes,
        server_optimizer=ServerOptimizer(kind=settings.server_optimizer, lr=settings.server_lr,
                                         momentum=settings.server_momentum, beta1=settings.server_beta1,
                                         beta2=settings.server_beta2, tau=settings.server_tau),
    )


def _as_array_dataset(task: Task, data) -> ArrayDataset:
    if isinstance(data, ArrayDataset):
        return data
    info = task.data_info(data)
    x, y = as_arrays(data)
    return ArrayDataset(x, y, info.num_classes, info.image_shape, info.feature_range)


class CentralEvaluation:
    """``evaluate_fn`` for RobustRun: the task's evaluation on the held-out split (and the backdoor's success).

    Parameters
    ----------
    task : Task
        The run's task.
    run_config : dict
        Passed to ``build_model``.
    test : Dataset
        The server's held-out split, as the task returned it.
    triggered : ArrayDataset | None
        Test inputs carrying a backdoor trigger, labelled with its target: their accuracy is
        the attack's success rate (``backdoor-asr``).
    """

    def __init__(self, task: Task, run_config: dict, test, triggered: ArrayDataset | None) -> None:
        self.task = task
        self.test = test
        self.triggered = triggered
        # One model, reloaded each round: building (and initialising) a large one every round costs.
        self.model = task.build_model(run_config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_arrays(self.model, arrays)
        metrics = self.task.evaluate(self.model, self.test, self.device)
        out = MetricRecord({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        if self.triggered is not None:
            out["backdoor-asr"] = float(self.task.evaluate(self.model, self.triggered, self.device)["accuracy"])
        return out


def run_server(grid: Grid, settings: RunSettings) -> dict:
    """Run every round, evaluating centrally after each; return the summary written to disk."""
    task = load_task(settings.task)
    run_config = settings.to_run_config()
    raw_test = task.load_test(run_config)
    test = _as_array_dataset(task, raw_test)
    attack = simulated_attack(settings.attack, settings.attack_params, num_clients=settings.num_clients,
                              num_malicious=settings.num_malicious, seed=settings.seed,
                              start_round=settings.attack_start_round)
    triggered = _triggered_testset(attack, test)
    torch.manual_seed(settings.seed)
    model = task.build_model(run_config)
    strategy = build_strategy(settings, attack, dtypes_of(model))
    # The task's own evaluate gets its own dataset; the arrays serve the backdoor's triggered copy.
    evaluation = CentralEvaluation(task, run_config, raw_test, triggered)
    effective = {"lr": task.effective_config(run_config)["lr"]}
    run = RobustRun(strategy, settings.out_dir, config=run_config, resume=settings.resume,
                    on_round=lambda record: _print_row(record, strategy.epsilon()),
                    summary_extra=lambda records: _simulation_summary(attack, records) | {"effective_config": effective},
                    audit_key=settings.audit_key or None, audit_anchor=settings.audit_anchor or None,
                    rollback_rounds=settings.rollback_rounds, checkpoints=settings.checkpoints,
                    report=settings.report)
    _print_header(settings, task)
    run.start(grid, to_arrays(model), num_rounds=settings.rounds, timeout=ROUND_TIMEOUT, evaluate_fn=evaluation)
    summary = run.summary()
    if summary["stopped_early"]:
        print(summary["stopped_early"], flush=True)
    if run.records:
        final = summary["final_accuracy"]
        final_text = "n/a" if final is None else f"{final:.4f}"
        print(f"final accuracy {final_text}  best {summary['best_accuracy'] or 0:.4f}  -> {settings.out_dir}",
              flush=True)
    else:
        print(f"no round ran -> {settings.out_dir}", flush=True)
    return summary


def _triggered_testset(attack: SimulatedAttack | None, test: ArrayDataset) -> ArrayDataset | None:
    if attack is None or not hasattr(attack.attack, "triggered_testset"):
        return None
    triggered = attack.attack.triggered_testset(test.x, test.y, image_shape=test.image_shape)
    return None if triggered is None else test.with_arrays(*triggered)


def _simulation_summary(attack: SimulatedAttack | None, records: list[dict]) -> dict:
    """What only a simulation knows: who the attackers were, and how well they were detected."""
    malicious = sorted(attack.malicious_nodes) if attack is not None else []
    detection = None
    if attack is not None and not getattr(attack.attack, "targets_honest", False):
        detection = detection_quality(records, set(malicious))
    return {"malicious_nodes": malicious, "detection": detection}


def _print_header(settings: RunSettings, task: Task) -> None:
    attack = f"attack {settings.attack}" if settings.attack_enabled else "no attack"
    print(f"\nPhalanx: task {task.name} ({settings.dataset}), {settings.num_clients} clients "
          f"({settings.num_malicious} malicious, {attack}), aggregator {settings.aggregator} "
          f"(f={settings.num_byzantine}), {settings.rounds} rounds", flush=True)
    print(f"{'round':>5} {'accuracy':>8} {'loss':>8} {'accepted':>8} {'rejected':>8} {'flagged':>8} "
          f"{'epsilon':>8} {'seconds':>7}", flush=True)


def _number(value, width: int, digits: int = 4) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _print_row(record: dict, epsilon: float | None) -> None:
    eps = "-" if epsilon is None else f"{epsilon:.3f}"
    print(f"{record['round']:>5} {_number(record.get('accuracy'), 8)} {_number(record.get('loss'), 8)} "
          f"{len(record.get('accepted', [])):>8} {len(record.get('rejected', {})):>8} "
          f"{len(record.get('flagged', [])):>8} {eps:>8} {record['seconds']:>7.2f}", flush=True, file=sys.stdout)
