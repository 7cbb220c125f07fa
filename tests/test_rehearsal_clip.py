"""Random CLIP weights only for a rehearsal (`benchmarks/paper_scale.py`): refused unless switched on, seeded alike;
at that real size (ViT-B-32) the rewards' text tower runs on the captions' own positions."""

import pytest
import torch

import prepare_datasets
import train
from clip_scstclipcap import REHEARSAL_ENV, REHEARSAL_WEIGHTS, CaptioningClip
from trainers.rewards import ClipRewards

SMALL = "RN50"  # any built-in architecture; the refusal comes before any weights are made


def test_random_rehearsal_weights_are_refused_without_the_flag(monkeypatch):
    monkeypatch.delenv(REHEARSAL_ENV, raising=False)
    with pytest.raises(ValueError, match="pass --rehearsal"):
        CaptioningClip.load(SMALL, REHEARSAL_WEIGHTS)
    with pytest.raises(ValueError, match="needs pretrained weights"):
        CaptioningClip.load(SMALL, None)  # a real run's refusal is unchanged


def test_rehearsal_weights_are_the_same_in_every_load_and_leave_the_generator_alone(monkeypatch):
    monkeypatch.setenv(REHEARSAL_ENV, "1")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = CaptioningClip.load("ViT-B-32", REHEARSAL_WEIGHTS)
    assert torch.equal(torch.rand(1), expected_next)  # the global generator is untouched
    second = CaptioningClip.load("ViT-B-32", REHEARSAL_WEIGHTS)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert first.pretrained == REHEARSAL_WEIGHTS


def test_the_flags_switch_the_rehearsal_on(monkeypatch):
    monkeypatch.delenv(REHEARSAL_ENV, raising=False)
    assert prepare_datasets.build_parser().parse_args(
        ["corpus", "--source", "text", "--input", "x.txt", "--rehearsal"]).rehearsal
    assert train.HfArgumentParser(train.ScriptArguments).parse_known_args(["--rehearsal"])[0].rehearsal


def test_the_recipes_clip_scores_captions_on_their_own_positions(monkeypatch):
    """ViT-B-32 (77 positions) scores the rewards' captions on the positions up to the longest one's end token, with
    the features of its whole context (at real size: 12 layers of float sums in another order)."""
    monkeypatch.setenv(REHEARSAL_ENV, "1")
    clip = CaptioningClip.load("ViT-B-32", REHEARSAL_WEIGHTS)
    positions = []
    clip.model.transformer.register_forward_hook(lambda _, inputs, __: positions.append(inputs[0].shape[1]))
    captions = ["a man riding a wave on top of a surfboard.", "a plate of food."]
    rewards = ClipRewards(clip)
    tokens = clip.tokenizer(captions)
    with torch.no_grad():
        full = clip.model.encode_text(tokens)
    positions.clear()
    torch.testing.assert_close(rewards.encode_text(captions), full, atol=1e-5, rtol=1e-5)
    assert positions == [int((tokens != 0).sum(dim=1).max())] and tokens.shape[1] == 77
