"""Validation of client replies before anything else touches them.

A client reply is untrusted input. Each check below names what is wrong, so a rejected reply
leaves a reason in the log, ``summary.json`` and the audit record, and the round goes on with
the rest. Checks look at the decoded data, never only at an Array's declared metadata, which
a hostile client can set to anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from server.params import ParamSpec

#: The records a train reply must carry.
EXPECTED_RECORDS = ("arrays", "metrics")
#: Records a train reply may carry besides: where its training data came from (strings only).
OPTIONAL_RECORDS = ("provenance",)


@dataclass
class ValidReply:
    """A reply that passed every check.

    Attributes
    ----------
    node_id : int
        Sender.
    update : torch.Tensor
        Reply weights minus global weights, flat float32 on CPU.
    num_examples : int
        Client-reported example count, capped at the validator's bound.
    metrics : dict
        The reply's metrics (all finite numbers).
    """

    node_id: int
    update: torch.Tensor
    num_examples: int
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


class ReplyValidator:
    """Turns train replies into updates or rejection reasons.

    Parameters
    ----------
    spec : ParamSpec
        Layout of the global model: keys, shapes, dtypes a reply must match.
    max_update_norm : float
        Largest accepted L2 norm of an update (reply minus global); ``inf`` disables the check.
    max_num_examples : int
        ``num-examples`` above this is capped to it (a client's count is never trusted unbounded).
    """

    def __init__(self, spec: ParamSpec, *, max_update_norm: float = math.inf, max_num_examples: int = 100_000) -> None:
        if not max_update_norm > 0:
            raise ValueError(f"max_update_norm must be > 0, got {max_update_norm}")
        if max_num_examples < 1:
            raise ValueError(f"max_num_examples must be >= 1, got {max_num_examples}")
        self.spec = spec
        self.max_update_norm = max_update_norm
        self.max_num_examples = max_num_examples

    def validate(self, reply: Message, global_vector: torch.Tensor) -> ValidReply | str:
        """Check one reply; return a ``ValidReply`` or the reason it is rejected."""
        try:
            return self._validate(reply, global_vector)
        except Exception as exc:  # noqa: BLE001 - a hostile reply must never end the round
            return f"malformed reply: {type(exc).__name__}: {exc}"

    def _validate(self, reply: Message, global_vector: torch.Tensor) -> ValidReply | str:
        node_id = int(reply.metadata.src_node_id)
        if reply.has_error():
            return f"client error {reply.error.code}: {reply.error.reason}"
        content = reply.content
        names = sorted(content.keys())
        missing = [name for name in EXPECTED_RECORDS if name not in names]
        extra = [name for name in names if name not in EXPECTED_RECORDS + OPTIONAL_RECORDS]
        if missing or extra:
            return f"records: missing {missing}, unexpected {extra}"
        arrays, metrics = content["arrays"], content["metrics"]
        if not isinstance(arrays, ArrayRecord):
            return f"'arrays' is a {type(arrays).__name__}, not an ArrayRecord"
        if not isinstance(metrics, MetricRecord):
            return f"'metrics' is a {type(metrics).__name__}, not a MetricRecord"

        provenance = content.get("provenance")
        if provenance is not None:
            if not isinstance(provenance, ConfigRecord) or not all(
                isinstance(v, str) and len(v) <= 4096 for v in provenance.values()
            ):
                return "'provenance' must be a ConfigRecord of short strings"
            provenance = dict(provenance)

        reason = self._check_keys(arrays)
        if reason:
            return reason
        flat, reason = self._decode(arrays)
        if reason:
            return reason
        update = flat - global_vector.to(torch.float32)
        norm = float(torch.linalg.vector_norm(update.double()))
        if norm > self.max_update_norm:
            return f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g}"

        metric_values = dict(metrics)
        reason = _check_metrics(metric_values)
        if reason:
            return reason
        num_examples, reason = self._num_examples(metric_values)
        if reason:
            return reason
        return ValidReply(node_id, update, num_examples, metric_values, provenance or {})

    def _check_keys(self, arrays: ArrayRecord) -> str | None:
        keys = set(arrays.keys())
        expected = set(self.spec.keys)
        if keys != expected:
            return f"array keys differ from the global model's: missing {sorted(expected - keys)}, unexpected {sorted(keys - expected)}"
        return None

    def _decode(self, arrays: ArrayRecord) -> tuple[torch.Tensor, str | None]:
        parts = []
        for key, shape, dtype in zip(self.spec.keys, self.spec.shapes, self.spec.dtypes):
            array = arrays[key]
            try:
                data = array.numpy()
            except Exception as exc:  # noqa: BLE001 - undecodable bytes are the client's fault
                return torch.empty(0), f"array {key!r}: undecodable data ({type(exc).__name__})"
            if tuple(data.shape) != shape:
                return torch.empty(0), f"array {key!r}: shape {tuple(data.shape)}, expected {shape}"
            if data.dtype.name != dtype:
                return torch.empty(0), f"array {key!r}: dtype {data.dtype.name}, expected {dtype}"
            if tuple(array.shape) != shape or array.dtype != dtype:
                return torch.empty(0), (
                    f"array {key!r}: declared shape/dtype {tuple(array.shape)}/{array.dtype} "
                    f"disagree with its data {shape}/{dtype}"
                )
            if not np.isfinite(data).all():
                bad = int((~np.isfinite(data)).sum())
                return torch.empty(0), f"array {key!r}: {bad} non-finite values (NaN/Inf)"
            parts.append(np.asarray(data, dtype=np.float32).reshape(-1))
        return torch.from_numpy(np.concatenate(parts)), None

    def _num_examples(self, metrics: dict) -> tuple[int, str | None]:
        value = metrics.get("num-examples")
        if value is None:
            return 0, "metrics: 'num-examples' missing"
        if isinstance(value, list) or float(value) != int(value) or int(value) < 1:
            return 0, f"metrics: 'num-examples' must be a positive integer, got {value!r}"
        return min(int(value), self.max_num_examples), None


def _check_metrics(metrics: dict) -> str | None:
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(float(v)) for v in values):
            return f"metrics: {key!r} is not finite"
    return None
