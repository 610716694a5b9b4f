"""Atomic artefacts: a save that is interrupted (an exception, or SIGKILL) leaves the previous basis, report or
adapter byte-for-byte intact and loadable, and the next save is not confused by what the killed one left."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_fast_tokenizer, tiny_llama

import emotune.io
from emotune.basis import EmotionBasis
from emotune.corpus import Dialogue, Story

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir())


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_fast_tokenizer()
    model = tiny_llama(layers=4, hidden=32, vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    stories = [
        Story(e, f"{e} the tests failed again and the deploy passed {i}")
        for e in ("calm", "desperate")
        for i in range(3)
    ]
    neutral = [
        Dialogue(
            str(i), ({"role": "user", "content": "capital?"}, {"role": "assistant", "content": "Paris" * (i + 1)})
        )
        for i in range(4)
    ]
    basis = EmotionBasis.extract(model, tok, stories=stories, neutral=neutral, offset=2, progress=False)
    return model, tok, basis


# -- (a) a basis folder ---------------------------------------------------------------------------------


def test_an_interrupted_basis_save_leaves_the_old_basis(tiny, tmp_path, monkeypatch):
    _, _, basis = tiny
    target = tmp_path / "basis"
    basis.save(target)
    before = snapshot(target)
    newer = EmotionBasis.load(target)
    newer.denoised = newer.denoised + 1.0

    import emotune.basis

    real = emotune.basis.save_file

    def half(tensors, path, *args, **kwargs):  # the tensors are written, then the process is interrupted
        real(tensors, path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(emotune.basis, "save_file", half)
    with pytest.raises(KeyboardInterrupt):
        newer.save(target)
    assert snapshot(target) == before
    assert siblings(target) == ["basis"]  # no temporary folder left behind
    loaded = EmotionBasis.load(target)
    assert torch.equal(loaded.denoised, basis.denoised)

    # the same through the report writer that runs inside the basis save (validation's `extra`)
    monkeypatch.undo()

    def report_then_fail(folder: Path) -> None:
        emotune.io.write_json_atomic(folder / "report.json", {"validation": "half"})
        raise RuntimeError("plotting failed")

    with pytest.raises(RuntimeError, match="plotting failed"):
        newer.save(target, extra=report_then_fail)
    assert snapshot(target) == before and siblings(target) == ["basis"]
    newer.save(target)  # and a save that completes replaces it
    assert torch.equal(EmotionBasis.load(target).denoised, newer.denoised)
    assert siblings(target) == ["basis"]


# -- (b) an evaluation report and a basis validation report ----------------------------------------------


@pytest.fixture(scope="module")
def report(tiny):
    from emotune.evaluate.run import evaluate_model

    model, tok, basis = tiny
    with torch.no_grad():
        return evaluate_model(model, tok, basis, limit=2, progress=False, sections=("activations",))


def test_an_interrupted_report_write_leaves_the_old_report(report, tmp_path, monkeypatch):
    import emotune.evaluate.report as report_module
    from emotune.evaluate.report import write_report

    target = tmp_path / "eval"
    write_report(report, target)
    before = snapshot(target)
    assert "report.json" in before and "report.md" in before and any(k.endswith(".png") for k in before)

    def fail(path, text):  # report.md is written last, after report.json and the plots
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "write_text_atomic", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report({**report, "targeted": ["desperate"]}, target)
    assert snapshot(target) == before
    assert siblings(target) == ["eval"]
    assert json.loads((target / "report.json").read_text())["targeted"] == report["targeted"]


def test_the_basis_validation_report_is_written_inside_the_atomic_basis_save(tiny, tmp_path, monkeypatch):
    """write_basis_report writes into the folder it is given; emotune calls it only through EmotionBasis.save's
    ``extra``, so an interrupted validation report leaves the old basis folder, report included."""
    import emotune.validation as validation

    _, _, basis = tiny
    fake = {"model": basis.metadata.get("model"), "geometry": {}, "validation": None}
    target = tmp_path / "basis"
    # a good folder with a report first
    basis.save(target, extra=lambda folder: emotune.io.write_json_atomic(folder / "report.json", fake))
    before = snapshot(target)

    def broken(*args, **kwargs):
        raise RuntimeError("matplotlib crashed")

    monkeypatch.setattr(validation, "plot_pca", broken)
    monkeypatch.setattr(validation, "geometry", lambda basis: {})
    with pytest.raises(RuntimeError, match="matplotlib crashed"):
        basis.save(target, extra=lambda folder: validation.write_basis_report(fake, basis, folder))
    assert snapshot(target) == before and siblings(target) == ["basis"]
    assert json.loads((target / "report.json").read_text()) == fake


# -- (c) an adapter folder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_run(tiny, tmp_path_factory):
    """What save_adapter needs: a PEFT model, its tokenizer, the parsed recipe and a basis."""
    from peft import LoraConfig, get_peft_model

    from emotune.train import parse_recipe

    model, tok, basis = tiny
    root = tmp_path_factory.mktemp("adapter-run")
    recipe = root / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "tiny",
                "output_dir": str(root / "out"),
                "use_peft": True,
                "emotion_terms": [{"emotion": "calm", "form": "reward", "weight": 1.0, "tags": ["failure"]}],
                "use_cpu": True,
                "bf16": False,
                "report_to": "none",
            }
        )
    )
    script, config, model_args = parse_recipe([str(recipe)])
    torch.manual_seed(0)
    peft_model = get_peft_model(
        tiny_llama(layers=4, hidden=32, vocab=len(tok)),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    return SimpleNamespace(model=peft_model, processing_class=tok), script, config, model_args, basis


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_an_interrupted_adapter_save_leaves_the_old_adapter(adapter_run, monkeypatch):
    from peft import PeftModel

    import emotune.adapter
    from emotune.evaluate.run import load_adapter
    from emotune.train import save_adapter

    trainer, script, config, model_args, basis = adapter_run
    target = save_adapter(trainer, script, config, model_args, basis, None)
    before, weights = snapshot(target), lora_weights(trainer.model)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "basis/basis.json"} <= set(before)

    with torch.no_grad():  # "train" more, then save again; the model card (written last) fails
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(emotune.adapter, "model_card", fail)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(trainer, script, config, model_args, basis, None)
    assert snapshot(target) == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []
    base = tiny_llama(layers=4, hidden=32, vocab=len(trainer.processing_class))
    loaded = PeftModel.from_pretrained(base, str(target))
    for name, value in lora_weights(loaded).items():
        assert torch.equal(value, weights[name]), name
    wrapped, info = load_adapter(tiny_llama(layers=4, hidden=32, vocab=len(trainer.processing_class)), target)
    assert info["recipe"]["emotion_terms"][0]["emotion"] == "calm"


# -- the swap itself ----------------------------------------------------------------------------------------


def test_an_interruption_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """Where no atomic exchange exists (not Linux, or a file system without RENAME_EXCHANGE) the old folder is
    moved aside, then the new one renamed in: an interruption between the two must not lose the old one."""
    target = tmp_path / "art"
    with emotune.io.atomic_dir(target) as tmp:
        (tmp / "a.json").write_text('{"v": 1}')
    monkeypatch.setattr(emotune.io, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # target is aside; the new folder is not yet in place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(emotune.io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with emotune.io.atomic_dir(target) as tmp:
            (tmp / "a.json").write_text('{"v": 2}')
    monkeypatch.undo()
    assert len(calls) >= 2
    assert json.loads((target / "a.json").read_text()) == {"v": 1}
    assert siblings(target) == ["art"]


def test_the_swap_is_one_atomic_exchange_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "y").write_text("old")
    if not emotune.io._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: atomic_dir falls back to two renames")
    assert [p.name for p in b.iterdir()] == ["x"] and [p.name for p in a.iterdir()] == ["y"]


# -- a real kill ---------------------------------------------------------------------------------------------

# Saves the basis at argv[1] again with other vectors; the writer pauses half-way (tensors written, JSON not)
# until the test kills the process. With argv[2] == "fallback", the pause is instead between the two renames
# of the non-atomic fallback (the old folder moved aside, the new one not yet in place).
KILLED_SAVE = """
import os, sys, time
import emotune.basis, emotune.io
from emotune.basis import EmotionBasis

basis = EmotionBasis.load(sys.argv[1])
basis.denoised = basis.denoised + 1.0
if sys.argv[2] == "fallback":
    emotune.io._exchange = lambda a, b: False
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if ".old-" in os.fspath(dst):
            print("halfway", flush=True)
            time.sleep(600)
    emotune.io.os.replace = replace
else:
    real = emotune.basis.save_file
    def slow(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        print("halfway", flush=True)
        time.sleep(600)
    emotune.basis.save_file = slow
basis.save(sys.argv[1])
print("finished", flush=True)
"""


def kill_halfway(tmp_path: Path, target: Path, mode: str) -> None:
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(target), mode], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the save is half-way
        assert line.strip() == "halfway", line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_save_killed_halfway_leaves_the_old_basis_and_the_next_save_cleans_up(tiny, tmp_path):
    _, _, basis = tiny
    target = tmp_path / "store" / "basis"
    basis.save(target)
    before = snapshot(target)

    kill_halfway(tmp_path, target, "normal")
    assert snapshot(target) == before
    assert torch.equal(EmotionBasis.load(target).denoised, basis.denoised)
    leftovers = [n for n in siblings(target) if n != "basis"]
    assert leftovers and all(n.startswith(".basis.tmp-") for n in leftovers), leftovers

    newer = EmotionBasis.load(target)
    newer.denoised = newer.denoised * 2
    newer.save(target)  # not confused by the leftover, and removes it
    assert siblings(target) == ["basis"]
    assert torch.equal(EmotionBasis.load(target).denoised, newer.denoised)


def test_a_kill_between_the_fallback_renames_is_mended_by_the_next_save(tiny, tmp_path):
    _, _, basis = tiny
    target = tmp_path / "store" / "basis"
    basis.save(target)
    before = snapshot(target)

    kill_halfway(tmp_path, target, "fallback")
    aside = [n for n in siblings(target) if n.startswith(".basis.old-")]
    assert not target.exists() and len(aside) == 1  # the window the fallback cannot close by itself
    emotune.io.recover(target)  # what the next atomic_dir(target) runs first
    assert snapshot(target) == before and siblings(target) == ["basis"]
    assert torch.equal(EmotionBasis.load(target).denoised, basis.denoised)


def test_recovery_leaves_the_folders_of_a_live_process_alone(tmp_path):
    target = tmp_path / "art"
    target.mkdir()
    live = tmp_path / f".art.tmp-{emotune.io._HOST}-{os.getppid()}-abc123"  # our parent: alive
    dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_proc.wait()
    dead = tmp_path / f".art.tmp-{emotune.io._HOST}-{dead_proc.pid}-def456"
    other_host = tmp_path / f".art.tmp-000000-{dead_proc.pid}-789abc"
    for folder in (live, dead, other_host):
        folder.mkdir()
    emotune.io.recover(target)
    assert live.exists() and other_host.exists() and not dead.exists()
