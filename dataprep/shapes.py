"""The shapes world: a small synthetic captioning world that runs the whole method offline.

    python -m dataprep.shapes data/shapes/raw --seed 0          # normally run by `prepare_datasets.py shapes`

Scenes hold one or two coloured shapes (colour, shape, size, grid position, texture; the relation
between two) on a background, with pixel noise, a brightness gradient and small distractor specks.
Captions come from a grammar with several phrasings; they mention colour and shape almost always,
size, position and relation often, texture and background only sometimes, so an image always shows
more than any one caption says. Two phrasing styles exist: the references and the in-domain corpus
share one; the cross-domain corpus uses other templates, synonyms and word order.

`build_world` writes the world in the layout of the real sources, so the same `coco` / `corpus`
commands read it:

    images/<split>/<image_id>.png       splits clip_pretrain, train, val, test
    annotations/<split>_caption.json    OSCAR coco_caption style [{"image_id", "id", "caption"}]; train, val
                                        and test carry 5 references an image (the unsupervised stages use only
                                        train's images; the supervised upper bound trains on every reference)
    corpus/{in_domain,cross_domain}.txt one sentence a line, describing scenes of no image split
    corpus/{in_domain,cross_domain}_scenes.json  the scene each line describes (same order)
    scenes/<split>.json                 {image_id: scene}, the ground truth
    clip/                               the tiny CLIP, an open_clip `local-dir:` folder
    tokenizer/                          word-level PreTrainedTokenizerFast (save_pretrained)
    world.json                          seed, sizes, vocabulary size, CLIP metrics, timings

Scene signatures (background + the objects' attributes) are split between the corpora and the image
splits by a seeded hash, so no corpus sentence describes a scene of any image split and no two image
splits share a scene. `grounding_scores` measures how many attribute words of a caption are true of
its scene (precision) and how many of the scene's attributes a caption mentions (recall).

The tiny CLIP is trained from scratch: its vision tower first learns to tag scenes (each grid cell's object
attributes and the background, as LiT and many CLIPs start from a supervised backbone), then both towers learn
the contrastive loss with NegCLIP-style hard negatives (captions with one attribute swapped, also ranked against
their own caption alone). It is measured on the test split: retrieval R@1, the modality gap, and a swap test per
attribute family (`swap_test`: how often the image prefers a true reference over the same reference with
one attribute swapped so that it is false) -- what the CLIP cannot tell apart, no CLIP reward can teach.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image


# --------------------------------------------------------------------------- vocabulary (the world as data)

COLOURS = {
    "red": (212, 44, 44), "green": (44, 168, 72), "blue": (48, 96, 224),
    "yellow": (236, 204, 40), "purple": (148, 68, 200), "orange": (244, 132, 24),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.27, "large": 0.44}  # radius as a share of a grid cell
TEXTURES = {"solid": 0.55, "striped": 0.15, "dotted": 0.15, "hollow": 0.15}  # sampling weights
BACKGROUNDS = {"dark": (26, 28, 34), "gray": (116, 116, 112), "light": (224, 222, 210)}
GRID = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
CELL_OF = {name: (row, col) for row, names in enumerate(GRID) for col, name in enumerate(names)}
RELATIONS = ("left of", "right of", "above", "below")
OBJECT_ATTRIBUTES = ("colour", "shape", "size", "texture", "position")
ATTRIBUTE_TYPES = ("colour", "shape", "size", "texture", "position", "relation", "background")
ONE_OBJECT_SHARE = 0.45
DISTRACTOR_COUNTS = (0.3, 0.3, 0.25, 0.15)  # probability of 0, 1, 2, 3 specks

# The words each phrasing style uses for each attribute value (the content word(s) a parser looks for);
# a tuple holds alternatives, drawn uniformly: the cross-domain style says "disc" as often as "circle".
WORDS = {
    "in_domain": {
        "colour": {colour: colour for colour in COLOURS},
        "shape": {shape: shape for shape in SHAPES},
        "size": {"small": "small", "large": "large"},
        "texture": {"solid": "solid", "striped": "striped", "dotted": "dotted", "hollow": "hollow"},
        "position": {name: name for name in CELL_OF},
        "relation": {relation: relation for relation in RELATIONS},
        "background": {"dark": "dark background", "gray": "gray background", "light": "light background"},
    },
    "cross_domain": {
        "colour": {**{colour: colour for colour in COLOURS}, "purple": ("violet", "purple")},
        "shape": {"circle": ("disc", "circle"), "square": ("box", "square"), "triangle": "triangle",
                  "diamond": ("rhombus", "diamond"), "cross": ("plus sign", "cross")},
        "size": {"small": ("little", "small"), "large": ("big", "large")},
        "texture": {"solid": "solid colour", "striped": "stripes", "dotted": "dots", "hollow": "outline"},
        "position": {"top left": ("upper left", "top left"), "top": "top", "top right": ("upper right", "top right"),
                     "left": ("left side", "left"), "center": ("middle", "center"), "right": ("right side", "right"),
                     "bottom left": ("lower left", "bottom left"), "bottom": "bottom",
                     "bottom right": ("lower right", "bottom right")},
        "relation": {"left of": "left of", "right of": "right of", "above": ("over", "above"),
                     "below": ("under", "below")},
        "background": {"dark": "black backdrop", "gray": "grey backdrop", "light": "pale backdrop"},
    },
}
# How the content words sit in a sentence: a format string per value ("*" for the others).
FRAMES = {
    "in_domain": {
        "position": {"top": "at the {}", "bottom": "at the {}", "left": "on the {}", "right": "on the {}",
                     "center": "in the {}", "*": "in the {} corner"},
        "relation": {"left of": "to the {}", "right of": "to the {}", "*": "{}"},
        "background": {"*": "on a {}"},
    },
    "cross_domain": {
        "position": {"top": "near the {}", "bottom": "near the {}", "left": "on the {}", "right": "on the {}",
                     "*": "in the {}"},
        "texture": {"solid": "in {}", "hollow": "in {}", "*": "with {}"},
        "background": {"*": "against a {}"},
    },
}
TEXTURE_BEFORE_COLOUR = {"in_domain": True, "cross_domain": False}  # adjective vs trailing phrase
TEMPLATES = {
    "in_domain": {
        "one": ("{np}{bg}.", "there is {np}{bg}.", "an image of {np}{bg}.", "a single {bare}{bg}."),
        "one_at": ("{np} {pos}{bg}.", "there is {np} {pos}{bg}.", "an image of {np} {pos}{bg}.",
                   "{np} sitting {pos}{bg}."),
        "two": ("{np1} and {np2}{bg}.", "two shapes, {np1} and {np2}{bg}.", "an image of {np1} and {np2}{bg}."),
        "two_rel": ("{np1} {rel} {np2}{bg}.", "{np1} is {rel} {np2}{bg}.", "there is {np1} {rel} {np2}{bg}.",
                    "an image of {np1} {rel} {np2}{bg}."),
    },
    "cross_domain": {
        "one": ("this picture shows {np}{bg}.", "we see {np}{bg}.", "just {np}{bg}.", "a lone {bare}{bg}."),
        "one_at": ("{pos}, {np}{bg}.", "this picture shows {np} {pos}{bg}.", "we see {np} {pos}{bg}.",
                   "{np} placed {pos}{bg}."),
        "two": ("{np1} next to {np2}{bg}.", "a pair of shapes, {np1} and {np2}{bg}.",
                "we see {np1} together with {np2}{bg}."),
        "two_rel": ("{np1} sits {rel} {np2}{bg}.", "we see {np1} {rel} {np2}{bg}.", "{np1} placed {rel} {np2}{bg}.",
                    "this picture shows {np1} {rel} {np2}{bg}."),
    },
}


@dataclass(frozen=True)
class MentionProfile:
    """Probability that a caption mentions each attribute (texture: of a textured object)."""

    colour: float
    size: float
    texture: float
    position: float  # of the single object
    pair_position: float  # of the first object of a pair
    relation: float
    background: float
    solid: float = 0.1  # factor on `texture` for saying an untextured object is solid


PROFILES = {
    # the first reference of every val/test image: the core attributes, always
    "full": MentionProfile(colour=1.0, size=1.0, texture=0.3, position=1.0, pair_position=0.0, relation=1.0,
                           background=0.15),
    "reference": MentionProfile(colour=0.9, size=0.5, texture=0.3, position=0.5, pair_position=0.1, relation=0.75,
                                background=0.15),
    "cross": MentionProfile(colour=0.85, size=0.7, texture=0.55, position=0.7, pair_position=0.25, relation=0.85,
                            background=0.35),
    # the tiny CLIP's own pairs: wordier, both styles, like alt-text rather than captions
    "pretrain": MentionProfile(colour=0.95, size=0.85, texture=0.6, position=0.85, pair_position=0.3, relation=0.9,
                               background=0.5),
}
REFERENCES_PER_IMAGE = 5
FULL_REFERENCE_SHARE = 1 / REFERENCES_PER_IMAGE  # a single caption drawn like one of the 5 references

IMAGE_SPLITS = ("clip_pretrain", "train", "val", "test")
CORPORA = ("in_domain", "cross_domain")
STYLES = ("in_domain", "cross_domain")  # the phrasing styles of WORDS
# Shares of the scene-signature space: each image split and the corpora (together) get their own part.
PARTITION = (("corpus", 0.35), ("clip_pretrain", 0.25), ("train", 0.20), ("val", 0.08), ("test", 0.12))

# Bumped whenever what build_world makes changes (images, captions, the CLIP's training), so that
# `prepare_datasets.py shapes` rebuilds a world made by older code instead of reusing it.
WORLD_VERSION = 3
CLIP_MODEL_NAME = "ShapesCLIP-Tiny"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TOKENIZER_SPECIALS = {"pad_token": "<pad>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}
R1_BLOCK = 100
R1_DEFINITIONS = {
    "i2t_r1": "validation images in blocks of 100; each image ranks the first references (every core attribute named) "
              "of its block's images; share with its own reference (or an identical text) on top",
    "i2t_r1_true": "as i2t_r1, also counting a top caption of another image that is entirely true of this image",
    "t2i_r1": "each first reference ranks its block's images; share with its own image (or one with an identical "
              "first reference) on top",
    "modality_gap": "distance between the centroids of the L2-normalised validation image features and of the "
                    "features of all their references",
    "paired_cosine": "mean cosine of each validation image and its first reference",
    "swap_test": "per attribute family: share of validation images whose image-text cosine prefers a reference naming "
                 "the family over the same reference with one word of the family swapped so that it is false of "
                 "the image (ties count half; 0.5 = blind to the family); `pairs` counts the images tested",
}


def register_model_config() -> None:
    """Make `open_clip.create_model("ShapesCLIP-Tiny")` work (idempotent)."""
    if CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def clip_model_config() -> dict:
    return json.loads((MODEL_CONFIG_DIR / f"{CLIP_MODEL_NAME}.json").read_text())


IMAGE_SIZE = clip_model_config()["vision_cfg"]["image_size"]


def alternatives(style: str, kind: str, value: str) -> tuple[str, ...]:
    """The words `style` may use for an attribute value."""
    words = WORDS[style][kind][value]
    return (words,) if isinstance(words, str) else words


def frame(style: str, kind: str, value: str) -> str:
    """Where the words of an attribute value sit in a phrase, e.g. "in the {} corner"."""
    frames = FRAMES[style].get(kind, {})
    return frames.get(value, frames.get("*", "{}"))


def _phrase(style: str, kind: str, value: str, rng: random.Random) -> str:
    return frame(style, kind, value).format(rng.choice(alternatives(style, kind, value)))


def _build_lexicon() -> dict[tuple[str, ...], tuple[str, str]]:
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

# --------------------------------------------------------------------------- seeded streams


def _stream_seed(seed: int, *names: object) -> int:
    digest = hashlib.blake2b("/".join(map(str, (seed, *names))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _unit_hash(seed: int, *names: object) -> float:
    return _stream_seed(seed, *names) / 2 ** 64


# --------------------------------------------------------------------------- scenes


def relation_between(first: dict, second: dict) -> str | None:
    """Relation of `first` to `second` from their grid cells (None unless they share a row or column)."""
    (row1, col1), (row2, col2) = CELL_OF[first["position"]], CELL_OF[second["position"]]
    if row1 == row2 and col1 != col2:
        return "left of" if col1 < col2 else "right of"
    if col1 == col2 and row1 != row2:
        return "above" if row1 < row2 else "below"
    return None


def _sample_object(rng: random.Random, position: str) -> dict:
    return {
        "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES), "size": rng.choice(list(SIZES)),
        "texture": rng.choices(list(TEXTURES), weights=list(TEXTURES.values()))[0], "position": position,
    }


def _pair_positions(rng: random.Random) -> list[str]:
    """Two cells in one row or one column, top/left first, so the relation is unambiguous."""
    line = rng.randrange(3)
    first, second = sorted(rng.sample(range(3), 2))
    if rng.random() < 0.5:
        return [GRID[line][first], GRID[line][second]]
    return [GRID[first][line], GRID[second][line]]


def sample_scene(rng: random.Random) -> dict:
    """A scene's attributes: objects (top/left first), their relation and the background."""
    if rng.random() < ONE_OBJECT_SHARE:
        objects = [_sample_object(rng, rng.choice(list(CELL_OF)))]
    else:
        positions = _pair_positions(rng)
        objects = [_sample_object(rng, positions[0])]
        second = _sample_object(rng, positions[1])
        while (second["colour"], second["shape"]) == (objects[0]["colour"], objects[0]["shape"]):
            second = _sample_object(rng, positions[1])
        objects.append(second)
    relation = relation_between(*objects) if len(objects) == 2 else None
    return {"objects": objects, "relation": relation, "background": rng.choice(list(BACKGROUNDS))}


def scene_signature(scene: dict) -> tuple:
    """What makes two scenes the same scene: background and the objects' attributes, not the pixels."""
    objects = sorted(tuple(obj[key] for key in OBJECT_ATTRIBUTES) for obj in scene["objects"])
    return (scene["background"], tuple(objects))


def scene_part(scene: dict, seed: int) -> str:
    """The part of the world (an image split, or "corpus") that owns this scene's signature."""
    point = _unit_hash(seed, "partition", repr(scene_signature(scene)))
    for part, share in PARTITION:
        point -= share
        if point < 0:
            return part
    return PARTITION[-1][0]


def sample_scene_in(part: str, rng: random.Random, seed: int) -> dict:
    while True:
        scene = sample_scene(rng)
        if scene_part(scene, seed) == part:
            return scene


# --------------------------------------------------------------------------- captions


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: dict, style: str, profile: MentionProfile, rng: random.Random) -> str:
    words = []
    if rng.random() < profile.size:
        words.append(_phrase(style, "size", obj["size"], rng))
    texture_chance = profile.texture * (profile.solid if obj["texture"] == "solid" else 1.0)
    texture = _phrase(style, "texture", obj["texture"], rng) if rng.random() < texture_chance else None
    if texture and TEXTURE_BEFORE_COLOUR[style]:
        words.append(texture)
    if rng.random() < profile.colour:
        words.append(_phrase(style, "colour", obj["colour"], rng))
    words.append(_phrase(style, "shape", obj["shape"], rng))
    if texture and not TEXTURE_BEFORE_COLOUR[style]:
        words.append(texture)
    return " ".join(words)


def describe(scene: dict, style: str, profile: MentionProfile, rng: random.Random) -> str:
    """One caption of `scene` in phrasing `style`, mentioning attributes as `profile` says."""
    templates = TEMPLATES[style]
    background = (" " + _phrase(style, "background", scene["background"], rng)
                  if rng.random() < profile.background else "")
    objects = scene["objects"]
    if len(objects) == 1:
        bare = _noun_phrase(objects[0], style, profile, rng)
        at = rng.random() < profile.position
        template = rng.choice(templates["one_at" if at else "one"])
        return template.format(np=_with_article(bare), bare=bare, bg=background,
                               pos=_phrase(style, "position", objects[0]["position"], rng) if at else "")
    first, second = rng.sample(objects, 2)
    np1 = _with_article(_noun_phrase(first, style, profile, rng))
    np2 = _with_article(_noun_phrase(second, style, profile, rng))
    if rng.random() < profile.pair_position:
        np1 += " " + _phrase(style, "position", first["position"], rng)
    relation = relation_between(first, second)
    if relation and rng.random() < profile.relation:
        template = rng.choice(templates["two_rel"])
        return template.format(np1=np1, np2=np2, rel=_phrase(style, "relation", relation, rng), bg=background)
    return rng.choice(templates["two"]).format(np1=np1, np2=np2, bg=background)


def reference_captions(scene: dict, rng: random.Random, count: int = REFERENCES_PER_IMAGE) -> list[str]:
    """`count` distinct in-domain references; the first names every core attribute."""
    captions = [describe(scene, "in_domain", PROFILES["full"], rng)]
    for _ in range(count - 1):
        for _attempt in range(20):
            caption = describe(scene, "in_domain", PROFILES["reference"], rng)
            if caption not in captions:
                break
        captions.append(caption)
    return captions


def single_caption(scene: dict, rng: random.Random) -> str:
    """One caption drawn like a random one of the references (each sentence of the in-domain corpus)."""
    profile = PROFILES["full"] if rng.random() < FULL_REFERENCE_SHARE else PROFILES["reference"]
    return describe(scene, "in_domain", profile, rng)


def pretrain_caption(scene: dict, rng: random.Random) -> str:
    return describe(scene, rng.choice(CORPORA), PROFILES["pretrain"], rng)


def corpus_sentence(scene: dict, corpus: str, rng: random.Random) -> str:
    if corpus == "cross_domain":
        return describe(scene, "cross_domain", PROFILES["cross"], rng)
    return single_caption(scene, rng)


# --------------------------------------------------------------------------- parsing and grounding

_WORD = re.compile(r"[a-z]+")


def _starts_longer_phrase(words: list[str], index: int, end: int) -> bool:
    """Whether a phrase of several words starts at `index` and runs past `end`."""
    return any(tuple(words[index:index + length]) in LEXICON
               for length in range(max(2, end - index + 1), _LONGEST_PHRASE + 1) if index + length <= len(words))


def _mentions(caption: str) -> list[tuple[str, str, int, int]]:
    """(type, value, first word, end word) of every attribute phrase, longest phrase first.

    A phrase whose last word starts a longer one gives way ("near the bottom left of a box" is a
    position "bottom" and a relation "left of", not the position "bottom left").
    """
    words = _WORD.findall(caption.lower())
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
    return [(kind, value) for kind, value, _, _ in _mentions(caption)]


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


def fluent_grounding(caption: str, scene: dict) -> tuple[float, float]:
    """(precision, recall) of one caption that disfluency cannot raise: a caption the world's grammar does not parse
    (`parses`) names nothing true (0, 0); otherwise precision counts each true attribute once over every mention, so
    saying a true thing twice lowers it ("a red circle and a red circle." scores half of "a red circle."), and recall
    is the share of the scene's attributes named truly, as in `caption_grounding`."""
    return _grounded(caption, scene)[2]


def _grounded(caption: str, scene: dict) -> tuple[dict, bool, tuple[float, float]]:
    """One caption judged once: its per-type counts (`caption_grounding`), whether it parses, and its fluent
    (precision, recall) (`fluent_grounding`)."""
    items = _chunk(_mentions(caption))
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
    """What `_noun_phrase` writes: [size] [texture] [colour] shape, the texture after the shape in styles that trail
    it ("a big red disc with stripes")."""
    size, texture, colour, shape = (_slot(style, kind) for kind in ("size", "texture", "colour", "shape"))
    if TEXTURE_BEFORE_COLOUR[style]:
        return f"(?:{size} )?(?:{texture} )?(?:{colour} )?{shape}"
    return f"(?:{size} )?(?:{colour} )?{shape}(?: {texture})?"


def _sentence_pattern(style: str) -> re.Pattern:
    """Every sentence `describe` can write in `style`, as one regular expression."""
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
    puts it (each sentence in one style), and "a" / "an" agreeing with the next word as `_with_article` writes them.
    A repeated word or phrase, a word out of place, a missing shape or a caption cut before its full stop does not
    parse."""
    text = normalized_caption(caption)
    if any((article == "an") != (first in "aeiou") for article, first in _ARTICLE.findall(text)):
        return False
    return any(pattern.fullmatch(text) for pattern in _SENTENCES.values())


# --------------------------------------------------------------------------- swapping one attribute

SWAP_FAMILIES = ("colour", "shape", "size", "position", "relation", "texture", "background")


def _values(kind: str) -> tuple[str, ...]:
    return tuple(WORDS["in_domain"][kind])


def _framed_span(words: list[str], start: int, end: int, kind: str, value: str,
                 style: str | None) -> tuple[int, int, str]:
    """The word span of a mention widened to its frame ("in the {} corner"), and the phrasing style it is in:
    `style`, or when None the style whose words and frame the caption uses (in-domain where both fit)."""
    spoken = " ".join(words[start:end])
    for candidate in (style,) if style else STYLES:
        if style is None and spoken not in alternatives(candidate, kind, value):
            continue
        prefix, _, suffix = frame(candidate, kind, value).partition("{}")
        before, after = prefix.split(), suffix.split()
        if start >= len(before) and words[start - len(before):start] == before \
                and words[end:end + len(after)] == after:
            return start - len(before), end + len(after), candidate
    return start, end, style or "in_domain"


def swap_attribute(caption: str, scene: dict, kind: str, rng: random.Random, style: str | None = None,
                   replacements: Callable[[str], Sequence[str]] | None = None) -> str | None:
    """`caption` with the phrase of one `kind` attribute (e.g. a colour) replaced by another value of that family,
    so that the caption becomes false of `scene`; everything else is left as it was (the article a/an follows the
    new word). The new phrase is in the caption's own phrasing style (`style`, or found from the caption).
    `replacements(value)` limits the values a mentioned `value` may become (default: every other of its family).
    None when the caption names no `kind` attribute or no swap makes it false."""
    matches = list(_WORD.finditer(caption.lower()))
    words = [match.group() for match in matches]
    mentions = [mention for mention in _mentions(caption) if mention[0] == kind]
    rng.shuffle(mentions)
    for _, value, start, end in mentions:
        first, last, phrasing = _framed_span(words, start, end, kind, value, style)
        candidates = replacements(value) if replacements else _values(kind)
        others = [other for other in candidates if other != value]
        rng.shuffle(others)
        for other in others:
            phrase = _phrase(phrasing, kind, other, rng)
            head = caption[:matches[first].start()]
            article = re.search(r"\b(an?) $", head)
            if article:  # "a red" -> "an orange"
                head = head[:article.start()] + _with_article(phrase)[:-len(phrase)]
            swapped = head + phrase + caption[matches[last - 1].end():]
            if not _is_true_of(swapped, scene):
                return swapped
    return None


def swap_pairs(references: Sequence[Sequence[str]], scenes: Sequence[dict], seed: int = 0,
               families: Sequence[str] = SWAP_FAMILIES) -> dict[str, list[tuple[int, str, str]]]:
    """For each image and attribute family: (image index, a reference naming the family, that reference with one
    attribute of the family swapped so that it is false of the image). One reference is drawn per image and family
    (seeded) among those naming the family; images with none (a single object has no relation) are left out."""
    pairs: dict[str, list[tuple[int, str, str]]] = {family: [] for family in families}
    for index, (captions, scene) in enumerate(zip(references, scenes)):
        for family in families:
            rng = random.Random(_stream_seed(seed, "swap", index, family))
            naming = [caption for caption in captions if any(kind == family for kind, _ in parse_attributes(caption))]
            rng.shuffle(naming)
            for caption in naming:
                swapped = swap_attribute(caption, scene, family, rng)
                if swapped is not None:
                    pairs[family].append((index, caption, swapped))
                    break
    return pairs


def swap_test(image_features: torch.Tensor, encode_text: Callable[[list[str]], torch.Tensor],
              references: Sequence[Sequence[str]], scenes: Sequence[dict], seed: int = 0,
              families: Sequence[str] = SWAP_FAMILIES) -> dict:
    """What the CLIP sees, per attribute family: how often the image-text cosine prefers a true reference over the
    same reference with one attribute of the family swapped (`swap_pairs`). A tie counts half, so a CLIP blind to
    a family scores 0.5 on it. `image_features` [N, D] are L2-normalised; `encode_text` gives L2-normalised features.

    Returns {family: share right, ..., "pairs": {family: count}, "min": the lowest share}.
    """
    result, counts = {}, {}
    for family, pairs in swap_pairs(references, scenes, seed, families).items():
        counts[family] = len(pairs)
        if not pairs:
            result[family] = None
            continue
        index = torch.tensor([image for image, _, _ in pairs])
        true = encode_text([caption for _, caption, _ in pairs])
        false = encode_text([swapped for _, _, swapped in pairs])
        margin = (image_features[index] * (true - false)).sum(1)
        result[family] = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
    shares = [share for share in result.values() if share is not None]
    return {**result, "pairs": counts, "min": min(shares) if shares else None}


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


# --------------------------------------------------------------------------- rendering

_TEXTURE_DARKNESS = {"striped": 0.35, "dotted": 0.3}


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= radius ** 2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * radius) & (np.abs(dy) <= 0.85 * radius)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * radius
    if shape == "triangle":  # apex up, base at 0.8 radius below the centre
        return (dy >= -radius) & (dy <= 0.8 * radius) & (np.abs(dx) <= (dy + radius) / 1.8)
    if shape == "cross":
        arm = 0.33 * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape '{shape}'")


def _paint_object(image: np.ndarray, obj: dict, rng: np.random.Generator, grid: tuple) -> dict:
    """Paint one object (jittered centre, radius and colour) and return where and how it was drawn."""
    xx, yy, ix, iy = grid
    size, cell = image.shape[0], image.shape[0] / 3
    row, col = CELL_OF[obj["position"]]
    radius = SIZES[obj["size"]] * cell * rng.uniform(0.93, 1.07)
    centre = [float(np.clip((index + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell, radius + 0.5, size - radius - 0.5))
              for index in (col, row)]
    colour = np.clip(np.array(COLOURS[obj["colour"]]) + rng.uniform(-14, 14, 3), 0, 255)
    mask = _shape_mask(obj["shape"], xx - centre[0], yy - centre[1], radius)
    if obj["texture"] == "hollow":
        mask &= ~_shape_mask(obj["shape"], xx - centre[0], yy - centre[1], radius - max(1.6, 0.28 * radius))
    image[mask] = colour
    if obj["texture"] == "striped":
        image[mask & (((ix + iy) // 2) % 2 == 0)] = colour * _TEXTURE_DARKNESS["striped"]
    elif obj["texture"] == "dotted":
        image[mask & (ix % 3 == 1) & (iy % 3 == 1)] = colour * _TEXTURE_DARKNESS["dotted"]
    return {"center": [round(c, 2) for c in centre], "radius": round(float(radius), 2),
            "rgb": [int(round(c)) for c in colour]}


def _paint_distractors(image: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Small specks in object colours, white or black: clutter no caption mentions."""
    palette = list(COLOURS.values()) + [(240, 240, 240), (10, 10, 10)]
    specks = []
    for _ in range(rng.choice(len(DISTRACTOR_COUNTS), p=DISTRACTOR_COUNTS)):
        x, y = (int(v) for v in rng.integers(0, image.shape[0] - 1, 2))
        colour = np.clip(np.array(palette[rng.integers(len(palette))]) + rng.uniform(-14, 14, 3), 0, 255)
        image[y:y + 2, x:x + 2] = colour
        specks.append({"xy": [x, y], "rgb": [int(round(c)) for c in colour]})
    return specks


def render_scene(scene: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict]:
    """RGB uint8 image [size, size, 3] of `scene`, and the scene completed with its drawn layout."""
    iy, ix = np.mgrid[0:size, 0:size]
    grid = (ix + 0.5, iy + 0.5, ix, iy)
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float64) + rng.normal(0, 6, 3)
    slope = rng.uniform(-16, 16, 2)
    shade = slope[0] * (grid[0] / size - 0.5) + slope[1] * (grid[1] / size - 0.5)
    image = base[None, None, :] + shade[:, :, None]
    distractors = _paint_distractors(image, rng)
    layouts = [_paint_object(image, obj, rng, grid) for obj in scene["objects"]]
    image += rng.normal(0, 7, image.shape)
    drawn = {**scene, "objects": [{**obj, **layout} for obj, layout in zip(scene["objects"], layouts)],
             "distractors": distractors}
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), drawn


# --------------------------------------------------------------------------- writing the raw world


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def image_id(split: str, index: int) -> str:
    return f"shapes_{split}_{index:06d}"


def build_image_split(raw_dir: Path, split: str, count: int, seed: int,
                      caption_fn: Callable[[dict, random.Random], list[str]]) -> tuple[dict, np.ndarray, dict]:
    """Sample, render and write one image split with its captions and scenes; returns (captions, pixels, scenes)."""
    scene_rng = random.Random(_stream_seed(seed, split, "scenes"))
    caption_rng = random.Random(_stream_seed(seed, split, "captions"))
    pixel_rng = np.random.default_rng(_stream_seed(seed, split, "pixels"))
    folder = raw_dir / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    scenes, captions, annotations = {}, {}, []
    pixels = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index in range(count):
        key = image_id(split, index)
        scene = sample_scene_in(split, scene_rng, seed)
        pixels[index], scenes[key] = render_scene(scene, pixel_rng)
        Image.fromarray(pixels[index]).save(folder / f"{key}.png", format="PNG")
        captions[key] = caption_fn(scene, caption_rng)
        first_id = len(annotations)
        annotations.extend({"image_id": key, "id": first_id + n, "caption": caption}
                           for n, caption in enumerate(captions[key]))
    _write_json(raw_dir / "annotations" / f"{split}_caption.json", annotations)
    _write_json(raw_dir / "scenes" / f"{split}.json", scenes)
    return captions, pixels, scenes


def build_corpus(raw_dir: Path, corpus: str, count: int, seed: int) -> list[str]:
    """`count` distinct sentences about corpus-only scenes, one a line; their scenes beside them."""
    scene_rng = random.Random(_stream_seed(seed, corpus, "scenes"))
    caption_rng = random.Random(_stream_seed(seed, corpus, "captions"))
    sentences, scenes, seen = [], [], set()
    for _attempt in range(50 * count):
        if len(sentences) == count:
            break
        scene = sample_scene_in("corpus", scene_rng, seed)
        sentence = corpus_sentence(scene, corpus, caption_rng)
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
            scenes.append(scene)
    else:
        raise RuntimeError(f"the grammar gave only {len(sentences)} distinct {corpus} sentences, not {count}")
    path = raw_dir / "corpus" / f"{corpus}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(sentence + "\n" for sentence in sentences))
    _write_json(raw_dir / "corpus" / f"{corpus}_scenes.json", scenes)
    return sentences


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(sentences: Iterable[str], out_dir: str | os.PathLike):
    """Word-level tokenizer: lowercase, punctuation split off, <pad>=0, <|endoftext|>=1 (bos = eos), <unk>=2.

    Adds no bos/eos by itself; decode(skip_special_tokens=True) gives back the sentence.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [TOKENIZER_SPECIALS["pad_token"], TOKENIZER_SPECIALS["eos_token"], TOKENIZER_SPECIALS["unk_token"]]
    backend = Tokenizer(models.WordLevel(unk_token=TOKENIZER_SPECIALS["unk_token"]))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, no space before punctuation
    backend.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=TOKENIZER_SPECIALS["eos_token"], add_bos_token=False,
        add_eos_token=False, model_max_length=64, **TOKENIZER_SPECIALS)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# --------------------------------------------------------------------------- the tiny CLIP


# The vision tower learns the scene before it meets text (see `ClipTraining.tagging_steps`): per grid cell the
# colour, shape, size and texture of the object there, and the background. The tag set is the world's, not the data's.
SCENE_TAGS = (*[(position, kind, value) for position in CELL_OF for kind in ("colour", "shape", "size", "texture")
                for value in _values(kind)], *[("background", value) for value in BACKGROUNDS])


@dataclass(frozen=True)
class ClipTraining:
    steps: int = 2000
    batch_size: int = 96
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    # Before the contrastive steps the vision tower is trained this many steps to tag each scene (`SCENE_TAGS`,
    # a multi-label head dropped afterwards), as LiT and many CLIPs start from a supervised backbone: under the
    # contrastive loss alone it learns shape and texture only as far as the captions' other words leave images apart
    # (docs/shapes_world.md has what was measured).
    tagging_steps: int = 2000
    # NegCLIP-style hard negatives: per image, this many of its caption's variants with one attribute swapped (false
    # of it) join the texts every image must not pick. 0 turns them off (plain CLIP loss).
    hard_negatives: int = 6
    negatives_per_caption: int = 8  # swaps prepared per caption; each step draws `hard_negatives` among them
    # A prepared swap's family is drawn in proportion to these weights (1 for the others): the families a contrastive
    # batch rarely tells apart by itself (two captions of a batch seldom differ only in a shape) get more.
    negative_family_weights: tuple[tuple[str, float], ...] = (("shape", 3.0), ("texture", 3.0), ("relation", 3.0))
    # Each image also ranks its caption against its own hard negatives alone (a softmax over 1 + hard_negatives),
    # this loss added with this weight: in the batch's softmax a minimal pair is one text among ~200 and its gradient
    # fades once the easy ones are sorted.
    pair_loss_weight: float = 1.0
    # The text tower stays at its random start for this share of the steps (then warms up and decays like the
    # vision tower): the vision tower first learns to meet fixed text features, which keeps the towers' cones
    # apart (a larger modality gap, as real CLIPs have).
    text_frozen_share: float = 0.5

    @property
    def text_frozen_steps(self) -> int:
        return int(self.text_frozen_share * self.steps)


# The world's CLIP, two ways. "sighted": the vision tower first tags scenes, then contrastive training with hard
# negatives; it sees nearly every attribute the grounding metric scores, so its reward is close to the metric itself.
# "plain": contrastive training on image-caption pairs only, as real CLIPs are trained; like them it misses part of
# what captions say (swapped words, relations, rarely named attributes) -- the world where a second reward can matter.
CLIP_RECIPES = {
    "sighted": ClipTraining(),
    "plain": ClipTraining(tagging_steps=0, hard_negatives=0, pair_loss_weight=0.0),
}


def new_tiny_clip(model_cfg: dict | None = None) -> open_clip.CLIP:
    """A freshly initialised ShapesCLIP-Tiny (from `model_configs/`, or `model_cfg`), with open_clip's default
    preprocessing attached. It is trained from scratch on purpose, so it is built from its config directly:
    `open_clip.create_model` would look for pretrained weights and warn that none were loaded."""
    model = open_clip.CLIP(**(model_cfg or clip_model_config()))
    open_clip.set_model_preprocess_cfg(model, {
        "size": model.visual.image_size, "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    return model


def _pixel_tensor(pixels: np.ndarray, preprocess_cfg: dict) -> torch.Tensor:
    """What open_clip's eval preprocess makes of these images (they already have the model's size)."""
    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std


def _is_text(name: str) -> bool:
    return not name.startswith("visual.") and name != "logit_scale"


def _optimizer(model: torch.nn.Module, settings: ClipTraining) -> torch.optim.Optimizer:
    # As in open_clip's own training: no weight decay on 1-D parameters (norms, biases) nor on the temperature.
    # Parameter groups: vision (and temperature), then text, each with and without decay.
    groups = []
    for text in (False, True):
        params = [(n, p) for n, p in model.named_parameters() if _is_text(n) == text]
        decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
        rest = [p for n, p in params if not (p.ndim >= 2 and "logit_scale" not in n)]
        groups += [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, fused=True)


def _cosine_with_warmup(settings: ClipTraining, text: bool = False) -> Callable[[int], float]:
    """Linear warm-up then cosine decay; the text tower waits `text_frozen_steps` and then warms up."""
    start = settings.text_frozen_steps if text else 0

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        if step - start < settings.warmup_steps:
            return (step - start + 1) / settings.warmup_steps
        progress = (step - start - settings.warmup_steps) / max(1, settings.steps - start - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _batches(num_images: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of image indices, a fresh permutation each epoch."""
    batch_size = min(batch_size, num_images)
    while True:
        order = torch.randperm(num_images, generator=generator)
        for start in range(0, num_images - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def hard_negative_captions(caption: str, scene: dict, count: int, rng: random.Random,
                           family_weights: dict[str, float] | None = None) -> list[str]:
    """`count` false variants of a true caption, each with one attribute swapped; each variant's family is drawn
    among those the caption names and a swap can falsify, in proportion to `family_weights` (1 where not given).
    The caption itself stands in when no swap makes it false."""
    weights = family_weights or {}
    families = [family for family in sorted({kind for kind, _ in parse_attributes(caption)})
                if _hard_swap(caption, scene, family, rng) is not None]
    if not families:
        return [caption]
    drawn = rng.choices(families, [weights.get(family, 1.0) for family in families], k=count)
    return [_hard_swap(caption, scene, family, rng) for family in drawn]


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _hard_swap(caption: str, scene: dict, family: str, rng: random.Random) -> str | None:
    """A swap of one `family` attribute that makes the caption false. Half the relation swaps make it the opposite
    ("X left of Y" -> "X right of Y", the same as NegCLIP's swapped noun phrases), which only the words' order tells
    apart, and half any false relation: a CLIP trained on any false relation ("above": told by the objects' positions
    alone) stayed blind to direction (swap test 0.99 on those, 0.56 on opposites), on opposites only it learned
    direction (0.76) but forgot some of the rest (0.95)."""
    if family == "relation" and rng.random() < 0.5:
        return swap_attribute(caption, scene, family, rng, replacements=lambda value: (OPPOSITE[value],))
    return swap_attribute(caption, scene, family, rng)


def scene_tags(scenes: Sequence[dict]) -> torch.Tensor:
    """Multi-hot [N, len(SCENE_TAGS)]: per scene, each object's attributes at its grid cell, and the background."""
    index = {tag: n for n, tag in enumerate(SCENE_TAGS)}
    tags = torch.zeros(len(scenes), len(SCENE_TAGS))
    for row, scene in enumerate(scenes):
        tags[row, index["background", scene["background"]]] = 1
        for obj in scene["objects"]:
            for kind in ("colour", "shape", "size", "texture"):
                tags[row, index[obj["position"], kind, obj[kind]]] = 1
    return tags


def train_scene_tagger(visual: torch.nn.Module, images: torch.Tensor, scenes: Sequence[dict],
                       settings: ClipTraining, generator: torch.Generator, progress: bool = True) -> list[float]:
    """Train the vision tower (in place) to tag each image's scene (`scene_tags`) through a linear head that is
    dropped afterwards; returns the loss of every step. Same optimiser, warm-up and cosine decay as the CLIP's."""
    from tqdm.auto import tqdm

    tags = scene_tags(scenes)
    head = torch.nn.Linear(visual.output_dim, tags.shape[1])
    decay = [p for p in (*visual.parameters(), *head.parameters()) if p.ndim >= 2]
    rest = [p for p in (*visual.parameters(), *head.parameters()) if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.learning_rate, fused=True)
    tagging = replace(settings, steps=settings.tagging_steps, text_frozen_share=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(tagging))
    batches, losses = _batches(len(tags), settings.batch_size, generator), []
    visual.train()
    for _step in tqdm(range(settings.tagging_steps), desc="scene tags", unit="step", disable=not progress,
                      dynamic_ncols=True, mininterval=1.0):
        index = next(batches)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(visual(images[index])), tags[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


class _CaptionPicker:
    """Tokenized captions (and their hard negatives); picks one caption of each image of a batch at random."""

    def __init__(self, captions: Sequence[Sequence[str]], tokenizer: Callable, generator: torch.Generator,
                 negatives: Sequence[Sequence[Sequence[str]]] | None = None, negatives_per_image: int = 1):
        owner = torch.tensor([index for index, image_captions in enumerate(captions) for _ in image_captions])
        self.first = torch.searchsorted(owner, torch.arange(len(captions)))
        self.counts = torch.bincount(owner, minlength=len(captions))
        self.tokens = tokenizer([caption for image_captions in captions for caption in image_captions])
        self.generator = generator
        self.negatives, self.per_image = None, negatives_per_image
        if negatives is not None:  # per caption a list of false variants, padded to one count by repetition
            width = max(len(found) for image_negatives in negatives for found in image_negatives)
            flat = [found[n % len(found)] for image_negatives in negatives for found in image_negatives
                    for n in range(width)]
            self.negatives = tokenizer(flat).view(len(self.tokens), width, -1)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        offsets = torch.rand(len(images), generator=self.generator) * self.counts[images]
        chosen = self.first[images] + offsets.long()
        if self.negatives is None:
            return self.tokens[chosen], None
        which = torch.randint(self.negatives.shape[1], (len(images), self.per_image), generator=self.generator)
        return self.tokens[chosen], self.negatives[chosen[:, None], which].flatten(0, 1)


def _contrastive_loss(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor | None,
                      scale: torch.Tensor, pair_loss_weight: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on L2-normalised features [B, D]; with `negatives` [B * K, D] (K false captions of
    each image, image-major) each image also ranks those captions (NegCLIP), while the captions still rank the
    images only, and with `pair_loss_weight` each image ranks its caption against its own K negatives alone."""
    labels = torch.arange(len(image))
    texts = text if negatives is None else torch.cat([text, negatives])
    per_image = scale * image @ texts.T
    per_text = scale * text @ image.T
    loss = (torch.nn.functional.cross_entropy(per_image, labels)
            + torch.nn.functional.cross_entropy(per_text, labels)) / 2
    if negatives is None or not pair_loss_weight:
        return loss
    own = torch.cat([(image * text).sum(1, keepdim=True),                                   # [B, 1]
                     torch.einsum("bd,bkd->bk", image, negatives.view(len(image), -1, image.shape[1]))], 1)
    return loss + pair_loss_weight * torch.nn.functional.cross_entropy(scale * own, torch.zeros_like(labels))


def train_tiny_clip(pixels: np.ndarray, captions: Sequence[Sequence[str]], settings: ClipTraining = ClipTraining(),
                    seed: int = 0, scenes: Sequence[dict] | None = None, model_cfg: dict | None = None,
                    progress: bool = True) -> tuple[torch.nn.Module, list[float]]:
    """Train ShapesCLIP-Tiny from scratch on (image, one of its captions) pairs. When the images' `scenes` are
    given, the vision tower first learns to tag them (`settings.tagging_steps`, `train_scene_tagger`) and swapped
    captions join the contrastive loss as hard negatives (`settings.hard_negatives`; NegCLIP, Yuksekgonul et al.
    2023), also ranked against each image's caption alone (`settings.pair_loss_weight`). The text tower is held at
    its random start for the first `settings.text_frozen_share` of the contrastive steps.

    Returns the model (eval mode) and the contrastive loss of every step. `progress` shows bars with the loss.
    """
    from tqdm.auto import tqdm

    from clip_scstclipcap import CausalTextTower

    torch.manual_seed(seed)
    # channels_last makes the small convolutions of the vision tower faster on CPU (docs/measurements.md)
    model = new_tiny_clip(model_cfg).to(memory_format=torch.channels_last)
    images = _pixel_tensor(pixels, model.visual.preprocess_cfg).contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    negatives = None
    if settings.tagging_steps and scenes is not None:
        train_scene_tagger(model.visual, images, scenes, settings, generator, progress)
    if settings.hard_negatives and scenes is not None:
        rng, weights = random.Random(_stream_seed(seed, "hard negatives")), dict(settings.negative_family_weights)
        negatives = [[hard_negative_captions(caption, scene, settings.negatives_per_caption, rng, weights)
                      for caption in image_captions] for image_captions, scene in zip(captions, scenes)]
    # on the batch's caption positions, not the whole context, where the tower allows it: the same features, faster
    text_tower = CausalTextTower.of(model)
    encode_text = model.encode_text if text_tower is None else text_tower.encode
    pick_captions = _CaptionPicker(captions, open_clip.get_tokenizer(CLIP_MODEL_NAME), generator, negatives,
                                   settings.hard_negatives)
    batches = _batches(len(captions), settings.batch_size, generator)
    optimizer = _optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [_cosine_with_warmup(settings, text)
                                                             for text in (False, False, True, True)])
    max_scale, losses = math.log(100), []
    model.train()
    with tqdm(range(settings.steps), desc="tiny CLIP", unit="step", disable=not progress, dynamic_ncols=True,
              mininterval=1.0) as bar:
        for step in bar:
            index = next(batches)
            tokens, negative_tokens = pick_captions(index)
            with torch.set_grad_enabled(step >= settings.text_frozen_steps):  # a frozen tower needs no gradient
                texts = torch.nn.functional.normalize(encode_text(
                    tokens if negative_tokens is None else torch.cat([tokens, negative_tokens])), dim=-1)
            text, negative = (texts, None) if negative_tokens is None else (texts[:len(index)], texts[len(index):])
            loss = _contrastive_loss(model.encode_image(images[index], normalize=True), text, negative,
                                     model.logit_scale.exp(), settings.pair_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)  # as open_clip's training does
            losses.append(loss.item())
            if step % 20 == 0 or step == settings.steps - 1:
                bar.set_postfix(loss=f"{_mean(losses[-20:]):.3f}", scale=f"{model.logit_scale.exp().item():.0f}")
    return model.eval(), losses


def _is_true_of(caption: str, scene: dict) -> bool:
    return all(c["true"] == c["mentioned"] for c in caption_grounding(caption, scene).values())


def retrieval_and_gap(image_features: torch.Tensor, first_reference_features: torch.Tensor,
                      first_references: Sequence[str], reference_features: torch.Tensor,
                      scenes: Sequence[dict], block: int = R1_BLOCK) -> dict:
    """Retrieval R@1 in blocks of `block` images, and the modality gap, from L2-normalised features.

    i2t R@1: in each block of `block` consecutive test images, each image ranks the first references
    of the block's images (the first reference names every core attribute); a hit is its own first
    reference on top (or a textually identical one: equal texts have equal features). `i2t_r1_true`
    also counts as a hit a caption of another image that is entirely true of this image (the block
    may hold two images with the same description). t2i R@1 is the converse of `i2t_r1`. Modality
    gap: the distance between the centroids of the image features and of all reference features.
    """
    hits_i2t, hits_true, hits_t2i = [], [], []
    for start in range(0, len(image_features) - block + 1, block):
        span = slice(start, start + block)
        similarity = image_features[span] @ first_reference_features[span].T
        texts, block_scenes = list(first_references[span]), list(scenes[span])
        best_text, best_image = similarity.argmax(1).tolist(), similarity.argmax(0).tolist()
        hits_i2t += [texts[best] == texts[own] for own, best in enumerate(best_text)]
        hits_true += [_is_true_of(texts[best], block_scenes[own]) for own, best in enumerate(best_text)]
        hits_t2i += [texts[best] == texts[own] for own, best in enumerate(best_image)]
    gap = (image_features.mean(0) - reference_features.mean(0)).norm()
    paired = (image_features * first_reference_features).sum(1).mean()
    return {"i2t_r1": _mean([float(h) for h in hits_i2t]), "i2t_r1_true": _mean([float(h) for h in hits_true]),
            "t2i_r1": _mean([float(h) for h in hits_t2i]), "r1_images": len(hits_i2t), "r1_block": block,
            "modality_gap": float(gap), "paired_cosine": float(paired)}


def split_references(raw_dir: Path, split: str) -> dict[str, list[str]]:
    """{image id: its references} of a split, read back from its OSCAR-style caption file."""
    references: dict[str, list[str]] = {}
    for row in json.loads((Path(raw_dir) / "annotations" / f"{split}_caption.json").read_text()):
        references.setdefault(row["image_id"], []).append(row["caption"])
    return references


def evaluate_saved_clip(raw_dir: Path, references: dict[str, list[str]], split: str = "val") -> dict:
    """Measure the world's saved CLIP on a split (validation: every choice made from these figures must leave test
    unread), loaded through `local-dir:` exactly as feature extraction loads it; `references` maps each image id of
    the split to its references."""
    from clip_scstclipcap import encode_images, encode_texts, load_clip

    model, preprocess, tokenizer = load_clip(f"local-dir:{raw_dir / 'clip'}")
    scenes = json.loads((raw_dir / "scenes" / f"{split}.json").read_text())
    ids = list(references)
    images = encode_images(model, preprocess, [str(raw_dir / "images" / split / f"{key}.png") for key in ids])
    firsts = [references[key][0] for key in ids]
    everything = [caption for key in ids for caption in references[key]]
    metrics = retrieval_and_gap(images, encode_texts(model, tokenizer, firsts), firsts,
                                encode_texts(model, tokenizer, everything), [scenes[key] for key in ids],
                                min(R1_BLOCK, len(ids)))
    metrics["swap_test"] = swap_test(images, lambda texts: encode_texts(model, tokenizer, texts),
                                     [references[key] for key in ids], [scenes[key] for key in ids])
    return metrics


def save_tiny_clip(model: torch.nn.Module, clip_dir: Path) -> str:
    from clip_scstclipcap import save_local_clip

    return save_local_clip(model, clip_model_config(), clip_dir)


# Trained world CLIPs ship with the code, one folder per recipe (`world_clips/<recipe>/`: the open_clip local-dir
# files and `training.json`, what trained them): training one takes minutes on a CPU, and a CPU's arithmetic moves
# its last bits, so a shipped one gives every machine the same CLIP. The plain one is rebuilt by
#   python prepare_datasets.py shapes --clip plain --retrain_clip --overwrite
#   cp -r data/shapes/raw/clip dataprep/world_clips/plain
SHIPPED_CLIPS = Path(__file__).resolve().parent / "world_clips"
CLIP_RECORD = "training.json"


def clip_training_record(clip: str, settings: ClipTraining, seed: int, num_threads: int, pixels: np.ndarray,
                         captions: dict[str, list[str]]) -> dict:
    """What decides a trained world CLIP's weights: recipe, settings, seed, thread count, pretraining data."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
    digest.update(json.dumps(captions, sort_keys=True).encode())
    record = {"recipe": clip, "seed": seed, "num_threads": num_threads, "world_version": WORLD_VERSION,
              "training": asdict(settings), "pretraining_data_sha256": digest.hexdigest()}
    return json.loads(json.dumps(record))  # as a record file reads back (tuples as lists)


def shipped_clip(record: dict, shipped_clips: Path) -> Path | None:
    """The shipped CLIP folder trained exactly as `record` says (every field equal), or None."""
    folder = shipped_clips / record["recipe"]
    if not (folder / CLIP_RECORD).is_file():
        return None
    shipped = json.loads((folder / CLIP_RECORD).read_text())
    return folder if all(shipped.get(name) == value for name, value in record.items()) else None


def _train_and_save_clip(raw_dir: Path, pixels: dict, captions: dict, scenes: dict, settings: ClipTraining,
                         seed: int, num_threads: int, progress: bool, log: Callable[[str], None]) -> dict:
    """Train the world's CLIP into `raw_dir/clip`; returns its first and final loss."""
    log(f"== training the tiny CLIP ({CLIP_MODEL_NAME}) from scratch on {len(pixels['clip_pretrain'])} clip_pretrain "
        "pairs: " + (f"{settings.tagging_steps} steps tagging scenes (vision tower), " if settings.tagging_steps else "")
        + f"{settings.steps} contrastive steps of {settings.batch_size}, "
        + (f"{settings.hard_negatives} hard negatives (one attribute swapped) per image, "
           if settings.hard_negatives else "") + f"{num_threads} thread(s)")
    clock = time.perf_counter()
    model, losses = train_tiny_clip(pixels["clip_pretrain"], list(captions["clip_pretrain"].values()), settings,
                                    seed, list(scenes["clip_pretrain"].values()), progress=progress)
    save_tiny_clip(model, raw_dir / "clip")
    result = {"first_loss": losses[0] if losses else None, "final_loss": _mean(losses[-max(1, len(losses) // 20):])}
    log(f"   loss {result['first_loss']:.3f} -> {result['final_loss']:.3f} in {time.perf_counter() - clock:.0f} s; "
        f"saved as an open_clip local-dir: folder {raw_dir / 'clip'}")
    return result


# --------------------------------------------------------------------------- the whole world

_OUTPUTS = ("images", "annotations", "corpus", "scenes", "clip", "tokenizer", "world.json")


def _prepare_dir(raw_dir: Path, overwrite: bool) -> None:
    present = [name for name in _OUTPUTS if (raw_dir / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{raw_dir} already holds a shapes world ({', '.join(present)}); "
                              f"pass overwrite=True (--overwrite) to rebuild it")
    for name in present:
        path = raw_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    raw_dir.mkdir(parents=True, exist_ok=True)


def _build_image_splits(raw_dir: Path, seed: int, sizes: dict, pretrain_captions: int,
                        log: Callable[[str], None]) -> tuple[dict, dict, dict]:
    def pretrain(scene, rng):
        return [pretrain_caption(scene, rng) for _ in range(pretrain_captions)]

    # train carries 5 references like val/test: the unsupervised stages use only its images (CLIP features),
    # the supervised upper bound trains on every reference of every image, as ClipCap does on COCO.
    caption_fns = {"clip_pretrain": pretrain, "train": reference_captions, "val": reference_captions,
                   "test": reference_captions}
    captions, pixels, scenes = {}, {}, {}
    for split in IMAGE_SPLITS:
        per_image = pretrain_captions if split == "clip_pretrain" else REFERENCES_PER_IMAGE
        log(f"   {split}: {sizes[split]} images, {per_image} caption(s) each")
        captions[split], pixels[split], scenes[split] = build_image_split(raw_dir, split, sizes[split], seed,
                                                                          caption_fns[split])
    return captions, pixels, scenes


# What a real CLIP sees, to compare the world's with: OpenAI ViT-B/32 on SugarCrepe (Hsieh et al., 2023), share of
# images preferring the true caption over a hard negative; its modality gap on COCO (Liang et al., 2022).
VIT_B32_REFERENCE = {"replaced object": 0.91, "replaced attribute": 0.80, "replaced relation": 0.69,
                     "swapped words": "0.61-0.64", "modality gap": 0.82}


def clip_report(metrics: dict) -> list[str]:
    """The tiny CLIP's validation figures as lines for a reader: retrieval, the modality gap and the swap test,
    beside ViT-B/32's."""
    lines = [f"retrieval R@1 (blocks of {metrics['r1_block']} validation images): image->text {metrics['i2t_r1']:.3f} "
             f"({metrics['i2t_r1_true']:.3f} counting captions true of the image), text->image "
             f"{metrics['t2i_r1']:.3f}",
             f"modality gap {metrics['modality_gap']:.3f} (distance of the image and text centroids; ViT-B/32 on "
             f"COCO ~0.8), paired cosine {metrics['paired_cosine']:.3f}"]
    swap = metrics.get("swap_test")
    if swap:
        shares = ", ".join(f"{family} {swap[family]:.3f}" for family in SWAP_FAMILIES if swap.get(family) is not None)
        lines.append(f"swap test (true reference preferred over one attribute swapped; 0.5 = blind): {shares}")
    lines.append("a real CLIP, for comparison (OpenAI ViT-B/32 on SugarCrepe; gap on COCO): "
                 + ", ".join(f"{name} {value}" for name, value in VIT_B32_REFERENCE.items()))
    return lines


def build_world(raw_dir: str | os.PathLike, seed: int = 0, *, n_clip_pretrain: int = 10000,
                pretrain_captions_per_image: int = 1, n_train: int = 4000, n_val: int = 250, n_test: int = 500,
                n_in_domain: int = 8000, n_cross_domain: int = 8000, clip: str = "sighted",
                clip_training: ClipTraining | None = None, num_threads: int = 1, overwrite: bool = False,
                retrain_clip: bool = False, shipped_clips: str | os.PathLike = SHIPPED_CLIPS,
                progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Generate, render and write the shapes world under `raw_dir`, train its tiny CLIP and tokenizer.

    `clip` names the CLIP's recipe (`CLIP_RECIPES`: "sighted" or "plain"); `clip_training` replaces it outright.
    A CLIP shipped in `shipped_clips` (`shipped_clip`) trained by the same recipe, seed and thread count on the same
    pretraining images and captions is copied instead of trained, unless `retrain_clip`.

    Deterministic for a seed: captions, JSON, images, tokenizer and, for a given `num_threads`, the
    CLIP (CPU results depend on the thread count, so it is fixed, not taken from the machine). One
    thread does not fight other jobs for the cores; more is faster on an idle machine.
    Says what it does through `log` (one line a step); `progress` shows the CLIP training's progress bar.
    Returns the summary also written to `world.json`.
    """
    if clip not in CLIP_RECIPES:
        raise ValueError(f"clip must be one of {sorted(CLIP_RECIPES)}, got {clip!r}")
    clip_training = clip_training or CLIP_RECIPES[clip]
    raw_dir = Path(raw_dir)
    _prepare_dir(raw_dir, overwrite)
    sizes = {"clip_pretrain": n_clip_pretrain, "train": n_train, "val": n_val, "test": n_test}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    timings, clock = {}, time.perf_counter()
    try:
        log(f"== shapes world (seed {seed}) in {raw_dir}: drawing scenes, rendering {IMAGE_SIZE}x{IMAGE_SIZE} "
            f"images, writing captions")
        captions, pixels, scenes = _build_image_splits(raw_dir, seed, sizes, pretrain_captions_per_image, log)
        corpora = {}
        for corpus, count in (("in_domain", n_in_domain), ("cross_domain", n_cross_domain)):
            log(f"   corpus {corpus}: {count} sentences about scenes of no image split")
            corpora[corpus] = build_corpus(raw_dir, corpus, count, seed)
        timings["scenes_images_captions_s"], clock = time.perf_counter() - clock, time.perf_counter()
        annotated = [c for split in ("train", "val", "test") for caps in captions[split].values() for c in caps]
        tokenizer = train_tokenizer(corpora["in_domain"] + corpora["cross_domain"] + annotated,
                                    raw_dir / "tokenizer")
        log(f"   word-level tokenizer for the captioner: {len(tokenizer)} tokens")
        timings["tokenizer_s"], clock = time.perf_counter() - clock, time.perf_counter()
        record = clip_training_record(clip, clip_training, seed, num_threads, pixels["clip_pretrain"],
                                      captions["clip_pretrain"])
        shipped = None if retrain_clip else shipped_clip(record, Path(shipped_clips))
        if shipped is not None:
            log(f"== the tiny CLIP ({CLIP_MODEL_NAME}) shipped in {shipped}: trained by this recipe, seed and thread "
                f"count on these clip_pretrain pairs (`--retrain-clip` trains it again)")
            shutil.copytree(shipped, raw_dir / "clip")
            record = json.loads((shipped / CLIP_RECORD).read_text())
        else:
            record.update(_train_and_save_clip(raw_dir, pixels, captions, scenes, clip_training, seed, num_threads,
                                               progress, log))
            _write_json(raw_dir / "clip" / CLIP_RECORD, record)
        timings["clip_training_s"], clock = time.perf_counter() - clock, time.perf_counter()
        log("== measuring the tiny CLIP on the validation split (loaded back from its folder)")
        metrics = evaluate_saved_clip(raw_dir, captions["val"], "val")
        timings["clip_evaluation_s"] = time.perf_counter() - clock
    finally:
        torch.set_num_threads(previous_threads)
    summary = _summary(seed, sizes, pretrain_captions_per_image, corpora, len(tokenizer), record, metrics, timings)
    summary["clip"]["source"] = "shipped" if shipped is not None else "trained"
    summary["num_threads"] = num_threads
    summary["clip"]["recipe"] = clip
    _write_json(raw_dir / "world.json", summary)
    for line in clip_report(metrics):
        log(f"   {line}")
    log(f"   shapes world built in {summary['timings']['total_s']:.0f} s")
    return summary


def _summary(seed, sizes, pretrain_captions, corpora, vocab_size, record, metrics, timings) -> dict:
    return {
        "version": WORLD_VERSION,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "images": dict(sizes),
        "captions_per_image": {"clip_pretrain": pretrain_captions, "train": REFERENCES_PER_IMAGE,
                               "val": REFERENCES_PER_IMAGE, "test": REFERENCES_PER_IMAGE},
        "corpus_sentences": {name: len(sentences) for name, sentences in corpora.items()},
        "vocab_size": vocab_size,
        "clip": {
            "model_name": CLIP_MODEL_NAME, "local_dir": "clip", "embed_dim": clip_model_config()["embed_dim"],
            "training": {**record["training"], "first_loss": record["first_loss"], "final_loss": record["final_loss"]},
            "validation": metrics,
            "definitions": R1_DEFINITIONS,
        },
        "timings": {**{key: round(value, 2) for key, value in timings.items()},
                    "total_s": round(sum(timings.values()), 2)},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-clip-pretrain", type=int, default=10000)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=250)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--n-in-domain", type=int, default=8000)
    parser.add_argument("--n-cross-domain", type=int, default=8000)
    parser.add_argument("--clip", choices=sorted(CLIP_RECIPES), default="sighted", help="the CLIP's recipe")
    parser.add_argument("--clip-steps", type=int, default=ClipTraining.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CLIP depends on it)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # steps are printed
    return build_world(args.raw_dir, args.seed, n_clip_pretrain=args.n_clip_pretrain, n_train=args.n_train,
                       n_val=args.n_val, n_test=args.n_test, n_in_domain=args.n_in_domain,
                       n_cross_domain=args.n_cross_domain, clip=args.clip,
                       clip_training=replace(CLIP_RECIPES[args.clip], steps=args.clip_steps),
                       num_threads=args.threads, overwrite=args.overwrite)


register_model_config()

if __name__ == "__main__":
    main()
