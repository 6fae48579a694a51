"""The run configuration, parsed and checked once, before any client trains.

Every key lives in ``[tool.flwr.app.config]`` of pyproject.toml with its default; ``flwr run
--run-config`` and ``python -m simulations run --key value`` override them. Keys are dash-case
there and snake_case here. Both apps read it (the ServerApp all of it, the ClientApp what
concerns training), so it lives on the client side of the dependency line.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: Names accepted by the ``dp`` key.
DP_MODES = ("off", "central", "client")
#: Names accepted by the ``policy`` key.
POLICIES = ("flag", "exclude", "quarantine", "trust-weighted")
#: Names accepted by the ``data-audit`` key.
DATA_AUDIT_POLICIES = ("off", "report", "drop", "drop-and-review")
#: Names accepted by the ``server-optimizer`` key.
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")
#: Names accepted by the ``partitioner`` key (``auto``: IID when ``alpha`` is 0, else Dirichlet).
PARTITIONERS = ("auto", "iid", "dirichlet", "pathological", "shard")


@dataclass(frozen=True)
class RunSettings:
    """One run's settings (see the README's table of run-config keys)."""

    task: str = "digits-mlp"
    dataset: str = "auto"
    partitioner: str = "auto"
    classes_per_partition: int = 2
    num_clients: int = 10
    num_malicious: int = 0
    attack: str = "none"
    attack_params: str = ""
    attack_start_round: int = 1
    allow_attacks_outside_simulation: bool = False
    aggregator: str = "median"
    num_byzantine: int = 2
    pre_aggregation: str = "flame"
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.5
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    rounds: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    local_epochs: int = 2
    lr: float = 0.0
    batch_size: int = 16
    amp: bool = False
    alpha: float = 0.0
    seed: int = 0
    dp: str = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    adaptive_clip: bool = False
    target_epsilon: float = 0.0
    policy: str = "flag"
    flag_threshold: float = 0.5
    min_replies: int = 1
    rollback_rounds: int = 0
    max_update_norm: float = 0.0
    max_num_examples: int = 100_000
    data_audit: str = "off"
    data_dir: str = ""
    data_public_key: str = ""
    require_signed_data: bool = False
    data_dataset_id: str = ""
    data_min_version: int = 0
    audit_key: str = ""
    audit_anchor: str = ""
    checkpoints: bool = True
    report: bool = True
    resume: bool = False
    out: str = "runs/latest"

    def __post_init__(self) -> None:
        problems = []
        if not self.task.strip():
            problems.append("task must name a built-in task or 'package.module[:attr]'")
        if self.num_clients < 1:
            problems.append(f"num-clients must be >= 1, got {self.num_clients}")
        if not 0 <= self.num_malicious <= self.num_clients:
            problems.append(f"num-malicious must be in [0, num-clients={self.num_clients}], got {self.num_malicious}")
        if self.attack not in ("", "none") and self.num_malicious < 1:
            problems.append(f"attack {self.attack!r} needs num-malicious >= 1 (the clients that attack), got 0")
        if self.attack_start_round < 1:
            problems.append(f"attack-start-round must be >= 1, got {self.attack_start_round}")
        if self.num_byzantine < 0:
            problems.append(f"num-byzantine must be >= 0, got {self.num_byzantine}")
        if self.rounds < 1:
            problems.append(f"rounds must be >= 1, got {self.rounds}")
        if not 0 < self.fraction_train <= 1:
            problems.append(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            problems.append(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if self.local_epochs < 1 or self.batch_size < 1:
            problems.append("local-epochs and batch-size must be positive")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            problems.append(f"lr must be a finite number >= 0 (0 = the task's default), got {self.lr}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            problems.append(f"alpha must be >= 0 (0 = IID), got {self.alpha}")
        if self.partitioner not in PARTITIONERS:
            problems.append(f"partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}")
        if self.partitioner == "dirichlet" and not self.alpha > 0:
            problems.append("partitioner 'dirichlet' needs alpha > 0")
        if self.classes_per_partition < 1:
            problems.append(f"classes-per-partition must be >= 1, got {self.classes_per_partition}")
        if self.dp not in DP_MODES:
            problems.append(f"dp must be one of {DP_MODES}, got {self.dp!r}")
        if self.dp != "off" and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            problems.append(f"clip-norm must be a finite number > 0 with dp={self.dp}, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            problems.append(f"noise-multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            problems.append(f"target-epsilon must be a finite number >= 0 (0 = no budget), got {self.target_epsilon}")
        if self.policy not in POLICIES:
            problems.append(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not (math.isfinite(self.flag_threshold) and 0 < self.flag_threshold <= 1):
            problems.append(f"flag-threshold must be in (0, 1], got {self.flag_threshold}")
        if self.min_replies < 1:
            problems.append(f"min-replies must be >= 1, got {self.min_replies}")
        if self.rollback_rounds < 0:
            problems.append(f"rollback-rounds must be >= 0 (0 = no rollback), got {self.rollback_rounds}")
        if self.data_audit not in DATA_AUDIT_POLICIES:
            problems.append(f"data-audit must be one of {DATA_AUDIT_POLICIES}, got {self.data_audit!r}")
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            problems.append(f"max-update-norm must be a finite number >= 0 (0 = no bound), got {self.max_update_norm}")
        if self.max_num_examples < 1:
            problems.append(f"max-num-examples must be >= 1, got {self.max_num_examples}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            problems.append(f"server-optimizer must be one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            problems.append(f"server-lr must be a finite number > 0, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            problems.append(f"server-momentum must be in [0, 1), got {self.server_momentum}")
        if self.data_min_version < 0:
            problems.append(f"data-min-version must be >= 0 (0 = any), got {self.data_min_version}")
        if self.resume and not self.checkpoints:
            problems.append("resume=true needs checkpoints=true (there is nothing to resume from)")
        if self.require_signed_data and not self.data_public_key:
            problems.append("require-signed-data needs data-public-key (the data owner's Ed25519 public key)")
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Build from Flower's ``context.run_config`` (dash-case keys); unknown keys are refused."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; known: {sorted(known)}")
        values = {}
        for key, value in run_config.items():
            field = known[key]
            values[field.name] = _coerce(key, value, field.type)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The dash-case mapping Flower expects."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def pre_aggregation_list(self) -> list[str]:
        """``pre-aggregation`` split on commas."""
        return [p.strip() for p in self.pre_aggregation.split(",") if p.strip()]

    @property
    def update_norm_bound(self) -> float:
        """``max-update-norm`` as a bound (0 means none)."""
        return self.max_update_norm if self.max_update_norm > 0 else math.inf

    @property
    def out_dir(self) -> Path:
        """Where the run writes summary.json, audit.jsonl, scores.csv and checkpoints."""
        return Path(self.out).expanduser().resolve()

    @property
    def attack_enabled(self) -> bool:
        """The config names a simulated attack."""
        return self.attack not in ("", "none")

    def config_hash(self) -> str:
        """SHA-256 of the settings that identify the run: every key but ``resume``, ``rounds``,
        ``report`` and ``checkpoints``.

        ``out`` is included (as the resolved directory), so a checkpoint copied from another
        run directory is refused even when every other setting matches; ``rounds`` is not, so a
        resumed run may go on for more rounds.
        """
        relevant = {k: v for k, v in asdict(self).items() if k not in ("resume", "rounds", "report", "checkpoints")}
        relevant["out"] = str(self.out_dir)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, type) else {"int": int, "float": float, "bool": bool, "str": str}[annotation]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int:
            if float(value) != int(float(value)):
                raise ValueError(value)
            return int(float(value))
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run-config key {key!r}: cannot read {value!r} as {kind.__name__}") from exc
