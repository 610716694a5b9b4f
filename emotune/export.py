"""Upload an adapter folder (PEFT adapter + basis + recipe + model card) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from emotune.errors import ConfigError, DataError


def push_adapter(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise DataError(f"{folder}: not an adapter folder (no adapter_config.json). Point at <output_dir>/adapter.")
    token = token or get_token()
    if not token:
        raise ConfigError("no Hugging Face token found. Run `huggingface-cli login` or set HF_TOKEN.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload emotune adapter"
    )
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
