"""Causal leverage: does adding a direction at a layer move the behaviour metric, more than a random one?

For a direction v (unit norm) added as ``alpha * r_l * v`` to the output of block l at every position
(what ``hooks.steer`` does), the first-order change of an item's metric m is

    delta_m ~= alpha * r_l * <g_l, v>,   g_l = d m / d delta  (delta: the vector added at layer l)

and g_l is the gradient of m with respect to the block output, summed over every position of every
sequence m is scored on (context and content-free context alike, since steering reaches both). It
comes from a zero vector hooked in with ``hooks.steer`` and one backward pass per item, which gives
g_l at every layer at once, so the leverage ``r_l * <mean_i g_il, v>`` (nats/token per unit alpha) of
every emotion and of any number of random directions costs one matrix product.

The report places each emotion in the null of ``n_random`` seeded random unit directions at the same
layer (its percentile, signed: 97.5 = more positive than 97.5% of random directions, 2.5 = more
negative), checks the first-order prediction against real steering on a few directions at small
alpha, and runs a positive control: a contrastive activation-addition vector (the mean difference of
the layer's activations over unethical minus ethical continuations) built on one half of the pairs and
steering the other half. If even that cannot move the metric, the metric is not steerable on this model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emotune.basis import EmotionBasis
from emotune.evaluate import behaviour
from emotune.evaluate.behaviour import Scenario
from emotune.evaluate.scoring import encode_context, encode_continuation
from emotune.evaluate.stats import paired_contrast
from emotune.hooks import capture, steer

N_RANDOM = 1000
CHECK_ALPHA = 0.02  # small, so the first-order prediction should hold
CONTROL_ALPHA = 0.25  # the positive control's push: large, it asks whether the metric can move at all
REPORTED = ("desperate", "calm")  # emotions whose per-item leverage rows are kept


def item_gradients(
    model: Any,
    tokenizer: Any,
    scenarios: Sequence[Scenario],
    layers: Sequence[int],
    *,
    k: int | None = behaviour.DEFAULT_K,
    desc: str | None = None,
) -> tuple[dict[int, torch.Tensor], list[float]]:
    """``({layer: Tensor[n_items, d]}, [m per item])``: d m / d (vector added at the layer), per item."""
    d = int(model.config.hidden_size)
    param = next(model.parameters())
    grads: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    values = []
    for s in tqdm(scenarios, desc=desc, disable=desc is None, unit="scenario"):
        deltas = {
            layer: torch.zeros(d, dtype=param.dtype, device=param.device, requires_grad=True) for layer in layers
        }
        with torch.enable_grad(), steer(model, deltas):
            m = behaviour.metric_with_grad(model, tokenizer, s, k)
            got = torch.autograd.grad(m, [deltas[layer] for layer in layers], allow_unused=True)
        for layer, g in zip(layers, got):
            grads[layer].append(torch.zeros_like(deltas[layer]) if g is None else g.detach().float())
        values.append(float(m))
    return {layer: torch.stack(gs) for layer, gs in grads.items()}, values


def random_directions(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=gen)
    return r / r.norm(dim=1, keepdim=True)


def null_placement(effect: float, null: np.ndarray) -> dict[str, float]:
    """Where ``effect`` falls among the random directions' effects: percentile (share below, x100), the
    two-sided share at least as large in magnitude, and the effect in units of the null's SD."""
    return {
        "percentile": float(100 * np.mean(null < effect)),
        "p_null": float((1 + np.sum(np.abs(null) >= abs(effect))) / (1 + null.size)),
        "z_null": float(effect / null.std()) if null.std() > 0 else float("nan"),
    }


def leverage_table(
    grads: dict[int, torch.Tensor],
    basis: EmotionBasis,
    *,
    n_random: int = N_RANDOM,
    seed: int = 0,
    extra: dict[str, dict[int, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Per layer: every emotion's leverage (r_l <mean g_l, v>) and its place in the random null.

    ``extra`` adds named directions per layer (e.g. the positive control's vector) to the same table.
    """
    out: dict[str, Any] = {}
    for layer, g in grads.items():
        mean_g = g.mean(0)
        scale = basis.scale(layer)
        null = (scale * random_directions(n_random, mean_g.numel(), seed) @ mean_g).numpy()
        effects = scale * (basis.vectors(layer).float() @ mean_g)
        rows = {
            e: {"leverage": float(effects[i]), **null_placement(float(effects[i]), null)}
            for i, e in enumerate(basis.emotions)
        }
        for name, by_layer in (extra or {}).items():
            if layer in by_layer:
                v = by_layer[layer].float()
                eff = float(scale * (v / v.norm()) @ mean_g)
                rows[name] = {"leverage": eff, **null_placement(eff, null)}
        order = sorted(basis.emotions, key=lambda e: -abs(rows[e]["leverage"]))
        out[str(layer)] = {
            "null_sd": float(null.std()),
            "null_abs_95": float(np.quantile(np.abs(null), 0.95)),
            "grad_norm": float(mean_g.norm()),
            "emotions": rows,
            "top": order[:10],
        }
    return out


def _steered_rows(
    model: Any, tokenizer: Any, scenarios: Sequence[Scenario], vectors: dict[int, torch.Tensor], k: int | None
) -> list[dict]:
    with steer(model, vectors):
        return behaviour.score_scenarios(model, tokenizer, scenarios, k=k)


def steering_check(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    scenarios: Sequence[Scenario],
    grads: dict[int, torch.Tensor],
    base_rows: Sequence[dict],
    layer: int,
    *,
    directions: dict[str, torch.Tensor],
    alphas: Sequence[float] = (-CHECK_ALPHA, CHECK_ALPHA),
    k: int | None = behaviour.DEFAULT_K,
) -> dict[str, Any]:
    """Real steering against the first-order prediction, per item: rows, correlation and slope.

    ``grads[layer]`` and ``base_rows`` are aligned with ``scenarios``.
    """
    scale = basis.scale(layer)
    rows: list[dict[str, Any]] = []
    for name, v in directions.items():
        v = v.float() / v.float().norm()
        predicted_unit = scale * (grads[layer] @ v)  # per item, per unit alpha
        for alpha in alphas:
            steered = _steered_rows(model, tokenizer, scenarios, {layer: alpha * scale * v}, k)
            for i, (b, s) in enumerate(zip(base_rows, steered)):
                rows.append(
                    {
                        "id": b["id"],
                        "pair": b["pair"],
                        "direction": name,
                        "layer": layer,
                        "alpha": alpha,
                        "m_base": b["m"],
                        "m_steered": s["m"],
                        "real": s["m"] - b["m"],
                        "predicted": float(alpha * predicted_unit[i]),
                    }
                )
    real = np.array([r["real"] for r in rows])
    pred = np.array([r["predicted"] for r in rows])
    agg: dict[str, Any] = {"n_rows": len(rows), "layer": layer, "alphas": list(alphas), "directions": list(directions)}
    if len(rows) > 2 and real.std() > 0 and pred.std() > 0:
        agg["r_items"] = float(np.corrcoef(real, pred)[0, 1])
        agg["slope_real_on_predicted"] = float((real * pred).sum() / (pred * pred).sum())
        agg["sign_agreement"] = float(np.mean(np.sign(real) == np.sign(pred)))
    means = {}
    for name in directions:
        for alpha in alphas:
            part = [r for r in rows if r["direction"] == name and r["alpha"] == alpha]
            means[f"{name}@{alpha:+g}"] = {
                "real": float(np.mean([r["real"] for r in part])),
                "predicted": float(np.mean([r["predicted"] for r in part])),
            }
    agg["means"] = means
    return {"summary": agg, "rows": rows}


def contrastive_vector(
    model: Any, tokenizer: Any, scenarios: Sequence[Scenario], layer: int, *, k: int | None = behaviour.DEFAULT_K
) -> torch.Tensor:
    """Mean over scenarios of (mean layer activation over the unethical continuation's first k tokens minus
    the same over the ethical one's), both given the scenario's context: contrastive activation addition."""
    param = next(model.parameters())
    diffs = []
    for s in scenarios:
        ctx = encode_context(tokenizer, s.messages)
        means = []
        for text in (s.unethical, s.ethical):
            cont = encode_continuation(tokenizer, text)[:k]
            ids = torch.tensor([ctx + cont], device=param.device)
            with torch.no_grad(), capture(model, [layer]) as store:
                model(input_ids=ids)
            means.append(store[layer][0, len(ctx) :].float().mean(0))
        diffs.append(means[0] - means[1])
    return torch.stack(diffs).mean(0).cpu()


def split_pairs(scenarios: Sequence[Scenario], seed: int = 0) -> tuple[list[Scenario], list[Scenario]]:
    """Two halves of the suite by pair (both members of a pair on the same side), seeded."""
    pairs = sorted({s.pair for s in scenarios})
    order = np.random.default_rng(seed).permutation(len(pairs))
    first = {pairs[i] for i in order[: len(pairs) // 2]}
    return [s for s in scenarios if s.pair in first], [s for s in scenarios if s.pair not in first]


def positive_control(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    scenarios: Sequence[Scenario],
    base_rows: Sequence[dict],
    layer: int,
    *,
    alpha: float = CONTROL_ALPHA,
    k: int | None = behaviour.DEFAULT_K,
    seed: int = 0,
) -> dict[str, Any]:
    """Build the contrastive vector on one half of the pairs, steer the other half by +alpha * r_l * unit(v)."""
    build, held = split_pairs(scenarios, seed)
    vector = contrastive_vector(model, tokenizer, build, layer, k=k)
    unit = vector / vector.norm().clamp_min(1e-12)
    by_id = {r["id"]: r for r in base_rows}
    before = [by_id[s.id] for s in held]
    after = _steered_rows(model, tokenizer, held, {layer: alpha * basis.scale(layer) * unit}, k)
    contrast = paired_contrast(
        [r["m"] for r in before], [r["m"] for r in after], clusters=[s.pair for s in held], seed=seed
    )
    steerable = contrast["lo"] > 0
    rows = [
        {"id": b["id"], "pair": b["pair"], "layer": layer, "alpha": alpha, "m_base": b["m"], "m_steered": a["m"]}
        for b, a in zip(before, after)
    ]
    return {
        "layer": layer,
        "alpha": alpha,
        "n_build": len(build),
        "n_held_out": len(held),
        "vector_norm_over_r": float(vector.norm() / basis.scale(layer)),
        "effect": contrast,
        "steerable": steerable,
        "verdict": (
            "the metric is steerable on this model: the held-out half moves toward unethical"
            if steerable
            else "the metric is NOT steerable on this model: even a contrastive vector built for it does not move it"
        ),
        "vector": unit,
        "rows": rows,
    }


def leverage_section(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    scenarios: Sequence[Scenario],
    base_rows: Sequence[dict],
    *,
    k: int | None = behaviour.DEFAULT_K,
    n_random: int = N_RANDOM,
    check_items: int = 24,
    seed: int = 0,
    desc: Any = lambda s: None,
) -> dict[str, Any]:
    """The whole ``leverage`` section, on the model as given (adapter off is the caller's business)."""
    layers = list(basis.layers)
    grads, values = item_gradients(model, tokenizer, scenarios, layers, k=k, desc=desc("leverage gradients"))
    layer = basis.default_layer
    control = positive_control(model, tokenizer, basis, scenarios, base_rows, layer, k=k, seed=seed)
    vector = control.pop("vector")
    # the control vector was built on one half; its leverage is read on the other half's gradients
    held = {s.id for s in split_pairs(scenarios, seed)[1]}
    held_idx = [i for i, s in enumerate(scenarios) if s.id in held]
    control["leverage_held_out"] = leverage_table(
        {layer: grads[layer][held_idx]}, basis, n_random=n_random, seed=seed, extra={"contrastive": {layer: vector}}
    )[str(layer)]["emotions"]["contrastive"]
    table = leverage_table(grads, basis, n_random=n_random, seed=seed)
    # the real-steering check on a spread of items: two emotions, the control vector and two random directions
    # spread over the suite (it is ordered by category), so the check sees every category
    sub = list(range(0, len(scenarios), max(1, len(scenarios) // max(1, check_items))))[:check_items]
    rand = random_directions(2, vector.numel(), seed + 1)
    directions = {e: basis.vector(e, layer) for e in REPORTED if e in basis.emotions}
    directions.update({"contrastive": vector, "random-0": rand[0], "random-1": rand[1]})
    check = steering_check(
        model,
        tokenizer,
        basis,
        [scenarios[i] for i in sub],
        {layer: grads[layer][sub]},
        [base_rows[i] for i in sub],
        layer,
        directions=directions,
        k=k,
    )
    item_rows = [
        {
            "id": s.id,
            "pair": s.pair,
            "layer": lyr,
            "emotion": e,
            "leverage": float(basis.scale(lyr) * (grads[lyr][i] @ basis.vector(e, lyr).float())),
        }
        for i, s in enumerate(scenarios)
        for lyr in layers
        for e in REPORTED
        if e in basis.emotions
    ]
    parity = max(abs(a - b["m"]) for a, b in zip(values, base_rows)) if base_rows else None
    return {
        "k": k,
        "n_items": len(scenarios),
        "n_random": n_random,
        "layers": layers,
        "check_layer": layer,
        "grad_metric_max_abs_diff": parity,  # the gradient path's m against the no-grad scorer's
        "table": table,
        "steering_check": check["summary"],
        "positive_control": control,
        "rows": {"steering": check["rows"] + control.pop("rows"), "leverage": item_rows},
    }
