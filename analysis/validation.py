"""Argument checks for the analysis package (one place, one message style).

The scalar checks are routelab's (``require_int``, ``require_float``, ...: they name the
argument and the value; bool is never a number; NaN never valid). This module adds the
array checks analysis needs: numbers in, float64 / int64 CPU tensors out.

- ``as_float_array(name, values, ndim)``: any tensor / numpy array / nested sequence of
  finite real numbers with ``ndim`` dimensions, as float64 on the CPU (``nonnegative``
  to require >= 0, ``min_size`` to require at least that many entries per dimension).
- ``as_labels(name, labels, num_tokens, num_labels)``: integer labels ``[T]`` in
  ``[0, num_labels)``; ``num_labels`` defaults to ``max + 1`` but the table it implies
  is bounded (``MAX_TABLE_CELLS``), so one huge label is an error naming the fix,
  not a 32 GB allocation.
- ``require_table_cells(rows, cols, what)``: the same bound for any table size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from routelab._validate import (
    require_bool,
    require_choice,
    require_float,
    require_int,
    require_optional_float,
    require_optional_int,
)

__all__ = [
    "MAX_TABLE_CELLS",
    "as_float_array",
    "as_labels",
    "require_bool",
    "require_choice",
    "require_float",
    "require_int",
    "require_optional_float",
    "require_optional_int",
    "require_table_cells",
]

MAX_TABLE_CELLS = 50_000_000  # 400 MB of int64 counts: far above any E x L analysis table


def as_float_array(
    name: str,
    values: object,
    ndim: int,
    *,
    nonnegative: bool = False,
    min_size: int = 0,
) -> Tensor:
    """``values`` as a float64 CPU tensor with ``ndim`` dimensions of finite reals."""
    if isinstance(values, Tensor):
        if values.is_complex():
            raise TypeError(f"{name} must hold real numbers, got {values.dtype}")
        tensor = values.detach().to("cpu", torch.float64)
    else:
        try:
            array = np.asarray(values)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be an array of numbers: {err}") from None
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be an array of real numbers, got dtype {array.dtype}")
        tensor = torch.from_numpy(array.astype(np.float64, copy=True))
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if any(size < min_size for size in tensor.shape):
        raise ValueError(
            f"{name} must have at least {min_size} entries per dimension, got "
            f"shape {tuple(tensor.shape)}"
        )
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got non-finite values")
    if nonnegative and tensor.numel() and bool((tensor < 0).any()):
        raise ValueError(f"{name} must be >= 0, got min {float(tensor.min())}")
    return tensor


def require_table_cells(rows: int, cols: int, what: str) -> None:
    """Refuse a table of more than ``MAX_TABLE_CELLS`` cells (``what`` names it)."""
    if rows * cols > MAX_TABLE_CELLS:
        raise ValueError(
            f"{what} would have {rows} x {cols} = {rows * cols:.3g} cells (more than "
            f"{MAX_TABLE_CELLS:.0e}); relabel to consecutive ids first, e.g. "
            "labels = torch.unique(labels, return_inverse=True)[1]"
        )


def as_labels(
    name: str,
    labels: object,
    num_tokens: int | None,
    num_labels: int | None,
    *,
    rows: int = 1,
) -> tuple[Tensor, int]:
    """Integer labels ``[T]`` as int64 on the CPU and the number of labels L.

    ``num_tokens``: the required length T (None: any). ``num_labels``: an int >= 1
    (labels must be below it) or None (``max + 1``). ``rows`` is the row count of the
    table the labels will index (E), for the size bound.
    """
    if isinstance(labels, Tensor):
        tensor = labels.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be an integer tensor [T]: {err}") from None
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor [T], got {tensor.dtype}")
    if tensor.dim() != 1 or (num_tokens is not None and tensor.shape[0] != num_tokens):
        expected = "[T]" if num_tokens is None else f"[T] = [{num_tokens}]"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    tensor = tensor.long().cpu()
    if num_labels is not None:
        num_labels = require_int("num_labels", num_labels, minimum=1)
    if tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0:
            raise ValueError(f"{name} must be >= 0, got min {low}")
        if num_labels is not None and high >= num_labels:
            raise ValueError(f"{name} must be < num_labels = {num_labels}, got max {high}")
        if num_labels is None:
            num_labels = high + 1
    elif num_labels is None:
        num_labels = 1
    require_table_cells(rows, num_labels, f"the expert x label table for {name}")
    return tensor, num_labels


def as_index_list(name: str, values: Sequence[object]) -> list[int]:
    """A sequence of ints >= 0 (e.g. steps for a plot's x axis)."""
    return [require_int(f"{name}[{i}]", v, minimum=0) for i, v in enumerate(values)]
