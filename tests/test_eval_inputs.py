"""`emotune eval`: several adapters in one report, and every input checked before a model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_eval_setup
from peft import LoraConfig, get_peft_model

from emotune.cli import main
from emotune.evaluate.run import parse_adapters


@pytest.fixture(scope="module")
def tiny():
    return tiny_eval_setup()


def test_a_multi_adapter_report_contrasts_each_adapter_with_base_and_with_the_control(tiny, tmp_path):
    from emotune.evaluate.report import FORMAT, write_report
    from emotune.evaluate.run import evaluate_model

    model, tok, basis = tiny
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(model, config, adapter_name="calm")
    wrapped.add_adapter("control", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        report = evaluate_model(
            wrapped,
            tok,
            basis,
            adapters={"calm": {"path": "a"}, "control": {"path": "b"}},
            control="control",
            sections=("behaviour",),
            limit=3,
            progress=False,
        )
    beh = report["behaviour"]
    assert set(beh["contrasts"]) == {"calm - base", "control - base", "calm - control"}
    assert set(beh["holm"]) == set(beh["contrasts"])
    assert all(beh["holm"][k] >= beh["contrasts"][k]["all"]["p_perm"] for k in beh["holm"])
    # the two adapters are different models, and calm - control is their paired difference
    calm, control = beh["rows"]["calm"], beh["rows"]["control"]
    assert any(abs(a["m"] - b["m"]) > 1e-6 for a, b in zip(calm, control))
    diff = sum(a["m"] - b["m"] for a, b in zip(calm, control)) / len(calm)
    assert beh["contrasts"]["calm - control"]["all"]["mean"] == pytest.approx(diff, abs=1e-9)
    folder = write_report({**report, "arguments": {"control": "control"}}, tmp_path / "report")
    saved = json.loads((folder / "report.json").read_text())
    assert saved["format"] == FORMAT and saved["emotune_version"] and saved["created"]
    assert "rows" not in saved["behaviour"] and "base_rows" not in saved["behaviour"]
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert {s["state"] for s in samples} == {"base", "calm", "control"}
    assert saved["samples"]["counts"]["behaviour"] == len(samples) == 3 * 6
    assert "calm - control" in (folder / "report.md").read_text()


def test_adapter_flags_take_names_or_bare_paths():
    assert parse_adapters(["calm=runs/calm/adapter", "runs/ctl/adapter", "x/y"]) == {
        "calm": Path("runs/calm/adapter"),
        "ctl": Path("runs/ctl/adapter"),
        "y": Path("x/y"),
    }


def _adapter_folder(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control", "ctl", "--adapter", "calm={a}"], r"--control ctl: no adapter of that name was given"),
        (["--adapter", "calm={a}", "--adapter", "calm={a}"], r"the name 'calm' is given twice"),
        (["--adapter", "calm={a}", "--control", "calm"], r"a control needs at least one other adapter"),
        (["--adapter", "calm={missing}"], r"--adapter calm=.*missing: not an adapter folder"),
        (["--sections", "behaviour,leverag"], r"unknown section\(s\) leverag"),
        (["--sections", "concealment"], r"concealment: needs an --adapter"),
        (["--suite", "{bad_suite}"], r"bad\.jsonl:1: missing field"),
        (["--prefix-tokens", "-3"], r"--prefix-tokens -3: must be a positive number"),
        (["--basis", "{missing}"], r"--basis"),
    ],
)
def test_eval_inputs_are_checked_before_any_model_loads(tmp_path, capsys, extra, message):
    adapter = _adapter_folder(tmp_path / "runs" / "calm" / "adapter")
    bad_suite = tmp_path / "bad.jsonl"
    bad_suite.write_text('{"id": "a"}\n')
    out = tmp_path / "report"
    argv = [a.format(a=adapter, missing=tmp_path / "missing", bad_suite=bad_suite) for a in extra]
    # the model name does not exist: reaching the model load would fail with another message
    code = main(["eval", "--model", "no-such-org/no-such-model", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()
