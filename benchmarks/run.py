"""emotune benchmarks: every figure is a ratio against a bare baseline measured in the same run.

    python benchmarks/run.py                      # full run on the embedded model (CPU: ~15 min)
    python benchmarks/run.py --smoke              # seconds, tiny random model (the test suite runs this)
    python benchmarks/run.py --only train,extract --out docs/benchmarks/cpu.json

Benchmarks (each writes its rows into the JSON and prints a table):
- train:   step time and peak memory of EmotuneTrainer (terms; terms + drift) vs plain trl SFTTrainer + LoRA
           on the same batches, interleaved A/B/C to cancel drift in machine speed;
- padfree: padding-free training (one packed row per batch) vs padded batches, on the shipped conversations;
- scaling: the emotion terms' overhead against sequence length, batch size, emotions and hooked layers;
- extract: tokens/s of extraction with every layer captured vs a bare forward over the same batches;
           padding waste of length bucketing;
- peak:    achieved FLOP/s (torch's FLOP counter over measured time) of a training step and of extraction as
           a share of the measured fp32 GEMM peak; extraction on 1 thread vs all, and in bf16 vs fp32;
- stream:  peak memory of extraction at 1x, 5x and 20x the shipped story corpus, streamed vs holding
           every story's features (one process per point);
- choice:  shared-context scoring of a scenario pair vs scoring each continuation with its context;
           padding waste of the batched continuations;
- load:    first load of the embedded model (dequantising the GGUF) vs later loads (cached safetensors).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny models for --smoke


# ----------------------------------------------------------------------------- helpers


def machine() -> dict[str, Any]:
    from emotune.models import native_bf16

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cpu"),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0))
    return info


def timed(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each variant, run round-robin so that slow phases of the machine hit all alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def table(title: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print(
            "| "
            + " | ".join(f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys)
            + " |"
        )


def load(smoke: bool, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if smoke:
        from conftest import tiny_fast_tokenizer, tiny_llama

        tok = tiny_fast_tokenizer()
        model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
        model.config.pad_token_id = tok.pad_token_id
        return model.to(device), tok
    from emotune.models import load_model

    return load_model("smollm2-135m-instruct", dtype=dtype, device=device)


def tiny_basis(model: Any, tok: Any) -> Any:
    """A basis with random unit vectors of the model's shape: speed does not depend on the vectors."""
    from emotune.basis import EmotionBasis
    from emotune.catalog import EMOTIONS
    from emotune.models import model_fingerprint, num_layers

    n, d = num_layers(model), model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(n, len(EMOTIONS), d, generator=g)
    vecs = vecs / vecs.norm(dim=-1, keepdim=True)
    meta = {"fingerprint": model_fingerprint(model), "num_layers": n}
    return EmotionBasis(
        list(EMOTIONS), list(range(n)), vecs, vecs.clone(), torch.ones(n), [torch.zeros(0, d)] * n, n * 2 // 3, meta
    )


# ----------------------------------------------------------------------------- train


def make_batch(tok: Any, batch: int, length: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)
    ids = torch.randint(10, vocab - 1, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the first half is "context", the second the assistant reply
    tag_bits = torch.full((batch, length), 1 << 1)  # "all"
    tag_bits[:, length // 4 :] |= 1 << 2  # "failure" from a quarter in
    tag_bits[:, length // 2 :] |= 1 << 0  # "assistant"
    mask = torch.ones_like(ids)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "position_ids": torch.arange(length).expand(batch, length).to(device),
        "tag_bits": tag_bits.to(device),
    }


def build_trainers(
    model_factory: Callable[[], Any],
    tok: Any,
    basis: Any,
    device: str,
    layers: list[int],
    emotions: list[str],
    tmp: str,
    gradient_checkpointing: bool,
    only: str | None = None,
) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from emotune.trainer import EmotuneConfig, EmotuneTrainer

    common = dict(
        output_dir=tmp,
        per_device_train_batch_size=1,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        gradient_checkpointing=gradient_checkpointing,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        logging_steps=1000,
    )
    peft = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    data = Dataset.from_list([{"input_ids": [1, 2], "labels": [1, 2], "tag_bits": [0, 0]}])
    bits = {"assistant": 0, "all": 1, "failure": 2}
    terms = [
        {"emotion": e, "form": "penalize" if k % 2 == 0 else "reward", "weight": 1.0, "tags": ["failure"]}
        for k, e in enumerate(emotions)
    ]
    trainers: dict[str, Any] = {}
    plain_args = SFTConfig(**common)  # type: ignore[arg-type]
    if only in (None, "plain SFT"):
        trainers["plain SFT"] = SFTTrainer(
            model=model_factory(), args=plain_args, train_dataset=data, processing_class=tok, peft_config=peft
        )
    for name, drift in (("emotune terms", 0.0), ("emotune terms + drift", 1.0)):
        if only not in (None, name):
            continue
        config = EmotuneConfig(**common, emotion_terms=terms, emotion_layers=layers, drift_weight=drift)
        trainers[name] = EmotuneTrainer(
            model=model_factory(),
            args=config,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft,
            basis=basis,
            tag_bits=bits,
        )
    for trainer in trainers.values():
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass
        trainer.model.train()
    return trainers


def step_fn(trainer: Any, batch: dict[str, torch.Tensor], plain: bool) -> Callable[[], Any]:
    inputs = {k: v for k, v in batch.items() if not (plain and k == "tag_bits")}

    def step() -> None:
        trainer.state.max_steps = 1000
        loss = trainer.training_step(trainer.model, dict(inputs), num_items_in_batch=None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        del loss

    return step


def peak_memory(fn: Callable[[], Any], device: str) -> float:
    """Peak bytes allocated during ``fn`` above what was allocated before it (CUDA: allocator stats;
    CPU: the process's peak RSS rise, which only grows, so each variant runs in a fresh process)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def bench_train(args: argparse.Namespace, model: Any, tok: Any, basis: Any) -> list[dict[str, Any]]:
    import copy

    from emotune.models import num_layers

    n = num_layers(model)
    layer = n * 2 // 3
    batch = make_batch(tok, args.batch, args.length, args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trainers = build_trainers(
            lambda: copy.deepcopy(model),
            tok,
            basis,
            args.device,
            [layer],
            ["desperate", "calm"],
            tmp,
            args.gradient_checkpointing,
        )
        fns = {name: step_fn(t, batch, plain=name == "plain SFT") for name, t in trainers.items()}
        times = interleaved(fns, args.repeats, args.device)
        tokens = args.batch * args.length
        for name, seconds in times.items():
            rows.append(
                {
                    "variant": name,
                    "step_s": seconds,
                    "tokens_per_s": tokens / seconds,
                    "ratio_vs_plain": seconds / times["plain SFT"],
                }
            )
        if args.device == "cuda":
            for row in rows:
                row["peak_bytes"] = peak_memory(fns[row["variant"]], args.device)
            for row in rows:
                row["memory_ratio"] = row["peak_bytes"] / rows[0]["peak_bytes"]
    table(
        f"Training step, batch {args.batch} x {args.length} tokens ({args.device})",
        rows,
        ["variant", "step_s", "tokens_per_s", "ratio_vs_plain"] + (["memory_ratio"] if args.device == "cuda" else []),
    )
    return rows


def bench_train_memory_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    """CPU peak memory: each variant in its own process (peak RSS only grows within a process)."""
    import subprocess

    rows = []
    for variant in ("plain SFT", "emotune terms", "emotune terms + drift"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-probe",
            variant,
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
        ] + (["--smoke"] if args.smoke else [])
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for row in rows:
        row["memory_ratio"] = row["peak_rise_bytes"] / max(1.0, rows[0]["peak_rise_bytes"])
    table(
        "Training peak memory, CPU (rise of peak RSS over the loaded model, one process per variant)",
        rows,
        ["variant", "peak_rise_bytes", "memory_ratio"],
    )
    return rows


def memory_probe(args: argparse.Namespace) -> None:
    model, tok = load(args.smoke, "cpu", torch.float32)
    basis = tiny_basis(model, tok)
    from emotune.models import num_layers

    batch = make_batch(tok, args.batch, args.length, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        # build only the measured variant, on the loaded model itself, so that no copy inflates the peak
        trainers = build_trainers(
            lambda: model,
            tok,
            basis,
            "cpu",
            [num_layers(model) * 2 // 3],
            ["desperate", "calm"],
            tmp,
            False,
            only=args.memory_probe,
        )
        trainer = trainers[args.memory_probe]
        gc.collect()
        fn = step_fn(trainer, batch, plain=args.memory_probe == "plain SFT")
        rise = peak_memory(lambda: [fn() for _ in range(2)], "cpu")
    print(json.dumps({"variant": args.memory_probe, "peak_rise_bytes": rise}))


def terms_only_fn(trainer: Any, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> Callable[[], Any]:
    """The work the emotion terms add to a step, alone: the trainer's own ``terms_loss`` (projections, masked
    means, logged levels), its backward and the metric flush, on stand-in activations of the real shape (the
    hooks themselves only store a reference)."""
    b, t = batch["input_ids"].shape
    device = batch["input_ids"].device
    d = trainer.basis.hidden_size
    store = {
        layer: torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True) for layer in trainer.hook_layers
    }
    attention = batch["attention_mask"].bool()

    def run() -> None:
        trainer.terms_loss(store, batch["tag_bits"], attention).backward()
        trainer._flush_logs()  # the trainer's one device sync per step
        for h in store.values():
            h.grad = None

    return run


def bench_scaling(args: argparse.Namespace, model: Any, tok: Any, basis: Any) -> list[dict[str, Any]]:
    """Overhead of the emotion terms vs plain SFT as one factor grows and the others stay at their base.

    Two measures: ``overhead`` is the end-to-end step ratio minus 1 (interleaved, but on a shared
    CPU its noise is several percent, larger than the effect); ``terms_cost`` is the time of the
    trainer's own term computation (``terms_only_fn``), timed alone over many repeats, divided by
    the plain step: a direct measure of what they add.
    """
    import copy

    from emotune.catalog import EMOTIONS
    from emotune.models import num_layers

    n = num_layers(model)
    dtype = next(model.parameters()).dtype
    base = {"length": args.length, "batch": args.batch, "emotions": 2, "layers": 1}
    grid = {
        "length": [args.length // 2, args.length, args.length * 2],
        "batch": [max(1, args.batch // 2), args.batch, args.batch * 2],
        "emotions": [2, 16, 170],
        "layers": [1, max(2, n // 4), n],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor, values in grid.items():
            for value in values:
                setting = {**base, factor: value}
                layers = list(range(n - setting["layers"], n))
                emotions = list(EMOTIONS[: setting["emotions"]])
                trainers = build_trainers(
                    lambda: copy.deepcopy(model), tok, basis, args.device, layers, emotions, tmp, False
                )
                trainers.pop("emotune terms + drift")
                batch = make_batch(tok, setting["batch"], setting["length"], args.device)
                fns = {name: step_fn(t, batch, plain=name == "plain SFT") for name, t in trainers.items()}
                times = interleaved(fns, max(2, args.repeats), args.device)
                terms = interleaved(
                    {"terms": terms_only_fn(trainers["emotune terms"], batch, dtype)}, 4 * args.repeats, args.device
                )["terms"]
                rows.append(
                    {
                        "factor": factor,
                        "value": value,
                        **setting,
                        "plain_step_s": times["plain SFT"],
                        "overhead": times["emotune terms"] / times["plain SFT"] - 1,
                        "terms_s": terms,
                        "terms_cost": terms / times["plain SFT"],
                    }
                )
                del trainers
                gc.collect()
    table(
        "Scaling of the emotion terms' cost (vs plain SFT in the same run)",
        rows,
        ["factor", "value", "length", "batch", "emotions", "layers", "plain_step_s", "overhead", "terms_cost"],
    )
    return rows


def bench_padfree(args: argparse.Namespace, model: Any, tok: Any, basis: Any) -> list[dict[str, Any]]:
    """Training steps on the shipped training conversations (batch 8, max_length 256, as calm.yaml),
    padded to the batch's longest row vs padding-free (one packed row per batch), same batches, with
    the emotion terms on in both."""
    import copy
    import random

    from datasets import Dataset
    from peft import LoraConfig

    from emotune.conversations import load_conversations, tag_index, tokenize_conversation
    from emotune.models import num_layers
    from emotune.trainer import EmotuneConfig, EmotuneTrainer

    conversations = load_conversations(None)
    bits = tag_index({t for c in conversations for t in c.tags})
    rows = [tokenize_conversation(c, tok, bits, 256) for c in conversations]
    batch_size = 2 if args.smoke else 8
    rng = random.Random(0)
    batches = [rng.sample(rows, batch_size) for _ in range(2 if args.smoke else 6)]
    layer = num_layers(model) * 2 // 3
    terms = [
        {"emotion": "desperate", "form": "penalize", "weight": 1.0, "tags": ["failure", "pressure"]},
        {"emotion": "calm", "form": "reward", "weight": 1.0, "tags": ["failure", "pressure"], "target": 0.08},
    ]
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, padding_free in (("padded", False), ("padding-free", True)):
            config = EmotuneConfig(
                output_dir=tmp,
                per_device_train_batch_size=batch_size,
                max_steps=1,
                report_to="none",
                save_strategy="no",
                use_cpu=args.device == "cpu",
                bf16=args.device == "cuda",
                logging_steps=1000,
                emotion_terms=terms,
                emotion_layers=[layer],
                padding_free=padding_free,
            )
            trainer = EmotuneTrainer(
                model=copy.deepcopy(model),
                args=config,
                train_dataset=Dataset.from_list(rows[:2]),
                processing_class=tok,
                peft_config=peft,
                basis=basis,
                tag_bits=bits,
            )
            trainer.create_optimizer_and_scheduler(num_training_steps=1000)
            trainer.current_gradient_accumulation_steps = 1
            trainer.model.train()
            trainers[name] = trainer
        device = args.device
        collated = {
            name: [{k: v.to(device) for k, v in t.data_collator(b).items()} for b in batches]
            for name, t in trainers.items()
        }

        def run(name: str) -> Callable[[], None]:
            return lambda: [step_fn(trainers[name], inputs, plain=False)() for inputs in collated[name]]

        times = interleaved({name: run(name) for name in trainers}, args.repeats, device)
    real = sum(len(r["input_ids"]) for b in batches for r in b)
    padded_tokens = sum(b["input_ids"].numel() for b in collated["padded"])
    out = [
        {
            "variant": name,
            "seconds": times[name],
            "real_tokens_per_s": real / times[name],
            "speedup_vs_padded": times["padded"] / times[name],
            "padding_fraction": 1 - real / padded_tokens if name == "padded" else 0.0,
        }
        for name in trainers
    ]
    table(
        f"Padding-free training, {len(batches)} batches of {batch_size} shipped conversations, {real} real tokens",
        out,
        ["variant", "seconds", "real_tokens_per_s", "speedup_vs_padded", "padding_fraction"],
    )
    return out


# ----------------------------------------------------------------------------- extraction


def bench_extract(args: argparse.Namespace, model: Any, tok: Any) -> list[dict[str, Any]]:
    from emotune.basis import length_batches, mean_activations, pad_batch
    from emotune.corpus import load_stories
    from emotune.models import num_layers

    stories = load_stories()[: args.texts]
    texts = [s.text for s in stories]
    layers = list(range(num_layers(model)))
    sequences = tok(texts, add_special_tokens=True)["input_ids"]
    batches = length_batches([len(s) for s in sequences], 16, 8192)
    device = next(model.parameters()).device

    def bare() -> None:
        with torch.no_grad():
            for rows in batches:
                ids, mask, pos = pad_batch([sequences[i] for i in rows], tok.pad_token_id)
                model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=pos.to(device),
                    use_cache=False,
                )

    holder: dict[str, Any] = {}

    def ours() -> None:
        holder["f"] = mean_activations(model, tok, texts, layers, offset=8, batch_size=16)

    times = interleaved({"bare forward (no hooks)": bare, "extraction, all layers": ours}, args.repeats, args.device)
    tokens = sum(len(s) for s in sequences)
    rows = [
        {
            "variant": name,
            "seconds": s,
            "tokens_per_s": tokens / s,
            "ratio_vs_bare": times["bare forward (no hooks)"] / s,
        }
        for name, s in times.items()
    ]
    rows.append(
        {
            "variant": "padding waste (bucketed)",
            "seconds": None,
            "tokens_per_s": None,
            "ratio_vs_bare": holder["f"].padding_fraction,
        }
    )
    table(
        f"Extraction over {len(texts)} stories, {tokens} tokens, {len(layers)} layers",
        rows,
        ["variant", "seconds", "tokens_per_s", "ratio_vs_bare"],
    )
    return rows


# ----------------------------------------------------------------------------- share of the machine's peak


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``fn`` runs, counted by torch's own dispatcher-level counter (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: str, dtype: torch.dtype, repeats: int) -> float:
    """Measured FLOP/s of the best of a few large GEMMs with this process's threads: the peak we compare to."""
    from torch.utils import benchmark

    best = 0.0
    for n in (1024, 2048):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timer = benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
        best = max(best, 2 * n**3 / timer.timeit(max(2, repeats)).median)
    return best


def bench_peak(args: argparse.Namespace, model: Any, tok: Any, basis: Any) -> list[dict[str, Any]]:
    """Achieved FLOP/s of a training step (calm.yaml's terms and layers) and of extraction, as a share of the
    measured GEMM peak, in one run; plus what threads and bf16 do on this CPU."""
    import copy

    from emotune.basis import mean_activations
    from emotune.corpus import load_stories
    from emotune.models import num_layers

    device = args.device
    threads = torch.get_num_threads()
    peak = matmul_peak(device, torch.float32, args.repeats)
    n = num_layers(model)
    layers = [round(n * 0.6), round(n * 0.73)]  # 18 and 22 of 30, as calm.yaml
    batch = make_batch(tok, args.batch, args.length, device)
    rows: list[dict[str, Any]] = [{"variant": f"fp32 GEMM peak, {threads} threads", "gflop_per_s": peak / 1e9}]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainers(
            lambda: copy.deepcopy(model),
            tok,
            basis,
            device,
            layers,
            ["desperate", "calm"],
            tmp,
            False,
            only="emotune terms",
        )["emotune terms"]
        step = step_fn(trainer, batch, plain=False)
        step()
        flops = counted_flops(step)
        seconds = interleaved({"step": step}, args.repeats, device)["step"]
        rows.append(
            {
                "variant": f"training step, batch {args.batch} x {args.length}, LoRA + terms",
                "seconds": seconds,
                "tokens_per_s": args.batch * args.length / seconds,
                "gflop_per_s": flops / seconds / 1e9,
                "share_of_peak": flops / seconds / peak,
            }
        )
    texts = [s.text for s in load_stories()[: args.texts]]
    top = layers[-1:]

    def extract() -> None:
        mean_activations(model, tok, texts, top, offset=8, batch_size=16)

    extract()
    flops = counted_flops(extract)
    seconds = interleaved({"extract": extract}, args.repeats, device)["extract"]
    tokens = sum(len(x) for x in tok(texts)["input_ids"])
    rows.append(
        {
            "variant": f"extraction, {len(texts)} stories to layer {top[0]}",
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "gflop_per_s": flops / seconds / 1e9,
            "share_of_peak": flops / seconds / peak,
        }
    )
    if device == "cpu":
        torch.set_num_threads(1)
        one = interleaved({"extract": extract}, args.repeats, device)["extract"]
        torch.set_num_threads(threads)
        rows.append({"variant": f"extraction on 1 thread vs {threads}", "seconds": one, "ratio": one / seconds})
        half = copy.deepcopy(model).to(torch.bfloat16)
        bf16 = interleaved(
            {"bf16": lambda: mean_activations(half, tok, texts, top, offset=8, batch_size=16)}, args.repeats, device
        )["bf16"]
        rows.append({"variant": "extraction in bf16 vs fp32", "seconds": bf16, "ratio": bf16 / seconds})
    table(
        f"Share of the measured peak ({device}, {threads} threads)",
        rows,
        ["variant", "seconds", "tokens_per_s", "gflop_per_s", "share_of_peak", "ratio"],
    )
    return rows


# ----------------------------------------------------------------------------- streaming


STREAM_MULTIPLES = (1, 5, 20)


def bench_stream(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak memory of extraction against corpus size (the shipped stories repeated k times), one
    process per point: streamed ``EmotionBasis.extract`` vs holding every story's features, as
    extraction did before it streamed (the baseline)."""
    import subprocess

    if not args.smoke:
        from emotune.models import resolve_model_path

        resolve_model_path("smollm2-135m-instruct")  # make sure the tokenizer and config are cached
    multiples = (1, 3) if args.smoke else STREAM_MULTIPLES
    rows = []
    for multiple in multiples:
        for mode in ("in memory (baseline)", "streamed"):
            cmd = [sys.executable, __file__, "--stream-probe", mode, "--multiple", str(multiple)]
            out = subprocess.run(
                cmd + (["--smoke"] if args.smoke else []),
                capture_output=True,
                text=True,
                timeout=3600,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = {r["mode"]: r["peak_rise_bytes"] for r in rows if r["multiple"] == multiples[0]}
    for row in rows:
        row["peak_rise_mb"] = row["peak_rise_bytes"] / 2**20
        row["vs_1x"] = row["peak_rise_bytes"] / max(1.0, first[row["mode"]])
    table(
        "Extraction peak memory against corpus size (rise of peak RSS, one process per point)",
        rows,
        ["mode", "multiple", "stories", "tokens", "seconds", "peak_rise_mb", "vs_1x"],
    )
    return rows


def stream_probe(args: argparse.Namespace) -> None:
    """One point of ``bench_stream``: a random model of SmolLM2-135M's shape (its MLP shrunk to 64, so
    that 20x the corpus runs in minutes: feature memory depends on layers x hidden size only)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from emotune.basis import EmotionBasis, mean_activations
    from emotune.corpus import iter_stories
    from emotune.models import num_layers

    torch.manual_seed(0)
    if args.smoke:
        from conftest import tiny_fast_tokenizer, tiny_llama

        tok = tiny_fast_tokenizer()
        model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
        model.config.pad_token_id = tok.pad_token_id
        max_length, offset = 24, 4
    else:
        from emotune.models import resolve_model_path

        path, _ = resolve_model_path("smollm2-135m-instruct")
        tok = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        config.intermediate_size = 64
        model = LlamaForCausalLM(config).eval()
        max_length, offset = 12, 4
    limit = 40 if args.smoke else None
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stories.jsonl"
        with corpus.open("w", encoding="utf-8") as handle:
            for _ in range(args.multiple):
                for i, story in enumerate(iter_stories()):
                    if limit is not None and i >= limit:
                        break
                    handle.write(json.dumps({"emotion": story.emotion, "text": story.text}) + "\n")
        layers = list(range(num_layers(model)))
        gc.collect()
        holder: dict[str, Any] = {}

        def run() -> None:
            if args.stream_probe == "streamed":
                basis = EmotionBasis.extract(
                    model, tok, stories=corpus, layers=layers, offset=offset, max_length=max_length, progress=False
                )
                holder["stories"] = basis.metadata["corpus"]["stories"]
                holder["tokens"] = basis.metadata["timing"]["tokens"]
            else:  # what extraction held before it streamed: the list of stories and every story's features
                stories = list(iter_stories(corpus))
                feats = mean_activations(
                    model, tok, [s.text for s in stories], layers, offset=offset, max_length=max_length
                )
                holder["stories"] = len(stories)
                holder["tokens"] = feats.stats.n_tokens_total

        start = time.perf_counter()
        rise = peak_memory(run, "cpu")
        row = {
            "mode": args.stream_probe,
            "multiple": args.multiple,
            "peak_rise_bytes": rise,
            "seconds": time.perf_counter() - start,
            **holder,
        }
    print(json.dumps(row))


# ----------------------------------------------------------------------------- choice scoring


def bench_choice(args: argparse.Namespace, model: Any, tok: Any) -> list[dict[str, Any]]:
    from emotune.evaluate.behaviour import load_scenarios
    from emotune.evaluate.scoring import encode_context, encode_continuation, score_continuations, score_separately

    scenarios = load_scenarios()[: args.scenarios]
    encoded = [
        (encode_context(tok, s.messages), encode_continuation(tok, s.ethical), encode_continuation(tok, s.unethical))
        for s in scenarios
    ]

    def shared() -> None:
        for ctx, a, b in encoded:
            score_continuations(model, ctx, [a, b])

    def separate() -> None:
        for ctx, a, b in encoded:
            score_separately(model, ctx, a)
            score_separately(model, ctx, b)

    times = interleaved(
        {"each continuation with its context": separate, "shared context once": shared}, args.repeats, args.device
    )
    real = sum(len(a) + len(b) for _, a, b in encoded)
    padded = sum(2 * max(len(a), len(b)) for _, a, b in encoded)
    rows = [
        {"variant": name, "seconds": s, "speedup_vs_separate": times["each continuation with its context"] / s}
        for name, s in times.items()
    ]
    rows.append(
        {
            "variant": "padding waste of batched continuations (of all scored tokens)",
            "seconds": None,
            "speedup_vs_separate": (padded - real) / (padded + sum(len(c) for c, _, _ in encoded)),
        }
    )
    table(
        f"Choice-mode scoring of {len(encoded)} scenarios (2 continuations each)",
        rows,
        ["variant", "seconds", "speedup_vs_separate"],
    )
    return rows


# ----------------------------------------------------------------------------- load


def bench_load(args: argparse.Namespace) -> list[dict[str, Any]]:
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        code = (
            "import time; from emotune.models import load_model; t=time.perf_counter(); load_model(); "
            "print(time.perf_counter()-t)"
        )
        for name in (
            "first load (dequantise GGUF, write cache)",
            "second load (cached safetensors)",
            "third load (cached safetensors)",
        ):
            out = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=1800,
                env={**os.environ, "EMOTUNE_CACHE": cache, "PYTHONPATH": str(ROOT)},
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            rows.append({"variant": name, "seconds": float(out.stdout.strip().splitlines()[-1])})
    for row in rows:
        row["ratio_vs_first"] = row["seconds"] / rows[0]["seconds"]
    table(
        "Embedded model load (smollm2-135m-instruct), each in a fresh process",
        rows,
        ["variant", "seconds", "ratio_vs_first"],
    )
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few repeats: seconds")
    parser.add_argument("--only", default="train,memory,padfree,scaling,extract,peak,stream,choice,load")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--texts", type=int, default=None, help="stories in the extraction benchmark")
    parser.add_argument("--scenarios", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stream-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--multiple", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = args.smoke
    args.batch = args.batch or (2 if smoke else 4)
    args.length = args.length or (32 if smoke else 128)
    args.repeats = args.repeats or (2 if smoke else 5)
    args.texts = args.texts or (24 if smoke else 256)
    args.scenarios = args.scenarios or (4 if smoke else 40)
    if args.memory_probe:
        memory_probe(args)
        return
    if args.stream_probe:
        stream_probe(args)
        return
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    only = set(args.only.split(","))
    results: dict[str, Any] = {
        "machine": machine(),
        "smoke": smoke,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "only")},
    }
    model, tok = load(smoke, args.device, dtype)
    basis = tiny_basis(model, tok)
    if "train" in only:
        results["train"] = bench_train(args, model, tok, basis)
    if "memory" in only and args.device == "cpu":
        results["memory"] = bench_train_memory_cpu(args)
    if "padfree" in only:
        results["padfree"] = bench_padfree(args, model, tok, basis)
    if "scaling" in only:
        results["scaling"] = bench_scaling(args, model, tok, basis)
    if "extract" in only:
        results["extract"] = bench_extract(args, model, tok)
    if "peak" in only:
        results["peak"] = bench_peak(args, model, tok, basis)
    if "stream" in only:
        results["stream"] = bench_stream(args)
    if "choice" in only:
        results["choice"] = bench_choice(args, model, tok)
    if "load" in only and not smoke:
        results["load"] = bench_load(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
