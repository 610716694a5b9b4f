"""emotune/export.py and the commands over it: one-commit pushes of adapter, basis and report (a mocked HfApi
writing into a local folder), llama.cpp control vectors read back with gguf, and lm-eval steering files loaded
the way lm-evaluation-harness's steered model loads them."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CharTokenizer, extract_tiny_basis, tiny_llama
from test_adapter import REPORT, SMOL, save

from emotune.basis import EmotionBasis
from emotune.cli import main
from emotune.errors import ConfigError, DataError
from emotune.export import export_llamacpp, export_lm_eval, push_adapter
from emotune.steer import steered


@pytest.fixture(scope="module")
def world():
    model = tiny_llama()
    return model, CharTokenizer(), extract_tiny_basis(model, CharTokenizer())


@pytest.fixture
def trained(tmp_path, world):
    """An adapter folder as training leaves it (<run>/adapter), with an eval report beside it (<run>/eval)."""
    adapter = save(tmp_path, world[2], {"model": "smollm2-135m-instruct", "hub_id": SMOL, "embedded": True})
    (adapter.parent / "eval").mkdir()
    (adapter.parent / "eval" / "report.json").write_text(REPORT.read_text())
    (adapter.parent / "eval" / "report.md").write_text("# report\n")
    return adapter


# -- the hub ---------------------------------------------------------------------------------------------------


def test_export_pushes_adapter_basis_and_report_in_one_commit_and_the_basis_loads_back(trained, local_hub, world):
    url = push_adapter(trained, "me/smollm2-calm", token="hf_test")
    assert url == "https://hub.local/me/smollm2-calm/commit/1"
    [commit] = local_hub.commits
    assert commit["message"] == "Upload emotune adapter, basis and eval report"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "recipe.yaml",
        "emotune_run.json",
        "basis/basis.json",
        "basis/basis.safetensors",
        "eval/report.json",
        "eval/report.md",
    } <= set(commit["paths"])
    assert not any(Path(p).name.startswith(".") for p in commit["paths"])
    repo = local_hub.root / "me" / "smollm2-calm"
    card = (repo / "README.md").read_text()
    assert 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("' in card
    assert '"me/smollm2-calm")' in card  # the quick start names the repo it was pushed to
    assert yaml.safe_load(card.split("---")[1])["model-index"][0]["name"] == "me/smollm2-calm"
    assert json.loads((repo / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOL
    basis = EmotionBasis.from_pretrained("me/smollm2-calm", subfolder="basis")
    assert torch.equal(basis.denoised, world[2].denoised)


def test_export_without_a_report_pushes_adapter_and_basis(trained, local_hub):
    import shutil

    shutil.rmtree(trained.parent / "eval")
    push_adapter(trained, "me/x", token="hf_test")
    [commit] = local_hub.commits
    assert commit["message"] == "Upload emotune adapter, basis"
    assert not any(p.startswith("eval/") for p in commit["paths"])
    assert "Not measured yet" in (local_hub.root / "me" / "x" / "README.md").read_text()


def test_the_export_command_takes_the_adapter_and_a_report_folder(trained, local_hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    report = tmp_path / "elsewhere"
    report.mkdir()
    (report / "report.json").write_text(REPORT.read_text())
    assert main(["export", str(trained), "--repo-id", "me/calm", "--report", str(report), "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert local_hub.repos == {"me/calm": {"private": True}} and "eval/report.json" in local_hub.commits[0]["paths"]

    assert main(["export", str(trained), "--repo-id", "me/calm", "--report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no report.json there" in err and len(local_hub.commits) == 1


def test_keep_card_refuses_a_card_without_metadata(trained, local_hub):
    (trained / "README.md").write_text("# my own card, no metadata\n")
    with pytest.raises(DataError, match="without a metadata block naming base_model"):
        push_adapter(trained, "me/x", token="hf_test", keep_card=True)
    assert local_hub.commits == []


# -- llama.cpp control vectors ------------------------------------------------------------------------------------


def test_a_llamacpp_control_vector_reads_back_with_gguf(world, tmp_path):
    import gguf

    _, _, basis = world
    out = export_llamacpp(basis, "calm", 0.1, tmp_path / "calm.gguf", layers=[1, 3])
    reader = gguf.GGUFReader(str(out))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.3"]  # llama.cpp's block N is our layer N
    for layer in (1, 3):
        tensor = tensors[f"direction.{layer}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and list(tensor.shape) == [basis.hidden_size]
        expected = 0.1 * basis.scale(layer) * basis.vector("calm", layer)
        torch.testing.assert_close(torch.from_numpy(tensor.data.copy()), expected)


def test_llamacpp_cannot_steer_block_zero_and_an_unwritable_output_fails_in_one_line(world, tmp_path):
    _, _, basis = world
    with pytest.raises(ConfigError, match="cannot steer block 0"):
        export_llamacpp(basis, "calm", 0.1, tmp_path / "x.gguf", layers=[0])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot write there") as info:
        export_llamacpp(basis, "calm", 0.1, tmp_path / "a-file" / "x.gguf", layers=[1])
    assert "\n" not in str(info.value) and not (tmp_path / "x.gguf").exists()


def test_the_export_basis_command_writes_a_control_vector_at_the_default_layer(world, tmp_path, capsys):
    _, _, basis = world
    basis.default_layer = 2
    basis.save(tmp_path / "basis")
    out = tmp_path / "calm.gguf"
    argv = ["export-basis", str(tmp_path / "basis"), "--format", "llamacpp", "--emotion", "calm"]
    assert main([*argv, "--strength", "0.05", "--out", str(out)]) == 0
    import gguf

    assert [t.name for t in gguf.GGUFReader(str(out)).tensors] == ["direction.2"]
    assert main([*argv, "--strength", "0.05", "--layers", "9", "--out", str(out)]) == 2
    assert "--layers 9" in capsys.readouterr().err
    assert main([*argv[:-1], "happy", "--strength", "0.05", "--out", str(out)]) == 2
    assert "not in this basis" in capsys.readouterr().err


# -- lm-evaluation-harness steering files ---------------------------------------------------------------------------


@contextmanager
def lm_eval_steered(model, path):
    """What lm-evaluation-harness's ``steered`` model does with a .pt file, written again from its description:
    torch.load(weights_only=True) a {hookpoint: {action, steering_coefficient, steering_vector, bias}} mapping,
    and on each named module of ``model.base_model`` add coefficient * vector to the output."""
    config = torch.load(path, weights_only=True)
    modules = dict(model.base_model.named_modules())
    handles = []
    for hookpoint, info in config.items():
        assert info["action"] == "add" and info["bias"] is None

        def hook(module, args, output, info=info):
            delta = info["steering_coefficient"] * info["steering_vector"]
            return (output[0] + delta, *output[1:]) if isinstance(output, tuple) else output + delta

        handles.append(modules[hookpoint].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def test_an_lm_eval_steering_file_steers_exactly_as_emotune_steers(world, tmp_path):
    model, tok, basis = world
    path = export_lm_eval(basis, "desperate", 0.3, tmp_path / "desperate.pt", layers=[1, 2])
    config = torch.load(path, weights_only=True)
    assert sorted(config) == ["layers.1", "layers.2"]
    assert config["layers.1"]["steering_coefficient"] == pytest.approx(0.3 * basis.scale(1))
    torch.testing.assert_close(config["layers.1"]["steering_vector"], basis.vector("desperate", 1))
    ids = torch.tensor([tok.encode("the tests failed again")])
    with torch.no_grad():
        plain = model(ids).logits
        with lm_eval_steered(model, path):
            theirs = model(ids).logits
        with steered(model, basis, "desperate", 0.3, [1, 2]):
            ours = model(ids).logits
    assert not torch.allclose(theirs, plain)
    torch.testing.assert_close(theirs, ours)


def test_an_lm_eval_hookpoint_without_a_layer_slot_is_refused(world, tmp_path):
    with pytest.raises(ConfigError, match="must contain"):
        export_lm_eval(world[2], "calm", 0.1, tmp_path / "x.pt", hookpoint="model.layers")


def test_the_package_exports_steer_as_a_context_manager(world):
    import emotune

    model, tok, basis = world
    ids = torch.tensor([tok.encode("a short text")])
    with torch.no_grad():
        with emotune.steer(model, basis, "calm", 0.5):
            via_module = model(ids).logits
        with emotune.steered(model, basis, "calm", 0.5):
            via_function = model(ids).logits
        plain = model(ids).logits
    torch.testing.assert_close(via_module, via_function)
    assert not torch.allclose(via_module, plain)
