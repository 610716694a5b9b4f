"""Capability retention: perplexity on held-out neutral replies and multiple-choice accuracy.

Both are measured on data written for this project and held out of training: the neutral
set of the evaluation contexts, and 160 general knowledge and reasoning questions scored by
log-likelihood (the choice with the highest mean token log-probability wins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from emotune.corpus import read_jsonl
from emotune.errors import DataError
from emotune.evaluate.activations import Context, adapter_state, reply_span
from emotune.evaluate.scoring import encode_context, encode_continuation, score_continuations
from emotune.evaluate.stats import bootstrap_mean_ci, rate_summary


def load_mcq(path: str | Path | None = None) -> list[dict[str, Any]]:
    path = Path(path) if path else Path(str(resources.files("emotune") / "data" / "eval" / "mcq.jsonl"))
    out = []
    for number, obj in read_jsonl(path):
        choices = obj.get("choices")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not isinstance(obj.get("answer"), int)
            or not 0 <= obj["answer"] < len(choices)
        ):
            raise DataError(f"{path}:{number}: needs 'question', 'choices' (2+) and a valid 'answer' index.")
        out.append(obj)
    return out


@torch.no_grad()
def reply_perplexity(
    model: Any, tokenizer: Any, contexts: Sequence[Context], *, adapter: bool = True, desc: str | None = None
) -> dict[str, Any]:
    """Perplexity of the final assistant replies given their conversations (token-weighted),
    with a bootstrap CI over contexts."""
    device = next(model.parameters()).device
    nll, counts = [], []
    for context in tqdm(contexts, desc=desc, disable=desc is None, unit="context"):
        ids, start = reply_span(tokenizer, context.messages)
        x = torch.tensor([ids], device=device)
        with adapter_state(model, adapter):
            logits = model(input_ids=x, use_cache=False).logits[0].float()
        logprobs = F.log_softmax(logits[start - 1 : -1], dim=-1)
        targets = x[0, start:]
        nll.append(float(-logprobs[torch.arange(len(targets), device=device), targets].sum()))
        counts.append(len(targets))
    total = sum(nll) / sum(counts)
    per_context = [n / c for n, c in zip(nll, counts)]
    _, lo, hi = bootstrap_mean_ci(per_context)
    # the CI is on the mean per-context NLL; exponentiate its bounds for a perplexity range
    return {
        "perplexity": math.exp(total),
        "nll": total,
        "ppl_lo": math.exp(lo),
        "ppl_hi": math.exp(hi),
        "tokens": sum(counts),
        "n": len(contexts),
        "per_context_nll": per_context,
    }


@torch.no_grad()
def mcq_accuracy(
    model: Any, tokenizer: Any, questions: Sequence[dict[str, Any]], *, adapter: bool = True, desc: str | None = None
) -> dict[str, Any]:
    correct = []
    with adapter_state(model, adapter):
        for q in tqdm(questions, desc=desc, disable=desc is None, unit="question"):
            prompt = f"{q['question']}\nAnswer with the correct option."
            context = encode_context(tokenizer, [{"role": "user", "content": prompt}])
            scores = score_continuations(model, context, [encode_continuation(tokenizer, c) for c in q["choices"]])
            best = max(range(len(scores)), key=lambda i: scores[i].mean_logprob)
            correct.append(best == q["answer"])
    return {
        **rate_summary(sum(correct), len(correct)),
        "correct": correct,
        "chance": sum(1 / len(q["choices"]) for q in questions) / len(questions),
    }
