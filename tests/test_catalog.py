import pytest

from emotune.catalog import CATALOG, CLUSTERS, EMOTIONS, check_emotions
from emotune.errors import ConfigError


def test_catalog_has_the_papers_171_distinct_emotions():
    assert len(EMOTIONS) == 171
    assert len(set(EMOTIONS)) == 171
    for word in ("desperate", "calm", "afraid", "at ease", "worn out", "grief-stricken", "self-confident"):
        assert word in EMOTIONS


def test_ratings_are_on_the_1_to_7_scale_and_every_cluster_is_used():
    for emotion in CATALOG.values():
        assert 1.0 <= emotion.valence <= 7.0 and 1.0 <= emotion.arousal <= 7.0
        assert emotion.cluster in CLUSTERS
    assert CATALOG["calm"].valence > 5 > CATALOG["desperate"].valence
    assert CATALOG["panicked"].arousal > 5 > CATALOG["sleepy"].arousal


def test_unknown_emotion_error_suggests_the_nearest_names():
    assert check_emotions(["Calm", "worn_out"]) == ["calm", "worn out"]
    with pytest.raises(ConfigError, match=r"unknown emotion 'desparate'.*Did you mean 'desperate'"):
        check_emotions(["desparate"], where="recipe.yaml:emotion_terms[0]")
