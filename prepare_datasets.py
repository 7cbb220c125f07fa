"""Every data source to `datasets` Arrow tables of CLIP features and sentences.

    # COCO, Karpathy split as in OSCAR's coco_caption (train/val/test_caption.json)
    python prepare_datasets.py coco --images /data/coco --annotations /data/coco_caption --output data
    #   -> data/coco/{train,val,test}, data/coco/{val,test}_references.json, data/coco/*.report.json
    #   (--train-references keeps train captions, for a supervised upper bound only)
    # ... or from a Karpathy split JSON, or your own images with one caption file (OSCAR rows, which may name
    # their files: {"image_id": 7, "file_name": "val/0007.jpg", "caption": ...}, or the official COCO format)
    python prepare_datasets.py coco --images /data/coco --annotations /data/dataset_coco.json --output data
    python prepare_datasets.py coco --images /data/mine --annotations /data/mine/captions.json --split test \
        --name mine --output data

    # Flickr30k from Karpathy's dataset_flickr30k.json
    python prepare_datasets.py flickr30k --images /data/flickr30k/images \\
        --annotations /data/dataset_flickr30k.json --output data

    # Corpora -> data/corpus/<name> (cleaned, CLIP text features)
    python prepare_datasets.py corpus --source shutterstock --input /data/ss/sentences.txt --output data
    python prepare_datasets.py corpus --source gcc --input /data/Train_GCC-training.tsv --output data
    python prepare_datasets.py corpus --source coco --input /data/coco_caption/train_caption.json \\
        --pretrain-split 0.5 --seed 0 --output data       # also writes data/corpus/coco_init, coco_real
    python prepare_datasets.py corpus --source text --input my_sentences.txt --output data

    # CLIP-agg targets (t: 100 for COCO captions, 175 for GCC, else the CLIP's logit scale)
    python prepare_datasets.py aggregate --images data/coco/train --corpus data/corpus/gcc
    #   -> data/coco/train_agg_gcc (the images table plus agg_text_features)

    # Nearest corpus sentence of every unpaired image (init stage's lambda1 term)
    python prepare_datasets.py pseudo-pairs --images data/coco/train --corpus data/corpus/gcc
    #   -> data/coco/train_pseudo_pairs_gcc

    # The offline shapes world, end to end -> data/shapes/raw, data/shapes/tables (manifest.json)
    python prepare_datasets.py shapes

CLIP: --clip-model NAME --clip-pretrained TAG|FILE|hf-hub:ID (default ViT-B-32 / openai), or
--clip-model local-dir:PATH / hf-hub:ID. Features are stored L2-normalised, with each raw embedding's
norm beside them (clip_features_norm), so models that read raw CLIP output are fed too; every table
records its CLIP (see clip_scstclipcap.py) and tables of different CLIPs are refused before any work.
A finished table is reused when the command runs again, unless --overwrite. Skipped inputs are
counted by reason and listed in <table>.report.json; the command fails (exit 2) only when an
input cannot be read at all or nothing usable is left.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# OpenMP threads that spin while waiting stall each other on a busy CPU (DataLoader workers, other
# processes; docs/measurements.md). Read only when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from clip_scstclipcap import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ClipMismatchError, has_schema  # noqa: E402
from dataprep.common import ClipRequest, RunOptions, default_device, default_num_workers  # noqa: E402
from dataprep.corpus import SOURCES, prepare_corpus  # noqa: E402
from dataprep.images import prepare_coco, prepare_flickr30k  # noqa: E402
from dataprep.neighbors import aggregate, pseudo_pairs  # noqa: E402
from dataprep.sources import DataPrepError  # noqa: E402
from dataprep.world import prepare_shapes  # noqa: E402

__all__ = ["main", "prepare_shapes"]


def _run_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--batch-size", type=int, default=64, help="images or sentences per CLIP forward")
    flags.add_argument("--num-workers", type=int, default=default_num_workers(),
                       help="DataLoader workers decoding images / tokenizing")
    flags.add_argument("--device", default=default_device(), help="torch device for CLIP and the similarity search")
    flags.add_argument("--overwrite", action="store_true", help="rebuild tables that already exist")
    flags.add_argument("--no-progress", action="store_true", help="no progress bars")
    return flags


def _clip_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--clip-model", default=None,
                       help=f"open_clip model name, local-dir:PATH or hf-hub:ID (default {DEFAULT_CLIP_MODEL})")
    flags.add_argument("--clip-pretrained", default=None,
                       help=f"pretrained tag, checkpoint file or hf-hub:ID (default {DEFAULT_CLIP_PRETRAINED} "
                            f"for {DEFAULT_CLIP_MODEL})")
    flags.add_argument("--rehearsal", action="store_true",
                       help="allow --clip-pretrained random-rehearsal (a built-in architecture at random, seeded "
                            "weights), to rehearse a recipe at real sizes offline (benchmarks/paper_scale.py); the "
                            "tables record it and are useless for real training")
    return flags


def _add_coco(commands, parents: list[argparse.ArgumentParser]) -> None:
    coco = commands.add_parser("coco", parents=parents, help="COCO Karpathy split (OSCAR coco_caption)")
    coco.add_argument("--images", required=True, help="folder with the images below it (train2014/ and val2014/ "
                      "for COCO); the caption files' file names are relative to it")
    coco.add_argument("--annotations", required=True,
                      help="folder with train/val/test_caption.json (OSCAR or official COCO format), a Karpathy split "
                           "JSON (dataset_coco.json), or one caption file (OSCAR or official COCO format)")
    coco.add_argument("--split", default="test", choices=("train", "val", "test"),
                      help="the split a single caption file becomes (default test)")
    coco.add_argument("--output", default="data", help="tables root (writes <output>/<name>/...)")
    coco.add_argument("--name", default="coco", help="table group name")
    coco.add_argument("--train-references", action="store_true",
                      help="keep the train captions in the train table (supervised upper bound only)")


def _add_flickr30k(commands, parents: list[argparse.ArgumentParser]) -> None:
    flickr = commands.add_parser("flickr30k", parents=parents, help="Flickr30k (Karpathy's dataset_flickr30k.json)")
    flickr.add_argument("--images", required=True, help="folder with the Flickr30k images")
    flickr.add_argument("--annotations", required=True, help="Karpathy's dataset_flickr30k.json")
    flickr.add_argument("--output", default="data", help="tables root (writes <output>/<name>/...)")
    flickr.add_argument("--name", default="flickr30k", help="table group name")
    flickr.add_argument("--train-references", action="store_true", help="keep the train captions in the train table")


def _add_corpus(commands, parents: list[argparse.ArgumentParser]) -> None:
    corpus = commands.add_parser("corpus", parents=parents, help="a sentence corpus with CLIP text features")
    corpus.add_argument("--source", required=True, choices=SOURCES)
    corpus.add_argument("--input", required=True, help="the sentence file (see dataprep/sources.py for formats)")
    corpus.add_argument("--output", default="data", help="tables root (writes <output>/corpus/<name>)")
    corpus.add_argument("--name", default=None, help="table name (default: the source, or the file stem for text)")
    corpus.add_argument("--min-words", type=int, default=None, help="drop shorter sentences (default 5 for gcc, else 1)")
    corpus.add_argument("--max-words", type=int, default=40, help="drop longer sentences")
    corpus.add_argument("--keep-duplicates", action="store_true", help="do not de-duplicate sentences")
    corpus.add_argument("--pretrain-split", type=float, default=None, metavar="FRACTION",
                        help="also write <name>_init (this fraction) and <name>_real (the rest), seeded")
    corpus.add_argument("--seed", type=int, default=0, help="seed of --pretrain-split")
    corpus.add_argument("--gcc-column", type=int, default=0, help="caption column of the GCC TSV")


def _add_neighbours(commands, parents: list[argparse.ArgumentParser]) -> None:
    """`aggregate` and `pseudo-pairs`: an images table against a corpus table."""
    for name, help_text in (("aggregate", "CLIP-agg target of every image over a corpus"),
                            ("pseudo-pairs", "nearest corpus sentence of every image")):
        command = commands.add_parser(name, parents=parents, help=help_text)
        command.add_argument("--images", required=True, help="images table folder")
        command.add_argument("--corpus", required=True, help="corpus table folder")
        command.add_argument("--output", default=None, help="output table folder (default: beside --images)")
        if name == "aggregate":
            command.add_argument("--temperature", type=float, default=None,
                                 help="t of softmax(t * cos) (default: 100 coco, 175 gcc, else the CLIP's logit scale)")


def _add_shapes(commands, parents: list[argparse.ArgumentParser]) -> None:
    shapes = commands.add_parser("shapes", parents=parents, help="build and prepare the offline shapes world",
                                 description="Build the shapes world (or reuse it: same seed and sizes) and "
                                             "prepare its tables; --overwrite rebuilds the world too.")
    shapes.add_argument("--output", default="data/shapes", help="writes <output>/raw and <output>/tables")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--clip", choices=("plain", "sighted"), default="plain",
                        help="the world CLIP's recipe: plain (contrastive on pairs only, as real CLIPs; the default "
                             "recipe's) or sighted (scene tagging first, then hard negatives: it sees nearly every "
                             "attribute)")
    shapes.add_argument("--retrain-clip", action="store_true",
                        help="rebuild the world and train its CLIP even where the one shipped in "
                             "dataprep/world_clips fits (same recipe, seed and pretraining data)")
    shapes.add_argument("--pretrain-split", type=float, default=0.5, metavar="FRACTION")
    shapes.add_argument("--temperature", type=float, default=None, help="CLIP-agg t (default: the tiny CLIP's logit scale)")
    shapes.add_argument("--size", action="append", default=[], metavar="NAME=N",
                        help="a size passed to build_world, e.g. --size n_train=200 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run, clip = _run_flags(), _clip_flags()
    _add_coco(commands, [run, clip])
    _add_flickr30k(commands, [run, clip])
    _add_corpus(commands, [run, clip])
    _add_neighbours(commands, [run, clip])
    _add_shapes(commands, [run])
    return parser


def _clip_request(args, required: bool) -> ClipRequest | None:
    if args.clip_model is None and args.clip_pretrained is None and not required:
        return None
    model = args.clip_model or DEFAULT_CLIP_MODEL
    pretrained = args.clip_pretrained
    if pretrained is None and model == DEFAULT_CLIP_MODEL and not has_schema(model):
        pretrained = DEFAULT_CLIP_PRETRAINED
    return ClipRequest(model, pretrained, args.device)


def _sizes(pairs: list[str]) -> dict[str, int]:
    sizes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not name or not value.isdigit():
            raise DataPrepError(f"--size expects NAME=N with a whole number, got {pair!r}")
        # build_world's size parameters are n_<split> / n_<corpus>; accept both spellings.
        sizes[name if name.startswith("n_") else f"n_{name}"] = int(value)
    return sizes


def _print_result(command: str, result: dict) -> None:
    if not result:
        return
    print(f"== {command}: kept / skipped")
    for report in result.get("reports", {}).values():
        print(f"   {report.summary()}")
    for name, path in result.get("tables", {}).items():
        print(f"   table {name}: {path}")


def run_command(args) -> dict:
    options = RunOptions(args.batch_size, args.num_workers, args.device, args.overwrite, not args.no_progress)
    if args.command == "coco":
        return prepare_coco(args.images, args.annotations, args.output, _clip_request(args, True), options,
                            args.train_references, args.name, args.split)
    if args.command == "flickr30k":
        return prepare_flickr30k(args.annotations, args.images, args.output, _clip_request(args, True), options,
                                 args.train_references, args.name)
    if args.command == "corpus":
        return prepare_corpus(args.source, args.input, args.output, _clip_request(args, True), options, args.name,
                              args.min_words, args.max_words, not args.keep_duplicates, args.pretrain_split,
                              args.seed, args.gcc_column)
    if args.command == "aggregate":
        return aggregate(args.images, args.corpus, options, args.output, args.temperature, _clip_request(args, False))
    if args.command == "pseudo-pairs":
        return pseudo_pairs(args.images, args.corpus, options, args.output, _clip_request(args, False))
    manifest = prepare_shapes(args.output, args.seed, args.overwrite, options, args.pretrain_split,
                              args.temperature, clip=args.clip, retrain_clip=args.retrain_clip,
                              **_sizes(args.size))
    print(f"   manifest: {manifest['tables']}/manifest.json")
    print("   seconds per step: " + ", ".join(f"{step} {secs}" for step, secs in manifest["timings_s"].items()))
    return {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rehearsal", False):
        from clip_scstclipcap import allow_rehearsal

        allow_rehearsal()
    started = time.perf_counter()
    try:
        result = run_command(args)
    except (DataPrepError, ClipMismatchError, FileNotFoundError) as error:
        print(f"prepare_datasets.py {args.command}: error: {error}", file=sys.stderr)
        return 2
    _print_result(args.command, result)
    print(f"   {args.command} done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
