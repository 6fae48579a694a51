"""Atomic, self-checking checkpoints of the server's state.

:func:`save_checkpoint` writes to a temporary file in the destination's directory, fsyncs it,
renames it onto the destination with :func:`os.replace` (atomic on POSIX and Windows) and then
fsyncs the directory. A crash at any moment therefore leaves either the previous checkpoint or
the new one, never a torn file; at worst a stray ``.<name>.*.tmp`` is left, which the next
successful save removes (one writer per checkpoint path is assumed).

Format and safety: checkpoints hold *plain data only* -- tensors, ``int``, ``float``, ``bool``,
``str``, ``bytes``, ``None``, and ``dict``/``list``/``tuple`` of them. That covers model
weights, ``torch.get_rng_state()`` (a uint8 tensor), NumPy's ``Generator.bit_generator.state``
(a dict of ints and strings) and the audit head. :func:`save_checkpoint` refuses anything else
(a NumPy array, an arbitrary object) naming where it sits, so :func:`load_checkpoint` can use
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file, even if
someone replaced it.

Corruption: ``torch.load`` does not check the zip archive's CRC-32s, so a flipped bit inside a
tensor would load silently. :func:`load_checkpoint` checks every member's CRC first.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes)


class CheckpointError(Exception):
    """A checkpoint file exists but cannot be trusted (corrupt, truncated, or not ours).

    Attributes
    ----------
    path : Path
        The checkpoint file.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"checkpoint state at {where}: only dense tensors are supported, got {value.layout}")
        return
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None), tuple)):
                raise ValueError(f"checkpoint state at {where}: dict key {key!r} must be a plain type")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    hint = " (convert with torch.from_numpy(...) or .tolist())" if type(value).__module__ == "numpy" else ""
    raise ValueError(
        f"checkpoint state at {where}: {type(value).__name__} is not plain data{hint}; "
        "checkpoints hold tensors, numbers, strings, bytes, None and dict/list/tuple of them"
    )


def _fsync_directory(directory: Path) -> None:
    """Persist the rename in the directory; skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself is synced
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably.

    Parameters
    ----------
    path : str or Path
        Destination; parent directories are created.
    state : dict
        Plain data (see the module docstring). Tensors on any device are saved as they are;
        ``load_checkpoint`` maps them to the CPU.

    Raises
    ------
    ValueError
        When ``state`` is not a dict or holds something other than plain data, naming where.
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the destination: os.replace is only atomic within one filesystem.
    fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp_path.unlink()
        raise
    _fsync_directory(path.parent)
    # Leftovers of saves that crashed before their rename; harmless, but they would pile up.
    for stale in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or Path
        The checkpoint file.

    Returns
    -------
    dict or None
        The saved state with tensors on the CPU, or None when ``path`` does not exist.

    Raises
    ------
    CheckpointError
        When the file is corrupt, truncated, not a checkpoint, or holds non-plain data; the
        message names the path.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable checkpoint archive ({exc})") from exc
    if damaged is not None:
        raise CheckpointError(path, f"corrupt checkpoint: CRC mismatch in {damaged}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise CheckpointError(path, f"cannot load checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(path, f"checkpoint holds a {type(state).__name__}, expected a dict")
    return state
