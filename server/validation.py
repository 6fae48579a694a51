"""Validation of client replies before anything else touches them.

A client reply is untrusted input. Each check below names what is wrong, so a rejected reply
leaves a reason in the log, ``summary.json`` and the audit record, and the round goes on with
the rest. Checks look at the decoded data, never only at an Array's declared metadata, which
a hostile client can set to anything.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from server.params import ParamSpec
from server.stacking import npy_view

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
        Reply weights minus global weights over the floating-point entries, flat on CPU in the
        spec's vector dtype (float32, or float64 for a model with float64 entries).
    num_examples : int
        Client-reported example count, capped at the validator's bound.
    metrics : dict
        The reply's metrics, type- and range-checked (:func:`check_metrics`).
    provenance : dict
        Where the client says its data came from (bounded strings).
    others : dict
        The reply's integer and boolean entries (e.g. ``num_batches_tracked``), decoded.
    """

    node_id: int
    update: torch.Tensor
    num_examples: int
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    others: dict = field(default_factory=dict)


@dataclass
class PendingReply:
    """A reply whose records, keys and arrays' layout passed (:meth:`ReplyValidator.check`);
    its values are checked once they are in the stack (:meth:`ReplyValidator.finish`).

    Attributes
    ----------
    node_id : int
        Sender.
    parts : list[np.ndarray]
        The floating-point entries in the spec's order, as decoded (views of the message's bytes
        where possible: nothing copied).
    others : dict
        The integer and boolean entries, decoded.
    metrics : MetricRecord
        The reply's metrics, not yet checked.
    provenance : dict
        Checked provenance strings.
    """

    node_id: int
    parts: list
    others: dict
    metrics: MetricRecord
    provenance: dict


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

        provenance, reason = _check_provenance(content.get("provenance"))
        if reason:
            return reason

        reason = self._check_keys(arrays)
        if reason:
            return reason
        flat, others, reason = self._decode(arrays)
        if reason:
            return reason
        update = flat - global_vector.to(flat.dtype)
        norm = float(torch.linalg.vector_norm(update.double()))
        if norm > self.max_update_norm:
            return f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g}"

        metric_values, reason = check_metrics(metrics)
        if reason:
            return reason
        num_examples = min(int(metric_values["num-examples"]), self.max_num_examples)
        return ValidReply(node_id, update, num_examples, metric_values, provenance, others)

    # ------------------------------------------------------------- in two steps, around the stack
    def check(self, reply: Message) -> PendingReply | str:
        """Every check :meth:`validate` makes that does not need the update's values.

        Same checks in the same order, same reasons: the records, the provenance, the keys, and
        each array's decoding, shape, dtype and declared metadata. A reply whose array fails one of
        these after an earlier float array holding NaN/Inf gets that earlier array's reason, as
        :meth:`validate` gives it. The values (finiteness, the norm bound) and the metrics are
        checked by :meth:`finish` once the update is in its stack row.
        """
        try:
            return self._check(reply)
        except Exception as exc:  # noqa: BLE001 - a hostile reply must never end the round
            return f"malformed reply: {type(exc).__name__}: {exc}"

    def finish(self, pending: PendingReply, sq_norm: float, update: torch.Tensor) -> ValidReply | str:
        """The value checks of :meth:`validate` on an update already written to its stack row.

        ``sq_norm`` is the update's float64 sum of squares (:func:`server.stacking.fill_row`); it is
        non-finite whenever a value is NaN or Inf. ``update`` is that row (its norm is recomputed
        the old way only when the sum is not finite and no array held NaN/Inf).
        """
        try:
            if not math.isfinite(sq_norm):
                reason = _non_finite_reason(self.spec, pending.parts)
                if reason:
                    return reason
                norm = float(torch.linalg.vector_norm(update.double()))
            else:
                norm = math.sqrt(sq_norm)
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds the bound {self.max_update_norm:.4g}"
            metric_values, reason = check_metrics(pending.metrics)
            if reason:
                return reason
            num_examples = min(int(metric_values["num-examples"]), self.max_num_examples)
            return ValidReply(pending.node_id, torch.empty(0), num_examples, metric_values, pending.provenance,
                              pending.others)
        except Exception as exc:  # noqa: BLE001 - a hostile reply must never end the round
            return f"malformed reply: {type(exc).__name__}: {exc}"

    def _check(self, reply: Message) -> PendingReply | str:
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
        provenance, reason = _check_provenance(content.get("provenance"))
        if reason:
            return reason
        reason = self._check_keys(arrays)
        if reason:
            return reason
        parts, others = [], {}
        float_keys = set(self.spec.float_keys)
        for key, shape, dtype in zip(self.spec.keys, self.spec.shapes, self.spec.dtypes):
            array = arrays[key]
            data = npy_view(array, shape, dtype)
            if data is None:
                try:
                    data = array.numpy()
                except Exception as exc:  # noqa: BLE001 - undecodable bytes are the client's fault
                    return _non_finite_reason(self.spec, parts) or f"array {key!r}: undecodable data ({type(exc).__name__})"
                if tuple(data.shape) != shape:
                    return _non_finite_reason(self.spec, parts) or f"array {key!r}: shape {tuple(data.shape)}, expected {shape}"
                if data.dtype.name != dtype:
                    return _non_finite_reason(self.spec, parts) or f"array {key!r}: dtype {data.dtype.name}, expected {dtype}"
            if tuple(array.shape) != shape or array.dtype != dtype:
                return _non_finite_reason(self.spec, parts) or (
                    f"array {key!r}: declared shape/dtype {tuple(array.shape)}/{array.dtype} "
                    f"disagree with its data {shape}/{dtype}"
                )
            if key not in float_keys:
                others[key] = np.array(data)
                continue
            parts.append(data)
        return PendingReply(node_id, parts, others, metrics, provenance)

    def _check_keys(self, arrays: ArrayRecord) -> str | None:
        keys = set(arrays.keys())
        expected = set(self.spec.keys)
        if keys != expected:
            return f"array keys differ from the global model's: missing {sorted(expected - keys)}, unexpected {sorted(keys - expected)}"
        return None

    def _decode(self, arrays: ArrayRecord) -> tuple[torch.Tensor, dict, str | None]:
        parts, others = [], {}
        empty = torch.empty(0)
        vector_dtype = np.float64 if self.spec.vector_dtype == torch.float64 else np.float32
        float_keys = set(self.spec.float_keys)
        for key, shape, dtype in zip(self.spec.keys, self.spec.shapes, self.spec.dtypes):
            array = arrays[key]
            try:
                data = array.numpy()
            except Exception as exc:  # noqa: BLE001 - undecodable bytes are the client's fault
                return empty, {}, f"array {key!r}: undecodable data ({type(exc).__name__})"
            if tuple(data.shape) != shape:
                return empty, {}, f"array {key!r}: shape {tuple(data.shape)}, expected {shape}"
            if data.dtype.name != dtype:
                return empty, {}, f"array {key!r}: dtype {data.dtype.name}, expected {dtype}"
            if tuple(array.shape) != shape or array.dtype != dtype:
                return empty, {}, (
                    f"array {key!r}: declared shape/dtype {tuple(array.shape)}/{array.dtype} "
                    f"disagree with its data {shape}/{dtype}"
                )
            if key not in float_keys:
                others[key] = data
                continue
            if not np.isfinite(data).all():
                bad = int((~np.isfinite(data)).sum())
                return empty, {}, f"array {key!r}: {bad} non-finite values (NaN/Inf)"
            parts.append(np.asarray(data, dtype=vector_dtype).reshape(-1))
        flat = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=self.spec.vector_dtype)
        return flat, others, None


def _non_finite_reason(spec: ParamSpec, parts: list) -> str | None:
    """:meth:`ReplyValidator.validate`'s reason for the first float array holding NaN/Inf, or None."""
    for key, data in zip(spec.float_keys, parts):
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            return f"array {key!r}: {bad} non-finite values (NaN/Inf)"
    return None


# --------------------------------------------------------------------------- client metrics and text

#: Most metric keys a reply may carry; client text is bounded so it cannot bloat the audit log.
MAX_METRIC_KEYS = 64
#: Most numbers a reply's list-valued metrics may hold together.
MAX_METRIC_LIST_VALUES = 1024
#: Most provenance entries, characters per provenance value, and bytes of all provenance text.
MAX_PROVENANCE_KEYS = 16
MAX_PROVENANCE_VALUE = 1024
MAX_PROVENANCE_BYTES = 4096
#: What a metric or provenance key may look like: short, printable, no spaces.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/+-]{0,63}")
_INT64 = 2**63

#: Metrics Phalanx itself reads, with the kind and lower bound they must have. Integer-valued
#: floats (5.0) are accepted for integer metrics and stored as int.
KNOWN_METRICS: dict[str, tuple[type, float | None]] = {
    "num-examples": (int, 1),
    "partition-id": (int, 0),
    "train-loss": (float, None),
    "train_loss": (float, None),
    "audit-seconds": (float, 0),
}
#: Every other ``audit-*`` metric is a count.
AUDIT_COUNT_PREFIX = "audit-"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _number(key: str, value: object) -> tuple[int | float | None, str | None]:
    """A finite Python int or float, or why the value is not one."""
    if not _is_number(value):
        return None, f"metrics: {key!r} must be a number, got {type(value).__name__}"
    if isinstance(value, (int, np.integer)):
        if not -_INT64 <= int(value) < _INT64:
            return None, f"metrics: {key!r} is outside the 64-bit integer range"
        return int(value), None
    number = float(value)
    if not math.isfinite(number):
        return None, f"metrics: {key!r} is not finite"
    return number, None


def _known_metric(key: str) -> tuple[type, float | None] | None:
    if key in KNOWN_METRICS:
        return KNOWN_METRICS[key]
    if key.startswith(AUDIT_COUNT_PREFIX):
        return int, 0
    return None


def check_metrics(metrics: MetricRecord) -> tuple[dict[str, int | float | list[float]], str | None]:
    """Type- and range-check a reply's metrics; return them as plain Python values, or a reason.

    Every value is a finite number or a list of them (lists hold at most
    :data:`MAX_METRIC_LIST_VALUES` numbers in all); keys are short printable names, at most
    :data:`MAX_METRIC_KEYS` of them. The metrics Phalanx reads (:data:`KNOWN_METRICS`, and the
    ``audit-*`` counts) must be scalars of their kind and range, and ``num-examples`` must be
    present. Nothing downstream casts client data: it reads what this returns.
    """
    if len(metrics) > MAX_METRIC_KEYS:
        return {}, f"metrics: {len(metrics)} keys, at most {MAX_METRIC_KEYS} are accepted"
    clean: dict[str, int | float | list[float]] = {}
    list_values = 0
    for key, value in metrics.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            return {}, f"metrics: key {str(key)[:80]!r} is not a short printable name"
        if isinstance(value, (list, tuple)):
            list_values += len(value)
            if list_values > MAX_METRIC_LIST_VALUES:
                return {}, f"metrics: more than {MAX_METRIC_LIST_VALUES} values in list metrics"
            numbers = []
            for item in value:
                number, reason = _number(key, item)
                if reason:
                    return {}, reason
                numbers.append(float(number))
            clean[key] = numbers
            continue
        number, reason = _number(key, value)
        if reason:
            return {}, reason
        clean[key] = number
    if "num-examples" not in clean:
        return {}, "metrics: 'num-examples' missing"
    for key, value in clean.items():
        known = _known_metric(key)
        if known is None:
            continue
        kind, low = known
        if kind is int:
            if isinstance(value, list) or float(value) != int(value) or (low is not None and value < low):
                bound = "a positive integer" if low == 1 else "a non-negative integer"
                return {}, f"metrics: {key!r} must be {bound}, got {value!r}"
            clean[key] = int(value)
        else:
            if isinstance(value, list) or (low is not None and value < low):
                return {}, f"metrics: {key!r} must be a number >= {low}" if low is not None else f"metrics: {key!r} must be a number"
            clean[key] = float(value)
    return clean, None


def _check_provenance(provenance: object) -> tuple[dict[str, str], str | None]:
    """The reply's ``provenance`` ConfigRecord as a bounded dict of strings, or a reason."""
    if provenance is None:
        return {}, None
    if not isinstance(provenance, ConfigRecord):
        return {}, f"'provenance' must be a ConfigRecord, got a {type(provenance).__name__}"
    if len(provenance) > MAX_PROVENANCE_KEYS:
        return {}, f"'provenance' must be at most {MAX_PROVENANCE_KEYS} entries, got {len(provenance)}"
    clean: dict[str, str] = {}
    total = 0
    for key, value in provenance.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            return {}, f"'provenance' must be keyed by short printable names, got {str(key)[:80]!r}"
        if not isinstance(value, str):
            return {}, f"'provenance' must be strings: {key!r} is a {type(value).__name__}"
        if len(value) > MAX_PROVENANCE_VALUE:
            return {}, f"'provenance' must be short strings: {key!r} has {len(value)} characters (limit {MAX_PROVENANCE_VALUE})"
        total += len(key.encode()) + len(value.encode())
        if total > MAX_PROVENANCE_BYTES:
            return {}, f"'provenance' must be at most {MAX_PROVENANCE_BYTES} bytes in all"
        clean[key] = value
    return clean, None
