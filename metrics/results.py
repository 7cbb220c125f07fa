"""COCO caption files: predictions in the COCO results format, references from COCO-format annotations.

    from metrics.results import write_coco_results, read_coco_results, read_coco_references
    write_coco_results({42: "a red circle"}, "outputs/test_results.json")
    references = read_coco_references("data/coco/test_caption_coco_format.json")

Results: [{"image_id": ..., "caption": ...}, ...], one entry per image.
References: {"images": [{"id": ...}, ...], "annotations": [{"image_id", "id", "caption"}, ...]}.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from pathlib import Path


def write_coco_results(predictions: Mapping[Hashable, str], path: str | Path) -> Path:
    """Write image id -> caption as a COCO results JSON list; returns the path."""
    rows = []
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"caption for image {image_id!r} must be a str, got {type(caption).__name__}")
        rows.append({"image_id": image_id, "caption": caption})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def read_coco_results(path: str | Path) -> dict[Hashable, str]:
    """Read a COCO results JSON list into image id -> caption (one caption per image)."""
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a COCO results file is a JSON list, got {type(rows).__name__}")
    predictions: dict[Hashable, str] = {}
    for index, row in enumerate(rows):
        image_id, caption = _image_id_and_caption(row, f"{path}: result {index}")
        if image_id in predictions:
            raise ValueError(f"{path}: result {index}: image_id {image_id!r} already has a caption")
        predictions[image_id] = caption
    return predictions


def read_coco_references(path: str | Path) -> dict[Hashable, list[str]]:
    """Read COCO-format caption annotations into image id -> reference captions.

    Images come in the order of "images" (every listed image, even one without captions),
    then any image only annotations mention.
    """
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f'{path}: a COCO annotation file is a JSON object with an "annotations" list')
    references: dict[Hashable, list[str]] = {}
    for index, image in enumerate(data.get("images", [])):
        if not isinstance(image, dict) or "id" not in image:
            raise ValueError(f'{path}: images[{index}] has no "id"')
        references.setdefault(image["id"], [])
    for index, annotation in enumerate(data["annotations"]):
        image_id, caption = _image_id_and_caption(annotation, f"{path}: annotations[{index}]")
        references.setdefault(image_id, []).append(caption)
    return references


def _load_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _image_id_and_caption(row, where: str) -> tuple[Hashable, str]:
    if not isinstance(row, dict) or "image_id" not in row or "caption" not in row:
        raise ValueError(f'{where}: expected an object with "image_id" and "caption", got {row!r}')
    image_id, caption = row["image_id"], row["caption"]
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
        raise ValueError(f"{where}: image_id must be an int or a str, got {image_id!r}")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: caption must be a str, got {caption!r}")
    return image_id, caption
