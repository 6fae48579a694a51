"""Client-side differential privacy: the clipping and Gaussian noise of ``dp=client``.

A client clips its flat update to L2 norm ``C`` and adds ``N(0, (2 z C)^2 I)`` noise before it
leaves the device (:func:`privatize_update`). The server's central DP (``server.privacy``) reuses
the same exact clipping and noise primitives, which live here so that the ClientApp needs
nothing from the server: norms are accumulated in float64 and clipping is exact on zero, tiny,
huge and non-finite rows. The guarantee and its accounting are explained in ``server.privacy``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = [
    "clip_update",
    "clip_updates",
    "gaussian_noise_like",
    "local_noise_std",
    "privatize_update",
    "update_norms",
]

#: Columns per float64 block in :func:`update_norms` and :func:`clip_updates`. It bounds the temporary
#: float64 copy to ``n * _BLOCK_COLUMNS`` values while keeping the per-block overhead negligible.
_BLOCK_COLUMNS = 1 << 18

# ----------------------------------------------------------------------------------------------------
# Norms and clipping
# ----------------------------------------------------------------------------------------------------


def _check_update_stack(updates: torch.Tensor, name: str) -> None:
    if not isinstance(updates, torch.Tensor):
        raise TypeError(f"{name}: updates must be a torch.Tensor, got {type(updates).__name__}")
    if updates.ndim != 2:
        raise ValueError(f"{name}: updates must be a 2-D (n, d) tensor, got shape {tuple(updates.shape)}")
    if not updates.is_floating_point():
        raise ValueError(f"{name}: updates must be floating point, got {updates.dtype}")


def _check_clip_norm(clip_norm: float, name: str) -> float:
    clip = float(clip_norm)
    if not math.isfinite(clip) or clip <= 0.0:
        raise ValueError(f"{name}: clip_norm must be a finite number > 0, got {clip_norm}")
    return clip


def _column_blocks(d: int) -> Iterator[slice]:
    for start in range(0, d, _BLOCK_COLUMNS):
        yield slice(start, min(start + _BLOCK_COLUMNS, d))


def update_norms(updates: torch.Tensor) -> torch.Tensor:
    """L2 norm of every row, accumulated in float64.

    Float32 ``vector_norm`` on CPU is off by ~4e-4 relative at d = 1e7. That is enough to push a
    clipped norm over ``C``. Here each block of columns is converted to float64 and divided by its
    row's largest magnitude before squaring, so rows near 1e±300 neither overflow nor underflow.

    Parameters
    ----------
    updates : torch.Tensor
        ``(n, d)`` floating-point updates, any device.

    Returns
    -------
    torch.Tensor
        ``(n,)`` float64 norms on the input's device. A row holding NaN has norm NaN. A row holding
        inf but no NaN has norm inf.
    """
    _check_update_stack(updates, "update_norms")
    n, d = updates.shape
    float64 = torch.float64
    if d == 0:
        return torch.zeros(n, dtype=float64, device=updates.device)
    # The largest magnitude is exact in any dtype, so scaling by it loses nothing before squaring.
    scale = updates.abs().amax(dim=1).to(float64)
    finite_scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    sum_of_squares = torch.zeros(n, dtype=float64, device=updates.device)
    for block in _column_blocks(d):
        scaled = updates[:, block].to(float64) / finite_scale[:, None]
        sum_of_squares += (scaled * scaled).sum(dim=1)
    norms = finite_scale * torch.sqrt(sum_of_squares)
    norms = torch.where(scale == 0, torch.zeros_like(norms), norms)
    has_nan = torch.isnan(updates).any(dim=1)
    has_inf = torch.isinf(updates).any(dim=1)
    norms = torch.where(has_inf, torch.full_like(norms, math.inf), norms)
    return torch.where(has_nan, torch.full_like(norms, math.nan), norms)


def clip_updates(updates: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale every row whose L2 norm exceeds ``clip_norm`` down to (just under) ``clip_norm``.

    The factor for each row is ``min(1, C / norm)``. It is computed in float64, and rows of norm
    ``<= C`` are never divided, so zero and tiny rows come back unchanged. Rounding the scaled row
    back to its dtype can add a relative ``eps``. To absorb that, the factor is shrunk by
    ``4 * eps(dtype)``, and the clipped rows are re-measured and re-scaled in the rare case they
    still exceed ``C``.

    Parameters
    ----------
    updates : torch.Tensor
        ``(n, d)`` floating-point updates, any device.
    clip_norm : float
        ``C > 0``.

    Returns
    -------
    clipped : torch.Tensor
        ``(n, d)``, same dtype and device as ``updates``. Every row has norm ``<= C`` (measured in
        float64).
    norms : torch.Tensor
        ``(n,)`` float64 norms before clipping, as needed by :class:`AdaptiveClipper`.

    Raises
    ------
    ValueError
        If ``clip_norm`` is not a finite positive number, or if any row holds NaN or inf. The error
        names the rows. The strategy rejects such replies before clipping; this is the last guard.
    """
    _check_update_stack(updates, "clip_updates")
    clip = _check_clip_norm(clip_norm, "clip_updates")
    norms = update_norms(updates)
    bad_rows = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
    if bad_rows:
        raise ValueError(f"clip_updates: rows {bad_rows} contain NaN or inf; reject them before clipping")

    clipped = updates.clone()
    over = torch.nonzero(norms > clip).flatten()
    current = norms[over]
    margin = 4.0 * torch.finfo(updates.dtype).eps
    # A few passes always suffice. Each pass takes at least a relative 4 eps off, which is more
    # than what rounding back to the dtype can add.
    for _ in range(4):
        if over.numel() == 0:
            break
        factors = (clip / current) * (1.0 - margin)
        rows = clipped[over]
        for block in _column_blocks(rows.shape[1]):
            rows[:, block] = (rows[:, block].to(torch.float64) * factors[:, None]).to(updates.dtype)
        clipped[over] = rows
        rescaled = update_norms(rows)
        still_over = rescaled > clip
        over, current = over[still_over], rescaled[still_over]
    if over.numel() > 0:  # pragma: no cover - only reachable if rounding misbehaves
        raise RuntimeError(f"clip_updates: rows {over.tolist()} could not be brought under clip_norm={clip}")
    return clipped, norms


def clip_update(update: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Clip one flat update to L2 norm ``clip_norm``. This is the client's side of ``dp=client``.

    Parameters
    ----------
    update : torch.Tensor
        ``(d,)`` floating-point update.
    clip_norm : float
        ``C > 0``.

    Returns
    -------
    torch.Tensor
        ``(d,)``, same dtype and device, norm ``<= C``.
    """
    if not isinstance(update, torch.Tensor) or update.ndim != 1:
        shape = tuple(update.shape) if isinstance(update, torch.Tensor) else type(update).__name__
        raise ValueError(f"clip_update: update must be a 1-D (d,) tensor, got {shape}")
    clipped, _ = clip_updates(update[None, :], clip_norm)
    return clipped[0]


# ----------------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------------


def _check_noise_multiplier(noise_multiplier: float, name: str) -> float:
    z = float(noise_multiplier)
    if not math.isfinite(z) or z < 0.0:
        raise ValueError(f"{name}: noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    return z


def gaussian_noise_like(
    vector: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """I.i.d. ``N(0, std^2)`` noise shaped like ``vector``.

    Parameters
    ----------
    vector : torch.Tensor
        Floating-point tensor giving the shape, dtype and device of the noise.
    std : float
        Standard deviation, finite and ``>= 0``. ``0`` gives zeros.
    generator : torch.Generator, optional
        Source of randomness, for reproducible runs. It may live on another device than
        ``vector``: the noise is drawn there and moved.

    Returns
    -------
    torch.Tensor
        The noise alone, to be added by the caller. Same shape, dtype and device as ``vector``.
    """
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point():
        raise ValueError("gaussian_noise_like: vector must be a floating-point torch.Tensor")
    sigma = float(std)
    if not math.isfinite(sigma) or sigma < 0.0:
        raise ValueError(f"gaussian_noise_like: std must be a finite number >= 0, got {std}")
    # Half-precision normals are coarse; draw in at least float32 and round once at the end.
    draw_dtype = torch.float64 if vector.dtype == torch.float64 else torch.float32
    draw_device = generator.device if generator is not None else vector.device
    noise = torch.randn(vector.shape, generator=generator, dtype=draw_dtype, device=draw_device)
    return (noise * sigma).to(device=vector.device, dtype=vector.dtype)



def local_noise_std(*, clip_norm: float, noise_multiplier: float) -> float:
    """Standard deviation of the noise a client adds to its own clipped update in ``dp=client``.

    The sensitivity of one clipped update is ``2C``: replacing the client's data with any other data
    moves the update by at most ``2C``. So ``std = 2 z C``, and the accountant's ``epsilon`` at ``q = 1``
    is local DP between any two datasets of that client.
    """
    clip = _check_clip_norm(clip_norm, "local_noise_std")
    return _check_noise_multiplier(noise_multiplier, "local_noise_std") * 2.0 * clip


def privatize_update(
    update: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip a client's flat update to ``clip_norm`` and add the ``dp=client`` Gaussian noise.

    Returns
    -------
    torch.Tensor
        ``clip_update(update, C) + N(0, (2 z C)^2 I)``, same shape, dtype and device as ``update``.
    """
    clipped = clip_update(update, clip_norm)
    std = local_noise_std(clip_norm=clip_norm, noise_multiplier=noise_multiplier)
    return clipped + gaussian_noise_like(clipped, std, generator)
