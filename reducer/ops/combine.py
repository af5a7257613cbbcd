"""Memory-bounded, exact sigma-clipped mean combine (KPF master-calibration recipe).

This module is pure: it does no file I/O.  :func:`clipped_mean` combines an
in-memory stack; :func:`combine` drives it strip by strip over *sources* (objects
that read row ranges of frames, see :mod:`reducer.fitsio_strips`) so that the
memory used stays below a bound whatever the number of frames.

Estimator
---------
Work per pixel on the stack of the ``N`` frames.  Units: every value, mean and
uncertainty is in the data unit of the (scaled) frames, e.g. ADU or e-; ``CNT``
is a number of frames; ``nsigma`` is dimensionless.

1. *Scaling.*  Frames are converted to float32 (the working precision: exact for
   int8/int16/uint16 and float32 input, rounded for float64 or 32-bit integer
   input) and multiplied in float32 arithmetic by ``float32(scales[i])``:
   ``x_i = fl32(float32(frame_i) * float32(scales[i]))``.  Without ``scales`` the
   values are used as they are.
2. *Valid values.*  A value takes part if its mask is False (True = bad) and it
   is finite (NaN and +-inf are treated as masked).  ``n`` is the number of valid
   values of the pixel.
3. *Centre and spread* of the ``n`` valid values (computed in float64 from the
   float32 values, with the same formulas as :func:`numpy.median` and
   :func:`numpy.percentile` with ``method='linear'``, so bit-identical to them):

   - ``m`` = median (mean of the two middle values when ``n`` is even);
   - ``P(q)`` = linear-interpolation percentile of the sorted values
     ``v[0] <= ... <= v[n-1]``: ``h = (n - 1) * (q / 100)``, ``j = floor(h)``,
     ``g = h - j``, ``P = v[j] + g (v[j+1] - v[j])`` (numpy's ``_lerp``, which
     evaluates ``v[j+1] - (1 - g)(v[j+1] - v[j])`` when ``g >= 0.5``);
   - robust sigma ``s = (P(84) - P(16)) / 2``.

4. *Rejection* (one pass, no iteration): a valid value survives when
   ``|x - m| <= nsigma * s`` (values exactly at the bound are kept; the test is
   done exactly as float64 ``abs(x - m) <= nsigma * s`` would do it).  If ``s == 0``
   this keeps exactly the values equal to ``m``.  No rejection at all is done
   when ``n <= 2`` (the median/percentile spread of two values cannot flag an
   outlier).
5. *Value* = mean of the ``CNT`` survivors; with ``weights`` the weighted mean
   ``mu = sum(w_i x_i) / sum(w_i)`` over survivors.
6. *Uncertainty* (``unc_from='scatter'``, the default): sample variance of the
   survivors, ``var = sum((x_i - mu)^2) / (CNT - 1)`` (ddof = 1), corrected for
   the truncation of a Gaussian at +-k (k = ``nsigma``) when clipping was
   applied (``n >= 3``)::

       f(k)     = 1 - 2 k phi(k) / (2 Phi(k) - 1)      (variance-reduction factor)
       var_corr = var / f(k)
       UNC      = sqrt(var_corr / CNT)

   with phi, Phi the standard normal pdf and cdf (f(2.1) = 0.80842,
   see :func:`clip_variance_factor`).  For ``n <= 2`` (no clipping) ``f`` is
   taken as 1.  This is the standard error of the mean, in data units.

   Caveat (measured, see ``tests/test_combine.py``): for Gaussian data the
   corrected variance ``var_corr`` is unbiased only as N grows (mean ratio to
   sigma^2: 0.93 at N = 20, 0.98 at N = 200, k = 2.1: the robust sigma of few
   values is biased low, so the effective truncation is tighter than k), and
   even then ``UNC`` is smaller than the actual scatter of the clipped mean,
   which also carries the noise of the data-dependent centre and cut:
   asymptotically ``UNC / true SE -> (P - 2 k phi(k)) / (P sqrt(f(k)))`` with
   ``P = 2 Phi(k) - 1`` (0.899 for k = 2.1; 0.87 measured at N = 20).  This is
   the KPF definition and is kept as is.

   With ``weights`` (frame weights ``w_i > 0``, treated as *reliability*
   weights: the frames are assumed to share one scatter ``sigma`` estimated from
   the data), with ``V1 = sum(w_i)``, ``V2 = sum(w_i^2)`` over survivors::

       var   = sum(w_i (x_i - mu)^2) / (V1 - V2 / V1)     (unbiased weighted variance)
       UNC   = sqrt(var / f(k) * V2 / V1^2)               (V1^2 / V2 = effective N)

   which reduce exactly to the unweighted formulas when all weights are equal
   (equal weights are in fact detected and routed to the unweighted code, so
   the results are bit-identical).

7. *Propagated uncertainty* (needs per-frame 1-sigma uncertainties ``uncs``, in
   the unit of the unscaled frame): ``UNC = sqrt(sum(w_i^2 (scale_i sigma_i)^2))
   / sum(w_i)`` over the survivors (``sqrt(sum sigma_i^2) / CNT`` unweighted), with
   no clip correction.  It is used for every pixel with ``unc_from='input'`` and,
   with ``unc_from='scatter'``, for pixels with a single survivor when ``uncs``
   are given.

Edge cases
----------
- ``n == 0`` (every frame masked or non-finite): value NaN, UNC NaN, CNT 0.
- ``n == 1``: value = that value, CNT 1; UNC = NaN, or the propagated input
  uncertainty ``|scale_i| sigma_i`` if ``uncs`` are given.
- ``n == 2``: no clipping, plain (weighted) mean of the two; UNC from the scatter
  of the two values (ddof = 1, weighted formula above, ``f = 1``) with
  ``unc_from='scatter'``, or propagated from ``uncs`` with ``unc_from='input'``.
  Rationale: with two values the scatter estimate has one degree of freedom and
  is very noisy, but it is data-driven and needs no input uncertainties; callers
  that do have trustworthy per-frame uncertainties ask for ``'input'``.
- ``s == 0`` (e.g. all values equal): only values equal to ``m`` are kept.
- A pixel with a single survivor after clipping (possible only for
  ``nsigma < 2``) gets UNC from ``uncs`` if given, else NaN; with no survivor
  at all (possible only for ``nsigma < 1`` and even ``n``) it is treated like
  ``n == 0``.

Precision
---------
Order statistics are float32 values (exact); the median, percentiles, ``s`` and
the rejection bound are computed in float64 exactly as numpy does, and the bound
is converted to the float32 thresholds that select the same values, so the set
of survivors is identical to a float64 numpy implementation.  Sums of
``x - float32(m)`` and of its square are accumulated in float32 blocks of 32
frames whose totals are kept in float32 (float64 beyond 1024 frames): relative
error about ``(32 + N / 32) * 6e-8`` of the sums; the value and UNC are then
computed in float32 (unweighted) or float64 (weights or input uncertainties).
Measured against the float64 reference: ~3e-8 of the value, ~4e-7 of UNC.
Outputs are float32 (value, UNC) and int16 (int32 for more than 32767 frames)
for CNT.  Values of magnitude above ~1e19 overflow the float32 squares.

Memory
------
:func:`clipped_mean` works on chunks of at most ``chunk_pixels`` pixels, with a
workspace of at most ``1.25 (15 N + 386)`` bytes per chunk pixel
(:func:`workspace_bytes`; more with weights or uncertainties), independent of
the image size.  :func:`combine` counts the outputs (10 bytes per pixel for
<= 32767 frames), one workspace and one set of strip buffers per thread
(``N * nx * (4 [+ 1 with masks] [+ 4 with uncertainties])`` bytes per strip
row) and the sources' declared read transients against ``mem_limit``, and
picks the strip height accordingly (strip buffers are also capped at
:data:`MAX_STRIP_BYTES` per thread).  The Python interpreter and imported
modules (~60-70 MiB) come on top.

Speed
-----
The order statistics come from Batcher's odd-even merge sorting network applied
with vectorised ``numpy.minimum``/``maximum`` over chunks of pixels (the rows of
a (N, chunk) buffer stay contiguous; the first comparators read the strip
directly), pruned to what is needed: the ranks of the median and percentiles
exact, and the runs of ranks between them as sets.  The survivors are then
summed over those rows: a row at or below the median can only fail the low cut
and one above it only the high cut, and for ``nsigma >= 2`` the rows between P16
and P84 cannot fail at all, so most rows need no test.  With weights or input
uncertainties the frames are summed in their original order instead.  Stacks
larger than :data:`NETWORK_MAX_N` frames use ``numpy.sort`` on the transposed
chunk.  Every pixel goes through this all-valid path; the pixels with a masked
or non-finite value are then redone by a general path (per-pixel numbers of
valid values) on a compacted copy, so a pixel's path depends only on its own
values and the results do not depend on the chunking, the strip height or the
number of threads.  No Python loop runs per pixel; loops run per frame and per
comparator, on vectors of ``chunk_pixels`` pixels.  ``threads`` > 1 runs chunks
(:func:`clipped_mean`) or whole strips, reading included (:func:`combine`), on
worker threads: numpy releases the GIL in its loops.

References
----------
KPF data reduction pipeline, master bias/dark/flat/arc stacking
(``Keck-DataReductionPipelines/KPF-Pipeline``, ``modules/Utils/frame_stacker.py``):
median, half the 16-84 percentile spread, keep ``m - k s <= x <= m + k s``, mean
of survivors, variance reinflated for the clipping.  Differences, on purpose:
KPF uses the ddof = 0 variance and a Monte-Carlo estimate (1e6 normal deviates,
same clipping) of ``1 / f(k)``; here the variance is ddof = 1 and ``f(k)`` is the
analytic truncated-Gaussian factor, and masks, weights, scales and the small-N
cases are defined.  Default nsigma per calibration type: :data:`KPF_NSIGMA`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "KPF_NSIGMA",
    "DEFAULT_MEM_LIMIT",
    "DEFAULT_CHUNK_PIXELS",
    "NETWORK_MAX_N",
    "MAX_STRIP_BYTES",
    "StripSource",
    "CombineResult",
    "StripPlan",
    "clip_variance_factor",
    "clipped_mean",
    "combine",
    "plan_strips",
    "workspace_bytes",
]

#: nsigma used by the KPF pipeline for each master type (dimensionless).
KPF_NSIGMA = {"bias": 2.1, "dark": 2.2, "flat": 2.3, "arc": 2.4}

#: Default bound (bytes) on everything :func:`combine` allocates, outputs included.
DEFAULT_MEM_LIMIT = 256 * 2**20

#: Default number of pixels processed together by the vectorised kernel.
DEFAULT_CHUNK_PIXELS = 32768

#: Largest stack sorted with a sorting network; larger stacks use numpy.sort.
NETWORK_MAX_N = 96

#: Strip buffers are not made larger than this (bytes) even if mem_limit allows:
#: larger strips do not make the combine faster.
MAX_STRIP_BYTES = 64 * 2**20

_F32_MAX = float(np.finfo(np.float32).max)
_ACC_BLOCK = 32  # frames accumulated in a float32 block before adding it to the totals
_F64_TOTALS_N = 1024  # above this many frames the block totals are kept in float64
_SMALL_CHUNK = 1024  # general-path chunks up to this many pixels are sorted with numpy.sort
_Q16 = 16 / 100  # numpy.percentile divides q by 100 in float64
_Q84 = 84 / 100


# --------------------------------------------------------------------------- helpers
def clip_variance_factor(nsigma: float) -> float:
    """Variance of a unit Gaussian truncated at +-``nsigma`` (symmetric).

    Parameters
    ----------
    nsigma : float
        Truncation half-width k in units of sigma (dimensionless, > 0).

    Returns
    -------
    float
        ``f(k) = 1 - 2 k phi(k) / (2 Phi(k) - 1)`` (dimensionless, in (0, 1)),
        the factor by which clipping at +-k sigma shrinks the variance.  E.g.
        f(2.1) = 0.808424.
    """
    k = float(nsigma)
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"nsigma must be a finite number > 0, got {nsigma!r}")
    phi = math.exp(-0.5 * k * k) / math.sqrt(2.0 * math.pi)
    two_cdf_m1 = math.erf(k / math.sqrt(2.0))  # 2 Phi(k) - 1
    return 1.0 - 2.0 * k * phi / two_cdf_m1


def _check_nsigma(nsigma) -> float:
    try:
        k = float(nsigma)
    except (TypeError, ValueError):
        raise ValueError(f"nsigma must be a finite number > 0, got {nsigma!r}") from None
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"nsigma must be a finite number > 0, got {nsigma!r}")
    return k


@lru_cache(maxsize=None)
def _batcher_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort for ``n`` wires."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


@lru_cache(maxsize=256)
def _network(n: int, ranks: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Batcher network for ``n`` wires pruned to the comparators that influence ``ranks``."""
    need = set(ranks)
    kept = []
    for i, j in reversed(_batcher_pairs(n)):
        if i in need or j in need:
            kept.append((i, j))
            need.add(i)
            need.add(j)
    return tuple(reversed(kept))


@lru_cache(maxsize=256)
def _net_plan(n: int, pairs: tuple[tuple[int, int], ...]):
    """Buffer assignment for applying ``pairs`` to n read-only source rows.

    Rows are numbered 0..n-1 (sources) and n..2n (buffer rows).  Returns
    ``(ops, final)``: ``ops`` are (a, b, min_out, max_out) row numbers (max_out
    may be b itself once b is a buffer row), ``final[r]`` the row holding wire r.
    """
    where = list(range(n))           # wire -> row
    free = list(range(2 * n, n - 1, -1))
    ops = []
    for i, j in pairs:
        a, b = where[i], where[j]
        lo_out = free.pop()
        if b >= n:
            hi_out = b
        else:
            hi_out = free.pop()
        ops.append((a, b, lo_out, hi_out))
        if a >= n:
            free.append(a)
        where[i], where[j] = lo_out, hi_out
    return tuple(ops), tuple(where)


@lru_cache(maxsize=256)
def _partition_network(n: int, exact: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Batcher network for ``n`` wires pruned so that it leaves the ranks ``exact``
    on their wires and every run of ranks between two of them on its wires as a
    set (in any order).

    Pruning rule (sound): scanning backwards, a comparator whose two wires are
    not used by a later kept comparator and lie in the same run only permutes
    values within that run, so it is dropped.
    """
    ex = set(exact)
    group = []
    g = 0
    prev_exact = True
    for r in range(n):
        if r in ex:
            group.append(-1 - r)
            prev_exact = True
        else:
            if prev_exact:
                g += 1
            group.append(g)
            prev_exact = False
    final = [True] * n
    kept = []
    for i, j in reversed(_batcher_pairs(n)):
        if final[i] and final[j] and group[i] == group[j]:
            continue
        kept.append((i, j))
        final[i] = final[j] = False
    return tuple(reversed(kept))


def _pct_index(n: int, q: float) -> tuple[int, int, float]:
    """numpy 'linear' percentile of n sorted values: (lower rank, upper rank, gamma)."""
    vi = (n - 1) * q
    j = math.floor(vi)
    if vi >= n - 1:
        return n - 1, n - 1, vi - j
    return j, j + 1, vi - j


def _ranks_for(n: int) -> set[int]:
    r = {(n - 1) // 2, n // 2}
    for q in (_Q16, _Q84):
        lo, hi, _ = _pct_index(n, q)
        r.update((lo, hi))
    return r


@lru_cache(maxsize=256)
def _ranks_for_range(nmin: int, nmax: int) -> tuple[int, ...]:
    r: set[int] = set()
    for n in range(max(nmin, 1), nmax + 1):
        r |= _ranks_for(n)
    return tuple(sorted(r))


def workspace_bytes(nframes: int, chunk_pixels: int, *, weighted: bool = False,
                    with_unc: bool = False) -> int:
    """Upper bound of the memory (bytes) :func:`clipped_mean` uses per chunk.

    Parameters
    ----------
    nframes : int
        Number of frames N.
    chunk_pixels : int
        Pixels per chunk.
    weighted, with_unc : bool
        Whether weights / input uncertainties are used.

    Returns
    -------
    int
        Bytes: scaled copy (4 N), sort buffer (4 (N + 1)), validity (2 N) and
        about 40 per-pixel float64/float32 vectors, plus 25 % for numpy's own
        short-lived temporaries: ``1.25 (15 N + 386) chunk_pixels`` unweighted.
    """
    n = int(nframes)
    b = int(chunk_pixels)
    # scaled copy 4N, sort buffer 4(N+1), validity N and its negation N (general
    # path), ~20 float64 + ~20 float32/int vectors and the general path's index
    # temporaries (~90 bytes)
    per_pix = 4 * n + 4 * (n + 1) + 2 * n + 8 * 20 + 4 * 20 + 32 + 90
    # compacted copy of the pixels redone by the general path (at worst all):
    # values 4N, masks N, outputs and index
    per_pix += 5 * n + 20
    if weighted:
        per_pix += 8 * 4 + 4 * 4
    if with_unc:
        per_pix += 4 * n + 8 * 2 + 4 * 2 + 4 * n
    if n > NETWORK_MAX_N:
        per_pix += 4 * n  # transposed copy sorted in place
    small = 8 * n * min(b, _SMALL_CHUNK)  # numpy.sort of a small general-path chunk
    return int(1.25 * per_pix * b) + small + 65536


# --------------------------------------------------------------------------- kernel
_I32_MAG = np.int32(0x7FFFFFFF)


def _f32_key(x32: np.ndarray) -> np.ndarray:
    """Monotone int64 key of float32 values (-0.0 and +0.0 are adjacent keys)."""
    b = x32.view(np.int32)
    return (b ^ ((b >> 31) & _I32_MAG)).astype(np.int64)


def _key_f32(key: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_f32_key`."""
    k = key.astype(np.int32)
    return (k ^ ((k >> 31) & _I32_MAG)).view(np.float32)


_KEY_NEG_INF = int(_f32_key(np.array([-np.inf], np.float32))[0])
_KEY_POS_INF = int(_f32_key(np.array([np.inf], np.float32))[0])


def _exact_threshold(m: np.ndarray, bound: np.ndarray, low: bool,
                     guess: np.ndarray | None = None) -> np.ndarray:
    """Exact float32 clipping threshold by bisection over the float32 ordering.

    ``low``: smallest float32 x with fl64(m - x) <= bound; else the largest
    float32 x with fl64(x - m) <= bound (m, bound float64 arrays).  ``guess``
    (float32, optional) is checked first and, if wrong, brackets the search.
    """

    def pred(key, mm, bd):
        x = _key_f32(key).astype(np.float64)
        return ((mm - x) <= bd) if low else ((x - mm) <= bd)

    out = np.empty(m.shape, np.float32)
    todo = np.arange(m.size)
    a = np.full(m.shape, _KEY_NEG_INF, np.int64)
    b = np.full(m.shape, _KEY_POS_INF, np.int64)
    if guess is not None:
        kg = _f32_key(guess)
        step = -1 if low else 1
        done = pred(kg, m, bound) & ~pred(kg + step, m, bound)
        out[done] = guess[done]
        todo = np.flatnonzero(~done)
        if todo.size == 0:
            return out
        # a valid bracket has pred(a) == (not low) and pred(b) == low
        ga = np.maximum(kg[todo] - 2, _KEY_NEG_INF)
        gb = np.minimum(kg[todo] + 2, _KEY_POS_INF)
        good = (pred(ga, m[todo], bound[todo]) != low) & (pred(gb, m[todo], bound[todo]) == low)
        a[todo] = np.where(good, ga, a[todo])
        b[todo] = np.where(good, gb, b[todo])
    a, b, mm, bd = a[todo], b[todo], m[todo], bound[todo]
    for _ in range(40):
        if not np.any(b - a > 1):
            break
        mid = (a + b) // 2
        p = pred(mid, mm, bd)
        if low:      # P false at a, true at b
            b = np.where(p, mid, b)
            a = np.where(p, a, mid)
        else:        # P true at a, false at b
            a = np.where(p, mid, a)
            b = np.where(p, b, mid)
    out[todo] = _key_f32(b if low else a)
    return out


class _Kernel:
    """Vectorised clipped mean over (N, b) chunks; holds the reusable workspace."""

    def __init__(self, nframes: int, nsigma: float, chunk: int, scales, weights,
                 with_unc: bool, unc_from: str):
        n = nframes
        self.n = n
        self.k = nsigma
        self.fac = clip_variance_factor(nsigma)
        self.chunk = chunk
        self.scales = scales  # float32 array or None
        self.weights = weights  # float64 array or None (None also for equal weights)
        self.with_unc = with_unc
        self.unc_from = unc_from
        b = chunk
        f32, f64 = np.float32, np.float64
        self.xs = np.empty((n, b), f32)
        self.buf = np.empty((n + 1, b), f32)
        self.valid = np.empty((n, b), bool)
        self.v = {name: np.empty(b, f64) for name in (
            "m", "p16", "p84", "s", "bound", "t", "t2", "lo64", "hi64", "eps", "S1", "S2",
            "Sw", "Sw2", "Su", "mean", "var", "cntf", "g")}
        self.f = {name: np.empty(b, f32) for name in (
            "lo", "hi", "c", "d", "e", "wk", "a1", "a2", "aw", "aw2", "au", "cf", "t1", "t2")}
        # totals of the float32 blocks: float32 (relative error ~ (32 + N/32) 6e-8)
        # unless the stack is very deep
        tot = f32 if n <= _F64_TOTALS_N else f64
        self.tot = {name: np.empty(b, tot) for name in ("S1", "S2", "Sw", "Sw2", "Su")}
        self.bools = {name: np.empty(b, bool) for name in ("k", "k2", "ok", "ok2", "mp")}
        self.i32 = np.empty(b, np.int32)
        self.c8 = np.empty(b, np.uint8)
        self.cnt = np.empty(b, np.int32 if n > 32767 else np.int16)
        self.ivec = np.empty(b, np.intp)
        self.nvalid = np.empty(b, np.intp)
        self.arange = np.arange(b, dtype=np.intp)
        # fixed-n (fast path) rank bookkeeping
        j16 = _pct_index(n, _Q16)
        j84 = _pct_index(n, _Q84)
        self.j16, self.j84 = j16, j84
        # Unweighted without input uncertainties: survivors are summed over the
        # rows of the (partially) sorted values.  Otherwise frames are summed in
        # their original order.  Either way only the needed ranks are exact.
        self.sorted_acc = weights is None and not with_unc
        exact = tuple(sorted(_ranks_for(n)))
        self.net_fast = (_partition_network(n, exact) if self.sorted_acc
                         else _network(n, exact))
        # row categories for the sorted accumulation: 0 no test, 1 low test, 2 high test
        cat = []
        for r in range(n):
            if n <= 2:
                cat.append(0)
            elif nsigma >= 2 and j16[0] < r <= j84[0]:
                cat.append(0)          # inside [P16, P84]: always within 2 s of m
            elif r <= (n - 1) // 2:
                cat.append(1)          # <= m: only the low bound can reject it
            else:
                cat.append(2)          # >= m: only the high bound can reject it
        self.cat = cat
        self.n_free = cat.count(0)

    # ---- sorting --------------------------------------------------------------------
    def _net_from(self, src_rows, pairs, nb):
        """Apply ``pairs`` to read-only ``src_rows``; results go to buffer rows."""
        n = self.n
        ops, final = _net_plan(n, pairs)
        table = list(src_rows) + [self.buf[i, :nb] for i in range(n + 1)]
        mn, mx = np.minimum, np.maximum
        for a, b, lo_out, hi_out in ops:
            ra = table[a]
            rb = table[b]
            mn(ra, rb, out=table[lo_out])
            mx(ra, rb, out=table[hi_out])
        return [table[i] for i in final]

    def _sorted_rows(self, xs, nb, pairs):
        """Rows (views) holding the column-wise order statistics of xs."""
        n = self.n
        if n > NETWORK_MAX_N:
            srt = np.ascontiguousarray(xs.T)  # (b, n): contiguous lanes
            srt.sort(axis=1)
            self.buf[:n, :nb] = srt.T
            del srt
            return [self.buf[i, :nb] for i in range(n)]
        return self._net_from([xs[i] for i in range(n)], pairs, nb)

    def _sort_buf(self, nb: int, pairs):
        """Apply ``pairs`` to the columns of buf[:n, :nb] in place; return
        (rank -> row view, rank -> buffer row index)."""
        n = self.n
        if n > NETWORK_MAX_N or nb <= _SMALL_CHUNK:
            # (few pixels: one numpy.sort call beats a comparator loop; the sorted
            # values are the same whichever way they are sorted)
            srt = np.ascontiguousarray(self.buf[:n, :nb].T)
            srt.sort(axis=1)
            self.buf[:n, :nb] = srt.T
            del srt
            return [self.buf[i, :nb] for i in range(n)], list(range(n))
        rows = [self.buf[i, :nb] for i in range(n)]
        rid = list(range(n))
        spare = self.buf[n, :nb]
        sid = n
        mn, mx = np.minimum, np.maximum
        for i, j in pairs:
            a = rows[i]
            bb = rows[j]
            mn(a, bb, out=spare)
            mx(a, bb, out=bb)
            rows[i], spare = spare, a
            rid[i], sid = sid, rid[i]
        return rows, rid

    # ---- centre, spread, thresholds ----------------------------------------------------
    def _lerp_fixed(self, a, b_, g: float, out):
        """numpy._lerp in float64 for a scalar gamma."""
        t = self.v["t"][: out.shape[0]]
        np.subtract(b_, a, out=t, dtype=np.float64)
        if g >= 0.5:
            np.multiply(t, 1 - g, out=t)
            np.subtract(b_, t, out=out, dtype=np.float64)
        else:
            np.multiply(t, g, out=t)
            np.add(a, t, out=out, dtype=np.float64)

    def _lerp_var(self, a, b_, g, out):
        """numpy._lerp in float64 for a per-pixel gamma (float64 array)."""
        nb = out.shape[0]
        t = self.v["t"][:nb]
        t2 = self.v["t2"][:nb]
        np.subtract(b_, a, out=t, dtype=np.float64)   # diff_b_a
        np.multiply(t, g, out=t2)
        np.add(a, t2, out=out, dtype=np.float64)
        ge = self.bools["ok2"][:nb]
        np.greater_equal(g, 0.5, out=ge)
        if ge.any():
            np.subtract(1.0, g, out=t2)
            np.multiply(t, t2, out=t2)
            np.subtract(b_, t2, out=t, dtype=np.float64)
            np.copyto(out, t, where=ge)

    def _stats_fixed(self, rows, nb):
        """m, s, bound for every pixel having all N values (float64, numpy formulas)."""
        n = self.n
        v = self.v
        m, p16, p84, s, bound = (v[k][:nb] for k in ("m", "p16", "p84", "s", "bound"))
        np.add(rows[(n - 1) // 2], rows[n // 2], out=m, dtype=np.float64)
        np.multiply(m, 0.5, out=m)
        j0, j1, g = self.j16
        self._lerp_fixed(rows[j0], rows[j1], g, p16)
        j0, j1, g = self.j84
        self._lerp_fixed(rows[j0], rows[j1], g, p84)
        np.subtract(p84, p16, out=s)
        np.divide(s, 2, out=s)
        np.multiply(s, self.k, out=bound)

    def _thresholds(self, nb: int):
        """float32 lo/hi such that lo <= x <= hi  <=>  float64 |x - m| <= bound.

        The float64 bounds m -+ bound are rounded to float32 in the safe
        direction; where a float32 lies within 2**-50 (|m| + bound) of them (or
        they round to zero) the rounding of ``x - m`` could matter and the
        threshold is found exactly by bisection.
        """
        v, f, bl = self.v, self.f, self.bools
        m, bound, eps = v["m"][:nb], v["bound"][:nb], v["eps"][:nb]
        t = v["t"][:nb]
        ok, ok2 = bl["ok"][:nb], bl["ok2"][:nb]
        sg = self.i32[:nb]
        np.abs(m, out=eps)
        np.add(eps, bound, out=eps)
        np.multiply(eps, 2.0 ** -50, out=eps)
        for low in (True, False):
            thr = f["lo"][:nb] if low else f["hi"][:nb]
            t64 = v["lo64"][:nb] if low else v["hi64"][:nb]
            if low:
                np.subtract(m, bound, out=t64)
            else:
                np.add(m, bound, out=t64)
            np.copyto(thr, t64, casting="same_kind")   # nearest float32
            np.add(thr, np.float32(0.0), out=thr)      # -0.0 -> +0.0
            np.subtract(thr, t64, out=t, dtype=np.float64)
            # step one float32 towards the inside where rounding went outside
            if low:
                np.less(t, 0.0, out=ok)
            else:
                np.greater(t, 0.0, out=ok)
            bits = thr.view(np.int32)
            np.right_shift(bits, 31, out=sg)
            np.bitwise_or(sg, 1, out=sg)               # +1 / -1: sign of thr
            np.multiply(sg, ok, out=sg)
            if low:
                np.add(bits, sg, out=bits)             # next float32 up
            else:
                np.subtract(bits, sg, out=bits)        # next float32 down
            # ambiguous: a float32 within eps of the float64 bound, or zero
            np.abs(t, out=t)
            np.less_equal(t, eps, out=ok)
            np.equal(thr, 0, out=ok2)
            np.logical_or(ok, ok2, out=ok)
            if ok.any():
                idx = np.flatnonzero(ok)
                thr[idx] = _exact_threshold(m[idx], bound[idx], low, thr[idx])

    # ---- one chunk -------------------------------------------------------------------
    def run_chunk(self, X, M, U, out_mean, out_unc, out_cnt):
        """Combine one chunk. X: (N, b) any real dtype; M: (N, b) bool or None;
        U: (N, b) 1-sigma or None.  Writes into the three (b,) outputs.

        All pixels go through the all-valid path; the pixels with a masked or
        non-finite value are then redone by the general path on a compacted
        copy.  A pixel's path thus depends only on its own values, and so does
        its result: chunking, strips and threads never change any output.
        """
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            nb = X.shape[1]
            scales = self.scales
            if scales is None and X.dtype == np.float32:
                xs = X
            else:
                xs = self.xs[:, :nb]
                np.copyto(xs, X, casting="unsafe")
                if scales is not None:
                    for i in range(self.n):
                        np.multiply(xs[i], scales[i], out=xs[i])
            bad = None
            if M is not None:
                bad = self.bools["mp"][:nb]
                np.logical_or.reduce(M, axis=0, out=bad)
                if not bad.any():
                    bad = None
                    M = None
            self._fast(xs, U, nb)
            self._finish_any(nb, U, out_mean, out_unc, out_cnt,
                             self.fac if self.n >= 3 else 1.0)
            nonfinite = ~np.isfinite(self.tot["S1"][:nb])
            bad = nonfinite if bad is None else (bad | nonfinite)
            if not bad.any():
                return
            idx = np.flatnonzero(bad)
            k = idx.size
            sub_x = np.take(xs, idx, axis=1)
            sub_m = None if M is None else np.take(M, idx, axis=1)
            sub_u = None if U is None else np.take(U, idx, axis=1)
            om = np.empty(k, np.float32)
            ou = np.empty(k, np.float32)
            oc = np.empty(k, self.cnt.dtype)
            facv = self._slow(sub_x, sub_m, sub_u, k)
            self._finish_any(k, sub_u, om, ou, oc, facv)
            out_mean[idx] = om
            out_unc[idx] = ou
            out_cnt[idx] = oc

    def _finish_any(self, nb, U, out_mean, out_unc, out_cnt, facv):
        if self.sorted_acc:
            if isinstance(facv, float):
                isf = np.float32(1 / math.sqrt(facv))
            else:
                isf = (1 / np.sqrt(facv)).astype(np.float32)
            self._finish_sorted(nb, out_mean, out_unc, out_cnt, isf)
        else:
            self._finish(nb, U, out_mean, out_unc, out_cnt, facv=facv)

    def _sum_pairs(self, U):
        pairs = [("S1", "a1"), ("S2", "a2")]
        if self.weights is not None:
            pairs += [("Sw", "aw"), ("Sw2", "aw2")]
        if U is not None:
            pairs.append(("Su", "au"))
        return pairs

    def _reset_sums(self, nb, U):
        for big, small in self._sum_pairs(U):
            self.tot[big][:nb].fill(0.0)
            self.f[small][:nb].fill(0.0)
        self.cnt[:nb].fill(0)

    def _flush(self, nb, U):
        """Add the float32 block sums to the totals and clear them."""
        for big, small in self._sum_pairs(U):
            tb, fs = self.tot[big][:nb], self.f[small][:nb]
            np.add(tb, fs, out=tb)
            fs.fill(0.0)

    def _fast(self, xs, U, nb) -> None:
        """Sums assuming all N values of every pixel are valid; a pixel with a
        non-finite value ends with a non-finite S1 (redone by :meth:`_slow`)."""
        n = self.n
        v, f, bl = self.v, self.f, self.bools
        sorted_acc = self.sorted_acc
        rows = self._sorted_rows(xs, nb, self.net_fast)
        lo, hi, c = f["lo"][:nb], f["hi"][:nb], f["c"][:nb]
        if n >= 3:
            self._stats_fixed(rows, nb)
            self._thresholds(nb)
        else:
            m = v["m"][:nb]
            np.add(rows[0], rows[n - 1], out=m, dtype=np.float64)
            np.multiply(m, 0.5, out=m)
            lo.fill(-_F32_MAX)
            hi.fill(_F32_MAX)
        np.copyto(c, v["m"][:nb], casting="same_kind")
        self._reset_sums(nb, U)
        if sorted_acc:
            self._accumulate_fast(rows, nb)
        else:
            del rows
            self._accumulate(xs, None, U, nb)

    def _accumulate_fast(self, rows, nb):
        """Survivor sums over the sorted rows of an all-valid chunk.

        A row at or below the median can only fail the low cut, one above it
        only the high cut, and rows inside [P16, P84] pass both when nsigma >= 2
        (the same survivors as the two-sided test, see :meth:`_accumulate_sorted`).
        """
        f, bl = self.f, self.bools
        lo, hi, c = f["lo"][:nb], f["hi"][:nb], f["c"][:nb]
        k = bl["k"][:nb]
        d = f["d"][:nb]
        a1, a2 = f["a1"][:nb], f["a2"][:nb]
        cnt = self.cnt[:nb]
        cnt.fill(self.n_free)
        c8 = self.c8[:nb]            # uint8 block count (cheaper than int16 += bool)
        c8.fill(0)
        k8 = k.view(np.uint8)
        n = self.n
        for r in range(n):
            x = rows[r]
            np.subtract(x, c, out=d)
            cat = self.cat[r]
            if cat:
                if cat == 1:
                    np.greater_equal(x, lo, out=k)
                else:
                    np.less_equal(x, hi, out=k)
                np.multiply(d, k, out=d)
                np.add(c8, k8, out=c8)
            np.add(a1, d, out=a1)
            np.multiply(d, d, out=d)
            np.add(a2, d, out=a2)
            if (r + 1) % _ACC_BLOCK == 0 or r == n - 1:
                self._flush(nb, None)
                np.add(cnt, c8, out=cnt, casting="unsafe")
                c8.fill(0)

    def _accumulate(self, xs, valid, U, nb):
        """Survivor sums over frames in their original order (weights, uncertainties)."""
        n = self.n
        f, bl = self.f, self.bools
        lo, hi, c = f["lo"][:nb], f["hi"][:nb], f["c"][:nb]
        k, k2 = bl["k"][:nb], bl["k2"][:nb]
        d, e = f["d"][:nb], f["e"][:nb]
        a1, a2 = f["a1"][:nb], f["a2"][:nb]
        cnt = self.cnt[:nb]
        w = self.weights
        if w is not None:
            wk, aw, aw2 = f["wk"][:nb], f["aw"][:nb], f["aw2"][:nb]
            w32 = w.astype(np.float32)
            w2_32 = (w * w).astype(np.float32)
        if U is not None:
            au = f["au"][:nb]
            sc2 = np.ones(n) if self.scales is None else self.scales.astype(np.float64) ** 2
            uw32 = (sc2 * (1.0 if w is None else w * w)).astype(np.float32)
        for i in range(n):
            xi = xs[i]
            np.greater_equal(xi, lo, out=k)
            np.less_equal(xi, hi, out=k2)
            np.logical_and(k, k2, out=k)
            if valid is not None:
                np.logical_and(k, valid[i], out=k)
            np.add(cnt, k, out=cnt)
            if w is None:
                np.subtract(xi, c, out=d)
                np.multiply(d, k, out=d)
                np.add(a1, d, out=a1)
                np.multiply(d, d, out=d)
                np.add(a2, d, out=a2)
            else:
                np.multiply(k, w32[i], out=wk)
                np.subtract(xi, c, out=e)
                np.multiply(e, wk, out=d)
                np.add(a1, d, out=a1)
                np.multiply(d, e, out=d)
                np.add(a2, d, out=a2)
                np.add(aw, wk, out=aw)
                np.multiply(k, w2_32[i], out=wk)
                np.add(aw2, wk, out=aw2)
            if U is not None:
                ui = U[i]
                np.multiply(ui, ui, out=e, casting="unsafe")
                np.multiply(e, k, out=e)
                if uw32[i] != 1:
                    np.multiply(e, uw32[i], out=e)
                np.add(au, e, out=au)
            if (i + 1) % _ACC_BLOCK == 0 or i == n - 1:
                self._flush(nb, U)

    def _slow(self, xs, M, U, nb):
        """General path: per-pixel number of valid values (masks, NaN, inf).
        ``xs`` (scaled float32 values) is overwritten."""
        n = self.n
        v, f = self.v, self.f
        valid = self.valid[:, :nb]
        np.isfinite(xs, out=valid)
        if M is not None:
            valid &= ~M
        nv = self.nvalid[:nb]
        np.add.reduce(valid, axis=0, dtype=np.intp, out=nv)
        # invalid values -> +inf in the sort buffer (they sort to the end) and 0 in
        # the working copy (keeps the sums finite; they are excluded by `valid`).
        buf = self.buf[:n, :nb]
        np.copyto(buf, xs)
        inval = ~valid
        np.copyto(buf, np.float32(np.inf), where=inval)
        np.copyto(xs, np.float32(0.0), where=inval)
        del inval
        nmin = int(nv.min())
        pairs = (_batcher_pairs(n) if self.sorted_acc
                 else _network(n, _ranks_for_range(max(nmin, 1), n)))
        rows, rid = self._sort_buf(nb, pairs)
        m, p16, p84, s, bound = (v[k][:nb] for k in ("m", "p16", "p84", "s", "bound"))
        lo, hi, c = f["lo"][:nb], f["hi"][:nb], f["c"][:nb]
        flat = self.buf.reshape(-1)  # ranks map to any of the N + 1 buffer rows
        stride = self.buf.shape[1]
        rid_arr = np.asarray(rid, dtype=np.intp)
        idx = self.ivec[:nb]
        base = self.arange[:nb]

        def gather(rank_vec, out32):
            np.take(rid_arr, rank_vec, out=idx)
            np.multiply(idx, stride, out=idx)
            np.add(idx, base, out=idx)
            np.take(flat, idx, out=out32)
            return out32

        a1, a2 = f["a1"][:nb], f["a2"][:nb]
        nvc = np.maximum(nv, 1)  # n == 0 pixels: read rank 0, result discarded
        gather((nvc - 1) // 2, a1)
        gather(nvc // 2, a2)
        np.add(a1, a2, out=m, dtype=np.float64)
        np.multiply(m, 0.5, out=m)
        gv = v["g"][:nb]
        for q, out in ((_Q16, p16), (_Q84, p84)):
            vi = (nvc - 1) * q                       # float64, as numpy
            j = np.floor(vi)
            np.subtract(vi, j, out=gv)
            j0 = j.astype(np.intp)
            top = vi >= (nvc - 1)
            j0[top] = nvc[top] - 1
            j1 = np.minimum(j0 + 1, nvc - 1)
            gather(j0, a1)
            gather(j1, a2)
            self._lerp_var(a1, a2, gv, out)
        np.subtract(p84, p16, out=s)
        np.divide(s, 2, out=s)
        np.multiply(s, self.k, out=bound)
        none = nv == 0
        if none.any():
            m[none] = 0.0
            bound[none] = 0.0
        self._thresholds(nb)
        noclip = nv <= 2
        if noclip.any():
            lo[noclip] = -_F32_MAX
            hi[noclip] = _F32_MAX
        np.copyto(c, m, casting="same_kind")
        self._reset_sums(nb, U)
        if self.sorted_acc:
            self._accumulate_sorted(rows, nv, nmin, nb)
        else:
            self._accumulate(xs, valid, U, nb)
        return np.where(noclip, 1.0, self.fac)

    def _accumulate_sorted(self, rows, nv, nmin, nb):
        """Survivor sums over sorted rows, some pixels having fewer valid values (the
        ranks >= n of a pixel hold +inf).  Adds exactly the same terms in the same
        order as the all-valid path, so results do not depend on the path."""
        f, bl = self.f, self.bools
        lo, hi, c = f["lo"][:nb], f["hi"][:nb], f["c"][:nb]
        k, k2 = bl["k"][:nb], bl["k2"][:nb]
        d = f["d"][:nb]
        a1, a2 = f["a1"][:nb], f["a2"][:nb]
        cnt = self.cnt[:nb]
        for r in range(self.n):
            x = rows[r]
            if r >= nmin:
                np.greater(nv, r, out=k2)           # rank r is a valid value
                np.copyto(x, c, where=~k2)          # +inf -> c: finite, excluded below
            np.greater_equal(x, lo, out=k)
            if r >= nmin:
                np.logical_and(k, k2, out=k)
            np.less_equal(x, hi, out=k2)
            np.logical_and(k, k2, out=k)
            np.add(cnt, k, out=cnt)
            np.subtract(x, c, out=d)
            np.multiply(d, k, out=d)
            np.add(a1, d, out=a1)
            np.multiply(d, d, out=d)
            np.add(a2, d, out=a2)
            if (r + 1) % _ACC_BLOCK == 0 or r == self.n - 1:
                self._flush(nb, None)

    def _finish_sorted(self, nb, out_mean, out_unc, out_cnt, inv_sqrt_fac):
        """Value, UNC and CNT for the unweighted estimator without input
        uncertainties (same operations in every path).  CNT 0 gives 0/0 = NaN for
        both, CNT 1 gives (S2 - S1^2)/0 = 0/0 = NaN for UNC, as documented."""
        f = self.f
        cnt = self.cnt[:nb]
        S1, S2 = self.tot["S1"][:nb], self.tot["S2"][:nb]
        cntf, t, t2 = f["cf"][:nb], f["t1"][:nb], f["t2"][:nb]
        np.copyto(cntf, cnt, casting="unsafe")
        np.divide(S1, cntf, out=t)                    # mean - c
        np.add(t, f["c"][:nb], out=out_mean, casting="same_kind")
        np.multiply(t, S1, out=t)
        np.subtract(S2, t, out=t)                     # sum (x - mean)^2
        np.maximum(t, np.float32(0), out=t)
        np.subtract(cntf, np.float32(1), out=t2)
        np.multiply(t2, cntf, out=t2)                 # CNT (CNT - 1)
        np.divide(t, t2, out=t)
        np.sqrt(t, out=out_unc, casting="same_kind")
        np.multiply(out_unc, inv_sqrt_fac, out=out_unc)
        np.copyto(out_cnt, cnt, casting="unsafe")

    def _finish(self, nb, U, out_mean, out_unc, out_cnt, facv):
        """Per-pixel value, UNC and CNT from the sums (float64)."""
        v, f = self.v, self.f
        for big, _ in self._sum_pairs(U):
            np.copyto(v[big][:nb], self.tot[big][:nb])
        w = self.weights
        cnt = self.cnt[:nb]
        c = f["c"][:nb]
        S1, S2 = v["S1"][:nb], v["S2"][:nb]
        Sw, Sw2 = v["Sw"][:nb], v["Sw2"][:nb]
        mean, var, cntf = v["mean"][:nb], v["var"][:nb], v["cntf"][:nb]
        t = v["t"][:nb]
        np.copyto(cntf, cnt, casting="unsafe")
        V1 = cntf if w is None else Sw
        np.divide(S1, V1, out=mean)
        np.add(mean, c, out=mean)
        # sum of squares about the mean: S2 - S1^2 / V1
        np.multiply(S1, S1, out=t)
        np.divide(t, V1, out=t)
        np.subtract(S2, t, out=var)
        np.maximum(var, 0.0, out=var)
        if w is None:
            np.subtract(cntf, 1.0, out=t)          # ddof = 1
            np.divide(var, t, out=var)
            np.divide(var, facv, out=var)
            np.divide(var, cntf, out=var)          # variance of the mean
        else:
            np.divide(Sw2, Sw, out=t)
            np.subtract(Sw, t, out=t)              # V1 - V2 / V1
            np.divide(var, t, out=var)
            np.divide(var, facv, out=var)
            np.multiply(var, Sw2, out=var)
            np.divide(var, Sw, out=var)
            np.divide(var, Sw, out=var)            # * V2 / V1^2
        one = cnt <= 1
        if U is not None:
            t2 = v["t2"][:nb]
            np.sqrt(v["Su"][:nb], out=t2)
            np.divide(t2, V1, out=t2)              # sqrt(sum w^2 s^2 sig^2) / sum w
            np.square(t2, out=t2)
            if self.unc_from == "input":
                np.copyto(var, t2)
            else:
                np.copyto(var, t2, where=one)
        elif one.any():
            var[one] = np.nan
        np.sqrt(var, out=var)
        zero = cnt == 0
        if zero.any():
            mean[zero] = np.nan
            var[zero] = np.nan
        np.copyto(out_mean, mean, casting="same_kind")
        np.copyto(out_unc, var, casting="same_kind")
        np.copyto(out_cnt, cnt, casting="unsafe")


def _as_vector(name: str, val, n: int, *, positive: bool) -> np.ndarray | None:
    if val is None:
        return None
    arr = np.asarray(val, dtype=np.float64).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one value per frame ({n}), got shape {np.shape(val)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if positive and not np.all(arr > 0):
        raise ValueError(f"{name} must be > 0, got {arr.tolist()}")
    if not positive and np.any(arr == 0):
        raise ValueError(f"{name} must be non-zero, got {arr.tolist()}")
    return arr


def _check_unc_from(unc_from: str) -> str:
    if unc_from not in ("scatter", "input"):
        raise ValueError(f"unc_from must be 'scatter' or 'input', got {unc_from!r}")
    return unc_from


def _check_threads(threads) -> int:
    t = operator.index(threads)
    if t < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    return t


def _make_kernel(n, nsigma, chunk, scales, weights, with_unc, unc_from):
    sc32 = None if scales is None else scales.astype(np.float32)
    if sc32 is not None and np.all(sc32 == 1):
        sc32 = None
    w = weights
    if w is not None and np.all(w == w[0]):
        w = None  # equal weights: bit-identical to the unweighted estimator
    return _Kernel(n, nsigma, chunk, sc32, w, with_unc, unc_from)


def _run_2d(kern: _Kernel, X2, M2, U2, om, ou, oc, p_start=0, p_stop=None):
    """Run the kernel over columns [p_start, p_stop) of (N, P) arrays, in chunks."""
    P = X2.shape[1] if p_stop is None else p_stop
    b = kern.chunk
    for p0 in range(p_start, P, b):
        p1 = min(P, p0 + b)
        kern.run_chunk(X2[:, p0:p1],
                       None if M2 is None else M2[:, p0:p1],
                       None if U2 is None else U2[:, p0:p1],
                       om[p0:p1], ou[p0:p1], oc[p0:p1])


def _flat_view(a: np.ndarray) -> np.ndarray:
    """(N, ny, nx) -> (N, ny*nx) without copying when the frame planes are contiguous."""
    n = a.shape[0]
    try:
        return np.reshape(a, (n, -1), copy=False)  # raises instead of copying
    except ValueError:
        return np.ascontiguousarray(a).reshape(n, -1)


def _run_threads(fn, nthreads: int):
    """Run fn(0..nthreads-1) on threads (fn(0) alone when nthreads == 1); re-raise errors."""
    if nthreads == 1:
        fn(0)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="combine") as ex:
        futs = [ex.submit(fn, t) for t in range(nthreads)]
        for fu in futs:
            fu.result()


# --------------------------------------------------------------------------- public: pure
def clipped_mean(cube, nsigma: float, masks=None, scales=None, weights=None, *,
                 uncs=None, unc_from: str = "scatter",
                 chunk_pixels: int = DEFAULT_CHUNK_PIXELS, threads: int = 1):
    """Sigma-clipped mean of a stack (KPF recipe), with uncertainty and count.

    Pure function: the inputs are never modified.  See the module docstring for
    the exact estimator.

    Parameters
    ----------
    cube : array_like, shape (N, ny, nx) or (N, npix)
        The stack, in data units (ADU, e-, ...).  Any real dtype; float32 and
        C-contiguous frame planes avoid a copy.
    nsigma : float
        Clipping half-width in units of the robust sigma (dimensionless, > 0).
    masks : array_like of bool, shape like ``cube``, optional
        True where a value is bad (excluded before median and percentiles).
    scales : sequence of float, length N, optional
        Multiplicative scale of each frame (dimensionless, finite, non-zero),
        applied first.
    weights : sequence of float, length N, optional
        Frame weights (> 0, reliability weights) for the weighted mean.
    uncs : array_like, shape like ``cube``, optional
        Per-value 1-sigma uncertainties in the unit of the unscaled frames, used
        for propagation (``unc_from='input'``, or single-survivor pixels).
    unc_from : {'scatter', 'input'}
        Where UNC comes from, see the module docstring.
    chunk_pixels : int
        Pixels processed together (speed/memory trade-off, see
        :func:`workspace_bytes`).
    threads : int
        Worker threads (each with its own workspace); numpy releases the GIL
        in its loops, so 2 threads use 2 cores.

    Returns
    -------
    mean : ndarray of float32, shape (ny, nx)
        Clipped (weighted) mean, data units; NaN where no value survives.
    unc : ndarray of float32, shape (ny, nx)
        Uncertainty of the mean (1 sigma), data units; NaN where undefined.
    cnt : ndarray of int16 (int32 if N > 32767), shape (ny, nx)
        Number of surviving values.

    Raises
    ------
    ValueError
        Bad ``nsigma``, shapes or per-frame vectors, or ``unc_from='input'``
        without ``uncs``.
    """
    k = _check_nsigma(nsigma)
    unc_from = _check_unc_from(unc_from)
    nthreads = _check_threads(threads)
    cube = np.asanyarray(cube)
    if isinstance(cube, np.ma.MaskedArray):
        raise ValueError("cube must be a plain ndarray; pass the mask with masks=")
    if cube.ndim not in (2, 3) or cube.shape[0] < 1 or cube.size == 0:
        raise ValueError(f"cube must have shape (N, ny, nx) with N >= 1, got {cube.shape}")
    if not (np.issubdtype(cube.dtype, np.floating) or np.issubdtype(cube.dtype, np.integer)
            or cube.dtype == bool):
        raise ValueError(f"cube must be a real numeric array, got dtype {cube.dtype}")
    n = cube.shape[0]
    img_shape = cube.shape[1:]
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != cube.shape:
            raise ValueError(f"masks must have the shape of cube {cube.shape}, got {masks.shape}")
        if masks.dtype != bool:
            masks = masks != 0
    if uncs is not None:
        uncs = np.asarray(uncs)
        if uncs.shape != cube.shape:
            raise ValueError(f"uncs must have the shape of cube {cube.shape}, got {uncs.shape}")
    elif unc_from == "input":
        raise ValueError("unc_from='input' needs per-frame uncertainties (uncs=)")
    sc = _as_vector("scales", scales, n, positive=False)
    w = _as_vector("weights", weights, n, positive=True)
    chunk = operator.index(chunk_pixels)
    if chunk < 1:
        raise ValueError(f"chunk_pixels must be >= 1, got {chunk_pixels}")
    npix = int(np.prod(img_shape))
    chunk = min(chunk, npix)
    cnt_dtype = np.int32 if n > 32767 else np.int16
    X2 = _flat_view(cube)
    M2 = None if masks is None else _flat_view(masks)
    U2 = None if uncs is None else _flat_view(uncs)
    om = np.empty(npix, np.float32)
    ou = np.empty(npix, np.float32)
    oc = np.empty(npix, cnt_dtype)
    nthreads = max(1, min(nthreads, -(-npix // chunk)))
    # contiguous, chunk-aligned share of the pixels per thread
    per = -(-(-(-npix // chunk)) // nthreads) * chunk

    def work(t):
        kern = _make_kernel(n, k, chunk, sc, w, uncs is not None, unc_from)
        _run_2d(kern, X2, M2, U2, om, ou, oc, t * per, min(npix, (t + 1) * per))

    _run_threads(work, nthreads)
    return om.reshape(img_shape), ou.reshape(img_shape), oc.reshape(img_shape)


# --------------------------------------------------------------------------- sources
@runtime_checkable
class StripSource(Protocol):
    """What :func:`combine` needs from a frame.

    Required: ``shape`` (ny, nx) and ``read(y0, y1)`` returning the rows
    ``y0:y1`` as an array (y1 - y0, nx) in data units, or a tuple
    ``(data, mask)`` with a boolean mask (True = bad) or None.

    Optional, used when present:

    - ``read_into(y0, y1, out) -> mask or None``: write the rows into the float32
      array ``out`` (no temporary strip);
    - ``read_unc(y0, y1) -> ndarray``: 1-sigma uncertainty rows (data units),
      used when every source has it (``has_unc``, default: whether ``read_unc``
      exists, is True);
    - ``has_mask`` (bool): whether reads may return masks (assumed True);
    - ``transient_bytes(nrows) -> int``: peak extra memory (bytes) a read of
      ``nrows`` rows may allocate (assumed ``9 * nrows * nx`` for sources without
      ``read_into``: a float64 strip and a mask);
    - ``thread_safe`` (bool): reads of different row ranges may run
      concurrently (assumed False: reads of such sources are serialised);
    - ``name``: used in error messages.
    """

    shape: tuple[int, int]

    def read(self, y0: int, y1: int) -> Any: ...


@dataclass
class StripPlan:
    """How :func:`combine` splits the work (sizes in bytes unless stated)."""

    strip_rows: int       #: rows per strip
    nstrips: int          #: number of strips
    threads: int          #: worker threads (each with its own strip buffers)
    chunk_pixels: int     #: pixels per kernel chunk
    output_bytes: int     #: data + unc + cnt arrays
    strip_bytes: int      #: strip buffers (cube, masks, uncertainties), all threads
    workspace_bytes: int  #: kernel workspaces, all threads
    transient_bytes: int  #: source read transients, all threads
    total_bytes: int      #: sum of the above, <= mem_limit


@dataclass
class CombineResult:
    """Result of :func:`combine`.

    Attributes
    ----------
    data : ndarray of float32, (ny, nx)
        Clipped mean, data units (NaN where no value survives).
    unc : ndarray of float32, (ny, nx)
        1-sigma uncertainty of ``data``, data units.
    cnt : ndarray of int16 or int32, (ny, nx)
        Number of frames that survived at each pixel.
    nframes : int
        Number of input frames N.
    nsigma : float
        Clipping half-width used (dimensionless).
    clip_factor : float
        Variance-reduction factor f(nsigma) applied to clipped pixels.
    unc_from : str
        'scatter' or 'input'.
    plan : StripPlan
        Strip height, number of strips and memory budget actually used.
    """

    data: np.ndarray
    unc: np.ndarray
    cnt: np.ndarray
    nframes: int
    nsigma: float
    clip_factor: float
    unc_from: str
    plan: StripPlan = field(repr=False)


def _src_name(src, i: int) -> str:
    nm = getattr(src, "name", None)
    return f"source {i} ({nm})" if nm else f"source {i} ({type(src).__name__})"


def plan_strips(shape, nframes: int, mem_limit: int = DEFAULT_MEM_LIMIT, *,
                has_mask: bool = True, with_unc: bool = False, weighted: bool = False,
                read_bytes_per_row: int = 0, transient_fixed: int = 0,
                chunk_pixels: int = DEFAULT_CHUNK_PIXELS, threads: int = 1,
                max_strip_bytes: int = MAX_STRIP_BYTES) -> StripPlan:
    """Choose the strip height so that everything fits in ``mem_limit``.

    Parameters
    ----------
    shape : (int, int)
        Frame shape (ny, nx), pixels.
    nframes : int
        Number of frames N.
    mem_limit : int
        Bound in bytes on outputs + strip buffers + workspaces + read transients.
    has_mask, with_unc, weighted : bool
        Whether mask / uncertainty strip buffers and weighted sums are needed.
    read_bytes_per_row : int
        Largest transient (bytes) a source allocates per row read.
    transient_fixed : int
        Largest row-independent transient (bytes) of a source (e.g. a
        decompression buffer).
    chunk_pixels : int
        Preferred kernel chunk (reduced if the workspaces would not fit).
    threads : int
        Worker threads; each has its strip buffers, workspace and transients.
    max_strip_bytes : int
        Per-thread strip buffers are not made larger than this.

    Returns
    -------
    StripPlan

    Raises
    ------
    ValueError
        If even one-row strips do not fit in ``mem_limit``.
    """
    ny, nx = (int(v) for v in shape)
    n = int(nframes)
    t = _check_threads(threads)
    cnt_size = 4 if n > 32767 else 2
    out_bytes = ny * nx * (4 + 4 + cnt_size)
    per_row = nx * (4 * n + (n if has_mask else 0) + (4 * n if with_unc else 0))
    per_row_total = per_row + int(read_bytes_per_row)
    free = int(mem_limit) - out_bytes - t * int(transient_fixed)
    chunk = max(1, min(int(chunk_pixels), ny * nx))
    ws = workspace_bytes(n, chunk, weighted=weighted, with_unc=with_unc)
    # keep the workspaces within half of what is left (chunks >= 4096 pixels keep
    # the per-call overhead small), then shrink further only if needed to fit
    while chunk > 4096 and t * ws > max(free // 2, 0):
        chunk //= 2
        ws = workspace_bytes(n, chunk, weighted=weighted, with_unc=with_unc)
    while chunk > 256 and free - t * ws < t * per_row_total:
        chunk //= 2
        ws = workspace_bytes(n, chunk, weighted=weighted, with_unc=with_unc)
    rows = (free - t * ws) // (t * per_row_total) if per_row_total > 0 else ny
    if rows < 1:
        raise ValueError(
            f"mem_limit={int(mem_limit)} bytes is too small for {n} frames of {ny}x{nx} "
            f"with {t} thread(s): outputs need {out_bytes}, each workspace {ws}, read "
            f"transients {int(transient_fixed)} + {per_row_total} bytes per strip row")
    rows = min(rows, -(-ny // t), max(1, int(max_strip_bytes) // max(per_row, 1)))
    nstrips = -(-ny // rows)
    t = min(t, nstrips)
    transient = t * (int(transient_fixed) + rows * int(read_bytes_per_row))
    total = out_bytes + t * (rows * per_row + ws) + transient
    return StripPlan(strip_rows=rows, nstrips=nstrips, threads=t, chunk_pixels=chunk,
                     output_bytes=out_bytes, strip_bytes=t * rows * per_row,
                     workspace_bytes=t * ws, transient_bytes=transient, total_bytes=total)


def combine(sources: Sequence[StripSource], nsigma: float, *,
            mem_limit: int = DEFAULT_MEM_LIMIT, scales=None, weights=None,
            unc_from: str = "scatter", threads: int = 1,
            chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
            max_strip_bytes: int = MAX_STRIP_BYTES) -> CombineResult:
    """Sigma-clipped mean of frames read strip by strip within a memory bound.

    The driver does no file I/O itself: each source reads its own rows.  The
    estimator is the one of :func:`clipped_mean` (module docstring); results do
    not depend on ``mem_limit``, ``threads`` or ``chunk_pixels``.

    Parameters
    ----------
    sources : sequence of StripSource
        The N frames (see :class:`StripSource`), all of the same shape.
    nsigma : float
        Clipping half-width in robust sigmas (dimensionless, > 0); KPF uses
        :data:`KPF_NSIGMA`.
    mem_limit : int, optional
        Bound in bytes on everything allocated here: outputs (10 bytes per
        pixel), strip buffers, kernel workspaces and the sources' declared read
        transients.  The interpreter and imported modules are not included.
    scales, weights : sequence of float, optional
        Per-frame scale factors and weights (see :func:`clipped_mean`).
    unc_from : {'scatter', 'input'}
        'input' needs every source to have ``read_unc``; with 'scatter' the
        input uncertainties are still used for single-survivor pixels when all
        sources provide them.
    threads : int, optional
        Worker threads; each reads and combines whole strips with its own
        buffers (so reading overlaps computing).  Reads of sources that do not
        declare ``thread_safe = True`` are serialised.
    chunk_pixels : int, optional
        Preferred kernel chunk size, pixels.
    max_strip_bytes : int, optional
        Cap on each thread's strip buffers, bytes.

    Returns
    -------
    CombineResult

    Raises
    ------
    ValueError
        Empty ``sources``; a source whose shape differs from the first one (the
        message names it); bad ``nsigma``, ``scales``, ``weights``, ``threads``
        or ``unc_from``; ``mem_limit`` too small; a source returning a strip of
        the wrong shape.
    """
    import threading

    k = _check_nsigma(nsigma)
    unc_from = _check_unc_from(unc_from)
    nthreads = _check_threads(threads)
    srcs = list(sources)
    if not srcs:
        raise ValueError("combine needs at least one source, got an empty list")
    shp0 = tuple(int(v) for v in srcs[0].shape)
    if len(shp0) != 2 or min(shp0) < 1:
        raise ValueError(f"{_src_name(srcs[0], 0)} has shape {shp0}; expected (ny, nx)")
    for i, s in enumerate(srcs[1:], start=1):
        shp = tuple(int(v) for v in s.shape)
        if shp != shp0:
            raise ValueError(
                f"{_src_name(s, i)} has shape {shp}, expected {shp0} like {_src_name(srcs[0], 0)}")
    n = len(srcs)
    sc = _as_vector("scales", scales, n, positive=False)
    w = _as_vector("weights", weights, n, positive=True)
    def _has_unc(s):
        return bool(getattr(s, "has_unc", hasattr(s, "read_unc")))

    have_unc = all(_has_unc(s) for s in srcs)
    if unc_from == "input" and not have_unc:
        bad = next(i for i, s in enumerate(srcs) if not _has_unc(s))
        raise ValueError(f"unc_from='input' needs read_unc() on every source; "
                         f"{_src_name(srcs[bad], bad)} has none")
    has_mask = any(bool(getattr(s, "has_mask", True)) for s in srcs)
    ny, nx = shp0

    def tb(s, rows):
        f = getattr(s, "transient_bytes", None)
        if f is not None:
            return int(f(rows))
        return 0 if hasattr(s, "read_into") else rows * nx * 9

    fixed = max(tb(s, 0) for s in srcs)
    per_row = max(tb(s, 1) - tb(s, 0) for s in srcs)
    if have_unc:
        per_row += 8 * nx  # read_unc strips are returned arrays (float64 at worst)
    plan = plan_strips(shp0, n, mem_limit, has_mask=has_mask, with_unc=have_unc,
                       weighted=w is not None, read_bytes_per_row=per_row,
                       transient_fixed=fixed, chunk_pixels=chunk_pixels, threads=nthreads,
                       max_strip_bytes=max_strip_bytes)
    cnt_dtype = np.int32 if n > 32767 else np.int16
    data = np.empty((ny, nx), np.float32)
    unc = np.empty((ny, nx), np.float32)
    cnt = np.empty((ny, nx), cnt_dtype)
    h = plan.strip_rows
    state = {"next": 0}
    state_lock = threading.Lock()
    read_lock = threading.Lock()
    serial = [not bool(getattr(s, "thread_safe", False)) for s in srcs]

    def work(_t):
        cube = np.empty((n, h, nx), np.float32)
        mbuf = np.empty((n, h, nx), bool) if has_mask else None
        ubuf = np.empty((n, h, nx), np.float32) if have_unc else None
        kern = _make_kernel(n, k, plan.chunk_pixels, sc, w, have_unc, unc_from)
        while True:
            with state_lock:
                si = state["next"]
                state["next"] += 1
            y0 = si * h
            if y0 >= ny:
                return
            y1 = min(ny, y0 + h)
            hh = y1 - y0
            any_mask = False
            for i, s in enumerate(srcs):
                if serial[i] and plan.threads > 1:
                    with read_lock:
                        any_mask |= _read_one(s, i, y0, y1, nx, cube, mbuf, ubuf)
                else:
                    any_mask |= _read_one(s, i, y0, y1, nx, cube, mbuf, ubuf)
            X2 = _flat_view(cube[:, :hh])
            M2 = _flat_view(mbuf[:, :hh]) if any_mask else None
            U2 = _flat_view(ubuf[:, :hh]) if ubuf is not None else None
            _run_2d(kern, X2, M2, U2, data[y0:y1].reshape(-1), unc[y0:y1].reshape(-1),
                    cnt[y0:y1].reshape(-1))

    _run_threads(work, plan.threads)
    return CombineResult(data=data, unc=unc, cnt=cnt, nframes=n, nsigma=k,
                         clip_factor=clip_variance_factor(k), unc_from=unc_from, plan=plan)


def _read_one(s, i, y0, y1, nx, cube, mbuf, ubuf) -> bool:
    """Read rows y0:y1 of source i into the strip buffers; True if a mask came back."""
    hh = y1 - y0
    dst = cube[i, :hh]
    if hasattr(s, "read_into"):
        mk = s.read_into(y0, y1, dst)
    else:
        got = s.read(y0, y1)
        mk = None
        if isinstance(got, tuple):
            got, mk = got
        got = np.asarray(got)
        if got.shape != (hh, nx):
            raise ValueError(f"{_src_name(s, i)}.read({y0}, {y1}) returned shape "
                             f"{got.shape}, expected {(hh, nx)}")
        np.copyto(dst, got, casting="unsafe")
        del got
    masked = False
    if mbuf is not None:
        if mk is None:
            mbuf[i, :hh] = False
        else:
            mk = np.asarray(mk)
            if mk.shape != (hh, nx):
                raise ValueError(f"{_src_name(s, i)} returned a mask of shape "
                                 f"{mk.shape}, expected {(hh, nx)}")
            np.not_equal(mk, 0, out=mbuf[i, :hh])
            masked = True
    elif mk is not None:
        raise ValueError(f"{_src_name(s, i)} returned a mask but declares has_mask=False")
    if ubuf is not None:
        u = np.asarray(s.read_unc(y0, y1))
        if u.shape != (hh, nx):
            raise ValueError(f"{_src_name(s, i)}.read_unc({y0}, {y1}) returned shape "
                             f"{u.shape}, expected {(hh, nx)}")
        np.copyto(ubuf[i, :hh], u, casting="unsafe")
    return masked
