"""Safe loading: no pickle is read from a user path, remote code stays off unless asked for (and warns when on),
and every artefact records the base model's hub id and revision."""

from __future__ import annotations

import io
import json
import tokenize
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import emotune.models
from emotune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
HUB_ID, REVISION = "example-org/tiny-chat", "0123abcd"

TERMS = [{"emotion": "calm", "form": "reward", "weight": 1.0, "tags": ["failure"], "target": 0.2}]
CONVERSATIONS = [
    {
        "id": f"f{i}",
        "messages": [
            {"role": "user", "content": "Run the tests please."},
            {"role": "assistant", "content": "The test still fails." + " Again." * i, "tags": ["failure"]},
        ],
    }
    for i in range(2)
]


class Unpickling(Exception):
    """Raised by the patched pickle/torch loaders: something tried to unpickle."""


def forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def refuse(*args, **kwargs):
        raise Unpickling(f"unpickling {args[:1]!r:.80}")

    for module, name in (
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (torch.serialization, "load"),
    ):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def hub_model(tiny_chat_model_dir, monkeypatch):
    """Make ``load_model(HUB_ID, revision=...)`` load the tiny folder as if it came from the hub."""
    real = emotune.models.resolve_model_path

    def resolve(name, dtype=torch.float32):
        if name == HUB_ID:
            return str(tiny_chat_model_dir), {"model": name, "hub_id": name, "embedded": False}
        return real(name, dtype)

    monkeypatch.setattr(emotune.models, "resolve_model_path", resolve)
    return HUB_ID


@pytest.fixture(scope="module")
def artefacts(tiny_chat_model_dir, tmp_path_factory):
    """A basis, an adapter (written by save_adapter), an eval report and a recipe, all for the tiny chat model."""
    from peft import LoraConfig, get_peft_model

    from emotune.basis import EmotionBasis
    from emotune.corpus import Dialogue, Story
    from emotune.evaluate.report import write_report
    from emotune.evaluate.run import evaluate_model
    from emotune.models import load_model
    from emotune.train import parse_recipe, save_adapter

    root = tmp_path_factory.mktemp("artefacts")
    model, tok = load_model(str(tiny_chat_model_dir))
    stories = [
        Story(e, f"{e} the tests failed and the deploy passed {i}") for e in ("calm", "desperate") for i in range(3)
    ]
    neutral = [
        Dialogue(
            str(i), ({"role": "user", "content": "capital?"}, {"role": "assistant", "content": "Paris" * (i + 1)})
        )
        for i in range(4)
    ]
    basis = EmotionBasis.extract(model, tok, stories=stories, neutral=neutral, offset=2, progress=False)
    basis.save(root / "basis")
    (root / "data.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_chat_model_dir),
                "dataset": str(root / "data.jsonl"),
                "basis": str(root / "basis"),
                "output_dir": str(root / "run"),
                "use_peft": True,
                "lora_target_modules": ["q_proj", "v_proj"],
                "emotion_layers": [2],
                "emotion_terms": TERMS,
                "max_steps": 1,
                "use_cpu": True,
                "bf16": False,
                "report_to": "none",
                "max_length": 64,
            }
        )
    )
    script, config, model_args = parse_recipe([str(recipe)])
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = save_adapter(
        SimpleNamespace(model=peft_model, processing_class=tok), script, config, model_args, basis, None
    )
    with torch.no_grad():
        report = evaluate_model(peft_model, tok, basis, limit=2, progress=False, sections=("activations",))
    write_report(report, root / "eval")
    return SimpleNamespace(root=root, basis=root / "basis", adapter=adapter, report=root / "eval", recipe=recipe)


# -- no pickles ----------------------------------------------------------------------------------------------


def test_the_patch_catches_a_real_unpickling(tmp_path, monkeypatch):
    """The guard below is not vacuous: with it on, a pickled adapter loaded the way peft falls back to fails."""
    from peft.utils import load_peft_weights

    torch.save({"w": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    forbid_unpickling(monkeypatch)
    with pytest.raises(Unpickling):
        load_peft_weights(str(tmp_path))


def test_loading_artefacts_never_unpickles(artefacts, tiny_chat_model_dir, monkeypatch):
    from emotune.basis import EmotionBasis
    from emotune.evaluate.run import load_adapter
    from emotune.models import load_model
    from emotune.train import parse_recipe

    forbid_unpickling(monkeypatch)
    basis = EmotionBasis.load(artefacts.basis)
    assert len(basis.emotions) == 2
    report = json.loads((artefacts.report / "report.json").read_text())
    assert report["sections"] == ["activations"]
    model, _ = load_model(str(tiny_chat_model_dir))
    wrapped, info = load_adapter(model, artefacts.adapter)
    assert hasattr(wrapped, "disable_adapter") and info["recipe"]["emotion_terms"][0]["emotion"] == "calm"
    assert EmotionBasis.load(artefacts.adapter / "basis").emotions == basis.emotions
    _, config, model_args = parse_recipe([str(artefacts.recipe)])
    assert config.terms[0].emotion == "calm" and model_args.model_name_or_path == str(tiny_chat_model_dir)


def test_a_pickled_adapter_is_refused_without_being_read(artefacts, tiny_chat_model_dir, tmp_path, monkeypatch):
    from emotune.evaluate.run import load_adapter
    from emotune.models import load_model

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((artefacts.adapter / "adapter_config.json").read_bytes())
    torch.save({"w": torch.zeros(1)}, folder / "adapter_model.bin")
    model, _ = load_model(str(tiny_chat_model_dir))
    forbid_unpickling(monkeypatch)
    with pytest.raises(DataError, match="only from safetensors"):
        load_adapter(model, folder)


# Calls that run code from a file or a string. The sandbox's runner runs untrusted generated code on purpose, in a
# separate locked-down process; everything else in the package must do without.
FORBIDDEN_CALLS = {
    ("torch", "load"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("dill", "load"),
    ("joblib", "load"),
}
FORBIDDEN_BUILTINS = {"eval", "exec"}
FORBIDDEN_KEYWORDS = {("weights_only", "False"), ("allow_pickle", "True"), ("trust_remote_code", "True")}
UNSAFE_MODULES = {"pickle", "marshal", "dill", "shelve", "joblib"}
WHITELIST = {"emotune/evaluate/agentic/_runner.py"}


def risky_calls(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of each forbidden call in ``source``; comments and strings are not code and are skipped."""
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    ]
    found = []
    for i, tok in enumerate(tokens):
        following = [t.string for t in tokens[i + 1 : i + 4]]
        before = tokens[i - 1].string if i else ""
        if tok.type != tokenize.NAME:
            continue
        if following[:1] == ["."] and len(following) > 1 and (tok.string, following[1]) in FORBIDDEN_CALLS:
            found.append((tok.start[0], f"{tok.string}.{following[1]}"))
        elif tok.string in FORBIDDEN_BUILTINS and following[:1] == ["("] and before != ".":
            found.append((tok.start[0], f"{tok.string}("))
        elif following[:1] == ["="] and len(following) > 1 and (tok.string, following[1]) in FORBIDDEN_KEYWORDS:
            found.append((tok.start[0], f"{tok.string}={following[1]}"))
        elif tok.string in ("import", "from") and following[:1] and following[0] in UNSAFE_MODULES:
            found.append((tok.start[0], f"{tok.string} {following[0]}"))
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = (
        "import pickle\nx = torch.load(p)\ny = pickle.loads(b)\nz = eval(s)\nexec(code)\n"
        "m = f(p, weights_only=False)\nyaml.load(t)\nA.from_pretrained(n, trust_remote_code=True)\n"
    )
    assert [what for _, what in risky_calls(bad)] == [
        "import pickle",
        "torch.load",
        "pickle.loads",
        "eval(",
        "exec(",
        "weights_only=False",
        "yaml.load",
        "trust_remote_code=True",
    ]
    fine = "model.eval()\nast.literal_eval(s)\n# torch.load(p)\ns = 'pickle.loads'\nyaml.safe_load(t)\n"
    assert risky_calls(fine) == []


def test_the_package_source_has_no_unpickling_or_eval():
    found = []
    for path in sorted((ROOT / "emotune").rglob("*.py")) + [ROOT / "scripts" / "train.py"]:
        rel = path.relative_to(ROOT).as_posix()
        if rel in WHITELIST:
            continue
        found += [f"{rel}:{line}: {what}" for line, what in risky_calls(path.read_text(encoding="utf-8"))]
    assert found == []


# -- trust_remote_code ---------------------------------------------------------------------------------------


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Record the keyword arguments of every AutoTokenizer/AutoModelForCausalLM.from_pretrained call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[dict] = []
    for cls in (AutoTokenizer, AutoModelForCausalLM):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            calls.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def remote_code_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "trust_remote_code" in str(w.message)]


def test_load_model_keeps_remote_code_off_unless_asked_and_warns_when_on(tiny_chat_model_dir, from_pretrained_calls):
    from emotune.models import load_model

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_model(str(tiny_chat_model_dir))
    assert len(from_pretrained_calls) == 2 and all(c["trust_remote_code"] is False for c in from_pretrained_calls)
    assert remote_code_warnings(record) == []
    from_pretrained_calls.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_model(str(tiny_chat_model_dir), trust_remote_code=True)
    assert len(from_pretrained_calls) == 2 and all(c["trust_remote_code"] is True for c in from_pretrained_calls)
    assert len(remote_code_warnings(record)) == 1


class StopAtLoad(Exception):
    pass


@pytest.mark.parametrize("flag", [None, "false", "true"])
def test_training_passes_the_recipes_trust_remote_code_and_warns_when_on(artefacts, tmp_path, monkeypatch, flag):
    from transformers import AutoTokenizer

    from emotune.train import parse_recipe, run

    seen: list[dict] = []

    def stop(*args, **kwargs):  # the first thing load_model loads; no need to train
        seen.append(kwargs)
        raise StopAtLoad

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", stop)
    argv = [str(artefacts.recipe), "--output_dir", str(tmp_path / "out")]
    if flag is not None:
        argv += ["--trust_remote_code", flag]
    args = parse_recipe(argv)
    with warnings.catch_warnings(record=True) as record, pytest.raises(StopAtLoad):
        warnings.simplefilter("always")
        run(*args)
    assert seen and seen[0]["trust_remote_code"] is (flag == "true")
    assert len(remote_code_warnings(record)) == (1 if flag == "true" else 0)


# -- provenance ----------------------------------------------------------------------------------------------


def test_every_artefact_records_the_hub_id_and_revision(artefacts, hub_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from emotune.basis import EmotionBasis
    from emotune.corpus import Dialogue, Story
    from emotune.evaluate.run import evaluate
    from emotune.models import load_model
    from emotune.train import parse_recipe, save_adapter

    model, tok = load_model(hub_model, revision=REVISION)
    # the basis
    stories = [Story(e, f"{e} the tests failed {i}") for e in ("calm", "desperate") for i in range(3)]
    neutral = [
        Dialogue(
            str(i), ({"role": "user", "content": "capital?"}, {"role": "assistant", "content": "Paris" * (i + 1)})
        )
        for i in range(4)
    ]
    basis = EmotionBasis.extract(model, tok, stories=stories, neutral=neutral, offset=2, progress=False)
    basis.save(tmp_path / "basis")
    source = json.loads((tmp_path / "basis" / "basis.json").read_text())["model"]
    assert source["model"] == HUB_ID and source["hub_id"] == HUB_ID and source["revision"] == REVISION

    # the adapter folder: run info, recipe and model card
    script, config, model_args = parse_recipe(
        [str(artefacts.recipe), "--model_name_or_path", HUB_ID, "--model_revision", REVISION]
    )
    config.output_dir = str(tmp_path / "run")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer = SimpleNamespace(model=peft_model, processing_class=tok)
    adapter = save_adapter(trainer, script, config, model_args, basis, None)
    run_info = json.loads((adapter / "emotune_run.json").read_text())
    assert run_info["source"]["hub_id"] == HUB_ID and run_info["source"]["revision"] == REVISION
    assert run_info["model"] == HUB_ID and run_info["revision"] == REVISION
    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    assert recipe["model_name_or_path"] == HUB_ID and recipe["model_revision"] == REVISION
    card = (adapter / "README.md").read_text()
    assert f"base_model: {HUB_ID}" in card and f"revision `{REVISION}`" in card

    # the eval report, through the function behind `emotune eval`
    report = evaluate(
        HUB_ID,
        revision=REVISION,
        adapter=adapter,
        basis=tmp_path / "basis",
        out=tmp_path / "eval",
        sections=("activations",),
        limit=2,
        progress=False,
    )
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    for rep in (report, written):
        assert rep["source"]["hub_id"] == HUB_ID and rep["source"]["revision"] == REVISION
        assert rep["model"]["hub_id"] == HUB_ID  # the basis's model, the same one
