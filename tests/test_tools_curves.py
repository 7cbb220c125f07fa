"""tools/curves.py and tools/captions_page.py on a small run folder written here by hand (trainer states, rewards,
predictions, a few PNG images and an images table whose CLIP is a tiny random open_clip saved as a `local-dir:`
folder)."""

import base64
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from clip_scstclipcap import CaptioningClip, read_clip_metadata
from tools import captions_page, curves

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGE_IDS = [f"img_{index}" for index in range(6)]
INIT_CAPTIONS = {image_id: f"a small {colour} circle on the left." for image_id, colour in
                 zip(IMAGE_IDS, ("red", "blue", "green", "purple", "yellow", "orange"))}
SCST_CAPTIONS = {image_id: f"a large {colour} square <b>&amp</b> above a triangle." for image_id, colour in
                 zip(IMAGE_IDS, ("red", "blue", "green", "purple", "yellow", "orange"))}
SUPERVISED_CAPTIONS = {image_id: "two shapes." for image_id in IMAGE_IDS}


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def write_state(path: Path, history: list[dict], best_step: int | None = None) -> None:
    write_json(path, {"global_step": history[-1]["step"], "best_global_step": best_step, "log_history": history})


def write_predictions(path: Path, captions: dict[str, str]) -> None:
    write_json(path, [{"image_id": image_id, "caption": caption} for image_id, caption in captions.items()])


def init_history() -> list[dict]:
    history = [{"step": step, "loss": 4 / step, "reconstruction_loss": 3 / step, "pseudo_pair_loss": 1 / step,
                "learning_rate": 1e-3 * (1 - step / 200), "grad_norm": 1.0 + step % 3} for step in range(5, 101, 5)]
    history += [{"step": step, "eval_cider": step / 50, "eval_attribute_precision": 0.8, "eval_attribute_recall": 0.5}
                for step in (50, 100)]
    return history + [{"step": 100, "train_runtime": 3.0, "train_loss": 1.0, "total_flos": 7.0}]


def scst_history(last_step: int) -> list[dict]:
    rng = np.random.default_rng(0)
    history = [{"step": step, "loss": -0.01 * step, "policy_loss": -0.01 * step, "discriminator_loss": 0.7,
                "discriminator_accuracy_real": 0.5 + step / 40, "discriminator_accuracy_fake": 0.6,
                "reward": float(rng.normal()), "reward_greedy": float(rng.normal()),
                "reward_clip_cos": 20 + step, "reward_naturalness": 0.4, "semantic_share": min(0.5, step / 10),
                "caption_length": 9.5, "distinct_1": 0.1, "distinct_2": 0.2, "repeated_word_share": 0.0,
                "same_caption_share": 0.3} for step in range(1, last_step + 1)]
    return history + [{"step": step, "eval_cider": 2.0 + step / 100, "eval_attribute_precision": 0.9}
                      for step in (5, 10) if step <= last_step]


def write_rewards(path: Path) -> None:
    rng = np.random.default_rng(1)
    lines = [json.dumps({"step": step, "reward": rng.normal(step, 1, 8).tolist(),
                         "reward_clip_cos": rng.normal(20 + step, 2, 8).tolist(),
                         "reward_naturalness": rng.uniform(0, 1, 8).tolist(),
                         "caption_length": rng.integers(5, 12, 8).tolist()}) for step in range(1, 11)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """init: its own trainer_state.json and test predictions; scst: two checkpoints (states only there), rewards,
    test predictions; supervised: a trainer state and only validation predictions."""
    run = tmp_path / "run"
    write_state(run / "init" / "trainer_state.json", init_history(), best_step=100)
    write_predictions(run / "init" / curves.TEST_PREDICTIONS, INIT_CAPTIONS)
    write_state(run / "scst" / "checkpoint-2" / "trainer_state.json", scst_history(2))
    write_state(run / "scst" / "checkpoint-10" / "trainer_state.json", scst_history(10), best_step=10)
    write_rewards(run / "scst" / "rewards.jsonl")
    write_predictions(run / "scst" / curves.TEST_PREDICTIONS, SCST_CAPTIONS)
    write_state(run / "supervised" / "trainer_state.json", init_history()[:5])
    write_predictions(run / "supervised" / "val_predictions" / "predictions-step-5.json", {"img_0": "early."})
    write_predictions(run / "supervised" / "val_predictions" / "predictions-step-20.json", SUPERVISED_CAPTIONS)
    (run / "report.md").write_text("# Run report\n")
    return run


@pytest.fixture
def images(tmp_path, clip_name) -> tuple[str, Path]:
    """(images table, images folder): six coloured PNGs; each image's `clip_features` is the CLIP text feature of
    its init caption, so that caption's CLIP similarity to it is 1."""
    images_dir = tmp_path / "images"
    (images_dir / "test").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for image_id in IMAGE_IDS:
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / "test" / f"{image_id}.png")
    clip = CaptioningClip.load(clip_name)
    features = clip.encode_text([INIT_CAPTIONS[image_id] for image_id in IMAGE_IDS])
    table = datasets.Dataset.from_dict(
        {"image_id": IMAGE_IDS, "file_name": [f"test/{image_id}.png" for image_id in IMAGE_IDS],
         "clip_features": features.tolist(),
         "references": [[f"reference {image_id} one.", f"reference {image_id} two."] for image_id in IMAGE_IDS]},
        info=datasets.DatasetInfo(description=json.dumps({"table": "images", "clip": clip.metadata})))
    table.save_to_disk(str(tmp_path / "table"))
    return str(tmp_path / "table"), images_dir


def assert_png_drawn(path: Path, min_width: int = 400, min_height: int = 250) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= min_height
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # lines, text and images, not an empty canvas


def panel_titles(run_dir: Path) -> list[str]:
    return [panel.title for panel in curves.panels_with_data(curves.stage_logs(run_dir))]


# ---- training curves


def test_training_curves_of_a_run_folder(run_dir, tmp_path):
    output = curves.plot_training_curves(run_dir, tmp_path / "out" / "curves.png")
    assert_png_drawn(output, min_width=1000, min_height=600)
    titles = panel_titles(run_dir)
    for title in ("loss", "init loss terms", "policy loss", "discriminator loss", "discriminator accuracy",
                  "reward (samples vs greedy)", "CLIP-cos reward", "naturalness reward", "semantic share w",
                  "sampled caption length (words)", "sampled caption diversity", "learning rate", "validation CIDEr",
                  "validation attributes"):
        assert title in titles
    assert not {"MMD", "CLIP-agg cos reward", "validation COCO metrics", "validation loss"} & set(titles)


def test_stages_come_in_training_order_and_the_newest_checkpoint_is_read(run_dir):
    logs = curves.stage_logs(run_dir)
    assert list(logs) == ["init", "scst", "supervised"]
    steps, _ = logs["scst"]["series"]["policy_loss"]
    assert steps.max() == 10  # checkpoint-10, not checkpoint-2 (which sorts after it as text)
    assert logs["init"]["best_step"] == 100
    assert "train_runtime" not in {key for panel in curves.panels_with_data(logs) for key in panel.keys}


def test_single_stage_folder_and_a_loss_term_equal_to_the_loss_is_not_drawn_twice(tmp_path):
    stage = tmp_path / "init"
    history = [{"step": step, "loss": 2 / step, "reconstruction_loss": 2 / step} for step in range(1, 60)]
    write_state(stage / "checkpoint-59" / "trainer_state.json", history)
    assert panel_titles(stage) == ["loss"]
    assert_png_drawn(curves.plot_training_curves(stage, tmp_path / "single.png"), min_width=300)


def test_run_folder_without_trainer_state_names_what_is_missing(tmp_path):
    run = tmp_path / "empty_run"
    write_json(run / "init" / "run_info.json", {"stage": "init"})
    with pytest.raises(FileNotFoundError, match=r"trainer_state\.json.*checkpoint-\*/trainer_state\.json") as error:
        curves.plot_training_curves(run, tmp_path / "curves.png")
    assert str(run) in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"nothing to plot.*rewards\.jsonl.*predictions"):
        curves.plot_histograms(run, tmp_path / "histograms.png")
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        curves.plot_training_curves(tmp_path / "nowhere", tmp_path / "curves.png")


def test_trainer_state_without_log_history_is_refused(tmp_path):
    state = write_json(tmp_path / "init" / "trainer_state.json", {"global_step": 3})
    with pytest.raises(ValueError, match=re.escape(str(state)) + ".*log_history"):
        curves.plot_training_curves(tmp_path, tmp_path / "curves.png")


# ---- histograms


def test_histograms_without_images_table(run_dir, tmp_path):
    assert_png_drawn(curves.plot_histograms(run_dir, tmp_path / "histograms.png"), min_width=800)
    first, last = curves.read_first_and_last(run_dir / "scst" / "rewards.jsonl")
    assert (first["step"], last["step"]) == (1, 10)
    # Latest validation predictions by step number (step-20, not step-5) where a stage has no test predictions.
    assert curves.predictions_file(run_dir / "supervised").name == "predictions-step-20.json"


def test_clip_similarity_of_a_caption_to_its_own_text_feature_is_one(images):
    table, _ = images
    own = curves.caption_similarities(INIT_CAPTIONS, table)
    np.testing.assert_allclose(own, 1.0, atol=1e-5)
    swapped = dict(zip(IMAGE_IDS, [INIT_CAPTIONS[image_id] for image_id in IMAGE_IDS[1:] + IMAGE_IDS[:1]]))
    assert curves.caption_similarities(swapped, table).max() < 0.9999


def test_clip_similarity_runs_the_text_tower_on_the_captions_positions_with_the_whole_contexts_features(
        images, monkeypatch):
    """The captions' CLIP features are computed on the positions up to the longest caption's end token, and give
    the cosines of open_clip's encode_text on the whole context."""
    table, _ = images
    load, widths = curves.CaptioningClip.load, []

    def load_with_hook(*args, **kwargs):
        clip = load(*args, **kwargs)
        clip.model.transformer.register_forward_hook(lambda _, inputs, __: widths.append(inputs[0].shape[1]))
        return clip

    monkeypatch.setattr(curves.CaptioningClip, "load", load_with_hook)
    similarities = curves.caption_similarities(SCST_CAPTIONS, table)
    clip = load(read_clip_metadata(table)["model_name"])
    tokens = clip.tokenizer([SCST_CAPTIONS[image_id] for image_id in IMAGE_IDS])
    with torch.no_grad():
        full = torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1)
    images_features = torch.tensor(datasets.load_from_disk(table)["clip_features"])
    np.testing.assert_allclose(similarities, (full * images_features).sum(-1).numpy(), atol=1e-6)
    # the first pass, on one word, is the metadata's embedding_dim check
    assert widths[1:] == [int((tokens != 0).sum(dim=1).max())] and widths[1] < tokens.shape[1]


def test_curves_cli_with_images_table(run_dir, images, tmp_path, capsys):
    table, _ = images
    written = curves.main([str(run_dir), "--output-dir", str(tmp_path / "plots"), "--images-table", table])
    assert [path.name for path in written] == ["training_curves.png", "histograms.png"]
    for path in written:
        assert_png_drawn(path, min_width=800)
    assert "histograms.png" in capsys.readouterr().out


def test_predictions_outside_the_images_table_are_refused(run_dir, images, tmp_path):
    table, _ = images
    write_predictions(run_dir / "init" / curves.TEST_PREDICTIONS, {**INIT_CAPTIONS, "val_7": "a red circle."})
    with pytest.raises(ValueError, match=r"init/final/test_predictions/predictions-step-0\.json.*'val_7'"):
        curves.plot_histograms(run_dir, tmp_path / "histograms.png", table)


def test_unreadable_rewards_line_is_named(run_dir, tmp_path):
    with open(run_dir / "scst" / "rewards.jsonl", "a") as handle:
        handle.write('{"step": 11, "reward": [0.1,\n')
    with pytest.raises(ValueError, match=r"rewards\.jsonl, line 11"):
        curves.plot_histograms(run_dir, tmp_path / "histograms.png")


# ---- captions page and grid


class PageReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def read_page(path: Path) -> PageReader:
    reader = PageReader()
    reader.feed(path.read_text(encoding="utf-8"))
    reader.close()
    return reader


def stage_predictions() -> dict[str, dict[str, str]]:
    return {"init": INIT_CAPTIONS, "scst": SCST_CAPTIONS}


def test_captions_page_is_self_contained_and_shows_every_stage(images, tmp_path):
    table, images_dir = images
    page = captions_page.write_captions_page(stage_predictions(), table, str(images_dir), tmp_path / "c.html",
                                             num_images=4)
    reader = read_page(page)
    assert len(reader.images) == 4
    text = " ".join(reader.text)
    for attributes in reader.images:
        prefix = "data:image/png;base64,"
        assert attributes["src"].startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(attributes["src"][len(prefix):]))) as embedded:
            assert embedded.size == (24, 24)
        image_id = attributes["alt"]
        # The markup in the scst captions arrives as text: it was escaped, not injected.
        for captions in stage_predictions().values():
            assert captions[image_id] in text
        assert f"reference {image_id} one." in text and f"reference {image_id} two." not in text


def test_sample_is_seeded_and_the_grid_shows_a_subset_of_the_page(images):
    table, _ = images
    first = captions_page.sample_images(stage_predictions(), table, 4, seed=0)
    assert first == captions_page.sample_images(stage_predictions(), table, 4, seed=0)
    assert {s.image_id for s in captions_page.sample_images(stage_predictions(), table, 2, seed=0)} \
        <= {s.image_id for s in first}
    assert [s.row for s in first] == sorted(s.row for s in first)
    only_some = {"init": INIT_CAPTIONS, "scst": {"img_1": "x.", "img_4": "y."}}
    assert {s.image_id for s in captions_page.sample_images(only_some, table, 6)} == {"img_1", "img_4"}


def test_captions_page_with_scenes_judges_each_caption(images, tmp_path):
    table, images_dir = images
    scene = {"objects": [{"colour": "red", "shape": "circle", "size": "small", "position": "left",
                          "texture": "solid", "center": [5, 5], "radius": 3}],
             "relation": None, "background": "dark", "distractors": [{"rgb": [1, 2, 3]}]}
    predictions = {"right": {"img_0": "a small red circle."}, "wrong": {"img_0": "a large blue square."}}
    page = captions_page.write_captions_page(predictions, table, str(images_dir), tmp_path / "s.html",
                                             scenes={"img_0": scene})
    text = " ".join(read_page(page).text)
    assert "small red circle (left); dark background; 1 distractor" in text
    assert "3/3 attributes true" in text and "0/3 attributes true" in text


def test_missing_image_file_names_the_file_and_the_row(images, tmp_path):
    table, images_dir = images
    (images_dir / "test" / "img_3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"test/img_3\.png.*row 3 \(image_id 'img_3'\)"):
        captions_page.write_captions_page(stage_predictions(), table, str(images_dir), tmp_path / "c.html",
                                          num_images=6)


def test_captions_grid_png(images, tmp_path):
    table, images_dir = images
    grid = captions_page.write_captions_grid(stage_predictions(), table, str(images_dir), tmp_path / "grid.png",
                                             num_images=6, columns=3)
    assert_png_drawn(grid, min_width=1000, min_height=600)


def test_captions_page_cli_writes_into_the_run_folder(run_dir, images):
    table, images_dir = images
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "tools" / "captions_page.py"), str(run_dir), "--images-table", table,
         "--images-dir", str(images_dir), "--num-images", "5", "--grid-images", "3"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reader = read_page(run_dir / "captions.html")
    assert len(reader.images) == 5
    text = " ".join(reader.text)
    # Only stages with test predictions: supervised has validation predictions alone.
    assert INIT_CAPTIONS[reader.images[0]["alt"]] in text and "two shapes." not in text
    assert_png_drawn(run_dir / "captions.png", min_width=800)


def test_captions_page_cli_without_test_predictions_says_what_is_missing(tmp_path, images):
    table, images_dir = images
    (tmp_path / "run" / "init").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"final/test_predictions/predictions-step-0\.json"):
        captions_page.main([str(tmp_path / "run"), "--images-table", table, "--images-dir", str(images_dir)])
