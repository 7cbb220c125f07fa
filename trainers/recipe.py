"""The settings of each stage, and how a recipe and the command line give them.

Each stage parses its own script arguments and config, so a setting it does not read is no flag of it: given on the
command line or in the stage's own section of the recipe, it is refused by name. A recipe's top-level settings are
shared by the stages, and each stage takes those it has.
"""

import functools
import inspect
import re
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from configuration_scstclipcap import SCSTClipCapConfig

from .common import CaptionConfig, check_caption_generation
from .init_trainer import InitConfig, SupervisedConfig
from .scst_trainer import SCSTConfig

STAGES = ("init", "supervised", "scst", "eval", "all")
RECIPE_STAGES = ("init", "scst", "supervised", "eval")
# The model settings a run sets itself rather than by flag: the CLIP and its embedding size come from the tables, the
# decoder from --decoder_name_or_path or --decoder_config; the training stages feed normalised embeddings; GPT-2 ties
# its own output layer.
SET_BY_THE_RUN = ("prefix_dim", "clip_model_name", "clip_pretrained", "clip_embedding", "decoder_config",
                  "tie_word_embeddings")


def documented_args(cls) -> dict[str, str]:
    """{name: description} of the `Args:` section of a transformers-style class docstring."""
    found = re.findall(r"^    (\w+) \(.*\):\n((?:        .*\n?)+)", inspect.getdoc(cls), re.MULTILINE)
    return {name: " ".join(text.split()) for name, text in found}


def model_shape_fields() -> list[tuple]:
    """Every setting SCSTClipCapConfig declares, but those the run sets itself, as a flag with the config's default
    and its docstring's description."""
    docs = documented_args(SCSTClipCapConfig)
    own = [f for f in fields(SCSTClipCapConfig) if f.name in vars(SCSTClipCapConfig)["__annotations__"]]
    shape = [f for f in own if f.name not in SET_BY_THE_RUN]
    undocumented = [f.name for f in shape if f.name not in docs]
    if undocumented:
        raise TypeError(f"SCSTClipCapConfig's docstring does not describe {', '.join(undocumented)}: add each under "
                        "its `Args:` (the description is the flag's help), or list it in SET_BY_THE_RUN")
    return [(f.name, f.type, field(default=f.default, metadata={"help": docs[f.name]})) for f in shape]


ModelShapeArguments = make_dataclass("ModelShapeArguments", model_shape_fields())
ModelShapeArguments.__doc__ = "The shape of a new model: SCSTClipCapConfig's own settings, as flags."


def borrowed(source, name: str):
    """The field `name` of the dataclass `source`, default and help included, for a config that takes the same
    setting."""
    original = source.__dataclass_fields__[name]
    return field(default=original.default, default_factory=original.default_factory, metadata=original.metadata)


@dataclass
class ScriptArguments:
    """What every stage takes: which stage, the recipe, the model, the shapes world."""

    stage: str = field(default="all", metadata={"help": "init | supervised | scst | eval | all", "choices": STAGES})
    config: str | None = field(default=None, metadata={"help": "Recipe YAML; command-line flags override it."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The SCSTClipCap checkpoint (folder or Hub id) a training stage starts from (it wins over "
                          "init_from_stage), or the eval stage evaluates."},
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
    rehearsal: bool = field(
        default=False,
        metadata={"help": "Allow the random, seeded CLIP weights of a rehearsal at real sizes (CLIP pretrained "
                          "'random-rehearsal', benchmarks/paper_scale.py); real runs refuse them."},
    )


@dataclass
class TrainingScriptArguments(ScriptArguments):
    """What every training stage takes besides: its training images, the validation split, the stage it starts
    from. The tables come from prepare_datasets.py."""

    train_table: str | None = field(
        default=None,
        metadata={"help": "Training images table (scst: unpaired; supervised: with the references it trains on)."},
    )
    val_table: str | None = field(default=None, metadata={"help": "Validation images with references."})
    val_scenes: str | None = field(default=None, metadata={"help": "Shapes world only: scenes JSON of val."})
    init_from_stage: str | None = field(
        default=None, metadata={"help": "Start from the final model of this earlier stage of the same run."}
    )


@dataclass
class CorpusArguments:
    """The sentences of the stages that learn from text without images (init) or judge captions by them (scst)."""

    corpus_table: str | None = field(default=None, metadata={"help": "Corpus table (text + CLIP text features)."})


@dataclass
class NewModelArguments(ModelShapeArguments):
    """A new captioner: its GPT-2, its tokenizer, its shape (a checkpoint to start from brings all three)."""

    decoder_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained GPT-2 for a new model (e.g. gpt2)."}
    )
    decoder_config: str | None = field(
        default=None, metadata={"help": "JSON file of a GPT-2 shape for a new model trained from scratch."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Caption tokenizer of a new model (a checkpoint brings its own)."}
    )


@dataclass
class InitArguments(NewModelArguments, CorpusArguments, TrainingScriptArguments):
    """Script arguments of the text-only `init` stage."""

    pseudo_pairs_table: str | None = field(
        default=None, metadata={"help": "Pseudo-pairs table (read when pseudo_pair_weight > 0)."}
    )


@dataclass
class SupervisedArguments(NewModelArguments, TrainingScriptArguments):
    """Script arguments of the supervised bound: it trains on the references of the train table."""


@dataclass
class SCSTArguments(CorpusArguments, TrainingScriptArguments):
    """Script arguments of the `scst` stage: it continues an existing captioner, whose config decides the shape."""


@dataclass
class EvalArguments(ScriptArguments):
    """Script arguments of the `eval` stage: the test split, and what the report of `--stage all` shows."""

    test_table: str | None = field(default=None, metadata={"help": "Test images with references."})
    test_scenes: str | None = field(default=None, metadata={"help": "Shapes world only: scenes JSON of test."})
    images_dir: str | None = field(
        default=None, metadata={"help": "Folder the test table's file_name column is relative to (report pictures)."}
    )


@dataclass
class EvalConfig:
    r"""Settings of the `eval` stage, each the [`~transformers.TrainingArguments`] or [`CaptionConfig`] setting of
    that name. Not `TrainingArguments` itself: the stage trains nothing, so a training setting is no flag of it."""

    output_dir: str | None = borrowed(TrainingArguments, "output_dir")
    seed: int = borrowed(TrainingArguments, "seed")
    use_cpu: bool = borrowed(TrainingArguments, "use_cpu")
    per_device_eval_batch_size: int = borrowed(TrainingArguments, "per_device_eval_batch_size")
    eval_max_new_tokens: int = borrowed(CaptionConfig, "eval_max_new_tokens")
    eval_num_beams: int = borrowed(CaptionConfig, "eval_num_beams")
    spice: bool = borrowed(CaptionConfig, "spice")

    def __post_init__(self):
        # TrainingArguments' own fallback: `--stage all` then finds the training stages' folders in the same place.
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        check_caption_generation(self)


STAGE_ARGUMENTS = {
    "init": (InitArguments, InitConfig),
    "supervised": (SupervisedArguments, SupervisedConfig),
    "scst": (SCSTArguments, SCSTConfig),
    "eval": (EvalArguments, EvalConfig),
}


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


def stage_parser(stage: str) -> HfArgumentParser:
    return HfArgumentParser(STAGE_ARGUMENTS[stage])


@functools.cache
def settings_of(stage: str) -> frozenset[str]:
    return frozenset(action.dest for action in stage_parser(stage)._actions)


@functools.cache
def flags_of(stage: str) -> frozenset[str]:
    return frozenset(flag for action in stage_parser(stage)._actions for flag in action.option_strings)


def stage_recipe(stage: str, recipe: dict) -> dict:
    """The recipe's settings for `stage`: those of its top level the stage has, then its own section on top. A
    top-level setting no stage has, or one in the stage's section that the stage does not have, is refused; `stages`
    (what `--stage all` runs) is train.py's."""
    common = {key: value for key, value in recipe.items() if key not in (*RECIPE_STAGES, "stages")}
    unknown = sorted(set(common) - set().union(*map(settings_of, RECIPE_STAGES)))
    if unknown:
        raise SystemExit(f"unknown settings in the recipe: {', '.join(unknown)} (no stage has them): correct or "
                         "drop them")
    section = recipe.get(stage) or {}
    if not isinstance(section, dict):
        raise SystemExit(f"the recipe's `{stage}:` section must be a mapping of settings, got {section!r}")
    own = settings_of(stage)
    foreign = sorted(set(section) - own)
    if foreign:
        raise SystemExit(f"the recipe's `{stage}:` section sets {', '.join(foreign)}, which the {stage} stage does "
                         "not read: drop them, or move them to the section of a stage that reads them")
    return {**{key: value for key, value in common.items() if key in own}, **section}


def foreign_flags(stage: str, argv: list[str]) -> list[str]:
    """The flags of `argv` that are not `stage`'s."""
    left = stage_parser(stage).parse_known_args(argv)[1]
    return sorted({word.split("=")[0] for word in left if word.startswith("--")})


def refuse_flags(stage: str, flags: list[str]):
    def owners(flag: str) -> str:
        stages = [other for other in RECIPE_STAGES if flag in flags_of(other)]
        return f"a setting of {', '.join(stages)}" if stages else "no stage's setting"

    them, each = ("it", "it") if len(flags) == 1 else ("them", "each")
    raise SystemExit(f"the {stage} stage does not read {', '.join(f'{flag} ({owners(flag)})' for flag in flags)}: "
                     f"drop {them}, or give {each} to a stage that reads it (`--stage STAGE --help` lists a stage's "
                     "settings)")


def refuse_flags_of_no_stage(argv: list[str]):
    """`--stage all` gives each stage the flags it reads; a flag that no stage reads is refused."""
    unread = set.intersection(*(set(foreign_flags(stage, argv)) for stage in RECIPE_STAGES))
    if unread:
        raise SystemExit(f"no stage reads {', '.join(sorted(unread))}: drop it or correct its name "
                         "(`--stage STAGE --help` lists a stage's settings)")


def parse_stage(stage: str, recipe: dict, argv: list[str], shared_command_line: bool = False) -> tuple:
    """(script arguments, config) of one stage: its dataclasses' defaults < recipe < command line. A flag of `argv`
    that the stage does not read is refused; with `shared_command_line` (`--stage all`, whose command line is every
    stage's) it is left to the stages that read it."""
    if not torch.cuda.is_available():
        # Without a GPU only the CPU backend synchronises several processes.
        recipe = {**recipe, "use_cpu": True}
    parser = stage_parser(stage)
    parser.set_defaults(**stage_recipe(stage, recipe))
    foreign = foreign_flags(stage, argv)
    if foreign and not shared_command_line:
        refuse_flags(stage, foreign)
    script, config, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    script.stage = stage
    return script, config
