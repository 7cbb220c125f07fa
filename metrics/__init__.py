"""Caption evaluation: COCO caption metrics (official toolkit), CLIP-S, COCO result files.

    from metrics import compute_coco_metrics, clip_score, write_coco_results
    scores = compute_coco_metrics({1: "a red circle"}, {1: ["a red circle", "a small red disc"]})

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

COCO_CAPTION_METRIC_PATH = Path(__file__).parent / "coco_caption"

__all__ = [
    "CLIP_S_WEIGHT",
    "COCO_CAPTION_METRIC_PATH",
    "HESSEL_PROMPT",
    "SCORE_NAMES",
    "CocoCaptionScorer",
    "JavaNotFoundError",
    "clip_s_per_image",
    "clip_score",
    "close_shared_scorers",
    "compute_coco_metrics",
    "encode_captions",
    "find_java",
    "java_on_path",
    "read_coco_references",
    "read_coco_results",
    "shared_scorer",
    "spice_unavailable_reason",
    "write_coco_results",
]
