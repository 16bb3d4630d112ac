"""Working forms of a score matrix, so that every finite score (and ``-inf``) is solved right.

A balanced assignment does not change when a constant is added to a token's row, nor when
every score is multiplied by a power of two. The fast methods are scale-driven (auction
epsilons, Sinkhorn temperature, all relative to a score spread), so one outlier such as
``-1e300`` among O(1) scores, or a ``-inf`` (forbidden pair), would set every scale and
the prices would swallow the O(1) differences. So they run on::

    scaled   W = 2**-k * S               (k > 0 only when some |S| > 2**960: sums stay finite)
    shifted  W' = W - max_e W_te          (row maximum 0; -inf stays -inf)
    clipped  C = max(W', -window)         (finite, spread <= window)

with ``window = 64 * q`` (rounded up for integer scores) and q the lower quartile of the positive finite gaps
``-W'_te`` over up to 256 evenly spaced rows: for ordinary scores (Gaussian, integer,
low-rank, per-expert skew) no gap comes near the window and ``C == W'``; a gap beyond
it is an outlier (or a forbidden pair). When clipping changed an entry, the result on C
is repaired on W' by the exact methods (free the tokens that are not complementary-slack
for W' and insert them by shortest augmenting paths, :func:`solvers._exact.finish`): the
window only decides how much of the work the fast phase does, never the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Working", "prepare"]

_SCALE_LIMIT = 960  # keep |scores| <= 2**960: sums of 2**60 of them still fit in a float64
_WINDOW_FACTOR = 64.0
_SAMPLE_ROWS = 256
_FEW_GAPS = 16


@dataclass(frozen=True)
class Working:
    """The working forms of ``S [T, E]`` (module doc), on the scores' back-end.

    Fields:
        scaled: ``W = 2**-exponent * S`` (the scores themselves when ``exponent == 0``).
        shifted: ``W'``, row maximum 0, ``-inf`` for forbidden pairs.
        clipped: ``C = max(W', -window)`` (``shifted`` itself when nothing was clipped).
        window: the clip distance (> 0; integral when the scores are).
        clipped_any: whether some entry (an outlier or a forbidden pair) was clipped.
        forbidden: whether some pair is forbidden (``-inf``).
        exponent: k; prices and gaps of W are ``2**-k`` times those of S.
        integral: whether the sampled rows of W are integers (heuristics only: early
            certification for the many ties of integer scores).
        spread: the scale of the epsilons and the temperature: ``max(W) - min(W)`` when
            nothing was clipped, capped at ``window`` (row offsets do not count), else
            ``window`` (the spread of C).
        magnitude: ``sum_t min(max_e |W_te|, r_t)`` with ``r_t`` the row's score range
            ``max_e W_te - min_e W_te``, both over the row's scores within the window (an
            outlier or a forbidden pair does not count): the scale of the auction's tolerance. At most
            ``sum_t max_e |W_te|``, and blind to row offsets (``1e300 + O(1)`` rows do not
            loosen the tolerance of the others).
    """

    scaled: Any
    shifted: Any
    clipped: Any
    window: float
    clipped_any: bool
    forbidden: bool
    exponent: int
    integral: bool
    spread: float
    magnitude: float

    def to_score_units(self, value: float) -> float:
        """A price or gap of W in the units of S."""
        return math.ldexp(value, self.exponent) if self.exponent else value


def _sample_rows(T: int) -> np.ndarray:
    return np.unique(np.linspace(0, T - 1, min(T, _SAMPLE_ROWS)).astype(np.int64))


def _window(sample: np.ndarray, row_min: np.ndarray, integral: bool) -> float:
    """``64 *`` the lower quartile of the positive finite gaps of a row sample (module doc);
    ``sample`` holds those rows of the shifted scores (host)."""
    gaps = -sample.ravel()
    gaps = gaps[(gaps > 0) & np.isfinite(gaps)]
    if gaps.size:
        # the lower quartile (numpy's method="lower"), by selection; with few gaps (tiny
        # problems, where repairs are cheap) the smallest, which no outlier can be
        k = (gaps.size - 1) // 4 if gaps.size >= _FEW_GAPS else 0
        window = _WINDOW_FACTOR * float(np.partition(gaps, k)[k])
    else:  # the sampled rows are constant: take the largest finite gap anywhere
        finite = row_min[np.isfinite(row_min)]
        window = float(-finite.min()) if finite.size and finite.min() < 0 else 1.0
    window = min(window, 2.0**_SCALE_LIMIT)  # finite, whatever the sample holds
    if integral:
        window = float(math.ceil(window))
    return window


def prepare(ops: Any, S: Any, forbidden: bool) -> Working:
    """The working forms of float64 ``S [T, E]`` (T >= 1; every row has a finite score);
    ``forbidden``: whether S holds a ``-inf``."""
    exponent = 0
    W = S
    row_best = ops.row_max(W)
    shifted = W - row_best[:, None]
    row_min = ops.to_numpy(ops.row_min(shifted))
    best_host = ops.to_numpy(row_best)
    overflow = not forbidden and not np.isfinite(row_min).all()
    if overflow or forbidden or float(np.abs(best_host).max()) > 2.0**_SCALE_LIMIT:
        finite_abs = ops.where(ops.isneginf(S), 0.0, S)
        largest = float(ops.to_numpy(ops.row_max(ops.abs(finite_abs))).max())
        if largest > 2.0**_SCALE_LIMIT:
            exponent = math.frexp(largest)[1] - _SCALE_LIMIT
            W = S * math.ldexp(1.0, -exponent)
            row_best = ops.row_max(W)
            shifted = W - row_best[:, None]
            best_host = ops.to_numpy(row_best)
        if forbidden:  # the finite part of each row's range
            row_min = ops.to_numpy(ops.row_min(ops.where(ops.isneginf(shifted), 0.0, shifted)))
            row_min = np.minimum(row_min, 0.0)
        else:
            row_min = ops.to_numpy(ops.row_min(shifted))
    rows = _sample_rows(S.shape[0])
    sample = ops.to_numpy(shifted[ops.from_numpy(rows, shifted)])
    # Integrality only steers heuristics (never the answer): the sample decides it.
    finite = sample[np.isfinite(sample)]
    integral = bool(np.array_equal(finite, np.rint(finite)))
    window = _window(sample, row_min, integral)
    lowest = float(row_min.min())
    clipped_any = forbidden or lowest < -window
    clipped = ops.clip_min(shifted, -window) if clipped_any else shifted
    if clipped_any:  # C spans [-window, 0]: forbidden pairs and outliers sit at -window
        spread = window
    else:  # max(S) - min(S) (the epsilons the methods were tuned on), but never beyond the
        # window: row offsets (1e15 + O(1) rows) must not set the price scale
        spread = min(float(best_host.max() - (best_host + row_min).min()), window)
    if clipped_any:  # each row's range over its scores within the window
        inside = ops.where(shifted < -window, 0.0, shifted)
        reach = -ops.to_numpy(ops.row_min(inside))
    else:
        reach = -row_min
    low_end = best_host - reach
    magnitude = float(np.minimum(np.maximum(np.abs(best_host), np.abs(low_end)), reach).sum())
    return Working(
        scaled=W,
        shifted=shifted,
        clipped=clipped,
        window=window,
        clipped_any=bool(clipped_any),
        forbidden=bool(forbidden),
        exponent=exponent,
        integral=integral,
        spread=float(spread),
        magnitude=magnitude,
    )
