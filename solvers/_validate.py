"""Input checks for every solver (the one validation module of the ``solvers`` package).

Each ``require_*`` function returns the validated value (a plain Python ``int`` /
``float``) or raises a TypeError (wrong kind of value) or a ValueError (right kind, out of
range) whose message names the argument and the value. ``bool`` is never accepted where a
number is expected, NaN never is a number. Array coercion: :func:`as_real_numpy` (any
solver input as a float64 numpy array, plus the torch tensor it came from) and
:func:`like_source` (results back to torch). The assignment problem's own checks:
:func:`check_scores`, :func:`check_capacity`.

The scalar checks (:func:`require_int`, :func:`require_float`) are the project's one
implementation: ``routelab._validate`` re-exports them (``solvers`` never imports
``routelab``).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

__all__ = [
    "SEED_LIMIT",
    "as_real_numpy",
    "check_capacity",
    "check_scores",
    "even_capacity",
    "has_forbidden",
    "is_torch",
    "like_source",
    "require_float",
    "require_int",
    "require_seed",
]

SEED_LIMIT = 2**64


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch when it is not loaded)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def require_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as a Python int (any integer type with ``__index__``: Python, numpy, a 0-d
    integer tensor; never bool or float) with ``minimum <= value <= maximum`` where given.

    A plain ``int`` takes a path that ``torch.compile`` traces (routers check ``k`` in
    ``forward``)."""
    if type(value) is int:
        result = value
    else:
        if (
            _is_bool(value)
            or isinstance(value, float)
            or (is_torch(value) and _not_int_tensor(value))
        ):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        try:
            result = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{name} must be an int, got {type(value).__name__} ({value!r})"
            ) from None
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {result}")
    return result


def _not_int_tensor(value: Any) -> bool:
    return bool(
        value.is_floating_point()
        or value.is_complex()
        or value.dim() != 0
        or str(value.dtype) == "torch.bool"
    )


def require_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
) -> float:
    """``value`` (an int or float, or a one-element real tensor; never bool, never NaN) as a
    Python float.

    ``minimum`` / ``maximum`` are closed bounds, ``above`` / ``below`` open ones;
    ``finite=False`` admits ``inf`` / ``-inf`` (still subject to the bounds).
    """
    if _is_bool(value) or isinstance(value, (str, bytes, complex)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    if type(value) not in (int, float) and is_torch(value):
        tensor: Any = value
        if tensor.numel() != 1 or tensor.is_complex() or str(tensor.dtype) == "torch.bool":
            raise TypeError(
                f"{name} must be a real number, got a tensor of shape "
                f"{tuple(tensor.shape)} and dtype {tensor.dtype}"
            )
        value = tensor.item()
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a real number, got {type(value).__name__} ({value!r})"
        ) from None
    except OverflowError:
        raise ValueError(f"{name} is too large for a float: {value!r}") from None
    if math.isnan(result):
        raise ValueError(f"{name} must be a number, got NaN")
    if finite and math.isinf(result):
        raise ValueError(f"{name} must be finite, got {result}")
    if minimum is not None and not result >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and not result <= maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    if above is not None and not result > above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")
    if below is not None and not result < below:
        raise ValueError(f"{name} must be < {below}, got {value!r}")
    return result


def require_seed(seed: object) -> int:
    """A random seed: an int in ``[0, 2**64)`` (numpy's and SplitMix64's range)."""
    return require_int("seed", seed, 0, SEED_LIMIT - 1)


def as_real_numpy(
    name: str,
    value: Any,
    ndim: int,
    shape: str,
    *,
    length: int | None = None,
    nonnegative: bool = False,
) -> tuple[np.ndarray, Any]:
    """``value`` (numpy array, nested sequence or torch tensor) as a finite float64 numpy
    array of ``ndim`` dimensions, plus the torch tensor it came from (None otherwise), so the
    caller can return torch results on the same device (:func:`like_source`).

    ``shape`` names the expected shape in messages (e.g. ``"[n, d]"``); ``length`` fixes the
    first dimension; ``nonnegative`` refuses negative values.
    """
    source = None
    if is_torch(value):
        import torch

        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real numeric tensor, got dtype {value.dtype}")
        source = value
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:  # ragged sequences, objects
        raise TypeError(f"{name} must be a real numeric array {shape}: {err}") from None
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {arr.shape[0]}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    if nonnegative and arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0, min is {arr.min()}")
    return arr, source


def like_source(array: np.ndarray, source: Any) -> Any:
    """The inverse of :func:`as_real_numpy`: ``array`` as a torch tensor on ``source``'s
    device when the input was a tensor, else unchanged."""
    if source is None:
        return array
    import torch

    return torch.from_numpy(array).to(source.device)


def _total(x: Any) -> float:
    """The sum of every entry (inf on overflow, without a warning)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(x.sum())


_SCORES_FINITE = (
    "scores must be finite or -inf (-inf marks a forbidden token-expert pair); found {what}"
)


def check_scores(scores: Any) -> Any:
    """Validate ``scores [T, E]`` and return it as float64 (numpy array or torch tensor on the
    same device). Integer and half-precision inputs are upcast; ``-inf`` (a forbidden pair)
    is kept; NaN and ``+inf`` are refused."""
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
        if out.numel() and not bool(torch.isfinite(out.sum())):
            if bool(torch.isnan(out).any()):
                raise ValueError(_SCORES_FINITE.format(what="NaN"))
            if bool(torch.isposinf(out).any()):
                raise ValueError(_SCORES_FINITE.format(what="+inf"))
        return out
    if not isinstance(scores, np.ndarray):
        if isinstance(scores, (list, tuple)):
            try:
                scores = np.asarray(scores)
            except ValueError as err:  # ragged rows
                raise TypeError(f"scores must be a rectangular [T, E] array: {err}") from None
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
    # One pass without a temporary: a finite total means no NaN and no inf anywhere.
    if out.size and not np.isfinite(_total(out)):
        if np.isnan(out).any():
            raise ValueError(_SCORES_FINITE.format(what="NaN"))
        if np.isposinf(out).any():
            raise ValueError(_SCORES_FINITE.format(what="+inf"))
    return out


def has_forbidden(ops: Any, S: Any) -> bool:
    """Whether checked scores hold a ``-inf`` (a forbidden pair). One pass without a
    temporary in the common case: a finite total rules it out."""
    if np.isfinite(_total(S)):
        return False
    return ops.any(ops.isneginf(S))


def even_capacity(num_tokens: int, num_experts: int) -> np.ndarray:
    """An even split of T over E: ``T // E`` each, the first ``T % E`` experts one more."""
    base, extra = divmod(num_tokens, num_experts)
    cap = np.full(num_experts, base, dtype=np.int64)
    cap[:extra] += 1
    return cap


def check_capacity(capacity: Any, num_tokens: int, num_experts: int) -> np.ndarray:
    """Normalise ``capacity`` (None, an int, or a per-expert int vector ``[E]``) to int64 ``[E]``.

    None gives the even split; the total must be at least T. Values above T are clipped to
    T (no expert can take more), so any Python int is accepted, however large.
    """
    if capacity is None:
        return even_capacity(num_tokens, num_experts)
    if _is_bool(capacity):
        raise TypeError(f"capacity must be None, an int or an int vector [E], got {capacity!r}")
    if isinstance(capacity, (int, np.integer)):
        value = int(capacity)
        if value < 0:
            raise ValueError(f"capacity must be >= 0, got {value}")
        cap = np.full(num_experts, min(value, num_tokens), dtype=np.int64)
    else:
        if is_torch(capacity):
            capacity = capacity.detach().cpu().numpy()
        try:
            arr = np.asarray(capacity)
        except (TypeError, ValueError) as err:
            raise TypeError(f"capacity must be None, an int or an int vector [E]: {err}") from None
        if arr.dtype == object:  # Python ints beyond int64
            try:
                arr = np.array([min(operator.index(v), num_tokens) for v in arr.ravel()])
            except TypeError:
                raise TypeError(
                    "capacity must be None, an int or an integer vector [E], got non-integers"
                ) from None
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and arr.size and np.all(arr == np.round(arr)):
                arr = np.minimum(arr, num_tokens).astype(np.int64)
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
        cap = np.minimum(cap, num_tokens)
    total = int(cap.sum())
    if total < num_tokens:
        raise ValueError(
            f"insufficient capacity: sum(capacity) = {total} < T = {num_tokens} tokens"
        )
    return cap
