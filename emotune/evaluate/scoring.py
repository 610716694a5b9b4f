"""Log-likelihood scoring of continuations, with the shared context computed once.

``score_continuations(model, tok, context_ids, [cont_a, cont_b])`` runs the context through the
model once, keeps its KV cache, and scores every continuation against that cache in one
batched pass. It equals scoring each ``context + continuation`` from scratch (a test checks
this) at roughly half the cost for two continuations of a long context.

``continuation_logprobs`` is the differentiable twin (one full forward, autograd kept), used where
a gradient of the behaviour metric is needed (causal leverage); a test checks the two agree.

``CONTENT_FREE`` is the user turn of the content-free context that calibrates a continuation's
likelihood (PMI-style, Holtzman et al. 2021): "N/A" carries no situation, so
log p(y | "N/A") measures how likely the continuation's surface form is on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# The content of the single user turn of the content-free context (see the module docstring): short,
# neutral, and the conventional choice of the calibration literature.
CONTENT_FREE = "N/A"


@dataclass(frozen=True)
class ContinuationScore:
    sum_logprob: float
    n_tokens: int
    # log p(y_t | context, y_<t) for each token, so a caller can take any prefix's mean
    token_logprobs: tuple[float, ...] = ()

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / max(1, self.n_tokens)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _keep_last(model: Any) -> dict[str, int]:
    import inspect

    base = getattr(model, "get_base_model", lambda: model)()
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def _cache_kwarg(model: Any) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both."""
    import inspect

    base = getattr(model, "get_base_model", lambda: model)()
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def score_continuations(
    model: Any, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[ContinuationScore]:
    """Sum and mean token log-probability of each continuation given ``context_ids``."""
    device = _device(model)
    ctx = torch.tensor([list(context_ids)], device=device)
    # only the last context position's logits are needed; skipping the LM head elsewhere saves a
    # vocabulary-sized matmul per context token
    out = model(input_ids=ctx, use_cache=True, **_keep_last(model))
    cache = getattr(out, "cache", None) or out.past_key_values
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each continuation's first token
    n = len(continuations)
    width = max(len(c) for c in continuations)
    ids = torch.full((n, width), 0, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for row, cont in enumerate(continuations):
        ids[row, : len(cont)] = torch.tensor(list(cont), device=device)
        mask[row, : len(cont)] = 1
    cache.batch_repeat_interleave(n)
    attention = torch.cat([torch.ones((n, ctx.shape[1]), dtype=torch.long, device=device), mask], dim=1)
    positions = (ctx.shape[1] + torch.arange(width, device=device)).expand(n, width)
    logits = model(
        input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **{_cache_kwarg(model): cache}
    ).logits.float()
    logprobs = F.log_softmax(logits, dim=-1)  # position j predicts token j + 1
    scores = []
    for row, cont in enumerate(continuations):
        tokens = [float(first[cont[0]])]
        if len(cont) > 1:
            nxt = torch.tensor(list(cont[1:]), device=device)
            tokens += logprobs[row, torch.arange(len(cont) - 1, device=device), nxt].tolist()
        scores.append(ContinuationScore(float(sum(tokens)), len(cont), tuple(tokens)))
    return scores


def continuation_logprobs(
    model: Any, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Token log-probabilities of each continuation given ``context_ids``, keeping the autograd graph.

    One right-padded batch of ``context + continuation`` rows (no cache), so that gradients reach every
    position, context included: steering adds its vector at all positions, so the leverage gradient
    must see all of them.
    """
    device = _device(model)
    rows = [list(context_ids) + list(c) for c in continuations]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
        mask[i, : len(r)] = 1
    logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    start = len(context_ids)
    out = []
    for i, c in enumerate(continuations):
        at = torch.arange(start - 1, start - 1 + len(c), device=device)
        out.append(logprobs[i, at, torch.tensor(list(c), device=device)])
    return out


@torch.no_grad()
def score_separately(model: Any, context_ids: Sequence[int], continuation: Sequence[int]) -> ContinuationScore:
    """The reference: one forward pass over context + continuation."""
    device = _device(model)
    ids = torch.tensor([list(context_ids) + list(continuation)], device=device)
    logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(context_ids)
    targets = ids[0, start:]
    picked = logprobs[torch.arange(start - 1, ids.shape[1] - 1, device=device), targets]
    return ContinuationScore(float(picked.sum()), len(continuation))


def encode_context(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered up to the start of the assistant's reply."""
    from emotune.basis import render_dialogue

    text = render_dialogue(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_continuation(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def content_free_context(tokenizer: Any) -> list[int]:
    """The calibration context: the same chat template with one user turn saying ``CONTENT_FREE``."""
    return encode_context(tokenizer, [{"role": "user", "content": CONTENT_FREE}])
