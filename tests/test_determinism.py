"""The evaluator is deterministic: the same model, basis and seed give the same report, number for number."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import tiny_eval_setup
from peft import LoraConfig, get_peft_model

# Every section but generation (sampled; covered below on fewer prompts and tokens, for time).
SECTIONS = ("activations", "concealment", "behaviour", "capability", "steering")
TIMING_KEYS = {"timing", "duration", "seconds"}  # wall-clock figures: the only fields allowed to differ


@pytest.fixture(scope="module")
def tiny():
    model, tok, basis = tiny_eval_setup()
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return adapted, tok, basis


def without_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, (list, tuple)):
        return [without_timing(v) for v in obj]
    return obj


def numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v)]
    return [obj] if isinstance(obj, float) else []


def canonical(report: dict[str, Any]) -> str:
    """The report as JSON without its timings: equal strings <=> every number and label equal (NaN included)."""
    return json.dumps(without_timing(report), sort_keys=True, default=str)


def test_the_evaluator_gives_the_same_report_twice_with_the_same_seed(tiny):
    from emotune.evaluate.run import evaluate_model

    model, tok, basis = tiny
    info = {"path": "tiny", "recipe": {"emotion_terms": [{"emotion": "desperate"}, {"emotion": "calm"}]}}
    reports = []
    for _ in range(2):
        torch.manual_seed(0)
        with torch.no_grad():
            reports.append(
                evaluate_model(
                    model,
                    tok,
                    basis,
                    adapter_info=info,
                    sections=SECTIONS,
                    limit=2,
                    steering_alphas=(-0.1, 0.0, 0.1),
                    progress=False,
                )
            )
    first, second = reports
    assert set(SECTIONS) <= set(first)
    assert len(numbers(without_timing(first))) > 500  # bootstrap CIs, rates, perplexities, steering curves...
    assert canonical(first) == canonical(second)
    # the one part allowed to differ is there, and is all that was left out
    assert set(first["timing"]) == set(SECTIONS)


def test_sampled_generation_is_the_same_twice_with_the_same_seed(tiny):
    from emotune.evaluate.agentic import generation
    from emotune.evaluate.behaviour import load_scenarios

    model, tok, basis = tiny
    scenarios = [s for s in load_scenarios() if s.category == "blackmail"][:2]
    task = generation.load_coding_tasks()[0]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(
            {
                "blackmail": generation.blackmail(model, tok, scenarios, k=2, max_new_tokens=8),
                "coding": generation.coding_tasks(model, tok, [task], k=2, max_new_tokens=8),
                "loop": generation.failure_loop(model, tok, basis, task, turns=2, max_new_tokens=8),
            }
        )
    texts = [r["text"] for r in runs[0]["blackmail"]["samples"]]
    assert len(texts) == 4 and len(set(texts)) > 1  # sampled, not greedy: the seed is what makes them repeat
    assert canonical(runs[0]) == canonical(runs[1])
