"""EmotionBasis: parity with a hand computation, batching invariance, persistence, refusals."""

import random
from pathlib import Path

import pytest
import torch

from emotune.basis import EmotionBasis, mean_activations, neutral_components
from emotune.corpus import Dialogue, Story
from emotune.errors import ConfigError, DataError

EMOTIONS = ["calm", "desperate", "afraid", "happy"]


def make_corpus(n_per: int = 6, seed: int = 0):
    rng = random.Random(seed)
    words = ["the", "a", "cat", "sky", "run", "door", "late", "rain", "hand", "light"]
    stories = [
        Story(e, f"{e[::-1]} {i} " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + f" {e[:3]}" * 3)
        for e in EMOTIONS
        for i in range(n_per)
    ]
    neutral = [
        Dialogue(
            str(i),
            (
                {"role": "user", "content": f"what is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}." + " ok" * rng.randint(1, 9)},
            ),
        )
        for i in range(12)
    ]
    return stories, neutral


@pytest.fixture
def corpus():
    return make_corpus()


def test_extraction_equals_a_hand_computation_through_output_hidden_states(tiny_model, char_tokenizer, corpus):
    stories, neutral = corpus
    offset, layers = 3, [0, 1, 2]
    basis = EmotionBasis.extract(
        tiny_model,
        char_tokenizer,
        stories=stories,
        neutral=neutral,
        layers=layers,
        offset=offset,
        progress=False,
        validate=False,
    )

    def hand_means(texts):
        rows = []
        for text in texts:
            ids = torch.tensor([char_tokenizer.encode(text)])
            with torch.no_grad():
                hs = tiny_model(ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([hs[layer + 1][0, offset:].mean(0) for layer in layers]))
        return torch.stack(rows)  # [n, L, d]

    from emotune.basis import render_dialogue

    neutral_means = hand_means([render_dialogue(char_tokenizer, d.messages) for d in neutral])
    story_means = hand_means([s.text for s in stories])
    for k, layer in enumerate(layers):
        class_means = torch.stack(
            [story_means[[i for i, s in enumerate(stories) if s.emotion == e], k].mean(0) for e in basis.emotions]
        )
        raw = class_means - class_means.mean(0)
        centred = neutral_means[:, k] - neutral_means[:, k].mean(0)
        _, s, vh = torch.linalg.svd(centred.double(), full_matrices=False)
        n_pcs = int(((s**2).cumsum(0) / (s**2).sum() < 0.5).sum()) + 1
        p = vh[:n_pcs].float()
        denoised = raw - raw @ p.T @ p
        torch.testing.assert_close(
            basis.vectors(layer, denoised=False), raw / raw.norm(dim=-1, keepdim=True), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            basis.vectors(layer), denoised / denoised.norm(dim=-1, keepdim=True), atol=1e-4, rtol=1e-4
        )
        assert basis.metadata["neutral_pcs"][str(layer)] == n_pcs
    assert basis.emotions == ["afraid", "calm", "desperate", "happy"]  # catalogue order


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_extraction_equals_unbatched(tiny_model, char_tokenizer, corpus, side):
    texts = [s.text for s in corpus[0]]
    one = mean_activations(tiny_model, char_tokenizer, texts, [0, 2, 3], offset=2, batch_size=1)
    many = mean_activations(tiny_model, char_tokenizer, texts, [0, 2, 3], offset=2, batch_size=7, padding_side=side)
    torch.testing.assert_close(many.means, one.means, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(many.mean_norm, one.mean_norm, atol=1e-3, rtol=1e-4)
    assert many.padding_fraction < 0.25  # bucketed by length


def test_neutral_components_explain_the_requested_variance():
    torch.manual_seed(0)
    x = torch.randn(400, 8) * torch.tensor([10.0, 4, 1, 1, 1, 1, 1, 1])
    pcs = neutral_components(x, 0.5)
    assert pcs.shape[0] == 1 and abs(float(pcs[0, 0].abs()) - 1) < 0.05
    assert neutral_components(x, 0.0).shape[0] == 0


def test_save_load_round_trip(tmp_path, tiny_model, char_tokenizer, corpus):
    basis = EmotionBasis.extract(
        tiny_model, char_tokenizer, stories=corpus[0], neutral=corpus[1], offset=2, progress=False
    )
    basis.save(tmp_path / "b")
    loaded = EmotionBasis.load(tmp_path / "b")
    assert loaded.emotions == basis.emotions and loaded.layers == basis.layers
    assert loaded.default_layer == basis.default_layer
    torch.testing.assert_close(loaded.denoised, basis.denoised)
    torch.testing.assert_close(loaded.raw, basis.raw)
    torch.testing.assert_close(loaded.resid_norm, basis.resid_norm)
    assert loaded.metadata["fingerprint"] == basis.metadata["fingerprint"]
    assert loaded.metadata["validation"] == basis.metadata["validation"]
    loaded.check_model(tiny_model)
    h = torch.randn(2, 5, 32)
    expected = h @ basis.vectors().T / basis.scale()
    torch.testing.assert_close(loaded.project(h), expected)
    torch.testing.assert_close(basis["calm"], basis.vectors()[1])


def test_a_basis_for_another_model_is_refused(tiny_model, char_tokenizer, corpus):
    from conftest import tiny_llama

    basis = EmotionBasis.extract(
        tiny_model, char_tokenizer, stories=corpus[0], neutral=corpus[1], offset=2, progress=False, validate=False
    )
    with pytest.raises(ConfigError, match=r"hidden size 32\); the model has hidden size 48"):
        basis.check_model(tiny_llama(hidden=48))
    with pytest.raises(ConfigError, match="weights differ"):
        basis.check_model(tiny_llama(seed=1))
    with pytest.raises(ConfigError, match="only 2 layers"):
        basis.check_model(tiny_llama(layers=2))


def test_corrupt_basis_files_are_refused(tmp_path, tiny_model, char_tokenizer, corpus):
    from safetensors.torch import load_file, save_file

    basis = EmotionBasis.extract(
        tiny_model, char_tokenizer, stories=corpus[0], neutral=corpus[1], offset=2, progress=False, validate=False
    )
    folder = basis.save(tmp_path / "b")
    tensors = load_file(str(folder / "basis.safetensors"))
    tensors["denoised"][0, 0, 0] = float("nan")
    save_file(tensors, str(folder / "basis.safetensors"))
    with pytest.raises(DataError, match="NaN"):
        EmotionBasis.load(folder)
    (folder / "basis.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match="corrupt or truncated"):
        EmotionBasis.load(folder)
    with pytest.raises(DataError, match="not a basis folder"):
        EmotionBasis.load(tmp_path)


def test_bad_extraction_inputs_fail_clearly(tiny_model, char_tokenizer, corpus):
    stories, neutral = corpus
    with pytest.raises(ConfigError, match="unknown emotion 'clam'"):
        EmotionBasis.extract(tiny_model, char_tokenizer, stories=stories, neutral=neutral, emotions=["clam"])
    with pytest.raises(ConfigError, match="out of range"):
        EmotionBasis.extract(tiny_model, char_tokenizer, stories=stories, neutral=neutral, layers=[7])
    short = [Story("calm", "hi", source="mine.jsonl:3"), *stories]
    with pytest.raises(DataError, match=r"mine\.jsonl:3: only 3 tokens, not more than the offset \(8\)"):
        EmotionBasis.extract(tiny_model, char_tokenizer, stories=short, neutral=neutral, progress=False)
    with pytest.raises(DataError, match="at least 2 emotions"):
        EmotionBasis.extract(tiny_model, char_tokenizer, stories=stories[:6], neutral=neutral, progress=False)


def test_save_refuses_to_overwrite_a_folder_emotune_did_not_write(tmp_path, tiny_model, char_tokenizer, corpus):
    basis = EmotionBasis.extract(
        tiny_model, char_tokenizer, stories=corpus[0], neutral=corpus[1], offset=2, progress=False, validate=False
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="did not write"):
        basis.save(tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"


def test_extraction_is_deterministic(tiny_model, char_tokenizer, corpus):
    a = EmotionBasis.extract(
        tiny_model, char_tokenizer, stories=corpus[0], neutral=corpus[1], offset=2, progress=False
    )
    b = EmotionBasis.extract(
        tiny_model, char_tokenizer, stories=corpus[0], neutral=corpus[1], offset=2, progress=False
    )
    assert torch.equal(a.denoised, b.denoised) and a.metadata["validation"] == b.metadata["validation"]


def test_whitened_vectors_equal_the_discriminant_formula():
    from emotune.basis import SHRINKAGE, emotion_vectors

    torch.manual_seed(0)
    n_per, d = 40, 6
    labels = torch.arange(3).repeat_interleave(n_per)
    feats = torch.randn(3 * n_per, 1, d) * torch.tensor([1.0, 5.0, 1, 1, 1, 1])  # a noisy nuisance axis
    feats[:, 0, 0] += labels.float()  # the emotions differ along axis 0
    _, got = emotion_vectors(feats, labels, 3, [torch.zeros(0, d)], method="whitened")
    x = feats[:, 0].double()
    means = torch.stack([x[labels == k].mean(0) for k in range(3)])
    resid = x - means[labels]
    cov = resid.T @ resid / (len(x) - 3)
    cov += SHRINKAGE * cov.trace() / d * torch.eye(d, dtype=torch.double)
    expected = (means - means.mean(0)) @ torch.linalg.inv(cov)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got[0].double(), expected, atol=1e-5, rtol=1e-5)
    _, plain = emotion_vectors(feats, labels, 3, [torch.zeros(0, d)])
    # whitening discounts the noisy axis 1 relative to the plain mean difference
    assert got[0, :, 1].abs().mean() < plain[0, :, 1].abs().mean()


def test_streaming_in_small_chunks_gives_the_same_features(tiny_model, char_tokenizer, corpus):
    from emotune.basis import RunStats, stream_activations

    texts = [s.text for s in corpus[0]]
    items = [(t, 2, f"story {i}") for i, t in enumerate(texts)]

    def run(chunk):
        stats = RunStats(3)
        out = torch.zeros(len(texts), 3, 32)
        for rows, means in stream_activations(tiny_model, char_tokenizer, iter(items), [0, 2, 3], stats, chunk=chunk):
            out[rows] = means
        return out, stats

    whole, whole_stats = run(4096)
    pieces, piece_stats = run(5)
    torch.testing.assert_close(pieces, whole, atol=2e-5, rtol=1e-4)
    assert piece_stats.n_texts == whole_stats.n_texts == len(texts)
    assert piece_stats.token_count == whole_stats.token_count


def test_a_corpus_larger_than_the_sample_still_uses_every_story_for_the_vectors(tiny_model, char_tokenizer, corpus):
    stories, neutral = corpus
    kwargs = dict(stories=stories, neutral=neutral, layers=[1, 2], offset=2, progress=False)
    full = EmotionBasis.extract(tiny_model, char_tokenizer, **kwargs)
    capped = EmotionBasis.extract(tiny_model, char_tokenizer, sample=10, **kwargs)
    # the vectors come from per-emotion sums over all 24 stories, whatever the sample
    assert torch.equal(capped.raw, full.raw)
    assert capped.metadata["corpus"]["sampled"] == {"stories": 10, "neutral": 10}
    assert full.metadata["corpus"]["sampled"] == {"stories": len(stories), "neutral": len(neutral)}
    assert capped.metadata["validation"]["stories"] == 10
    assert capped.metadata["validation"]["stories_total"] == len(stories)
    # the neutral PCs come from the sample, so the denoised vectors may differ a little
    assert not torch.equal(capped.denoised, full.denoised)


def test_extraction_from_a_file_streams_it_and_equals_the_in_memory_corpus(
    tmp_path, tiny_model, char_tokenizer, corpus
):
    import json

    from emotune.corpus import corpus_hash

    stories, neutral = corpus
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"emotion": s.emotion, "text": s.text}) + "\n" for s in stories))
    kwargs = dict(neutral=neutral, layers=[1], offset=2, progress=False)
    from_file = EmotionBasis.extract(tiny_model, char_tokenizer, stories=path, **kwargs)
    in_memory = EmotionBasis.extract(tiny_model, char_tokenizer, stories=stories, **kwargs)
    assert torch.equal(from_file.denoised, in_memory.denoised)
    assert from_file.metadata["corpus"]["stories_hash"] == corpus_hash(s.emotion + "\t" + s.text for s in stories)


def test_a_story_longer_than_the_context_is_refused_where_it_is(tiny_model, char_tokenizer, corpus):
    stories, neutral = corpus
    tiny_model.config.max_position_embeddings = 256
    long = Story("calm", "slow tide " * 40, source="long.jsonl:7")  # 401 tokens
    with pytest.raises(DataError, match=r"long\.jsonl:7: 401 tokens, longer than the model's context \(256\)"):
        EmotionBasis.extract(tiny_model, char_tokenizer, stories=[*stories, long], neutral=neutral, progress=False)
    basis = EmotionBasis.extract(
        tiny_model, char_tokenizer, stories=[*stories, long], neutral=neutral, progress=False, max_length=256
    )
    assert basis.metadata["settings"]["max_length"] == 256


def test_the_shipped_basis_matches_the_shipped_corpus_and_the_extraction_defaults():
    """The shipped basis stands in for `EmotionBasis.extract(model, tok, layers=...)` on the embedded model; if
    the story corpus or an extraction default changes, it must be extracted and shipped again."""
    import hashlib
    import inspect
    from importlib import resources

    from emotune.basis import SHIPPED_BASES
    from emotune.corpus import iter_stories

    folders = sorted(Path(str(resources.files("emotune") / "data" / SHIPPED_BASES)).iterdir())
    assert folders, "no shipped basis"
    defaults = inspect.signature(EmotionBasis.extract).parameters
    story_hash = hashlib.sha256()
    for story in iter_stories():
        story_hash.update((story.emotion + "\t" + story.text).encode("utf-8") + b"\x00")
    for folder in folders:
        basis = EmotionBasis.load(folder)
        assert basis.metadata["corpus"]["stories_hash"] == story_hash.hexdigest()[:16], folder
        for key, value in basis.metadata["settings"].items():
            assert defaults[key].default == value, (folder, key)
        assert basis.metadata["method"] == defaults["method"].default
        assert (folder / "report.md").exists() and (folder / "report.json").exists()  # its validation ships too


def test_cached_basis_extracts_once_per_model_and_layers_and_prefers_a_shipped_copy(monkeypatch, tmp_path):
    from conftest import CharTokenizer, extract_tiny_basis, tiny_llama

    import emotune.basis as basis_module

    model, tok = tiny_llama(), CharTokenizer()
    calls: list[list[int] | None] = []
    real = EmotionBasis.extract

    def fake_extract(m, t, *, layers=None, **kwargs):  # the shipped corpus is minutes of work: count calls instead
        if "stories" in kwargs:
            return real(m, t, layers=layers, **kwargs)
        calls.append(layers)
        return extract_tiny_basis(m, t, layers=layers)

    monkeypatch.setenv("EMOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(EmotionBasis, "extract", staticmethod(fake_extract))
    first = basis_module.cached_basis(model, tok, [1, 2])
    again = basis_module.cached_basis(model, tok, [1, 2])
    assert calls == [[1, 2]]  # the second run loaded the cache
    torch.testing.assert_close(first.vectors(2), again.vectors(2))
    basis_module.cached_basis(model, tok, [3])
    assert calls == [[1, 2], [3]]  # other layers, another extraction

    shipped = tmp_path / "data"
    first.save(shipped / "bases" / "tiny")  # a shipped copy for this model's fingerprint, layers 1 and 2
    monkeypatch.setattr(basis_module.resources, "files", lambda package: tmp_path)
    assert basis_module.cached_basis(model, tok, [2]).layers == [1, 2]  # a subset of its layers: no extraction
    assert calls == [[1, 2], [3]]
    assert basis_module.shipped_basis(model, [0]) is None  # a layer it lacks
    assert basis_module.shipped_basis(tiny_llama(seed=1), [2]) is None  # other weights
