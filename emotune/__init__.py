"""emotune: measure and fine-tune the emotional dispositions of language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Heavy imports (torch, transformers) are deferred so that `emotune --help`, the corpus checks
# and the catalogue load instantly.
_LAZY = {
    "load_model": "emotune.models",
    "EmotionBasis": "emotune.basis",
    "EMOTIONS": "emotune.catalog",
    "EmotuneError": "emotune.errors",
}

if TYPE_CHECKING:
    from emotune.basis import EmotionBasis
    from emotune.catalog import EMOTIONS
    from emotune.errors import EmotuneError
    from emotune.models import load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emotune' has no attribute {name!r}")


__all__ = ["EMOTIONS", "EmotionBasis", "EmotuneError", "load_model", "__version__"]
