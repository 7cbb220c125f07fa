"""Publish a trained SCSTClipCap model on the Hugging Face Hub, and optionally its data tables.

    python hub_upload.py runs/shapes/scst/final --repo-id user/scstclipcap-shapes --dry-run
    python hub_upload.py runs/shapes/scst/final --repo-id user/scstclipcap-shapes --private \\
        --dataset-repo-id user/shapes-tables --tables data/shapes/tables

The model repo gets the weights, config.json (with `auto_map` and the captioning pipeline), the code files
(configuration, modeling, pipeline), the tokenizer, the CLIP (bundled in `clip/` when it is a local open_clip
folder, otherwise named in the config), test_metrics.json and a model card (README.md) with the test metrics as
`model-index`, a usage snippet, the training recipe and the data. The folder is staged first (in --staging-dir or a
temporary folder) exactly as it will be uploaded; `--dry-run` stops there and lists it. `--dataset-repo-id` with
`--tables` uploads the tables folder as a dataset repo. The token comes from --token, HF_TOKEN or `hf auth login`.
A relative `local-dir:` CLIP path in the config is resolved from the working directory (run from where the model
was trained) or given with --clip.
"""

import argparse
import dataclasses
import enum
import json
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from clip_scstclipcap import CLIP_FOLDER, LOCAL_DIR, OPEN_CLIP_CONFIG
from pipeline_scstclipcap import make_pipeline_ready

SKIPPED_MODEL_FILES = ("training_args.bin", "README.md")  # a pickle stays home; the card is written anew
CODE_FILES = ("configuration_scstclipcap.py", "modeling_scstclipcap.py")
TABLE_IGNORE_PATTERNS = ["cache-*.arrow", "*/cache-*.arrow"]  # `datasets` map caches, not tables
METRICS_FILE = "test_metrics.json"
CARD_METRICS = {
    "cider": "CIDEr",
    "bleu_4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "spice": "SPICE",
    "clip_s": "CLIP-S",
    "attribute_precision": "Attribute precision",
    "attribute_recall": "Attribute recall",
}
RECIPE_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "metric_for_best_model",
)
STAGES = {
    "init": "text-only initialisation: each corpus sentence is reconstructed from its own (noised) CLIP text "
            "embedding, so no image-caption pair is used",
    "scst": "self-critical sequence training on unpaired images, rewarded by CLIP similarity and by a "
            "discriminator's naturalness score, after text-only initialisation",
    "supervised": "plain ClipCap training on true image-caption pairs (a supervised upper bound)",
}
MAPPERS = {"mlp": "an MLP mapper", "transformer": "a Transformer mapper"}
TAGS = ["image-captioning", "clipcap", "clip", "gpt2", "unpaired-image-captioning", "scst", "custom_code"]
CREDITS = (
    "ClipCap (Mokady et al., 2021) for the architecture; OSCAR (Li et al., 2020) for the COCO annotations and split; "
    "CLIPig for CLIP-guided image synthesis; CgT-GAN (Yu et al., 2023) and UIC (Feng et al., 2019) for unpaired "
    "captioning with GANs; CapDec (Nukrai et al., 2022) for noise injection; self-critical sequence training "
    "(Rennie et al., 2017) and its mean-of-samples baseline (Luo, 2020)."
)


class UploadError(Exception):
    """Input that cannot be published as asked."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="Saved model folder, e.g. runs/shapes/scst/final.")
    parser.add_argument("--repo-id", required=True, help="Model repo, user/name.")
    parser.add_argument("--private", action="store_true", help="Create the repos private.")
    parser.add_argument("--dry-run", action="store_true", help="Stage and list what would be uploaded; upload nothing.")
    parser.add_argument("--staging-dir", help="Empty or new folder to stage in (default: a temporary folder).")
    parser.add_argument("--dataset-repo-id", help="Dataset repo for the tables, user/name (needs --tables).")
    parser.add_argument("--tables", help="Tables folder from prepare_datasets.py: described in the card, uploaded "
                                         "with --dataset-repo-id.")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login).")
    parser.add_argument("--license", default="mit", help="License of the model (Hub license id, default mit).")
    parser.add_argument("--image-set", help="Images the model was trained and tested on, for the card "
                                            "(default: read from --tables).")
    parser.add_argument("--corpus", help="Sentence corpus the model learnt from, for the card "
                                         "(default: read from --tables).")
    parser.add_argument("--clip", help="local-dir:PATH of the CLIP to bundle, when the config's path does not "
                                       "resolve from here.")
    parser.add_argument("--commit-message", default="Upload SCSTClipCap model", help="Commit message.")
    args = parser.parse_args(argv)
    if args.dataset_repo_id and not args.tables:
        parser.error("--dataset-repo-id needs --tables, the folder to upload")
    if args.clip and not args.clip.startswith(LOCAL_DIR):
        parser.error(f"--clip must be a {LOCAL_DIR}PATH open_clip folder, got {args.clip}")
    return args


# ----------------------------------------------------------------------------------------------------- staging


def stage_model(model_dir: Path, staging_dir: Path, clip: str | None = None) -> None:
    """Copy what the model repo holds into `staging_dir` and make it pipeline-ready (config, code, CLIP)."""
    config = read_json(model_dir / "config.json")
    auto_map = config.get("auto_map", {})
    if not {"AutoConfig", "AutoModel"} <= set(auto_map):
        raise UploadError(f"{model_dir / 'config.json'} has no auto_map for AutoConfig and AutoModel: save the model "
                          "with this project's save_pretrained.")
    missing_code = [name for name in CODE_FILES if not (model_dir / name).is_file()]
    if missing_code:
        raise UploadError(f"{model_dir} lacks the model code {missing_code}: save the model with save_pretrained.")
    if staging_dir.exists() and any(staging_dir.iterdir()):
        raise UploadError(f"The staging folder {staging_dir} is not empty: give a new or empty one.")
    staging_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in SKIPPED_MODEL_FILES:
            shutil.copy2(path, staging_dir / path.name)
    if (model_dir / CLIP_FOLDER / OPEN_CLIP_CONFIG).is_file():
        shutil.copytree(model_dir / CLIP_FOLDER, staging_dir / CLIP_FOLDER)
    try:
        make_pipeline_ready(staging_dir, clip)
    except FileNotFoundError as error:
        raise UploadError(f"{error} The CLIP of {model_dir} cannot be bundled: run from the folder the model was "
                          "trained in, or give its folder with --clip local-dir:PATH.") from error


def list_files(folder: Path, ignore_patterns: list[str] | None = None) -> list[tuple[str, int]]:
    """(path in repo, size in bytes) of every file `upload_folder(..., ignore_patterns)` sends from `folder`."""
    files = {path.relative_to(folder).as_posix(): path.stat().st_size
             for path in folder.glob("**/*") if path.is_file()}
    kept = filter_repo_objects(files, ignore_patterns=[*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS])
    return [(name, files[name]) for name in sorted(kept)]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UploadError(f"{path} is missing.") from None
    except json.JSONDecodeError as error:
        raise UploadError(f"{path} is not valid JSON: {error}") from error


# ------------------------------------------------------------------------------------------ what the card says


def read_metrics(model_dir: Path) -> dict[str, float]:
    """The numeric test metrics of `test_metrics.json` (empty when the model was not evaluated)."""
    path = model_dir / METRICS_FILE
    if not path.is_file():
        return {}
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise UploadError(f"{path} must hold a JSON object of metric names and values.")
    return {name: float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def read_recipe(model_dir: Path) -> tuple[dict, dict]:
    """(run_info.json of the stage, the training settings of training_args.bin), each empty when absent."""
    run_info_file = model_dir.parent / "run_info.json"
    run_info = read_json(run_info_file) if run_info_file.is_file() else {}
    args_file = model_dir / "training_args.bin"
    if not args_file.is_file():
        return run_info, {}
    import torch
    from transformers import TrainingArguments

    try:
        # The arguments Trainer pickled for this run, read back to describe it.
        training_args = torch.load(args_file, weights_only=False)
    except Exception as error:  # unpickling raises whatever the pickled classes raise
        print(f"warning: {args_file} is unreadable ({type(error).__name__}: {error}); the card has no recipe",
              file=sys.stderr)
        return run_info, {}
    common = {field.name for field in dataclasses.fields(TrainingArguments)}
    own = [field.name for field in dataclasses.fields(training_args) if field.name not in common]
    settings = {key: _plain(getattr(training_args, key)) for key in (*RECIPE_KEYS, *own)
                if hasattr(training_args, key)}
    if settings.get("max_steps", 0) <= 0:
        settings.pop("max_steps", None)
    return run_info, settings


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def describe_tables(tables_dir: Path) -> dict:
    """Image sets, corpora and CLIP of the tables under `tables_dir`, read from their metadata."""
    from datasets import load_from_disk

    from clip_scstclipcap import describe_clip, read_table_description

    info_files = sorted(tables_dir.glob("**/dataset_info.json"))
    if not info_files:
        raise UploadError(f"{tables_dir} holds no tables (no dataset_info.json below it).")
    images, corpora, clips = [], [], set()
    for info_file in info_files:
        folder = info_file.parent
        try:
            description = read_table_description(folder)
        except ValueError as error:
            raise UploadError(str(error)) from error
        clips.add(describe_clip(description["clip"]))
        rows = load_from_disk(str(folder)).num_rows
        if description.get("table") == "images" and "aggregation" not in description:
            images.append((description.get("source", "?"), description.get("split", "?"), rows))
        elif description.get("table") == "corpus" and "pretrain_split" not in description:
            source = Path(description.get("input", "")).name or description.get("source", "?")
            corpora.append(f"{description.get('name', '?')} ({rows} sentences from {source})")
    test_sources = [source for source, split, _ in images if split == "test"]
    return {"images": [f"{source} {split} ({rows} images)" for source, split, rows in images], "corpora": corpora,
            "clips": sorted(clips), "source": test_sources[0] if test_sources else None}


def eval_results(metrics: dict[str, float], dataset_type: str, dataset_name: str) -> list[EvalResult]:
    return [
        EvalResult(task_type="image-to-text", task_name="Image captioning", dataset_type=dataset_type,
                   dataset_name=dataset_name, dataset_split="test", metric_type=name, metric_name=label,
                   metric_value=round(metrics[name], 4))
        for name, label in CARD_METRICS.items() if name in metrics
    ]


def build_card(config: dict, args: argparse.Namespace, metrics: dict, run_info: dict, recipe: dict,
               tables: dict | None, clip_bundled: bool) -> ModelCard:
    model_name = args.repo_id.split("/")[-1]
    image_set = args.image_set or (", ".join(tables["images"]) if tables else None)
    source = tables["source"] if tables else None
    dataset_type = args.dataset_repo_id or source or "images"
    dataset_name = f"{source or args.image_set or 'images'} (test split)"
    data = ModelCardData(
        language="en", license=args.license, library_name="transformers", pipeline_tag="image-to-text", tags=TAGS,
        datasets=[args.dataset_repo_id] if args.dataset_repo_id else None, model_name=model_name,
        eval_results=eval_results(metrics, dataset_type, dataset_name) or None,
    )
    sections = [
        f"# {model_name}",
        _model_section(config, run_info, clip_bundled),
        _usage_section(args.repo_id),
        _metrics_section(metrics),
        _data_section(image_set, args.corpus or (", ".join(tables["corpora"]) if tables else None), tables,
                      args.dataset_repo_id),
        _recipe_section(run_info, recipe),
        "## Credits\n\n" + CREDITS,
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(part for part in sections if part) + "\n")


def _model_section(config: dict, run_info: dict, clip_bundled: bool) -> str:
    decoder = config.get("decoder_config", {})
    stage = STAGES.get(run_info.get("stage"), "")
    clip = (f"the CLIP bundled in `{CLIP_FOLDER}/` (an open_clip folder)" if clip_bundled else
            f"CLIP `{config.get('clip_model_name')}`" + (f" (`{config['clip_pretrained']}`)"
                                                          if config.get("clip_pretrained") else ""))
    mapper = MAPPERS.get(config.get("mapping_type"), "a prefix mapper")
    frozen = ", GPT-2 frozen" if config.get("freeze_decoder") else ""
    # Converted ClipCap / CgT-GAN weights read encode_image's raw output; models trained here the normalised one.
    embedding = "raw encode_image output" if config.get("clip_embedding") == "raw" else "L2-normalised"
    text = (f"An SCSTClipCap image captioner: {clip} embeds the image ({config.get('prefix_dim')}-d, "
            f"{embedding}), {mapper} turns the embedding into {config.get('prefix_length')} GPT-2 input "
            f"embeddings, and a GPT-2 ({decoder.get('n_layer')} layers, width {decoder.get('n_embd')}, "
            f"{decoder.get('vocab_size')} tokens{frozen}) writes the caption.")
    return "## Model\n\n" + text + (f"\n\nTraining stage: {stage}." if stage else "")


def _usage_section(repo_id: str) -> str:
    return (
        "## Usage\n\n"
        "```python\n"
        "from transformers import pipeline\n"
        f'captioner = pipeline(model="{repo_id}", trust_remote_code=True)\n'
        'captioner("image.jpg")  # [{"generated_text": "..."}]\n'
        "```\n\n"
        "It needs `open_clip_torch` for the image encoder. Paths, URLs, PIL images or lists of them work; "
        "`batch_size` and generation settings (`max_new_tokens`, `num_beams`, `do_sample`, ...) are accepted. "
        "The model alone: `AutoModel.from_pretrained(repo, trust_remote_code=True)`, then "
        "`model.caption_images(images)` or `model.generate_captions(clip_image_embeddings)`."
    )


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return ""
    rows = [f"| {CARD_METRICS.get(name, name)} | {value:.4f} |" for name, value in metrics.items()]
    return ("## Evaluation (test split)\n\nCOCO caption metrics as the official toolkit computes them"
            + (", and the share of attribute words true of the image (grounding)" if "attribute_precision" in metrics
               else "") + f"; all values in `{METRICS_FILE}`.\n\n| metric | value |\n| --- | --- |\n"
            + "\n".join(rows))


def _data_section(image_set: str | None, corpus: str | None, tables: dict | None, dataset_repo_id: str | None) -> str:
    lines = []
    if image_set:
        lines.append(f"- Images: {image_set}")
    if corpus:
        lines.append(f"- Sentence corpus (never paired with the images): {corpus}")
    if tables:
        lines.append(f"- CLIP of the tables: {'; '.join(tables['clips'])}")
    if dataset_repo_id:
        lines.append(f"- Tables (CLIP features and sentences): [{dataset_repo_id}]"
                     f"(https://huggingface.co/datasets/{dataset_repo_id})")
    return "## Training data\n\n" + "\n".join(lines) if lines else ""


def _recipe_section(run_info: dict, recipe: dict) -> str:
    if not run_info and not recipe:
        return ""
    facts = {key: run_info[key] for key in ("stage", "global_step", "train_minutes", "num_processes",
                                            "distributed_type") if key in run_info}
    rows = [f"| {key} | {value} |" for key, value in {**facts, **recipe}.items()]
    return "## Training recipe\n\n| setting | value |\n| --- | --- |\n" + "\n".join(rows)


# ----------------------------------------------------------------------------------------------------- upload


def print_plan(repo_id: str, private: bool, staging_dir: Path, files: list[tuple[str, int]],
               dataset: tuple[str, Path, list[tuple[str, int]]] | None) -> None:
    visibility = "private" if private else "public"
    print(f"model repo {repo_id} ({visibility}): {len(files)} files, {_size(sum(s for _, s in files))}, "
          f"staged in {staging_dir}")
    for name, size in files:
        print(f"  {name}  {_size(size)}")
    if dataset:
        dataset_repo_id, tables_dir, table_files = dataset
        print(f"dataset repo {dataset_repo_id} ({visibility}): {len(table_files)} files, "
              f"{_size(sum(s for _, s in table_files))}, from {tables_dir}")
        for name, size in table_files:
            print(f"  {name}  {_size(size)}")


def _size(num_bytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def upload(args: argparse.Namespace, staging_dir: Path) -> None:
    api = HfApi(token=args.token)
    model_url = api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    api.upload_folder(repo_id=args.repo_id, folder_path=staging_dir, commit_message=args.commit_message)
    print(f"uploaded the model to {model_url}")
    if args.dataset_repo_id:
        dataset_url = api.create_repo(args.dataset_repo_id, repo_type="dataset", private=args.private, exist_ok=True)
        api.upload_folder(repo_id=args.dataset_repo_id, repo_type="dataset", folder_path=args.tables,
                          ignore_patterns=TABLE_IGNORE_PATTERNS, commit_message="Upload SCSTClipCap tables")
        print(f"uploaded the tables to {dataset_url}")


def publish(args: argparse.Namespace, staging_dir: Path) -> None:
    model_dir = Path(args.model_dir)
    stage_model(model_dir, staging_dir, args.clip)
    tables_dir = Path(args.tables) if args.tables else None
    tables = describe_tables(tables_dir) if tables_dir else None
    run_info, recipe = read_recipe(model_dir)
    card = build_card(read_json(staging_dir / "config.json"), args, read_metrics(model_dir), run_info, recipe,
                      tables, (staging_dir / CLIP_FOLDER).is_dir())
    card.save(staging_dir / "README.md")
    dataset = ((args.dataset_repo_id, tables_dir, list_files(tables_dir, TABLE_IGNORE_PATTERNS))
               if args.dataset_repo_id else None)
    print_plan(args.repo_id, args.private, staging_dir, list_files(staging_dir), dataset)
    if args.dry_run:
        print("dry run: nothing uploaded")
    else:
        upload(args, staging_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.staging_dir or args.dry_run:
            publish(args, Path(args.staging_dir or tempfile.mkdtemp(prefix="scstclipcap-upload-")))
        else:
            with tempfile.TemporaryDirectory(prefix="scstclipcap-upload-") as staging_dir:
                publish(args, Path(staging_dir))
    except (UploadError, HfHubHTTPError) as error:
        print(f"hub_upload.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
