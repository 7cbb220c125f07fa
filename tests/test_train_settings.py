"""train.py's settings: each stage parses its own and refuses every other stage's, a recipe's shared settings reach
the stages that read them, the model shape comes from SCSTClipCapConfig, and every shipped recipe parses for every
stage."""

from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from transformers import TrainingArguments

import train
from configuration_scstclipcap import SCSTClipCapConfig
from trainers import InitConfig, SCSTConfig
from trainers.init_trainer import SupervisedConfig
from trainers.recipe import (
    RECIPE_STAGES, SET_BY_THE_RUN, STAGE_ARGUMENTS, EvalConfig, ModelShapeArguments, parse_stage, settings_of,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"init": InitConfig, "supervised": SupervisedConfig, "scst": SCSTConfig, "eval": EvalConfig}


@pytest.mark.parametrize("recipe", sorted((PROJECT_ROOT / "configs").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_recipe_parses_for_every_stage(recipe):
    settings = train.read_recipe(str(recipe))
    for stage in RECIPE_STAGES:
        script, config = parse_stage(stage, settings, [])
        assert script.stage == stage and type(config) is CONFIGS[stage]
        for name, value in (settings.get(stage) or {}).items():
            assert getattr(script if hasattr(script, name) else config, name) == value, (stage, name)


def other_stages_settings(stage: str) -> set[str]:
    return set().union(*(settings_of(other) for other in RECIPE_STAGES if other != stage)) - settings_of(stage)


@pytest.mark.parametrize("stage", RECIPE_STAGES)
def test_a_stage_refuses_each_flag_that_only_other_stages_read(stage):
    foreign = other_stages_settings(stage)
    assert foreign
    with pytest.raises(SystemExit) as refusal:
        parse_stage(stage, {}, [f"--{name}" for name in sorted(foreign)])
    message = refusal.value.code
    assert message.startswith(f"the {stage} stage does not read --")
    assert [name for name in sorted(foreign) if f"--{name} (a setting of " not in message] == []


def command_line(field) -> tuple[list[str], object]:
    """Words that set `field` from the command line, and the value they give it."""
    default = field.default_factory() if field.default is MISSING else field.default
    if default is None:
        return ["somewhere"], "somewhere"
    if isinstance(default, list):
        return [str(value) for value in default], default
    return [str(default)], default


@pytest.mark.parametrize("stage", RECIPE_STAGES)
def test_a_stage_takes_each_of_its_own_settings_from_the_command_line(stage):
    """Every setting of the stage that some other stage lacks (TrainingArguments' own are the Trainer's to check)."""
    trainer_settings = {field.name for field in fields(TrainingArguments)}
    script_class, config_class = STAGE_ARGUMENTS[stage]
    own = {field.name: field for cls in (script_class, config_class) for field in fields(cls) if field.init}
    distinct = sorted(set(own) & set().union(*map(other_stages_settings, RECIPE_STAGES)) - trainer_settings)
    assert distinct
    argv, expected = [], {}
    for name in distinct:
        words, expected[name] = command_line(own[name])
        argv += [f"--{name}", *words]
    script, config = parse_stage(stage, {}, argv)
    assert {name: getattr(script if hasattr(script, name) else config, name) for name in distinct} == expected


def test_a_recipe_gives_each_stage_the_shared_settings_it_reads_and_refuses_a_foreign_one_in_its_section():
    recipe = {"output_dir": "runs/x", "noise_std": 0.3, "learning_rate": 0.01, "pseudo_pairs_table": "pairs",
              "init": {"noise_std": 0.05}, "eval": {"eval_num_beams": 2}}
    script, evaluation = parse_stage("eval", recipe, [])
    assert (evaluation.output_dir, evaluation.eval_num_beams) == ("runs/x", 2)
    assert not hasattr(evaluation, "learning_rate") and not hasattr(script, "pseudo_pairs_table")
    _, supervised = parse_stage("supervised", recipe, [])
    assert (supervised.noise_std, supervised.learning_rate) == (0.0, 0.01)
    script, init = parse_stage("init", recipe, [])
    assert (init.noise_std, init.learning_rate, script.pseudo_pairs_table) == (0.05, 0.01, "pairs")
    with pytest.raises(SystemExit, match=r"the recipe's `eval:` section sets learning_rate, which the eval stage "
                                         "does not read"):
        parse_stage("eval", {**recipe, "eval": {"learning_rate": 0.1}}, [])
    with pytest.raises(SystemExit, match=r"`supervised:` section sets noise_std, pseudo_pairs_table, which"):
        parse_stage("supervised", {"supervised": {"noise_std": 0.1, "pseudo_pairs_table": "pairs"}}, [])
    with pytest.raises(SystemExit, match="unknown settings in the recipe: noise_stdd"):
        parse_stage("eval", {"noise_stdd": 0.1}, [])


def test_stage_all_gives_each_stage_the_flags_it_reads_and_refuses_one_that_no_stage_reads(tmp_path):
    argv = ["--stage", "all", "--noise_std", "0.05", "--test_table", "test", "--output_dir", str(tmp_path / "run")]
    assert parse_stage("init", {}, argv, shared_command_line=True)[1].noise_std == 0.05
    assert parse_stage("eval", {}, argv, shared_command_line=True)[0].test_table == "test"
    with pytest.raises(SystemExit, match="no stage reads --noise_stdd"):
        train.main([*argv, "--noise_stdd", "0.1"])
    assert not (tmp_path / "run").exists()


def test_the_model_shape_flags_are_the_model_configs_own_settings():
    shape = {field.name: field for field in fields(ModelShapeArguments)}
    assert set(shape) == set(vars(SCSTClipCapConfig)["__annotations__"]) - set(SET_BY_THE_RUN)
    config_fields = SCSTClipCapConfig.__dataclass_fields__
    assert {name: field.default for name, field in shape.items()} == {name: config_fields[name].default
                                                                      for name in shape}
    assert all(field.metadata["help"] for field in shape.values())
    for stage in ("init", "supervised"):
        script, _ = parse_stage(stage, {}, ["--mapping_type", "transformer", "--num_mapping_heads", "4"])
        assert (script.mapping_type, script.num_mapping_heads, script.prefix_length) == ("transformer", 4, 10)


def test_each_stage_lists_its_own_settings_under_help(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--stage", "eval", "--help"])
    listed = capsys.readouterr().out
    assert stop.value.code == 0 and "--eval_num_beams" in listed and "--learning_rate" not in listed
    with pytest.raises(SystemExit) as stop:
        train.main(["--help"])
    listed = capsys.readouterr().out
    assert stop.value.code == 0 and "--stage STAGE --help" in listed


@pytest.mark.parametrize("stages", [["init", "scst", "eval"], ("supervised", "eval"), ["scst"]])
def test_the_recipe_says_what_stage_all_runs(stages):
    assert train.stages_of_all(stages) == tuple(stages)


@pytest.mark.parametrize("stages", [[], ["eval", "init"], ["init", "init"], ["pretrain"], "init"])
def test_a_recipe_stage_list_that_cannot_run_is_refused(stages):
    with pytest.raises(SystemExit, match="`stages` must list stages"):
        train.stages_of_all(stages)
