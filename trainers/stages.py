"""The stages `train.py` runs: each builds or loads its captioner, checks its tables, trains (or evaluates) and
saves; the settings come from [`trainers.recipe`]."""

import hashlib
import json
import logging
import time
from dataclasses import fields
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from transformers import AutoConfig, AutoModel, AutoTokenizer, GPT2Config

from configuration_scstclipcap import SCSTClipCapConfig
from modeling_scstclipcap import SCSTClipCapForCaptioning
from pipeline_scstclipcap import make_pipeline_ready

from .checkpoints import CheckpointError, CheckpointSaveError, resolve_resume
from .evaluation import frozen_clip, make_evaluator
from .init_trainer import InitConfig, InitTrainer, SupervisedConfig
from .recipe import (
    EvalArguments, EvalConfig, InitArguments, ModelShapeArguments, NewModelArguments, SCSTArguments,
    SupervisedArguments, TrainingScriptArguments,
)
from .rewards import ClipRewards
from .scst_trainer import SCSTConfig, SCSTTrainer
from .tables import check_tables_feed_the_model, check_tables_share_a_clip, load_table

# In-process the project's own classes serve the Auto API, so saved folders load without remote code.
AutoConfig.register(SCSTClipCapConfig.model_type, SCSTClipCapConfig)
AutoModel.register(SCSTClipCapConfig, SCSTClipCapForCaptioning)

logger = logging.getLogger(__name__)


def model_source(script: TrainingScriptArguments, run_dir: Path) -> str | None:
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


def build_model(script: NewModelArguments, run_dir: Path, clip_meta: dict, tokenizer):
    """A checkpoint, a new model around a pretrained GPT-2, or a new model from a GPT-2 shape."""
    source = model_source(script, run_dir)
    if source:
        return SCSTClipCapForCaptioning.from_pretrained(source)
    settings = {shape.name: getattr(script, shape.name) for shape in fields(ModelShapeArguments)}
    settings.update(prefix_dim=clip_meta["dim"], clip_model_name=clip_meta["model_name"],
                    clip_pretrained=clip_meta.get("pretrained"))
    if script.decoder_name_or_path:
        return SCSTClipCapForCaptioning.from_decoder_pretrained(script.decoder_name_or_path, **settings)
    if script.decoder_config is None:
        raise SystemExit("a new model needs --decoder_name_or_path (e.g. gpt2) or --decoder_config (a GPT-2 JSON)")
    decoder = GPT2Config.from_json_file(script.decoder_config)
    decoder.vocab_size = len(tokenizer)
    decoder.bos_token_id = decoder.eos_token_id = tokenizer.eos_token_id
    decoder.pad_token_id = tokenizer.pad_token_id
    return SCSTClipCapForCaptioning(SCSTClipCapConfig(decoder_config=decoder.to_dict(), **settings))


def load_tokenizer(source: str | None):
    """The caption tokenizer in `source` (a model, a tokenizer or a GPT-2: folder or Hub id)."""
    if source is None:
        raise SystemExit("no caption tokenizer: set --tokenizer_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_init_stage(script: InitArguments, config: InitConfig, state: PartialState) -> dict:
    """Text-only initialisation: each corpus sentence from its own noisy CLIP text embedding, with the optional
    pseudo-pair and MMD terms."""
    tables = {"corpus": script.corpus_table, "train": script.train_table,
              "pseudo_pairs": script.pseudo_pairs_table, "val": script.val_table}
    return train_captioner(
        script, config, state, load_table(script.corpus_table, "corpus"), tables,
        pseudo_pairs=load_table(script.pseudo_pairs_table, "pseudo_pairs") if config.pseudo_pair_weight > 0 else None,
        images=load_table(script.train_table, "train") if config.mmd_weight > 0 else None,
    )


def run_supervised_stage(script: SupervisedArguments, config: SupervisedConfig, state: PartialState) -> dict:
    """The supervised upper bound: the captioner on every reference of every training image."""
    train_images = load_table(script.train_table, "train")
    pairs = train_images.map(
        lambda batch: {"text": [r for refs in batch["references"] for r in refs],
                       "clip_features": [f for f, refs in zip(batch["clip_features"], batch["references"])
                                         for _ in refs]},
        batched=True, remove_columns=train_images.column_names,
    )
    if len(pairs) == 0:
        raise SystemExit(f"the supervised stage needs references in the train table {script.train_table}")
    return train_captioner(script, config, state, pairs, {"train": script.train_table, "val": script.val_table})


def train_captioner(script: InitArguments | SupervisedArguments, config: InitConfig, state: PartialState, corpus,
                    tables: dict[str, str | None], **terms) -> dict:
    """Train the captioner (a new one, or the checkpoint the stage starts from) on `corpus` (text and CLIP
    features) with the [`InitTrainer`] and its extra `terms` (pseudo_pairs, images), once `tables` are checked to
    feed it."""
    run_dir = Path(config.output_dir)
    output_dir = run_dir / script.stage
    config.output_dir = str(output_dir)
    tokenizer = load_tokenizer(model_source(script, run_dir) or script.tokenizer_name_or_path
                               or script.decoder_name_or_path)
    clip_meta = check_tables_share_a_clip(tables)
    model = build_model(script, run_dir, clip_meta, tokenizer)
    check_tables_share_a_clip(tables, model.config)
    check_tables_feed_the_model(tables, model.config, training=True)
    trainer = InitTrainer(
        model=model, args=config, corpus=corpus, processing_class=tokenizer,
        evaluator=make_evaluator(script, config, tokenizer, "val", output_dir, config.device), **terms,
    )
    return train_and_save(trainer, script, state, output_dir)


def run_scst_stage(script: SCSTArguments, config: SCSTConfig, state: PartialState) -> dict:
    """Self-critical training of an existing captioner on unpaired images, with the corpus as the real sentences."""
    run_dir = Path(config.output_dir)
    output_dir = run_dir / "scst"
    config.output_dir = str(output_dir)
    source = model_source(script, run_dir)
    if source is None:
        raise SystemExit("the scst stage trains an existing captioner: set --init_from_stage init or "
                         "--model_name_or_path")
    tokenizer = load_tokenizer(source)
    model = SCSTClipCapForCaptioning.from_pretrained(source)
    tables = {"train": script.train_table, "corpus": script.corpus_table, "val": script.val_table}
    check_tables_share_a_clip(tables, model.config)
    check_tables_feed_the_model({"train": script.train_table, "val": script.val_table}, model.config, training=True)
    clip = frozen_clip(model.config.clip_model_name, model.config.clip_pretrained, str(config.device))
    trainer = SCSTTrainer(
        model=model, args=config, images=load_table(script.train_table, "train"),
        corpus=load_table(script.corpus_table, "corpus"), processing_class=tokenizer,
        rewards=ClipRewards(clip, config.semantic_reward_weights),
        evaluator=make_evaluator(script, config, tokenizer, "val", output_dir, config.device),
    )
    return train_and_save(trainer, script, state, output_dir, networks={"discriminator": trainer.discriminator.model})


def train_and_save(trainer, script: TrainingScriptArguments, state: PartialState, output_dir: Path,
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


def run_eval_stage(script: EvalArguments, config: EvalConfig, state: PartialState, trained: list[str]) -> dict:
    """{stage or model: test metrics} of the final model of each stage `trained` before in this run (`--stage all`),
    else of --model_name_or_path."""
    if not trained and script.model_name_or_path is None:
        raise SystemExit("the eval stage evaluates --model_name_or_path (a model folder or Hub id), or the "
                         "stages trained before it with --stage all")
    models = {stage: str(Path(config.output_dir) / stage / "final") for stage in trained} \
        or {script.model_name_or_path: script.model_name_or_path}
    return {name: evaluate_model(script, config, state, model_dir) for name, model_dir in models.items()}


def evaluate_model(script: EvalArguments, config: EvalConfig, state: PartialState, model_dir: str) -> dict:
    """Captions and metrics of the model in `model_dir` on the test split; prints the metrics table and writes
    `test_metrics.json` (and the predictions) beside the model."""
    if script.test_table is None:
        raise SystemExit("the eval stage needs --test_table (an images table with references, from "
                         "`prepare_datasets.py coco` or `flickr30k`)")
    try:
        model = SCSTClipCapForCaptioning.from_pretrained(model_dir).to(state.device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        raise SystemExit(f"cannot load the model {model_dir}: {reason} (pass a model folder written by train.py or "
                         "convert_checkpoint.py, or a Hub id)")
    check_tables_share_a_clip({"test": script.test_table}, model.config)
    check_tables_feed_the_model({"test": script.test_table}, model.config, training=False)
    output_dir = Path(model_dir)
    evaluator = make_evaluator(script, config, tokenizer, "test", output_dir, state.device)
    from accelerate import Accelerator

    metrics = evaluator(model, Accelerator(cpu=not torch.cuda.is_available()), step=0)
    if state.is_main_process:
        from tools.report import metrics_table

        (output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=1))
        table = metrics_table({model_dir: metrics}, label="model")
        print(f"test split of {script.test_table}, model {model_dir}:\n{table}")
    return metrics
