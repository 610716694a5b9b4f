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
    "steered": "emotune.steer",
    "Readout": "emotune.basis",
}

if TYPE_CHECKING:
    from emotune.basis import EmotionBasis, Readout
    from emotune.catalog import EMOTIONS
    from emotune.errors import EmotuneError
    from emotune.models import load_model
    from emotune.steer import steered

# `steer` is the submodule emotune.steer, which is callable: `with steer(model, basis, "calm", 0.1):` steers, like
# `steered`. A plain attribute of that name would be replaced by the submodule whenever something imports it.


def __getattr__(name: str) -> Any:
    if name == "steer":
        import importlib

        return importlib.import_module("emotune.steer")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emotune' has no attribute {name!r}")


__all__ = ["EMOTIONS", "EmotionBasis", "EmotuneError", "Readout", "load_model", "steer", "steered", "__version__"]
