"""Crash safety of `train.py`, by killing it: a real `train.py` process (init, then scst) is killed with SIGKILL, to its
whole process group, at seeded random moments, once in the middle of a checkpoint file and once between checkpoints,
resumed each time with `--resume_from_checkpoint latest`, and its final weights (the captioner, and for scst the
discriminator and its optimizer) must equal, bit for bit, those of the same run left alone. A full disk while a
checkpoint is written must end the run with one line and lose nothing: the run resumes from the checkpoint before.

The processes of this module load a test-only `sitecustomize` (written into a temporary folder on their PYTHONPATH)
through which `torch.save` and `safetensors.torch.save_file` write half of a file's bytes, note the file in a log, then
the rest; the one file named in FAULT_HOLD is held half-written until the file FAULT_RELEASE exists, so that the test
kills the process there, or changes the disk under it, at a moment of its choosing. Kills between checkpoints come at
a delay after a checkpoint completes, drawn from the gap measured in the uninterrupted run between a checkpoint's
completion and the next one's first write. SEED picks the moments.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PROJECT_ROOT
from test_fsdp_cpu import build_setup, stage_args

SEED = 0
MARKER = "checkpoint_complete.json"
STEPS, SAVE_STEPS = 6, 2
CHECKPOINTING = ["--save_strategy", "steps", "--save_steps", str(SAVE_STEPS), "--max_steps", str(STEPS),
                 "--save_total_limit", "2"]

SHIM = '''"""Test-only (tests/test_fault_injection.py): the checkpoint writers of this process write half a file, log
it, and write the rest; the file named in FAULT_HOLD stays half-written until the file FAULT_RELEASE exists."""
import os

if os.environ.get("FAULT_LOG"):
    import io
    import time

    import safetensors.torch
    import torch

    LOG, HOLD, RELEASE = os.environ["FAULT_LOG"], os.environ.get("FAULT_HOLD"), os.environ.get("FAULT_RELEASE")
    original_torch_save = torch.save

    def write_in_halves(path, data):
        path = os.path.abspath(path)
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            with open(LOG, "a") as log:
                log.write(f"{time.time()} {path}\\n")
            while path == HOLD and not os.path.exists(RELEASE):
                time.sleep(0.01)
            handle.write(data[len(data) // 2:])

    def torch_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return original_torch_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original_torch_save(obj, buffer, *args, **kwargs)
        write_in_halves(f, buffer.getvalue())

    def save_file(tensors, filename, metadata=None):
        write_in_halves(filename, safetensors.torch.save(tensors, metadata=metadata))

    torch.save = torch_save
    safetensors.torch.save_file = save_file
'''


class Run:
    """One `train.py` process in its own process group, its output in files, its slowed writes in `log`."""

    def __init__(self, work: Path, argv: list[str], name: str, hold: Path | None = None):
        self.log = work / f"{name}.writes"
        self.stdout, self.stderr = work / f"{name}.out", work / f"{name}.err"
        self.release = work / f"{name}.release"
        env = {**os.environ, "PYTHONPATH": str(work / "shim"), "FAULT_LOG": str(self.log),
               "FAULT_HOLD": str(hold or ""), "FAULT_RELEASE": str(self.release), "OMP_NUM_THREADS": "1",
               "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "train.py"), *argv], cwd=work, env=env,
                                            stdout=stdout, stderr=stderr, start_new_session=True)

    def holds(self, path: Path) -> bool:
        """Whether the process has written half of `path` (the held file) and waits."""
        return any(written == path for _, written in self.writes())

    def writes(self) -> list[tuple[float, Path]]:
        if not self.log.exists():
            return []
        rows = [line.split(" ", 1) for line in self.log.read_text().splitlines()]
        return [(float(stamp), Path(path)) for stamp, path in rows]

    def wait_until(self, condition, timeout: float = 300.0):
        """Poll `condition` until it holds; fails if the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"train.py ended before the moment to kill it:\n{self.output()}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill train.py"
            time.sleep(0.01)

    def kill(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had already ended
            pass
        self.process.wait()

    def finish(self, timeout: float = 300.0) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()[-4000:]


def marked_steps(stage_dir: Path) -> list[int]:
    """Steps of the checkpoints whose completion marker exists, ascending."""
    if not stage_dir.is_dir():
        return []
    return sorted(int(folder.name.split("-")[1]) for folder in stage_dir.glob("checkpoint-*")
                  if (folder / MARKER).is_file())


def watch(run: Run, stage_dir: Path) -> dict:
    """Run to the end, noting when each checkpoint's marker appears; the run's slowed writes by checkpoint."""
    completed = {}
    while run.process.poll() is None:
        for step in marked_steps(stage_dir):
            completed.setdefault(step, time.time())
        time.sleep(0.01)
    assert run.process.returncode == 0, run.output()
    writes = {}
    for stamp, path in run.writes():
        if path.parent.name.startswith("checkpoint-") or path.parent.parent.name.startswith("checkpoint-"):
            folder = path.parent if path.parent.name.startswith("checkpoint-") else path.parent.parent
            writes.setdefault(int(folder.name.split("-")[1]), []).append((stamp, path.relative_to(folder)))
    # Between checkpoints: from one's completion to the next one's first write.
    gap = min(writes[step + SAVE_STEPS][0][0] - completed[step] for step in completed if step + SAVE_STEPS in writes)
    return {"writes": writes, "gap": gap}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault_injection")
    build_setup(folder)
    (folder / "shim").mkdir()
    (folder / "shim" / "sitecustomize.py").write_text(SHIM)
    return folder


def arguments(work: Path, stage: str, output: Path) -> list[str]:
    start_from = work / "straight_init" / "init" / "final" if stage == "scst" else None
    return stage_args(work, stage, output, start_from) + CHECKPOINTING


@pytest.fixture(scope="module")
def straight(work):
    """Each stage run once without interruption (scst from init's final model): its output folder and timings."""
    runs = {}
    for stage in ("init", "scst"):
        output = work / f"straight_{stage}"
        runs[stage] = {"output": output, **watch(Run(work, arguments(work, stage, output), f"straight_{stage}"),
                                                 output / stage)}
        assert marked_steps(output / stage) == [STEPS - SAVE_STEPS, STEPS]  # save_total_limit 2
    return runs


def final_state(output: Path, stage: str) -> dict[str, dict[str, torch.Tensor] | object]:
    """What a stage ends with: the final captioner, the fingerprints train.py takes of the trained networks, and for
    scst the discriminator, its optimizer and scheduler from the last checkpoint."""
    stage_dir = output / stage
    info = json.loads((stage_dir / "run_info.json").read_text())
    state = {"captioner": load_file(str(stage_dir / "final" / "model.safetensors")),
             "fingerprints": {key: info[key] for key in info if key.endswith("sha256")} | {"step": info["global_step"]}}
    if stage == "scst":
        discriminator = stage_dir / f"checkpoint-{STEPS}" / "discriminator"
        state["discriminator"] = load_file(str(discriminator / "model.safetensors"))
        training = torch.load(discriminator / "training_state.pt", weights_only=True)
        state["discriminator_optimizer"] = {f"{index}.{name}": value for index, values
                                            in training["optimizer"]["state"].items() for name, value in values.items()}
        state["discriminator_scheduler"] = training["scheduler"]
    return state


def assert_bitwise_equal(resumed: dict, straight: dict):
    assert resumed.keys() == straight.keys()
    for part in straight:
        if isinstance(straight[part], dict) and all(isinstance(v, torch.Tensor) for v in straight[part].values()):
            assert resumed[part].keys() == straight[part].keys(), part
            different = [name for name in straight[part] if not torch.equal(resumed[part][name], straight[part][name])]
            assert not different, (part, different)
        else:
            assert resumed[part] == straight[part], part


@pytest.mark.parametrize("stage", ["init", "scst"])
def test_killed_and_resumed_runs_end_with_the_weights_of_an_uninterrupted_run(work, straight, stage):
    rng = random.Random(f"{SEED}-{stage}")
    output = work / f"killed_{stage}"
    stage_dir = output / stage
    argv = arguments(work, stage, output)
    writes = straight[stage]["writes"]

    # 1. Killed in the middle of a file of a checkpoint before the last.
    step = rng.choice([s for s in writes if s < STEPS])
    target = stage_dir / f"checkpoint-{step}" / rng.choice([path for _, path in writes[step]])
    first = Run(work, argv, f"killed_{stage}_1", hold=target)
    first.wait_until(lambda: first.holds(target))
    first.kill()
    assert target.is_file() and not (target.parent / MARKER).exists()
    complete = marked_steps(stage_dir)
    assert complete == [s for s in range(SAVE_STEPS, step, SAVE_STEPS)][-2:]

    # 2. Resumed from the newest complete checkpoint, killed between two checkpoints: after the one it was killed in
    # is written again and complete, at a delay drawn from the measured gap before the next one.
    second = Run(work, argv + ["--resume_from_checkpoint", "latest"], f"killed_{stage}_2")
    second.wait_until(lambda: step in marked_steps(stage_dir))
    time.sleep(rng.uniform(0, straight[stage]["gap"]))
    second.kill()
    said = (f"resuming from {stage_dir / f'checkpoint-{complete[-1]}'}" if complete
            else f"no complete checkpoint in {stage_dir}: starting from the beginning")
    assert said in second.stdout.read_text(), second.output()

    # 3. Resumed to the end.
    newest = marked_steps(stage_dir)[-1]
    third = Run(work, argv + ["--resume_from_checkpoint", "latest"], f"killed_{stage}_3")
    assert third.finish() == 0, third.output()
    assert f"resuming from {stage_dir / f'checkpoint-{newest}'}" in third.stdout.read_text()
    assert sorted(folder.name for folder in stage_dir.glob("checkpoint-*")) == [
        f"checkpoint-{s}" for s in marked_steps(straight[stage]["output"] / stage)]
    assert_bitwise_equal(final_state(output, stage), final_state(straight[stage]["output"], stage))


def test_a_full_disk_ends_the_run_in_one_line_and_the_run_resumes_from_the_checkpoint_before(work, straight):
    """The file system refuses (ENOSPC, from /dev/full) the discriminator's training state, which the scst stage
    writes into its second checkpoint before the Trainer's part: the run ends with one line naming the checkpoint and
    the cause, the partial folder is gone, the first checkpoint is complete (not rotated out by save_total_limit 1),
    and resuming from it ends where the run left alone ends."""
    output = work / "full_disk"
    stage_dir = output / "scst"
    argv = arguments(work, "scst", output) + ["--save_total_limit", "1"]
    second = stage_dir / f"checkpoint-{2 * SAVE_STEPS}"
    first_write = second / straight["scst"]["writes"][2 * SAVE_STEPS][0][1]
    failing = Run(work, argv, "full_disk_1", hold=first_write)
    failing.wait_until(lambda: failing.holds(first_write))
    assert marked_steps(stage_dir) == [SAVE_STEPS]
    (second / "discriminator" / "training_state.pt").symlink_to("/dev/full")
    failing.release.touch()
    assert failing.finish() == 2, failing.output()
    errors = [line for line in failing.stderr.read_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, failing.output()
    assert errors[0].startswith(f"error: could not save the checkpoint {second}: No space left on device (ENOSPC)")
    assert f"the newest complete checkpoint, {stage_dir / f'checkpoint-{SAVE_STEPS}'}, is intact" in errors[0]
    assert "Traceback" not in failing.stderr.read_text()
    assert not second.exists()
    assert marked_steps(stage_dir) == [SAVE_STEPS]

    resumed = Run(work, argv + ["--resume_from_checkpoint", "latest"], "full_disk_2")
    assert resumed.finish() == 0, resumed.output()
    assert f"resuming from {stage_dir / f'checkpoint-{SAVE_STEPS}'}" in resumed.stdout.read_text()
    assert_bitwise_equal(final_state(output, "scst"), final_state(straight["scst"]["output"], "scst"))
