"""quickstart-phalanx: the task, in the shape of Flower's quickstart-pytorch task.py.

A small CNN with BatchNorm, trained on a generated CIFAR-10-shaped dataset (offline: the
images come from Phalanx's generator; online, swap in ``FederatedDataset(dataset="uoft-cs/cifar10")``
as Flower's template does). Partitions are cut with flwr-datasets' IidPartitioner.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.generated_images import generate_images


class Net(nn.Module):
    """Two conv layers with BatchNorm, then two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


_partitioner: IidPartitioner | None = None
_IMAGES = None


def _images():
    global _IMAGES
    if _IMAGES is None:
        _IMAGES = generate_images()
    return _IMAGES


def load_data(partition_id: int, num_partitions: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """This client's train and validation loaders (80/20 of its IID partition)."""
    global _partitioner
    x, y = _images()
    if _partitioner is None or _partitioner.num_partitions != num_partitions:
        _partitioner = IidPartitioner(num_partitions=num_partitions)
        _partitioner.dataset = Dataset.from_dict({"index": np.arange(len(y)), "label": y}).shuffle(seed=42)
    index = np.sort(np.asarray(_partitioner.load_partition(partition_id)["index"]))
    cut = int(0.8 * len(index))
    train = TensorDataset(torch.from_numpy(x[index[:cut]]), torch.from_numpy(y[index[:cut]]))
    val = TensorDataset(torch.from_numpy(x[index[cut:]]), torch.from_numpy(y[index[cut:]]))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)


def load_centralized_dataset() -> DataLoader:
    """A held-out set for the server (other images from the same generator)."""
    x, y = generate_images(500, seed=7)
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=128)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """Train the model on the training set; return the mean training loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net: nn.Module, testloader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Validate the model on the test set; return (loss, accuracy)."""
    net.to(device)
    net.eval()
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (torch.max(outputs.data, 1)[1] == labels.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
