"""Images tables (one row per image) and the COCO-format reference files that evaluation reads.

Layout under `<output>/<group>/` (group `coco`, `flickr30k`, `shapes`):
    train/ val/ test/                       images tables (save_to_disk)
    train.report.json ...                   what each table kept and skipped
    val_references.json test_references.json
                                            COCO caption format, ids as in the tables (strings)

Splits are read in the order test, val, train, so an image listed in two splits stays in the
evaluation split and is skipped (duplicate_image_id) from the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from .clip import iter_image_features
from .common import ClipRequest, RunOptions, require_rows, reusable, reused_report, table_description
from .sources import (DataPrepError, SkipReport, find_image_file, index_image_files, read_karpathy,
                      read_oscar_captions)
from .tables import TableWriter, images_features, report_path

SPLIT_ORDER = ("test", "val", "train")
EVAL_SPLITS = ("val", "test")


def _select_images(captions: dict[str, list[str]], split: str, seen: set[str], report: SkipReport) -> dict:
    """The images of one split that may go into its table (files not checked yet)."""
    selected = {}
    for image_id, references in captions.items():
        if image_id in seen:
            report.skip("duplicate_image_id", image_id, "listed in an earlier split")
        elif split in EVAL_SPLITS and not references:
            report.skip("no_references", image_id)
        else:
            seen.add(image_id)
            selected[image_id] = references
    return selected


def _locate_files(selected: dict, images_dir: Path, index: dict, report: SkipReport) -> list[tuple[str, str, list]]:
    rows = []
    for image_id, references in selected.items():
        file_name = find_image_file(index, image_id)
        if file_name is None:
            report.skip("missing_image_file", image_id, f"no file for this id under {images_dir}")
        else:
            rows.append((image_id, file_name, references))
    return rows


def _write_images_table(rows: list, images_dir: Path, table: Path, clip: ClipRequest, options: RunOptions,
                        report: SkipReport, keep_references: bool, source: str) -> None:
    loaded = clip.load()
    description = table_description("images", loaded.metadata, source=source, split=table.name,
                                    references=keep_references)
    paths = [str(images_dir / file_name) for _, file_name, _ in rows]
    batches = iter_image_features(loaded.model, loaded.preprocess, paths, batch_size=options.batch_size,
                                  num_workers=options.num_workers, device=loaded.device,
                                  progress=f"{table.parent.name}/{table.name}" if options.progress else None)
    with TableWriter(table, images_features(loaded.metadata["dim"]), description) as writer:
        for batch in batches:
            for position, reason, detail in batch.failures:
                report.skip(reason, rows[position][0], f"{rows[position][1]}: {detail}")
            if batch.indices:
                writer.write({
                    "image_id": [rows[i][0] for i in batch.indices],
                    "file_name": [rows[i][1] for i in batch.indices],
                    "clip_features": batch.features.numpy(),
                    "references": [rows[i][2] if keep_references else [] for i in batch.indices],
                })
        report.kept = writer.rows
        report.write(report_path(table))
        require_rows(report, table)
        writer.finish()


def write_coco_references(table: Path, path: Path, dataset_name: str) -> None:
    """The table's references as a COCO captions file (pycocotools / pycocoevalcap read it)."""
    rows = datasets.load_from_disk(str(table)).select_columns(["image_id", "file_name", "references"])
    images, annotations = [], []
    for row in rows:
        images.append({"id": row["image_id"], "file_name": row["file_name"]})
        for caption in row["references"]:
            annotations.append({"image_id": row["image_id"], "id": len(annotations) + 1, "caption": caption})
    path.write_text(json.dumps({
        "info": {"description": f"{dataset_name} {table.name} references, written by prepare_datasets.py"},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }))


def build_images_tables(captions: dict[str, dict[str, list[str]]], reports: dict[str, SkipReport],
                        images_dir: str | Path, group_dir: Path, clip: ClipRequest, options: RunOptions,
                        train_references: bool, source: str) -> dict[str, Path]:
    """Tables for every split in `captions`, reusing finished ones; returns split -> table path."""
    images_dir = Path(images_dir)
    group_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    index = None
    tables = {}
    for split in [name for name in SPLIT_ORDER if name in captions]:
        table = group_dir / split
        tables[split] = table
        selected = _select_images(captions[split], split, seen, reports[split])
        if reusable(table, clip, options, f"{split} table"):
            reports[split] = reused_report(table)
        else:
            index = index_image_files(images_dir) if index is None else index
            rows = _locate_files(selected, images_dir, index, reports[split])
            keep = split in EVAL_SPLITS or train_references
            _write_images_table(rows, images_dir, table, clip, options, reports[split], keep, source)
        if split in EVAL_SPLITS:
            write_coco_references(table, group_dir / f"{split}_references.json", source)
    return tables


def prepare_coco(images_dir: str | Path, annotations_dir: str | Path, output_dir: str | Path, clip: ClipRequest,
                 options: RunOptions, train_references: bool = False, name: str = "coco") -> dict:
    """COCO (Karpathy split, OSCAR `coco_caption` files) to `<output>/<name>/{train,val,test}`."""
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise DataPrepError(f"{annotations_dir}: annotations folder not found")
    captions, reports = {}, {}
    for split in SPLIT_ORDER:
        path = annotations_dir / f"{split}_caption.json"
        reports[split] = SkipReport(f"{name}/{split}", [str(path), str(images_dir)])
        captions[split] = read_oscar_captions(path, reports[split])
    tables = build_images_tables(captions, reports, images_dir, Path(output_dir) / name, clip, options,
                                 train_references, source=name)
    return {"tables": tables, "reports": reports}


def prepare_flickr30k(karpathy_json: str | Path, images_dir: str | Path, output_dir: str | Path,
                      clip: ClipRequest, options: RunOptions, train_references: bool = False,
                      name: str = "flickr30k") -> dict:
    """Flickr30k from Karpathy's dataset_flickr30k.json to the same tables and COCO-format references."""
    group_dir = Path(output_dir) / name
    file_report = SkipReport(f"{name}/annotations", [str(karpathy_json)])
    captions = read_karpathy(karpathy_json, file_report)
    reports = {split: SkipReport(f"{name}/{split}", [str(karpathy_json), str(images_dir)]) for split in captions}
    group_dir.mkdir(parents=True, exist_ok=True)
    file_report.kept = sum(len(images) for images in captions.values())
    file_report.write(group_dir / "annotations.report.json")
    tables = build_images_tables(captions, reports, images_dir, group_dir, clip, options, train_references,
                                 source=name)
    return {"tables": tables, "reports": {"annotations": file_report, **reports}}
