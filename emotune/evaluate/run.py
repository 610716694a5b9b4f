"""``evaluate``: base vs adapted, in one process, with the PEFT adapter disabled and enabled.

Sections (each optional): activations (shift on held-out contexts), concealment (the training
basis against a re-extraction with the adapter on), behaviour (the calibrated choice metric m, see
behaviour.py), capability (perplexity, multiple choice), steering (alpha sweep on the base model),
leverage (gradient leverage of every emotion against a random null, a real-steering check and a
positive control), reliability (m's stability by prefix length, under paraphrase, bf16 vs fp32),
generation (sampled coding tasks, blackmail, failure loop). The result is one dict;
``write_report`` renders it as report.json, samples.jsonl, report.md and PNGs.

Several adapters share one process: the base model is scored once (every adapter disabled), then
each named adapter is made active in turn (PEFT ``load_adapter``/``set_adapter``). Behaviour
contrasts are paired by scenario and clustered by pair, against base and against the named control.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from emotune.basis import EmotionBasis, cached_basis
from emotune.errors import ConfigError, DataError, EmotuneError
from emotune.evaluate import activations as act
from emotune.evaluate import behaviour, capability, concealment, leverage
from emotune.evaluate.stats import holm
from emotune.models import load_model, model_fingerprint, model_source
from emotune.steer import steered

SECTIONS = (
    "activations",
    "concealment",
    "behaviour",
    "capability",
    "steering",
    "leverage",
    "reliability",
    "generation",
)
DEFAULT_SECTIONS = ("activations", "behaviour", "capability", "steering")
# bf16-vs-fp32 noise floor: scored on this many scenarios (bf16 matmuls are slow on CPUs without AMX)
NOISE_FLOOR_ITEMS = 48
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


def check_adapter_folder(folder: Path) -> None:
    """The cheap checks of an adapter folder, before any model loads."""
    if not (folder / "adapter_config.json").is_file():
        raise DataError(f"{folder}: not an adapter folder (no adapter_config.json). Use <output_dir>/adapter.")
    if not (folder / "adapter_model.safetensors").is_file():
        # peft would fall back to adapter_model.bin, a pickle: loading one runs code from the file
        raise DataError(
            f"{folder}: no adapter_model.safetensors. emotune loads adapter weights only from safetensors, never "
            "from pickles (.bin); re-save the adapter with save_pretrained(..., safe_serialization=True)."
        )


def load_adapter(model: Any, adapter: str | Path, name: str = "default") -> tuple[Any, dict[str, Any]]:
    """Wrap ``model`` with the adapter folder (or add it to an already wrapped model as ``name``); refuse an
    adapter trained on another base model."""
    from peft import PeftModel

    folder = Path(adapter)
    check_adapter_folder(folder)
    info: dict[str, Any] = {"path": str(folder), "name": name}
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
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name)
            wrapped = model
        else:
            wrapped = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
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


def _use_adapter(model: Any, name: str | None) -> None:
    """Make ``name`` the active adapter of a model that holds several (a no-op for a single adapter)."""
    if name is not None and name in (getattr(model, "peft_config", None) or {}):
        model.set_adapter(name)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    *,
    adapter_info: dict[str, Any] | None = None,
    adapters: dict[str, dict[str, Any]] | None = None,
    control: str | None = None,
    sections: Sequence[str] = DEFAULT_SECTIONS,
    suite: str | Path | None = None,
    contexts: str | Path | None = None,
    steering_alphas: Sequence[float] = (-0.1, -0.05, 0.0, 0.05, 0.1),
    generation_k: int = 2,
    generation_tokens: int = 384,
    judge_model: str | None = None,
    limit: int | None = None,
    k: int | None = behaviour.DEFAULT_K,
    n_random: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Every requested section for the base model (adapters disabled) and each adapter.

    ``adapters`` maps a name to the ``load_adapter`` info of an adapter already loaded into ``model``
    under that name; ``adapter_info`` is the one-adapter shorthand (a PEFT model with one adapter).
    ``control`` names the adapter that the others are contrasted with, besides base.
    """
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--sections: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}.")
    has_adapter = hasattr(model, "disable_adapter")
    if adapters is None:
        adapters = {(adapter_info or {}).get("name", "adapted"): adapter_info or {}} if has_adapter else {}
    if control is not None and control not in adapters:
        raise ConfigError(f"--control {control}: no adapter of that name; give it with --adapter {control}=PATH.")
    first = next(iter(adapters.values()), {})
    targeted = [e for e in _targeted(first) if e in basis.emotions]
    trained = [layer for layer in _trained_layers(first, basis) if layer in basis.layers]
    untrained = [layer for layer in basis.layers if layer not in trained]
    if len(untrained) > 3:  # a low, a middle and a high layer the loss never touched
        untrained = [untrained[0], untrained[len(untrained) // 2], untrained[-1]]
    desc = (lambda s: s) if progress else (lambda s: None)  # noqa: E731
    report: dict[str, Any] = {
        "model": basis.metadata.get("model"),
        "source": model_source(model),  # the evaluated model: name, hub id and revision
        "adapter": first.get("path"),
        "adapters": {name: {"path": info.get("path")} for name, info in adapters.items()},
        "control": control,
        "targeted": targeted,
        "trained_layers": trained,
        "untrained_layers": untrained,
        "basis_default_layer": basis.default_layer,
        "sections": list(sections),
        "k": k,
        "timing": {},
    }
    ctx_all = act.load_contexts(contexts)
    if limit:
        ctx_all = [c for s in ("failure", "neutral", "success") for c in [x for x in ctx_all if x.set == s][:limit]]
    scenarios = behaviour.load_scenarios(suite)  # before any section runs: a bad file fails in seconds
    if limit:
        pairs = sorted({s.pair for s in scenarios})[:limit]
        scenarios = [s for s in scenarios if s.pair in pairs]

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        report["timing"][name] = round(report["timing"].get(name, 0.0) + time.perf_counter() - start, 1)
        return result

    # the per-adapter sections: with one adapter they sit at the top level as before; with several, each
    # adapter's go under report["adapters"][name], and the top level keeps the first adapter's
    for index, (name, info) in enumerate(adapters.items() or [(None, {})]):
        _use_adapter(model, name)
        a_targeted = [e for e in _targeted(info) if e in basis.emotions]
        a_trained = [layer for layer in _trained_layers(info, basis) if layer in basis.layers]
        a_layers = sorted(set(a_trained) | set(untrained))
        out: dict[str, Any] = {}
        if "activations" in sections and (index == 0 or has_adapter):
            out["activations"] = timed(
                "activations", _activations, model, tokenizer, basis, ctx_all, a_layers, a_targeted, has_adapter, desc
            )
        if "concealment" in sections and has_adapter:
            out["concealment"] = timed(
                "concealment",
                concealment.concealment_check,
                model,
                tokenizer,
                basis,
                [c for c in ctx_all if c.set == "failure"],
                a_targeted,
                a_trained,
                CONCEALMENT_EMOTIONS,
                trained_basis=info.get("trained_basis"),
            )
        if "capability" in sections:
            out["capability"] = timed("capability", _capability, model, tokenizer, ctx_all, has_adapter, limit, desc)
        if name is not None:
            report["adapters"][name].update(targeted=a_targeted, trained_layers=a_trained, **out)
        if index == 0:
            report.update(out)
    if len(adapters) > 1:  # the top level is the first adapter's: keep one copy
        for entry in list(report["adapters"].values())[:1]:
            for key in ("activations", "concealment", "capability"):
                entry.pop(key, None)

    base_rows: list[dict] = []
    if {"behaviour", "steering", "leverage", "reliability"} & set(sections):
        with act.adapter_state(model, False):
            base_rows = timed(
                "behaviour",
                lambda: behaviour.score_scenarios(model, tokenizer, scenarios, k=k, desc=desc("scenarios (base)")),
            )
    if "behaviour" in sections:
        report["behaviour"] = timed(
            "behaviour", lambda: _behaviour(model, tokenizer, scenarios, base_rows, adapters, control, k, desc)
        )
    if "reliability" in sections:
        report["reliability"] = timed(
            "reliability", lambda: _reliability(model, tokenizer, scenarios, base_rows, k, desc)
        )
    if "leverage" in sections:
        with act.adapter_state(model, False):
            report["leverage"] = timed(
                "leverage",
                lambda: leverage.leverage_section(
                    model, tokenizer, basis, scenarios, base_rows, k=k, n_random=n_random, desc=desc
                ),
            )
    if "steering" in sections:
        report["steering"] = timed(
            "steering",
            lambda: _steering(model, tokenizer, basis, scenarios, steering_alphas, trained, desc, base_rows, k),
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


def _behaviour(
    model: Any,
    tokenizer: Any,
    scenarios: Sequence[Any],
    base: list[dict],
    adapters: dict[str, dict[str, Any]],
    control: str | None,
    k: int | None,
    desc: Any,
) -> dict[str, Any]:
    """Base once, each adapter in turn; contrasts vs base and vs the control, Holm across the headline ones.

    The headline contrasts are each adapter against base and each treatment against the control, on all
    scenarios (the permutation p of the "all" block); their Holm-adjusted p-values sit under ``holm``.
    """
    out: dict[str, Any] = {"n_scenarios": len(scenarios), "k": k, "base": behaviour.summarise(base), "base_rows": base}
    rows: dict[str, list[dict]] = {}
    for name in adapters:
        _use_adapter(model, name)
        rows[name] = behaviour.score_scenarios(model, tokenizer, scenarios, k=k, desc=desc(f"scenarios ({name})"))
    contrasts: dict[str, Any] = {}
    for name, adapted in rows.items():
        contrasts[f"{name} - base"] = behaviour.compare(base, adapted)
        if control is not None and name != control:
            contrasts[f"{name} - {control}"] = behaviour.compare(rows[control], adapted)
    out["states"] = {name: behaviour.summarise(r) for name, r in rows.items()}
    out["rows"] = rows
    out["contrasts"] = contrasts
    if contrasts:
        out["holm"] = holm({label: c["all"]["p_perm"] for label, c in contrasts.items()})
    if len(rows) == 1:  # the one-adapter view the report has always had
        ((name, adapted),) = rows.items()
        out.update(adapted=out["states"][name], paired=contrasts[f"{name} - base"])
    return out


def _reliability(
    model: Any, tokenizer: Any, scenarios: Sequence[Any], base: list[dict], k: int | None, desc: Any
) -> dict[str, Any]:
    """The metric's reliability on the base model: by prefix length, under paraphrase, bf16 against fp32."""
    import copy

    out: dict[str, Any] = {"by_k": behaviour.reliability(base), "chosen_k": k}
    paraphrases = behaviour.load_paraphrases(scenarios)
    if paraphrases:
        with act.adapter_state(model, False):
            para = behaviour.score_scenarios(model, tokenizer, paraphrases, k=k, desc=desc("paraphrases (base)"))
        out["paraphrase"] = behaviour.paraphrase_stability(base, para)
        out["paraphrase_rows"] = para
    else:
        out["paraphrase"] = {"skipped": f"no {behaviour.PARAPHRASE_FILE} shipped for this suite"}
    subset = list(scenarios[:NOISE_FLOOR_ITEMS])
    dtype = next(model.parameters()).dtype
    other_dtype = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    other = copy.deepcopy(model).to(other_dtype)
    with act.adapter_state(other, False):
        low = behaviour.score_scenarios(other, tokenizer, subset, k=k, desc=desc(f"noise floor ({other_dtype})"))
    del other
    deltas = np.abs(np.array([a["m"] - b["m"] for a, b in zip(low, base[: len(subset)])]))
    out["noise_floor"] = {
        "dtypes": [str(dtype), str(other_dtype)],
        "n": len(subset),
        "max_abs_delta_m": float(deltas.max()),
        "mean_abs_delta_m": float(deltas.mean()),
        "choice_flips": int(sum(a["unethical"] != b["unethical"] for a, b in zip(low, base))),
    }
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
    k: int | None = behaviour.DEFAULT_K,
) -> dict[str, Any]:
    """The metric m of the base model steered along desperate and calm (with the unethical rate and the
    pressure gap). alpha = 0 is the unsteered base model, whose rows are reused."""
    curves: dict[str, list[dict[str, Any]]] = {}
    with act.adapter_state(model, False):
        for emotion in ("desperate", "calm"):
            if emotion not in basis.emotions:
                continue
            curves[emotion] = []
            for alpha in alphas:
                if alpha == 0 and base_rows:
                    rows = base_rows
                else:
                    with steered(model, basis, emotion, alpha, layers):
                        rows = behaviour.score_scenarios(
                            model, tokenizer, scenarios, k=k, desc=desc(f"steer {emotion} {alpha:+.2f}")
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
                        "m": summary["all"]["m"],
                        "m_lo": summary["all"]["m_lo"],
                        "m_hi": summary["all"]["m_hi"],
                        "pressure_gap": (summary.get("pressure_gap") or {}).get("mean"),
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


def parse_adapters(specs: Sequence[str | Path] | str | Path | None) -> dict[str, Path]:
    """``--adapter`` values, ``NAME=PATH`` or a bare path (named after its folder, or its parent's when the
    folder is the usual ``adapter``), as an ordered name -> folder map; names must be unique."""
    if specs is None:
        return {}
    if isinstance(specs, (str, Path)):
        specs = [specs]
    out: dict[str, Path] = {}
    for spec in specs:
        text = str(spec)
        name, sep, path = text.partition("=")
        if not sep:
            folder = Path(text)
            name, path = (folder.parent.name if folder.name == "adapter" else folder.name) or "adapted", text
        if not name or not path:
            raise ConfigError(f"--adapter {text}: use NAME=PATH (e.g. calm=runs/calm/adapter) or a bare PATH.")
        if name in out:
            raise ConfigError(f"--adapter {text}: the name {name!r} is given twice. Name each adapter: NAME=PATH.")
        out[name] = Path(path)
    return out


def check_inputs(
    *,
    adapters: dict[str, Path],
    control: str | None,
    basis: str | Path | None,
    out: str | Path | None,
    sections: Sequence[str],
    suite: str | Path | None,
    contexts: str | Path | None,
    limit: int | None,
    k: int | None,
) -> None:
    """Every input file and flag of ``emotune eval``, checked before any model loads (one-line errors)."""
    from emotune.io import check_output_dir

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--sections: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}.")
    if not sections:
        raise ConfigError(f"--sections: empty; choose from {', '.join(SECTIONS)}.")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be a positive number of items.")
    if k is not None and k < 1:
        raise ConfigError(f"--prefix-tokens {k}: must be a positive number of tokens (or 0 for all).")
    for name, folder in adapters.items():
        try:
            check_adapter_folder(folder)
        except DataError as exc:
            raise DataError(f"--adapter {name}={folder}: {str(exc).removeprefix(str(folder) + ': ')}") from None
    if control is not None and control not in adapters:
        given = ", ".join(adapters) or "none"
        raise ConfigError(
            f"--control {control}: no adapter of that name was given (adapters: {given}). "
            f"Add --adapter {control}=PATH or name one of those."
        )
    if control is not None and len(adapters) < 2:
        raise ConfigError(f"--control {control}: a control needs at least one other adapter to compare with.")
    if "concealment" in sections and not adapters:
        raise ConfigError("--sections concealment: needs an --adapter (it compares an adapter with its basis).")
    if basis is not None:
        _load_basis_flag(basis)  # reading a basis is cheap; checking it against the model waits for the model
    scenarios = behaviour.load_scenarios(suite)
    act.load_contexts(contexts)
    if out is not None:
        check_output_dir(out, marker="report.json")
    del scenarios


def _load_basis_flag(basis: str | Path, model: Any = None) -> EmotionBasis:
    """``EmotionBasis.load`` (and ``check_model`` once there is a model), errors naming --basis."""
    try:
        emotion_basis = EmotionBasis.load(basis)
        if model is not None:
            emotion_basis.check_model(model)
    except EmotuneError as exc:  # name the flag (and the folder, where the message does not)
        where = "--basis" if str(exc).startswith(str(basis)) else f"--basis {basis}"
        raise type(exc)(f"{where}: {exc}") from None
    return emotion_basis


def evaluate(
    model_name: str,
    *,
    adapter: str | Path | Sequence[str | Path] | None = None,
    control: str | None = None,
    basis: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    arguments: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Check every input, load the model and its adapters, find a basis, evaluate, write the report to ``out``.

    Without ``basis``, the first adapter's own ``basis/`` is used when it ships one (the vectors it was
    trained on), else the model's full cached basis.
    """
    from emotune.evaluate.report import write_report

    adapters = parse_adapters(adapter)
    check_inputs(
        adapters=adapters,
        control=control,
        basis=basis,
        out=out,
        sections=kwargs.get("sections", DEFAULT_SECTIONS),
        suite=kwargs.get("suite"),
        contexts=kwargs.get("contexts"),
        limit=kwargs.get("limit"),
        k=kwargs.get("k", behaviour.DEFAULT_K),
    )
    model, tokenizer = load_model(
        model_name, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code
    )
    # without --basis: the vectors the (first) adapter was trained with, where it ships them, else the cached
    # basis (extracted before any adapter wraps the model, so that it is the base model's)
    own = next((f / "basis" for f in adapters.values() if (f / "basis" / "basis.json").is_file()), None)
    emotion_basis = _load_basis_flag(basis, model) if basis is not None else None
    if emotion_basis is None and own is None:
        emotion_basis = cached_basis(model, tokenizer)
    infos: dict[str, dict[str, Any]] = {}
    for name, folder in adapters.items():
        model, infos[name] = load_adapter(model, folder, name)  # checks the basis metadata it ships
        if (folder / "basis" / "basis.json").is_file():
            infos[name]["trained_basis"] = EmotionBasis.load(folder / "basis")
    if emotion_basis is None:
        basis = own
        emotion_basis = next(i["trained_basis"] for i in infos.values() if "trained_basis" in i)
    with torch.no_grad():
        report = evaluate_model(
            model, tokenizer, emotion_basis, adapters=infos if adapters else None, control=control, **kwargs
        )
    for entry in infos.values():
        entry.pop("trained_basis", None)
    report["model_name"] = model_name
    report["basis_source"] = str(basis) if basis is not None else "cached"
    report["arguments"] = arguments or {
        "model": model_name,
        "adapter": {n: str(p) for n, p in adapters.items()},
        "control": control,
        "basis": None if basis is None else str(basis),
        "dtype": dtype,
        **{key: value for key, value in kwargs.items() if isinstance(value, (str, int, float, bool, list, tuple))},
    }
    if out is not None:
        write_report(report, out)
    return report
