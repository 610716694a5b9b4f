"""Let a capable model write its own emotion stories, as the paper did.

The prompt carries the same rules as our shipped corpus (no emotion word, 60-160 words, a
given topic and narration), and every generated story passes the same leakage filter and
length check before it is kept. Output uses the shipped schema, so ``load_stories`` reads it.
Small models write poor stories (DESIGN.md: SmolLM2's own stories gave near-chance vectors),
so use a capable instruct model and validate the basis you get.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from emotune.basis import render_dialogue
from emotune.catalog import EMOTIONS, check_emotions
from emotune.corpus import STORY_MAX_WORDS, STORY_MIN_WORDS, TOPICS, find_leaks, word_count
from emotune.io import write_text_atomic

PROMPT = """Write one short story, a single paragraph of {low} to {high} words.
Setting: {topic}.
Narration: {person} person.
The main character feels {emotion} from the first sentence to the last.
Never write the word "{emotion}", any form of it, or a direct synonym. Show the feeling through
actions, the body, thoughts, dialogue and the situation, so a reader could name it.
Reply with the story only: no title, no preface."""


def build_prompt(emotion: str, topic: str, person: str) -> str:
    return PROMPT.format(
        low=STORY_MIN_WORDS + 20,
        high=STORY_MAX_WORDS - 30,
        topic=TOPICS.get(topic, topic),
        person=person,
        emotion=emotion,
    )


def clean_story(text: str) -> str:
    text = text.strip().strip('"').strip()
    text = re.sub(r"^(title|story)\s*:.*\n", "", text, flags=re.I)
    return " ".join(text.split())


def accept(text: str, emotion: str) -> str | None:
    """Why a generated story is rejected, or None when it is kept."""
    if find_leaks(text, emotion):
        return "names its emotion"
    n = word_count(text)
    if not STORY_MIN_WORDS <= n <= STORY_MAX_WORDS:
        return f"{n} words"
    return None


@torch.no_grad()
def generate_stories(
    model: Any,
    tokenizer: Any,
    *,
    emotions: Sequence[str] | None = None,
    per_emotion: int = 12,
    max_attempts: int = 3,
    max_new_tokens: int = 260,
    temperature: float = 0.9,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Generate stories; returns the kept records and the count of rejections by reason."""
    names = check_emotions(emotions) if emotions is not None else list(EMOTIONS)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    topics = list(TOPICS)
    kept: list[dict[str, str]] = []
    rejected: dict[str, int] = {}
    for emotion in tqdm(names, desc="writing stories", disable=not progress):
        chosen = rng.sample(topics, k=min(per_emotion, len(topics)))
        for k, topic in enumerate(chosen):
            person = "first" if k % 2 else "third"
            for _ in range(max_attempts):
                prompt = render_dialogue(
                    tokenizer,
                    [{"role": "user", "content": build_prompt(emotion, topic, person)}],
                    add_generation_prompt=True,
                )
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
                out = model.generate(
                    ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=temperature,
                    top_p=0.95,
                    pad_token_id=tokenizer.pad_token_id,
                )
                text = clean_story(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
                reason = accept(text, emotion)
                if reason is None:
                    kept.append({"emotion": emotion, "topic": topic, "person": person, "text": text})
                    break
                key = "wrong length" if reason.endswith("words") else reason
                rejected[key] = rejected.get(key, 0) + 1
    return kept, rejected


def write_stories(records: Sequence[dict[str, str]], path: str | Path) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
