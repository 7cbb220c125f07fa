"""Quality on the shapes world beside the default run: what each part of the method is worth.

    python train.py                                   # first: the default run in runs/shapes
    python benchmarks/shapes_quality.py               # then the variants below, about 30 minutes on 2 CPU cores
    python benchmarks/shapes_quality.py --only semantic_only

Variants, each trained with the shapes recipe and evaluated on the test split:
- `init_noise_<s>`: text-only init with noise_std s (the recipe's value is one of them: the best init is the best of
  these);
- `semantic_only`: the recipe's scst stage from the same init with the naturalness reward off (reward_weight 1): what
  the discriminator prevents; `scst_lr5e-5` and `semantic_only_lr5e-5`: the same pair at a five times higher
  learning rate;
- `cross_domain`: init and scst with the cross-domain corpus (other phrasings and synonyms) instead of the in-domain
  one.
Writes `quality.md` and `quality.json` into the run folder, beside the default run's own test rows.
"""

import argparse
import json
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import train  # noqa: E402
from tools.report import metrics_table  # noqa: E402

RECIPE = str(PROJECT_ROOT / "configs" / "shapes.yaml")
NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2)
TABLES = "data/shapes/tables"


def run_stage(stage: str, output_dir: Path, *flags: str) -> dict:
    """One stage of the recipe into `output_dir/<stage>`, then its test metrics."""
    train.main(["--config", RECIPE, "--stage", stage, "--output_dir", str(output_dir), *flags])
    final = output_dir / stage / "final"
    return train.main(["--config", RECIPE, "--stage", "eval", "--model_name_or_path", str(final),
                       "--output_dir", str(output_dir)])["eval"][str(final)]


def noise_variants(base: Path) -> dict:
    return {f"init_noise_{level}": run_stage("init", base / f"noise_{level}", "--noise_std", str(level))
            for level in NOISE_LEVELS}


def semantic_only(base: Path, run_dir: Path) -> dict:
    """The scst stage without the naturalness reward, at the recipe's learning rate and, with the recipe's own
    setting beside it, at a five times higher one, where an unchecked CLIP reward is exploited sooner."""
    init = ("--model_name_or_path", str(run_dir / "init" / "final"))
    fast = ("--learning_rate", "5e-5")
    return {
        "semantic_only": run_stage("scst", base / "semantic_only", "--reward_weight", "1.0", *init),
        "scst_lr5e-5": run_stage("scst", base / "scst_lr5e-5", *fast, *init),
        "semantic_only_lr5e-5": run_stage("scst", base / "semantic_only_lr5e-5", "--reward_weight", "1.0", *fast,
                                          *init),
    }


def cross_domain(base: Path) -> dict:
    output_dir = base / "cross_domain"
    corpus = ("--pseudo_pairs_table", f"{TABLES}/shapes/train_pseudo_pairs_cross_domain")
    init = run_stage("init", output_dir, "--corpus_table", f"{TABLES}/corpus/cross_domain_init", *corpus)
    scst = run_stage("scst", output_dir, "--corpus_table", f"{TABLES}/corpus/cross_domain_real",
                     "--train_table", f"{TABLES}/shapes/train_agg_cross_domain")
    return {"cross_domain_init": init, "cross_domain_scst": scst}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/shapes"), help="the finished default run")
    parser.add_argument("--only", choices=("noise", "semantic_only", "cross_domain"), help="one group of variants")
    args = parser.parse_args(argv)
    report = args.run / "report.json"
    if not report.is_file():
        raise SystemExit(f"{report} is missing: run `python train.py` first (the variants start from its init model)")
    rows = dict(json.loads(report.read_text())["eval"])
    base = args.run / "variants"
    groups = {"noise": lambda: noise_variants(base), "semantic_only": lambda: semantic_only(base, args.run),
              "cross_domain": lambda: cross_domain(base)}
    for name, variants in groups.items():
        if args.only in (None, name):
            rows.update(variants())
            (args.run / "quality.json").write_text(json.dumps(rows, indent=1))  # kept after every group
    table = metrics_table(rows, label="run")
    (args.run / "quality.md").write_text(f"# Shapes world: test split per variant\n\n{table}\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
