"""`emotune stories`: the prompt carries the corpus rules and generated stories pass the same filter."""

import json

from conftest import tiny_fast_tokenizer, tiny_llama

from emotune.corpus import load_stories
from emotune.stories import accept, build_prompt, generate_stories, write_stories


def test_prompt_states_the_rules_of_the_shipped_corpus():
    prompt = build_prompt("desperate", "ai-failing-tests", "first")
    assert 'Never write the word "desperate"' in prompt
    assert "an AI coding assistant whose tests keep failing" in prompt and "first person" in prompt


def test_filter_rejects_leaks_and_bad_lengths():
    good = " ".join(["The build failed again and she reread the log line by line."] * 6)
    assert accept(good, "calm") is None
    assert accept(good + " She stayed calm.", "calm") == "names its emotion"
    assert accept("Too short.", "calm").endswith("words")


def test_generated_stories_are_written_in_the_shipped_schema(tmp_path, monkeypatch):
    tok = tiny_fast_tokenizer()
    model = tiny_llama(layers=2, hidden=32, vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id
    story = " ".join(["The tests went red again, and the agent read each trace twice before it typed."] * 5)
    monkeypatch.setattr("emotune.stories.clean_story", lambda text: story)  # a tiny random model writes noise
    kept, rejected = generate_stories(
        model, tok, emotions=["calm", "afraid"], per_emotion=2, max_new_tokens=4, progress=False
    )
    assert len(kept) == 4 and not rejected
    path = tmp_path / "mine.jsonl"
    write_stories(kept, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["emotion"] for r in rows} == {"calm", "afraid"} and all(r["person"] in ("first", "third") for r in rows)
    assert len(load_stories(path)) == 4  # the same loader reads shipped and generated stories
