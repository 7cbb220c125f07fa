"""Training curves and histograms of a run folder, as PNG images.

    python tools/curves.py runs/shapes
    python tools/curves.py runs/shapes --output-dir /tmp/plots --images-table data/shapes/tables/shapes/test

`training_curves.png`: a grid of panels (losses, each reward, discriminator accuracy, caption statistics,
validation metrics), one line per stage against that stage's own optimisation steps, read from each stage's
`trainer_state.json` (or its newest `checkpoint-*/trainer_state.json`). `histograms.png`: per-sample rewards of the
first and last logged SCST step (`rewards.jsonl`), caption lengths of each stage's test predictions (else its latest
validation predictions) and, given an images table, the CLIP cosine between each predicted caption and its image.
The run folder may also be a single stage folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_scstclipcap import CaptioningClip, check_clip_metadata, read_clip_metadata  # noqa: E402

STAGE_ORDER = ("init", "scst", "supervised")
TEST_PREDICTIONS = Path("final/test_predictions/predictions-step-0.json")
LINE_STYLES = ("-", "--", ":", "-.")
SMOOTH_ABOVE = 40  # points; longer noisy curves get a moving average drawn over the faint raw one
LOSS_TERMS = ("reconstruction_loss", "pseudo_pair_loss")


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]


PANELS = (
    Panel("loss", ("loss",)),
    Panel("init loss terms", LOSS_TERMS),
    Panel("policy loss", ("policy_loss",)),
    Panel("MMD", ("mmd",)),
    Panel("discriminator loss", ("discriminator_loss",)),
    Panel("discriminator accuracy", ("discriminator_accuracy_real", "discriminator_accuracy_fake")),
    Panel("reward (samples vs greedy)", ("reward", "reward_greedy")),
    Panel("semantic reward", ("reward_semantic",)),
    Panel("CLIP-cos reward", ("reward_clip_cos",)),
    Panel("CLIP-agg cos reward", ("reward_agg_cos",)),
    Panel("CLIP-agg L1 reward", ("reward_agg_l1",)),
    Panel("naturalness reward", ("reward_naturalness",)),
    Panel("semantic share w", ("semantic_share",)),
    Panel("advantage std", ("advantage_std",)),
    Panel("sampled caption length (words)", ("caption_length",)),
    Panel("sampled caption diversity", ("distinct_1", "distinct_2", "repeated_word_share", "same_caption_share")),
    Panel("learning rate", ("learning_rate",)),
    Panel("gradient norm", ("grad_norm", "discriminator_grad_norm")),
    Panel("validation CIDEr", ("eval_cider",)),
    Panel("validation attributes", ("eval_attribute_precision", "eval_attribute_recall")),
    Panel("validation COCO metrics", ("eval_bleu_4", "eval_meteor", "eval_rouge_l", "eval_spice")),
    Panel("validation caption length (words)", ("eval_caption_length",)),
    Panel("validation diversity", ("eval_distinct_1", "eval_distinct_2", "eval_distinct_caption_share",
                                   "eval_repeated_word_share")),
    Panel("validation loss", ("eval_loss",)),
)

Series = tuple[np.ndarray, np.ndarray]


# ---- run folder


def _step_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def trainer_state_file(stage_dir: Path) -> Path | None:
    """The stage's `trainer_state.json`, else the one of its newest checkpoint (by step), else None."""
    direct = stage_dir / "trainer_state.json"
    if direct.is_file():
        return direct
    states = [path for path in stage_dir.glob("checkpoint-*/trainer_state.json") if path.parent.name.removeprefix("checkpoint-").isdigit()]
    return max(states, key=lambda path: _step_of(path.parent.name), default=None)


def predictions_file(stage_dir: Path) -> Path | None:
    """The stage's test predictions, else its latest validation predictions, else None."""
    if (stage_dir / TEST_PREDICTIONS).is_file():
        return stage_dir / TEST_PREDICTIONS
    found = [path for path in stage_dir.glob("val_predictions/predictions-step-*.json")
             if path.stem.removeprefix("predictions-step-").isdigit()]
    return max(found, key=lambda path: _step_of(path.stem), default=None)


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def stage_dirs(run_dir: Path, is_stage: Callable[[Path], bool]) -> dict[str, Path]:
    """{stage: folder}: `run_dir` itself when it is a stage folder, else its stage subfolders in training order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if is_stage(run_dir):
        return {run_dir.name: run_dir}
    stages = sorted((path for path in run_dir.iterdir() if path.is_dir() and is_stage(path)),
                    key=lambda path: _stage_key(path.name))
    return {path.name: path for path in stages}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def read_trainer_state(state_file: Path) -> dict:
    state = read_json(state_file)
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{state_file} has no `log_history` list (not a transformers TrainerState file)")
    return state


def read_predictions(path: Path) -> dict[str, str]:
    """{image_id: caption} of a COCO results file."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path} is not a COCO results list of {{'image_id', 'caption'}}")
    predictions = {}
    for index, row in enumerate(rows):
        if not (isinstance(row, dict) and "image_id" in row and isinstance(row.get("caption"), str)):
            raise ValueError(f"{path}, entry {index}: expected {{'image_id', 'caption': str}}, got {row!r}")
        predictions[str(row["image_id"])] = row["caption"]
    return predictions


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_series(history: list[dict]) -> dict[str, Series]:
    """{logged name: (steps, values)} of every numeric value in a log history."""
    points = defaultdict(list)
    for entry in history:
        if not _is_number(entry.get("step")):
            continue
        for name, value in entry.items():
            if name != "step" and _is_number(value):
                points[name].append((entry["step"], value))
    return {name: tuple(np.array(column, dtype=float) for column in zip(*pairs)) for name, pairs in points.items()}


def stage_logs(run_dir: Path) -> dict[str, dict]:
    """{stage: {"series": ..., "best_step": ...}} of every stage folder with a trainer state."""
    stages = stage_dirs(run_dir, lambda path: trainer_state_file(path) is not None)
    if not stages:
        raise FileNotFoundError(
            f"no training logs in {run_dir}: expected trainer_state.json (or checkpoint-*/trainer_state.json) in it "
            f"or in its stage folders ({', '.join(f'{run_dir}/{stage}' for stage in STAGE_ORDER)})")
    logs = {}
    for stage, folder in stages.items():
        state = read_trainer_state(trainer_state_file(folder))
        logs[stage] = {"series": log_series(state["log_history"]), "best_step": state.get("best_global_step")}
    return logs


# ---- training curves


def _repeats_loss(series: dict[str, Series], key: str) -> bool:
    """True when a loss term is the whole loss (the other terms are off), so its curve would add nothing."""
    if key not in LOSS_TERMS or "loss" not in series or key not in series:
        return False
    (term_steps, term), (loss_steps, loss) = series[key], series["loss"]
    return term.shape == loss.shape and np.array_equal(term_steps, loss_steps) and np.allclose(term, loss, rtol=1e-4)


def panels_with_data(logs: dict[str, dict]) -> list[Panel]:
    """The panels of PANELS, each reduced to the keys some stage logged (loss terms that merely repeat the loss
    left out); panels without data are left out."""
    logged = {name for log in logs.values() for name in log["series"]
              if not _repeats_loss(log["series"], name)}
    return [Panel(panel.title, keys) for panel in PANELS
            if (keys := tuple(key for key in panel.keys if key in logged))]


def _moving_average(values: np.ndarray) -> np.ndarray:
    window = max(3, len(values) // 20)
    padded = np.pad(values, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def _legend(ax, stages: list[str], keys: tuple[str, ...], colours: dict[str, str]) -> None:
    """Colour tells the stage, line style the logged value: one entry each, not one per combination."""
    handles = [Line2D([], [], color=colours[stage], label=stage) for stage in stages]
    if len(keys) > 1:
        handles += [Line2D([], [], color="black", linestyle=style, label=key.removeprefix("eval_"))
                    for key, style in zip(keys, LINE_STYLES)]
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.7)


def _draw_series(ax, key: str, steps: np.ndarray, values: np.ndarray, style: str, colour: str) -> None:
    if key.startswith("eval_"):
        ax.plot(steps, values, style, marker="o", markersize=3, color=colour)
    elif len(values) > SMOOTH_ABOVE:
        ax.plot(steps, values, style, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _moving_average(values), style, color=colour)
    else:
        ax.plot(steps, values, style, color=colour)


def _mark_best(ax, series: dict[str, Series], best_step, colour: str) -> None:
    steps, values = series["eval_cider"]
    if best_step is not None and best_step in steps:
        ax.plot(best_step, values[np.flatnonzero(steps == best_step)[0]], "*", markersize=11, color=colour)


def _draw_panel(ax, panel: Panel, logs: dict[str, dict], colours: dict[str, str]) -> None:
    stages = [stage for stage, log in logs.items() if any(key in log["series"] for key in panel.keys)]
    for stage in stages:
        series = logs[stage]["series"]
        for key, style in zip(panel.keys, LINE_STYLES):
            if key in series:
                _draw_series(ax, key, *series[key], style, colours[stage])
        if panel.keys == ("eval_cider",) and "eval_cider" in series:
            _mark_best(ax, series, logs[stage]["best_step"], colours[stage])
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if panel.keys == ("learning_rate",):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    _legend(ax, stages, panel.keys, colours)


def _stage_colours(stages) -> dict[str, str]:
    return {stage: f"C{index % 10}" for index, stage in enumerate(stages)}


def _grid(count: int, max_columns: int = 4) -> tuple[int, int]:
    columns = min(max_columns, count)
    return math.ceil(count / columns), columns


def plot_training_curves(run_dir: Path, output: Path) -> Path:
    """Write a PNG grid of the logged training and validation curves of every stage of `run_dir`."""
    run_dir, output = Path(run_dir), Path(output)
    logs = stage_logs(run_dir)
    panels = panels_with_data(logs)
    if not panels:
        raise ValueError(f"the trainer states of {run_dir} log none of the plotted values "
                         f"({', '.join(key for panel in PANELS for key in panel.keys)})")
    rows, columns = _grid(len(panels))
    figure = Figure(figsize=(4.4 * columns, 3.3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = _stage_colours(logs)
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, logs, colours)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    stars = " (star: best checkpoint)" if any(log["best_step"] is not None for log in logs.values()) else ""
    figure.suptitle(f"{run_dir.resolve().name}: stages {', '.join(logs)}; x = each stage's own steps{stars}")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    return output


# ---- histograms


def read_first_and_last(rewards_file: Path) -> tuple[dict, dict]:
    """The first and last records of a `rewards.jsonl` (one JSON object per logging step)."""
    records = []
    for number, line in enumerate(rewards_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{rewards_file}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise ValueError(f"{rewards_file}, line {number}: expected an object with a numeric 'step'")
        records.append(record)
    if not records:
        raise ValueError(f"{rewards_file} holds no records")
    return records[0], records[-1]


def _per_sample_keys(record: dict) -> list[str]:
    return [key for key, value in record.items() if isinstance(value, list) and value and all(map(_is_number, value))]


def _histogram_bins(*samples: np.ndarray, integer: bool = False) -> np.ndarray:
    values = np.concatenate(samples)
    low, high = float(values.min()), float(values.max())
    if integer:
        return np.arange(math.floor(low) - 0.5, math.ceil(high) + 1.5)
    return np.linspace(low, high if high > low else low + 1e-6, 31)


def _reward_panels(stages: dict[str, Path]) -> list[Callable]:
    panels = []
    for stage, folder in stages.items():
        if not (folder / "rewards.jsonl").is_file():
            continue
        first, last = read_first_and_last(folder / "rewards.jsonl")
        for key in _per_sample_keys(last):
            panels.append(lambda ax, stage=stage, key=key, first=first, last=last:
                          _draw_first_and_last(ax, stage, key, first, last))
    return panels


def _draw_first_and_last(ax, stage: str, key: str, first: dict, last: dict) -> None:
    records = [record for record in (first, last) if key in record] if first is not last else [last]
    samples = [np.array(record[key], dtype=float) for record in records]
    bins = _histogram_bins(*samples, integer=key == "caption_length")
    for record, values, colour in zip(records, samples, ("C7", "C3")):
        ax.hist(values, bins=bins, alpha=0.55, color=colour, label=f"step {record['step']} (mean {values.mean():.3g})")
    ax.set_title(f"{stage}: per-sample {key}", fontsize=10)
    ax.set_ylabel("samples", fontsize=8)
    ax.legend(fontsize=7)


def _source(predictions: Path) -> str:
    return "test" if predictions.parent.name == "test_predictions" else f"val step {_step_of(predictions.stem)}"


def _draw_per_stage(ax, values: dict[str, np.ndarray], labels: dict[str, str], colours: dict[str, str], title: str,
                    xlabel: str, integer: bool) -> None:
    bins = _histogram_bins(*values.values(), integer=integer)
    for stage, stage_values in values.items():
        ax.hist(stage_values, bins=bins, histtype="step", linewidth=1.6, color=colours[stage],
                label=f"{labels[stage]}, mean {stage_values.mean():.3g}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("captions", fontsize=8)
    ax.legend(fontsize=7)


def caption_similarities(predictions: dict[str, str], images_table: str, where: str = "predictions") -> np.ndarray:
    """CLIP cosine between each caption and its image's `clip_features` in `images_table`, with the CLIP named in
    the table's metadata (L2-normalised features on both sides)."""
    table = datasets.load_from_disk(str(images_table)).select_columns(["image_id", "clip_features"])
    position = {image_id: index for index, image_id in enumerate(table["image_id"])}
    missing = [image_id for image_id in predictions if image_id not in position]
    if missing:
        raise ValueError(f"{where}: {len(missing)} image ids are not in the images table {images_table} "
                         f"(e.g. {missing[0]!r}); give the table of the split these predictions were made on")
    expected = read_clip_metadata(str(images_table))
    clip = CaptioningClip.load(expected["model_name"], expected.get("pretrained"))
    check_clip_metadata(clip.metadata, expected, f"the images table {images_table}")
    ids = list(predictions)
    images = np.array(table.select([position[image_id] for image_id in ids])["clip_features"], dtype=np.float32)
    texts = clip.encode_text([predictions[image_id] for image_id in ids]).numpy()
    return (texts * images).sum(axis=1)


def _caption_panels(predicted: dict[str, Path], images_table: str | None, colours: dict[str, str]) -> list[Callable]:
    captions = {stage: rows for stage, path in predicted.items() if (rows := read_predictions(path))}
    if not captions:
        return []
    labels = {stage: f"{stage} ({_source(predicted[stage])})" for stage in captions}
    lengths = {stage: np.array([len(text.split()) for text in rows.values()], dtype=float)
               for stage, rows in captions.items()}
    panels = [lambda ax: _draw_per_stage(ax, lengths, labels, colours, "predicted caption length", "words",
                                         integer=True)]
    if images_table:
        similarities = {stage: caption_similarities(rows, images_table, str(predicted[stage]))
                        for stage, rows in captions.items()}
        panels.append(lambda ax: _draw_per_stage(ax, similarities, labels, colours,
                                                 "CLIP similarity of predicted caption and image", "cosine",
                                                 integer=False))
    return panels


def plot_histograms(run_dir: Path, output: Path, images_table: str | None = None) -> Path:
    """Write a PNG of histograms: per-sample SCST rewards (first vs last logged step), predicted caption lengths per
    stage and, with `images_table`, the CLIP similarity of each predicted caption to its image."""
    run_dir, output = Path(run_dir), Path(output)
    stages = stage_dirs(run_dir, lambda path: (path / "rewards.jsonl").is_file() or predictions_file(path) is not None)
    predicted = {stage: path for stage, folder in stages.items() if (path := predictions_file(folder))}
    panels = _reward_panels(stages) + _caption_panels(predicted, images_table, _stage_colours(stages))
    if not panels:
        raise FileNotFoundError(
            f"nothing to plot in {run_dir}: no rewards.jsonl and no non-empty predictions ({TEST_PREDICTIONS} or "
            f"val_predictions/predictions-step-N.json) in it or its stage folders")
    rows, columns = _grid(len(panels), max_columns=3)
    figure = Figure(figsize=(4.8 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, draw in zip(axes, panels):
        draw(ax)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(f"{run_dir.resolve().name}: histograms")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    return output


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run folder (with stage folders) or one stage folder")
    parser.add_argument("--output-dir", type=Path, help="where the PNGs go (default: the run folder)")
    parser.add_argument("--images-table", help="images table of the predictions' split, for the CLIP similarities")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or args.run_dir
    curves = plot_training_curves(args.run_dir, output_dir / "training_curves.png")
    histograms = plot_histograms(args.run_dir, output_dir / "histograms.png", args.images_table)
    print(f"wrote {curves}\nwrote {histograms}")
    return curves, histograms


if __name__ == "__main__":
    main()
