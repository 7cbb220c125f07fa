"""The captioning pipeline and `caption_images`: a tiny captioner and a tiny open_clip model made here, saved as
folders, loaded through the real code paths (open_clip `local-dir:`, `pipeline(..., trust_remote_code=True)`)."""

import json
import os
import re
import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from conftest import make_tiny_clip, run_script_outside_the_project, tiny_decoder_config, write_random_images

from dataprep.clip import LoadedClip, clip_metadata, encode_images, encode_texts, load_clip
from modeling_scstclipcap import SCSTClipCapForCaptioning
from pipeline_scstclipcap import (
    PIPELINE_TASK,
    CaptioningClip,
    SCSTClipCapPipeline,
    bundle_clip,
    custom_pipelines,
    make_pipeline_ready,
)



@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[str]:
    """Four different images, one of them greyscale, of another size than the CLIP's input."""
    return write_random_images(tmp_path_factory.mktemp("images"), 4, greyscale_last=True)


def save_captioner(folder, make_config, tokenizer, clip_name: str, image_paths: list[str]):
    """A random tiny captioner that tells these images apart. A random CLIP maps all images close to one direction,
    so the mapper's input is centred on their mean and amplified. It never writes padding nor stops early."""
    torch.manual_seed(0)
    config = make_config(
        clip_model_name=clip_name, clip_pretrained=None, decoder_config=tiny_decoder_config(vocab_size=len(tokenizer))
    )
    model = SCSTClipCapForCaptioning(config).eval()
    clip_model, preprocess, _ = load_clip(clip_name)
    features = encode_images(clip_model, preprocess, image_paths)
    with torch.no_grad():
        first_layer = model.mapper.model[0]
        first_layer.weight.mul_(100)
        first_layer.bias.copy_(-first_layer.weight @ features.mean(0))
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, tokenizer.eos_token_id]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture
def model_dir(tmp_path, make_config, tiny_tokenizer, clip_name, image_paths):
    folder = tmp_path / "model"
    save_captioner(folder, make_config, tiny_tokenizer, clip_name, image_paths)
    return folder


def expected_captions(model_dir, clip_name, paths, **generation_kwargs) -> list[str]:
    """What the model writes from the images' CLIP features made the way the tables make them."""
    clip_model, preprocess, _ = load_clip(clip_name)
    features = encode_images(clip_model, preprocess, paths)
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()
    token_ids = model.generate(features, **generation_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def as_outputs(captions: list[str]) -> list[list[dict]]:
    return [[{"generated_text": caption}] for caption in captions]


def load_pipeline(model_dir, **kwargs) -> SCSTClipCapPipeline:
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    return SCSTClipCapPipeline(model=model, tokenizer=tokenizer, device="cpu", **kwargs)


PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from PIL import Image
    from transformers import pipeline
    folder, paths = sys.argv[1], json.loads(sys.argv[2])
    assert not any("scstclipcap" in name for name in sys.modules)
    captioner = pipeline(model=folder, trust_remote_code=True)
    print(json.dumps({
        "single": captioner(paths[0], max_new_tokens=7),
        "pil": captioner(Image.open(paths[1]), max_new_tokens=7),
        "batched": captioner(paths, batch_size=3, generate_kwargs={"max_new_tokens": 7}),
        "pipeline_module": type(captioner).__module__,
        "model_module": type(captioner.model).__module__,
        "task": captioner.task,
        "clip": captioner.clip.reference,
    }))
    """
)


def test_pipeline_in_a_fresh_process_captions_as_generate_on_table_features(
    tmp_path, make_config, tiny_tokenizer, image_paths, monkeypatch
):
    # The config names the CLIP by a path relative to the training directory, as train.py records it; from
    # anywhere else only the CLIP bundled in the model folder can serve.
    monkeypatch.chdir(tmp_path)
    make_tiny_clip(tmp_path / "data" / "clip", seed=0)
    relative_clip = "local-dir:data/clip"
    folder = tmp_path / "model"
    save_captioner(folder, make_config, tiny_tokenizer, relative_clip, image_paths)
    assert make_pipeline_ready(folder) == folder / "clip"
    report = run_script_outside_the_project(PIPELINE_SCRIPT, [folder, json.dumps(image_paths)], tmp_path)

    expected = expected_captions(folder, relative_clip, image_paths, max_new_tokens=7)
    assert len(set(expected)) > 1, "the images should lead to different captions"
    assert report["batched"] == as_outputs(expected)
    assert report["single"] == [{"generated_text": expected[0]}]
    assert report["pil"] == [{"generated_text": expected[1]}]
    assert report["pipeline_module"].startswith("transformers_modules")
    assert report["model_module"].startswith("transformers_modules")
    assert report["task"] == PIPELINE_TASK
    assert report["clip"].endswith(os.path.join("model", "clip"))


def test_batching_and_generation_settings(model_dir, clip_name, image_paths):
    captioner = load_pipeline(model_dir)
    assert captioner(image_paths, batch_size=3) == captioner(image_paths, batch_size=1)
    assert captioner(image_paths, batch_size=3) == as_outputs(
        expected_captions(model_dir, clip_name, image_paths, max_new_tokens=30)
    )

    short = load_pipeline(model_dir, max_new_tokens=3)
    three = expected_captions(model_dir, clip_name, image_paths, max_new_tokens=3)
    assert short(image_paths, batch_size=2) == as_outputs(three)
    assert all(len(caption.split()) <= 3 for caption in three)
    assert short(image_paths[0], max_new_tokens=5) == [
        {"generated_text": expected_captions(model_dir, clip_name, image_paths[:1], max_new_tokens=5)[0]}
    ]

    beams = captioner(image_paths[:2], batch_size=2, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    expected = expected_captions(model_dir, clip_name, image_paths[:2], num_beams=3, num_return_sequences=2,
                                 max_new_tokens=6)
    assert beams == [[{"generated_text": caption} for caption in expected[start : start + 2]] for start in (0, 2)]


def test_bad_arguments_say_what_is_wrong(model_dir, image_paths):
    captioner = load_pipeline(model_dir)
    with pytest.raises(ValueError, match="max_new_tokens.*both directly and in generate_kwargs"):
        captioner(image_paths[0], max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})
    with pytest.raises(TypeError, match="unexpected arguments \\['colour'\\]"):
        captioner(image_paths[0], colour="red")
    with pytest.raises(TypeError, match="PIL image, a file path or a URL, got int"):
        captioner(3)


def test_unreadable_images_are_named(model_dir, image_paths, tmp_path):
    captioner = load_pipeline(model_dir)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    with pytest.raises(ValueError, match=re.escape(f"Cannot read the image {corrupt}")):
        captioner(str(corrupt))
    with pytest.raises(ValueError, match=re.escape(f"Cannot read the image {corrupt}")):
        captioner([image_paths[0], str(corrupt)], batch_size=2)
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=re.escape(f"No image file at {missing}")):
        captioner([str(missing)])


def test_caption_images_shares_the_pipeline(model_dir, clip_name, image_paths):
    make_pipeline_ready(model_dir)
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()
    assert model.caption_clip.reference == f"local-dir:{model_dir / 'clip'}"
    expected = expected_captions(model_dir, clip_name, image_paths, max_new_tokens=6)
    assert model.caption_images(image_paths, batch_size=3, max_new_tokens=6) == expected
    assert model.caption_images(Image.open(image_paths[2]), max_new_tokens=6) == expected[2:3]
    other_clip = CaptioningClip.load(clip_name)
    assert model.caption_images(image_paths, clip=other_clip, max_new_tokens=6) == expected


def test_bundled_clip_wins_over_the_config_reference(model_dir, clip_name, image_paths, tmp_path):
    config = SCSTClipCapForCaptioning.from_pretrained(model_dir).config
    assert CaptioningClip.for_captioner(config, model_dir).reference == clip_name

    other_clip = make_tiny_clip(tmp_path / "other_clip", seed=1)
    assert bundle_clip(model_dir, other_clip) == model_dir / "clip"
    clip = CaptioningClip.for_captioner(config, model_dir)
    other_model, other_preprocess, _ = load_clip(other_clip)
    torch.testing.assert_close(clip.encode_images(image_paths, batch_size=3),
                               encode_images(other_model, other_preprocess, image_paths))
    assert load_pipeline(model_dir).clip.reference == f"local-dir:{model_dir / 'clip'}"

    config.clip_model_name = f"local-dir:{tmp_path / 'nowhere'}"
    (tmp_path / "folder_without_clip").mkdir()
    with pytest.raises(FileNotFoundError, match="nowhere is not there.*bundle_clip"):
        CaptioningClip.for_captioner(config, tmp_path / "folder_without_clip")
    with pytest.raises(ValueError, match="Only a local-dir: CLIP can be bundled"):
        bundle_clip(model_dir, "ViT-B-32")


def test_the_captioning_clip_is_the_one_tables_rewards_and_clip_s_load(clip_name, image_paths, tmp_path):
    clip = LoadedClip.load(clip_name)
    assert isinstance(clip, CaptioningClip)
    model, preprocess, tokenizer = load_clip(clip_name)
    torch.testing.assert_close(clip.encode_images(image_paths, batch_size=3),
                               encode_images(model, preprocess, image_paths))
    texts = ["a red circle", "a blue square above a green triangle"]
    torch.testing.assert_close(clip.encode_text(texts), encode_texts(model, tokenizer, texts))
    assert clip.metadata == clip_metadata(clip_name, None, 16, True, float(model.logit_scale.exp()))

    with pytest.raises(FileNotFoundError, match="nowhere is not there"):
        load_clip(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="'ViT-B-32' needs pretrained weights"):
        load_clip("ViT-B-32")


def test_saved_folders_carry_the_pipeline_as_transformers_saves_it(model_dir, tmp_path):
    assert "pipeline_scstclipcap.py" in os.listdir(model_dir), "save_pretrained copies the model code's imports"
    make_pipeline_ready(model_dir)
    written = json.loads((model_dir / "config.json").read_text())["custom_pipelines"]
    assert written == custom_pipelines()

    saved = tmp_path / "saved_by_the_pipeline"
    load_pipeline(model_dir).save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["custom_pipelines"] == written
    assert {"pipeline_scstclipcap.py", "modeling_scstclipcap.py", "configuration_scstclipcap.py"} <= set(
        os.listdir(saved)
    )
    assert (saved / "clip" / "open_clip_config.json").read_text() == (
        model_dir / "clip" / "open_clip_config.json"
    ).read_text()
