"""Crash-safe checkpoints: a `checkpoint-N` folder counts as a checkpoint only once it is complete.

A completion marker (`checkpoint_complete.json`, the folder's files and their sizes) is written last: after every
process has written its files (the captioner, optimizer, scheduler, RNG states, trainer state, and whatever a stage
adds, such as the scst discriminator) and after all of them are flushed to disk (fsync), through a temporary file
renamed into place, so that after a kill or a power loss a folder either has its marker and all of its files, or is
ignored. Resuming checks the marker and the files it lists; older checkpoints are rotated out (`save_total_limit`)
only once the new one is complete.

Why a marker rather than writing under a temporary name and renaming the folder: the Trainer computes the
`checkpoint-N` path itself (in `_save_checkpoint`, for `best_model_checkpoint`, for rotation and
`load_best_model_at_end`), so does `CaptionTrainer.save_starting_point` (`checkpoint-0`, recorded as the best before it
is written), the scst stage writes its discriminator into `checkpoint-N/discriminator/` before the Trainer's part, and
under several processes every rank writes its own files there. A temporary name would have to be threaded through all
of these and then corrected in the saved trainer state; with a marker every path stays the one they compute.
"""

import errno
import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
LATEST = ("latest", "true")
# What torch.save's zip writer says when a write fails: its stream's exception, or its own checks after one.
TORCH_WRITE_FAILURES = ("iostream error", "PytorchStreamWriter failed", "unexpected pos")
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint asked for that cannot be resumed from (missing or incomplete)."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a permission); the previous complete checkpoint is untouched."""


def checkpoint_step(folder: str | Path) -> int | None:
    """N of a `checkpoint-N` folder, else None."""
    match = _CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def missing_parts(folder: str | Path) -> list[str]:
    """What keeps `folder` from being a complete checkpoint (empty when it is one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"the folder itself ({folder} does not exist)"]
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except FileNotFoundError:
        return [f"its completion marker {MARKER} (its save was interrupted)"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"a readable completion marker {MARKER} ({error})"]
    missing = []
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            missing.append(name)
        elif path.stat().st_size != size:
            missing.append(f"{name} (has {path.stat().st_size} of its {size} bytes)")
    return missing


def is_complete(folder: str | Path) -> bool:
    return not missing_parts(folder)


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder of `run_dir`, complete or not, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    folders = [path for path in run_dir.iterdir() if checkpoint_step(path) is not None and path.is_dir()]
    return sorted(folders, key=checkpoint_step)


def latest_complete(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of `run_dir` with the highest step, else None."""
    complete = [folder for folder in checkpoint_folders(run_dir) if is_complete(folder)]
    return complete[-1] if complete else None


def resolve_resume(request: str | bool | None, run_dir: str | Path) -> str | None:
    """The checkpoint a `resume_from_checkpoint` value names: `True`, `"latest"` or `"true"` the newest complete one of
    `run_dir` (None when it holds none: the run starts from the beginning); a path must be a complete checkpoint."""
    if request is None or request is False:
        return None
    if request is True or (isinstance(request, str) and request.lower() in LATEST):
        latest = latest_complete(run_dir)
        return None if latest is None else str(latest)
    missing = missing_parts(request)
    if missing:
        latest = latest_complete(Path(request).parent)
        hint = (f"the newest complete one there is {latest}" if latest is not None
                else "no complete checkpoint is there")
        raise CheckpointError(f"cannot resume from {request}: it is not a complete checkpoint, it lacks "
                              f"{', '.join(missing)}; {hint} (--resume_from_checkpoint latest picks it)")
    return str(request)


def saved_step(checkpoint: str | Path | None) -> int:
    """The training step a complete checkpoint was saved at (-1 for None: a run from the beginning)."""
    if checkpoint is None:
        return -1
    return json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())["global_step"]


def retire_checkpoints_after(run_dir: str | Path, step: int):
    """Remove the checkpoints of `run_dir` after `step` (all of them for -1): they belong to another history than a
    run starting from `step`, which would write over them; left in place, `latest` would resume into that other history
    after this run crashed."""
    stale = [folder for folder in checkpoint_folders(run_dir) if checkpoint_step(folder) > step]
    if stale:
        logger.warning("%s: removing %s of an earlier run (%s), as this run starts at step %d", run_dir,
                       "checkpoint" if len(stale) == 1 else f"{len(stale)} checkpoints",
                       ", ".join(folder.name for folder in stale), max(step, 0))
    for folder in stale:
        _remove(folder)


def rotate(run_dir: str | Path, save_total_limit: int | None, keep: str | None):
    """Delete the oldest complete checkpoints beyond `save_total_limit`, never the newest nor `keep` (the best), and
    the incomplete folders older than the newest complete one (left by an interrupted save or deletion)."""
    folders = checkpoint_folders(run_dir)
    complete = [folder for folder in folders if is_complete(folder)]
    if not complete:
        return
    newest = complete[-1]
    for folder in folders:
        if checkpoint_step(folder) < checkpoint_step(newest) and folder not in complete:
            _remove(folder)
    if not save_total_limit or save_total_limit <= 0:
        return
    protected = {newest.resolve()} | ({Path(keep).resolve()} if keep else set())
    excess = len(complete) - max(save_total_limit, len(protected))
    for folder in complete:
        if excess <= 0:
            break
        if folder.resolve() not in protected:
            _remove(folder)
            excess -= 1


def commit(folder: str | Path):
    """Flush every file of `folder` to disk, then write its completion marker listing them (atomically)."""
    folder = Path(folder)
    temporary = folder / f".{MARKER}.tmp"
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path == temporary:  # the marker's draft is no part of the checkpoint
                continue
            _fsync(path)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
        _fsync_directory(Path(root))
    with open(temporary, "w") as handle:
        json.dump({"step": checkpoint_step(folder), "files": dict(sorted(files.items()))}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / MARKER)
    _fsync_directory(folder)
    _fsync_directory(folder.parent)


def crash_safe(save_checkpoint):
    """A Trainer's `_save_checkpoint` made crash-safe: the marker is written once all of it has run, on every process
    (rotation is held back until then), and a failed write ends the save with a `CheckpointSaveError` naming the
    checkpoint and the cause. Applied to every override of `_save_checkpoint` in the stages' trainers
    (`CaptionTrainer.__init_subclass__`), the outermost call does this and the calls it makes through `super()` run
    as they are: so what a stage writes before calling the Trainer's save (scst's discriminator) is covered too."""

    @functools.wraps(save_checkpoint)
    def save(trainer, model, trial):
        if getattr(trainer, "_checkpoint_in_progress", False):
            return save_checkpoint(trainer, model, trial)
        run_dir = Path(trainer._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        limit = trainer.args.save_total_limit
        trainer._checkpoint_in_progress = True
        # The Trainer rotates inside its own save, before the marker exists: rotation is done here once it does.
        trainer.args.save_total_limit = None
        try:
            save_checkpoint(trainer, model, trial)
            trainer.accelerator.wait_for_everyone()
            if trainer.args.should_save:
                commit(folder)
        except Exception as error:
            cause = storage_failure(error)
            if cause is None:
                raise
            raise _save_failure(folder, run_dir, cause, trainer.args.should_save) from error
        finally:
            trainer.args.save_total_limit = limit
            trainer._checkpoint_in_progress = False
        if trainer.args.should_save:
            rotate(run_dir, limit, trainer.state.best_model_checkpoint)

    return save


def storage_failure(error: BaseException) -> str | None:
    """What a failed write of a checkpoint file says about the storage, or None for an error of another kind (a bug,
    raised as it is). A full disk or a refused write reaches the save as an `OSError` from Python's own files, as a
    `SafetensorError` that quotes the system's error number, or from `torch.save` as a `RuntimeError` of its zip
    writer that has lost the error number (then the free space says whether the disk is full)."""
    if isinstance(error, OSError):
        cause = error.strerror or str(error)
        if error.errno in errno.errorcode:
            cause = f"{cause} ({errno.errorcode[error.errno]})"
        return f"{cause} writing {error.filename}" if error.filename else cause
    message = str(error)
    number = re.search(r"\(os error (\d+)\)", message)
    if type(error).__name__ == "SafetensorError" and number:
        code = int(number.group(1))
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)}) writing a safetensors file"
    if isinstance(error, RuntimeError) and any(sign in message for sign in TORCH_WRITE_FAILURES):
        return f"torch.save's file writer failed ({message.splitlines()[0].strip()})"
    return None


def _save_failure(folder: Path, run_dir: Path, cause: str, main_process: bool) -> CheckpointSaveError:
    """The error a failed save ends the run with; the main process removes what was written of the checkpoint (which
    frees the space a full disk needs)."""
    if main_process and folder.is_dir() and not is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)
    free = shutil.disk_usage(run_dir).free
    previous = latest_complete(run_dir)
    kept = (f"the newest complete checkpoint, {previous}, is intact: fix the cause and resume with "
            "--resume_from_checkpoint latest" if previous is not None else "there is no earlier complete checkpoint")
    return CheckpointSaveError(f"could not save the checkpoint {folder}: {cause}, with {free / 2**20:.0f} MiB free "
                               f"there; {kept}")


def _remove(folder: Path):
    """Unmark first, so that a deletion cut short leaves a folder that no longer counts as a checkpoint."""
    marker = folder / MARKER
    if marker.exists():
        marker.unlink()
        _fsync_directory(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(path: Path):
    """Make a folder's entries (new names, renames) durable; Windows cannot open a folder for this and needs none."""
    if os.name == "nt":
        return
    _fsync(path)
