"""The task interface: built-in tasks, a user's task module, and what Phalanx infers of its data.

Specification: run-config ``task`` resolves a built-in name, ``package.module`` or
``package.module:attr``; a task lacking a required function is refused naming it; Phalanx's
default train/evaluate work on any (x, y) dataset, with mixed precision on CPU; image shapes
are inferred or declared; the default task keeps the digits MLP of earlier versions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from client.task import BUILTIN_TASKS, Task, as_arrays, load_task
from client.training import default_evaluate, default_train, training_device

BUILTINS = {"digits-mlp": ((64,), 4810), "digits-cnn": ((1, 8, 8), 6186), "images-cnn": ((3, 32, 32), 14826),
            "resnet18": ((3, 32, 32), 11_173_962)}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_tasks_build_their_model_on_their_data(name):
    task = load_task(name)
    config = {"dataset": "auto", "lr": 0.0}
    test = task.load_test(config)
    shape, parameters = BUILTINS[name]
    assert test.sample_shape == shape and test.num_classes == 10
    model = task.build_model(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    with torch.no_grad():
        logits = model.eval()(torch.as_tensor(test.x[:2]))
    assert logits.shape == (2, 10)
    assert task.effective_config(config)["lr"] > 0  # lr 0 means the task's own default


def test_resnet18_carries_batchnorm_statistics_and_integer_counters():
    state = load_task("resnet18").build_model({"dataset": "auto"}).state_dict()
    assert any(k.endswith("running_var") for k in state)
    counters = [k for k, v in state.items() if not v.is_floating_point()]
    assert counters and all(k.endswith("num_batches_tracked") for k in counters)


def test_the_default_task_is_the_digits_mlp_on_flat_features():
    assert set(BUILTIN_TASKS) >= {"digits-mlp", "digits-cnn", "images-cnn", "resnet18"}
    task = load_task("digits-mlp")
    part = task.load_partition(0, 10, {"dataset": "auto", "alpha": 0.0, "seed": 0})
    assert part.x.shape[1:] == (64,) and part.image_shape == (1, 8, 8)
    assert task.effective_config({"lr": 0.0})["lr"] == 0.3


def test_a_conv_task_on_flat_data_is_refused_with_a_pointer():
    with pytest.raises(ValueError, match="digits-cnn.*flat features"):
        load_task("digits-cnn").load_test({"dataset": "synthetic"})


def test_a_users_module_is_a_task():
    task = load_task("tests.user_task")
    test = task.load_test({})
    info = task.data_info(test)
    assert info.sample_shape == (2, 12, 12) and info.image_shape == (2, 12, 12) and info.num_classes == 2
    assert info.feature_range is None  # not declared: the data audit says it cannot check ranges
    assert task.effective_config({"lr": 0})["lr"] == 0.1  # the module's own defaults
    assert not task.has_own_train and not task.has_own_evaluate


def test_a_users_class_with_its_own_loops_is_a_task():
    task = load_task("tests.user_task:WithOwnLoops")
    assert task.has_own_train and task.has_own_evaluate
    model = task.build_model({})
    torch.manual_seed(0)
    metrics = task.train(model, task.load_partition(0, 2, {}), {"lr": 0.1, "local-epochs": 1}, torch.device("cpu"))
    assert set(metrics) == {"train_loss", "steps"} and np.isfinite(metrics["train_loss"])
    assert set(task.evaluate(model, task.load_test({}), torch.device("cpu"))) == {"loss", "accuracy"}


def test_an_incomplete_or_unknown_task_is_refused_naming_what_is_missing():
    class NoData:
        def build_model(self, run_config):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"lacks \['load_partition', 'load_test'\]"):
        Task(NoData(), "no-data")
    with pytest.raises(ValueError, match="cannot import 'no_such_package.task'.*digits-mlp"):
        load_task("no_such_package.task")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        load_task("tests.user_task:Missing")


def test_default_train_and_evaluate_learn_any_tensor_dataset():
    task = load_task("tests.user_task")
    model = task.build_model({})
    torch.manual_seed(0)
    before = default_evaluate(model, task.load_test({}), torch.device("cpu"))
    for partition in range(4):
        metrics = default_train(model, task.load_partition(partition, 4, {}),
                                {"lr": 0.1, "local-epochs": 3, "batch-size": 16}, torch.device("cpu"))
        assert np.isfinite(metrics["train-loss"])
    after = default_evaluate(model, task.load_test({}), torch.device("cpu"))
    assert after["accuracy"] > max(0.9, before["accuracy"])


def test_mixed_precision_trains_on_the_cpu():
    """``amp = true``: bfloat16 autocast on CPU (float16 with loss scaling on CUDA)."""
    task = load_task("tests.user_task")
    model = task.build_model({})
    torch.manual_seed(0)
    metrics = default_train(model, task.load_partition(0, 1, {}), {"lr": 0.1, "amp": True, "local-epochs": 2},
                            torch.device("cpu"))
    assert np.isfinite(metrics["train-loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32 under autocast


def test_the_node_config_chooses_the_device():
    assert training_device({"device": "cpu"}) == torch.device("cpu")
    assert training_device({}) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            training_device({"device": "cuda:1"})


def test_datasets_become_arrays_for_attacks_and_the_audit():
    dataset = TensorDataset(torch.randn(10, 3, 4, 4), torch.arange(10) % 3)
    x, y = as_arrays(dataset)
    assert x.shape == (10, 3, 4, 4) and y.dtype == np.int64
