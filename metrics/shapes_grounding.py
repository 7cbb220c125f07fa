"""The shapes world's grounding metric: which attributes a caption names, whether they are true of its scene, and
whether the caption is a sentence of the world's grammar at all.

    from metrics.shapes_grounding import grounding_scores
    scores = grounding_scores({"img": "a large red circle on the left."}, {"img": scene})  # scenes/<split>.json
    scores["fluent_precision"], scores["fluent_recall"], scores["parse_rate"]

A caption is read phrase by phrase against the world's language (`metrics/shapes_language.py`, synonyms of both
phrasing styles included): `parse_attributes` gives the attributes it names, grouped into noun phrases so that a
colour is judged against the object of its shape and a relation against the phrases around it. `grounding_scores`
averages over images how many named attributes are true of the scene (precision) and how many of the scene's
attributes are named truly (recall); its fluent scores count nothing for a caption the grammar does not parse
(`parses`) and each true fact once, so repetition and word salad cannot raise them. `train.py` selects the shapes
recipe's checkpoints on the fluent F1; the world itself (`dataprep/shapes.py`) is never imported here.
"""

from __future__ import annotations

import re
from typing import Iterable

from .shapes_language import (
    ATTRIBUTE_TYPES,
    OBJECT_ATTRIBUTES,
    STYLES,
    TEMPLATES,
    TEXTURE_BEFORE_COLOUR,
    WORDS,
    alternatives,
    frame,
    relation_between,
)

# --------------------------------------------------------------------------- reading attribute phrases


def _build_lexicon() -> dict[tuple[str, ...], tuple[str, str]]:
    """{phrase as words: (type, value)} over both styles; a phrase meaning two things is an error."""
    lexicon: dict[tuple[str, ...], tuple[str, str]] = {}
    for style, kinds in WORDS.items():
        for kind, values in kinds.items():
            for value, phrase in ((value, phrase) for value in values for phrase in alternatives(style, kind, value)):
                key = tuple(phrase.split())
                if lexicon.setdefault(key, (kind, value)) != (kind, value):
                    raise ValueError(f"'{phrase}' ({style}) means both {lexicon[key]} and {(kind, value)}")
    return lexicon


LEXICON = _build_lexicon()
_LONGEST_PHRASE = max(len(key) for key in LEXICON)
WORD_PATTERN = re.compile(r"[a-z]+")  # a caption's words; mention spans count these


def _starts_longer_phrase(words: list[str], index: int, end: int) -> bool:
    """Whether a phrase of several words starts at `index` and runs past `end`."""
    return any(tuple(words[index:index + length]) in LEXICON
               for length in range(max(2, end - index + 1), _LONGEST_PHRASE + 1) if index + length <= len(words))


def attribute_mentions(caption: str) -> list[tuple[str, str, int, int]]:
    """(type, value, first word, end word) of every attribute phrase, longest phrase first.

    A phrase whose last word starts a longer one gives way ("near the bottom left of a box" is a
    position "bottom" and a relation "left of", not the position "bottom left").
    """
    words = WORD_PATTERN.findall(caption.lower())
    found, index = [], 0
    while index < len(words):
        for length in range(min(_LONGEST_PHRASE, len(words) - index), 0, -1):
            hit = LEXICON.get(tuple(words[index:index + length]))
            if hit and length > 1 and _starts_longer_phrase(words, index + length - 1, index + length):
                continue
            if hit:
                found.append((*hit, index, index + length))
                index += length
                break
        else:
            index += 1
    return found


def parse_attributes(caption: str) -> list[tuple[str, str]]:
    """The attributes a caption mentions, in order: [(type, value)], e.g. ("colour", "red"), ("relation", "above").

    Synonyms of both phrasing styles map to the same value ("big" -> ("size", "large")).
    """
    return [(kind, value) for kind, value, _, _ in attribute_mentions(caption)]


_NOUN_ATTRIBUTES = ("colour", "shape", "size", "texture")
_TRAILING_TEXTURE_GAP = 1  # "a red disc with stripes": one word between the shape and the texture phrase


def _chunk(mentions: list[tuple[str, str, int, int]]) -> list[tuple[str, object]]:
    """Group object attributes into noun phrases: [("np", {type: value}) | (type, value)] in caption order."""
    items: list[tuple[str, object]] = []
    phrase: dict | None = None
    shape_end = -10
    for kind, value, start, end in mentions:
        trailing = kind == "texture" and phrase is not None and start - shape_end <= _TRAILING_TEXTURE_GAP
        if kind in _NOUN_ATTRIBUTES and phrase is not None and ("shape" not in phrase or trailing) \
                and kind not in phrase:
            phrase[kind] = value
        elif kind in _NOUN_ATTRIBUTES:
            phrase = {kind: value}
            items.append(("np", phrase))
        else:
            phrase = None
            items.append((kind, value))
        if kind == "shape":
            shape_end = end
    return items


def _matching(objects: list[dict], phrase: dict, keys: Iterable[str]) -> list[dict]:
    matches = [obj for obj in objects if all(obj[key] == phrase[key] for key in keys if key in phrase)]
    return matches or objects


def _judge(scene: dict, items: list[tuple[str, object]]) -> list[tuple[str, str, bool]]:
    """(type, value, true of the scene) for every mentioned attribute.

    Colour, size and texture are judged against the objects of the phrase's shape (when the scene has
    it), a relation against the phrases before and after it, position and background against the scene.
    """
    objects = scene["objects"]
    judged = []
    for position, (kind, value) in enumerate(items):
        if kind == "np":
            owners = _matching(objects, value, ["shape"])
            for attribute, word in value.items():
                pool = objects if attribute == "shape" else owners
                judged.append((attribute, word, any(obj[attribute] == word for obj in pool)))
        elif kind == "relation":
            judged.append((kind, value, _relation_holds(objects, items, position, value)))
        elif kind == "position":
            judged.append((kind, value, any(obj["position"] == value for obj in objects)))
        elif kind == "background":
            judged.append((kind, value, scene["background"] == value))
    return judged


def _relation_holds(objects: list[dict], items: list, position: int, relation: str) -> bool:
    before = next((phrase for kind, phrase in reversed(items[:position]) if kind == "np"), {})
    after = next((phrase for kind, phrase in items[position + 1:] if kind == "np"), {})
    subjects = _matching(objects, before, _NOUN_ATTRIBUTES)
    others = _matching(objects, after, _NOUN_ATTRIBUTES)
    return any(relation_between(a, b) == relation for a in subjects for b in others if a is not b)


def scene_attributes(scene: dict) -> set[tuple[str, str]]:
    """What a complete caption could mention: every object's attributes (untextured "solid" aside),
    the background, and ("relation", "pair") for a pair of objects."""
    items = {(key, obj[key]) for obj in scene["objects"] for key in OBJECT_ATTRIBUTES
             if not (key == "texture" and obj[key] == "solid")}
    items.add(("background", scene["background"]))
    if len(scene["objects"]) == 2 and relation_between(*scene["objects"]):
        items.add(("relation", "pair"))
    return items


def caption_grounding(caption: str, scene: dict) -> dict:
    """Per-type counts for one caption: mentioned / true mentions / scene items / covered items."""
    return _grounded(caption, scene)[0]


def is_true_of(caption: str, scene: dict) -> bool:
    """Whether every attribute the caption names is true of the scene."""
    return all(c["true"] == c["mentioned"] for c in caption_grounding(caption, scene).values())


def fluent_grounding(caption: str, scene: dict) -> tuple[float, float]:
    """(precision, recall) of one caption that disfluency cannot raise: a caption the world's grammar does not parse
    (`parses`) names nothing true (0, 0); otherwise precision counts each true attribute once over every mention, so
    saying a true thing twice lowers it ("a red circle and a red circle." scores half of "a red circle."), and recall
    is the share of the scene's attributes named truly, as in `caption_grounding`."""
    return _grounded(caption, scene)[2]


def _grounded(caption: str, scene: dict) -> tuple[dict, bool, tuple[float, float]]:
    """One caption judged once: its per-type counts (`caption_grounding`), whether it parses, and its fluent
    (precision, recall) (`fluent_grounding`)."""
    items = _chunk(attribute_mentions(caption))
    judged = _judge(scene, items)
    counts = _grounding_counts(judged, scene)
    if not parses(caption):
        return counts, False, (0.0, 0.0)
    # The fact a mention states: an object attribute belongs to the object its noun phrase describes ("a large red
    # circle and a large blue circle" states two facts about "large"; "a red circle and a red circle" one fact twice),
    # the others to the scene. `_judge` yields one verdict per fact, in this order.
    facts = [fact for kind, value in items for fact in
             ([(tuple(sorted(value.items())), attribute, word) for attribute, word in value.items()] if kind == "np"
              else [(None, kind, value)])]
    distinct_true = {fact for fact, (_, _, true) in zip(facts, judged) if true}
    precision = len(distinct_true) / len(judged) if judged else 0.0
    recall = sum(c["covered"] for c in counts.values()) / sum(c["items"] for c in counts.values())
    return counts, True, (precision, recall)


def _grounding_counts(judged: list[tuple[str, str, bool]], scene: dict) -> dict:
    covered = {(kind, "pair" if kind == "relation" else value) for kind, value, true in judged if true}
    items = scene_attributes(scene)
    counts = {}
    for kind in ATTRIBUTE_TYPES:
        mentioned = [true for k, _, true in judged if k == kind]
        wanted = {item for item in items if item[0] == kind}
        counts[kind] = {"mentioned": len(mentioned), "true": sum(mentioned),
                        "items": len(wanted), "covered": len(wanted & covered)}
    return counts


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def grounding_scores(predictions: dict[str, str], scenes: dict[str, dict]) -> dict:
    """Attribute precision and recall of captions against their scenes, averaged over images.

    precision: share of the attribute phrases of a caption that are true of its scene (images whose
    caption names no attribute are left out of it and counted in `captions_without_attributes`);
    recall: share of the scene's attributes (`scene_attributes`) the caption names truly.
    Both overall and per attribute type (averaged over the images where the type occurs).
    parse_rate: share of the captions the world's grammar parses (`parses`); fluent_precision and
    fluent_recall: the same scores where repetition and disfluency cannot help (`fluent_grounding`),
    averaged over every image.
    """
    missing = [image_id for image_id in predictions if image_id not in scenes]
    if missing:
        raise KeyError(f"{len(missing)} predicted image(s) have no scene, e.g. '{missing[0]}'")
    precision, recall, empty = [], [], 0
    parsed, fluent = [], []
    per_type = {kind: {"precision": [], "recall": []} for kind in ATTRIBUTE_TYPES}
    for image_id, caption in predictions.items():
        counts, caption_parses, fluent_scores = _grounded(caption, scenes[image_id])
        parsed.append(float(caption_parses))
        fluent.append(fluent_scores)
        mentioned = sum(c["mentioned"] for c in counts.values())
        if mentioned:
            precision.append(sum(c["true"] for c in counts.values()) / mentioned)
        else:
            empty += 1
        recall.append(sum(c["covered"] for c in counts.values()) / sum(c["items"] for c in counts.values()))
        for kind, c in counts.items():
            if c["mentioned"]:
                per_type[kind]["precision"].append(c["true"] / c["mentioned"])
            if c["items"]:
                per_type[kind]["recall"].append(c["covered"] / c["items"])
    return {
        "precision": _mean(precision), "recall": _mean(recall), "num_images": len(predictions),
        "captions_without_attributes": empty,
        "parse_rate": _mean(parsed),
        "fluent_precision": _mean([value for value, _ in fluent]),
        "fluent_recall": _mean([value for _, value in fluent]),
        "distinct_scene_caption_share": distinct_scene_caption_share(predictions, scenes),
        "per_type": {kind: {name: _mean(values) for name, values in scores.items()}
                     for kind, scores in per_type.items()},
    }


# --------------------------------------------------------------------------- the grammar (fluency)


def _options(phrases: Iterable[str]) -> str:
    """A regex alternation of literal phrases, longest first (so "top left" wins over "top")."""
    return "(?:" + "|".join(re.escape(phrase) for phrase in sorted(set(phrases), key=len, reverse=True)) + ")"


def _slot(style: str, kind: str) -> str:
    """Every phrase `style` says for some value of `kind`, framed ("in the top left corner")."""
    return _options(frame(style, kind, value).format(word) for value in WORDS[style][kind]
                    for word in alternatives(style, kind, value))


def _noun_phrase_pattern(style: str) -> str:
    """The world's noun phrases: [size] [texture] [colour] shape, the texture after the shape in styles that trail it
    ("a big red disc with stripes")."""
    size, texture, colour, shape = (_slot(style, kind) for kind in ("size", "texture", "colour", "shape"))
    if TEXTURE_BEFORE_COLOUR[style]:
        return f"(?:{size} )?(?:{texture} )?(?:{colour} )?{shape}"
    return f"(?:{size} )?(?:{colour} )?{shape}(?: {texture})?"


def _sentence_pattern(style: str) -> re.Pattern:
    """Every sentence of `style`'s templates (what the world can write in it), as one regular expression."""
    bare = _noun_phrase_pattern(style)
    noun_phrase = f"an? {bare}"
    slots = {"np": noun_phrase, "bare": bare, "np1": f"{noun_phrase}(?: {_slot(style, 'position')})?",
             "np2": noun_phrase, "pos": _slot(style, "position"), "rel": _slot(style, "relation"),
             "bg": f"(?: {_slot(style, 'background')})?"}
    sentences = []
    for template in (template for templates in TEMPLATES[style].values() for template in templates):
        parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
        sentences.append("".join(re.escape(part) if index % 2 == 0 else slots[part]
                                 for index, part in enumerate(parts)))
    return re.compile("(?:" + "|".join(sentences) + ")")


_SENTENCES = {style: _sentence_pattern(style) for style in STYLES}
_ARTICLE = re.compile(r"\b(an?) ([a-z])")


def normalized_caption(caption: str) -> str:
    """A caption as the grammar reads it: lower case, single spaces, no space before punctuation."""
    text = " ".join(caption.lower().split())
    return re.sub(r" ([.,])", r"\1", text)


def parses(caption: str) -> bool:
    """Whether the caption is a sentence of the world's grammar: every word where one of the phrasing styles' templates
    puts it (each sentence in one style), and "a" / "an" agreeing with the next word as `with_article` writes them.
    A repeated word or phrase, a word out of place, a missing shape or a caption cut before its full stop does not
    parse."""
    text = normalized_caption(caption)
    if any((article == "an") != (first in "aeiou") for article, first in _ARTICLE.findall(text)):
        return False
    return any(pattern.fullmatch(text) for pattern in _SENTENCES.values())


# --------------------------------------------------------------------------- distinct captions


def described_scene(scene: dict) -> tuple:
    """What a full caption says of a scene: each object's colour, shape, size and position, and their relation
    (textures, background and distractors are mentioned only sometimes, so scenes differing only there may share
    a caption)."""
    objects = sorted((obj["colour"], obj["shape"], obj["size"], obj["position"]) for obj in scene["objects"])
    return tuple(objects), scene.get("relation")


def distinct_scene_caption_share(predictions: dict[str, str], scenes: dict[str, dict]) -> float:
    """Share of distinct captions among images whose described scenes differ: one image per described scene (the
    first by image id), the number of different captions they got over the number of scenes. 1 means no two
    different scenes share a caption; a collapsed captioner scores near 0."""
    captions = {}
    for image_id in sorted(predictions):
        captions.setdefault(described_scene(scenes[image_id]), predictions[image_id])
    return len(set(captions.values())) / max(len(captions), 1)
