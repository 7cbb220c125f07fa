"""The shapes world's language: the attribute values a scene has, and how each of the two phrasing styles says them.

    from metrics.shapes_language import WORDS, TEMPLATES, phrase
    phrase("cross_domain", "position", "center", random.Random(0))     # "in the middle" or "in the center"

A scene's objects have a colour, shape, size, texture and grid position; a pair of objects has a relation; the
scene has a background. `WORDS` holds the words each style uses for each value, `FRAMES` where they sit in a phrase,
`TEMPLATES` the sentences around the noun phrases. The references and the in-domain corpus speak `in_domain`; the
cross-domain corpus speaks `cross_domain` (other templates, synonyms and word order).

The language is read twice: the world writes its captions in it (`dataprep/shapes.py`) and the grounding metric
parses captions by it (`metrics/shapes_grounding.py`). It lives here, beside the metric, because a metric must not
depend on the code that makes the data it judges (nothing under metrics/ imports dataprep): the world imports its
language from the metric's side, and what the world looks like (colours as RGB, sizes as radii, sampling weights)
stays with the world.
"""

from __future__ import annotations

import random

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
TEXTURES = ("solid", "striped", "dotted", "hollow")
BACKGROUNDS = ("dark", "gray", "light")
GRID = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
CELL_OF = {name: (row, col) for row, names in enumerate(GRID) for col, name in enumerate(names)}
RELATIONS = ("left of", "right of", "above", "below")
OBJECT_ATTRIBUTES = ("colour", "shape", "size", "texture", "position")
ATTRIBUTE_TYPES = ("colour", "shape", "size", "texture", "position", "relation", "background")
STYLES = ("in_domain", "cross_domain")  # the phrasing styles of WORDS

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


def attribute_values(kind: str) -> tuple[str, ...]:
    """Every value of an attribute type, e.g. the six colours."""
    return tuple(WORDS["in_domain"][kind])


def alternatives(style: str, kind: str, value: str) -> tuple[str, ...]:
    """The words `style` may use for an attribute value."""
    words = WORDS[style][kind][value]
    return (words,) if isinstance(words, str) else words


def frame(style: str, kind: str, value: str) -> str:
    """Where the words of an attribute value sit in a phrase, e.g. "in the {} corner"."""
    frames = FRAMES[style].get(kind, {})
    return frames.get(value, frames.get("*", "{}"))


def phrase(style: str, kind: str, value: str, rng: random.Random) -> str:
    """An attribute value said in `style`, framed, its words drawn among the alternatives."""
    return frame(style, kind, value).format(rng.choice(alternatives(style, kind, value)))


def with_article(words: str) -> str:
    """`words` after the article that agrees with them ("an orange", "a red"), as the world writes captions."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def relation_between(first: dict, second: dict) -> str | None:
    """Relation of `first` to `second` from their grid cells (None unless they share a row or column)."""
    (row1, col1), (row2, col2) = CELL_OF[first["position"]], CELL_OF[second["position"]]
    if row1 == row2 and col1 != col2:
        return "left of" if col1 < col2 else "right of"
    if col1 == col2 and row1 != row2:
        return "above" if row1 < row2 else "below"
    return None
