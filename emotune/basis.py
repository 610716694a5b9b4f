"""EmotionBasis: emotion vectors extracted from a model's activations, following the paper.

Recipe (arXiv 2604.07729, summarised in DESIGN.md):

1. run each story through the model and average each decoder block's output over the
   story's tokens from ``offset`` on (the first tokens carry little emotion and, at position
   0, an attention-sink spike);
2. per-emotion mean minus the mean over emotions ("raw" vectors);
3. project out the top principal components of the activations on neutral dialogues, those
   that explain ``variance`` (50%) of it ("denoised" vectors);
4. unit-normalise.

The basis also stores r_l, the mean residual norm at each layer on neutral text, so that a
projection ``<h, v> / r_l`` is in units that carry over between models.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from emotune import __version__
from emotune.catalog import check_emotions
from emotune.corpus import Dialogue, Story, iter_dialogues, iter_stories, shipped_path
from emotune.errors import ConfigError, DataError, EmotuneError
from emotune.hooks import StopForward, capture
from emotune.io import atomic_dir, write_json_atomic
from emotune.models import model_fingerprint, model_source, num_layers, resolve_layers

BASIS_FILE = "basis.safetensors"
META_FILE = "basis.json"


# ----------------------------------------------------------------------------- text -> features


def render_dialogue(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Chat-template text for ``messages``; a plain "Role: text" layout when there is no template.

    Tool messages become user messages prefixed "[tool output]" for templates without a tool role.
    """
    msgs = [dict(m) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
            return str(out)
        except Exception:  # templates that reject a role (tool, system): fold it into a user turn
            folded: list[dict[str, str]] = []
            for m in msgs:
                if m["role"] == "tool":
                    m = {"role": "user", "content": f"[tool output]\n{m['content']}"}
                elif m["role"] == "system" and folded:
                    m = {"role": "user", "content": m["content"]}
                if folded and folded[-1]["role"] == m["role"] == "user":
                    folded[-1]["content"] += "\n\n" + m["content"]
                else:
                    folded.append(m)
            try:
                out = tokenizer.apply_chat_template(
                    folded, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except Exception as exc:
                roles = ", ".join(sorted({m["role"] for m in msgs}))
                raise ConfigError(
                    f"the tokenizer's chat template rejects these messages (roles: {roles}; "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Pass a tokenizer whose "
                    "chat template accepts these roles, or remove its chat_template to use the plain layout."
                ) from None
            return str(out)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n\n".join(lines)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Group indices into batches of similar length (sorted), to keep padding small."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max(lengths[index], *(lengths[i] for i in current)) if current else lengths[index]
        if current and (len(current) >= batch_size or (max_tokens and longest * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: str = "right", width: int | None = None) -> torch.Tensor:
    """Stack integer rows into ``[n, width]``, filling with ``value`` on the left or the right."""
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            out[i, span] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def forward_batch(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, device: torch.device
) -> None:
    """One no-cache forward of a padded batch, for its hooks' sake: a ``capture`` with ``stop_after_last`` ends it
    after the last needed block, so nothing is returned."""
    with suppress(StopForward):
        model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
        )


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)``; positions count real tokens only, so that
    left and right padding give the same activations."""
    ids = pad_rows(sequences, pad_id, side, width)
    mask = pad_rows([[1] * len(s) for s in sequences], 0, side, ids.shape[1])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@dataclass
class RunStats:
    """Token counts, token-norm sums and time of one pass over a text stream."""

    n_layers: int
    norm_sum: torch.Tensor = field(init=False)  # [n_layers] sum over counted tokens of ||h||
    token_count: int = 0
    n_texts: int = 0
    n_tokens_total: int = 0
    n_tokens_padded: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.norm_sum = torch.zeros(self.n_layers, dtype=torch.float64)

    @property
    def mean_norm(self) -> torch.Tensor:
        return (self.norm_sum / max(1, self.token_count)).float()

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.n_tokens_total / max(1, self.n_tokens_padded)


@dataclass
class Features:
    """Per-text mean activations at each captured layer, plus the pass's statistics."""

    means: torch.Tensor  # [n_texts, n_layers, d], float32
    layers: list[int]
    stats: RunStats

    @property
    def mean_norm(self) -> torch.Tensor:
        return self.stats.mean_norm

    @property
    def padding_fraction(self) -> float:
        return self.stats.padding_fraction


TextItem = tuple[str, int, str]  # (text, first counted token, "file:line" for errors)
CHUNK = 4096  # texts tokenised and bucketed by length at a time: bounds memory, keeps padding small


@torch.no_grad()
def stream_activations(
    model: Any,
    tokenizer: Any,
    items: Iterable[TextItem],
    layers: list[int],
    stats: RunStats,
    *,
    batch_size: int = 16,
    max_tokens: int | None = 8192,
    max_length: int | None = None,
    padding_side: str = "right",
    chunk: int = CHUNK,
    progress: tqdm | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, means)`` per batch: each text's mean decoder-block output over its tokens
    from its offset on, ``[batch, n_layers, d]`` float32 on the CPU, at every layer in one pass.

    ``items`` is consumed ``chunk`` texts at a time, and each chunk is bucketed by length, so
    memory does not grow with the stream's length. The forward pass stops after the highest
    captured layer. ``stats`` collects token counts and norms; ``indices`` count from 0 in the stream.
    """
    device = next(model.parameters()).device
    context = _context_length(model)
    slot = {layer: k for k, layer in enumerate(layers)}
    state: dict[str, Any] = {}

    def reduce(layer: int, hidden: torch.Tensor) -> None:
        h = hidden.float().masked_fill(~state["counted"].unsqueeze(-1), 0.0)
        state["out"][:, slot[layer]] = torch.einsum("bt,btd->bd", state["weights"], h).cpu()
        stats.norm_sum[slot[layer]] += h.norm(dim=-1).sum().double().cpu()

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    base = 0
    try:
        with capture(model, layers, reduce=reduce, stop_after_last=True):
            for block in _chunks(items, chunk):
                texts = [text for text, _, _ in block]
                encoded = tokenizer(
                    texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length
                )
                sequences: list[list[int]] = encoded["input_ids"]
                starts = torch.tensor([first for _, first, _ in block])
                for (_, first, where), seq in zip(block, sequences):
                    if len(seq) <= first:
                        raise DataError(
                            f"{where}: only {len(seq)} tokens, not more than the offset ({first}). "
                            "Lengthen the text or lower the offset."
                        )
                    if context and len(seq) > context:
                        raise DataError(
                            f"{where}: {len(seq)} tokens, longer than the model's context ({context}). "
                            "Shorten the text, or pass max_length to truncate."
                        )
                for rows in length_batches([len(s) for s in sequences], batch_size, max_tokens):
                    ids, mask, positions = pad_batch(
                        [sequences[i] for i in rows], tokenizer.pad_token_id, padding_side
                    )
                    counted = mask.bool() & (positions >= starts[rows].unsqueeze(-1))
                    counts = counted.sum(-1, keepdim=True)
                    out = torch.zeros(len(rows), len(layers), _hidden_size(model))
                    state.update(counted=counted.to(device), weights=(counted / counts).float().to(device), out=out)
                    stats.token_count += int(counts.sum())
                    stats.n_tokens_total += int(mask.sum())
                    stats.n_tokens_padded += mask.numel()
                    forward_batch(model, ids, mask, positions, device)
                    stats.n_texts += len(rows)
                    if progress is not None:
                        progress.update(len(rows))
                    yield [base + i for i in rows], out
                base += len(block)
    finally:
        model.train(was_training)
        stats.seconds += time.perf_counter() - start


def mean_activations(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: list[int],
    *,
    offset: int | Sequence[int] = 0,
    batch_size: int = 16,
    max_tokens: int | None = 8192,
    max_length: int | None = None,
    padding_side: str = "right",
    desc: str | None = None,
    sources: Sequence[str] | None = None,
) -> Features:
    """Mean over tokens ``offset..end`` of each text's decoder-block outputs, at every layer, in memory.

    ``offset`` is one start position for all texts or one per text. For streams too large to
    hold, use :func:`stream_activations`.
    """
    if not texts:
        raise DataError("no texts to run: the corpus is empty. Pass at least one text.")
    offsets = [offset] * len(texts) if isinstance(offset, int) else list(offset)
    where = sources or [f"text {i}" for i in range(len(texts))]
    stats = RunStats(len(layers))
    means = torch.zeros(len(texts), len(layers), _hidden_size(model))
    with tqdm(total=len(texts), desc=desc, disable=desc is None, unit="text") as bar:
        for rows, out in stream_activations(
            model,
            tokenizer,
            zip(texts, offsets, where),
            layers,
            stats,
            batch_size=batch_size,
            max_tokens=max_tokens,
            max_length=max_length,
            padding_side=padding_side,
            progress=bar,
        ):
            means[rows] = out
    return Features(means, list(layers), stats)


def _chunks(items: Iterable[TextItem], size: int) -> Iterator[list[TextItem]]:
    block: list[TextItem] = []
    for item in items:
        block.append(item)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


def _hidden_size(model: Any) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def _context_length(model: Any) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ----------------------------------------------------------------------------- vector math


def neutral_components(neutral: torch.Tensor, variance: float) -> torch.Tensor:
    """Top principal directions ``[k, d]`` of ``neutral`` (``[n, d]``) explaining ``variance`` of it."""
    centred = neutral - neutral.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    ratio = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-30)
    k = int((ratio < variance).sum().item()) + 1 if variance > 0 else 0
    return vh[:k].float()


Method = Literal["mean_diff", "whitened"]
SHRINKAGE = 0.2  # whitened: weight of the identity (scaled to the mean variance) mixed into the covariance


def emotion_vectors(
    feats: torch.Tensor,
    labels: torch.Tensor,
    n_emotions: int,
    pcs: list[torch.Tensor],
    method: Method = "mean_diff",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and denoised unit vectors ``[L, E, d]`` from per-story features ``[N, L, d]``.

    ``mean_diff`` is the paper's recipe: per-emotion mean minus the mean over emotions.
    ``whitened`` multiplies those differences by the inverse of the (shrunk) within-emotion
    covariance of the stories, a linear-discriminant direction: it discounts the directions in
    which stories of one emotion vary anyway (topic, narration, length), and on SmolLM2-135M it
    doubles held-out accuracy (docs/BASIS.md). Denoising then removes the neutral PCs from either.
    """
    sums = StorySums(n_emotions, feats.shape[1], feats.shape[2], folds=1)
    sums.add(feats, labels, torch.zeros_like(labels))
    return vectors_from_sums(*sums.total(), pcs, method, sample=(feats, labels))


class StorySums:
    """Per-fold sums of story features by emotion: all the vectors need, in memory that does not
    grow with the number of stories. ``total(exclude=f)`` gives the sums without fold ``f``."""

    def __init__(self, n_emotions: int, n_layers: int, d: int, folds: int) -> None:
        self.sums = torch.zeros(folds, n_emotions, n_layers, d, dtype=torch.float64)
        self.counts = torch.zeros(folds, n_emotions, dtype=torch.float64)

    def add(self, feats: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor) -> None:
        """Add ``feats`` ``[B, L, d]`` of stories with emotion ``labels`` ``[B]`` in ``folds`` ``[B]``."""
        x = feats.double()
        for f in folds.unique().tolist():
            rows = folds == f
            self.sums[f].index_add_(0, labels[rows], x[rows])
            self.counts[f].index_add_(0, labels[rows], torch.ones(int(rows.sum()), dtype=torch.float64))

    def total(self, exclude: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = [f for f in range(self.sums.shape[0]) if f != exclude]
        return self.sums[keep].sum(0), self.counts[keep].sum(0)


def vectors_from_sums(
    sums: torch.Tensor,
    counts: torch.Tensor,
    pcs: list[torch.Tensor],
    method: Method = "mean_diff",
    sample: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and denoised unit vectors ``[L, E, d]`` from per-emotion feature sums ``[E, L, d]`` and counts.

    ``whitened`` estimates the within-emotion covariance from ``sample``: features ``[n, L, d]``
    and their emotion labels (all stories when they fit in memory, else a random subset).
    """
    n_emotions, n_layers, d = sums.shape
    class_means = sums / counts.clamp_min(1)[:, None, None]  # [E, L, d]
    raw = (class_means - class_means.mean(0, keepdim=True)).transpose(0, 1).contiguous()  # [L, E, d]
    if method == "whitened":
        if sample is None:
            raise ValueError("method='whitened' needs a sample of story features for the covariance")
        x, y = sample
        for k in range(n_layers):
            residual = x[:, k].double() - class_means[y, k]  # [n, d]
            cov = residual.T @ residual / max(1, len(y) - n_emotions)
            cov += SHRINKAGE * cov.trace() / d * torch.eye(d, dtype=torch.float64)
            raw[k] = torch.linalg.solve(cov, raw[k].T).T
    elif method != "mean_diff":
        raise ConfigError(f"method={method!r}: choose 'mean_diff' (the paper's) or 'whitened'.")
    denoised = raw.clone()
    for k, p in enumerate(pcs):
        if p.numel():
            p64 = p.double()
            denoised[k] = raw[k] - (raw[k] @ p64.T) @ p64
    unit = lambda v: (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()  # noqa: E731
    return unit(raw), unit(denoised)


def sample_indices(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of a random subset of ``size`` of ``range(n)`` (all of them when ``n <= size``)."""
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


# ----------------------------------------------------------------------------- the basis


@dataclass
class Readout:
    """What :meth:`EmotionBasis.measure` returns: centred projections in units of r_l."""

    emotions: list[str]
    layer: int
    per_text: torch.Tensor  # [n_texts, n_emotions], mean over each text's tokens from the offset on
    per_token: list[torch.Tensor] | None  # per text [n_tokens, n_emotions], with per_token=True
    token_ids: list[list[int]]  # each text's tokens, to label per_token rows

    def top(self, index: int = 0, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` highest-reading emotions of text ``index``."""
        values, order = self.per_text[index].topk(min(k, len(self.emotions)))
        return [(self.emotions[int(i)], float(v)) for v, i in zip(values, order)]


@dataclass
class EmotionBasis:
    """Unit emotion vectors at one or more layers of one model.

    ``basis.vectors(layer)`` is ``[n_emotions, d]``; ``basis["calm"]`` is the calm vector at the
    default layer; ``basis.project(hidden, layer)`` gives projections in units of the layer's
    mean residual norm.
    """

    emotions: list[str]
    layers: list[int]
    denoised: torch.Tensor  # [L, E, d] unit
    raw: torch.Tensor  # [L, E, d] unit
    resid_norm: torch.Tensor  # [L]
    neutral_pcs: list[torch.Tensor]  # per layer, [k_l, d]
    default_layer: int
    metadata: dict[str, Any] = field(default_factory=dict)
    # [L, d]: the mean feature of the extraction's stories, the centre that validation subtracts before
    # scoring (trap 15); None for bases saved before it was stored
    centre: torch.Tensor | None = None

    # -- access ---------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.denoised.shape[-1])

    def _slot(self, layer: int | None) -> int:
        layer = self.default_layer if layer is None else layer
        if layer < 0 and self.metadata.get("num_layers"):
            layer += int(self.metadata["num_layers"])
        if layer not in self.layers:
            raise ConfigError(
                f"layer {layer} is not in this basis (layers {_span(self.layers)}). Re-extract with --layers "
                "including it, or pick one of those."
            )
        return self.layers.index(layer)

    def index(self, emotion: str) -> int:
        return self.emotions.index(check_emotions([emotion], known=self.emotions)[0])

    def vectors(self, layer: int | None = None, *, denoised: bool = True) -> torch.Tensor:
        return (self.denoised if denoised else self.raw)[self._slot(layer)]

    def vector(self, emotion: str, layer: int | None = None, *, denoised: bool = True) -> torch.Tensor:
        return self.vectors(layer, denoised=denoised)[self.index(emotion)]

    def __getitem__(self, emotion: str) -> torch.Tensor:
        return self.vector(emotion)

    def __len__(self) -> int:
        return len(self.emotions)

    def scale(self, layer: int | None = None) -> float:
        return float(self.resid_norm[self._slot(layer)])

    def project(
        self, hidden: torch.Tensor, layer: int | None = None, emotions: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``[..., d] -> [..., n_emotions]``: ``<h, v_e> / r_layer`` for each emotion (or the given ones)."""
        vecs = self.vectors(layer)
        if emotions is not None:
            vecs = vecs[[self.index(e) for e in emotions]]
        vecs = vecs.to(device=hidden.device, dtype=hidden.dtype)
        return hidden @ vecs.T / self.scale(layer)

    @torch.no_grad()
    def measure(
        self,
        model: Any,
        tokenizer: Any,
        texts_or_conversations: Sequence[str | Sequence[dict[str, str]]],
        layer: int | None = None,
        per_token: bool = False,
        *,
        offset: int | None = None,
        batch_size: int = 16,
    ) -> Readout:
        """Read the emotions of texts (or chat conversations, rendered with the chat template) at ``layer``.

        Each token's hidden state is centred on the extraction stories' mean feature, the centre the
        validation subtracts before scoring (an uncentred projection carries the grand mean's projection, which
        differs per emotion: trap 15), then projected and divided by r_l. ``per_text`` is the mean over each
        text's tokens from ``offset`` on (default: the offset the basis was extracted with, which skips the
        first tokens' attention-sink spike); ``per_token`` adds every token's readout.
        """
        slot = self._slot(layer)
        layer_id = self.layers[slot]
        if self.centre is None:
            raise DataError(
                "this basis has no stored story centre (it was saved by an older emotune), so the centred readout "
                "cannot be computed. Re-extract the basis, or use basis.project(hidden) for uncentred projections."
            )
        start = int(self.metadata.get("settings", {}).get("offset", 0)) if offset is None else offset
        texts = [t if isinstance(t, str) else render_dialogue(tokenizer, t) for t in texts_or_conversations]
        if not texts:
            raise DataError("measure: no texts given. Pass at least one text or conversation.")
        sequences: list[list[int]] = tokenizer(texts, add_special_tokens=True)["input_ids"]
        for i, seq in enumerate(sequences):
            if len(seq) <= start:
                raise DataError(
                    f"measure: text {i} has {len(seq)} tokens, not more than the offset ({start}). "
                    "Lengthen it, or pass a smaller offset=."
                )
        device = next(model.parameters()).device
        vecs, centre, scale = self.vectors(layer_id), self.centre[slot], self.scale(layer_id)
        per_text = torch.zeros(len(texts), len(self.emotions))
        tokens: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        was_training = model.training
        model.eval()
        try:
            with capture(model, [layer_id], stop_after_last=True) as store:
                for rows in length_batches([len(s) for s in sequences], batch_size):
                    ids, mask, positions = pad_batch([sequences[i] for i in rows], tokenizer.pad_token_id)
                    forward_batch(model, ids, mask, positions, device)
                    readout = (store[layer_id].float().cpu() - centre) @ vecs.T / scale  # [b, T, E]
                    for j, i in enumerate(rows):
                        tokens[i] = readout[j, : len(sequences[i])]
                        per_text[i] = tokens[i][start:].mean(0)
        finally:
            model.train(was_training)
        return Readout(list(self.emotions), layer_id, per_text, tokens if per_token else None, sequences)

    def subset(self, emotions: Sequence[str]) -> EmotionBasis:
        idx = [self.index(e) for e in emotions]
        return EmotionBasis(
            [self.emotions[i] for i in idx],
            list(self.layers),
            self.denoised[:, idx].clone(),
            self.raw[:, idx].clone(),
            self.resid_norm.clone(),
            list(self.neutral_pcs),
            self.default_layer,
            dict(self.metadata),
            None if self.centre is None else self.centre.clone(),
        )

    def __repr__(self) -> str:
        return (
            f"EmotionBasis({len(self.emotions)} emotions, layers {_span(self.layers)}, default {self.default_layer}, "
            f"d={self.hidden_size}, model={self.metadata.get('model', {}).get('model')!r})"
        )

    # -- compatibility ---------------------------------------------------------------------

    def check_model(self, model: Any, *, strict: bool = True) -> None:
        """Raise if this basis was not extracted from ``model`` (hidden size, layers, fingerprint)."""
        config = model.config
        d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        name = self.metadata.get("model", {}).get("model")
        if d != self.hidden_size:
            raise ConfigError(
                f"this basis was extracted from {name!r} (hidden size {self.hidden_size}); "
                f"the model has hidden size {d}. "
                "Extract a basis for this model with `emotune extract --model ...`."
            )
        n = num_layers(model)
        if max(self.layers) >= n:
            raise ConfigError(
                f"this basis (from {name!r}) has layer {max(self.layers)}, but the model has only {n} layers. "
                "Extract a basis for this model with `emotune extract --model ...`."
            )
        expected = self.metadata.get("fingerprint")
        if strict and expected and model_fingerprint(model) != expected:
            raise ConfigError(
                f"this basis was extracted from {name!r} (fingerprint {expected}), and this model's weights differ "
                f"(fingerprint {model_fingerprint(model)}). Extract a basis for this model, or pass strict=False "
                "if you know the weights are the same model in another precision."
            )

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
        """Write ``basis.safetensors`` + ``basis.json`` into the folder ``path``, atomically.

        ``extra(folder)`` may write more files (the validation report) into the same atomic write.
        """
        tensors = {
            "denoised": self.denoised.contiguous(),
            "raw": self.raw.contiguous(),
            "resid_norm": self.resid_norm.contiguous(),
            "layers": torch.tensor(self.layers, dtype=torch.long),
        }
        for layer, pcs in zip(self.layers, self.neutral_pcs):
            tensors[f"neutral_pcs.{layer}"] = pcs.contiguous()
        if self.centre is not None:
            tensors["centre"] = self.centre.contiguous()
        meta = dict(
            self.metadata,
            emotions=self.emotions,
            layers=self.layers,
            default_layer=self.default_layer,
            hidden_size=self.hidden_size,
            format="emotune-basis/1",
        )
        with atomic_dir(path, marker=META_FILE) as tmp:
            save_file(tensors, str(tmp / BASIS_FILE))
            write_json_atomic(tmp / META_FILE, meta)
            if extra is not None:
                extra(tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> EmotionBasis:
        """Load a basis folder (safetensors + JSON only: nothing executable is read)."""
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        meta_path, tensor_path = folder / META_FILE, folder / BASIS_FILE
        if not meta_path.exists() or not tensor_path.exists():
            raise DataError(
                f"{folder}: not a basis folder (needs {META_FILE} and {BASIS_FILE}). "
                "Create one with `emotune extract --model NAME --out DIR`."
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{meta_path}: corrupt basis metadata ({exc}). Re-extract the basis.") from None
        if not isinstance(meta, dict):
            raise DataError(
                f"{meta_path}: basis metadata must be a JSON object, got {type(meta).__name__}. Re-extract the basis."
            )
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:
            raise DataError(f"{tensor_path}: corrupt or truncated basis file ({exc}). Re-extract the basis.") from None
        for key in ("denoised", "raw", "resid_norm", "layers"):
            if key not in tensors:
                raise DataError(f"{tensor_path}: missing tensor '{key}'. Re-extract the basis.")
        layers = [int(x) for x in tensors["layers"].tolist()]
        emotions = list(meta.get("emotions", []))
        shape = tuple(tensors["denoised"].shape)
        if shape[:2] != (len(layers), len(emotions)) or tensors["raw"].shape != tensors["denoised"].shape:
            raise DataError(
                f"{tensor_path}: tensor shape {shape} does not match {len(layers)} layers x "
                f"{len(emotions)} emotions in {META_FILE}. Re-extract the basis."
            )
        for key in ("denoised", "raw", "resid_norm"):
            if not torch.isfinite(tensors[key]).all():
                raise DataError(f"{tensor_path}: tensor '{key}' holds NaN or inf values. Re-extract the basis.")
        pcs = [tensors.get(f"neutral_pcs.{layer}", torch.zeros(0, shape[-1])) for layer in layers]
        default = int(meta.get("default_layer", layers[0]))
        meta = {k: v for k, v in meta.items() if k not in ("emotions", "layers", "default_layer", "hidden_size")}
        centre = tensors.get("centre")  # absent in bases saved before it was stored: measure() then says so
        bad_centre = centre is not None and (
            tuple(centre.shape) != (len(layers), shape[-1]) or not torch.isfinite(centre).all()
        )
        if centre is not None and bad_centre:
            raise DataError(
                f"{tensor_path}: tensor 'centre' has shape {tuple(centre.shape)} or non-finite values, expected "
                f"{len(layers)} x {shape[-1]}. Re-extract the basis."
            )
        return cls(
            emotions, layers, tensors["denoised"], tensors["raw"], tensors["resid_norm"], pcs, default, meta, centre
        )

    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | Path,
        subfolder: str | None = None,
        *,
        revision: str | None = None,
        token: str | None = None,
    ) -> EmotionBasis:
        """Load a basis from a local folder or a hub repo (``subfolder="basis"`` for an adapter's own basis).

        Only ``basis.safetensors`` and ``basis.json`` are downloaded and read: nothing executable or pickled.
        """
        local = Path(repo_or_path) / (subfolder or "")
        if local.is_dir() or Path(repo_or_path).is_dir():
            return cls.load(local)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{repo_or_path}" + (f" (subfolder {subfolder})" if subfolder else "")
        try:
            files = [
                hf_hub_download(str(repo_or_path), name, subfolder=subfolder or None, revision=revision, token=token)
                for name in (META_FILE, BASIS_FILE)
            ]
        except HFValidationError:
            raise ConfigError(
                f"{repo_or_path}: neither a local folder nor a hub repo id. Pass a basis folder written by "
                "`emotune extract`, or a hub id like user/name."
            ) from None
        except LocalEntryNotFoundError:  # subclass of EntryNotFoundError in some versions: test it first
            raise EmotuneError(
                f"{where}: no local folder of that name, and no such hub basis in the local hub cache while the "
                "hub cannot be reached (offline or HF_HUB_OFFLINE=1). Check the path, download it once with "
                "network access, or pass a local basis folder."
            ) from None
        except RevisionNotFoundError:
            raise ConfigError(
                f"{where}: no revision {revision!r} in this hub repo. Check --revision (a branch, tag or commit)."
            ) from None
        except RepositoryNotFoundError:
            raise ConfigError(
                f"{where}: no such repo on the hub (or it is private). Check the id, and log in with "
                "`hf auth login` for a private repo."
            ) from None
        except EntryNotFoundError:
            raise DataError(
                f"{where}: no {META_FILE} and {BASIS_FILE} there. Point at the folder that holds them "
                "(an adapter's basis is in subfolder='basis')."
            ) from None
        return cls.load(Path(files[0]).parent)

    def push_to_hub(
        self,
        repo_id: str,
        subfolder: str | None = None,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload emotune emotion basis",
    ) -> str:
        """Upload this basis (``basis.safetensors`` + ``basis.json``) to ``repo_id`` in one commit; returns its URL."""
        import tempfile

        from emotune.export import push_folder

        with tempfile.TemporaryDirectory(prefix="emotune-basis-") as tmp:
            folder = self.save(Path(tmp) / "basis")
            return push_folder(
                {folder: subfolder or ""}, repo_id, private=private, token=token, commit_message=commit_message
            )

    # -- extraction ------------------------------------------------------------------------

    @classmethod
    def extract(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        stories: str | Path | Sequence[Story] | None = None,
        neutral: str | Path | Sequence[Dialogue] | None = None,
        emotions: Sequence[str] | None = None,
        layers: int | list[int] | str | None = None,
        offset: int = 8,
        variance: float = 0.5,
        batch_size: int = 16,
        max_tokens: int | None = 8192,
        folds: int = 6,
        seed: int = 0,
        validate: bool = True,
        progress: bool = True,
        default_layer: int | None = None,
        method: Method = "mean_diff",
        max_length: int | None = None,
        sample: int = 2500,
    ) -> EmotionBasis:
        """Extract a basis from ``model`` on the shipped corpus (or the given one).

        All requested layers (default: every layer) are captured in one pass. With ``validate``,
        held-out accuracy per layer is computed by ``folds``-fold cross-validation over stories,
        and the best layer becomes ``default_layer``; ``basis.metadata["validation"]`` holds it.

        The corpora are streamed (read twice: once for the labels, once through the model), so
        memory does not grow with their size: the vectors come from per-emotion sums over every
        story, and at most ``sample`` stories (and neutral dialogues), chosen at random with
        ``seed``, keep their features in memory, for validation, the whitened covariance and the
        neutral PCs. The shipped corpus is under ``sample``, so all of it is kept.
        """
        wanted = check_emotions(emotions) if emotions is not None else None
        story_stream = _story_stream(stories, wanted)
        dialogue_stream = _dialogue_stream(neutral)
        layer_ids = resolve_layers(model, layers)
        d = _hidden_size(model)

        # pass 1, text only: each story's emotion (a few bytes per story), for folds and counts
        found = [s.emotion for s in story_stream()]
        names = sorted(set(found), key=_catalog_order)
        if len(names) < 2:
            raise DataError(
                f"need stories for at least 2 emotions to extract a basis, got {names}. "
                "Add stories, or widen --emotions."
            )
        labels = torch.tensor([names.index(e) for e in found])
        del found
        counts = torch.bincount(labels, minlength=len(names))
        n_folds = max(2, min(folds, int(counts.min()))) if validate and int(counts.min()) >= 2 else 1
        fold = fold_assignment(labels, n_folds, seed) if n_folds > 1 else torch.zeros_like(labels)
        n_neutral = sum(1 for _ in dialogue_stream())

        # neutral dialogues: residual norms, and features of (a sample of) them for the PCs
        neutral_stats = RunStats(len(layer_ids))
        neutral_keep = sample_indices(n_neutral, sample, seed)
        neutral_feats = torch.zeros(len(neutral_keep), len(layer_ids), d)
        neutral_hash = hashlib.sha256()
        slot = torch.full((n_neutral,), -1, dtype=torch.long)
        slot[neutral_keep] = torch.arange(len(neutral_keep))

        def neutral_items() -> Iterator[TextItem]:
            for dialogue in dialogue_stream():
                text = render_dialogue(tokenizer, dialogue.messages)
                neutral_hash.update(text.encode("utf-8") + b"\x00")
                yield text, offset, dialogue.source

        with tqdm(total=n_neutral, desc="neutral dialogues", disable=not progress, unit="text") as bar:
            for rows, out in stream_activations(
                model,
                tokenizer,
                neutral_items(),
                layer_ids,
                neutral_stats,
                batch_size=batch_size,
                max_tokens=max_tokens,
                max_length=max_length,
                progress=bar,
            ):
                into = slot[rows]
                neutral_feats[into[into >= 0]] = out[into >= 0]
        pcs = [neutral_components(neutral_feats[:, k], variance) for k in range(len(layer_ids))]
        del neutral_feats

        # stories: per-fold sums by emotion, and features of (a sample of) them for validation
        story_stats = RunStats(len(layer_ids))
        sums = StorySums(len(names), len(layer_ids), d, n_folds)
        keep = sample_indices(len(labels), sample, seed)
        kept = torch.zeros(len(keep), len(layer_ids), d)
        slot = torch.full((len(labels),), -1, dtype=torch.long)
        slot[keep] = torch.arange(len(keep))
        story_hash = hashlib.sha256()

        def story_items() -> Iterator[TextItem]:
            for story in story_stream():
                story_hash.update((story.emotion + "\t" + story.text).encode("utf-8") + b"\x00")
                yield story.text, offset, story.source

        with tqdm(total=len(labels), desc="emotion stories", disable=not progress, unit="text") as bar:
            for rows, out in stream_activations(
                model,
                tokenizer,
                story_items(),
                layer_ids,
                story_stats,
                batch_size=batch_size,
                max_tokens=max_tokens,
                max_length=max_length,
                progress=bar,
            ):
                index = torch.tensor(rows)
                sums.add(out, labels[index], fold[index])
                into = slot[index]
                kept[into[into >= 0]] = out[into >= 0]
        raw, denoised = vectors_from_sums(*sums.total(), pcs, method, sample=(kept, labels[keep]))
        all_sums, all_counts = sums.total()
        centre = (all_sums.sum(0) / all_counts.sum()).float()  # the centre cross_validate uses, over all folds

        tokens = neutral_stats.n_tokens_total + story_stats.n_tokens_total
        meta: dict[str, Any] = {
            "emotune_version": __version__,
            "model": model_source(model),
            "fingerprint": model_fingerprint(model),
            "num_layers": num_layers(model),
            "method": method,
            "settings": {
                "offset": offset,
                "variance": variance,
                "batch_size": batch_size,
                "folds": folds,
                "seed": seed,
                "max_length": max_length,
                "sample": sample,
            },
            "corpus": {
                "stories": len(labels),
                "per_emotion": {"min": int(counts.min()), "max": int(counts.max())},
                "stories_hash": story_hash.hexdigest()[:16],
                "neutral": n_neutral,
                "neutral_hash": neutral_hash.hexdigest()[:16],
                "sampled": {"stories": len(keep), "neutral": len(neutral_keep)},
            },
            "neutral_pcs": {str(layer): int(p.shape[0]) for layer, p in zip(layer_ids, pcs)},
            "timing": {
                "neutral_s": round(neutral_stats.seconds, 2),
                "stories_s": round(story_stats.seconds, 2),
                "tokens": tokens,
                "padding_fraction": round(
                    1 - tokens / max(1, neutral_stats.n_tokens_padded + story_stats.n_tokens_padded), 4
                ),
            },
        }
        best = layer_ids[len(layer_ids) * 2 // 3]  # the paper's rule of thumb when not validating
        if n_folds > 1:
            val = cross_validate(sums, (kept, labels[keep], fold[keep]), names, pcs, layer_ids, method=method)
            meta["validation"] = val
            best = val["best_layer"]
        return cls(
            names,
            layer_ids,
            denoised,
            raw,
            neutral_stats.mean_norm.clone(),
            pcs,
            default_layer if default_layer is not None else best,
            meta,
            centre,
        )


def _story_stream(
    stories: str | Path | Sequence[Story] | None, wanted: list[str] | None
) -> Callable[[], Iterator[Story]]:
    """A re-iterable stream of stories: an in-memory list, or a file or folder read lazily each time."""
    if isinstance(stories, (list, tuple)):
        chosen = [s for s in stories if wanted is None or s.emotion in wanted]
        if not chosen:
            raise DataError("no stories given" + (f" for {wanted}" if wanted else "") + ". Pass a non-empty corpus.")
        return lambda: iter(chosen)
    return lambda: iter_stories(stories, wanted)  # type: ignore[arg-type]


def _dialogue_stream(neutral: str | Path | Sequence[Dialogue] | None) -> Callable[[], Iterator[Dialogue]]:
    if isinstance(neutral, (list, tuple)):
        if not neutral:
            raise DataError("no neutral dialogues given. Pass a non-empty list, or leave it out for the shipped set.")
        return lambda: iter(neutral)
    return lambda: iter_dialogues(neutral)  # type: ignore[arg-type]


SHIPPED_BASES = "bases"  # under emotune/data: bases of the embedded models, extracted by `emotune extract`


def shipped_basis(model: Any, layers: Sequence[int] | None) -> EmotionBasis | None:
    """The basis shipped with emotune for ``model`` (matched by weight fingerprint) if it covers ``layers``.

    Extraction is deterministic, so the shipped copy is what a fresh extraction on the shipped corpus gives
    (a slow test re-extracts and compares); it saves the quickstart several minutes of CPU time.
    """
    if layers is None:
        return None
    root = Path(str(resources.files("emotune") / "data" / SHIPPED_BASES))
    fingerprint = model_fingerprint(model)
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("fingerprint") == fingerprint and set(layers) <= set(meta.get("layers", [])):
            return EmotionBasis.load(folder)
    return None


def cached_basis(model: Any, tokenizer: Any, layers: int | list[int] | str | None = None) -> EmotionBasis:
    """A basis for ``model`` on the shipped corpus at ``layers``: the shipped copy when one covers them, else
    extracted once and cached on disk (keyed by the model's fingerprint and the layers).

    Extraction runs in bfloat16 only where the CPU computes it natively (``parse_dtype("auto")``): there it is
    about 3x faster than float32, but on an AVX2-only CPU emulated bf16 is about 6x *slower*. The vectors are
    computed in float32 either way.
    """
    import copy
    import logging

    from emotune.models import cache_dir, parse_dtype

    log = logging.getLogger("emotune")
    ids = resolve_layers(model, layers) if layers is not None else None
    shipped = shipped_basis(model, ids)
    if shipped is not None:
        log.warning(
            "Using the basis shipped for %s (layers %s)",
            shipped.metadata.get("model", {}).get("model"),
            _span(shipped.layers),
        )
        return shipped
    # keyed by model, layers, the shipped corpus (its bytes) and the extraction code's version, so that runs share
    # one extraction and an upgrade never reuses a basis from another corpus or method
    corpus = hashlib.sha256(__version__.encode())
    for name in ("stories", "neutral"):
        for file in sorted(shipped_path(name).glob("*.jsonl")):
            corpus.update(file.read_bytes())
    layer_key = "_".join(map(str, ids)) if ids else "all"
    path = cache_dir() / "bases" / f"{model_fingerprint(model)}-{layer_key}-{corpus.hexdigest()[:12]}"
    if (path / META_FILE).exists():
        log.warning("Using the cached basis %s", path)
        return EmotionBasis.load(path)
    log.warning("Extracting an emotion basis from the model on the shipped corpus (cached in %s)", path)
    param = next(model.parameters())
    fast = parse_dtype("auto", param.device)
    source = copy.deepcopy(model).to(fast) if param.device.type == "cpu" and param.dtype != fast else model
    basis = EmotionBasis.extract(source, tokenizer, layers=ids)
    del source
    basis.save(path)
    return basis


def _catalog_order(name: str) -> int:
    from emotune.catalog import EMOTIONS

    return EMOTIONS.index(name) if name in EMOTIONS else len(EMOTIONS)


def _span(layers: Sequence[int]) -> str:
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ----------------------------------------------------------------------------- validation


def fold_assignment(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold id per story, balanced within each emotion, deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(labels)
    for e in labels.unique():
        idx = (labels == e).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        fold[idx] = torch.arange(len(idx)) % folds
    return fold


def cross_validate(
    sums: StorySums,
    sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    names: list[str],
    pcs: list[torch.Tensor],
    layers: list[int],
    *,
    method: Method = "mean_diff",
) -> dict[str, Any]:
    """Held-out classification of stories by their top projection, per layer.

    For each fold, vectors come from the other folds' stories (``sums.total(exclude=fold)``);
    each held-out story in ``sample`` (features ``[n, L, d]``, labels, folds), centred on the
    training stories' mean, is scored against every emotion vector. Reports top-1, top-5,
    within-cluster top-1 and cluster accuracy for each layer.
    """
    from emotune.catalog import CATALOG

    feats, labels, fold = sample
    n_emotions = len(names)
    folds = sums.sums.shape[0]
    clusters = [CATALOG[n].cluster if n in CATALOG else "?" for n in names]
    cluster_ids = torch.tensor([sorted(set(clusters)).index(c) for c in clusters])
    n_layers = feats.shape[1]
    hit1 = torch.zeros(n_layers)
    hit5 = torch.zeros(n_layers)
    hit_cluster = torch.zeros(n_layers)
    hit_within = torch.zeros(n_layers)
    k5 = min(5, n_emotions)
    for f in range(folds):
        train, test = fold != f, fold == f
        train_sums, train_counts = sums.total(exclude=f)
        _, vecs = vectors_from_sums(train_sums, train_counts, pcs, method, sample=(feats[train], labels[train]))
        centre = (train_sums.sum(0) / train_counts.sum()).float()  # [L, d]
        x = feats[test] - centre  # [n, L, d]
        scores = torch.einsum("nld,led->lne", x, vecs)  # [L, n, E]
        y = labels[test]
        top = scores.topk(k5, dim=-1).indices  # [L, n, k]
        hit1 += (top[..., 0] == y).float().sum(-1)
        hit5 += (top == y[None, :, None]).any(-1).float().sum(-1)
        hit_cluster += (cluster_ids[top[..., 0]] == cluster_ids[y]).float().sum(-1)
        same = cluster_ids[None, None, :] == cluster_ids[y][None, :, None]  # [1, n, E]
        within = scores.masked_fill(~same, -math.inf).argmax(-1)
        hit_within += (within == y).float().sum(-1)
    n = len(labels)
    per_layer = {
        str(layer): {
            "top1": round(float(hit1[k] / n), 4),
            "top5": round(float(hit5[k] / n), 4),
            "cluster": round(float(hit_cluster[k] / n), 4),
            "within_cluster": round(float(hit_within[k] / n), 4),
        }
        for k, layer in enumerate(layers)
    }
    score = hit1 + 0.5 * hit5
    best = layers[int(score.argmax())]
    return {
        "folds": folds,
        "stories": n,
        "stories_total": int(sums.counts.sum()),
        "emotions": n_emotions,
        "chance_top1": round(1 / n_emotions, 4),
        "chance_top5": round(min(5, n_emotions) / n_emotions, 4),
        "best_layer": best,
        "best": per_layer[str(best)],
        "per_layer": per_layer,
    }
