"""The shapes world: built once by `dataprep.shapes.build_world`, then prepared by the very same
`coco` / `corpus` / `aggregate` / `pseudo-pairs` code as real data, with the world's tiny CLIP.

Layout under `<output_dir>` (default data/shapes):
    raw/                          the world as build_world writes it (images, OSCAR-style captions,
                                  corpus/*.txt, the tiny CLIP as an open_clip local-dir folder, ...)
    tables/shapes/{train,val,test}            images tables (train keeps its 5 references an image, for the
                                              supervised upper bound)
    tables/shapes/{val,test}_references.json  COCO-format references
    tables/corpus/{in_domain,cross_domain}    corpora, and their seeded _init / _real halves
    tables/shapes/train_agg_<corpus>          train images with CLIP-agg targets
    tables/shapes/train_pseudo_pairs_<corpus> nearest-sentence pseudo pairs
    tables/manifest.json                      every path above, the CLIP name and the timings
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .common import ClipRequest, RunOptions
from .corpus import prepare_corpus
from .images import prepare_coco
from .neighbors import aggregate, pseudo_pairs
from .shapes import WORLD_VERSION, build_world, clip_report, evaluate_saved_clip, split_references

CORPORA = ("in_domain", "cross_domain")
GROUP = "shapes"


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


def _build_world(raw: Path, seed: int, clip: str, rebuild: bool, retrain_clip: bool, sizes: dict, progress: bool,
                 log: Callable[[str], None]) -> tuple[dict, bool]:
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


def _print_reports(step: str, result: dict, log: Callable[[str], None]) -> None:
    log(f"== {step}")
    for report in result["reports"].values():
        log(f"   {report.summary()}")


def prepare_shapes(output_dir: str | Path = "data/shapes", seed: int = 0, overwrite: bool = False,
                   options: RunOptions | None = None, pretrain_split: float = 0.5,
                   temperature: float | None = None, log: Callable[[str], None] = print, clip: str = "sighted",
                   retrain_clip: bool = False, **sizes) -> dict:
    """Build (or reuse) the shapes world and all its tables; returns the manifest (also written to disk).

    `clip` is the world CLIP's recipe ("sighted" or "plain", see `dataprep.shapes.CLIP_RECIPES`); `sizes` go to
    `build_world`. A world built anew rebuilds every table, since its CLIP changed. `retrain_clip` rebuilds the world
    and trains its CLIP even where a shipped one fits (`dataprep.shapes.shipped_clip`).
    """
    output_dir = Path(output_dir)
    raw, tables = output_dir / "raw", output_dir / "tables"
    options = options or RunOptions()
    timings = {}
    started = time.perf_counter()
    world, rebuilt = _build_world(raw, seed, clip, overwrite, retrain_clip, sizes, options.progress, log)
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
    for corpus in CORPORA:
        result = prepare_corpus("text", raw / "corpus" / f"{corpus}.txt", tables, clip, options, name=corpus,
                                pretrain_split=pretrain_split, seed=seed)
        _print_reports(f"corpus {corpus}", result, log)
        for part, path in result["tables"].items():
            manifest[f"corpus_{corpus}" if part == "corpus" else f"corpus_{corpus}_{part}"] = str(path)
    timings["corpus"] = time.perf_counter() - started

    started = time.perf_counter()
    for corpus in CORPORA:
        result = aggregate(manifest["train"], manifest[f"corpus_{corpus}"], options, temperature=temperature, clip=clip)
        _print_reports(f"aggregate {corpus}", result, log)
        manifest[f"train_agg_{corpus}"] = str(result["tables"]["aggregate"])
        manifest[f"temperature_{corpus}"] = result["temperature"]
    timings["aggregate"] = time.perf_counter() - started

    started = time.perf_counter()
    for corpus in CORPORA:
        result = pseudo_pairs(manifest["train"], manifest[f"corpus_{corpus}"], options, clip=clip)
        _print_reports(f"pseudo-pairs {corpus}", result, log)
        manifest[f"train_pseudo_pairs_{corpus}"] = str(result["tables"]["pseudo_pairs"])
    timings["pseudo_pairs"] = time.perf_counter() - started

    manifest["timings_s"] = {step: round(seconds, 2) for step, seconds in timings.items()}
    (tables / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log(f"== shapes world ready in {sum(timings.values()):.0f} s: tables in {tables}; what its tiny CLIP sees "
        f"(validation split):")
    for line in clip_report(clip_figures(raw, world)):
        log(f"   {line}")
    return manifest
