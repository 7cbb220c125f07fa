import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import train
from clip_scstclipcap import clip_metadata
from modeling_scstclipcap import SCSTClipCapForCaptioning
from trainers import CaptionCollator, InitConfig, InitTrainer, mmd_rbf
from trainers.stages import build_model

from conftest import PROJECT_ROOT, TINY_WORDS

COLOURS, SHAPES = ["red", "blue", "green"], ["circle", "square", "triangle"]
SENTENCES = [f"a {size} {colour} {shape}" for size in ("small", "big") for colour in COLOURS for shape in SHAPES]


def sentence_features(sentences, dim=16, seed=0):
    """A fixed random embedding per word, summed: similar sentences get similar features, like a CLIP."""
    words = torch.randn(len(TINY_WORDS), dim, generator=torch.Generator().manual_seed(seed))
    rows = [sum(words[TINY_WORDS.index(w)] for w in s.split()) for s in sentences]
    return F.normalize(torch.stack(rows), dim=-1)


def described(dataset: Dataset, kind: str) -> Dataset:
    meta = clip_metadata("local-dir:/tiny-clip", None, 16, True)
    dataset.info.description = json.dumps({"table": kind, "clip": meta})
    return dataset


def corpus_table(repeat=4) -> Dataset:
    sentences = SENTENCES * repeat
    return described(Dataset.from_dict({
        "text": sentences, "clip_features": sentence_features(sentences).tolist(), "source": ["text"] * len(sentences),
    }), "corpus")


def images_table(split: str, count=12, with_references=True) -> Dataset:
    sentences = SENTENCES[:count]
    features = sentence_features(sentences) + 0.05 * torch.randn(count, 16, generator=torch.Generator().manual_seed(9))
    return described(Dataset.from_dict({
        "image_id": [f"{split}_{i}" for i in range(count)], "file_name": [f"{split}_{i}.png" for i in range(count)],
        "clip_features": F.normalize(features, dim=-1).tolist(),
        "references": [[s, s.replace("a ", "the ", 1)] if with_references else [] for s in sentences],
    }), "images")


def pseudo_pairs_table() -> Dataset:
    images = images_table("train", with_references=False)
    return described(Dataset.from_dict({
        "image_id": images["image_id"], "clip_features": images["clip_features"], "text": SENTENCES[:12],
        "text_features": sentence_features(SENTENCES[:12]).tolist(), "similarity": [0.9] * 12,
    }), "pseudo_pairs")


def init_config(tmp_path, **overrides) -> InitConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=12,
        logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True, noise_std=0.0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return InitConfig(**settings)


@pytest.fixture
def model(make_config, tiny_tokenizer):
    torch.manual_seed(0)
    return SCSTClipCapForCaptioning(make_config(decoder_config=dict(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tiny_tokenizer),
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )))


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_init_training_lowers_the_loss_and_changes_the_weights(model, tiny_tokenizer, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = InitTrainer(model=model, args=init_config(tmp_path, noise_std=0.1, learning_rate=1e-2, max_steps=20),
                          corpus=corpus_table(),
                          processing_class=tiny_tokenizer)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss_before = trainer.compute_loss(model, batch).item()
    trainer.train()
    with torch.no_grad():
        loss_after = trainer.compute_loss(model, batch).item()
    assert loss_after < 0.7 * loss_before
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    logged = [entry for entry in trainer.state.log_history if "reconstruction_loss" in entry]
    assert logged and all("mmd" not in entry and "pseudo_pair_loss" not in entry for entry in logged)


def mapper_inputs(trainer, model, batch):
    seen = []
    hook = model.mapper.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    torch.manual_seed(5)
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    hook.remove()
    return seen[0]


def test_noise_reaches_the_mapper_input(model, tiny_tokenizer, tmp_path):
    quiet = InitTrainer(model=model, args=init_config(tmp_path, noise_std=0.0), corpus=corpus_table(),
                        processing_class=tiny_tokenizer)
    noisy = InitTrainer(model=model, args=init_config(tmp_path, noise_std=0.2), corpus=corpus_table(),
                        processing_class=tiny_tokenizer)
    batch = first_batch(quiet)
    clean_input, noisy_input = mapper_inputs(quiet, model, batch), mapper_inputs(noisy, model, batch)
    torch.testing.assert_close(clean_input, batch["prefix_features"])
    difference = noisy_input - clean_input
    assert 0.1 < difference.std().item() < 0.3  # std 0.2 noise, measured on 8 x 16 values


def test_with_both_weights_zero_the_loss_is_plain_cross_entropy(model, tiny_tokenizer, tmp_path):
    trainer = InitTrainer(model=model, args=init_config(tmp_path), corpus=corpus_table(), processing_class=tiny_tokenizer,
                          pseudo_pairs=pseudo_pairs_table(), images=images_table("train"))
    batch = first_batch(trainer)
    assert "pair_input_ids" not in batch and "image_prefix_features" not in batch
    model.eval()  # no dropout: both sides see the same network
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        out = model(prefix_features=batch["prefix_features"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    logits = out.logits[:, model.config.prefix_length - 1 : -1]
    targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))


def test_extra_terms_are_added_with_their_weights(model, tiny_tokenizer, tmp_path):
    config = init_config(tmp_path, pseudo_pair_weight=0.5, mmd_weight=2.0)
    trainer = InitTrainer(model=model, args=config, corpus=corpus_table(), processing_class=tiny_tokenizer,
                          pseudo_pairs=pseudo_pairs_table())
    batch = first_batch(trainer)
    with torch.no_grad():
        total = trainer.compute_loss(model.eval(), batch).item()
    terms = {name: values[-1] for name, values in trainer._metrics.items()}
    assert set(terms) == {"reconstruction_loss", "pseudo_pair_loss", "mmd"}
    assert total == pytest.approx(terms["reconstruction_loss"] + 0.5 * terms["pseudo_pair_loss"] + 2.0 * terms["mmd"],
                                  rel=1e-5)
    with pytest.raises(ValueError, match="pass pseudo_pairs"):
        InitTrainer(model=model, args=config, corpus=corpus_table(), processing_class=tiny_tokenizer)


def test_mmd_matches_a_direct_computation():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    samples = torch.cat((x, y))
    squared = torch.tensor([[((a - b) ** 2).sum().item() for b in samples] for a in samples])
    median = squared[~torch.eye(5, dtype=torch.bool)].median()
    kernel = sum(torch.exp(-squared / (2 * m * m * median)) for m in (0.5, 2.0))
    expected = kernel[:2, :2].mean() + kernel[2:, 2:].mean() - 2 * kernel[:2, 2:].mean()
    torch.testing.assert_close(mmd_rbf(x, y, (0.5, 2.0)), expected)

    sample = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    assert mmd_rbf(sample, sample.clone(), (1.0,)).abs().item() < 1e-6
    shifted = mmd_rbf(sample, sample + 3.0, (1.0,)).item()
    assert shifted > 0.5


def test_collator_appends_eos_and_pads(tiny_tokenizer):
    batch = CaptionCollator(tiny_tokenizer, max_length=4)([
        {"text": "a red circle", "clip_features": [0.0] * 16},
        {"text": "a big blue square left of the circle", "clip_features": [1.0] * 16},
    ])
    assert batch["input_ids"].tolist()[0] == tiny_tokenizer.convert_tokens_to_ids(["a", "red", "circle"]) + [1]
    assert batch["input_ids"][1, -1].item() == 1 and batch["attention_mask"].sum().item() == 8
    assert batch["prefix_features"].shape == (2, 16)


def test_config_checks_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        init_config(tmp_path, noise_std=-0.1)
    with pytest.raises(ValueError, match="mmd_bandwidths must be positive"):
        init_config(tmp_path, mmd_bandwidths=[1.0, 0.0])


def test_recipe_yaml_with_command_line_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: runs/x\nlearning_rate: 0.001\nnoise_std: 0.3\ninit:\n  noise_std: 0.05\n"
                      "  num_train_epochs: 7\nsupervised:\n  num_train_epochs: 2\n")
    settings = train.read_recipe(str(recipe))
    script, config = train.parse_stage("init", settings, ["--config", str(recipe), "--learning_rate", "0.01"])
    assert (config.noise_std, config.num_train_epochs, config.learning_rate) == (0.05, 7, 0.01)
    _, supervised = train.parse_stage("supervised", settings, [])
    assert (supervised.noise_std, supervised.num_train_epochs, supervised.learning_rate) == (0.0, 2, 0.001)
    _, aliased = train.parse_stage("init", {}, ["--output_dir", "x", "--lambda1", "0.3", "--lambda2", "1.0"])
    assert (aliased.pseudo_pair_weight, aliased.mmd_weight) == (0.3, 1.0)
    with pytest.raises(SystemExit, match="unknown settings in the recipe"):
        train.parse_stage("init", {"noise_stdd": 0.1}, [])


def save_tables(folder: Path, tokenizer) -> dict[str, str]:
    tables = {"corpus": corpus_table(), "train": images_table("train"), "val": images_table("val", count=6)}
    paths = {}
    for name, table in tables.items():
        table.save_to_disk(str(folder / name))
        paths[name] = str(folder / name)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    decoder = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
    (folder / "decoder.json").write_text(json.dumps(decoder))
    return paths


def test_two_process_run_is_synchronised(tiny_tokenizer, tmp_path):
    paths = save_tables(tmp_path / "tables", tiny_tokenizer)
    args = [
        "--stage", "init", "--corpus_table", paths["corpus"], "--train_table", paths["train"],
        "--tokenizer_name_or_path", str(tmp_path / "tables" / "tokenizer"),
        "--decoder_config", str(tmp_path / "tables" / "decoder.json"), "--prefix_length", "4",
        "--output_dir", str(tmp_path / "run"), "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--report_to", "none", "--save_strategy", "no", "--use_cpu",
        "--disable_tqdm", "true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(PROJECT_ROOT / "train.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "init" / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert info["global_step"] == 6
    assert len(info["weights_sha256"]) == 64  # train.py fails the run when the ranks' weights differ


def test_building_the_world_in_the_run_does_not_change_where_training_starts(tiny_tokenizer, tmp_path, monkeypatch):
    paths = save_tables(tmp_path / "tables", tiny_tokenizer)

    def run(output_dir: str) -> str:
        args = [
            "--stage", "init", "--corpus_table", paths["corpus"], "--train_table", paths["train"],
            "--tokenizer_name_or_path", str(tmp_path / "tables" / "tokenizer"),
            "--decoder_config", str(tmp_path / "tables" / "decoder.json"), "--prefix_length", "4",
            "--output_dir", str(tmp_path / output_dir), "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        ]
        return train.main(args)["init"]["weights_sha256"]

    found_built = run("found")
    # Building the shapes world trains a CLIP: it draws from the same random generators before the stage starts.
    monkeypatch.setattr(train, "prepare_world", lambda script, state: torch.rand(1000))
    assert run("built") == found_built


def test_multi_process_environment_without_a_matching_accelerator_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")

    class SingleProcess:
        num_processes = 1
        distributed_type = "DistributedType.NO"

    with pytest.raises(SystemExit, match="would not synchronise"):
        train.check_launch(SingleProcess())


def test_evaluation_scores_captions_and_picks_the_best_checkpoint(model, tiny_tokenizer, tmp_path):
    from trainers import CaptionEvaluator

    evaluator = CaptionEvaluator(images_table("val", count=6), tiny_tokenizer, tmp_path / "predictions",
                                 generation_kwargs=dict(max_new_tokens=6))
    config = init_config(tmp_path, learning_rate=1e-2, max_steps=20, eval_strategy="steps", eval_steps=10,
                         save_strategy="steps", save_steps=10, metric_for_best_model="cider",
                         load_best_model_at_end=True)
    trainer = InitTrainer(model=model, args=config, corpus=corpus_table(), processing_class=tiny_tokenizer,
                          evaluator=evaluator)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_cider" in entry]
    assert [entry["step"] for entry in evaluations] == [10, 20]
    assert {"eval_bleu_4", "eval_meteor", "eval_rouge_l", "eval_distinct_caption_share"} <= set(evaluations[0])
    best = max(evaluations, key=lambda entry: entry["eval_cider"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    predictions = json.loads((tmp_path / "predictions" / "predictions-step-20.json").read_text())
    assert sorted(row["image_id"] for row in predictions) == [f"val_{i}" for i in range(6)]
    assert all(isinstance(row["caption"], str) for row in predictions)


def test_eval_stage_is_one_command_and_says_in_one_line_what_is_missing(tiny_tokenizer, tmp_path):
    paths = save_tables(tmp_path / "tables", tiny_tokenizer)
    train.main([
        "--stage", "init", "--corpus_table", paths["corpus"], "--train_table", paths["train"],
        "--tokenizer_name_or_path", str(tmp_path / "tables" / "tokenizer"),
        "--decoder_config", str(tmp_path / "tables" / "decoder.json"), "--prefix_length", "4",
        "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    ])
    model = tmp_path / "run" / "init" / "final"

    def evaluate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), "--stage", "eval", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    for args, message in [((("--model_name_or_path", str(model))), "needs --test_table"),
                          (("--model_name_or_path", str(tmp_path / "nowhere"), "--test_table", paths["val"]),
                           "cannot load the model"),
                          (("--model_name_or_path", str(model), "--test_table", str(tmp_path / "no_table")),
                           "does not exist")]:
        result = evaluate(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    result = evaluate("--model_name_or_path", str(model), "--test_table", paths["val"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| model |" in result.stdout and "cider" in result.stdout
    assert json.loads((model / "test_metrics.json").read_text())["cider"] >= 0


def test_a_stage_refuses_a_setting_it_would_ignore(tmp_path):
    output = ["--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="scst stage does not read --mapping_type"):
        train.parse_stage("scst", {}, ["--stage", "scst", "--mapping_type", "transformer", *output])
    with pytest.raises(SystemExit, match="supervised stage does not read --noise_std"):
        train.parse_stage("supervised", {}, ["--stage", "supervised", "--noise_std=0.1", *output])
    # `--stage all` hands every stage the same flags: the init stage reads this one, the supervised bound leaves it
    script, config = train.parse_stage("supervised", {}, ["--noise_std", "0.1", *output], shared_command_line=True)
    assert config.noise_std == 0.0
    assert train.parse_stage("init", {}, ["--stage", "init", "--noise_std", "0.1", *output])[1].noise_std == 0.1


def test_new_transformer_mapper_takes_its_heads_and_mlp_ratio_from_the_command_line(tiny_tokenizer, tmp_path):
    decoder = tmp_path / "decoder.json"
    decoder.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}))
    script, _ = train.parse_stage("init", {}, [
        "--mapping_type", "transformer", "--num_mapping_layers", "1", "--num_mapping_heads", "4",
        "--mapping_mlp_ratio", "3.0", "--clip_length", "2", "--prefix_length", "2", "--decoder_config", str(decoder),
        "--output_dir", str(tmp_path)])
    model = build_model(script, tmp_path, {"dim": 16, "model_name": "ViT-B-32"}, tiny_tokenizer)
    assert model.config.num_mapping_heads == 4 and model.config.mapping_mlp_ratio == 3.0


def test_a_shapes_world_of_an_older_version_is_not_reused(tmp_path):
    from dataprep.shapes import WORLD_VERSION
    from dataprep.world import world_is_ready

    (tmp_path / "raw").mkdir()
    (tmp_path / "tables").mkdir()
    world = {"version": WORLD_VERSION, "seed": 0, "images": {}, "corpus_sentences": {}}
    (tmp_path / "raw" / "world.json").write_text(json.dumps(world))
    assert not world_is_ready(tmp_path)  # tables unfinished
    (tmp_path / "tables" / "manifest.json").write_text("{}")
    assert world_is_ready(tmp_path)
    assert not world_is_ready(tmp_path, seed=1)
    assert not world_is_ready(tmp_path, clip="plain")  # a world of another CLIP recipe is rebuilt
    (tmp_path / "raw" / "world.json").write_text(json.dumps({**world, "clip": {"recipe": "plain"}}))
    assert world_is_ready(tmp_path, clip="plain") and not world_is_ready(tmp_path)
    (tmp_path / "raw" / "world.json").write_text(json.dumps({**world, "version": WORLD_VERSION - 1}))
    assert not world_is_ready(tmp_path)
