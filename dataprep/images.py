"""Images tables (one row per image) and the COCO-format reference files that evaluation reads.

An image's file is the one its caption row names (`file_name`, `filename`, `image`, `file_path`: a path below
--images, or a file of that name anywhere below it), otherwise a file named after its id (`391895.jpg`,
`COCO_val2014_000000391895.jpg`, `000000391895.jpg`).

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

from clip_scstclipcap import norm_column

from .common import ClipRequest, RunOptions, require_rows, reusable, reused_report, table_description
from .sources import (CaptionFile, DataPrepError, SkipReport, find_image_file, index_image_files, is_karpathy_split,
                      load_caption_json, lookups_tried, parse_captions, read_karpathy, read_oscar_captions)
from .tables import TableWriter, images_features, report_path

SPLIT_ORDER = ("test", "val", "train")
NORM = norm_column("clip_features")
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


def _locate_files(selected: dict, images_dir: Path, index: dict, files: dict[str, str], report: SkipReport,
                  table: Path) -> list[tuple[str, str, list]]:
    """(image_id, file relative to `images_dir`, references) of the images whose file is found; the others are
    skipped, and when none is found the error says where the first one was looked for."""
    rows = []
    for image_id, references in selected.items():
        file_name = find_image_file(index, image_id, images_dir, files.get(image_id))
        if file_name is None:
            report.skip("missing_image_file", image_id, "looked for " + lookups_tried(image_id, images_dir,
                                                                                        files.get(image_id)))
        else:
            rows.append((image_id, file_name, references))
    if selected and not rows:
        report.write(report_path(table))
        first = next(iter(selected))
        raise DataPrepError(
            f"no image file found for any of the {len(selected)} images of {table}: for image {first} looked for "
            f"{lookups_tried(first, images_dir, files.get(first))}. Pass --images the folder that the caption "
            f"file's names are relative to; every image is listed in {report_path(table)}")
    return rows


def _write_images_table(rows: list, images_dir: Path, table: Path, clip: ClipRequest, options: RunOptions,
                        report: SkipReport, keep_references: bool, source: str) -> None:
    loaded = clip.load()
    description = table_description("images", loaded.metadata, source=source, split=table.name,
                                    references=keep_references)
    paths = [str(images_dir / file_name) for _, file_name, _ in rows]
    batches = loaded.iter_image_features(paths, batch_size=options.batch_size, num_workers=options.num_workers,
                                         progress=f"{table.parent.name}/{table.name}" if options.progress else None)
    with TableWriter(table, images_features(loaded.metadata["dim"], with_norms=True), description) as writer:
        for batch in batches:
            for position, reason, detail in batch.failures:
                report.skip(reason, rows[position][0], f"{rows[position][1]}: {detail}")
            if batch.indices:
                writer.write({
                    "image_id": [rows[i][0] for i in batch.indices],
                    "file_name": [rows[i][1] for i in batch.indices],
                    "clip_features": batch.features.numpy(),
                    NORM: batch.norms.numpy(),
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
                        train_references: bool, source: str,
                        files: dict[str, dict[str, str]] | None = None) -> dict[str, Path]:
    """Tables for every split in `captions` (split -> image_id -> references), reusing finished ones; returns
    split -> table path. `files` (split -> image_id -> file) are the image files the caption files name."""
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
            rows = _locate_files(selected, images_dir, index, (files or {}).get(split, {}), reports[split], table)
            keep = split in EVAL_SPLITS or train_references
            _write_images_table(rows, images_dir, table, clip, options, reports[split], keep, source)
        if split in EVAL_SPLITS:
            write_coco_references(table, group_dir / f"{split}_references.json", source)
    return tables


def prepare_coco(images_dir: str | Path, annotations: str | Path, output_dir: str | Path, clip: ClipRequest,
                 options: RunOptions, train_references: bool = False, name: str = "coco", split: str = "test") -> dict:
    """COCO-style captions to `<output>/<name>/{train,val,test}` (the splits the annotations have).

    `annotations` is a folder of `{train,val,test}_caption.json` (OSCAR's `coco_caption` Karpathy split; each file
    may also be in the official COCO captions format), a Karpathy split JSON (`dataset_coco.json`), or one caption
    file (OSCAR or official COCO format, e.g. `captions_val2014.json`) that becomes the split `split`.
    """
    annotations = Path(annotations)
    if annotations.is_dir():
        paths = {part: annotations / f"{part}_caption.json" for part in SPLIT_ORDER}
        if not any(path.is_file() for path in paths.values()):
            raise DataPrepError(f"{annotations}: no train_caption.json, val_caption.json or test_caption.json in "
                                "this folder (or pass a caption file or a Karpathy split JSON as --annotations)")
        paths = {part: path for part, path in paths.items() if path.is_file()}
        reports = {part: SkipReport(f"{name}/{part}", [str(path), str(images_dir)]) for part, path in paths.items()}
        parsed = {part: read_oscar_captions(path, reports[part]) for part, path in paths.items()}
        return _coco_tables(parsed, reports, images_dir, output_dir, clip, options, train_references, name)
    data = load_caption_json(annotations)
    if is_karpathy_split(data):
        return prepare_karpathy(annotations, images_dir, output_dir, clip, options, train_references, name, data)
    reports = {split: SkipReport(f"{name}/{split}", [str(annotations), str(images_dir)])}
    parsed = {split: parse_captions(data, annotations, reports[split])}
    return _coco_tables(parsed, reports, images_dir, output_dir, clip, options, train_references, name)


def _coco_tables(parsed: dict[str, CaptionFile], reports: dict[str, SkipReport], images_dir, output_dir, clip,
                 options, train_references: bool, name: str) -> dict:
    captions = {split: caption_file.captions for split, caption_file in parsed.items()}
    files = {split: caption_file.files for split, caption_file in parsed.items()}
    tables = build_images_tables(captions, reports, images_dir, Path(output_dir) / name, clip, options,
                                 train_references, source=name, files=files)
    return {"tables": tables, "reports": reports}


def prepare_karpathy(karpathy_json: str | Path, images_dir: str | Path, output_dir: str | Path, clip: ClipRequest,
                     options: RunOptions, train_references: bool = False, name: str = "flickr30k",
                     data=None) -> dict:
    """A Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json) to the same tables and COCO-format
    references; `data` is the parsed file when the caller has read it."""
    group_dir = Path(output_dir) / name
    file_report = SkipReport(f"{name}/annotations", [str(karpathy_json)])
    parsed = read_karpathy(karpathy_json, file_report, data)
    reports = {split: SkipReport(f"{name}/{split}", [str(karpathy_json), str(images_dir)]) for split in parsed}
    group_dir.mkdir(parents=True, exist_ok=True)
    file_report.kept = sum(len(caption_file.captions) for caption_file in parsed.values())
    file_report.write(group_dir / "annotations.report.json")
    result = _coco_tables(parsed, reports, images_dir, output_dir, clip, options, train_references, name)
    return {"tables": result["tables"], "reports": {"annotations": file_report, **reports}}


def prepare_flickr30k(karpathy_json: str | Path, images_dir: str | Path, output_dir: str | Path,
                      clip: ClipRequest, options: RunOptions, train_references: bool = False,
                      name: str = "flickr30k") -> dict:
    """Flickr30k from Karpathy's dataset_flickr30k.json to the same tables and COCO-format references."""
    return prepare_karpathy(karpathy_json, images_dir, output_dir, clip, options, train_references, name)
