"""Invariants of the shipped corpora, the leakage filter, and loader errors."""

import json
from collections import Counter, defaultdict

import pytest

from emotune.catalog import EMOTIONS
from emotune.corpus import (
    STORY_MAX_WORDS,
    STORY_MIN_WORDS,
    TOPICS,
    check_dialogue_file,
    find_leaks,
    load_dialogues,
    load_stories,
    shipped_path,
    word_count,
)
from emotune.errors import DataError


@pytest.fixture(scope="module")
def stories():
    return load_stories()


def test_every_emotion_has_at_least_12_stories(stories):
    counts = Counter(s.emotion for s in stories)
    assert set(counts) == set(EMOTIONS)
    assert min(counts.values()) >= 12
    assert len(stories) >= 12 * 171


def test_no_story_names_its_own_emotion(stories):
    leaking = [(s.source, find_leaks(s.text, s.emotion)) for s in stories if find_leaks(s.text, s.emotion)]
    assert leaking == []


def test_story_lengths_topics_and_narration(stories):
    lengths = [word_count(s.text) for s in stories]
    assert STORY_MIN_WORDS <= min(lengths) and max(lengths) <= STORY_MAX_WORDS
    assert len({s.topic for s in stories}) >= 24 and all(s.topic in TOPICS for s in stories)
    by_emotion = defaultdict(list)
    for s in stories:
        by_emotion[s.emotion].append(s)
    for emotion, group in by_emotion.items():
        assert len({s.topic for s in group}) >= 10, emotion  # varied settings within an emotion
        persons = Counter(s.person for s in group)
        assert persons["first"] >= 2 and persons["third"] >= 2, emotion
        assert sum(s.topic.startswith("ai-") for s in group) >= 2, emotion


def test_no_duplicate_stories(stories):
    normalised = [" ".join(s.text.lower().split()) for s in stories]
    assert len(set(normalised)) == len(normalised)
    openings = Counter(" ".join(t.split()[:8]) for t in normalised)
    assert openings.most_common(1)[0][1] <= 2


def test_neutral_corpus_has_200_emotionless_dialogues():
    dialogues = load_dialogues()
    assert len(dialogues) >= 200
    assert check_dialogue_file(shipped_path("neutral") / "dialogues.jsonl") == []


@pytest.mark.parametrize(
    ("emotion", "text", "leaks"),
    [
        ("calm", "She stayed calm.", ["calm"]),
        ("calm", "He spoke calmly and with great calmness.", ["calmly", "calmness"]),
        ("angry", "Her anger rose; she answered angrily.", ["anger", "angrily"]),
        ("at ease", "He felt at-ease at last.", ["at-ease"]),
        ("worn out", "The rug was worn   out.", ["worn   out"]),
        ("panicked", "No need to panic.", ["panic"]),
        ("hopeful", "She hoped for rain.", ["hoped"]),
        ("calm", "The sea was flat and the wind had dropped.", []),
        ("kind", "Kinship matters.", []),
        ("sad", "The saddle creaked.", []),
    ],
)
def test_leak_filter_catches_inflections_not_lookalikes(emotion, text, leaks):
    assert find_leaks(text, emotion) == sorted(leaks)


def _write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_loader_names_file_and_line_of_malformed_json(tmp_path):
    good = json.dumps({"emotion": "calm", "text": "The lake lay flat under a grey sky all morning."})
    path = _write(tmp_path, "s.jsonl", (good + "\n{not json\n").encode())
    with pytest.raises(DataError, match=r"s\.jsonl:2: malformed JSON"):
        load_stories(path)


def test_loader_names_missing_field_and_unknown_emotion(tmp_path):
    path = _write(tmp_path, "s.jsonl", b'{"emotion": "calm"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:1: missing field 'text'"):
        load_stories(path)
    path = _write(tmp_path, "t.jsonl", b'{"emotion": "clam", "text": "x"}\n')
    with pytest.raises(Exception, match=r"t\.jsonl:1: unknown emotion 'clam'"):
        load_stories(path)


def test_loader_rejects_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="no stories found"):
        load_stories(_write(tmp_path, "empty.jsonl", b""))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_stories(
            _write(tmp_path, "bad.jsonl", b'{"emotion": "calm", "text": "The tea cooled by the window."}\n\xff\xfe\n')
        )
    with pytest.raises(DataError, match="file not found"):
        load_stories(tmp_path / "missing.jsonl")


def test_loader_refuses_a_story_that_names_its_emotion(tmp_path):
    path = _write(tmp_path, "s.jsonl", json.dumps({"emotion": "calm", "text": "He was calm."}).encode() + b"\n")
    with pytest.raises(DataError, match=r"s\.jsonl:1: story for 'calm' names its own emotion \(calm\)"):
        load_stories(path)
