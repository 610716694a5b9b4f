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
from emotune.trainer import EmotionCollator, EmotuneConfig, EmotuneTrainer, parse_terms, tag_mask

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


def build(setup, tmp_path, *, terms=TERMS, n=8, model_state=None, lora_init=True, **overrides) -> EmotuneTrainer:
    tok, state, basis = setup
    model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
    model.load_state_dict(model_state or state)
    model.config.pad_token_id = tok.pad_token_id
    bits = tag_index({"failure", "neutral"})
    rows = [tokenize_conversation(c, tok, bits) for c in conversations(n)]
    args = dict(COMMON, output_dir=str(tmp_path / "out"), emotion_terms=terms, emotion_layers=[2])
    args.update(overrides)
    config = EmotuneConfig(**args)
    peft = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=lora_init,
    )
    torch.manual_seed(0)  # the adapter's initialisation (random B too, with lora_init=False)
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


# ----------------------------------------------------------------------------- base-relative forms, masks, controls

PUSH = [
    {"emotion": "desperate", "form": "push", "direction": "down", "delta": 0.2, "weight": 1.0, "tags": ["failure"]},
    {"emotion": "calm", "form": "push", "direction": "up", "delta": 0.2, "weight": 1.0, "tags": ["failure"]},
]
HOLD = [{"emotion": e, "form": "hold", "weight": 1.0, "tags": ["neutral"]} for e in ("desperate", "calm")]
# one term of every form, for the grids below
EVERY_FORM = {
    "penalize": TERMS[0],
    "reward": TERMS[1],
    "match": {"emotion": "calm", "form": "match", "weight": 1.0, "tags": ["failure"], "target": 0.5},
    "push_down": PUSH[0],
    "push_up": PUSH[1],
    "hold": HOLD[0],
    "retain": {"form": "retain", "weight": 1.0, "tags": ["neutral"]},
    "kl": {"form": "kl", "weight": 1.0, "tags": ["neutral"]},
}


class _GradProbe:
    """A callback that keeps the LoRA gradients of the first optimizer step (after accumulation)."""

    def __init__(self):
        self.grads: dict = {}

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        return lambda *args, **kwargs: None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {
                k: p.grad.clone() for k, p in model.named_parameters() if "lora_" in k and p.grad is not None
            }


def _first_step_grads(setup, tmp_path, terms, **overrides):
    trainer = build(setup, tmp_path, terms=terms, n=4, max_steps=1, lora_init=False, **overrides)
    probe = _GradProbe()
    trainer.add_callback(probe)
    trainer.train()
    return probe.grads


# accepted configurations that change how the forward runs: padding-free, accumulation, gradient checkpointing
GRID = [
    dict(padding_free=False, gradient_accumulation_steps=1, gradient_checkpointing=False),
    dict(padding_free=True, gradient_accumulation_steps=2, gradient_checkpointing=False),
    dict(padding_free=False, gradient_accumulation_steps=2, gradient_checkpointing=True),
    dict(padding_free=True, gradient_accumulation_steps=1, gradient_checkpointing=True),
]


@pytest.mark.parametrize("grid", GRID, ids=lambda g: "-".join(f"{k[:6]}{int(v)}" for k, v in g.items()))
def test_every_form_has_a_nonzero_gradient_in_every_accepted_configuration(setup, tmp_path, grid):
    # the same step with every emotion weight 0 is the reference: what the terms add is their gradient
    batch = dict(grid, per_device_train_batch_size=4 // grid["gradient_accumulation_steps"])
    zero = _first_step_grads(setup, tmp_path / "zero", [{**TERMS[0], "weight": 0.0}], **batch)
    assert zero, "no LoRA gradient at all"
    # thresholds far out, so that no hinge is satisfied by the random initial adapter: a zero there would be right
    far = {"margin": -100.0, "target": 100.0, "delta": 100.0}
    cases = {name: [{**term, **{k: v for k, v in far.items() if k in term}}] for name, term in EVERY_FORM.items()}
    cases["drift"] = [{**TERMS[0], "weight": 0.0}]
    for name, terms in cases.items():
        extra = {"drift_weight": 1.0} if name == "drift" else {}
        grads = _first_step_grads(setup, tmp_path / name, terms, **batch, **extra)
        moved = sum((grads[k] - zero[k]).abs().sum().item() for k in zero)
        assert moved > 1e-7, f"{name}: the emotion term's gradient is zero under {grid}"


@pytest.mark.parametrize("key", ["label_smoothing_factor", "compute_loss_func", "neftune_noise_alpha"])
def test_configurations_that_rerun_or_perturb_the_forward_are_refused_before_training(setup, tmp_path, key):
    if key == "compute_loss_func":
        with pytest.raises(ConfigError, match=r"^compute_loss_func: .*zeroes the emotion terms' gradient"):
            tok, state, basis = setup
            model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
            EmotuneTrainer(
                model=model,
                args=EmotuneConfig(**COMMON, output_dir=str(tmp_path), emotion_terms=TERMS, emotion_layers=[2]),
                train_dataset=Dataset.from_list([]),
                processing_class=tok,
                basis=basis,
                tag_bits=tag_index({"failure"}),
                compute_loss_func=lambda *a, **k: 0,
            )
        return
    terms = PUSH if key == "neftune_noise_alpha" else TERMS
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        EmotuneConfig(**COMMON, output_dir=str(tmp_path), emotion_terms=terms, **{key: 0.1})


def _projection_shift(trainer, emotion: str, tag: str) -> float:
    """Mean projection of ``emotion`` on the assistant's ``tag`` tokens, adapted minus base, over the data."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model = trainer.model.eval()
    layer = 2
    vector = trainer.basis.vectors(layer)[trainer.basis.index(emotion)]
    mask = tag_mask(batch["tag_bits"], [tag], trainer.tag_bits) & tag_mask(
        batch["tag_bits"], ["assistant"], trainer.tag_bits
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    from emotune.hooks import capture

    with torch.no_grad():
        with capture(model, [layer]) as adapted:
            model(**inputs)
        with model.disable_adapter(), capture(model, [layer]) as base:
            model(**inputs)
    moved = (adapted[layer] - base[layer]) @ vector / trainer.basis.scale(layer)
    return (moved * mask).sum().item() / mask.sum().item()


def test_push_moves_the_projections_away_from_base_in_their_directions_and_hold_keeps_them(setup, tmp_path):
    strong = dict(max_steps=8, learning_rate=5e-3, per_device_train_batch_size=4)
    hold = [{**t, "weight": 500.0} for t in HOLD]
    pushed = build(setup, tmp_path / "push", terms=[{**t, "weight": 50.0} for t in PUSH] + hold, **strong)
    pushed.train()
    assert _projection_shift(pushed, "desperate", "failure") < -0.05
    assert _projection_shift(pushed, "calm", "failure") > 0.05
    held = [abs(_projection_shift(pushed, e, "neutral")) for e in ("desperate", "calm")]
    # the same push without a hold moves the neutral tokens more
    free = build(setup, tmp_path / "free", terms=[{**t, "weight": 50.0} for t in PUSH], **strong)
    free.train()
    loose = [abs(_projection_shift(free, e, "neutral")) for e in ("desperate", "calm")]
    assert sum(held) < sum(loose)


def test_terms_cover_assistant_tokens_by_default_and_other_roles_only_when_asked(setup, tmp_path):
    trainer = build(setup, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    bits = batch["tag_bits"]
    failure = tag_mask(bits, ["failure"], trainer.tag_bits)
    tool = tag_mask(bits, ["tool"], trainer.tag_bits)
    assert (failure & tool).any(), "the data has failure-tagged tool tokens"
    default, everyone = parse_terms([TERMS[0], {**TERMS[0], "roles": ["all"]}])
    mask = lambda term: tag_mask(bits, term.tags, trainer.tag_bits) & tag_mask(bits, term.mask_tags, trainer.tag_bits)  # noqa: E731
    assert not (mask(default) & tool).any() and mask(default).any()
    assert (mask(everyone) & tool).any()


def test_term_coverage_is_logged_as_the_share_of_rows_with_the_tag(setup, tmp_path):
    trainer = build(setup, tmp_path, per_device_train_batch_size=4, max_steps=1)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "emotion/penalize_desperate_coverage" in h]
    assert logged and logged[0]["emotion/penalize_desperate_coverage"] == pytest.approx(0.5)  # half fail


@pytest.mark.parametrize("forms", [("push_down", "hold"), ("retain", "kl")])
def test_base_relative_forms_are_invariant_to_accumulation_and_padding_free_batches(setup, tmp_path, forms):
    terms = [EVERY_FORM[f] for f in forms]
    kw = dict(terms=terms, n=4, max_steps=1, lora_init=False)
    a = build(setup, tmp_path / "a", per_device_train_batch_size=4, **kw)
    b = build(setup, tmp_path / "b", per_device_train_batch_size=1, gradient_accumulation_steps=4, **kw)
    c = build(setup, tmp_path / "c", per_device_train_batch_size=4, padding_free=True, **kw)
    for t in (a, b, c):
        t.train()
    sa, sb, sc = lora_state(a), lora_state(b), lora_state(c)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(sc[k], sa[k], atol=1e-5, rtol=1e-4)


def test_random_control_uses_seeded_unit_directions_in_place_of_the_emotion_vectors(setup, tmp_path):
    one = build(setup, tmp_path / "1", control="random", control_seed=7)
    two = build(setup, tmp_path / "2", control="random", control_seed=7)
    other = build(setup, tmp_path / "3", control="random", control_seed=8)
    vectors = one.control_vectors[2]
    assert vectors.shape == (2, 32)  # one per targeted emotion (desperate, calm)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(vectors, two.control_vectors[2])
    assert not torch.allclose(vectors, other.control_vectors[2])
    real = one.basis.vectors(2)[[one.basis.index("desperate"), one.basis.index("calm")]]
    assert (vectors @ real.T).abs().max() < 0.9
    one.train()
    logged = set().union(*(h.keys() for h in one.state.log_history))
    assert "emotion/penalize_desperate" in logged


def test_sft_control_sets_every_emotion_weight_to_zero(tmp_path):
    config = EmotuneConfig(**COMMON, output_dir=str(tmp_path), emotion_terms=TERMS, control="sft")
    assert config.emotion_weight_scale == 0.0 and config.emotion_active


def test_schedule_factors_are_logged_by_training_progress(setup, tmp_path):
    terms = [PUSH[0], EVERY_FORM["retain"]]
    trainer = build(setup, tmp_path, terms=terms, max_steps=2, emotion_schedule="push_to_retain")
    trainer.train()
    retain = [h["emotion/retain_factor"] for h in trainer.state.log_history if "emotion/retain_factor" in h]
    assert retain == pytest.approx([0.0, 0.25])


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({"emotion": "calm", "form": "push", "weight": 1}, r"\[0\]\.delta: 0\.0 must be > 0 for push"),
        ({"emotion": "calm", "form": "push", "weight": 1, "delta": 0.1, "direction": "left"}, r"direction: 'left'"),
        (
            {"emotion": "calm", "form": "hold", "weight": 1, "delta": 0.1},
            r"\.delta: applies only to the form\(s\) push",
        ),
        ({"emotion": "calm", "form": "retain", "weight": 1}, r"\.emotion: the form 'retain' acts on whole"),
        ({"form": "hold", "weight": 1}, r"missing 'emotion'"),
        ({"emotion": "calm", "form": "hold", "weight": 1, "roles": ["robot"]}, r"\.roles: \['robot'\] is not"),
        ({"emotion": "calm", "form": "hold", "weight": 1, "target": 0.1}, r"\.target: applies only"),
    ],
)
def test_bad_new_term_keys_fail_with_one_line_errors(term, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_terms([term])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("control", "placebo"), ("emotion_schedule", "cosine")])
def test_bad_control_or_schedule_is_refused(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: '{value}' is not one of"):
        EmotuneConfig(**COMMON, output_dir=str(tmp_path), **{key: value})


def test_the_saved_terms_parse_again_to_the_same_terms(tmp_path):
    terms = [*TERMS, *PUSH, *HOLD, EVERY_FORM["retain"], EVERY_FORM["kl"]]
    config = EmotuneConfig(**COMMON, output_dir=str(tmp_path), emotion_terms=terms)
    assert parse_terms(config.emotion_terms) == config.terms
