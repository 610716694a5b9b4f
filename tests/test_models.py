"""Decoder-layer lookup across architectures, under PEFT, with negative indices; provenance."""

import pytest
import torch
from torch import nn

from emotune.errors import ConfigError
from emotune.models import decoder_layers, find_layer_list, model_fingerprint, resolve_layers


def _tiny(model_type: str):
    import transformers as tf

    common = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    if model_type == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=64))
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[model_type]
    extra = {"head_dim": 8} if model_type in ("qwen3", "gemma3_text") else {}
    return model_cls(config_cls(**common, **extra))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"])
def test_layer_lookup_finds_three_blocks_in_each_architecture(model_type):
    model = _tiny(model_type)
    name, layers = find_layer_list(model)
    assert len(layers) == 3
    assert name in ("model.layers", "transformer.h")


def test_layer_lookup_survives_peft_wrapping():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    name, layers = find_layer_list(model)
    assert name.endswith("model.layers") and name.startswith("base_model")
    assert len(layers) == 3


def test_negative_indices_and_ranges_resolve():
    assert resolve_layers(30, [-1, 0, -30]) == [0, 29]
    assert resolve_layers(30, "10-12") == [10, 11, 12]
    assert resolve_layers(30, "-2,-1") == [28, 29]
    assert resolve_layers(4, None) == [0, 1, 2, 3]


def test_layer_out_of_range_says_how_many_layers_there_are():
    with pytest.raises(ConfigError, match=r"layer 30 is out of range: the model has 30 layers"):
        resolve_layers(30, [30])
    with pytest.raises(ConfigError, match="layer -31"):
        resolve_layers(30, [-31])


def test_model_without_decoder_layers_explains_how_to_name_them():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ConfigError, match=r'layer_path="<dotted.name>".*stack'):
        find_layer_list(Odd())
    assert len(decoder_layers(Odd(), layer_path="stack")) == 1


def test_fingerprint_ignores_lora_and_precision_but_not_weights():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _tiny("llama")
    fp = model_fingerprint(base)
    assert model_fingerprint(_tiny("llama")) != fp  # other random weights
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_fingerprint(wrapped) == fp


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_attention_implementation_is_passed_through(tiny_chat_model_dir, implementation):
    from emotune.models import load_model

    model, _ = load_model(str(tiny_chat_model_dir), attn_implementation=implementation)
    assert model.config._attn_implementation == implementation


# ----------------------------------------------------------------------------- dtype and threads


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, torch.float32),
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"amx_bf16"}, torch.bfloat16),
        (set(), torch.float32),
    ],
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, flags, expected):
    import emotune.models as models

    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    assert models.parse_dtype("auto") == expected
    assert models.parse_dtype("float32") == torch.float32  # an explicit dtype is never second-guessed


def test_cpu_flags_reads_this_machine():
    from emotune.models import cpu_flags

    flags = cpu_flags()
    assert isinstance(flags, set)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # x86 Linux: the vector ISA is among them
        assert "avx2" in flags


def _threads_after(monkeypatch, env: dict[str, str], start: int = 1) -> tuple[int, list[int]]:
    import emotune.models as models

    calls: list[int] = []
    state = {"n": start}

    def set_threads(n: int) -> None:
        calls.append(n)
        state["n"] = n

    for key in ("ACCELERATE_DYNAMO_BACKEND", "EMOTUNE_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch, "set_num_threads", set_threads)
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    return models.configure_cpu_threads(), calls


def test_cpu_threads_use_every_core_when_the_launcher_pinned_one_process_to_one(monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="emotune.models"):
        threads, calls = _threads_after(monkeypatch, {"ACCELERATE_DYNAMO_BACKEND": "NO"})
    assert (threads, calls) == (8, [8])
    assert "using 8 threads" in caplog.text  # said in the log, not done silently


def test_cpu_threads_are_shared_between_local_processes(monkeypatch):
    threads, calls = _threads_after(monkeypatch, {"ACCELERATE_DYNAMO_BACKEND": "NO", "LOCAL_WORLD_SIZE": "4"})
    assert (threads, calls) == (2, [2])


def test_cpu_threads_are_left_alone_outside_a_launcher_or_when_set(monkeypatch):
    assert _threads_after(monkeypatch, {}) == (1, [])  # plain python: the user's OMP_NUM_THREADS stands
    assert _threads_after(monkeypatch, {"ACCELERATE_DYNAMO_BACKEND": "NO"}, start=3) == (3, [])
    assert _threads_after(monkeypatch, {"ACCELERATE_DYNAMO_BACKEND": "NO", "EMOTUNE_NUM_THREADS": "1"}) == (1, [1])
