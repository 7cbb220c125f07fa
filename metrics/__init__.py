"""Caption evaluation: COCO caption metrics (official toolkit), CLIP-S, COCO result files, and the shapes world's
attribute grounding (`shapes_grounding`, with the world's language in `shapes_language`).

    from metrics import compute_coco_metrics, clip_score, grounding_scores, write_coco_results
    scores = compute_coco_metrics({1: "a red circle"}, {1: ["a red circle", "a small red disc"]})
    grounding = grounding_scores({"img": "a red circle."}, {"img": scene})   # a scene of data/shapes/raw/scenes

The same COCO metrics as an `evaluate` module: `evaluate.load(str(COCO_CAPTION_METRIC_PATH))`.
"""

from pathlib import Path

from .clip_score import CLIP_S_WEIGHT, HESSEL_PROMPT, clip_s_per_image, clip_score, encode_captions
from .coco_caption.coco_eval import (
    SCORE_NAMES,
    CocoCaptionScorer,
    JavaNotFoundError,
    close_shared_scorers,
    compute_coco_metrics,
    find_java,
    java_on_path,
    shared_scorer,
    spice_unavailable_reason,
)
from .results import read_coco_references, read_coco_results, write_coco_results
from .shapes_grounding import caption_grounding, fluent_grounding, grounding_scores, parse_attributes, parses

COCO_CAPTION_METRIC_PATH = Path(__file__).parent / "coco_caption"

__all__ = [
    "CLIP_S_WEIGHT",
    "COCO_CAPTION_METRIC_PATH",
    "HESSEL_PROMPT",
    "SCORE_NAMES",
    "CocoCaptionScorer",
    "JavaNotFoundError",
    "caption_grounding",
    "clip_s_per_image",
    "clip_score",
    "close_shared_scorers",
    "compute_coco_metrics",
    "encode_captions",
    "find_java",
    "fluent_grounding",
    "grounding_scores",
    "java_on_path",
    "parse_attributes",
    "parses",
    "read_coco_references",
    "read_coco_results",
    "shared_scorer",
    "spice_unavailable_reason",
    "write_coco_results",
]
