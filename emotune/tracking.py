"""Weights & Biases as the viewer of a run: emotion curves in their own section, the basis as the run's input
artifact, and the evaluation report (shift table, plots, Markdown, headline numbers) at the end.

What a run holds (docs/WANDB.md):

- ``emotion/*``: the training-time projections and term values (trainer.py logs them; W&B groups them by the
  prefix before ``/``), and ``eval/emotion/*`` for the same on the held-out split (``eval_fraction``);
- an ``emotion-basis`` artifact, declared as the run's input online (W&B refuses ``use_artifact`` offline, so an
  offline run logs it and the lineage appears when it is synced);
- after ``emotion_eval: true`` or ``emotune eval --wandb``: ``eval_report/shift_table`` (a table of every per-emotion
  row the report holds), ``eval_report/<plot>`` images, an ``emotion-eval`` artifact with the report folder, and
  the report's numbers in the run summary.

Everything here reads the evaluation report generically (rows with an ``emotion`` key, numbers, PNG files), so
the report's schema can grow without this module changing.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers.integrations import WandbCallback
from transformers.integrations.integration_utils import rewrite_logs

from emotune.errors import ConfigError

logger = logging.getLogger("emotune")

WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
BASIS_ARTIFACT_TYPE = "emotion-basis"
EVAL_ARTIFACT_TYPE = "emotion-eval"
# the emotion keys keep their own section: trainer.py logs "emotion/x", which transformers would file as "train/..."
EMOTION_PREFIX = "emotion/"
# end-of-training numbers that WandbCallback puts in the run summary rather than in the history
SUMMARY_ONLY = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}
)


def offline_without_key() -> None:
    """With no W&B API key (environment or ~/.netrc), log offline and say so once, rather than prompting."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        os.environ["WANDB_MODE"] = "offline"
        logger.warning("W&B: no API key found, so this run logs offline to ./wandb (sync later with `wandb sync`).")


def check_wandb_dir(where: str = "WANDB_DIR") -> Path:
    """The folder W&B will write its run into (``WANDB_DIR``, else the working folder), checked writable now:
    W&B itself would fail at its first write, minutes into a run."""
    folder = Path(os.environ.get("WANDB_DIR") or ".").expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        name = f"{where} {folder}" if os.environ.get("WANDB_DIR") else f"the working folder {folder.resolve()}"
        raise ConfigError(
            f"{name}: W&B cannot write its run there ({existing} is not a writable folder). "
            "Set WANDB_DIR to a writable folder, or turn W&B off (report_to: none, or no --wandb)."
        ) from None
    return folder


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:100] or "model"


def log_basis(run: Any, basis: Any) -> Any:
    """Log ``basis`` as an ``emotion-basis`` artifact and, online, declare it the run's input (lineage)."""
    import wandb

    source = basis.metadata.get("model", {})
    name = source.get("hub_id") or source.get("model") or "model"
    metadata = {
        "model": source,
        "fingerprint": basis.metadata.get("fingerprint"),
        "method": basis.metadata.get("method"),
        "layers": list(basis.layers),
        "default_layer": basis.default_layer,
        "emotions": len(basis),
    }
    artifact = wandb.Artifact(f"emotion-basis-{_slug(str(name))}", type=BASIS_ARTIFACT_TYPE, metadata=metadata)
    with tempfile.TemporaryDirectory() as tmp:
        basis.save(Path(tmp) / "basis")
        artifact.add_dir(str(Path(tmp) / "basis"))  # the default "mutable" policy copies the files now
        if run.settings._offline:
            run.log_artifact(artifact)
        else:
            run.use_artifact(artifact)
    return artifact


def _walk(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, (*path, str(key)))


def report_numbers(report: dict[str, Any]) -> dict[str, float]:
    """Every number reachable through the report's mappings (lists are left out: they are per-item data)."""
    return {
        "eval_report/" + "/".join(path): float(value)
        for path, value in _walk(report)
        if path and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def report_rows(report: dict[str, Any]) -> tuple[list[Any], list[list[Any]]]:
    """``(columns, rows)``: every per-emotion row of the report (a list of mappings with an ``emotion`` key),
    with ``where`` naming the list it came from (e.g. ``activations/sets/failure/layers/18/table``)."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path, value in _walk(report):
        if isinstance(value, list) and value and all(isinstance(r, dict) and "emotion" in r for r in value):
            found += [("/".join(path), r) for r in value]
    columns: list[Any] = ["where"]
    for _, row in found:
        columns += [k for k, v in row.items() if k not in columns and isinstance(v, (str, int, float, type(None)))]
    return columns, [[where] + [row.get(k) for k in columns[1:]] for where, row in found]


def log_report(run: Any, report: dict[str, Any], folder: str | Path) -> None:
    """Log an evaluation report folder: the per-emotion shift table, its plots, its numbers, and the folder."""
    import wandb

    folder = Path(folder)
    columns, rows = report_rows(report)
    media: dict[str, Any] = {}
    if rows:
        media["eval_report/shift_table"] = wandb.Table(columns=columns, data=rows)
    for png in sorted(folder.glob("*.png")):
        media[f"eval_report/{png.stem}"] = wandb.Image(str(png), caption=png.stem)
    if media:
        run.log(media)
    run.summary.update(report_numbers(report))
    artifact = wandb.Artifact(f"eval-report-{_slug(run.id)}", type=EVAL_ARTIFACT_TYPE)
    artifact.add_dir(str(folder))
    run.log_artifact(artifact)


def open_eval_run(run_id: str | None, adapter: str | None, out: str | Path) -> Any:
    """The W&B run ``emotune eval --wandb`` logs to: ``run_id``, else the training run of a local adapter
    (``<output_dir>/wandb_run_id``, beside ``<output_dir>/adapter``), resumed; else a new run."""
    import wandb

    from emotune.train import WANDB_ID_FILE

    if run_id is not None and not WANDB_ID.fullmatch(run_id):
        raise ConfigError(
            f"--wandb-run-id {run_id!r}: not a W&B run id (letters, digits, - and _). Copy it from the run's URL."
        )
    if run_id is None and adapter and (Path(adapter).parent / WANDB_ID_FILE).is_file():
        stored = (Path(adapter).parent / WANDB_ID_FILE).read_text(encoding="utf-8", errors="replace").strip()
        run_id = stored if WANDB_ID.fullmatch(stored) else None
    offline_without_key()
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "huggingface"),  # the project WandbCallback logs training to
        id=run_id,
        resume="allow" if run_id else None,
        name=None if run_id else f"eval-{Path(out).name}",
        job_type="eval",
    )


class EmotuneWandbCallback(WandbCallback):
    """transformers' WandbCallback, plus: ``emotion/*`` keys in their own section, and the basis as an artifact."""

    def __init__(self, basis: Any) -> None:
        super().__init__()
        self.basis = basis

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        super().setup(args, state, model, **kwargs)
        run = getattr(self._wandb, "run", None)
        if run is None or not state.is_world_process_zero:
            return
        for key in (EMOTION_PREFIX + "*", "eval/" + EMOTION_PREFIX + "*"):
            run.define_metric(key, step_metric="train/global_step")
        log_basis(run, self.basis)

    def on_log(self, args: Any, state: Any, control: Any, model: Any = None, logs: Any = None, **kwargs: Any) -> None:
        if self._wandb is None:
            return
        if not self._initialized:
            self.setup(args, state, model)
        if not state.is_world_process_zero:
            return
        # as WandbCallback.on_log, except that emotion/* keys keep their own section instead of going to train/*
        for key in SUMMARY_ONLY & set(logs or {}):
            self._wandb.run.summary[key] = logs[key]
        rest = {k: v for k, v in (logs or {}).items() if k not in SUMMARY_ONLY}
        own = {k: v for k, v in rest.items() if k.startswith(EMOTION_PREFIX)}
        other = rewrite_logs({k: v for k, v in rest.items() if k not in own})
        self._wandb.log({**other, **own, "train/global_step": state.global_step})
