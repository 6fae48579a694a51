"""Flat parameter vectors: the bridge between Flower's ArrayRecord and the aggregators' (n, d) stacks.

A model is aggregated as it is:

* **Floating-point entries** (parameters and float buffers, BatchNorm's running mean and
  variance included) form the flat vector the robust rule aggregates, in ``state_dict`` order.
  The vector is float64 when any entry is float64, else float32, and every entry goes back in
  its own dtype. bfloat16 entries travel as float32 (``client.wire``); when the server knows the
  model's dtypes it rounds the aggregate back to bfloat16, so the global model holds exactly
  what a bfloat16 model can. Running statistics (``running_mean``, ``running_var``) are in the
  vector and aggregated by the rule, but the server optimizer applies no momentum or adaptive
  step to them (``ParamSpec.statistics_mask``).
* **Integer and boolean entries** (BatchNorm's ``num_batches_tracked``) are not averaged as
  floats. Their rule: each element becomes the *lower median* of the accepted clients' values
  (the middle value, the lower of the two middle ones for an even count). A median is what a
  minority of clients cannot move, it is always a value some client sent, and for a step
  counter it tracks how far a typical client got.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

#: State-dict names of running statistics (torch's BatchNorm, InstanceNorm and their kin).
RUNNING_STATISTICS = frozenset({"running_mean", "running_var"})


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of a model's arrays, in a fixed order.

    Attributes
    ----------
    keys : tuple[str, ...]
        Array names, in the record's order.
    shapes : tuple[tuple[int, ...], ...]
        Shape of each array.
    dtypes : tuple[str, ...]
        NumPy dtype name of each array on the wire.
    model_dtypes : tuple[str, ...]
        The model's own dtype of each entry when it differs from the wire's (``"bfloat16"``),
        else the wire dtype.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    model_dtypes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.model_dtypes:
            object.__setattr__(self, "model_dtypes", self.dtypes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each array."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def float_keys(self) -> tuple[str, ...]:
        """The floating-point entries: what the flat vector holds."""
        return tuple(k for k, d in zip(self.keys, self.dtypes) if np.dtype(d).kind == "f")

    @property
    def other_keys(self) -> tuple[str, ...]:
        """Integer and boolean entries, combined by the lower-median rule."""
        return tuple(k for k, d in zip(self.keys, self.dtypes) if np.dtype(d).kind != "f")

    @property
    def dim(self) -> int:
        """Length of the flat vector."""
        sizes = dict(zip(self.keys, self.sizes))
        return sum(sizes[k] for k in self.float_keys)

    @property
    def vector_dtype(self) -> torch.dtype:
        """float64 when any floating-point entry is float64, else float32."""
        return torch.float64 if any(d == "float64" for k, d in zip(self.keys, self.dtypes)
                                    if k in self.float_keys) else torch.float32

    @functools.cached_property
    def statistics_mask(self) -> torch.Tensor:
        """``(dim,)`` bool: the flat vector's coordinates that hold running statistics.

        torch's normalisation layers name them ``running_mean`` and ``running_var`` in the state
        dict; the server optimizer applies the aggregate to them as it is (``ServerOptimizer.step``).
        """
        sizes = dict(zip(self.keys, self.sizes))
        parts = [torch.full((sizes[k],), k.rsplit(".", 1)[-1] in RUNNING_STATISTICS, dtype=torch.bool)
                 for k in self.float_keys]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def entry(self, key: str) -> tuple[tuple[int, ...], str, str]:
        """(shape, wire dtype, model dtype) of one entry."""
        i = self.keys.index(key)
        return self.shapes[i], self.dtypes[i], self.model_dtypes[i]

    @classmethod
    def of(cls, arrays: ArrayRecord, model_dtypes: Mapping[str, torch.dtype | str] | None = None) -> ParamSpec:
        """The spec of a trusted ArrayRecord (the server's own global model).

        Parameters
        ----------
        arrays : ArrayRecord
            The global model.
        model_dtypes : Mapping, optional
            The model's own dtype per entry (``client.wire.dtypes_of(model)``), so that bfloat16
            entries are rounded back to bfloat16 after aggregation.
        """
        decoded = {key: arr.numpy() for key, arr in arrays.items()}
        wire = tuple(a.dtype.name for a in decoded.values())
        names = {k: str(v).replace("torch.", "") for k, v in (model_dtypes or {}).items()}
        return cls(tuple(decoded), tuple(tuple(a.shape) for a in decoded.values()), wire,
                   tuple(names.get(k, d) for k, d in zip(decoded, wire)))


def arrays_to_vector(arrays: ArrayRecord, spec: ParamSpec) -> torch.Tensor:
    """Flatten the floating-point entries of a trusted ArrayRecord into a CPU vector of ``spec.vector_dtype``."""
    dtype = np.float64 if spec.vector_dtype == torch.float64 else np.float32
    parts = [np.asarray(arrays[key].numpy(), dtype=dtype).reshape(-1) for key in spec.float_keys]
    if not parts:
        return torch.empty(0, dtype=spec.vector_dtype)
    return torch.from_numpy(np.concatenate(parts))


def other_entries(arrays: ArrayRecord, spec: ParamSpec) -> dict[str, np.ndarray]:
    """The integer and boolean entries of a trusted ArrayRecord."""
    return {key: arrays[key].numpy() for key in spec.other_keys}


def lower_median(values: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise lower median of same-shaped integer arrays (the rule for integer buffers)."""
    stack = np.stack([np.asarray(v) for v in values])
    ordered = np.sort(stack, axis=0)
    return ordered[(len(values) - 1) // 2]


def vector_to_arrays(vector: torch.Tensor, spec: ParamSpec, others: Mapping[str, np.ndarray] | None = None) -> ArrayRecord:
    """An ArrayRecord with ``spec``'s names, shapes and dtypes from a flat vector and the other entries.

    Floating-point entries come from ``vector`` (bfloat16 model entries rounded to bfloat16 and
    sent as float32); integer and boolean entries from ``others``.
    """
    # In the vector's own dtype: float32 and float64 values go to any float wire dtype the same
    # way from there as through float64 (float64 holds them exactly), without a float64 copy.
    flat = vector.detach().to("cpu")
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float64)
    record = ArrayRecord()
    offset = 0
    sizes = dict(zip(spec.keys, spec.sizes))
    float_keys = set(spec.float_keys)
    for key in spec.keys:
        shape, wire, model_dtype = spec.entry(key)
        if key not in float_keys:
            if others is None or key not in others:
                raise ValueError(f"vector_to_arrays: no value for the non-float entry {key!r}")
            record[key] = Array(np.ascontiguousarray(np.asarray(others[key], dtype=wire).reshape(shape)))
            continue
        size = sizes[key]
        part = flat[offset : offset + size].reshape(shape)
        offset += size
        if model_dtype == "bfloat16":
            part = part.to(torch.bfloat16).to(torch.float64)
        values = part.numpy()
        record[key] = Array(np.ascontiguousarray(values if values.dtype == np.dtype(wire) else values.astype(wire)))
    return record
