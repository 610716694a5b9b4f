"""Publishing and interop: push adapters and bases to the Hugging Face Hub, and write emotion vectors in the
formats other tools steer with (llama.cpp control vectors, lm-evaluation-harness steering files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emotune.errors import ConfigError, DataError, EmotuneError

# ----------------------------------------------------------------------------- the hub


def push_folder(
    parts: Mapping[Path, str],
    repo_id: str,
    *,
    files: Mapping[str, bytes] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload with emotune",
) -> str:
    """Upload each local folder of ``parts`` under its path in the repo, plus ``files`` (path -> bytes, which
    win over a folder's file of the same path), in **one** commit; returns the commit's URL.

    Dot-files (the temporary folders of atomic writes) are left out.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise ConfigError("no Hugging Face token found. Run `hf auth login` or set HF_TOKEN, then export again.")
    content: dict[str, Path | bytes] = {}
    for folder, prefix in parts.items():
        for path in sorted(Path(folder).rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                content["/".join(filter(None, [prefix.strip("/"), relative.as_posix()]))] = path
    content.update(files or {})
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(data) if isinstance(data, Path) else data)
        for name, data in sorted(content.items())
    ]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    except HfHubHTTPError as exc:
        raise EmotuneError(
            f"push to {repo_id} failed: {str(exc).splitlines()[0]} Check the repo id, that your token can write "
            "to it, and the network."
        ) from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def _has_metadata(card: Path) -> bool:
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(card).data.to_dict()
    except Exception:
        return False
    return bool(data.get("base_model") and data.get("library_name"))


def push_adapter(
    folder: str | Path,
    repo_id: str,
    *,
    report: str | Path | None = None,
    private: bool = False,
    token: str | None = None,
    keep_card: bool = False,
) -> str:
    """Push an adapter folder (adapter, basis, recipe, card) and its eval report to ``repo_id`` in one commit.

    The report is ``report`` (a report folder) or, when not given, ``eval/`` beside the adapter (where
    training's final evaluation writes it); it goes to ``eval/`` in the repo. The model card is rebuilt with
    the repo id and the report's numbers, unless ``keep_card``.
    """
    from emotune.adapter import BASIS_DIR, CARD_FILE, model_card, read_adapter, read_report
    from emotune.basis import EmotionBasis

    adapter = read_adapter(folder)
    report_dir = Path(report) if report is not None else adapter.path.parent / "eval"
    found = read_report(report_dir)
    if report is not None and found is None:
        raise DataError(f"--report {report}: no report.json there. Point at the folder `emotune eval --out` wrote.")
    files: dict[str, bytes] = {}
    card = adapter.path / CARD_FILE
    if keep_card:
        if not card.is_file() or not _has_metadata(card):
            raise DataError(
                f"{card}: missing, or without a metadata block naming base_model and library_name, which the hub "
                "needs to link the adapter to its base. Leave out --keep-card to rebuild the card."
            )
    else:
        basis = EmotionBasis.load(adapter.path / BASIS_DIR) if (adapter.path / BASIS_DIR).is_dir() else None
        run = adapter.run or {"source": {"hub_id": adapter.config.get("base_model_name_or_path")}}
        files[CARD_FILE] = model_card(run, adapter.recipe, basis, found, repo_id=repo_id).encode("utf-8")
    parts = {adapter.path: ""}
    if found is not None:
        parts[report_dir] = "eval"
    message = "Upload emotune adapter, basis" + (" and eval report" if found is not None else "")
    return push_folder(parts, repo_id, files=files, private=private, token=token, commit_message=message)


# ----------------------------------------------------------------------------- interop formats


def _steering(basis: Any, emotion: str, strength: float, layers: Sequence[int] | None) -> dict[int, Any]:
    """``{layer: strength * r_l * v_e}``: the vectors ``emotune.steer`` adds, as float32 on the CPU."""
    from emotune.steer import steering_vectors

    if emotion not in basis.emotions:
        raise ConfigError(
            f"--emotion {emotion}: not in this basis ({len(basis.emotions)} emotions: "
            f"{', '.join(basis.emotions[:12])}{', ...' if len(basis.emotions) > 12 else ''}). Choose one it has."
        )
    missing = [x for x in layers or [] if x not in basis.layers]
    if missing:
        raise ConfigError(
            f"--layers: layer(s) {', '.join(map(str, missing))} not in this basis (layers "
            f"{', '.join(map(str, basis.layers))}). Choose layers it has."
        )
    return {k: v.detach().float().cpu() for k, v in steering_vectors(basis, emotion, strength, layers).items()}


def export_llamacpp(
    basis: Any, emotion: str, strength: float, out: str | Path, layers: Sequence[int] | None = None
) -> Path:
    """Write a llama.cpp control vector (GGUF, for ``--control-vector``) that adds ``strength * r_l * v_e``.

    llama.cpp's loader reads tensors named ``direction.N`` (1-D, F32) and adds ``direction.N`` to the output
    of block N, counted from 0 as we count, so our layer L is ``direction.L``; block 0 cannot be steered there
    (N must be at least 1). The strength is baked in: load it with ``--control-vector FILE`` (scale 1).
    """
    import gguf

    from emotune.io import atomic_file

    vectors = _steering(basis, emotion, strength, layers)
    if 0 in vectors:
        raise ConfigError(
            "--layers 0: llama.cpp control vectors cannot steer block 0 (its direction tensors start at 1). "
            "Choose layers from 1 up."
        )
    source = basis.metadata.get("model") or {}
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", str(source.get("hub_id") or source.get("model") or ""))
        writer.add_uint32("controlvector.layer_count", len(vectors))
        writer.add_string("emotune.emotion", emotion)
        writer.add_float32("emotune.strength", float(strength))
        for layer, vector in sorted(vectors.items()):
            writer.add_tensor(f"direction.{layer}", vector.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)


def export_lm_eval(
    basis: Any,
    emotion: str,
    strength: float,
    out: str | Path,
    layers: Sequence[int] | None = None,
    hookpoint: str = "layers.{layer}",
) -> Path:
    """Write the ``.pt`` steering file of lm-evaluation-harness's ``steered`` model.

    It maps each hookpoint (a module name under the HF model's ``base_model``: ``layers.{layer}`` for Llama,
    Qwen, Mistral and Gemma; ``model.model.layers.{layer}`` under a PEFT adapter) to an ``add`` of
    ``steering_coefficient * steering_vector``: our unit vector, times ``strength * r_l``.
    """
    import torch

    from emotune.io import atomic_file

    if "{layer}" not in hookpoint:
        raise ConfigError(f"--hookpoint {hookpoint!r}: must contain {{layer}}, e.g. layers.{{layer}}.")
    config: dict[str, dict[str, Any]] = {}
    for layer in sorted(_steering(basis, emotion, strength, layers)):  # checks the emotion and layers
        config[hookpoint.format(layer=layer)] = {
            "action": "add",
            "steering_coefficient": float(strength * basis.scale(layer)),
            "steering_vector": basis.vector(emotion, layer).detach().float().cpu().contiguous(),
            "bias": None,
        }
    with atomic_file(out) as tmp:
        torch.save(config, tmp)
    return Path(out)
