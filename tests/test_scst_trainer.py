"""Stage scst: CLIP rewards, baselines, the weight ramp, the discriminator, skipped steps, exact resume, two processes.

    pytest tests/test_scst_trainer.py

The two-process test launches this file as a script under torchrun:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_scst_trainer.py WORK_DIR
"""

import hashlib
import functools
import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer, HfArgumentParser, TrainerCallback

import train
from clip_scstclipcap import ClipMismatchError, ClipTextEncoder, clip_metadata, save_local_clip
from conftest import PROJECT_ROOT, tiny_decoder_config
from configuration_scstclipcap import SCSTClipCapConfig
from dataprep import shapes
from modeling_scstclipcap import SCSTClipCapForCaptioning
from trainers import CaptionEvaluator
from trainers.discriminator import Discriminator
from trainers.rewards import ClipRewards, SemanticRewardWeights, semantic_scores
from trainers.scst_trainer import (
    AdvantageScales, CorpusStream, SCSTConfig, SCSTTrainer, caption_mask, mixed_advantages, policy_gradient_loss,
    self_critical_advantages,
)

COLOURS, SHAPES = ("red", "green", "blue"), ("circle", "square")
IMAGE_SIZE = 12
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "mlp_ratio": 2.0,
                   "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
TINY_DISCRIMINATOR = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 32, "max_position_embeddings": 48}


def render(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Shapes-world images of one large object, cycling through the colours and shapes, and their captions."""
    rng, pixel_rng = random.Random(seed), np.random.default_rng(seed)
    pixels, captions = [], []
    for index in range(count):
        colour, shape = COLOURS[index % 3], SHAPES[(index // 3) % 2]
        scene = {"objects": [{"colour": colour, "shape": shape, "size": "large", "texture": "solid",
                              "position": "center"}], "relation": None, "background": rng.choice(["dark", "light"])}
        pixels.append(shapes.render_scene(scene, pixel_rng, size=IMAGE_SIZE)[0])
        captions.append(f"a {colour} {shape}")
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255 - 0.5, captions


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes_clip(tmp_path_factory):
    """A tiny open_clip trained for a few seconds on shapes-world pairs, saved as a `local-dir:` folder."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    pixels, captions = render(96, seed=0)
    tokens = open_clip.get_tokenizer("ViT-B-32")(captions, context_length=TINY_CLIP["text_cfg"]["context_length"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn, generator = open_clip.ClipLoss(), torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randperm(len(captions), generator=generator)[:32]
        loss = loss_fn(model.encode_image(pixels[batch], normalize=True),
                       model.encode_text(tokens[batch], normalize=True), model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    name = save_local_clip(model.eval(), TINY_CLIP, tmp_path_factory.mktemp("clip") / "tiny")
    return name, model


def encode_images(clip_model, pixels) -> torch.Tensor:
    with torch.no_grad():
        return clip_model.encode_image(pixels, normalize=True)


def clip_record(clip_name: str, clip_model) -> dict:
    return clip_metadata(clip_name, None, TINY_CLIP["embed_dim"], True, clip_model.logit_scale.exp().item())


def encode_texts(clip_model, texts) -> torch.Tensor:
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts, context_length=TINY_CLIP["text_cfg"]["context_length"])
    with torch.no_grad():
        return clip_model.encode_text(tokens, normalize=True)


def images_table(shapes_clip, count=12, seed=1, clip_record_of=None, split="train") -> Dataset:
    """Rendered images with their CLIP features and, as CLIP-agg targets, their true captions' embeddings."""
    name, clip_model = shapes_clip
    pixels, captions = render(count, seed)
    references = [[c, c.replace("a ", "the ", 1)] if split != "train" else [] for c in captions]
    table = Dataset.from_dict({
        "image_id": [f"{split}_{i}" for i in range(count)], "file_name": [f"{split}_{i}.png" for i in range(count)],
        "clip_features": encode_images(clip_model, pixels).tolist(), "references": references,
        "agg_text_features": encode_texts(clip_model, captions).tolist(),
    })
    table.info.description = json.dumps({"table": "images", "clip": clip_record_of or clip_record(name, clip_model)})
    return table


def corpus_table(shapes_clip) -> Dataset:
    _, clip_model = shapes_clip
    sentences = [f"a {size} {colour} {shape}" for size in ("small", "big") for colour in COLOURS for shape in SHAPES]
    return Dataset.from_dict({"text": sentences, "clip_features": encode_texts(clip_model, sentences).tolist(),
                              "source": ["toy"] * len(sentences)})


def captioner(shapes_clip, tokenizer) -> SCSTClipCapForCaptioning:
    torch.manual_seed(0)
    decoder = {**tiny_decoder_config(len(tokenizer)), "n_positions": 32}
    return SCSTClipCapForCaptioning(SCSTClipCapConfig(
        prefix_dim=16, prefix_length=2, decoder_config=decoder, clip_model_name=shapes_clip[0], clip_pretrained=None))


def scst_config(tmp_path, **overrides) -> SCSTConfig:
    discriminator_config = tmp_path / "discriminator.json"
    tmp_path.mkdir(parents=True, exist_ok=True)
    discriminator_config.write_text(json.dumps(TINY_DISCRIMINATOR))
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_samples=2, max_new_tokens=6,
        learning_rate=1e-3, discriminator_learning_rate=1e-3, discriminator_config=str(discriminator_config),
        max_steps=3, logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=True, disable_tqdm=True,
    )
    settings.update(overrides)
    return SCSTConfig(**settings)


def make_trainer(shapes_clip, tokenizer, config, **kwargs) -> SCSTTrainer:
    return SCSTTrainer(model=captioner(shapes_clip, tokenizer), args=config, images=images_table(shapes_clip),
                       corpus=corpus_table(shapes_clip), processing_class=tokenizer, **kwargs)


def weights(trainer) -> dict[str, dict[str, torch.Tensor]]:
    captioner_weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return {"generator": {k: v.detach().clone() for k, v in captioner_weights.items()},
            "discriminator": {k: v.detach().clone() for k, v in trainer.discriminator.model.state_dict().items()}}


def assert_same_weights(first, second, tolerance=1e-6):
    for network in ("generator", "discriminator"):
        for name, tensor in first[network].items():
            torch.testing.assert_close(second[network][name], tensor, atol=tolerance, rtol=tolerance,
                                       msg=f"{network} {name}")


# ---- rewards


def test_clip_rewards_rank_the_right_scene_above_a_wrong_one(shapes_clip):
    name, clip_model = shapes_clip
    rewards = ClipRewards.from_model_config(SCSTClipCapConfig(prefix_dim=16, clip_model_name=name,
                                                              clip_pretrained=None))
    pixels, truths = render(6, seed=7)  # unseen renderings, one per colour and shape
    image_features = encode_images(clip_model, pixels)
    # Trained for seconds, this CLIP knows colours (shapes take it longer): the wrong captions name another colour.
    candidates = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    scores = torch.stack([rewards([c] * 6, image_features)["semantic"] for c in candidates], dim=1)  # (image, caption)
    for image, truth in enumerate(truths):
        right = scores[image, candidates.index(truth)]
        other_colours = [i for i, c in enumerate(candidates) if c.split()[1] != truth.split()[1]]
        assert (right > scores[image, other_colours]).all(), (truth, scores[image])
    wrong = torch.tensor([[c != t for c in candidates] for t in truths])
    assert scores[~wrong].mean() > scores[wrong].mean() + 0.1 * rewards.logit_scale
    assert rewards.logit_scale == pytest.approx(clip_model.logit_scale.exp().item())


SHAPES_CLIP_CONFIG = shapes.clip_model_config()
CAPTIONS = ["a red circle", "a big blue square above a small green triangle on a dark background", "a"]


def text_tower(config_changes: dict | None = None, custom_text: bool = False):
    """The shapes world's CLIP at random weights (its text tower inside `CLIP`, or a `CustomTextCLIP`'s
    `TextTransformer`), its tokenizer, and a list that records how many positions each pass of the tower runs on."""
    torch.manual_seed(0)
    text_cfg = {**SHAPES_CLIP_CONFIG["text_cfg"], **(config_changes or {})}
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = model_class(**{**SHAPES_CLIP_CONFIG, "text_cfg": text_cfg}).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=text_cfg["context_length"])
    positions = []
    transformer = model.text.transformer if custom_text else model.transformer
    transformer.register_forward_hook(lambda _, inputs, __: positions.append(inputs[0].shape[1]))
    return model, tokenizer, positions


@pytest.mark.parametrize("custom_text", [False, True], ids=["CLIP", "CustomTextCLIP"])
def test_clip_text_tower_runs_on_the_captions_positions_with_the_same_features(custom_text):
    """A causal tower pooled at the end token runs on the positions up to the batch's last end token, not on the whole
    context, and gives encode_text's features."""
    model, tokenizer, positions = text_tower(custom_text=custom_text)
    tokens = tokenizer(CAPTIONS)
    with torch.no_grad():
        full = model.encode_text(tokens)
    short = ClipTextEncoder(model, tokenizer)(CAPTIONS)
    needed = int((tokens != 0).sum(dim=1).max())  # start token, words, end token of the longest caption
    assert positions == [tokens.shape[1], needed] and needed < tokens.shape[1]
    assert short.dtype == torch.float32
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_changes, custom_text", [
    ({"no_causal_mask": True}, False),  # every position sees the padding
    ({"pool_type": "last"}, True),  # the pooled position moves with the cut
    ({"embed_cls": True}, True),  # CoCa's class token, appended after the padding
], ids=["bidirectional", "last-position pooling", "class token"])
def test_clip_text_towers_that_the_padding_reaches_run_on_the_whole_context(config_changes, custom_text):
    model, tokenizer, positions = text_tower(config_changes, custom_text)
    tokens = tokenizer(CAPTIONS)
    encoder = ClipTextEncoder(model, tokenizer)
    assert encoder.causal_tower is None
    with torch.no_grad():
        assert torch.equal(encoder(CAPTIONS), model.encode_text(tokens).float())
    assert len(positions) == 2 and positions[0] == positions[1] >= tokens.shape[1]  # CoCa's class token adds one


def test_semantic_scores_on_known_vectors():
    text = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # normalised inside
    image = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    aggregate = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    scores = semantic_scores(text, image, aggregate, SemanticRewardWeights(clip_cos=0.5, agg_cos=0.25, agg_l1=0.25), 10.0)
    torch.testing.assert_close(scores["clip_cos"], torch.tensor([6.0, 8.0]))
    torch.testing.assert_close(scores["agg_cos"], torch.tensor([10.0, 0.0]))
    torch.testing.assert_close(scores["agg_l1"], torch.tensor([10.0, 0.0]))  # 10 * (1 - mean(|0|, |0|)), 10 * (1 - 1)
    torch.testing.assert_close(scores["semantic"], torch.tensor([3.0 + 2.5 + 2.5, 4.0]))
    with pytest.raises(ValueError, match="aggregated"):
        semantic_scores(text, image, None, SemanticRewardWeights(agg_cos=1.0), 10.0)


def test_baselines_on_known_numbers():
    samples = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    greedy = torch.tensor([2.0, 1.0])
    torch.testing.assert_close(self_critical_advantages(samples, greedy, "greedy"),
                               torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 5.0]]))
    # mean of the other samples: (2+3)/2, (1+3)/2, (1+2)/2 and 3, 3, 0
    torch.testing.assert_close(self_critical_advantages(samples, None, "mean"),
                               torch.tensor([[-1.5, 0.0, 1.5], [-3.0, -3.0, 6.0]]))


def test_policy_gradient_raises_the_probability_of_rewarded_tokens():
    logits = torch.zeros(1, 4, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        log_probs = logits.log_softmax(-1)  # (1, V)
        tokens = torch.multinomial(log_probs.exp().detach().expand(8, -1), 1, generator=generator)  # (8, 1)
        rewards = (tokens[:, 0] == 2).float().view(1, 8)  # token 2 is the right word
        advantages = self_critical_advantages(rewards, None, "mean").flatten()
        loss = policy_gradient_loss(log_probs[0, tokens], torch.ones_like(tokens), advantages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logits.softmax(-1)[0, 2] > 0.9


def test_corpus_stream_gives_each_slot_its_own_sentences_and_replays_on_resume():
    corpus = Dataset.from_dict({"text": [f"sentence {i}" for i in range(10)]})
    stream = CorpusStream(corpus, seed=0)
    first_pass = stream.rows(0, 4) + stream.rows(4, 4) + stream.rows(8, 2)
    assert sorted(first_pass) == list(range(10))  # consecutive slots never share a sentence within a pass
    second_pass = stream.rows(10, 10)
    assert sorted(second_pass) == list(range(10)) and second_pass != first_pass  # reshuffled each pass
    resumed = CorpusStream(corpus, seed=0)
    assert resumed.take(12, 5) == stream.take(12, 5)


def test_semantic_share_ramp(tmp_path):
    def shares(steps: int, **settings) -> list[float]:
        config = scst_config(tmp_path, **settings)
        return [config.semantic_share_at(step) for step in range(steps)]

    linear = shares(8, semantic_share=0.5, naturalness_only_steps=2, semantic_ramp_steps=4)
    assert linear == pytest.approx([0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    constant = shares(4, semantic_share=0.5, naturalness_only_steps=2, semantic_ramp_steps=4, semantic_ramp="constant")
    assert constant == [0, 0, 0.5, 0.5]
    assert shares(2, semantic_share=0.8) == [0.8, 0.8]


def test_caption_mask_stops_after_the_first_eos_even_when_padding_is_eos():
    eos = 1
    captions = torch.tensor([[5, 6, 1, 1, 1], [5, 1, 0, 0, 0], [5, 6, 7, 8, 9], [1, 1, 1, 1, 1]])
    assert caption_mask(captions, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]


# ---- the discriminator


def test_discriminator_learns_a_separable_toy(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    discriminator = Discriminator.from_config(TINY_DISCRIMINATOR, tiny_tokenizer, learning_rate=3e-3)
    discriminator.create_scheduler(num_training_steps=40)
    real = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    fake = [f"{shape} {shape} {colour} {colour}" for colour in COLOURS for shape in SHAPES]
    before = discriminator.loss(real, fake)
    for _ in range(40):
        output = discriminator.loss(real, fake)
        output.loss.backward()
        discriminator.clip_gradients()
        discriminator.step()
    after = discriminator.loss(real, fake)
    assert before.accuracy_real + before.accuracy_fake < 1.5
    assert after.accuracy_real == after.accuracy_fake == 1.0
    assert after.loss.item() < 0.5 * before.loss.item()
    naturalness = discriminator.scores(["a blue circle", "circle circle blue blue"])
    assert naturalness[0] > 0 > naturalness[1]
    discriminator.save(tmp_path / "saved")  # a transformers folder: from_pretrained reads it back
    reloaded = Discriminator.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(reloaded.scores(real), discriminator.scores(real))


# ---- training


def test_training_logs_every_metric_and_moves_both_networks(shapes_clip, tiny_tokenizer, tmp_path):
    config = scst_config(tmp_path, max_steps=4, naturalness_only_steps=1, semantic_ramp_steps=2, semantic_share=0.5,
                         mmd_weight=0.1, clip_cos_weight=0.5, agg_cos_weight=0.3, agg_l1_weight=0.2)
    trainer = make_trainer(shapes_clip, tiny_tokenizer, config)
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)
    for network in ("generator", "discriminator"):
        assert any(not torch.equal(before[network][k], after[network][k]) for k in before[network]), network
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert [entry["semantic_share"] for entry in logged] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    expected = {"reward_clip_cos", "reward_agg_cos", "reward_agg_l1", "reward_semantic", "reward_naturalness",
                "reward_greedy", "advantage_std", "advantage_scale_naturalness", "discriminator_accuracy_real",
                "discriminator_accuracy_fake", "discriminator_loss", "caption_length", "distinct_1", "distinct_2",
                "repeated_word_share", "same_caption_share", "mmd", "skipped_steps"}
    assert all(expected <= set(entry) for entry in logged)
    assert all("advantage_scale_semantic" in entry for entry in logged[1:])  # w = 0 at the first step
    assert all(math.isfinite(entry["reward"]) and entry["skipped_steps"] == 0 for entry in logged)
    # w = 0: the naturalness reward alone, in units of its advantage's scale
    assert logged[0]["reward"] == pytest.approx(logged[0]["reward_naturalness"] / logged[0]["advantage_scale_naturalness"])
    for entry in logged[1:]:
        semantic = 0.5 * entry["reward_clip_cos"] + 0.3 * entry["reward_agg_cos"] + 0.2 * entry["reward_agg_l1"]
        assert entry["reward_semantic"] == pytest.approx(semantic, rel=1e-5)
        w = entry["semantic_share"]
        mixed = (w * entry["reward_semantic"] / entry["advantage_scale_semantic"]
                 + (1 - w) * entry["reward_naturalness"] / entry["advantage_scale_naturalness"])
        assert entry["reward"] == pytest.approx(mixed, rel=1e-5, abs=1e-6)


def test_mixed_advantages_give_each_reward_its_share_whatever_its_scale():
    semantic = torch.tensor([[70.0, 76.0, 73.0], [80.0, 74.0, 77.0]])  # CLIP's scale: +-3
    naturalness = torch.tensor([[0.1, -0.2, 0.4], [-0.5, 0.0, 0.2]])  # a logit's scale: +-0.3
    rewards = {"semantic": semantic, "naturalness": naturalness}
    for shares in ({"semantic": 0.7, "naturalness": 0.3}, {"semantic": 0.2, "naturalness": 0.8}):
        result = mixed_advantages(rewards, None, shares, "mean")
        mixed, scales = result.advantages, result.scales
        parts = {kind: self_critical_advantages(values, None, "mean") / scales[kind] for kind, values in rewards.items()}
        for part in parts.values():
            assert part.pow(2).mean().sqrt() == pytest.approx(1.0)  # each reward on one scale
        torch.testing.assert_close(mixed, shares["semantic"] * parts["semantic"]
                                   + shares["naturalness"] * parts["naturalness"])
        # the mixed reward is what the advantages are baselined differences of
        torch.testing.assert_close(self_critical_advantages(result.sample_rewards, None, "mean"), mixed)
    # scaled up 1000x, a reward keeps its share of the advantage
    louder = {"semantic": semantic * 1000, "naturalness": naturalness}
    torch.testing.assert_close(mixed_advantages(louder, None, shares, "mean").advantages, mixed)
    # a reward at share 0 is left out of the mix
    only = mixed_advantages(rewards, None, {"semantic": 1.0, "naturalness": 0.0}, "mean").advantages
    torch.testing.assert_close(only, mixed_advantages({"semantic": semantic}, None, {"semantic": 1.0},
                                                      "mean").advantages)
    greedy = {"semantic": torch.tensor([73.0, 77.0]), "naturalness": torch.tensor([0.0, 0.0])}
    by_greedy = mixed_advantages(rewards, greedy, {"semantic": 1.0, "naturalness": 0.0}, "greedy")
    assert torch.equal(by_greedy.advantages > 0, semantic > greedy["semantic"][:, None])
    torch.testing.assert_close(by_greedy.advantages, by_greedy.sample_rewards - by_greedy.greedy_rewards[:, None])


def test_raw_scale_mix_is_cgtgans_sum_of_two_policy_gradient_losses():
    semantic = torch.tensor([[70.0, 76.0, 73.0], [80.0, 74.0, 77.0]])
    naturalness = torch.tensor([[0.1, -0.2, 0.4], [-0.5, 0.0, 0.2]])
    greedy = {"semantic": torch.tensor([73.0, 77.0]), "naturalness": torch.tensor([0.1, -0.1])}
    result = mixed_advantages({"semantic": semantic, "naturalness": naturalness}, greedy,
                              {"semantic": 0.5, "naturalness": 0.5}, "greedy", AdvantageScales("none"))
    mixed, scales = result.advantages, result.scales
    torch.testing.assert_close(mixed, 0.5 * (semantic - greedy["semantic"][:, None])
                               + 0.5 * (naturalness - greedy["naturalness"][:, None]))
    assert all(scale.item() == 1.0 for scale in scales.values())


def test_running_scale_does_not_blow_up_one_quiet_batch():
    running, per_batch = AdvantageScales("running_rms", momentum=0.9), AdvantageScales("batch_rms")
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        running("naturalness", torch.randn(4, 5, generator=generator))
    quiet = 0.01 * torch.randn(4, 5, generator=generator)  # a batch where the discriminator says next to nothing
    assert (quiet / per_batch("naturalness", quiet)).pow(2).mean().sqrt() == pytest.approx(1.0)  # amplified
    assert (quiet / running("naturalness", quiet)).pow(2).mean().sqrt() < 0.05
    # bias-corrected: the first batch is scaled by its own size, not by (1 - momentum) of it
    fresh = AdvantageScales("running_rms", momentum=0.9)
    first = torch.full((2, 3), 2.0)
    assert fresh("semantic", first).item() == pytest.approx(2.0)
    # the state travels with checkpoints: a restored scale continues where it was
    restored = AdvantageScales("running_rms", momentum=0.9)
    restored.load_state_dict(running.state_dict())
    assert restored("naturalness", first).item() == running("naturalness", first).item()


def test_sample_log_probs_match_the_models_cross_entropy(shapes_clip, tiny_tokenizer, tmp_path):
    trainer = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path))
    model = trainer.model.eval()
    features = torch.tensor(images_table(shapes_clip)["clip_features"][:3])
    captions = trainer.roll_out(features)[0]
    with torch.no_grad():
        token_log_probs, mask, _ = trainer.sample_log_probs(model, features.repeat_interleave(2, 0), captions)
        cross_entropy = model(prefix_features=features.repeat_interleave(2, 0), input_ids=captions,
                              attention_mask=mask, labels=captions).loss
    torch.testing.assert_close(-(token_log_probs * mask).sum() / mask.sum(), cross_entropy)


def test_greedy_rows_decode_as_greedy_generation(shapes_clip, tiny_tokenizer, tmp_path):
    trainer = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path, num_samples=3, sample_top_k=4,
                                                                    sample_temperature=2.0))
    model = trainer.model.eval()
    features = torch.tensor(images_table(shapes_clip)["clip_features"][:5])
    samples, sample_texts, greedy_texts = trainer.roll_out(features)
    greedy = model.generate_captions(features, tokenizer=tiny_tokenizer, do_sample=False, max_new_tokens=6)
    assert greedy_texts == greedy
    assert samples.shape[0] == len(sample_texts) == 15
    assert len(set(sample_texts)) > 5  # temperature 2: samples differ from one another


class NonFiniteRewards(ClipRewards):
    """CLIP rewards that turn into NaN on the given calls (one call per step)."""

    def __init__(self, rewards: ClipRewards, broken_calls: set[int]):
        super().__init__(rewards.clip, rewards.weights)
        self.broken_calls, self.calls = broken_calls, 0

    def __call__(self, *args, **kwargs):
        scores = super().__call__(*args, **kwargs)
        if self.calls in self.broken_calls:
            scores["semantic"] = scores["semantic"] * float("nan")
        self.calls += 1
        return scores


class WeightsAfterEachStep(TrainerCallback):
    def __init__(self):
        self.trainer, self.snapshots = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.snapshots.append(weights(self.trainer))


def test_a_non_finite_step_is_skipped_by_both_networks(shapes_clip, tiny_tokenizer, tmp_path, caplog):
    config = scst_config(tmp_path, max_steps=2, semantic_share=1.0)
    rewards = ClipRewards.from_model_config(captioner(shapes_clip, tiny_tokenizer).config,
                                            config.semantic_reward_weights)
    snapshots = WeightsAfterEachStep()
    trainer = make_trainer(shapes_clip, tiny_tokenizer, config, rewards=NonFiniteRewards(rewards, {0}),
                           callbacks=[snapshots])
    snapshots.trainer = trainer
    before = weights(trainer)
    with caplog.at_level(logging.WARNING, logger="trainers.scst_trainer"):
        trainer.train()
    assert_same_weights(before, snapshots.snapshots[0], tolerance=0)
    assert trainer.skipped_steps == 1
    assert "non-finite rewards" in caplog.text and "skipped" in caplog.text
    second = snapshots.snapshots[1]
    for network in ("generator", "discriminator"):
        assert all(torch.isfinite(t).all() for t in second[network].values())
        assert any(not torch.equal(before[network][k], second[network][k]) for k in before[network]), network
    logged = [entry["skipped_steps"] for entry in trainer.state.log_history if "skipped_steps" in entry]
    assert logged == [1, 1]


@pytest.mark.parametrize("discriminator", [{}, dict(discriminator_steps=3, discriminator_replay=12)],
                         ids=["one_update", "further_updates_and_replay"])
def test_resume_is_exact(shapes_clip, tiny_tokenizer, tmp_path, discriminator):
    """4 steps in one run == 2 steps, a checkpoint, and 2 more steps in a new trainer resumed from it."""
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, naturalness_only_steps=1, semantic_ramp_steps=2,
                    learning_rate=3e-3, baseline="mean", **discriminator)
    straight = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path / "straight", **settings))
    straight.train()

    class StopAfterTwoSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    first = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path / "resumed", **settings),
                         callbacks=[StopAfterTwoSteps()])
    first.train()
    checkpoint = tmp_path / "resumed" / "run" / "checkpoint-2"
    assert (checkpoint / "discriminator" / "training_state.pt").is_file()
    second = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path / "resumed", **settings))
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 4
    assert_same_weights(weights(straight), weights(second))
    assert second.discriminator.scheduler.state_dict() == straight.discriminator.scheduler.state_dict()
    assert second.replay == straight.replay


def test_evaluation_picks_the_best_checkpoint_by_cider(shapes_clip, tiny_tokenizer, tmp_path):
    evaluator = CaptionEvaluator(images_table(shapes_clip, count=6, seed=3, split="val"), tiny_tokenizer,
                                 tmp_path / "predictions", generation_kwargs=dict(max_new_tokens=5))
    config = scst_config(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                         save_steps=2, metric_for_best_model="cider", load_best_model_at_end=True)
    trainer = make_trainer(shapes_clip, tiny_tokenizer, config, evaluator=evaluator)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_cider" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    best = max(evaluations, key=lambda entry: entry["eval_cider"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert (Path(trainer.state.best_model_checkpoint) / "discriminator" / "config.json").is_file()


def test_the_starting_model_competes_and_is_handed_back_when_nothing_beats_it(shapes_clip, tiny_tokenizer, tmp_path):
    """Evaluated at step 0, the model the stage starts from is a candidate: a stage at learning rate 0 (which changes
    nothing) returns it, and a stage that learns is only kept where it does better on validation."""
    evaluator = CaptionEvaluator(images_table(shapes_clip, count=6, seed=3, split="val"), tiny_tokenizer,
                                 tmp_path / "predictions", generation_kwargs=dict(max_new_tokens=5))
    results = {}
    for learning_rate in (0.0, 3e-3):
        config = scst_config(tmp_path / str(learning_rate), max_steps=20, eval_strategy="steps", eval_steps=10,
                             eval_on_start=True, save_strategy="steps", save_steps=10, save_total_limit=1,
                             metric_for_best_model="clip_s_proxy", load_best_model_at_end=True,
                             learning_rate=learning_rate, semantic_share=1.0, baseline="mean", num_samples=4)
        evaluator.extra_metrics = [lambda predictions: {"clip_s_proxy": greedy_reward_of(trainer, predictions)}]
        trainer = make_trainer(shapes_clip, tiny_tokenizer, config, evaluator=evaluator)
        start = weights(trainer)["generator"]
        trainer.train()
        evaluations = {entry["step"]: entry["eval_clip_s_proxy"] for entry in trainer.state.log_history
                       if "eval_clip_s_proxy" in entry}
        assert sorted(evaluations) == [0, 10, 20]
        results[learning_rate] = (trainer.state.best_model_checkpoint, evaluations, start, weights(trainer))
    best, evaluations, start, final = results[0.0]
    assert best.endswith("checkpoint-0") and Path(best).is_dir()  # kept despite save_total_limit 1
    assert len(set(evaluations.values())) == 1
    assert_same_weights({"generator": start, "discriminator": {}}, {**final, "discriminator": {}}, tolerance=0)
    best, evaluations, start, final = results[3e-3]
    best_step = max(evaluations, key=lambda step: (evaluations[step], -step))
    assert best_step > 0, "the learning stage should beat its start on this reward"
    assert best.endswith(f"checkpoint-{best_step}")


def greedy_reward_of(trainer, predictions: dict[str, str]) -> float:
    """The validation images' CLIP score of their captions (a reference-free selection metric)."""
    table = trainer.evaluator.images
    features = torch.tensor([table["clip_features"][table["image_id"].index(i)] for i in predictions])
    return trainer.rewards(list(predictions.values()), features)["clip_cos"].mean().item()


def test_settings_and_tables_are_checked(shapes_clip, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="num_samples >= 2"):
        scst_config(tmp_path, baseline="mean", num_samples=1)
    with pytest.raises(ValueError, match="bf16"):
        scst_config(tmp_path, fp16=True)
    with pytest.raises(ValueError, match="agg_text_features"):
        SCSTTrainer(model=captioner(shapes_clip, tiny_tokenizer), args=scst_config(tmp_path, agg_cos_weight=0.5),
                    images=images_table(shapes_clip).remove_columns("agg_text_features"),
                    corpus=corpus_table(shapes_clip), processing_class=tiny_tokenizer)
    other_clip = clip_metadata("ViT-B-32", "openai", 16, True)
    with pytest.raises(ClipMismatchError, match="training images table"):
        SCSTTrainer(model=captioner(shapes_clip, tiny_tokenizer), args=scst_config(tmp_path),
                    images=images_table(shapes_clip, clip_record_of=other_clip), corpus=corpus_table(shapes_clip),
                    processing_class=tiny_tokenizer)


def write_tiny_run_inputs(shapes_clip, tokenizer, folder: Path, with_test: bool = False):
    """What a tiny train.py run reads, in `folder`: train, val (and test) images tables and the corpus of one CLIP,
    the caption tokenizer, a tiny decoder config (decoder.json) and discriminator config (discriminator.json)."""
    tables = {"train": images_table(shapes_clip), "val": images_table(shapes_clip, count=6, seed=3, split="val"),
              "corpus": corpus_table(shapes_clip)}
    if with_test:
        tables["test"] = images_table(shapes_clip, count=6, seed=4, split="test")
    tables["corpus"].info.description = tables["train"].info.description.replace('"images"', '"corpus"')
    for name, table in tables.items():
        table.save_to_disk(str(folder / name))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "decoder.json").write_text(json.dumps({**tiny_decoder_config(), "n_positions": 32}))
    (folder / "discriminator.json").write_text(json.dumps(TINY_DISCRIMINATOR))


def test_train_script_runs_scst_from_the_init_stage(shapes_clip, tiny_tokenizer, tmp_path):
    write_tiny_run_inputs(shapes_clip, tiny_tokenizer, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "corpus_table": str(tmp_path / "corpus"), "train_table": str(tmp_path / "train"),
        "val_table": str(tmp_path / "val"), "tokenizer_name_or_path": str(tmp_path / "tokenizer"),
        "decoder_config": str(tmp_path / "decoder.json"), "prefix_length": 2, "output_dir": str(tmp_path / "run"),
        "report_to": "none", "disable_tqdm": True, "seed": 0, "per_device_train_batch_size": 4,
        "logging_steps": 1, "save_strategy": "no", "eval_strategy": "steps", "eval_steps": 2,
        "eval_max_new_tokens": 5,
        "init": {"max_steps": 2, "learning_rate": 1e-3, "eval_strategy": "no"},
        "scst": {"init_from_stage": "init", "max_steps": 2, "num_samples": 2, "max_new_tokens": 5,
                 "learning_rate": 1e-3, "eval_on_start": True, "discriminator_config": str(tmp_path / "discriminator.json")},
    }))  # JSON is YAML
    with pytest.raises(SystemExit, match="run `--stage init` first"):
        train.main(["--config", str(recipe), "--stage", "scst"])
    train.main(["--config", str(recipe), "--stage", "init"])
    info = train.main(["--config", str(recipe), "--stage", "scst"])["scst"]
    stage = tmp_path / "run" / "scst"
    assert info["global_step"] == 2 and info["skipped_steps"] == 0 and len(info["discriminator_sha256"]) == 64
    init_weights = SCSTClipCapForCaptioning.from_pretrained(str(tmp_path / "run" / "init" / "final")).state_dict()
    scst_weights = SCSTClipCapForCaptioning.from_pretrained(str(stage / "final")).state_dict()
    assert any(not torch.equal(init_weights[name], scst_weights[name]) for name in init_weights)
    history = json.loads((stage / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_cider" in entry] == [0, 2]
    samples = [json.loads(line) for line in (stage / "rewards.jsonl").read_text().splitlines()]
    assert [line["step"] for line in samples] == [1, 2]
    assert len(samples[0]["reward"]) == 4 * 2 and len(samples[0]["caption_length"]) == 4 * 2


def test_report_says_plainly_when_the_stage_handed_back_its_start(tmp_path):
    from tools.report import write_report

    for best, expected in (("checkpoint-0", "returned the model it started from, unchanged"),
                           ("checkpoint-50", "The stage kept `checkpoint-50`")):
        run = tmp_path / best
        (run / "scst").mkdir(parents=True)
        history = [{"step": step, "eval_cider": 1.0, "eval_attribute_f1": 0.5} for step in (0, 50)]
        (run / "scst" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        info = {"global_step": 50, "train_minutes": 1.0, "num_processes": 1,
                "best_checkpoint": str(run / "scst" / best)}
        report = write_report(run, {"scst": info, "eval": {}}, clip_lines=["swap test: shape 0.706"]).read_text()
        assert expected in report
        assert "## What the CLIP sees" in report and "- swap test: shape 0.706" in report
        assert ("did not" in report or "No checkpoint" in report) == (best == "checkpoint-0")


def test_accelerate_configs_load_and_use_known_settings():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    launch_settings = vars(launch_command_parser().parse_args(["train.py"]))
    found = {}
    for path in sorted((PROJECT_ROOT / "configs" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        found[path.stem] = config.distributed_type
        assert config.mixed_precision != "fp16", path.name
        nested = {**(config.deepspeed_config or {}),
                  **{k if k.startswith("fsdp") else f"fsdp_{k}": v for k, v in (config.fsdp_config or {}).items()}}
        assert set(nested) <= set(launch_settings), (path.name, set(nested) - set(launch_settings))
    assert set(found.values()) >= {DistributedType.MULTI_GPU, DistributedType.DEEPSPEED, DistributedType.FSDP}
    deepspeed = load_config_from_file(str(PROJECT_ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"))
    assert deepspeed.deepspeed_config["zero_stage"] == 3 and deepspeed.deepspeed_config["zero3_init_flag"] is False


# ---- two processes


def test_two_processes_end_with_identical_weights(shapes_clip, tiny_tokenizer, tmp_path):
    work = tmp_path / "work"
    tiny_tokenizer.save_pretrained(str(work / "tokenizer"))
    captioner(shapes_clip, tiny_tokenizer).save_pretrained(str(work / "model"))
    images_table(shapes_clip).save_to_disk(str(work / "images"))
    corpus_table(shapes_clip).save_to_disk(str(work / "corpus"))
    (work / "discriminator.json").write_text(json.dumps(TINY_DISCRIMINATOR))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         __file__, str(work)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((work / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["distributed_type"] == "MULTI_CPU" and r["num_processes"] == 2 for r in ranks)
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3
    assert ranks[0]["generator"] == ranks[1]["generator"] and ranks[0]["discriminator"] == ranks[1]["discriminator"]
    assert ranks[0]["generator"] != ranks[0]["generator_before"]
    assert ranks[0]["discriminator"] != ranks[0]["discriminator_before"]
    assert ranks[0]["first_images"] != ranks[1]["first_images"]  # the ranks really saw different images


def fingerprint(state_dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def two_process_run(work: Path):
    """One rank of the two-process test: 3 scst steps of 2 micro-batches on the saved tiny setup, then its weights'
    fingerprints."""
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    model = SCSTClipCapForCaptioning.from_pretrained(str(work / "model"))
    config = SCSTConfig(
        output_dir=str(work / "run"), per_device_train_batch_size=2, num_samples=2, max_new_tokens=5,
        learning_rate=3e-3, discriminator_learning_rate=3e-3, discriminator_config=str(work / "discriminator.json"),
        max_steps=3, gradient_accumulation_steps=2, report_to="none", save_strategy="no", seed=0, use_cpu=True,
        disable_tqdm=True, semantic_share=0.5, mmd_weight=0.1, discriminator_steps=2, discriminator_replay=8)
    trainer = SCSTTrainer(model=model, args=config, images=load_from_disk(str(work / "images")),
                          corpus=load_from_disk(str(work / "corpus")), processing_class=tokenizer)
    before = weights(trainer)
    first_batch = next(iter(trainer.get_train_dataloader()))["prefix_features"][0, :3].tolist()
    trainer.train()
    after = weights(trainer)
    state = trainer.accelerator.state
    report = {"distributed_type": state.distributed_type.value, "num_processes": state.num_processes,
              "process_index": state.process_index, "global_step": trainer.state.global_step,
              "first_images": first_batch,
              **{network: fingerprint(after[network]) for network in after},
              **{f"{network}_before": fingerprint(before[network]) for network in before}}
    (work / f"rank{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    two_process_run(Path(sys.argv[1]))


@pytest.mark.parametrize("recipe", sorted((PROJECT_ROOT / "configs").glob("*.yaml")), ids=lambda path: path.stem)
def test_shipped_recipes_parse_for_every_stage(recipe):
    settings = train.read_recipe(str(recipe))
    for stage in [stage for stage in train.RECIPE_STAGES if stage in settings] or ["init"]:
        script, config = train.parse_stage(stage, settings, [])
        assert script.stage == stage
        if stage == "scst":
            assert isinstance(config, SCSTConfig) and (script.init_from_stage or script.model_name_or_path)


def test_the_earlier_and_the_seeds_flag_names_are_aliases(tmp_path):
    parser = HfArgumentParser(SCSTConfig)
    (config,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--reward_weight", "0.3",
                                                    "--gan_training_steps", "2", "--gan_warm_steps", "7",
                                                    "--reward_ramp", "constant"])
    assert (config.semantic_share, config.naturalness_only_steps, config.semantic_ramp_steps,
            config.semantic_ramp) == (0.3, 2, 7, "constant")


def test_cgtgan_recipe_is_cgtgans_published_defaults():
    """configs/coco_cgtgan.yaml against CgT-GAN's cgtgan.py defaults (128 images a step on 4 GPUs)."""
    _, config = train.parse_stage("scst", train.read_recipe(str(PROJECT_ROOT / "configs" / "coco_cgtgan.yaml")), [])
    published = dict(semantic_share=0.5, naturalness_only_steps=150, semantic_ramp_steps=2350, semantic_ramp="linear",
                     advantage_scaling="none", baseline="greedy", num_samples=5, max_new_tokens=20,
                     clip_cos_weight=0.0, agg_cos_weight=0.5, agg_l1_weight=0.5, learning_rate=1e-5,
                     discriminator_learning_rate=1e-5, warmup_steps=150, weight_decay=0.05,
                     discriminator_weight_decay=0.05, max_grad_norm=1.0, discriminator_max_grad_norm=1.0,
                     num_train_epochs=50, mmd_weight=0.0, sample_temperature=1.0, sample_top_k=0, sample_top_p=1.0,
                     discriminator_name_or_path="roberta-base", metric_for_best_model="cider", eval_on_start=False,
                     eval_max_new_tokens=20)
    assert {name: getattr(config, name) for name in published} == published
    assert config.per_device_train_batch_size * 4 == 128
    # the seed's own run: share 0.5 by a linear ramp over 1000 steps, the MMD term on, constant rate 1e-5
    _, seed_run = train.parse_stage("scst", train.read_recipe(str(PROJECT_ROOT / "configs" /
                                                                  "coco_shutterstock.yaml")), [])
    assert (seed_run.semantic_share, seed_run.semantic_ramp_steps, seed_run.semantic_ramp) == (0.5, 1000, "linear")
    assert seed_run.mmd_weight > 0 and seed_run.learning_rate == 1e-5 and seed_run.lr_scheduler_type == "constant"


# ---- the gradient is on-policy, and the stage learns


def test_samples_are_scored_under_the_distribution_they_were_drawn_from(shapes_clip, tiny_tokenizer, tmp_path):
    """Scored in training mode, as the loss is, a sample's token log-probabilities are those of the distribution it
    was drawn from: no dropout (the captioner has some, which the stage switches off) and the same temperature and
    top-k, here recomputed by hand in evaluation mode."""
    assert SCSTClipCapConfig(decoder_config=tiny_decoder_config()).decoder_config.resid_pdrop > 0
    temperature, top_k = 0.7, 4
    trainer = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path, num_samples=3,
                                                                    sample_temperature=temperature, sample_top_k=top_k))
    model = trainer.model.train()  # as Trainer.training_step leaves it
    features = torch.tensor(images_table(shapes_clip)["clip_features"][:4]).repeat_interleave(3, 0)
    samples = trainer.roll_out(features[::3])[0]
    with torch.no_grad():
        scored, mask, _ = trainer.sample_log_probs(model, features, samples)
        scored_again = trainer.sample_log_probs(model, features, samples)[0]
        logits = model.eval()(prefix_features=features, input_ids=samples, attention_mask=mask,
                              logits_to_keep=samples.shape[1] + 1).logits[:, :-1] / temperature
    kth_best = logits.topk(top_k, dim=-1).values[..., -1:]
    expected = logits.masked_fill(logits < kth_best, float("-inf")).log_softmax(-1)
    expected = expected.gather(-1, samples[..., None]).squeeze(-1)
    assert torch.isfinite(expected[mask.bool()]).all()  # every sampled token lies in the top k
    torch.testing.assert_close(scored[mask.bool()], expected[mask.bool()])
    assert torch.equal(scored, scored_again)


def test_sampling_and_rewards_run_under_the_autocast_of_the_loss(shapes_clip, tiny_tokenizer, tmp_path):
    """Under bf16 the rollout runs in the loss's autocast: the prefix `generate` maps outside the forward is computed
    in bf16 as the loss's forward computes it (on-policy), the CLIP text tower and the discriminator score in bf16 as
    the discriminator already learns, and the rewards and advantages come back in float32."""
    trainer = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path, bf16=True, max_steps=1))
    networks = {"captioner's mapper": trainer.model.mapper, "CLIP text tower": trainer.rewards.clip.model.transformer,
                "discriminator": trainer.discriminator.model}
    output_dtypes = {name: set() for name in networks}
    for name, network in networks.items():
        for module in network.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda _, __, output, name=name: output_dtypes[name].add(output.dtype))
    batches = []
    generate_and_score = trainer.generate_and_score
    trainer.generate_and_score = lambda inputs: batches.append(generate_and_score(inputs)) or batches[-1]
    trainer.train()
    assert output_dtypes == {name: {torch.bfloat16} for name in networks}
    assert batches[0].advantages.dtype == torch.float32
    features = torch.tensor(trainer.train_dataset["clip_features"][:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = trainer.rewards(["a red circle", "a blue square"], features, features)
    assert {values.dtype for values in scores.values()} == {torch.float32}


def greedy_semantic_reward(trainer, features) -> float:
    captions = trainer.model.generate_captions(features, tokenizer=trainer.processing_class, do_sample=False,
                                               max_new_tokens=6)
    return trainer.rewards(captions, features)["clip_cos"].mean().item()


def test_scst_raises_the_greedy_captions_reward_where_a_no_op_stage_does_not(shapes_clip, tiny_tokenizer, tmp_path):
    """A few dozen steps on the CLIP reward raise the greedy captions' CLIP score of the training images; the same
    steps at learning rate 0 (a stage that does nothing) leave it where it was."""
    gains = {}
    for learning_rate in (0.0, 3e-3):
        config = scst_config(tmp_path / str(learning_rate), max_steps=40, num_samples=4, semantic_share=1.0,
                             baseline="mean", learning_rate=learning_rate, logging_steps=40)
        trainer = make_trainer(shapes_clip, tiny_tokenizer, config)
        features = torch.tensor(trainer.train_dataset["clip_features"])
        before = greedy_semantic_reward(trainer, features)
        trainer.train()
        gains[learning_rate] = greedy_semantic_reward(trainer, features) - before
    assert gains[0.0] == 0.0
    assert gains[3e-3] > 1.0


def teach_discriminator(discriminator: Discriminator, real: list[str], vocabulary: list[str], steps: int = 30):
    """Train the discriminator to tell corpus sentences from word salad of the same words (empty included)."""
    rng = random.Random(0)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=3e-3)
    for _ in range(steps):
        fake = [" ".join(rng.choices(vocabulary, k=rng.randint(0, 6))) for _ in range(16)]
        loss = discriminator.loss(rng.choices(real, k=16), fake).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_naturalness_steps_raise_the_discriminators_score_where_a_no_op_stage_does_not(shapes_clip, tiny_tokenizer,
                                                                                       tmp_path):
    """A hundred steps on the discriminator's reward alone (semantic share 0) raise its score of the greedy
    captions; the same steps at learning rate 0 leave it where it was. The discriminator first learns corpus sentences
    from word salad and is then held fixed (learning rate 0), so the score measures the captioner alone: a stage whose
    naturalness reward had no share would not move it."""
    gains = {}
    for learning_rate in (0.0, 3e-3):
        config = scst_config(tmp_path / str(learning_rate), max_steps=100, num_samples=4, semantic_share=0.0,
                             baseline="mean", learning_rate=learning_rate, logging_steps=40,
                             discriminator_learning_rate=0.0)
        trainer = make_trainer(shapes_clip, tiny_tokenizer, config)
        corpus = corpus_table(shapes_clip)["text"]
        teach_discriminator(trainer.discriminator, corpus, sorted({word for text in corpus for word in text.split()}))
        features = torch.tensor(trainer.train_dataset["clip_features"])
        generate = functools.partial(trainer.model.generate_captions, features, tokenizer=tiny_tokenizer,
                                     do_sample=False, max_new_tokens=6)
        before = trainer.discriminator.scores(generate())
        trainer.train()
        gains[learning_rate] = (trainer.discriminator.scores(generate()) - before).mean().item()
    assert gains[0.0] == 0.0
    assert gains[3e-3] > 0.5


def test_further_discriminator_updates_learn_from_fresh_sentences_and_replayed_captions(shapes_clip, tiny_tokenizer,
                                                                                        tmp_path):
    def trained(**settings):
        trainer = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path / str(len(settings)), max_steps=3,
                                                                        semantic_share=0.5, **settings))
        trainer.train()
        return trainer

    one, several = trained(), trained(discriminator_steps=4, discriminator_replay=10)
    # the schedule counts every update; the further ones log their loss
    assert several.discriminator.scheduler.state_dict()["last_epoch"] == 4 * 3
    assert one.discriminator.scheduler.state_dict()["last_epoch"] == 3
    assert all("discriminator_further_loss" in entry for entry in several.state.log_history if "loss" in entry)
    # the replay keeps the latest captions, at most discriminator_replay of them
    assert several.replay == several.replay[-10:] and len(several.replay) == 10
    assert several.replay[-len(several.finished_step.fakes):] == several.finished_step.fakes
    # the further updates moved the discriminator (with one update a step, the two runs would be the same)
    changed = [not torch.equal(a, b) for a, b in zip(one.discriminator.model.state_dict().values(),
                                                      several.discriminator.model.state_dict().values())]
    assert any(changed)
    with pytest.raises(ValueError, match="discriminator_steps > 1"):
        scst_config(tmp_path, discriminator_replay=10)


def test_shuffled_control_rewards_each_caption_against_another_image(shapes_clip, tiny_tokenizer, tmp_path):
    trainer = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path, shuffle_semantic_reward=True,
                                                                    baseline="mean"))
    features = torch.tensor(trainer.train_dataset["clip_features"][:3])
    captions = ["a red circle", "a blue square", "a small green triangle"]
    texts = [c for c in captions for _ in range(2)]
    rewards = trainer.caption_rewards(texts, features, None, torch.tensor([0, 0, 1, 1, 2, 2]))
    against_next = trainer.rewards(texts, features[[1, 1, 2, 2, 0, 0]])["clip_cos"]
    torch.testing.assert_close(rewards["clip_cos"], against_next)
    with pytest.raises(ValueError, match="per_device_train_batch_size >= 2"):
        scst_config(tmp_path, shuffle_semantic_reward=True, per_device_train_batch_size=1)


def test_evaluation_reports_the_discriminators_accuracy_on_sentences_it_never_saw(shapes_clip, tiny_tokenizer,
                                                                                  tmp_path):
    evaluator = CaptionEvaluator(images_table(shapes_clip, count=6, seed=3, split="val"), tiny_tokenizer,
                                 tmp_path / "predictions", generation_kwargs=dict(max_new_tokens=5))
    config = scst_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2,
                         discriminator_heldout_share=0.25)
    trainer = make_trainer(shapes_clip, tiny_tokenizer, config, evaluator=evaluator)
    corpus = corpus_table(shapes_clip)
    assert len(trainer.heldout_sentences) == len(corpus) // 4
    streamed = set(trainer.corpus_stream.take(0, len(trainer.corpus_stream))["text"])
    assert not streamed & set(trainer.heldout_sentences)
    assert streamed | set(trainer.heldout_sentences) == set(corpus["text"])
    trainer.train()
    evaluation = next(entry for entry in trainer.state.log_history if "eval_cider" in entry)
    assert 0.0 <= evaluation["eval_discriminator_accuracy_real"] <= 1.0
    assert 0.0 <= evaluation["eval_discriminator_accuracy_fake"] <= 1.0
