"""What each part of the method is worth on the shapes world, over seeds, with controls that must gain nothing.

    python benchmarks/shapes_quality.py --seeds 3                                   # plain CLIP, in-domain corpus
    python benchmarks/shapes_quality.py --seeds 3 --corpus cross_domain --scst_steps 1000   # where hacking shows
    python benchmarks/shapes_quality.py --world_dir data/shapes_sighted --seed 1 --rows init clip_only mix
    python benchmarks/shapes_quality.py --seeds 3 --summary_only

A setting is a world (its CLIP: `plain` or `sighted`, read from the world's own summary) and a corpus (`in_domain`:
the references' phrasing; `cross_domain`: other templates and synonyms). Each seed redraws the captioner's and the
discriminator's initial weights and the sampling; the world stays fixed. Every choice is made on the validation split
and recorded by the code in `choices` (the init's noise level, each mix's semantic share); the test split is read once
per reported row.

Rows, each the recipe `configs/shapes.yaml` with one change, every scst row from the seed's chosen init:
- `init`: text-only init at the noise level best on validation (`--noise_levels`);
- `noop`: scst at learning rate 0, the control of a stage that does nothing;
- `clip_only` / `discriminator_only`: the semantic reward alone (share 1) / the discriminator's alone (share 0);
- `mix`: the project's mix at the semantic share best on validation among `--mix_shares` (all below 1), each
  candidate also reported as `mix_<share>`;
- `mix_slow_critic`: the mix at share 0.5 with a discriminator learning ten times slower than the recipe's;
- `cgtgan`: CgT-GAN's defaults (see `CGTGAN`): raw-scale mix, greedy baseline, CLIP-agg, naturalness-only steps then
  a linear ramp to share 0.5;
- `shuffled`: the chosen mix with each caption's semantic reward computed against another image, the control of a
  reward that does not know the image;
- `mix_replay_critic` / `shuffled_replay_critic`: the mix with a discriminator that takes five updates a step on fresh
  sentences and replayed captions (see `SHARE_CHOSEN`), its share chosen on validation like `mix`'s and each
  candidate reported as `mix_replay_critic_<share>` / the same at the chosen share with the shuffled semantic reward;
- `discriminator_only_replay_critic`: that discriminator's reward alone (share 0);
- `supervised`: the same model trained on every reference of every training image, the upper bound.

Results are keyed by a hash of a row's full settings (world, corpus, flags, the recipe file, the init it starts
from): a row measured under other settings is never reported again, and its folder is not reused; a row stopped
part-way resumes from its folder's newest complete checkpoint when the benchmark is run again. Written to
`--output_dir/<world>_<corpus>/`: `seed_<n>/results.json` after every row, `quality.json` and `quality.md` (mean ± sd
per row, paired per-seed differences, validation trajectories) and `trajectories.png`.
"""

import argparse
import fcntl
import hashlib
import json
import statistics
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import train  # noqa: E402

RECIPE = PROJECT_ROOT / "configs" / "shapes.yaml"
NOISE_LEVELS = (0.05, 0.1, 0.2)
MIX_SHARES = (0.5, 0.8)
# CgT-GAN's defaults (its cgtgan.py): share 0.5, naturalness alone for 150 steps then a linear ramp over 2350 steps of
# 128 images, raw-scale mix of the two policy-gradient losses, greedy baseline, semantic reward CLIP-agg only (0.5
# cosine + 0.5 L1). Deviations: the steps are a tenth of CgT-GAN's (a shapes run is a few hundred steps of 32 images,
# not 44k steps of 128); its L1 takes raw CLIP features where ours takes unit vectors; its discriminator's dropout
# and its per-sequence mean log-probability are not reproduced (see `trainers/scst_trainer.py`).
CGTGAN = ("--advantage_scaling", "none", "--baseline", "greedy", "--semantic_share", "0.5", "--semantic_ramp", "linear",
          "--naturalness_only_steps", "15", "--semantic_ramp_steps", "235", "--clip_cos_weight", "0",
          "--agg_cos_weight", "0.5", "--agg_l1_weight", "0.5")
# The discriminator's updates a step and the replay buffer of the `*_replay_critic` rows.
REPLAY_CRITIC = ("--discriminator_steps", "5", "--discriminator_replay", "4000")
SCST_ROWS = {
    "noop": ("--learning_rate", "0"),
    "clip_only": ("--semantic_share", "1.0"),
    "discriminator_only": ("--semantic_share", "0.0"),
    "cgtgan": CGTGAN,
    # The mix with a critic ten times slower than the recipe's: at the recipe's rate the discriminator swings between
    # calling every caption real and none, so its reward chases a moving target.
    "mix_slow_critic": ("--semantic_share", "0.5", "--discriminator_learning_rate", "1e-4"),
    # The replay critic's reward alone (see `SHARE_CHOSEN`): what the discriminator's half is worth without CLIP's.
    "discriminator_only_replay_critic": ("--semantic_share", "0.0", *REPLAY_CRITIC),
}
# Rows whose semantic share is chosen on validation among `--mix_shares`, and the flags they add to the recipe.
SHARE_CHOSEN = {
    "mix": (),
    # The mix with a critic that keeps up and remembers: five updates a step, the further four on fresh corpus
    # sentences against captions drawn from this step's samples and the last 4000 generated (25 steps' worth).
    "mix_replay_critic": REPLAY_CRITIC,
}
# The controls of a reward that does not know the image: a chosen mix (and its share) with each caption's semantic
# reward computed against another image of its micro-batch; what such a row gains over the init does not come from
# the image.
SHUFFLED = {"shuffled": "mix", "shuffled_replay_critic": "mix_replay_critic"}
ROWS = ("init", "noop", "clip_only", "discriminator_only", "mix", "mix_slow_critic", "mix_replay_critic", "cgtgan",
        "shuffled", "shuffled_replay_critic", "discriminator_only_replay_critic", "supervised")
COLUMNS = ("fluent_attribute_f1", "fluent_attribute_precision", "fluent_attribute_recall", "parse_rate",
           "repeated_word_share", "distinct_2", "caption_length", "attribute_f1", "cider", "bleu_4", "clip_s",
           "discriminator_accuracy_real", "discriminator_accuracy_fake")
PAIRS = (("mix", "clip_only"), ("mix", "init"), ("clip_only", "init"), ("discriminator_only", "init"),
         ("discriminator_only@last", "init"), ("cgtgan", "init"), ("cgtgan", "clip_only"), ("cgtgan@last", "init"),
         ("cgtgan@last", "clip_only@last"), ("mix_replay_critic", "cgtgan"), ("mix_replay_critic", "supervised"),
         ("shuffled", "init"), ("noop", "init"), ("noop@last", "init"), ("mix@last", "clip_only@last"),
         ("mix@last", "init"), ("clip_only@last", "init"),
         ("mix_slow_critic", "init"), ("mix_slow_critic", "clip_only"), ("mix_slow_critic@last", "init"),
         ("mix_slow_critic@last", "clip_only@last"), ("mix_replay_critic", "init"), ("mix_replay_critic", "clip_only"),
         ("mix_replay_critic@last", "init"), ("mix_replay_critic@last", "clip_only@last"),
         ("shuffled_replay_critic", "init"), ("shuffled_replay_critic@last", "init"),
         ("mix_replay_critic", "shuffled_replay_critic"), ("discriminator_only_replay_critic", "init"),
         ("discriminator_only_replay_critic@last", "init"), ("mix_replay_critic", "discriminator_only_replay_critic"))
PAIRED_COLUMNS = ("fluent_attribute_f1", "parse_rate", "repeated_word_share", "caption_length", "cider")
TRAJECTORY = ("fluent_attribute_f1", "parse_rate", "caption_length", "repeated_word_share")


class Setting:
    """A world and a corpus: the flags every stage needs to read them, and where their results go."""

    def __init__(self, world_dir: Path, corpus: str, output_dir: Path, extra: list[str], scst_steps: int | None):
        world = json.loads((world_dir / "raw" / "world.json").read_text())
        self.clip = world["clip"].get("recipe", "sighted")
        self.world_dir, self.corpus, self.extra, self.scst_steps = world_dir, corpus, extra, scst_steps
        self.identity = {"world": str(world_dir), "clip": self.clip, "world_seed": world["seed"],
                         "world_version": world["version"], "corpus": corpus}
        self.output_dir = output_dir / f"{self.clip}_{corpus}"

    def flags(self, stage: str) -> list[str]:
        tables, raw = self.world_dir / "tables", self.world_dir / "raw"
        flags = ["--shapes_dir", str(self.world_dir), "--shapes_clip", self.clip]
        if stage == "eval":  # each stage takes the tables it reads
            return flags + ["--test_table", f"{tables}/shapes/test", "--test_scenes", f"{raw}/scenes/test.json",
                            "--images_dir", f"{raw}/images"]
        flags += ["--val_table", f"{tables}/shapes/val", "--val_scenes", f"{raw}/scenes/val.json"]
        if stage in ("init", "supervised"):  # the later stages read the tokenizer saved with their model
            flags += ["--tokenizer_name_or_path", f"{raw}/tokenizer"]
        if stage == "init":
            flags += ["--corpus_table", f"{tables}/corpus/{self.corpus}_init", "--train_table",
                      f"{tables}/shapes/train", "--pseudo_pairs_table",
                      f"{tables}/shapes/train_pseudo_pairs_{self.corpus}"]
        elif stage == "scst":
            flags += ["--corpus_table", f"{tables}/corpus/{self.corpus}_real", "--train_table",
                      f"{tables}/shapes/train_agg_{self.corpus}"]
            if self.scst_steps:  # a longer run evaluates as often in all (ten times), and keeps its checkpoints
                every = str(max(25, self.scst_steps // 10))
                flags += ["--max_steps", str(self.scst_steps), "--eval_steps", every, "--save_steps", every]
        elif stage == "supervised":
            flags += ["--train_table", f"{tables}/shapes/train"]
        return flags + list(self.extra)

    def key(self, row: str, stage: str, flags: tuple[str, ...], start: str | None = None) -> str:
        """A hash of the stage's full settings as `train.py` would run them (the recipe, the world's flags and the
        row's, the model it starts from): a change to any of them, in the recipe file or here, is another key."""
        script, config = train.parse_stage(stage, train.read_recipe(str(RECIPE)), [
            *self.flags(stage), *flags, *(["--model_name_or_path", start] if start else [])])
        settings = {**vars(script), **config.to_dict()}
        settings = {name: value for name, value in settings.items()
                    if not name.endswith(("output_dir", "logging_dir")) and not name.startswith("hub_")}
        return hashlib.sha256(json.dumps({**self.identity, "row": row, "settings": settings}, sort_keys=True,
                                         default=str).encode()).hexdigest()[:12]


class SeedRun:
    """One seed of a setting: trains what a row needs (unless a run with the same key finished), reads test once."""

    def __init__(self, setting: Setting, seed: int):
        self.setting, self.seed = setting, seed
        self.dir = setting.output_dir / f"seed_{seed}"
        self.results_file = self.dir / "results.json"
        self.results = json.loads(self.results_file.read_text()) if self.results_file.is_file() \
            else {"rows": {}, "choices": {}}

    def save(self):
        """Write the results, merged with what other runs of this seed (other rows, side by side) wrote meanwhile."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.results_file.is_file():
                written = json.loads(self.results_file.read_text())
                for part in ("rows", "report", "choices"):
                    self.results[part] = {**written.get(part, {}), **self.results.get(part, {})}
            self.results_file.write_text(json.dumps(self.results, indent=1))

    def train(self, row: str, stage: str, flags: tuple[str, ...], start: str | None = None) -> dict:
        """The row's entry (trained now or earlier under the same key): its final model, best validation metric
        and validation trajectory."""
        key = self.setting.key(row, stage, flags, start)
        entry = self.results["rows"].get(key)
        if entry is not None:
            return entry
        output_dir = self.dir / f"{row}-{key}"
        # A row stopped part-way (a crash, a killed process) goes on from its newest complete checkpoint: the folder
        # is named by the key, so what it holds was trained under these very settings, and a resumed run ends with
        # the weights of an uninterrupted one.
        train.main(["--config", str(RECIPE), "--stage", stage, "--output_dir", str(output_dir), "--seed",
                    str(self.seed), *self.setting.flags(stage), *(["--model_name_or_path", start] if start else []),
                    *flags, "--resume_from_checkpoint", "latest"])
        state = json.loads((output_dir / stage / "trainer_state.json").read_text())
        if state.get("best_metric") is None:
            raise SystemExit(f"{output_dir / stage} recorded no validation metric: the recipe must evaluate on val")
        entry = {"row": row, "key": key, "stage": stage, "flags": list(flags), "start": start,
                 "final": str(output_dir / stage / "final"),
                 "validation_best": state["best_metric"], "best_checkpoint": state.get("best_model_checkpoint"),
                 "trajectory": {str(e["step"]): {name[5:]: e[name] for name in e if name[5:] in TRAJECTORY}
                                for e in state["log_history"] if "eval_cider" in e}}
        self.results["rows"][key] = entry
        self.save()
        return entry

    def test(self, name: str, entry: dict) -> dict:
        """The row's one read of the test split, kept under the row's key. An scst row trained for `--scst_steps`
        also reads its last step, reported as `<row>@last`: what training that long gives without selection."""
        if "test" not in entry:
            results = train.main(["--config", str(RECIPE), "--stage", "eval", "--model_name_or_path", entry["final"],
                                  "--output_dir", str(Path(entry["final"]).parent.parent),
                                  *self.setting.flags("eval")])
            entry["test"] = results["eval"][entry["final"]]
            self.save()
        self.results.setdefault("report", {})[name] = entry["key"]
        if self.setting.scst_steps and entry["stage"] == "scst" and "@" not in name:
            last_key = f"{entry['key']}@last"
            last = self.results["rows"].setdefault(last_key, {
                **{k: v for k, v in entry.items() if k not in ("test", "trajectory")}, "key": last_key,
                "final": str(Path(entry["final"]).parent / f"checkpoint-{self.setting.scst_steps}")})
            self.test(f"{name}@last", last)
        return entry

    def choose(self, candidates: dict[float, dict], choice: str, scores: str) -> float:
        """The candidate best on validation, recorded as `choice`, with every candidate's validation score as
        `scores`."""
        best = max(candidates, key=lambda value: candidates[value]["validation_best"])
        self.results["choices"][choice] = best
        self.results["choices"][scores] = {str(value): entry["validation_best"] for value, entry in candidates.items()}
        return best

    def best_init(self, noise_levels: list[float]) -> dict:
        candidates = {level: self.train(f"init_noise_{level}", "init", ("--noise_std", str(level)))
                      for level in noise_levels}
        return candidates[self.choose(candidates, "noise_std", "init_validation_by_noise")]

    def best_share(self, row: str, flags: tuple[str, ...], start: str, shares: list[float]) -> dict:
        """The row's recipe at the semantic share best on validation among `shares`, each candidate also reported as
        `<row>_<share>`; the choice is recorded as `<row>_semantic_share`."""
        candidates = {share: self.train(f"{row}_{share}", "scst", (*flags, "--semantic_share", str(share)), start)
                      for share in shares}
        share = self.choose(candidates, f"{row}_semantic_share", f"{row}_validation_by_share")
        for candidate, entry in candidates.items():
            self.test(f"{row}_{candidate}", entry)
        return candidates[share]

    def run(self, rows: list[str], noise_levels: list[float], shares: list[float]):
        init = self.best_init(noise_levels)
        self.test("init", init)
        for row in rows:
            if row in SHARE_CHOSEN:
                self.test(row, self.best_share(row, SHARE_CHOSEN[row], init["final"], shares))
            elif row in SHUFFLED:  # the chosen mix, its semantic reward computed against another image
                mix = SHUFFLED[row]
                self.best_share(mix, SHARE_CHOSEN[mix], init["final"], shares)
                share = str(self.results["choices"][f"{mix}_semantic_share"])
                self.test(row, self.train(row, "scst", (*SHARE_CHOSEN[mix], "--shuffle_semantic_reward", "true",
                                                        "--semantic_share", share), init["final"]))
            elif row == "supervised":
                self.test(row, self.train(row, "supervised", ()))
            elif row in SCST_ROWS:
                self.test(row, self.train(row, "scst", SCST_ROWS[row], init["final"]))
            self.save()


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def reported(setting: Setting, seeds: list[int]) -> tuple[dict[str, dict[int, dict]], dict]:
    """{row: {seed: entry}} of the rows each seed reports under the current settings, and each seed's choices."""
    rows, choices = {}, {}
    for seed in seeds:
        run = SeedRun(setting, seed)
        choices[seed] = run.results["choices"]
        for name, key in run.results.get("report", {}).items():
            entry = run.results["rows"].get(key)
            # A row measured under other settings (recipe, world, flags) has another key: it is not reported.
            if entry and "test" in entry and key.split("@")[0] == setting.key(
                    entry["row"], entry["stage"], tuple(entry["flags"]), entry["start"]):
                rows.setdefault(name, {})[seed] = entry
    order = [*ROWS, *sorted(name for name in rows if name not in ROWS)]
    return {name: rows[name] for name in order if name in rows}, choices


def summary_table(rows: dict[str, dict[int, dict]], columns: tuple[str, ...]) -> str:
    present = [c for c in columns if any(c in e["test"] for seeds in rows.values() for e in seeds.values())]
    lines = ["| row | seeds | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
    for name, seeds in rows.items():
        cells = [mean_sd([e["test"][c] for e in seeds.values() if c in e["test"]])
                 if any(c in e["test"] for e in seeds.values()) else "–" for c in present]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def share_candidates(rows: dict[str, dict[int, dict]]) -> list[str]:
    """The `<row>_<share>` candidates among `rows` of the rows whose share is chosen (`SHARE_CHOSEN`), whichever
    `--mix_shares` they were run at: first the selected ones, then their last steps."""
    def is_candidate(name: str) -> bool:
        row, _, share = name.split("@")[0].rpartition("_")
        return row in SHARE_CHOSEN and share.replace(".", "", 1).isdigit()
    candidates = [name for name in rows if is_candidate(name)]
    return [name for name in candidates if "@" not in name] + [name for name in candidates if "@" in name]


def paired_table(rows: dict[str, dict[int, dict]]) -> str:
    """Per-seed differences between two rows (same seed, same init), mean ± sd over the seeds: `PAIRS`, then each
    share candidate against the init."""
    lines = ["| difference | seeds | " + " | ".join(PAIRED_COLUMNS) + " |", "|---|---|" + "---|" * len(PAIRED_COLUMNS)]
    for first, second in [*PAIRS, *((candidate, "init") for candidate in share_candidates(rows))]:
        seeds = sorted(set(rows.get(first, {})) & set(rows.get(second, {})))
        if not seeds:
            continue
        cells = [mean_sd([rows[first][s]["test"][c] - rows[second][s]["test"][c] for s in seeds])
                 for c in PAIRED_COLUMNS]
        lines.append(f"| {first} − {second} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_trajectories(rows: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict[str, float]]]:
    """{row: {step: {metric: mean over seeds}}} of the scst rows' validation evaluations."""
    trajectories = {}
    for name, seeds in rows.items():
        steps = sorted({int(step) for e in seeds.values() for step in e.get("trajectory", {})})
        if name in ("init", "supervised") or len(steps) < 2:
            continue
        trajectories[name] = {step: {m: statistics.mean(e["trajectory"][str(step)][m] for e in seeds.values()
                                                        if m in e["trajectory"].get(str(step), {}))
                                     for m in TRAJECTORY} for step in steps
                              if all(str(step) in e["trajectory"] for e in seeds.values())}
    return trajectories


def plot_trajectories(trajectories: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TRAJECTORY), figsize=(4.2 * len(TRAJECTORY), 3.4))
    for axis, metric in zip(axes, TRAJECTORY):
        for name, steps in trajectories.items():
            axis.plot(list(steps), [values[metric] for values in steps.values()], label=name, marker=".")
        axis.set_title(f"validation {metric}")
        axis.set_xlabel("scst step")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_summary(setting: Setting, seeds: list[int]) -> str:
    rows, choices = reported(setting, seeds)
    trajectories = mean_trajectories(rows)
    out = setting.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(
        {"setting": setting.identity, "scst_steps": setting.scst_steps, "choices": choices,
         "test": {name: {str(s): e["test"] for s, e in seeds_.items()} for name, seeds_ in rows.items()},
         "trajectories": trajectories}, indent=1))
    if trajectories:
        plot_trajectories(trajectories, out / "trajectories.png")
    scst_steps = setting.scst_steps or "the recipe's"
    lines = [f"# Shapes world, {setting.clip} CLIP, {setting.corpus} corpus: test split, mean ± sd over seeds", "",
             "Every setting and checkpoint was chosen on validation; test was read once per row and seed. "
             f"Scst rows trained {scst_steps} steps.", "",
             summary_table(rows, COLUMNS), "", "## Paired differences (same seed, same init)", "",
             paired_table(rows), ""]
    for name, steps in trajectories.items():
        lines += [f"## Validation trajectory: {name} (mean over seeds)", "",
                  "| step | " + " | ".join(TRAJECTORY) + " |", "|---|" + "---|" * len(TRAJECTORY),
                  *[f"| {step} | " + " | ".join(f"{values[m]:.3f}" for m in TRAJECTORY) + " |"
                    for step, values in steps.items()], ""]
    lines += ["## Choices made on validation (by the code)", "", "```json", json.dumps(choices, indent=1), "```", ""]
    markdown = "\n".join(lines)
    (out / "quality.md").write_text(markdown)
    return markdown


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", type=Path, default=Path("data/shapes"), help="a built shapes world")
    parser.add_argument("--corpus", choices=("in_domain", "cross_domain"), default="in_domain")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--seed", type=int, help="run this one seed only (several can run side by side); the "
                                                 "summary covers every seed of --seeds found")
    parser.add_argument("--summary_only", action="store_true", help="only gather the seeds' results")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to report (init always)")
    parser.add_argument("--noise_levels", nargs="+", type=float, default=list(NOISE_LEVELS))
    parser.add_argument("--mix_shares", nargs="+", type=float, default=list(MIX_SHARES),
                        help="semantic shares the mix is chosen among on validation (each below 1)")
    parser.add_argument("--scst_steps", type=int, default=None, help="steps of every scst row (default: the recipe's)")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/shapes_quality"))
    args, extra = parser.parse_known_args(argv)
    if not (args.world_dir / "tables" / "manifest.json").is_file():
        raise SystemExit(f"{args.world_dir} holds no prepared world: `python prepare_datasets.py shapes --output "
                         f"{args.world_dir}` first")
    if any(not 0 <= share < 1 for share in args.mix_shares):
        raise SystemExit(f"--mix_shares are semantic shares below 1 (1 is clip_only), got {args.mix_shares}")
    setting = Setting(args.world_dir, args.corpus, args.output_dir, extra, args.scst_steps)
    seeds = [args.seed] if args.seed is not None else list(range(args.seeds))
    if not args.summary_only:
        for seed in seeds:
            SeedRun(setting, seed).run(args.rows, args.noise_levels, args.mix_shares)
    markdown = write_summary(setting, sorted({*range(args.seeds), *seeds}))
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
