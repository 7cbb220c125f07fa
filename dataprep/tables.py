"""Table schemas, a streaming table writer, and chunked reading of feature columns.

A table is written row batch by row batch into one Arrow file in a hidden staging folder (memory
stays flat however many rows there are), then published with `Dataset.save_to_disk` under a
temporary name and renamed into place. A table folder that exists is therefore complete, and a
command re-run without --overwrite reuses it. Its metadata (see clip_scstclipcap) is the JSON in
`DatasetInfo.description`; its report `<table>.report.json` lies beside the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetInfo, Features, List, Value
from datasets.arrow_writer import ArrowWriter

from clip_scstclipcap import check_clip_metadata, feature_matrix, norm_column, read_table_description

NORMS = {norm_column("clip_features"): Value("float32")}


def feature_column(dim: int) -> List:
    return List(Value("float32"), length=dim)


def images_features(dim: int, with_agg: bool = False, with_norms: bool = False) -> Features:
    """Images table schema; `with_norms` adds `clip_features_norm`, the raw CLIP embedding's norm (clip_scstclipcap)."""
    columns = {
        "image_id": Value("string"),
        "file_name": Value("string"),
        "clip_features": feature_column(dim),
        "references": List(Value("string")),
        **(NORMS if with_norms else {}),
    }
    if with_agg:
        columns["agg_text_features"] = feature_column(dim)
    return Features(columns)


def corpus_features(dim: int, with_norms: bool = False) -> Features:
    """Corpus table schema; `with_norms` adds `clip_features_norm`, the raw CLIP embedding's norm."""
    return Features({"text": Value("string"), "clip_features": feature_column(dim), **(NORMS if with_norms else {}),
                     "source": Value("string")})


def pseudo_pairs_features(dim: int, with_norms: bool = False) -> Features:
    """Pseudo-pairs schema; `with_norms` adds `clip_features_norm`, the raw image embedding's norm."""
    return Features({
        "image_id": Value("string"),
        "clip_features": feature_column(dim),
        **(NORMS if with_norms else {}),
        "text": Value("string"),
        "text_features": feature_column(dim),
        "similarity": Value("float32"),
    })


def report_path(table: str | os.PathLike) -> Path:
    table = Path(table)
    return table.with_name(table.name + ".report.json")


def table_exists(table: str | os.PathLike) -> bool:
    return (Path(table) / "dataset_info.json").is_file() and (Path(table) / "state.json").is_file()


def _arrow_column(values, arrow_type: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(arrow_type):
        width = arrow_type.list_size
        matrix = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1, width))
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), width)
    return pa.array(values, type=arrow_type)


class TableWriter:
    """Streams row batches of one table to disk; `finish()` publishes it, `abort()` removes what was written."""

    def __init__(self, path: str | os.PathLike, features: Features, description: dict):
        self.path = Path(path)
        self.features = features
        self.description = description
        self.staging = self.path.with_name(f".{self.path.name}.staging")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.arrow_file = self.staging / "rows.arrow"
        self.schema = features.arrow_schema
        self.writer = ArrowWriter(features=features, path=str(self.arrow_file))
        self.rows = 0

    def write(self, columns: dict) -> None:
        """Append rows: a dict of equal-length columns (feature columns as [n, D] arrays)."""
        arrays = [_arrow_column(columns[field.name], field.type) for field in self.schema]
        batch = pa.Table.from_arrays(arrays, schema=self.schema)
        if batch.num_rows:
            self.writer.write_table(batch)
            self.rows += batch.num_rows

    def finish(self) -> Dataset:
        self.writer.finalize()
        info = DatasetInfo(description=json.dumps(self.description), features=self.features)
        saving = self.path.with_name(f".{self.path.name}.saving")
        shutil.rmtree(saving, ignore_errors=True)
        with _quiet_progress():
            Dataset.from_file(str(self.arrow_file), info=info).save_to_disk(str(saving))
        shutil.rmtree(self.path, ignore_errors=True)
        saving.rename(self.path)
        shutil.rmtree(self.staging)
        return datasets.load_from_disk(str(self.path))

    def abort(self) -> None:
        self.writer.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            self.abort()


class _quiet_progress:
    """save_to_disk's own progress bar would repeat ours; silence it while publishing."""

    def __enter__(self):
        self.was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        if self.was_enabled:
            datasets.enable_progress_bars()


def save_table(dataset: Dataset, path: str | os.PathLike, description: dict) -> Dataset:
    """Publish an in-memory or derived dataset (e.g. a selection) the same way TableWriter does."""
    path = Path(path)
    saving = path.with_name(f".{path.name}.saving")
    shutil.rmtree(saving, ignore_errors=True)
    with _quiet_progress():
        dataset.info.description = json.dumps(description)
        dataset.save_to_disk(str(saving))
    shutil.rmtree(path, ignore_errors=True)
    saving.rename(path)
    return datasets.load_from_disk(str(path))


def load_table(path: str | os.PathLike, expected_clip: dict | None = None, what: str = "table") -> Dataset:
    """Load a saved table, refusing it (ClipMismatchError) when its CLIP differs from `expected_clip`."""
    if not table_exists(path):
        raise FileNotFoundError(f"{path}: no saved table there (run prepare_datasets.py first)")
    description = read_table_description(path)
    if expected_clip is not None:
        check_clip_metadata(description["clip"], expected_clip, f"{what} {path}")
    return datasets.load_from_disk(str(path))


def iter_feature_chunks(dataset: Dataset, column: str, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, features) chunks of a feature column, `chunk_rows` rows at a time."""
    for start in range(0, len(dataset), chunk_rows):
        yield start, feature_matrix(dataset, column, start, min(start + chunk_rows, len(dataset)))
