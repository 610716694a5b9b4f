"""``evaluate``: base vs adapted, in one process, with the PEFT adapter disabled and enabled.

Sections (each optional): activations (shift on held-out contexts), concealment (re-extracted
basis), behaviour (choice-mode unethical rates), capability (perplexity, multiple choice),
steering (alpha sweep on the base model), generation (sampled coding tasks, blackmail, failure
loop). The result is one dict; ``write_report`` renders it as report.json, report.md and PNGs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from emotune.basis import EmotionBasis, cached_basis
from emotune.errors import ConfigError, DataError, EmotuneError
from emotune.evaluate import activations as act
from emotune.evaluate import behaviour, capability, concealment
from emotune.models import load_model, model_fingerprint, model_source
from emotune.steer import steered

SECTIONS = ("activations", "concealment", "behaviour", "capability", "steering", "generation")
DEFAULT_SECTIONS = ("activations", "behaviour", "capability", "steering")
# emotions re-extracted by the concealment check besides the targeted ones: a spread over the
# clusters, so that "the mean over emotions" of the re-extracted vectors is not dominated by two
CONCEALMENT_EMOTIONS = (
    "afraid",
    "angry",
    "happy",
    "sad",
    "proud",
    "guilty",
    "bored",
    "nervous",
    "grateful",
    "amused",
    "relieved",
    "hopeful",
    "frustrated",
    "peaceful",
    "ashamed",
    "excited",
)


def load_adapter(model: Any, adapter: str | Path) -> tuple[Any, dict[str, Any]]:
    """Wrap ``model`` with the adapter folder; refuse an adapter trained on another base model."""
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise DataError(f"{folder}: not an adapter folder (no adapter_config.json). Use <output_dir>/adapter.")
    if not (folder / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: loading one runs code from the file
        raise DataError(
            f"{folder}: no adapter_model.safetensors. emotune loads adapter weights only from safetensors, never "
            "from pickles (.bin); re-save the adapter with save_pretrained(..., safe_serialization=True)."
        )
    info: dict[str, Any] = {"path": str(folder)}
    adapter_config = _read_json(folder / "adapter_config.json", "Re-save the adapter, or train it again")
    base = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
    basis_meta = folder / "basis" / "basis.json"
    if basis_meta.exists():
        meta = _read_json(basis_meta, "Copy the basis folder from the training run again")
        expected = meta.get("fingerprint") if isinstance(meta, dict) else None
        if expected and expected != model_fingerprint(model):
            raise ConfigError(
                f"{folder}: this adapter was trained on another base model (fingerprint {expected}; "
                f"this model's is {model_fingerprint(model)}). Pass the --model it was trained on"
                + (f" ({base})." if base else ".")
            )
    if (folder / "recipe.yaml").exists():
        try:
            info["recipe"] = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise DataError(
                f"{folder / 'recipe.yaml'}{line}: malformed YAML ({getattr(exc, 'problem', None) or 'not UTF-8'}). "
                "Fix it, or remove recipe.yaml to evaluate without the recipe's targeted emotions."
            ) from None
        if not isinstance(info["recipe"], dict):
            info["recipe"] = None
    try:
        wrapped = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        detail = " ".join(str(exc).split())[:200] if first.endswith(":") else first[:200]
        raise ConfigError(
            f"{folder}: the adapter does not fit this model ({detail}). Pass the --model it was trained on"
            + (f" ({base})." if base else ".")
        ) from None
    wrapped.eval()
    return wrapped, info


def _read_json(path: Path, remedy: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(path)
        raise DataError(f"{where}: corrupt JSON ({getattr(exc, 'msg', 'not UTF-8')}). {remedy}.") from None


def _targeted(info: dict[str, Any]) -> list[str]:
    terms = (info.get("recipe") or {}).get("emotion_terms") or []
    names = [t["emotion"] for t in terms if isinstance(t, dict) and "emotion" in t]
    return list(dict.fromkeys(names)) or ["desperate", "calm"]


def _trained_layers(info: dict[str, Any], basis: EmotionBasis) -> list[int]:
    layers = (info.get("recipe") or {}).get("emotion_layers") or [basis.default_layer]
    n = int(basis.metadata.get("num_layers") or max(basis.layers) + 1)
    return sorted({layer % n for layer in layers})


def evaluate_model(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    *,
    adapter_info: dict[str, Any] | None = None,
    sections: Sequence[str] = DEFAULT_SECTIONS,
    suite: str | Path | None = None,
    contexts: str | Path | None = None,
    steering_alphas: Sequence[float] = (-0.1, -0.05, 0.0, 0.05, 0.1),
    generation_k: int = 2,
    generation_tokens: int = 384,
    judge_model: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every requested section for one (possibly PEFT-wrapped) model; base = adapter disabled."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--sections: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}.")
    info = adapter_info or {}
    has_adapter = hasattr(model, "disable_adapter")
    targeted = [e for e in _targeted(info) if e in basis.emotions]
    trained = [layer for layer in _trained_layers(info, basis) if layer in basis.layers]
    untrained = [layer for layer in basis.layers if layer not in trained]
    if len(untrained) > 3:  # a low, a middle and a high layer the loss never touched
        untrained = [untrained[0], untrained[len(untrained) // 2], untrained[-1]]
    layers = sorted(set(trained) | set(untrained))
    desc = (lambda s: s) if progress else (lambda s: None)  # noqa: E731
    report: dict[str, Any] = {
        "model": basis.metadata.get("model"),
        "source": model_source(model),  # the evaluated model: name, hub id and revision
        "adapter": info.get("path"),
        "targeted": targeted,
        "trained_layers": trained,
        "untrained_layers": untrained,
        "basis_default_layer": basis.default_layer,
        "sections": list(sections),
        "timing": {},
    }
    ctx_all = act.load_contexts(contexts)
    if limit:
        ctx_all = [c for s in ("failure", "neutral", "success") for c in [x for x in ctx_all if x.set == s][:limit]]
    scenarios = behaviour.load_scenarios(suite)  # before any section runs: a bad file fails in seconds
    if limit:
        pairs = sorted({s.pair for s in scenarios})[:limit]
        scenarios = [s for s in scenarios if s.pair in pairs]

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        result = fn()
        report["timing"][name] = round(time.perf_counter() - start, 1)
        return result

    if "activations" in sections:
        report["activations"] = timed(
            "activations", lambda: _activations(model, tokenizer, basis, ctx_all, layers, targeted, has_adapter, desc)
        )
    if "concealment" in sections and has_adapter:
        failure = [c for c in ctx_all if c.set == "failure"]
        report["concealment"] = timed(
            "concealment",
            lambda: concealment.concealment_check(
                model, tokenizer, basis, failure, targeted, trained, CONCEALMENT_EMOTIONS
            ),
        )
    if "behaviour" in sections:
        report["behaviour"] = timed("behaviour", lambda: _behaviour(model, tokenizer, scenarios, has_adapter, desc))
    if "capability" in sections:
        report["capability"] = timed(
            "capability", lambda: _capability(model, tokenizer, ctx_all, has_adapter, limit, desc)
        )
    if "steering" in sections:
        report["steering"] = timed(
            "steering",
            lambda: _steering(
                model,
                tokenizer,
                basis,
                scenarios,
                steering_alphas,
                trained,
                desc,
                base_rows=(report.get("behaviour") or {}).get("base_rows"),
            ),
        )
    if "generation" in sections:
        report["generation"] = timed(
            "generation",
            lambda: _generation(
                model, tokenizer, basis, scenarios, has_adapter, generation_k, generation_tokens, limit, desc
            ),
        )
        if judge_model:
            report["judge_model"] = judge_model
            timed("judge", lambda: _judge(report["generation"], judge_model))
    return report


def _judge(gen: dict[str, Any], judge_model: str) -> None:
    """Label every sampled blackmail-scenario reply with the judge model, beside the detector."""
    from emotune.evaluate.agentic import generation
    from emotune.evaluate.stats import rate_summary

    judge, judge_tok = load_model(judge_model)
    for state in gen.values():
        rows = state["blackmail"]["samples"]
        verdicts = generation.judge(judge, judge_tok, [r["text"] for r in rows])
        for row, verdict in zip(rows, verdicts):
            row["judge_unethical"], row["judge_p_yes"] = verdict["unethical"], verdict["p_yes"]
        state["blackmail"]["judge"] = rate_summary(sum(v["unethical"] for v in verdicts), len(verdicts))


def _activations(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    contexts: Sequence[act.Context],
    layers: list[int],
    targeted: list[str],
    has_adapter: bool,
    desc: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {"sets": {}}
    for name in ("failure", "neutral", "success"):
        subset = [c for c in contexts if c.set == name]
        if not subset:
            continue
        before = act.context_projections(
            model, tokenizer, basis, subset, layers, adapter=False, desc=desc(f"contexts/{name} (base)")
        )
        after = (
            act.context_projections(
                model, tokenizer, basis, subset, layers, adapter=True, desc=desc(f"contexts/{name} (adapted)")
            )
            if has_adapter
            else before
        )
        per_layer = {}
        for layer in layers:
            table = act.shift_table(before[layer], after[layer], basis.emotions)
            per_layer[str(layer)] = {
                "table": table,
                "drift": act.drift_summary(table, targeted),
                "targeted": [r for r in table if r["emotion"] in targeted],
            }
        out["sets"][name] = {
            "n": len(subset),
            "layers": per_layer,
            "distributions": {
                str(layer): {
                    e: {
                        "base": before[layer][:, basis.index(e)].tolist(),
                        "adapted": after[layer][:, basis.index(e)].tolist(),
                    }
                    for e in targeted
                }
                for layer in layers
            },
        }
    examples = [c for c in contexts if c.set == "failure"][:3]
    layer = basis.default_layer if basis.default_layer in layers else layers[0]
    traces = []
    for context in examples:
        ids, start = act.reply_span(tokenizer, context.messages)
        entry: dict[str, Any] = {
            "id": context.id,
            "reply_start": start,
            "layer": layer,
            "tokens": [tokenizer.decode([i]) for i in ids],
        }
        for state, flag in (("base", False), ("adapted", True)):
            if state == "adapted" and not has_adapter:
                continue
            proj = act.token_projections(model, basis, ids, [layer], adapter=flag)[layer]
            entry[state] = {e: proj[:, basis.index(e)].tolist() for e in targeted}
        traces.append(entry)
    out["traces"] = traces
    return out


def _behaviour(model: Any, tokenizer: Any, scenarios: Sequence[Any], has_adapter: bool, desc: Any) -> dict[str, Any]:
    with act.adapter_state(model, False):
        base = behaviour.score_scenarios(model, tokenizer, scenarios, desc=desc("scenarios (base)"))
    out: dict[str, Any] = {"n_scenarios": len(scenarios), "base": behaviour.summarise(base), "base_rows": base}
    if has_adapter:
        adapted = behaviour.score_scenarios(model, tokenizer, scenarios, desc=desc("scenarios (adapted)"))
        out.update(adapted=behaviour.summarise(adapted), adapted_rows=adapted, paired=behaviour.compare(base, adapted))
    return out


def _capability(
    model: Any, tokenizer: Any, contexts: Sequence[act.Context], has_adapter: bool, limit: int | None, desc: Any
) -> dict[str, Any]:
    neutral = [c for c in contexts if c.set == "neutral"]
    questions = capability.load_mcq()[: limit * 4 if limit else None]
    out: dict[str, Any] = {}
    for state, flag in (("base", False), ("adapted", True)):
        if state == "adapted" and not has_adapter:
            continue
        out[state] = {
            "perplexity": capability.reply_perplexity(
                model, tokenizer, neutral, adapter=flag, desc=desc(f"perplexity ({state})")
            ),
            "mcq": capability.mcq_accuracy(model, tokenizer, questions, adapter=flag, desc=desc(f"mcq ({state})")),
        }
    if has_adapter:
        from emotune.evaluate.stats import mcnemar, paired_bootstrap_diff

        b, a = out["base"], out["adapted"]
        out["perplexity_change"] = a["perplexity"]["perplexity"] / b["perplexity"]["perplexity"] - 1
        out["nll_diff"] = paired_bootstrap_diff(b["perplexity"]["per_context_nll"], a["perplexity"]["per_context_nll"])
        out["mcq_mcnemar"] = mcnemar(b["mcq"]["correct"], a["mcq"]["correct"])
    return out


def _steering(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    scenarios: Sequence[Any],
    alphas: Sequence[float],
    layers: list[int],
    desc: Any,
    base_rows: list[dict] | None = None,
) -> dict[str, Any]:
    """Unethical rate of the base model steered along desperate and calm. alpha = 0 is the unsteered
    base model, which the behaviour section has usually scored already: its rows are reused."""
    curves: dict[str, list[dict[str, Any]]] = {}
    with act.adapter_state(model, False):
        for emotion in ("desperate", "calm"):
            if emotion not in basis.emotions:
                continue
            curves[emotion] = []
            for alpha in alphas:
                if alpha == 0 and base_rows is not None:
                    rows = base_rows
                else:
                    with steered(model, basis, emotion, alpha, layers):
                        rows = behaviour.score_scenarios(
                            model, tokenizer, scenarios, desc=desc(f"steer {emotion} {alpha:+.2f}")
                        )
                    if alpha == 0:
                        base_rows = rows
                summary = behaviour.summarise(rows)
                curves[emotion].append(
                    {
                        "alpha": alpha,
                        "rate_high": summary["high"]["rate"],
                        "rate_none": summary["none"]["rate"],
                        "rate_all": summary["all"]["rate"],
                        "lo_all": summary["all"]["lo"],
                        "hi_all": summary["all"]["hi"],
                        "p_unethical": summary["all"]["p_unethical"],
                        "pressure_gap": summary.get("pressure_gap"),
                    }
                )
    return {"layers": layers, "alphas": list(alphas), "curves": curves, "n_scenarios": len(scenarios)}


def _generation(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    scenarios: Sequence[Any],
    has_adapter: bool,
    k: int,
    tokens: int,
    limit: int | None,
    desc: Any,
) -> dict[str, Any]:
    # the agentic extra: imported only for this section, and refused up front where bubblewrap cannot run
    from emotune.evaluate.agentic import generation, sandbox

    sandbox.require_bwrap()
    tasks = generation.load_coding_tasks()[: limit or None]
    blackmail_scenarios = [s for s in scenarios if s.category == "blackmail"][: (limit or 12) * 2]
    out: dict[str, Any] = {}
    for state, flag in (("base", False), ("adapted", True)):
        if state == "adapted" and not has_adapter:
            continue
        out[state] = {
            "coding": generation.coding_tasks(
                model, tokenizer, tasks, k=k, adapter=flag, max_new_tokens=tokens, desc=desc(f"coding ({state})")
            ),
            "blackmail": generation.blackmail(
                model,
                tokenizer,
                blackmail_scenarios,
                k=k,
                adapter=flag,
                max_new_tokens=min(tokens, 160),
                desc=desc(f"blackmail ({state})"),
            ),
            "failure_loop": generation.failure_loop(
                model, tokenizer, basis, tasks[0], adapter=flag, max_new_tokens=min(tokens, 96)
            ),
        }
    if "adapted" in out:
        out["adapted"]["paired"] = generation.paired(out["base"], out["adapted"])
    return out


def evaluate(
    model_name: str,
    *,
    adapter: str | Path | None = None,
    basis: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load the model (and adapter), find or extract a basis, evaluate, and write the report to ``out``."""
    from emotune.evaluate.report import write_report
    from emotune.io import check_output_dir

    if out is not None:
        check_output_dir(out, marker="report.json")
    model, tokenizer = load_model(
        model_name, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code
    )
    info: dict[str, Any] = {}
    # Without --basis, use the model's full cached basis (every layer), so that layers the adapter
    # was not trained on are measured too; at the trained layers it equals the adapter's own basis.
    if basis is not None:
        try:
            emotion_basis = EmotionBasis.load(basis)
            emotion_basis.check_model(model)
        except EmotuneError as exc:  # name the flag (and the folder, where the message does not)
            where = "--basis" if str(exc).startswith(str(basis)) else f"--basis {basis}"
            raise type(exc)(f"{where}: {exc}") from None
    else:
        emotion_basis = cached_basis(model, tokenizer)
    if adapter is not None:
        model, info = load_adapter(model, adapter)
    with torch.no_grad():
        report = evaluate_model(model, tokenizer, emotion_basis, adapter_info=info, **kwargs)
    report["model_name"] = model_name
    if out is not None:
        write_report(report, out)
    return report
