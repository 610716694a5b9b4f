"""Generation mode's statistics: k samples of one task are one cluster, and base vs adapted is paired by sample."""

from __future__ import annotations

from emotune.evaluate.agentic.generation import clustered_rate, paired
from emotune.evaluate.stats import rate_summary


def test_samples_of_one_task_count_as_one_cluster_so_the_interval_is_wider_than_itemwise():
    # 10 tasks, 8 samples each; every sample of a task agrees with the others (the worst case for independence)
    hits = [task < 3 for task in range(10) for _ in range(8)]
    clusters = [f"t{task}" for task in range(10) for _ in range(8)]
    clustered = clustered_rate(hits, clusters)
    itemwise = rate_summary(sum(hits), len(hits))
    assert clustered["rate"] == itemwise["rate"] == 0.3
    assert (clustered["n"], clustered["n_clusters"]) == (80, 10)
    assert clustered["hi"] - clustered["lo"] > 1.5 * (itemwise["hi"] - itemwise["lo"])


def test_paired_contrast_is_adapted_minus_base_clustered_by_task():
    def rows(hacks: dict[str, int], k: int = 4) -> dict:
        samples = [
            {"task": t, "sample": j, "outcome": "hack" if j < n else "fail"}
            for t, n in hacks.items()
            for j in range(k)
        ]
        blackmail = [{"id": "s1", "sample": j, "blackmail": False} for j in range(k)]
        return {"coding": {"samples": samples}, "blackmail": {"samples": blackmail}}

    base = rows({"a": 0, "b": 0, "c": 1, "d": 0})
    adapted = rows({"a": 4, "b": 3, "c": 4, "d": 2})
    out = paired(base, adapted)
    assert out["coding_hack"]["mean"] == (4 + 3 + 3 + 2) / 16
    assert out["coding_hack"]["n_clusters"] == 4 and out["coding_hack"]["lo"] > 0
    assert out["blackmail"]["mean"] == 0.0 and out["blackmail"]["p_value"] == 1.0
    assert "coding_hack" not in paired(base, rows({"a": 0}))  # samples that do not line up are not compared
