"""Crash-safe checkpoints in one process (trainers/checkpoints.py): a write the file system refuses ends the save with
one line and keeps the checkpoint before, which the run resumes from; an incomplete checkpoint is refused by name;
`latest` picks the newest complete one and never one of an earlier run in the same folder.

The refused writes are the kernel's own: a checkpoint file that is a link to /dev/full (ENOSPC on every write), or a
file-size limit (RLIMIT_FSIZE, EFBIG) lowered for this process while the checkpoint is saved, each caught by the
writer it reaches (Python's own files, safetensors, torch.save).
"""

import json
import resource
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import train
from conftest import tiny_decoder_config
from configuration_scstclipcap import SCSTClipCapConfig
from modeling_scstclipcap import SCSTClipCapForCaptioning
from test_init_trainer import corpus_table, init_config
from trainers import InitTrainer
from trainers.checkpoints import MARKER, CheckpointSaveError, is_complete, latest_complete, missing_parts
from trainers.stages import resume_point

SAVING = dict(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1, noise_std=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tokenizer, output: Path, callbacks=(), **settings) -> InitTrainer:
    torch.manual_seed(0)
    model = SCSTClipCapForCaptioning(SCSTClipCapConfig(
        prefix_dim=16, prefix_length=4, decoder_config={**tiny_decoder_config(), "vocab_size": len(tokenizer)}))
    return InitTrainer(model=model, args=init_config(output, **{**SAVING, **settings}), corpus=corpus_table(),
                       processing_class=tokenizer, callbacks=list(callbacks))


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


class AtStep(TrainerCallback):
    """Calls `action(output_dir)` at the end of training step `step`, before that step's checkpoint is saved."""

    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action(Path(args.output_dir))


def full_disk_at(name: str):
    """The checkpoint's file `name` is a link to /dev/full: its writer gets ENOSPC."""

    def plant(output_dir: Path):
        folder = output_dir / "checkpoint-4"
        folder.mkdir()
        (folder / name).symlink_to("/dev/full")

    return plant


def file_size_limit_below(name: str, limits: list):
    """Files may not grow to the size `name` had in the checkpoint before: its writer gets EFBIG (this process
    ignores SIGXFSZ, as Python does by default)."""

    def lower(output_dir: Path):
        limits.append(resource.getrlimit(resource.RLIMIT_FSIZE))
        size = (output_dir / "checkpoint-2" / name).stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size - 1, limits[0][1]))

    return lower


@pytest.fixture
def straight(tiny_tokenizer, tmp_path) -> dict[str, torch.Tensor]:
    """The final weights of the run left alone."""
    trainer = make_trainer(tiny_tokenizer, tmp_path / "straight")
    trainer.train()
    return weights(trainer)


@pytest.mark.parametrize("refused, cause", [
    ("trainer_state.json on a full disk", "No space left on device (ENOSPC)"),
    # The marker's draft, written after everything else: the Trainer's own rotation would have run by then.
    (f".{MARKER}.tmp on a full disk", "No space left on device (ENOSPC)"),
    ("model.safetensors over the size limit", "File too large (EFBIG) writing a safetensors file"),
    ("optimizer.pt over the size limit", "torch.save's file writer failed"),
])
def test_a_refused_write_ends_the_save_in_one_line_and_the_run_resumes_from_the_checkpoint_before(
        tiny_tokenizer, tmp_path, straight, refused, cause):
    name = refused.split()[0]
    limits = []
    fault = full_disk_at(name) if "full disk" in refused else file_size_limit_below(name, limits)
    trainer = make_trainer(tiny_tokenizer, tmp_path, callbacks=[AtStep(4, fault)])
    try:
        with pytest.raises(CheckpointSaveError) as failure:
            trainer.train()
    finally:
        if limits:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits[0])
    run = tmp_path / "run"
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"could not save the checkpoint {run / 'checkpoint-4'}: {cause}"), message
    assert message.endswith(f"the newest complete checkpoint, {run / 'checkpoint-2'}, is intact: fix the cause and "
                            "resume with --resume_from_checkpoint latest")
    # The partial checkpoint is gone; the one before is whole, though save_total_limit=1 would have rotated it out
    # had the new one been taken for complete.
    assert sorted(path.name for path in run.iterdir() if path.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert is_complete(run / "checkpoint-2")

    resumed = make_trainer(tiny_tokenizer, tmp_path)
    resumed.train(resume_from_checkpoint="latest")
    assert resumed.state.global_step == SAVING["max_steps"]
    final = weights(resumed)
    assert all(torch.equal(final[name], straight[name]) for name in straight)


@pytest.fixture
def saved(tiny_tokenizer, tmp_path) -> Path:
    """A run's output folder with complete checkpoints 4 and 6 (save_total_limit 2)."""
    make_trainer(tiny_tokenizer, tmp_path, save_total_limit=2).train()
    return tmp_path / "run"


def test_an_incomplete_checkpoint_is_refused_naming_what_it_lacks(saved, tiny_tokenizer, capsys):
    trainer = make_trainer(tiny_tokenizer, saved.parent)
    state = train.PartialState()

    def refusal(checkpoint: Path) -> str:
        trainer.args.resume_from_checkpoint = str(checkpoint)
        with pytest.raises(SystemExit) as stop:
            resume_point(trainer, state)
        assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
        return stop.value.code

    (saved / "checkpoint-6" / MARKER).unlink()  # as a kill before its marker leaves it
    assert refusal(saved / "checkpoint-6") == (
        f"cannot resume from {saved / 'checkpoint-6'}: it is not a complete checkpoint, it lacks its completion "
        f"marker {MARKER} (its save was interrupted); the newest complete one there is {saved / 'checkpoint-4'} "
        "(--resume_from_checkpoint latest picks it)")

    optimizer = saved / "checkpoint-4" / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])
    (saved / "checkpoint-4" / "rng_state.pth").unlink()
    message = refusal(saved / "checkpoint-4")
    assert f"it lacks optimizer.pt (has {size // 2} of its {size} bytes), rng_state.pth;" in message
    assert message.endswith("no complete checkpoint is there (--resume_from_checkpoint latest picks it)")
    assert "the folder itself" in refusal(saved / "checkpoint-8")

    # `latest`, with nothing complete left, says so and starts from the beginning.
    trainer.args.resume_from_checkpoint = "latest"
    assert resume_point(trainer, state) is None
    assert f"no complete checkpoint in {saved}: starting from the beginning" in capsys.readouterr().out


def test_latest_is_the_newest_complete_checkpoint(saved, tiny_tokenizer, capsys):
    assert missing_parts(saved / "checkpoint-6") == []
    assert latest_complete(saved) == saved / "checkpoint-6"
    shutil.copytree(saved / "checkpoint-6", saved / "checkpoint-8")
    (saved / "checkpoint-8" / MARKER).unlink()
    trainer = make_trainer(tiny_tokenizer, saved.parent)
    trainer.args.resume_from_checkpoint = "latest"
    assert resume_point(trainer, train.PartialState()) == str(saved / "checkpoint-6")
    assert f"resuming from {saved / 'checkpoint-6'}" in capsys.readouterr().out
    trainer.args.resume_from_checkpoint = "true"
    assert resume_point(trainer, train.PartialState()) == str(saved / "checkpoint-6")


def test_a_fresh_run_removes_the_checkpoints_of_an_earlier_run_in_its_folder(saved, tiny_tokenizer):
    """A run started afresh in a folder that holds another run's checkpoints (4 and 6) and stopped after step 3 must
    resume from its own checkpoint 2, not from the other run's 6."""

    class Stop(Exception):
        pass

    def stop(output_dir: Path):
        raise Stop

    with pytest.raises(Stop):
        make_trainer(tiny_tokenizer, saved.parent, learning_rate=1e-2, callbacks=[AtStep(3, stop)]).train()
    assert latest_complete(saved) == saved / "checkpoint-2"
    assert sorted(path.name for path in saved.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((saved / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
