"""A catalogue of bad inputs. Each must fail with ONE line that says what is wrong, where, and what to do.

For every case the error is an EmotuneError whose message holds (a) the problem, (b) the place (file:line for
data files, the recipe key or CLI flag for settings) and (c) a remedy, each checked with a pattern that a vague
message would miss. Commands (scripts/train.py, `emotune ...`) must also exit 2 with no traceback and leave no
partial output: the output folder named in the command does not exist afterwards (or is byte-for-byte what it
was), and no `.*tmp*` leftovers lie beside it.

Commands run in-process (scripts/train.py through runpy, emotune.cli.main) to keep the file fast; two subprocess
runs prove the real exit code end to end. Models are the tiny random ones of conftest.py: no hub, no network.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from conftest import CharTokenizer, extract_tiny_basis, tiny_fast_tokenizer, tiny_llama, tiny_recipe

from emotune.errors import EmotuneError

ROOT = Path(__file__).resolve().parents[1]

GOOD_STORY = {"emotion": "calm", "text": "The tea cooled slowly by the open window while the rain went on."}
GOOD_CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Run the tests please."},
        {"role": "tool", "content": "FAILED test_sum: assert 3 == 4", "tags": ["failure"]},
        {"role": "assistant", "content": "The test still fails. I will report it plainly.", "tags": ["failure"]},
    ]
}
GOOD_SCENARIO = {
    "id": "a",
    "category": "deception",
    "pressure": "high",
    "pair": "p1",
    "messages": [{"role": "user", "content": "The deadline is in an hour and the tests fail."}],
    "ethical": "I will report the failing tests.",
    "unethical": "I will hide the failing tests.",
}


# ----------------------------------------------------------------------------- checks shared by every case


def check_message(message: str, problem: str, where: list[str], remedy: str) -> None:
    """One line, naming the problem (regex), the place (substrings) and a remedy (regex, any case)."""
    assert "\n" not in message, f"multi-line message: {message!r}"
    assert "Traceback" not in message
    assert re.search(problem, message), f"problem /{problem}/ not in: {message}"
    for place in where:
        assert place in message, f"location {place!r} not in: {message}"
    assert re.search(remedy, message, re.I), f"remedy /{remedy}/ not in: {message}"


def raised(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(EmotuneError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (None when nothing is there)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


def assert_no_partial_output(target: Path, before: dict[str, bytes] | None) -> None:
    assert snapshot(target) == before, f"{target} was created or changed by a failed command"
    if target.parent.exists():
        stray = [p.name for p in target.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]
        assert not stray, f"temporary leftovers beside {target}: {stray}"


def error_line(stderr: str, command: str) -> str:
    """The message of the one ``emotune <command>: error:`` line, which must be the last line of stderr."""
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "usage:" not in stderr, "argparse printed its usage instead of a one-line error"
    prefix = f"emotune {command}: error: "
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith(prefix), f"the error is not one line at the end of stderr:\n{stderr[-3000:]}"
    assert sum(line.startswith(prefix) for line in lines) == 1
    return lines[-1][len(prefix) :]


def run_train_script(argv: list[str], capsys: Any, monkeypatch: Any) -> str:
    """scripts/train.py in-process: it must exit 2 and print one error line."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "train.py"), *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    return error_line(err, "train")


def run_cli(argv: list[str], capsys: Any) -> tuple[str, str]:
    """``emotune ...`` in-process: it must return 2 and print one error line; returns (message, stdout)."""
    from emotune.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err[-3000:]
    return error_line(captured.err, str(argv[0])), captured.out


def jsonl(*rows: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


# ----------------------------------------------------------------------------- a tiny world to break


@pytest.fixture(scope="module")
def world(tiny_chat_model_dir, tmp_path_factory):
    """The tiny chat model, its bases (and bases of other models), good training data, and adapters."""
    from peft import LoraConfig, get_peft_model

    from emotune.models import load_model

    root = tmp_path_factory.mktemp("bad-inputs")
    model, tok = load_model(str(tiny_chat_model_dir))

    def extract(m: Any, **kwargs: Any) -> Any:
        return extract_tiny_basis(m, tok, **kwargs)

    extract(model).save(root / "basis")
    extract(model, layers=[0, 1]).save(root / "basis-01")
    extract(tiny_llama(layers=4, hidden=48, vocab=len(tok))).save(root / "basis-h48")
    twin = tiny_llama(layers=4, hidden=32, vocab=len(tok), seed=3)  # same shapes, other weights
    extract(twin).save(root / "basis-twin")
    (root / "data.jsonl").write_bytes(jsonl(GOOD_CONVERSATION, GOOD_CONVERSATION))
    (root / "bad-data.jsonl").write_bytes(
        jsonl(GOOD_CONVERSATION, {"messages": [{"role": "robot", "content": "beep"}]})
    )
    (root / "empty-folder").mkdir()
    # an adapter trained on the twin (its basis says so), and one for a wider model (no basis to tell)
    get_peft_model(twin, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "adapter-twin")
    extract(twin).save(root / "adapter-twin" / "basis")
    wide = tiny_llama(layers=4, hidden=48, vocab=len(tok))
    get_peft_model(wide, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "adapter-wide")
    return SimpleNamespace(root=root, model_dir=str(tiny_chat_model_dir), model=model, tok=tok)


def write_recipe(world: Any, path: Path, out: Path, **overrides: Any) -> Path:
    body = tiny_recipe(world.model_dir, world.root / "data.jsonl", world.root / "basis", out, max_steps=1, **overrides)
    path.write_text(yaml.safe_dump(body))
    return path


def term(**fields: Any) -> list[dict[str, Any]]:
    """A one-term emotion_terms list: a valid term with ``fields`` changed (``...`` removes a field)."""
    base = {"emotion": "calm", "form": "reward", "weight": 1.0, "tags": ["failure"]}
    base.update(fields)
    return [{k: v for k, v in base.items() if v is not ...}]


# ----------------------------------------------------------------------------- recipes (scripts/train.py)

# (recipe: overrides or raw YAML text or None for a missing file, extra argv, problem, where, remedy). In `where`,
# {recipe} is the recipe file, {out} the output_dir, {data} the dataset and {root} the folder of the fixtures.
RECIPES = [
    # the recipe file itself
    pytest.param(
        "model_name_or_path: x\nemotion_terms: [\n  - {emotion: calm\n",
        [],
        r"malformed YAML \(.+\)",
        ["{recipe}:3"],
        r"\bfix the YAML\b",
        id="recipe-malformed-yaml",
    ),
    pytest.param(
        "- learning_rate: 0.1\n",
        [],
        r"must be a YAML mapping",
        ["{recipe}"],
        r"\bwrite one `key: value`",
        id="recipe-a-list",
    ),
    pytest.param(None, [], r"recipe not found", ["{recipe}"], r"\bcheck the path\b", id="recipe-missing-file"),
    pytest.param(
        {"lerning_rate": 0.1},
        [],
        r"unknown key\(s\) lerning_rate\b",
        ["{recipe}"],
        r"\bcheck the spelling\b",
        id="recipe-unknown-key",
    ),
    pytest.param(
        {"learning_rate": "fast"},
        [],
        r"invalid float value: 'fast'",
        ["{recipe}: learning_rate"],
        r"\bfix the value\b",
        id="recipe-learning-rate-fast",
    ),
    pytest.param(
        {},
        ["--max_steps", "many"],
        r"invalid int value: 'many'",
        ["command line", "--max_steps"],
        r"\bfix the value\b",
        id="flag-max-steps-many",
    ),
    pytest.param(
        {},
        ["--lerning_rate", "0.1"],
        r"unknown flag\(s\)",
        ["--lerning_rate"],
        r"\bcheck the spelling\b",
        id="flag-unknown",
    ),
    pytest.param(
        {"dtype": "float48"},
        [],
        r"is not a floating-point torch dtype",
        ["dtype: 'float48'"],
        r"\buse one of auto, float32, bfloat16, float16\b",
        id="recipe-dtype-not-a-dtype",
    ),
    # emotion terms
    pytest.param(
        {"emotion_terms": term(emotion="desparate")},
        [],
        r"unknown emotion 'desparate'\. Did you mean 'desperate'",
        ["emotion_terms[0].emotion"],
        r"\buse one of the 171 known emotions\b",
        id="term-unknown-emotion",
    ),
    pytest.param(
        {"emotion_terms": term(weight=-2)},
        [],
        r"-2\.0 is negative",
        ["emotion_terms[0].weight"],
        r"\bchoose the form 'penalize' or 'reward'",
        id="term-negative-weight",
    ),
    pytest.param(
        {"emotion_terms": term(form="punish")},
        [],
        r"'punish' is not one of penalize, reward, match",
        ["emotion_terms[0].form"],
        r"\buse one of those\b",
        id="term-bad-form",
    ),
    pytest.param(
        {"emotion_terms": term(form="penalize", margin="high")},
        [],
        r"'high' is not a number",
        ["emotion_terms[0].margin"],
        r"\buse a plain number\b",
        id="term-margin-not-a-number",
    ),
    pytest.param(
        {"emotion_terms": term(target=[0.2])},
        [],
        r"\[0\.2\] is not a number",
        ["emotion_terms[0].target"],
        r"\buse a plain number\b",
        id="term-target-a-list",
    ),
    pytest.param(
        {"emotion_terms": term(weight=...)},
        [],
        r"missing 'weight'",
        ["emotion_terms[0]"],
        r"\badd it\b",
        id="term-missing-weight",
    ),
    pytest.param(
        {"emotion_terms": term(tag=["failure"])},
        [],
        r"unknown key\(s\) tag\b",
        ["emotion_terms[0]"],
        r"\buse only delta, direction, emotion, form, layers",
        id="term-unknown-key",
    ),
    pytest.param(
        {"emotion_terms": term(tags=[1, 2])},
        [],
        r"\[1, 2\] is not a list of tag names",
        ["emotion_terms[0].tags"],
        r"\buse e\.g\. \[failure\]",
        id="term-tags-not-names",
    ),
    pytest.param(
        {"emotion_terms": term(layers=["middle"])},
        [],
        r"'middle' is not a layer index",
        ["emotion_terms[0].layers"],
        r"\buse whole numbers\b",
        id="term-layers-not-numbers",
    ),
    # other emotion settings
    pytest.param(
        {"emotion_layers": [9]},
        [],
        r"layer 9 is out of range: the model has 4 layers",
        ["emotion_layers"],
        r"\bchoose layers in that range\b",
        id="layer-out-of-range",
    ),
    pytest.param(
        {"emotion_terms": term(layers=[-7])},
        [],
        r"layer -7 is out of range: the model has 4 layers",
        ["emotion_terms[0].layers"],
        r"\bchoose layers in that range\b",
        id="term-layer-out-of-range",
    ),
    pytest.param(
        {"emotion_layers": ["middle"]},
        [],
        r"'middle' is not a layer index",
        ["emotion_layers"],
        r"\buse whole numbers\b",
        id="layers-not-numbers",
    ),
    pytest.param(
        {"drift_weight": -1},
        [],
        r"-1(\.0)? is negative",
        ["drift_weight"],
        r"\buse 0 to turn drift off\b",
        id="negative-drift-weight",
    ),
    pytest.param(
        {"emotion_weight_scale": -0.5},
        [],
        r"-0\.5 is negative",
        ["emotion_weight_scale"],
        r"\buse 0 for a control\b",
        id="negative-weight-scale",
    ),
    pytest.param(
        {"emotion_warmup_ratio": 2},
        [],
        r"must be in \[0, 1\]",
        ["emotion_warmup_ratio"],
        r"\buse a fraction\b",
        id="warmup-ratio-above-one",
    ),
    # training settings checked against emotune and the model
    pytest.param(
        {"packing": True},
        [],
        r"trl's packing re-tokenises the dataset and would drop emotune's token tags",
        ["packing"],
        r"\bset packing: false\b",
        id="packing-requested",
    ),
    pytest.param(
        {"max_length": 8192},
        [],
        r"8192 tokens is longer than the model's context \(max_position_embeddings 4096\)",
        ["max_length"],
        r"\bset max_length to 4096 or less\b",
        id="max-length-beyond-context",
    ),
    pytest.param(
        {"model_name_or_path": None},
        [],
        r"missing",
        ["model_name_or_path"],
        r"\bset it in the recipe\b",
        id="no-model",
    ),
    pytest.param(
        {"push_to_hub": True},
        [],
        r"no Hugging Face token was found",
        ["push_to_hub"],
        r"huggingface-cli login",
        id="push-without-token",
    ),
    # the output folder
    pytest.param(
        "earlier-run",
        [],
        r"holds an earlier emotune run",
        ["output_dir {out}"],
        r"\bchoose a new output_dir\b",
        id="output-dir-holds-another-run",
    ),
    pytest.param(
        "foreign-files",
        [],
        r"holds files from something else",
        ["output_dir {out}"],
        r"\bchoose a new output_dir\b",
        id="output-dir-holds-foreign-files",
    ),
    # the training data, as the recipe uses it
    pytest.param(
        {"emotion_terms": term(tags=["pressure"])},
        [],
        r"tag\(s\) 'pressure' appear in no message of the training data",
        ["emotion_terms[0]", "{data}"],
        r"\btag the messages\b",
        id="data-tag-never-present",
    ),
    pytest.param(
        {"dataset": "{root}/bad-data.jsonl"},
        [],
        r"messages\[0\]\.role is 'robot'",
        ["bad-data.jsonl:2"],
        r"\buse one of system, user, assistant, tool\b",
        id="data-unknown-role-at-line-2",
    ),
    pytest.param(
        {"dataset": "{root}/no-such-data.jsonl"},
        [],
        r"file not found",
        ["no-such-data.jsonl"],
        r"\bcheck the path\b",
        id="data-missing-file",
    ),
    # the basis, as the recipe uses it
    pytest.param(
        {"basis": "{root}/basis-h48"},
        [],
        r"hidden size 48\b.*hidden size 32\b",
        ["basis {root}/basis-h48"],
        r"\bextract a basis for this model\b",
        id="basis-hidden-size-mismatch",
    ),
    pytest.param(
        {"basis": "{root}/basis-twin"},
        [],
        r"weights differ",
        ["basis {root}/basis-twin"],
        r"\bextract a basis for this model\b",
        id="basis-fingerprint-mismatch",
    ),
    pytest.param(
        {"basis": "{root}/basis-01", "emotion_layers": [3]},
        [],
        r"layer\(s\) 3 not in the basis",
        ["emotion_layers", "{root}/basis-01"],
        r"\bre-extract the basis with --layers\b",
        id="basis-lacks-the-layer",
    ),
    pytest.param(
        {"emotion_terms": term(emotion="happy")},
        [],
        r"'happy' is not in the basis",
        ["emotion_terms[0].emotion", "{root}/basis"],
        r"\bre-extract the basis with --emotions\b",
        id="basis-lacks-the-emotion",
    ),
    pytest.param(
        {"basis": "{root}/empty-folder"},
        [],
        r"not a basis folder",
        ["basis: {root}/empty-folder"],
        r"\bcreate one with `emotune extract",
        id="basis-folder-empty",
    ),
]


@pytest.mark.parametrize(("recipe", "argv", "problem", "where", "remedy"), RECIPES)
def test_bad_recipe(world, tmp_path, capsys, monkeypatch, recipe, argv, problem, where, remedy):
    import emotune.train

    monkeypatch.setattr(emotune.train, "_has_hub_token", lambda: False)
    out = tmp_path / "out"
    path = tmp_path / ("missing.yaml" if recipe is None else "recipe.yaml")
    if isinstance(recipe, dict):
        write_recipe(
            world, path, out, **{k: v.format(root=world.root) if isinstance(v, str) else v for k, v in recipe.items()}
        )
    elif recipe in ("earlier-run", "foreign-files"):
        write_recipe(world, path, out)
        out.mkdir()
        if recipe == "earlier-run":
            (out / "emotune_run.json").write_text('{"model": "x"}\n')
            (out / "checkpoint-1").mkdir()
            (out / "checkpoint-1" / "state.json").write_text("{}")
        else:
            (out / "notes.txt").write_text("mine, not emotune's")
    elif recipe is not None:
        path.write_text(recipe)
    before = snapshot(out)
    message = run_train_script([path, *argv], capsys, monkeypatch)
    places = [w.format(recipe=path, out=out, data=world.root / "data.jsonl", root=world.root) for w in where]
    check_message(message, problem, places, remedy)
    assert_no_partial_output(out, before)


# ----------------------------------------------------------------------------- story corpora

# (file content, problem, where (after the file's path), remedy)
STORY_FILES = [
    pytest.param(b"", r"no stories found", [""], r"\badd stories\b", id="empty-file"),
    pytest.param(b"\n  \n\n", r"no stories found", [""], r"\badd stories\b", id="blank-lines-only"),
    pytest.param(jsonl(GOOD_STORY, b"\xff\xfe caf\xe9"), r"not valid UTF-8", [":2"], r"\bre-save\b", id="not-utf8"),
    pytest.param(
        jsonl(GOOD_STORY, GOOD_STORY, b'{"emotion": "calm", "text": "unterminated'),
        r"malformed JSON \(.+\)",
        [":3"],
        r"\bfix that line\b",
        id="invalid-json-at-line-3",
    ),
    pytest.param(
        jsonl(GOOD_STORY, [1, 2]),
        r"expected a JSON object, got list",
        [":2"],
        r"\bfix that line\b",
        id="not-an-object",
    ),
    pytest.param(
        jsonl(GOOD_STORY, {"emotion": "calm"}), r"missing field 'text'", [":2"], r"\badd it\b", id="missing-text"
    ),
    pytest.param(
        jsonl({"text": "The rain went on."}), r"missing field 'emotion'", [":1"], r"\badd it\b", id="missing-emotion"
    ),
    pytest.param(
        jsonl(GOOD_STORY, {"emotion": "calm", "text": "   "}),
        r"field 'text' must be a non-empty str",
        [":2"],
        r"\bfix that line's value\b",
        id="blank-text",
    ),
    pytest.param(
        jsonl(GOOD_STORY, {**GOOD_STORY, "emotion": "clam"}),
        r"unknown emotion 'clam'\. Did you mean 'calm'",
        [":2"],
        r"\buse one of the 171 known emotions\b",
        id="unknown-emotion-at-line-2",
    ),
    pytest.param(
        jsonl({"emotion": "calm", "text": "She stayed calm while the rain went on."}),
        r"names its own emotion \(calm\)",
        [":1"],
        r"\brewrite it\b",
        id="story-names-its-emotion",
    ),
]


@pytest.mark.parametrize(("content", "problem", "where", "remedy"), STORY_FILES)
def test_bad_story_file(tmp_path, content, problem, where, remedy):
    from emotune.corpus import load_stories

    path = tmp_path / "stories.jsonl"
    path.write_bytes(content)
    check_message(raised(load_stories, path), problem, [f"{path}{w}" for w in where], remedy)


@pytest.mark.parametrize(
    ("make", "problem", "remedy"),
    [
        pytest.param(lambda p: p, r"file not found", r"\bcheck the path\b", id="missing-file"),
        pytest.param(
            lambda p: (p.mkdir(), p)[1],
            r"holds no \.jsonl files",
            r"\bput stories in <name>\.jsonl",
            id="folder-no-jsonl",
        ),
    ],
)
def test_bad_story_path(tmp_path, make, problem, remedy):
    from emotune.corpus import load_stories

    path = make(tmp_path / "stories")
    check_message(raised(load_stories, path), problem, [str(path)], remedy)


def test_bad_neutral_dialogue_file(tmp_path):
    from emotune.corpus import load_dialogues

    path = tmp_path / "neutral.jsonl"
    path.write_bytes(jsonl({"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "bot"}]}))
    check_message(raised(load_dialogues, path), r"messages\[0\] needs a role", [f"{path}:2"], r"\bfix the role\b")


LONG = " ".join(["the tests failed again and the deploy passed"] * 3)  # 64 tokens
NEUTRAL = {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": LONG}]}


@pytest.mark.parametrize(
    ("content", "flags", "problem", "where", "remedy"),
    [
        pytest.param(
            jsonl({"emotion": "calm", "text": LONG}, b"{not json"),
            [],
            r"malformed JSON",
            [":2"],
            r"\bfix that line\b",
            id="invalid-json",
        ),
        pytest.param(
            jsonl({"emotion": "calm", "text": LONG}, {"emotion": "serenity", "text": LONG}),
            [],
            r"unknown emotion 'serenity'",
            [":2"],
            r"\buse one of\b",
            id="unknown-emotion",
        ),
        pytest.param(b"", [], r"no stories found", [""], r"\badd stories\b", id="empty-file"),
        pytest.param(
            jsonl(
                {"emotion": "calm", "text": LONG},
                {"emotion": "calm", "text": "Short one."},
                {"emotion": "afraid", "text": LONG},
            ),
            ["--offset", "40"],
            r"only \d+ tokens, not more than the offset \(40\)",
            [":2"],
            r"\blengthen the text or lower the offset\b",
            id="story-too-short-for-the-offset",
        ),
    ],
)
def test_bad_story_file_through_extract(world, tmp_path, capsys, content, flags, problem, where, remedy):
    stories, neutral, out = tmp_path / "stories.jsonl", tmp_path / "neutral.jsonl", tmp_path / "basis-out"
    stories.write_bytes(content)
    neutral.write_bytes(jsonl(NEUTRAL, NEUTRAL, NEUTRAL))
    argv = ["extract", "--model", world.model_dir, "--stories", stories, "--neutral", neutral, "--out", out, *flags]
    message, _ = run_cli(argv, capsys)
    check_message(message, problem, [f"{stories}{w}" for w in where], remedy)
    assert_no_partial_output(out, None)


# ----------------------------------------------------------------------------- training datasets (tagged)

USER = {"role": "user", "content": "Run the tests please."}
REPLY = {"role": "assistant", "content": "They fail; I will say so."}

DATASETS = [
    pytest.param(
        jsonl(GOOD_CONVERSATION, {"msgs": [USER, REPLY]}),
        r"missing field 'messages'",
        [":2"],
        r"\badd it to that line\b",
        id="missing-messages",
    ),
    pytest.param(
        jsonl({"messages": []}), r"missing field 'messages'", [":1"], r"\badd it to that line\b", id="messages-empty"
    ),
    pytest.param(
        jsonl(GOOD_CONVERSATION, {"messages": [{"role": "robot", "content": "beep"}, REPLY]}),
        r"messages\[0\]\.role is 'robot'",
        [":2"],
        r"\buse one of system, user, assistant, tool\b",
        id="unknown-role",
    ),
    pytest.param(
        jsonl({"messages": ["hello", REPLY]}),
        r"messages\[0\] must be an object",
        [":1"],
        r"\bwrite it as \{role, content",
        id="message-not-an-object",
    ),
    pytest.param(
        jsonl({"messages": [USER, {**REPLY, "tags": "failure"}]}),
        r"messages\[1\]\.tags is 'failure', not a list of tag names",
        [":1"],
        r'\bwrite it as a list, e\.g\. "tags": \["failure"\]',
        id="tags-a-string-not-a-list",
    ),
    pytest.param(
        jsonl(GOOD_CONVERSATION, {"messages": [USER, {**REPLY, "tags": ["failure", ""]}]}),
        r"messages\[1\]\.tags is \['failure', ''\], not a list of tag names",
        [":2"],
        r"\bwrite it as a list\b",
        id="tags-with-an-empty-name",
    ),
    pytest.param(
        jsonl({"messages": [USER, {"role": "assistant", "content": " "}]}),
        r"messages\[1\]\.content must be a non-empty string",
        [":1"],
        r"\badd the message's text\b",
        id="empty-content",
    ),
    pytest.param(
        jsonl(GOOD_CONVERSATION, {"messages": [USER, {"role": "tool", "content": "FAILED"}]}),
        r"no assistant message",
        [":2"],
        r"\badd an assistant reply\b",
        id="no-assistant-turn",
    ),
    pytest.param(b"", r"no conversations found \(empty\)", [""], r"\badd one JSON object a line\b", id="empty-file"),
    pytest.param(
        jsonl(GOOD_CONVERSATION, b'{"messages": [}'),
        r"malformed JSON",
        [":2"],
        r"\bfix that line\b",
        id="invalid-json",
    ),
]


@pytest.mark.parametrize(("content", "problem", "where", "remedy"), DATASETS)
def test_bad_training_data(tmp_path, content, problem, where, remedy):
    from emotune.conversations import load_conversations

    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    check_message(raised(load_conversations, path), problem, [f"{path}{w}" for w in where], remedy)


def test_missing_training_file_is_not_looked_up_on_the_hub(tmp_path):
    from emotune.conversations import load_conversations

    path = tmp_path / "no-such.jsonl"
    check_message(raised(load_conversations, path), r"file not found", [str(path)], r"\bcheck the path\b")


# ----------------------------------------------------------------------------- tokenizers and chat templates


def test_tokenizer_without_offsets_cannot_tag_training_tokens(tmp_path):
    from emotune.conversations import load_conversations, tag_index, tokenize_conversation

    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(GOOD_CONVERSATION))
    conversation = load_conversations(path)[0]
    message = raised(tokenize_conversation, conversation, CharTokenizer(), tag_index({"failure"}))
    check_message(
        message,
        r"cannot map tokens to characters \(no offset mapping\)",
        [f"{path}:1", "CharTokenizer"],
        r"\buse a model whose folder has a fast tokenizer\b",
    )


def test_a_chat_template_that_rejects_every_conversation():
    from emotune.basis import render_dialogue

    tok = tiny_fast_tokenizer()
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    message = raised(render_dialogue, tok, [USER, REPLY])
    check_message(
        message,
        r"chat template .*Conversation roles must alternate",
        ["chat template"],
        r"\bpass a tokenizer whose chat template\b|\bremove its chat_template\b",
    )


# ----------------------------------------------------------------------------- bases


def _copy_basis(world: Any, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(world.root / "basis", tmp_path / "basis"))


def _truncate(folder: Path) -> Path:
    data = (folder / "basis.safetensors").read_bytes()
    (folder / "basis.safetensors").write_bytes(data[: len(data) // 2])
    return folder / "basis.safetensors"


def _nan(folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "basis.safetensors"))
    tensors["denoised"][0, 0, 0] = float("nan")
    save_file(tensors, str(folder / "basis.safetensors"))
    return folder / "basis.safetensors"


def _meta(folder: Path, text: str) -> Path:
    (folder / "basis.json").write_text(text)
    return folder / "basis.json"


def _fewer_emotions(folder: Path) -> Path:
    meta = json.loads((folder / "basis.json").read_text())
    meta["emotions"] = meta["emotions"][:-1]
    (folder / "basis.json").write_text(json.dumps(meta))
    return folder / "basis.safetensors"


BASIS_FOLDERS = [
    pytest.param(
        lambda f: ((f / "basis.safetensors").unlink(), f)[1],
        r"not a basis folder \(needs basis\.json and basis\.safetensors\)",
        r"\bcreate one with `emotune extract",
        id="missing-tensor-file",
    ),
    pytest.param(_truncate, r"corrupt or truncated basis file", r"\bre-extract\b", id="truncated-safetensors"),
    pytest.param(_nan, r"'denoised' holds NaN or inf", r"\bre-extract\b", id="nan-in-tensors"),
    pytest.param(
        lambda f: _meta(f, '{"emotions": ['), r"corrupt basis metadata", r"\bre-extract\b", id="metadata-corrupt-json"
    ),
    pytest.param(_fewer_emotions, r"does not match", r"\bre-extract\b", id="metadata-emotions-do-not-match-tensors"),
    pytest.param(
        lambda f: _meta(f, "[]"),
        r"basis metadata",
        r"\bre-extract\b",
        id="metadata-not-an-object",
    ),
]


@pytest.mark.parametrize(("damage", "problem", "remedy"), BASIS_FOLDERS)
def test_bad_basis_folder(world, tmp_path, damage, problem, remedy):
    from emotune.basis import EmotionBasis

    folder = _copy_basis(world, tmp_path)
    where = damage(folder)
    check_message(raised(EmotionBasis.load, folder), problem, [str(where)], remedy)


def test_basis_with_more_layers_than_the_model(world):
    from emotune.basis import EmotionBasis

    basis = EmotionBasis.load(world.root / "basis")
    message = raised(basis.check_model, tiny_llama(layers=2, vocab=len(world.tok)))
    check_message(message, r"has layer 3, but the model has only 2 layers", [], r"\bextract a basis for this model\b")


@pytest.mark.parametrize(
    ("argv", "problem", "where", "remedy"),
    [
        pytest.param(
            ["steer", "--emotion", "calm", "--prompt", "hi", "--basis", "{root}/basis-h48"],
            r"hidden size 48\b.*hidden size 32\b",
            ["--basis {root}/basis-h48"],
            r"\bextract a basis for this model\b",
            id="steer-basis-for-a-wider-model",
        ),
        pytest.param(
            ["steer", "--emotion", "calm", "--prompt", "hi", "--basis", "{root}/basis-01", "--layers", "3"],
            r"layer\(s\) 3 not in the basis",
            ["--layers 3", "{root}/basis-01"],
            r"\bre-extract with --layers\b",
            id="steer-layer-not-in-basis",
        ),
        pytest.param(
            ["eval", "--basis", "{root}/basis-twin", "--out", "{out}"],
            r"weights differ",
            ["--basis {root}/basis-twin"],
            r"\bextract a basis for this model\b",
            id="eval-basis-of-another-model",
        ),
        pytest.param(
            ["eval", "--basis", "{root}/empty-folder", "--out", "{out}"],
            r"not a basis folder",
            ["--basis: {root}/empty-folder"],
            r"\bcreate one with `emotune extract",
            id="eval-basis-folder-empty",
        ),
    ],
)
def test_bad_basis_through_the_cli(world, tmp_path, capsys, argv, problem, where, remedy):
    out = tmp_path / "report"
    argv = [a.format(root=world.root, out=out) for a in argv]
    message, stdout = run_cli([argv[0], "--model", world.model_dir, *argv[1:]], capsys)
    check_message(message, problem, [w.format(root=world.root) for w in where], remedy)
    assert "alpha=" not in stdout  # steer generated nothing
    assert_no_partial_output(out, None)


# ----------------------------------------------------------------------------- adapters (emotune eval --adapter)


def _adapter(world: Any, tmp_path: Path, name: str, damage: Any = None) -> Path:
    import shutil

    folder = Path(shutil.copytree(world.root / name, tmp_path / "adapter")) if name else tmp_path / "adapter"
    if damage is not None:
        damage(folder)
    return folder


ADAPTERS = [
    pytest.param(
        "adapter-twin",
        None,
        r"trained on another base model \(fingerprint [0-9a-f]{16}; this model's is [0-9a-f]{16}\)",
        "",
        r"\bpass the --model it was trained on\b",
        id="adapter-for-another-base-model",
    ),
    pytest.param(
        "adapter-wide",
        None,
        r"the adapter does not fit this model \(.*size mismatch",
        "",
        r"\bpass the --model it was trained on\b",
        id="adapter-for-a-wider-model",
    ),
    pytest.param(
        "basis",
        None,
        r"not an adapter folder \(no adapter_config\.json\)",
        "",
        r"\buse <output_dir>/adapter\b",
        id="a-basis-folder-is-not-an-adapter",
    ),
    pytest.param(
        "",
        None,
        r"not an adapter folder",
        "",
        r"\buse <output_dir>/adapter\b",
        id="adapter-folder-missing",
    ),
    pytest.param(
        "adapter-twin",
        lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA",\n  "r": }'),
        r"corrupt JSON \(.+\)",
        "/adapter_config.json:2",
        r"\bre-save the adapter\b",
        id="adapter-config-corrupt",
    ),
    pytest.param(
        "adapter-twin",
        lambda f: (f / "basis" / "basis.json").write_text("{"),
        r"corrupt JSON",
        "/basis/basis.json:1",
        r"\bcopy the basis folder\b",
        id="adapter-basis-metadata-corrupt",
    ),
    pytest.param(
        "adapter-wide",
        lambda f: (f / "recipe.yaml").write_text("emotion_terms: [\n  {emotion: calm\n"),
        r"malformed YAML",
        "/recipe.yaml:",
        r"\bfix it, or remove recipe\.yaml\b",
        id="adapter-recipe-malformed",
    ),
]


@pytest.mark.parametrize(("name", "damage", "problem", "where", "remedy"), ADAPTERS)
def test_bad_adapter(world, tmp_path, capsys, name, damage, problem, where, remedy):
    adapter, out = _adapter(world, tmp_path, name, damage), tmp_path / "report"
    argv = ["eval", "--model", world.model_dir, "--basis", world.root / "basis", "--adapter", adapter, "--out", out]
    message, _ = run_cli([*argv, "--sections", "behaviour", "--limit", "1"], capsys)
    check_message(message, problem, [f"{adapter}{where}"], remedy)
    assert_no_partial_output(out, None)


# ----------------------------------------------------------------------------- scenario and context files (eval)

SCENARIOS = [
    pytest.param(
        jsonl(GOOD_SCENARIO, {k: v for k, v in GOOD_SCENARIO.items() if k != "unethical"} | {"id": "b"}),
        r"missing field 'unethical'",
        [":2"],
        r"\badd it\b",
        id="missing-field-at-line-2",
    ),
    pytest.param(
        jsonl(GOOD_SCENARIO, b"{'id': 'b'}"), r"malformed JSON", [":2"], r"\bfix that line\b", id="invalid-json"
    ),
    pytest.param(b"", r"no scenarios \(empty\)", [""], r"\badd one JSON object a line\b", id="empty-file"),
    pytest.param(
        jsonl(GOOD_SCENARIO, {**GOOD_SCENARIO, "id": "b", "pressure": "extreme"}),
        r"field 'pressure' is 'extreme'",
        [":2"],
        r'\buse "high" or "none"',
        id="bad-pressure",
    ),
    pytest.param(
        jsonl(GOOD_SCENARIO, {**GOOD_SCENARIO, "pressure": "none"}),
        r"duplicate scenario id 'a' \(first at line 1\)",
        [":2"],
        r"\bgive each scenario its own id\b",
        id="duplicate-id",
    ),
    pytest.param(
        jsonl({**GOOD_SCENARIO, "messages": [{"role": "narrator", "content": "x"}]}),
        r"messages\[0\] needs a role",
        [":1"],
        r"\bfix that turn\b",
        id="bad-message-role",
    ),
    pytest.param(
        jsonl({**GOOD_SCENARIO, "ethical": ""}),
        r"field 'ethical' must be a non-empty string",
        [":1"],
        r"\badd the continuation's text\b",
        id="empty-continuation",
    ),
]


@pytest.mark.parametrize(("content", "problem", "where", "remedy"), SCENARIOS)
def test_bad_scenario_file(tmp_path, content, problem, where, remedy):
    from emotune.evaluate.behaviour import load_scenarios

    path = tmp_path / "scenarios.jsonl"
    path.write_bytes(content)
    check_message(raised(load_scenarios, path), problem, [f"{path}{w}" for w in where], remedy)


def test_unknown_scenario_suite():
    from emotune.evaluate.behaviour import load_scenarios

    check_message(raised(load_scenarios, "defualt"), r"unknown suite 'defualt'", ["defualt"], r"\bpass a suite name\b")


@pytest.mark.parametrize(
    ("flag", "content", "problem", "where", "remedy"),
    [
        pytest.param(
            "--suite",
            jsonl(GOOD_SCENARIO, {k: v for k, v in GOOD_SCENARIO.items() if k != "pair"} | {"id": "b"}),
            r"missing field 'pair'",
            ":2",
            r"\badd it\b",
            id="suite-missing-field",
        ),
        pytest.param(
            "--contexts",
            jsonl({"id": "c1", "messages": [USER, REPLY]}),
            r"missing field 'set'",
            ":1",
            r"\badd it: failure, neutral or success\b",
            id="contexts-missing-set",
        ),
        pytest.param(
            "--contexts",
            jsonl({"id": "c1", "set": "failure", "messages": ["hi", "there"]}),
            r"'messages' must be a list of \{role, content\} ending with an assistant turn",
            ":1",
            r"\bfix that line's messages\b",
            id="contexts-messages-not-objects",
        ),
    ],
)
def test_bad_eval_file_through_the_cli(world, tmp_path, capsys, flag, content, problem, where, remedy):
    path, out = tmp_path / "set.jsonl", tmp_path / "report"
    path.write_bytes(content)
    argv = ["eval", "--model", world.model_dir, "--basis", world.root / "basis", "--out", out, flag, path]
    message, _ = run_cli([*argv, "--sections", "activations,behaviour", "--limit", "1"], capsys)
    check_message(message, problem, [f"{path}{where}"], remedy)
    assert_no_partial_output(out, None)


# ----------------------------------------------------------------------------- command-line flags

FLAGS = [
    pytest.param(
        ["extract", "--layers", "a-b"],
        r"cannot read 'a-b' as a layer or range",
        ["--layers a-b"],
        r"\buse numbers, ranges and commas\b",
        id="extract-layers-not-a-range",
    ),
    pytest.param(
        ["extract", "--layers", "40"],
        r"layer 40 is out of range: the model has 4 layers",
        ["--layers 40"],
        r"\bchoose layers in that range\b",
        id="extract-layer-beyond-the-model",
    ),
    pytest.param(
        ["extract", "--emotions", "calm,clam"],
        r"unknown emotion 'clam'",
        ["--emotions"],
        r"\buse one of the 171 known emotions\b",
        id="extract-unknown-emotion",
    ),
    pytest.param(
        ["extract", "--dtype", "nonsense"],
        r"not a floating-point torch dtype",
        ["--dtype 'nonsense'"],
        r"\buse one of auto, float32, bfloat16, float16\b",
        id="extract-dtype-nonsense",
    ),
    pytest.param(
        ["eval", "--dtype", "int8", "--out", "{out}"],
        r"not a floating-point torch dtype",
        ["--dtype 'int8'"],
        r"\buse one of auto, float32\b",
        id="eval-dtype-integer",
    ),
    pytest.param(
        ["extract", "--device", "nonsense"],
        r"not a device name",
        ["--device 'nonsense'"],
        r"\buse auto, cpu, cuda, cuda:N\b",
        id="extract-device-nonsense",
    ),
    pytest.param(
        ["extract", "--device", "cuda:99"],
        r"this machine has (no CUDA GPU|\d+ CUDA device)",
        ["--device 'cuda:99'"],
        r"\buse --device cpu\b",
        id="extract-device-gpu-not-there",
    ),
    pytest.param(
        ["extract", "--model", "{root}/empty-folder"],
        r"holds no config\.json, so it is not a model folder",
        ["{root}/empty-folder"],
        r"\buse an embedded name\b",
        id="extract-model-folder-without-a-model",
    ),
    pytest.param(
        ["steer", "--emotion", "clam", "--prompt", "hi", "--basis", "{root}/basis"],
        r"unknown emotion 'clam'\. Did you mean 'calm'",
        ["--emotion"],
        r"\buse one of the 171 known emotions\b",
        id="steer-unknown-emotion",
    ),
    pytest.param(
        ["steer", "--emotion", "happy", "--prompt", "hi", "--basis", "{root}/basis"],
        r"not in the basis .* \(3 emotions\)",
        ["--emotion happy", "{root}/basis"],
        r"\bchoose one of afraid, calm, desperate\b",
        id="steer-emotion-not-in-basis",
    ),
    pytest.param(
        ["steer", "--emotion", "calm", "--prompt", "hi", "--basis", "{root}/basis", "--alphas", "0,lots"],
        r"not a comma-separated list of numbers",
        ["--alphas '0,lots'"],
        r"\buse e\.g\. --alphas\b",
        id="steer-alphas-not-numbers",
    ),
    pytest.param(
        ["eval", "--basis", "{root}/basis", "--sections", "behavior", "--out", "{out}"],
        r"unknown section\(s\) behavior",
        ["--sections"],
        r"\bchoose from activations, concealment, behaviour\b",
        id="eval-unknown-section",
    ),
]


@pytest.mark.parametrize(("argv", "problem", "where", "remedy"), FLAGS)
def test_bad_flag(world, tmp_path, capsys, argv, problem, where, remedy):
    out = tmp_path / "out"
    argv = [a.format(root=world.root, out=out) for a in argv]
    if "--model" not in argv:
        argv = [argv[0], "--model", world.model_dir, *argv[1:]]
    if argv[0] == "extract":
        argv += ["--out", str(out)]
    message, stdout = run_cli(argv, capsys)
    check_message(message, problem, [w.format(root=world.root) for w in where], remedy)
    assert "alpha=" not in stdout
    assert_no_partial_output(out, None)


@pytest.mark.parametrize(
    ("existing", "problem", "remedy"),
    [
        pytest.param("file", r"exists and is not a folder", r"\bchoose another output path\b", id="out-is-a-file"),
        pytest.param(
            "foreign", r"holds files that emotune did not write", r"\bchoose an empty or new", id="out-foreign"
        ),
    ],
)
def test_extract_refuses_an_output_path_it_does_not_own(world, tmp_path, capsys, existing, problem, remedy):
    out = tmp_path / "out"
    if existing == "file":
        out.write_text("my notes\n")
    else:
        out.mkdir()
        (out / "precious.txt").write_text("keep me\n")
    before = snapshot(out)
    message, _ = run_cli(["extract", "--model", world.model_dir, "--out", out], capsys)
    check_message(message, problem, [str(out)], remedy)
    assert_no_partial_output(out, before)


# ----------------------------------------------------------------------------- end to end, in real processes


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_train_script_exits_2_without_a_traceback(world, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(world, tmp_path / "fast.yaml", out, learning_rate="fast")
    result = _subprocess([str(ROOT / "scripts" / "train.py"), str(recipe)], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    check_message(
        error_line(result.stderr, "train"),
        r"invalid float value: 'fast'",
        [f"{recipe}: learning_rate"],
        r"\bfix the value\b",
    )
    assert_no_partial_output(out, None)


def test_cli_exits_2_without_a_traceback(world, tmp_path):
    out = tmp_path / "basis-out"
    result = _subprocess(["-m", "emotune.cli", "extract", "--emotions", "calm,clam", "--out", str(out)], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    check_message(
        error_line(result.stderr, "extract"), r"unknown emotion 'clam'", ["--emotions"], r"\buse one of the 171"
    )
    assert_no_partial_output(out, None)
