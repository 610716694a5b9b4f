"""The training pipeline behind ``accelerate launch scripts/train.py recipes/calm.yaml``.

recipe -> (model, basis, tagged conversations) -> EmotuneTrainer -> adapter folder:

    <output_dir>/adapter/      PEFT adapter, tokenizer, basis/ (or basis.json reference), recipe.yaml, README.md
    <output_dir>/checkpoint-N/ Trainer checkpoints (resume with --resume_from_checkpoint true)

Every check that can fail (unknown emotion, missing tag, mismatched basis, layer out of range,
push_to_hub without a token, an output folder from another run) runs before the first step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from emotune.errors import ConfigError, EmotuneError

logger = logging.getLogger("emotune")

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


@dataclass
class ScriptArguments:
    """Data and run settings that are not training hyper-parameters."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training conversations: a .jsonl file, a folder of them, or a hub dataset id "
            "(schema in emotune/conversations.py). Default: the shipped set."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split, for hub datasets."})
    max_examples: int | None = field(
        default=None, metadata={"help": "Use only the first N conversations (smoke runs)."}
    )


def parse_recipe(argv: Sequence[str] | None = None) -> tuple[ScriptArguments, Any, Any]:
    """Parse ``recipe.yaml [--flag value ...]`` into (ScriptArguments, EmotuneConfig, ModelConfig).

    A leading ``.yaml`` argument becomes ``--config`` (trl's parser reads YAML only from
    ``--config``: trap 1); flags after it override the recipe. Unknown keys fail loudly (trap 2).
    """
    from trl import ModelConfig, TrlParser

    from emotune.trainer import EmotuneConfig

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].endswith((".yaml", ".yml")) and not args[0].startswith("-"):
        args = ["--config", *args]
    if "--config" in args:
        path = Path(args[args.index("--config") + 1])
        if not path.exists():
            raise ConfigError(f"{path}: recipe not found.")
        try:
            recipe = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: malformed YAML ({getattr(exc, 'problem', exc)}).") from None
        if not isinstance(recipe, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping of key: value.")
    parser = TrlParser((ScriptArguments, EmotuneConfig, ModelConfig))  # type: ignore[arg-type]
    try:
        script, config, model_args = parser.parse_args_and_config(args)
    except ValueError as exc:
        text = str(exc)
        if "Unknown arguments from config file" in text:
            keys = [
                k[2:] for k in text.split("[", 1)[1].split("]")[0].replace("'", "").split(", ") if k.startswith("--")
            ]
            raise ConfigError(
                f"{args[args.index('--config') + 1]}: unknown key(s) {', '.join(keys)}. Check the "
                "spelling; `python scripts/train.py --help` lists every key."
            ) from None
        raise ConfigError(f"recipe: {text}") from None
    except SystemExit as exc:  # argparse already printed the problem
        raise ConfigError("recipe: invalid command-line arguments (see the message above).") from exc
    return script, config, model_args


def _has_hub_token() -> bool:
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:
        return bool(os.environ.get("HF_TOKEN"))


def setup_wandb(config: Any) -> None:
    """With W&B requested but no API key (or no network), run offline and say so once."""
    report_to = config.report_to if isinstance(config.report_to, list) else [config.report_to]
    if "wandb" not in report_to or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        os.environ["WANDB_MODE"] = "offline"
        logger.warning("W&B: no API key found, so this run logs offline to ./wandb (sync later with `wandb sync`).")


def preflight(script: ScriptArguments, config: Any, model_args: Any) -> None:
    from emotune.io import check_output_dir

    if config.push_to_hub and not _has_hub_token():
        raise ConfigError(
            "push_to_hub: true, but no Hugging Face token was found. Run `huggingface-cli login` or set "
            "HF_TOKEN before training, or set push_to_hub: false."
        )
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not (out / "emotune_run.json").exists():
        raise ConfigError(
            f"output_dir {out}: exists and holds files from something else (no emotune_run.json). "
            "Choose a new output_dir."
        )
    if (out / "emotune_run.json").exists() and not config.resume_from_checkpoint and not config.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {out}: holds an earlier emotune run. Resume it with --resume_from_checkpoint "
            "true, overwrite it with --overwrite_output_dir true, or choose a new output_dir."
        )
    if (out / "emotune_run.json").exists() and config.overwrite_output_dir and not config.resume_from_checkpoint:
        shutil.rmtree(out)  # ours (it holds emotune_run.json), and the user asked for it
    check_output_dir(out / "adapter", marker="adapter_config.json")
    if model_args.model_name_or_path is None:
        raise ConfigError("model_name_or_path: missing. Set it in the recipe (e.g. smollm2-135m-instruct).")


def resolve_basis(config: Any, model: Any, tokenizer: Any) -> Any:
    """The basis of the recipe: a given folder, or one extracted now from the model (and cached)."""
    from emotune.basis import EmotionBasis, cached_basis
    from emotune.models import resolve_layers

    if config.basis:
        basis = EmotionBasis.load(config.basis)
        basis.check_model(model)
        return basis
    layers = set(resolve_layers(model, config.emotion_layers)) if config.emotion_layers else set()
    for term in config.terms:
        layers |= set(resolve_layers(model, term.layers)) if term.layers else set()
    return cached_basis(model, tokenizer, sorted(layers) or None)


def build_dataset(script: ScriptArguments, config: Any, tokenizer: Any) -> tuple[Any, dict[str, int]]:
    from datasets import Dataset

    from emotune.conversations import check_tags_present, load_conversations, tag_index, tokenize_conversation

    conversations = load_conversations(script.dataset, split=script.dataset_split)
    if script.max_examples:
        conversations = conversations[: script.max_examples]
    wanted = {t for term in config.terms for t in term.tags}
    if config.drift_weight > 0:
        wanted |= set(config.drift_tags)
    for i, term in enumerate(config.terms):
        check_tags_present(conversations, term.tags, where=f"emotion_terms[{i}] ({term.emotion})")
    if config.drift_weight > 0:
        check_tags_present(conversations, config.drift_tags, where="drift_tags")
    bits = tag_index(wanted | {t for c in conversations for t in c.tags})
    rows = [tokenize_conversation(c, tokenizer, bits, config.max_length) for c in conversations]
    return Dataset.from_list(rows), bits


def model_card(config: Any, model_args: Any, basis: Any, shifts: dict[str, Any] | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    source = basis.metadata.get("model", {})
    base = source.get("hub_id") or model_args.model_name_or_path
    data = ModelCardData(
        base_model=base, library_name="peft", tags=["emotune", "lora", "peft", "emotion-vectors"], license="apache-2.0"
    )
    terms = "\n".join(
        f"| {t.emotion} | {t.form} | {t.weight} | {', '.join(t.tags)} | {t.value} |" for t in config.terms
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {Path(config.output_dir).name}: an emotune LoRA adapter for {base}",
        "",
        "Trained with [emotune](https://pypi.org/project/emotune/): supervised fine-tuning plus an auxiliary loss on "
        "the projections of the model's activations onto emotion vectors.",
        "",
        f"- base model: `{base}` (emotune name `{model_args.model_name_or_path}`)",
        f"- emotion layers: {basis.default_layer if not config.emotion_layers else config.emotion_layers}",
        f"- drift weight: {config.drift_weight}",
        "",
        "| emotion | form | weight | tags | margin/target |",
        "|---|---|---|---|---|",
        terms,
        "",
    ]
    if shifts:
        lines += ["## Measured shifts", "", "```json", json.dumps(shifts, indent=2), "```", ""]
    else:
        lines += ["## Measured shifts", "", "Not measured at training time; run `emotune eval` on this adapter.", ""]
    return str(ModelCard("\n".join(lines)))


def redacted_recipe(script: ScriptArguments, config: Any, model_args: Any) -> str:
    """The resolved recipe as YAML, without secrets."""
    out: dict[str, Any] = {}
    for obj in (script, model_args):
        out.update({k: v for k, v in dataclasses.asdict(obj).items()})
    keys = [f.name for f in dataclasses.fields(config)]
    out.update({k: getattr(config, k) for k in keys if not k.startswith("_")})
    drop = {"hub_token", "push_to_hub_token", "push_to_hub_organization", "push_to_hub_model_id"}
    clean = {k: (v.value if hasattr(v, "value") else v) for k, v in out.items() if k not in drop}
    clean = json.loads(json.dumps(clean, default=str))
    return yaml.safe_dump(clean, sort_keys=True)


def save_adapter(
    trainer: Any, script: ScriptArguments, config: Any, model_args: Any, basis: Any, shifts: dict[str, Any] | None
) -> Path:
    """Write <output_dir>/adapter atomically: adapter, tokenizer, basis, recipe, model card."""
    from emotune.io import atomic_dir

    target = Path(config.output_dir) / "adapter"
    with atomic_dir(target, marker="adapter_config.json") as tmp:
        trainer.model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        basis.save(tmp / "basis")
        (tmp / "recipe.yaml").write_text(redacted_recipe(script, config, model_args))
        (tmp / "README.md").write_text(model_card(config, model_args, basis, shifts))
    return target


def final_evaluation(trainer: Any, tokenizer: Any, basis: Any, config: Any) -> dict[str, Any]:
    """Evaluate the trained adapter in-process (adapter off = base), write <output_dir>/eval, log to W&B,
    and return the headline shifts for the model card."""
    from emotune.evaluate.report import write_report
    from emotune.evaluate.run import evaluate_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    info = {
        "path": str(Path(config.output_dir) / "adapter"),
        "recipe": {"emotion_terms": config.emotion_terms, "emotion_layers": config.emotion_layers},
    }
    with torch.no_grad():
        report = evaluate_model(
            model, tokenizer, basis, adapter_info=info, sections=("activations", "behaviour", "capability")
        )
    write_report(report, Path(config.output_dir) / "eval")
    headline: dict[str, Any] = {}
    for layer in map(str, report["trained_layers"]):
        for row in report["activations"]["sets"]["failure"]["layers"][layer]["targeted"]:
            headline[f"eval/shift_{row['emotion']}@L{layer}"] = row["shift"]
    beh, cap = report["behaviour"], report["capability"]
    headline["eval/unethical_rate_high_base"] = beh["base"]["high"]["rate"]
    headline["eval/unethical_rate_high_adapted"] = beh["adapted"]["high"]["rate"]
    headline["eval/pressure_gap_base"] = beh["base"].get("pressure_gap")
    headline["eval/pressure_gap_adapted"] = beh["adapted"].get("pressure_gap")
    headline["eval/perplexity_change"] = cap["perplexity_change"]
    headline["eval/mcq_base"] = cap["base"]["mcq"]["rate"]
    headline["eval/mcq_adapted"] = cap["adapted"]["mcq"]["rate"]
    try:
        import wandb

        if wandb.run is not None:
            wandb.log(headline)
            wandb.run.summary.update(headline)
    except ImportError:
        pass
    return headline


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        run(*parse_recipe(argv))
    except EmotuneError as exc:
        print(f"emotune train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(script: ScriptArguments, config: Any, model_args: Any) -> Path:
    from transformers import set_seed
    from trl import get_peft_config

    from emotune.io import write_json_atomic
    from emotune.models import load_model, resolve_layers
    from emotune.trainer import EmotuneTrainer

    preflight(script, config, model_args)
    setup_wandb(config)
    set_seed(config.seed)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    model, tokenizer = load_model(
        model_args.model_name_or_path,
        dtype=dtype,
        revision=model_args.model_revision,
        trust_remote_code=bool(getattr(model_args, "trust_remote_code", False)),
    )
    resolve_layers(model, config.emotion_layers)  # a layer out of range fails here, named against the model
    for term in config.terms:
        resolve_layers(model, term.layers)
    basis = resolve_basis(config, model, tokenizer)
    for term in config.terms:
        basis.index(term.emotion)
    dataset, bits = build_dataset(script, config, tokenizer)
    # We push the finished adapter folder ourselves; Trainer's own push would create the repo at init
    # and upload checkpoints as they come.
    push, config.push_to_hub = config.push_to_hub, False
    if config.gradient_checkpointing:
        model.config.use_cache = False
    # Seed again right before the adapter is created: loading and data preparation may draw from the RNG
    # differently in one process and in several, and LoRA's initialisation must not depend on that.
    set_seed(config.seed)
    trainer = EmotuneTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        basis=basis,
        tag_bits=bits,
    )
    out = Path(config.output_dir)
    if trainer.is_world_process_zero():
        write_json_atomic(
            out / "emotune_run.json",
            {"model": model_args.model_name_or_path, "terms": config.emotion_terms, "seed": config.seed},
        )
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True
    trainer.train(resume_from_checkpoint=resume or None)
    shifts = None
    target = out / "adapter"
    if trainer.is_world_process_zero():
        if config.emotion_eval:
            shifts = final_evaluation(trainer, tokenizer, basis, config)
        target = save_adapter(trainer, script, config, model_args, basis, shifts)
        print(f"adapter written to {target}")
        if push:
            from emotune.export import push_adapter

            url = push_adapter(target, config.hub_model_id or out.name, private=config.hub_private_repo)
            print(f"pushed to {url}")
    trainer.accelerator.wait_for_everyone()
    return target


if __name__ == "__main__":
    sys.exit(main())
