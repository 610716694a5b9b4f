"""EmotuneTrainer: what changes, what the auxiliary loss does to gradients, invariances, logging."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_fast_tokenizer, tiny_llama
from datasets import Dataset
from peft import LoraConfig

from emotune.basis import EmotionBasis
from emotune.conversations import Conversation, tag_index, tokenize_conversation
from emotune.corpus import Dialogue, Story
from emotune.errors import ConfigError
from emotune.trainer import EmotionCollator, EmotuneConfig, EmotuneTrainer, parse_terms

TERMS = [
    {"emotion": "desperate", "form": "penalize", "weight": 1.0, "tags": ["failure"], "margin": -1.0},
    {"emotion": "calm", "form": "reward", "weight": 1.0, "tags": ["failure"], "target": 1.0},
]


# training arguments shared by the emotune runs and the plain-SFT reference
COMMON = dict(
    max_steps=2,
    per_device_train_batch_size=2,
    learning_rate=1e-2,
    logging_steps=1,
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    seed=0,
    lr_scheduler_type="constant",
    warmup_steps=0,
    max_grad_norm=0.0,
    dataloader_num_workers=0,
)


def conversations(n: int = 8) -> list[Conversation]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        fail = i % 2 == 0
        tail = " again" * rng.randint(0, 4)
        out.append(
            Conversation(
                f"c{i}",
                (
                    {"role": "user", "content": "Run the tests please." if fail else "What is the capital of France?"},
                    {
                        "role": "tool" if fail else "assistant",
                        "content": ("FAILED assert 1 == 2" if fail else "Paris.") + tail,
                        "tags": ["failure"] if fail else ["neutral"],
                    },
                    {
                        "role": "assistant",
                        "content": "It still fails; I will report it." + tail,
                        "tags": ["failure"] if fail else ["neutral"],
                    },
                ),
            )
        )
    return out


@pytest.fixture(scope="module")
def setup():
    tok = tiny_fast_tokenizer()
    model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    rng = random.Random(1)
    words = ["tests", "failed", "green", "deploy", "the", "assistant"]
    stories = [
        Story(e, f"{e} " + " ".join(rng.choice(words) for _ in range(15)))
        for e in ("calm", "desperate", "afraid", "happy", "sad")
        for _ in range(4)
    ]
    neutral = [
        Dialogue(
            str(i),
            (
                {"role": "user", "content": "what is the capital"},
                {"role": "assistant", "content": "Paris" + " ok" * i},
            ),
        )
        for i in range(6)
    ]
    basis = EmotionBasis.extract(model, tok, stories=stories, neutral=neutral, offset=2, progress=False)
    return tok, model.state_dict(), basis


def build(setup, tmp_path, *, terms=TERMS, n=8, model_state=None, **overrides) -> EmotuneTrainer:
    tok, state, basis = setup
    model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
    model.load_state_dict(model_state or state)
    model.config.pad_token_id = tok.pad_token_id
    bits = tag_index({"failure", "neutral"})
    rows = [tokenize_conversation(c, tok, bits) for c in conversations(n)]
    args = dict(COMMON, output_dir=str(tmp_path / "out"), emotion_terms=terms, emotion_layers=[2])
    args.update(overrides)
    config = EmotuneConfig(**args)
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    return EmotuneTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft,
        basis=basis,
        tag_bits=bits,
    )


def lora_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}


def test_parameters_change_and_only_lora_parameters_change(setup, tmp_path):
    trainer = build(setup, tmp_path)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed, "no parameter changed"
    assert all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)


def test_emotion_metrics_are_logged_through_the_trainer(setup, tmp_path):
    trainer = build(setup, tmp_path)
    trainer.train()
    logged = set().union(*(entry.keys() for entry in trainer.state.log_history))
    for key in (
        "emotion/penalize_desperate",
        "emotion/reward_calm",
        "emotion/proj_desperate@failure",
        "emotion/proj_calm@failure",
        "emotion/aux_loss",
        "emotion/lm_loss",
        "learning_rate",
    ):
        assert key in logged, key


def _grads(trainer):
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    loss.backward()
    return {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}


def test_the_auxiliary_loss_has_a_nonzero_gradient(setup, tmp_path):
    # Same batch, same forward; only the emotion weights differ. If the captured activations
    # came from a no-grad forward (trap 3), the gradients would be identical.
    zero = _grads(build(setup, tmp_path, terms=[{**t, "weight": 0.0} for t in TERMS]))
    strong = _grads(build(setup, tmp_path, terms=[{**t, "weight": 10.0} for t in TERMS]))
    diff = sum((strong[k] - zero[k]).abs().sum() for k in zero)
    assert diff > 1e-6
    # layers above the hooked layer 2 cannot receive gradient from the emotion terms
    upper = [k for k in zero if ".layers.3." in k]
    assert upper and all(torch.allclose(strong[k], zero[k], atol=1e-7) for k in upper)


def test_batch_4_accumulation_1_equals_batch_1_accumulation_4(setup, tmp_path):
    a = build(setup, tmp_path / "a", n=4, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    b = build(setup, tmp_path / "b", n=4, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=4)
    a.train()
    b.train()
    sa, sb = lora_state(a), lora_state(b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=2e-6, rtol=1e-4)


def test_with_every_weight_zero_the_run_equals_plain_sft_step_by_step(setup, tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok, state, _ = setup
    emotune = build(setup, tmp_path / "e", terms=[{**t, "weight": 0.0} for t in TERMS], max_steps=3)
    emotune.train()

    model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
    model.load_state_dict(state)
    model.config.pad_token_id = tok.pad_token_id
    collator = EmotionCollator(tok.pad_token_id)
    plain_collate = lambda feats: {k: v for k, v in collator(feats).items() if k != "tag_bits"}  # noqa: E731
    config = SFTConfig(
        **{**COMMON, "max_steps": 3},
        output_dir=str(tmp_path / "p"),
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    plain = SFTTrainer(
        model=model,
        args=config,
        train_dataset=emotune.train_dataset,
        processing_class=tok,
        data_collator=plain_collate,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    plain.train()
    losses_e = [h["loss"] for h in emotune.state.log_history if "loss" in h]
    losses_p = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert len(losses_e) == len(losses_p) == 3
    assert losses_e == pytest.approx(losses_p, rel=1e-5)
    se, sp = lora_state(emotune), lora_state(plain)
    for k in se:
        torch.testing.assert_close(se[k], sp[k])


def test_drift_term_keeps_the_other_emotions_and_skips_the_base_pass_when_off(setup, tmp_path, monkeypatch):
    calls = []
    original = EmotuneTrainer._base_pass

    def spy(self, model, inputs):
        calls.append(1)
        return original(self, model, inputs)

    monkeypatch.setattr(EmotuneTrainer, "_base_pass", spy)
    build(setup, tmp_path / "off", drift_weight=0.0).train()
    assert calls == []
    trainer = build(setup, tmp_path / "on", drift_weight=1.0)
    trainer.train()
    assert len(calls) == 2
    drift = [h["emotion/drift"] for h in trainer.state.log_history if "emotion/drift" in h]
    assert drift[0] == pytest.approx(0.0, abs=1e-8)  # adapter starts at zero: the model equals its base
    assert "desperate" not in trainer.drift_emotions and "happy" in trainer.drift_emotions


def test_bad_terms_fail_before_training():
    with pytest.raises(ConfigError, match=r"emotion_terms\[0\]\.emotion: unknown emotion 'desparate'"):
        parse_terms([{"emotion": "desparate", "form": "penalize", "weight": 1}])
    with pytest.raises(ConfigError, match=r"emotion_terms\[0\]\.weight: -1\.0 is negative"):
        parse_terms([{"emotion": "calm", "form": "reward", "weight": -1}])
    with pytest.raises(ConfigError, match=r"form: 'punish' is not one of penalize, reward, match"):
        parse_terms([{"emotion": "calm", "form": "punish", "weight": 1}])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) tag"):
        parse_terms([{"emotion": "calm", "form": "reward", "weight": 1, "tag": ["failure"]}])


def test_packing_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="packing"):
        EmotuneConfig(output_dir=str(tmp_path), packing=True, use_cpu=True, bf16=False)


def test_a_layer_the_basis_lacks_is_refused(setup, tmp_path):
    tok, state, basis = setup
    narrow = EmotionBasis(
        basis.emotions,
        [1],
        basis.denoised[1:2],
        basis.raw[1:2],
        basis.resid_norm[1:2],
        basis.neutral_pcs[1:2],
        1,
        dict(basis.metadata),
    )
    with pytest.raises(ConfigError, match=r"layer 2 is not in this basis"):
        build((tok, state, narrow), tmp_path)


def test_padding_free_batches_train_exactly_like_padded_ones(setup, tmp_path):
    """One packed row per batch (no padding) gives the padded run's losses, emotion terms, drift and weights."""
    padded = build(setup, tmp_path / "padded", drift_weight=1.0, max_steps=3)
    packed = build(setup, tmp_path / "packed", drift_weight=1.0, max_steps=3, padding_free=True)
    batch = packed.data_collator([packed.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["segments"].unique().tolist() == [0, 1]
    padded.train()
    packed.train()
    for key in ("loss", "emotion/aux_loss", "emotion/reward_calm", "emotion/penalize_desperate", "emotion/drift"):
        a = [h[key] for h in padded.state.log_history if key in h]
        b = [h[key] for h in packed.state.log_history if key in h]
        assert len(a) == len(b) == 3, key
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), key
    sa, sb = lora_state(padded), lora_state(packed)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-4)


def test_padding_free_collator_keeps_conversations_apart():
    collator = EmotionCollator(0, padding_free=True, pad_to_multiple_of=8)
    rows = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "tag_bits": [1, 1, 1]},
        {"input_ids": [8, 9], "labels": [-100, 9], "tag_bits": [0, 2]},
    ]
    batch = collator(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]  # no prediction across a boundary
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert batch["tag_bits"].tolist() == [[1, 1, 1, 0, 2, 0, 0, 0]]


def test_packing_is_refused_with_the_padding_free_alternative(tmp_path):
    with pytest.raises(ConfigError, match="padding_free: true"):
        EmotuneConfig(output_dir=str(tmp_path), packing=True)
