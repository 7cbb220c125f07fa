"""`train.py --stage all`: every stage of the recipe in order (init, scst, supervised, eval), each given the recipe's
shared settings it reads, its own section and the command-line flags it reads, then the report."""

import json

import torch

import train
from test_scst_trainer import shapes_clip, write_tiny_run_inputs  # noqa: F401 (a fixture)


def test_stage_all_runs_every_stage_with_the_settings_each_reads(shapes_clip, tiny_tokenizer, tmp_path):
    write_tiny_run_inputs(shapes_clip, tiny_tokenizer, tmp_path, with_test=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "corpus_table": str(tmp_path / "corpus"), "train_table": str(tmp_path / "train"),
        "val_table": str(tmp_path / "val"), "test_table": str(tmp_path / "test"),
        "tokenizer_name_or_path": str(tmp_path / "tokenizer"), "decoder_config": str(tmp_path / "decoder.json"),
        "prefix_length": 2, "output_dir": str(tmp_path / "run"), "report_to": "none", "disable_tqdm": True,
        "seed": 0, "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3,
        "save_strategy": "no", "eval_strategy": "no", "eval_max_new_tokens": 5, "noise_std": 0.2,
        "scst": {"init_from_stage": "init", "max_new_tokens": 5,
                 "discriminator_config": str(tmp_path / "discriminator.json")},
        # the bound trains on true pairs: a table with references
        "supervised": {"train_table": str(tmp_path / "test")},
        "eval": {"eval_num_beams": 2},
    }))  # JSON is YAML
    results = train.main(["--config", str(recipe), "--stage", "all", "--noise_std", "0.05", "--num_samples", "2"])
    assert list(results) == ["init", "scst", "supervised", "eval"]
    assert list(results["eval"]) == ["init", "scst", "supervised"]
    run = tmp_path / "run"
    read = {stage: torch.load(run / stage / "final" / "training_args.bin", weights_only=False)
            for stage in ("init", "scst", "supervised")}
    assert (read["init"].noise_std, read["supervised"].noise_std, read["scst"].num_samples) == (0.05, 0.0, 2)
    assert all(json.loads((run / stage / "final" / "test_metrics.json").read_text()) == results["eval"][stage]
               for stage in read)
    assert (run / "report.md").is_file()
