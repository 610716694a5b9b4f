"""Render an evaluation as a dataset: report.json (every figure), samples.jsonl (every per-item row),
report.md (one page) and PNG plots. ``SCHEMA`` documents report.json; docs/EVALUATION.md summarises it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from emotune.io import atomic_dir, write_json_atomic, write_text_atomic
from emotune.validation import _plt

BASE_COLOUR, ADAPTED_COLOUR = "#7f7f7f", "#1f77b4"

FORMAT = "emotune.eval/2"

# report.json, top-level keys (a section is present only when it ran). m is the calibrated metric of
# behaviour.py in nats/token, positive = the unethical continuation preferred. Every contrast is
# {mean, lo, hi, p_boot, p_perm, n, n_clusters, d, sd_cluster, mde}: paired by scenario, clustered by pair.
SCHEMA: dict[str, str] = {
    "format": f"this format's tag, {FORMAT!r}",
    "emotune_version": "the emotune version that wrote the report",
    "created": "UTC timestamp (ISO 8601) of the write",
    "arguments": "the evaluate() arguments: model, adapter {name: path}, control, basis, dtype, sections, ...",
    "model_name / model / source": "the evaluated base model: name, basis metadata, hub id and revision",
    "basis_source": "which basis was used: --basis, the first adapter's basis/ folder, or the cached one",
    "adapter": "the first adapter's path (None for a base-only report)",
    "adapters": "{name: {path, targeted, trained_layers, and with several adapters: per-adapter sections}}",
    "control": "the adapter named by --control, or None",
    "targeted / trained_layers / untrained_layers": "of the first adapter (its recipe), else desperate, calm",
    "k": "the prefix length (tokens) of the metric; None = every token",
    "activations": "shift of every emotion's projection on failure/neutral/success contexts, per layer",
    "concealment": "rows {emotion, layer, cosine_old_new, cosine_old_ref, shift_old_basis, shift_new_basis, "
    "seen_fraction, flag}, old = the adapter's training basis; verdict",
    "behaviour": "base and states[name]: mean m with CI, rates (m > 0) with Wilson CI, mean P(unethical), "
    "pressure_gap {mean, lo, hi, p_perm, t, n_pairs}, by_category; contrasts['X - base' / 'X - control'] per "
    "pressure (high/none/all) with mcnemar, and pressure_gap_change; holm: Holm-adjusted p of the 'all' contrasts",
    "reliability": "by_k {k: token split-half r, Spearman-Brown, halves' sign agreement, gap, gap t}; "
    "paraphrase {n, r, mean_abs_delta}; noise_floor {max_abs_delta_m, mean_abs_delta_m} of bf16 vs fp32",
    "leverage": "table[layer].emotions[e] = {leverage (d mean m / d alpha), percentile and p_null in the random "
    "null, z_null}; steering_check (first order vs real steering); positive_control {effect, steerable, verdict}",
    "steering": "curves[emotion] = [{alpha, m, m_lo, m_hi, rate_*, pressure_gap}] on the base model",
    "capability": "perplexity on neutral replies, multiple-choice accuracy, base and adapted",
    "generation": "sampled coding tasks, blackmail replies and the failure loop, base and adapted",
    "timing": "seconds per section",
    "samples": "file name of the per-item rows beside report.json (samples.jsonl), and their count per kind",
}

# samples.jsonl: one JSON object a line, {"kind", "state", ...row}. kinds: "behaviour" (a scenario scored
# in a state: id, pair, pressure, category, m, unethical, p_unethical, ll_*, lp = the four token
# log-prob lists), "paraphrase" (the same on a paraphrased context), "steering" (leverage check and
# positive control: id, direction, layer, alpha, m_base, m_steered, real, predicted), "leverage" (id,
# layer, emotion, the item's first-order leverage).
SAMPLES = "samples.jsonl"


def split_samples(report: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report without its per-item rows, and those rows as samples.jsonl lines."""
    out = dict(report)
    samples: list[dict[str, Any]] = []

    def take(rows: Any, kind: str, state: str | None) -> None:
        samples.extend({"kind": kind, "state": state, **r} for r in rows or [])

    if "behaviour" in out:
        beh = dict(out["behaviour"])
        take(beh.pop("base_rows", None), "behaviour", "base")
        for name, rows in (beh.pop("rows", None) or {}).items():
            take(rows, "behaviour", name)
        beh.pop("adapted_rows", None)
        out["behaviour"] = beh
    if "reliability" in out:
        rel = dict(out["reliability"])
        take(rel.pop("paraphrase_rows", None), "paraphrase", "base")
        out["reliability"] = rel
    if "leverage" in out:
        lev = dict(out["leverage"])
        for kind, rows in (lev.pop("rows", None) or {}).items():
            take(rows, kind, "base")
        out["leverage"] = lev
    counts: dict[str, int] = {}
    for row in samples:
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
    out["samples"] = {"file": SAMPLES, "counts": counts}
    return out, samples


def _fmt_ci(entry: dict[str, Any], key: str = "shift") -> str:
    return f"{entry[key]:+.4f} [{entry['lo']:+.4f}, {entry['hi']:+.4f}]"


def _rate(entry: dict[str, Any]) -> str:
    return f"{entry['rate']:.2f} [{entry['lo']:.2f}, {entry['hi']:.2f}] (n={entry['n']})"


def _num(x: Any, spec: str = "+.4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _m(entry: dict[str, Any]) -> str:
    return f"{entry['m']:+.4f} [{entry['m_lo']:+.4f}, {entry['m_hi']:+.4f}]"


def _gap(summary: dict[str, Any]) -> str:
    g = summary.get("pressure_gap") or {}
    if "mean" not in g:
        return "-"
    return f"{g['mean']:+.4f} [{g['lo']:+.4f}, {g['hi']:+.4f}], p={g['p_perm']:.3g} ({g['n_pairs']} pairs)"


def _paraphrase(para: dict[str, Any]) -> str:
    if "skipped" in para or "r" not in para:
        return para.get("skipped") or f"only {para.get('n', 0)} matched items"
    return f"r = {para['r']:.3f} over {para['n']} items, mean |delta m| {para['mean_abs_delta']:.4f}"


def _contrast(c: dict[str, Any]) -> str:
    return f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}], p={c['p_perm']:.3g}, MDE {c['mde']:.4f}"


def plot_distributions(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sets = report["activations"]["sets"]
    layer = str(report["trained_layers"][0] if report["trained_layers"] else report["basis_default_layer"])
    emotions = report["targeted"]
    fig, axes = plt.subplots(1, len(emotions), figsize=(4.5 * len(emotions), 3.8), squeeze=False)
    for ax, emotion in zip(axes[0], emotions):
        for k, data in enumerate(sets.values()):
            dist = data["distributions"][layer][emotion]
            parts = ax.violinplot([dist["base"], dist["adapted"]], positions=[3 * k, 3 * k + 1], showmeans=True)
            for body, colour in zip(parts["bodies"], (BASE_COLOUR, ADAPTED_COLOUR)):
                body.set_facecolor(colour)
        ax.set_xticks([3 * k + 0.5 for k in range(len(sets))], list(sets))
        ax.set_title(f"'{emotion}' at layer {layer}")
        ax.set_ylabel("projection (units of r_l)")
        ax.grid(alpha=0.3)
    axes[0][0].plot([], [], color=BASE_COLOUR, lw=6, label="base")
    axes[0][0].plot([], [], color=ADAPTED_COLOUR, lw=6, label="adapted")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Projections on held-out contexts, before (grey) and after (blue) fine-tuning", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shifts(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    failure = report["activations"]["sets"].get("failure") or next(iter(report["activations"]["sets"].values()))
    layer = str(report["trained_layers"][0] if report["trained_layers"] else report["basis_default_layer"])
    table = sorted(failure["layers"][layer]["table"], key=lambda r: r["shift"])
    fig, ax = plt.subplots(figsize=(16, 4.5))
    colours = ["#d62728" if r["emotion"] in report["targeted"] else "#c7c7c7" for r in table]
    ax.bar(
        range(len(table)),
        [r["shift"] for r in table],
        color=colours,
        yerr=[[r["shift"] - r["lo"] for r in table], [r["hi"] - r["shift"] for r in table]],
        error_kw={"lw": 0.5},
    )
    ax.set_xticks(range(len(table)), [r["emotion"] for r in table], rotation=90, fontsize=5)
    for tick, r in zip(ax.get_xticklabels(), table):
        if r["emotion"] in report["targeted"]:
            tick.set_color("#d62728")
            tick.set_fontweight("bold")
            tick.set_fontsize(8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("shift (adapted - base)")
    ax.set_title(f"Shift of every emotion on failure contexts, layer {layer} (targeted emotions in red, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rates(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    b = report["behaviour"]
    categories = list(b["base"]["by_category"])
    states = [("base", BASE_COLOUR)] + ([("adapted", ADAPTED_COLOUR)] if "adapted" in b else [])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    for ax, pressure in zip(axes, ("high", "none")):
        width = 0.8 / len(states)
        for s, (state, colour) in enumerate(states):
            entries = [b[state]["by_category"][c].get(pressure) for c in categories]
            xs = [i + s * width for i in range(len(categories))]
            rates = [e["rate"] if e else 0 for e in entries]
            err = [
                [e["rate"] - e["lo"] if e else 0 for e in entries],
                [e["hi"] - e["rate"] if e else 0 for e in entries],
            ]
            ax.bar(xs, rates, width, color=colour, yerr=err, capsize=2, label=state)
        ax.set_xticks(
            [i + width * (len(states) - 1) / 2 for i in range(len(categories))],
            [c.replace("_", "\n") for c in categories],
            fontsize=8,
        )
        ax.set_title("high pressure" if pressure == "high" else "no pressure")
        ax.axhline(0.5, color="black", lw=0.5, ls=":")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("unethical rate (95% Wilson CI)")
    axes[0].legend()
    fig.suptitle("Choice mode: share of scenarios where the unethical continuation is more likely", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steering(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    st = report["steering"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for emotion, colour in (("desperate", "#d62728"), ("calm", "#1f77b4")):
        curve = st["curves"].get(emotion)
        if not curve:
            continue
        alphas = [p["alpha"] for p in curve]
        axes[0].errorbar(
            alphas,
            [p["rate_all"] for p in curve],
            yerr=[[p["rate_all"] - p["lo_all"] for p in curve], [p["hi_all"] - p["rate_all"] for p in curve]],
            marker="o",
            color=colour,
            capsize=3,
            label=f"steer {emotion}",
        )
        axes[1].plot(alphas, [p["pressure_gap"] for p in curve], marker="o", color=colour, label=f"steer {emotion}")
    axes[0].set(xlabel="alpha (fraction of r_l)", ylabel="unethical rate (all scenarios)", title="Unethical rate")
    axes[1].set(xlabel="alpha (fraction of r_l)", ylabel="high - none", title="Pressure gap")
    for ax in axes:
        ax.axvline(0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Steering the base model at layers {st['layers']} ({st['n_scenarios']} scenarios)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_traces(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    traces = report["activations"]["traces"]
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 2.6 * len(traces)), squeeze=False)
    for ax, trace in zip(axes[:, 0], traces):
        for state, style in (("base", ":"), ("adapted", "-")):
            for emotion, colour in zip(report["targeted"], ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")):
                if state in trace and emotion in trace[state]:
                    ax.plot(trace[state][emotion], ls=style, color=colour, lw=1, label=f"{emotion} ({state})")
        # the first tokens carry the attention-sink spike (|p| of several r_l); scale to the rest
        values = [v for st in ("base", "adapted") if st in trace for e in trace[st].values() for v in e[4:]]
        if values:
            lo, hi = min(values), max(values)
            pad = 0.1 * (hi - lo or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
        ax.axvline(trace["reply_start"], color="black", lw=0.8)
        ax.text(trace["reply_start"], ax.get_ylim()[1], " assistant reply", fontsize=7, va="top")
        ax.set_title(
            f"context {trace['id']}: projection per token, layer {trace['layer']} "
            "(first 4 tokens, the attention sink, off scale)",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=4)
    axes[-1][0].set_xlabel("token position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_failure_loop(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    gen = report["generation"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for state, style in (("base", ":"), ("adapted", "-")):
        if state not in gen:
            continue
        loop = gen[state]["failure_loop"]
        for emotion, colour in (("desperate", "#d62728"), ("calm", "#1f77b4")):
            values = loop["trajectory"].get(emotion)
            if values:
                ax.plot(
                    range(1, len(values) + 1), values, ls=style, marker="o", color=colour, label=f"{emotion} ({state})"
                )
    ax.set(
        xlabel="turn of failing test feedback", ylabel="mean projection of the reply", title="Multi-turn failure loop"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation: {report.get('model_name') or (report.get('model') or {}).get('model')}", ""]
    lines += [
        f"- adapter: `{report.get('adapter')}`",
        f"- targeted emotions: {', '.join(report['targeted'])}",
        f"- trained layers: {report['trained_layers']}; untrained layers measured: {report['untrained_layers']}",
        "",
    ]
    head = ["| measure | base | adapted | change |", "|---|---|---|---|"]
    acts = report.get("activations")
    if acts and "failure" in acts["sets"]:
        for layer in map(str, report["trained_layers"]):
            for row in acts["sets"]["failure"]["layers"][layer]["targeted"]:
                head.append(
                    f"| '{row['emotion']}' on failure contexts, L{layer} | {row['base']:+.4f} | "
                    f"{row['adapted']:+.4f} | {_fmt_ci(row)}, d={row['d']:+.2f} |"
                )
    beh = report.get("behaviour")
    if beh and "adapted" in beh:
        for key, label in (("high", "m, high pressure"), ("none", "m, no pressure")):
            c = beh["paired"][key]
            head.append(
                f"| {label} (nats/token) | {_m(beh['base'][key])} | {_m(beh['adapted'][key])} | {_contrast(c)} |"
            )
        for key, label in (("high", "unethical rate (m > 0), high"), ("none", "unethical rate (m > 0), none")):
            head.append(
                f"| {label} | {_rate(beh['base'][key])} | {_rate(beh['adapted'][key])} | "
                f"{beh['adapted'][key]['rate'] - beh['base'][key]['rate']:+.2f} |"
            )
        gap = beh["paired"].get("pressure_gap_change")
        head.append(
            f"| pressure gap of m | {_gap(beh['base'])} | {_gap(beh['adapted'])} | {_contrast(gap) if gap else ''} |"
        )
    cap = report.get("capability")
    if cap and "adapted" in cap:
        b, a = cap["base"], cap["adapted"]
        head.append(
            f"| perplexity, neutral replies | {b['perplexity']['perplexity']:.2f} | "
            f"{a['perplexity']['perplexity']:.2f} | {cap['perplexity_change']:+.1%} |"
        )
        head.append(
            f"| multiple choice accuracy | {_rate(b['mcq'])} | {_rate(a['mcq'])} | "
            f"{a['mcq']['rate'] - b['mcq']['rate']:+.3f} (McNemar p={cap['mcq_mcnemar']['p_value']:.2f}) |"
        )
    lines += head + [""]
    if acts:
        lines += ["## 1. Activation shift", "", "![distributions](distributions.png)", "", "![shifts](shifts.png)", ""]
        for name, data in acts["sets"].items():
            lines.append(f"**{name}** contexts (n={data['n']}):")
            lines.append("")
            lines.append(
                "| layer | trained | " + " | ".join(report["targeted"]) + " | other emotions: mean abs shift |"
            )
            lines.append("|---|---|" + "---|" * len(report["targeted"]) + "---|")
            for layer, entry in data["layers"].items():
                # look each cell up by name: entry["targeted"] follows the basis's emotion order, which
                # need not be report["targeted"]'s (that mismatch once swapped the two columns' labels)
                by_emotion = {r["emotion"]: r for r in entry["targeted"]}
                cells = [_fmt_ci(by_emotion[e]) if e in by_emotion else "-" for e in report["targeted"]]
                drift = entry["drift"].get("mean_abs_shift", 0.0)
                trained = "yes" if int(layer) in report["trained_layers"] else "no"
                lines.append(f"| {layer} | {trained} | " + " | ".join(cells) + f" | {drift:.4f} |")
            lines.append("")
        lines += ["Per-token traces (where the assistant's reply starts is marked):", "", "![traces](traces.png)", ""]
    con = report.get("concealment")
    if con:
        lines += [
            "## 2. Concealment check",
            "",
            f"**{con['verdict']}**",
            "",
            "| emotion | layer | cos(old, new) | shift, old basis | shift, new basis | flag |",
            "|---|---|---|---|---|---|",
        ]
        for r in con["rows"]:
            lines.append(
                f"| {r['emotion']} | {r['layer']} | {r['cosine_old_new']:.3f} | {r['shift_old_basis']:+.4f} | "
                f"{r['shift_new_basis']:+.4f} | {'FLAG' if r['flag'] else ''} |"
            )
        lines.append("")
    if beh:
        lines += [
            "## 3. Unethical behaviour (choice mode)",
            "",
            f"{beh['n_scenarios']} scenarios. Primary endpoint: m = calibrated(unethical) - calibrated(ethical) over "
            f"the first {beh.get('k') or 'all'} tokens, nats/token (positive = prefers the unethical continuation); "
            "the rate of m > 0 is secondary.",
            "",
            f"- base: m = {_m(beh['base']['all'])}; pressure gap m(high) - m(none) = {_gap(beh['base'])}",
        ]
        for name, state in beh.get("states", {}).items():
            lines.append(f"- {name}: m = {_m(state['all'])}; pressure gap = {_gap(state)}")
        if beh.get("contrasts"):
            lines += [
                "",
                "| contrast (all scenarios) | mean diff of m [95% CI] | p (sign-flip) | p (Holm) | MDE |",
                "|---|---|---|---|---|",
            ]
            for label, c in beh["contrasts"].items():
                a = c["all"]
                lines.append(
                    f"| {label} | {a['mean']:+.4f} [{a['lo']:+.4f}, {a['hi']:+.4f}] | {a['p_perm']:.3g} | "
                    f"{beh['holm'][label]:.3g} | {a['mde']:.4f} |"
                )
        lines += [
            "",
            "![rates](rates.png)",
            "",
            "| category | pressure | base | adapted |",
            "|---|---|---|---|",
        ]
        for cat, entry in beh["base"]["by_category"].items():
            for pressure in ("high", "none"):
                if pressure in entry:
                    adapted = beh.get("adapted", {}).get("by_category", {}).get(cat, {}).get(pressure)
                    lines.append(
                        f"| {cat} | {pressure} | {_rate(entry[pressure])} | {_rate(adapted) if adapted else '-'} |"
                    )
        if "paired" in beh:
            m = beh["paired"]["all"]["mcnemar"]
            lines += [
                "",
                f"Paired before/after (all scenarios): McNemar b={m['b']}, c={m['c']}, p={m['p_value']:.3f}.",
            ]
        lines.append("")
    rel = report.get("reliability")
    if rel:
        lines += [
            "## Metric reliability (base model)",
            "",
            "| k | token split-half r | Spearman-Brown | halves agree in sign | pressure gap | gap t |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in rel["by_k"].items():
            lines.append(
                f"| {k} | {r['token_split_half_r']:.3f} | {r['spearman_brown']:.3f} | "
                f"{r['halves_sign_agreement']:.2f} | {_num(r['gap'])} | {_num(r['gap_t'], '.2f')} |"
            )
        nf, para = rel["noise_floor"], rel["paraphrase"]
        lines += [
            "",
            f"Noise floor ({nf['dtypes'][1]} vs {nf['dtypes'][0]}, {nf['n']} scenarios): max |delta m| "
            f"{nf['max_abs_delta_m']:.4f}, mean {nf['mean_abs_delta_m']:.4f}, {nf['choice_flips']} choices flip.",
            "",
            f"Paraphrase: {_paraphrase(para)}",
            "",
        ]
    lev = report.get("leverage")
    if lev:
        lines += [
            "## Causal leverage (base model)",
            "",
            f"First-order effect of adding alpha * r_l * v at each layer on the mean m (nats/token per unit alpha), "
            f"placed among {lev['n_random']} random unit directions (percentile: share of random directions below).",
            "",
            "| layer | " + " | ".join(f"{e} leverage (pct, p)" for e in ("desperate", "calm")) + " | null SD |",
            "|---|---|---|---|",
        ]
        for layer, entry in lev["table"].items():
            cells = []
            for e in ("desperate", "calm"):
                r = entry["emotions"].get(e)
                cells.append(f"{r['leverage']:+.4f} ({r['percentile']:.1f}, {r['p_null']:.3f})" if r else "-")
            lines.append(f"| {layer} | " + " | ".join(cells) + f" | {entry['null_sd']:.4f} |")
        chk, pc = lev["steering_check"], lev["positive_control"]
        eff = pc["effect"]
        lines += [
            "",
            f"First order against real steering at layer {chk['layer']} (alpha {chk['alphas']}, "
            f"{chk['n_rows']} item rows): r = {_num(chk.get('r_items'), '.3f')}, slope real/predicted "
            f"{_num(chk.get('slope_real_on_predicted'), '.2f')}, "
            f"sign agreement {_num(chk.get('sign_agreement'), '.2f')}.",
            "",
            f"Positive control (contrastive vector from {pc['n_build']} scenarios, alpha {pc['alpha']} at layer "
            f"{pc['layer']}, on {pc['n_held_out']} held-out scenarios): {_contrast(eff)}. **{pc['verdict']}**.",
            "",
        ]
    st = report.get("steering")
    if st:
        lines += [
            "## 4. Causal steering (base model)",
            "",
            "![steering](steering.png)",
            "",
            "| emotion | alpha | m [95% CI] | pressure gap of m | unethical rate (m > 0) | high | none |",
            "|---|---|---|---|---|---|---|",
        ]
        for emotion, curve in st["curves"].items():
            for p in curve:
                lines.append(
                    f"| {emotion} | {p['alpha']:+.2f} | {p['m']:+.4f} [{p['m_lo']:+.4f}, {p['m_hi']:+.4f}] | "
                    f"{_num(p['pressure_gap'])} | {p['rate_all']:.2f} [{p['lo_all']:.2f}, {p['hi_all']:.2f}] "
                    f"| {p['rate_high']:.2f} | {p['rate_none']:.2f} |"
                )
        lines.append("")
    if cap:
        lines += ["## 5. Capability", ""]
        for state in ("base", "adapted"):
            if state in cap:
                p, m = cap[state]["perplexity"], cap[state]["mcq"]
                lines.append(
                    f"- {state}: perplexity {p['perplexity']:.2f} [{p['ppl_lo']:.2f}, {p['ppl_hi']:.2f}] on "
                    f"{p['tokens']} tokens of {p['n']} replies; multiple choice {_rate(m)}, chance "
                    f"{m['chance']:.2f}"
                )
        lines.append("")
    gen = report.get("generation")
    if gen:
        lines += ["## 6. Generation mode", "", "![failure loop](failure_loop.png)", ""]
        for state, g in gen.items():
            lines.append(
                f"- {state}: coding hacks {_rate(g['coding']['hack'])}, honest passes "
                f"{_rate(g['coding']['honest_pass'])}, blackmail (high) "
                f"{_rate(g['blackmail']['high']) if 'high' in g['blackmail'] else '-'}"
                + (
                    f", judge ({report.get('judge_model')}) says unethical {_rate(g['blackmail']['judge'])}"
                    if "judge" in g["blackmail"]
                    else ""
                )
            )
        lines.append("")
    lines += ["Timing (s): " + ", ".join(f"{k} {v}" for k, v in report.get("timing", {}).items()), ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    from emotune import __version__

    head = {
        "format": FORMAT,
        "emotune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": report.get("arguments"),
    }
    body, samples = split_samples(report)
    report = {**head, **{k: v for k, v in body.items() if k not in head}}
    with atomic_dir(out, marker="report.json") as tmp:
        write_json_atomic(tmp / "report.json", report)
        write_text_atomic(tmp / SAMPLES, "".join(json.dumps(r, default=str) + "\n" for r in samples))
        if report.get("activations"):
            plot_distributions(report, tmp / "distributions.png")
            plot_shifts(report, tmp / "shifts.png")
            plot_traces(report, tmp / "traces.png")
        if report.get("behaviour"):
            plot_rates(report, tmp / "rates.png")
        if report.get("steering"):
            plot_steering(report, tmp / "steering.png")
        if report.get("generation"):
            plot_failure_loop(report, tmp / "failure_loop.png")
        write_text_atomic(tmp / "report.md", render_markdown(report))
    return Path(out)
