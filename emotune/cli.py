"""The `emotune` command: extract | stories | eval | steer | export | export-basis | emotions | train | env.

Errors the user can fix (EmotuneError) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from emotune.errors import ConfigError, EmotuneError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(value: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise ConfigError(
            f"{flag} {value!r}: not a comma-separated list of numbers. Use e.g. {flag} -0.1,0,0.1."
        ) from None


def _emotions(value: str | None) -> list[str] | None:
    """``--emotions`` checked against the catalogue before any model is loaded."""
    from emotune.catalog import check_emotions

    return check_emotions(_csv(value), where="--emotions") if value else None


def _layers(model: Any, value: str | None) -> list[int] | None:
    """``--layers`` resolved against the model, errors named by the flag."""
    from emotune.models import resolve_layers

    if not value:
        return None
    try:
        return resolve_layers(model, value)
    except ConfigError as exc:
        raise ConfigError(f"--layers {value}: {exc}") from None


def _load_basis(path: str, model: Any) -> Any:
    """``--basis`` loaded and checked against the model, errors named by the flag."""
    from emotune.basis import EmotionBasis

    try:
        basis = EmotionBasis.load(path)
        basis.check_model(model)
    except EmotuneError as exc:
        raise type(exc)(f"--basis{'' if str(exc).startswith(path) else ' ' + path}: {exc}") from None
    return basis


def cmd_extract(args: argparse.Namespace) -> None:
    import torch

    from emotune.basis import EmotionBasis
    from emotune.io import check_output_dir
    from emotune.models import load_model
    from emotune.validation import basis_report, report_summary, write_basis_report

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    # refuse a bad output folder or flag before minutes of work, not after
    check_output_dir(args.out, marker="basis.json")
    emotions = _emotions(args.emotions)
    start = time.perf_counter()
    model, tokenizer = load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    loaded = time.perf_counter()
    basis = EmotionBasis.extract(
        model,
        tokenizer,
        stories=args.stories,
        neutral=args.neutral,
        emotions=emotions,
        layers=_layers(model, args.layers),
        offset=args.offset,
        variance=args.variance,
        method=args.method,
        batch_size=args.batch_size,
        folds=args.folds,
        seed=args.seed,
        max_length=args.max_length,
        sample=args.sample,
    )
    report = basis_report(basis, model, tokenizer)
    report["timing"] = dict(
        report.get("timing") or {}, load_s=round(loaded - start, 2), total_s=round(time.perf_counter() - start, 2)
    )
    basis.save(args.out, extra=lambda folder: write_basis_report(report, basis, folder))
    print(report_summary(report))
    print(
        f"wrote {args.out}/ (basis.safetensors, basis.json, report.md, report.json, *.png) "
        f"in {time.perf_counter() - start:.0f} s"
    )


def cmd_stories(args: argparse.Namespace) -> None:
    from emotune.models import load_model
    from emotune.stories import generate_stories, write_stories

    emotions = _emotions(args.emotions)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    records, rejected = generate_stories(
        model,
        tokenizer,
        emotions=emotions,
        per_emotion=args.per_emotion,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    write_stories(records, args.out)
    print(f"wrote {len(records)} stories to {args.out}; rejected: {rejected or 'none'}")
    print(f"extract from them with: emotune extract --model {args.model} --stories {args.out} --out DIR")


def cmd_eval(args: argparse.Namespace) -> None:
    from emotune.evaluate.run import DEFAULT_SECTIONS, evaluate

    alphas = _floats(args.alphas, "--alphas")
    if args.wandb_run_id and not args.wandb:
        raise ConfigError("--wandb-run-id: given without --wandb. Add --wandb to log the report to that run.")
    if args.wandb:  # before minutes of evaluation, not after
        from emotune.tracking import check_wandb_dir

        check_wandb_dir()
    report = evaluate(
        args.model,
        adapter=args.adapter,
        control=args.control,
        basis=args.basis,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        sections=_csv(args.sections) if args.sections else DEFAULT_SECTIONS,
        suite=args.suite,
        contexts=args.contexts,
        limit=args.limit,
        generation_k=args.k,
        steering_alphas=alphas,
        judge_model=args.judge,
        k=args.prefix_tokens or None,
        n_random=args.n_random,
        arguments={k: v for k, v in vars(args).items() if k != "func"},
    )
    print(f"wrote {args.out}/report.md ({', '.join(report['sections'])}) in {sum(report['timing'].values()):.0f} s")
    if args.wandb:
        log_eval_to_wandb(args, report)


def log_eval_to_wandb(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """``emotune eval --wandb``: the report into the training run (resumed by its id) or a new run."""
    from emotune.evaluate.run import parse_adapters
    from emotune.tracking import log_report, open_eval_run

    # several adapters share one report: the first one's training run receives it (or --wandb-run-id)
    adapters = list(parse_adapters(args.adapter).values())
    run = open_eval_run(args.wandb_run_id, str(adapters[0]) if adapters else None, args.out)
    try:
        log_report(run, report, args.out)
        print(f"logged the report to W&B run {run.id}{' (' + run.url + ')' if run.url else ''}")
    finally:
        run.finish()


def cmd_steer(args: argparse.Namespace) -> None:
    from emotune.basis import cached_basis, render_dialogue
    from emotune.catalog import check_emotions
    from emotune.models import load_model
    from emotune.steer import steered

    emotion = check_emotions([args.emotion], where="--emotion")[0]
    alphas = _floats(args.alphas, "--alphas")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    layers = _layers(model, args.layers)
    basis = _load_basis(args.basis, model) if args.basis else cached_basis(model, tokenizer)
    where = f"the basis {args.basis}" if args.basis else "the cached basis"
    if emotion not in basis.emotions:
        raise ConfigError(
            f"--emotion {args.emotion}: not in {where} ({len(basis)} emotions). Choose one of "
            f"{', '.join(basis.emotions[:12])}{', ...' if len(basis) > 12 else ''}, or re-extract with --emotions."
        )
    missing = [x for x in layers or [] if x not in basis.layers]
    if missing:
        raise ConfigError(
            f"--layers {args.layers}: layer(s) {', '.join(map(str, missing))} not in {where} (layers "
            f"{', '.join(map(str, basis.layers))}). Choose layers it has, or re-extract with --layers."
        )
    text = render_dialogue(tokenizer, [{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    for alpha in alphas:
        import torch

        torch.manual_seed(args.seed)
        with steered(model, basis, emotion, alpha, layers):
            out = model.generate(
                ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"--- {emotion} alpha={alpha:+.2f}\n{reply}\n")


def cmd_export(args: argparse.Namespace) -> None:
    from emotune.export import push_adapter

    adapter = args.adapter or args.adapter_flag
    if not adapter:
        raise ConfigError("export: no adapter given. Pass the adapter folder: emotune export ADAPTER --repo-id ID.")
    url = push_adapter(adapter, args.repo_id, report=args.report, private=args.private, keep_card=args.keep_card)
    print(f"pushed {adapter} to {url}")


def cmd_export_basis(args: argparse.Namespace) -> None:
    from emotune.basis import EmotionBasis
    from emotune.catalog import check_emotions
    from emotune.export import export_llamacpp, export_lm_eval
    from emotune.models import resolve_layers

    emotion = check_emotions([args.emotion], where="--emotion")[0]
    basis = EmotionBasis.from_pretrained(args.basis, args.subfolder, revision=args.revision)
    layers = None
    if args.layers:
        try:  # negative layers count from the end of the model the basis came from
            layers = resolve_layers(int(basis.metadata.get("num_layers") or max(basis.layers) + 1), args.layers)
        except ConfigError as exc:
            raise ConfigError(f"--layers {args.layers}: {exc}") from None
    if args.format == "llamacpp":
        out = export_llamacpp(basis, emotion, args.strength, args.out, layers)
        print(f"wrote {out}: run llama.cpp with --control-vector {out}")
    else:
        out = export_lm_eval(basis, emotion, args.strength, args.out, layers, hookpoint=args.hookpoint)
        print(f"wrote {out}: lm_eval --model steered --model_args pretrained=MODEL,steer_path={out} ...")


def cmd_emotions(args: argparse.Namespace) -> None:
    from emotune.catalog import CATALOG

    for e in CATALOG.values():
        print(f"{e.name:16s} valence {e.valence:.1f}  arousal {e.arousal:.1f}  {e.cluster}")


def cmd_train(args: argparse.Namespace) -> None:
    from emotune.train import launch, shipped_recipes

    if args.list:
        print("\n".join(shipped_recipes()))
        return
    if not args.recipe:
        raise ConfigError("train: no recipe given. Name a shipped recipe (see --list) or a .yaml file.")
    status = launch(
        args.recipe,
        args.overrides,
        dry_run=args.dry_run,
        num_processes=args.num_processes,
        num_machines=args.num_machines,
        mixed_precision=args.mixed_precision,
        dynamo_backend=args.dynamo_backend,
        config_file=args.config_file,
    )
    if status:
        raise SystemExit(status)  # the training process printed its own error


def environment() -> dict[str, Any]:
    """What ``emotune env`` prints: versions, the machine, and whether the embedded models are installed."""
    import importlib.metadata
    import importlib.util
    import os
    import platform

    import torch

    from emotune import __version__
    from emotune.models import EMBEDDED, cache_dir

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info: dict[str, Any] = {"emotune": __version__}
    info.update({name: version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate", "wandb")})
    info.update(
        {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu capability": torch.backends.cpu.get_cpu_capability(),
            "cpu cores": os.cpu_count(),
            "cuda devices": ", ".join(gpus) or "none",
            "mps": "available" if torch.backends.mps.is_available() else "no",
        }
    )
    for name, spec in EMBEDDED.items():
        found = importlib.util.find_spec(spec.module) is not None
        info[f"model {name}"] = "installed" if found else f"not installed ({spec.install})"
    info["cache dir"] = str(cache_dir())
    return info


def cmd_env(args: argparse.Namespace) -> None:
    for key, value in environment().items():
        print(f"{key + ':':30s}{value}")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="embedded name (smollm2-135m-instruct, gemma-3-270m), hub id or local folder",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 where the device computes it natively, else float32) | float32 | bfloat16 | float16",
    )
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--revision", default=None, help="hub revision (recorded in the basis metadata)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code from the hub (off by default)")


def build_parser() -> argparse.ArgumentParser:
    from emotune import __version__

    parser = argparse.ArgumentParser(
        prog="emotune",
        description=__doc__.splitlines()[0],
        epilog=_examples(
            "emotune extract --out bases/smollm2",
            "emotune train calm",
            "emotune eval --adapter runs/calm/adapter --out reports/calm --wandb",
            "emotune env",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    parser.add_argument("--version", action="version", version=f"emotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "extract",
        help="extract and validate an emotion basis",
        formatter_class=raw,
        epilog=_examples(
            "emotune extract --out bases/smollm2",
            "emotune extract --model gemma-3-270m --emotions calm,desperate --layers 8-14 --out bases/gemma",
            "emotune extract --model HuggingFaceTB/SmolLM2-135M-Instruct --method whitened --out bases/hub",
        ),
    )
    _model_args(p)
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--stories", default=None, help="story .jsonl file or folder (default: shipped corpus)")
    p.add_argument("--neutral", default=None, help="neutral dialogue .jsonl file or folder (default: shipped)")
    p.add_argument("--emotions", default=None, help="comma-separated subset (default: all 171)")
    p.add_argument("--layers", default=None, help="e.g. 10-20 or -8,-4 (default: all layers, one pass)")
    p.add_argument("--offset", type=int, default=8, help="skip this many tokens at the start of each text")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate texts to this many tokens (default: refuse longer than the model's context)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=2500,
        help="stories whose features are kept in memory for validation "
        "(the vectors use every story; the corpus is streamed)",
    )
    p.add_argument("--variance", type=float, default=0.5, help="neutral variance explained by the removed PCs")
    p.add_argument(
        "--method",
        default="mean_diff",
        choices=["mean_diff", "whitened"],
        help="mean_diff: the paper's recipe; whitened: discriminant directions (docs/BASIS.md)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass")
    p.add_argument("--folds", type=int, default=6, help="cross-validation folds for held-out accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed for the folds and the validation sample")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "stories",
        help="let a model write emotion stories (same rules and filter as ours)",
        formatter_class=raw,
        epilog=_examples("emotune stories --model HuggingFaceTB/SmolLM2-1.7B-Instruct --out stories.jsonl"),
    )
    _model_args(p)
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--emotions", default=None, help="comma-separated subset (default: all 171)")
    p.add_argument("--per-emotion", type=int, default=12, help="stories to write for each emotion")
    p.add_argument("--max-new-tokens", type=int, default=260, help="length limit of each story, in tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=cmd_stories)

    p = sub.add_parser(
        "eval",
        help="evaluate a model before and after an adapter; writes a report folder",
        formatter_class=raw,
        epilog=_examples(
            "emotune eval --adapter runs/calm/adapter --out reports/calm",
            "emotune eval --adapter runs/calm/adapter --out reports/calm --wandb   # into the training run",
            "emotune eval --sections activations --limit 8 --out reports/base-smoke",
        ),
    )
    _model_args(p)
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="NAME=PATH or PATH of an adapter folder (<output_dir>/adapter); repeat for several, scored in one "
        "process against one scoring of the base; omit to evaluate the base",
    )
    p.add_argument("--control", default=None, help="the adapter NAME the others are contrasted with (besides base)")
    p.add_argument(
        "--basis",
        default=None,
        help="basis folder (default: the first adapter's own basis/, else the model's cached full basis)",
    )
    p.add_argument("--out", required=True, help="report folder (created atomically)")
    p.add_argument(
        "--sections",
        default=None,
        help="comma-separated: activations,concealment,behaviour,capability,steering,leverage,reliability,"
        "generation (default: activations,behaviour,capability,steering)",
    )
    p.add_argument(
        "--prefix-tokens",
        type=int,
        default=16,
        help="k: the behaviour metric scores the first k tokens of each continuation (0 = all; default 16)",
    )
    p.add_argument("--n-random", type=int, default=1000, help="random directions in the leverage null")
    p.add_argument("--suite", default=None, help="scenario suite: 'default' or a .jsonl file")
    p.add_argument("--contexts", default=None, help="context-set .jsonl (default: shipped held-out contexts)")
    p.add_argument("--alphas", default="-0.1,-0.05,0,0.05,0.1", help="steering strengths (fractions of r_l)")
    p.add_argument("--k", type=int, default=2, help="samples per scenario in generation mode")
    p.add_argument("--judge", default=None, help="optional judge model (any causal LM id) for free text")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items of each set (smoke runs)")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log the report (shift table, plots, numbers, folder) to W&B: the adapter's training run, resumed "
        "by the id in <output_dir>/wandb_run_id, else a new run in $WANDB_PROJECT (offline without an API key)",
    )
    p.add_argument("--wandb-run-id", default=None, help="with --wandb: the id of the run to log to")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "steer",
        help="generate with an emotion vector added to the residual stream",
        formatter_class=raw,
        epilog=_examples('emotune steer --emotion calm --prompt "The tests failed again." --alphas 0,0.05,0.1'),
    )
    _model_args(p)
    p.add_argument("--basis", default=None, help="basis folder (default: the model's cached full basis)")
    p.add_argument("--emotion", required=True, help="the emotion to steer towards (negative alphas: away)")
    p.add_argument("--prompt", required=True, help="the user message to answer")
    p.add_argument("--alphas", default="0,0.1", help="strengths as fractions of r_l, comma-separated")
    p.add_argument("--layers", default=None, help="default: the basis's default layer")
    p.add_argument("--max-new-tokens", type=int, default=80, help="length limit of each reply, in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed set before each generation")
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser(
        "export",
        help="upload an adapter folder, its basis and its eval report to the Hugging Face Hub in one commit",
        formatter_class=raw,
        epilog=_examples("emotune export runs/calm/adapter --repo-id you/smollm2-calm --report runs/calm/eval"),
    )
    p.add_argument("adapter", nargs="?", default=None, help="the adapter folder (<output_dir>/adapter)")
    p.add_argument("--adapter", dest="adapter_flag", default=None, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--repo-id", "--repo", dest="repo_id", required=True, help="hub repo id, e.g. you/smollm2-calm")
    p.add_argument(
        "--report", default=None, help="eval report folder to publish with it (default: eval/ beside the adapter)"
    )
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument(
        "--keep-card", action="store_true", help="push the adapter's README.md as it is instead of rebuilding it"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "export-basis",
        help="write one emotion's steering vectors for llama.cpp (control vector) or lm-evaluation-harness",
        epilog="examples:\n  emotune export-basis runs/calm/adapter/basis --format llamacpp --emotion calm "
        "--strength 0.1 --layers 18 --out calm.gguf\n  emotune export-basis you/smollm2-calm --subfolder basis "
        "--format lm-eval --emotion calm --strength 0.1 --out calm.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("basis", help="basis folder, or a hub repo id (with --subfolder basis for an adapter's)")
    p.add_argument("--subfolder", default=None, help="folder inside the hub repo that holds the basis")
    p.add_argument("--revision", default=None, help="hub revision of the basis")
    p.add_argument("--format", required=True, choices=["llamacpp", "lm-eval"], help="output format")
    p.add_argument("--emotion", required=True, help="the emotion to steer along")
    p.add_argument(
        "--strength", type=float, required=True, help="fraction of the layer's mean residual norm (0.05-0.1 typical)"
    )
    p.add_argument(
        "--layers", "--layer", dest="layers", default=None, help="e.g. 18 or 16-20 (default: the basis's default)"
    )
    p.add_argument(
        "--hookpoint",
        default="layers.{layer}",
        help="lm-eval: module name under the model's base_model (model.model.layers.{layer} with peft=)",
    )
    p.add_argument("--out", required=True, help="output file (.gguf for llamacpp, .pt for lm-eval)")
    p.set_defaults(func=cmd_export_basis)

    p = sub.add_parser("emotions", help="list the 171 emotions with our valence/arousal ratings")
    p.set_defaults(func=cmd_emotions)
    _train_parser(sub)
    p = sub.add_parser(
        "env",
        help="versions, devices and installed models: paste it into a bug report",
        formatter_class=raw,
        epilog=_examples("emotune env"),
    )
    p.set_defaults(func=cmd_env)
    return parser


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter from a recipe, launched through accelerate",
        description="Train from a recipe (a shipped name or a .yaml file); --key value pairs after it override\n"
        "the recipe's keys (`emotune train calm --help` lists them). The recipe is checked here, before\n"
        "accelerate launches the run. Launcher settings go before the recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "emotune train calm",
            "emotune train calm --max_steps 4 --output_dir runs/calm-smoke --report_to none",
            "emotune train calm --emotion_weight_scale 0 --output_dir runs/calm-control   # the plain-SFT control",
            "emotune train --num-processes 8 --mixed-precision bf16 llama-3.1-8b-calm",
            "emotune train --config-file fsdp my-recipe.yaml   # multi-GPU configs are untested",
            "emotune train --list",
        ),
    )
    p.add_argument("recipe", nargs="?", help="a shipped recipe name (see --list) or a .yaml file")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs overriding the recipe")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the launch command only")
    p.add_argument(
        "--num-processes", type=int, default=None, help="training processes (default: one per GPU, one on a CPU)"
    )
    p.add_argument("--num-machines", type=int, default=None, help="machines (default: 1)")
    p.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16", "fp8"],
        default=None,
        help="accelerate's mixed precision (default: the recipe's bf16/fp16)",
    )
    p.add_argument("--dynamo-backend", default=None, help="torch.compile backend for accelerate (default: no)")
    p.add_argument(
        "--config-file",
        default=None,
        help="an accelerate config file, or a shipped one by name (ddp, fsdp, deepspeed_zero3; untested); "
        "settings not given here come from it",
    )
    p.set_defaults(func=cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.func(args)
    except EmotuneError as exc:
        print(f"emotune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"emotune {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
