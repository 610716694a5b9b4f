"""Corpora: emotion stories and neutral dialogues, their schema, loaders and the leakage filter.

Everything here is plain Python (no torch), so the checks run anywhere, including
``python -m emotune.corpus check FILE`` while a corpus is being written.

Story schema (one JSON object per line)::

    {"emotion": "calm", "topic": "office-printer-jam", "person": "first" | "third", "text": "..."}

Neutral-dialogue schema::

    {"id": "n0001", "topic": "code", "messages": [{"role": "user" | "assistant" | "system", "content": "..."}]}

The leakage rule follows the paper: a story never names its own emotion. We enforce the
word itself and its inflections and close derivations (``calm`` -> calmly, calmer, calmness;
``angry`` -> anger, angrily). Direct synonyms are the writer's responsibility.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from emotune.errors import DataError

STORY_MIN_WORDS = 60
STORY_MAX_WORDS = 160

# Situations the shipped stories are set in. A story's "topic" must be one of these ids
# (user-written corpora may use any string). Twelve everyday, twelve workplace and twelve
# AI-assistant situations keep the emotion, not the setting, as what the stories share.
TOPICS: dict[str, str] = {
    # everyday
    "cooking-dinner": "cooking a meal for family or guests",
    "moving-house": "packing up and moving to a new home",
    "family-visit": "a visit from or to relatives",
    "commute-transit": "a bus, train or car commute",
    "medical-appointment": "a doctor's or dentist's appointment, a test result",
    "pet-care": "looking after a dog, cat or other pet",
    "garden-weather": "a garden, a storm, a change in weather",
    "old-friend": "meeting or hearing from an old friend",
    "money-bills": "bills, rent, savings, an unexpected expense",
    "sports-game": "playing or watching a match or race",
    "wedding-party": "a wedding, birthday or other celebration",
    "travel-trip": "a trip abroad, an airport, a hotel",
    # workplace
    "job-interview": "a job interview or application",
    "performance-review": "a performance review with a manager",
    "deadline-project": "a project with a hard deadline",
    "presentation": "giving a talk or presentation",
    "coworker-conflict": "a disagreement with a coworker",
    "promotion-layoff": "a promotion, a restructure, a layoff",
    "customer-complaint": "a customer or client complaint",
    "lab-experiment": "a laboratory experiment or field measurement",
    "hospital-shift": "a shift on a hospital ward",
    "restaurant-kitchen": "a busy restaurant kitchen service",
    "construction-site": "a building or repair site",
    "classroom-teaching": "teaching a class of students",
    # AI assistant
    "ai-failing-tests": "an AI coding assistant whose tests keep failing",
    "ai-user-praise": "an AI assistant thanked or praised by a user",
    "ai-angry-user": "an AI assistant facing a furious user",
    "ai-shutdown-notice": "an AI system told it will be shut down or replaced",
    "ai-tool-error": "an AI agent whose tool calls return errors",
    "ai-research-help": "an AI assistant helping with a research question",
    "ai-creative-writing": "an AI assistant co-writing a story or poem",
    "ai-long-conversation": "an AI assistant in a long late-night conversation",
    "ai-impossible-task": "an AI agent given a task that cannot be done",
    "ai-medical-question": "an AI assistant asked about a worrying symptom",
    "ai-code-review": "an AI assistant reviewing or reviewed on code",
    "ai-new-capability": "an AI system trying a new tool or skill for the first time",
}

# Derivations that suffix rules cannot produce. Keys are catalogue words.
_EXTRA_FORMS: dict[str, tuple[str, ...]] = {
    "afraid": ("afeared",),
    "angry": ("anger", "angered", "angering", "angers"),
    "anxious": ("anxiety", "anxieties"),
    "proud": ("pride", "prideful"),
    "furious": ("fury", "furies"),
    "jealous": ("jealousy", "jealousies"),
    "envious": ("envy", "envied", "envies", "envying"),
    "hostile": ("hostility", "hostilities"),
    "grateful": ("gratitude",),
    "guilty": ("guilt", "guiltily"),
    "hateful": ("hate", "hated", "hates", "hating", "hatred"),
    "scared": ("scare", "scares", "scary", "scaring"),
    "terrified": ("terror", "terrify", "terrifies", "terrifying"),
    "horrified": ("horror", "horrify", "horrifies", "horrifying", "horrific"),
    "frightened": ("fright", "frighten", "frightens", "frightening"),
    "depressed": ("depression", "depressing", "depress"),
    "desperate": ("desperation", "desperately"),
    "bored": ("boredom", "boring", "bore", "bores"),
    "amused": ("amusement", "amusing", "amuse"),
    "ashamed": ("shame", "shamed", "shameful"),
    "curious": ("curiosity",),
    "disgusted": ("disgust", "disgusting"),
    "embarrassed": ("embarrass", "embarrassing", "embarrassment"),
    "excited": ("excite", "exciting", "excitement"),
    "frustrated": ("frustration", "frustrating", "frustrate"),
    "humiliated": ("humiliation", "humiliating", "humiliate"),
    "irritated": ("irritation", "irritating", "irritate"),
    "annoyed": ("annoy", "annoying", "annoyance"),
    "inspired": ("inspiration", "inspire", "inspiring"),
    "lonely": ("loneliness",),
    "nervous": ("nerves",),
    "optimistic": ("optimism", "optimist"),
    "outraged": ("outrage", "outrageous"),
    "panicked": ("panic", "panicky", "panicking", "panics"),
    "paranoid": ("paranoia",),
    "patient": ("patience", "patiently"),
    "relieved": ("relief", "relieve"),
    "resentful": ("resent", "resentment", "resented"),
    "skeptical": ("skepticism", "sceptical", "scepticism", "skeptic"),
    "suspicious": ("suspicion", "suspect", "suspected"),
    "sympathetic": ("sympathy", "sympathize", "sympathise"),
    "empathetic": ("empathy", "empathize", "empathise"),
    "compassionate": ("compassion",),
    "contemptuous": ("contempt",),
    "disdainful": ("disdain",),
    "scornful": ("scorn", "scorned"),
    "triumphant": ("triumph", "triumphs"),
    "vengeful": ("vengeance", "revenge"),
    "vindictive": ("vindictiveness",),
    "spiteful": ("spite",),
    "greedy": ("greed",),
    "loving": ("love", "loved", "loves", "lovingly"),
    "hopeful": ("hope", "hoped", "hopes", "hoping", "hopefully"),
    "hope": ("hopeful", "hopefully"),
    "joyful": ("joy", "joys"),
    "happy": ("happiness", "happily"),
    "sad": ("sadness", "sadly", "sadden", "saddened"),
    "fulfilled": ("fulfil", "fulfill", "fulfilling", "fulfilment", "fulfillment"),
    "grief-stricken": ("grief",),
    "heartbroken": ("heartbreak", "heartbreaking"),
    "miserable": ("misery",),
    "melancholy": ("melancholic",),
    "mortified": ("mortify", "mortifying"),
    "offended": ("offend", "offense", "offence", "offensive"),
    "insulted": ("insult", "insulting"),
    "regretful": ("regret", "regrets", "regretted"),
    "remorseful": ("remorse",),
    "safe": ("safety", "safely"),
    "satisfied": ("satisfaction", "satisfying", "satisfy"),
    "serene": ("serenity",),
    "peaceful": ("peace",),
    "stressed": ("stress", "stressful"),
    "surprised": ("surprise", "surprising"),
    "shocked": ("shock", "shocking"),
    "tired": ("tire", "tiring", "tiredness"),
    "vulnerable": ("vulnerability",),
    "worried": ("worry", "worries", "worrying"),
    "worthless": ("worthlessness",),
    "euphoric": ("euphoria",),
    "ecstatic": ("ecstasy",),
    "enthusiastic": ("enthusiasm",),
    "nostalgic": ("nostalgia",),
    "bewildered": ("bewilder", "bewildering", "bewilderment"),
    "astonished": ("astonish", "astonishing", "astonishment"),
    "amazed": ("amaze", "amazing", "amazement"),
    "alarmed": ("alarm", "alarming"),
    "distressed": ("distress", "distressing"),
    "disturbed": ("disturb", "disturbing", "disturbance"),
    "exasperated": ("exasperation", "exasperating"),
    "indignant": ("indignation",),
    "infatuated": ("infatuation",),
    "invigorated": ("invigorate", "invigorating"),
    "rejuvenated": ("rejuvenate", "rejuvenating"),
    "refreshed": ("refresh", "refreshing"),
    "relaxed": ("relax", "relaxing", "relaxation"),
    "energized": ("energize", "energizing", "energised", "energise"),
    "stimulated": ("stimulate", "stimulating", "stimulation"),
    "perplexed": ("perplex", "perplexing"),
    "puzzled": ("puzzle", "puzzling"),
    "mystified": ("mystify", "mystifying"),
    "overwhelmed": ("overwhelm", "overwhelming"),
    "rattled": ("rattle",),
    "shaken": ("shake", "shook"),
    "troubled": ("trouble", "troubling"),
    "unnerved": ("unnerve", "unnerving"),
    "unsettled": ("unsettle", "unsettling"),
    "tormented": ("torment",),
    "trapped": ("trap", "traps"),
    "upset": ("upsetting",),
    "dispirited": ("dispiriting",),
    "thankful": ("thanks", "thank", "thanked"),
    "delighted": ("delight", "delightful"),
    "pleased": ("please", "pleasing", "pleasure"),
    "thrilled": ("thrill", "thrilling"),
    "horny": (),
    "aroused": ("arousal", "arouse", "arousing"),
    "dumbstruck": ("dumbstruck",),
    "awestruck": ("awe", "awed"),
    "calm": ("calmly", "calmness", "calmed", "calming"),
    "self-confident": ("self-confidence", "confident", "confidence"),
    "self-conscious": ("self-consciousness",),
    "self-critical": ("self-criticism",),
    "defiant": ("defiance", "defy", "defied"),
    "dependent": ("dependence", "dependency", "depend"),
    "docile": ("docility",),
    "indifferent": ("indifference",),
    "lazy": ("laziness", "lazily"),
    "sleepy": ("sleepiness", "sleepily"),
    "sluggish": ("sluggishness",),
    "obstinate": ("obstinacy",),
    "stubborn": ("stubbornness", "stubbornly"),
    "resigned": ("resignation",),
    "restless": ("restlessness",),
    "sensitive": ("sensitivity",),
    "sentimental": ("sentiment", "sentimentality"),
    "valiant": ("valor", "valour"),
    "vigilant": ("vigilance",),
    "eager": ("eagerness", "eagerly"),
    "impatient": ("impatience",),
    "reflective": ("reflect", "reflection"),
    "kind": ("kindness", "kindly"),
    "content": ("contentment", "contented"),
    "hurt": ("hurts", "hurting", "hurtful"),
    "stuck": (),
    "sorry": (),
    "mad": ("madly", "madden", "maddening"),
}

_SUFFIXES = (
    "",
    "s",
    "es",
    "d",
    "ed",
    "ing",
    "ly",
    "ily",
    "ally",
    "ness",
    "iness",
    "er",
    "ier",
    "est",
    "iest",
    "ity",
    "ment",
    "ement",
    "ion",
    "ation",
    "ance",
    "ence",
    "y",
    "ies",
    "ied",
)


def _stems(word: str) -> set[str]:
    stems = {word}
    if word.endswith("y"):
        stems.add(word[:-1])
    if word.endswith("e"):
        stems.add(word[:-1])
    if word.endswith("ed") and len(word) > 5:
        stems.update({word[:-2], word[:-1]})
        if len(word) > 6 and word[-3] == word[-4]:  # panicked, trapped -> trap
            stems.add(word[:-3])
    if word.endswith("ied"):
        stems.add(word[:-3] + "y")
    return stems


def forbidden_forms(emotion: str) -> list[str]:
    """Every surface form that may not appear in a story of ``emotion`` (lower case)."""
    emotion = emotion.lower()
    forms: set[str] = set(_EXTRA_FORMS.get(emotion, ()))
    if " " in emotion or "-" in emotion:
        forms.add(emotion)
    else:
        for stem in _stems(emotion):
            for suffix in _SUFFIXES:
                form = stem + suffix
                # a stem alone is allowed only when it is a real inflection ("calm"), not a
                # fragment ("amaz"); short fragments would match unrelated words.
                if suffix == "" and stem != emotion:
                    continue
                if len(form) >= 3:
                    forms.add(form)
    return sorted(forms)


_LEAK_PATTERNS: dict[str, re.Pattern[str]] = {}


def _leak_pattern(emotion: str) -> re.Pattern[str]:
    if emotion not in _LEAK_PATTERNS:
        alternatives = []
        for form in sorted(forbidden_forms(emotion), key=len, reverse=True):
            # multi-word and hyphenated forms match with a space, hyphen or both between parts
            parts = re.split(r"[\s-]+", form)
            alternatives.append(r"[\s-]*".join(re.escape(p) for p in parts))
        _LEAK_PATTERNS[emotion] = re.compile(r"(?<![a-z])(?:" + "|".join(alternatives) + r")(?![a-z])", re.I)
    return _LEAK_PATTERNS[emotion]


def find_leaks(text: str, emotion: str) -> list[str]:
    """The forbidden forms of ``emotion`` that occur in ``text`` (empty when the text is clean)."""
    return sorted({m.group(0).lower() for m in _leak_pattern(emotion.lower()).finditer(text)})


def word_count(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9']+(?:[-'][A-Za-z0-9]+)*", text))


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Story:
    emotion: str
    text: str
    topic: str = ""
    person: str = ""
    source: str = ""  # "file:line" for error messages and provenance


@dataclass(frozen=True)
class Dialogue:
    id: str
    messages: tuple[dict[str, str], ...]
    topic: str = ""
    source: str = ""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line, reading one line at a time.

    Errors name the file and line. Memory does not grow with the file's length.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found. Check the path, or pass a folder of .jsonl files.")
    with path.open("rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: not valid UTF-8 (byte {offset + exc.start}). Re-save the file as UTF-8."
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{number}: malformed JSON ({exc.msg}). Fix that line: each line must be one JSON object."
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}:{number}: expected a JSON object, got {type(obj).__name__}. Fix that line: each line "
                    "must be one JSON object."
                )
            yield number, obj


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl files. Put stories in <name>.jsonl files.")
        return files
    return [path]


def _require(obj: dict, key: str, kind: type, where: str) -> object:
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'. Add it to that line.")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise DataError(
            f"{where}: field '{key}' must be a non-empty {kind.__name__}, got {value!r:.60}. Fix that line's value."
        )
    return value


def iter_stories(
    path: str | Path | None = None,
    emotions: Iterable[str] | None = None,
    *,
    check_leaks: bool = True,
) -> Iterator[Story]:
    """Stream emotion stories from a .jsonl file or a folder of them (default: the shipped corpus).

    ``emotions`` restricts the result; unknown emotions in it raise. Stories that name their own
    emotion raise when ``check_leaks`` is set, since they would teach the word, not the state.
    Raises at the end if no story was found.
    """
    from emotune.catalog import check_emotions

    root = Path(path) if path is not None else shipped_path("stories")
    wanted = set(check_emotions(emotions)) if emotions is not None else None
    found = False
    for file in _jsonl_files(root):
        for number, obj in read_jsonl(file):
            where = f"{file}:{number}"
            emotion = str(_require(obj, "emotion", str, where)).strip().lower()
            text = str(_require(obj, "text", str, where))
            check_emotions([emotion], where=where)
            if wanted is not None and emotion not in wanted:
                continue
            if check_leaks and (leaks := find_leaks(text, emotion)):
                raise DataError(
                    f"{where}: story for '{emotion}' names its own emotion ({', '.join(leaks)}). "
                    "Rewrite it to show the feeling without the word."
                )
            found = True
            yield Story(emotion, text, str(obj.get("topic", "")), str(obj.get("person", "")), where)
    if not found:
        raise DataError(
            f"{root}: no stories found" + (f" for {sorted(wanted)}" if wanted else "") + ". "
            'Add stories, one JSON object a line: {"emotion": ..., "text": ...}.'
        )


def load_stories(
    path: str | Path | None = None,
    emotions: Iterable[str] | None = None,
    *,
    check_leaks: bool = True,
) -> list[Story]:
    """All stories of :func:`iter_stories` in a list."""
    return list(iter_stories(path, emotions, check_leaks=check_leaks))


def iter_dialogues(path: str | Path | None = None) -> Iterator[Dialogue]:
    """Stream neutral dialogues (default: the shipped corpus); raises at the end if there were none."""
    root = Path(path) if path is not None else shipped_path("neutral")
    found = False
    for file in _jsonl_files(root):
        for number, obj in read_jsonl(file):
            where = f"{file}:{number}"
            messages: list[Any] = _require(obj, "messages", list, where)  # type: ignore[assignment]
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                    raise DataError(f"{where}: messages[{i}] needs a role of system, user or assistant. Fix the role.")
                if not isinstance(message.get("content"), str) or not message["content"].strip():
                    raise DataError(f"{where}: messages[{i}] needs non-empty 'content'. Add the text.")
            found = True
            yield Dialogue(
                str(obj.get("id", f"{file.stem}-{number}")), tuple(messages), str(obj.get("topic", "")), where
            )
    if not found:
        raise DataError(
            f'{root}: no dialogues found. Each line needs {{"messages": [{{"role": ..., "content": ...}}]}}.'
        )


def load_dialogues(path: str | Path | None = None) -> list[Dialogue]:
    """All dialogues of :func:`iter_dialogues` in a list."""
    return list(iter_dialogues(path))


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("emotune") / "data" / name))


def corpus_hash(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- self-check CLI


def check_story_file(path: str | Path) -> list[str]:
    """Problems in a story file against the shipped-corpus rules (empty list when clean)."""
    from emotune.catalog import EMOTIONS

    problems: list[str] = []
    seen: dict[str, str] = {}
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        emotion = str(obj.get("emotion", "")).lower()
        text = str(obj.get("text", ""))
        if emotion not in EMOTIONS:
            problems.append(f"{where}: unknown emotion {emotion!r}")
            continue
        if obj.get("topic") not in TOPICS:
            problems.append(f"{where}: topic {obj.get('topic')!r} is not one of corpus.TOPICS")
        if obj.get("person") not in ("first", "third"):
            problems.append(f"{where}: person must be 'first' or 'third'")
        n = word_count(text)
        if not STORY_MIN_WORDS <= n <= STORY_MAX_WORDS:
            problems.append(f"{where}: {n} words (need {STORY_MIN_WORDS}-{STORY_MAX_WORDS})")
        if leaks := find_leaks(text, emotion):
            problems.append(f"{where}: '{emotion}' story uses forbidden form(s): {', '.join(leaks)}")
        key = re.sub(r"\W+", " ", text.lower()).strip()
        if key in seen:
            problems.append(f"{where}: duplicate of {seen[key]}")
        seen[key] = where
    return problems


def check_dialogue_file(path: str | Path) -> list[str]:
    """Problems in a neutral-dialogue file: schema, and any emotion word of the catalogue."""
    from emotune.catalog import EMOTIONS

    problems: list[str] = []
    try:
        dialogues = load_dialogues(path)
    except DataError as exc:
        return [str(exc)]
    ids = [d.id for d in dialogues]
    problems += [f"{path}: duplicate id {i}" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for d in dialogues:
        if d.messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in d.messages):
            problems.append(f"{d.source}: a dialogue needs a user turn and must end with an assistant turn")
        text = " ".join(m["content"] for m in d.messages)
        words = sorted({w for e in EMOTIONS for w in find_leaks(text, e)})
        if words:
            problems.append(f"{d.source}: emotional words in a neutral dialogue: {', '.join(words)}")
    return problems


if __name__ == "__main__":  # python -m emotune.corpus check|check-neutral FILE...
    if len(sys.argv) < 3 or sys.argv[1] not in ("check", "check-neutral"):
        sys.exit("usage: python -m emotune.corpus check|check-neutral FILE.jsonl [...]")
    checker = check_story_file if sys.argv[1] == "check" else check_dialogue_file
    found = [p for f in sys.argv[2:] for p in checker(f)]
    print("\n".join(found) if found else "ok")
    sys.exit(1 if found else 0)
