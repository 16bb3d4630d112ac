"""Input checks for the assignment solvers: scores ``[T, E]`` and capacities ``[E]``."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_real_numpy",
    "check_capacity",
    "check_scores",
    "even_capacity",
    "is_torch",
    "like_source",
]


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch when it is not loaded)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def as_real_numpy(name: str, value: Any, ndim: int, shape: str) -> tuple[np.ndarray, Any]:
    """``value`` (numpy array, list or torch tensor) as a finite float64 numpy array of
    ``ndim`` dimensions, plus the torch tensor it came from (None for numpy input), so the
    caller can return torch results on the same device. ``shape`` names the expected shape
    in error messages, e.g. ``"[n, d]"``.
    """
    source = None
    if is_torch(value):
        import torch

        source = value
        value = value.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(value)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return arr, source


def like_source(array: np.ndarray, source: Any) -> Any:
    """The inverse of :func:`as_real_numpy`: ``array`` as a torch tensor on ``source``'s
    device when the input was a tensor, else unchanged."""
    if source is None:
        return array
    import torch

    return torch.from_numpy(array).to(source.device)


def check_scores(scores: Any) -> Any:
    """Validate ``scores [T, E]`` and return it as float64 (numpy array or torch tensor on the
    same device). Integer and half-precision inputs are upcast; NaN / inf are refused."""
    if is_torch(scores):
        import torch

        if scores.dim() != 2:
            raise ValueError(f"scores must be 2-D [T, E], got shape {tuple(scores.shape)}")
        if scores.dtype == torch.bool or scores.is_complex():
            raise TypeError(f"scores must be a real floating or integer tensor, got {scores.dtype}")
        if scores.shape[1] < 1:
            raise ValueError(
                f"scores must have at least one expert column, got shape {tuple(scores.shape)}"
            )
        out = scores.detach().to(torch.float64)
        if out.numel() and not bool(torch.isfinite(out).all()):
            raise ValueError("scores contain NaN or inf; every score must be finite")
        return out
    if not isinstance(scores, np.ndarray):
        if isinstance(scores, (list, tuple)):
            scores = np.asarray(scores)
        else:
            raise TypeError(
                f"scores must be a numpy array or a torch tensor [T, E], got {type(scores).__name__}"
            )
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [T, E], got shape {scores.shape}")
    if scores.dtype == np.bool_ or not (
        np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
    ):
        raise TypeError(
            f"scores must be a real floating or integer array, got dtype {scores.dtype}"
        )
    if scores.shape[1] < 1:
        raise ValueError(f"scores must have at least one expert column, got shape {scores.shape}")
    out = np.ascontiguousarray(scores, dtype=np.float64)
    if out.size and not np.isfinite(out).all():
        raise ValueError("scores contain NaN or inf; every score must be finite")
    return out


def even_capacity(num_tokens: int, num_experts: int) -> np.ndarray:
    """An even split of T over E: ``T // E`` each, the first ``T % E`` experts one more."""
    base, extra = divmod(num_tokens, num_experts)
    cap = np.full(num_experts, base, dtype=np.int64)
    cap[:extra] += 1
    return cap


def check_capacity(capacity: Any, num_tokens: int, num_experts: int) -> np.ndarray:
    """Normalise ``capacity`` (None, an int, or a per-expert int vector ``[E]``) to int64 ``[E]``.

    None gives the even split; the total must be at least T.
    """
    if capacity is None:
        return even_capacity(num_tokens, num_experts)
    if isinstance(capacity, bool):
        raise TypeError(f"capacity must be None, an int or an int vector [E], got {capacity!r}")
    if isinstance(capacity, (int, np.integer)):
        cap = np.full(num_experts, int(capacity), dtype=np.int64)
    else:
        if is_torch(capacity):
            capacity = capacity.detach().cpu().numpy()
        arr = np.asarray(capacity)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and arr.size and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise TypeError(
                    f"capacity must be None, an int or an integer vector [E], got dtype {arr.dtype}"
                )
        if arr.ndim == 0:
            arr = np.full(num_experts, int(arr), dtype=np.int64)
        if arr.shape != (num_experts,):
            raise ValueError(
                f"capacity must have shape [E] = [{num_experts}], got shape {arr.shape}"
            )
        cap = arr.astype(np.int64)
    if (cap < 0).any():
        raise ValueError(
            f"capacity must be >= 0, got {cap.tolist() if cap.size <= 16 else cap.min()}"
        )
    total = int(cap.sum())
    if total < num_tokens:
        raise ValueError(
            f"insufficient capacity: sum(capacity) = {total} < T = {num_tokens} tokens"
        )
    # No expert can take more than T tokens: clipping keeps every problem the same size.
    return np.minimum(cap, num_tokens)
