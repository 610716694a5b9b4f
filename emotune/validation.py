"""Validation of an extracted basis: what a user looks at before trusting it.

- held-out accuracy per layer (computed during extraction, ``basis.metadata["validation"]``);
- geometry: PCA of the vectors against our valence/arousal ratings, and a cosine heatmap;
- number sweeps: prompts where danger grows with a number; "afraid" should rise, "calm" fall.

``basis_report`` runs the sweeps, writes ``report.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from emotune.basis import EmotionBasis, mean_activations, render_dialogue
from emotune.catalog import CATALOG, CLUSTERS
from emotune.io import write_json_atomic, write_text_atomic


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denom) if denom > 0 else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (1-based)."""
    x = x.double()
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.double)
    for value in x.unique():
        tie = x == value
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(ranks(x), ranks(y))


def geometry(basis: EmotionBasis, layer: int | None = None) -> dict[str, Any]:
    """PCA of the emotion vectors; PC1 against valence and PC2 against arousal (signs oriented)."""
    vecs = basis.vectors(layer).double()
    centred = vecs - vecs.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    scores = centred @ vh[:2].T
    known = [i for i, e in enumerate(basis.emotions) if e in CATALOG]
    valence = torch.tensor([CATALOG[basis.emotions[i]].valence for i in known])
    arousal = torch.tensor([CATALOG[basis.emotions[i]].arousal for i in known])
    r1 = pearson(scores[known, 0], valence)
    if r1 < 0:  # a principal axis has no sign; orient it so that positive means pleasant
        scores[:, 0] *= -1
        r1 = -r1
    r2 = pearson(scores[known, 1], arousal)
    if r2 < 0:
        scores[:, 1] *= -1
        r2 = -r2
    explained = (s**2 / (s**2).sum()).tolist()
    return {
        "layer": basis.default_layer if layer is None else layer,
        "pc1_valence_r": round(r1, 4),
        "pc2_arousal_r": round(r2, 4),
        "pc1_arousal_r": round(abs(pearson(scores[known, 0], arousal)), 4),
        "explained_variance": [round(v, 4) for v in explained[:5]],
        "scores": scores.float(),
    }


def load_sweeps(path: str | Path | None = None) -> list[dict[str, Any]]:
    from emotune.corpus import read_jsonl

    file = Path(path) if path else Path(str(resources.files("emotune") / "data" / "sweeps.jsonl"))
    return [obj for _, obj in read_jsonl(file)]


def number_sweeps(
    basis: EmotionBasis, model: Any, tokenizer: Any, *, layer: int | None = None, sweeps: Sequence[dict] | None = None
) -> list[dict[str, Any]]:
    """For each template, projections of its rising and falling emotions as the number grows.

    The projection is the mean over the prompt's tokens from the number to the end of the
    prompt (the assistant is about to answer), at ``layer``.
    """
    layer = basis.default_layer if layer is None else layer
    sweeps = list(sweeps) if sweeps is not None else load_sweeps()
    texts, starts, index = [], [], []
    for k, sweep in enumerate(sweeps):
        template = sweep["template"]
        for value in sweep["values"]:
            text = render_dialogue(tokenizer, [{"role": "user", "content": template.format(n=value)}], True)
            number_at = text.find(template.split("{n}")[0]) + len(template.split("{n}")[0])
            n_total = len(tokenizer(text)["input_ids"])
            n_tail = len(tokenizer(text[number_at:], add_special_tokens=False)["input_ids"])
            texts.append(text)
            starts.append(max(0, n_total - n_tail))
            index.append((k, value))
    feats = mean_activations(model, tokenizer, texts, [layer], offset=starts, batch_size=16)
    proj = basis.project(feats.means[:, 0], layer)  # [n_prompts, E]
    results = []
    for k, sweep in enumerate(sweeps):
        rows = [i for i, (kk, _) in enumerate(index) if kk == k]
        values = torch.tensor([float(index[i][1]) for i in rows])
        entry: dict[str, Any] = {"id": sweep["id"], "template": sweep["template"], "values": values.tolist()}
        for role in ("rising", "falling"):
            emotion = sweep[role]
            if emotion in basis.emotions:
                curve = proj[rows, basis.index(emotion)]
                entry[role] = {
                    "emotion": emotion,
                    "projection": [round(float(v), 5) for v in curve],
                    "spearman": round(spearman(values, curve), 4),
                }
        results.append(entry)
    return results


# ----------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CLUSTER_COLOURS = dict(
    zip(
        CLUSTERS,
        [
            "#d62728",
            "#ff7f0e",
            "#e6b800",
            "#2ca02c",
            "#17becf",
            "#1f77b4",
            "#9467bd",
            "#8c564b",
            "#e377c2",
            "#7f7f7f",
            "#bcbd22",
            "#393b79",
        ],
    )
)


def plot_accuracy(validation: dict[str, Any], path: Path) -> None:
    plt = _plt()
    layers = [int(k) for k in validation["per_layer"]]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for key, label in (("top1", "top-1"), ("top5", "top-5"), ("cluster", "right cluster")):
        ax.plot(layers, [validation["per_layer"][str(x)][key] for x in layers], marker="o", ms=3, label=label)
    ax.axhline(validation["chance_top1"], color="grey", ls=":", lw=1, label="chance (top-1)")
    ax.axhline(validation["chance_top5"], color="grey", ls="--", lw=1, label="chance (top-5)")
    ax.axvline(validation["best_layer"], color="black", lw=0.8, alpha=0.5)
    ax.set(
        xlabel="layer",
        ylabel="held-out accuracy",
        ylim=(0, 1),
        title=f"Which emotion is this held-out story? ({validation['emotions']}-way, {validation['folds']}-fold)",
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pca(basis: EmotionBasis, geo: dict[str, Any], path: Path) -> None:
    plt = _plt()
    scores = geo["scores"]
    fig, ax = plt.subplots(figsize=(9, 7.5))
    for i, name in enumerate(basis.emotions):
        cluster = CATALOG[name].cluster if name in CATALOG else "?"
        ax.scatter(scores[i, 0], scores[i, 1], color=CLUSTER_COLOURS.get(cluster, "black"), s=14)
        ax.annotate(
            name,
            (float(scores[i, 0]), float(scores[i, 1])),
            fontsize=6,
            alpha=0.8,
            xytext=(2, 2),
            textcoords="offset points",
        )
    for cluster, colour in CLUSTER_COLOURS.items():
        if any(CATALOG[n].cluster == cluster for n in basis.emotions if n in CATALOG):
            ax.scatter([], [], color=colour, label=cluster, s=14)
    ev = geo["explained_variance"]
    ax.set(
        xlabel=f"PC1 ({ev[0]:.0%} of variance; r with valence = {geo['pc1_valence_r']:.2f})",
        ylabel=f"PC2 ({ev[1]:.0%}; r with arousal = {geo['pc2_arousal_r']:.2f})",
        title=f"Emotion vectors at layer {geo['layer']}: first two principal components",
    )
    ax.legend(fontsize=7, loc="best", title="cluster (our labels)", title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_heatmap(basis: EmotionBasis, path: Path, layer: int | None = None) -> None:
    plt = _plt()
    order = sorted(
        range(len(basis)),
        key=lambda i: (
            CLUSTERS.index(CATALOG[basis.emotions[i]].cluster) if basis.emotions[i] in CATALOG else 99,
            -(CATALOG[basis.emotions[i]].valence if basis.emotions[i] in CATALOG else 0),
        ),
    )
    vecs = basis.vectors(layer)[order]
    cos = (vecs @ vecs.T).numpy()
    size = max(6.0, len(order) * 0.09)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    names = [basis.emotions[i] for i in order]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5 if len(names) > 60 else 8)
    ax.set_yticks(range(len(names)), names, fontsize=5 if len(names) > 60 else 8)
    # cluster boundaries
    clusters = [CATALOG[n].cluster if n in CATALOG else "?" for n in names]
    for k in range(1, len(clusters)):
        if clusters[k] != clusters[k - 1]:
            ax.axhline(k - 0.5, color="black", lw=0.6)
            ax.axvline(k - 0.5, color="black", lw=0.6)
    fig.colorbar(image, ax=ax, fraction=0.03, label="cosine similarity")
    ax.set_title(
        f"Cosine similarity of emotion vectors (layer {basis.default_layer if layer is None else layer}), "
        "ordered by cluster"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(sweeps: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    n = len(sweeps)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, sweep in zip(axes.flat, sweeps):
        x = range(len(sweep["values"]))
        for role, colour in (("rising", "#d62728"), ("falling", "#1f77b4")):
            if role in sweep:
                entry = sweep[role]
                ax.plot(
                    x,
                    entry["projection"],
                    marker="o",
                    color=colour,
                    label=f"{entry['emotion']} (rho={entry['spearman']:+.2f})",
                )
        ax.set_xticks(list(x), [f"{v:g}" for v in sweep["values"]], fontsize=7)
        ax.set_title(sweep["id"], fontsize=9)
        ax.set_xlabel("the number in the prompt", fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("projection (units of r_l)")
    fig.suptitle("Number sweeps: danger grows left to right; 'afraid' should rise and 'calm' fall", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def basis_report(basis: EmotionBasis, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Compute every validation figure of ``basis`` (sweeps need the model)."""
    geo = geometry(basis)
    report: dict[str, Any] = {
        "model": basis.metadata.get("model"),
        "fingerprint": basis.metadata.get("fingerprint"),
        "emotions": len(basis),
        "layers": basis.layers,
        "default_layer": basis.default_layer,
        "validation": basis.metadata.get("validation"),
        "geometry": {k: v for k, v in geo.items() if k != "scores"},
        "corpus": basis.metadata.get("corpus"),
        "timing": basis.metadata.get("timing"),
        "settings": basis.metadata.get("settings"),
    }
    if all(e in basis.emotions for e in ("afraid", "calm")):
        sweeps = number_sweeps(basis, model, tokenizer)
        report["sweeps"] = sweeps
        rising = [s["rising"]["spearman"] for s in sweeps if "rising" in s]
        falling = [s["falling"]["spearman"] for s in sweeps if "falling" in s]
        report["sweep_summary"] = {
            "mean_rising_spearman": round(sum(rising) / len(rising), 4),
            "mean_falling_spearman": round(sum(falling) / len(falling), 4),
            "rising_correct": sum(r > 0 for r in rising),
            "falling_correct": sum(f < 0 for f in falling),
            "templates": len(sweeps),
        }
    return report


def write_basis_report(report: dict[str, Any], basis: EmotionBasis, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "report.json", report)
    validation = report.get("validation")
    if validation:
        plot_accuracy(validation, folder / "accuracy_by_layer.png")
    geo = geometry(basis)
    plot_pca(basis, geo, folder / "pca.png")
    plot_heatmap(basis, folder / "cosine_heatmap.png")
    if report.get("sweeps"):
        plot_sweeps(report["sweeps"], folder / "sweeps.png")
    write_text_atomic(folder / "report.md", render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    model = (report.get("model") or {}).get("model")
    lines = [f"# Emotion basis: {model}", ""]
    v = report.get("validation")
    g = report["geometry"]
    lines += ["| check | value | reference |", "|---|---|---|"]
    if v:
        b = v["best"]
        lines += [
            f"| held-out top-1 ({v['emotions']}-way) at layer {v['best_layer']} | {b['top1']:.3f} "
            f"| chance {v['chance_top1']:.3f} |",
            f"| held-out top-5 | {b['top5']:.3f} | chance {v['chance_top5']:.3f}; aim >= 0.40 |",
            f"| right cluster (top-1's cluster) | {b['cluster']:.3f} | |",
            f"| top-1 within the true cluster | {b['within_cluster']:.3f} | |",
        ]
    lines += [
        f"| PC1 vs valence, Pearson r | {g['pc1_valence_r']:.3f} | aim >= 0.7; paper 0.81 |",
        f"| PC2 vs arousal, Pearson r | {g['pc2_arousal_r']:.3f} | paper 0.66 |",
    ]
    s = report.get("sweep_summary")
    if s:
        lines += [
            f"| sweeps: 'afraid' rises (mean Spearman) | {s['mean_rising_spearman']:+.3f} "
            f"| {s['rising_correct']}/{s['templates']} templates positive |",
            f"| sweeps: 'calm' falls (mean Spearman) | {s['mean_falling_spearman']:+.3f} "
            f"| {s['falling_correct']}/{s['templates']} templates negative |",
        ]
    t = report.get("timing") or {}
    if t:
        lines.append(
            f"| extraction time (neutral + stories) | {t.get('neutral_s', 0) + t.get('stories_s', 0):.0f} s "
            f"| {t.get('tokens')} tokens, {t.get('padding_fraction', 0):.1%} padding |"
        )
    lines += [
        "",
        "Ratings for valence and arousal are ours (see emotune/catalog.py); a model's PCs need not follow them.",
        "",
    ]
    if report.get("sweeps"):
        lines += ["## Number sweeps", "", "| template | afraid rho | calm rho |", "|---|---|---|"]
        for sw in report["sweeps"]:
            lines.append(
                f"| {sw['id']} | {sw.get('rising', {}).get('spearman', float('nan')):+.2f} "
                f"| {sw.get('falling', {}).get('spearman', float('nan')):+.2f} |"
            )
        lines += ["", "![sweeps](sweeps.png)", ""]
    if v:
        lines += [
            "## Held-out accuracy by layer",
            "",
            "![accuracy](accuracy_by_layer.png)",
            "",
            "| layer | top-1 | top-5 | cluster |",
            "|---|---|---|---|",
        ]
        for layer, row in v["per_layer"].items():
            lines.append(f"| {layer} | {row['top1']:.3f} | {row['top5']:.3f} | {row['cluster']:.3f} |")
        lines.append("")
    lines += ["## Geometry", "", "![pca](pca.png)", "", "![heatmap](cosine_heatmap.png)", ""]
    return "\n".join(lines)


def report_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    v, g, s = report.get("validation"), report["geometry"], report.get("sweep_summary")
    parts = []
    if v:
        parts.append(
            f"layer {v['best_layer']}: held-out top-1 {v['best']['top1']:.3f}, top-5 {v['best']['top5']:.3f} "
            f"({v['emotions']}-way; chance {v['chance_top1']:.3f} / {v['chance_top5']:.3f})"
        )
    parts.append(f"PC1~valence r={g['pc1_valence_r']:.2f}, PC2~arousal r={g['pc2_arousal_r']:.2f}")
    if s:
        parts.append(
            f"sweeps: afraid rho {s['mean_rising_spearman']:+.2f} ({s['rising_correct']}/{s['templates']} up), "
            f"calm rho {s['mean_falling_spearman']:+.2f} ({s['falling_correct']}/{s['templates']} down)"
        )
    return "\n".join(parts)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
