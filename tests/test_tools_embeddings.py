"""tools/prefix_tokens.py and tools/fictitious.py on a tiny captioner and a tiny random open_clip model saved as a
`local-dir:` folder, with small tables written here."""

import base64
import io
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from datasets import Dataset, Features
from PIL import Image

from clip_scstclipcap import CaptioningClip, read_clip_metadata
from conftest import TINY_CLIP, make_tiny_clip
from dataprep.common import table_description
from dataprep.tables import TableWriter, corpus_features, feature_column, feature_matrix, images_features, load_table
from modeling_scstclipcap import SCSTClipCapForCaptioning
from tools import fictitious, prefix_tokens
from tools.fictitious import (FictitiousSettings, SynthesisSettings, build_fictitious, gap_shift, interpolate,
                              mean_embedding, modality_gap, noisy_text, save_fictitious_table, synthesize_images)
from tools.prefix_tokens import DISTANCES, nearest_tokens, prefix_neighbours

DIM = TINY_CLIP["embed_dim"]
SENTENCES = ["a red circle", "a blue square above a green triangle", "the big red square", "a small blue circle",
             "a green triangle left of a red circle", "the small square below the big circle"]
NUM_IMAGES = 5


@pytest.fixture(scope="module")
def loaded_clip(clip_name) -> CaptioningClip:
    return CaptioningClip.load(clip_name)


def blob_image(seed: int) -> Image.Image:
    """A coloured disc on a noisy background, so that images differ in more than noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
    rows, columns = np.mgrid[:32, :32]
    centre = rng.integers(8, 24, 2)
    disc = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < rng.integers(20, 60)
    pixels[disc] = rng.integers(80, 256, 3)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, loaded_clip):
    """An images table (with its PNG files) and a corpus table made with the tiny CLIP."""
    root = tmp_path_factory.mktemp("data")
    images_dir = root / "raw"
    (images_dir / "test").mkdir(parents=True)
    file_names = [f"test/image_{index}.png" for index in range(NUM_IMAGES)]
    for index, file_name in enumerate(file_names):
        blob_image(index).save(images_dir / file_name)
    image_features = loaded_clip.encode_images([images_dir / n for n in file_names])
    with TableWriter(root / "images", images_features(DIM), table_description("images", loaded_clip.metadata)) as w:
        w.write({"image_id": [f"image_{index}" for index in range(NUM_IMAGES)], "file_name": file_names,
                 "clip_features": image_features.numpy(), "references": [[] for _ in file_names]})
        w.finish()
    text_features = loaded_clip.encode_text(SENTENCES)
    with TableWriter(root / "corpus", corpus_features(DIM), table_description("corpus", loaded_clip.metadata)) as w:
        w.write({"text": SENTENCES, "clip_features": text_features.numpy(), "source": ["text"] * len(SENTENCES)})
        w.finish()
    return {"images": root / "images", "images_dir": images_dir, "corpus": root / "corpus"}


@pytest.fixture
def captioner_dir(tmp_path, make_config, tiny_tokenizer, clip_name):
    torch.manual_seed(0)
    model = SCSTClipCapForCaptioning(make_config(clip_model_name=clip_name, clip_pretrained=None))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


class PageChecker(HTMLParser):
    """Collects images and text, and every closing tag that does not close the element last opened."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self, page: str):
        super().__init__()
        self.open, self.mismatched, self.images, self.text = [], [], [], []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def checked_page(path) -> PageChecker:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    checker = PageChecker(page)
    assert checker.mismatched == [] and checker.open == []
    return checker


def decoded_png(data_uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(data_uri[len(prefix):])))
    image.load()
    return image


# --- prefix tokens -------------------------------------------------------------------------------------------------

NEAR, ALIGNED, BIG = 0, 1, 2  # per prefix position p, tokens 3 + 3p + {NEAR, ALIGNED, BIG}


def hand_made_captioner(config):
    """Prefix position p is exactly the unit vector e_p; for each p, three tokens are each nearest under one
    distance: NEAR = 0.9 e_p + 0.3 e_(p+4) (Euclidean 0.32), ALIGNED = 3 e_p + 0.1 e_(p+4) (cosine 0.9994) and
    BIG = 10 e_p + 5 e_(p+4) (dot 10). The other tokens point away from every e_p."""
    model = SCSTClipCapForCaptioning(config).eval()
    length, hidden = config.prefix_length, config.decoder_config.n_embd
    prefix = torch.eye(length, hidden)
    embeddings = torch.zeros(config.decoder_config.vocab_size, hidden)
    embeddings[:, 2 * length:] = 0.1 * torch.randn(len(embeddings), hidden - 2 * length,
                                                   generator=torch.Generator().manual_seed(0))
    embeddings[:, :length] = -0.5
    for position in range(length):
        for offset, (along, across) in zip((NEAR, ALIGNED, BIG), ((0.9, 0.3), (3.0, 0.1), (10.0, 5.0))):
            token = 3 + 3 * position + offset
            embeddings[token] = 0
            embeddings[token, position], embeddings[token, position + length] = along, across
    with torch.no_grad():
        model.mapper.model[2].weight.zero_()
        model.mapper.model[2].bias.copy_(prefix.reshape(-1))
        model.get_input_embeddings().weight.copy_(embeddings)
    return model, prefix, embeddings


def brute_force_scores(vector: torch.Tensor, embeddings: torch.Tensor, distance: str) -> list[float]:
    vector, embeddings = vector.double().tolist(), embeddings.double().tolist()
    scores = []
    for row in embeddings:
        dot = sum(a * b for a, b in zip(vector, row))
        if distance == "euclidean":
            scores.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(vector, row))))
        elif distance == "cosine":
            scores.append(dot / math.sqrt(sum(a * a for a in vector) * sum(b * b for b in row)))
        else:
            scores.append(dot)
    return scores


def test_neighbours_are_the_nearest_tokens_under_each_distance(make_config, tiny_tokenizer):
    config = make_config()
    model, prefix, embeddings = hand_made_captioner(config)
    k = 3
    neighbours = prefix_neighbours(model, tokenizer=tiny_tokenizer, prefix_features=torch.randn(2, DIM), k=k)

    assert len(neighbours) == 2 and all(len(image) == config.prefix_length for image in neighbours)
    for image in neighbours:
        for position, entry in enumerate(image):
            assert entry["position"] == position and entry["norm"] == pytest.approx(1.0, abs=1e-5)
            own = [3 + 3 * position + offset for offset in (NEAR, ALIGNED, BIG)]
            assert entry["euclidean"][0]["id"] == own[NEAR]
            assert [item["id"] for item in entry["cosine"]] == [own[ALIGNED], own[NEAR], own[BIG]]
            assert [item["id"] for item in entry["dot"]] == [own[BIG], own[ALIGNED], own[NEAR]]
            assert entry["dot"][0]["token"] == tiny_tokenizer.convert_ids_to_tokens(own[BIG])
            for distance in DISTANCES:
                exact = brute_force_scores(prefix[position], embeddings, distance)
                best = sorted(exact, reverse=distance != "euclidean")[:k]
                listed = entry[distance]
                assert [item["score"] for item in listed] == pytest.approx(best, abs=1e-5)
                assert [exact[item["id"]] for item in listed] == pytest.approx(best, abs=1e-5)


def test_nearest_tokens_refuses_bad_k_and_unknown_distance():
    with pytest.raises(ValueError, match="vocabulary size 4"):
        nearest_tokens(torch.ones(1, 2), torch.ones(4, 2), 5, "cosine")
    with pytest.raises(ValueError, match="unknown distance"):
        nearest_tokens(torch.ones(1, 2), torch.ones(4, 2), 1, "manhattan")


def test_prefix_page_shows_images_captions_and_neighbours(tmp_path, tables, captioner_dir):
    output = tmp_path / "pages" / "prefix_tokens.html"
    argv = ["--model", str(captioner_dir), "--images-table", str(tables["images"]), "--images-dir",
            str(tables["images_dir"]), "--num-images", "3", "--k", "4", "--output", str(output), "--device", "cpu"]
    assert prefix_tokens.main(argv) == 0

    data = json.loads(output.with_suffix(".json").read_text())
    assert [image["image_id"] for image in data["images"]] == ["image_0", "image_1", "image_2"]
    for image in data["images"]:
        assert "image_uri" not in image and len(image["positions"]) == 4
        assert all(len(position[distance]) == 4 for position in image["positions"] for distance in DISTANCES)

    model = SCSTClipCapForCaptioning.from_pretrained(str(captioner_dir)).eval()
    features = torch.from_numpy(feature_matrix(load_table(tables["images"]), stop=3))
    assert [image["caption"] for image in data["images"]] == prefix_tokens.greedy_captions(
        model, model.caption_tokenizer, features)

    page = checked_page(output)
    assert len(page.images) == 3
    shown = decoded_png(page.images[1]["src"])
    assert np.array_equal(np.asarray(shown), np.asarray(Image.open(tables["images_dir"] / "test/image_1.png")))
    text = "".join(page.text)
    assert all(image["caption"] in text for image in data["images"])


def test_prefix_page_names_a_missing_image_file(tmp_path, tables, captioner_dir, capsys):
    argv = ["--model", str(captioner_dir), "--images-table", str(tables["images"]), "--images-dir",
            str(tmp_path / "elsewhere"), "--output", str(tmp_path / "page.html"), "--device", "cpu"]
    assert prefix_tokens.main(argv) == 2
    error = capsys.readouterr().err
    assert "image_0" in error and "test/image_0.png" in error and "--images-dir" in error


def test_prefix_page_feeds_a_raw_reading_model_raw_embeddings(tmp_path, tables, make_config, tiny_tokenizer,
                                                               clip_name, loaded_clip, capsys):
    """A converted ClipCap reads encode_image's raw output: the page captions what the table's features times their
    norms give, and a table without norms is refused in one line."""
    torch.manual_seed(0)
    model = SCSTClipCapForCaptioning(make_config(clip_model_name=clip_name, clip_pretrained=None,
                                                 clip_embedding="raw")).eval()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    paths = [tables["images_dir"] / f"test/image_{index}.png" for index in range(2)]
    raw = loaded_clip.encode_images(paths, normalize=False)
    with TableWriter(tmp_path / "images", images_features(DIM, with_norms=True),
                     table_description("images", loaded_clip.metadata)) as writer:
        writer.write({"image_id": ["image_0", "image_1"], "file_name": [str(path) for path in paths],
                      "clip_features": torch.nn.functional.normalize(raw, dim=-1).numpy(),
                      "clip_features_norm": raw.norm(dim=-1).numpy(), "references": [[], []]})
        writer.finish()
    output = tmp_path / "page.html"
    argv = ["--model", str(tmp_path / "model"), "--output", str(output), "--device", "cpu", "--images-table"]

    assert prefix_tokens.main(argv + [str(tmp_path / "images")]) == 0
    captions = [image["caption"] for image in json.loads(output.with_suffix(".json").read_text())["images"]]
    assert captions == prefix_tokens.greedy_captions(model, tiny_tokenizer, raw)

    capsys.readouterr()
    assert prefix_tokens.main(argv + [str(tables["images"])]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert error.startswith("error: the images table") and "without their norms" in error and "--overwrite" in error


# --- fictitious embeddings -----------------------------------------------------------------------------------------

def unit_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_noisy_text_adds_noise_of_the_given_std_per_dimension():
    text = unit_rows(2000, 512, seed=0)
    assert torch.allclose(noisy_text(text, 0.0), text, atol=1e-6)
    noisy = noisy_text(text, 0.1, torch.Generator().manual_seed(1))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(len(noisy)), atol=1e-5)
    # |t + n|^2 = 1 + sigma^2 D on average, so the cosine with the clean embedding is about 1 / sqrt(1 + sigma^2 D).
    expected = 1 / math.sqrt(1 + 0.1 ** 2 * 512)
    assert float((noisy * text).sum(-1).mean()) == pytest.approx(expected, abs=0.01)


def test_interpolation_runs_from_image_to_text_along_the_great_circle():
    image, text = unit_rows(3, DIM, seed=2), unit_rows(3, DIM, seed=3)
    total = torch.arccos((image * text).sum(-1))
    for mode in ("slerp", "lerp"):
        assert torch.allclose(interpolate(image, text, 0.0, mode), image, atol=1e-6)
        assert torch.allclose(interpolate(image, text, 1.0, mode), text, atol=1e-6)
    quarter = interpolate(image, text, 0.25, "slerp")
    assert torch.allclose(torch.arccos((quarter * image).sum(-1).clamp(-1, 1)), 0.25 * total, atol=1e-4)
    assert torch.allclose(torch.arccos((quarter * text).sum(-1).clamp(-1, 1)), 0.75 * total, atol=1e-4)
    lerped = interpolate(image, text, 0.25, "lerp")
    assert torch.allclose(lerped, torch.nn.functional.normalize(0.75 * image + 0.25 * text, dim=-1), atol=1e-6)
    assert torch.allclose(interpolate(image, image, 0.5, "slerp"), image, atol=1e-6)
    with pytest.raises(ValueError, match="slerp"):
        interpolate(image, text, 0.5, "cubic")


def test_gap_shift_moves_the_text_mean_onto_the_image_mean():
    # Two tight clusters on the sphere, as CLIP's image and text embeddings are.
    image_direction, text_direction = unit_rows(2, DIM, seed=4)
    image = torch.nn.functional.normalize(image_direction + 0.1 * unit_rows(200, DIM, seed=5), dim=-1)
    text = torch.nn.functional.normalize(text_direction + 0.1 * unit_rows(300, DIM, seed=6), dim=-1)
    image_mean, text_mean = image.mean(0), text.mean(0)
    before = modality_gap(image_mean, text_mean)
    shifted = gap_shift(text, image_mean, text_mean)
    assert torch.allclose(shifted.norm(dim=-1), torch.ones(len(shifted)), atol=1e-5)
    assert before > 0.5 and modality_gap(image_mean, shifted.mean(0)) < 0.02 * before
    assert torch.allclose(gap_shift(text, image_mean, text_mean, scale=0.0), text, atol=1e-6)


def test_mean_embedding_reads_the_table_in_chunks():
    features = np.random.default_rng(7).normal(size=(10, DIM)).astype(np.float32)
    table = Dataset.from_dict({"clip_features": features}, features=Features({"clip_features": feature_column(DIM)}))
    assert np.allclose(mean_embedding(table, chunk_rows=3).numpy(), features.mean(0), atol=1e-6)


def test_fictitious_table_round_trips_with_its_clip_metadata(tmp_path, tables, loaded_clip):
    images, corpus = load_table(tables["images"]), load_table(tables["corpus"])
    settings = FictitiousSettings(count=2, sigma=0.2, alphas=(0.0, 0.5, 1.0), seed=3)
    made = build_fictitious(images, corpus, settings)
    kinds = [item.kind for item in made]
    assert kinds == ["noisy_text"] * 2 + ["interpolation"] * 6 + ["gap_shifted"] * 2
    assert [item.parameter for item in made if item.kind == "interpolation"] == [0.0, 0.5, 1.0] * 2

    image_rows = {row["image_id"]: np.array(row["clip_features"]) for row in images}
    text_rows = {row["text"]: np.array(row["clip_features"]) for row in corpus}
    first_pair = made[2].source  # "slerp image <id> -> text '<sentence>'"
    image_id, sentence = first_pair.split(" ")[2], first_pair.split("text ", 1)[1][1:-1]
    assert np.allclose(made[2].features.numpy(), image_rows[image_id], atol=1e-5)
    assert np.allclose(made[4].features.numpy(), text_rows[sentence], atol=1e-5)

    saved = save_fictitious_table(made, tmp_path / "fictitious_table", read_clip_metadata(images), note="test")
    reloaded = load_table(tmp_path / "fictitious_table", expected_clip=loaded_clip.metadata)
    assert read_clip_metadata(tmp_path / "fictitious_table") == loaded_clip.metadata == read_clip_metadata(saved)
    assert reloaded.column_names == ["kind", "source", "parameter", "clip_features"]
    assert reloaded["kind"] == kinds and reloaded["source"] == [item.source for item in made]
    assert np.allclose(reloaded["parameter"], [item.parameter for item in made])
    assert np.allclose(feature_matrix(reloaded), torch.stack([item.features for item in made]).numpy(), atol=1e-6)


def test_synthesis_raises_the_cosine_with_the_target(loaded_clip):
    targets = loaded_clip.encode_images([blob_image(11), blob_image(12)])
    results = synthesize_images(loaded_clip, targets, SynthesisSettings(steps=25, augmentations=4, seed=0))
    for target, result in zip(targets, results):
        assert result.image.size == (32, 32) and len(result.history) == 25
        assert result.final_cosine > result.start_cosine + 0.05
        assert np.mean(result.history[-5:]) > np.mean(result.history[:5])
        # The reported cosine is that of the saved 8-bit image, through the CLIP's own preprocessing.
        again = loaded_clip.encode_images([result.image])[0]
        assert float(again @ target) == pytest.approx(result.final_cosine, abs=1e-5)


def test_fictitious_cli_writes_table_figure_and_page(tmp_path, tables, captioner_dir, loaded_clip):
    output = tmp_path / "fictitious"
    argv = ["--model", str(captioner_dir), "--images-table", str(tables["images"]), "--corpus-table",
            str(tables["corpus"]), "--output-dir", str(output), "--steps", "3", "--count", "1", "--alphas", "0", "1",
            "--augmentations", "2", "--device", "cpu"]
    assert fictitious.main(argv) == 0

    table = load_table(output / "fictitious_table", expected_clip=loaded_clip.metadata)
    assert table["kind"] == ["noisy_text", "interpolation", "interpolation", "gap_shifted"]
    figure = Image.open(output / "fictitious.png")
    figure.load()
    assert figure.format == "PNG" and min(figure.size) > 100

    numbers = json.loads((output / "fictitious.json").read_text())
    assert len(numbers["rows"]) == 4 and numbers["summary"]["steps"] == 3
    page = checked_page(output / "fictitious.html")
    assert len(page.images) == 4 and decoded_png(page.images[0]["src"]).size == (32, 32)
    text = "".join(page.text)
    assert all(row["caption"] in text and row["image_caption"] in text for row in numbers["rows"])


def test_fictitious_cli_refuses_a_corpus_of_another_clip(tmp_path, tables, captioner_dir, capsys):
    other = CaptioningClip.load(make_tiny_clip(tmp_path / "other_clip", seed=1))
    with TableWriter(tmp_path / "corpus", corpus_features(DIM), table_description("corpus", other.metadata)) as w:
        w.write({"text": ["a"], "clip_features": np.ones((1, DIM), np.float32) / 4, "source": ["text"]})
        w.finish()
    argv = ["--model", str(captioner_dir), "--images-table", str(tables["images"]), "--corpus-table",
            str(tmp_path / "corpus"), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert fictitious.main(argv) == 2
    assert "corpus table" in capsys.readouterr().err


def test_fictitious_cli_refuses_a_model_that_reads_raw_embeddings(tmp_path, tables, make_config, tiny_tokenizer,
                                                                  clip_name, capsys):
    model = SCSTClipCapForCaptioning(make_config(clip_model_name=clip_name, clip_pretrained=None,
                                                 clip_embedding="raw"))
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--images-table", str(tables["images"]), "--corpus-table",
            str(tables["corpus"]), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert fictitious.main(argv) == 2
    assert "reads raw CLIP embeddings" in capsys.readouterr().err
