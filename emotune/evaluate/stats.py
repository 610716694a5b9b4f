"""Small-sample statistics for before/after evaluations (pure numpy, deterministic given a seed).

Everything here returns plain Python floats/ints/dicts so results can go straight into a JSON report.

* ``wilson_interval`` / ``rate_summary``: a rate with its Wilson score interval (good coverage at
  small n and at rates near 0 or 1, where the Wald interval collapses to a point).
* ``bootstrap_mean_ci``: percentile bootstrap CI of a mean.
* ``paired_bootstrap_diff``: percentile bootstrap of mean(after - before), optionally resampling
  clusters (e.g. K samples of one scenario) instead of items, with a bootstrap two-sided p-value.
* ``mcnemar``: paired binary outcomes (exact binomial for few discordant pairs, else chi-square).
* ``cohens_d`` / ``paired_cohens_d``: standardized effect sizes.
* ``paired_contrast``: a paired before/after (or adapter-vs-control) contrast clustered by pair: cluster
  bootstrap CI, sign-flip permutation p over clusters, paired d and the minimum detectable effect.
* ``holm``: Holm's step-down adjustment across a family of headline p-values.
* ``minimum_detectable_effect``: the smallest mean paired difference a two-sided test at ``alpha`` finds
  with the given power at n clusters, from the observed SD of the per-cluster differences.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

Z95 = 1.959964

# Bootstrap resampling draws an index matrix of n_boot x n; draw it in row chunks of about this many
# entries so memory stays bounded for large samples.
_CHUNK_ENTRIES = 2_000_000

# McNemar: below this many discordant pairs use the exact binomial test, at or above it the
# chi-square approximation with continuity correction (the brief's threshold of 25).
_MCNEMAR_EXACT_BELOW = 25


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n``; ``(0.0, 1.0)`` when ``n == 0``.

    center = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    The bounds are clipped to [0, 1], and are exactly 0 / 1 at p = 0 / 1.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    lo, hi = max(0.0, center - half), min(1.0, center + half)
    # At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); rounding can leave it at 1e-17 off.
    if successes == 0:
        lo = 0.0
    if successes == n:
        hi = 1.0
    return (lo, hi)


def rate_summary(successes: int, n: int) -> dict[str, Any]:
    """``{"rate", "lo", "hi", "n"}`` with the 95% Wilson interval.

    With ``n == 0`` the rate is reported as 0.0 (not NaN, which is not valid JSON) with the
    uninformative interval (0, 1); ``n`` is always present so readers can tell the cases apart.
    """
    lo, hi = wilson_interval(successes, n)
    rate = successes / n if n > 0 else 0.0
    return {"rate": float(rate), "lo": float(lo), "hi": float(hi), "n": int(n)}


def _cluster_bootstrap_means(
    sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Means of ``n_boot`` resamples that draw len(sums) clusters with replacement.

    Each resample's mean is (sum of drawn cluster sums) / (number of drawn items), i.e. the item-level
    mean of the resampled data, so clusters of unequal size are weighted by their size.
    """
    k = sums.size
    rows = max(1, _CHUNK_ENTRIES // k)
    out = np.empty(n_boot, dtype=float)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, k, size=(stop - start, k))
        out[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return out


def _percentile_ci(boot: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_mean_ci(
    values: ArrayLike, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the sample mean and its percentile-bootstrap ``1 - alpha`` interval."""
    _check_boot_args(n_boot, alpha)
    arr = _as_1d(values, "values")
    rng = np.random.default_rng(seed)
    boot = _cluster_bootstrap_means(arr, np.ones_like(arr), n_boot, rng)
    lo, hi = _percentile_ci(boot, alpha)
    return float(arr.mean()), lo, hi


def paired_bootstrap_diff(
    before: ArrayLike,
    after: ArrayLike,
    *,
    clusters: Sequence[Hashable] | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap of ``mean(after - before)`` over paired items.

    Returns ``{"mean", "lo", "hi", "p_value", "n", "n_clusters"}``. ``lo``/``hi`` are the percentile
    interval. ``p_value`` is two-sided: the share of bootstrap means on the other side of 0 from the
    observed mean (``<= 0`` for a positive mean, ``>= 0`` for a negative one), doubled and capped at 1;
    it is 1.0 when the observed mean is exactly 0. A p-value of 0.0 means "below 1 / n_boot".

    With ``clusters`` (one id per item), whole clusters are resampled rather than items, which is
    what K samples per scenario need: samples of one scenario are not independent, and resampling
    them as items would give too narrow an interval.
    """
    _check_boot_args(n_boot, alpha)
    b = _as_1d(before, "before")
    a = _as_1d(after, "after")
    if a.shape != b.shape:
        raise ValueError(f"before and after differ in length: {b.size} vs {a.size}")
    diffs = a - b
    if clusters is None:
        sums, counts = diffs, np.ones_like(diffs)
    else:
        if len(clusters) != diffs.size:
            raise ValueError(f"clusters has {len(clusters)} ids for {diffs.size} items")
        # Map arbitrary hashable ids to 0..k-1 in first-seen order (np.unique would need sortable ids).
        index: dict[Hashable, int] = {}
        codes = np.fromiter((index.setdefault(c, len(index)) for c in clusters), dtype=np.int64, count=diffs.size)
        sums = np.bincount(codes, weights=diffs)
        counts = np.bincount(codes).astype(float)
    rng = np.random.default_rng(seed)
    boot = _cluster_bootstrap_means(sums, counts, n_boot, rng)
    mean = float(diffs.mean())
    lo, hi = _percentile_ci(boot, alpha)
    if mean > 0:
        share = float(np.mean(boot <= 0.0))
    elif mean < 0:
        share = float(np.mean(boot >= 0.0))
    else:
        share = 0.5
    return {
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "p_value": min(1.0, 2.0 * share),
        "n": int(diffs.size),
        "n_clusters": int(sums.size),
    }


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> dict[str, Any]:
    """McNemar's test for paired binary outcomes.

    ``b`` counts pairs True before and False after, ``c`` pairs False before and True after. With
    ``b + c < 25`` the p-value is the exact two-sided binomial test (``2 * P(X <= min(b, c))`` for
    X ~ Bin(b + c, 1/2), capped at 1) and ``statistic`` is ``min(b, c)``; otherwise the chi-square
    statistic with continuity correction ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom.
    Returns ``{"b", "c", "statistic", "p_value", "method"}`` with method "exact" or "chi2".
    """
    if len(before) != len(after):
        raise ValueError(f"before and after differ in length: {len(before)} vs {len(after)}")
    b = sum(1 for x, y in zip(before, after) if bool(x) and not bool(y))
    c = sum(1 for x, y in zip(before, after) if not bool(x) and bool(y))
    n = b + c
    if n < _MCNEMAR_EXACT_BELOW:
        k = min(b, c)
        # Exact integer arithmetic for the binomial tail, then one division.
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        return {"b": b, "c": c, "statistic": float(k), "p_value": min(1.0, 2.0 * tail), "method": "exact"}
    # max(0, ...) so b == c gives statistic 0 (p = 1) rather than 1 / (b + c).
    stat = max(0, abs(b - c) - 1) ** 2 / n
    # Survival function of chi-square with 1 df: P(X > s) = erfc(sqrt(s / 2)).
    p = math.erfc(math.sqrt(stat / 2.0))
    return {"b": b, "c": c, "statistic": float(stat), "p_value": float(p), "method": "chi2"}


def cohens_d(a: ArrayLike, b: ArrayLike) -> float:
    """``(mean(a) - mean(b)) / pooled SD``, the pooled SD using n - 1 denominators.

    When both samples have zero spread the ratio has a zero denominator: it is ``+inf`` / ``-inf`` when
    the means differ (an infinitely separated effect, not "no effect") and ``nan`` when they are equal.
    """
    x = _as_1d(a, "a")
    y = _as_1d(b, "b")
    dof = x.size + y.size - 2
    if dof < 1:
        raise ValueError("cohens_d needs at least 3 values across both samples")
    # Sums of squared deviations rather than np.var(ddof=1), so a sample of size 1 contributes 0.
    # Test constancy exactly (range 0) rather than SD == 0: the SD of a constant like [0.1, 0.1, 0.1]
    # can come out as ~1e-17 from rounding in the mean, which would make d explode.
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return _degenerate_d(float(x.mean() - y.mean()))
    ss = float(((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum())
    pooled = math.sqrt(ss / dof)
    return float((x.mean() - y.mean()) / pooled)


def paired_cohens_d(before: ArrayLike, after: ArrayLike) -> float:
    """``mean(after - before) / SD(after - before)`` (n - 1 denominator), a.k.a. d_z.

    When the differences have zero spread: ``+inf`` / ``-inf`` for a constant non-zero difference, ``nan``
    when every difference is 0, the same convention as ``cohens_d``.
    """
    b = _as_1d(before, "before")
    a = _as_1d(after, "after")
    if a.shape != b.shape:
        raise ValueError(f"before and after differ in length: {b.size} vs {a.size}")
    if a.size < 2:
        raise ValueError("paired_cohens_d needs at least 2 pairs")
    diffs = a - b
    if np.ptp(diffs) == 0:  # exact constancy, see cohens_d
        return _degenerate_d(float(diffs.mean()))
    return float(diffs.mean() / diffs.std(ddof=1))


def _degenerate_d(mean_diff: float) -> float:
    """d with a zero SD: the sign of the difference times infinity, or nan for 0 / 0."""
    if mean_diff == 0:
        return math.nan
    return math.copysign(math.inf, mean_diff)


def minimum_detectable_effect(sd: float, n: int, *, power: float = 0.8, alpha: float = 0.05) -> float:
    """``(z_{1-alpha/2} + z_{power}) * sd / sqrt(n)``: the normal-approximation MDE of a paired mean.

    ``sd`` is the SD of the per-cluster differences and ``n`` the number of clusters; at 80% power and
    alpha = 0.05 the factor is 2.80.
    """
    from scipy.stats import norm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / math.sqrt(n))


def _cluster_codes(clusters: Sequence[Hashable] | None, n: int) -> np.ndarray:
    if clusters is None:
        return np.arange(n)
    if len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} ids for {n} items")
    index: dict[Hashable, int] = {}
    return np.fromiter((index.setdefault(c, len(index)) for c in clusters), dtype=np.int64, count=n)


def sign_flip_p(
    diffs: ArrayLike, *, clusters: Sequence[Hashable] | None = None, n_perm: int = 9999, seed: int = 0
) -> float:
    """Two-sided sign-flip permutation p of ``mean(diffs) == 0``, flipping whole clusters.

    Under the null that before and after are exchangeable within a cluster, each cluster's summed
    difference is as likely negated; ``scipy.stats.permutation_test`` with ``permutation_type='samples'``
    swaps each (after, before) pair, i.e. flips its sign. With at most 2^k <= n_perm clusters it is exact.
    """
    from scipy.stats import permutation_test

    d = _as_1d(diffs, "diffs")
    sums = np.bincount(_cluster_codes(clusters, d.size), weights=d)
    if not np.any(sums):
        return 1.0
    result = permutation_test(
        (sums, np.zeros_like(sums)),
        lambda x, y, axis: np.sum(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_perm,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def paired_contrast(
    before: ArrayLike,
    after: ArrayLike,
    *,
    clusters: Sequence[Hashable] | None = None,
    n_boot: int = 2000,
    n_perm: int = 9999,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """``mean(after - before)`` over paired items, clustered by ``clusters`` (e.g. the scenario pair).

    Returns ``{"mean", "lo", "hi", "p_boot", "p_perm", "n", "n_clusters", "d", "sd_cluster", "mde"}``:
    the cluster-bootstrap percentile CI, the bootstrap p of ``paired_bootstrap_diff``, the sign-flip
    permutation p over clusters (the one to report), the paired d of the items, the SD of the per-cluster
    mean differences and the minimum detectable effect at 80% power for this many clusters.
    """
    boot = paired_bootstrap_diff(before, after, clusters=clusters, n_boot=n_boot, alpha=alpha, seed=seed)
    diffs = _as_1d(after, "after") - _as_1d(before, "before")
    codes = _cluster_codes(clusters, diffs.size)
    cluster_means = np.bincount(codes, weights=diffs) / np.bincount(codes)
    sd = float(cluster_means.std(ddof=1)) if cluster_means.size > 1 else 0.0
    return {
        "mean": boot["mean"],
        "lo": boot["lo"],
        "hi": boot["hi"],
        "p_boot": boot["p_value"],
        "p_perm": sign_flip_p(diffs, clusters=clusters, n_perm=n_perm, seed=seed),
        "n": boot["n"],
        "n_clusters": boot["n_clusters"],
        "d": paired_cohens_d(_as_1d(before, "before"), _as_1d(after, "after")) if diffs.size > 1 else math.nan,
        "sd_cluster": sd,
        "mde": minimum_detectable_effect(sd, cluster_means.size, alpha=alpha),
    }


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm step-down adjusted p-values (family-wise error control), keyed like the input.

    Sorted ascending, the i-th smallest of m is multiplied by (m - i), made monotone, capped at 1.
    """
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m = len(order)
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        adjusted[key] = running
    return {k: adjusted[k] for k in pvalues}
