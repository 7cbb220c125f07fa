"""The one training entry point of SCSTClipCap.

    python train.py                                         # the offline shapes world, whole recipe, report
    python train.py --config configs/coco_shutterstock.yaml --stage init
    python train.py --config configs/shapes.yaml --stage init --noise_std 0.05 --output_dir runs/noise05
    accelerate launch train.py --config configs/coco_shutterstock.yaml --stage init
    torchrun --nproc_per_node 2 train.py --config ...

Stages: `init` (text-only initialization), `scst` (self-critical training with CLIP rewards and a naturalness
discriminator, from the init model), `supervised` (plain ClipCap on true pairs: an upper bound), `eval` (captions
and metrics of a checkpoint on the test split), `all` (every stage of the recipe in that order, then the report).
A recipe YAML holds common settings at the top level and per-stage settings under `init:`, `scst:`, `supervised:`,
`eval:`; command-line flags override both. Any `TrainingArguments` flag works (`--learning_rate`,
`--per_device_train_batch_size`, `--report_to`, ...), and each stage's own (`InitConfig`, `SCSTConfig`).
"""

import functools
import hashlib
import json
import logging
import os
import sys
import time

# Spinning OpenMP threads stall each other on a busy machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import DistributedType, gather_object, parse_flag_from_env
from datasets import load_from_disk
from transformers import AutoConfig, AutoModel, AutoTokenizer, GPT2Config, HfArgumentParser, set_seed

from clip_scstclipcap import (
    CaptioningClip, ClipMismatchError, check_clip_metadata, check_model_features, describe_clip, read_clip_metadata,
)
from configuration_scstclipcap import SCSTClipCapConfig
from modeling_scstclipcap import SCSTClipCapForCaptioning
from pipeline_scstclipcap import make_pipeline_ready
from trainers import CaptionEvaluator, ClipRewards, InitConfig, InitTrainer, SCSTConfig, SCSTTrainer
from trainers.checkpoints import CheckpointError, CheckpointSaveError, resolve_resume

# In-process the project's own classes serve the Auto API, so saved folders load without remote code.
AutoConfig.register(SCSTClipCapConfig.model_type, SCSTClipCapConfig)
AutoModel.register(SCSTClipCapConfig, SCSTClipCapForCaptioning)

logger = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_RECIPE = PROJECT_ROOT / "configs" / "shapes.yaml"
STAGES = ("init", "supervised", "scst", "eval", "all")
RECIPE_STAGES = ("init", "scst", "supervised", "eval")
STAGE_SUMMARIES = {
    "init": "text-only initialisation, each corpus sentence from its own noisy CLIP text embedding",
    "scst": "self-critical training on unpaired images with CLIP rewards and the naturalness discriminator",
    "supervised": "the supervised upper bound, on the true references of the training images",
    "eval": "captions and COCO metrics on the test split (written beside each model)",
}


@dataclass
class ScriptArguments:
    """What to run, on which tables, with which model."""

    stage: str = field(default="all", metadata={"help": "init | supervised | scst | eval | all", "choices": STAGES})
    config: str | None = field(default=None, metadata={"help": "Recipe YAML; command-line flags override it."})

    # Tables (from prepare_datasets.py)
    corpus_table: str | None = field(default=None, metadata={"help": "Corpus table (text + CLIP text features)."})
    train_table: str | None = field(default=None, metadata={"help": "Unpaired training images table."})
    pseudo_pairs_table: str | None = field(default=None, metadata={"help": "Pseudo-pairs table (init's lambda1)."})
    val_table: str | None = field(default=None, metadata={"help": "Validation images with references."})
    test_table: str | None = field(default=None, metadata={"help": "Test images with references."})
    val_scenes: str | None = field(default=None, metadata={"help": "Shapes world only: scenes JSON of val."})
    test_scenes: str | None = field(default=None, metadata={"help": "Shapes world only: scenes JSON of test."})
    images_dir: str | None = field(
        default=None, metadata={"help": "Folder the test table's file_name column is relative to (report pictures)."}
    )
    shapes_dir: str | None = field(
        default=None, metadata={"help": "Build the offline shapes world here first when it is missing."}
    )
    shapes_clip: str = field(
        default="sighted",
        metadata={"help": "Shapes world only: the recipe of the world's CLIP when shapes_dir is built (plain: "
                          "contrastive on pairs only; sighted: scene tagging and hard negatives first).",
                  "choices": ("plain", "sighted")},
    )

    # Model
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from this SCSTClipCap checkpoint (folder or Hub id); wins over init_from_stage."},
    )
    init_from_stage: str | None = field(
        default=None, metadata={"help": "Start from the final model of this earlier stage of the same run."}
    )
    decoder_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained GPT-2 for a new model (e.g. gpt2)."}
    )
    decoder_config: str | None = field(
        default=None, metadata={"help": "JSON file of a GPT-2 shape for a new model trained from scratch."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Caption tokenizer of a new model (a checkpoint brings its own)."}
    )
    mapping_type: str = field(default="mlp", metadata={"help": "mlp | transformer", "choices": ("mlp", "transformer")})
    prefix_length: int = field(default=10, metadata={"help": "GPT-2 embeddings per image."})
    clip_length: int = field(default=10, metadata={"help": "Transformer mapper: CLIP tokens."})
    num_mapping_layers: int = field(default=8, metadata={"help": "Transformer mapper: layers."})
    num_mapping_heads: int = field(default=8, metadata={"help": "Transformer mapper: attention heads."})
    mapping_mlp_ratio: float = field(default=2.0, metadata={"help": "Transformer mapper: MLP width / model width."})
    normalize_prefix: bool = field(default=False, metadata={"help": "L2-normalise CLIP embeddings first."})
    freeze_decoder: bool = field(default=False, metadata={"help": "Keep GPT-2 fixed (Transformer variant)."})
    rehearsal: bool = field(
        default=False,
        metadata={"help": "Allow the random, seeded CLIP weights of a rehearsal at real sizes (CLIP pretrained "
                          "'random-rehearsal', benchmarks/paper_scale.py); real runs refuse them."},
    )


def read_recipe(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"cannot read the recipe {path}: {error}")
    if not isinstance(recipe, dict):
        raise SystemExit(f"the recipe {path} must be a mapping of settings, got {type(recipe).__name__}")
    return recipe


def recipe_defaults(recipe: dict, stage: str) -> dict:
    """Top-level settings, then the stage's own section on top."""
    common = {key: value for key, value in recipe.items() if key not in STAGES}
    return {**common, **(recipe.get(stage) or {})}


# Settings a stage parses but does not read. The scst and eval stages continue an existing model, so the settings that
# shape a new one are not theirs; the supervised bound trains on true pairs, without the text-only terms. A recipe's
# common section legitimately carries them for the stages that read them (the shapes recipe's model shape is init's
# and supervised's), so there they are only noted; on the command line, for that one stage, they are refused.
MODEL_SHAPE_SETTINGS = ("decoder_name_or_path", "decoder_config", "tokenizer_name_or_path", "mapping_type",
                        "prefix_length", "clip_length", "num_mapping_layers", "num_mapping_heads",
                        "mapping_mlp_ratio", "normalize_prefix", "freeze_decoder")
IGNORED_SETTINGS = {
    "scst": MODEL_SHAPE_SETTINGS,
    "eval": MODEL_SHAPE_SETTINGS,
    "supervised": ("noise_std", "sigma", "pseudo_pair_weight", "lambda1", "mmd_weight", "lambda2", "corpus_table",
                   "pseudo_pairs_table"),
}


def refuse_ignored_settings(stage: str, recipe_settings: dict, argv: list[str]):
    """Stop when the command line gives the stage a setting it would ignore; note those the recipe gives it."""
    ignored = IGNORED_SETTINGS.get(stage, ())
    given = sorted({arg[2:].split("=")[0] for arg in argv if arg.startswith("--")} & set(ignored))
    if given:
        raise SystemExit(f"the {stage} stage does not read --{', --'.join(given)}: "
                         + ("it continues the model it starts from (its config decides the shape)"
                            if stage in ("scst", "eval") else "it trains on the true pairs of the train table, "
                            "without noise or the text-only terms") + "; drop the flag or run the stage that reads it")
    from_recipe = sorted(set(recipe_settings) & set(ignored))
    if from_recipe:
        logger.info("stage %s: the recipe's %s are for the other stages and not read here.", stage,
                    ", ".join(from_recipe))


def parse_stage(stage: str, recipe: dict, argv: list[str],
                explicit_stage: bool = False) -> tuple[ScriptArguments, InitConfig | SCSTConfig]:
    """The settings of one stage: its dataclasses' defaults < recipe < command line. With `explicit_stage` (the
    command line names this stage, not `all`), a flag the stage would ignore is refused."""
    if not torch.cuda.is_available():
        # Without a GPU only the CPU backend synchronises several processes.
        recipe = {**recipe, "use_cpu": True}
    parser = HfArgumentParser((ScriptArguments, SCSTConfig if stage == "scst" else InitConfig))
    defaults = recipe_defaults(recipe, stage)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise SystemExit(f"unknown settings in the recipe (stage {stage}): {', '.join(unknown)}")
    parser.set_defaults(**defaults)
    refuse_ignored_settings(stage, defaults, argv if explicit_stage else [])
    script, config = parser.parse_args_into_dataclasses(args=argv)
    script.stage = stage
    return script, config


def check_launch(state: PartialState):
    """Refuse a multi-process launch that the accelerator does not see: its ranks would train unsynchronised; and a
    DeepSpeed config that `accelerate launch --cpu` dropped."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and state.num_processes != world_size:
        raise SystemExit(
            f"WORLD_SIZE={world_size} but the accelerator sees {state.num_processes} process(es) "
            f"({state.distributed_type}): the ranks would not synchronise. On CPU launch with "
            "`torchrun --nproc_per_node N train.py ...`; on GPUs with `accelerate launch --multi_gpu ...`."
        )
    dropped = deepspeed_config_dropped_by_cpu_launch()
    if dropped:
        config_file, num_processes = dropped
        raise SystemExit(
            f"`accelerate launch --cpu` dropped the DeepSpeed of {config_file}: it started this one process without "
            f"DeepSpeed instead of {num_processes} under it, which would train unsharded; drop --cpu (DeepSpeed runs "
            "on CPU processes, with DS_ACCELERATOR=cpu), or launch without the DeepSpeed config to train unsharded")


def deepspeed_config_dropped_by_cpu_launch() -> tuple[str, int] | None:
    """(config file, its process count) when this process was started by `accelerate launch --cpu --config_file X`
    with a DeepSpeed config X, else None. Its CPU flag makes accelerate take the simple launcher, which starts one
    process and exports nothing of the config's DeepSpeed (only ACCELERATE_USE_CPU, the mixed precision and a master
    address), so the launcher's command line, that of this process's parent, is the one trace of it."""
    import psutil

    try:
        parent = psutil.Process().parent()
        return None if parent is None else dropped_deepspeed_config(parent.cmdline(), parent.cwd())
    except psutil.Error:
        return None


def dropped_deepspeed_config(command: list[str], cwd: str) -> tuple[str, int] | None:
    """(config file, its process count) when `command` (run in `cwd`) is an `accelerate launch --cpu` with a DeepSpeed
    config, else None."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    launch_arguments = None
    for index, word in enumerate(command):
        name = Path(word).name
        if name == "accelerate.commands.launch":
            launch_arguments = command[index + 1:]
        elif name in ("accelerate", "accelerate.commands.accelerate_cli") and command[index + 1:][:1] == ["launch"]:
            launch_arguments = command[index + 2:]
        if launch_arguments is not None:
            break
    if launch_arguments is None:
        return None
    try:
        launch = launch_command_parser().parse_args(launch_arguments)
    except SystemExit:
        return None
    if not launch.cpu or launch.config_file is None:
        return None
    config = load_config_from_file(str(Path(cwd, launch.config_file)))
    if config.distributed_type != DistributedType.DEEPSPEED:
        return None
    return launch.config_file, config.num_processes


def sharding_request(argument, flag: str, environment_flag: str) -> str | None:
    """How a sharding backend was asked for: its training argument (`flag`), else an accelerate config (which exports
    `environment_flag`), else None."""
    if argument:
        return flag
    return "the accelerate config" if parse_flag_from_env(environment_flag) else None


def refuse_dropped_sharding(trainer):
    """Refuse an FSDP or DeepSpeed request that the accelerator dropped without a word: the run would train unsharded.
    accelerate makes FSDP of `--fsdp` (or of an accelerate config's FSDP) only for several processes on accelerators;
    on CPU processes it keeps MULTI_CPU (DDP), on one device no distribution at all. It makes DeepSpeed of
    `--deepspeed` (or of an accelerate config's DeepSpeed, exported as ACCELERATE_USE_DEEPSPEED) on CPU processes too
    (gloo), but not when its own CPU flag is on (ACCELERATE_USE_CPU in the environment): then it keeps MULTI_CPU or no
    distribution. (`accelerate launch --cpu` with a DeepSpeed config exports no DeepSpeed at all: `check_launch`
    refuses that.) The Trainer's `is_fsdp_enabled` / `is_deepspeed_enabled` say whether its
    accelerator shards, once the Trainer has made it (FSDP on TPUs goes through torch_xla instead)."""
    state = trainer.accelerator.state
    # The accelerator sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED itself when the training arguments hand it a
    # plugin: the arguments are looked at first.
    if not (trainer.is_fsdp_enabled or trainer.is_fsdp_xla_enabled):
        asked = sharding_request(trainer.args.fsdp, "--fsdp", "ACCELERATE_USE_FSDP")
        if asked:
            raise SystemExit(
                f"FSDP was asked for ({asked}) but accelerate runs {state.distributed_type} on {state.num_processes} "
                f"{state.device.type} process(es) without sharding (it shards only across several GPU processes): "
                "launch on GPUs with `accelerate launch --config_file configs/accelerate/fsdp.yaml train.py ...`, or "
                "drop the FSDP request to train unsharded")
    if not trainer.is_deepspeed_enabled:
        asked = sharding_request(trainer.args.deepspeed, "--deepspeed", "ACCELERATE_USE_DEEPSPEED")
        if asked:
            raise SystemExit(
                f"DeepSpeed was asked for ({asked}) but accelerate runs {state.distributed_type} on "
                f"{state.num_processes} {state.device.type} process(es) without it (accelerate drops DeepSpeed when "
                "its CPU flag is on: ACCELERATE_USE_CPU in the environment): unset that flag (DeepSpeed runs on CPU "
                "processes without it), or drop the DeepSpeed request to train unsharded")


def start_processes(config: InitConfig) -> PartialState:
    """The process group, checked."""
    state = PartialState(cpu=config.use_cpu)
    check_launch(state)
    return state


def prepare_world(script: ScriptArguments, state: PartialState):
    """Build the shapes world when the recipe asks for it and its tables are missing (main process only)."""
    if script.shapes_dir is None:
        return
    if state.is_main_process:
        from dataprep.world import prepare_shapes, world_is_ready

        if not world_is_ready(script.shapes_dir, clip=script.shapes_clip):
            prepare_shapes(script.shapes_dir, clip=script.shapes_clip)
    state.wait_for_everyone()


def shapes_clip_lines(shapes_dir: str | None) -> list[str] | None:
    """The shapes world's CLIP figures (retrieval, modality gap, swap test) for the report, when the run has a world."""
    from dataprep.world import built_world, clip_figures

    world = built_world(shapes_dir) if shapes_dir else None
    if world is None:
        return None
    from dataprep.shapes import clip_report

    return clip_report(clip_figures(Path(shapes_dir) / "raw", world))


def check_table_exists(path: str, what: str):
    if not Path(path).exists():
        raise SystemExit(f"the {what} table {path} does not exist: make it with prepare_datasets.py")


def load_table(path: str | None, what: str):
    if path is None:
        raise SystemExit(f"this stage needs the {what} table: set it in the recipe or with --{what}_table")
    check_table_exists(path, what)
    return load_from_disk(path)


def check_tables_share_a_clip(tables: dict[str, str], model_config: SCSTClipCapConfig | None = None) -> dict:
    """All tables must come from one CLIP, and from the model's CLIP when the model already exists."""
    for name, path in tables.items():
        if path is not None:
            check_table_exists(path, name)
    metas = {name: read_clip_metadata(path) for name, path in tables.items() if path is not None}
    first_name, first = next(iter(metas.items()))
    for name, meta in metas.items():
        check_clip_metadata(meta, first, f"{name} table {tables[name]} (vs the {first_name} table)")
    if model_config is not None and first.get("dim") not in (None, model_config.prefix_dim):
        raise SystemExit(
            f"the tables hold {first['dim']}-d features of {describe_clip(first)}, but the model expects "
            f"prefix_dim={model_config.prefix_dim} from {model_config.clip_model_name}: use tables of the model's CLIP."
        )
    return first


def check_tables_feed_the_model(tables: dict[str, str | None], model_config: SCSTClipCapConfig, training: bool):
    """Every table's features can feed the model (its prefix_dim, and the CLIP embedding it reads: raw or
    normalised). The training stages feed the tables' normalised features as they are, so they refuse a model that
    reads raw embeddings (a converted ClipCap / CgT-GAN model: caption and evaluate it, or convert it with
    --normalize-prefix)."""
    if training and model_config.clip_embedding != "normalized":
        raise SystemExit(f"the model reads raw CLIP embeddings (clip_embedding={model_config.clip_embedding!r}) but "
                         "the training stages feed the tables' normalised ones: evaluate or caption with it, or "
                         "train a model that reads normalised embeddings")
    for name, path in tables.items():
        if path is not None:
            try:
                check_model_features(path, model_config, f"the {name} table {path}")
            except ClipMismatchError as error:
                raise SystemExit(str(error))


def stage_dir(config: InitConfig, stage: str) -> Path:
    return Path(config.output_dir) / stage


def model_source(script: ScriptArguments, run_dir: Path) -> str | None:
    """The checkpoint a stage starts from: `model_name_or_path`, else the final model of `init_from_stage`."""
    if script.model_name_or_path:
        return script.model_name_or_path
    if script.init_from_stage:
        source = run_dir / script.init_from_stage / "final"
        if not source.is_dir():
            raise SystemExit(f"stage {script.stage} starts from the {script.init_from_stage} stage's model, but "
                             f"{source} does not exist: run `--stage {script.init_from_stage}` first or set "
                             "--model_name_or_path")
        return str(source)
    return None


def build_model(script: ScriptArguments, run_dir: Path, clip_meta: dict, tokenizer):
    """A checkpoint, a new model around a pretrained GPT-2, or a new model from a GPT-2 shape."""
    source = model_source(script, run_dir)
    if source:
        return SCSTClipCapForCaptioning.from_pretrained(source)
    settings = dict(
        prefix_dim=clip_meta["dim"], prefix_length=script.prefix_length, mapping_type=script.mapping_type,
        clip_length=script.clip_length, num_mapping_layers=script.num_mapping_layers,
        num_mapping_heads=script.num_mapping_heads, mapping_mlp_ratio=script.mapping_mlp_ratio,
        normalize_prefix=script.normalize_prefix, freeze_decoder=script.freeze_decoder,
        clip_model_name=clip_meta["model_name"], clip_pretrained=clip_meta.get("pretrained"),
    )
    if script.decoder_name_or_path:
        return SCSTClipCapForCaptioning.from_decoder_pretrained(script.decoder_name_or_path, **settings)
    if script.decoder_config is None:
        raise SystemExit("a new model needs --decoder_name_or_path (e.g. gpt2) or --decoder_config (a GPT-2 JSON)")
    decoder = GPT2Config.from_json_file(script.decoder_config)
    decoder.vocab_size = len(tokenizer)
    decoder.bos_token_id = decoder.eos_token_id = tokenizer.eos_token_id
    decoder.pad_token_id = tokenizer.pad_token_id
    return SCSTClipCapForCaptioning(SCSTClipCapConfig(decoder_config=decoder.to_dict(), **settings))


def load_tokenizer(script: ScriptArguments, run_dir: Path):
    source = model_source(script, run_dir) or script.tokenizer_name_or_path or script.decoder_name_or_path
    if source is None:
        raise SystemExit("no caption tokenizer: set --tokenizer_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_evaluator(script: ScriptArguments, config: InitConfig, tokenizer, split: str, output_dir: Path):
    table_path = script.val_table if split == "val" else script.test_table
    if table_path is None:
        return None
    table = load_table(table_path, split)
    extra_metrics = [clip_s_metric(table, config)]
    scenes_path = script.val_scenes if split == "val" else script.test_scenes
    if scenes_path:
        from dataprep.shapes import grounding_scores

        scenes = json.loads(Path(scenes_path).read_text())
        extra_metrics.append(lambda predictions: flat_grounding(grounding_scores(predictions, scenes)))
    return CaptionEvaluator(
        table, tokenizer, output_dir / f"{split}_predictions",
        generation_kwargs=dict(max_new_tokens=config.eval_max_new_tokens, num_beams=config.eval_num_beams),
        batch_size=config.per_device_eval_batch_size * 8, extra_metrics=extra_metrics, spice=spice_ready(config),
    )


def spice_ready(config: InitConfig) -> bool:
    """With `--spice`, SPICE's Stanford models are fetched once where they are missing, as pycocoevalcap does."""
    if not config.spice:
        return False
    from metrics import spice_unavailable_reason

    if spice_unavailable_reason() is not None:
        from pycocoevalcap.spice.get_stanford_models import get_stanford_models

        logger.info("--spice: fetching SPICE's Stanford CoreNLP models (once).")
        get_stanford_models()
    return True


@functools.cache
def frozen_clip(model_name: str, pretrained: str | None, device: str) -> CaptioningClip:
    """The frozen CLIP of a run, loaded once for every use of it (CLIP-S in each evaluation, the scst rewards)."""
    return CaptioningClip.load(model_name, pretrained, device)


def clip_s_metric(table, config: InitConfig):
    """CLIP-S (reference-free, Hessel et al.) of predictions against the images of `table`, with the table's CLIP."""
    from metrics import clip_score

    meta = read_clip_metadata(table)
    try:
        clip = frozen_clip(meta["model_name"], meta.get("pretrained"), str(config.device))
    except (FileNotFoundError, OSError) as error:
        logger.warning("CLIP-S is skipped: the table's CLIP %s cannot be loaded (%s).", describe_clip(meta), error)
        return lambda predictions: {}
    features = dict(zip(table["image_id"], table["clip_features"]))
    encode_text = clip.text_encoder

    def metric(predictions: dict[str, str]) -> dict[str, float]:
        image_ids = list(predictions)
        return {"clip_s": clip_score([features[i] for i in image_ids], [predictions[i] for i in image_ids],
                                     encode_text=encode_text)}

    return metric


def flat_grounding(scores: dict) -> dict[str, float]:
    """Grounding scores as flat metric names: attribute_precision, attribute_recall, their harmonic mean
    attribute_f1, parse_rate, fluent_attribute_precision / _recall / _f1, colour_precision, ..."""
    flat = {f"attribute_{name}": float(scores[name]) for name in ("precision", "recall") if scores[name] is not None}
    if scores["recall"] is not None:
        # Captions that name no attribute at all have no precision; their F1 is 0, as their recall is.
        precision, recall = flat.get("attribute_precision", 0.0), flat["attribute_recall"]
        flat["attribute_f1"] = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    flat["distinct_scene_caption_share"] = scores["distinct_scene_caption_share"]
    # The shapes recipe's selection metric: the same F1 where a repeated mention or a caption out of the world's
    # grammar cannot score (see dataprep.shapes.fluent_grounding).
    flat["parse_rate"] = scores["parse_rate"]
    flat["fluent_attribute_precision"] = scores["fluent_precision"]
    flat["fluent_attribute_recall"] = scores["fluent_recall"]
    total = scores["fluent_precision"] + scores["fluent_recall"]
    flat["fluent_attribute_f1"] = 2 * scores["fluent_precision"] * scores["fluent_recall"] / total if total else 0.0
    for kind, values in scores["per_type"].items():
        flat.update({f"{kind}_{name}": float(value) for name, value in values.items() if value is not None})
    return flat


def verify_ranks_agree(model) -> str | None:
    """A fingerprint of the weights, identical on every rank, or a loud failure. FSDP's sharded tensors are gathered
    whole (in the same order on every rank). A model that DeepSpeed ZeRO-3 partitions (its parameters carry the
    `ds_id` DeepSpeed marks them with, as its own `is_zero_param` reads) is held in part by each rank, kept consistent
    by the engine, and there is nothing to compare (None); a network it does not partition (the discriminator, built
    outside `zero.Init`) is whole on every rank and compared as under any other launch."""
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    fingerprints = gather_object([digest.hexdigest()])
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"the ranks ended with different weights: {fingerprints}")
    return fingerprints[0]


def run_training_stage(script: ScriptArguments, config: InitConfig, state: PartialState) -> dict:
    """`init` (text-only) or `supervised` (true pairs, no noise, no extra terms)."""
    run_dir = Path(config.output_dir)
    output_dir = run_dir / script.stage
    config.output_dir = str(output_dir)
    tokenizer = load_tokenizer(script, run_dir)
    if script.stage == "supervised":
        train_images = load_table(script.train_table, "train")
        corpus = train_images.map(
            lambda batch: {"text": [r for refs in batch["references"] for r in refs],
                           "clip_features": [f for f, refs in zip(batch["clip_features"], batch["references"])
                                             for _ in refs]},
            batched=True, remove_columns=train_images.column_names,
        )
        if len(corpus) == 0:
            raise SystemExit(f"the supervised stage needs references in the train table {script.train_table}")
        # The recipe's init settings may sit in its common section: the bound trains without them.
        config.noise_std, config.pseudo_pair_weight, config.mmd_weight = 0.0, 0.0, 0.0
        tables = {"train": script.train_table, "val": script.val_table}
    else:
        corpus = load_table(script.corpus_table, "corpus")
        tables = {"corpus": script.corpus_table, "train": script.train_table,
                  "pseudo_pairs": script.pseudo_pairs_table, "val": script.val_table}
    clip_meta = check_tables_share_a_clip(tables)
    model = build_model(script, run_dir, clip_meta, tokenizer)
    check_tables_share_a_clip(tables, model.config)
    check_tables_feed_the_model(tables, model.config, training=True)
    pseudo_pairs = load_table(script.pseudo_pairs_table, "pseudo_pairs") if config.pseudo_pair_weight > 0 else None
    images = load_table(script.train_table, "train") if config.mmd_weight > 0 else None
    trainer = InitTrainer(
        model=model, args=config, corpus=corpus, processing_class=tokenizer, pseudo_pairs=pseudo_pairs,
        images=images, evaluator=make_evaluator(script, config, tokenizer, "val", output_dir),
    )
    return train_and_save(trainer, script, state, output_dir)


def run_scst_stage(script: ScriptArguments, config: SCSTConfig, state: PartialState) -> dict:
    """Self-critical training of an existing captioner on unpaired images, with the corpus as the real sentences."""
    run_dir = Path(config.output_dir)
    output_dir = run_dir / "scst"
    config.output_dir = str(output_dir)
    source = model_source(script, run_dir)
    if source is None:
        raise SystemExit("the scst stage trains an existing captioner: set --init_from_stage init or "
                         "--model_name_or_path")
    tokenizer = load_tokenizer(script, run_dir)
    model = SCSTClipCapForCaptioning.from_pretrained(source)
    tables = {"train": script.train_table, "corpus": script.corpus_table, "val": script.val_table}
    check_tables_share_a_clip(tables, model.config)
    check_tables_feed_the_model({"train": script.train_table, "val": script.val_table}, model.config, training=True)
    clip = frozen_clip(model.config.clip_model_name, model.config.clip_pretrained, str(config.device))
    trainer = SCSTTrainer(
        model=model, args=config, images=load_table(script.train_table, "train"),
        corpus=load_table(script.corpus_table, "corpus"), processing_class=tokenizer,
        rewards=ClipRewards(clip, config.semantic_weights),
        evaluator=make_evaluator(script, config, tokenizer, "val", output_dir),
    )
    return train_and_save(trainer, script, state, output_dir, networks={"discriminator": trainer.discriminator.model})


def train_and_save(trainer, script: ScriptArguments, state: PartialState, output_dir: Path,
                   networks: dict[str, torch.nn.Module] | None = None) -> dict:
    """Train (or resume), save the final model, its training log and `run_info.json`; checks that the ranks agree
    on the captioner's weights and on those of any other trained `networks` ({name: module})."""
    refuse_dropped_sharding(trainer)
    checkpoint = resume_point(trainer, state)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except CheckpointSaveError as error:
        raise SystemExit(str(error))
    minutes = (time.perf_counter() - started) / 60
    trainer.save_model(str(output_dir / "final"))
    fingerprint = verify_ranks_agree(trainer.accelerator.unwrap_model(trainer.model))
    info = {"stage": script.stage, "distributed_type": str(state.distributed_type),
            "num_processes": state.num_processes, "weights_sha256": fingerprint,
            "train_minutes": round(minutes, 2), "best_checkpoint": trainer.state.best_model_checkpoint,
            "global_step": trainer.state.global_step}
    info.update({f"{name}_sha256": verify_ranks_agree(module) for name, module in (networks or {}).items()})
    if hasattr(trainer, "skipped_steps"):
        info["skipped_steps"] = trainer.skipped_steps
    if state.is_main_process:
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        (output_dir / "run_info.json").write_text(json.dumps(info, indent=1))
        make_final_pipeline_ready(output_dir / "final")
    return info


def resume_point(trainer, state: PartialState) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names, said aloud: `latest` (or `true`) is the newest complete
    checkpoint of the stage's output folder (none there: the stage starts from the beginning); a path must be a
    complete checkpoint."""
    request = trainer.args.resume_from_checkpoint
    try:
        checkpoint = resolve_resume(request, trainer.args.output_dir)
    except CheckpointError as error:
        raise SystemExit(str(error))
    if request and state.is_main_process:
        print(f"resuming from {checkpoint}" if checkpoint else
              f"no complete checkpoint in {trainer.args.output_dir}: starting from the beginning", flush=True)
    return checkpoint


def make_final_pipeline_ready(final_dir: Path):
    """Let the final folder caption images through `pipeline(model=folder, trust_remote_code=True)`, bundling a
    local CLIP into it; a CLIP folder that has gone missing leaves the trained model as it is, with a warning."""
    try:
        make_pipeline_ready(final_dir)
    except FileNotFoundError as error:
        logger.warning("%s is saved but not pipeline-ready: %s. Once the CLIP is found, run "
                       "`make_pipeline_ready(folder, \"local-dir:PATH\")` from pipeline_scstclipcap.", final_dir, error)


def run_eval_stage(script: ScriptArguments, config: InitConfig, state: PartialState, model_dir: str) -> dict:
    """Captions and metrics of the model in `model_dir` on the test split; prints the metrics table and writes
    `test_metrics.json` (and the predictions) beside the model."""
    if script.test_table is None:
        raise SystemExit("the eval stage needs --test_table (an images table with references, from "
                         "`prepare_datasets.py coco` or `flickr30k`)")
    try:
        model = SCSTClipCapForCaptioning.from_pretrained(model_dir).to(config.device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise SystemExit(f"cannot load the model {model_dir}: {reason} (pass a model folder written by train.py or "
                         "convert_checkpoint.py, or a Hub id)")
    check_tables_share_a_clip({"test": script.test_table}, model.config)
    check_tables_feed_the_model({"test": script.test_table}, model.config, training=False)
    output_dir = Path(model_dir)
    evaluator = make_evaluator(script, config, tokenizer, "test", output_dir)
    from accelerate import Accelerator

    metrics = evaluator(model, Accelerator(cpu=not torch.cuda.is_available()), step=0)
    if state.is_main_process:
        from tools.report import metrics_table

        (output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"test split of {script.test_table}, model {model_dir}:\n{metrics_table({model_dir: metrics}, label='model')}")
    return metrics


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    head = HfArgumentParser(ScriptArguments).parse_known_args(argv)[0]
    if head.rehearsal:
        from clip_scstclipcap import allow_rehearsal

        allow_rehearsal()
    recipe = read_recipe(head.config or (str(DEFAULT_RECIPE) if not argv else None))
    stage = head.stage
    stages = RECIPE_STAGES if stage == "all" else (stage,)
    state = None
    results = {}
    for current in stages:
        script, config = parse_stage(current, recipe, argv, explicit_stage=stage != "all")
        state = state or start_processes(config)
        prepare_world(script, state)
        # After the world: building it in this process must not change the stage's random start (the new model's
        # weights are drawn before the Trainer seeds itself).
        set_seed(config.seed)
        if state.is_main_process:
            print(f"== stage {current}: {STAGE_SUMMARIES[current]}"
                  + ("" if current == "eval" else f"; outputs in {stage_dir(config, current)}"), flush=True)
        if current == "eval":
            if not results and script.model_name_or_path is None:
                raise SystemExit("the eval stage evaluates --model_name_or_path (a model folder or Hub id), or the "
                                 "stages trained before it with --stage all")
            for trained in [s for s in results if s != "eval"] or [script.model_name_or_path]:
                model_dir = str(stage_dir(config, trained) / "final") if trained in results else trained
                results.setdefault("eval", {})[trained] = run_eval_stage(script, config, state, model_dir)
        elif current == "scst":
            results[current] = run_scst_stage(script, config, state)
        else:
            results[current] = run_training_stage(script, config, state)
    if stage == "all" and state.is_main_process:
        from tools.report import write_figures, write_report

        run_dir = Path(config.output_dir)
        figures = write_figures(run_dir, script.test_table, script.images_dir, script.test_scenes)
        print(f"report: {write_report(run_dir, results, figures, shapes_clip_lines(script.shapes_dir))}")
    if state.num_processes > 1:
        # The backends' documented shutdown. It does not stop gloo's worker threads: see end_rank.
        state.destroy_process_group()
    return results


def end_rank(status: int):
    """Exit with `status`; a rank of a multi-process run (WORLD_SIZE > 1) exits without the interpreter's
    finalization, once its atexit callbacks have run and its output is flushed.

    With torch 2.14.1's gloo backend a rank could otherwise abort after its work was done ("terminate called without
    an active exception", SIGABRT; pytorch/pytorch#190489). A gloo worker thread drops its reference to a collective
    only after the caller's wait() has returned; when the caller has already dropped the tensors, that thread releases
    their Python objects itself: torch checks Py_IsInitialized(), then takes the GIL, and if the main thread began
    finalizing in between, CPython ends the thread (pthread_exit) inside a noexcept destructor: std::terminate. Neither
    destroy_process_group() nor anything else short of the ProcessGroup's destructor stops those threads, and FSDP2's
    DeviceMesh (kept in DTensor's caches) or DDP hold the ProcessGroup until the process ends. Without finalization no
    thread can reach that window; the atexit callbacks run first, while the interpreter is whole."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(status)
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_from_command_line(argv: list[str] | None = None):
    """`main()`, with a user's mistake (a missing table, a wrong path or setting) as one line on stderr and exit
    code 2 instead of a traceback; each rank of a multi-process run ends through `end_rank`."""
    try:
        main(argv)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            # One write, newline included (print makes two): the ranks share stderr, and one write to a pipe is not
            # interleaved with another rank's.
            sys.stderr.write(f"error: {stop.code}\n")
            end_rank(2)
        raise
    end_rank(0)


if __name__ == "__main__":
    run_from_command_line()
