"""EmotionBasis beyond one machine: the hub round trip (a local folder as the hub, no network), the stored story
centre, and ``basis.measure`` (parity with a hand computation, batched equals unbatched)."""

import pytest
import torch
from conftest import CharTokenizer, tiny_llama
from test_basis import make_corpus

from emotune.basis import EmotionBasis
from emotune.errors import ConfigError, DataError, EmotuneError


@pytest.fixture(scope="module")
def world():
    model, tok = tiny_llama(), CharTokenizer()
    stories, neutral = make_corpus()
    basis = EmotionBasis.extract(model, tok, stories=stories, neutral=neutral, offset=3, progress=False)
    return model, tok, basis, stories


# -- the centre ----------------------------------------------------------------------------------------------


def test_the_stored_centre_is_the_mean_story_feature_that_validation_subtracts(world):
    from emotune.basis import mean_activations

    model, tok, basis, stories = world
    feats = mean_activations(model, tok, [s.text for s in stories], basis.layers, offset=3).means
    # cross_validate centres on sums / counts over stories: the plain mean of every story's feature
    assert basis.centre is not None and basis.centre.shape == (len(basis.layers), basis.hidden_size)
    torch.testing.assert_close(basis.centre, feats.mean(0), rtol=1e-5, atol=1e-5)


def test_the_centre_survives_save_and_load_and_a_basis_without_one_still_loads(world, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, basis, _ = world
    basis.save(tmp_path / "b")
    loaded = EmotionBasis.load(tmp_path / "b")
    assert torch.equal(loaded.centre, basis.centre)

    # a basis written before the centre was stored: loads, and measure() says what to do
    tensors = load_file(str(tmp_path / "b" / "basis.safetensors"))
    del tensors["centre"]
    save_file(tensors, str(tmp_path / "b" / "basis.safetensors"))
    old = EmotionBasis.load(tmp_path / "b")
    assert old.centre is None and torch.equal(old.denoised, basis.denoised)
    with pytest.raises(DataError, match="no stored story centre.*Re-extract"):
        old.measure(world[0], world[1], ["some text here"])


# -- measure ---------------------------------------------------------------------------------------------------


def test_measure_equals_a_hand_computation_through_output_hidden_states(world):
    model, tok, basis, _ = world
    texts = ["the rain came late and the door stayed shut", "a cat ran into the light"]
    layer = 2  # not the last block: the last entry of hidden_states has the final norm applied
    readout = basis.measure(model, tok, texts, layer=layer, per_token=True)
    assert readout.emotions == basis.emotions and readout.layer == layer
    vecs, centre, r = basis.vectors(layer), basis.centre[basis.layers.index(layer)], basis.scale(layer)
    offset = basis.metadata["settings"]["offset"]
    for i, text in enumerate(texts):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
        by_hand = (hidden - centre) @ vecs.T / r
        torch.testing.assert_close(readout.per_token[i], by_hand, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(readout.per_text[i], by_hand[offset:].mean(0), rtol=1e-4, atol=1e-5)
        assert readout.token_ids[i] == ids[0].tolist()


def test_batched_measure_equals_unbatched(world):
    model, tok, basis, _ = world
    texts = ["short", "a much longer text about the rain and the door and the light", "mid length text"]
    batched = basis.measure(model, tok, texts, per_token=True, batch_size=3)
    for i, text in enumerate(texts):
        alone = basis.measure(model, tok, [text], per_token=True, batch_size=1)
        torch.testing.assert_close(batched.per_text[i], alone.per_text[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.per_token[i], alone.per_token[0], rtol=1e-4, atol=1e-5)


def test_measure_reads_conversations_through_the_chat_rendering(world):
    from emotune.basis import render_dialogue

    model, tok, basis, _ = world
    conversation = [{"role": "user", "content": "the tests failed"}, {"role": "assistant", "content": "I see."}]
    as_text = basis.measure(model, tok, [render_dialogue(tok, conversation)])
    as_chat = basis.measure(model, tok, [conversation])
    assert torch.equal(as_text.per_text, as_chat.per_text) and as_chat.per_token is None
    assert [name for name, _ in as_chat.top(0, k=2)] == [
        basis.emotions[int(i)] for i in as_chat.per_text[0].topk(2).indices
    ]


def test_measure_refuses_a_text_shorter_than_the_offset_and_a_layer_not_in_the_basis(world):
    model, tok, basis, _ = world
    with pytest.raises(DataError, match="text 1 has 2 tokens.*offset"):
        basis.measure(model, tok, ["long enough text", "a"])
    with pytest.raises(ConfigError, match="layer 9 is not in this basis"):
        basis.measure(model, tok, ["long enough text"], layer=9)


# -- the hub round trip ----------------------------------------------------------------------------------------


def test_push_to_hub_then_from_pretrained_round_trips_the_basis(world, local_hub):
    _, _, basis, _ = world
    url = basis.push_to_hub("me/calm-basis", subfolder="basis", token="hf_test", private=True)
    assert url.startswith("https://hub.local/me/calm-basis")
    assert local_hub.repos == {"me/calm-basis": {"private": True}}
    assert local_hub.commits == [
        {
            "repo_id": "me/calm-basis",
            "message": "Upload emotune emotion basis",
            "paths": ["basis/basis.json", "basis/basis.safetensors"],
        }
    ]
    loaded = EmotionBasis.from_pretrained("me/calm-basis", subfolder="basis")
    assert loaded.emotions == basis.emotions and loaded.layers == basis.layers
    assert torch.equal(loaded.denoised, basis.denoised) and torch.equal(loaded.centre, basis.centre)
    # only the two data files are fetched: nothing executable or pickled
    assert sorted(local_hub.downloads) == ["me/calm-basis/basis/basis.json", "me/calm-basis/basis/basis.safetensors"]


def test_from_pretrained_takes_a_local_folder_and_its_subfolder(world, tmp_path):
    _, _, basis, _ = world
    basis.save(tmp_path / "adapter" / "basis")
    for args in ((tmp_path / "adapter", "basis"), (tmp_path / "adapter" / "basis", None)):
        assert EmotionBasis.from_pretrained(*args).emotions == basis.emotions


def test_a_hub_repo_without_a_basis_is_refused_in_one_line(world, local_hub):
    (local_hub.root / "me" / "empty").mkdir(parents=True)
    with pytest.raises(DataError, match=r"me/empty \(subfolder basis\): no basis.json and basis.safetensors"):
        EmotionBasis.from_pretrained("me/empty", subfolder="basis")


def test_an_uncached_hub_basis_offline_fails_in_one_line_with_a_remedy(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(EmotuneError) as info:
        EmotionBasis.from_pretrained("someone/never-downloaded", subfolder="basis")
    message = str(info.value)
    assert "\n" not in message and "no local folder of that name" in message
    assert "hub cannot be reached" in message and "pass a local basis folder" in message


def test_a_hub_basis_in_the_cache_loads_offline(world, tmp_path, monkeypatch):
    """The hub's own cache layout (models--org--name/snapshots/<commit>/...), prepared by hand, read offline."""
    from huggingface_hub import constants

    _, _, basis, _ = world
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--me--calm"
    basis.save(repo / "snapshots" / commit / "basis")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    loaded = EmotionBasis.from_pretrained("me/calm", subfolder="basis")
    assert torch.equal(loaded.raw, basis.raw)


def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither a local folder nor a hub repo id"):
        EmotionBasis.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_push_without_a_token_is_refused_before_any_upload(world, local_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        world[2].push_to_hub("me/x")
    assert local_hub.commits == []
