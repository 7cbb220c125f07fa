"""`benchmarks/shapes_quality.py` keeps its protocol: rows keyed by their full settings (a row measured under another
recipe is never reported), every choice made on validation and recorded by the code, the shuffled control run at its
mix's chosen share, paired differences taken seed by seed.

    pytest tests/test_shapes_quality_protocol.py

The seeds' results are written here as the benchmark writes them, so the protocol runs on them without training: a
row whose key is not found would be trained, and training on this empty world fails the test.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT

SCST_STEPS = 1000


@pytest.fixture
def quality(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("shapes_quality", PROJECT_ROOT / "benchmarks" / "shapes_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = tmp_path / "shapes.yaml"
    recipe.write_text(module.RECIPE.read_text())
    monkeypatch.setattr(module, "RECIPE", recipe)  # a copy this test may edit, as a user edits the recipe
    return module


@pytest.fixture
def setting(quality, tmp_path):
    world = tmp_path / "world"
    (world / "raw").mkdir(parents=True)
    (world / "raw" / "world.json").write_text(json.dumps({"clip": {"recipe": "plain"}, "seed": 0, "version": 3}))
    return quality.Setting(world, "cross_domain", tmp_path / "runs", [], SCST_STEPS)


def entry(setting, row: str, stage: str, flags: tuple, start: str | None, test: dict, validation: float = 0.5,
          key: str | None = None) -> dict:
    """A finished row as `SeedRun.train` and `SeedRun.test` leave it."""
    key = key or setting.key(row, stage, flags, start)
    final = str(setting.output_dir / f"{row}-{key}" / stage / "final")
    return {"row": row, "key": key, "stage": stage, "flags": list(flags), "start": start, "final": final,
            "validation_best": validation, "best_checkpoint": None, "trajectory": {}, "test": test}


def finished(entries: list[dict]) -> dict:
    """`entries` and their last steps (`<key>@last`), tested, as results.json keeps them."""
    rows = {}
    for item in entries:
        rows[item["key"]] = item
        if item["stage"] == "scst":
            rows[f"{item['key']}@last"] = {**item, "key": f"{item['key']}@last", "test": dict(item["test"])}
    return rows


def write_seed(setting, seed: int, rows: dict, report: dict | None = None):
    folder = setting.output_dir / f"seed_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"rows": rows, "choices": {}, "report": report or {}}))


def test_a_row_measured_under_another_recipe_is_not_reported(quality, setting):
    init = entry(setting, "init_noise_0.1", "init", ("--noise_std", "0.1"), None, {"fluent_attribute_f1": 0.5})
    flags = quality.SCST_ROWS["clip_only"]
    clip_only = entry(setting, "clip_only", "scst", flags, init["final"], {"fluent_attribute_f1": 0.6})
    # The same row measured before a change to the recipe file: its key was the old recipe's.
    recipe = quality.RECIPE.read_text()
    quality.RECIPE.write_text(recipe.replace("  num_samples: 5\n", "  num_samples: 4\n"))
    old_key = setting.key("discriminator_only", "scst", quality.SCST_ROWS["discriminator_only"], init["final"])
    quality.RECIPE.write_text(recipe)
    assert old_key != setting.key("discriminator_only", "scst", quality.SCST_ROWS["discriminator_only"],
                                  init["final"])
    stale = entry(setting, "discriminator_only", "scst", quality.SCST_ROWS["discriminator_only"], init["final"],
                  {"fluent_attribute_f1": 0.9}, key=old_key)
    write_seed(setting, 0, finished([init, clip_only, stale]),
               {"init": init["key"], "clip_only": clip_only["key"], "discriminator_only": stale["key"]})

    rows, _ = quality.reported(setting, [0])

    assert list(rows) == ["init", "clip_only"]
    assert rows["clip_only"][0]["test"]["fluent_attribute_f1"] == 0.6


def test_a_key_changes_with_each_of_the_row_settings(quality, setting):
    flags = quality.SCST_ROWS["clip_only"]
    key = setting.key("clip_only", "scst", flags, "init/final")
    assert key == setting.key("clip_only", "scst", flags, "init/final")
    assert key != setting.key("clip_only", "scst", flags, "another_init/final")
    assert key != setting.key("clip_only", "scst", ("--semantic_share", "0.9"), "init/final")
    other_corpus = type(setting)(setting.world_dir, "in_domain", setting.output_dir.parent, [], SCST_STEPS)
    assert key != other_corpus.key("clip_only", "scst", flags, "init/final")
    longer = type(setting)(setting.world_dir, "cross_domain", setting.output_dir.parent, [], 2 * SCST_STEPS)
    assert key != longer.key("clip_only", "scst", flags, "init/final")


def test_the_share_is_chosen_on_validation_and_the_shuffled_control_runs_at_it(quality, setting):
    """Share 0.5 is best on validation and worst on test: the choice must be 0.5, and the shuffled control must be
    the one trained at 0.5 (no control is stored at 0.8, so running it there would train, and fail)."""
    init = entry(setting, "init_noise_0.1", "init", ("--noise_std", "0.1"), None, {"fluent_attribute_f1": 0.50})
    flags = quality.SHARE_CHOSEN["mix_replay_critic"]
    candidates = [entry(setting, f"mix_replay_critic_{share}", "scst", (*flags, "--semantic_share", str(share)),
                        init["final"], {"fluent_attribute_f1": f1}, validation=validation)
                  for share, validation, f1 in ((0.5, 0.62, 0.55), (0.8, 0.61, 0.70))]
    shuffled = entry(setting, "shuffled_replay_critic", "scst",
                     (*flags, "--shuffle_semantic_reward", "true", "--semantic_share", "0.5"), init["final"],
                     {"fluent_attribute_f1": 0.49})
    write_seed(setting, 0, finished([init, *candidates, shuffled]))

    quality.SeedRun(setting, 0).run(["mix_replay_critic", "shuffled_replay_critic"], [0.1], [0.5, 0.8])

    rows, choices = quality.reported(setting, [0])
    assert choices[0]["mix_replay_critic_semantic_share"] == 0.5
    assert choices[0]["mix_replay_critic_validation_by_share"] == {"0.5": 0.62, "0.8": 0.61}
    assert choices[0]["noise_std"] == 0.1
    assert rows["mix_replay_critic"][0]["key"] == candidates[0]["key"]
    assert rows["shuffled_replay_critic"][0]["key"] == shuffled["key"]
    assert {"mix_replay_critic_0.5", "mix_replay_critic_0.8@last", "shuffled_replay_critic@last"} <= set(rows)


def test_paired_differences_are_taken_seed_by_seed(quality, setting):
    """clip_only − init over seeds whose rows differ by 0.1 and 0.3: 0.200 ± 0.141, where the difference of the
    rows' means over all their seeds would take in seed 2's init, which has no clip_only."""
    for seed, (init_f1, clip_f1) in enumerate(((0.5, 0.6), (0.4, 0.7), (0.9, None))):
        init = entry(setting, "init_noise_0.1", "init", ("--noise_std", "0.1"), None,
                     {name: init_f1 for name in quality.PAIRED_COLUMNS})
        items, report = [init], {"init": init["key"]}
        if clip_f1 is not None:
            clip_only = entry(setting, "clip_only", "scst", quality.SCST_ROWS["clip_only"], init["final"],
                              {name: clip_f1 for name in quality.PAIRED_COLUMNS})
            items.append(clip_only)
            report["clip_only"] = clip_only["key"]
        write_seed(setting, seed, finished(items), report)

    rows, _ = quality.reported(setting, [0, 1, 2])
    lines = quality.paired_table(rows).splitlines()

    assert "| clip_only − init | 2 | " + " | ".join(["0.200 ± 0.141"] * len(quality.PAIRED_COLUMNS)) + " |" in lines
    assert not any(line.startswith("| mix − ") for line in lines)


def test_a_row_stopped_part_way_resumes_in_its_folder_when_the_benchmark_runs_again(quality, setting, monkeypatch):
    """The benchmark's process is killed while a row trains, then run again: the row must go on in the folder its key
    names, from that folder's newest complete checkpoint (`train.py` resumes exactly: tests/test_fault_injection.py),
    not start over elsewhere. `train.main` stands in for the training process here; it records how it was called."""
    calls = []

    def killed(argv):
        calls.append(argv)
        raise KeyboardInterrupt  # the process ends part-way: nothing is written to results.json

    def finishes(argv):
        calls.append(argv)
        stage_dir = Path(argv[argv.index("--output_dir") + 1]) / "scst"
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "trainer_state.json").write_text(json.dumps({"best_metric": 0.6, "log_history": []}))

    flags = quality.SCST_ROWS["clip_only"]
    monkeypatch.setattr(quality.train, "main", killed)
    with pytest.raises(KeyboardInterrupt):
        quality.SeedRun(setting, 0).train("clip_only", "scst", flags, "init/final")
    monkeypatch.setattr(quality.train, "main", finishes)
    entry = quality.SeedRun(setting, 0).train("clip_only", "scst", flags, "init/final")

    first, again = calls
    folder = str(setting.output_dir / "seed_0" / f"clip_only-{setting.key('clip_only', 'scst', flags, 'init/final')}")
    assert first[first.index("--output_dir") + 1] == again[again.index("--output_dir") + 1] == folder
    assert again[again.index("--resume_from_checkpoint") + 1] == "latest"
    assert entry["validation_best"] == 0.6
    assert quality.SeedRun(setting, 0).train("clip_only", "scst", flags, "init/final") == entry  # not trained again


def test_each_share_candidate_run_is_paired_with_the_init_whichever_shares_were_run(quality, setting):
    init = entry(setting, "init_noise_0.1", "init", ("--noise_std", "0.1"), None,
                 {name: 0.5 for name in quality.PAIRED_COLUMNS})
    flags = quality.SHARE_CHOSEN["mix_replay_critic"]
    candidates = [entry(setting, f"mix_replay_critic_{share}", "scst", (*flags, "--semantic_share", str(share)),
                        init["final"], {name: 0.5 + share for name in quality.PAIRED_COLUMNS}, validation=share)
                  for share in (0.3, 0.6)]
    write_seed(setting, 0, finished([init, *candidates]))
    quality.SeedRun(setting, 0).run(["mix_replay_critic"], [0.1], [0.3, 0.6])

    rows, _ = quality.reported(setting, [0])
    lines = quality.paired_table(rows).splitlines()
    differences = [line.split(" | ")[0][2:] for line in lines[2:]]

    assert differences[-4:] == ["mix_replay_critic_0.3 − init", "mix_replay_critic_0.6 − init",
                                "mix_replay_critic_0.3@last − init", "mix_replay_critic_0.6@last − init"]
    expected = "| mix_replay_critic_0.6 − init | 1 | " + " | ".join(["0.600"] * len(quality.PAIRED_COLUMNS)) + " |"
    assert expected in lines
