"""Captions from images: the `transformers` pipeline of an SCSTClipCap model.

A saved model folder (or Hub repo) carries this file beside its model code, so downstream code needs only:

    from transformers import pipeline
    captioner = pipeline(model="user/scstclipcap-coco", trust_remote_code=True)
    captioner("photo.jpg")  # [{"generated_text": "a man riding a wave on top of a surfboard"}]

Images are encoded by the CLIP the model was trained on, with open_clip's eval transform, into the embedding the
model reads (`config.clip_embedding`): L2-normalised as the training tables hold them, or raw `encode_image` output
for converted ClipCap / CgT-GAN models. The CLIP is the one bundled in the model's `clip/` subfolder (an open_clip
`local-dir:` folder) when there is one, otherwise the config's `clip_model_name` / `clip_pretrained` reference
loaded through open_clip (`ViT-B-32` + `openai`, `hf-hub:org/repo`, ...), by the CLIP module clip_scstclipcap.py, which
the folder carries too.

Making a saved folder pipeline-ready (config entry, this file and the CLIP module, the bundled CLIP when it is a local
folder):

    python -c "from pipeline_scstclipcap import make_pipeline_ready; make_pipeline_ready('runs/shapes/init/final')"
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from transformers import AutoModel, GenerationConfig
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline

# Relative, so that a saved model folder's remote code brings the CLIP module along; plain where this file is run from
# the repository.
try:
    from . import clip_scstclipcap as clip_module
    from .clip_scstclipcap import CLIP_FOLDER, LOCAL_DIR, OPEN_CLIP_CONFIG, CaptioningClip
except ImportError:
    import clip_scstclipcap as clip_module
    from clip_scstclipcap import CLIP_FOLDER, LOCAL_DIR, OPEN_CLIP_CONFIG, CaptioningClip

PIPELINE_TASK = "scstclipcap-captioning"
DEFAULT_MAX_NEW_TOKENS = 30
GENERATION_PARAMETERS = frozenset(
    {key for key in vars(GenerationConfig()) if not key.startswith("_")} | {"generation_config"}
)


@dataclass(frozen=True)
class ListedImage:
    """An image of a list given to the pipeline, with its place in the list, so that an error can say which failed."""

    images: Sequence
    index: int


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
            inputs = [ListedImage(inputs, index) for index in range(len(inputs))]
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
        return {"image": self.clip.listed_pixel_values(image.images, image.index, timeout=timeout)}

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

    Writes the pipeline entry (`custom_pipelines`) into its config.json, copies this file and the CLIP module
    (clip_scstclipcap.py) beside the model code and,
    when the CLIP is a local folder (`clip_model_name`, by default the config's), bundles it into `model_dir/clip`
    unless a CLIP is bundled already. Returns the bundled CLIP folder, or None when the CLIP is a named reference.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    config["custom_pipelines"] = custom_pipelines()
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for code_file in (Path(__file__), Path(clip_module.__file__)):
        shutil.copyfile(code_file, model_dir / code_file.name)
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
