"""Forward hooks on decoder-block outputs: capture activations, add steering vectors.

Both are context managers that always remove their hooks, even when the body raises.
Hooks sit on whole decoder blocks, never on sub-modules, and each hook *overwrites* its
slot rather than appending: with reentrant gradient checkpointing a block can run twice per
step (forward, then recompute in backward), and overwriting keeps exactly one tensor per
layer per forward pass (trap 6 in DESIGN.md). Hooks keep the module tree and state-dict
names unchanged, unlike module wrappers (trap 8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from emotune.models import decoder_layers, resolve_layers


def _hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the last needed layer has run."""


@contextmanager
def capture(
    model: nn.Module,
    layers: int | list[int] | str | None = None,
    *,
    detach: bool = True,
    stop_after_last: bool = False,
    reduce: Callable[[int, torch.Tensor], Any] | None = None,
    layer_path: str | None = None,
) -> Iterator[dict[int, Any]]:
    """Capture the output hidden states of decoder blocks, ``{layer: Tensor[batch, seq, d]}``.

    ``detach=False`` keeps the autograd graph, for losses on activations. ``reduce(layer, h)``
    stores a reduction instead of the full tensor (e.g. a masked mean), which saves memory when
    all layers are captured. ``stop_after_last`` ends the forward pass after the highest
    requested layer: the caller wraps the call in ``with suppress(StopForward)`` and skips the
    remaining layers and the LM head.
    """
    blocks = decoder_layers(model, layer_path)
    indices = resolve_layers(len(blocks), layers)
    last = max(indices)
    store: dict[int, Any] = {}
    handles = []

    def make_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _hidden(output)
            if detach:
                hidden = hidden.detach()
            store[index] = reduce(index, hidden) if reduce is not None else hidden
            if stop_after_last and index == last:
                raise StopForward

        return hook

    try:
        for index in indices:
            handles.append(blocks[index].register_forward_hook(make_hook(index)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def steer(
    model: nn.Module,
    vectors: Mapping[int, torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    layer_path: str | None = None,
) -> Iterator[None]:
    """Add ``vectors[layer]`` (shape ``[d]``) to the output of each given decoder block.

    ``mask`` (``[batch, seq]``, optional) limits the addition to some positions; during
    generation with a KV cache, later steps see only new tokens and are steered everywhere.
    """
    blocks = decoder_layers(model, layer_path)
    indices = resolve_layers(len(blocks), list(vectors))
    by_index = {i: vectors[layer] for i, layer in zip(indices, sorted(vectors, key=lambda x: x % len(blocks)))}
    handles = []

    def make_hook(vector: torch.Tensor) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = _hidden(output)
            delta = vector.to(device=hidden.device, dtype=hidden.dtype)
            if mask is not None and mask.shape == hidden.shape[:2]:
                delta = delta * mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
            return _replace_hidden(output, hidden + delta)

        return hook

    try:
        for index, vector in by_index.items():
            handles.append(blocks[index].register_forward_hook(make_hook(vector)))
        yield
    finally:
        for handle in handles:
            handle.remove()
