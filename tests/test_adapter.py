"""The adapter folder (emotune/adapter.py): what it holds, the hub id it names, and its model card."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import CharTokenizer, extract_tiny_basis, tiny_llama

from emotune.adapter import base_license, model_card, read_adapter, report_headline, report_shifts
from emotune.errors import DataError

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPORT = Path(__file__).resolve().parent.parent / "docs" / "eval-calm" / "report.json"


@pytest.fixture(scope="module")
def basis():
    return extract_tiny_basis(tiny_llama(), CharTokenizer())


def save(tmp_path, basis, source, report=None, name="smollm2-135m-instruct"):
    """save_adapter (the function training calls) on a tiny LoRA model that claims ``source`` as its base."""
    from peft import LoraConfig, get_peft_model

    from emotune.train import parse_recipe, save_adapter

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": name,
                "output_dir": str(tmp_path / "calm-run"),
                "use_peft": True,
                "emotion_layers": [2],
                "emotion_terms": [{"emotion": "calm", "form": "reward", "weight": 1.0, "tags": ["failure"]}],
                "use_cpu": True,
                "bf16": False,
                "report_to": "none",
            }
        )
    )
    script, config, model_args = parse_recipe([str(recipe)])
    model = tiny_llama()
    model.config.emotune_source = dict(source)  # what load_model records
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer = SimpleNamespace(model=peft_model, processing_class=CharTokenizerWithSave())
    return save_adapter(trainer, script, config, model_args, basis, report)


class CharTokenizerWithSave(CharTokenizer):
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer_config.json").write_text("{}")


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_an_embedded_base_is_named_by_its_hub_id_in_the_saved_adapter(tmp_path, basis):
    source = {"model": "smollm2-135m-instruct", "hub_id": SMOL, "embedded": True}
    adapter = save(tmp_path, basis, source)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOL  # not the local cache folder the weights came from
    assert read_adapter(adapter).base_model == SMOL
    meta = card_metadata((adapter / "README.md").read_text())
    assert meta["base_model"] == SMOL and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert "emotune" in meta["tags"] and "model-index" not in meta


def test_a_local_base_keeps_its_path_and_gets_no_invented_license(tmp_path, basis):
    source = {"model": str(tmp_path / "my-model"), "hub_id": None, "embedded": False}
    adapter = save(tmp_path, basis, source, name=str(tmp_path / "my-model"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] != SMOL
    card = (adapter / "README.md").read_text()
    meta = card_metadata(card)
    assert "license" not in meta and "base_model" not in meta  # a local path is no hub base_model
    assert "License: unknown" in card


def test_the_card_has_a_quick_start_versions_and_the_terms_as_a_table(tmp_path, basis):
    adapter = save(tmp_path, basis, {"model": "smollm2-135m-instruct", "hub_id": SMOL, "embedded": True})
    card = (adapter / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and 'EmotionBasis.from_pretrained("' in card
    assert 'subfolder="basis"' in card and "basis.measure(model, tokenizer" in card
    assert "| calm | reward | 1.0 | failure | 0.0 |" in card
    for package in ("emotune", "torch", "transformers", "peft"):
        assert f"- {package} " in card
    assert "Not measured yet" in card and "Weights & Biases" not in card


def test_the_card_shows_the_eval_report_as_tables_and_a_model_index(tmp_path, basis):
    report = json.loads(REPORT.read_text())
    adapter = save(tmp_path, basis, {"model": "smollm2-135m-instruct", "hub_id": SMOL, "embedded": True}, report)
    card = (adapter / "README.md").read_text()
    assert "```json" not in card and "Not measured yet" not in card
    calm = report["activations"]["sets"]["failure"]["layers"]["18"]["targeted"][0]
    assert calm["emotion"] == "calm"
    assert f"| calm | 18 | failure | {calm['base']:+.3f} | {calm['adapted']:+.3f} | {calm['shift']:+.3f} |" in card
    perplexity = report["capability"]["base"]["perplexity"]["perplexity"]
    assert f"| perplexity, held-out neutral text | {perplexity:.2f}" in card
    index = card_metadata(card)["model-index"][0]["results"]
    metrics = {(r["dataset"]["name"], m["type"]): m["value"] for r in index for m in r["metrics"]}
    assert metrics["emotune held-out contexts (failure)", "shift_calm_L18"] == round(calm["shift"], 4)
    mcq = round(report["capability"]["adapted"]["mcq"]["rate"], 4)
    assert metrics["emotune evaluation sets", "mcq_accuracy"] == mcq


def test_a_report_of_another_schema_is_read_for_what_it_has(basis):
    row = {"emotion": "calm", "shift": 0.1}
    partial = {"activations": {"sets": {"failure": {"layers": {"3": {"targeted": [row]}}}}}}
    assert [(r["emotion"], r["layer"], r["ci"]) for r in report_shifts(partial)] == [("calm", "3", "n/a")]
    assert report_headline(partial) == []
    for odd in ({}, {"activations": []}, {"behaviour": {"base": "x"}}, {"capability": {"adapted": {"mcq": 3}}}):
        card = model_card({"source": {"hub_id": SMOL}}, {}, basis, odd)
        assert "Not measured yet" in card and "model-index" not in card


def test_the_license_is_inherited_from_the_base_and_never_invented(tmp_path):
    assert base_license("smollm2-135m-instruct", SMOL) == "apache-2.0"
    assert base_license(SMOL, SMOL) == "apache-2.0"
    assert base_license("gemma-3-270m", "google/gemma-3-270m") == "gemma"
    with_card = tmp_path / "m1"
    with_card.mkdir()
    (with_card / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert base_license(str(with_card), None) == "mit"
    without_metadata = tmp_path / "m2"
    without_metadata.mkdir()
    (without_metadata / "README.md").write_text("# a model card with no metadata block\n")
    assert base_license(str(without_metadata), None) is None
    assert base_license("someone/uncached-model", "someone/uncached-model") is None


def test_the_card_links_the_wandb_run_when_one_is_live(basis, monkeypatch):
    fake = SimpleNamespace(run=SimpleNamespace(url="https://wandb.ai/me/emotune/runs/abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    card = model_card({"source": {"hub_id": SMOL}}, {}, basis)
    assert "- Weights & Biases run: https://wandb.ai/me/emotune/runs/abc123" in card


def test_read_adapter_refuses_folders_that_are_not_adapters(tmp_path):
    with pytest.raises(DataError, match="not an adapter folder"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(DataError, match="no adapter_model.safetensors"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "emotune_run.json").write_text("{not json")
    with pytest.raises(DataError, match="emotune_run.json: unreadable JSON"):
        read_adapter(tmp_path)
