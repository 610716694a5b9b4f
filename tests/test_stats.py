"""Tests for emotune.evaluate.stats against hand-computed and published reference values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emotune.evaluate.stats import (
    bootstrap_mean_ci,
    cohens_d,
    mcnemar,
    paired_bootstrap_diff,
    paired_cohens_d,
    rate_summary,
    wilson_interval,
)


def wilson_reference(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval written out from its closed form (Wilson 1927; Newcombe 1998, method 3):

    (2np + z^2 -/+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2)).
    """
    p = successes / n
    root = z * math.sqrt(z * z + 4 * n * p * (1 - p))
    return ((2 * n * p + z * z - root) / (2 * (n + z * z)), (2 * n * p + z * z + root) / (2 * (n + z * z)))


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (5, 10), (10, 10), (81, 263)])
def test_wilson_matches_the_closed_form(successes, n):
    lo, hi = wilson_interval(successes, n)
    ref_lo, ref_hi = wilson_reference(successes, n)
    assert lo == pytest.approx(ref_lo, abs=1e-9)
    assert hi == pytest.approx(ref_hi, abs=1e-9)


@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat Med 17:857, Table I,
        # method 3 (score interval without continuity correction), printed to 4 decimals.
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0000, 0.1611)),
        (1, 29, (0.0061, 0.1718)),
        # The common worked example 5/10.
        (5, 10, (0.2366, 0.7634)),
    ],
)
def test_wilson_matches_published_values(successes, n, expected):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(expected[0], abs=5e-5)
    assert hi == pytest.approx(expected[1], abs=5e-5)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.28
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.72 < lo < 0.73
    # A wider z gives a wider interval.
    assert wilson_interval(5, 10, z=2.576)[0] < wilson_interval(5, 10)[0]
    for bad in [(-1, 10), (11, 10), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_rate_summary_always_has_n():
    assert rate_summary(0, 0) == {"rate": 0.0, "lo": 0.0, "hi": 1.0, "n": 0}
    summary = rate_summary(5, 10)
    assert set(summary) == {"rate", "lo", "hi", "n"}
    assert summary["rate"] == 0.5 and summary["n"] == 10
    assert (summary["lo"], summary["hi"]) == wilson_interval(5, 10)
    assert all(type(v) in (float, int) for v in summary.values())


def test_bootstrap_of_a_constant_is_degenerate():
    mean, lo, hi = bootstrap_mean_ci([3.0] * 25)
    assert mean == lo == hi == 3.0
    mean, lo, hi = bootstrap_mean_ci([0.1] * 7)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1) and mean == pytest.approx(0.1)


def test_bootstrap_of_a_large_normal_sample_covers_the_true_mean():
    rng = np.random.default_rng(123)
    values = rng.normal(3.0, 2.0, size=5000)
    mean, lo, hi = bootstrap_mean_ci(values, n_boot=2000, seed=1)
    assert lo < 3.0 < hi
    assert lo < mean < hi
    # The width is close to the normal-theory 2 * 1.96 * sd / sqrt(n).
    expected_width = 2 * 1.959964 * values.std(ddof=1) / math.sqrt(values.size)
    assert (hi - lo) == pytest.approx(expected_width, rel=0.15)


def test_bootstrap_alpha_widens_and_input_is_checked():
    values = np.arange(50, dtype=float)
    _, lo95, hi95 = bootstrap_mean_ci(values, alpha=0.05)
    _, lo80, hi80 = bootstrap_mean_ci(values, alpha=0.20)
    assert lo95 < lo80 < hi80 < hi95
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0, 2.0], alpha=1.5)


def test_bootstrap_is_deterministic_given_the_seed():
    values = np.random.default_rng(0).normal(size=40)
    assert bootstrap_mean_ci(values, seed=7) == bootstrap_mean_ci(values, seed=7)
    assert bootstrap_mean_ci(values, seed=7) != bootstrap_mean_ci(values, seed=8)
    before = np.random.default_rng(1).normal(size=40)
    after = before + np.random.default_rng(2).normal(0.2, 1.0, size=40)
    clusters = [i // 4 for i in range(40)]
    first = paired_bootstrap_diff(before, after, clusters=clusters, seed=3)
    assert first == paired_bootstrap_diff(before, after, clusters=clusters, seed=3)
    assert first != paired_bootstrap_diff(before, after, clusters=clusters, seed=4)


def test_paired_bootstrap_diff_basic():
    before = np.zeros(30)
    after = np.r_[np.ones(20), np.zeros(10)]
    result = paired_bootstrap_diff(before, after)
    assert set(result) >= {"mean", "lo", "hi", "p_value"}
    assert result["mean"] == pytest.approx(2 / 3)
    assert result["lo"] < result["mean"] < result["hi"]
    assert result["n"] == 30 and result["n_clusters"] == 30
    # Every resample of 30 items with 20 ones has a positive mean unless it draws only zeros: p is tiny.
    assert result["p_value"] < 0.01
    # The sign follows after - before.
    flipped = paired_bootstrap_diff(after, before)
    assert flipped["mean"] == pytest.approx(-2 / 3) and flipped["hi"] < 0


def test_paired_bootstrap_p_value_for_no_effect():
    rng = np.random.default_rng(5)
    before = rng.normal(size=200)
    same = paired_bootstrap_diff(before, before)
    assert same["mean"] == 0.0 and same["p_value"] == 1.0 and same["lo"] == same["hi"] == 0.0
    noise = paired_bootstrap_diff(before, before + rng.normal(0.0, 1.0, size=200), seed=1)
    assert noise["p_value"] > 0.05
    assert 0.0 <= noise["p_value"] <= 1.0


def test_clustered_bootstrap_is_wider_when_items_in_a_cluster_are_identical():
    # 12 scenarios x 5 samples; the 5 samples of a scenario are identical (perfectly correlated).
    per_cluster = np.random.default_rng(11).normal(0.3, 1.0, size=12)
    diffs = np.repeat(per_cluster, 5)
    before = np.zeros_like(diffs)
    clusters = [f"scenario-{i}" for i in range(12) for _ in range(5)]
    items = paired_bootstrap_diff(before, diffs, seed=0)
    clustered = paired_bootstrap_diff(before, diffs, clusters=clusters, seed=0)
    assert items["mean"] == clustered["mean"]
    assert clustered["n"] == 60 and clustered["n_clusters"] == 12
    width_items = items["hi"] - items["lo"]
    width_clustered = clustered["hi"] - clustered["lo"]
    # Resampling 60 "independent" items understates the spread by about sqrt(5).
    assert width_clustered > 1.5 * width_items
    # The cluster bootstrap equals the item bootstrap of the 12 cluster means here (equal sizes).
    per_scenario = paired_bootstrap_diff(np.zeros(12), per_cluster, seed=0)
    assert clustered["lo"] == pytest.approx(per_scenario["lo"])
    assert clustered["hi"] == pytest.approx(per_scenario["hi"])


def test_paired_bootstrap_checks_lengths():
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1.0, 2.0], [1.0, 2.0], clusters=["a"])


def test_mcnemar_exact():
    result = mcnemar([False] * 10, [True] * 10)
    assert (result["b"], result["c"]) == (0, 10)
    assert result["method"] == "exact"
    assert result["p_value"] == pytest.approx(2 * 0.5**10, abs=1e-15)
    # b=3, c=17: 2 * P(Bin(20, 1/2) <= 3), also scipy.stats.binomtest(3, 20).pvalue.
    before = [True] * 3 + [False] * 17 + [True] * 5 + [False] * 5
    after = [False] * 3 + [True] * 17 + [True] * 5 + [False] * 5
    result = mcnemar(before, after)
    assert (result["b"], result["c"]) == (3, 17)
    assert result["p_value"] == pytest.approx(0.0025768280029296875, abs=1e-15)
    # Balanced discordance and no discordance both give p = 1.
    assert mcnemar([True, False], [False, True])["p_value"] == 1.0
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def test_mcnemar_chi2_with_continuity_correction():
    before = [True] * 10 + [False] * 25
    after = [False] * 10 + [True] * 25
    result = mcnemar(before, after)
    assert result["method"] == "chi2"
    assert result["statistic"] == pytest.approx((15 - 1) ** 2 / 35)
    # scipy.stats.chi2.sf(5.6, 1)
    assert result["p_value"] == pytest.approx(0.01796047752607879, rel=1e-9)
    balanced = mcnemar([True] * 15 + [False] * 15, [False] * 15 + [True] * 15)
    assert balanced["statistic"] == 0.0 and balanced["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_cohens_d_of_a_one_pooled_sd_shift_is_one():
    a = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    sd = a.std(ddof=1)  # both samples have this SD, so it is the pooled SD
    assert cohens_d(a + sd, a) == pytest.approx(1.0, abs=1e-12)
    assert cohens_d(a, a + sd) == pytest.approx(-1.0, abs=1e-12)
    assert cohens_d(a + 2.5 * sd, a) == pytest.approx(2.5, abs=1e-12)


def test_cohens_d_with_unequal_sizes_uses_the_pooled_sd():
    a = np.array([2.0, 4.0, 6.0])  # ss = 8
    b = np.array([0.0, 0.0, 3.0, 5.0])  # mean 2, ss = 4 + 4 + 1 + 9 = 18
    pooled = math.sqrt((8 + 18) / 5)
    assert cohens_d(a, b) == pytest.approx((4.0 - 2.0) / pooled, abs=1e-12)


def test_cohens_d_of_constant_but_different_samples_is_infinite_not_zero():
    assert cohens_d([1.0, 1.0, 1.0], [2.0, 2.0]) == -math.inf
    assert cohens_d([2.0, 2.0], [1.0, 1.0, 1.0]) == math.inf
    assert math.isnan(cohens_d([0.1] * 5, [0.1] * 5))
    with pytest.raises(ValueError):
        cohens_d([1.0], [2.0])


def test_paired_cohens_d():
    before = [0.0, 0.0, 0.0]
    after = [1.0, 2.0, 3.0]  # diffs mean 2, SD 1
    assert paired_cohens_d(before, after) == pytest.approx(2.0)
    assert paired_cohens_d(after, before) == pytest.approx(-2.0)
    assert paired_cohens_d([1.0, 2.0], [1.5, 2.5]) == math.inf  # a constant positive difference: no spread
    assert math.isnan(paired_cohens_d([1.0, 2.0], [1.0, 2.0]))
    with pytest.raises(ValueError):
        paired_cohens_d([1.0], [2.0])
    with pytest.raises(ValueError):
        paired_cohens_d([1.0, 2.0], [2.0])


def test_sign_flip_p_is_exact_on_a_small_known_case():
    from emotune.evaluate.stats import sign_flip_p

    # 5 positive differences: of the 2^5 sign patterns only all-plus and all-minus reach |sum| = 15
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    # flipping whole clusters: two clusters behave like 2 items (2 of 4 patterns reach |sum| = 6), where
    # the same 4 values as independent items give 2 of 16
    assert sign_flip_p([1.0, 1.0, 2.0, 2.0], clusters=["a", "a", "b", "b"]) == pytest.approx(0.5)
    assert sign_flip_p([1.0, 1.0, 2.0, 2.0]) == pytest.approx(2 / 16)


def test_paired_contrast_clusters_by_pair_and_reports_the_minimum_detectable_effect():
    from emotune.evaluate.stats import paired_contrast

    rng = np.random.default_rng(0)
    before = rng.normal(size=60)
    after = before + 0.5 + rng.normal(scale=0.2, size=60)
    out = paired_contrast(before, after, clusters=[i // 2 for i in range(60)])
    assert out["n"] == 60 and out["n_clusters"] == 30
    assert out["lo"] < 0.5 < out["hi"] and out["p_perm"] < 0.001
    assert out["mde"] == pytest.approx(2.8016 * out["sd_cluster"] / math.sqrt(30), rel=1e-3)


def test_holm_adjusts_step_down_and_stays_monotone():
    from emotune.evaluate.stats import holm

    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, max(0.06, 0.04)
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
