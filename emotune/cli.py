"""The `emotune` command: extract | stories | eval | steer | export | emotions.

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

    print(f"pushed {args.adapter} to {push_adapter(args.adapter, args.repo, private=args.private)}")


def cmd_emotions(args: argparse.Namespace) -> None:
    from emotune.catalog import CATALOG

    for e in CATALOG.values():
        print(f"{e.name:16s} valence {e.valence:.1f}  arousal {e.arousal:.1f}  {e.cluster}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="embedded name (smollm2-135m-instruct, gemma-3-270m), hub id or local folder",
    )
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--revision", default=None, help="hub revision (recorded in the basis metadata)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code from the hub (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract and validate an emotion basis")
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
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--folds", type=int, default=6, help="cross-validation folds for held-out accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("stories", help="let a model write emotion stories (same rules and filter as ours)")
    _model_args(p)
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--emotions", default=None, help="comma-separated subset (default: all 171)")
    p.add_argument("--per-emotion", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=260)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_stories)

    p = sub.add_parser("eval", help="evaluate a model before and after an adapter; writes a report folder")
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("steer", help="generate with an emotion vector added to the residual stream")
    _model_args(p)
    p.add_argument("--basis", default=None)
    p.add_argument("--emotion", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--alphas", default="0,0.1", help="strengths as fractions of r_l, comma-separated")
    p.add_argument("--layers", default=None, help="default: the basis's default layer")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("export", help="upload an adapter folder to the Hugging Face Hub")
    p.add_argument("--adapter", required=True, help="<output_dir>/adapter")
    p.add_argument("--repo", required=True, help="hub repo id, e.g. you/smollm2-calm")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("emotions", help="list the 171 emotions with our valence/arousal ratings")
    p.set_defaults(func=cmd_emotions)
    return parser


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
