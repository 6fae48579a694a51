"""The built-in tasks: a model family on a built-in dataset.

=============  ==========================  =============================  =========
name           model                        default dataset                lr (0 =)
=============  ==========================  =============================  =========
``digits-mlp`` :func:`client.models.mlp`    ``digits`` (flat 64 features)  0.3
``digits-cnn`` :class:`~client.models.DigitsCNN`  ``digits`` (1 x 8 x 8)   0.1
``images-cnn`` :class:`~client.models.ImagesCNN`  ``images`` (3 x 32 x 32) 0.1
``resnet18``   :func:`client.models.resnet18`     ``images`` (3 x 32 x 32) 0.05
=============  ==========================  =============================  =========

Run-config ``dataset`` picks other data for the same model: ``auto`` (the task's own),
``digits``, ``synthetic``, ``images`` or ``hf:<hub name>``. The perceptron takes any dataset
(flattened); the conv nets need images. Partitions come from the run's ``partitioner``,
``alpha``, ``seed`` and ``classes-per-partition``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from client.data import ArrayDataset, load_partition, server_test_split
from client.models import DigitsCNN, ImagesCNN, mlp, resnet18


@dataclass(frozen=True)
class BuiltinTask:
    """A model family trained on a built-in dataset (the default ``train`` and ``evaluate``).

    Attributes
    ----------
    name : str
        Registry name.
    default_dataset : str
        What ``dataset = "auto"`` means for this task.
    flat : bool
        The model takes flat feature rows (else (C, H, W) images).
    make_model : Callable[[tuple[int, ...], int], nn.Module]
        ``(sample_shape, num_classes) -> model``.
    defaults : dict
        Recommended run-config values (``lr`` when the run config leaves it at 0).
    """

    name: str
    default_dataset: str
    flat: bool
    make_model: Callable[[tuple[int, ...], int], nn.Module]
    defaults: dict = field(default_factory=dict)

    def dataset_name(self, run_config: Mapping[str, Any]) -> str:
        """The dataset this run uses."""
        name = str(run_config.get("dataset", "auto") or "auto")
        return self.default_dataset if name == "auto" else name

    def _shaped(self, data: ArrayDataset, name: str) -> ArrayDataset:
        if self.flat:
            return data.flat()
        if data.image_shape is None:
            raise ValueError(f"task {self.name!r} trains a conv net on images; dataset {name!r} has flat "
                             f"features of shape {data.sample_shape} (use digits-mlp, or an image dataset)")
        return data.as_images()

    def build_model(self, run_config: Mapping[str, Any]) -> nn.Module:
        test = self.load_test(run_config)
        return self.make_model(test.sample_shape, test.num_classes)

    def load_partition(self, partition_id: int, num_partitions: int, run_config: Mapping[str, Any]) -> ArrayDataset:
        name = self.dataset_name(run_config)
        data = load_partition(name, partition_id, num_partitions, float(run_config.get("alpha", 0.0)),
                              int(run_config.get("seed", 0)), str(run_config.get("partitioner", "auto")),
                              int(run_config.get("classes-per-partition", 2)))
        return self._shaped(data, name)

    def load_test(self, run_config: Mapping[str, Any]) -> ArrayDataset:
        name = self.dataset_name(run_config)
        return self._shaped(server_test_split(name), name)


DIGITS_MLP = BuiltinTask("digits-mlp", "digits", True, lambda shape, classes: mlp(shape[0], classes), {"lr": 0.3})
DIGITS_CNN = BuiltinTask("digits-cnn", "digits", False, lambda shape, classes: DigitsCNN(shape[0], classes),
                         {"lr": 0.1})
IMAGES_CNN = BuiltinTask("images-cnn", "images", False, lambda shape, classes: ImagesCNN(shape[0], classes),
                         {"lr": 0.1})
RESNET18 = BuiltinTask("resnet18", "images", False, lambda shape, classes: resnet18(shape[0], classes),
                       {"lr": 0.05})
