"""Captions from images: the CLIP image side of an SCSTClipCap model and its `transformers` pipeline.

A saved model folder (or Hub repo) carries this file beside its model code, so downstream code needs only:

    from transformers import pipeline
    captioner = pipeline(model="user/scstclipcap-coco", trust_remote_code=True)
    captioner("photo.jpg")  # [{"generated_text": "a man riding a wave on top of a surfboard"}]

Images are encoded by the CLIP the model was trained on, with open_clip's eval transform, into the embedding the
model reads (`config.clip_embedding`): L2-normalised as the training tables hold them, or raw `encode_image` output
for converted ClipCap / CgT-GAN models. The CLIP is the one bundled in the model's `clip/` subfolder (an open_clip
`local-dir:` folder) when there is one, otherwise the config's `clip_model_name` / `clip_pretrained` reference
loaded through open_clip (`ViT-B-32` + `openai`, `hf-hub:org/repo`, ...).

Making a saved folder pipeline-ready (config entry, this file, the bundled CLIP when it is a local folder):

    python -c "from pipeline_scstclipcap import make_pipeline_ready; make_pipeline_ready('runs/shapes/init/final')"
"""

import functools
import http.client
import io
import json
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoModel, GenerationConfig
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline
from transformers.utils import is_vision_available

if is_vision_available():
    import PIL.Image

PIPELINE_TASK = "scstclipcap-captioning"
CLIP_FOLDER = "clip"
OPEN_CLIP_CONFIG = "open_clip_config.json"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# Random, seeded weights of a built-in architecture, for rehearsing a recipe at real model sizes without downloads
# (`benchmarks/paper_scale.py`). Accepted only while the rehearsal is switched on (`prepare_datasets.py --rehearsal`,
# `train.py --rehearsal`, which set this environment variable); real runs keep refusing random CLIP weights.
REHEARSAL_WEIGHTS = "random-rehearsal"
REHEARSAL_ENV = "SCSTCLIPCAP_REHEARSAL"
REHEARSAL_SEED = 0
DEFAULT_MAX_NEW_TOKENS = 30
URL_PREFIXES = ("http://", "https://", "data:image/")
# Seconds a URL may take to connect and to send each part of the image: offline, a URL fails instead of hanging.
URL_TIMEOUT = 10.0
# Longer inputs (data URLs) are cut short where an error names them.
SHOWN_INPUT_LENGTH = 120
GENERATION_PARAMETERS = frozenset(
    {key for key in vars(GenerationConfig()) if not key.startswith("_")} | {"generation_config"}
)


def _import_open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("The CLIP is an open_clip model: `pip install open_clip_torch`.") from error
    return open_clip


def has_schema(model_name: str) -> bool:
    """True for `local-dir:` / `hf-hub:` names, whose weights come with the model source."""
    return model_name.startswith((LOCAL_DIR, HF_HUB))


def rehearsal_allowed() -> bool:
    """Whether random rehearsal weights (`pretrained="random-rehearsal"`) may be loaded in this process."""
    return os.environ.get(REHEARSAL_ENV) == "1"


def allow_rehearsal():
    """Switch the rehearsal on for this process and the processes it starts (`--rehearsal` flags)."""
    os.environ[REHEARSAL_ENV] = "1"


def _checkpoint_file(model_name: str, pretrained: str | None) -> str | None:
    """What open_clip should load for `pretrained`: a tag or file as is, a `hf-hub:` checkpoint downloaded, nothing
    for a model name that brings its weights."""
    if has_schema(model_name) or not pretrained:
        return None
    if pretrained.startswith(HF_HUB):
        from open_clip.pretrained import download_pretrained_from_hf

        return download_pretrained_from_hf(pretrained[len(HF_HUB) :])
    return pretrained


def describe_image(image) -> str:
    """How an error names an image: its path or URL (a long data URL cut short), or the PIL image's file or size."""
    if isinstance(image, PIL.Image.Image):
        filename = getattr(image, "filename", "")
        return f"PIL image of {filename}" if filename else f"{image.mode} PIL image of {image.width}x{image.height}"
    text = os.fspath(image) if isinstance(image, os.PathLike) else str(image)
    if len(text) > SHOWN_INPUT_LENGTH:
        return f"{text[:SHOWN_INPUT_LENGTH]}... ({len(text)} characters)"
    return text


def _unreadable(image, error: Exception) -> ValueError:
    return ValueError(f"Cannot read the image {describe_image(image)}: {type(error).__name__}: {error}")


def _download(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except ValueError as error:  # a malformed URL or data URL
        raise _unreadable(url, error) from error
    except (OSError, http.client.HTTPException) as error:
        # urllib wraps the socket's error (refused, unknown host) in a URLError; an HTTP error status and a timeout
        # come through as they are.
        reason = getattr(error, "reason", None)
        reason = reason if isinstance(reason, Exception) else error
        waited = f" (no answer within {timeout} s)" if isinstance(reason, TimeoutError) else ""
        raise ConnectionError(f"Cannot download the image {describe_image(url)}: {type(reason).__name__}: "
                              f"{reason}{waited}") from error


def open_image(image, timeout: float | None = None) -> "PIL.Image.Image":
    """A decoded PIL image from a PIL image, a file path or an http(s) / data URL (fetched within `timeout` seconds,
    `URL_TIMEOUT` by default). What cannot be captioned raises one error naming it: FileNotFoundError for a missing
    file, ConnectionError for a URL that cannot be fetched, ValueError for data that is no image, a truncated image or
    one over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), TypeError for anything else."""
    if isinstance(image, PIL.Image.Image):
        try:
            image.load()  # a PIL image opened lazily is decoded here, so that a damaged one is named
        except Exception as error:
            raise _unreadable(image, error) from error
        return image
    if isinstance(image, str) and image.startswith(URL_PREFIXES):
        source = io.BytesIO(_download(image, URL_TIMEOUT if timeout is None else timeout))
    elif isinstance(image, (str, os.PathLike)):
        source = image
    else:
        raise TypeError(f"An image must be a PIL image, a file path or a URL, got {type(image).__name__}.")
    try:
        # Decoded once and returned without a copy, so that a large image is held in memory once until it is resized.
        with PIL.Image.open(source) as opened:
            opened.load()
        return opened
    except FileNotFoundError:
        raise FileNotFoundError(f"No image file at {describe_image(image)}.") from None
    except Exception as error:  # a corrupt file raises anything from OSError to zlib / struct errors
        raise _unreadable(image, error) from error


def bundled_clip_folder(name_or_path: str | os.PathLike | None, revision: str | None = None,
                        token: str | bool | None = None) -> Path | None:
    """The `clip/` open_clip folder inside a model folder or Hub repo, None when it has none."""
    if not name_or_path:
        return None
    if Path(name_or_path).is_dir():
        folder = Path(name_or_path) / CLIP_FOLDER
    else:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(str(name_or_path), allow_patterns=[f"{CLIP_FOLDER}/*"], revision=revision,
                                     token=token)
        folder = Path(snapshot) / CLIP_FOLDER
    return folder if (folder / OPEN_CLIP_CONFIG).is_file() else None


@dataclass
class CaptioningClip:
    """A frozen open_clip model with its eval transform and tokenizer: the project's one CLIP loader, used to caption
    images, prepare tables, score captions (rewards, CLIP-S) and by the tools.

    `reference` is the open_clip model name it was loaded from (`local-dir:/path`, `ViT-B-32`, `hf-hub:org/repo`),
    `pretrained` the weights of a built-in architecture (`openai`, a checkpoint file, `hf-hub:ID`).
    """

    model: torch.nn.Module
    preprocess: Callable
    reference: str
    pretrained: str | None = None

    @classmethod
    def load(cls, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
        """Load an open_clip model: `load("ViT-B-32", "openai")`, `load("local-dir:path/to/clip")`, ...

        `pretrained` is ignored for `local-dir:` and `hf-hub:` model names. A built-in architecture without
        `pretrained` is refused: its random weights would give meaningless features.
        """
        if not has_schema(model_name) and not pretrained:
            raise ValueError(
                f"CLIP '{model_name}' needs pretrained weights (a tag such as 'openai', a checkpoint file or "
                "hf-hub:ID), or a 'local-dir:' or 'hf-hub:' model name that brings its own: random weights would give "
                "meaningless features.")
        if pretrained == REHEARSAL_WEIGHTS and not has_schema(model_name):
            if not rehearsal_allowed():
                raise ValueError(
                    f"CLIP '{model_name}' with pretrained '{REHEARSAL_WEIGHTS}' has random weights, meant only for "
                    "rehearsing a recipe at real sizes (benchmarks/paper_scale.py): pass --rehearsal to "
                    "prepare_datasets.py / train.py to allow it, or use real weights (e.g. 'openai').")
            open_clip = _import_open_clip()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(REHEARSAL_SEED)  # the same random CLIP in every process and every stage
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None,
                                                                             device=device)
            model.eval().requires_grad_(False)
            return cls(model, preprocess, model_name, pretrained)
        if model_name.startswith(LOCAL_DIR) and not Path(model_name[len(LOCAL_DIR) :]).is_dir():
            raise FileNotFoundError(f"The CLIP folder {model_name[len(LOCAL_DIR):]} is not there.")
        open_clip = _import_open_clip()
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=_checkpoint_file(model_name, pretrained), device=device)
        model.eval().requires_grad_(False)
        return cls(model, preprocess, model_name, pretrained)

    @classmethod
    def for_captioner(cls, config, name_or_path: str | os.PathLike | None = None, *, revision: str | None = None,
                      token: str | bool | None = None, device: str | torch.device = "cpu"):
        """The CLIP of the captioner with `config` saved at `name_or_path` (folder or Hub id): the one bundled in
        its `clip/` subfolder, otherwise `config.clip_model_name` / `config.clip_pretrained`."""
        bundled = bundled_clip_folder(name_or_path, revision=revision, token=token)
        if bundled is not None:
            return cls.load(LOCAL_DIR + str(bundled), device=device)
        try:
            return cls.load(config.clip_model_name, config.clip_pretrained, device=device)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error} The captioner's CLIP may be named by a path relative to where the model was trained: "
                "bundle it into the model folder with pipeline_scstclipcap.bundle_clip(model_dir, "
                "'local-dir:/path/to/clip'), or pass clip=...") from None

    @functools.cached_property
    def tokenizer(self) -> Callable:
        """open_clip's tokenizer of this CLIP, loaded on first use (captioning images needs none)."""
        return _import_open_clip().get_tokenizer(self.reference)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def local_folder(self) -> Path | None:
        """The open_clip folder it was loaded from, for a `local-dir:` CLIP."""
        return Path(self.reference[len(LOCAL_DIR) :]) if self.reference.startswith(LOCAL_DIR) else None

    def to(self, device: str | torch.device) -> "CaptioningClip":
        self.model.to(device)
        return self

    def pixel_values(self, image, timeout: float | None = None) -> torch.Tensor:
        """One image (PIL, path or URL) as CLIP input, `(1, 3, H, W)`."""
        return self.preprocess(open_image(image, timeout=timeout)).unsqueeze(0)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """CLIP input `(B, 3, H, W)` -> float32 image embeddings `(B, D)`.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
                Images after the CLIP's transform.
            normalize (`bool`, defaults to `True`):
                L2-normalise, as the tables hold them; `False` gives `encode_image`'s raw output.
        """
        return self.model.encode_image(pixel_values.to(self.device), normalize=normalize).float()

    def encode_images(self, images: Sequence, batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """Embeddings `(N, D)` of PIL images, paths or URLs, `batch_size` at a time (see [`encode`])."""
        parts = [
            self.encode(torch.cat([self.pixel_values(image) for image in images[start : start + batch_size]]),
                        normalize=normalize)
            for start in range(0, len(images), batch_size)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Float32 text embeddings `(N, D)` of `texts`, cut at CLIP's context length; L2-normalised unless
        `normalize=False`."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=normalize).float()


@dataclass(frozen=True)
class ListedImage:
    """An image of a list given to the pipeline, with its place in the list, so that an error can say which failed."""

    index: int
    image: object


# What `open_image` raises for an input that cannot be captioned, most specific first.
IMAGE_ERRORS = (FileNotFoundError, ConnectionError, ValueError, TypeError)


class SCSTClipCapPipeline(Pipeline):
    """Image captioning with an SCSTClipCap model: image -> CLIP embedding -> prefix -> GPT-2 caption.

    Call it on a PIL image, a path or a URL (-> `[{"generated_text": caption}]`, one dict per returned sequence), or
    on a list or tuple of them (-> one such list per image). An image that cannot be captioned (a missing file, a URL
    that does not answer within `timeout` seconds, `URL_TIMEOUT` by default, data that is no image) raises one error
    naming it, and in a list its index: `images[2]: No image file at b.png.`. Generation settings (`max_new_tokens`,
    `num_beams`, `do_sample`, `num_return_sequences`, ...) go at the top level or in `generate_kwargs`, when building
    the pipeline or when calling it; `batch_size` batches the CLIP and the captioner together. Without a length
    setting, captions stop where the model's generation config says (after 30 new tokens when it says nothing).

    Args:
        clip (`CaptioningClip`, *optional*):
            The image encoder; by default the CLIP bundled with the model, otherwise the config's reference.
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)

    def __init__(self, *args, clip: CaptioningClip | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if clip is None:
            clip = CaptioningClip.for_captioner(self.model.config, self.model.name_or_path)
        self.clip = clip.to(self.device)

    def __call__(self, inputs, **kwargs):
        # Each image of a list goes with its index, for an error to name; an empty list has nothing to caption (the
        # base class would look at its first item).
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                return []
            inputs = [ListedImage(index, image) for index, image in enumerate(inputs)]
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, generate_kwargs: dict | None = None, timeout: float | None = None, **kwargs):
        unknown = sorted(set(kwargs) - GENERATION_PARAMETERS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}: it takes timeout, "
                            "batch_size, num_workers, generate_kwargs and generation settings.")
        generation = dict(generate_kwargs or {})
        given_twice = sorted(set(kwargs) & set(generation))
        if given_twice:
            raise ValueError(f"{given_twice} given both directly and in generate_kwargs: use only one.")
        generation.update(kwargs)
        preprocess_params = {} if timeout is None else {"timeout": timeout}
        forward_params = {"generate_kwargs": generation} if generation else {}
        return preprocess_params, forward_params, {}

    def preprocess(self, image, timeout: float | None = None) -> dict:
        # Batching stacks an "image" tensor as is ("pixel_values" would ask for a feature extractor's padding).
        if not isinstance(image, ListedImage):
            return {"image": self.clip.pixel_values(image, timeout=timeout)}
        try:
            return {"image": self.clip.pixel_values(image.image, timeout=timeout)}
        except IMAGE_ERRORS as error:
            kind = next(kind for kind in IMAGE_ERRORS if isinstance(error, kind))
            raise kind(f"images[{image.index}]: {error}") from error

    def _forward(self, model_inputs: dict, generate_kwargs: dict | None = None) -> dict:
        # The embedding the model was trained on: normalised, or raw for converted ClipCap / CgT-GAN weights.
        normalize = self.model.config.clip_embedding == "normalized"
        prefix_features = self.clip.encode(model_inputs["image"], normalize=normalize)
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs or {}, return_dict_in_generate=False)
        caption_ids = self.model.generate(prefix_features=prefix_features, **generate_kwargs)
        # (B * sequences, T) -> (B, sequences, T), so that batches split per image
        return {"caption_ids": caption_ids.reshape(prefix_features.shape[0], -1, caption_ids.shape[-1])}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        captions = self.tokenizer.batch_decode(model_outputs["caption_ids"].flatten(0, 1), skip_special_tokens=True)
        return [{"generated_text": caption.strip()} for caption in captions]

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Save model, tokenizer and pipeline code; a CLIP loaded from a local folder goes along in `clip/`."""
        super().save_pretrained(save_directory, **kwargs)
        if self.clip.local_folder is not None:
            bundle_clip(save_directory, LOCAL_DIR + str(self.clip.local_folder))


PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=SCSTClipCapPipeline, pt_model=AutoModel,
                                    type="image")


def custom_pipelines() -> dict:
    """The `custom_pipelines` entry of config.json, as `Pipeline.save_pretrained` writes it."""
    info = dict(SCSTClipCapPipeline._registered_impl[PIPELINE_TASK])
    info["impl"] = f"{SCSTClipCapPipeline.__module__.split('.')[-1]}.{SCSTClipCapPipeline.__name__}"
    info["pt"] = [model_class.__name__ for model_class in info["pt"]]
    return {PIPELINE_TASK: info}


def bundle_clip(model_dir: str | os.PathLike, clip_model_name: str | None = None) -> Path:
    """Copy a `local-dir:` CLIP into `model_dir/clip`, where the pipeline looks first. Returns that folder.

    `clip_model_name` defaults to the `clip_model_name` of `model_dir/config.json`; a relative folder is taken
    relative to the working directory, as open_clip does.
    """
    model_dir = Path(model_dir)
    if clip_model_name is None:
        clip_model_name = _read_config(model_dir).get("clip_model_name") or ""
    if not clip_model_name.startswith(LOCAL_DIR):
        raise ValueError(f"Only a local-dir: CLIP can be bundled; '{clip_model_name}' is loaded by open_clip "
                         "from its reference.")
    source = Path(clip_model_name[len(LOCAL_DIR) :])
    if not (source / OPEN_CLIP_CONFIG).is_file():
        raise FileNotFoundError(f"{source} is not an open_clip model folder (no {OPEN_CLIP_CONFIG}).")
    target = model_dir / CLIP_FOLDER
    if target.resolve() == source.resolve():
        return target
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def make_pipeline_ready(model_dir: str | os.PathLike, clip_model_name: str | None = None) -> Path | None:
    """Make a saved model folder work with `pipeline(model=model_dir, trust_remote_code=True)`.

    Writes the pipeline entry (`custom_pipelines`) into its config.json, copies this file beside the model code and,
    when the CLIP is a local folder (`clip_model_name`, by default the config's), bundles it into `model_dir/clip`
    unless a CLIP is bundled already. Returns the bundled CLIP folder, or None when the CLIP is a named reference.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    config["custom_pipelines"] = custom_pipelines()
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(__file__, model_dir / Path(__file__).name)
    bundled = model_dir / CLIP_FOLDER
    if clip_model_name is None and (bundled / OPEN_CLIP_CONFIG).is_file():
        return bundled
    reference = clip_model_name or config.get("clip_model_name") or ""
    return bundle_clip(model_dir, reference) if reference.startswith(LOCAL_DIR) else None


def _read_config(model_dir: Path) -> dict:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model folder (no config.json).")
    return json.loads(config_file.read_text())
