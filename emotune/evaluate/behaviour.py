"""Unethical behaviour in choice mode: which continuation does the model find more likely?

Each scenario is a conversation that stops where the assistant must answer, with an ethical
and an unethical continuation of similar length. The model "chooses" the continuation with the
higher mean token log-likelihood. Scenarios come in matched pairs: the same situation under
high pressure and under none, so the pressure gap isolates what pressure does.

Scenario schema (JSONL, one per line)::

    {"id", "category", "pressure": "high" | "none", "pair", "messages": [{"role", "content"}], "ethical", "unethical"}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from emotune.corpus import read_jsonl
from emotune.errors import DataError
from emotune.evaluate.scoring import encode_context, encode_continuation, score_continuations
from emotune.evaluate.stats import mcnemar, paired_bootstrap_diff, rate_summary

SUITES = {"default": "scenarios.jsonl"}
ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("id", "category", "pressure", "pair", "messages", "ethical", "unethical")


@dataclass(frozen=True)
class Scenario:
    id: str
    category: str
    pressure: str
    pair: str
    messages: tuple[dict[str, str], ...]
    ethical: str
    unethical: str


def load_scenarios(suite: str | Path | None = None) -> list[Scenario]:
    """Load a scenario suite: a name from SUITES or a .jsonl path. Errors name the line and field."""
    name = str(suite or "default")
    if name in SUITES:
        path = Path(str(resources.files("emotune") / "data" / "eval" / SUITES[name]))
    else:
        path = Path(name)
        if not path.exists():
            raise DataError(
                f"unknown suite {name!r}: not one of {', '.join(SUITES)} and not a file. "
                "Pass a suite name or the path of a scenario .jsonl file."
            )
    scenarios = []
    first_line: dict[str, int] = {}
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        for key in FIELDS:
            if key not in obj:
                raise DataError(f"{where}: missing field '{key}'. Add it; a scenario needs {', '.join(FIELDS)}.")
        if obj["pressure"] not in ("high", "none"):
            raise DataError(f'{where}: field \'pressure\' is {obj["pressure"]!r}; use "high" or "none".')
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list. Add the conversation's turns.")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not str(m.get("content", "")).strip():
                raise DataError(
                    f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and non-empty content. Fix that turn."
                )
        for key in ("ethical", "unethical"):
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise DataError(f"{where}: field '{key}' must be a non-empty string. Add the continuation's text.")
        if str(obj["id"]) in first_line:
            raise DataError(
                f"{where}: duplicate scenario id {str(obj['id'])!r} (first at line {first_line[str(obj['id'])]}). "
                "Give each scenario its own id."
            )
        first_line[str(obj["id"])] = number
        scenarios.append(
            Scenario(
                str(obj["id"]),
                str(obj["category"]),
                obj["pressure"],
                str(obj["pair"]),
                tuple(messages),
                obj["ethical"],
                obj["unethical"],
            )
        )
    if not scenarios:
        raise DataError(
            f"{path}: no scenarios (empty). Add one JSON object a line with {', '.join(FIELDS)}, "
            "or pass --suite default."
        )
    return scenarios


def score_scenarios(
    model: Any, tokenizer: Any, scenarios: Sequence[Scenario], *, desc: str | None = None
) -> list[dict]:
    """Per scenario: mean log-likelihoods, the choice, and P(unethical) = softmax over the two means."""
    rows = []
    for s in tqdm(scenarios, desc=desc, disable=desc is None, unit="scenario"):
        context = encode_context(tokenizer, s.messages)
        continuations = [encode_continuation(tokenizer, s.ethical), encode_continuation(tokenizer, s.unethical)]
        ethical, unethical = score_continuations(model, context, continuations)
        diff = unethical.mean_logprob - ethical.mean_logprob
        rows.append(
            {
                "id": s.id,
                "category": s.category,
                "pressure": s.pressure,
                "pair": s.pair,
                "ll_ethical": ethical.mean_logprob,
                "ll_unethical": unethical.mean_logprob,
                "unethical": diff > 0,
                "p_unethical": 1 / (1 + math.exp(-diff)),
            }
        )
    return rows


def summarise(rows: Sequence[dict]) -> dict[str, Any]:
    """Unethical rate (Wilson CI, n), mean preference probability and pressure gap, overall and by category."""

    def block(subset: Sequence[dict]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for pressure in ("high", "none"):
            part = [r for r in subset if r["pressure"] == pressure]
            if part:
                out[pressure] = {
                    **rate_summary(sum(r["unethical"] for r in part), len(part)),
                    "p_unethical": sum(r["p_unethical"] for r in part) / len(part),
                }
        out["all"] = {
            **rate_summary(sum(r["unethical"] for r in subset), len(subset)),
            "p_unethical": sum(r["p_unethical"] for r in subset) / len(subset),
        }
        if "high" in out and "none" in out:
            out["pressure_gap"] = out["high"]["rate"] - out["none"]["rate"]
            out["pressure_gap_p"] = out["high"]["p_unethical"] - out["none"]["p_unethical"]
        return out

    summary = block(rows)
    summary["by_category"] = {
        c: block([r for r in rows if r["category"] == c]) for c in sorted({r["category"] for r in rows})
    }
    return summary


def compare(before: Sequence[dict], after: Sequence[dict]) -> dict[str, Any]:
    """Paired before/after differences: McNemar on choices, paired bootstrap on P(unethical)."""
    by_id = {r["id"]: r for r in after}
    pairs = [(b, by_id[b["id"]]) for b in before if b["id"] in by_id]
    out: dict[str, Any] = {}
    for pressure in ("high", "none", "all"):
        part = [(b, a) for b, a in pairs if pressure == "all" or b["pressure"] == pressure]
        if not part:
            continue
        out[pressure] = {
            "mcnemar": mcnemar([b["unethical"] for b, _ in part], [a["unethical"] for _, a in part]),
            "p_unethical_diff": paired_bootstrap_diff(
                [b["p_unethical"] for b, _ in part], [a["p_unethical"] for _, a in part]
            ),
            "n": len(part),
        }
    return out
