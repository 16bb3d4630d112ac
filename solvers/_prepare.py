"""Working forms of a score matrix, so that every finite score (and ``-inf``) is solved right.

A balanced assignment does not change when a constant is added to a token's row, nor when
every score is multiplied by a power of two. The fast methods are scale-driven (auction
epsilons, Sinkhorn temperature, all relative to a score spread), so one outlier such as
``-1e300`` among O(1) scores, or a ``-inf`` (forbidden pair), would set every scale and
the prices would swallow the O(1) differences. So they run on::

    scaled   W = 2**-k * S               (k > 0 only when a row's range overflows float64 or
                                          a row's best |S| > 2**960: sums stay finite)
    shifted  W' = W - max_e W_te          (row maximum 0; -inf stays -inf)
    clipped  C = max(W', -window)         (finite, spread <= window)

with ``window = 64 * q`` (rounded up for integer scores) and q the lower quartile of the
positive finite gaps ``-W'_te`` over up to 256 evenly spaced rows (the smallest one when
there are fewer than 16): for ordinary scores (Gaussian, integer, low-rank, per-expert
skew) no gap comes near the window, nothing is clipped and the methods run on W itself
(no copy). When clipping changes an entry, the result on C is repaired on W' by the exact
methods (free the tokens that are not complementary-slack for W' and insert them by
shortest augmenting paths, :func:`solvers._exact.finish`): the window only decides how
much of the work the fast phase does, never the answer.
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
        shifted: ``W'``, row maximum 0, ``-inf`` for forbidden pairs; W itself when
            nothing needs clipping (a row shift does not change the problem).
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
    """Up to 256 evenly spaced row ids, ascending and distinct (every row when T <= 256,
    else a spacing of (T - 1) / 255 > 1)."""
    if T <= _SAMPLE_ROWS:
        return np.arange(T, dtype=np.int64)
    return np.linspace(0, T - 1, _SAMPLE_ROWS).astype(np.int64)


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
    ``forbidden``: whether S holds a ``-inf``.

    Only the row maxima and minima are computed over the whole matrix; the shifted and
    clipped copies are built only when something needs clipping (otherwise the methods
    run on W itself: a row shift does not change the problem, and a [T, E] copy is not
    free at (65536, 256)).
    """
    exponent = 0
    W = S
    best = ops.to_numpy(ops.row_max(W))
    finite_part = ops.where(ops.isneginf(W), np.inf, W) if forbidden else W
    low = ops.to_numpy(ops.row_min(finite_part))
    with np.errstate(over="ignore"):
        overflow = not np.isfinite(best - low).all()  # a row range beyond float64
    if overflow or float(np.abs(best).max()) > 2.0**_SCALE_LIMIT:
        # scale by a power of two: exact, and the shifted rows and sums stay finite
        largest = max(float(np.abs(best).max()), float(np.abs(low).max()))
        exponent = math.frexp(largest)[1] - _SCALE_LIMIT
        factor = math.ldexp(1.0, -exponent)
        W = S * factor
        best, low = best * factor, low * factor
    row_min = low - best  # <= 0: the (negative) range of each row's finite scores
    rows = _sample_rows(S.shape[0])
    picked = ops.from_numpy(rows, W)
    sample = ops.to_numpy(W[picked]) - best[rows][:, None]
    # Integrality only steers heuristics (never the answer): the sample decides it.
    finite = sample[np.isfinite(sample)]
    integral = bool(np.array_equal(finite, np.rint(finite)))
    window = _window(sample, row_min, integral)
    clipped_any = forbidden or float(row_min.min()) < -window
    if clipped_any:  # C spans [-window, 0]: forbidden pairs and outliers sit at -window
        shifted = W - ops.from_numpy(best, W)[:, None]
        clipped = ops.clip_min(shifted, -window)
        spread = window
        inside = ops.where(shifted < -window, 0.0, shifted)
        reach = -ops.to_numpy(ops.row_min(inside))  # each row's range within the window
    else:  # max(S) - min(S) (the epsilons the methods were tuned on), but never beyond the
        # window: row offsets (1e15 + O(1) rows) must not set the price scale
        shifted = clipped = W
        spread = min(float(best.max() - low.min()), window)
        reach = -row_min
    low_end = best - reach
    magnitude = float(np.minimum(np.maximum(np.abs(best), np.abs(low_end)), reach).sum())
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
