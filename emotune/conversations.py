"""Training conversations with tagged spans, and their tokenisation into aligned masks.

Schema (JSONL, one conversation a line; also the schema for a user's own dataset)::

    {"id": "f0001", "domain": "coding-agent", "messages": [
        {"role": "system" | "user" | "assistant" | "tool", "content": "...", "tags": ["failure", ...]},
        ...]}

- ``tags`` (optional, per message) name the context a message belongs to. A recipe's loss
  terms select tokens by tag, e.g. ``failure``: the tool output or user turn that reports a
  failure and the assistant reply after it. Tags are free strings; the shipped data uses
  ``failure``, ``pressure``, ``neutral`` and ``success``.
- Tags exist implicitly for each role (``assistant``, ``user``, ``system``, ``tool``: every message of
  that role) and ``all`` (every token). A loss term intersects its tags with the roles it covers
  (default: assistant), so ``tags: [failure]`` means the assistant's tokens in failure contexts.
- The LM loss is on assistant messages only.

Tokenisation renders the chat template once per prefix of the conversation, so each message
owns the characters its turn adds (role header included); character spans map to tokens via
the tokenizer's offsets. Each token gets a bit set of its tags, kept in a list aligned with
``input_ids``, so truncation and padding cannot misalign the masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emotune.basis import render_dialogue
from emotune.corpus import read_jsonl, shipped_path
from emotune.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
IMPLICIT_TAGS = ("assistant", "all", "system", "user", "tool")


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[dict[str, Any], ...]
    source: str = ""

    @property
    def tags(self) -> set[str]:
        return {t for m in self.messages for t in m.get("tags", ())}


def validate_record(obj: dict[str, Any], where: str) -> Conversation:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: missing field 'messages' (a non-empty list of {{role, content, tags?}}). Add it to that line."
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object. Write it as {{role, content, tags?}}.")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {message.get('role')!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise DataError(f"{where}: messages[{i}].content must be a non-empty string. Add the message's text.")
        tags = message.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise DataError(
                f"{where}: messages[{i}].tags is {tags!r:.60}, not a list of tag names. "
                'Write it as a list, e.g. "tags": ["failure"].'
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: no assistant message, so there is nothing to train on. Add an assistant reply, "
            "or remove the conversation."
        )
    return Conversation(str(obj.get("id", where)), tuple(messages), where)


def load_conversations(path: str | Path | None = None, *, split: str = "train") -> list[Conversation]:
    """Load conversations from a local .jsonl file or folder, a hub dataset id, or the shipped set.

    Hub datasets need a ``messages`` column in the same schema.
    """
    if path is None:
        path = shipped_path("train")
    p = Path(path)
    if not p.exists() and p.suffix in (".jsonl", ".json"):  # a local file, not a hub id: do not ask the hub
        raise DataError(f"{p}: file not found. Check the path, or pass a folder of .jsonl files.")
    if p.exists():
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        if not files:
            raise DataError(f"{p}: folder holds no .jsonl files. Put the conversations in <name>.jsonl files.")
        out = [validate_record(obj, f"{f}:{n}") for f in files for n, obj in read_jsonl(f)]
    else:
        try:
            from datasets import load_dataset

            rows = load_dataset(str(path), split=split)
        except Exception as exc:
            raise DataError(
                f"{path}: not a local file or folder, and not loadable as a hub dataset ({str(exc).splitlines()[0]})."
            ) from None
        out = [validate_record(dict(row), f"{path}[{i}]") for i, row in enumerate(rows)]
    if not out:
        raise DataError(
            f"{path}: no conversations found (empty). Add one JSON object a line: "
            '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}.'
        )
    return out


def tag_index(tags: Iterable[str]) -> dict[str, int]:
    """Bit position of each tag, implicit tags first."""
    ordered = list(IMPLICIT_TAGS) + sorted(set(tags) - set(IMPLICIT_TAGS))
    if len(ordered) > 62:
        raise DataError(f"at most 62 distinct tags are supported, got {len(ordered)}.")
    return {t: k for k, t in enumerate(ordered)}


def tokenize_conversation(
    conv: Conversation, tokenizer: Any, bits: dict[str, int], max_length: int | None = None
) -> dict[str, list[int]]:
    """``input_ids``, ``labels`` (-100 off assistant turns) and ``tag_bits`` aligned token by token."""
    texts = [render_dialogue(tokenizer, conv.messages[: i + 1]) for i in range(len(conv.messages))]
    full = texts[-1]
    spans = []
    start = 0
    for i, text in enumerate(texts):
        if not text.startswith(full[:start]) or not full.startswith(text):
            # a template that rewrites earlier turns (rare): fall back to locating the content
            at = full.find(conv.messages[i]["content"], start)
            end = at + len(conv.messages[i]["content"]) if at >= 0 else start
            spans.append((start if at < 0 else at, end))
            start = max(start, end)
            continue
        spans.append((start, len(text)))
        start = len(text)
    try:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, KeyError):
        raise ConfigError(
            f"{conv.source or conv.id}: the tokenizer ({type(tokenizer).__name__}) cannot map tokens to characters "
            "(no offset mapping), which tagging the training tokens needs. Use a model whose folder has a fast "
            "tokenizer (tokenizer.json)."
        ) from None
    ids: list[int] = list(encoded["input_ids"])
    labels = [-100] * len(ids)
    tag_bits = [1 << bits["all"]] * len(ids)
    for (lo, hi), message in zip(spans, conv.messages):
        value = 0
        for tag in message.get("tags", ()):
            if tag in bits:
                value |= 1 << bits[tag]
        if message["role"] in bits:
            value |= 1 << bits[message["role"]]
        for k, (a, b) in enumerate(offsets):
            if a < hi and b > lo and b > a:  # the token overlaps this message's characters
                tag_bits[k] |= value
                if message["role"] == "assistant":
                    labels[k] = ids[k]
    if max_length is not None and len(ids) > max_length:
        ids, labels, tag_bits = ids[:max_length], labels[:max_length], tag_bits[:max_length]
    return {"input_ids": ids, "labels": labels, "tag_bits": tag_bits}


def check_tags_present(conversations: Sequence[Conversation], wanted: Iterable[str], where: str = "recipe") -> None:
    present = set(IMPLICIT_TAGS).union(*(c.tags for c in conversations))
    missing = sorted(set(wanted) - present)
    if missing:
        raise DataError(
            f"{where}: tag(s) {', '.join(repr(m) for m in missing)} appear in no message of the training data "
            f"(tags present: {', '.join(sorted(present))}). Tag the messages in the data, or fix the term's tags."
        )
