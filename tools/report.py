"""The run report: test metrics per stage as a Markdown table (`report.md`) and JSON (`report.json`).

    python tools/report.py runs/shapes      # rebuild the report of a finished run
"""

import json
import sys
from pathlib import Path

HEADLINE_METRICS = (
    "cider", "bleu_4", "meteor", "rouge_l", "spice", "attribute_precision", "attribute_recall",
    "caption_length", "distinct_caption_share", "repeated_word_share",
)


def metrics_table(test_metrics: dict[str, dict]) -> str:
    """One row per stage, one column per headline metric the run produced."""
    columns = [name for name in HEADLINE_METRICS if any(name in m for m in test_metrics.values())]
    lines = ["| stage | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for stage, metrics in test_metrics.items():
        cells = [f"{metrics[name]:.3f}" if isinstance(metrics.get(name), (int, float)) else "–" for name in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, results: dict) -> Path:
    """Write `report.md` and `report.json` into `run_dir`; returns the Markdown path."""
    test_metrics = results.get("eval", {})
    training = {stage: info for stage, info in results.items() if stage != "eval"}
    lines = ["# Run report", "", f"Run folder: `{run_dir}`", "", "## Test split", "", metrics_table(test_metrics), ""]
    if training:
        lines += ["## Training", "", "| stage | steps | minutes | processes | best checkpoint |", "|---|---|---|---|---|"]
        for stage, info in training.items():
            lines.append(f"| {stage} | {info['global_step']} | {info['train_minutes']} | {info['num_processes']} "
                         f"| {info.get('best_checkpoint') or '–'} |")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(results, indent=1))
    markdown = run_dir / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown


if __name__ == "__main__":
    run = Path(sys.argv[1])
    print(write_report(run, json.loads((run / "report.json").read_text())).read_text())
