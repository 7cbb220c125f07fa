"""The captioning pipeline and `caption_images`: a tiny captioner and a tiny open_clip model made here, saved as
folders, loaded through the real code paths (open_clip `local-dir:`, `pipeline(..., trust_remote_code=True)`)."""

import base64
import functools
import http.server
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

import clip_scstclipcap
from conftest import (
    PROJECT_ROOT,
    make_tiny_clip,
    run_script_outside_the_project,
    tiny_decoder_config,
    write_random_images,
)

from clip_scstclipcap import CaptioningClip, clip_metadata
from modeling_scstclipcap import SCSTClipCapForCaptioning
from pipeline_scstclipcap import (
    PIPELINE_TASK,
    SCSTClipCapPipeline,
    bundle_clip,
    custom_pipelines,
    make_pipeline_ready,
)
from trainers.rewards import ClipRewards


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
    features = CaptioningClip.load(clip_name).encode_images(image_paths)
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
    features = table_features(CaptioningClip.load(clip_name), paths)
    return captions_of_features(model_dir, features, **generation_kwargs)


def table_features(clip: CaptioningClip, paths) -> torch.Tensor:
    """The images' features as `prepare_datasets.py` streams them into a table."""
    return torch.cat([batch.features for batch in clip.iter_image_features(paths)])


def captions_of_features(model_dir, features, **generation_kwargs) -> list[str]:
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
    torch.testing.assert_close(clip.encode_images(image_paths, batch_size=3),
                               table_features(CaptioningClip.load(other_clip), image_paths))
    assert load_pipeline(model_dir).clip.reference == f"local-dir:{model_dir / 'clip'}"

    config.clip_model_name = f"local-dir:{tmp_path / 'nowhere'}"
    (tmp_path / "folder_without_clip").mkdir()
    with pytest.raises(FileNotFoundError, match="nowhere is not there.*bundle_clip"):
        CaptioningClip.for_captioner(config, tmp_path / "folder_without_clip")
    with pytest.raises(ValueError, match="Only a local-dir: CLIP can be bundled"):
        bundle_clip(model_dir, "ViT-B-32")


def test_captioning_and_the_tables_encode_through_one_clip(clip_name, image_paths, tmp_path):
    """Captioning's in-process encoders and the tables' streaming iterators are methods of one object sharing one
    image and one sentence encoding step: the same features to the bit, and the raw embeddings' norms."""
    clip = CaptioningClip.load(clip_name)
    streamed = list(clip.iter_image_features(image_paths, batch_size=3))
    assert [index for batch in streamed for index in batch.indices] == list(range(len(image_paths)))
    assert not any(batch.failures for batch in streamed)
    assert torch.equal(torch.cat([batch.features for batch in streamed]), clip.encode_images(image_paths, batch_size=3))
    raw = clip.encode_images(image_paths, batch_size=3, normalize=False)
    assert torch.equal(torch.cat([batch.norms for batch in streamed]), raw.norm(dim=-1))

    texts = ["a red circle", "a blue square above a green triangle"]
    streamed = list(clip.iter_text_features(texts, batch_size=1))
    assert torch.equal(torch.cat([batch.features for batch in streamed]), clip.encode_text(texts, batch_size=1))
    assert torch.equal(torch.cat([batch.norms for batch in streamed]),
                       clip.encode_text(texts, batch_size=1, normalize=False).norm(dim=-1))
    assert clip.metadata == clip_metadata(clip_name, None, 16, True, float(clip.model.logit_scale.exp()))

    with pytest.raises(FileNotFoundError, match="nowhere is not there"):
        CaptioningClip.load(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="'ViT-B-32' needs pretrained weights"):
        CaptioningClip.load("ViT-B-32")


HUB_FOLDER_CLIP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoModel
    folder, paths, sentences = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    assert not any("scstclipcap" in name for name in sys.modules)
    clip = AutoModel.from_pretrained(folder, trust_remote_code=True).caption_clip
    print(json.dumps({
        "images": clip.encode_images(paths, batch_size=3).tolist(),
        "sentences": clip.text_encoder(sentences).tolist(),
        "clip_module": type(clip).__module__,
    }))
    """
)


def test_the_hub_folder_encodes_images_and_sentences_as_training_did(model_dir, clip_name, image_paths, tmp_path):
    """The CLIP code a saved folder carries, run as remote code, against the tables' image features and the scst
    rewards' sentence features."""
    make_pipeline_ready(model_dir)
    sentences = ["a red circle.", "a small blue square above a green triangle on a striped background."]
    report = run_script_outside_the_project(
        HUB_FOLDER_CLIP_SCRIPT, [model_dir, json.dumps(image_paths), json.dumps(sentences)], tmp_path)
    assert report["clip_module"].startswith("transformers_modules")

    clip = CaptioningClip.load(clip_name)
    reward_features = ClipRewards(clip).encode_text(sentences)
    torch.testing.assert_close(torch.tensor(report["images"]), table_features(clip, image_paths))
    torch.testing.assert_close(torch.tensor(report["sentences"]), reward_features)


def test_saved_folders_carry_the_pipeline_as_transformers_saves_it(model_dir, tmp_path):
    assert "clip_scstclipcap.py" in os.listdir(model_dir), "save_pretrained copies the model code's imports"
    make_pipeline_ready(model_dir)
    assert "pipeline_scstclipcap.py" in os.listdir(model_dir)
    written = json.loads((model_dir / "config.json").read_text())["custom_pipelines"]
    assert written == custom_pipelines()

    saved = tmp_path / "saved_by_the_pipeline"
    load_pipeline(model_dir).save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["custom_pipelines"] == written
    assert {"pipeline_scstclipcap.py", "clip_scstclipcap.py", "modeling_scstclipcap.py",
            "configuration_scstclipcap.py"} <= set(
        os.listdir(saved)
    )
    assert (saved / "clip" / "open_clip_config.json").read_text() == (
        model_dir / "clip" / "open_clip_config.json"
    ).read_text()


DECODED_BYTES_PER_PIXEL = 4  # PIL holds RGB, RGBA and CMYK pixels in 32 bits


def png_claiming_size(path: Path, width: int, height: int):
    """A PNG whose header claims `width` x `height` pixels (with one pixel of data), as a decompression bomb's does."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR's width and height, after the signature and chunk head
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # the CRC of IHDR's type and data
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, str]:
    """Files a user may hand the captioner, by kind: broken ones, and odd but good ones."""
    folder = tmp_path_factory.mktemp("odd_images")
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8))
    paths = {kind: folder / name for kind, name in {
        "truncated": "truncated.jpg", "text": "notes.png", "empty": "empty.png", "bomb": "bomb.png",
        "missing": "missing.png", "1x1": "one_pixel.png", "6000x6000": "large.jpg", "greyscale": "grey.png",
        "cmyk": "cmyk.jpg", "rgba": "rgba.png",
    }.items()}
    jpeg = io.BytesIO()
    picture.save(jpeg, "JPEG")
    paths["truncated"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    paths["text"].write_text("a shopping list, not an image\n")
    paths["empty"].write_bytes(b"")
    png_claiming_size(paths["bomb"], 20_000, 20_000)
    picture.resize((1, 1)).save(paths["1x1"])
    picture.resize((6000, 6000)).save(paths["6000x6000"])
    picture.convert("L").save(paths["greyscale"])
    picture.convert("CMYK").save(paths["cmyk"])
    translucent = picture.convert("RGBA")
    translucent.putalpha(Image.fromarray(rng.integers(0, 256, (36, 44), dtype=np.uint8)))
    translucent.save(paths["rgba"])
    return {kind: str(path) for kind, path in paths.items()}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without writing a log line per request into the test output."""

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, image_paths):
    """A local HTTP server of copies of the images and of a text file named .png: URLs without leaving the machine."""
    folder = tmp_path_factory.mktemp("served")
    for path in image_paths:
        shutil.copy(path, folder)
    (folder / "notes.png").write_text("a shopping list, not an image\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_url():
    """A URL whose server takes the connection (the kernel accepts it into the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/image.png"


# Inputs that cannot be captioned: the error, and what its message says after naming the input.
REFUSED = {
    "truncated JPEG": (ValueError, ": OSError: image file is truncated"),
    "text file named .png": (ValueError, ": UnidentifiedImageError: cannot identify image file"),
    "empty file": (ValueError, ": UnidentifiedImageError: cannot identify image file"),
    "decompression bomb": (ValueError, ": DecompressionBombError: Image size (400000000 pixels) exceeds limit"),
    "missing file": (FileNotFoundError, "."),
    "URL offline": (ConnectionError, ": "),
    "URL not found": (ConnectionError, ": HTTPError: HTTP Error 404"),
    "URL of a text file named .png": (ValueError, ": UnidentifiedImageError: cannot identify image file"),
    "lazily opened truncated PIL image": (ValueError, ": OSError: image file is truncated"),
}


def refused_input(case: str, images: dict[str, str], server: str) -> tuple:
    """The input of a REFUSED case, made afresh for each call, and how the error names it."""
    if case == "lazily opened truncated PIL image":
        return Image.open(images["truncated"]), f"PIL image of {images['truncated']}"
    source = {
        "truncated JPEG": images["truncated"], "text file named .png": images["text"], "empty file": images["empty"],
        "decompression bomb": images["bomb"], "missing file": images["missing"],
        "URL offline": "http://127.0.0.1:9/x.png", "URL not found": f"{server}/nothing.png",
        "URL of a text file named .png": f"{server}/notes.png",
    }[case]
    return source, source


PREFIXES = {ValueError: "Cannot read the image ", FileNotFoundError: "No image file at ",
            ConnectionError: "Cannot download the image "}


@pytest.mark.parametrize("case", REFUSED)
def test_an_image_that_cannot_be_captioned_is_refused_naming_it_and_its_place_in_a_list(
        model_dir, image_paths, odd_images, image_server, case):
    error_type, detail = REFUSED[case]
    message = PREFIXES[error_type] + refused_input(case, odd_images, image_server)[1] + detail
    captioner = load_pipeline(model_dir)
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()
    # A short timeout, so that a URL never holds the test up, whatever listens on the machine.
    for caption in (functools.partial(captioner, timeout=2, batch_size=2),
                    functools.partial(model.caption_images, timeout=2, batch_size=2)):
        with pytest.raises(error_type, match="^" + re.escape(message)):
            caption(refused_input(case, odd_images, image_server)[0])
        with pytest.raises(error_type, match="^" + re.escape(f"images[1]: {message}")):
            caption([image_paths[0], refused_input(case, odd_images, image_server)[0], image_paths[1]])


def test_odd_but_good_images_are_captioned_as_pil_and_the_clip_transform_see_them(model_dir, clip_name, odd_images):
    kinds = ["1x1", "6000x6000", "greyscale", "cmyk", "rgba"]
    paths = [odd_images[kind] for kind in kinds]
    assert [Image.open(path).mode for path in paths] == ["RGB", "RGB", "L", "CMYK", "RGBA"]
    clip = CaptioningClip.load(clip_name)
    with torch.no_grad():
        features = clip.model.encode_image(torch.stack([clip.preprocess(Image.open(path)) for path in paths]),
                                           normalize=True)
    expected = captions_of_features(model_dir, features, max_new_tokens=6)
    captioner = load_pipeline(model_dir)
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()

    # 36 million pixels are under PIL's decompression-bomb limit: no warning, no refusal.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert captioner(paths, batch_size=2, max_new_tokens=6) == as_outputs(expected)
        assert model.caption_images(paths, batch_size=3, max_new_tokens=6) == expected
        assert captioner(paths[1], max_new_tokens=6) == as_outputs(expected[1:2])[0]
        assert model.caption_images(paths[3], max_new_tokens=6) == expected[3:4]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from clip_scstclipcap import CaptioningClip

    def peak_bytes():
        # This process's own peak resident memory (ru_maxrss would carry over the parent's peak through exec).
        with open("/proc/self/status") as status:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) * 1024

    clip = CaptioningClip.load(sys.argv[1])
    before = peak_bytes()
    clip.pixel_values(sys.argv[2])
    print(json.dumps({"grown_bytes": peak_bytes() - before}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory Linux reports")
def test_a_large_image_is_decoded_once(clip_name, odd_images, tmp_path):
    (tmp_path / "memory.py").write_text(MEMORY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, str(tmp_path / "memory.py"), clip_name, odd_images["6000x6000"]],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    grown = json.loads(result.stdout.strip().splitlines()[-1])["grown_bytes"]
    decoded = 6000 * 6000 * DECODED_BYTES_PER_PIXEL
    # The image decoded, then resized to the CLIP's input: a copy of the decoded image would double the peak.
    assert grown < 1.5 * decoded


def test_urls_are_captioned_as_the_files_they_serve(model_dir, clip_name, image_paths, image_server):
    urls = [f"{image_server}/{Path(path).name}" for path in image_paths[:2]]
    data_url = "data:image/png;base64," + base64.b64encode(Path(image_paths[2]).read_bytes()).decode()
    expected = expected_captions(model_dir, clip_name, image_paths[:3], max_new_tokens=6)
    captioner = load_pipeline(model_dir)
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()

    assert captioner([*urls, data_url], batch_size=2, max_new_tokens=6) == as_outputs(expected)
    assert model.caption_images([*urls, data_url], max_new_tokens=6) == expected
    with pytest.raises(ValueError, match=re.escape("Cannot read the image data:image/png;base64,") + r".*\.\.\. \("):
        captioner("data:image/png;base64," + base64.b64encode(b"not a png" * 20).decode())


def test_a_url_that_never_answers_fails_within_the_timeout(model_dir, silent_url, monkeypatch):
    captioner = load_pipeline(model_dir)
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()
    message = re.escape(f"Cannot download the image {silent_url}: TimeoutError: timed out (no answer within 0.5 s)")
    calls = [lambda: captioner(silent_url, timeout=0.5), lambda: model.caption_images([silent_url], timeout=0.5)]
    monkeypatch.setattr(clip_scstclipcap, "URL_TIMEOUT", 0.5)
    calls.append(lambda: captioner(silent_url))  # the default timeout, without one given
    for call in calls:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match=message):
            call()
        assert time.monotonic() - started < 30


def test_empty_lists_and_tuples(model_dir, image_paths):
    captioner = load_pipeline(model_dir)
    model = SCSTClipCapForCaptioning.from_pretrained(model_dir).eval()
    assert captioner([]) == [] and model.caption_images([]) == []
    assert captioner(tuple(image_paths), max_new_tokens=4) == captioner(image_paths, max_new_tokens=4)
