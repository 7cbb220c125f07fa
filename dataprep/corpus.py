"""Sentence corpora (one row per sentence: text, CLIP text features, source).

Layout under `<output>/corpus/`:
    <name>/                the whole cleaned corpus (name defaults to the source, or the file stem for `text`)
    <name>.report.json     what cleaning kept and dropped, and why
    <name>_init/ <name>_real/
                           with --pretrain-split F: a seeded F / (1 - F) partition of <name>, the part that
                           initialises the generator and the part the discriminator sees as real sentences
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clip_scstclipcap import norm_column, read_table_description

from .common import ClipRequest, RunOptions, require_rows, reusable, reused_report, table_description
from .sources import (CleaningRules, DataPrepError, SkipReport, clean_corpus, read_gcc_tsv, read_sentence_dump,
                      read_training_captions)
from .tables import TableWriter, corpus_features, load_table, report_path, save_table, table_exists

SOURCES = ("shutterstock", "gcc", "coco", "flickr30k", "text")
DEFAULT_MIN_WORDS = {"gcc": 5}


def read_corpus(source: str, input_path: str | Path, report: SkipReport, gcc_column: int = 0):
    """(where, sentence) items of a corpus source, before cleaning."""
    if source in ("shutterstock", "text"):
        return read_sentence_dump(input_path, report)
    if source == "gcc":
        return read_gcc_tsv(input_path, report, gcc_column)
    if source in ("coco", "flickr30k"):
        return read_training_captions(input_path, report)
    raise ValueError(f"unknown corpus source {source!r}; choose one of {', '.join(SOURCES)}")


def _write_corpus_table(sentences: list[str], table: Path, source: str, clip: ClipRequest, options: RunOptions,
                        description_extra: dict) -> None:
    loaded = clip.load()
    description = table_description("corpus", loaded.metadata, **description_extra)
    batches = loaded.iter_text_features(sentences, batch_size=options.batch_size, num_workers=options.num_workers,
                                        progress=f"corpus/{table.name}" if options.progress else None)
    with TableWriter(table, corpus_features(loaded.metadata["dim"], with_norms=True), description) as writer:
        for batch in batches:
            writer.write({
                "text": [sentences[i] for i in batch.indices],
                "clip_features": batch.features.numpy(),
                norm_column("clip_features"): batch.norms.numpy(),
                "source": [source] * len(batch.indices),
            })
        writer.finish()


def split_for_pretraining(table: Path, fraction: float, seed: int) -> dict[str, Path]:
    """Seeded partition of a corpus table into `<name>_init` (fraction) and `<name>_real` (the rest)."""
    if not 0.0 < fraction < 1.0:
        raise DataPrepError(f"--pretrain-split must lie strictly between 0 and 1, got {fraction}")
    corpus = load_table(table)
    order = np.random.default_rng(seed).permutation(len(corpus))
    cut = int(round(fraction * len(corpus)))
    if cut == 0 or cut == len(corpus):
        raise DataPrepError(f"--pretrain-split {fraction} of {len(corpus)} sentences leaves one part empty")
    description = read_table_description(table)
    parts = {"init": np.sort(order[:cut]), "real": np.sort(order[cut:])}
    paths = {}
    for part, rows in parts.items():
        path = table.with_name(f"{table.name}_{part}")
        split = {"of": table.name, "part": part, "fraction": fraction, "seed": seed}
        save_table(corpus.select(rows), path, {**description, "pretrain_split": split})
        paths[part] = path
    return paths


def _same_split(path: Path, fraction: float, seed: int) -> bool:
    if not table_exists(path):
        return False
    split = read_table_description(path).get("pretrain_split", {})
    return split.get("fraction") == fraction and split.get("seed") == seed


def prepare_corpus(source: str, input_path: str | Path, output_dir: str | Path, clip: ClipRequest,
                   options: RunOptions, name: str | None = None, min_words: int | None = None,
                   max_words: int = 40, deduplicate: bool = True, pretrain_split: float | None = None,
                   seed: int = 0, gcc_column: int = 0) -> dict:
    """Clean a corpus, encode it with CLIP's text tower, write `<output>/corpus/<name>` (and its split)."""
    name = name or (Path(input_path).stem if source == "text" else source)
    table = Path(output_dir) / "corpus" / name
    table.parent.mkdir(parents=True, exist_ok=True)
    rules = CleaningRules(DEFAULT_MIN_WORDS.get(source, 1) if min_words is None else min_words, max_words,
                          deduplicate)
    if reusable(table, clip, options, "corpus table"):
        report = reused_report(table)
    else:
        report = SkipReport(f"corpus/{name}", [str(input_path)])
        sentences = clean_corpus(read_corpus(source, input_path, report, gcc_column), rules, report)
        report.write(report_path(table))
        require_rows(report, table)
        cleaning = {"min_words": rules.min_words, "max_words": rules.max_words, "deduplicate": deduplicate}
        _write_corpus_table(sentences, table, source, clip, options,
                            {"source": source, "name": name, "input": str(input_path), "cleaning": cleaning})
    tables = {"corpus": table}
    if pretrain_split is not None:
        parts = {part: table.with_name(f"{name}_{part}") for part in ("init", "real")}
        if options.overwrite or not all(_same_split(path, pretrain_split, seed) for path in parts.values()):
            parts = split_for_pretraining(table, pretrain_split, seed)
        tables.update(parts)
    return {"tables": tables, "reports": {name: report}}
