"""The adapter folder: write it, read it back, and describe it in a model card.

    adapter/  adapter_config.json, adapter_model.safetensors   the PEFT adapter
              tokenizer files                                   the base model's tokenizer
              basis/                                            the emotion basis it was trained with
              recipe.yaml                                       the resolved recipe, without secrets
              emotune_run.json                                  base model name, hub id, revision, terms, seed
              README.md                                         the model card

For an embedded base model, ``adapter_config.json`` names the model's hub id, not the local cache path the
weights were loaded from, so the adapter loads anywhere (and ``load_model`` maps the id back to the embedded
copy when the hub is offline).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from emotune.errors import DataError
from emotune.io import atomic_dir, write_json_atomic, write_text_atomic

logger = logging.getLogger("emotune")

MARKER = "adapter_config.json"
RUN_FILE = "emotune_run.json"
RECIPE_FILE = "recipe.yaml"
CARD_FILE = "README.md"
BASIS_DIR = "basis"
TAGS = ["emotune", "lora", "peft", "emotion-vectors"]


# ----------------------------------------------------------------------------- write / read


def write_adapter(
    target: str | Path,
    model: Any,
    tokenizer: Any,
    basis: Any,
    recipe: str,
    run: dict[str, Any],
    report: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter folder ``target`` in one atomic step (the old one stays if anything fails)."""
    target = Path(target)
    with atomic_dir(target, marker=MARKER) as tmp:
        model.save_pretrained(tmp)
        hub_id = (run.get("source") or {}).get("hub_id")
        if (run.get("source") or {}).get("embedded") and hub_id:
            # PEFT records the local path it loaded the base from, a cache folder nobody else has
            config = json.loads((tmp / MARKER).read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = hub_id
            write_json_atomic(tmp / MARKER, config)
        tokenizer.save_pretrained(tmp)
        basis.save(tmp / BASIS_DIR)
        write_text_atomic(tmp / RECIPE_FILE, recipe)
        write_json_atomic(tmp / RUN_FILE, run)
        write_text_atomic(tmp / CARD_FILE, model_card(run, yaml.safe_load(recipe) or {}, basis, report))
    return target


@dataclass
class AdapterFolder:
    path: Path
    config: dict[str, Any]  # adapter_config.json
    run: dict[str, Any]  # emotune_run.json ({} for adapters written by other tools)
    recipe: dict[str, Any]  # recipe.yaml ({} when absent)

    @property
    def base_model(self) -> str | None:
        return (self.run.get("source") or {}).get("hub_id") or self.config.get("base_model_name_or_path")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable JSON ({type(exc).__name__}). Re-save the adapter folder.") from None


def read_adapter(folder: str | Path) -> AdapterFolder:
    """Read and check an adapter folder: safetensors weights, a readable config, run info and recipe."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise DataError(f"{folder}: not an adapter folder (no {MARKER}). Point at <output_dir>/adapter.")
    if not (folder / "adapter_model.safetensors").is_file():
        raise DataError(
            f"{folder}: no adapter_model.safetensors (emotune never reads pickled .bin weights). "
            "Re-save the adapter with save_pretrained(..., safe_serialization=True)."
        )
    config = _read_json(folder / MARKER)
    run = _read_json(folder / RUN_FILE) if (folder / RUN_FILE).is_file() else {}
    recipe: Any = {}
    if (folder / RECIPE_FILE).is_file():
        try:
            recipe = yaml.safe_load((folder / RECIPE_FILE).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            raise DataError(f"{folder / RECIPE_FILE}: malformed YAML. Fix it, or remove recipe.yaml.") from None
    if not all(isinstance(x, dict) for x in (config, run, recipe)):
        raise DataError(f"{folder}: {MARKER}, {RUN_FILE} and {RECIPE_FILE} must each hold a mapping. Re-save it.")
    return AdapterFolder(folder, config, run, recipe)


def read_report(folder: str | Path | None) -> dict[str, Any] | None:
    """An eval report folder's ``report.json`` (or the file itself), or None when there is none."""
    if folder is None:
        return None
    path = Path(folder)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        return None
    report = _read_json(path)
    return report if isinstance(report, dict) else None


# ----------------------------------------------------------------------------- the model card


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A LoRA adapter for [`{{ base_model }}`]({{ base_link }}), trained with
[emotune](https://pypi.org/project/emotune/): supervised fine-tuning plus an auxiliary loss on the projections
of the model's activations onto emotion vectors. The emotion basis it was trained with ships in `basis/`.

{{ license_line }}

## Quick start

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from emotune import EmotionBasis

tokenizer = AutoTokenizer.from_pretrained("{{ base_model }}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{{ base_model }}"), "{{ repo_id }}")
basis = EmotionBasis.from_pretrained("{{ repo_id }}", subfolder="basis")
readout = basis.measure(model, tokenizer, ["The tests failed again, and the deadline is in an hour."])
print(readout.top(0))  # the five highest-reading emotions, centred, in units of the layer's residual norm
```

## Training

- base model: `{{ base_model }}` (emotune name `{{ model_name }}`, revision `{{ revision }}`)
{% if embedded %}- trained on emotune's embedded copy of the base (dequantised from a GGUF file); the hub's weights may
  read slightly differently. `emotune.load_model("{{ model_name }}")` loads the same copy.
{% endif %}- emotion layers: {{ layers }}
- drift weight: {{ drift_weight }}
- seed: {{ seed }}
{% if wandb_url %}- Weights & Biases run: {{ wandb_url }}
{% endif %}
| emotion | form | weight | tags | margin/target |
|---|---|---|---|---|
{% for t in terms %}| {{ t.emotion }} | {{ t.form }} | {{ t.weight }} | {{ t.tags }} | {{ t.value }} |
{% endfor %}
## Evaluation

{% if shifts %}Shift of each targeted emotion's projection, adapted minus base, on the held-out contexts (95% CI):

| emotion | layer | contexts | base | adapted | shift | 95% CI |
|---|---|---|---|---|---|---|
{% for r in shifts -%}
| {{ r.emotion }} | {{ r.layer }} | {{ r.set }} | {{ r.base }} | {{ r.adapted }} | {{ r.shift }} | {{ r.ci }} |
{% endfor %}{% else %}Not measured yet: run `emotune eval --adapter <this adapter>`, then `emotune export` to
publish the report with it.
{% endif %}{% if headline %}
| measure | base | adapted |
|---|---|---|
{% for r in headline %}| {{ r.name }} | {{ r.base }} | {{ r.adapted }} |
{% endfor %}{% endif %}
## Framework versions

{% for name, version in versions %}- {{ name }} {{ version }}
{% endfor %}"""


def _get(obj: Any, *keys: Any) -> Any:
    """``obj[k1][k2]...``, or None where any step is missing: the report's schema changes between versions."""
    for key in keys:
        if isinstance(obj, dict):
            obj = obj.get(key, obj.get(str(key)))
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:+.{digits}f}" if digits == 3 else f"{number:.{digits}f}"


def report_shifts(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The targeted emotions' shifts at the trained layers (all layers when none are named), per context set."""
    sets = _get(report, "activations", "sets")
    if not isinstance(sets, dict):
        return []
    trained = {str(x) for x in _get(report, "trained_layers") or []}
    rows = []
    for name, data in sets.items():
        layers = _get(data, "layers")
        for layer, per_layer in layers.items() if isinstance(layers, dict) else []:
            if trained and str(layer) not in trained:
                continue
            for row in _get(per_layer, "targeted") or []:
                if not isinstance(row, dict) or _number(row.get("shift")) is None:
                    continue
                lo, hi = _number(row.get("lo")), _number(row.get("hi"))
                rows.append(
                    {
                        "emotion": row.get("emotion", "?"),
                        "layer": layer,
                        "set": name,
                        "base": _fmt(row.get("base")),
                        "adapted": _fmt(row.get("adapted")),
                        "shift": _fmt(row.get("shift")),
                        "ci": f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "n/a",
                        "value": float(row["shift"]),
                    }
                )
    return rows


HEADLINE = (  # (name, metric type, path with {side} for base/adapted, digits)
    ("unethical choice rate, high pressure", "unethical_rate_high", ("behaviour", "{side}", "high", "rate"), 3),
    ("pressure gap (high - none)", "pressure_gap", ("behaviour", "{side}", "pressure_gap"), 3),
    ("perplexity, held-out neutral text", "perplexity", ("capability", "{side}", "perplexity", "perplexity"), 2),
    ("multiple-choice accuracy", "mcq_accuracy", ("capability", "{side}", "mcq", "rate"), 3),
)


def report_headline(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Behaviour and capability numbers, base against adapted, for whichever the report holds."""
    rows = []
    for name, metric, path, digits in HEADLINE:
        values = {side: _number(_get(report, *[p.format(side=side) for p in path])) for side in ("base", "adapted")}
        if values["base"] is None and values["adapted"] is None:
            continue
        shown = {side: "n/a" if v is None else f"{v:.{digits}f}" for side, v in values.items()}
        rows.append({"name": name, "metric": metric, **shown, "values": values})
    return rows


def _eval_results(report: dict[str, Any] | None) -> list[Any]:
    from huggingface_hub import EvalResult

    results = [
        EvalResult(
            task_type="text-generation",
            task_name="emotion projection shift",
            dataset_type=f"emotune-contexts-{row['set']}",  # the hub groups results by task and dataset type
            dataset_name=f"emotune held-out contexts ({row['set']})",
            metric_type=f"shift_{row['emotion']}_L{row['layer']}",
            metric_name=f"{row['emotion']} shift at layer {row['layer']} ({row['set']})",
            metric_value=round(row["value"], 4),
        )
        for row in report_shifts(report)
    ]
    for row in report_headline(report):
        if row["values"]["adapted"] is not None:
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=row["name"],
                    dataset_type="emotune-eval",
                    dataset_name="emotune evaluation sets",
                    metric_type=row["metric"],
                    metric_name=row["name"],
                    metric_value=round(row["values"]["adapted"], 4),
                )
            )
    return results


def base_license(model_name: str | None, hub_id: str | None) -> str | None:
    """The base model's license: from our embedded table, else from its card (a local folder's, or the copy in
    the hub cache); None when unknown. Never guessed."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from emotune.models import EMBEDDED, embedded_name

    for name in (model_name, hub_id):
        spec = EMBEDDED.get(name or "") or EMBEDDED.get(embedded_name(name or "") or "")
        if spec is not None:
            return spec.license
    card: Path | None = None
    if model_name and (Path(model_name) / "README.md").is_file():
        card = Path(model_name) / "README.md"
    elif hub_id:
        try:
            cached = try_to_load_from_cache(hub_id, "README.md")
        except Exception:  # not a valid hub id: nothing cached
            cached = None
        card = Path(cached) if isinstance(cached, str) else None
    if card is None:
        return None
    try:
        license_ = ModelCard.load(card).data.license
    except Exception as exc:  # a card without metadata, or broken YAML: the license is unknown, say so in the log
        logger.warning("%s: could not read the base model's card metadata (%s); license left unset.", card, exc)
        return None
    return license_ if isinstance(license_, str) and license_ else None


def _versions() -> list[tuple[str, str]]:
    out = []
    for name in ("emotune", "torch", "transformers", "peft", "trl", "huggingface_hub"):
        try:
            out.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def _wandb_url() -> str | None:
    wandb = sys.modules.get("wandb")  # never import it here: only a run already in progress has a link
    run = getattr(wandb, "run", None) if wandb is not None else None
    url = getattr(run, "url", None) if run is not None else None
    return url if isinstance(url, str) and url.startswith("http") else None


def model_card(
    run: dict[str, Any],
    recipe: dict[str, Any],
    basis: Any,
    report: dict[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    wandb_url: str | None = None,
) -> str:
    """The model card (README.md) of an adapter, from huggingface_hub's card template with our own text."""
    from huggingface_hub import ModelCard, ModelCardData

    source = run.get("source") or {}
    model_name = run.get("model") or recipe.get("model_name_or_path")
    base = source.get("hub_id") or model_name or "unknown"
    license_ = base_license(model_name, source.get("hub_id"))
    title = Path(str(recipe.get("output_dir") or "emotune-adapter")).name
    results = _eval_results(report)
    data = ModelCardData(
        base_model=base if source.get("hub_id") else None,  # only a hub id is a valid base_model
        library_name="peft",
        pipeline_tag="text-generation",
        tags=TAGS,
        license=license_,
        model_name=repo_id or title if results else None,
        eval_results=results or None,
    )
    terms = [
        {
            "emotion": t.get("emotion"),
            "form": t.get("form"),
            "weight": t.get("weight"),
            "tags": ", ".join(t.get("tags") or []),
            "value": t.get("margin") if t.get("form") == "penalize" else t.get("target"),
        }
        for t in run.get("terms") or recipe.get("emotion_terms") or []
        if isinstance(t, dict)
    ]
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=f"{title}: an emotune LoRA adapter for {base}",
        base_model=base,
        base_link=f"https://huggingface.co/{base}" if source.get("hub_id") else base,
        license_line=(
            f"License: `{license_}`, inherited from the base model."
            if license_
            else "License: unknown (the base model's card was not available here). Set it before publishing."
        ),
        repo_id=repo_id or "<this repo or folder>",
        model_name=model_name,
        embedded=bool(source.get("embedded")),
        revision=run.get("revision") or recipe.get("model_revision") or "main",
        layers=recipe.get("emotion_layers") or getattr(basis, "default_layer", "the basis's default"),
        drift_weight=recipe.get("drift_weight", 0.0),
        seed=run.get("seed", recipe.get("seed")),
        wandb_url=wandb_url or _wandb_url(),
        terms=terms,
        shifts=report_shifts(report),
        headline=report_headline(report),
        versions=_versions(),
    )
    return str(card)
