"""The users' surfaces: `emotune train` (checked in the parent, launched through accelerate), shipped recipes,
`--version`/`env`, `--device auto`, the held-out split, and W&B read back from an offline run's own files."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TRAIN_CONVERSATIONS, extract_tiny_basis, tiny_recipe
from test_trainer import build, setup  # noqa: F401  (setup is a fixture)

from emotune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def emotune_cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [sys.executable, "-m", "emotune.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600, cwd=cwd)


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file, parsed with W&B's own protobuf schema.

    The file is a LevelDB-format log (W&B's transaction log): a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks, each ``crc32 (4) | length (2) | kind (1) | payload``, where kind 1 is a whole
    record and 2/3/4 the first/middle/last piece of one that spans blocks.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pieces = payload if kind in (1, 2) else pieces + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def history_rows(records: list) -> list[dict]:
    """Each history record as ``{key: value}``. W&B stores a media value (table, image) as one item per field,
    keyed by ``[key, field]``; those are put back together into the value's dict."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in r.history.item:
            key = [item.key] if item.key else list(item.nested_key)
            value = json.loads(item.value_json)
            if len(key) == 1:
                row[key[0]] = value
            else:
                row.setdefault(key[0], {})["/".join(key[1:])] = value
        rows.append(row)
    return rows


def history_keys(records: list) -> set[str]:
    return {key for row in history_rows(records) for key in row}


def history_values(records: list, key: str) -> list:
    return [row[key] for row in history_rows(records) if key in row]


def artifact_types(records: list) -> list[str]:
    return [r.artifact.type for r in records if r.WhichOneof("record_type") == "artifact"]


@pytest.fixture(scope="module")
def world(tiny_chat_model_dir, tmp_path_factory):
    """Data, basis and a recipe writer for the tiny chat model."""
    from emotune.models import load_model

    root = tmp_path_factory.mktemp("surfaces")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in TRAIN_CONVERSATIONS))
    model, tok = load_model(str(tiny_chat_model_dir))
    extract_tiny_basis(model, tok).save(root / "basis")

    def recipe(name: str, output_dir: Path, **overrides) -> Path:
        path = root / name
        body = tiny_recipe(tiny_chat_model_dir, data, root / "basis", output_dir, **overrides)
        path.write_text(yaml.safe_dump(body))
        return path

    return root, recipe


# ----------------------------------------------------------------------------- emotune train


def test_emotune_train_refuses_a_misspelt_emotion_in_the_parent_with_one_line_and_exit_2(world, tmp_path):
    root, recipe = world
    bad = [{"emotion": "desparate", "form": "penalize", "weight": 1, "tags": ["failure"]}]
    path = recipe("bad.yaml", tmp_path / "out", emotion_terms=bad)
    result = emotune_cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "unknown emotion 'desparate'" in errors[0]
    assert "Traceback" not in result.stderr
    assert "accelerate launch" not in result.stdout  # refused before launching
    assert not (tmp_path / "out").exists()


def test_emotune_train_names_an_unknown_recipe_and_lists_the_shipped_ones(tmp_path):
    result = emotune_cli("train", "clam", cwd=tmp_path)
    assert result.returncode == 2
    assert "clam: no such recipe file, and not a shipped recipe" in result.stderr and "calm" in result.stderr
    assert "Traceback" not in result.stderr
    listed = emotune_cli("train", "--list", cwd=tmp_path)
    assert listed.returncode == 0 and "calm" in listed.stdout.split()


def test_emotune_train_finds_a_shipped_recipe_by_name_and_passes_every_launcher_setting(tmp_path):
    # --bf16 false: the shipped GPU recipe asks for bf16, which TrainingArguments refuses on a CPU-only machine
    cpu = [] if torch.cuda.is_available() else ["--bf16", "false"]
    result = emotune_cli(
        "train", "--dry-run", "llama-3.1-8b-calm", *cpu, "--output_dir", str(tmp_path / "o"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    command = result.stdout.strip().splitlines()[-1]
    assert str(ROOT / "emotune" / "recipes" / "llama-3.1-8b-calm.yaml") in command
    for setting in ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend"):
        assert setting in command
    assert "--module emotune.train" in command


def test_launch_settings_follow_the_recipe_and_leave_an_accelerate_config_file_alone():
    from types import SimpleNamespace

    from emotune.train import launch_args

    cpu = SimpleNamespace(use_cpu=True, bf16=False, fp16=False)
    assert launch_args(cpu) == [
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    gpu = SimpleNamespace(use_cpu=False, bf16=True, fp16=False)
    two = launch_args(gpu, num_processes=2)
    assert two[:2] == ["--num_processes", "2"] and "bf16" in two and two[-1] == "--multi_gpu"
    assert launch_args(gpu, config_file="fsdp.yaml") == ["--config_file", "fsdp.yaml"]
    assert launch_args(gpu, config_file="fsdp.yaml", num_processes=4)[2:] == ["--num_processes", "4"]


def test_a_shipped_accelerate_config_is_found_by_name_and_its_values_are_not_overridden(world, tmp_path, capsys):
    from emotune.train import launch

    root, recipe = world
    path = str(recipe("c.yaml", tmp_path / "out"))
    assert launch(path, dry_run=True, config_file="fsdp") == 0
    command = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"--config_file {ROOT / 'emotune' / 'recipes' / 'accelerate_configs' / 'fsdp.yaml'}" in command
    assert "--num_processes" not in command
    with pytest.raises(ConfigError, match="--config-file fdsp: no such file.*ddp, deepspeed_zero3, fsdp"):
        launch(path, dry_run=True, config_file="fdsp")


def test_emotune_train_launches_a_tiny_run_through_accelerate_without_its_defaults_warning(world, tmp_path):
    root, recipe = world
    path = recipe("ok.yaml", tmp_path / "out")
    result = emotune_cli("train", str(path), "--learning_rate", "0.001", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert yaml.safe_load((tmp_path / "out" / "adapter" / "recipe.yaml").read_text())["learning_rate"] == 0.001
    assert "were not passed" not in result.stderr and "were set to a value" not in result.stderr


def test_a_failure_inside_the_launched_run_keeps_its_exit_status(world, tmp_path):
    root, recipe = world
    # a layer out of range needs the model to detect: the parent cannot see it, the training process can
    path = recipe("late.yaml", tmp_path / "out", emotion_layers=[9])
    result = emotune_cli("train", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "layer 9 is out of range" in result.stderr


def test_recipes_ship_in_the_wheel_and_the_checkout_path_still_works(tmp_path):
    assert (ROOT / "recipes" / "calm.yaml").resolve() == (ROOT / "emotune" / "recipes" / "calm.yaml").resolve()
    # build from a copy, so that the build leaves nothing in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "emotune", src / "emotune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("emotune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "emotune/recipes/calm.yaml" in names
    assert "emotune/recipes/accelerate_configs/fsdp.yaml" in names


# ----------------------------------------------------------------------------- --version, env, --device auto


def test_version_and_env_report_what_a_bug_report_needs():
    from emotune import __version__

    assert emotune_cli("--version").stdout.strip() == f"emotune {__version__}"
    result = emotune_cli("env")
    assert result.returncode == 0, result.stderr
    for key in ("torch:", "transformers:", "trl:", "peft:", "accelerate:", "cpu capability:", "cuda devices:"):
        assert key in result.stdout
    assert torch.backends.cpu.get_cpu_capability() in result.stdout
    assert "model smollm2-135m-instruct:" in result.stdout and "cache dir:" in result.stdout


def test_every_flag_of_every_subcommand_has_help_and_every_subcommand_an_example():
    import argparse

    from emotune.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        if name != "emotions":
            assert command.epilog and "emotune " + name in command.epilog, name
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest}"


def test_device_auto_is_the_default_and_picks_the_best_device_there_is():
    from emotune.cli import build_parser
    from emotune.models import auto_device, parse_device

    parser = build_parser()
    commands = (["extract", "--out", "x"], ["eval", "--out", "x"], ["steer", "--emotion", "calm", "--prompt", "x"])
    for command in commands:
        assert parser.parse_args(command).device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert auto_device().type == expected and parse_device("auto") == auto_device()


# ----------------------------------------------------------------------------- held-out split


def test_the_held_out_split_has_every_kind_of_context_and_is_seeded():
    from emotune.conversations import load_conversations
    from emotune.train import held_out_split

    conversations = load_conversations(None)
    train, held = held_out_split(conversations, 0.1, seed=3)
    assert len(train) + len(held) == len(conversations) and not {c.id for c in train} & {c.id for c in held}
    assert len(held) == pytest.approx(0.1 * len(conversations), abs=len({tuple(sorted(c.tags)) for c in train}))
    assert {t for c in held for t in c.tags} == {t for c in conversations for t in c.tags}
    assert [c.id for c in held_out_split(conversations, 0.1, seed=3)[1]] == [c.id for c in held]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_fraction": 0.2}, "eval_strategy is 'no'"),
        ({"eval_strategy": "steps", "eval_steps": 1}, "needs held-out conversations"),
        ({"eval_fraction": 1.5, "eval_strategy": "steps"}, "eval_fraction: 1.5 must be in [0, 1)"),
    ],
)
def test_a_held_out_split_and_eval_strategy_go_together(world, tmp_path, overrides, message):
    from emotune.train import check_recipe

    root, recipe = world
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        check_recipe([str(recipe("e.yaml", tmp_path / "out", **overrides))])


# ----------------------------------------------------------------------------- W&B


@pytest.mark.slow  # a training run with the final evaluation, then an evaluation: minutes on a loaded machine
def test_an_offline_wandb_run_holds_emotion_curves_the_basis_artifact_the_shift_table_and_plots(world, tmp_path):
    """One training run with a held-out split and the final evaluation, then `emotune eval --wandb` into it."""
    root, recipe = world
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path)}
    env["WANDB_SILENT"] = "true"
    path = recipe(
        "wb.yaml",
        tmp_path / "out",
        report_to="wandb",
        run_name="tiny",
        emotion_eval=True,
        eval_fraction=0.25,
        eval_strategy="steps",
        eval_steps=1,
    )
    result = emotune_cli("train", str(path), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    keys = history_keys(records)
    # the emotion section, in training and on the held-out split (trl's eval loop)
    assert {"emotion/proj_calm@failure", "emotion/penalize_desperate"} <= keys
    assert {"eval/emotion/proj_calm@failure", "eval/emotion/proj_desperate@failure", "eval/loss"} <= keys
    assert not any(k.startswith("train/emotion/") for k in keys)
    assert len(history_values(records, "eval/emotion/proj_calm@failure")) == 2  # a curve: one point per eval step
    # the basis as the run's artifact, the report's table, plots and folder
    assert "emotion-basis" in artifact_types(records) and "emotion-eval" in artifact_types(records)
    table = history_values(records, "eval_report/shift_table")
    assert table and table[0]["_type"] == "table-file" and table[0]["nrows"] >= 3
    images = [k for k in keys if k.startswith("eval_report/") and k != "eval_report/shift_table"]
    assert images and all(history_values(records, k)[0]["_type"] == "image-file" for k in images)
    assert "eval/perplexity_change" in keys

    # `emotune eval --wandb` resumes the training run by the id kept in <output_dir>/wandb_run_id
    run_id = (tmp_path / "out" / "wandb_run_id").read_text().strip()
    result = emotune_cli(
        "eval",
        "--model", str(Path(json.loads((tmp_path / "out" / "emotune_run.json").read_text())["model"])),
        "--adapter", str(tmp_path / "out" / "adapter"),
        "--basis", str(root / "basis"),
        "--sections", "activations",
        "--limit", "4",
        "--out", str(tmp_path / "report"),
        "--wandb",
        env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2, runs
    resumed = wandb_records(runs[-1])
    assert "eval_report/shift_table" in history_keys(resumed) and "emotion-eval" in artifact_types(resumed)


def test_an_unwritable_wandb_folder_is_refused_before_any_work(world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {"WANDB_DIR": str(blocker / "wandb"), "WANDB_MODE": "offline"}
    result = emotune_cli("eval", "--model", "x", "--out", str(tmp_path / "report"), "--wandb", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"WANDB_DIR {blocker / 'wandb'}: W&B cannot write its run there" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "report").exists()
    root, recipe = world
    path = recipe("w.yaml", tmp_path / "out", report_to="wandb")
    result = emotune_cli("train", str(path), env=env, cwd=tmp_path)
    assert result.returncode == 2 and "W&B cannot write its run there" in result.stderr


def test_the_report_table_gathers_every_per_emotion_row_wherever_the_report_keeps_it():
    from emotune.tracking import report_numbers, report_rows

    report = {
        "activations": {"sets": {"failure": {"layers": {"2": {"table": [{"emotion": "calm", "shift": 0.1}]}}}}},
        "other": {"rows": [{"emotion": "sad", "shift": -0.2, "d": 1.0}], "n": 3, "flag": True, "xs": [1, 2]},
    }
    columns, rows = report_rows(report)
    assert columns == ["where", "emotion", "shift", "d"]
    assert rows == [["activations/sets/failure/layers/2/table", "calm", 0.1, None], ["other/rows", "sad", -0.2, 1.0]]
    assert report_numbers(report) == {"eval_report/other/n": 3.0}


# ----------------------------------------------------------------------------- sharded models


def test_a_sharded_model_runs_the_whole_base_forward_and_gets_the_same_base_states(setup, tmp_path, monkeypatch):  # noqa: F811
    trainer = build(setup, tmp_path, drift_weight=1.0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    heads = []
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    handle = head.register_forward_hook(lambda *_: heads.append(1))
    try:
        assert not trainer.model_is_sharded()
        stopped = trainer._base_pass(trainer.model, batch)
        assert heads == []  # unsharded: the base pass stops after the last needed layer
        monkeypatch.setattr(type(trainer), "model_is_sharded", lambda self: True)
        full = trainer._base_pass(trainer.model, batch)
        assert heads == [1]
    finally:
        handle.remove()
    assert stopped.keys() == full.keys()
    for layer in stopped:
        torch.testing.assert_close(stopped[layer], full[layer])


def test_trl_is_pinned_to_compatible_releases_and_the_installed_one_fits_the_pin():
    import importlib.metadata
    import re

    from packaging.requirements import Requirement

    (pin,) = re.findall(r'^\s*"(trl[^"]*)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    trl = Requirement(pin)
    assert str(trl.specifier).startswith("~=")
    assert importlib.metadata.version("trl") in trl.specifier


def test_log_report_puts_the_shift_table_plots_and_folder_in_an_offline_run(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb

    from emotune.tracking import log_report

    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "report"
    folder.mkdir()
    plt.plot([0, 1])
    plt.savefig(folder / "shifts.png")
    (folder / "report.md").write_text("# report\n")
    report = {"activations": {"sets": {"failure": {"layers": {"2": {"table": [
        {"emotion": e, "shift": 0.1 * i} for i, e in enumerate(("calm", "desperate", "afraid"))
    ]}}}}}, "capability": {"perplexity_change": 0.01}}  # fmt: skip
    run = wandb.init(mode="offline", dir=str(tmp_path), project="t")
    log_report(run, report, folder)
    run.finish()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (table,) = history_values(records, "eval_report/shift_table")
    assert table["_type"] == "table-file" and table["nrows"] == 3
    (image,) = history_values(records, "eval_report/shifts")
    assert image["_type"] == "image-file"
    assert "emotion-eval" in artifact_types(records)
