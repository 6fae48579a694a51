"""Models on the wire: a model's state as a Flower ``ArrayRecord`` and as a flat update vector.

Flower's ``ArrayRecord`` carries NumPy arrays, and NumPy has no bfloat16. So bfloat16 tensors
travel as float32 (every bfloat16 value is exactly a float32 one) and are cast back when they are
loaded into the model (``load_state_dict`` copies into the parameter's own dtype); every other
dtype travels as it is. :func:`to_arrays` and :func:`load_arrays` are the two directions.

Robust aggregation works on one flat vector per client. It holds the model's floating-point
state entries (parameters and float buffers such as BatchNorm's running mean and variance), in
``state_dict`` order, in float64 when any entry is float64 and float32 otherwise. Integer and
boolean buffers (BatchNorm's ``num_batches_tracked``) are not in it: the server combines them
by their own documented rule (``server.params``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord
from torch import nn

#: dtypes sent as another dtype (NumPy lacks them).
WIRE_DTYPES = {torch.bfloat16: torch.float32}


def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state


def to_arrays(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A model's ``state_dict`` (or a state dict) as an ArrayRecord, bfloat16 sent as float32."""
    record = ArrayRecord()
    for key, tensor in _state(model_or_state).items():
        tensor = tensor.detach().cpu()
        wire = WIRE_DTYPES.get(tensor.dtype)
        record[key] = Array(tensor.to(wire).numpy() if wire is not None else tensor.numpy())
    return record


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ArrayRecord into ``model``; each entry takes the model's own dtype and device."""
    model.load_state_dict(arrays.to_torch_state_dict())


def dtypes_of(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """The dtype of every state entry (what the server rounds a bfloat16 aggregate to)."""
    return {key: tensor.dtype for key, tensor in _state(model_or_state).items()}


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating-point entries of a state dict, in order: what the flat vector holds."""
    return [key for key, tensor in state.items() if tensor.is_floating_point()]


def vector_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """float64 when any floating-point entry is float64, else float32."""
    return torch.float64 if any(state[k].dtype == torch.float64 for k in float_keys(state)) else torch.float32


def flat_vector(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's floating-point state as one flat CPU vector (see the module docstring)."""
    state = _state(model_or_state)
    dtype = vector_dtype(state)
    keys = float_keys(state)
    if not keys:
        return torch.empty(0, dtype=dtype)
    return torch.cat([state[k].detach().reshape(-1).cpu().to(dtype) for k in keys])


def load_flat_vector(model: nn.Module, vector: torch.Tensor) -> None:
    """Write a flat vector (laid out as :func:`flat_vector`) back into the model's floating-point state."""
    state = model.state_dict()
    keys = float_keys(state)
    expected = sum(state[k].numel() for k in keys)
    if vector.numel() != expected:
        raise ValueError(f"flat vector has {vector.numel()} values, the model's floating-point state has {expected}")
    offset, update = 0, {}
    for key in keys:
        value = state[key]
        update[key] = vector[offset : offset + value.numel()].reshape(value.shape).to(value.dtype)
        offset += value.numel()
    model.load_state_dict(update, strict=False)
