"""The shapes world's CLIP: how it is trained, measured and shipped.

    python prepare_datasets.py shapes --clip plain --retrain-clip    # train it instead of copying the shipped one

The tiny CLIP (ShapesCLIP-Tiny, `dataprep/model_configs/`) is trained from scratch by one of two recipes
(`CLIP_RECIPES`). "plain" learns the contrastive loss on image-caption pairs only, as real CLIPs do. "sighted" first
trains its vision tower to tag scenes (each grid cell's object attributes and the background, as LiT and many CLIPs
start from a supervised backbone), then both towers learn the contrastive loss with NegCLIP-style hard negatives
(captions with one attribute swapped, also ranked against their own caption alone).

It is measured on the validation split: retrieval R@1, the modality gap, and a swap test per attribute family
(`swap_test`: how often the image prefers a true reference over the same reference with one attribute swapped so
that it is false) -- what the CLIP cannot tell apart, no CLIP reward can teach.

Training takes minutes and a CPU's arithmetic moves its last bits, so trained CLIPs ship with the code
(`SHIPPED_CLIPS`); a world built by the same recipe, seed and thread count on the same pretraining pairs copies the
shipped one (`copy_or_train_clip`). The world's scenes and captions come from `dataprep/shapes.py`, the attribute
parser that decides what a swap makes false from `metrics/shapes_grounding.py`; `dataprep/world.py` builds the world
around this CLIP.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch

from metrics.shapes_grounding import WORD_PATTERN, attribute_mentions, is_true_of, parse_attributes
from metrics.shapes_language import (
    BACKGROUNDS,
    CELL_OF,
    STYLES,
    alternatives,
    attribute_values,
    frame,
    phrase,
    with_article,
)

from .shapes import CLIP_MODEL_NAME, WORLD_VERSION, clip_model_config, stream_seed, write_json


@dataclass(frozen=True)
class ClipTraining:
    """One way to train the world's CLIP: the contrastive steps, and what comes before and beside them."""

    steps: int = 2000
    batch_size: int = 96
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    # Before the contrastive steps the vision tower is trained this many steps to tag each scene (`SCENE_TAGS`,
    # a multi-label head dropped afterwards), as LiT and many CLIPs start from a supervised backbone: under the
    # contrastive loss alone it learns shape and texture only as far as the captions' other words leave images apart
    # (docs/measurements.md has what was measured).
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


# --------------------------------------------------------------------------- swapping one attribute

SWAP_FAMILIES = ("colour", "shape", "size", "position", "relation", "texture", "background")


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
    matches = list(WORD_PATTERN.finditer(caption.lower()))
    words = [match.group() for match in matches]
    mentions = [mention for mention in attribute_mentions(caption) if mention[0] == kind]
    rng.shuffle(mentions)
    for _, value, start, end in mentions:
        first, last, phrasing = _framed_span(words, start, end, kind, value, style)
        candidates = replacements(value) if replacements else attribute_values(kind)
        others = [other for other in candidates if other != value]
        rng.shuffle(others)
        for other in others:
            said = phrase(phrasing, kind, other, rng)
            head = caption[:matches[first].start()]
            article = re.search(r"\b(an?) $", head)
            if article:  # "a red" -> "an orange"
                head = head[:article.start()] + with_article(said)[:-len(said)]
            swapped = head + said + caption[matches[last - 1].end():]
            if not is_true_of(swapped, scene):
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
            rng = random.Random(stream_seed(seed, "swap", index, family))
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


# --------------------------------------------------------------------------- training

# The vision tower learns the scene before it meets text (see `ClipTraining.tagging_steps`): per grid cell the
# colour, shape, size and texture of the object there, and the background. The tag set is the world's, not the data's.
SCENE_TAGS = (*[(position, kind, value) for position in CELL_OF for kind in ("colour", "shape", "size", "texture")
                for value in attribute_values(kind)], *[("background", value) for value in BACKGROUNDS])


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


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


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


def _hard_negatives(captions: Sequence[Sequence[str]], scenes: Sequence[dict], settings: ClipTraining,
                    seed: int) -> list[list[list[str]]]:
    """Per image and caption, `settings.negatives_per_caption` false variants of it (`hard_negative_captions`)."""
    rng, weights = random.Random(stream_seed(seed, "hard negatives")), dict(settings.negative_family_weights)
    return [[hard_negative_captions(caption, scene, settings.negatives_per_caption, rng, weights)
             for caption in image_captions] for image_captions, scene in zip(captions, scenes)]


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
    if settings.tagging_steps and scenes is not None:
        train_scene_tagger(model.visual, images, scenes, settings, generator, progress)
    negatives = None
    if settings.hard_negatives and scenes is not None:
        negatives = _hard_negatives(captions, scenes, settings, seed)
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


# --------------------------------------------------------------------------- measuring

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
        hits_true += [is_true_of(texts[best], block_scenes[own]) for own, best in enumerate(best_text)]
        hits_t2i += [texts[best] == texts[own] for own, best in enumerate(best_image)]
    gap = (image_features.mean(0) - reference_features.mean(0)).norm()
    paired = (image_features * first_reference_features).sum(1).mean()
    return {"i2t_r1": _mean([float(h) for h in hits_i2t]), "i2t_r1_true": _mean([float(h) for h in hits_true]),
            "t2i_r1": _mean([float(h) for h in hits_t2i]), "r1_images": len(hits_i2t), "r1_block": block,
            "modality_gap": float(gap), "paired_cosine": float(paired)}


def evaluate_saved_clip(raw_dir: Path, references: dict[str, list[str]], split: str = "val") -> dict:
    """Measure the world's saved CLIP on a split (validation: every choice made from these figures must leave test
    unread), loaded through `local-dir:` exactly as feature extraction loads it; `references` maps each image id of
    the split to its references."""
    from clip_scstclipcap import CaptioningClip

    clip = CaptioningClip.load(f"local-dir:{raw_dir / 'clip'}")
    scenes = json.loads((raw_dir / "scenes" / f"{split}.json").read_text())
    ids = list(references)
    images = clip.encode_images([str(raw_dir / "images" / split / f"{key}.png") for key in ids])
    firsts = [references[key][0] for key in ids]
    everything = [caption for key in ids for caption in references[key]]
    metrics = retrieval_and_gap(images, clip.encode_text(firsts), firsts, clip.encode_text(everything),
                                [scenes[key] for key in ids], min(R1_BLOCK, len(ids)))
    metrics["swap_test"] = swap_test(images, clip.encode_text, [references[key] for key in ids],
                                     [scenes[key] for key in ids])
    return metrics


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


# --------------------------------------------------------------------------- shipping


def save_tiny_clip(model: torch.nn.Module, clip_dir: Path) -> str:
    """Save a trained tiny CLIP as an open_clip `local-dir:` folder; returns its model name."""
    from clip_scstclipcap import save_local_clip

    return save_local_clip(model, clip_model_config(), clip_dir)


# Trained world CLIPs ship with the code, one folder per recipe (`world_clips/<recipe>/`: the open_clip local-dir
# files and `training.json`, what trained them): training one takes minutes on a CPU, and a CPU's arithmetic moves
# its last bits, so a shipped one gives every machine the same CLIP. The plain one is rebuilt by
#   python prepare_datasets.py shapes --clip plain --retrain-clip --overwrite
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


def copy_or_train_clip(raw_dir: Path, recipe: str, settings: ClipTraining, seed: int, num_threads: int,
                       pixels: dict, captions: dict, scenes: dict, shipped_clips: Path | None, progress: bool,
                       log: Callable[[str], None]) -> tuple[dict, bool]:
    """Put the world's CLIP in `raw_dir/clip`: the one in `shipped_clips` trained exactly so (`shipped_clip`) copied,
    else one trained now (always when `shipped_clips` is None). `pixels`, `captions` and `scenes` are the image
    splits' (`build_image_splits`). Returns the CLIP's training record and whether it was copied."""
    record = clip_training_record(recipe, settings, seed, num_threads, pixels["clip_pretrain"],
                                  captions["clip_pretrain"])
    shipped = None if shipped_clips is None else shipped_clip(record, shipped_clips)
    if shipped is not None:
        log(f"== the tiny CLIP ({CLIP_MODEL_NAME}) shipped in {shipped}: trained by this recipe, seed and thread "
            f"count on these clip_pretrain pairs (`--retrain-clip` trains it again)")
        shutil.copytree(shipped, raw_dir / "clip")
        return json.loads((shipped / CLIP_RECORD).read_text()), True
    record.update(_train_and_save_clip(raw_dir, pixels, captions, scenes, settings, seed, num_threads, progress, log))
    write_json(raw_dir / "clip" / CLIP_RECORD, record)
    return record, False
