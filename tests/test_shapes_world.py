"""The shapes world: determinism, disjoint splits, references, the saved tiny CLIP and tokenizer, grounding.

    pytest tests/test_shapes_world.py
"""

import json
import random
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from dataprep import shapes, world_clip
from dataprep.world import build_world
from dataprep.world_clip import ClipTraining
from metrics import shapes_grounding, shapes_language
from metrics.shapes_grounding import fluent_grounding, grounding_scores, is_true_of, parse_attributes, parses

TINY = dict(n_clip_pretrain=48, n_train=12, n_val=6, n_test=10, n_in_domain=40, n_cross_domain=40,
            clip_training=ClipTraining(steps=3, batch_size=16, warmup_steps=1, tagging_steps=2), progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    raw = tmp_path_factory.mktemp("world") / "raw"
    return raw, build_world(raw, seed=0, **TINY)


def _files(raw, pattern):
    return {str(path.relative_to(raw)): path.read_bytes() for path in sorted(raw.glob(pattern))}


def _world_bytes(raw):
    return {**_files(raw, "annotations/*.json"), **_files(raw, "scenes/*.json"), **_files(raw, "corpus/*"),
            **_files(raw, "images/*/*.png"), **_files(raw, "tokenizer/*"), **_files(raw, "clip/*")}


def test_same_seed_same_world_other_seed_other_world(world, tmp_path):
    raw, _ = world
    again = build_world(tmp_path / "again", seed=0, **TINY)
    other = build_world(tmp_path / "other", seed=1, **TINY)
    first, second, third = _world_bytes(raw), _world_bytes(tmp_path / "again"), _world_bytes(tmp_path / "other")
    images = sum(TINY[f"n_{split}"] for split in shapes.IMAGE_SPLITS)
    assert sum(name.endswith(".png") for name in first) == images and first == second
    assert again["clip"]["validation"] == json.loads((raw / "world.json").read_text())["clip"]["validation"]
    for name in ("annotations/val_caption.json", "scenes/test.json", "corpus/in_domain.txt",
                 "images/train/shapes_train_000000.png", "clip/open_clip_model.safetensors"):
        assert first[name] != third[name], name
    assert other["seed"] == 1


def test_existing_world_is_kept_unless_overwrite(world):
    raw, _ = world
    with pytest.raises(FileExistsError, match="overwrite"):
        build_world(raw, seed=0, **TINY)


def _scenes(raw):
    scenes = {split: json.loads((raw / "scenes" / f"{split}.json").read_text()) for split in shapes.IMAGE_SPLITS}
    for corpus in shapes.CORPORA:
        listed = json.loads((raw / "corpus" / f"{corpus}_scenes.json").read_text())
        scenes[corpus] = {f"{corpus}_{index}": scene for index, scene in enumerate(listed)}
    return scenes


def test_splits_are_disjoint_and_complete(world):
    raw, summary = world
    scenes = _scenes(raw)
    signatures = {part: {shapes.scene_signature(scene) for scene in found.values()} for part, found in scenes.items()}
    corpus_scenes = signatures["in_domain"] | signatures["cross_domain"]
    for split in shapes.IMAGE_SPLITS:
        assert not corpus_scenes & signatures[split], split
        for other in shapes.IMAGE_SPLITS:
            assert other == split or not signatures[split] & signatures[other], (split, other)
    ids = [key for split in shapes.IMAGE_SPLITS for key in scenes[split]]
    assert len(ids) == len(set(ids)) == sum(summary["images"].values())
    for split in shapes.IMAGE_SPLITS:
        annotations = json.loads((raw / "annotations" / f"{split}_caption.json").read_text())
        assert {row["image_id"] for row in annotations} == set(scenes[split])
        assert len({row["id"] for row in annotations}) == len(annotations)
        assert all((raw / "images" / split / f"{key}.png").is_file() for key in scenes[split])
    for corpus in shapes.CORPORA:
        lines = (raw / "corpus" / f"{corpus}.txt").read_text().splitlines()
        assert len(lines) == len(set(lines)) == len(scenes[corpus]) == TINY[f"n_{corpus}"]


def test_train_val_and_test_have_five_distinct_true_references(world):
    raw, summary = world
    splits = ("train", "val", "test")
    assert all(summary["captions_per_image"][split] == shapes.REFERENCES_PER_IMAGE for split in splits)
    for split in splits:
        scenes = json.loads((raw / "scenes" / f"{split}.json").read_text())
        references = {}
        for row in json.loads((raw / "annotations" / f"{split}_caption.json").read_text()):
            references.setdefault(row["image_id"], []).append(row["caption"])
        assert all(len(set(captions)) == shapes.REFERENCES_PER_IMAGE for captions in references.values())
        for number in range(shapes.REFERENCES_PER_IMAGE):
            scores = grounding_scores({key: refs[number] for key, refs in references.items()}, scenes)
            assert scores["precision"] == 1.0
        first = {key: refs[0] for key, refs in references.items()}
        assert grounding_scores(first, scenes)["per_type"]["colour"]["recall"] == 1.0


def test_generated_captions_are_true_of_their_scenes_in_every_style():
    rng = random.Random(7)
    captions, scenes = {}, {}
    for index in range(300):
        scene = shapes.sample_scene(rng)
        for style, profile in (("in_domain", "reference"), ("cross_domain", "cross"), ("cross_domain", "pretrain")):
            key = f"{index}_{style}_{profile}"
            captions[key], scenes[key] = shapes.describe(scene, style, shapes.PROFILES[profile], rng), scene
    scores = grounding_scores(captions, scenes)
    assert scores["precision"] == 1.0 and scores["captions_without_attributes"] == 0
    assert all(scores["per_type"][kind]["precision"] == 1.0 for kind in shapes_language.ATTRIBUTE_TYPES)


def test_every_phrase_of_the_grammar_parses_to_its_value():
    for style, kinds in shapes_language.WORDS.items():
        for kind, values in kinds.items():
            for value in values:
                for words in shapes_language.alternatives(style, kind, value):
                    phrase = shapes_language.frame(style, kind, value).format(words)
                    assert parse_attributes(phrase) == [(kind, value)], (style, phrase)


def test_cross_domain_corpus_is_phrased_differently(world):
    raw, _ = world
    in_domain = (raw / "corpus" / "in_domain.txt").read_text().split()
    cross = (raw / "corpus" / "cross_domain.txt").read_text().split()
    only_cross = set(cross) - set(in_domain)
    assert {"big", "little"} & only_cross and len(only_cross) >= 5


def test_saved_clip_loads_through_local_dir(world):
    raw, summary = world
    clip_dir = raw / "clip"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    path = raw / "images" / "test" / "shapes_test_000000.png"
    pixels = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
    seen_in_training = world_clip._pixel_tensor(np.array(Image.open(path))[None], model.visual.preprocess_cfg)
    assert torch.allclose(pixels, seen_in_training, atol=1e-6)
    dim = shapes.clip_model_config()["embed_dim"]
    with torch.no_grad():
        assert model.encode_image(pixels).shape == (1, dim)
        assert model.encode_text(tokenizer(["a large red circle on the left."])).shape == (1, dim)
    assert summary["clip"]["embed_dim"] == dim
    assert 0.0 <= summary["clip"]["validation"]["i2t_r1"] <= 1.0 and summary["clip"]["validation"]["modality_gap"] > 0


def test_architecture_is_registered_with_open_clip():
    model = open_clip.create_model(shapes.CLIP_MODEL_NAME).eval()
    with torch.no_grad():
        features = model.encode_image(torch.zeros(2, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE))
    assert features.shape == (2, shapes.clip_model_config()["embed_dim"])


def test_tokenizer_round_trips_and_has_the_project_special_tokens(world):
    raw, summary = world
    tokenizer = AutoTokenizer.from_pretrained(raw / "tokenizer")
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == summary["vocab_size"]
    lines = [line for corpus in shapes.CORPORA for line in (raw / "corpus" / f"{corpus}.txt").read_text().splitlines()]
    with_comma = [line for line in lines if "," in line]
    assert with_comma
    for caption in lines[:10] + lines[-10:] + with_comma[:5] + [lines[0].capitalize()]:
        ids = tokenizer(caption)["input_ids"]
        assert tokenizer.eos_token_id not in ids and tokenizer.unk_token_id not in ids, caption
        decoded = tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True)
        assert decoded == caption.lower()
    words = tokenizer.tokenize("a red circle, on the left.")
    assert words == ["a", "red", "circle", ",", "on", "the", "left", "."]
    assert tokenizer("a zebra")["input_ids"][1] == tokenizer.unk_token_id


SCENE = {"objects": [
    {"colour": "red", "shape": "circle", "size": "large", "texture": "solid", "position": "top left"},
    {"colour": "blue", "shape": "square", "size": "small", "texture": "striped", "position": "top right"}],
    "relation": "left of", "background": "dark"}


def _score(caption):
    return grounding_scores({"image": caption}, {"image": SCENE})


def test_grounding_of_hand_made_captions():
    true = _score("a large red circle to the left of a small blue square.")
    assert true["precision"] == 1.0 and true["per_type"]["relation"] == {"precision": 1.0, "recall": 1.0}
    wrong_colour = _score("a large green circle to the left of a small blue square.")
    assert wrong_colour["precision"] < 1.0 and wrong_colour["per_type"]["colour"]["precision"] == 0.5
    swapped = _score("a large red circle to the right of a small blue square.")
    assert swapped["per_type"]["relation"]["precision"] == 0.0
    unbound = _score("a blue circle.")  # both words exist in the scene, but the circle is red
    assert unbound["per_type"]["colour"]["precision"] == 0.0 and unbound["per_type"]["shape"]["precision"] == 1.0
    synonyms = _score("we see a big red disc left of a little blue box with stripes against a black backdrop.")
    assert synonyms["precision"] == 1.0
    complete = _score("a large red circle in the top left corner to the left of a small striped blue square "
                      "in the top right corner on a dark background.")
    assert complete["precision"] == 1.0 and complete["recall"] == 1.0
    assert true["recall"] < complete["recall"]
    empty = _score("")
    assert empty["recall"] == 0.0 and empty["precision"] is None and empty["captions_without_attributes"] == 1


def test_parse_attributes_reads_phrases_longest_first():
    assert parse_attributes("a small red cross to the left of a big violet plus sign in the upper left.") == [
        ("size", "small"), ("colour", "red"), ("shape", "cross"), ("relation", "left of"), ("size", "large"),
        ("colour", "purple"), ("shape", "cross"), ("position", "top left")]
    assert parse_attributes("a circle on the left.") == [("shape", "circle"), ("position", "left")]


def test_distinct_captions_are_counted_over_differing_scenes():
    striped_twin = {**SCENE, "objects": [{**SCENE["objects"][0], "texture": "dotted"}, SCENE["objects"][1]]}
    other = {**SCENE, "objects": [{**SCENE["objects"][0], "colour": "green"}, SCENE["objects"][1]]}
    scenes = {"a": SCENE, "b": striped_twin, "c": other}
    # a and b differ only in an unmentioned texture: one scene, so sharing a caption is no collapse.
    assert grounding_scores({"a": "x.", "b": "x.", "c": "y."}, scenes)["distinct_scene_caption_share"] == 1.0
    assert grounding_scores({"a": "x.", "b": "y.", "c": "x."}, scenes)["distinct_scene_caption_share"] == 0.5


def test_grounding_refuses_predictions_without_scene():
    with pytest.raises(KeyError, match="no scene"):
        grounding_scores({"unknown": "a red circle."}, {"image": SCENE})


def test_clip_training_lowers_the_loss():
    rng, pixel_rng = random.Random(0), np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng) for _ in range(64)]
    pixels = np.stack([shapes.render_scene(scene, pixel_rng)[0] for scene in scenes])
    captions = [[shapes.pretrain_caption(scene, rng) for _ in range(2)] for scene in scenes]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, losses = world_clip.train_tiny_clip(pixels, captions, ClipTraining(steps=40, batch_size=32, warmup_steps=5))
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-8:]) < np.mean(losses[:4]) - 0.3


# --------------------------------------------------------------------------- the swap test


def _references(count, seed=3):
    rng = random.Random(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(count)]
    return [shapes.reference_captions(scene, rng) for scene in scenes], scenes


def test_swapped_captions_are_false_and_differ_in_one_attribute_of_the_family():
    references, scenes = _references(150)
    pairs = world_clip.swap_pairs(references, scenes)
    assert set(pairs) == set(world_clip.SWAP_FAMILIES) and all(pairs[family] for family in world_clip.SWAP_FAMILIES)
    for family, found in pairs.items():
        for index, true, swapped in found:
            assert true in references[index] and true != swapped
            assert grounding_scores({"x": true}, {"x": scenes[index]})["precision"] == 1.0
            assert not is_true_of(swapped, scenes[index]), (true, swapped)
            before, after = parse_attributes(true), parse_attributes(swapped)
            changed = [(old, new) for old, new in zip(before, after) if old != new]
            assert len(before) == len(after) and len(changed) == 1, (true, swapped)
            assert changed[0][0][0] == changed[0][1][0] == family, (true, swapped)
    assert " a orange" not in " ".join(swapped for found in pairs.values() for _, _, swapped in found)


def test_swap_phrases_keep_the_caption_style():
    scene = SCENE
    rng = random.Random(0)
    cross = "we see a big red disc left of a little blue box with stripes against a black backdrop."
    for family in ("shape", "size", "texture", "background", "relation"):
        swapped = world_clip.swap_attribute(cross, scene, family, rng)
        assert swapped is not None and not is_true_of(swapped, scene), family
    assert world_clip.swap_attribute("a large red circle in the top left corner.", scene, "position", rng) \
        .startswith("a large red circle ")
    assert world_clip.swap_attribute("a red circle.", scene, "relation", rng) is None


_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _oracle(blind=()):
    """A 'CLIP' that sees exactly the world's attributes, bound to their objects: an image (a text) is the bag of
    (shape, attribute, value) facts of its scene (that it states), relations as (shape, relation, shape). The
    families in `blind` are invisible to it (a blind shape also leaves the other facts unbound).
    Returns (encode_image(scene), encode_text(texts)), both L2-normalised."""
    values = {kind: list(shapes_language.WORDS["in_domain"][kind]) for kind in shapes_language.ATTRIBUTE_TYPES}
    bound = [*shapes_language.SHAPES, "*"]
    facts = [("shape", value) for value in bound] + [("background", value) for value in values["background"]]
    facts += [(owner, kind, value) for owner in bound for kind in ("colour", "size", "texture", "position")
              for value in values[kind]]
    facts += [(first, "relation", value, second) for first in bound for value in values["relation"]
              for second in bound]
    index = {fact: number for number, fact in enumerate(facts)}

    def owner(value):
        return "*" if "shape" in blind or value is None else value

    def vector(found):
        features = torch.zeros(len(index))
        for fact in found:
            if not any(part in blind for part in fact[:-1] if part in shapes_language.ATTRIBUTE_TYPES) \
                    and not (fact[0] in shapes_language.ATTRIBUTE_TYPES and fact[0] in blind):
                features[index[fact]] += 1
        return features / features.norm().clamp_min(1e-6)

    def encode_image(scene):
        found = [("background", scene["background"])]
        for obj in scene["objects"]:
            found += [("shape", owner(obj["shape"]))] + [(owner(obj["shape"]), key, obj[key])
                                                         for key in ("colour", "size", "texture", "position")]
        if scene["relation"]:
            first, second = (owner(obj["shape"]) for obj in scene["objects"])
            found += [(first, "relation", scene["relation"], second),
                      (second, "relation", _INVERSE[scene["relation"]], first)]
        return vector(found)

    def encode_text(text):
        items, found, last = shapes_grounding._chunk(shapes_grounding.attribute_mentions(text)), [], "*"
        for position, (kind, value) in enumerate(items):
            if kind == "np":
                last = owner(value.get("shape"))
                found += [("shape", last)] + [(last, key, word) for key, word in value.items() if key != "shape"]
            elif kind == "position":
                found.append((last, "position", value))
            elif kind == "relation":
                after = next((phrase for other, phrase in items[position + 1:] if other == "np"), {})
                found.append((last, "relation", value, owner(after.get("shape"))))
            else:
                found.append((kind, value))
        return vector(found)

    return encode_image, lambda texts: torch.stack([encode_text(text) for text in texts])


def test_swap_test_passes_a_seeing_clip_and_fails_a_blind_one():
    references, scenes = _references(120)
    encode_image, encode_text = _oracle()
    images = torch.stack([encode_image(scene) for scene in scenes])
    seeing = world_clip.swap_test(images, encode_text, references, scenes)
    assert all(seeing[family] >= 0.9 for family in world_clip.SWAP_FAMILIES), seeing
    assert seeing["min"] >= 0.9 and all(seeing["pairs"][family] > 0 for family in world_clip.SWAP_FAMILIES)
    assert seeing == world_clip.swap_test(images, encode_text, references, scenes)  # seeded: the same pairs each time
    for blind_to in ("texture", "shape", "relation"):
        encode_image, encode_text = _oracle(blind=(blind_to,))
        images = torch.stack([encode_image(scene) for scene in scenes])
        blind = world_clip.swap_test(images, encode_text, references, scenes)
        assert blind[blind_to] == 0.5 == blind["min"], (blind_to, blind)
        if blind_to == "texture":  # nothing else depends on it
            assert all(blind[family] == seeing[family] for family in world_clip.SWAP_FAMILIES if family != "texture")


def test_world_reports_the_swap_test_and_modality_gap(world):
    raw, summary = world
    figures = summary["clip"]["validation"]
    assert "test" not in summary["clip"]  # every figure of the world's CLIP is measured on validation
    assert set(world_clip.SWAP_FAMILIES) <= set(figures["swap_test"]) and "swap_test" in summary["clip"]["definitions"]
    shares = [figures["swap_test"][family] for family in world_clip.SWAP_FAMILIES
              if figures["swap_test"][family] is not None]
    assert shares and all(0.0 <= share <= 1.0 for share in shares)
    assert json.loads((raw / "world.json").read_text())["clip"]["validation"]["swap_test"] == figures["swap_test"]
    lines = world_clip.clip_report(figures)
    assert any("swap test" in line for line in lines) and any("modality gap" in line for line in lines)
    assert any("ViT-B/32" in line for line in lines)


def test_hard_negatives_are_false_of_their_scenes():
    rng = random.Random(5)
    for _ in range(100):
        scene = shapes.sample_scene(rng)
        caption = shapes.pretrain_caption(scene, rng)
        negatives = world_clip.hard_negative_captions(caption, scene, 3, rng)
        assert len(negatives) == 3
        assert all(not is_true_of(negative, scene) for negative in negatives), (caption, negatives)


def _swapped_family(caption, negative):
    before, after = dict(parse_attributes(caption)), parse_attributes(negative)
    return {kind for kind, value in after if (kind, value) not in parse_attributes(caption) and kind in before}


def test_hard_negative_families_follow_their_weights():
    rng = random.Random(6)
    counts = {"even": 0, "weighted": 0}
    for _ in range(150):
        scene = {"objects": [{"colour": "red", "shape": "circle", "size": "small", "texture": "solid",
                              "position": "left"}], "relation": None, "background": "dark"}
        caption = "a small red circle on the left."
        for name, weights in (("even", None), ("weighted", {"shape": 8.0})):
            negatives = world_clip.hard_negative_captions(caption, scene, 4, rng, weights)
            counts[name] += sum("shape" in _swapped_family(caption, negative) for negative in negatives)
    # 4 families (size, colour, shape, position): a share of 1/4 evenly, 8/11 with shape weighted 8
    assert counts["even"] / 600 == pytest.approx(0.25, abs=0.06)
    assert counts["weighted"] / 600 == pytest.approx(8 / 11, abs=0.06)


def test_relation_negatives_reverse_the_relation_half_the_time():
    scene = {"objects": [{"colour": "red", "shape": "circle", "size": "small", "texture": "solid", "position": "left"},
                         {"colour": "blue", "shape": "cross", "size": "large", "texture": "solid",
                          "position": "right"}], "relation": "left of", "background": "gray"}
    caption = "a red circle to the left of a blue cross."
    negatives = world_clip.hard_negative_captions(caption, scene, 600, random.Random(0), {"relation": 1e6})
    assert {"a red circle to the right of a blue cross.", "a red circle above a blue cross.",
            "a red circle below a blue cross."} == set(negatives)
    # half are the opposite, half any of the 3 false relations (the opposite among them)
    opposite = negatives.count("a red circle to the right of a blue cross.") / len(negatives)
    assert opposite == pytest.approx(0.5 + 0.5 / 3, abs=0.06)


def test_scene_tags_bind_attributes_to_their_cell():
    scene = {"objects": [{"colour": "red", "shape": "circle", "size": "small", "texture": "solid", "position": "left"},
                         {"colour": "blue", "shape": "cross", "size": "large", "texture": "dotted",
                          "position": "right"}], "relation": "left of", "background": "gray"}
    tags = world_clip.scene_tags([scene])[0]
    named = {world_clip.SCENE_TAGS[n] for n in tags.nonzero().flatten().tolist()}
    assert named == {("background", "gray"), ("left", "colour", "red"), ("left", "shape", "circle"),
                     ("left", "size", "small"), ("left", "texture", "solid"), ("right", "colour", "blue"),
                     ("right", "shape", "cross"), ("right", "size", "large"), ("right", "texture", "dotted")}


def test_scene_tagging_teaches_the_vision_tower():
    rng, pixel_rng = random.Random(1), np.random.default_rng(1)
    scenes = [shapes.sample_scene(rng) for _ in range(64)]
    pixels = np.stack([shapes.render_scene(scene, pixel_rng)[0] for scene in scenes])
    torch.manual_seed(0)
    visual = world_clip.new_tiny_clip().visual
    before = [p.detach().clone() for p in visual.parameters()]
    images = world_clip._pixel_tensor(pixels, visual.preprocess_cfg)
    losses = world_clip.train_scene_tagger(visual, images, scenes, ClipTraining(tagging_steps=30, batch_size=32,
                                                                            warmup_steps=3),
                                       torch.Generator().manual_seed(0), progress=False)
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.2
    assert all(not torch.equal(b, a) for b, a in zip(before, visual.parameters()))


def test_pair_loss_ranks_each_caption_against_its_own_negatives():
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(3, 8), dim=1) for _ in range(2))
    negatives = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)  # two per image, image-major
    scale = torch.tensor(10.0)
    plain = world_clip._contrastive_loss(image, text, negatives, scale)
    with_pairs = world_clip._contrastive_loss(image, text, negatives, scale, pair_loss_weight=0.5)
    own = [torch.cat([image[b] @ text[b, None].T, image[b] @ negatives[2 * b:2 * b + 2].T]) for b in range(3)]
    by_hand = torch.stack([-torch.log_softmax(scale * logits, 0)[0] for logits in own]).mean()
    assert with_pairs == pytest.approx((plain + 0.5 * by_hand).item(), rel=1e-5)
    # another image's negatives are no part of an image's own ranking
    shuffled = negatives.view(3, 2, 8)[[1, 2, 0]].reshape(6, 8)
    assert world_clip._contrastive_loss(image, text, shuffled, scale, 0.5) != pytest.approx(with_pairs.item(), rel=1e-5)


def test_fresh_tiny_clip_claims_no_failed_load(caplog):
    with caplog.at_level("INFO"):
        model = world_clip.new_tiny_clip()
    assert not [record for record in caplog.records if record.levelname in ("WARNING", "ERROR")]
    assert open_clip.get_model_preprocess_cfg(model)["size"] == shapes.IMAGE_SIZE


def test_shipped_clip_is_copied_only_where_it_was_trained_on_this_world(world, tmp_path, capsys):
    raw, summary = world
    assert summary["clip"]["source"] == "trained"
    shipped = tmp_path / "shipped"
    shutil.copytree(raw / "clip", shipped / "sighted")
    capsys.readouterr()
    copied = build_world(tmp_path / "copied", seed=0, shipped_clips=shipped, **TINY)
    assert "shipped in" in capsys.readouterr().out and copied["clip"]["source"] == "shipped"
    assert _files(tmp_path / "copied", "clip/*") == _files(raw, "clip/*")
    assert copied["clip"]["training"] == summary["clip"]["training"]
    assert copied["clip"]["validation"] == summary["clip"]["validation"]
    for name, change in {"other seed": dict(seed=1), "asked to retrain": dict(retrain_clip=True),
                         "other pretraining images": dict(n_clip_pretrain=40), "other recipe": dict(clip="plain")}.items():
        built = build_world(tmp_path / name.replace(" ", "_"), shipped_clips=shipped, **{"seed": 0, **TINY, **change})
        assert built["clip"]["source"] == "trained", name
        assert "training the tiny CLIP" in capsys.readouterr().out, name


def test_shipped_clips_fit_the_default_world(tmp_path):
    """The CLIPs shipped with the code were trained on the pretraining pairs the default world draws today: a change
    to scenes, rendering or captions without retraining them would make every default run train for minutes."""
    sizes = {"clip_pretrain": 10000, "train": 1, "val": 1, "test": 1}
    captions, pixels, _ = shapes.build_image_splits(tmp_path, 0, sizes, 1, lambda line: None)
    for recipe, settings in world_clip.CLIP_RECIPES.items():
        record = world_clip.clip_training_record(recipe, settings, 0, 1, pixels["clip_pretrain"],
                                                 captions["clip_pretrain"])
        assert world_clip.shipped_clip(record, world_clip.SHIPPED_CLIPS) == world_clip.SHIPPED_CLIPS / recipe, recipe


def test_build_says_what_it_does(tmp_path, capsys, caplog):
    with caplog.at_level("WARNING"):
        build_world(tmp_path / "talk", seed=0, **TINY)
    out = capsys.readouterr().out
    for step in ("rendering", "tokenizer", "training the tiny CLIP", "swap test", "modality gap", "R@1"):
        assert step in out, step
    assert not [record.getMessage() for record in caplog.records if "pretrained" in record.getMessage()]


# ---- the grammar and the fluency-aware grounding


def test_every_sentence_the_world_writes_parses():
    rng = random.Random(3)
    for _ in range(3000):
        scene = shapes.sample_scene(rng)
        for sentence in (*shapes.reference_captions(scene, rng), shapes.corpus_sentence(scene, "cross_domain", rng),
                         shapes.pretrain_caption(scene, rng)):
            assert parses(sentence), sentence


@pytest.mark.parametrize("caption", [
    "a large red circle in the center in the center.",  # a repeated phrase
    "a large large red circle.",  # a repeated word
    "a red circle circle.",
    "circle red a large.",  # words out of order
    "an red circle.",  # the article does not agree
    "a large red circle sitting in the",  # cut before its end
    "a large red in the center.",  # no shape
    "we see a red disc on a dark background.",  # one style's frame around the other style's words
])
def test_captions_out_of_the_grammar_do_not_parse(caption):
    assert not parses(caption)


SCENE_PAIR = {"objects": [
    {"colour": "red", "shape": "circle", "size": "large", "texture": "solid", "position": "left"},
    {"colour": "red", "shape": "square", "size": "small", "texture": "solid", "position": "right"}],
    "relation": "left of", "background": "dark"}


@pytest.mark.parametrize("clean, disfluent", [
    ("a large red circle to the left of a small red square.", "a large red circle to the left of a small red square"
                                                              " to the left of a small red square."),
    ("a large red circle.", "a large red circle and a large red circle."),  # parses, says one thing twice
    ("a large red circle.", "a large large red circle."),
    ("a red circle and a red square.", "red circle a and a red square."),
])
def test_fluent_grounding_scores_repetition_and_disorder_below_the_clean_caption(clean, disfluent):
    clean_precision, clean_recall = fluent_grounding(clean, SCENE_PAIR)
    precision, recall = fluent_grounding(disfluent, SCENE_PAIR)
    assert parses(clean) and clean_precision == 1.0
    assert precision < clean_precision and recall <= clean_recall
    # the plain grounding score barely sees it: each true mention counts again, out of grammar or not
    plain = grounding_scores({"x": disfluent}, {"x": SCENE_PAIR})
    assert plain["precision"] > 0.9 > precision and plain["recall"] >= clean_recall


def test_shared_attributes_of_two_objects_are_two_facts():
    assert fluent_grounding("a red circle and a red square.", SCENE_PAIR)[0] == 1.0
    two_triangles = {"objects": [
        {"colour": "yellow", "shape": "triangle", "size": "large", "texture": "solid", "position": "top"},
        {"colour": "purple", "shape": "triangle", "size": "large", "texture": "solid", "position": "center"}],
        "relation": "above", "background": "dark"}
    assert fluent_grounding("a large yellow triangle above a large purple triangle.", two_triangles)[0] == 1.0


def test_grounding_scores_report_parse_rate_and_fluent_scores():
    scores = grounding_scores({"a": "a large red circle.", "b": "a large large red circle."},
                              {"a": SCENE_PAIR, "b": SCENE_PAIR})
    assert scores["parse_rate"] == 0.5
    assert scores["fluent_precision"] == 0.5 and scores["precision"] == 1.0
    assert scores["fluent_recall"] == scores["recall"] / 2


def test_world_records_its_clip_recipe_and_is_rebuilt_for_another(world, tmp_path):
    from dataprep.world import _world_matches

    _, summary = world
    assert summary["clip"]["recipe"] == "sighted"
    assert _world_matches(summary, 0, {}, "sighted") and not _world_matches(summary, 0, {}, "plain")
    assert world_clip.CLIP_RECIPES["plain"].tagging_steps == 0 and world_clip.CLIP_RECIPES["plain"].hard_negatives == 0
    with pytest.raises(ValueError, match="clip must be one of"):
        build_world(tmp_path / "w", clip="oracle", **TINY)
