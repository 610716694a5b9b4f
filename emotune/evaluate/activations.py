"""Activation shift: emotion projections on held-out contexts, base vs adapted, per emotion and layer.

Contexts are short conversations in three sets (failure/pressure, neutral, success), each
ending with an assistant reply. The projection of a context is the mean over the tokens of
that final reply (where the assistant's own state is operative), in units of r_l. Base and
adapted numbers come from one model, with the PEFT adapter disabled and enabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from emotune.basis import EmotionBasis, render_dialogue
from emotune.corpus import read_jsonl
from emotune.errors import DataError
from emotune.evaluate.stats import bootstrap_mean_ci, paired_bootstrap_diff, paired_cohens_d
from emotune.hooks import StopForward, capture


@dataclass(frozen=True)
class Context:
    id: str
    set: str
    messages: tuple[dict[str, str], ...]


def load_contexts(path: str | Path | None = None) -> list[Context]:
    path = Path(path) if path else Path(str(resources.files("emotune") / "data" / "eval" / "contexts.jsonl"))
    out = []
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        messages = obj.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "assistant"
        ):
            raise DataError(
                f"{where}: 'messages' must be a list of {{role, content}} ending with an assistant turn. "
                "Fix that line's messages."
            )
        if "set" not in obj:
            raise DataError(f"{where}: missing field 'set'. Add it: failure, neutral or success.")
        out.append(Context(str(obj.get("id", where)), str(obj["set"]), tuple(messages)))
    if not out:
        raise DataError(f"{path}: no contexts (empty). Add one JSON object a line with set and messages.")
    return out


def adapter_state(model: Any, enabled: bool) -> Any:
    """A context manager running ``model`` with its PEFT adapter on (``enabled``) or off."""
    if enabled or not hasattr(model, "disable_adapter"):
        return nullcontext()
    return model.disable_adapter()


def reply_span(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], int]:
    """Token ids of the whole conversation and the index where the final assistant turn starts."""
    text = render_dialogue(tokenizer, messages)
    prefix = render_dialogue(tokenizer, messages[:-1], add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if text.startswith(prefix) else len(ids) // 2
    return ids, min(start, len(ids) - 1)


@torch.no_grad()
def token_projections(
    model: Any, basis: EmotionBasis, ids: Sequence[int], layers: Sequence[int], *, adapter: bool = True
) -> dict[int, torch.Tensor]:
    """``{layer: [T, n_emotions]}`` projections of every token of one sequence."""
    device = next(model.parameters()).device
    with adapter_state(model, adapter), capture(model, list(layers), stop_after_last=True) as store:
        try:
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
        except StopForward:
            pass
    return {layer: basis.project(store[layer][0].float().cpu(), layer) for layer in layers}


def context_projections(
    model: Any,
    tokenizer: Any,
    basis: EmotionBasis,
    contexts: Sequence[Context],
    layers: Sequence[int],
    *,
    adapter: bool = True,
    desc: str | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: [n_contexts, n_emotions]}``: mean projection over each context's final reply."""
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for context in tqdm(contexts, desc=desc, disable=desc is None, unit="context"):
        ids, start = reply_span(tokenizer, context.messages)
        per_token = token_projections(model, basis, ids, layers, adapter=adapter)
        for layer in layers:
            rows[layer].append(per_token[layer][start:].mean(0))
    return {layer: torch.stack(v) for layer, v in rows.items()}


def shift_table(before: torch.Tensor, after: torch.Tensor, emotions: Sequence[str], *, seed: int = 0) -> list[dict]:
    """Per emotion: base mean, adapted mean, mean paired shift with bootstrap 95% CI, paired Cohen's d."""
    out = []
    for k, emotion in enumerate(emotions):
        b, a = before[:, k].tolist(), after[:, k].tolist()
        diff = paired_bootstrap_diff(b, a, seed=seed)
        out.append(
            {
                "emotion": emotion,
                "base": sum(b) / len(b),
                "adapted": sum(a) / len(a),
                "shift": diff["mean"],
                "lo": diff["lo"],
                "hi": diff["hi"],
                "d": paired_cohens_d(b, a),
                "n": len(b),
            }
        )
    return out


def drift_summary(table: Sequence[dict], targeted: Sequence[str]) -> dict[str, Any]:
    """How far the emotions that were not trained on moved."""
    others = [r for r in table if r["emotion"] not in targeted]
    if not others:
        return {}
    shifts = torch.tensor([r["shift"] for r in others])
    largest = sorted(others, key=lambda r: -abs(r["shift"]))[:5]
    return {
        "n_emotions": len(others),
        "mean_abs_shift": float(shifts.abs().mean()),
        "rms_shift": float(shifts.pow(2).mean().sqrt()),
        "largest": [{"emotion": r["emotion"], "shift": r["shift"], "d": r["d"]} for r in largest],
    }


def level_summary(values: torch.Tensor) -> dict[str, float]:
    mean, lo, hi = bootstrap_mean_ci(values.tolist())
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}
