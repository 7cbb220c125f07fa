"""The evaluator of a stage: COCO metrics of a split's captions, CLIP-S, and the shapes world's grounding scores."""

import functools
import json
import logging
from pathlib import Path

from clip_scstclipcap import CaptioningClip, describe_clip, read_clip_metadata
from metrics import grounding_scores

from .common import CaptionEvaluator
from .tables import load_table

logger = logging.getLogger(__name__)


def make_evaluator(script, config, tokenizer, split: str, output_dir: Path, device) -> CaptionEvaluator | None:
    """The evaluator of `split` (val or test) for a stage's `script` arguments and `config`, writing its predictions
    under `output_dir`; None when the stage has no table of that split."""
    table_path = script.val_table if split == "val" else script.test_table
    if table_path is None:
        return None
    table = load_table(table_path, split)
    extra_metrics = [clip_s_metric(table, device)]
    scenes_path = script.val_scenes if split == "val" else script.test_scenes
    if scenes_path:
        scenes = json.loads(Path(scenes_path).read_text())
        extra_metrics.append(lambda predictions: flat_grounding(grounding_scores(predictions, scenes)))
    return CaptionEvaluator(
        table, tokenizer, output_dir / f"{split}_predictions",
        generation_kwargs=dict(max_new_tokens=config.eval_max_new_tokens, num_beams=config.eval_num_beams),
        batch_size=config.per_device_eval_batch_size * 8, extra_metrics=extra_metrics, spice=spice_ready(config),
    )


def spice_ready(config) -> bool:
    """With `--spice`, SPICE's Stanford models are fetched once where they are missing, as pycocoevalcap does."""
    if not config.spice:
        return False
    from metrics import spice_unavailable_reason

    if spice_unavailable_reason() is not None:
        from pycocoevalcap.spice.get_stanford_models import get_stanford_models

        logger.info("--spice: fetching SPICE's Stanford CoreNLP models (once).")
        get_stanford_models()
    return True


@functools.cache
def frozen_clip(model_name: str, pretrained: str | None, device: str) -> CaptioningClip:
    """The frozen CLIP of a run, loaded once for every use of it (CLIP-S in each evaluation, the scst rewards)."""
    return CaptioningClip.load(model_name, pretrained, device)


def clip_s_metric(table, device):
    """CLIP-S (reference-free, Hessel et al.) of predictions against the images of `table`, with the table's CLIP."""
    from metrics import clip_score

    meta = read_clip_metadata(table)
    try:
        clip = frozen_clip(meta["model_name"], meta.get("pretrained"), str(device))
    except (FileNotFoundError, OSError) as error:
        logger.warning("CLIP-S is skipped: the table's CLIP %s cannot be loaded (%s).", describe_clip(meta), error)
        return lambda predictions: {}
    features = dict(zip(table["image_id"], table["clip_features"]))
    encode_text = clip.text_encoder

    def metric(predictions: dict[str, str]) -> dict[str, float]:
        image_ids = list(predictions)
        return {"clip_s": clip_score([features[i] for i in image_ids], [predictions[i] for i in image_ids],
                                     encode_text=encode_text)}

    return metric


def flat_grounding(scores: dict) -> dict[str, float]:
    """Grounding scores as flat metric names: attribute_precision, attribute_recall, their harmonic mean
    attribute_f1, parse_rate, fluent_attribute_precision / _recall / _f1, colour_precision, ..."""
    flat = {f"attribute_{name}": float(scores[name]) for name in ("precision", "recall") if scores[name] is not None}
    if scores["recall"] is not None:
        # Captions that name no attribute at all have no precision; their F1 is 0, as their recall is.
        precision, recall = flat.get("attribute_precision", 0.0), flat["attribute_recall"]
        flat["attribute_f1"] = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    flat["distinct_scene_caption_share"] = scores["distinct_scene_caption_share"]
    # The shapes recipe's selection metric: the same F1 where a repeated mention or a caption out of the world's
    # grammar cannot score (see metrics.shapes_grounding.fluent_grounding).
    flat["parse_rate"] = scores["parse_rate"]
    flat["fluent_attribute_precision"] = scores["fluent_precision"]
    flat["fluent_attribute_recall"] = scores["fluent_recall"]
    total = scores["fluent_precision"] + scores["fluent_recall"]
    flat["fluent_attribute_f1"] = 2 * scores["fluent_precision"] * scores["fluent_recall"] / total if total else 0.0
    for kind, values in scores["per_type"].items():
        flat.update({f"{kind}_{name}": float(value) for name, value in values.items() if value is not None})
    return flat
