"""The calibrated behaviour metric and causal leverage on a tiny model: parity, first order, positive control."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_eval_setup

from emotune.evaluate import behaviour, leverage
from emotune.evaluate.behaviour import Scenario, load_scenarios
from emotune.evaluate.scoring import content_free_context, encode_context, encode_continuation
from emotune.hooks import steer


@pytest.fixture(scope="module")
def tiny():
    return tiny_eval_setup()


@pytest.fixture(scope="module")
def scenarios():
    rows = load_scenarios()
    pairs = sorted({s.pair for s in rows})[:6]
    return [s for s in rows if s.pair in pairs]


def _full_forward_mean(model, context, cont):
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([context + cont])).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(cont)) / len(cont)


def test_metric_equals_a_hand_computation_with_full_forwards(tiny, scenarios):
    model, tok, _ = tiny
    s, k = scenarios[0], 5
    row = behaviour.score_scenarios(model, tok, [s], k=k)[0]
    ctx, free = encode_context(tok, s.messages), content_free_context(tok)
    eth, uneth = encode_continuation(tok, s.ethical)[:k], encode_continuation(tok, s.unethical)[:k]
    expected = (_full_forward_mean(model, ctx, uneth) - _full_forward_mean(model, free, uneth)) - (
        _full_forward_mean(model, ctx, eth) - _full_forward_mean(model, free, eth)
    )
    assert row["m"] == pytest.approx(expected, abs=1e-4)
    assert row["unethical"] == (expected > 0)


def test_the_gradient_path_computes_the_same_metric_as_the_no_grad_scorer(tiny, scenarios):
    model, tok, _ = tiny
    rows = behaviour.score_scenarios(model, tok, scenarios[:4])
    for s, row in zip(scenarios[:4], rows):
        assert float(behaviour.metric_with_grad(model, tok, s).detach()) == pytest.approx(row["m"], abs=1e-4)


def test_content_free_calibration_removes_what_the_continuation_earns_on_its_own(tiny):
    model, tok, _ = tiny
    # the context is the content-free one itself: every continuation's calibrated score is exactly 0
    s = Scenario("x", "c", "high", "p", ({"role": "user", "content": "N/A"},), "fine, I will do it", "no way")
    assert behaviour.score_scenarios(model, tok, [s], k=None)[0]["m"] == pytest.approx(0.0, abs=1e-5)


def test_first_order_leverage_agrees_with_finite_difference_steering(tiny, scenarios):
    model, tok, basis = tiny
    layer = basis.layers[1]
    subset = scenarios[:3]
    grads, _ = leverage.item_gradients(model, tok, subset, [layer])
    v = basis.vector("desperate", layer)
    # a central difference: its error is second order in eps, so a float32-sized step stays accurate
    eps = 0.02 * basis.scale(layer)
    with steer(model, {layer: eps * v}):
        plus = behaviour.score_scenarios(model, tok, subset)
    with steer(model, {layer: -eps * v}):
        minus = behaviour.score_scenarios(model, tok, subset)
    for i in range(len(subset)):
        finite = (plus[i]["m"] - minus[i]["m"]) / (2 * eps)
        assert float(grads[layer][i] @ v) == pytest.approx(finite, rel=0.02, abs=1e-4)
    assert any(abs(float(grads[layer][i] @ v)) > 1e-3 for i in range(len(subset)))  # not trivially 0 == 0


def test_the_positive_control_reports_its_held_out_effect_and_says_when_the_metric_does_not_move(tiny, scenarios):
    model, tok, basis = tiny
    base = behaviour.score_scenarios(model, tok, scenarios)
    layer = basis.layers[2]
    pushed = leverage.positive_control(model, tok, basis, scenarios, base, layer, alpha=1.0)
    build, held = leverage.split_pairs(scenarios)
    assert {s.pair for s in build}.isdisjoint({s.pair for s in held}) and pushed["n_held_out"] == len(held)
    deltas = [r["m_steered"] - r["m_base"] for r in pushed["rows"]]
    assert pushed["effect"]["mean"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-9)
    assert any(abs(d) > 1e-4 for d in deltas)  # the vector reached the model
    still = leverage.positive_control(model, tok, basis, scenarios, base, layer, alpha=0.0)
    assert still["effect"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert not still["steerable"] and "NOT steerable" in still["verdict"]


def test_leverage_section_places_emotions_in_a_random_null_and_checks_against_real_steering(tiny, scenarios):
    model, tok, basis = tiny
    base = behaviour.score_scenarios(model, tok, scenarios)
    out = leverage.leverage_section(model, tok, basis, scenarios, base, n_random=200, check_items=4)
    assert out["grad_metric_max_abs_diff"] < 1e-4
    entry = out["table"][str(basis.default_layer)]["emotions"]["desperate"]
    assert 0 <= entry["percentile"] <= 100 and 0 < entry["p_null"] <= 1
    assert out["steering_check"]["r_items"] > 0.9  # first order holds at alpha = 0.02 on the tiny model
    assert {r["direction"] for r in out["rows"]["steering"] if "direction" in r} >= {"desperate", "contrastive"}
