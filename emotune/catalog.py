"""The 171 emotion concepts of Anthropic's emotion paper (arXiv 2604.07729), with our ratings.

The word list is the paper's. The valence and arousal ratings (1 = very unpleasant / very
calm, 7 = very pleasant / very activated) and the cluster labels were assigned by hand by the
emotune authors, placing each word on Russell's circumplex; they are one rater's judgement,
not published norms. They are used only to check the geometry of an extracted basis
(PC1 against valence, PC2 against arousal) and to order plots.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

from emotune.errors import ConfigError


@dataclass(frozen=True)
class Emotion:
    name: str
    valence: float
    arousal: float
    cluster: str


def _load() -> dict[str, Emotion]:
    text = (resources.files("emotune") / "data" / "emotions.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["emotion"]: Emotion(r["emotion"], r["valence"], r["arousal"], r["cluster"]) for r in rows}


CATALOG: dict[str, Emotion] = _load()
EMOTIONS: tuple[str, ...] = tuple(CATALOG)
CLUSTERS: tuple[str, ...] = tuple(dict.fromkeys(e.cluster for e in CATALOG.values()))


def check_emotions(names: Iterable[str], where: str = "", known: Iterable[str] = EMOTIONS) -> list[str]:
    """Return ``names`` normalised to lower case; raise a ConfigError naming any unknown one."""
    known = tuple(known)
    out = []
    for name in names:
        key = str(name).strip().lower().replace("_", " ")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            prefix = f"{where}: " if where else ""
            listed = (
                "`emotune emotions` lists them"
                if known == EMOTIONS
                else ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            )
            raise ConfigError(
                f"{prefix}unknown emotion {name!r}.{hint} Use one of the {len(known)} known emotions ({listed})."
            )
        out.append(key)
    return out
