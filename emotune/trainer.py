"""EmotuneConfig(SFTConfig) and EmotuneTrainer(SFTTrainer): SFT plus a loss on emotion projections.

The trainer overrides one method, ``compute_loss``. Forward hooks capture the decoder-block
outputs during the *same* forward pass that produces the LM loss, and the emotion terms are
computed from them (DESIGN.md, "The math of the auxiliary loss"). Traps handled here:

- trap 3: ``super().compute_loss(..., return_outputs=True)`` runs a second forward under
  ``no_grad`` that overwrites the captured activations; training never asks for outputs.
- trap 4: with ``num_items_in_batch``, Trainer leaves gradient accumulation to the loss, so a
  per-micro-batch mean must be divided by the accumulation steps (as trl does for MoE aux loss).
- trap 5: PEFT moves modules, so hooks are registered per step on the wrapped model.
- trap 6: capture overwrites one slot per layer, so checkpoint recomputation cannot duplicate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from emotune.basis import pad_batch, pad_rows
from emotune.catalog import check_emotions
from emotune.errors import ConfigError
from emotune.hooks import StopForward, capture
from emotune.losses import (
    BASE_FORMS,
    FORMS,
    SCHEDULES,
    STATE_FORMS,
    drift_loss,
    hold_loss,
    kl_loss,
    project,
    push_loss,
    retain_loss,
    schedule_factors,
    term_loss,
    warmup_factor,
)

ROLES = ("assistant", "user", "system", "tool")
CONTROLS = ("none", "random", "sft")


@dataclass
class EmotionTerm:
    """One auxiliary term: ``weight * form(p_emotion)`` averaged over tokens carrying ``tags``.

    ``roles`` intersects the tag mask with the tokens of those roles' messages (default: the
    assistant's own tokens only); ``roles: [all]`` keeps every role's tagged tokens."""

    emotion: str
    form: str
    weight: float
    tags: list[str] = field(default_factory=lambda: ["assistant"])
    layers: list[int] | None = None  # default: the config's emotion_layers
    margin: float = 0.0  # penalize: allowed level before the penalty starts
    target: float = 0.0  # reward: hinge target; match: the value to match
    direction: str = "down"  # push: down (a penalised emotion) or up (a rewarded one)
    delta: float = 0.0  # push: how far from the base model's projection to move
    roles: list[str] = field(default_factory=lambda: ["assistant"])

    @property
    def name(self) -> str:
        if self.form in STATE_FORMS:
            return f"{self.form}@{'+'.join(self.tags)}"
        form = f"push_{self.direction}" if self.form == "push" else self.form
        return f"{form}_{self.emotion.replace(' ', '_')}"

    @property
    def value(self) -> float:
        return self.margin if self.form == "penalize" else self.target

    @property
    def mask_tags(self) -> list[str]:
        """The implicit role tags the term's tag mask is intersected with."""
        return ["all"] if "all" in self.roles else list(self.roles)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {value!r} is not a number. Use a plain number, e.g. 0.5.")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a number. Use a plain number, e.g. 0.5.") from None


def parse_layers(raw: Any, where: str) -> list[int] | None:
    """A list of layer indices (or one index); ``None`` stays ``None``."""
    if raw is None:
        return None
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)) or not str(item).strip().lstrip("-").isdigit():
            raise ConfigError(
                f"{where}: {item!r} is not a layer index. Use whole numbers, e.g. [12] or [-4] (from the end)."
            )
        out.append(int(item))
    return out


def parse_terms(raw: Any, where: str = "emotion_terms") -> list[EmotionTerm]:
    """Validate the recipe's list of term mappings (or its JSON string from the command line)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg}). Pass a list of term mappings.") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError(
            f"{where}: expected a list of terms, got {type(raw).__name__}. Write a list of "
            "{emotion, form, weight, tags} mappings."
        )
    known = {f for f in EmotionTerm.__dataclass_fields__}
    terms = []
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        if isinstance(item, EmotionTerm):
            terms.append(item)
            continue
        if not isinstance(item, dict):
            raise ConfigError(
                f"{here}: expected a mapping, got {item!r:.60}. Write it as {{emotion, form, weight, tags}}."
            )
        unknown = sorted(set(item) - known)
        if unknown:
            raise ConfigError(f"{here}: unknown key(s) {', '.join(unknown)}. Use only {', '.join(sorted(known))}.")
        for key in ("form", "weight"):
            if key not in item:
                raise ConfigError(f"{here}: missing '{key}'. Add it; a term needs emotion, form and weight.")
        if item["form"] not in FORMS:
            raise ConfigError(f"{here}.form: {item['form']!r} is not one of {', '.join(FORMS)}. Use one of those.")
        form = item["form"]
        if form in STATE_FORMS and item.get("emotion"):
            raise ConfigError(
                f"{here}.emotion: the form {form!r} acts on whole hidden states, not on one emotion. Remove 'emotion'."
            )
        if form not in STATE_FORMS and "emotion" not in item:
            raise ConfigError(f"{here}: missing 'emotion'. Add it; a term needs emotion, form and weight.")
        # a key that another form reads would be silently ignored here (a saved recipe repeats the defaults)
        for key, default, forms in (
            ("direction", "down", ("push",)),
            ("delta", 0.0, ("push",)),
            ("margin", 0.0, ("penalize",)),
            ("target", 0.0, ("reward", "match")),
        ):
            if item.get(key, default) != default and form not in forms:
                raise ConfigError(
                    f"{here}.{key}: applies only to the form(s) {', '.join(forms)}, not {form!r}. Remove it."
                )
        weight = _number(item["weight"], f"{here}.weight")
        if weight < 0:
            raise ConfigError(
                f"{here}.weight: {weight} is negative; weights must be >= 0 (choose the form "
                "'penalize' or 'reward', or push's direction, for the direction)."
            )
        tags = item.get("tags", ["assistant"])
        if isinstance(tags, str):
            tags = [tags]
        if not tags:
            raise ConfigError(f"{here}.tags: empty; name the context tags the term applies to, e.g. [failure].")
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
            raise ConfigError(f"{here}.tags: {tags!r:.60} is not a list of tag names. Use e.g. [failure].")
        roles = item.get("roles", ["assistant"])
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list) or not roles or not all(r in (*ROLES, "all") for r in roles):
            raise ConfigError(
                f"{here}.roles: {roles!r:.60} is not a list of roles. Use some of {', '.join(ROLES)}, or [all] "
                "for every role's tokens."
            )
        direction = item.get("direction", "down")
        if direction not in ("down", "up"):
            raise ConfigError(
                f"{here}.direction: {direction!r} is not 'down' or 'up'. Use down to lower the emotion below the "
                "base model's level, up to raise it."
            )
        delta = _number(item.get("delta", 0.0), f"{here}.delta")
        if form == "push" and delta <= 0:
            raise ConfigError(
                f"{here}.delta: {delta} must be > 0 for push (the distance from the base model's projection, in "
                "units of r_l). Set it, e.g. delta: 0.05."
            )
        emotion = "" if form in STATE_FORMS else check_emotions([item["emotion"]], where=f"{here}.emotion")[0]
        terms.append(
            EmotionTerm(
                emotion,
                form,
                weight,
                list(tags),
                parse_layers(item.get("layers"), f"{here}.layers"),
                _number(item.get("margin", 0.0), f"{here}.margin"),
                _number(item.get("target", 0.0), f"{here}.target"),
                direction,
                delta,
                list(roles),
            )
        )
    return terms


@dataclass
class EmotuneConfig(SFTConfig):
    """SFTConfig plus the emotion settings. Every field can be set in a recipe or on the command line."""

    basis: str | None = field(
        default=None,
        metadata={
            "help": "Basis folder from `emotune extract`. Empty: extract one from the recipe's model on the "
            "shipped corpus, at the emotion layers, and cache it."
        },
    )
    emotion_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layers the terms apply to (negative counts from the end). Default: the basis's default layer."
        },
    )
    # ``str`` in the union makes the command-line flag take one JSON string (a list or one mapping);
    # a recipe's YAML list passes through unchanged
    emotion_terms: list[dict] | str | None = field(  # type: ignore[type-arg]
        default=None,
        metadata={
            "help": "List of terms {emotion, form: penalize|reward|match|push|hold|retain|kl, weight, tags, roles?, "
            "layers?, margin?, target?, direction?, delta?}. On the command line, a JSON list or mapping."
        },
    )
    drift_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the drift term that keeps the other emotions' projections near "
            "the base model's (0 skips the extra base pass)."
        },
    )
    drift_tags: list[str] = field(
        default_factory=lambda: ["all"], metadata={"help": "Tokens the drift term averages over."}
    )
    emotion_weight_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplies every emotion weight (drift included). 0 gives the plain-SFT "
            "control of a recipe, with the projections still measured and logged."
        },
    )
    emotion_warmup_ratio: float = field(
        default=0.0, metadata={"help": "Ramp the emotion weights from 0 over this fraction of the training steps."}
    )
    emotion_schedule: str = field(
        default="constant",
        metadata={
            "help": "constant, or push_to_retain: the push-side weights (penalize, reward, match, push) fall "
            "from 1x to 0.5x and the retain-side ones (retain, kl) rise from 0 to 0.5x over training."
        },
    )
    control: str = field(
        default="none",
        metadata={
            "help": "none: the recipe's emotion terms. random: the same terms along seeded random unit "
            "directions (one per targeted emotion and layer). sft: every emotion weight 0 (plain SFT)."
        },
    )
    control_seed: int | None = field(
        default=None, metadata={"help": "Seed of the random directions of control: random (default: seed)."}
    )
    lora_layers_up_to_target: bool = field(
        default=False,
        metadata={"help": "Put LoRA only on the decoder layers up to the highest layer an emotion term uses."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an earlier emotune run in output_dir (its checkpoints and adapter)."}
    )
    emotion_eval: bool = field(
        default=False, metadata={"help": "Run `emotune eval` on the final adapter and log its figures."}
    )

    def __post_init__(self) -> None:
        self.terms: list[EmotionTerm] = parse_terms(self.emotion_terms)
        self.emotion_layers = parse_layers(self.emotion_layers, "emotion_layers")
        self.emotion_terms = [asdict(t) for t in self.terms]
        if self.drift_weight < 0:
            raise ConfigError(f"drift_weight: {self.drift_weight} is negative; use 0 to turn drift off.")
        if self.emotion_weight_scale < 0:
            raise ConfigError(
                f"emotion_weight_scale: {self.emotion_weight_scale} is negative; use 0 for a control run."
            )
        if not 0 <= self.emotion_warmup_ratio <= 1:
            raise ConfigError(
                f"emotion_warmup_ratio: {self.emotion_warmup_ratio} must be in [0, 1]. Use a fraction such as 0.1, "
                "or 0 for no warmup."
            )
        if self.emotion_schedule not in SCHEDULES:
            raise ConfigError(
                f"emotion_schedule: {self.emotion_schedule!r} is not one of {', '.join(SCHEDULES)}. Use one of those."
            )
        if self.control not in CONTROLS:
            raise ConfigError(f"control: {self.control!r} is not one of {', '.join(CONTROLS)}. Use one of those.")
        if self.control == "sft":
            self.emotion_weight_scale = 0.0  # the terms still run and log, with no force: the plain-SFT control
        # trl re-runs the forward under no_grad for these, which overwrites the captured activations and leaves
        # the emotion terms with exactly zero gradient (DESIGN.md trap 12)
        if self.label_smoothing_factor > 0:
            raise ConfigError(
                f"label_smoothing_factor: {self.label_smoothing_factor} makes trl run a second forward pass that "
                "zeroes the emotion terms' gradient. Set label_smoothing_factor: 0."
            )
        if self.neftune_noise_alpha and self.needs_base:
            raise ConfigError(
                "neftune_noise_alpha: NEFTune noises the embeddings differently in the adapted and the base pass, so "
                "the base-relative terms (push, hold, retain, kl, drift) would compare against noise. Remove it."
            )
        if isinstance(self.drift_tags, str):
            self.drift_tags = [self.drift_tags]
        if self.packing:
            raise ConfigError(
                "packing: trl's packing re-tokenises the dataset and would drop emotune's token tags. "
                "Set packing: false, and padding_free: true to pack each batch into one row with its tags kept."
            )
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every LoRA parameter is used in every forward
        # our collator needs the tag column, and our dataset is tokenised already
        self.remove_unused_columns = False
        kwargs = self.dataset_kwargs if isinstance(self.dataset_kwargs, dict) else {}
        self.dataset_kwargs = dict(kwargs, skip_prepare_dataset=True)
        super().__post_init__()

    @property
    def needs_base(self) -> bool:
        """Whether a term compares with the base model (the adapter-disabled pass runs only then)."""
        return self.drift_weight > 0 or any(t.form in BASE_FORMS for t in self.terms)

    @property
    def emotion_active(self) -> bool:
        # terms with weight 0 still run (and log their projections): a zero-weight run is the
        # plain-SFT control of an experiment, measured with the same instruments
        return bool(self.terms) or self.drift_weight > 0


class EmotionCollator:
    """Pads ``input_ids``/``labels``/``tag_bits`` to the batch's longest row, left or right.

    With ``padding_free``, the batch's conversations are instead concatenated into one row with no
    padding: ``position_ids`` restart at 0 for each conversation (transformers turns that into a
    block-diagonal attention mask, or variable-length flash attention), the first label of each is
    ignored (no prediction across a boundary), and ``segments`` numbers each token's conversation,
    so that the emotion terms still average per conversation.
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        padding_free: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return self._packed(features)
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, mask, positions = pad_batch(
            [f["input_ids"] for f in features], self.pad_token_id, self.padding_side, width
        )
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "labels": pad_rows([f["labels"] for f in features], -100, self.padding_side, width),
            "tag_bits": pad_rows([f["tag_bits"] for f in features], 0, self.padding_side, width),
        }

    def _packed(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        labels = []
        for f in features:
            row = torch.as_tensor(list(f["labels"]), dtype=torch.long)
            row[:1] = -100
            labels.append(row)
        batch = {
            "input_ids": torch.cat([torch.as_tensor(list(f["input_ids"]), dtype=torch.long) for f in features]),
            "position_ids": torch.cat([torch.arange(n) for n in lengths]),
            "labels": torch.cat(labels),
            "tag_bits": torch.cat([torch.as_tensor(list(f["tag_bits"]), dtype=torch.long) for f in features]),
            "segments": torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)]),
        }
        total = sum(lengths)
        if self.pad_to_multiple_of and total % self.pad_to_multiple_of:
            extra = self.pad_to_multiple_of - total % self.pad_to_multiple_of  # a padding "sequence" of its own
            fill = {"input_ids": self.pad_token_id, "labels": -100, "tag_bits": 0, "segments": -1}
            for key, value in fill.items():
                batch[key] = torch.cat([batch[key], torch.full((extra,), value, dtype=torch.long)])
            batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra)])
        return {key: value[None] for key, value in batch.items()}


def coverage(mask: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """The share of the batch's sequences whose mask is non-empty.

    The per-sequence mean counts a sequence with an empty mask as 0, so a term's effective weight is
    ``weight * coverage``; it is logged as ``emotion/<term>_coverage`` so that it can be read off."""
    if segments is None:
        return mask.any(-1).float().mean()
    flat = segments.flatten()
    hits = mask.new_zeros(flat.numel(), dtype=torch.float32).index_add(
        0, flat.clamp_min(0), (mask.flatten() & (flat >= 0)).float()
    )
    return (hits > 0).float().sum() / (flat.max() + 1).clamp_min(1)


def tag_mask(tag_bits: torch.Tensor, tags: Sequence[str], bits: dict[str, int]) -> torch.Tensor:
    """Boolean ``[B, T]``: tokens carrying any of ``tags``."""
    wanted = 0
    for tag in tags:
        wanted |= 1 << bits[tag]
    return (tag_bits & wanted) != 0


class EmotuneTrainer(SFTTrainer):
    """SFTTrainer whose loss adds the emotion terms of ``args`` (an EmotuneConfig)."""

    args: EmotuneConfig

    def __init__(self, *args: Any, basis: Any, tag_bits: dict[str, int], **kwargs: Any) -> None:
        config: EmotuneConfig = kwargs["args"]
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None:
            kwargs["data_collator"] = EmotionCollator(
                tokenizer.pad_token_id,
                getattr(tokenizer, "padding_side", "right"),
                int(config.pad_to_multiple_of) if config.pad_to_multiple_of else None,
                padding_free=config.padding_free,
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ConfigError(
                "compute_loss_func: trl computes it on a second forward pass that zeroes the emotion terms' "
                "gradient. Leave it out; subclass EmotuneTrainer and override compute_loss for another LM loss."
            )
        # trl refuses a custom collator with padding_free; ours packs the batch itself
        padding_free, config.padding_free = config.padding_free, False
        try:
            super().__init__(*args, **kwargs)
        finally:
            config.padding_free = padding_free
        self.basis = basis
        self.tag_bits = tag_bits
        default_layers = config.emotion_layers or [basis.default_layer]
        self.n_layers = int(basis.metadata.get("num_layers") or (max(basis.layers) + 1))
        norm = lambda ls: sorted({i + self.n_layers if i < 0 else i for i in ls})  # noqa: E731
        self.term_layers = [[] if t.form == "kl" else norm(t.layers or default_layers) for t in config.terms]
        self.drift_layers = norm(default_layers)
        targeted = {t.emotion for t in config.terms if t.emotion}
        self.drift_emotions = [e for e in basis.emotions if e not in targeted]
        # KL needs the final hidden state: the last block's output, then the model's final norm and LM head
        self.last_layer = self.n_layers - 1
        kl = any(t.form == "kl" for t in config.terms)
        self.hook_layers = sorted(
            {i for ls in self.term_layers for i in ls}
            | (set(self.drift_layers) if config.drift_weight > 0 else set())
            | ({self.last_layer} if kl else set())
        )
        # the base pass captures only what the base-relative terms compare with
        self.base_layers = sorted(
            {i for t, ls in zip(config.terms, self.term_layers) if t.form in BASE_FORMS for i in ls}
            | (set(self.drift_layers) if config.drift_weight > 0 else set())
            | ({self.last_layer} if kl else set())
        )
        for layer in sorted({i for ls in self.term_layers for i in ls} | set(self.drift_layers)):
            basis._slot(layer)  # raises a clear error for a layer the basis lacks (r_l comes from there too)
        self._term_columns: dict[int, list[str]] = {}  # the emotions projected at each layer, in term order
        for term, layers in zip(config.terms, self.term_layers):
            for layer in layers if term.emotion else []:
                columns = self._term_columns.setdefault(layer, [])
                if term.emotion not in columns:
                    columns.append(term.emotion)
        # vectors per layer, kept on the model's device
        self._vectors: dict[tuple[int, str], torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor | float] = {}
        self.control_vectors = self._random_directions() if config.control == "random" else {}

    def _random_directions(self) -> dict[int, torch.Tensor]:
        """``{layer: [E_layer, d]}``: seeded random unit vectors standing in for the targeted emotions' vectors.

        Drawn in a fixed order (layer, then the emotions in term order) from a generator of their own, so that
        the same seed gives the same directions whatever else draws from the global RNG."""
        seed = self.args.control_seed if self.args.control_seed is not None else self.args.seed
        generator = torch.Generator().manual_seed(int(seed))
        out = {}
        for layer in sorted(self._term_columns):
            d = self.basis.vectors(layer).shape[-1]
            vectors = torch.randn(len(self._term_columns[layer]), d, generator=generator, dtype=torch.float32)
            out[layer] = vectors / vectors.norm(dim=-1, keepdim=True)
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _vecs(self, layer: int, emotions: Sequence[str], device: torch.device) -> torch.Tensor:
        key = (layer, ",".join(emotions))
        if key not in self._vectors:
            idx = [self.basis.index(e) for e in emotions]
            self._vectors[key] = self.basis.vectors(layer)[idx].to(device)
        return self._vectors[key]

    def terms_loss(
        self,
        store: dict[int, torch.Tensor],
        tag_bits: torch.Tensor,
        attention: torch.Tensor,
        segments: torch.Tensor | None = None,
        base: dict[int, torch.Tensor] | None = None,
        factors: tuple[float, float] = (1.0, 1.0),
        model: Any = None,
    ) -> torch.Tensor:
        """The weighted sum of the recipe's terms on the captured activations ``store`` (``{layer: [B, T, d]}``),
        before the weight scale and warmup; queues each term's value and masked projection level for logging.

        ``base`` holds the same layers from the adapter-disabled pass (base-relative forms need it);
        ``factors`` are the schedule's (push side, retain side) multipliers; ``model`` gives the final
        norm and LM head for a kl term."""
        device = next(iter(store.values())).device
        total = torch.zeros((), device=device)
        projections = self._term_projections(store, device)
        base_projections = self._term_projections(base, device) if base is not None else {}
        for term, layers in zip(self.args.terms, self.term_layers):
            mask = tag_mask(tag_bits, term.tags, self.tag_bits) & tag_mask(tag_bits, term.mask_tags, self.tag_bits)
            mask = mask & attention
            self._log(f"emotion/{term.name}_coverage", coverage(mask, segments))
            factor = factors[1] if term.form in STATE_FORMS else factors[0] if term.form != "hold" else 1.0
            if term.form in BASE_FORMS and base is None:
                raise ValueError(f"the {term.form} term needs the base model's activations (base=None)")
            if term.form == "kl":
                logits, base_logits = self._final_logits(model, store, base, mask)  # type: ignore[arg-type]
                value = kl_loss(logits, base_logits, mask, segments)
                total = total + factor * term.weight * value
                self._log(f"emotion/{term.name}", value.detach())
                continue
            for layer in layers:
                suffix = f"@L{layer}" if len(layers) > 1 else ""
                if term.form == "retain":
                    assert base is not None
                    value = retain_loss(store[layer], base[layer], mask, self.basis.scale(layer), segments)
                    total = total + factor * term.weight * value / len(layers)
                    self._log(f"emotion/{term.name}{suffix}", value.detach())
                    continue
                column = self._term_columns[layer].index(term.emotion)
                p = projections[layer][..., column].float()
                if term.form == "push":
                    value = push_loss(
                        p, base_projections[layer][..., column].float(), mask, term.delta, term.direction, segments
                    )
                elif term.form == "hold":
                    value = hold_loss(p, base_projections[layer][..., column].float(), mask, segments)
                else:
                    value = term_loss(term.form, p, mask, term.value, segments)
                total = total + factor * term.weight * value / len(layers)
                self._log(f"emotion/{term.name}{suffix}", value.detach())
                with torch.no_grad():
                    where = "+".join(term.tags)
                    self._log(
                        f"emotion/proj_{term.emotion.replace(' ', '_')}@{where}{suffix}",
                        (p.detach() * mask).sum() / mask.sum().clamp_min(1),
                    )
                    if layer in base_projections:  # the move from base, which the base-relative forms act on
                        moved = p.detach() - base_projections[layer][..., column].float()
                        self._log(
                            f"emotion/shift_{term.emotion.replace(' ', '_')}@{where}{suffix}",
                            (moved * mask).sum() / mask.sum().clamp_min(1),
                        )
        return total

    def _term_projections(self, store: dict[int, torch.Tensor], device: torch.device) -> dict[int, torch.Tensor]:
        """``{layer: [B, T, E_layer]}``: every term's projection at a layer in one product (along the random
        directions instead of the emotion vectors under ``control: random``)."""
        out = {}
        for layer, emotions in self._term_columns.items():
            if layer not in store:
                continue
            if self.control_vectors:
                vectors = self.control_vectors[layer].to(device)
            else:
                vectors = self._vecs(layer, emotions, device)
            out[layer] = project(store[layer], vectors, self.basis.scale(layer))
        return out

    def _final_logits(
        self, model: Any, store: dict[int, torch.Tensor], base: dict[int, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits of the adapted and the base model at the masked tokens only (``[N, V]`` each):
        the last block's captured output through the model's final norm and LM head, so that neither pass
        builds the full ``[B, T, V]`` logits (trl's fused LM head never does for the LM loss either)."""
        inner = self.accelerator.unwrap_model(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        final_norm = inner.get_decoder().norm
        head = inner.get_output_embeddings()
        cap = getattr(inner.config, "final_logit_softcapping", None)
        keep = mask.bool()

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            out = head(final_norm(hidden[keep]))
            return torch.tanh(out / cap) * cap if cap else out

        with torch.no_grad():
            base_logits = logits(base[self.last_layer])
        return logits(store[self.last_layer]), base_logits

    def _log(self, key: str, value: torch.Tensor | float) -> None:
        """Queue a metric; ``_flush_logs`` converts the step's values with one device sync."""
        self._pending[key] = value

    def _flush_logs(self) -> None:
        mode = "train" if self.model is not None and self.model.training else "eval"
        keys = list(self._pending)
        device = next((v.device for v in self._pending.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        values = [
            torch.as_tensor(self._pending[k], dtype=torch.float32, device=device).detach().reshape(()) for k in keys
        ]
        for key, value in zip(keys, torch.stack(values).tolist() if values else []):
            self._metrics[mode][key].append(value)
        self._pending.clear()

    def _base_pass(self, model: Any, inputs: dict[str, Any]) -> dict[int, torch.Tensor]:
        """The base model's block outputs at ``base_layers``: the same batch with the adapter disabled, no grad,
        stopping after the last needed layer (no LM head; a kl term applies it to the masked tokens only)."""
        unwrapped = self.accelerator.unwrap_model(model)
        disable = getattr(unwrapped, "disable_adapter", None)
        if disable is None:
            raise ConfigError(
                "drift_weight > 0 and the forms push, hold, retain and kl need a PEFT model (use_peft: true), to run "
                "the base model by disabling the adapter."
            )
        forward_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        # Stopping mid-forward skips the post-forward hooks of every later module. Under FSDP or ZeRO-3 those
        # hooks re-shard the parameters and keep the ranks' collectives in step, so a sharded model runs the whole
        # forward (LM head included): slower, and the safe choice until a multi-GPU run shows the shortcut holds.
        stop = not self.model_is_sharded()
        with torch.no_grad(), disable(), capture(unwrapped, self.base_layers, stop_after_last=stop) as store:
            try:
                unwrapped(**forward_inputs, use_cache=False)
            except StopForward:
                pass
        return {layer: h.detach() for layer, h in store.items()}

    def model_is_sharded(self) -> bool:
        """Whether parameters are sharded across processes (FSDP, or DeepSpeed ZeRO stage 3)."""
        if getattr(self, "is_fsdp_enabled", False):
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        return plugin is not None and getattr(plugin, "zero_stage", None) == 3

    # -- the one override ----------------------------------------------------------------

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        tag_bits = inputs.pop("tag_bits", None)
        segments = inputs.pop("segments", None)  # padding-free batches: each token's conversation
        config = self.args
        if not config.emotion_active or tag_bits is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        base = self._base_pass(model, inputs) if config.needs_base else None
        with capture(model, self.hook_layers, detach=False) as store:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        lm_loss = result[0] if return_outputs else result
        attention = inputs["attention_mask"].bool() if "attention_mask" in inputs else segments >= 0
        scale = config.emotion_weight_scale * warmup_factor(
            self.state.global_step, self.state.max_steps, config.emotion_warmup_ratio
        )
        factors = schedule_factors(config.emotion_schedule, self.state.global_step, self.state.max_steps)
        aux = scale * self.terms_loss(store, tag_bits, attention, segments, base, factors, model)
        if config.emotion_schedule != "constant":
            self._log("emotion/push_factor", factors[0])
            self._log("emotion/retain_factor", factors[1])
        if base is not None and config.drift_weight > 0:
            mask = tag_mask(tag_bits, config.drift_tags, self.tag_bits) & attention
            drift = lm_loss.new_zeros(())
            for layer in self.drift_layers:
                vecs = self._vecs(layer, self.drift_emotions, lm_loss.device)
                r = self.basis.scale(layer)
                drift = drift + drift_loss(
                    project(store[layer], vecs, r).float(), project(base[layer], vecs, r).float(), mask, segments
                ) / len(self.drift_layers)
            aux = aux + scale * config.drift_weight * drift
            self._log("emotion/drift", drift.detach())
        self._log("emotion/lm_loss", lm_loss.detach())
        self._log("emotion/aux_loss", aux.detach())
        self._log("emotion/weight_scale", scale)
        self._flush_logs()
        # Trainer divides the loss by the accumulation steps itself only when the model does not take
        # num_items_in_batch; otherwise the LM loss is normalised over the whole accumulated batch and a
        # per-micro-batch mean like ours would count GA times over (trap 4).
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        total = lm_loss + aux / steps
        return (total, result[1]) if return_outputs else total
