"""The Phalanx ClientApp: validated local data, local training, an update sent back.

The client trains on CUDA when present (else CPU) with the run config's ``local-epochs``,
``lr`` and ``batch-size``, and replies with its weights, ``num-examples`` and its train loss.
With ``dp = "client"`` it clips its update to ``clip-norm`` and adds Gaussian noise before
sending. Attack hooks (``client.hooks``) are filled only when the config names an attack.
"""

from __future__ import annotations

import numpy as np
import torch
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import Dataset, load_partition, server_test_split
from client.integrity import load_verified_npz
from client.hooks import attack_role
from client.model import build_model, training_device
from client.train import evaluate as evaluate_model
from client.train import train as train_model
from client.data_audit import apply_policy, audit_dataset
from server.privacy import privatize_update
from server.settings import RunSettings

app = ClientApp()

# A client process trains one small model at a time: one thread avoids oversubscribing the
# cores that the simulation engine's other actors share.
torch.set_num_threads(1)


def _local_data(settings: RunSettings, context: Context) -> tuple[Dataset, int, dict[str, str]]:
    """This client's training data, verified when it comes from files, and where it came from."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    data_dir = str(context.node_config.get("data-dir", settings.data_dir))
    if not data_dir:
        data = load_partition(settings.dataset, partition_id, num_partitions, settings.alpha, settings.seed)
        return data, partition_id, {"data-source": f"{settings.dataset} partition {partition_id}/{num_partitions}",
                                    "data-digest": data.digest()}
    # Files: the schema (classes, image shape, feature range) is the named dataset's.
    schema = server_test_split(settings.dataset)
    path = Path(data_dir.replace("{partition-id}", str(partition_id))).expanduser() / "train.npz"
    x, y, manifest_digest = load_verified_npz(
        path,
        public_key=Path(settings.data_public_key) if settings.data_public_key else None,
        require_signature=settings.require_signed_data,
        num_classes=schema.num_classes,
        feature_range=schema.feature_range,
    )
    data = Dataset(x, y, schema.num_classes, schema.image_shape, schema.feature_range)
    return data, partition_id, {"data-source": str(path), "data-digest": data.digest(),
                                "manifest-digest": manifest_digest}


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu().float() for p in model.state_dict().values()])


def _load_flat(model: torch.nn.Module, vector: torch.Tensor) -> None:
    state, offset = {}, 0
    for key, value in model.state_dict().items():
        state[key] = vector[offset : offset + value.numel()].reshape(value.shape).to(value.dtype)
        offset += value.numel()
    model.load_state_dict(state)


def _audit(
    settings: RunSettings, data: Dataset, x: np.ndarray, y: np.ndarray, partition_id: int, server_round: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Audit the local training data before training; only counts leave the client.

    With ``drop-and-review`` the per-sample evidence goes to a local review file for the data
    owner (``<out>/data-audit/partition-<id>-round-<r>.json``), never to the server.
    """
    report = audit_dataset(x, y, num_classes=data.num_classes, image_shape=data.image_shape,
                           feature_range=data.feature_range, seed=settings.seed)
    review = None
    if settings.data_audit == "drop-and-review":
        review = settings.out_dir / "data-audit" / f"partition-{partition_id}-round-{server_round}.json"
        review.parent.mkdir(parents=True, exist_ok=True)
    x, y = apply_policy(x, y, report, settings.data_audit, review_path=review)
    if len(y) == 0:
        raise ValueError(f"data audit ({settings.data_audit}) dropped every sample of partition {partition_id}")
    return x, y, report.metrics()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on local data and reply with the new weights."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    server_round = int(msg.content["config"]["server-round"])
    data, partition_id, provenance = _local_data(settings, context)
    x, y = data.x, data.y
    role = attack_role(settings.attack, settings.attack_params, partition_id=partition_id,
                       num_clients=settings.num_clients, num_malicious=settings.num_malicious, seed=settings.seed)
    if server_round < settings.attack_start_round:
        role = None
    rng = np.random.default_rng([settings.seed, partition_id, server_round])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    if role is not None and role.transforms_data:
        x, y = role.attack.poison_data(x, y, num_classes=data.num_classes, image_shape=data.image_shape, rng=rng)
    audit_metrics: dict = {}
    attacker = role is not None and role.malicious and not getattr(role.attack, "targets_honest", False)
    if settings.data_audit != "off" and not attacker:  # an attacker does not clean its own poison
        x, y, audit_metrics = _audit(settings, data, x, y, partition_id, server_round)

    device = training_device()
    model = build_model(data.num_features, data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    global_vector = _flat(model)
    loss = train_model(model, x, y, epochs=settings.local_epochs, lr=settings.lr,
                       batch_size=settings.batch_size, device=device, generator=generator)
    update = _flat(model) - global_vector

    if role is not None and role.transforms_update:
        update = role.attack.poison_update(update, rng=generator)
    if settings.dp == "client":
        update = privatize_update(update, clip_norm=settings.clip_norm, noise_multiplier=settings.noise_multiplier,
                                  generator=generator)
    _load_flat(model, global_vector + update)

    metrics = {"num-examples": len(y), "train-loss": float(loss), "partition-id": partition_id, **audit_metrics}
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics),
                        "provenance": ConfigRecord(provenance)})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's local data."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    data, _, _ = _local_data(settings, context)
    model = build_model(data.num_features, data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = evaluate_model(model, data.x, data.y, training_device())
    metrics = MetricRecord({"num-examples": len(data.y), "eval-loss": loss, "eval-acc": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
