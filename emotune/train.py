"""The training pipeline behind ``accelerate launch scripts/train.py recipes/calm.yaml``.

recipe -> (model, basis, tagged conversations) -> EmotuneTrainer -> adapter folder:

    <output_dir>/adapter/      PEFT adapter, tokenizer, basis/, recipe.yaml, emotune_run.json (base model, hub id,
                               revision), README.md
    <output_dir>/checkpoint-N/ Trainer checkpoints (resume with --resume_from_checkpoint true: the newest
                               complete one, in the same W&B run, whose id is kept in <output_dir>/wandb_run_id)

Every check that can fail (unknown emotion, missing tag, mismatched basis, layer out of range,
push_to_hub without a token, an output folder from another run) runs before the first step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import string
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

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
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the conversations (seeded, per combination of tags) as an eval "
            "split with the same tag masks; with eval_strategy: steps, the emotion terms and projections are "
            "measured on it and logged as eval/emotion/*."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out conversations (.jsonl, folder or hub id) instead of eval_fraction."},
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
    recipe_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    if recipe_path is not None:
        path = Path(recipe_path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe not found. Check the path, or pass the .yaml recipe to train from.")
        try:
            recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start}). Re-save the recipe as UTF-8.") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(
                f"{path}{line}: malformed YAML ({problem}). Fix the YAML there: one `key: value` a line."
            ) from None
        if not isinstance(recipe, dict):
            raise ConfigError(
                f"{path}: a recipe must be a YAML mapping of key: value, not a {type(recipe).__name__}. "
                "Write one `key: value` a line (see recipes/calm.yaml)."
            )
    parser = TrlParser((ScriptArguments, EmotuneConfig, ModelConfig))  # type: ignore[arg-type]

    def parse_error(message: str) -> NoReturn:
        # argparse would print its usage and exit: say which key, where it was set, and what to do instead
        flag = re.search(r"argument (--[\w-]+)(?:/--[\w-]+)*", message)
        aliases = set(flag.group(0).split(" ", 1)[1].split("/")) if flag else set()
        on_command_line = recipe_path is None or any(a.split("=")[0] in aliases for a in args)
        if flag is not None:  # name the key as the recipe spells it, or the flag as it was typed
            message = message.replace(flag.group(0), flag.group(1) if on_command_line else flag.group(1)[2:])
        raise ConfigError(
            f"{'command line' if on_command_line else recipe_path}: {message}. Fix the value; "
            "`python scripts/train.py --help` lists every key with its type."
        )

    parser.error = parse_error  # type: ignore[method-assign]
    try:
        script, config, model_args = parser.parse_args_and_config(args)
    except ValueError as exc:
        if isinstance(exc, ConfigError):  # from EmotuneConfig: it names the key; add the recipe that set it
            key = re.match(r"\w+", str(exc))
            if recipe_path is None or str(exc).startswith((f"{recipe_path}:", "command line:")):
                raise
            if not key or f"--{key[0]}" in args:
                raise
            raise ConfigError(f"{recipe_path}: {exc}") from None
        text = str(exc)
        if "Unknown arguments from config file" in text:
            keys = [
                k[2:] for k in text.split("[", 1)[1].split("]")[0].replace("'", "").split(", ") if k.startswith("--")
            ]
            raise ConfigError(
                f"{recipe_path}: unknown key(s) {', '.join(keys)}. Check the "
                "spelling; `python scripts/train.py --help` lists every key."
            ) from None
        if "not used by the HfArgumentParser" in text:
            flags = [f for f in re.findall(r"'([^']*)'", text) if f.startswith("-")] or [text.split(": ", 1)[-1]]
            raise ConfigError(
                f"command line: unknown flag(s) {', '.join(flags)}. Check the spelling; "
                "`python scripts/train.py --help` lists every key."
            ) from None
        raise ConfigError(f"recipe: {' '.join(text.split())}") from None
    except SystemExit as exc:  # argparse already printed the problem (or --help its text)
        if exc.code in (0, None):
            raise
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
    from emotune.tracking import offline_without_key

    if _reports_to_wandb(config):
        offline_without_key()


def _reports_to_wandb(config: Any) -> bool:
    report_to = config.report_to if isinstance(config.report_to, list) else [config.report_to]
    return "wandb" in report_to


WANDB_ID_FILE = "wandb_run_id"
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@contextmanager
def wandb_run_identity(config: Any, is_main: bool) -> Iterator[str | None]:
    """Give the W&B run of ``output_dir`` a stable id, so that a resumed run continues it instead of forking one.

    The id is kept in ``<output_dir>/wandb_run_id`` (written on the first start); a ``WANDB_RUN_ID`` set by the
    user wins and is kept for later resumes. ``WANDB_RUN_ID`` and ``WANDB_RESUME=allow`` are set only inside the
    block: WandbCallback calls ``wandb.init``, which reads them, when training begins.
    """
    report_to = config.report_to if isinstance(config.report_to, list) else [config.report_to]
    if not is_main or "wandb" not in report_to:
        yield None
        return
    from emotune.io import write_text_atomic

    path = Path(config.output_dir) / WANDB_ID_FILE
    stored = path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else ""
    if stored and not _WANDB_ID.fullmatch(stored):
        logger.warning("%s: not a W&B run id (%r); this run gets a new one.", path, stored[:40])
        stored = ""
    user = os.environ.get("WANDB_RUN_ID")
    if user:
        run_id = user
    elif stored:
        run_id = stored
    else:  # like W&B's own ids: 8 characters of [a-z0-9]
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if run_id != stored:
        write_text_atomic(path, run_id + "\n")
    saved = {key: os.environ.get(key) for key in ("WANDB_RUN_ID", "WANDB_RESUME")}
    os.environ["WANDB_RUN_ID"] = run_id
    os.environ.setdefault("WANDB_RESUME", "allow")
    try:
        yield run_id
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* ``checkpoint-N`` of ``output_dir``, or None.

    Trainer writes ``trainer_state.json`` last, so a checkpoint without a readable one was cut short by a kill;
    Trainer's own lookup would pick it and fail (or resume from half a checkpoint).
    """
    folder = Path(output_dir)
    found = sorted(
        (
            (int(m[1]), p)
            for p in (folder.iterdir() if folder.is_dir() else [])
            if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
        ),
        reverse=True,
    )
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return path
        except (OSError, ValueError):
            logger.warning("%s: incomplete (the run was stopped while saving it); skipping it.", path)
    return None


def resolve_resume(config: Any) -> str | None:
    """``--resume_from_checkpoint``: true/last -> the newest complete checkpoint; a path stays as given."""
    resume = config.resume_from_checkpoint
    if not resume or str(resume).lower() in ("false", "none"):
        return None
    if str(resume).lower() not in ("true", "last"):
        return str(resume)
    found = last_checkpoint(config.output_dir)
    if found is None:
        raise ConfigError(
            f"resume_from_checkpoint: no complete checkpoint in {config.output_dir} to resume from. Start the run "
            "again with --overwrite_output_dir true (or without --resume_from_checkpoint in a new output_dir)."
        )
    logger.warning("Resuming from %s.", found)
    return str(found)


def preflight(script: ScriptArguments, config: Any, model_args: Any, apply: bool = True) -> None:
    """Every check that needs no model. ``apply=False`` (``emotune train``, in the launching parent) checks only:
    it leaves an earlier run that ``--overwrite_output_dir true`` replaces to the training process."""
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
    replace = (out / "emotune_run.json").exists() and config.overwrite_output_dir and not config.resume_from_checkpoint
    if replace and apply:
        shutil.rmtree(out)  # ours (it holds emotune_run.json), and the user asked for it
    if not replace:
        check_output_dir(out / "adapter", marker="adapter_config.json")
    if _reports_to_wandb(config):
        from emotune.tracking import check_wandb_dir

        check_wandb_dir()
    evaluates = str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no"
    held_out = script.eval_fraction > 0 or script.eval_dataset
    if not 0 <= script.eval_fraction < 1:
        raise ConfigError(f"eval_fraction: {script.eval_fraction} must be in [0, 1). Use e.g. 0.1, or 0 for none.")
    if script.eval_fraction > 0 and script.eval_dataset:
        raise ConfigError("eval_fraction and eval_dataset are both set. Keep one: a split of the data, or a file.")
    if held_out and not evaluates:
        raise ConfigError(
            "eval_fraction/eval_dataset: a held-out split is set, but eval_strategy is 'no', so it would never be "
            "evaluated. Set eval_strategy: steps (and eval_steps), or drop the held-out split."
        )
    if evaluates and not held_out:
        raise ConfigError(
            f"eval_strategy: {getattr(config.eval_strategy, 'value', config.eval_strategy)} needs held-out "
            "conversations. Set eval_fraction (e.g. 0.1) or eval_dataset, or set eval_strategy: no."
        )
    if model_args.model_name_or_path is None:
        raise ConfigError("model_name_or_path: missing. Set it in the recipe (e.g. smollm2-135m-instruct).")
    if model_args.dtype not in (None, "auto"):  # a recipe's value is not checked against the flag's choices
        from emotune.models import DTYPES, parse_dtype

        try:
            parse_dtype(model_args.dtype)
        except ConfigError:
            raise ConfigError(
                f"dtype: {model_args.dtype!r} is not a floating-point torch dtype. "
                f"Use one of {', '.join(DTYPES)}."
            ) from None


def resolve_basis(config: Any, model: Any, tokenizer: Any) -> Any:
    """The basis of the recipe: a given folder, or one extracted now from the model (and cached)."""
    from emotune.basis import EmotionBasis, cached_basis
    from emotune.models import resolve_layers

    if config.basis:
        try:
            basis = EmotionBasis.load(config.basis)
            basis.check_model(model)
        except EmotuneError as exc:  # name the recipe key (and the folder, where the message does not)
            where = "basis" if str(exc).startswith(str(config.basis)) else f"basis {config.basis}"
            raise type(exc)(f"{where}: {exc}") from None
        return basis
    layers = set(resolve_layers(model, config.emotion_layers)) if config.emotion_layers else set()
    for term in config.terms:
        layers |= set(resolve_layers(model, term.layers)) if term.layers else set()
    return cached_basis(model, tokenizer, sorted(layers) or None)


def basis_on_accelerator(config: Any, model: Any, tokenizer: Any) -> Any:
    """``resolve_basis`` once per machine, on the training device: the main process (and the first process of each
    further machine, whose disk may not share the cache) extracts and caches the basis while the others wait, then
    they load the cache. Extraction is a forward pass over the corpus, minutes on a CPU and seconds on a GPU, so
    the model goes to the accelerator first (Trainer would move it there next anyway)."""
    from accelerate import PartialState

    state = PartialState()
    if config.device.type != "cpu":
        model.to(config.device)
    with state.main_process_first(), state.local_main_process_first():
        return resolve_basis(config, model, tokenizer)


def _layer_keys(config: Any) -> list[tuple[str, list[int] | None]]:
    return [("emotion_layers", config.emotion_layers)] + [
        (f"emotion_terms[{i}].layers", term.layers) for i, term in enumerate(config.terms)
    ]


def check_model_fit(config: Any, model: Any) -> None:
    """The recipe against the loaded model, before any work: layers in range, max_length within the context."""
    from emotune.models import resolve_layers

    for key, layers in _layer_keys(config):
        try:
            resolve_layers(model, layers)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    context = getattr(model.config, "max_position_embeddings", None)
    if config.max_length and context and config.max_length > context:
        raise ConfigError(
            f"max_length: {config.max_length} tokens is longer than the model's context "
            f"(max_position_embeddings {context}). Set max_length to {context} or less."
        )


def check_basis_fit(config: Any, model: Any, basis: Any) -> None:
    """Every layer and emotion the terms use must be in the basis."""
    from emotune.models import resolve_layers

    where = f"the basis {config.basis}" if config.basis else "the cached basis"
    for key, layers in _layer_keys(config):
        missing = [x for x in resolve_layers(model, layers) if x not in basis.layers] if layers else []
        if missing:
            raise ConfigError(
                f"{key}: layer(s) {', '.join(map(str, missing))} not in {where} (it has layers "
                f"{', '.join(map(str, basis.layers))}). Re-extract the basis with --layers including them, "
                "or choose layers it has."
            )
    for i, term in enumerate(config.terms):
        if term.emotion and term.emotion not in basis.emotions:  # retain and kl name no emotion
            shown = ", ".join(basis.emotions[:12]) + (", ..." if len(basis.emotions) > 12 else "")
            raise ConfigError(
                f"emotion_terms[{i}].emotion: {term.emotion!r} is not in {where} ({len(basis.emotions)} emotions: "
                f"{shown}). Re-extract the basis with --emotions including it, or choose one it has."
            )


def held_out_split(conversations: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: ``fraction`` of each group of conversations that carry the same tags, drawn with
    ``seed``, so that the held-out split has every kind of context the terms' masks select (at least one of each
    group of two or more)."""
    import random

    groups: dict[tuple[str, ...], list[Any]] = {}
    for c in conversations:
        groups.setdefault(tuple(sorted(c.tags)), []).append(c)
    rng = random.Random(seed)
    held: set[int] = set()
    for members in groups.values():
        if len(members) > 1:
            held |= {id(c) for c in rng.sample(members, max(1, round(fraction * len(members))))}
    return [c for c in conversations if id(c) not in held], [c for c in conversations if id(c) in held]


def load_training_conversations(script: ScriptArguments, config: Any) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)`` conversations, with every tag the recipe's terms use checked present in training."""
    from emotune.conversations import check_tags_present, load_conversations

    conversations = load_conversations(script.dataset, split=script.dataset_split)
    if script.max_examples:
        conversations = conversations[: script.max_examples]
    held_out: list[Any] = []
    if script.eval_dataset:
        held_out = load_conversations(script.eval_dataset, split=script.dataset_split)
    elif script.eval_fraction > 0:
        conversations, held_out = held_out_split(conversations, script.eval_fraction, config.seed)
    data = f", dataset {script.dataset}" if script.dataset else ""
    for i, term in enumerate(config.terms):
        check_tags_present(conversations, term.tags, where=f"emotion_terms[{i}] ({term.emotion}){data}")
    if config.drift_weight > 0:
        check_tags_present(conversations, config.drift_tags, where=f"drift_tags{data}")
    return conversations, held_out


def build_dataset(script: ScriptArguments, config: Any, tokenizer: Any) -> tuple[Any, Any, dict[str, int]]:
    """``(train, eval or None, tag bits)``: tokenised conversations with their tag masks, both with one tag map."""
    from datasets import Dataset

    from emotune.conversations import tag_index, tokenize_conversation

    conversations, held_out = load_training_conversations(script, config)
    wanted = {t for term in config.terms for t in term.tags}
    if config.drift_weight > 0:
        wanted |= set(config.drift_tags)
    bits = tag_index(wanted | {t for c in [*conversations, *held_out] for t in c.tags})
    rows = [tokenize_conversation(c, tokenizer, bits) for c in conversations]
    cut = truncation_loss(rows, bits, config.terms, config.max_length)
    if cut["dropped_tokens"]:
        logger.warning(
            "max_length %d: truncates %d of %d conversations and drops %d of the %d tokens the emotion terms "
            "target (%.1f%%). max_length %d keeps them all.",
            config.max_length,
            cut["truncated_conversations"],
            len(rows),
            cut["dropped_tokens"],
            cut["targeted_tokens"],
            100 * cut["dropped_tokens"] / cut["targeted_tokens"],
            cut["needed_max_length"],
        )
    if config.max_length:
        rows = [{key: values[: config.max_length] for key, values in row.items()} for row in rows]
    held = [tokenize_conversation(c, tokenizer, bits, config.max_length) for c in held_out]
    return Dataset.from_list(rows), Dataset.from_list(held) if held else None, bits


def truncation_loss(
    rows: Sequence[dict[str, list[int]]], bits: dict[str, int], terms: Sequence[Any], max_length: int | None
) -> dict[str, int]:
    """What a length cut removes from the emotion terms' masks (DESIGN.md trap 13), on untruncated ``rows``:
    ``targeted_tokens`` (in any term's mask), ``dropped_tokens`` (of those, past ``max_length``),
    ``truncated_conversations``, and ``needed_max_length`` (the shortest cut that drops none)."""
    wanted = []
    for term in terms:
        tags = sum(1 << bits[t] for t in term.tags if t in bits)
        roles = sum(1 << bits[t] for t in term.mask_tags if t in bits)
        wanted.append((tags, roles))
    targeted = dropped = truncated = needed = 0
    for row in rows:
        hits = [k for k, b in enumerate(row["tag_bits"]) if any(b & tags and b & roles for tags, roles in wanted)]
        targeted += len(hits)
        needed = max(needed, hits[-1] + 1 if hits else 0)
        if max_length and len(row["input_ids"]) > max_length:
            truncated += 1
            dropped += sum(k >= max_length for k in hits)
    return {
        "targeted_tokens": targeted,
        "dropped_tokens": dropped,
        "truncated_conversations": truncated,
        "needed_max_length": needed,
    }


def lora_layers(config: Any, model: Any, default_layer: int) -> list[int]:
    """``lora_layers_up_to_target``: decoder layers 0..L, L the highest layer an emotion term reads. LoRA above
    L cannot change what the terms see, only the LM loss, so leaving those layers frozen keeps the adapter's
    change where the terms act."""
    from emotune.models import num_layers, resolve_layers

    layers = {i for _, ls in _layer_keys(config) if ls for i in resolve_layers(model, ls)}
    top = max(layers) if layers else resolve_layers(model, default_layer)[0]  # the basis's layer, as the terms use
    return list(range(min(top, num_layers(model) - 1) + 1))




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


def run_info(config: Any, model_args: Any, model: Any) -> dict[str, Any]:
    """What ``<output_dir>/emotune_run.json`` (and its copy in the adapter) records: the base model's name, hub id
    and revision, the terms and the seed."""
    from emotune.models import model_source

    return {
        "model": model_args.model_name_or_path,
        "revision": model_args.model_revision,
        "source": model_source(model),
        "terms": config.emotion_terms,
        "seed": config.seed,
        # which arm of an experiment this adapter is: none (the terms), random (random directions) or sft
        "control": config.control,
        "control_seed": config.control_seed if config.control_seed is not None else config.seed,
    }


def save_adapter(
    trainer: Any,
    script: ScriptArguments,
    config: Any,
    model_args: Any,
    basis: Any,
    report: dict[str, Any] | None = None,
) -> Path:
    """Write <output_dir>/adapter atomically (emotune.adapter): adapter, tokenizer, basis, recipe, run info and a
    model card, with the eval report's numbers when one is given."""
    from emotune.adapter import write_adapter

    return write_adapter(
        Path(config.output_dir) / "adapter",
        trainer.model,
        trainer.processing_class,
        basis,
        redacted_recipe(script, config, model_args),
        run_info(config, model_args, trainer.model),
        report,
    )


def final_evaluation(trainer: Any, tokenizer: Any, basis: Any, config: Any) -> dict[str, Any]:
    """Evaluate the trained adapter in-process (adapter off = base), write <output_dir>/eval, log to W&B,
    and return the headline numbers (logged to W&B; the model card reads the written report)."""
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
    folder = write_report(report, Path(config.output_dir) / "eval")
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
            from emotune.tracking import log_report

            wandb.log(headline)
            wandb.run.summary.update(headline)
            log_report(wandb.run, report, folder)
    except ImportError:
        pass
    return headline


RECIPES = Path(__file__).resolve().parent / "recipes"  # shipped in the wheel; the checkout's recipes/ links here


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_recipe(name: str) -> Path:
    """A recipe file: ``name`` as a path, else a shipped recipe by name (``calm`` or ``calm.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if path.name == str(path) and shipped.is_file():
        return shipped
    raise ConfigError(
        f"{name}: no such recipe file, and not a shipped recipe. Pass a .yaml path, or one of "
        f"{', '.join(shipped_recipes()) or '(none shipped)'}."
    )


def check_recipe(argv: Sequence[str]) -> tuple[ScriptArguments, Any, Any]:
    """Every check of a recipe that needs no model, with no side effects: what ``emotune train`` runs before it
    launches, so that a bad recipe gives our one-line error alone (exit 2), not a launcher's traceback too."""
    script, config, model_args = parse_recipe(argv)
    preflight(script, config, model_args, apply=False)
    resolve_resume(config)
    load_training_conversations(script, config)
    return script, config, model_args


def launch_args(
    config: Any,
    *,
    num_processes: int | None = None,
    num_machines: int | None = None,
    mixed_precision: str | None = None,
    dynamo_backend: str | None = None,
    config_file: str | None = None,
) -> list[str]:
    """``accelerate launch`` settings for a checked recipe. Without an accelerate config file every setting is
    passed explicitly (accelerate warns about each one it has to guess): one process per GPU (one on a CPU), the
    recipe's mixed precision, no dynamo. With a config file, only the settings given here override it."""
    given = {
        "--num_processes": num_processes,
        "--num_machines": num_machines,
        "--mixed_precision": mixed_precision,
        "--dynamo_backend": dynamo_backend,
    }
    if config_file:
        return ["--config_file", config_file, *[x for k, v in given.items() if v is not None for x in (k, str(v))]]
    gpus = 0 if config.use_cpu else torch.cuda.device_count()
    defaults = {
        "--num_processes": max(gpus, 1),
        "--num_machines": 1,
        "--mixed_precision": "bf16" if config.bf16 else "fp16" if config.fp16 else "no",
        "--dynamo_backend": "no",
    }
    out = [x for k, v in given.items() for x in (k, str(defaults[k] if v is None else v))]
    if int(out[1]) > 1 and not config.use_cpu:
        out.append("--multi_gpu")
    return out


def launch(recipe: str, overrides: Sequence[str] = (), *, dry_run: bool = False, **settings: Any) -> int:
    """``emotune train RECIPE [--key value ...]``: check the recipe here, then run ``emotune.train`` under
    ``accelerate launch`` (as ``trl sft`` does). Returns the training process's exit status."""
    import shlex

    argv = [str(find_recipe(recipe)), *overrides]
    script, config, model_args = check_recipe(argv)
    config_file = settings.get("config_file")
    if config_file and not Path(config_file).is_file():
        shipped = RECIPES / "accelerate_configs" / f"{config_file}.yaml"
        if not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in (RECIPES / "accelerate_configs").glob("*.yaml")))
            raise ConfigError(
                f"--config-file {config_file}: no such file. Pass an accelerate config file, or one of {names}."
            )
        settings["config_file"] = str(shipped)
    command = [*launch_args(config, **settings), "--module", "emotune.train", *argv]
    print("accelerate launch " + shlex.join(command), flush=True)
    if dry_run:
        return 0
    import subprocess

    from accelerate.commands.launch import launch_command, launch_command_parser

    try:
        launch_command(launch_command_parser().parse_args(command))
    except subprocess.CalledProcessError as exc:  # the training process printed its own error
        return exc.returncode
    return 0


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
    from emotune.models import configure_cpu_threads, load_model, parse_dtype
    from emotune.trainer import EmotuneTrainer

    preflight(script, config, model_args)
    resume = resolve_resume(config)  # before minutes of loading: a run with no checkpoint to resume fails now
    setup_wandb(config)
    set_seed(config.seed)
    on_cpu = config.use_cpu or not torch.cuda.is_available()
    if on_cpu:
        configure_cpu_threads()  # `accelerate launch` pins a single process to one thread
    if model_args.dtype not in (None, "auto"):
        dtype: Any = model_args.dtype
    else:  # bf16 on a GPU that has it; float32 on CPU, where bf16 training is unverified (docs/PERFORMANCE.md)
        dtype = "float32" if on_cpu else parse_dtype("auto", "cuda")
    model, tokenizer = load_model(
        model_args.model_name_or_path,
        dtype=dtype,
        revision=model_args.model_revision,
        # the recipe key lives in SFTConfig (trl's ModelConfig has none); load_model warns when it is on
        trust_remote_code=bool(
            getattr(config, "trust_remote_code", False) or getattr(model_args, "trust_remote_code", False)
        ),
        attn_implementation=getattr(model_args, "attn_implementation", None),
    )
    check_model_fit(config, model)  # a layer out of range or a too-long max_length fails here, named by its key
    basis = basis_on_accelerator(config, model, tokenizer)
    check_basis_fit(config, model, basis)
    dataset, eval_dataset, bits = build_dataset(script, config, tokenizer)
    # We push the finished adapter folder ourselves; Trainer's own push would create the repo at init
    # and upload checkpoints as they come.
    push, config.push_to_hub = config.push_to_hub, False
    if config.gradient_checkpointing:
        model.config.use_cache = False
    # Seed again right before the adapter is created: loading and data preparation may draw from the RNG
    # differently in one process and in several, and LoRA's initialisation must not depend on that.
    set_seed(config.seed)
    peft_config = get_peft_config(model_args)
    if config.lora_layers_up_to_target and peft_config is not None:
        peft_config.layers_to_transform = lora_layers(config, model, basis.default_layer)  # type: ignore[attr-defined]
    trainer = EmotuneTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        basis=basis,
        tag_bits=bits,
    )
    if _reports_to_wandb(config):
        from transformers.integrations import WandbCallback

        from emotune.tracking import EmotuneWandbCallback

        trainer.remove_callback(WandbCallback)
        trainer.add_callback(EmotuneWandbCallback(basis))
    out = Path(config.output_dir)
    if trainer.is_world_process_zero():
        write_json_atomic(out / "emotune_run.json", run_info(config, model_args, model))
    with wandb_run_identity(config, trainer.is_world_process_zero()):
        trainer.train(resume_from_checkpoint=resume)
    target = out / "adapter"
    if trainer.is_world_process_zero():
        report = None
        if config.emotion_eval:
            from emotune.adapter import read_report

            final_evaluation(trainer, tokenizer, basis, config)
            report = read_report(out / "eval")  # the card's shift table and model-index
        target = save_adapter(trainer, script, config, model_args, basis, report)
        print(f"adapter written to {target}")
        if push:
            from emotune.export import push_adapter

            url = push_adapter(target, config.hub_model_id or out.name, private=config.hub_private_repo)
            print(f"pushed to {url}")
    trainer.accelerator.wait_for_everyone()
    return target


if __name__ == "__main__":
    sys.exit(main())
