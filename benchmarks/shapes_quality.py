"""What each part of the method is worth on the shapes world, over seeds, with a control that does nothing.

    python benchmarks/shapes_quality.py --seeds 3                       # every row below, 3 seeds
    python benchmarks/shapes_quality.py --seeds 3 --rows scst noop      # some rows (init and its sweep always run)
    python benchmarks/shapes_quality.py --seed 1 --noise_levels 0.1     # one seed, noise already chosen on validation
    python benchmarks/shapes_quality.py --seeds 1 --max_steps 100       # extra flags go to every training stage

Each seed redraws the captioner's initial weights, the discriminator's and the sampling; the world (data/shapes,
built by `python train.py` or `prepare_datasets.py shapes`) stays fixed. Every choice is made on the validation split:
the init's noise level (the best of a sweep by the recipe's selection metric on validation), every stage's checkpoint
(its own best on validation, the starting model included for scst). The test split is read once per reported row.

Rows, each from the recipe `configs/shapes.yaml` with one change, scst variants all from the seed's best init:
- `init`: text-only init at the noise level chosen on validation (the sweep's other levels are not reported);
- `scst`: the recipe's scst stage;
- `noop`: the same stage at learning rate 0, the control: a stage that does nothing must show no gain;
- `semantic_only` / `mixed_rewards` / `discriminator_only`: reward_weight 1 / 0.5 / 0 (the recipe's is chosen among them
  on validation);
- `greedy_baseline`: the self-critical greedy baseline instead of the mean of the other samples;
- `clip_agg`: the semantic reward on CLIP-agg (the image's aggregated corpus embedding) instead of CLIP-cos;
- `supervised`: the same model trained on every reference of every training image, the upper bound;
- `cross_domain_init`, `cross_domain_scst`: init and scst with the cross-domain corpus (other phrasings, synonyms).

Each seed's test metrics and choices go to `seed_<n>/results.json` after every row (a rerun skips the rows already
measured), and `quality.json` / `quality.md` (mean ± sd over the seeds per row) into `--output_dir`. Seeds can run
side by side, one per core: `--seed 0 &` and `--seed 1 &`, then `--summary_only`.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import train  # noqa: E402

RECIPE = str(PROJECT_ROOT / "configs" / "shapes.yaml")
NOISE_LEVELS = (0.05, 0.1, 0.2, 0.3)
TABLES = "data/shapes/tables"
SCST_VARIANTS = {
    "scst": (),
    "noop": ("--learning_rate", "0"),
    "semantic_only": ("--reward_weight", "1.0"),
    "mixed_rewards": ("--reward_weight", "0.5"),
    "discriminator_only": ("--reward_weight", "0.0"),
    "greedy_baseline": ("--baseline", "greedy"),
    "clip_agg": ("--clip_cos_weight", "0", "--agg_cos_weight", "1"),
}
CROSS_DOMAIN = {
    "init": ("--corpus_table", f"{TABLES}/corpus/cross_domain_init",
             "--pseudo_pairs_table", f"{TABLES}/shapes/train_pseudo_pairs_cross_domain"),
    "scst": ("--corpus_table", f"{TABLES}/corpus/cross_domain_real",
             "--train_table", f"{TABLES}/shapes/train_agg_cross_domain"),
}
ROWS = ("init", *SCST_VARIANTS, "supervised", "cross_domain_init", "cross_domain_scst")
COLUMNS = ("cider", "bleu_4", "attribute_precision", "attribute_recall", "attribute_f1", "clip_s", "caption_length",
           "distinct_scene_caption_share")
FAMILIES = ("colour", "shape", "size", "texture", "position", "relation", "background")


def train_stage(stage: str, output_dir: Path, seed: int, *flags: str) -> Path:
    """One stage of the recipe into `output_dir/<stage>`; returns its final model folder."""
    train.main(["--config", RECIPE, "--stage", stage, "--output_dir", str(output_dir), "--seed", str(seed), *flags])
    return output_dir / stage / "final"


def best_validation(output_dir: Path, stage: str) -> float:
    """The stage's best value of the recipe's selection metric on validation (its trainer state)."""
    state = json.loads((output_dir / stage / "trainer_state.json").read_text())
    if state.get("best_metric") is None:
        raise SystemExit(f"{output_dir / stage} recorded no validation metric: the recipe must evaluate on val")
    return state["best_metric"]


def test_metrics(final: Path, output_dir: Path) -> dict:
    """The one read of the test split for a reported row."""
    results = train.main(["--config", RECIPE, "--stage", "eval", "--model_name_or_path", str(final),
                          "--output_dir", str(output_dir)])
    return results["eval"][str(final)]


def best_init(seed_dir: Path, seed: int, noise_levels: list[float],
              extra: list[str]) -> tuple[Path, float, dict[float, float]]:
    """The noise sweep of text-only init: the model and level with the best validation metric, and every level's."""
    validation = {}
    for level in noise_levels:
        output_dir = seed_dir / f"init_noise_{level}"
        if not (output_dir / "init" / "final").is_dir():
            train_stage("init", output_dir, seed, "--noise_std", str(level), *extra)
        validation[level] = best_validation(output_dir, "init")
    level = max(validation, key=validation.get)
    return seed_dir / f"init_noise_{level}" / "init" / "final", level, validation


def run_row(row: str, seed_dir: Path, seed: int, init_model: Path, noise: float, extra: list[str]) -> dict:
    """Train what the row needs (from the seed's chosen init) and read its test metrics once."""
    output_dir = seed_dir / row
    if row == "init":
        return test_metrics(init_model, output_dir)
    if row in SCST_VARIANTS:
        final = train_stage("scst", output_dir, seed, "--model_name_or_path", str(init_model), *SCST_VARIANTS[row],
                            *extra)
    elif row == "supervised":
        final = train_stage("supervised", output_dir, seed, *extra)
    elif row == "cross_domain_init":
        final = train_stage("init", seed_dir / "cross_domain", seed, "--noise_std", str(noise),
                            *CROSS_DOMAIN["init"], *extra)
    else:
        init = seed_dir / "cross_domain" / "init" / "final"
        if not init.is_dir():
            train_stage("init", seed_dir / "cross_domain", seed, "--noise_std", str(noise), *CROSS_DOMAIN["init"],
                        *extra)
        final = train_stage("scst", seed_dir / "cross_domain", seed, "--model_name_or_path", str(init),
                            *CROSS_DOMAIN["scst"], *extra)
    return test_metrics(final, output_dir)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary_table(per_seed: dict[str, dict[int, dict]], columns: tuple[str, ...]) -> str:
    """Mean ± sd over the seeds, one row per variant."""
    present = [c for c in columns if any(c in m for seeds in per_seed.values() for m in seeds.values())]
    lines = ["| row | seeds | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
    for row, seeds in per_seed.items():
        cells = [mean_sd([m[c] for m in seeds.values() if c in m]) if any(c in m for m in seeds.values()) else "–"
                 for c in present]
        lines.append(f"| {row} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(output_dir: Path, seeds: list[int]) -> str:
    """`quality.md` and `quality.json` from the seeds' results found in `output_dir`."""
    per_seed, choices = {}, {}
    for seed in seeds:
        results_file = output_dir / f"seed_{seed}" / "results.json"
        if results_file.is_file():
            saved = json.loads(results_file.read_text())
            choices[seed] = saved["choices"]
            for row, metrics in saved["test"].items():
                per_seed.setdefault(row, {})[seed] = metrics
    # The protocol's rows first; rows kept from earlier settings of a seed (named after them) after.
    per_seed = {row: per_seed[row] for row in sorted(per_seed, key=lambda row: (row not in ROWS, ROWS.index(row)
                                                                                 if row in ROWS else 0, row))}
    (output_dir / "quality.json").write_text(json.dumps({"test": per_seed, "choices": choices}, indent=1))
    families = tuple(f"{family}_{kind}" for family in FAMILIES for kind in ("precision", "recall"))
    markdown = "\n".join([
        "# Shapes world: test split, mean ± sd over seeds", "",
        "Every setting and checkpoint was chosen on validation; test was read once per row and seed.", "",
        summary_table(per_seed, COLUMNS), "", "## Attribute precision and recall per family", "",
        summary_table(per_seed, families), "", "## Choices made on validation", "",
        "```json", json.dumps(choices, indent=1), "```", ""])
    (output_dir / "quality.md").write_text(markdown)
    return markdown


def run_seed(seed: int, rows: list[str], output_dir: Path, noise_levels: list[float], extra: list[str]):
    """Every row of one seed; its results are written after each row, so an interrupted run keeps them."""
    seed_dir = output_dir / f"seed_{seed}"
    results_file = seed_dir / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {"test": {}}
    init_model, noise, validation = best_init(seed_dir, seed, noise_levels, extra)
    saved["choices"] = {"noise_std": noise, "init_validation_by_noise": validation}
    for row in rows:
        if row not in saved["test"]:
            saved["test"][row] = run_row(row, seed_dir, seed, init_model, noise, extra)
            results_file.write_text(json.dumps(saved, indent=1))
    results_file.write_text(json.dumps(saved, indent=1))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--seed", type=int, help="run this one seed only (several can run side by side); the "
                                                 "summary covers every seed of --seeds found in --output_dir")
    parser.add_argument("--summary_only", action="store_true", help="only gather the seeds' results")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to report")
    parser.add_argument("--noise_levels", nargs="+", type=float, default=list(NOISE_LEVELS),
                        help="init noise levels swept per seed (one level: a choice already made on validation)")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/shapes_quality"))
    args, extra = parser.parse_known_args(argv)
    if not (Path(TABLES) / "manifest.json").is_file():
        raise SystemExit(f"{TABLES} is missing: build the world first (`python prepare_datasets.py shapes`)")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for seed in [args.seed] if args.seed is not None else range(args.seeds):
            run_seed(seed, args.rows, args.output_dir, args.noise_levels, extra)
    markdown = write_summary(args.output_dir, sorted({*range(args.seeds), *([args.seed] if args.seed is not None
                                                                              else [])}))
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
