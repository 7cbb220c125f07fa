"""CLIP-agg targets and nearest-sentence pseudo pairs: every image against the whole corpus, in chunks.

`aggregate` writes a new images table, by default beside the images table as
`<images>_agg_<corpus>`: all columns of the images table plus `agg_text_features`, the L2-normalised
    sum_j softmax_j(t * cos(image, sentence_j)) * sentence_j
over every sentence j of the corpus. The softmax is computed online over corpus chunks (running
max and sum, as in streaming attention), so memory holds the corpus features plus one
[image chunk x corpus chunk] block, never the [images x corpus] matrix.

`pseudo-pairs` writes `<images>_pseudo_pairs_<corpus>`: for every image, the corpus sentence
with the highest cosine similarity (image_id, clip_features, text, text_features, similarity).

Both carry the images table's `clip_features_norm` (the raw embeddings' norms) when it has them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clip_scstclipcap import check_clip_metadata, norm_column, read_table_description

from .common import ClipRequest, RunOptions, reused_report, table_description
from .sources import DataPrepError, SkipReport
from .tables import (TableWriter, feature_matrix, images_features, iter_feature_chunks, load_table,
                     pseudo_pairs_features, report_path, table_exists)

# Temperatures of the published CLIP-agg recipes, per corpus source.
PUBLISHED_TEMPERATURES = {"coco": 100.0, "gcc": 175.0}
NORM = norm_column("clip_features")
IMAGE_CHUNK = 1024
CORPUS_CHUNK = 16384


def check_tables_agree(images_path: Path, corpus_path: Path, clip: ClipRequest | None) -> tuple[dict, dict]:
    """Refuse (ClipMismatchError) before any work when the two tables, or the requested CLIP, disagree."""
    images_description = read_table_description(images_path)
    corpus_description = read_table_description(corpus_path)
    if images_description.get("table") != "images":
        raise DataPrepError(f"{images_path} is a {images_description.get('table')} table, not an images table")
    if corpus_description.get("table") != "corpus":
        raise DataPrepError(f"{corpus_path} is a {corpus_description.get('table')} table, not a corpus table")
    image_clip = images_description["clip"]
    check_clip_metadata(corpus_description["clip"], image_clip,
                        f"corpus table {corpus_path} (used with images table {images_path})")
    if clip is not None:
        check_clip_metadata(image_clip, clip.expected(), f"images table {images_path}")
    return images_description, corpus_description


def default_temperature(corpus_description: dict) -> float:
    """The published t for the corpus source, else the CLIP's own logit scale."""
    source = corpus_description.get("source")
    if source in PUBLISHED_TEMPERATURES:
        return PUBLISHED_TEMPERATURES[source]
    scale = corpus_description["clip"].get("logit_scale")
    if scale is None:
        raise DataPrepError(f"no published temperature for corpus source {source!r} and no CLIP logit scale "
                            f"recorded; give --temperature")
    return float(scale)


def load_corpus_features(corpus, device: torch.device) -> torch.Tensor:
    """All corpus features [M, D] on `device`, L2-normalised (4 bytes x D per sentence, filled chunk by chunk)."""
    features = None
    for start, chunk in iter_feature_chunks(corpus, "clip_features", CORPUS_CHUNK):
        if features is None:
            features = torch.empty(len(corpus), chunk.shape[1], device=device)
        features[start:start + len(chunk)] = F.normalize(torch.from_numpy(chunk), dim=-1).to(device)
    if features is None:
        raise DataPrepError("the corpus table has no sentences")
    return features


def aggregated_targets(images: torch.Tensor, corpus: torch.Tensor, temperature: float,
                       corpus_chunk: int = CORPUS_CHUNK) -> torch.Tensor:
    """L2-normalised softmax(t * cos)-weighted sums of the corpus features, one per image row."""
    images = F.normalize(images, dim=-1)
    running_max = torch.full((len(images), 1), -torch.inf, device=images.device)
    running_sum = torch.zeros(len(images), 1, device=images.device)
    weighted = torch.zeros(len(images), corpus.shape[1], device=images.device)
    for start in range(0, len(corpus), corpus_chunk):
        block = corpus[start:start + corpus_chunk]
        logits = temperature * images @ block.T
        new_max = torch.maximum(running_max, logits.max(dim=1, keepdim=True).values)
        rescale = torch.exp(running_max - new_max)
        weights = torch.exp(logits - new_max)
        running_sum = running_sum * rescale + weights.sum(dim=1, keepdim=True)
        weighted = weighted * rescale + weights @ block
        running_max = new_max
    return F.normalize(weighted / running_sum, dim=-1)


def nearest_sentences(images: torch.Tensor, corpus: torch.Tensor,
                      corpus_chunk: int = CORPUS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, cosine) of the most similar corpus row for every image row."""
    images = F.normalize(images, dim=-1)
    best = torch.full((len(images),), -torch.inf, device=images.device)
    best_index = torch.zeros(len(images), dtype=torch.long, device=images.device)
    for start in range(0, len(corpus), corpus_chunk):
        values, indices = (images @ corpus[start:start + corpus_chunk].T).max(dim=1)
        better = values > best
        best = torch.where(better, values, best)
        best_index = torch.where(better, indices + start, best_index)
    return best_index, best


def _image_chunks(images, options: RunOptions, device: torch.device, label: str):
    """(rows, features) per chunk of the images table: its other columns (the raw norms too, where the table has
    them) and its CLIP features on `device`."""
    columns = ["image_id", "file_name", "references"] + [NORM] * (NORM in images.column_names)
    with tqdm(total=len(images), desc=label, unit="img", disable=not options.progress, dynamic_ncols=True) as bar:
        for start in range(0, len(images), IMAGE_CHUNK):
            stop = min(start + IMAGE_CHUNK, len(images))
            rows = images.select_columns(columns).select(range(start, stop))
            features = torch.from_numpy(feature_matrix(images, "clip_features", start, stop)).to(device)
            yield rows.to_dict(), features
            bar.update(stop - start)


def _finish_report(table: Path, inputs: list[str], kept: int) -> SkipReport:
    report = SkipReport(f"{table.parent.name}/{table.name}", inputs, kept)
    report.write(report_path(table))
    return report


def aggregate(images_path: str | Path, corpus_path: str | Path, options: RunOptions, output: str | Path | None = None,
              temperature: float | None = None, clip: ClipRequest | None = None) -> dict:
    """Write the images table with `agg_text_features` (see the module docstring)."""
    images_path, corpus_path = Path(images_path), Path(corpus_path)
    output = Path(output) if output else images_path.with_name(f"{images_path.name}_agg_{corpus_path.name}")
    images_description, corpus_description = check_tables_agree(images_path, corpus_path, clip)
    temperature = default_temperature(corpus_description) if temperature is None else float(temperature)
    if table_exists(output) and not options.overwrite:
        found = read_table_description(output).get("aggregation", {})
        if found.get("corpus") == str(corpus_path) and found.get("temperature") == temperature:
            return {"tables": {"aggregate": output}, "reports": {output.name: reused_report(output)},
                    "temperature": temperature}
    images, corpus = load_table(images_path), load_table(corpus_path)
    device = torch.device(options.device)
    corpus_features = load_corpus_features(corpus, device)
    aggregation = {"corpus": str(corpus_path), "corpus_rows": len(corpus), "temperature": temperature}
    description = {**images_description, "aggregation": aggregation}
    dim = images_description["clip"]["dim"]
    with TableWriter(output, images_features(dim, with_agg=True, with_norms=NORM in images.column_names),
                     description) as writer:
        for rows, features in _image_chunks(images, options, device, f"aggregate {output.name}"):
            targets = aggregated_targets(features, corpus_features, temperature)
            writer.write({**rows, "clip_features": features.cpu().numpy(), "agg_text_features": targets.cpu().numpy()})
        kept = writer.rows
        writer.finish()
    report = _finish_report(output, [str(images_path), str(corpus_path)], kept)
    return {"tables": {"aggregate": output}, "reports": {output.name: report}, "temperature": temperature}


def pseudo_pairs(images_path: str | Path, corpus_path: str | Path, options: RunOptions,
                 output: str | Path | None = None, clip: ClipRequest | None = None) -> dict:
    """Write the nearest-sentence pseudo pairs of every image (see the module docstring)."""
    images_path, corpus_path = Path(images_path), Path(corpus_path)
    output = Path(output) if output else images_path.with_name(f"{images_path.name}_pseudo_pairs_{corpus_path.name}")
    images_description, _ = check_tables_agree(images_path, corpus_path, clip)
    if table_exists(output) and not options.overwrite:
        if read_table_description(output).get("pseudo_pairs", {}).get("corpus") == str(corpus_path):
            return {"tables": {"pseudo_pairs": output}, "reports": {output.name: reused_report(output)}}
    images, corpus = load_table(images_path), load_table(corpus_path)
    device = torch.device(options.device)
    corpus_features = load_corpus_features(corpus, device)
    description = table_description("pseudo_pairs", images_description["clip"],
                                    pseudo_pairs={"images": str(images_path), "corpus": str(corpus_path)})
    with_norms = NORM in images.column_names
    schema = pseudo_pairs_features(images_description["clip"]["dim"], with_norms=with_norms)
    with TableWriter(output, schema, description) as writer:
        for rows, features in _image_chunks(images, options, device, f"pseudo pairs {output.name}"):
            index, similarity = nearest_sentences(features, corpus_features)
            index = index.cpu().numpy()
            writer.write({
                "image_id": rows["image_id"],
                "clip_features": features.cpu().numpy(),
                **({NORM: rows[NORM]} if with_norms else {}),
                "text": corpus.select(index)[:]["text"] if len(index) else [],
                "text_features": corpus_features[torch.from_numpy(index).to(device)].cpu().numpy(),
                "similarity": similarity.cpu().numpy().astype(np.float32),
            })
        kept = writer.rows
        writer.finish()
    report = _finish_report(output, [str(images_path), str(corpus_path)], kept)
    return {"tables": {"pseudo_pairs": output}, "reports": {output.name: report}}
