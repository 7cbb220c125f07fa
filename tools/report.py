"""The run report: test metrics per stage, the validation trajectory of every stage, sample captions beside their
images and training curves (`report.md`, `report.json`, `captions.html`, `captions.png`, `training_curves.png`,
`histograms.png` in the run folder).

    python tools/report.py runs/shapes      # rebuild the report of a finished run
"""

import json
import sys
from pathlib import Path

HEADLINE_METRICS = (
    "cider", "bleu_4", "meteor", "rouge_l", "spice", "clip_s", "attribute_precision", "attribute_recall",
    "attribute_f1", "fluent_attribute_f1", "parse_rate", "repeated_word_share", "distinct_2", "vocabulary_size",
    "caption_length", "distinct_caption_share", "distinct_scene_caption_share",
)
FIGURE_FILES = {"Training curves": "training_curves.png", "Histograms": "histograms.png",
                "Sample captions (page)": "captions.html", "Sample captions": "captions.png"}
TRAJECTORY_METRICS = ("cider", "attribute_f1", "fluent_attribute_f1", "parse_rate", "clip_s", "caption_length",
                      "repeated_word_share", "distinct_2", "discriminator_accuracy_real", "discriminator_accuracy_fake")


def metrics_table(test_metrics: dict[str, dict], columns: tuple[str, ...] = HEADLINE_METRICS,
                  label: str = "stage") -> str:
    """One row per stage (or step), one column per metric the run produced."""
    columns = [name for name in columns if any(name in m for m in test_metrics.values())]
    lines = [f"| {label} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row, metrics in test_metrics.items():
        cells = [f"{metrics[name]:.3f}" if isinstance(metrics.get(name), (int, float)) else "–" for name in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_trajectory(stage_dir: Path) -> dict[int, dict[str, float]]:
    """{step: validation metrics} from the stage's `trainer_state.json` (empty when it has none)."""
    state_file = stage_dir / "trainer_state.json"
    if not state_file.is_file():
        return {}
    history = json.loads(state_file.read_text())["log_history"]
    return {entry["step"]: {key[len("eval_"):]: value for key, value in entry.items() if key.startswith("eval_")}
            for entry in history if "eval_cider" in entry}


def starting_point_note(stage: str, info: dict) -> str:
    """What the step-0 row means, and plainly whether the stage improved on the model it started from."""
    note = "Step 0 is the model the stage started from; it competes for the best checkpoint."
    best = info.get("best_checkpoint") or ""
    if best.rstrip("/").endswith("checkpoint-0"):
        return note + (f" **No checkpoint of the {stage} stage beat it on validation: the stage returned the model it "
                       "started from, unchanged.**")
    return note + f" The stage kept `{Path(best).name}`." if best else note


def write_figures(run_dir: Path, test_table: str | None, images_dir: str | None = None,
                  scenes: str | None = None) -> dict[str, str]:
    """Training curves and histograms, and (given the test images) sample captions beside their images; returns
    {title: file name in run_dir} of those written."""
    from tools.captions_page import read_stage_predictions, write_captions_grid, write_captions_page
    from tools.curves import plot_histograms, plot_training_curves

    written = ["Training curves", "Histograms"]
    plot_training_curves(run_dir, run_dir / FIGURE_FILES["Training curves"])
    plot_histograms(run_dir, run_dir / FIGURE_FILES["Histograms"], test_table)
    if test_table and images_dir:
        predictions = read_stage_predictions(run_dir)
        scene_table = json.loads(Path(scenes).read_text()) if scenes else None
        write_captions_page(predictions, test_table, images_dir, run_dir / FIGURE_FILES["Sample captions (page)"],
                            scenes=scene_table)
        write_captions_grid(predictions, test_table, images_dir, run_dir / FIGURE_FILES["Sample captions"])
        written += ["Sample captions (page)", "Sample captions"]
    return {title: FIGURE_FILES[title] for title in written}


def existing_figures(run_dir: Path) -> dict[str, str]:
    """{title: file name} of the report's figures present in `run_dir`."""
    return {title: name for title, name in FIGURE_FILES.items() if (run_dir / name).is_file()}


def write_report(run_dir: Path, results: dict, figures: dict[str, str] | None = None,
                 clip_lines: list[str] | None = None) -> Path:
    """Write `report.md` and `report.json` into `run_dir`; returns the Markdown path.

    Args:
        run_dir: the run folder (one sub-folder per stage).
        results: what `train.py` returns: per-stage run information and `eval` test metrics per stage.
        figures: {title: file name in run_dir} of pictures and pages to link (curves, captions).
        clip_lines: what the run's CLIP sees, as lines (the shapes world's retrieval, modality gap and swap test).
    """
    test_metrics = results.get("eval", {})
    training = {stage: info for stage, info in results.items() if stage != "eval"}
    lines = ["# Run report", "", f"Run folder: `{run_dir}`", "", "## Test split", "", metrics_table(test_metrics), ""]
    if clip_lines:
        lines += ["## What the CLIP sees (validation split)", "", *[f"- {line}" for line in clip_lines], ""]
    if training:
        lines += ["## Training", "", "| stage | steps | minutes | processes | best checkpoint |", "|---|---|---|---|---|"]
        for stage, info in training.items():
            lines.append(f"| {stage} | {info['global_step']} | {info['train_minutes']} | {info['num_processes']} "
                         f"| {info.get('best_checkpoint') or '–'} |")
        lines.append("")
    trajectories = {stage: validation_trajectory(run_dir / stage) for stage in training}
    for stage, trajectory in trajectories.items():
        if trajectory:
            lines += [f"## Validation trajectory: {stage}", "",
                      metrics_table(trajectory, TRAJECTORY_METRICS, label="step"), ""]
            if 0 in trajectory:
                lines += [starting_point_note(stage, training[stage]), ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- [{title}]({name})" + ("" if name.endswith(".html") else f"\n\n  ![{title}]({name})")
                  for title, name in figures.items()]
        lines.append("")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps({**results, "validation_trajectories": trajectories}, indent=1))
    markdown = run_dir / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown


if __name__ == "__main__":
    run = Path(sys.argv[1])
    saved = json.loads((run / "report.json").read_text())
    saved.pop("validation_trajectories", None)
    print(write_report(run, saved, existing_figures(run)).read_text())
