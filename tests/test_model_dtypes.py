"""Models are aggregated as they are: BatchNorm statistics, integer counters, float64 and bfloat16.

Specification (RobustStrategy on real Flower Messages built from real torch models):
BatchNorm running statistics are aggregated by the rule like any float entry; integer buffers
(``num_batches_tracked``) take the lower median of the accepted replies, never a float mean;
a float64 model keeps float64 and its precision (updates far below float32's resolution
survive); a bfloat16 model's aggregate is exactly representable in bfloat16 and loads back
as bfloat16.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from client.wire import dtypes_of, load_arrays, to_arrays
from server.strategy import RobustStrategy

NODES = [11, 12, 13, 14, 15]


pytestmark = pytest.mark.usefixtures("task_identity")


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2)).eval()


def one_round(global_model: nn.Module, client_models: dict[int, nn.Module], aggregator: str, **kwargs):
    strategy = RobustStrategy(aggregator, num_byzantine=1, seed=0, model_dtypes=dtypes_of(global_model), **kwargs)
    messages = {m.metadata.dst_node_id: m
                for m in strategy.prepare_round(1, to_arrays(global_model), ConfigRecord(), list(client_models))}
    replies = [Message(RecordDict({"arrays": to_arrays(model), "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=messages[node]) for node, model in client_models.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None, strategy.last_record
    return arrays, strategy.last_record


def perturbed(model: nn.Module, seed: int, scale: float, steps: int) -> nn.Module:
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in out.state_dict().values():
            if value.is_floating_point():
                value.add_(scale * torch.randn(value.shape, generator=generator).to(value.dtype))
    for module in out.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(steps)
    return out


def test_batchnorm_statistics_go_through_the_rule_and_counters_take_the_lower_median():
    model = bn_model()
    model(torch.zeros(1, 2, 5, 5))  # materialise the lazy layer
    clients = {node: perturbed(model, node, 0.1, steps=10 * (i + 1)) for i, node in enumerate(NODES)}
    arrays, record = one_round(model, clients, "median")
    assert sorted(record["accepted"]) == NODES
    state = arrays.to_torch_state_dict()
    for key in ("1.running_mean", "1.running_var", "1.weight"):
        stacked = torch.stack([c.state_dict()[key] for c in clients.values()])
        assert torch.allclose(state[key], stacked.median(dim=0).values, atol=1e-6), key
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert int(state["1.num_batches_tracked"]) == 30  # lower median of 10, 20, 30, 40, 50
    loaded = bn_model()
    loaded(torch.zeros(1, 2, 5, 5))
    load_arrays(loaded, arrays)
    assert loaded[1].num_batches_tracked.dtype == torch.int64


def test_an_even_count_takes_the_lower_of_the_two_middle_counters():
    model = bn_model()
    model(torch.zeros(1, 2, 5, 5))
    clients = {node: perturbed(model, node, 0.01, steps=s) for node, s in zip(NODES[:4], (7, 1, 9, 4))}
    arrays, _ = one_round(model, clients, "mean")
    assert int(arrays.to_torch_state_dict()["1.num_batches_tracked"]) == 4


def test_a_float64_model_keeps_float64_and_its_precision():
    torch.manual_seed(0)
    model = nn.Linear(8, 3).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    # Updates of 1e-10 are far below float32's resolution at 1.0 (6e-8): only a float64 path keeps them.
    clients = {node: perturbed(model, node, 1e-10, steps=0) for node in NODES}
    arrays, _ = one_round(model, clients, "mean")
    state = arrays.to_torch_state_dict()
    assert state["weight"].dtype == torch.float64
    expected = torch.stack([c.weight.detach() for c in clients.values()]).mean(dim=0)
    assert torch.allclose(state["weight"], expected, rtol=0, atol=1e-15)  # float64 resolution at 1.0: 2e-16
    assert float((state["weight"] - 1.0).abs().max()) > 0


def test_a_bfloat16_model_comes_back_as_bfloat16():
    torch.manual_seed(0)
    model = nn.Linear(16, 4).to(torch.bfloat16)
    record = to_arrays(model)
    assert record["weight"].dtype == "float32"  # NumPy has no bfloat16: it travels as float32
    clients = {node: perturbed(model, node, 0.05, steps=0) for node in NODES}
    arrays, _ = one_round(model, clients, "trimmed-mean")
    weight = torch.from_numpy(arrays["weight"].numpy())
    assert torch.equal(weight, weight.to(torch.bfloat16).float())  # exactly representable
    loaded = nn.Linear(16, 4).to(torch.bfloat16)
    load_arrays(loaded, arrays)
    assert loaded.weight.dtype == torch.bfloat16
    assert not torch.equal(loaded.weight, model.weight)


def test_a_reply_that_changes_an_integer_buffers_dtype_is_rejected():
    model = bn_model()
    model(torch.zeros(1, 2, 5, 5))
    clients = {node: perturbed(model, node, 0.01, steps=3) for node in NODES}
    strategy = RobustStrategy("median", num_byzantine=1, seed=0)
    messages = {m.metadata.dst_node_id: m for m in strategy.prepare_round(1, to_arrays(model), ConfigRecord(), NODES)}
    replies = []
    for node, client in clients.items():
        arrays = to_arrays(client)
        if node == NODES[0]:
            from flwr.app import Array

            arrays["1.num_batches_tracked"] = Array(np.array(3.5))
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})}),
                               reply_to=messages[node]))
    strategy.aggregate_train(1, replies)
    assert "dtype float64, expected int64" in strategy.last_record["rejected"][str(NODES[0])]
