"""Tagged conversations: schema errors, token masks under truncation and padding."""

import json

import pytest
import torch
from conftest import tiny_fast_tokenizer

from emotune.conversations import (
    Conversation,
    check_tags_present,
    load_conversations,
    tag_index,
    tokenize_conversation,
)
from emotune.errors import DataError
from emotune.trainer import EmotionCollator, tag_mask

CONV = Conversation(
    "c1",
    (
        {"role": "user", "content": "Run the tests please."},
        {"role": "assistant", "content": "Running them now."},
        {"role": "tool", "content": "FAILED test_total: assert 3 == 4", "tags": ["failure"]},
        {"role": "assistant", "content": "The test still fails; I will report it.", "tags": ["failure"]},
    ),
)


@pytest.fixture(scope="module")
def tok():
    return tiny_fast_tokenizer()


def _text_where(tok, ids, bits, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_tagged_tokens_cover_exactly_the_tagged_messages(tok):
    bits = tag_index({"failure"})
    row = tokenize_conversation(CONV, tok, bits)
    ids, tag_bits = torch.tensor([row["input_ids"]]), torch.tensor([row["tag_bits"]])
    failure = tag_mask(tag_bits, ["failure"], bits)[0]
    text = _text_where(tok, row["input_ids"], bits, failure.tolist())
    assert "FAILED test_total" in text and "I will report it." in text
    assert "Run the tests" not in text and "Running them now" not in text
    assistant = tag_mask(tag_bits, ["assistant"], bits)[0]
    assert "Running them now" in _text_where(tok, row["input_ids"], bits, assistant.tolist())
    assert tag_mask(tag_bits, ["all"], bits).all()
    assert ids.shape == tag_bits.shape


def test_labels_cover_assistant_turns_only(tok):
    row = tokenize_conversation(CONV, tok, tag_index({"failure"}))
    trained = tok.decode([t for t in row["labels"] if t != -100])
    assert "Running them now." in trained and "I will report it." in trained
    assert "FAILED" not in trained and "Run the tests" not in trained


def test_truncation_keeps_masks_aligned_with_tokens(tok):
    bits = tag_index({"failure"})
    full = tokenize_conversation(CONV, tok, bits)
    cut = tokenize_conversation(CONV, tok, bits, max_length=25)
    assert len(cut["input_ids"]) == len(cut["tag_bits"]) == len(cut["labels"]) == 25
    for key in ("input_ids", "labels", "tag_bits"):
        assert cut[key] == full[key][:25]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_padding_keeps_tags_on_their_tokens(tok, side):
    bits = tag_index({"failure"})
    long = tokenize_conversation(CONV, tok, bits)
    short = tokenize_conversation(Conversation("c2", CONV.messages[:2]), tok, bits)
    batch = EmotionCollator(tok.pad_token_id, side)([long, short])
    mask = batch["attention_mask"].bool()
    for row, feature in enumerate([long, short]):
        assert batch["input_ids"][row][mask[row]].tolist() == feature["input_ids"]
        assert batch["tag_bits"][row][mask[row]].tolist() == feature["tag_bits"]
        assert batch["labels"][row][mask[row]].tolist() == feature["labels"]
    assert (batch["tag_bits"][~mask] == 0).all() and (batch["labels"][~mask] == -100).all()
    assert batch["position_ids"][1][mask[1]].tolist() == list(range(len(short["input_ids"])))


def test_schema_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: messages\[0\]\.role is 'robot'"):
        load_conversations(path)
    path.write_text(json.dumps({"msgs": []}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'messages'"):
        load_conversations(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        load_conversations(path)


def test_a_term_tag_absent_from_the_data_is_reported():
    with pytest.raises(
        DataError, match=r"tag\(s\) 'pressure' appear in no message.*tags present: all, assistant, failure"
    ):
        check_tags_present([CONV], ["pressure"], where="emotion_terms[0]")


def test_shipped_training_data_loads_and_is_tagged():
    conversations = load_conversations()
    tags = set().union(*(c.tags for c in conversations))
    assert {"failure", "neutral"} <= tags
    assert len(conversations) >= 600
