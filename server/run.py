"""RobustRun: the round loop with Phalanx's evidence, for Phalanx's ServerApp and for yours.

``RobustRun(strategy, out_dir).start(grid, initial_arrays, num_rounds, evaluate_fn=...)`` runs
Flower's round loop (train, federated evaluation, central evaluation, as
``flwr.serverapp.strategy.Strategy.start`` does, same arguments, same ``Result``) and around it
keeps what a run facing poisoned clients must leave behind, in ``out_dir``:

``audit.jsonl``
    One hash-chained record per round (:mod:`server.audit`): participants, each accepted
    update's SHA-256, rejections with reasons, scores, flags, the aggregate's SHA-256, central
    metrics, alerts, the clients' data provenance, the run's identity.
``checkpoint.pt``
    After every round, atomically: the global model, the strategy's state (reputation, rule and
    DP state, RNG), the monitor, the records and the audit head. ``resume=True`` continues a
    killed run from it.
``records.jsonl``
    One strict-JSON line per round, appended and fsync'd before the checkpoint: the round's full
    record, the strategy's record of it and the round's Flower ``Result`` metrics. The checkpoint
    only counts these lines, so what a round writes does not grow with the rounds already done.
``summary.json``
    Strict JSON (no NaN): ``config``, final and best accuracy, per-round records, alerts.
``scores.csv``, ``report.html``, ``model.pt``
    Per-client anomaly scores, the human-readable review report, the final ``state_dict``.

Safeguards in the loop itself:

* the **training monitor** (:class:`server.monitor.TrainingMonitor`) watches the central
  ``loss`` and ``accuracy`` and raises alerts (log, summary, audit, report);
* a round whose central metrics turn **non-finite** is not kept: the metrics are recorded as
  null, the monitor alerts, and the global model and the rule's state go back to what they
  were before the round (``reverted`` in the record); reputation and privacy spent are kept;
* **rollback** (``rollback_rounds = k > 0``): when the monitor alerts in round r, the global
  model and the rule's and optimizer's state go back to the end of round r - k (kept in
  memory, and in the checkpoint), the nodes flagged in the undone rounds r - k + 1 .. r are
  quarantined for ``quarantine_rounds`` rounds under any policy, the restored model is
  evaluated again, and training goes on. The rollback is in the round's record, the audit
  chain, ``summary.json`` (``rollbacks``) and the report;
* a **DP budget** (``target_epsilon``) stops training cleanly before the round that would
  exceed it;
* **resume** refuses a checkpoint of another run (its identity: a run id drawn at the start and
  the hash of the config, the run directory included) and never truncates the audit log by
  more than one trailing record (the round written after the last checkpoint, or a torn
  line); a missing checkpoint beside an existing log is refused, naming both files. Starting
  afresh in a directory that holds an earlier run moves that run's files into
  ``previous-runs/<time>/`` first: nothing is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from server.audit import AuditAnchor, AuditLog, anchor_from_spec, canonical_json, load_signing_key
from server.checkpoint import load_checkpoint, save_checkpoint
from server.monitor import TrainingMonitor
from server.params import ParamSpec, arrays_to_vector, other_entries, vector_to_arrays
from server.report import write_report
from server.scoring import write_scores_csv
from server.strategy import RobustStrategy

#: Version of the checkpoint layout written by :class:`RobustRun` (3: the per-round records live
#: in ``records.jsonl``; a format 2 checkpoint, which holds them itself, is still resumed).
CHECKPOINT_FORMAT = 3
#: Checkpoint formats a run can resume from.
READABLE_CHECKPOINT_FORMATS = (2, 3)
#: The Flower ``Result`` histories kept per round.
RESULT_HISTORIES = ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")
#: Record keys copied into summary.json's ``rounds``.
SUMMARY_ROUND_KEYS = (
    "round", "accuracy", "loss", "accepted", "rejected", "scores", "flagged", "excluded", "selected", "reputation",
    "features", "skipped", "alerts", "epsilon", "backdoor_asr", "train_loss", "seconds", "aggregation_seconds",
    "client_reports", "noise_std", "clip_norm", "next_clip_norm", "null_clients", "skip_reason", "reverted",
    "central_metrics", "federated_evaluation", "shared_manifests", "rollback", "discarded_metrics",
)
#: Config keys that do not change what a run computes, left out of its identity: a resumed run may
#: extend its rounds, or skip the report.
NOT_IDENTITY = ("resume", "rounds", "report", "checkpoints")
#: Files of a run, moved aside together when a fresh run starts in the same directory.
RUN_FILES = ("audit.jsonl", "records.jsonl", "checkpoint.pt", "summary.json", "scores.csv", "report.html", "model.pt")


class RunStateError(RuntimeError):
    """The run directory does not hold a state this run may continue or overwrite."""


class RunFiles:
    """The files of a run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    summary = property(lambda self: self.root / "summary.json")
    audit = property(lambda self: self.root / "audit.jsonl")
    scores = property(lambda self: self.root / "scores.csv")
    checkpoint = property(lambda self: self.root / "checkpoint.pt")
    records = property(lambda self: self.root / "records.jsonl")
    model = property(lambda self: self.root / "model.pt")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None and NumPy scalars as Python numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (np.floating, np.integer)):
        return strict_json(value.item())
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else value
        return [strict_json(v) for v in items]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return strict_json(value.item())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_json(path: Path, payload: Any) -> None:
    """Write strict JSON atomically (temp file, rename): a parser that refuses NaN reads it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(strict_json(payload), indent=2, allow_nan=False))
    tmp.replace(path)


def read_run_records(root: str | Path, limit: int | None = None) -> list[dict]:
    """The per-round lines of a run directory's ``records.jsonl`` (each ``{"round", "record",
    "strategy", "result"}``), at most ``limit``; a torn last line is left out."""
    path = Path(root) / "records.jsonl"
    out: list[dict] = []
    if not path.exists():
        return out
    with open(path, "rb") as handle:
        for raw in handle:
            if limit is not None and len(out) >= limit:
                break
            if not raw.endswith(b"\n"):
                break
            out.append(json.loads(raw))
    return out


def _append_line(path: Path, payload: Any) -> None:
    """One strict-JSON line appended to ``path``, flushed and fsync'd."""
    line = json.dumps(strict_json(payload), allow_nan=False, separators=(",", ":")) + "\n"
    with open(path, "ab") as handle:
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _truncate_lines(path: Path, keep: int) -> None:
    """Cut ``path`` after its first ``keep`` lines (a record written after the last checkpoint)."""
    if not path.exists():
        return
    size = 0
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            if index >= keep or not raw.endswith(b"\n"):
                break
            size += len(raw)
    if path.stat().st_size != size:
        with open(path, "r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _count_log_records(path: Path) -> tuple[int, bool]:
    """(records in the file counting a torn last line as one, whether the last line is torn)."""
    if not path.exists():
        return 0, False
    data = path.read_bytes()
    if not data:
        return 0, False
    torn = not data.endswith(b"\n")
    return data.count(b"\n") + (1 if torn else 0), torn


class RobustRun:
    """Runs a :class:`~server.strategy.RobustStrategy` round by round and keeps the run's evidence.

    Parameters
    ----------
    strategy : RobustStrategy
        The strategy (its ``configure_*`` / ``aggregate_*`` methods drive each round).
    out_dir : str | Path | None
        The run directory; None keeps everything in memory (no files), which is what
        ``RobustStrategy.start`` uses.
    config : Mapping | None
        The run's settings, recorded in summary.json and hashed into the run's identity (a
        checkpoint written under another config is refused on resume).
    resume : bool
        Continue from ``out_dir/checkpoint.pt``.
    monitor : TrainingMonitor | None
        The training monitor (a default one when None).
    metric_keys : tuple[str, str]
        The central-evaluation metric names the monitor watches (loss, accuracy).
    on_round : Callable[[dict], None] | None
        Called with each finished round's record (Phalanx's ServerApp prints its table row).
    summary_extra : Callable[[list[dict]], dict] | None
        Adds keys to summary.json from the round records (simulations add detection quality).
    audit_key : Ed25519PrivateKey | str | Path | None
        Signs every audit record (a path is loaded with :func:`server.audit.load_signing_key`,
        which refuses a key inside the run directory or readable by others).
    audit_anchor : AuditAnchor | str | None
        Where each round's head is published outside the run directory: a file path, or
        ``"command:ARGV"`` (:func:`server.audit.anchor_from_spec`). A failure to publish stops
        the run: the record is in the log, and resuming publishes the head again.
    rollback_rounds : int
        Rounds a monitor alert undoes (0: no rollback; see the module docstring).
    checkpoints : bool
        Write ``checkpoint.pt`` after every round (what ``resume`` continues from). A sweep cell,
        which is rerun whole, can do without: the audit log is still written every round.
    report : bool
        Write ``report.html`` at the end (its figures take about a second).
    quarantine_rounds : int
        Rounds the nodes flagged in undone rounds are kept out after a rollback.
    """

    def __init__(
        self,
        strategy: RobustStrategy,
        out_dir: str | Path | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        resume: bool = False,
        monitor: TrainingMonitor | None = None,
        metric_keys: tuple[str, str] = ("loss", "accuracy"),
        on_round: Callable[[dict], None] | None = None,
        summary_extra: Callable[[list[dict]], dict] | None = None,
        audit_key: Any = None,
        audit_anchor: Any = None,
        rollback_rounds: int = 0,
        quarantine_rounds: int = 3,
        checkpoints: bool = True,
        report: bool = True,
    ) -> None:
        if rollback_rounds < 0 or quarantine_rounds < 1:
            raise ValueError(f"rollback_rounds must be >= 0 and quarantine_rounds >= 1, got {rollback_rounds} "
                             f"and {quarantine_rounds}")
        self.strategy = strategy
        self.files = RunFiles(out_dir) if out_dir is not None else None
        self.config = dict(config or {})
        self.resume = bool(resume)
        self.monitor = monitor or TrainingMonitor()
        self.metric_keys = metric_keys
        self.on_round = on_round
        self.summary_extra = summary_extra
        self.audit_key = audit_key
        self.audit_anchor = audit_anchor
        self.records: list[dict] = []
        self.run_id = secrets.token_hex(16)
        self.stopped_early: str | None = None
        self.initial_evaluation: dict | None = None
        self.started = time.time()
        self.audit: AuditLog | None = None
        self.checkpoints = bool(checkpoints)
        self.report = bool(report)
        if resume and not checkpoints:
            raise ValueError("resume needs checkpoints: there is nothing to resume from")
        self.rollback_rounds = int(rollback_rounds)
        self.quarantine_rounds = int(quarantine_rounds)
        self.rollbacks: list[dict] = []
        # round -> (global arrays, strategy.model_state(), central metrics) at the end of that round.
        self._snapshots: dict[int, tuple[ArrayRecord, dict, dict | None]] = {}
        self._result = Result()
        # How much of strategy.history is in records.jsonl; seconds per file of the last _persist.
        self._history_written = 0
        self.persist_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ identity
    def config_hash(self) -> str:
        """SHA-256 of the config and the run directory: what a resumed checkpoint must match.

        ``resume`` and ``rounds`` are left out: a resumed run may go on for more rounds.
        """
        identity = {k: v for k, v in self.config.items() if k not in NOT_IDENTITY}
        identity["out"] = str(self.files.root) if self.files is not None else None
        return hashlib.sha256(canonical_json(strict_json(identity)).encode()).hexdigest()

    # ------------------------------------------------------------------ the loop
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run (or continue) the rounds; arguments and result as Flower's ``Strategy.start``."""
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        arrays = initial_arrays
        first_round = 1
        self._num_rounds = num_rounds
        checkpoint = self._open(initial_arrays)
        if checkpoint is not None:
            arrays, first_round = self._restore(checkpoint, initial_arrays)
        elif evaluate_fn is not None:
            initial = evaluate_fn(0, arrays)
            if initial is not None:
                self._result.evaluate_metrics_serverapp[0] = initial
                self.initial_evaluation = strict_json(dict(initial))
        if checkpoint is None:
            self._snapshot(0, arrays, self.initial_evaluation)
        self.strategy.summary()

        try:
            for server_round in range(first_round, num_rounds + 1):
                if self.strategy.next_round_exceeds_budget():
                    self.stopped_early = (f"stopped before round {server_round}: it would spend more than "
                                          f"target-epsilon {self.strategy.privacy.target_epsilon} "
                                          f"(spent {self.strategy.epsilon():.3f})")
                    log(WARNING, self.stopped_early)
                    break
                arrays = self._round(grid, server_round, arrays, timeout, train_config, evaluate_config, evaluate_fn)
        except BaseException:
            if self.files is not None:  # what ran so far stays readable (the checkpoint has it too)
                write_json(self.files.summary, self.summary())
            raise
        self._result.arrays = arrays
        self._finish(arrays)
        return self._result

    def _round(self, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float,
               train_config: ConfigRecord | None, evaluate_config: ConfigRecord | None,
               evaluate_fn: Callable | None) -> ArrayRecord:
        started = time.perf_counter()
        log(INFO, "[ROUND %d/%d]", server_round, self._num_rounds)
        before_arrays, before_state = arrays, self.strategy.model_state()
        messages = self.strategy.configure_train(server_round, arrays, _copy_config(train_config), grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        if train_metrics is not None:
            self._result.train_metrics_clientapp[server_round] = train_metrics
        record = dict(self.strategy.last_record or {"round": server_round})

        evaluate_messages = list(self.strategy.configure_evaluate(server_round, arrays, _copy_config(evaluate_config),
                                                                  grid))
        if evaluate_messages:
            evaluate_replies = grid.send_and_receive(messages=evaluate_messages, timeout=timeout)
            federated = self.strategy.aggregate_evaluate(server_round, evaluate_replies)
            if federated is not None:
                self._result.evaluate_metrics_clientapp[server_round] = federated
            record["federated_evaluation"] = strict_json(self.strategy.last_evaluate_record or {})

        central = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
        loss_key, accuracy_key = self.metric_keys
        loss = accuracy = None
        if central is not None:
            values = dict(central)
            broken = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
            loss, accuracy = values.get(loss_key), values.get(accuracy_key)
            kept = values
            if broken:
                # The update that made the model non-finite is not kept: back to the round's start,
                # and the record describes the model that is kept (the discarded one's metrics stay
                # as evidence).
                record["reverted"] = (f"central {', '.join(broken)} non-finite after aggregation: the round's update "
                                      "was discarded and the global model restored")
                log(WARNING, "round %d: %s", server_round, record["reverted"])
                arrays = before_arrays
                self.strategy.load_model_state(before_state)
                record["discarded_metrics"] = strict_json(values)
                restored = evaluate_fn(server_round, arrays)
                kept = dict(restored) if restored is not None else {}
            if kept:
                self._result.evaluate_metrics_serverapp[server_round] = MetricRecord(kept)
            record["central_metrics"] = strict_json(kept)
            for key, value in kept.items():
                record[key.replace("-", "_")] = value if _finite(value) else None
        alerts = self.monitor.observe(server_round, loss if isinstance(loss, (int, float)) else None,
                                      accuracy if isinstance(accuracy, (int, float)) else None)
        for alert in alerts:
            log(WARNING, "monitor: %s", alert)
        record["alerts"] = alerts
        if "reverted" in record:  # the monitor alerted on the discarded model; its history holds the kept one
            self.monitor.amend(server_round, record.get(loss_key), record.get(accuracy_key))
        if alerts and self.rollback_rounds and "reverted" not in record:
            arrays = self._roll_back(server_round, record, evaluate_fn)
        self._snapshot(server_round, arrays, record.get("central_metrics"))
        record["seconds"] = time.perf_counter() - started
        self.records.append(record)
        if self.files is not None:
            self._persist(server_round, arrays, record)
        if self.on_round is not None:
            self.on_round(record)
        return arrays

    # ------------------------------------------------------------------ rollback
    def _snapshot(self, server_round: int, arrays: ArrayRecord, metrics: dict | None) -> None:
        if not self.rollback_rounds:
            return
        self._snapshots[server_round] = (arrays, self.strategy.model_state(), metrics)
        for old in [r for r in self._snapshots if r < server_round - self.rollback_rounds]:
            del self._snapshots[old]

    def _roll_back(self, server_round: int, record: dict, evaluate_fn: Callable | None) -> ArrayRecord:
        """Undo the last ``rollback_rounds`` rounds after an alert; quarantine who was flagged in them."""
        target = max(min(self._snapshots), server_round - self.rollback_rounds)
        arrays, model_state, _ = self._snapshots[target]
        undone = list(range(target + 1, server_round + 1))
        flagged = set(record.get("flagged", []))
        for earlier in self.records:
            if earlier["round"] in undone:
                flagged.update(earlier.get("flagged", []))
        quarantine = (server_round + 1, server_round + self.quarantine_rounds)
        for node in sorted(flagged):
            self.strategy.reputation.force_quarantine(node, *quarantine)
        self.strategy.load_model_state(model_state)
        rollback = {"round": server_round, "restored_round": target, "undone_rounds": undone,
                    "quarantined": sorted(int(n) for n in flagged), "quarantine_rounds": list(quarantine),
                    "alerts": list(record["alerts"])}
        if evaluate_fn is not None:  # the record describes the model that is kept
            restored = evaluate_fn(server_round, arrays)
            if restored is not None:
                values = dict(restored)
                rollback["discarded_metrics"] = record.get("central_metrics")
                record["central_metrics"] = strict_json(values)
                for key, value in values.items():
                    record[key.replace("-", "_")] = value if _finite(value) else None
                self._result.evaluate_metrics_serverapp[server_round] = restored
                loss_key, accuracy_key = self.metric_keys
                self.monitor.amend(server_round, values.get(loss_key), values.get(accuracy_key))
        record["rollback"] = strict_json(rollback)
        self.rollbacks.append(record["rollback"])
        log(WARNING, "round %d: rolled back to the model of round %d; quarantined %s for rounds %d-%d",
            server_round, target, rollback["quarantined"] or "nobody", *quarantine)
        return arrays

    # ------------------------------------------------------------------ files
    def _open(self, initial_arrays: ArrayRecord) -> dict | None:
        """Prepare the run directory; return the checkpoint to continue from, if any."""
        if self.files is None:
            if self.resume:
                raise RunStateError("resume needs a run directory (out_dir)")
            return None
        root = self.files.root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # scores, provenance and the model are nobody else's business
        self._audit_options = self._resolve_audit_options()
        audit_records, _ = _count_log_records(self.files.audit)
        checkpoint = load_checkpoint(self.files.checkpoint) if self.resume else None
        if self.resume and checkpoint is None:
            if audit_records:
                raise RunStateError(
                    f"resume=true but {self.files.checkpoint} is missing while {self.files.audit} holds "
                    f"{audit_records} records: refusing to start over (that would discard the log). Restore the "
                    "checkpoint, or start a fresh run (resume=false: the old files are moved to previous-runs/)")
            log(INFO, "resume=true: no checkpoint in %s, starting a fresh run", root)
        if checkpoint is None:
            self._archive_previous_run()
            self.audit = self._audit_log(fresh=True)
            return None
        return checkpoint

    def _archive_previous_run(self) -> None:
        present = [name for name in RUN_FILES if (self.files.root / name).exists()]
        if not present:
            return
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.files.root / "previous-runs" / stamp
        target.mkdir(parents=True)
        for name in present:
            shutil.move(str(self.files.root / name), str(target / name))
        log(INFO, "an earlier run's files were moved to %s", target)

    def _audit_log(self, *, fresh: bool, length: int = 0, head: str | None = None) -> AuditLog:
        extra = self._audit_options
        if fresh:
            return AuditLog(self.files.audit, **extra)
        return AuditLog.open_at(self.files.audit, length=length, head=head, **extra)

    def _resolve_audit_options(self) -> dict[str, Any]:
        """The signing key and anchor, loaded and checked before anything in the directory changes."""
        extra: dict[str, Any] = {}
        if self.audit_key is not None:
            key = self.audit_key
            if isinstance(key, (str, Path)):
                key = load_signing_key(key, run_dir=self.files.root)
            extra["signing_key"] = key
        if self.audit_anchor is not None:
            anchor = self.audit_anchor
            extra["anchor"] = anchor if isinstance(anchor, AuditAnchor) else anchor_from_spec(str(anchor))
            if extra["anchor"] is not None:
                extra["anchor"].check_location(self.files.root)
        return extra

    def _restore(self, checkpoint: dict, initial_arrays: ArrayRecord) -> tuple[ArrayRecord, int]:
        files = self.files
        if checkpoint.get("format") not in READABLE_CHECKPOINT_FORMATS:
            raise RunStateError(f"{files.checkpoint} is not a checkpoint of this Phalanx version "
                                f"(format {checkpoint.get('format')!r}, expected {CHECKPOINT_FORMAT})")
        if checkpoint["config_hash"] != self.config_hash():
            raise RunStateError(f"{files.checkpoint} was written by another run (different settings or run "
                                "directory); cannot resume it")
        length, head = int(checkpoint["audit_length"]), str(checkpoint["audit_head"])
        records, torn = _count_log_records(files.audit)
        if records < length:
            raise RunStateError(f"{files.audit} holds {records} records but {files.checkpoint} vouches for {length}: "
                                "the log was truncated")
        if records > length + 1:
            raise RunStateError(f"{files.audit} holds {records} records, {records - length} more than "
                                f"{files.checkpoint} vouches for ({length}): that checkpoint is older than the log "
                                "(restore the latest checkpoint); refusing to drop more than one trailing record")
        run_ids = {r.get("run_id") for r in _read_records(files.audit, length)}
        if run_ids and run_ids != {checkpoint["run_id"]}:
            raise RunStateError(f"{files.checkpoint} belongs to run {checkpoint['run_id']}, {files.audit} to "
                                f"{sorted(str(r) for r in run_ids)}")
        if records == length + 1:
            log(WARNING, "resume: dropping the %s last record of %s (written after the checkpoint)",
                "torn" if torn else "complete", files.audit)
        checkpoint = self._restore_records(checkpoint)
        self.audit = self._audit_log(fresh=False, length=length, head=head)
        self.run_id = checkpoint["run_id"]
        spec = ParamSpec.of(initial_arrays, self.strategy.model_dtypes)
        arrays = vector_to_arrays(checkpoint["global"], spec, {k: v.numpy() for k, v in checkpoint["others"].items()})
        self.strategy.load_state_dict(checkpoint["strategy"])
        self._history_written = len(self.strategy.history)
        self.monitor.load_state_dict(checkpoint["monitor"])
        self.records = list(checkpoint["records"])
        self.initial_evaluation = checkpoint.get("initial_evaluation")
        self.rollbacks = list(checkpoint.get("rollbacks", []))
        for round_key, snap in checkpoint.get("snapshots", {}).items():
            snap_arrays = vector_to_arrays(snap["global"], spec, {k: v.numpy() for k, v in snap["others"].items()})
            self._snapshots[int(round_key)] = (snap_arrays, snap["model_state"], snap["metrics"])
        self.started = time.time() - float(checkpoint.get("elapsed", 0.0))
        for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp"):
            history = getattr(self._result, name)
            for round_key, metrics in checkpoint["result"][name].items():
                history[int(round_key)] = MetricRecord(dict(metrics))
        log(INFO, "Resuming from %s after round %d", files.checkpoint, checkpoint["round"])
        return arrays, int(checkpoint["round"]) + 1

    def _restore_records(self, checkpoint: dict) -> dict:
        """The checkpoint with its rounds' records, strategy history and Result metrics filled in
        from records.jsonl (format 3), the file cut after the rounds it vouches for. A format 2
        checkpoint holds them itself: records.jsonl is then written from it, so later
        checkpoints can count on it."""
        files = self.files
        checkpoint = dict(checkpoint)
        if "records" in checkpoint:
            files.records.unlink(missing_ok=True)
            history = list(checkpoint["strategy"].get("history", []))
            for index, record in enumerate(checkpoint["records"]):
                r = str(record.get("round"))
                _append_line(files.records, {
                    "round": record.get("round"), "record": record, "strategy": history if index == 0 else [],
                    "result": {name: checkpoint["result"][name][r] for name in RESULT_HISTORIES
                               if r in checkpoint["result"].get(name, {})}})
            return checkpoint
        length = int(checkpoint["records_length"])
        lines = read_run_records(files.root, length)
        if len(lines) < length:
            raise RunStateError(f"{files.records} holds {len(lines)} complete records but {files.checkpoint} "
                                f"vouches for {length}: the file was truncated")
        _truncate_lines(files.records, length)
        checkpoint["records"] = [line["record"] for line in lines]
        checkpoint["strategy"] = dict(checkpoint["strategy"])
        checkpoint["strategy"]["history"] = [h for line in lines for h in line.get("strategy", [])]
        result = {name: dict(checkpoint["result"].get(name, {})) for name in RESULT_HISTORIES}
        for line in lines:
            for name, metrics in (line.get("result") or {}).items():
                result[name][str(line["round"])] = metrics
        checkpoint["result"] = result
        return checkpoint

    def _persist(self, server_round: int, arrays: ArrayRecord, record: dict) -> None:
        """The round's audit record, its line in records.jsonl, then the checkpoint.

        Nothing here grows with the rounds already done: the records are appended (the checkpoint
        counts them), summary.json and scores.csv are written at the end. ``persist_seconds``
        holds each file's seconds.
        """
        assert self.audit is not None
        timer = time.perf_counter()
        self.audit.append(self.audit_record(record))
        now = time.perf_counter()
        self.persist_seconds = {"audit": now - timer}
        if not self.checkpoints:
            return
        history = self.strategy.history[self._history_written:]
        _append_line(self.files.records, {
            "round": server_round, "record": record, "strategy": history,
            "result": {name: dict(getattr(self._result, name)[server_round]) for name in RESULT_HISTORIES
                       if server_round in getattr(self._result, name)},
        })
        self._history_written = len(self.strategy.history)
        timer, now = now, time.perf_counter()
        self.persist_seconds["records"] = now - timer
        spec = ParamSpec.of(arrays, self.strategy.model_dtypes)
        strategy_state = dict(self.strategy.state_dict())
        strategy_state["history"] = []  # in records.jsonl
        save_checkpoint(self.files.checkpoint, {
            "format": CHECKPOINT_FORMAT,
            "round": server_round,
            "run_id": self.run_id,
            "config_hash": self.config_hash(),
            "global": arrays_to_vector(arrays, spec),
            "others": {k: torch.from_numpy(np.array(v)) for k, v in other_entries(arrays, spec).items()},
            "strategy": strategy_state,
            "monitor": self.monitor.state_dict(),
            "audit_length": self.audit.length,
            "audit_head": self.audit.head,
            "records_length": len(self.records),
            "initial_evaluation": self.initial_evaluation,
            "elapsed": time.time() - self.started,
            "rollbacks": strict_json(self.rollbacks),
            "snapshots": {str(r): {"global": arrays_to_vector(a, spec),
                                   "others": {k: torch.from_numpy(np.array(v)) for k, v in other_entries(a, spec).items()},
                                   "model_state": state, "metrics": metrics}
                          for r, (a, state, metrics) in self._snapshots.items()},
            # Only what precedes round 1 (the initial evaluation); each round's are in records.jsonl.
            "result": {name: {str(r): strict_json(dict(m)) for r, m in getattr(self._result, name).items() if r < 1}
                       for name in RESULT_HISTORIES},
        })
        self.persist_seconds["checkpoint"] = time.perf_counter() - now

    def _finish(self, arrays: ArrayRecord) -> None:
        if self.files is None:
            return
        write_json(self.files.summary, self.summary())
        write_scores_csv(self.records, self.files.scores)
        if self.report:
            write_report(self.files.root)
        torch.save(arrays.to_torch_state_dict(), self.files.model)

    # ------------------------------------------------------------------ records
    def audit_record(self, record: dict) -> dict:
        """The audit chain's record of one round (strict JSON: non-finite values are null)."""
        return strict_json({
            "round": record["round"],
            "run_id": self.run_id,
            "config_hash": self.config_hash(),
            "participants": record.get("sampled", []),
            "accepted_update_sha256": {n: record["update_sha256"][n] for n in map(str, record.get("accepted", []))
                                       if n in record.get("update_sha256", {})},
            "rejected": record.get("rejected", {}),
            "scores": record.get("scores", {}),
            "flagged": record.get("flagged", []),
            "excluded": record.get("excluded", []),
            "aggregate_sha256": record.get("aggregate_sha256"),
            "skipped": record.get("skipped", False),
            "reverted": record.get("reverted"),
            "discarded_metrics": record.get("discarded_metrics"),
            "client_reports": record.get("client_reports", {}),
            "shared_manifests": record.get("shared_manifests", {}),
            "central_metrics": record.get("central_metrics"),
            "accuracy": record.get("accuracy"),
            "loss": record.get("loss"),
            "alerts": record.get("alerts", []),
            "rollback": record.get("rollback"),
            "epsilon": record.get("epsilon"),
        })

    def summary(self) -> dict:
        """What summary.json holds (strict JSON)."""
        accuracies = [r["accuracy"] for r in self.records if _finite(r.get("accuracy"))]
        epsilon = self.strategy.epsilon()
        privacy = None
        if self.strategy.privacy.mode != "off":
            privacy = {"epsilon": epsilon if epsilon is not None and math.isfinite(epsilon) else None,
                       "delta": self.strategy.privacy.delta, "mode": self.strategy.privacy.mode}
        summary = {
            "config": dict(self.config),
            "run_id": self.run_id,
            "final_accuracy": self.records[-1].get("accuracy") if self.records else None,
            "best_accuracy": max(accuracies) if accuracies else None,
            "clean_accuracy": None,
            "backdoor_asr": self.records[-1].get("backdoor_asr") if self.records else None,
            "detection": None,
            "privacy": privacy,
            "wall_seconds": time.time() - self.started,
            "stopped_early": self.stopped_early,
            "initial_evaluation": self.initial_evaluation,
            "alerts": list(self.monitor.alerts),
            "rollbacks": list(self.rollbacks),
            "rounds": [{k: r[k] for k in SUMMARY_ROUND_KEYS if k in r} for r in self.records],
        }
        if self.summary_extra is not None:
            summary.update(self.summary_extra(self.records))
        return strict_json(summary)


def _copy_config(config: ConfigRecord | None) -> ConfigRecord:
    """A fresh ConfigRecord per round: the strategy writes the round number into it."""
    return ConfigRecord(dict(config)) if config is not None else ConfigRecord()


def _read_records(path: Path, limit: int) -> list[dict]:
    out = []
    with open(path, "rb") as file:
        for index, raw in enumerate(file):
            if index >= limit:
                break
            try:
                out.append(json.loads(raw))
            except ValueError:
                break
    return out
