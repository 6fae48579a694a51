"""The Phalanx ClientApp: the run's task, trained on validated local data, an update sent back.

Each train message: load this node's partition through the task (or verified files with
``data-dir``), optionally audit it (``data-audit``), train the received global model with the
task's ``train`` (Phalanx's SGD by default) on CUDA when present (or the node config's
``device``), and reply with the new weights, ``num-examples``, the task's train metrics and
where the data came from. With ``dp = "client"`` the update is clipped to ``clip-norm`` and
noised before it leaves. Each evaluate message: the task's ``evaluate`` on the local partition.

Attack hooks (``client.hooks``) are filled only when the run config names an attack: a
deployed client runs with ``attack = "none"`` and never imports the attack plugin.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.config import RunSettings
from client.data import ArrayDataset
from client.data_audit import apply_policy, audit_dataset, log_not_applicable_once
from client.hooks import AttackContext, AttackRole, attack_role
from client.integrity import load_verified_npz
from client.privacy import privatize_update
from client.task import DataInfo, Task, as_arrays, load_task
from client.tasks.builtin import BuiltinTask
from client.training import training_device
from client.wire import flat_vector, load_arrays, load_flat_vector, to_arrays

app = ClientApp()
logger = logging.getLogger("flwr")  # Flower's logger: shown by its simulation engine and SuperNodes

# A client process trains one small model at a time: one thread avoids oversubscribing the
# cores that the simulation engine's other actors share.
torch.set_num_threads(1)

#: context.state key under which an attacker keeps the last global model it received.
_PREVIOUS_GLOBAL = "phalanx-previous-global"
#: Metric keys Phalanx puts in a train reply itself (the task's own metrics join them).
_RESERVED = ("num-examples", "partition-id", "train-seconds")


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _data_info(task: Task, data: Any, run_config: dict) -> DataInfo:
    """Classes, shapes and range of this client's data.

    A task that declares no ``num_classes`` has it inferred from data; a partition may lack
    classes, so the held-out split is asked first when this node can load it.
    """
    if isinstance(data, ArrayDataset) or getattr(task.source, "num_classes", None) is not None:
        return task.data_info(data)
    try:
        classes = _test_classes(task, tuple(sorted((k, v) for k, v in run_config.items()
                                                   if isinstance(v, (str, int, float, bool)))))
    except Exception as exc:  # noqa: BLE001 - a client may not hold the server's split at all
        logger.warning("task %s: cannot load the held-out split on this node (%s); classes inferred from the "
                       "partition, which may lack some", task.name, exc)
        return task.data_info(data)
    info = task.data_info(data)
    return DataInfo(max(classes, info.num_classes), info.sample_shape, info.image_shape, info.feature_range)


@lru_cache(maxsize=8)
def _test_classes(task: Task, config: tuple) -> int:
    return task.data_info(task.load_test(dict(config))).num_classes


def _schema(task: Task, run_config: dict) -> DataInfo:
    """The held-out split's classes, sample shape and range: the schema files must follow."""
    return task.data_info(task.load_test(run_config))


def _as_array_dataset(data: Any, info: DataInfo) -> ArrayDataset:
    if isinstance(data, ArrayDataset):
        return data
    x, y = as_arrays(data)
    return ArrayDataset(x, y, info.num_classes, info.image_shape, info.feature_range)


def _local_data(task: Task, settings: RunSettings, run_config: dict, context: Context
                ) -> tuple[Any, ArrayDataset, dict]:
    """This client's training data (as the task gave it, and as arrays), verified when it comes
    from files, and where it came from."""
    partition_id, num_partitions = _partition(context)
    data_dir = str(context.node_config.get("data-dir", settings.data_dir))
    if not data_dir:
        raw = task.load_partition(partition_id, num_partitions, run_config)
        data = _as_array_dataset(raw, _data_info(task, raw, run_config))
        return raw, data, {"data-source": f"{task.name} partition {partition_id}/{num_partitions}",
                           "data-digest": data.digest()}
    # Files: the schema (classes, sample shape, feature range) is the task's held-out split's.
    info = _schema(task, run_config)
    path = Path(data_dir.replace("{partition-id}", str(partition_id))).expanduser() / "train.npz"
    x, y, manifest_digest = load_verified_npz(
        path,
        public_key=Path(settings.data_public_key) if settings.data_public_key else None,
        require_signature=settings.require_signed_data,
        num_classes=info.num_classes,
        feature_range=info.feature_range,
        expected_partition=partition_id,
        expected_dataset=settings.data_dataset_id or None,
        min_version=settings.data_min_version or None,
    )
    if x.shape[1:] != info.sample_shape:
        if int(np.prod(x.shape[1:])) != int(np.prod(info.sample_shape)):
            raise ValueError(f"{path}: samples of shape {x.shape[1:]}, task {task.name!r} takes {info.sample_shape}")
        x = x.reshape(len(x), *info.sample_shape)
    data = ArrayDataset(x, y, info.num_classes, info.image_shape, info.feature_range)
    return data, data, {"data-source": str(path), "data-digest": data.digest(), "manifest-digest": manifest_digest}


def _audit(settings: RunSettings, data: ArrayDataset, partition_id: int, server_round: int) -> tuple[ArrayDataset, dict]:
    """Audit the local training data before training; only counts leave the client.

    With ``drop-and-review`` the per-sample evidence goes to a local review file for the data
    owner (``<out>/data-audit/partition-<id>-round-<r>.json``), never to the server.
    """
    report = audit_dataset(data.x, data.y, num_classes=data.num_classes, image_shape=data.image_shape,
                           feature_range=data.feature_range, seed=settings.seed)
    log_not_applicable_once(report, logger)  # a check that cannot apply to this task's data says so, once
    review = None
    if settings.data_audit == "drop-and-review":
        review = settings.out_dir / "data-audit" / f"partition-{partition_id}-round-{server_round}.json"
        review.parent.mkdir(parents=True, exist_ok=True)
    x, y = apply_policy(data.x, data.y, report, settings.data_audit, review_path=review)
    if len(y) == 0:
        raise ValueError(f"data audit ({settings.data_audit}) dropped every sample of partition {partition_id}")
    return data.with_arrays(x, y), report.metrics()


def _attack_context(role: AttackRole, run_config: dict, context: Context, server_round: int,
                    global_vector: torch.Tensor) -> AttackContext:
    """What an attacker knows this round; it remembers the global model it saw last time.

    The memory is kept from the attacker's first round on, attack-start-round or not, so an
    attack that starts late (Neurotoxin) already knows the previous global model.
    """
    partition_id, _ = _partition(context)
    previous = None
    if _PREVIOUS_GLOBAL in context.state:
        previous = torch.from_numpy(context.state[_PREVIOUS_GLOBAL]["vector"].numpy().copy()).to(global_vector.dtype)
    context.state[_PREVIOUS_GLOBAL] = ArrayRecord({"vector": _array(global_vector)})
    return role.context(server_round=server_round, partition_id=partition_id, global_vector=global_vector,
                        previous_global=previous, run_config=run_config)


def _array(vector: torch.Tensor):
    from flwr.app import Array

    return Array(vector.detach().cpu().numpy())


def _model(task: Task, run_config: dict) -> torch.nn.Module:
    """The task's model, into which the received global state is loaded.

    Phalanx's built-in models hold nothing beyond their state dict, so one instance per process
    is reused (every call loads the whole global state into it: nothing of the last client's
    training survives). A user's task gets a fresh ``build_model`` each time: its model may keep
    state of its own.
    """
    if not isinstance(task.source, BuiltinTask):
        return task.build_model(run_config)
    return _builtin_model(task, json.dumps(run_config, sort_keys=True, default=str))


@lru_cache(maxsize=2)
def _builtin_model(task: Task, config_json: str) -> torch.nn.Module:
    return task.build_model(json.loads(config_json))


def _call_hook(hook, *args, context: AttackContext | None, **kwargs):
    """Call an attack hook, passing ``context`` only to hooks that take it (older plugins do not)."""
    try:
        takes_context = "context" in inspect.signature(hook).parameters
    except (TypeError, ValueError):
        takes_context = False
    return hook(*args, **kwargs, context=context) if takes_context else hook(*args, **kwargs)


def _reply_metrics(task_metrics: dict) -> dict:
    """The task's train metrics that a MetricRecord can carry: finite numbers and lists of them."""
    out: dict = {}
    for key, value in task_metrics.items():
        if key in _RESERVED or not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, np.bool_)):
            continue
        if isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on local data and reply with the new weights."""
    run_config = dict(context.run_config)
    settings = RunSettings.from_run_config(run_config)
    task = load_task(settings.task)
    server_round = int(msg.content["config"]["server-round"])
    partition_id, _ = _partition(context)
    raw, data, provenance = _local_data(task, settings, run_config, context)
    role = attack_role(settings.attack, settings.attack_params, partition_id=partition_id,
                       num_clients=settings.num_clients, num_malicious=settings.num_malicious, seed=settings.seed)
    rng = np.random.default_rng([settings.seed, partition_id, server_round])
    train_seed = int(rng.integers(2**62))

    model = _model(task, run_config)
    load_arrays(model, msg.content["arrays"])
    global_vector = flat_vector(model)
    attack_context = None
    if role is not None and role.malicious:
        attack_context = _attack_context(role, run_config, context, server_round, global_vector)
    if server_round < settings.attack_start_round:
        role = None  # honest until the attack starts
    if role is not None and role.transforms_data:
        x, y = _call_hook(role.attack.poison_data, data.x, data.y, num_classes=data.num_classes,
                          image_shape=data.image_shape, rng=rng, context=attack_context)
        data = raw = data.with_arrays(x, y)
    audit_metrics: dict = {}
    attacker = role is not None and role.malicious and not getattr(role.attack, "targets_honest", False)
    if settings.data_audit != "off" and not attacker:  # an attacker does not clean its own poison
        data, audit_metrics = _audit(settings, data, partition_id, server_round)
        raw = data  # what the audit kept

    # Every task's train draws from torch's global generator: seeded per (seed, partition, round).
    # (torch.manual_seed would also seed every other backend, which costs more than a small model's step.)
    torch.default_generator.manual_seed(train_seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(train_seed)
    started = time.perf_counter()
    # The task's own dataset when nothing transformed it, else the transformed arrays (an ArrayDataset).
    task_metrics = task.train(model, raw, run_config, training_device(context.node_config))
    train_seconds = time.perf_counter() - started
    update = flat_vector(model) - global_vector
    generator = torch.default_generator  # continues where training left it: reproducible
    if role is not None and role.transforms_update:
        update = _call_hook(role.attack.poison_update, update, rng=generator, context=attack_context)
    if settings.dp == "client":
        update = privatize_update(update, clip_norm=settings.clip_norm, noise_multiplier=settings.noise_multiplier,
                                  generator=generator)
    load_flat_vector(model, global_vector + update)

    metrics = {"num-examples": len(data), **_reply_metrics(task_metrics), "partition-id": partition_id,
               "train-seconds": train_seconds, **audit_metrics}
    reply = RecordDict({"arrays": to_arrays(model), "metrics": MetricRecord(metrics),
                        "provenance": ConfigRecord(provenance)})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's local data (federated evaluation)."""
    run_config = dict(context.run_config)
    settings = RunSettings.from_run_config(run_config)
    task = load_task(settings.task)
    raw, data, _ = _local_data(task, settings, run_config, context)
    model = _model(task, run_config)
    load_arrays(model, msg.content["arrays"])
    metrics = task.evaluate(model, raw, training_device(context.node_config))
    values = {"num-examples": len(data), **_reply_metrics(metrics)}
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
