"""The shapes world's data: a small synthetic captioning world that runs the whole method offline.

    python -m dataprep.world data/shapes/raw --seed 0     # builds the world (normally `prepare_datasets.py shapes`)

Scenes hold one or two coloured shapes (colour, shape, size, grid position, texture; the relation
between two) on a background, with pixel noise, a brightness gradient and small distractor specks.
Captions come from a grammar with several phrasings; they mention colour and shape almost always,
size, position and relation often, texture and background only sometimes, so an image always shows
more than any one caption says. Two phrasing styles exist: the references and the in-domain corpus
share one; the cross-domain corpus uses other templates, synonyms and word order.

Scene signatures (background + the objects' attributes) are split between the corpora and the image
splits by a seeded hash, so no corpus sentence describes a scene of any image split and no two image
splits share a scene.

This module draws scenes, says them and renders them, and writes the image splits, the corpora and the
captioner's tokenizer (`build_image_splits`, `build_corpus`, `train_tokenizer`). The words and templates it says
scenes with are the world's language, `metrics/shapes_language.py`, which the grounding metric that scores captions
against scenes (`metrics/shapes_grounding.py`) parses by. The world's CLIP is trained in `dataprep/world_clip.py`,
and `dataprep/world.py` builds the whole world from both.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import open_clip
from PIL import Image

from metrics.shapes_language import (
    BACKGROUNDS,
    CELL_OF,
    COLOURS,
    GRID,
    OBJECT_ATTRIBUTES,
    SHAPES,
    SIZES,
    TEMPLATES,
    TEXTURE_BEFORE_COLOUR,
    phrase,
    relation_between,
    with_article,
)

# --------------------------------------------------------------------------- what the world looks like

COLOUR_RGB = {
    "red": (212, 44, 44), "green": (44, 168, 72), "blue": (48, 96, 224),
    "yellow": (236, 204, 40), "purple": (148, 68, 200), "orange": (244, 132, 24),
}
SIZE_RADIUS = {"small": 0.27, "large": 0.44}  # as a share of a grid cell
TEXTURE_WEIGHTS = {"solid": 0.55, "striped": 0.15, "dotted": 0.15, "hollow": 0.15}  # sampling weights
BACKGROUND_RGB = {"dark": (26, 28, 34), "gray": (116, 116, 112), "light": (224, 222, 210)}
ONE_OBJECT_SHARE = 0.45
DISTRACTOR_COUNTS = (0.3, 0.3, 0.25, 0.15)  # probability of 0, 1, 2, 3 specks


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
# Shares of the scene-signature space: each image split and the corpora (together) get their own part.
PARTITION = (("corpus", 0.35), ("clip_pretrain", 0.25), ("train", 0.20), ("val", 0.08), ("test", 0.12))

# Bumped whenever what `dataprep.world.build_world` makes changes (images, captions, the CLIP's training), so that
# `prepare_datasets.py shapes` rebuilds a world made by older code instead of reusing it.
WORLD_VERSION = 3
TOKENIZER_SPECIALS = {"pad_token": "<pad>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}

# The world's CLIP architecture (trained in `dataprep/world_clip.py`): the images are drawn at its input size.
CLIP_MODEL_NAME = "ShapesCLIP-Tiny"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


def register_model_config() -> None:
    """Make `open_clip.create_model("ShapesCLIP-Tiny")` work (idempotent)."""
    if CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def clip_model_config() -> dict:
    """The open_clip config of ShapesCLIP-Tiny (`model_configs/ShapesCLIP-Tiny.json`)."""
    return json.loads((MODEL_CONFIG_DIR / f"{CLIP_MODEL_NAME}.json").read_text())


IMAGE_SIZE = clip_model_config()["vision_cfg"]["image_size"]


# --------------------------------------------------------------------------- seeded streams


def stream_seed(seed: int, *names: object) -> int:
    """The seed of one named random stream of a world (e.g. `seed, "train", "pixels"`): streams do not interact."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *names))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _unit_hash(seed: int, *names: object) -> float:
    return stream_seed(seed, *names) / 2 ** 64


# --------------------------------------------------------------------------- scenes


def _sample_object(rng: random.Random, position: str) -> dict:
    return {
        "colour": rng.choice(COLOURS), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES),
        "texture": rng.choices(list(TEXTURE_WEIGHTS), weights=list(TEXTURE_WEIGHTS.values()))[0], "position": position,
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
    return {"objects": objects, "relation": relation, "background": rng.choice(BACKGROUNDS)}


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


def _noun_phrase(obj: dict, style: str, profile: MentionProfile, rng: random.Random) -> str:
    words = []
    if rng.random() < profile.size:
        words.append(phrase(style, "size", obj["size"], rng))
    texture_chance = profile.texture * (profile.solid if obj["texture"] == "solid" else 1.0)
    texture = phrase(style, "texture", obj["texture"], rng) if rng.random() < texture_chance else None
    if texture and TEXTURE_BEFORE_COLOUR[style]:
        words.append(texture)
    if rng.random() < profile.colour:
        words.append(phrase(style, "colour", obj["colour"], rng))
    words.append(phrase(style, "shape", obj["shape"], rng))
    if texture and not TEXTURE_BEFORE_COLOUR[style]:
        words.append(texture)
    return " ".join(words)


def describe(scene: dict, style: str, profile: MentionProfile, rng: random.Random) -> str:
    """One caption of `scene` in phrasing `style`, mentioning attributes as `profile` says."""
    templates = TEMPLATES[style]
    background = (" " + phrase(style, "background", scene["background"], rng)
                  if rng.random() < profile.background else "")
    objects = scene["objects"]
    if len(objects) == 1:
        bare = _noun_phrase(objects[0], style, profile, rng)
        at = rng.random() < profile.position
        template = rng.choice(templates["one_at" if at else "one"])
        return template.format(np=with_article(bare), bare=bare, bg=background,
                               pos=phrase(style, "position", objects[0]["position"], rng) if at else "")
    first, second = rng.sample(objects, 2)
    np1 = with_article(_noun_phrase(first, style, profile, rng))
    np2 = with_article(_noun_phrase(second, style, profile, rng))
    if rng.random() < profile.pair_position:
        np1 += " " + phrase(style, "position", first["position"], rng)
    relation = relation_between(first, second)
    if relation and rng.random() < profile.relation:
        template = rng.choice(templates["two_rel"])
        return template.format(np1=np1, np2=np2, rel=phrase(style, "relation", relation, rng), bg=background)
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
    radius = SIZE_RADIUS[obj["size"]] * cell * rng.uniform(0.93, 1.07)
    centre = [float(np.clip((index + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell, radius + 0.5, size - radius - 0.5))
              for index in (col, row)]
    colour = np.clip(np.array(COLOUR_RGB[obj["colour"]]) + rng.uniform(-14, 14, 3), 0, 255)
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
    palette = list(COLOUR_RGB.values()) + [(240, 240, 240), (10, 10, 10)]
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
    base = np.array(BACKGROUND_RGB[scene["background"]], dtype=np.float64) + rng.normal(0, 6, 3)
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


def write_json(path: Path, value) -> None:
    """Write a world file: indented, keys sorted, so that a seed gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def image_id(split: str, index: int) -> str:
    return f"shapes_{split}_{index:06d}"


def build_image_split(raw_dir: Path, split: str, count: int, seed: int,
                      caption_fn: Callable[[dict, random.Random], list[str]]) -> tuple[dict, np.ndarray, dict]:
    """Sample, render and write one image split with its captions and scenes; returns (captions, pixels, scenes)."""
    scene_rng = random.Random(stream_seed(seed, split, "scenes"))
    caption_rng = random.Random(stream_seed(seed, split, "captions"))
    pixel_rng = np.random.default_rng(stream_seed(seed, split, "pixels"))
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
    write_json(raw_dir / "annotations" / f"{split}_caption.json", annotations)
    write_json(raw_dir / "scenes" / f"{split}.json", scenes)
    return captions, pixels, scenes


def build_corpus(raw_dir: Path, corpus: str, count: int, seed: int) -> list[str]:
    """`count` distinct sentences about corpus-only scenes, one a line; their scenes beside them."""
    scene_rng = random.Random(stream_seed(seed, corpus, "scenes"))
    caption_rng = random.Random(stream_seed(seed, corpus, "captions"))
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
    write_json(raw_dir / "corpus" / f"{corpus}_scenes.json", scenes)
    return sentences


def build_image_splits(raw_dir: Path, seed: int, sizes: dict, pretrain_captions: int,
                       log: Callable[[str], None]) -> tuple[dict, dict, dict]:
    """Write every image split (`IMAGE_SPLITS`, `sizes[split]` images each): clip_pretrain with `pretrain_captions`
    pretraining captions an image, the others with their references. Returns (captions, pixels, scenes), each
    {split: what `build_image_split` gives}."""

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


register_model_config()
