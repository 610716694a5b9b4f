"""Inference-time steering: add alpha * r_l * v_e to the residual stream at chosen layers.

Strength alpha is a fraction of the layer's mean residual norm r_l (the paper used 0.05-0.1),
so the same alpha means the same relative push on any model. Used for the causal checks (does
pushing "desperate" up raise the unethical rate?) and as the inference-time baseline that
fine-tuning should match without hooks.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from emotune.basis import EmotionBasis
from emotune.hooks import steer


def steering_vectors(
    basis: EmotionBasis, emotion: str, alpha: float, layers: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    layers = list(layers) if layers else [basis.default_layer]
    return {layer: alpha * basis.scale(layer) * basis.vector(emotion, layer) for layer in layers}


@contextmanager
def steered(
    model: Any, basis: EmotionBasis, emotion: str, alpha: float, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Run ``model`` pushed along ``emotion`` by ``alpha`` (a no-op when alpha is 0)."""
    if alpha == 0:
        yield
        return
    with steer(model, steering_vectors(basis, emotion, alpha, layers)):
        yield


class _CallableModule(types.ModuleType):
    """``from emotune import steer`` finds this module (a package attribute named like a submodule is replaced
    by the submodule as soon as anything imports it), so the module itself is the context manager: calling it
    calls :func:`steered`, and ``with steer(model, basis, "calm", 0.1): ...`` works however it was imported."""

    def __call__(
        self, model: Any, basis: EmotionBasis, emotion: str, alpha: float, layers: Sequence[int] | None = None
    ) -> AbstractContextManager[None]:
        return steered(model, basis, emotion, alpha, layers)


sys.modules[__name__].__class__ = _CallableModule
