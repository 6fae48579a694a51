"""RobustStrategy: Byzantine-robust aggregation as a Flower Message-API strategy."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import DEBUG, INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

import aggregators
from server.optimizer import ServerOptimizer
from server.metrics import MetricsAggregationFn, aggregate_client_metrics, validated_metric_records
from server.params import ParamSpec, arrays_to_vector, lower_median, other_entries, vector_to_arrays
from server.privacy import (
    AdaptiveClipper,
    PrivacyAccountant,
    central_noise_std,
    clip_updates,
    gaussian_noise_like,
)
from server.reputation import Reputation
from server.scoring import score_updates
from server.stacking import BLOCK, empty_stack, fill_row, sha256_row, single_threaded_blas
from server.settings import DP_MODES
from server.validation import ReplyValidator, ValidReply, check_metrics

#: ``interceptor(server_round, updates, node_ids, metrics, aggregator) -> updates``: a
#: pre-aggregation hook that may replace rows of the (n, d) stack. Simulations use it for
#: omniscient attackers; a deployed server leaves it unset.
Interceptor = Callable[[int, torch.Tensor, list[int], list[dict], Callable], torch.Tensor]


@dataclass
class PrivacySettings:
    """Differential-privacy settings of a run.

    Attributes
    ----------
    mode : str
        ``off``, ``central`` (server clips, aggregates, adds noise) or ``client`` (clients clip
        and noise their own updates; the server only accounts).
    clip_norm : float
        L2 clip norm C (the initial one when ``adaptive``).
    noise_multiplier : float
        sigma: noise std is sigma times the aggregator's sensitivity (central) or 2 * sigma * C
        (client: the replace-one sensitivity of one clipped update).
    delta : float
        Target delta of the reported epsilon.
    adaptive : bool
        Central mode only: the clip tracks ``target_quantile`` of the update norms (Andrew et al. 2021).
    target_quantile : float
        Quantile of update norms the adaptive clip tracks.
    target_epsilon : float
        Training stops before a round that would spend more than this; ``inf`` disables.
    """

    mode: str = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    adaptive: bool = False
    target_quantile: float = 0.5
    target_epsilon: float = math.inf


class RobustStrategy(Strategy):
    """Federated training with a robust aggregation rule and per-client scrutiny.

    Each round: sample clients (seeded), send the global model, validate every reply (a bad
    reply is rejected with a reason, never raised), turn replies into updates (reply minus
    global), stack them into one (n, d) tensor on the server's device, score every client,
    apply the reputation policy, aggregate with a rule from the ``aggregators`` registry and
    apply the result.

    Parameters
    ----------
    aggregator : str
        A registered rule name (``aggregators.available()``) or ``"package.module:Name"``.
    num_byzantine : int
        The number of Byzantine clients f the rule assumes.
    pre_aggregation : Iterable[str]
        Pre-aggregation chain, e.g. ``["nnm"]`` or ``["bucketing:size=2"]``.
    aggregator_params : dict | None
        Extra constructor parameters of the rule.
    fraction_train : float
        Share of connected clients sampled each round.
    fraction_evaluate : float
        Share of connected clients sampled for federated evaluation after each round (0: none;
        Flower's default, 1.0, asks every client).
    min_train_nodes : int
        Fewest clients sampled a round.
    min_evaluate_nodes : int
        Fewest clients sampled for federated evaluation (when ``fraction_evaluate > 0``).
    min_available_nodes : int
        Clients that must be connected before a round starts.
    min_replies : int
        Fewest valid replies needed to aggregate; below it the round is skipped and the global
        model stays unchanged.
    max_update_norm : float
        Updates with a larger L2 norm are rejected.
    max_num_examples : int
        Client-reported ``num-examples`` is capped here before it weights anything.
    policy : str
        Reputation policy: ``flag``, ``exclude``, ``quarantine`` or ``trust-weighted``.
    flag_threshold : float
        Combined anomaly score at or above which a client is flagged.
    privacy : PrivacySettings | None
        Differential privacy; None means off.
    seed : int
        Seeds client sampling and the server-side noise.
    device : str | torch.device | None
        Where updates are stacked and aggregated; CUDA when present by default.
    interceptor : Interceptor | None
        Simulation-only hook over the update stack (see ``Interceptor``).
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn : callable, optional
        ``fn(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord``, as in
        Flower's FedAvg. The records hold each accepted reply's *validated* metrics. Default:
        the ``num-examples``-weighted mean of every metric (``audit-*`` counts summed,
        ``partition-id`` left out; see :mod:`server.metrics`).
    model_dtypes : Mapping[str, torch.dtype] | None
        The model's own dtype per state entry (``client.wire.dtypes_of(model)``): bfloat16
        entries travel as float32 and the aggregate is rounded back to bfloat16.
    server_optimizer : ServerOptimizer | None
        Applies the robust aggregate to the global model (:mod:`server.optimizer`): server
        learning rate and momentum (FedAvgM), FedAdam or FedYogi. None: ``global + aggregate``.
    """

    def __init__(
        self,
        aggregator: str = "krum",
        num_byzantine: int = 0,
        *,
        pre_aggregation: Iterable[str] = (),
        aggregator_params: dict | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_replies: int = 1,
        max_update_norm: float = math.inf,
        max_num_examples: int = 100_000,
        policy: str = "flag",
        flag_threshold: float = 0.5,
        privacy: PrivacySettings | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        interceptor: Interceptor | None = None,
        train_metrics_aggr_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregationFn | None = None,
        model_dtypes: dict | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        # Checked now, not when the first replies arrive: nothing may train under settings that
        # would then be refused.
        if not (isinstance(max_update_norm, (int, float)) and max_update_norm > 0):
            raise ValueError(f"max_update_norm must be > 0 (math.inf for no bound), got {max_update_norm}")
        if isinstance(max_num_examples, bool) or not isinstance(max_num_examples, int) or max_num_examples < 1:
            raise ValueError(f"max_num_examples must be an integer >= 1, got {max_num_examples}")
        self.aggregator_name = aggregator
        self.num_byzantine = num_byzantine
        self.pre_aggregation = [p for p in pre_aggregation if p]
        self.rule = aggregators.build(
            aggregator, num_byzantine=num_byzantine, pre=self.pre_aggregation or None, **(aggregator_params or {})
        )
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0 else min_evaluate_nodes
        self.train_metrics_aggr_fn = train_metrics_aggr_fn or aggregate_client_metrics
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn or aggregate_client_metrics
        self.model_dtypes = dict(model_dtypes or {})
        self.optimizer = server_optimizer or ServerOptimizer()
        self.min_available_nodes = min_available_nodes
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.max_num_examples = max_num_examples
        self.reputation = Reputation(policy, threshold=flag_threshold)
        self.privacy = privacy or PrivacySettings()
        if self.privacy.mode not in DP_MODES:
            raise ValueError(f"dp must be one of {DP_MODES}, got {self.privacy.mode!r}")
        self.seed = seed
        self.device = torch.device(device) if device is not None else _default_device()
        self.interceptor = interceptor
        self.noise_generator = torch.Generator(device="cpu").manual_seed(seed)
        self.clipper: AdaptiveClipper | None = None
        self.accountant: PrivacyAccountant | None = None
        self.client_participation: dict[int, int] = {}
        if self.privacy.mode == "central":
            # Refuse a rule with no sensitivity bound now, before any round runs.
            central_noise_std(self.rule, clip_norm=1.0, num_clients=max(2 * num_byzantine + 3, 4), noise_multiplier=1.0)
            if self.privacy.adaptive:
                self.clipper = AdaptiveClipper(self.privacy.clip_norm, self.privacy.target_quantile, seed=seed)
                # Refuse now, not after the clients trained, when the count noise cannot pay for sigma.
                self.clipper.effective_noise_multiplier(self.privacy.noise_multiplier,
                                                        num_clients=max(min_available_nodes, min_train_nodes))
        self.history: list[dict] = []
        self.last_record: dict | None = None
        self.last_evaluate_record: dict | None = None
        self._spec: ParamSpec | None = None
        self._global: torch.Tensor | None = None
        self._global_others: dict = {}
        self._sampled: set[int] = set()
        self._evaluate_sampled: set[int] = set()
        self._num_nodes = 0
        self._row_hashes: list = []
        self.stage_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ Flower API
    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├── Aggregator: %s (f = %d, pre-aggregation: %s)", self.aggregator_name,
            self.num_byzantine, ",".join(self.pre_aggregation) or "none")
        log(INFO, "\t├── Sampling: fraction %.2f, min %d nodes, min %d valid replies", self.fraction_train,
            self.min_train_nodes, self.min_replies)
        log(INFO, "\t├── Federated evaluation: fraction %.2f, min %d nodes", self.fraction_evaluate,
            self.min_evaluate_nodes)
        log(INFO, "\t├── Reply bounds: update norm <= %s, num-examples capped at %d", self.max_update_norm,
            self.max_num_examples)
        log(INFO, "\t├── Reputation policy: %s (flag threshold %.2f)", self.reputation.policy, self.reputation.threshold)
        log(INFO, "\t├── Server optimizer: %s", self.optimizer.summary())
        log(INFO, "\t├── Differential privacy: %s (C = %s, sigma = %s, delta = %s)", self.privacy.mode,
            self.privacy.clip_norm, self.privacy.noise_multiplier, self.privacy.delta)
        log(INFO, "\t└── Device: %s, seed %d", self.device, self.seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients (seeded, skipping quarantined ones) and send them the global model."""
        nodes = _wait_for_nodes(grid, max(self.min_available_nodes, self.min_train_nodes))
        return self.prepare_round(server_round, arrays, config, nodes)

    def prepare_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: Iterable[int]
    ) -> list[Message]:
        """Sample among ``nodes`` and build the train messages (``configure_train`` without a Grid).

        The sample depends only on the seed, the round and the sorted node ids, so a rerun
        with the same nodes samples the same clients.
        """
        nodes = sorted(int(n) for n in nodes)
        self._num_nodes = len(nodes)
        sampled = self._sample(nodes, server_round, self.fraction_train, self.min_train_nodes, "configure_train")
        if self._spec is None:
            self._spec = ParamSpec.of(arrays, self.model_dtypes)
        self._global = arrays_to_vector(arrays, self._spec)
        self._global_others = other_entries(arrays, self._spec)
        self._sampled = set(sampled)
        config["server-round"] = server_round
        if self.privacy.mode == "client":
            config["clip-norm"] = float(self.privacy.clip_norm)
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in sampled]

    def _sample(self, nodes: list[int], server_round: int, fraction: float, minimum: int, what: str,
                stream: int = 0) -> list[int]:
        """Seeded sample of the non-quarantined ``nodes`` (depends only on seed, round and ids)."""
        eligible = [n for n in nodes if not self.reputation.is_quarantined(n, server_round)]
        size = min(len(eligible), max(minimum, int(round(fraction * len(nodes)))))
        key = [self.seed, server_round] if stream == 0 else [self.seed, server_round, stream]
        rng = np.random.default_rng(key)
        # Choose positions, not ids: numpy would turn 64-bit node ids into float64 and round them.
        sampled = sorted(eligible[int(i)] for i in rng.choice(len(eligible), size=size, replace=False))
        skipped = sorted(set(nodes) - set(eligible))
        if skipped:
            log(INFO, "%s: quarantined nodes skipped: %s", what, skipped)
        log(DEBUG, "%s: sampled %d of %d nodes", what, len(sampled), len(nodes))
        return sampled

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, score and robustly aggregate the replies of one round.

        Never raises because of a client's reply: each bad reply is rejected with a reason and
        the rest are aggregated. With fewer valid replies than ``min_replies`` the round is
        skipped (returns ``(None, metrics)``) and the global model stays as it was.
        """
        started = time.perf_counter()
        if self._global is None or self._spec is None:
            raise RuntimeError("aggregate_train called before configure_train")
        # Seconds per stage of this round (decode, validate, stack, hash, score, aggregate, record):
        # the benchmark reads it (benchmarks/round.py), a log or hook may too.
        self.stage_seconds = {}
        timer = _StageTimer(self.stage_seconds)
        # Rows are hashed in a worker thread as they are accepted, while the next replies decode
        # and the rule aggregates; an interceptor may replace rows, so then they are hashed after it.
        valid, rejected, updates, sq_norms = self._validate_and_stack(server_round, replies,
                                                                     hash_rows=self.interceptor is None)
        timer.reset()
        record: dict = {
            "round": server_round,
            "sampled": sorted(self._sampled),
            "accepted": [v.node_id for v in valid],
            "rejected": {str(k): v for k, v in rejected.items()},
            "scores": {},
            "features": {},
            "flagged": [],
            "excluded": [],
            "selected": [],
            "skipped": False,
        }
        for node_id, reason in rejected.items():
            log(WARNING, "round %d: rejected node %s: %s", server_round, node_id, reason)

        if len(valid) < self.min_replies:
            log(WARNING, "round %d skipped: %d valid replies < min-replies %d; global model unchanged",
                server_round, len(valid), self.min_replies)
            record["skipped"] = True
            self._row_hashes = []
            self._finish(record, None, started)
            return None, MetricRecord({"num-valid": len(valid), "num-rejected": len(rejected)})

        node_ids = [v.node_id for v in valid]
        hashed_ids = list(node_ids)
        weights = torch.tensor([float(v.num_examples) for v in valid], dtype=torch.float64, device=self.device)
        shared_norms = sq_norms
        if self.interceptor is not None:
            updates = self.interceptor(server_round, updates, node_ids, [v.metrics for v in valid], self.rule)
            shared_norms = None  # rows may have changed: scoring measures them again
            self._row_hashes = [_hash_pool().submit(_timed_sha256, row if row.device.type == "cpu" else row.cpu())
                                for row in updates]
        # Filled in once the worker thread is done (the key keeps its place in the record).
        record["update_sha256"] = {}
        record["client_reports"] = {
            str(v.node_id): {k: m for k, m in v.metrics.items() if k not in ("num-examples", "train-loss", "train_loss")}
            | v.provenance
            for v in valid
        }
        shared = _shared_manifests(valid)
        if shared:
            record["shared_manifests"] = shared
            for digest, nodes in shared.items():
                log(WARNING, "round %d: nodes %s report the same data manifest %s: one signed data folder is "
                    "being used by several nodes", server_round, nodes, digest[:16])

        for v in valid:
            if "audit-checked" in v.metrics:
                # The validator made these non-negative ints: nothing here casts client data.
                log(INFO, "round %d: node %d data audit: %d checked, %d flagged, %d dropped", server_round,
                    v.node_id, v.metrics["audit-checked"], v.metrics.get("audit-flagged", 0),
                    v.metrics.get("audit-dropped", 0))
        timer.lap("record")

        if self.privacy.mode == "central":
            # n must not depend on the clients' data: a sampled client whose reply was rejected
            # counts as a null client (a zero update), so the noise calibration stays valid.
            missing = sorted(self._sampled - set(node_ids))
            if missing:
                updates = torch.cat([updates, updates.new_zeros((len(missing), updates.shape[1]))])
                weights = torch.cat([weights, weights.new_ones(len(missing))])
                node_ids = node_ids + missing
                record["null_clients"] = missing
            updates, norms = clip_updates(updates, self._clip_norm())
            shared_norms = None
            record["clip_norm"] = self._clip_norm()
        try:
            vector, keep, scores = self._robust_aggregate(server_round, updates, weights, node_ids, record,
                                                          sq_norms=shared_norms)
        except ValueError as exc:
            # e.g. Krum with n <= 2f + 2 once replies were rejected: skip the round, keep the model.
            log(WARNING, "round %d skipped: the aggregator refused %d updates: %s", server_round, len(valid), exc)
            record["skipped"] = True
            record["skip_reason"] = str(exc)
            self._collect_hashes(record, hashed_ids)
            self._finish(record, None, started)
            return None, MetricRecord({"num-valid": len(valid), "num-rejected": len(rejected)})
        self._collect_hashes(record, hashed_ids)
        timer.reset()
        if self.privacy.mode != "off":
            vector = self._privatise(vector, keep, record, norms if self.privacy.mode == "central" else None)

        new_global = self.optimizer.step(self._global, vector.to("cpu", self._global.dtype),
                                         statistics=self._spec.statistics_mask)
        record["aggregate_sha256"] = _sha256(vector)
        record["train_loss"] = _train_loss(valid)
        kept = [v for v in valid if v.node_id not in set(record["excluded"])] or valid
        others = {key: lower_median([v.others[key] for v in kept]) for key in self._spec.other_keys}
        metrics = self._aggregate_metrics(self.train_metrics_aggr_fn, valid, server_round, "train")
        metrics["num-valid"] = len(valid)
        metrics["num-rejected"] = len(rejected)
        arrays = vector_to_arrays(new_global, self._spec, others)
        timer.lap("record")
        self._finish(record, scores, started)
        return arrays, metrics

    def _collect_hashes(self, record: dict, node_ids: list[int]) -> None:
        """Wait for the rows' SHA-256 (started while they were stacked) and record them."""
        started = time.perf_counter()
        futures, self._row_hashes = self._row_hashes, []
        done = [future.result() for future in futures]
        record["update_sha256"] = {str(n): digest for n, (digest, _) in zip(node_ids, done)}
        # "hash": the worker's seconds (overlapped with decoding and the rule); "hash_wait": what
        # the round waited for it after the rule was done.
        self.stage_seconds["hash"] = sum(seconds for _, seconds in done)
        self.stage_seconds["hash_wait"] = time.perf_counter() - started

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation: send the global model to a seeded ``fraction_evaluate`` of the nodes.

        Quarantined nodes are skipped. With ``fraction_evaluate = 0`` no message is sent.
        """
        if self.fraction_evaluate == 0.0:
            self._evaluate_sampled = set()
            return []
        nodes = _wait_for_nodes(grid, max(self.min_available_nodes, self.min_evaluate_nodes))
        sampled = self._sample(sorted(int(n) for n in nodes), server_round, self.fraction_evaluate,
                               self.min_evaluate_nodes, "configure_evaluate", stream=1)
        self._evaluate_sampled = set(sampled)
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=n) for n in sampled]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The ``num-examples``-weighted evaluation metrics of the valid replies (None when there are none).

        Like training replies, evaluation replies are untrusted: error replies, replies from
        nodes that were not sampled, duplicates and metrics that fail :func:`check_metrics`
        are rejected with a reason (in ``last_evaluate_record``), never raised.
        """
        accepted: list[ValidReply] = []
        rejected: dict[str, str] = {}
        seen: set[int] = set()
        for reply in replies:
            try:
                node_id = int(reply.metadata.src_node_id)
            except Exception:  # noqa: BLE001 - no usable sender id at all
                rejected["-1"] = "reply without a sender node id"
                continue
            reason = None
            if node_id in seen:
                reason = "duplicate reply from this node (the first was kept)"
            elif node_id not in self._evaluate_sampled:
                reason = f"node was not sampled for evaluation in round {server_round}"
            else:
                reason = _evaluate_reply_problem(reply)
            seen.add(node_id)
            if reason is None:
                values, reason = check_metrics(reply.content["metrics"])
            if reason is not None:
                rejected[str(node_id)] = reason
                log(WARNING, "round %d: evaluation reply of node %s rejected: %s", server_round, node_id, reason)
                continue
            accepted.append(ValidReply(node_id, torch.empty(0), min(int(values["num-examples"]), self.max_num_examples),
                                       values))
        accepted.sort(key=lambda v: v.node_id)
        self.last_evaluate_record = {"round": server_round, "sampled": sorted(self._evaluate_sampled),
                                     "accepted": [v.node_id for v in accepted], "rejected": rejected}
        if not accepted:
            return None
        metrics = self._aggregate_metrics(self.evaluate_metrics_aggr_fn, accepted, server_round, "evaluate")
        self.last_evaluate_record["metrics"] = dict(metrics)
        return metrics

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
        """Run the rounds, as Flower's ``Strategy.start`` does, with Phalanx's safeguards.

        Same arguments and result as Flower's. The loop is :class:`server.run.RobustRun`'s
        without a run directory: the training monitor watches ``evaluate_fn``'s ``loss`` and
        ``accuracy``, a round whose central metrics turn non-finite is not kept, and a DP budget
        stops training cleanly. For the audit trail, checkpoints and report, use
        ``RobustRun(strategy, out_dir=...)`` instead.
        """
        from server.run import RobustRun

        return RobustRun(self).start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                     train_config=train_config, evaluate_config=evaluate_config,
                                     evaluate_fn=evaluate_fn)

    def _aggregate_metrics(self, fn: MetricsAggregationFn, replies: list[ValidReply], server_round: int,
                           what: str) -> MetricRecord:
        """Aggregate validated client metrics; a failing user function is logged, never raised."""
        try:
            out = fn(validated_metric_records(replies), "num-examples")
        except Exception as exc:  # noqa: BLE001 - a user's aggregation function must not end the run
            log(WARNING, "round %d: %s metrics aggregation failed (%s: %s); no %s metrics this round",
                server_round, what, type(exc).__name__, exc, what)
            return MetricRecord()
        return out if isinstance(out, MetricRecord) else MetricRecord()

    # ------------------------------------------------------------------ internals
    def _validate_all(self, server_round: int, replies: Iterable[Message]) -> tuple[list[ValidReply], dict[int, str]]:
        """Validate without stacking (the evidence of each check; :meth:`_validate_and_stack` is the round's path)."""
        valid, rejected, _, _ = self._validate_and_stack(server_round, replies, stack=False)
        return valid, rejected

    def _screen(self, server_round: int, replies: Iterable[Message]) -> tuple[list[tuple[int, int, Message]], list]:
        """Sender id, duplicates and sampling, in arrival order: (candidates, rejections).

        Candidates are ``(arrival, node_id, reply)``; rejections ``(arrival, node_id, reason)``.
        """
        candidates: list[tuple[int, int, Message]] = []
        events: list[tuple[int, int, str]] = []
        seen: set[int] = set()
        for arrival, reply in enumerate(replies):
            try:
                node_id = int(reply.metadata.src_node_id)
            except Exception:  # noqa: BLE001 - no usable sender id at all
                events.append((arrival, -1, "reply without a sender node id"))
                continue
            if node_id in seen:
                # Keep the first reply: a second one from the same node is never averaged in twice.
                events.append((arrival, node_id, "duplicate reply from this node (the first was kept)"))
                continue
            seen.add(node_id)
            if node_id not in self._sampled:
                events.append((arrival, node_id, f"node was not sampled in round {server_round}"))
                continue
            candidates.append((arrival, node_id, reply))
        return candidates, events

    def _validate_and_stack(self, server_round: int, replies: Iterable[Message], *, stack: bool = True,
                            hash_rows: bool = False):
        """Validate every reply and write each accepted update into one (n, d) stack, in one pass.

        Returns ``(valid, rejected, updates, sq_norms)``: the accepted replies sorted by node id
        (arrival order must not change the result: float sums depend on row order), the
        rejection reasons (in arrival order), the ``(n, d)`` stack on ``self.device`` in the same
        order, and each row's float64 sum of squares. Each update is decoded straight from the
        reply's bytes into its row (:mod:`server.stacking`): no per-client copy, and its norm and
        NaN/Inf screen come from the same pass. With ``hash_rows`` each accepted row's SHA-256
        is started in a worker thread at once (``self._row_hashes``: futures in row order).
        """
        assert self._spec is not None and self._global is not None
        timer = _StageTimer(self.stage_seconds)
        validator = ReplyValidator(self._spec, max_update_norm=self.max_update_norm,
                                   max_num_examples=self.max_num_examples)
        candidates, events = self._screen(server_round, replies)
        pending = []
        for arrival, node_id, reply in candidates:
            outcome = validator.check(reply)
            if isinstance(outcome, str):
                events.append((arrival, node_id, outcome))
            else:
                pending.append((node_id, arrival, outcome))
        timer.lap("validate")
        pending.sort(key=lambda p: p[0])
        d = self._spec.dim
        dtype = self._spec.vector_dtype
        on_cpu = self.device.type == "cpu"
        rows = len(pending) if stack else min(len(pending), 1)
        # Untouched rows of torch.empty cost no memory: a rejected reply's row is reused.
        updates = (empty_stack(rows, d, dtype) if on_cpu or not stack
                   else torch.empty((rows, d), dtype=dtype, device=self.device))
        staging = updates if on_cpu or not stack else torch.empty((min(rows, 1), d), dtype=dtype)
        staging_np = staging.numpy()
        global_np = self._global.to(dtype).numpy()
        scratch = np.empty(BLOCK, dtype=np.float64)
        valid: list[ValidReply] = []
        sq_norms: list[float] = []
        self._row_hashes = []
        with single_threaded_blas():
            for node_id, arrival, item in pending:
                k = len(valid) if (stack and on_cpu) else 0
                sq = fill_row(staging_np[k], item.parts, global_np, scratch)
                timer.lap("decode")
                outcome = validator.finish(item, sq, staging[k])
                timer.lap("validate")
                if isinstance(outcome, str):
                    events.append((arrival, node_id, outcome))
                    continue
                if stack and not on_cpu:
                    updates[len(valid)].copy_(staging[0])
                if stack and hash_rows:
                    row = staging[k] if on_cpu else staging[k].clone()
                    self._row_hashes.append(_hash_pool().submit(_timed_sha256, row))
                valid.append(outcome)
                sq_norms.append(sq)
                timer.lap("stack")
        rejected: dict[int, str] = {}
        for _, node_id, reason in sorted(events, key=lambda e: e[0]):
            rejected[node_id] = reason
        updates = updates[: len(valid)] if stack else updates[:0]
        norms = torch.tensor(sq_norms, dtype=torch.float64)
        timer.lap("validate")
        return valid, rejected, updates, norms

    def _robust_aggregate(
        self, server_round: int, updates: torch.Tensor, weights: torch.Tensor, node_ids: list[int], record: dict,
        sq_norms: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Aggregate, score every client, apply the reputation policy; return (vector, kept rows, scores).

        ``sq_norms``: the rows' float64 sums of squares when already known (from stacking).
        """
        timer = _StageTimer(self.stage_seconds)
        if self.reputation.policy == "trust-weighted":
            trust = self.reputation.trust_weights(node_ids).to(weights)
            # Once every node is fully distrusted the weights carry no information: stay uniform.
            weights = weights * trust if bool((trust > 0).any()) else weights
        before = _rule_state(self.rule)
        result = self._call_rule(updates, weights, node_ids)
        timer.lap("aggregate")
        norms = None if sq_norms is None else sq_norms.sqrt().to(updates.device)
        # A rule whose scores are the distances to its output spares scoring a read of the stack.
        distances = result.scores if norms is not None and getattr(self.rule, "scores_are_distances", False) else None
        client_scores = score_updates(updates, result.vector, result.scores, norms=norms, distances=distances)
        combined = client_scores.combined
        timer.lap("score")
        flagged = self.reputation.observe(server_round, node_ids, combined.tolist())
        keep = torch.ones(len(node_ids), dtype=torch.bool, device=updates.device)
        excluded = self.reputation.excluded(server_round, node_ids, combined.tolist()) & set(node_ids)
        if excluded and len(excluded) < len(node_ids):
            after_first = _rule_state(self.rule)
            keep = torch.tensor([n not in excluded for n in node_ids], device=updates.device)
            try:
                # A stateful rule (centered clipping's centre, a seeded generator) must see this
                # round once: rewind it to where the round started before aggregating again.
                _load_rule_state(self.rule, before)
                timer.reset()
                result = self._call_rule(updates[keep], weights[keep], [n for n in node_ids if n not in excluded])
                timer.lap("aggregate")
            except ValueError as exc:
                _load_rule_state(self.rule, after_first)
                log(WARNING, "round %d: cannot aggregate without the excluded nodes %s (%s); keeping them",
                    server_round, sorted(excluded), exc)
                keep = torch.ones(len(node_ids), dtype=torch.bool, device=updates.device)
                excluded = set()
        if bool(keep.all()):
            selected = result.selected
        else:
            selected = torch.zeros(len(node_ids), dtype=torch.bool, device=updates.device)
            selected[keep] = result.selected
        record["scores"] = {str(n): float(s) for n, s in zip(node_ids, combined.tolist())}
        record["features"] = {str(row["node_id"]): {k: v for k, v in row.items() if k != "node_id"}
                              for row in client_scores.as_rows(node_ids)}
        record["rule_scores"] = {str(n): float(s) for n, s in zip(node_ids, result_scores(result, keep))}
        record["flagged"] = sorted(int(n) for n in flagged)
        record["excluded"] = sorted(int(n) for n in excluded)
        record["selected"] = [n for n, s in zip(node_ids, selected.tolist()) if s]
        record["reputation"] = {str(n): float(self.reputation.reputations.get(n, 0.0)) for n in node_ids}
        timer.lap("score")
        return result.vector, keep, combined

    def _call_rule(self, updates: torch.Tensor, weights: torch.Tensor, node_ids: list[int]):
        if getattr(self.rule, "needs_trusted_update", False) and getattr(self, "trusted_update_fn", None):
            self.rule.set_trusted_update(self.trusted_update_fn(self._global).to(updates))
        # Central DP's sensitivity bounds hold for the unweighted rule only.
        weights = None if self.privacy.mode == "central" else weights
        if getattr(self.rule, "uses_client_ids", False):
            # Rules with per-client history (FoolsGold) key it by node id, not by row position.
            return self.rule(updates, weights=weights, client_ids=list(node_ids))
        return self.rule(updates, weights=weights)

    def _clip_norm(self) -> float:
        return self.clipper.clip_norm if self.clipper is not None else self.privacy.clip_norm

    def _privatise(self, vector: torch.Tensor, keep: torch.Tensor, record: dict, norms: torch.Tensor | None) -> torch.Tensor:
        """Central DP: add noise scaled to the rule's sensitivity; account the round either way."""
        privacy = self.privacy
        if privacy.mode == "central":
            sigma = privacy.noise_multiplier
            if self.clipper is not None:
                sigma = self.clipper.effective_noise_multiplier(sigma, num_clients=int(keep.sum()))
            std = central_noise_std(self.rule, clip_norm=self._clip_norm(), num_clients=int(keep.sum()),
                                    noise_multiplier=sigma)
            vector = vector + gaussian_noise_like(vector.cpu(), std, self.noise_generator).to(vector)
            record["noise_std"] = std
            if self.accountant is None:
                self.accountant = PrivacyAccountant(noise_multiplier=privacy.noise_multiplier,
                                                    sampling_rate=self._sampling_rate(), delta=privacy.delta)
            self.accountant.step()
            if self.clipper is not None and norms is not None:
                record["next_clip_norm"] = self.clipper.update(norms)
        else:
            # A rejected reply's noisy update was still seen: every sampled node that replied spent budget.
            replied = set(record["accepted"]) | {int(n) for n in record["rejected"] if int(n) in self._sampled}
            for node in replied:
                self.client_participation[node] = self.client_participation.get(node, 0) + 1
        epsilon = self.epsilon()
        # No noise means no guarantee: JSON has no infinity, so that is recorded as None.
        record["epsilon"] = epsilon if epsilon is not None and math.isfinite(epsilon) else None
        return vector

    def _sampling_rate(self) -> float:
        """Clients sampled a round over clients connected (before any round: over the minimum available)."""
        total = self._num_nodes or max(self.min_available_nodes, 1)
        sampled = min(total, max(self.min_train_nodes, int(round(self.fraction_train * total))))
        return sampled / total

    def epsilon(self) -> float | None:
        """Privacy spent so far at ``delta``: the server's (central) or the worst client's (client)."""
        if self.privacy.mode == "central":
            return self.accountant.epsilon() if self.accountant is not None else 0.0
        if self.privacy.mode == "client":
            rounds = max(self.client_participation.values(), default=0)
            if rounds == 0:
                return 0.0
            accountant = PrivacyAccountant(noise_multiplier=self.privacy.noise_multiplier, sampling_rate=1.0,
                                           delta=self.privacy.delta)
            accountant.step(rounds)
            return accountant.epsilon()
        return None

    def next_round_exceeds_budget(self) -> bool:
        """True when one more round would spend more than ``target_epsilon``."""
        target = self.privacy.target_epsilon
        if self.privacy.mode == "off" or not math.isfinite(target):
            return False
        if self.privacy.mode == "central":
            if self.accountant is None:
                probe = PrivacyAccountant(noise_multiplier=self.privacy.noise_multiplier,
                                          sampling_rate=self._sampling_rate(), delta=self.privacy.delta)
                return probe.epsilon_if_step(1) > target
            return self.accountant.epsilon_if_step(1) > target
        rounds = max(self.client_participation.values(), default=0) + 1
        probe = PrivacyAccountant(noise_multiplier=self.privacy.noise_multiplier, sampling_rate=1.0,
                                  delta=self.privacy.delta)
        probe.step(rounds)
        return probe.epsilon() > target

    def _finish(self, record: dict, scores: torch.Tensor | None, started: float) -> None:
        record["aggregation_seconds"] = time.perf_counter() - started
        self.last_record = record
        self.history.append(record)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the model: reputation, rule and DP state, RNG."""
        state: dict = {
            "reputation": self.reputation.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "client_participation": dict(self.client_participation),
            "history": self.history,
            "optimizer": self.optimizer.state_dict(),
        }
        if hasattr(self.rule, "state_dict"):
            state["rule"] = self.rule.state_dict()
        if self.clipper is not None:
            state["clipper"] = self.clipper.state_dict()
        if self.accountant is not None:
            state["accountant"] = self.accountant.state_dict()
        return state

    def model_state(self) -> dict:
        """The state that moves with the global model: the server optimizer's and the rule's.

        :class:`server.run.RobustRun` saves it before each round and restores it with the model
        when a round is not kept (its central metrics turned non-finite) or is rolled back.
        Reputation, history and privacy spent are not part of it: they are never undone.
        """
        state: dict = {"optimizer": _copy_state(self.optimizer.state_dict())}
        if hasattr(self.rule, "state_dict"):
            state["rule"] = _copy_state(self.rule.state_dict())
        return state

    def load_model_state(self, state: dict) -> None:
        """Restore what :meth:`model_state` returned."""
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "rule" in state and hasattr(self.rule, "load_state_dict"):
            self.rule.load_state_dict(state["rule"])

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""
        self.reputation.load_state_dict(state["reputation"])
        self.noise_generator.set_state(state["noise_generator"])
        self.client_participation = {int(k): int(v) for k, v in state["client_participation"].items()}
        self.history = list(state["history"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "rule" in state and hasattr(self.rule, "load_state_dict"):
            self.rule.load_state_dict(state["rule"])
        if "clipper" in state and self.clipper is not None:
            self.clipper.load_state_dict(state["clipper"])
        if "accountant" in state:
            saved = state["accountant"]
            self.accountant = PrivacyAccountant(noise_multiplier=saved["noise_multiplier"],
                                                sampling_rate=saved["sampling_rate"], delta=saved["delta"],
                                                accountant=saved["accountant"])
            self.accountant.load_state_dict(saved)


def _copy_state(value):
    """A deep copy of plain state (tensors cloned), so later rounds cannot change a saved snapshot."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_state(v) for v in value)
    return value


def _rule_state(rule) -> dict | None:
    return rule.state_dict() if hasattr(rule, "state_dict") else None


def _load_rule_state(rule, state: dict | None) -> None:
    if state is not None:
        rule.load_state_dict(state)


def result_scores(result, keep: torch.Tensor) -> list[float]:
    """The rule's per-client scores over all rows (excluded rows get NaN-free 1.0: fully suspicious)."""
    if bool(keep.all()):
        return result.scores.tolist()
    full = torch.ones(len(keep), dtype=torch.float64)
    full[keep.cpu()] = result.scores.detach().cpu().double()
    return full.tolist()


def _timed_sha256(row: torch.Tensor) -> tuple[str, float]:
    started = time.perf_counter()
    return sha256_row(row), time.perf_counter() - started


class _StageTimer:
    """Adds the seconds since the last lap to ``stages[name]``."""

    def __init__(self, stages: dict) -> None:
        self.stages = stages
        self.last = time.perf_counter()

    def reset(self) -> None:
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self.last
        self.last = now


_HASH_POOL = None


def _hash_pool():
    """One worker thread for the rows' SHA-256 (hashlib releases the GIL on large buffers)."""
    global _HASH_POOL
    if _HASH_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _HASH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phalanx-sha256")
    return _HASH_POOL


def _forget_hash_pool() -> None:
    global _HASH_POOL
    _HASH_POOL = None


os.register_at_fork(after_in_child=_forget_hash_pool)


def _stack_updates(valid: list[ValidReply], device: torch.device) -> torch.Tensor:
    """One (n, d) stack on ``device``, filled row by row so each reply's copy is freed as it goes in."""
    stack = torch.empty((len(valid), valid[0].update.numel()), dtype=valid[0].update.dtype, device=device)
    for row, reply in enumerate(valid):
        stack[row].copy_(reply.update)
        reply.update = torch.empty(0)
    return stack


def _train_loss(valid: list[ValidReply]) -> float | None:
    """The num-examples-weighted train loss, under Phalanx's name or Flower's templates' one."""
    pairs = []
    for v in valid:
        key = "train-loss" if "train-loss" in v.metrics else "train_loss" if "train_loss" in v.metrics else None
        if key is not None:
            pairs.append((v.metrics[key], v.num_examples))
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return sum(m * w for m, w in pairs) / total


def _shared_manifests(valid: list[ValidReply]) -> dict[str, list[int]]:
    """Manifest digests reported by more than one node this round (one data folder, several nodes)."""
    by_digest: dict[str, list[int]] = {}
    for v in valid:
        digest = v.provenance.get("manifest-digest")
        if digest:
            by_digest.setdefault(digest, []).append(v.node_id)
    return {d: sorted(nodes) for d, nodes in by_digest.items() if len(nodes) > 1}


def _evaluate_reply_problem(reply: Message) -> str | None:
    """Why an evaluation reply cannot be used, or None (its metrics are checked separately)."""
    if reply.has_error():
        return f"client error {reply.error.code}: {reply.error.reason}"
    names = sorted(reply.content.keys())
    if names != ["metrics"]:
        return f"records: expected only 'metrics', got {names}"
    if not isinstance(reply.content["metrics"], MetricRecord):
        return f"'metrics' is a {type(reply.content['metrics']).__name__}, not a MetricRecord"
    return None


def _sha256(tensor: torch.Tensor) -> str:
    from server.audit import sha256_tensor

    return sha256_tensor(tensor.detach().cpu())


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _wait_for_nodes(grid: Grid, minimum: int, timeout: float = 300.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(int(n) for n in grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} nodes connected after {timeout:.0f} s; this run needs {minimum} "
                f"(num-clients). In simulation start that many: flwr run . --federation-config "
                f"'num-supernodes={minimum}'"
            )
        log(INFO, "Waiting for nodes: %d connected (need %d)", len(nodes), minimum)
        time.sleep(1.0)
    return nodes
