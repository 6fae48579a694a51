"""Replies into one (n, d) update stack in few passes over the data.

A round at model scale (ResNet-18: 11.2M values a reply) is memory-bound: every pass over the
stack costs about as much as the robust rule's kernel. The server's own work around the kernel
therefore reads the stack as few times as it can, and never holds a float64 copy of it:

1. **decode and fill** (:func:`npy_view`, :func:`fill_row`): each reply's ``.npy`` payload is read
   in place (a view of the message's bytes, no per-client copy) and ``reply - global`` is written
   straight into its float32 (or float64) row of a preallocated stack, block by block, while each
   block is in cache its float64 sum of squares is taken: the L2 norm of every update, and the
   non-finite screen (a NaN or Inf anywhere makes the sum non-finite), in the same pass;
2. **hash** (:func:`sha256_row`): each accepted row's SHA-256, byte-identical to
   :func:`server.audit.sha256_tensor` of that row, in a worker thread (hashlib releases the GIL)
   while the next replies are decoded and the rule aggregates;
3. **score** (:func:`row_features`): dot product and distance to the aggregate per row, in float64
   over cache-sized blocks, reusing the norms of step 1.

Anything unusual about a reply's bytes (another ``.npy`` version, a byte order or dtype other than
the model's, Fortran order, short data) leaves the fast path: the validator then decodes it the
way it always did, so the rejection reason stays exactly the same.
"""

from __future__ import annotations

import hashlib
import io
import math
import mmap
import os
import re
import sys
import threading

import numpy as np
import torch

from aggregators.blocks import _single_threaded_blas, run_ranges, split_range

#: Elements of one float64 scratch block (1 MiB): small enough to stay in cache, large enough
#: that Python's per-call overhead is a few percent of the work.
BLOCK = 1 << 17
#: ``np.load``'s default bound on a ``.npy`` header (``numpy.lib.format``).
MAX_HEADER_SIZE = 10000


#: The header ``np.save`` writes (``numpy.lib.format``), read without ``ast.literal_eval``
#: (which cost 60 us an array: 0.15 s a round of 20 ResNet-18 replies). Any other header is
#: parsed by numpy itself.
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[a-z][0-9]+)', 'fortran_order': (False|True), "
                         rb"'shape': \(((?:[0-9]+, ?)*[0-9]*)\), \} *\n")
_DTYPES: dict[bytes, np.dtype] = {}


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, data offset) of a version 1.0/2.0 ``.npy`` header, or None."""
    if data[:6] != b"\x93NUMPY":
        return None
    if data[6:8] == b"\x01\x00":
        start, length = 10, int.from_bytes(data[8:10], "little")
    elif data[6:8] == b"\x02\x00":
        start, length = 12, int.from_bytes(data[8:12], "little")
    else:
        return None
    if length > MAX_HEADER_SIZE:
        return None
    header = data[start:start + length]
    match = _NPY_HEADER.fullmatch(header)
    if match is None:
        handle = io.BytesIO(data)
        version = np.lib.format.read_magic(handle)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(handle, max_header_size=MAX_HEADER_SIZE)
        return tuple(shape), bool(fortran), dtype, handle.tell()
    descr, fortran, dims = match.groups()
    dtype = _DTYPES.get(descr)
    if dtype is None:
        dtype = _DTYPES.setdefault(descr, np.dtype(descr.decode("ascii")))
    shape = tuple(int(x) for x in dims.split(b",") if x.strip())
    return shape, fortran == b"True", dtype, start + length


def npy_view(array, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
    """A read-only view of ``array``'s ``.npy`` payload when it is plainly a C-order ``dtype``
    array of ``shape``, with the data all there; None otherwise (decode it with ``array.numpy()``).

    The view shares the message's bytes: nothing is copied.
    """
    data = getattr(array, "data", None)
    if not isinstance(data, (bytes, bytearray)) or getattr(array, "stype", None) != "numpy.ndarray":
        return None
    try:
        header = _npy_header(data)
    except Exception:  # noqa: BLE001 - the slow path names the problem
        return None
    if header is None:
        return None
    found_shape, fortran, found_dtype, offset = header
    expected = np.dtype(dtype)
    if found_dtype != expected or found_dtype.hasobject or tuple(found_shape) != tuple(shape):
        return None
    if fortran and len(shape) > 1:
        return None
    count = math.prod(shape)
    if len(data) - offset < count * expected.itemsize:
        return None
    return np.frombuffer(data, dtype=expected, count=count, offset=offset).reshape(shape)


#: Stacks at least this large get their own mapping, populated when it is made.
HUGE_STACK_BYTES = 1 << 22


#: The last large stack's mapping, kept for the next round (see :func:`empty_stack`).
_cached_mapping: mmap.mmap | None = None
_cache_lock = threading.Lock()


def empty_stack(rows: int, d: int, dtype: torch.dtype, *, reuse: bool = True) -> torch.Tensor:
    """An uninitialised ``(rows, d)`` CPU tensor for one round's update stack.

    A large stack is its own anonymous mapping, made with ``MAP_POPULATE`` (the kernel maps its
    pages in one go instead of one trap per 4 KiB page as rows are first written: 20 rows of
    11.2M float32 filled in 0.45 s instead of 0.60-0.66 s here). With ``reuse`` the mapping is
    kept when the round is done and the next round's stack reuses it when it fits and nothing
    else holds a view of it any more (a rule's or a hook's reference keeps it theirs: the next
    round then maps a new one). Fresh memory is what a round at model scale pays most for on a
    VM that hands freed pages back to its host: at n = 100, d = 11.2M (a 4.5 GB stack), mapping
    it took 9.8 s beside the replies' 4.5 GB, against 1.9 s for memory the guest had touched
    before. One stack's worth of memory stays mapped between rounds (:func:`cached_stack_bytes`;
    :func:`release_cached_stack` gives it back).
    """
    global _cached_mapping
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = rows * d * itemsize
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if size < HUGE_STACK_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty((rows, d), dtype=dtype)
    mapping = None
    with _cache_lock:
        cached = _cached_mapping
        # References: the global, ``cached`` and getrefcount's argument. Any tensor or array view
        # of the mapping (torch.frombuffer holds the buffer) adds one.
        if reuse and cached is not None and len(cached) >= size and sys.getrefcount(cached) <= 3:
            mapping = cached
        elif cached is not None and sys.getrefcount(cached) <= 3 and len(cached) < size:
            _cached_mapping = None  # too small: let it go before mapping a larger one
        del cached
    if mapping is None:
        try:
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
        except (OSError, ValueError):
            return torch.empty((rows, d), dtype=dtype)
        if reuse:
            with _cache_lock:
                _cached_mapping = mapping
    return torch.frombuffer(mapping, dtype=dtype, count=rows * d).view(rows, d)


def cached_stack_bytes() -> int:
    """Bytes of the stack mapping kept between rounds (0 when none)."""
    mapping = _cached_mapping
    return len(mapping) if mapping is not None else 0


def release_cached_stack() -> None:
    """Give the kept stack mapping back (it is unmapped once no view of it is left)."""
    global _cached_mapping
    with _cache_lock:
        _cached_mapping = None


def _forget_cached_stack() -> None:
    global _cached_mapping, _cache_lock
    _cached_mapping, _cache_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_cached_stack)


def single_threaded_blas():
    """One BLAS thread while the block loops run: a multi-threaded OpenBLAS ``dot`` on 1 MiB
    blocks is many times slower than one thread on a loaded machine (its threads spin)."""
    return _single_threaded_blas()


def fill_row(row: np.ndarray, parts: list[np.ndarray], global_vector: np.ndarray,
             scratch: np.ndarray | None = None) -> float:
    """Write ``concat(parts) - global_vector`` into ``row``; return its float64 sum of squares.

    ``parts`` are the reply's floating-point entries in the spec's order (any shape and float
    dtype; each is converted to ``row``'s dtype first, as ``np.asarray(part, row.dtype)`` would).
    The values written are exactly those of ``torch.from_numpy(concat) - global`` (IEEE
    subtraction in ``row``'s dtype). The sum of squares is accumulated in float64 block by block
    (each block squared while in cache): NaN or +-Inf anywhere makes it non-finite.
    """
    if scratch is None:
        scratch = np.empty(BLOCK, dtype=np.float64)
    total = 0.0
    offset = 0
    wide = row.dtype == np.float64
    with np.errstate(over="ignore", invalid="ignore"), single_threaded_blas():
        for part in parts:
            flat = part.reshape(-1)
            size = flat.size
            for start in range(0, size, BLOCK):
                stop = min(size, start + BLOCK)
                target = row[offset + start:offset + stop]
                source = flat[start:stop]
                if source.dtype == row.dtype:
                    np.subtract(source, global_vector[offset + start:offset + stop], out=target)
                else:
                    np.copyto(target, source, casting="unsafe")
                    np.subtract(target, global_vector[offset + start:offset + stop], out=target)
                if wide:
                    total += float(np.dot(target, target))
                else:
                    block = scratch[:stop - start]
                    np.copyto(block, target)
                    total += float(np.dot(block, block))
            offset += size
    return total


def all_finite(tensor: torch.Tensor) -> bool:
    """``bool(torch.isfinite(tensor).all())``, from a plain sum first (NaN or Inf anywhere makes
    it non-finite; only then, or on an overflow, are the elements checked). On CPU the sum is
    ~20x faster than ``isfinite``."""
    if tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def sha256_row(row: np.ndarray | torch.Tensor) -> str:
    """:func:`server.audit.sha256_tensor` of a 1-D CPU row, read in place (no copy)."""
    from server.audit import TENSOR_DIGEST_TAG

    tensor = row if isinstance(row, torch.Tensor) else torch.from_numpy(row)
    if tensor.device.type != "cpu" or tensor.dim() != 1 or not tensor.is_contiguous():
        from server.audit import sha256_tensor

        return sha256_tensor(tensor)
    digest = hashlib.sha256()
    digest.update(TENSOR_DIGEST_TAG + b"\0")
    digest.update(str(tensor.dtype).encode("ascii") + b"\0")
    digest.update(str(tensor.shape[0]).encode("ascii") + b"\0")
    if tensor.numel():
        digest.update(tensor.detach().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def row_features(updates: torch.Tensor, aggregate: torch.Tensor, sq_norms: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a CPU float32/float64 stack: float64 sum of squares, dot with and squared
    distance to ``aggregate``, over cache-sized float64 blocks (one read of the stack).

    The distance is ``sum((u - a)^2)`` of float64 differences, never ``|u|^2 + |a|^2 - 2 u.a``.
    ``sq_norms`` (already known sums of squares) skips their computation.
    """
    x = updates.detach().numpy()
    a = aggregate.detach().to("cpu", torch.float64).numpy()
    n, d = x.shape
    sq = np.zeros(n) if sq_norms is None else None
    dot = np.zeros(n)
    dist = np.zeros(n)

    def work(lo: int, hi: int) -> None:
        scratch = np.empty(min(BLOCK, max(d, 1)), dtype=np.float64)
        for i in range(lo, hi):
            r = x[i]
            s = t = q = 0.0
            for start in range(0, d, BLOCK):
                stop = min(d, start + BLOCK)
                block = scratch[:stop - start]
                np.copyto(block, r[start:stop])
                segment = a[start:stop]
                if sq is not None:
                    q += float(np.dot(block, block))
                s += float(np.dot(block, segment))
                np.subtract(block, segment, out=block)
                t += float(np.dot(block, block))
            dot[i], dist[i] = s, t
            if sq is not None:
                sq[i] = q

    run_ranges(work, split_range(n, max(1, min(torch.get_num_threads(), n))))
    sq_out = torch.from_numpy(sq) if sq is not None else sq_norms.detach().to("cpu", torch.float64)
    return sq_out, torch.from_numpy(dot), torch.from_numpy(dist)
