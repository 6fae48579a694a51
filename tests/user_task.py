"""A user's own task module, as a Flower template's task.py would be (used by tests/test_tasks.py).

A tiny CNN with BatchNorm on two-channel 12x12 images of two classes (a bright left or right
half plus noise), held in torch TensorDatasets. No ``train``/``evaluate``: Phalanx's defaults
apply. ``WithOwnLoops`` (``tests.user_task:WithOwnLoops``) brings its own, Flower-style,
returning ``train_loss``.
"""

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

defaults = {"lr": 0.1}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def _images(num: int, seed: int) -> TensorDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, num)
    x = rng.normal(0.0, 0.3, (num, 2, 12, 12)).astype(np.float32)
    x[y == 0, :, :, :6] += 1.0
    x[y == 1, :, :, 6:] += 1.0
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def build_model(run_config):
    return Net()


def load_partition(partition_id, num_partitions, run_config):
    return _images(60, seed=1000 + partition_id)


def load_test(run_config):
    return _images(200, seed=7)


class WithOwnLoops:
    """The same task with the user's own train and evaluate (Flower-style metric names)."""

    num_classes = 2
    defaults = {"lr": 0.05}
    build_model = staticmethod(build_model)
    load_partition = staticmethod(load_partition)
    load_test = staticmethod(load_test)

    @staticmethod
    def train(model, dataset, run_config, device):
        model.to(device).train()
        optimiser = torch.optim.SGD(model.parameters(), lr=float(run_config["lr"]), momentum=0.9)
        losses = []
        for _ in range(int(run_config.get("local-epochs", 1))):
            for x, y in torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True):
                optimiser.zero_grad()
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
        return {"train_loss": float(np.mean(losses)), "steps": len(losses)}

    @staticmethod
    def evaluate(model, dataset, device):
        model.to(device).eval()
        x, y = dataset.tensors
        with torch.no_grad():
            logits = model(x.to(device))
        return {"loss": nn.functional.cross_entropy(logits, y).item(),
                "accuracy": (logits.argmax(1) == y).float().mean().item()}
