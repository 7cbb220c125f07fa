"""The shapes world, end to end: `build_world` writes its data and trains (or copies) its CLIP under raw/, then
`prepare_shapes` runs it through the very same `coco` / `corpus` / `aggregate` / `pseudo-pairs` code as real data,
with the world's tiny CLIP.

    python prepare_datasets.py shapes                      # both, into data/shapes (reuses a world already built)
    python -m dataprep.world data/shapes/raw --seed 0      # build_world alone

The world's scenes, captions and images come from `dataprep/shapes.py`, its CLIP from `dataprep/world_clip.py`.
Layout under `<output_dir>` (default data/shapes):
    raw/images/<split>/<image_id>.png        splits clip_pretrain, train, val, test
    raw/annotations/<split>_caption.json     OSCAR coco_caption style [{"image_id", "id", "caption"}]; train, val
                                             and test carry 5 references an image (the unsupervised stages use only
                                             train's images; the supervised upper bound trains on every reference)
    raw/corpus/{in_domain,cross_domain}.txt  one sentence a line, describing scenes of no image split
    raw/corpus/{in_domain,cross_domain}_scenes.json  the scene each line describes (same order)
    raw/scenes/<split>.json                  {image_id: scene}, the ground truth
    raw/clip/                                the tiny CLIP, an open_clip `local-dir:` folder, and training.json
    raw/tokenizer/                           word-level PreTrainedTokenizerFast (save_pretrained)
    raw/world.json                           seed, sizes, vocabulary size, CLIP figures, timings
    tables/shapes/{train,val,test}            images tables (train keeps its 5 references an image, for the
                                              supervised upper bound)
    tables/shapes/{val,test}_references.json  COCO-format references
    tables/corpus/{in_domain,cross_domain}    corpora, and their seeded _init / _real halves
    tables/shapes/train_agg_<corpus>          train images with CLIP-agg targets
    tables/shapes/train_pseudo_pairs_<corpus> nearest-sentence pseudo pairs
    tables/manifest.json                      every path above, the CLIP name and the timings
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .common import ClipRequest, RunOptions
from .corpus import prepare_corpus
from .images import prepare_coco
from .neighbors import aggregate, pseudo_pairs
from .shapes import (
    CLIP_MODEL_NAME,
    CORPORA,
    IMAGE_SIZE,
    REFERENCES_PER_IMAGE,
    WORLD_VERSION,
    build_corpus,
    build_image_splits,
    clip_model_config,
    train_tokenizer,
    write_json,
)
from .world_clip import (
    CLIP_RECIPES,
    R1_DEFINITIONS,
    SHIPPED_CLIPS,
    ClipTraining,
    clip_report,
    copy_or_train_clip,
    evaluate_saved_clip,
)

GROUP = "shapes"

# --------------------------------------------------------------------------- building the raw world

_OUTPUTS = ("images", "annotations", "corpus", "scenes", "clip", "tokenizer", "world.json")


def _prepare_dir(raw_dir: Path, overwrite: bool) -> None:
    present = [name for name in _OUTPUTS if (raw_dir / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{raw_dir} already holds a shapes world ({', '.join(present)}); "
                              f"pass overwrite=True (--overwrite) to rebuild it")
    for name in present:
        path = raw_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    raw_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    """torch's CPU threads set to `num_threads` inside, the caller's count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build_corpora(raw_dir: Path, seed: int, counts: dict[str, int], log: Callable[[str], None]) -> dict:
    corpora = {}
    for corpus, count in counts.items():
        log(f"   corpus {corpus}: {count} sentences about scenes of no image split")
        corpora[corpus] = build_corpus(raw_dir, corpus, count, seed)
    return corpora


def _train_world_tokenizer(raw_dir: Path, corpora: dict, captions: dict, log: Callable[[str], None]):
    """The captioner's word-level tokenizer, over every corpus sentence and every reference."""
    annotated = [c for split in ("train", "val", "test") for caps in captions[split].values() for c in caps]
    tokenizer = train_tokenizer(corpora["in_domain"] + corpora["cross_domain"] + annotated, raw_dir / "tokenizer")
    log(f"   word-level tokenizer for the captioner: {len(tokenizer)} tokens")
    return tokenizer


def build_world(raw_dir: str | os.PathLike, seed: int = 0, *, n_clip_pretrain: int = 10000,
                pretrain_captions_per_image: int = 1, n_train: int = 4000, n_val: int = 250, n_test: int = 500,
                n_in_domain: int = 8000, n_cross_domain: int = 8000, clip: str = "sighted",
                clip_training: ClipTraining | None = None, num_threads: int = 1, overwrite: bool = False,
                retrain_clip: bool = False, shipped_clips: str | os.PathLike = SHIPPED_CLIPS,
                progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Generate, render and write the shapes world under `raw_dir`, train its tiny CLIP and tokenizer.

    `clip` names the CLIP's recipe (`CLIP_RECIPES`: "sighted" or "plain"); `clip_training` replaces it outright.
    A CLIP shipped in `shipped_clips` (`shipped_clip`) trained by the same recipe, seed and thread count on the same
    pretraining images and captions is copied instead of trained, unless `retrain_clip`.

    Deterministic for a seed: captions, JSON, images, tokenizer and, for a given `num_threads`, the
    CLIP (CPU results depend on the thread count, so it is fixed, not taken from the machine). One
    thread does not fight other jobs for the cores; more is faster on an idle machine.
    Says what it does through `log` (one line a step); `progress` shows the CLIP training's progress bar.
    Returns the summary also written to `world.json`.
    """
    if clip not in CLIP_RECIPES:
        raise ValueError(f"clip must be one of {sorted(CLIP_RECIPES)}, got {clip!r}")
    clip_training = clip_training or CLIP_RECIPES[clip]
    raw_dir = Path(raw_dir)
    _prepare_dir(raw_dir, overwrite)
    sizes = {"clip_pretrain": n_clip_pretrain, "train": n_train, "val": n_val, "test": n_test}
    with _torch_threads(num_threads):
        timings, clock = {}, time.perf_counter()
        log(f"== shapes world (seed {seed}) in {raw_dir}: drawing scenes, rendering {IMAGE_SIZE}x{IMAGE_SIZE} "
            f"images, writing captions")
        captions, pixels, scenes = build_image_splits(raw_dir, seed, sizes, pretrain_captions_per_image, log)
        corpora = _build_corpora(raw_dir, seed, {"in_domain": n_in_domain, "cross_domain": n_cross_domain}, log)
        timings["scenes_images_captions_s"], clock = time.perf_counter() - clock, time.perf_counter()
        tokenizer = _train_world_tokenizer(raw_dir, corpora, captions, log)
        timings["tokenizer_s"], clock = time.perf_counter() - clock, time.perf_counter()
        record, shipped = copy_or_train_clip(raw_dir, clip, clip_training, seed, num_threads, pixels, captions, scenes,
                                             None if retrain_clip else Path(shipped_clips), progress, log)
        timings["clip_training_s"], clock = time.perf_counter() - clock, time.perf_counter()
        log("== measuring the tiny CLIP on the validation split (loaded back from its folder)")
        metrics = evaluate_saved_clip(raw_dir, captions["val"], "val")
        timings["clip_evaluation_s"] = time.perf_counter() - clock
    summary = _summary(seed, sizes, pretrain_captions_per_image, corpora, len(tokenizer), record, metrics, timings)
    summary["clip"]["source"] = "shipped" if shipped else "trained"
    summary["num_threads"] = num_threads
    summary["clip"]["recipe"] = clip
    write_json(raw_dir / "world.json", summary)
    for line in clip_report(metrics):
        log(f"   {line}")
    log(f"   shapes world built in {summary['timings']['total_s']:.0f} s")
    return summary


def _summary(seed, sizes, pretrain_captions, corpora, vocab_size, record, metrics, timings) -> dict:
    return {
        "version": WORLD_VERSION,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "images": dict(sizes),
        "captions_per_image": {"clip_pretrain": pretrain_captions, "train": REFERENCES_PER_IMAGE,
                               "val": REFERENCES_PER_IMAGE, "test": REFERENCES_PER_IMAGE},
        "corpus_sentences": {name: len(sentences) for name, sentences in corpora.items()},
        "vocab_size": vocab_size,
        "clip": {
            "model_name": CLIP_MODEL_NAME, "local_dir": "clip", "embed_dim": clip_model_config()["embed_dim"],
            "training": {**record["training"], "first_loss": record["first_loss"], "final_loss": record["final_loss"]},
            "validation": metrics,
            "definitions": R1_DEFINITIONS,
        },
        "timings": {**{key: round(value, 2) for key, value in timings.items()},
                    "total_s": round(sum(timings.values()), 2)},
    }


# --------------------------------------------------------------------------- reusing a built world


def split_references(raw_dir: Path, split: str) -> dict[str, list[str]]:
    """{image id: its references} of a split, read back from its OSCAR-style caption file."""
    references: dict[str, list[str]] = {}
    for row in json.loads((Path(raw_dir) / "annotations" / f"{split}_caption.json").read_text()):
        references.setdefault(row["image_id"], []).append(row["caption"])
    return references


def _world_matches(world: dict, seed: int, sizes: dict, clip: str = "sighted") -> bool:
    """Whether an existing world was built by this code's version, with this seed, CLIP recipe and these image /
    corpus counts."""
    built = {**{f"n_{split}": count for split, count in world.get("images", {}).items()},
             **{f"n_{name}": count for name, count in world.get("corpus_sentences", {}).items()}}
    return world.get("version") == WORLD_VERSION and world.get("seed") == seed \
        and world.get("clip", {}).get("recipe", "sighted") == clip \
        and all(built.get(key) == value for key, value in sizes.items() if key.startswith("n_"))


def clip_figures(raw: Path, world: dict) -> dict:
    """The world CLIP's validation figures; a world whose summary predates them is measured now and its summary
    updated (the CLIP and its world are unchanged)."""
    if "validation" not in world["clip"]:
        world["clip"]["validation"] = evaluate_saved_clip(raw, split_references(raw, "val"), "val")
        world["clip"].pop("test", None)
        (raw / "world.json").write_text(json.dumps(world, indent=1))
    return world["clip"]["validation"]


def built_world(output_dir: str | Path) -> dict | None:
    """The summary (`world.json`) of the world built under `output_dir`, or None when there is none."""
    world_file = Path(output_dir) / "raw" / "world.json"
    return json.loads(world_file.read_text()) if world_file.is_file() else None


def world_is_ready(output_dir: str | Path = "data/shapes", seed: int = 0, clip: str = "sighted") -> bool:
    """Whether `prepare_shapes(output_dir, seed)` would only reuse: every table is there and the world was built by
    this version of its code with this seed (an older world, with another CLIP or other splits, is rebuilt)."""
    world = built_world(output_dir)
    return (Path(output_dir) / "tables" / "manifest.json").is_file() and world is not None \
        and _world_matches(world, seed, {}, clip)


def _build_or_reuse_world(raw: Path, seed: int, clip: str, rebuild: bool, retrain_clip: bool, sizes: dict,
                          progress: bool, log: Callable[[str], None]) -> tuple[dict, bool]:
    """The world summary, and whether it was (re)built now."""
    world_file = raw / "world.json"
    if world_file.is_file() and not rebuild and not retrain_clip:
        world = json.loads(world_file.read_text())
        if _world_matches(world, seed, sizes, clip):
            log(f"== reusing the shapes world in {raw} (seed {seed}, {clip} CLIP; --overwrite rebuilds it)")
            for line in clip_report(clip_figures(raw, world)):
                log(f"   {line}")
            return world, False
    # Without world.json an earlier build did not finish: whatever it left is replaced.
    return build_world(raw, seed=seed, clip=clip, overwrite=True, retrain_clip=retrain_clip, progress=progress,
                       log=log, **sizes), True


# --------------------------------------------------------------------------- its tables


def _print_reports(step: str, result: dict, log: Callable[[str], None]) -> None:
    log(f"== {step}")
    for report in result["reports"].values():
        log(f"   {report.summary()}")


def _prepare_corpora(raw: Path, tables: Path, clip: ClipRequest, options: RunOptions, pretrain_split: float,
                     seed: int, manifest: dict, log: Callable[[str], None]) -> None:
    """Each corpus's table and its seeded _init / _real halves, entered in `manifest`."""
    for corpus in CORPORA:
        result = prepare_corpus("text", raw / "corpus" / f"{corpus}.txt", tables, clip, options, name=corpus,
                                pretrain_split=pretrain_split, seed=seed)
        _print_reports(f"corpus {corpus}", result, log)
        for part, path in result["tables"].items():
            manifest[f"corpus_{corpus}" if part == "corpus" else f"corpus_{corpus}_{part}"] = str(path)


def _aggregate_corpora(clip: ClipRequest, options: RunOptions, temperature: float | None, manifest: dict,
                       log: Callable[[str], None]) -> None:
    """The train images' CLIP-agg targets over each corpus, entered in `manifest`."""
    for corpus in CORPORA:
        result = aggregate(manifest["train"], manifest[f"corpus_{corpus}"], options, temperature=temperature, clip=clip)
        _print_reports(f"aggregate {corpus}", result, log)
        manifest[f"train_agg_{corpus}"] = str(result["tables"]["aggregate"])
        manifest[f"temperature_{corpus}"] = result["temperature"]


def _pair_corpora(clip: ClipRequest, options: RunOptions, manifest: dict, log: Callable[[str], None]) -> None:
    """The train images' nearest sentence of each corpus (pseudo pairs), entered in `manifest`."""
    for corpus in CORPORA:
        result = pseudo_pairs(manifest["train"], manifest[f"corpus_{corpus}"], options, clip=clip)
        _print_reports(f"pseudo-pairs {corpus}", result, log)
        manifest[f"train_pseudo_pairs_{corpus}"] = str(result["tables"]["pseudo_pairs"])


def prepare_shapes(output_dir: str | Path = "data/shapes", seed: int = 0, overwrite: bool = False,
                   options: RunOptions | None = None, pretrain_split: float = 0.5,
                   temperature: float | None = None, log: Callable[[str], None] = print, clip: str = "sighted",
                   retrain_clip: bool = False, **sizes) -> dict:
    """Build (or reuse) the shapes world and all its tables; returns the manifest (also written to disk).

    `clip` is the world CLIP's recipe ("sighted" or "plain", see `dataprep.world_clip.CLIP_RECIPES`); `sizes` go to
    `build_world`. A world built anew rebuilds every table, since its CLIP changed. `retrain_clip` rebuilds the world
    and trains its CLIP even where a shipped one fits (`dataprep.world_clip.shipped_clip`).
    """
    output_dir = Path(output_dir)
    raw, tables = output_dir / "raw", output_dir / "tables"
    options = options or RunOptions()
    timings = {}
    started = time.perf_counter()
    world, rebuilt = _build_or_reuse_world(raw, seed, clip, overwrite, retrain_clip, sizes, options.progress, log)
    timings["world"] = time.perf_counter() - started
    options = replace(options, overwrite=options.overwrite or overwrite or rebuilt)
    clip = ClipRequest(f"local-dir:{raw / 'clip'}", None, options.device)
    log(f"== the world goes through the same steps as real data (coco, corpus, aggregate, pseudo-pairs), "
        f"with its tiny CLIP, into {tables}")

    started = time.perf_counter()
    images = prepare_coco(raw / "images", raw / "annotations", tables, clip, options, train_references=True, name=GROUP)
    timings["coco"] = time.perf_counter() - started
    _print_reports("images", images, log)

    manifest = {"root": str(output_dir), "raw": str(raw), "tables": str(tables), "seed": seed,
                "clip_model": clip.model_name, "tokenizer": str(raw / "tokenizer"), "world": world,
                **{split: str(path) for split, path in images["tables"].items()},
                **{f"{split}_references": str(tables / GROUP / f"{split}_references.json") for split in ("val", "test")}}
    started = time.perf_counter()
    _prepare_corpora(raw, tables, clip, options, pretrain_split, seed, manifest, log)
    timings["corpus"], started = time.perf_counter() - started, time.perf_counter()
    _aggregate_corpora(clip, options, temperature, manifest, log)
    timings["aggregate"], started = time.perf_counter() - started, time.perf_counter()
    _pair_corpora(clip, options, manifest, log)
    timings["pseudo_pairs"] = time.perf_counter() - started

    manifest["timings_s"] = {step: round(seconds, 2) for step, seconds in timings.items()}
    (tables / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log(f"== shapes world ready in {sum(timings.values()):.0f} s: tables in {tables}; what its tiny CLIP sees "
        f"(validation split):")
    for line in clip_report(clip_figures(raw, world)):
        log(f"   {line}")
    return manifest


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m dataprep.world RAW_DIR`: build_world alone, from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-clip-pretrain", type=int, default=10000)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=250)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--n-in-domain", type=int, default=8000)
    parser.add_argument("--n-cross-domain", type=int, default=8000)
    parser.add_argument("--clip", choices=sorted(CLIP_RECIPES), default="sighted", help="the CLIP's recipe")
    parser.add_argument("--clip-steps", type=int, default=ClipTraining.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CLIP depends on it)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # steps are printed
    return build_world(args.raw_dir, args.seed, n_clip_pretrain=args.n_clip_pretrain, n_train=args.n_train,
                       n_val=args.n_val, n_test=args.n_test, n_in_domain=args.n_in_domain,
                       n_cross_domain=args.n_cross_domain, clip=args.clip,
                       clip_training=replace(CLIP_RECIPES[args.clip], steps=args.clip_steps),
                       num_threads=args.threads, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
