"""The one training entry point of SCSTClipCap.

    python train.py                                         # the offline shapes world: init, scst, test, report
    python train.py --config configs/coco_shutterstock.yaml --stage init
    python train.py --config configs/shapes.yaml --stage init --noise_std 0.05 --output_dir runs/noise05
    accelerate launch train.py --config configs/coco_shutterstock.yaml --stage init
    torchrun --nproc_per_node 2 train.py --config ...

Stages: `init` (text-only initialization), `scst` (self-critical training with CLIP rewards and a naturalness
discriminator, from the init model), `supervised` (plain ClipCap on true pairs: an upper bound), `eval` (captions
and metrics of a checkpoint on the test split), `all` (the recipe's `stages`, by default init, scst, supervised,
eval, in that order, then the report).
A recipe YAML holds settings shared by the stages at the top level and each stage's own under `init:`, `scst:`,
`supervised:`, `eval:`; command-line flags override both. Each stage takes its own settings only (`--stage STAGE
--help` lists them; see trainers/recipe.py): the training stages any `TrainingArguments` flag (`--learning_rate`,
`--per_device_train_batch_size`, `--report_to`, ...) and their config's (`InitConfig`, `SupervisedConfig`,
`SCSTConfig`), the eval stage `EvalConfig`'s. A flag the stage does not read is refused; `--stage all` gives each
stage the flags it reads.
"""

import os
import sys

# Spinning OpenMP threads stall each other on a busy machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import HfArgumentParser, set_seed

from trainers.recipe import RECIPE_STAGES, ScriptArguments, parse_stage, read_recipe, refuse_flags_of_no_stage
from trainers.stages import run_eval_stage, run_init_stage, run_scst_stage, run_supervised_stage

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_RECIPE = PROJECT_ROOT / "configs" / "shapes.yaml"
STAGE_SUMMARIES = {
    "init": "text-only initialisation, each corpus sentence from its own noisy CLIP text embedding",
    "scst": "self-critical training on unpaired images with CLIP rewards and the naturalness discriminator",
    "supervised": "the supervised upper bound, on the true references of the training images",
    "eval": "captions and COCO metrics on the test split (written beside each model)",
}
TRAINING_STAGES = {"init": run_init_stage, "scst": run_scst_stage, "supervised": run_supervised_stage}


def read_head(argv: list[str]) -> ScriptArguments:
    """What every stage shares (the stage, the recipe, the rehearsal switch). `--help` lists these for `--stage all`;
    a stage's own `--help` (`--stage eval --help`) lists all of its settings."""
    parser = HfArgumentParser(ScriptArguments, add_help=False,
                              epilog="`--stage STAGE --help` lists the settings of a stage.")
    head = parser.parse_known_args(argv)[0]
    if head.stage == "all" and {"-h", "--help"} & set(argv):
        parser.print_help()
        raise SystemExit(0)
    return head


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
    from dataprep.world_clip import clip_report

    return clip_report(clip_figures(Path(shapes_dir) / "raw", world))


def stages_of_all(stages) -> tuple[str, ...]:
    """The stages `--stage all` runs, as the recipe's `stages` lists them: known ones, eval (which tests the others)
    last."""
    if not isinstance(stages, (list, tuple)) or not stages or set(stages) - set(RECIPE_STAGES) \
            or len(set(stages)) != len(stages) or ("eval" in stages and stages[-1] != "eval"):
        raise SystemExit(f"the recipe's `stages` must list stages among {', '.join(RECIPE_STAGES)}, each once, eval "
                         f"last if there; got {stages!r}")
    return tuple(stages)


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


def start_processes(config) -> PartialState:
    """The process group, checked."""
    state = PartialState(cpu=config.use_cpu)
    check_launch(state)
    return state


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    head = read_head(argv)
    if head.rehearsal:
        from clip_scstclipcap import allow_rehearsal

        allow_rehearsal()
    recipe = read_recipe(head.config or (str(DEFAULT_RECIPE) if not argv else None))
    stages = stages_of_all(recipe.get("stages", RECIPE_STAGES)) if head.stage == "all" else (head.stage,)
    if head.stage == "all":
        refuse_flags_of_no_stage(argv)
    state = None
    results = {}
    for current in stages:
        script, config = parse_stage(current, recipe, argv, shared_command_line=head.stage == "all")
        state = state or start_processes(config)
        prepare_world(script, state)
        # After the world: building it in this process must not change the stage's random start (the new model's
        # weights are drawn before the Trainer seeds itself).
        set_seed(config.seed)
        if state.is_main_process:
            print(f"== stage {current}: {STAGE_SUMMARIES[current]}"
                  + ("" if current == "eval" else f"; outputs in {Path(config.output_dir) / current}"), flush=True)
        if current == "eval":
            results[current] = run_eval_stage(script, config, state, trained=list(results))
        else:
            results[current] = TRAINING_STAGES[current](script, config, state)
    if head.stage == "all" and state.is_main_process:
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
