"""The Phalanx ServerApp: robust rounds, central evaluation, monitoring, audit and checkpoints."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from client.data import Dataset, server_test_split
from client.model import build_model
from client.train import evaluate
from server.audit import AuditLog
from server.checkpoint import load_checkpoint, save_checkpoint
from server.hooks import SimulatedAttack, simulated_attack
from server.monitor import TrainingMonitor
from server.params import ParamSpec, arrays_to_vector, vector_to_arrays
from server.report import write_report
from server.scoring import detection_quality, write_scores_csv
from server.settings import RunSettings
from server.strategy import PrivacySettings, RobustStrategy

app = ServerApp()

#: Seconds the server waits for the replies of one round.
ROUND_TIMEOUT = 600.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds the run config asks for; write the run directory."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    run_server(grid, settings)


@dataclass
class RunFiles:
    """The files of a run directory."""

    root: Path

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def scores(self) -> Path:
        return self.root / "scores.csv"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.root / "model.pt"


def build_strategy(settings: RunSettings, attack: SimulatedAttack | None) -> RobustStrategy:
    """The strategy a run config describes."""
    privacy = PrivacySettings(
        mode=settings.dp,
        clip_norm=settings.clip_norm,
        noise_multiplier=settings.noise_multiplier,
        delta=settings.delta,
        adaptive=settings.adaptive_clip,
        target_epsilon=settings.target_epsilon if settings.target_epsilon > 0 else math.inf,
    )
    return RobustStrategy(
        settings.aggregator,
        settings.num_byzantine,
        pre_aggregation=settings.pre_aggregation_list,
        fraction_train=settings.fraction_train,
        min_train_nodes=1,
        min_available_nodes=settings.num_clients,
        min_replies=settings.min_replies,
        max_update_norm=settings.update_norm_bound,
        max_num_examples=settings.max_num_examples,
        policy=settings.policy,
        flag_threshold=settings.flag_threshold,
        privacy=privacy,
        seed=settings.seed,
        interceptor=attack.intercept if attack is not None else None,
    )


def run_server(grid: Grid, settings: RunSettings) -> dict:
    """Run every round, evaluating centrally after each; return the summary written to disk."""
    started = time.time()
    files = RunFiles(settings.out_dir)
    files.root.mkdir(parents=True, exist_ok=True)
    test = server_test_split(settings.dataset)
    attack = simulated_attack(settings.attack, settings.attack_params, num_clients=settings.num_clients,
                              num_malicious=settings.num_malicious, seed=settings.seed,
                              start_round=settings.attack_start_round)
    triggered = _triggered_testset(attack, test)
    strategy = build_strategy(settings, attack)
    monitor = TrainingMonitor()

    torch.manual_seed(settings.seed)
    model = build_model(test.num_features, test.num_classes)
    arrays = ArrayRecord(model.state_dict())
    spec = ParamSpec.of(arrays)
    rounds: list[dict] = []
    first_round = 1
    checkpoint = load_checkpoint(files.checkpoint) if settings.resume else None
    if checkpoint is None:
        audit = AuditLog(files.audit)
    else:
        # Records written after the checkpoint (a round that did not finish saving) are dropped.
        audit = AuditLog.open_at(files.audit, length=checkpoint["audit_length"], head=checkpoint["audit_head"])
        if checkpoint["config_hash"] != settings.config_hash():
            raise ValueError(f"{files.checkpoint} was written by a run with other settings; cannot resume it")
        arrays = vector_to_arrays(checkpoint["global"], spec)
        strategy.load_state_dict(checkpoint["strategy"])
        monitor.load_state_dict(checkpoint["monitor"])
        rounds = checkpoint["rounds"]
        first_round = checkpoint["round"] + 1
        log(INFO, "Resuming from %s after round %d", files.checkpoint, checkpoint["round"])

    strategy.summary()
    _print_header(settings)
    stopped_early = None
    for server_round in range(first_round, settings.rounds + 1):
        if strategy.next_round_exceeds_budget():
            stopped_early = (f"stopped before round {server_round}: it would spend more than target-epsilon "
                             f"{settings.target_epsilon} (spent {strategy.epsilon():.3f})")
            log(WARNING, stopped_early)
            print(stopped_early, flush=True)
            break
        round_started = time.perf_counter()
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = grid.send_and_receive(messages=messages, timeout=ROUND_TIMEOUT)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        record = dict(strategy.last_record or {"round": server_round})
        record.update(_evaluate(arrays, test, triggered))
        alerts = monitor.observe(server_round, record["loss"], record["accuracy"])
        record["alerts"] = alerts
        record["seconds"] = time.perf_counter() - round_started
        rounds.append(record)
        audit.append(_audit_record(settings, record))
        save_checkpoint(files.checkpoint, {
            "round": server_round,
            "config_hash": settings.config_hash(),
            "global": arrays_to_vector(arrays, spec),
            "strategy": strategy.state_dict(),
            "monitor": monitor.state_dict(),
            "audit_length": audit.length,
            "audit_head": audit.head,
            "rounds": rounds,
        })
        _print_row(record, strategy.epsilon())
        summary = _summary(settings, rounds, attack, strategy, monitor, started, stopped_early)
        _write_json(files.summary, summary)

    summary = _summary(settings, rounds, attack, strategy, monitor, started, stopped_early)
    _write_json(files.summary, summary)
    write_scores_csv(rounds, files.scores)
    write_report(files.root)
    torch.save(arrays.to_torch_state_dict(), files.model)
    if rounds:
        print(f"final accuracy {summary['final_accuracy']:.4f}  best {summary['best_accuracy']:.4f}  "
              f"-> {files.root}", flush=True)
    else:
        print(f"no round ran -> {files.root}", flush=True)
    return summary


def _triggered_testset(attack: SimulatedAttack | None, test: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    if attack is None or not hasattr(attack.attack, "triggered_testset"):
        return None
    return attack.attack.triggered_testset(test.x, test.y, image_shape=test.image_shape)


def _evaluate(arrays: ArrayRecord, test: Dataset, triggered: tuple[np.ndarray, np.ndarray] | None) -> dict:
    model = build_model(test.num_features, test.num_classes)
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cpu")
    loss, accuracy = evaluate(model, test.x, test.y, device)
    out = {"loss": loss, "accuracy": accuracy}
    if triggered is not None:
        out["backdoor_asr"] = evaluate(model, triggered[0], triggered[1], device)[1]
    return out


def _audit_record(settings: RunSettings, record: dict) -> dict:
    return {
        "round": record["round"],
        "config_hash": settings.config_hash(),
        "participants": record.get("sampled", []),
        "accepted_update_sha256": {n: record["update_sha256"][n] for n in map(str, record.get("accepted", []))
                                   if n in record.get("update_sha256", {})},
        "rejected": record.get("rejected", {}),
        "scores": record.get("scores", {}),
        "flagged": record.get("flagged", []),
        "excluded": record.get("excluded", []),
        "aggregate_sha256": record.get("aggregate_sha256"),
        "skipped": record.get("skipped", False),
        "client_reports": record.get("client_reports", {}),
        "accuracy": record["accuracy"],
        "loss": record["loss"],
        "alerts": record.get("alerts", []),
        "epsilon": _finite_or_none(record.get("epsilon")),
    }


def _finite_or_none(value: float | None) -> float | None:
    """Infinite epsilon (no noise) is recorded as None: the audit's canonical JSON has no infinity."""
    return value if value is not None and math.isfinite(value) else None


def _summary(settings: RunSettings, rounds: list[dict], attack: SimulatedAttack | None, strategy: RobustStrategy,
             monitor: TrainingMonitor, started: float, stopped_early: str | None) -> dict:
    accuracies = [r["accuracy"] for r in rounds]
    malicious = sorted(attack.malicious_nodes) if attack is not None else []
    keep = ("round", "accuracy", "loss", "accepted", "rejected", "scores", "flagged", "excluded", "selected",
            "reputation", "features", "skipped", "alerts", "epsilon", "backdoor_asr", "train_loss", "seconds",
            "aggregation_seconds", "client_reports", "noise_std", "clip_norm", "next_clip_norm", "null_clients",
            "skip_reason")
    detection = None
    if attack is not None and not getattr(attack.attack, "targets_honest", False):
        detection = detection_quality(rounds, set(malicious))
    epsilon = strategy.epsilon()
    return {
        "config": settings.to_run_config(),
        "final_accuracy": accuracies[-1] if accuracies else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "clean_accuracy": None,
        "backdoor_asr": rounds[-1].get("backdoor_asr") if rounds else None,
        "detection": detection,
        "privacy": None if settings.dp == "off" else {"epsilon": _finite_or_none(epsilon), "delta": settings.delta,
                                                      "mode": settings.dp},
        "wall_seconds": time.time() - started,
        "stopped_early": stopped_early,
        "malicious_nodes": malicious,
        "alerts": list(monitor.alerts),
        "rounds": [{k: r[k] for k in keep if k in r} for r in rounds],
    }


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, set):
        return sorted(value)
    return str(value)


def _print_header(settings: RunSettings) -> None:
    print(f"\nPhalanx: {settings.dataset}, {settings.num_clients} clients ({settings.num_malicious} malicious, "
          f"attack {settings.attack}), aggregator {settings.aggregator} (f={settings.num_byzantine}), "
          f"{settings.rounds} rounds", flush=True)
    print(f"{'round':>5} {'accuracy':>8} {'loss':>8} {'accepted':>8} {'rejected':>8} {'flagged':>8} "
          f"{'epsilon':>8} {'seconds':>7}", flush=True)


def _print_row(record: dict, epsilon: float | None) -> None:
    eps = "-" if epsilon is None else f"{epsilon:.3f}"
    print(f"{record['round']:>5} {record['accuracy']:>8.4f} {record['loss']:>8.4f} {len(record.get('accepted', [])):>8} "
          f"{len(record.get('rejected', {})):>8} {len(record.get('flagged', [])):>8} {eps:>8} "
          f"{record['seconds']:>7.2f}", flush=True, file=sys.stdout)
