"""scripts/train.py end to end on a tiny local model: the positional recipe, the output folder, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TRAIN_CONVERSATIONS, extract_tiny_basis, tiny_recipe

from emotune.train import parse_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tiny_chat_model_dir, tmp_path_factory):
    """A recipe, data and basis for the tiny model; returns a function that writes a recipe."""
    from emotune.models import load_model

    root = tmp_path_factory.mktemp("run")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in TRAIN_CONVERSATIONS))
    model, tok = load_model(str(tiny_chat_model_dir))
    extract_tiny_basis(model, tok).save(root / "basis")

    def recipe(name: str = "r.yaml", **overrides) -> Path:
        body = tiny_recipe(tiny_chat_model_dir, data, root / "basis", root / name.replace(".yaml", ""), **overrides)
        path = root / name
        path.write_text(yaml.safe_dump(body))
        return path

    return root, recipe


def run_script(
    *args: str, env: dict | None = None, cwd: Path = ROOT, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [*(launcher or [sys.executable]), str(ROOT / "scripts" / "train.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600, cwd=cwd)


def test_positional_yaml_recipe_trains_and_writes_a_hub_ready_adapter(tiny_run, tiny_chat_model_dir):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, recipe = tiny_run
    result = run_script(str(recipe("ok.yaml")), "--learning_rate", "0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = root / "ok" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.yaml", "basis/basis.json"):
        assert (adapter / name).exists(), name
    saved = yaml.safe_load((adapter / "recipe.yaml").read_text())
    assert saved["learning_rate"] == 0.001  # the flag overrode the recipe
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    card = ModelCard.load(adapter / "README.md")
    assert "emotune" in card.data.tags and "desperate" in card.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"emotion_terms": [{"emotion": "desparate", "form": "penalize", "weight": 1, "tags": ["failure"]}]},
            "unknown emotion 'desparate'",
        ),
        (
            {"emotion_terms": [{"emotion": "calm", "form": "reward", "weight": 1, "tags": ["pressure"]}]},
            "tag(s) 'pressure' appear in no message",
        ),
        ({"emotion_layers": [9]}, "layer 9 is out of range"),
        ({"lerning_rate": 0.1}, "unknown key(s) lerning_rate"),
        ({"push_to_hub": True}, "push_to_hub: true, but no Hugging Face token"),
        ({"emotion_terms": [{"emotion": "calm", "form": "reward", "weight": -2, "tags": ["failure"]}]}, "is negative"),
    ],
)
def test_bad_recipes_fail_before_training_with_a_clear_message(tiny_run, overrides, message, tmp_path):
    root, recipe = tiny_run
    path = recipe("bad.yaml", output_dir=str(tmp_path / "out"), **overrides)
    result = run_script(str(path), env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_basis_for_another_model_is_refused(tiny_run, tmp_path):
    import torch
    from conftest import tiny_llama

    from emotune.basis import EmotionBasis

    root, recipe = tiny_run
    basis = EmotionBasis.load(root / "basis")
    other = tiny_llama(hidden=48)
    basis.denoised = torch.zeros(len(basis.layers), len(basis), 48)
    basis.raw = basis.denoised.clone()
    basis.neutral_pcs = [torch.zeros(0, 48) for _ in basis.layers]
    basis.centre = torch.zeros(len(basis.layers), 48)
    basis.save(tmp_path / "other")
    assert other.config.hidden_size == 48
    result = run_script(str(recipe("b.yaml", basis=str(tmp_path / "other"), output_dir=str(tmp_path / "o"))))
    assert result.returncode == 2 and "hidden size 48" in result.stderr


def test_every_shipped_recipe_parses():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU; there
    # we override that one flag and still check every other key and value of the recipe.
    cpu_only = [] if torch.cuda.is_available() else ["--bf16", "false"]
    for path in recipes:
        script, config, model_args = parse_recipe([str(path), *cpu_only])
        assert config.terms, path
        assert model_args.model_name_or_path


def test_malformed_yaml_names_the_line(tmp_path):
    from emotune.errors import ConfigError

    path = tmp_path / "broken.yaml"
    path.write_text("model_name_or_path: x\nemotion_terms: [\n  - {emotion: calm\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: malformed YAML"):
        parse_recipe([str(path)])


@pytest.mark.slow  # a training subprocess plus the full final evaluation (every shipped scenario and context)
def test_wandb_without_a_key_runs_offline_and_logs_emotion_and_eval_metrics(tiny_run, tmp_path):
    root, recipe = tiny_run
    env = {k: "" for k in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    path = recipe("wb.yaml", output_dir=str(tmp_path / "out"), report_to="wandb", run_name="tiny", emotion_eval=True)
    result = run_script(str(path), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("logs offline") == 1
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = runs[0].read_bytes()
    for key in (
        b"emotion/penalize_desperate",  # the emotion section of its own (tracking.EmotuneWandbCallback)
        b"emotion/proj_calm@failure",
        b"train/learning_rate",
        b"eval/shift_desperate@L2",
        b"eval/perplexity_change",
        b"eval/unethical_rate_high_adapted",
    ):
        assert key in logged, key
    assert (tmp_path / "out" / "eval" / "report.md").exists()
    card = (tmp_path / "out" / "adapter" / "README.md").read_text()
    assert "| desperate | 2 | failure |" in card and "model-index" in card  # the final eval's shifts, as a table


@pytest.mark.slow
def test_two_cpu_processes_give_the_same_run_as_one(tiny_run, tmp_path):
    from safetensors.torch import load_file

    root, recipe = tiny_run
    # SGD, so that an update is proportional to its gradient (Adam turns tiny float differences in near-zero
    # gradients into full-size steps); 4 examples = one global batch, so both runs see the same rows at every
    # step whatever the shuffling.
    common = dict(
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        learning_rate=0.05,
        lora_dropout=0.0,
        optim="sgd",
        max_examples=4,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    one = recipe("one.yaml", output_dir=str(tmp_path / "one"), per_device_train_batch_size=4, **common)
    two = recipe("two.yaml", output_dir=str(tmp_path / "two"), per_device_train_batch_size=2, **common)
    r1 = run_script(str(one))
    # `accelerate launch --num_processes 2 --cpu` falls back to ONE process unless MPI is set up
    # (accelerate needs --mpirun_hostfile for multi-CPU); torchrun is what accelerate runs on GPUs.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    r2 = run_script(str(two), launcher=launcher)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    w1 = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=1e-4)
    log1 = json.loads((tmp_path / "one" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    log2 = json.loads((tmp_path / "two" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    loss1 = [h["loss"] for h in log1 if "loss" in h]
    loss2 = [h["loss"] for h in log2 if "loss" in h]
    assert loss1 == pytest.approx(loss2, rel=1e-3)


def test_tokens_never_reach_the_outputs(tiny_run, tmp_path):
    root, recipe = tiny_run
    secrets = {"HF_TOKEN": "hf_FAKEtokenFAKEtokenFAKEtoken123", "WANDB_API_KEY": "wandbFAKEkey0123456789abcdef"}
    env = {
        **secrets,
        "WANDB_MODE": "offline",
        "HOME": str(tmp_path),
        "WANDB_DIR": str(tmp_path),
        "HF_HOME": str(tmp_path),
    }
    path = recipe(
        "secret.yaml",
        output_dir=str(tmp_path / "out"),
        report_to="wandb",
        emotion_eval=True,
        save_strategy="steps",
        save_steps=1,
    )
    result = run_script(str(path), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files) and any(p.suffix == ".wandb" for p in files)
    for p in files:
        data = p.read_bytes()
        for value in secrets.values():
            assert value.encode() not in data, f"{value[:6]}... leaked into {p}"
    for value in secrets.values():
        assert value not in result.stdout and value not in result.stderr


def test_an_earlier_run_is_neither_overwritten_nor_mixed_in_by_accident(tiny_run, tmp_path):
    root, recipe = tiny_run
    path = recipe("again.yaml", output_dir=str(tmp_path / "out"))
    assert run_script(str(path)).returncode == 0
    again = run_script(str(path))
    assert again.returncode == 2 and "holds an earlier emotune run" in again.stderr
    assert run_script(str(path), "--overwrite_output_dir", "true").returncode == 0
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    foreign = run_script(str(recipe("foreign.yaml", output_dir=str(tmp_path / "foreign"))))
    assert foreign.returncode == 2 and "holds files from something else" in foreign.stderr
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_emotion_terms_on_the_command_line_accept_a_json_list(tiny_run):
    _, recipe = tiny_run
    terms = '[{"emotion": "calm", "form": "hold", "weight": 1, "tags": ["neutral"]}, {"form": "retain", "weight": 2}]'
    _, config, _ = parse_recipe([str(recipe("json.yaml")), "--emotion_terms", terms])
    assert [(t.form, t.weight) for t in config.terms] == [("hold", 1.0), ("retain", 2.0)]


def test_state_forms_that_name_no_emotion_pass_the_basis_check(tiny_run, tiny_chat_model_dir):
    """retain and kl act on whole hidden states: the check that every term's emotion is in the basis skips them
    (it once refused the pre-registered efficacy recipe with "'' is not in the basis")."""
    from emotune.basis import EmotionBasis
    from emotune.models import load_model
    from emotune.train import check_basis_fit

    root, recipe = tiny_run
    terms = '[{"emotion": "calm", "form": "hold", "weight": 1, "tags": ["neutral"]}, {"form": "retain", "weight": 2}]'
    _, config, _ = parse_recipe([str(recipe("state.yaml")), "--emotion_terms", terms])
    model, _ = load_model(str(tiny_chat_model_dir))
    check_basis_fit(config, model, EmotionBasis.load(root / "basis"))


def test_lora_up_to_the_target_layer_leaves_the_layers_above_it_frozen(tiny_chat_model_dir):
    from peft import LoraConfig, get_peft_model

    from emotune.models import load_model
    from emotune.train import lora_layers
    from emotune.trainer import EmotuneConfig

    model, _ = load_model(str(tiny_chat_model_dir))
    terms = [{"emotion": "calm", "form": "hold", "weight": 1, "tags": ["neutral"], "layers": [-2]}]
    config = EmotuneConfig(output_dir="unused", use_cpu=True, bf16=False, emotion_layers=[1], emotion_terms=terms)
    assert lora_layers(config, model, default_layer=0) == [0, 1, 2]  # -2 of 4 layers is layer 2
    peft = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1, 2])
    names = [n for n, _ in get_peft_model(model, peft).named_parameters() if "lora_" in n]
    assert names and all(".layers.3." not in n for n in names) and any(".layers.2." in n for n in names)


def test_truncation_check_counts_the_targeted_tokens_a_length_cut_drops():
    from emotune.train import truncation_loss
    from emotune.trainer import parse_terms

    bits = {"assistant": 0, "all": 1, "system": 2, "user": 3, "tool": 4, "failure": 5}
    a, f, t = 1 << 0, 1 << 5, 1 << 4
    rows = [
        {"input_ids": [0] * 6, "tag_bits": [0, t | f, a | f, a | f, a, a | f]},  # targeted at 2, 3 and 5
        {"input_ids": [0] * 3, "tag_bits": [0, a | f, 0]},
    ]
    terms = parse_terms([{"emotion": "calm", "form": "hold", "weight": 1, "tags": ["failure"]}])
    cut = truncation_loss(rows, bits, terms, max_length=4)
    assert cut == {"targeted_tokens": 4, "dropped_tokens": 1, "truncated_conversations": 1, "needed_max_length": 6}
    assert truncation_loss(rows, bits, terms, max_length=6)["dropped_tokens"] == 0


@pytest.mark.slow
def test_programme_trains_every_arm_and_seed_into_its_own_folder(tiny_run):
    root, recipe = tiny_run
    path = recipe("prog.yaml", max_steps=1)
    out = root / "prog"
    command = [sys.executable, str(ROOT / "scripts" / "programme.py"), str(path), "--arms", "emotion,random,sft"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [*command, "--seeds", "1", "--out", str(out), "--no-eval"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    controls = {}
    for arm in ("emotion", "random", "sft"):
        info = json.loads((out / f"{arm}-s1" / "adapter" / "emotune_run.json").read_text())
        controls[arm] = (info["control"], info["seed"])
    assert controls == {"emotion": ("none", 1), "random": ("random", 1), "sft": ("sft", 1)}


def test_programme_evaluates_every_adapter_with_the_sft_arm_as_control(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from programme import eval_command, train_commands
    finally:
        sys.path.pop(0)
    commands = train_commands("r.yaml", ["emotion", "sft"], [1, 2], tmp_path, ["--max_steps", "4"])
    assert [c[c.index("--output_dir") + 1] for c in commands] == [
        str(tmp_path / n) for n in ("emotion-s1", "sft-s1", "emotion-s2", "sft-s2")
    ]
    assert all(c[-2:] == ["--max_steps", "4"] and c[c.index("--seed") + 1] in "12" for c in commands)
    runs = [tmp_path / "emotion-s1", tmp_path / "sft-s1"]
    command = eval_command("m", runs, tmp_path, [])
    assert f"emotion-s1={tmp_path / 'emotion-s1' / 'adapter'}" in command
    assert command[command.index("--control") + 1] == "sft-s1"
