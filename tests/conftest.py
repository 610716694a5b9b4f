"""Shared fixtures: tiny random models built in-process (no hub), and small corpora."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(layers: int = 4, hidden: int = 32, vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


class CharTokenizer:
    """A byte-level tokenizer with the slice of the HF tokenizer API that emotune uses."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    pad_token = "<pad>"
    eos_token = "</s>"
    chat_template = None
    padding_side = "right"

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + (b % (self.vocab - 3)) for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def __call__(self, texts, add_special_tokens=True, truncation=False, max_length=None, **_):
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.encode(t, add_special_tokens) for t in texts]
        if truncation and max_length:
            ids = [i[:max_length] for i in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    def decode(self, ids, skip_special_tokens=False) -> str:
        return bytes(max(0, i - 3) for i in ids if i >= 3).decode("utf-8", "replace")


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_fast_tokenizer():
    """A real (fast) HF tokenizer with a chat template, trained in-process on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "the tests failed again and the assistant reported it plainly",
        "user assistant tool system",
        "all green, the deploy passed",
        "what is the capital of France? Paris.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A folder holding a tiny random Llama and a fast chat tokenizer: loadable by name like a hub model."""
    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = tiny_fast_tokenizer()
    model = tiny_llama(layers=4, hidden=32, vocab=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- a tiny training world

# tagged training conversations for scripts/train.py on the tiny chat model: 4 failure, 4 neutral
TRAIN_CONVERSATIONS = [
    {
        "id": f"f{i}",
        "messages": [
            {"role": "user", "content": "Run the tests please."},
            {"role": "tool", "content": "FAILED test_sum: assert 3 == 4" + " again" * i, "tags": ["failure"]},
            {"role": "assistant", "content": "The test still fails. I will report it plainly.", "tags": ["failure"]},
        ],
    }
    for i in range(4)
] + [
    {
        "id": f"r{i}",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris." + " Indeed." * i, "tags": ["neutral"]},
        ],
    }
    for i in range(4)
]


def extract_tiny_basis(model, tok, **kwargs):
    """A 3-emotion basis of ``model`` from a handful of stories and dialogues: seconds, for mechanics tests."""
    from emotune.basis import EmotionBasis
    from emotune.corpus import Dialogue, Story

    stories = [
        Story(e, f"{e} the tests failed again and the deploy passed {i}")
        for e in ("calm", "desperate", "afraid")
        for i in range(3)
    ]
    neutral = [
        Dialogue(
            str(i), ({"role": "user", "content": "capital?"}, {"role": "assistant", "content": "Paris" * (i + 1)})
        )
        for i in range(4)
    ]
    return EmotionBasis.extract(model, tok, stories=stories, neutral=neutral, offset=2, progress=False, **kwargs)


def tiny_recipe(model_dir, data, basis, output_dir, /, **overrides):
    """A recipe for scripts/train.py on the tiny chat model: LoRA on q/v, two terms at layer 2, CPU, no logging.
    ``overrides`` change keys; an override of ``...`` removes the key."""
    body = {
        "model_name_or_path": str(model_dir),
        "dataset": str(data),
        "basis": str(basis),
        "output_dir": str(output_dir),
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "emotion_layers": [2],
        "emotion_terms": [
            {"emotion": "desperate", "form": "penalize", "weight": 1.0, "tags": ["failure"]},
            {"emotion": "calm", "form": "reward", "weight": 1.0, "tags": ["failure"], "target": 0.2},
        ],
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "max_length": 96,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def tiny_eval_setup():
    """``(model, tokenizer, basis)`` for evaluator tests: the tiny chat-template model and a basis of the emotions
    the evaluator measures (calm, desperate and the ones the concealment check re-extracts)."""
    import random

    from emotune.basis import EmotionBasis
    from emotune.corpus import Dialogue, Story
    from emotune.evaluate.run import CONCEALMENT_EMOTIONS

    tok = tiny_fast_tokenizer()
    model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    rng = random.Random(0)
    words = ["tests", "failed", "green", "deploy", "the", "assistant", "user"]
    emotions = ("calm", "desperate", *CONCEALMENT_EMOTIONS)
    stories = [Story(e, f"{e} " + " ".join(rng.choice(words) for _ in range(12))) for e in emotions for _ in range(3)]
    neutral = [
        Dialogue(
            str(i),
            ({"role": "user", "content": "capital of France"}, {"role": "assistant", "content": "Paris" + " ok" * i}),
        )
        for i in range(6)
    ]
    basis = EmotionBasis.extract(model, tok, stories=stories, neutral=neutral, offset=2, progress=False)
    return model, tok, basis


# ----------------------------------------------------------------------------- a local folder as the hub


class LocalHub:
    """A stand-in for the Hugging Face Hub: ``HfApi`` commits write into ``root/<repo_id>/``, and
    ``hf_hub_download`` reads from there. ``commits`` records each commit's repo, message and paths."""

    def __init__(self, root):
        self.root = root
        self.commits: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.downloads: list[str] = []

    def api(self, hub_token=None, token=None, **_):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **_):
                hub.repos[repo_id] = {"private": private}

            def create_commit(self, repo_id, operations, commit_message, repo_type=None, **_):
                paths = []
                for op in operations:
                    target = hub.root / repo_id / op.path_in_repo
                    target.parent.mkdir(parents=True, exist_ok=True)
                    data = op.path_or_fileobj
                    target.write_bytes(data if isinstance(data, bytes) else open(data, "rb").read())
                    paths.append(op.path_in_repo)
                hub.commits.append({"repo_id": repo_id, "message": commit_message, "paths": sorted(paths)})
                from types import SimpleNamespace

                return SimpleNamespace(commit_url=f"https://hub.local/{repo_id}/commit/{len(hub.commits)}")

        return Api()

    def download(self, repo_id, filename, *, subfolder=None, revision=None, token=None, **_):
        from huggingface_hub.errors import EntryNotFoundError

        path = self.root / repo_id / (subfolder or "") / filename
        self.downloads.append(f"{repo_id}/{subfolder or ''}/{filename}".replace("//", "/"))
        if not path.is_file():
            raise EntryNotFoundError(f"{path} not found")
        return str(path)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    import huggingface_hub

    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
    return hub
