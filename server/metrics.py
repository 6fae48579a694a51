"""Aggregating the clients' own metrics, as Flower's strategies do, from validated values only.

Flower's FedAvg aggregates every client metric into the round's ``MetricRecord`` with
``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``: ``fn(records, weighting_metric_name)``
over the replies' ``RecordDict``\\ s, the ``num-examples``-weighted mean by default. RobustStrategy
keeps that contract, with two differences that a server facing hostile clients needs:

* the records handed to the function hold each accepted reply's metrics *after* validation
  (:func:`server.validation.check_metrics`: finite numbers, bounded keys, ``num-examples``
  capped), never the raw reply, so a user's function cannot be crashed by a client;
* the default, :func:`aggregate_client_metrics`, weights by the capped ``num-examples``, sums
  the data audit's ``audit-*`` counts (a count over clients is a total, not a mean) and leaves
  out ``partition-id`` (a client's claimed label, not a measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.app import MetricRecord, RecordDict

#: ``fn(records, weighting_metric_name) -> MetricRecord``, as in Flower's FedAvg.
MetricsAggregationFn = Callable[[list[RecordDict], str], MetricRecord]
#: Metrics left out of the default aggregate.
NOT_AGGREGATED = ("partition-id",)
#: Metrics summed over clients instead of averaged.
SUMMED_PREFIX = "audit-"


def validated_metric_records(replies: Sequence) -> list[RecordDict]:
    """One RecordDict per accepted reply, holding its validated metrics (``num-examples`` capped)."""
    records = []
    for reply in replies:
        values = dict(reply.metrics)
        values["num-examples"] = int(reply.num_examples)
        records.append(RecordDict({"metrics": MetricRecord(values)}))
    return records


def aggregate_client_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Weighted mean of every client metric by ``weighting_metric_name`` (``audit-*`` summed).

    Lists are averaged element-wise when every client sent the same length; a metric that
    only some clients report is averaged over those that do (weights renormalised).
    """
    sums: dict[str, float | list[float]] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weighting_metric_name])
        for key, value in metrics.items():
            if key == weighting_metric_name or key in NOT_AGGREGATED:
                continue
            summed = key.startswith(SUMMED_PREFIX)
            factor = 1.0 if summed else weight
            if isinstance(value, list):
                current = sums.get(key)
                if current is None:
                    sums[key] = [float(v) * factor for v in value]
                elif isinstance(current, list) and len(current) == len(value):
                    sums[key] = [c + float(v) * factor for c, v in zip(current, value)]
                else:
                    sums[key] = float("nan")  # lengths disagree: no meaningful element-wise mean
            else:
                current = sums.get(key, 0.0)
                sums[key] = (current if isinstance(current, float) else float("nan")) + float(value) * factor
            weights[key] = weights.get(key, 0.0) + (0.0 if summed else weight)
    out = MetricRecord()
    for key, total in sums.items():
        if isinstance(total, float) and total != total:  # NaN: dropped, not reported
            continue
        denominator = weights[key] if weights[key] > 0 else 1.0
        if key.startswith(SUMMED_PREFIX):
            denominator = 1.0
        out[key] = [v / denominator for v in total] if isinstance(total, list) else total / denominator
    return out
