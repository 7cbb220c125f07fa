"""Readers of the raw sources, sentence cleaning, and the report of what was skipped and why.

Sources:
    OSCAR `coco_caption` JSON   list of {"image_id", "id", "caption"} (train/val/test_caption.json, Karpathy split);
                                a row may name its image file ("file_name", "filename", "image" or "file_path")
    official COCO captions      {"images": [{"id", "file_name"}], "annotations": [{"image_id", "id", "caption"}]}
                                (captions_train2014.json)
    Karpathy JSON               {"images": [{"filename", "split", "sentences": [{"raw", "tokens"}]}]}
                                (dataset_flickr30k.json, dataset_coco.json with "filepath" and "cocoid";
                                `restval` counts as train)
    ShutterStock sentence dump  one sentence per line, a JSON list of strings, or the UIC `sentences.pkl`
                                (a pickled list of token lists with <S> / </S>)
    GCC                         Train_GCC-training.tsv: caption <TAB> url, no header
    text                        any plain file, one sentence per line

Nothing here raises on a bad row: bad rows are counted in a SkipReport. A file that cannot be read
at all raises DataPrepError naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LISTED_PER_REASON = 10_000
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SENTENCE_MARKERS = frozenset({"<S>", "</S>", "<s>", "</s>"})
# Keys under which a caption row (or an official COCO image entry) names its image file.
FILE_REFERENCE_KEYS = ("file_name", "filename", "image", "file_path")

SKIP_REASONS = {
    "unreadable_row": "a row that is not valid JSON/TSV or lacks the expected fields",
    "non_text": "a caption or sentence that is not a string",
    "empty": "an empty caption or sentence",
    "too_short": "fewer words than --min-words",
    "too_long": "more words than --max-words",
    "duplicate_sentence": "the same sentence again (case and final period ignored)",
    "duplicate_annotation_id": "an annotation id seen before",
    "duplicate_image_id": "an image id already used (in this or an earlier split)",
    "no_references": "a val/test image without a usable caption",
    "missing_image_file": "no image file under --images, neither the one the captions name nor one named after the id",
    "corrupt_image": "an image file that cannot be decoded",
}


class DataPrepError(Exception):
    """An input that cannot be read at all, or nothing usable left: the command fails with this message."""


@dataclass
class SkipReport:
    """What a table kept, and every item it skipped with the reason (listed up to LISTED_PER_REASON each)."""

    table: str
    inputs: list[str] = field(default_factory=list)
    kept: int = 0
    counts: Counter = field(default_factory=Counter)
    listed: dict = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, item: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise KeyError(f"unknown skip reason {reason!r}")
        self.counts[reason] += 1
        if len(self.listed[reason]) < LISTED_PER_REASON:
            self.listed[reason].append({"item": item, "detail": detail} if detail else {"item": item})

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {
            "table": self.table,
            "inputs": self.inputs,
            "kept": self.kept,
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.counts.items())),
            "reasons": {reason: SKIP_REASONS[reason] for reason in sorted(self.counts)},
            "listed_per_reason_at_most": LISTED_PER_REASON,
            "skipped_items": {reason: items for reason, items in sorted(self.listed.items())},
        }

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.counts.items()))
        return f"{self.table}: kept {self.kept}, skipped {self.skipped}" + (f" ({reasons})" if reasons else "")


@dataclass
class CaptionFile:
    """What a caption file says: image_id -> captions (file order), and image_id -> the image file it names, relative
    to the images folder, where it names one."""

    captions: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def add(self, image_id: str, text: str | None, file_reference: str | None = None) -> None:
        self.captions.setdefault(image_id, [])
        if text is not None:
            self.captions[image_id].append(text)
        if file_reference and image_id not in self.files:
            self.files[image_id] = file_reference


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataPrepError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataPrepError(f"{path}: cannot read JSON ({error})") from None


def _caption_text(value, where: str, report: SkipReport) -> str | None:
    """A reference caption as given, stripped; None (and counted) when missing or empty."""
    if not isinstance(value, str):
        report.skip("non_text", where, f"caption is {type(value).__name__}")
        return None
    text = " ".join(value.split())
    if not text:
        report.skip("empty", where)
        return None
    return text


def _image_id(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def _file_reference(entry: dict) -> str | None:
    """The image file a caption row names, if it names one."""
    for key in FILE_REFERENCE_KEYS:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _read_caption_rows(entries: list, path: Path, report: SkipReport, result: CaptionFile,
                       files: dict[str, str] | None = None) -> CaptionFile:
    """{image_id, id, caption} rows into `result`; `files` are image files named outside the rows (official COCO)."""
    seen_ids = set()
    for position, entry in enumerate(entries):
        where = f"{path.name}[{position}]"
        image_id = _image_id(entry.get("image_id")) if isinstance(entry, dict) else None
        if image_id is None:
            report.skip("unreadable_row", where, "not an object with an image_id")
            continue
        annotation_id = entry.get("id")
        if isinstance(annotation_id, (int, str)):
            if annotation_id in seen_ids:
                report.skip("duplicate_annotation_id", where, f"id {annotation_id}")
                continue
            seen_ids.add(annotation_id)
        text = _caption_text(entry.get("caption"), where, report)
        result.add(image_id, text, _file_reference(entry) or (files or {}).get(image_id))
    return result


def _read_official_coco(data: dict, path: Path, report: SkipReport) -> CaptionFile:
    """The official COCO captions format: `images` (id, file_name) and `annotations` (image_id, id, caption)."""
    if not isinstance(data.get("annotations"), list):
        raise DataPrepError(f"{path}: an official COCO captions file needs an 'annotations' list")
    result, files = CaptionFile(), {}
    for position, image in enumerate(data["images"]):
        image_id = _image_id(image.get("id")) if isinstance(image, dict) else None
        if image_id is None:
            report.skip("unreadable_row", f"{path.name}:images[{position}]", "not an object with an id")
            continue
        files[image_id] = _file_reference(image)
        # Images without a caption stay: a training image needs none, an evaluation one is counted as such.
        result.add(image_id, None)
    return _read_caption_rows(data["annotations"], path, report, result, files)


def is_karpathy_split(data) -> bool:
    """Karpathy's dataset_*.json: an `images` list whose entries carry `sentences` and a `split`."""
    images = data.get("images") if isinstance(data, dict) else None
    return (isinstance(images, list) and "annotations" not in data
            and any(isinstance(image, dict) and "sentences" in image for image in images))


def parse_captions(data, path: Path, report: SkipReport) -> CaptionFile:
    """The captions of one split from parsed JSON: OSCAR's row list or the official COCO format."""
    if isinstance(data, list):
        return _read_caption_rows(data, path, report, CaptionFile())
    if isinstance(data, dict) and isinstance(data.get("images"), list) and not is_karpathy_split(data):
        return _read_official_coco(data, path, report)
    found = "a Karpathy split file" if is_karpathy_split(data) else f"a {type(data).__name__}"
    raise DataPrepError(f"{path}: expected OSCAR's list of {{image_id, id, caption}} rows or the official COCO "
                        f"captions format ({{images, annotations}}), found {found}")


def read_oscar_captions(path: str | os.PathLike, report: SkipReport) -> CaptionFile:
    """The captions of one split: an OSCAR `coco_caption` file, or a file in the official COCO captions format."""
    path = Path(path)
    return parse_captions(_load_json(path), path, report)


def _karpathy_sentence(sentence) -> object:
    if not isinstance(sentence, dict):
        return sentence
    if "raw" in sentence:
        return sentence["raw"]
    tokens = sentence.get("tokens")
    return " ".join(tokens) if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else tokens


def read_karpathy(path: str | os.PathLike, report: SkipReport, data=None) -> dict[str, CaptionFile]:
    """split -> captions of a Karpathy `dataset_*.json`; restval joins train.

    The image id is COCO's `cocoid` where given (dataset_coco.json), otherwise the file stem (Flickr30k's ids); the
    image file is `filepath/filename` (`filename` alone where there is no `filepath`). `data` is the parsed file, when
    the caller has read it already.
    """
    path = Path(path)
    data = _load_json(path) if data is None else data
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataPrepError(f"{path}: expected Karpathy's format, an object with an 'images' list")
    splits = {"train": CaptionFile(), "val": CaptionFile(), "test": CaptionFile()}
    seen: set[str] = set()
    for position, image in enumerate(images):
        where = f"{path.name}:images[{position}]"
        filename = image.get("filename") if isinstance(image, dict) else None
        split = KARPATHY_SPLITS.get(image.get("split")) if isinstance(image, dict) else None
        if not isinstance(filename, str) or not filename.strip() or split is None:
            report.skip("unreadable_row", where, "needs a 'filename' and a 'split' in train/restval/val/test")
            continue
        image_id = _image_id(image.get("cocoid")) or Path(filename.strip()).stem
        if image_id in seen:
            report.skip("duplicate_image_id", where, image_id)
            continue
        seen.add(image_id)
        folder = image.get("filepath")
        file_reference = os.path.join(folder, filename.strip()) if isinstance(folder, str) else filename.strip()
        splits[split].add(image_id, None, file_reference)
        for number, sentence in enumerate(image.get("sentences") or []):
            splits[split].add(image_id, _caption_text(_karpathy_sentence(sentence), f"{where}.sentences[{number}]",
                                                      report))
    return splits


def load_caption_json(path: str | os.PathLike):
    """A caption file's parsed JSON; a missing or unreadable file raises DataPrepError naming it."""
    return _load_json(Path(path))


def index_image_files(images_dir: str | os.PathLike) -> dict[str, str]:
    """file stem -> path relative to `images_dir`, for every image file below it (first in sorted order wins)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DataPrepError(f"{root}: image folder not found")
    index: dict[str, str] = {}
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(stem, os.path.relpath(os.path.join(folder, name), root))
    return index


def image_file_stems(image_id: str) -> list[str]:
    """File stems an image id may have: itself, and COCO 2014 / 2017 names for numeric ids."""
    stems = [image_id]
    if image_id.isdigit():
        number = int(image_id)
        stems += [f"COCO_train2014_{number:012d}", f"COCO_val2014_{number:012d}", f"{number:012d}"]
    return stems


def find_image_file(index: dict[str, str], image_id: str, images_dir: str | os.PathLike | None = None,
                    file_reference: str | None = None) -> str | None:
    """The image file of `image_id`, relative to `images_dir`: the file the caption file names (as a path below
    `images_dir`, then by its stem anywhere below it), otherwise a file named after the id (`image_file_stems`)."""
    if file_reference:
        if images_dir is not None and (Path(images_dir) / file_reference).is_file():
            return os.path.normpath(file_reference)
        stem = os.path.splitext(os.path.basename(file_reference))[0]
        if stem in index:
            return index[stem]
    for stem in image_file_stems(image_id):
        if stem in index:
            return index[stem]
    return None


def lookups_tried(image_id: str, images_dir: str | os.PathLike, file_reference: str | None = None) -> str:
    """Where `find_image_file` looked for the image `image_id`, in words, for the message of a missing image."""
    stems = image_file_stems(image_id)
    places = []
    if file_reference:
        places.append(f"{Path(images_dir) / file_reference} (the file the captions name)")
        stems = [os.path.splitext(os.path.basename(file_reference))[0]] + stems
    names = " or ".join(f"{stem}.*" for stem in dict.fromkeys(stems))
    places.append(f"a file named {names} anywhere below {images_dir}")
    return "; ".join(places)


# ---------------------------------------------------------------- corpora


def _read_lines(path: Path, report: SkipReport) -> Iterator[tuple[str, object]]:
    """(where, line) of a text file; a line that is not UTF-8 is counted, not fatal."""
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path.name}:{number}"
                try:
                    yield where, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as error:
                    report.skip("unreadable_row", where, f"not UTF-8 ({error.reason})")
    except FileNotFoundError:
        raise DataPrepError(f"{path}: file not found") from None
    except OSError as error:
        raise DataPrepError(f"{path}: cannot read ({error})") from None


class _ListsOnlyUnpickler(pickle.Unpickler):
    """Sentence dumps hold only lists and strings; refusing classes keeps a pickle from running code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a sentence dump holds only lists of strings")


def _read_pickle(path: Path) -> list:
    try:
        with open(path, "rb") as handle:
            return _ListsOnlyUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise DataPrepError(f"{path}: file not found") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataPrepError(f"{path}: cannot read the sentence pickle ({error})") from None


def _detokenized(value) -> object:
    if isinstance(value, (list, tuple)) and all(isinstance(token, str) for token in value):
        return " ".join(token for token in value if token not in SENTENCE_MARKERS)
    return value


def read_sentence_dump(path: str | os.PathLike, report: SkipReport) -> Iterator[tuple[str, object]]:
    """(where, sentence) from a ShutterStock dump: text lines, a JSON list, or UIC's sentences.pkl."""
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        items = _read_pickle(path)
    elif path.suffix.lower() == ".json":
        items = _load_json(path)
    else:
        yield from _read_lines(path, report)
        return
    if not isinstance(items, list):
        raise DataPrepError(f"{path}: expected a list of sentences, found a {type(items).__name__}")
    for position, item in enumerate(items):
        yield f"{path.name}[{position}]", _detokenized(item)


def read_gcc_tsv(path: str | os.PathLike, report: SkipReport, column: int = 0) -> Iterator[tuple[str, object]]:
    """(where, caption) from GCC's Train_GCC-training.tsv (caption <TAB> url); short rows are counted."""
    for where, line in _read_lines(Path(path), report):
        fields = line.split("\t")
        if len(fields) < 2 or column >= len(fields):
            report.skip("unreadable_row", where, f"{len(fields)} tab-separated field(s)")
            continue
        yield where, fields[column]


def read_training_captions(path: str | os.PathLike, report: SkipReport) -> Iterator[tuple[str, object]]:
    """(where, caption) of the training split: an OSCAR train_caption.json or a Karpathy dataset_*.json."""
    path = Path(path)
    data = _load_json(path)
    if isinstance(data, list):
        for position, entry in enumerate(data):
            if not isinstance(entry, dict) or "caption" not in entry:
                report.skip("unreadable_row", f"{path.name}[{position}]", "not an object with a caption")
                continue
            yield f"{path.name}[{position}]", entry["caption"]
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        for position, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "split" not in image:
                report.skip("unreadable_row", f"{path.name}:images[{position}]", "not an image object with a split")
                continue
            if KARPATHY_SPLITS.get(image["split"]) != "train":
                continue
            for number, sentence in enumerate(image.get("sentences") or []):
                yield f"{path.name}:images[{position}].sentences[{number}]", _karpathy_sentence(sentence)
    else:
        raise DataPrepError(f"{path}: neither an OSCAR caption list nor a Karpathy dataset JSON")


_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,!?;:)])")
_SPACE_AFTER_OPEN_PARENTHESIS = re.compile(r"\(\s+")


def clean_sentence(text: str) -> str:
    """Collapse whitespace, drop spaces before punctuation, upper-case the first letter."""
    text = " ".join(text.split())
    text = _SPACE_AFTER_OPEN_PARENTHESIS.sub("(", _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text))
    return text[:1].upper() + text[1:]


def _dedup_key(text: str) -> str:
    return text.lower().rstrip(" .")


@dataclass
class CleaningRules:
    """Word-count bounds (whitespace words) and de-duplication of a corpus."""

    min_words: int = 1
    max_words: int = 40
    deduplicate: bool = True


def clean_corpus(items: Iterable[tuple[str, object]], rules: CleaningRules, report: SkipReport) -> list[str]:
    """Cleaned sentences in input order; every dropped one is counted in `report` with its reason."""
    kept: list[str] = []
    seen: set[str] = set()
    for where, value in items:
        if not isinstance(value, str):
            report.skip("non_text", where, f"{type(value).__name__}")
            continue
        text = clean_sentence(value)
        words = len(text.split())
        if words == 0:
            report.skip("empty", where)
        elif words < rules.min_words:
            report.skip("too_short", where, text)
        elif words > rules.max_words:
            report.skip("too_long", where, f"{words} words")
        elif rules.deduplicate and _dedup_key(text) in seen:
            report.skip("duplicate_sentence", where, text)
        else:
            seen.add(_dedup_key(text))
            kept.append(text)
    report.kept = len(kept)
    return kept
