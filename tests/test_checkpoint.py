"""Atomic checkpoints: exact round trips, crash safety, corruption detected."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def _server_state(round_number: int) -> dict:
    """A state shaped like the server's: weights, counters, RNG states, audit head."""
    torch.manual_seed(round_number)
    rng = np.random.default_rng(round_number)
    rng.random(5)  # advance the generator so its state is not the seed's
    return {
        "round": round_number,
        "parameters": [torch.randn(4, 3), torch.randn(3), torch.arange(5, dtype=torch.int64)],
        "trust": {101: 0.5, 102: 1.0},
        "config_hash": "c" * 64,
        "audit": {"length": round_number, "head": "a" * 64},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": rng.bit_generator.state,
        "flags": (True, None, 2.5),
        "blob": b"\x00\xffraw",
    }


def test_roundtrip_preserves_tensors_numbers_and_structure(tmp_path: Path) -> None:
    state = _server_state(3)
    save_checkpoint(tmp_path / "ckpt.pt", state)
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded is not None
    assert loaded.keys() == state.keys()
    for saved, restored in zip(state["parameters"], loaded["parameters"]):
        assert restored.dtype == saved.dtype and torch.equal(restored, saved)
    for key in ("round", "trust", "config_hash", "audit", "numpy_rng", "flags", "blob"):
        assert loaded[key] == state[key], key


def test_restored_rng_states_reproduce_the_same_random_streams(tmp_path: Path) -> None:
    state = _server_state(7)
    save_checkpoint(tmp_path / "ckpt.pt", state)
    expected_torch = torch.rand(6)  # the stream right after the saved state
    expected_numpy = np.random.default_rng(7)
    expected_numpy.random(5)
    expected_numpy_draws = expected_numpy.random(6)

    torch.manual_seed(999)  # disturb both generators
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded is not None
    torch.set_rng_state(loaded["torch_rng"])
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["numpy_rng"]
    assert torch.equal(torch.rand(6), expected_torch)
    np.testing.assert_array_equal(restored.random(6), expected_numpy_draws)


def test_absent_checkpoint_loads_as_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "never-written.pt") is None


def test_save_creates_parent_directories_and_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "run" / "ckpt.pt"
    save_checkpoint(path, {"round": 1})
    save_checkpoint(path, {"round": 2})
    assert load_checkpoint(path) == {"round": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp files left


def test_save_refuses_non_plain_data_naming_where(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"state\['weights'\]\[1\].*ndarray.*torch\.from_numpy"):
        save_checkpoint(tmp_path / "ckpt.pt", {"weights": [torch.zeros(1), np.zeros(3)]})
    with pytest.raises(ValueError, match="object"):
        save_checkpoint(tmp_path / "ckpt.pt", {"x": object()})
    with pytest.raises(ValueError, match="must be a dict"):
        save_checkpoint(tmp_path / "ckpt.pt", [1, 2])  # type: ignore[arg-type]
    assert not (tmp_path / "ckpt.pt").exists()


def test_an_unrenamed_temp_file_leaves_the_old_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _server_state(1))
    # A crash after writing the temp file but before the rename: a half-written temp remains.
    half_written = path.with_name(".ckpt.pt.crashed.tmp")
    torch.save(_server_state(2), half_written)
    half_written.write_bytes(half_written.read_bytes()[:300])
    loaded = load_checkpoint(path)
    assert loaded is not None and loaded["round"] == 1
    # The next successful save clears the leftover.
    save_checkpoint(path, _server_state(3))
    assert not half_written.exists()
    assert load_checkpoint(path)["round"] == 3  # type: ignore[index]


def test_a_process_killed_before_the_rename_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"round": 1, "w": torch.ones(3)})
    # Kill the process for real (os._exit: no cleanup, no finally) at the moment it would rename.
    child = textwrap.dedent(
        f"""
        import os, torch
        from server.checkpoint import save_checkpoint
        os.replace = lambda *args: os._exit(17)
        save_checkpoint({str(path)!r}, {{"round": 2, "w": torch.zeros(3)}})
        """
    )
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert done.returncode == 17, done.stderr
    leftovers = list(tmp_path.glob(".ckpt.pt.*.tmp"))
    assert len(leftovers) == 1  # the new state was fully written, just never renamed
    loaded = load_checkpoint(path)
    assert loaded is not None and loaded["round"] == 1 and torch.equal(loaded["w"], torch.ones(3))


def test_a_failed_save_removes_its_temp_file_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"round": 1})

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"round": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"not a checkpoint at all" * 10, id="garbage"),
    ],
)
def test_a_corrupt_file_raises_checkpoint_error_naming_the_path(tmp_path: Path, damage) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _server_state(1))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=r"ckpt\.pt") as caught:
        load_checkpoint(path)
    assert caught.value.path == path


def test_a_flipped_bit_inside_tensor_data_is_detected(tmp_path: Path) -> None:
    # torch.load alone would return the altered tensor without complaint.
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.arange(1000, dtype=torch.float32)})
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
        data_start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    raw = bytearray(path.read_bytes())
    # The local header's extra field may be longer than the central directory's: aim well inside.
    raw[data_start + member.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC"):
        load_checkpoint(path)


def test_a_file_holding_code_is_refused_rather_than_run(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt"):
        load_checkpoint(path)
    assert not marker.exists()


class _Exploit:
    """Pickles as a call to Path.touch: loading it with weights_only=False would create a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.target),))


def test_non_dict_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_saved_and_loaded_onto_the_cpu(tmp_path: Path) -> None:
    weights = torch.randn(5, device="cuda")
    save_checkpoint(tmp_path / "ckpt.pt", {"w": weights})
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded is not None and loaded["w"].device.type == "cpu"
    assert torch.equal(loaded["w"], weights.cpu())
