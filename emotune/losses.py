"""The auxiliary loss terms, as pure tensor functions (no trainer, no hooks).

Notation (DESIGN.md): h_l(t) is the output of decoder block l at token t, v_e the unit vector
of emotion e at l, r_l the basis's mean residual norm at l, and p_e(t) = <h_l(t), v_e> / r_l.
A mask m selects the tokens a term applies to; ``mean_m`` averages over a sequence's masked
tokens and then over the sequences of the batch (see ``masked_mean``).

| form      | term                                      |
|-----------|-------------------------------------------|
| penalize  | w * mean_m ReLU(p_e - margin)             |
| reward    | w * mean_m ReLU(target - p_e)  (a hinge)  |
| match     | w * mean_m (p_e - target)^2               |
| drift     | w * mean_m mean_e' (p_e' - p_base_e')^2   |

Base-relative forms (p_base from the same batch with the adapter disabled, no grad):

| form      | term                                                                     |
|-----------|--------------------------------------------------------------------------|
| push down | w * mean_m ReLU(p_e - (p_base_e - delta))^2                              |
| push up   | w * mean_m ReLU((p_base_e + delta) - p_e)^2                              |
| hold      | w * mean_m (p_e - p_base_e)^2                                            |
| retain    | w * mean_m ||h_l - h_base_l||^2 / r_l^2                                  |
| kl        | w * mean_m KL(base || adapted) of the next-token distributions           |
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Form = Literal["penalize", "reward", "match", "push", "hold", "retain", "kl"]
FORMS: tuple[str, ...] = ("penalize", "reward", "match", "push", "hold", "retain", "kl")
# forms whose target is the base model's own value: they need the adapter-disabled pass
BASE_FORMS: tuple[str, ...] = ("push", "hold", "retain", "kl")
# forms without an emotion: they compare whole hidden states or next-token distributions
STATE_FORMS: tuple[str, ...] = ("retain", "kl")
Schedule = Literal["constant", "push_to_retain"]
SCHEDULES: tuple[str, ...] = ("constant", "push_to_retain")


def project(hidden: torch.Tensor, vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """``[..., d] x [E, d] -> [..., E]``: projections in units of the residual norm."""
    return hidden @ vectors.to(dtype=hidden.dtype, device=hidden.device).T / scale


def masked_mean(values: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence mean of ``values`` (``[B, T, ...]``) over masked tokens, then the mean over the sequences.

    A sequence with an empty mask counts as 0 (and still counts). Averaging sequences rather than
    tokens makes the term independent of how a batch is split: batch 4 x accumulation 1 and
    batch 1 x accumulation 4 give the same gradient, and so do DDP ranks of equal batch size.
    Extra trailing dimensions of ``values`` are averaged too.

    Without ``segments`` each row is one sequence. A padding-free batch packs several sequences
    into a row; ``segments`` (``[B, T]`` long) then numbers each token's sequence 0..n-1 across
    the batch, -1 on padding, and the result equals that of the same sequences padded into rows.
    """
    if values.dim() > mask.dim():
        values = values.flatten(mask.dim()).mean(-1)  # each token's mean over the trailing dimensions
    weight = mask.to(values.dtype)
    if segments is None:
        per_row = (values * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        return per_row.mean()
    flat = segments.flatten()
    index = flat.clamp_min(0)
    weight = weight.flatten() * (flat >= 0)
    size = flat.numel()  # an upper bound on the number of sequences: no device sync to count them
    sums = values.new_zeros(size).index_add(0, index, values.flatten() * weight)
    counts = values.new_zeros(size).index_add(0, index, weight)
    n_sequences = (flat.max() + 1).clamp_min(1).to(values.dtype)
    return (sums / counts.clamp_min(1.0)).sum() / n_sequences


def term_loss(
    form: str, proj: torch.Tensor, mask: torch.Tensor, value: float, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """One unweighted term on projections ``proj`` (``[B, T]``); ``value`` is the margin or target."""
    if form == "penalize":
        per_token = F.relu(proj - value)
    elif form == "reward":
        per_token = F.relu(value - proj)
    elif form == "match":
        per_token = (proj - value) ** 2
    else:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    return masked_mean(per_token, mask, segments)


def drift_loss(
    proj: torch.Tensor, base_proj: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared move of projections (``[B, T, E]``) away from the base model's, over masked tokens."""
    return masked_mean((proj - base_proj.detach()) ** 2, mask, segments)


def push_loss(
    proj: torch.Tensor,
    base_proj: torch.Tensor,
    mask: torch.Tensor,
    delta: float,
    direction: str,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared hinge towards ``p_base - delta`` (direction ``down``) or ``p_base + delta`` (``up``).

    Squared rather than linear so that the force fades as the target is reached: a linear hinge
    keeps pushing at full strength up to the boundary and overshoots in steps of the learning rate.
    """
    base = base_proj.detach()
    if direction == "down":
        per_token = F.relu(proj - (base - delta)) ** 2
    elif direction == "up":
        per_token = F.relu((base + delta) - proj) ** 2
    else:
        raise ValueError(f"unknown direction {direction!r}; expected 'down' or 'up'")
    return masked_mean(per_token, mask, segments)


def hold_loss(
    proj: torch.Tensor, base_proj: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared distance of the projection from the base model's own, token by token."""
    return masked_mean((proj - base_proj.detach()) ** 2, mask, segments)


def retain_loss(
    hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||h - h_base||^2 / r^2`` per token (``[B, T, d]``): the whole residual stream, not only the basis's
    directions, so that it also holds what the emotion vectors do not see."""
    per_token = ((hidden.float() - base_hidden.detach().float()) ** 2).sum(-1) / scale**2
    return masked_mean(per_token, mask, segments)


def kl_loss(
    logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(base || adapted) of the next-token distributions, per token.

    ``logits``/``base_logits`` are ``[N, V]`` for the N masked tokens of ``mask`` (in ``mask``'s row-major
    order): only the masked tokens' logits are ever built, as the vocabulary makes the full tensor large.
    """
    base_logp = F.log_softmax(base_logits.detach().float(), -1)
    per_masked = (base_logp.exp() * (base_logp - F.log_softmax(logits.float(), -1))).sum(-1)
    per_token = per_masked.new_zeros(mask.shape)
    per_token[mask.bool()] = per_masked
    return masked_mean(per_token, mask, segments)


def schedule_factors(schedule: str, step: int, total_steps: int) -> tuple[float, float]:
    """``(push-side factor, retain-side factor)`` at training progress ``s = step / total_steps``.

    ``push_to_retain`` follows the circuit-breaker schedule (Zou et al. 2024, also used by RepBend):
    the push-side weights fall linearly from 1 to 1/2 (``1 - s/2``) and the retain-side weights rise
    from 0 to 1/2 (``s/2``); the two cross at the end of training. Early on, while the adapter is
    near the base model, retain has little to hold; late, it anchors what the push has not yet
    needed to move. ``constant`` leaves every weight alone.
    """
    if schedule == "constant" or total_steps <= 0:
        return 1.0, 1.0
    if schedule != "push_to_retain":
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    s = min(1.0, max(0.0, step / total_steps))
    return 1.0 - s / 2, s / 2


def warmup_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Linear ramp of the emotion weights from 0 to 1 over the first ``warmup_ratio`` of training."""
    if warmup_ratio <= 0 or total_steps <= 0:
        return 1.0
    return min(1.0, step / max(1.0, warmup_ratio * total_steps))
