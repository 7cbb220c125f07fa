"""The one CLIP of SCSTClipCap: loading it, opening and encoding images, encoding sentences, and the record of which
CLIP made a table. Training, data preparation, the rewards, CLIP-S, the tools, the model's `caption_images` and the
captioning pipeline all use this file, and a saved model folder carries it beside its model code, so that the Hub
folder computes what training computed.

    from clip_scstclipcap import CaptioningClip
    clip = CaptioningClip.load("ViT-B-32", "openai")        # or "local-dir:data/shapes/raw/clip", "hf-hub:org/repo"
    image_features = clip.encode_images(["a.png", "b.png"])  # (2, D), L2-normalised; a bad image raises
    text_features = clip.encode_text(["a red circle."])     # (1, D)

Data preparation streams the same features batch by batch ([`FeatureBatch`]: positions, features, the raw
embeddings' norms, and the images that could not be read, reported instead of raised):

    for batch in clip.iter_image_features(paths, batch_size=64, num_workers=4, progress="coco/train"):
        ...  # batch.indices, batch.features, batch.norms, batch.failures
    for batch in clip.iter_text_features(sentences, batch_size=256):
        ...

Every image feature goes through [`CaptioningClip.encode`] and every sentence feature through
[`CaptioningClip.text_encoder`], so tables, rewards, CLIP-S and captioning cannot disagree.

Any open_clip model works: a built-in architecture with a pretrained tag or checkpoint file (`"openai"`,
`"/ckpt/epoch_32.pt"`), weights from the Hugging Face Hub (`pretrained="hf-hub:org/repo"` or the model name
`"hf-hub:org/repo"`), or an open_clip folder (`"local-dir:path"`); a model folder's bundled `clip/` is found by
[`CaptioningClip.for_captioner`].

Sentences are encoded by [`ClipTextEncoder`]: a causal text tower pooled at the end token (OpenAI's CLIPs, the shapes
world's) runs on the positions each batch's longest sentence needs instead of the whole context (77 for ViT-B/32),
which gives open_clip's `encode_text` features (to float rounding) several times faster; other towers run on the whole
context.

Metadata stored with every table (JSON in `DatasetInfo.description`, under the key "clip", which survives
save_to_disk / load_from_disk, select, map, shuffle, add_column and concatenation):

    {"model_name": "ViT-B-32", "pretrained": "openai", "dim": 512, "normalized": true,
     "weights_sha256": null, "logit_scale": 100.0}

Features are always stored L2-normalised (`normalized: true`): cosine similarities, CLIP-agg, CLIP-S and the models
trained here all work on the unit sphere. Beside each CLIP feature column `X` the column `X_norm` holds the L2 norm of
the raw embedding, so `X * X_norm` is open_clip's raw `encode_image` / `encode_text` output, which ClipCap's released
MLP weights and CgT-GAN read (a model's `config.clip_embedding` says which it reads). Tables made before norms were
recorded lack `X_norm`: they feed only models that read normalised embeddings, and `check_model_features` says so.
`weights_sha256` identifies weights that live in local files (a `local-dir:` folder or a checkpoint file), so a folder
that moved still matches and a CLIP retrained in place does not; `logit_scale` is the CLIP's own exp(logit_scale).

A captioner's input from a table, in evaluation or training:

    check_model_features(table, model.config, "test table")   # refuses a table that cannot feed the model
    prefix = table_prefix_features(table, model.config)       # (N, D), normalised or raw as the model reads
    prefix = model_prefix_features(batch_features, model.config, batch_norms)   # the same for one batch
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers.utils import is_vision_available

if is_vision_available():
    import PIL.Image

CLIP_FOLDER = "clip"
OPEN_CLIP_CONFIG = "open_clip_config.json"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
# Random, seeded weights of a built-in architecture, for rehearsing a recipe at real model sizes without downloads
# (`benchmarks/paper_scale.py`). Accepted only while the rehearsal is switched on (`prepare_datasets.py --rehearsal`,
# `train.py --rehearsal`, which set this environment variable); real runs keep refusing random CLIP weights.
REHEARSAL_WEIGHTS = "random-rehearsal"
REHEARSAL_ENV = "SCSTCLIPCAP_REHEARSAL"
REHEARSAL_SEED = 0
URL_PREFIXES = ("http://", "https://", "data:image/")
# Seconds a URL may take to connect and to send each part of the image: offline, a URL fails instead of hanging.
URL_TIMEOUT = 10.0
# Longer inputs (data URLs) are cut short where an error names them.
SHOWN_INPUT_LENGTH = 120
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
NORM_SUFFIX = "_norm"
_HASH_CHUNK = 1 << 22
# What `open_image` raises for an input that cannot be captioned, most specific first.
IMAGE_ERRORS = (FileNotFoundError, ConnectionError, ValueError, TypeError)


class ClipMismatchError(ValueError):
    """A table was made with another CLIP than the model or the other tables it is used with."""


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
    """A frozen open_clip model with its eval transform and tokenizer: the project's one CLIP, used to caption images,
    prepare tables, score captions (rewards, CLIP-S) and by the tools.

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

    def listed_pixel_values(self, images: Sequence, index: int, timeout: float | None = None) -> torch.Tensor:
        """[`pixel_values`] of `images[index]`; an image that cannot be read raises `open_image`'s error with its
        place in the list: `images[2]: No image file at b.png.`"""
        try:
            return self.pixel_values(images[index], timeout=timeout)
        except IMAGE_ERRORS as error:
            kind = next(kind for kind in IMAGE_ERRORS if isinstance(error, kind))
            raise kind(f"images[{index}]: {error}") from error

    def encode_images(self, images: Sequence, batch_size: int = 32, normalize: bool = True,
                      timeout: float | None = None) -> torch.Tensor:
        """Embeddings `(N, D)` of a list of PIL images, paths or URLs, `batch_size` at a time (see [`encode`] and
        [`listed_pixel_values`])."""
        parts = []
        for start in range(0, len(images), batch_size):
            indices = range(start, min(start + batch_size, len(images)))
            pixels = torch.cat([self.listed_pixel_values(images, index, timeout) for index in indices])
            parts.append(self.encode(pixels, normalize=normalize))
        return torch.cat(parts) if parts else torch.empty(0, 0)

    @functools.cached_property
    def text_encoder(self) -> "ClipTextEncoder":
        """The CLIP's sentence encoder (see [`ClipTextEncoder`])."""
        return ClipTextEncoder(self.model, self.tokenizer)

    def encode_text(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Float32 text embeddings `(N, D)` of `texts` (cut at CLIP's context length) by [`text_encoder`],
        `batch_size` at a time as [`iter_text_features`] batches them; L2-normalised unless `normalize=False`."""
        texts = list(texts)
        parts = [self.text_encoder(texts[start : start + batch_size]) for start in range(0, len(texts), batch_size)]
        features = torch.cat(parts) if parts else torch.empty(0, 0)
        return F.normalize(features, dim=-1) if normalize else features

    def iter_image_features(self, images: Sequence, *, batch_size: int = 64, num_workers: int = 0,
                            normalize: bool = True, progress: str | None = None) -> Iterator["FeatureBatch"]:
        """Stream image features batch by batch, as data preparation makes its tables: each batch through [`encode`],
        decoding in DataLoader workers, an unreadable image reported instead of raised.

        Args:
            images (`Sequence` of `str`, `os.PathLike` or `PIL.Image.Image`):
                The images; URLs are fetched as [`open_image`] fetches them.
            batch_size (`int`, defaults to 64):
                Images per batch.
            num_workers (`int`, defaults to 0):
                DataLoader workers that decode and preprocess; 0 does it in this process.
            normalize (`bool`, defaults to `True`):
                L2-normalise the features; `FeatureBatch.norms` are the raw embeddings' norms either way.
            progress (`str`, *optional*):
                The description of a progress bar; none without it.

        Returns:
            An iterator of [`FeatureBatch`], with the images that cannot be read in `failures` as (position,
            `"missing_image_file"` or `"corrupt_image"`, detail).
        """
        loader = _loader(_ImageInputs(images, self.preprocess), _collate_images, batch_size, num_workers, self.device)
        encode = functools.partial(self.encode, normalize=False)  # the norms need the raw embeddings
        yield from _iter_features(loader, encode, self.device, len(images), normalize, progress, "img")

    def iter_text_features(self, texts: Sequence[str], *, batch_size: int = 256, num_workers: int = 0,
                           normalize: bool = True, progress: str | None = None) -> Iterator["FeatureBatch"]:
        """Stream sentence features batch by batch, as data preparation makes its corpus tables: tokenized in
        DataLoader workers, each batch through [`text_encoder`] (on the positions its longest sentence needs where
        the tower allows it).

        Args:
            texts (`Sequence[str]`):
                The sentences (cut at CLIP's context length).
            batch_size (`int`, defaults to 256):
                Sentences per batch.
            num_workers (`int`, defaults to 0):
                DataLoader workers that tokenize; 0 does it in this process.
            normalize (`bool`, defaults to `True`):
                L2-normalise the features; `FeatureBatch.norms` are the raw embeddings' norms either way.
            progress (`str`, *optional*):
                The description of a progress bar; none without it.

        Returns:
            An iterator of [`FeatureBatch`] (with no failures).
        """
        loader = _loader(_TextInputs(texts), _TokenizeBatch(self.tokenizer), batch_size, num_workers, self.device)
        encode = self.text_encoder.encode_tokens
        yield from _iter_features(loader, encode, self.device, len(texts), normalize, progress, "sent")

    @functools.cached_property
    def metadata(self) -> dict:
        """The record of this CLIP that the tables made with it carry (see [`clip_metadata`])."""
        dim = embedding_dim(self.model, self.tokenizer)
        return clip_metadata(self.reference, self.pretrained, dim, True, _logit_scale(self.model))


def _sha256_of_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _cached_sha256(paths: tuple[Path, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    return _sha256_of_files(paths)


def weights_fingerprint(model_name: str, pretrained: str | None) -> str | None:
    """sha256 of the local files that hold the CLIP (config + weights), None for tags and Hub ids."""
    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR):])
        if not folder.is_dir():
            return None
        files = [folder / "open_clip_config.json"] + [
            path for path in sorted(folder.iterdir()) if path.suffix in WEIGHT_SUFFIXES]
        files = [path for path in files if path.is_file()]
    elif not has_schema(model_name) and pretrained and os.path.isfile(pretrained):
        files = [Path(pretrained)]
    else:
        return None
    stamps = tuple((path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    return _cached_sha256(tuple(path.resolve() for path in files), stamps)


def clip_metadata(model_name: str, pretrained: str | None, dim: int | None, normalized: bool | None,
                  logit_scale: float | None = None) -> dict:
    """The record of which CLIP made a table. `dim` / `normalized` None mean "not checked"."""
    return {
        "model_name": model_name,
        "pretrained": None if has_schema(model_name) else pretrained,
        "dim": dim,
        "normalized": normalized,
        "weights_sha256": weights_fingerprint(model_name, pretrained),
        "logit_scale": logit_scale,
    }


def describe_clip(meta: dict) -> str:
    """Human-readable one-liner of a CLIP metadata record."""
    text = meta.get("model_name", "?")
    if meta.get("pretrained"):
        text += f" (pretrained {meta['pretrained']})"
    details = []
    if meta.get("dim") is not None:
        details.append(f"D={meta['dim']}")
    if meta.get("normalized") is not None:
        details.append("normalised" if meta["normalized"] else "not normalised")
    if meta.get("weights_sha256"):
        details.append(f"weights sha256 {meta['weights_sha256'][:12]}")
    return text + (f" [{', '.join(details)}]" if details else "")


def read_table_description(table: "str | os.PathLike | object") -> dict:
    """The JSON description of a table written by prepare_datasets.py (a path or a Dataset)."""
    if isinstance(table, (str, os.PathLike)):
        info_file = Path(table) / "dataset_info.json"
        if not info_file.is_file():
            raise FileNotFoundError(f"{table} is not a saved table (no dataset_info.json)")
        description = json.loads(info_file.read_text()).get("description", "")
        where = str(table)
    else:
        description = table.info.description
        where = "this dataset"
    try:
        parsed = json.loads(description or "")
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("clip"), dict):
        raise ValueError(f"{where} has no CLIP metadata (tables written by prepare_datasets.py have it)")
    return parsed


def read_clip_metadata(table: "str | os.PathLike | object") -> dict:
    """The CLIP metadata of a saved table folder or of a loaded `datasets.Dataset`."""
    return read_table_description(table)["clip"]


def _canonical_name(model_name: str) -> str:
    if model_name.startswith(LOCAL_DIR):
        return LOCAL_DIR + str(Path(model_name[len(LOCAL_DIR):]).resolve())
    return model_name if has_schema(model_name) else model_name.replace("/", "-")


def _canonical_pretrained(pretrained: str | None) -> str | None:
    if pretrained and os.path.isfile(pretrained):
        return str(Path(pretrained).resolve())
    return pretrained


def same_clip(first: dict, second: dict) -> bool:
    """Same weights: by fingerprint where both have one, otherwise by model name and pretrained."""
    if first.get("weights_sha256") and second.get("weights_sha256"):
        return first["weights_sha256"] == second["weights_sha256"]
    return (_canonical_name(first["model_name"]) == _canonical_name(second["model_name"])
            and _canonical_pretrained(first.get("pretrained")) == _canonical_pretrained(second.get("pretrained")))


def check_clip_metadata(found: dict, expected: dict, what: str) -> None:
    """Raise ClipMismatchError unless `found` (the table `what`) matches `expected`.

    `dim` / `normalized` are compared only where `expected` gives them.
    """
    problems = []
    if not same_clip(found, expected):
        problems.append("different CLIP weights")
    for key in ("dim", "normalized"):
        if expected.get(key) is not None and found.get(key) != expected[key]:
            problems.append(f"{key} {found.get(key)} != {expected[key]}")
    if problems:
        raise ClipMismatchError(
            f"{what} was made with CLIP {describe_clip(found)}, but CLIP {describe_clip(expected)} "
            f"is expected ({'; '.join(problems)}). Rebuild it with the expected CLIP "
            f"(prepare_datasets.py --clip-model/--clip-pretrained, --overwrite) or use matching tables.")


def norm_column(column: str) -> str:
    """The column holding the raw embeddings' L2 norms of the feature column `column` (`clip_features_norm`)."""
    return column + NORM_SUFFIX


def model_reads(config) -> str | None:
    """The CLIP embedding a captioner with `config` must be fed: `"normalized"` or `"raw"`; None when both give the
    same captions, because the model normalises its input itself (`normalize_prefix`)."""
    return None if config.normalize_prefix else config.clip_embedding


def _table_columns(table: "str | os.PathLike | object") -> list[str]:
    if isinstance(table, (str, os.PathLike)):
        info = json.loads((Path(table) / "dataset_info.json").read_text())
        return list(info.get("features") or {})
    return list(table.column_names)


def check_model_features(table: "str | os.PathLike | object", config, what: str = "table",
                         column: str = "clip_features") -> None:
    """Raise ClipMismatchError unless `column` of `table` can feed a captioner with `config`.

    It can when D equals `config.prefix_dim` and the table holds the CLIP embedding the model reads
    (`config.clip_embedding`), or one it can be turned into: normalised features are always there, raw ones
    need the `<column>_norm` column (tables made by this version of prepare_datasets.py).

    Args:
        table (`str`, `os.PathLike` or `datasets.Dataset`):
            A saved table folder or a loaded table.
        config ([`SCSTClipCapConfig`]):
            The captioner's config.
        what (`str`, defaults to `"table"`):
            How the message names the table (`"test table"`); a folder's path is added.
        column (`str`, defaults to `"clip_features"`):
            The feature column fed to the model.
    """
    meta = read_clip_metadata(table)
    where = f"{what} {table}" if isinstance(table, (str, os.PathLike)) else what
    if meta.get("dim") is not None and meta["dim"] != config.prefix_dim:
        raise ClipMismatchError(
            f"{where} holds {meta['dim']}-d features of CLIP {describe_clip(meta)}, but the model reads "
            f"{config.prefix_dim}-d embeddings of {config.clip_model_name}: make the table with the model's CLIP "
            "(prepare_datasets.py --clip-model/--clip-pretrained).")
    if (model_reads(config) == "raw" and meta.get("normalized") is not False
            and norm_column(column) not in _table_columns(table)):
        raise ClipMismatchError(
            f"{where} stores L2-normalised CLIP features without their norms, but the model reads raw encode_image "
            "output (clip_embedding='raw', as ClipCap's released MLP weights and CgT-GAN do): rebuild the table "
            f"with prepare_datasets.py --overwrite, which records each row's norm in {norm_column(column)}.")


def model_prefix_features(features: torch.Tensor, config, norms: torch.Tensor | None = None,
                          normalized: bool = True) -> torch.Tensor:
    """Stored CLIP features -> the embeddings a captioner with `config` reads.

    Args:
        features (`torch.Tensor` of shape `(batch_size, D)`):
            Rows of a feature column.
        config ([`SCSTClipCapConfig`]):
            The captioner's config.
        norms (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            The same rows of the `<column>_norm` column; needed when the model reads raw embeddings and `features`
            are normalised.
        normalized (`bool`, defaults to `True`):
            Whether `features` are L2-normalised (the table metadata's `normalized`; true for every table made here).

    Returns:
        `torch.Tensor` of shape `(batch_size, D)`: `features` themselves when they are what the model reads.
    """
    wanted = model_reads(config)
    if wanted is None or (wanted == "normalized") == normalized:
        return features
    if wanted == "normalized":
        return F.normalize(features, dim=-1)
    if norms is None:
        raise ValueError("the model reads raw CLIP embeddings (clip_embedding='raw'): pass the norms of these "
                         "normalised features (the table's *_norm column)")
    return features * norms.to(features.dtype).unsqueeze(-1)


def feature_matrix(dataset, column: str = "clip_features", start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a fixed-length feature column of a `datasets.Dataset` as a float32 [n, D] array (a
    writable copy), read through Arrow."""
    stop = len(dataset) if stop is None else stop
    part = dataset.select_columns([column]).with_format("arrow")[start:stop][column]
    flat = part.combine_chunks() if hasattr(part, "combine_chunks") else part  # a ChunkedArray or an Array
    return flat.flatten().to_numpy(zero_copy_only=False).reshape(len(flat), -1).astype(np.float32)


def table_prefix_features(table, config, column: str = "clip_features", what: str = "table") -> torch.Tensor:
    """All rows of `column` of a loaded table as a captioner with `config` reads them, `(N, D)` float32 on the CPU
    (meant for evaluation tables: the whole column is held in memory). Refused as by [`check_model_features`]."""
    check_model_features(table, config, what, column)
    features = torch.from_numpy(feature_matrix(table, column))
    norms = None
    if norm_column(column) in table.column_names:
        norms = torch.tensor(table[norm_column(column)], dtype=torch.float32)
    return model_prefix_features(features, config, norms, read_clip_metadata(table).get("normalized") is not False)


def embedding_dim(model: torch.nn.Module, tokenizer: Callable) -> int:
    """D of the joint embedding space, from one tiny text forward (works for every open_clip model)."""
    with torch.inference_mode():
        device = next(model.parameters()).device
        return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])


def _logit_scale(model: torch.nn.Module) -> float | None:
    scale = getattr(model, "logit_scale", None)
    return None if scale is None else float(scale.detach().exp().reshape(-1)[0])


@dataclass(frozen=True)
class CausalTextTower:
    """An open_clip text tower whose caption features can be computed on the caption's positions alone.

    With a causal attention mask a position's output depends on the positions before it only, and pooling at the end
    token (`argmax`: the highest token id, `eos`: the end token) reads a position inside the caption: the padding after
    the batch's longest caption changes no feature, and the tower can run on the tokens cut there. OpenAI's CLIPs
    (ViT-B/32: 77 positions for captions of ~15 tokens) and the shapes world's are such towers.

    Attributes:
        module: what holds the tower's parts (`token_embedding`, `positional_embedding`, `attn_mask`, `transformer`,
            `ln_final`, `text_projection`): the `CLIP` itself, or a `CustomTextCLIP`'s `TextTransformer`.
        pool_type: `argmax` or `eos`.
        eos_token_id: the end token, for `eos` pooling.
    """

    module: torch.nn.Module
    pool_type: str
    eos_token_id: int | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "CausalTextTower | None":
        """The tower of an open_clip model, or None where cutting the tokens would change the features: without a
        causal mask (every position sees the padding), pooled at the first or last position (the last one moves with
        the cut), with CoCa's class token appended after the padding, or a Hugging Face text model."""
        open_clip = _import_open_clip()
        from open_clip.transformer import TextTransformer

        if isinstance(model, open_clip.CLIP):
            tower, pool_type, eos_token_id = model, model.text_pool_type, model.text_eos_id
        elif isinstance(getattr(model, "text", None), TextTransformer) and model.text.cls_emb is None:
            tower, pool_type, eos_token_id = model.text, model.text.pool_type, model.text.eos_id
        else:
            return None
        if tower.attn_mask is None or pool_type not in ("argmax", "eos"):
            return None
        return cls(tower, pool_type, eos_token_id)

    def positions(self, tokens: torch.Tensor) -> int:
        """Positions the captions need: up to the last pooled position of the batch."""
        if self.pool_type == "argmax":
            pooled = tokens.argmax(dim=-1)
        else:
            pooled = (tokens == self.eos_token_id).int().argmax(dim=-1)
        return int(pooled.max()) + 1

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's `encode_text` (raw embeddings) on the first [`positions`] of `tokens`, with the positional
        table and the causal mask cut to them (open_clip sizes the mask to the whole context)."""
        length = self.positions(tokens)
        tokens, tower = tokens[:, :length], self.module
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        text_global_pool = _import_open_clip().transformer.text_global_pool
        x = text_global_pool(tower.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_token_id)
        if tower.text_projection is None:
            return x
        if isinstance(tower.text_projection, torch.nn.Linear):
            return tower.text_projection(x)
        return x @ tower.text_projection


class ClipTextEncoder:
    """Raw float32 CLIP text embeddings `(N, D)` of captions, as open_clip's `encode_text` gives them, computed on the
    positions the batch's longest caption needs where the tower allows it ([`CausalTextTower`]), on CLIP's whole
    context otherwise.

    Args:
        model: the open_clip model.
        tokenizer: its open_clip tokenizer (padding to the model's context length); needed to encode strings, not
            token ids.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.causal_tower = CausalTextTower.of(model)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this ClipTextEncoder was made without a tokenizer: give it token ids (encode_tokens)")
        return self.encode_tokens(self.tokenizer(list(texts)).to(next(self.model.parameters()).device))

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The same for captions the tokenizer has already turned into `(N, context_length)` ids, on the model's
        device (the corpus streaming tokenizes in DataLoader workers)."""
        if self.causal_tower is None:
            return self.model.encode_text(tokens).float()
        return self.causal_tower.encode(tokens).float()


@dataclass
class FeatureBatch:
    """Features of the inputs at `indices` (positions in the encoded sequence), the L2 norms of their raw
    embeddings, and the inputs that failed."""

    indices: list[int]
    features: torch.Tensor
    norms: torch.Tensor
    failures: list[tuple[int, str, str]]


class _ImageInputs(Dataset):
    """Decodes and preprocesses one image per item; unreadable files become failures, not crashes."""

    def __init__(self, images: Sequence, preprocess: Callable):
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            image = open_image(self.images[index])
        except FileNotFoundError as error:
            return index, None, ("missing_image_file", str(error))
        except ValueError as error:
            # The report names the file already: it keeps the decoder's own error.
            cause = error.__cause__ or error
            return index, None, ("corrupt_image", f"{type(cause).__name__}: {cause}")
        return index, self.preprocess(image), None


def _collate_images(items):
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failures = [(index, *failure) for index, _, failure in items if failure is not None]
    pixels = torch.stack([pixels for _, pixels in good]) if good else None
    return [index for index, _ in good], pixels, failures


class _TextInputs(Dataset):
    def __init__(self, texts: Sequence[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int):
        return index, self.texts[index]


class _TokenizeBatch:
    """Tokenizes in the DataLoader workers (picklable, unlike a lambda)."""

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer

    def __call__(self, items):
        return [index for index, _ in items], self.tokenizer([text for _, text in items]), []


def _single_thread_worker(_worker_id: int) -> None:
    # Workers decode and preprocess; leaving torch at its default thread count would oversubscribe the cores.
    torch.set_num_threads(1)


def _loader(inputs: Dataset, collate: Callable, batch_size: int, num_workers: int, device: torch.device):
    return DataLoader(
        inputs, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
        pin_memory=device.type == "cuda", worker_init_fn=_single_thread_worker if num_workers else None)


def _iter_features(loader: DataLoader, encode: Callable, device: torch.device, total: int, normalize: bool,
                   progress: str | None, unit: str) -> Iterator[FeatureBatch]:
    """[`FeatureBatch`]es of the loader's batches; `encode` gives raw float32 embeddings, whose norms are kept so
    that tables can give them back."""
    with tqdm(total=total, desc=progress, unit=unit, disable=progress is None, dynamic_ncols=True) as bar:
        for indices, inputs, failures in loader:
            features, norms = torch.empty(0, 0), torch.empty(0)
            if indices:
                with torch.inference_mode():
                    raw = encode(inputs.to(device, non_blocking=True))
                    norms = raw.norm(dim=-1).cpu()
                    features = (F.normalize(raw, dim=-1) if normalize else raw).cpu()
            bar.update(len(indices) + len(failures))
            yield FeatureBatch(indices, features, norms, failures)


def save_local_clip(model: torch.nn.Module, model_cfg: dict, folder: str | os.PathLike) -> str:
    """Save an open_clip model as a folder that `CaptioningClip.load("local-dir:<folder>")` reads back.

    Returns the `local-dir:` model name. The folder holds open_clip's own `open_clip_config.json`
    (model and preprocess config) and `open_clip_model.safetensors`.
    """
    from safetensors.torch import save_file

    open_clip = _import_open_clip()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    known = open_clip.get_model_preprocess_cfg(model)
    preprocess_cfg.update({key: (list(value) if isinstance(value, tuple) else value) for key, value in known.items()
                           if key in ("mean", "std", "interpolation", "resize_mode")})
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return LOCAL_DIR + str(folder)
