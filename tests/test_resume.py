"""Interrupted training: a run SIGKILLed after a checkpoint and resumed ends exactly where an uninterrupted run
ends (adapter weights and logged emotion metrics), and keeps logging into the same W&B run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TRAIN_CONVERSATIONS, extract_tiny_basis, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]

# Measured: on fp32 CPU the resumed run is bit-identical to the uninterrupted one (max |diff| = 0.0 for every
# adapter weight and every logged metric), because the checkpoint restores the optimizer, scheduler and RNG
# states and the seeded sampler replays the same batch order. So the tolerance is zero; any drift is a bug.
ATOL = 0.0

MAX_STEPS, SAVE_STEPS, KILL_AFTER = 8, 2, 4
# 8 conversations in batches of 3: 3 steps an epoch, so checkpoint-4 falls inside the second epoch and the
# resumed run must skip exactly one batch of a reshuffled epoch.
BATCH = 3


# Runs scripts/train.py's main with a pause after every step, so that the test can kill it between
# checkpoint-4 and checkpoint-6 on a fast machine too. Nothing else differs from scripts/train.py.
SLOW_TRAIN = """
import sys, time
from transformers import TrainerCallback
import emotune.trainer

class Pause(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.5)

init = emotune.trainer.EmotuneTrainer.__init__

def patched(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(Pause())

emotune.trainer.EmotuneTrainer.__init__ = patched
from emotune.train import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def run_inputs(tiny_chat_model_dir, tmp_path_factory):
    """Training data and a basis for the tiny chat model."""
    from emotune.models import load_model

    root = tmp_path_factory.mktemp("resume")
    (root / "data.jsonl").write_text("".join(json.dumps(c) + "\n" for c in TRAIN_CONVERSATIONS))
    model, tok = load_model(str(tiny_chat_model_dir))
    extract_tiny_basis(model, tok).save(root / "basis")
    return root


def write_recipe(root: Path, model_dir: Path, out: Path) -> Path:
    body = tiny_recipe(
        model_dir,
        root / "data.jsonl",
        root / "basis",
        out,
        lora_dropout=0.1,  # draws from the RNG at every step: the resumed run must restore its state
        # terms that are active on this random model from the first step, so the aux loss shapes the weights
        emotion_terms=[
            {"emotion": "calm", "form": "penalize", "weight": 1.0, "tags": ["failure"]},
            {"emotion": "desperate", "form": "reward", "weight": 1.0, "tags": ["failure"], "target": 0.5},
        ],
        drift_weight=0.1,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=0.01,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        seed=7,
        report_to="wandb",
        max_length=64,
    )
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(body))
    return path


def environment(wandb_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY")}
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_SILENT": "true",
        "HOME": str(wandb_dir),
    }


def wandb_ids(wandb_dir: Path) -> list[str]:
    """The run id of every offline run folder (``offline-run-<date>_<time>-<id>``) under ``wandb_dir``."""
    return sorted(p.name.split("-", 3)[3] for p in (wandb_dir / "wandb").glob("offline-run-*"))


def readable(path: Path) -> bool:
    """Whether ``path`` holds whole JSON (the kill may land while Trainer writes it)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def emotion_log(output_dir: Path) -> dict[int, dict[str, float]]:
    """Step -> the loss and every ``emotion/...`` value logged at that step, from the last checkpoint's state."""
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return {
        h["step"]: {k: v for k, v in h.items() if k.startswith("emotion/") or k == "loss"}
        for h in state["log_history"]
        if "emotion/lm_loss" in h
    }


def test_a_killed_run_resumes_to_the_same_weights_metrics_and_wandb_run(run_inputs, tiny_chat_model_dir, tmp_path):
    from safetensors.torch import load_file

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed_wandb, straight_wandb = tmp_path / "wandb-killed", tmp_path / "wandb-straight"
    train = [sys.executable, str(ROOT / "scripts" / "train.py")]
    # the uninterrupted run, alongside the one we kill
    reference = subprocess.Popen(
        [*train, str(write_recipe(run_inputs, tiny_chat_model_dir, straight))],
        env=environment(straight_wandb),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    slow = tmp_path / "slow_train.py"
    slow.write_text(SLOW_TRAIN)
    recipe = write_recipe(run_inputs, tiny_chat_model_dir, killed)
    victim = subprocess.Popen(
        [sys.executable, str(slow), str(recipe)],
        env=environment(killed_wandb),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches every process it started
    )
    try:
        deadline = time.monotonic() + 300
        while not (killed / f"checkpoint-{KILL_AFTER}" / "trainer_state.json").exists():
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        assert victim.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

    assert not (killed / "adapter").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    complete = [s for s in steps if readable(killed / f"checkpoint-{s}" / "trainer_state.json")]
    assert complete and complete[-1] < MAX_STEPS
    resumed_from = complete[-1]
    # A kill while Trainer saves leaves a checkpoint folder without trainer_state.json (written last). Make sure
    # there is one beyond the last complete checkpoint: resuming must skip it, not load half a checkpoint.
    partial = killed / f"checkpoint-{resumed_from + SAVE_STEPS}"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    (partial / "trainer_state.json").unlink(missing_ok=True)
    first_id = (killed / "wandb_run_id").read_text().strip()

    resumed = subprocess.run(
        [*train, str(recipe), "--resume_from_checkpoint", "true"],
        env=environment(killed_wandb),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{partial}: incomplete" in resumed.stderr
    assert f"Resuming from {killed / f'checkpoint-{resumed_from}'}" in resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:] if reference.stderr else ""

    # the same adapter, to the bit
    w_resumed = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    w_straight = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert w_resumed.keys() == w_straight.keys() and w_resumed
    for key in w_straight:
        torch.testing.assert_close(w_resumed[key], w_straight[key], atol=ATOL, rtol=0, msg=key)
    lora_b = [k for k in w_straight if "lora_B" in k]
    assert lora_b and any(w_straight[k].abs().max() > 0 for k in lora_b)  # it trained (LoRA B starts at 0)

    # the same emotion metrics at every step, the ones logged after the resume included
    log_resumed, log_straight = emotion_log(killed), emotion_log(straight)
    assert sorted(log_straight) == list(range(1, MAX_STEPS + 1))
    assert sorted(log_resumed) == sorted(log_straight)
    assert any(v["emotion/aux_loss"] > 0 for v in log_straight.values())  # the emotion terms were on
    for step in range(resumed_from + 1, MAX_STEPS + 1):
        assert log_resumed[step].keys() == log_straight[step].keys()
        assert any(k.startswith("emotion/proj_") for k in log_straight[step])
        for key, value in log_straight[step].items():
            assert log_resumed[step][key] == pytest.approx(value, abs=ATOL, rel=0), (step, key)
    assert log_resumed == log_straight

    # W&B: the resumed process continued the killed run's id; the separate run got its own
    assert wandb_ids(killed_wandb) == [first_id, first_id]
    assert wandb_ids(straight_wandb) == [(straight / "wandb_run_id").read_text().strip()]
    assert first_id != wandb_ids(straight_wandb)[0]


def test_resume_refuses_an_output_dir_without_a_complete_checkpoint(tmp_path):
    from emotune.errors import ConfigError
    from emotune.train import last_checkpoint, resolve_resume

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_his')  # cut short
    config = type("Config", (), {"resume_from_checkpoint": "true", "output_dir": str(out)})()
    assert last_checkpoint(out) is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(config)
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (out / "checkpoint-10").mkdir()  # empty: killed at once
    assert resolve_resume(config) == str(out / "checkpoint-1")
    config.resume_from_checkpoint = str(out / "checkpoint-2")  # an explicit path is the user's choice
    assert resolve_resume(config) == str(out / "checkpoint-2")


def test_the_wandb_run_id_is_stored_and_a_user_set_id_wins(tmp_path, monkeypatch):
    from emotune.train import WANDB_ID_FILE, wandb_run_identity

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    config = type("Config", (), {"report_to": ["wandb"], "output_dir": str(tmp_path / "a")})()
    with wandb_run_identity(config, True) as first:
        assert first and os.environ["WANDB_RUN_ID"] == first and os.environ["WANDB_RESUME"] == "allow"
    assert "WANDB_RUN_ID" not in os.environ and "WANDB_RESUME" not in os.environ  # restored
    assert (tmp_path / "a" / WANDB_ID_FILE).read_text().strip() == first
    with wandb_run_identity(config, True) as again:
        assert again == first
    other = type("Config", (), {"report_to": ["wandb"], "output_dir": str(tmp_path / "b")})()
    with wandb_run_identity(other, True) as second:
        assert second != first
    monkeypatch.setenv("WANDB_RUN_ID", "mine-123")
    monkeypatch.setenv("WANDB_RESUME", "must")
    with wandb_run_identity(config, True) as chosen:
        assert chosen == "mine-123" and os.environ["WANDB_RESUME"] == "must"
    assert os.environ["WANDB_RUN_ID"] == "mine-123"
    monkeypatch.delenv("WANDB_RUN_ID")
    with wandb_run_identity(config, True) as later:  # a later resume without the variable keeps the user's id
        assert later == "mine-123"
    off = type("Config", (), {"report_to": ["none"], "output_dir": str(tmp_path / "c")})()
    with wandb_run_identity(off, True) as none:
        assert none is None and not (tmp_path / "c").exists()
    with wandb_run_identity(config, False) as rank1:
        assert rank1 is None
