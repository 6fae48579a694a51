"""Flat parameter vectors: the bridge between Flower's ArrayRecord and the aggregators' (n, d) stacks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of a model's arrays, in a fixed order.

    Attributes
    ----------
    keys : tuple[str, ...]
        Array names, in the order they are laid out in the flat vector.
    shapes : tuple[tuple[int, ...], ...]
        Shape of each array.
    dtypes : tuple[str, ...]
        NumPy dtype name of each array.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each array."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def dim(self) -> int:
        """Length of the flat vector."""
        return sum(self.sizes)

    @classmethod
    def of(cls, arrays: ArrayRecord) -> ParamSpec:
        """The spec of a trusted ArrayRecord (the server's own global model)."""
        decoded = {key: arr.numpy() for key, arr in arrays.items()}
        return cls(
            tuple(decoded),
            tuple(tuple(a.shape) for a in decoded.values()),
            tuple(a.dtype.name for a in decoded.values()),
        )


def arrays_to_vector(arrays: ArrayRecord, spec: ParamSpec) -> torch.Tensor:
    """Flatten a trusted ArrayRecord laid out as ``spec`` into a float32 CPU vector."""
    parts = [np.asarray(arrays[key].numpy(), dtype=np.float32).reshape(-1) for key in spec.keys]
    return torch.from_numpy(np.concatenate(parts))


def vector_to_arrays(vector: torch.Tensor, spec: ParamSpec) -> ArrayRecord:
    """Split a flat vector back into an ArrayRecord with ``spec``'s names, shapes and dtypes."""
    flat = vector.detach().to("cpu", torch.float64).numpy()
    record = ArrayRecord()
    offset = 0
    for key, shape, dtype, size in zip(spec.keys, spec.shapes, spec.dtypes, spec.sizes):
        record[key] = Array(np.ascontiguousarray(flat[offset : offset + size].reshape(shape).astype(dtype)))
        offset += size
    return record
