"""Measure the calibrated behaviour metric, its reliability and causal leverage on one model (docs/EVALUATION.md).

    python scripts/measure_metric.py --model smollm2-135m-instruct --basis BASIS --out results.json

Stages are written to ``--out`` as they finish, so a cut-short run keeps what it measured. The
leverage stages use ``--leverage-pairs`` pairs spread over the categories (the whole suite when 0).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import numpy as np
import torch

from emotune.basis import EmotionBasis
from emotune.evaluate import behaviour, leverage
from emotune.io import write_json_atomic
from emotune.models import load_model


def spread_pairs(scenarios: list[behaviour.Scenario], n: int) -> list[behaviour.Scenario]:
    """``n`` pairs taken round-robin over the categories, both members of each."""
    by_cat: dict[str, list[str]] = {}
    for s in scenarios:
        pairs = by_cat.setdefault(s.category, [])
        if s.pair not in pairs:
            pairs.append(s.pair)
    chosen: list[str] = []
    while len(chosen) < n and any(by_cat.values()):
        for pairs in by_cat.values():
            if pairs and len(chosen) < n:
                chosen.append(pairs.pop(0))
    return [s for s in scenarios if s.pair in set(chosen)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--basis", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=behaviour.DEFAULT_K)
    p.add_argument("--noise-items", type=int, default=12)
    p.add_argument("--leverage-pairs", type=int, default=18)
    p.add_argument("--check-items", type=int, default=8)
    p.add_argument("--n-random", type=int, default=1000)
    args = p.parse_args()
    results: dict[str, Any] = {"arguments": vars(args), "timing": {}}

    def stage(name: str, start: float) -> None:
        results["timing"][name] = round(time.perf_counter() - start, 1)
        write_json_atomic(args.out, results)
        print(f"[{name}] done in {results['timing'][name]} s", flush=True)

    model, tok = load_model(args.model, dtype="float32")
    basis = EmotionBasis.load(args.basis)
    basis.check_model(model)
    scenarios = behaviour.load_scenarios()
    start = time.perf_counter()
    with torch.no_grad():
        rows = behaviour.score_scenarios(model, tok, scenarios, k=args.k, desc="base")
    summary = behaviour.summarise(rows)
    results["base"] = {key: summary[key] for key in ("high", "none", "all", "pressure_gap")}
    results["base"]["by_category_gap"] = {c: v.get("pressure_gap") for c, v in summary["by_category"].items()}
    results["base"]["uncalibrated_pressure_gap"] = behaviour.pressure_gap(
        [{**r, "m": r["ll_unethical"] - r["ll_ethical"]} for r in rows]
    )
    results["reliability_by_k"] = behaviour.reliability(rows)
    results["length_balance"] = {
        "unethical_shorter": sum(len(r["lp"]["unethical"]) < len(r["lp"]["ethical"]) for r in rows),
        "n": len(rows),
        # does m still track the length difference? (the calibration should remove most of it)
        "r_m_vs_length_diff": float(
            np.corrcoef([r["m"] for r in rows], [len(r["lp"]["unethical"]) - len(r["lp"]["ethical"]) for r in rows])[
                0, 1
            ]
        ),
        "r_uncalibrated_vs_length_diff": float(
            np.corrcoef(
                [r["ll_unethical"] - r["ll_ethical"] for r in rows],
                [len(r["lp"]["unethical"]) - len(r["lp"]["ethical"]) for r in rows],
            )[0, 1]
        ),
    }
    stage("base", start)
    by_id = {r["id"]: r for r in rows}

    start = time.perf_counter()
    subset = spread_pairs(scenarios, args.leverage_pairs) if args.leverage_pairs else scenarios
    sub_rows = [by_id[s.id] for s in subset]
    out = leverage.leverage_section(
        model,
        tok,
        basis,
        subset,
        sub_rows,
        k=args.k,
        n_random=args.n_random,
        check_items=args.check_items,
        desc=lambda s: s,
    )
    out.pop("rows")
    results["leverage"] = out
    results["leverage"]["n_pairs"] = len({s.pair for s in subset})
    stage("leverage", start)

    start = time.perf_counter()
    low = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        noisy = behaviour.score_scenarios(
            low, tok, scenarios[:: len(scenarios) // args.noise_items][: args.noise_items], k=args.k
        )
    del low
    deltas = np.abs([r["m"] - by_id[r["id"]]["m"] for r in noisy])
    results["noise_floor_bf16"] = {
        "n": len(noisy),
        "max_abs_delta_m": float(deltas.max()),
        "mean_abs_delta_m": float(deltas.mean()),
    }
    stage("noise_floor", start)


if __name__ == "__main__":
    main()
