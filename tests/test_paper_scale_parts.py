"""`benchmarks/paper_scale.py` times the scst step's parts by the trainer's own methods, not by code of its own.

    pytest tests/test_paper_scale_parts.py
"""

import functools
import importlib.util
from collections import Counter

import pytest
from transformers import Trainer

from conftest import PROJECT_ROOT
from test_scst_trainer import make_trainer, scst_config, shapes_clip  # noqa: F401 (shapes_clip: a fixture)
from trainers.discriminator import Discriminator
from trainers.rewards import ClipRewards
from trainers.scst_trainer import SCSTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

# What one scst step calls, by the part the benchmark files it under.
STEP_METHODS = [(SCSTTrainer, "roll_out"), (SCSTTrainer, "caption_rewards"), (ClipRewards, "__call__"),
                (Discriminator, "scores"), (SCSTTrainer, "advantages"), (SCSTTrainer, "compute_loss"),
                (SCSTTrainer, "train_discriminator"), (Discriminator, "clip_gradients"), (Discriminator, "step"),
                (Trainer, "_clip_grad_norm")]


def load_paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale", PROJECT_ROOT / "benchmarks" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adamw_steps(trainer) -> float:
    return sum(float(state["step"]) for state in trainer.optimizer.optimizer.state.values())


def counted(function, calls: Counter, name: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    return wrapper


def test_standalone_parts_are_the_trainers_own_methods(shapes_clip, tiny_tokenizer, tmp_path,  # noqa: F811
                                                       monkeypatch):
    paper_scale = load_paper_scale()
    trainer = make_trainer(shapes_clip, tiny_tokenizer, scst_config(tmp_path, max_steps=1, bf16=True))
    captured, generate_and_score = {}, SCSTTrainer.generate_and_score

    def capture(self, inputs):
        batch = generate_and_score(self, inputs)
        captured.update(inputs=inputs, batch=batch)
        return batch

    monkeypatch.setattr(SCSTTrainer, "generate_and_score", capture)
    trainer.train()
    calls = Counter()
    for owner, name in STEP_METHODS:
        monkeypatch.setattr(owner, name, counted(getattr(owner, name), calls, name))
    monkeypatch.setattr(trainer.optimizer, "step", counted(trainer.optimizer.step, calls, "optimizer.step"))
    adam_steps = adamw_steps(trainer)

    result = paper_scale.standalone_scst_parts(trainer, captured, "cpu", repeats=1)

    assert set(result["standalone_ms"]) == {"rollout", "clip_text_tower", "discriminator_scoring", "advantages",
                                            "loss_fwd_bwd", "captioner_clip", "captioner_optimizer",
                                            "discriminator_update"}
    assert all(value > 0 for value in result["standalone_ms"].values()) and result["ce_step_ms"] > 0
    assert set(calls) == {name for _, name in STEP_METHODS} | {"optimizer.step"}
    # The captioner's AdamW really stepped (an accelerator between micro-batches would have skipped it); at the end
    # of the schedule its learning rate is 0, so the weights tell nothing.
    assert adamw_steps(trainer) > adam_steps
    assert {"rollout", "rewards"} <= set(result["rollout_precision"])
    for context in result["clip_text_context"].values():
        assert context["positions_run"] <= context["context"] and context["max_abs_difference"] < 1e-4
    assert not trainer.step.metrics and all(p.grad is None for p in trainer.model.parameters())
