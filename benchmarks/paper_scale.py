"""The published recipe (`configs/coco_shutterstock.yaml`) rehearsed at its real model sizes, offline.

    python benchmarks/paper_scale.py                               # CPU, one thread, about 6 minutes
    python benchmarks/paper_scale.py --device cuda --threads 0     # one GPU (see benchmarks/paper_scale_gpu.sh)
    python benchmarks/paper_scale.py --workdir /tmp/ps --keep      # keep the world, tables and runs

What it builds, in `--workdir` (a temporary folder by default), with no download:
- a synthetic COCO: `--images` 224 px images (coloured shapes on textured backgrounds) with five captions each, in
  OSCAR's `coco_caption` layout (`{train,val,test}_caption.json` rows naming their files), and a ShutterStock-style
  sentence file (one sentence a line) describing other scenes;
- a byte-level BPE trained here with `tokenizers` at GPT-2's vocabulary size (50257) in a GPT-2 folder with GPT-2
  small at its real shape (124 M parameters, random weights), and the discriminator at roberta-base's shape (125 M,
  random weights, a one-logit head) with its own byte-level BPE at roberta-base's vocabulary size (50265) in a
  RoBERTa tokenizer, so captions travel between two tokenizers as in the real recipe;
- the tables, by the real commands: `prepare_datasets.py coco` / `corpus --source shutterstock` / `pseudo-pairs` /
  `aggregate`, with open_clip `ViT-B-32` at random (seeded) weights, `--clip-pretrained random-rehearsal`, which only
  `--rehearsal` allows (real runs keep refusing random CLIP weights).

Then every stage of the recipe through `train.py --config configs/coco_shutterstock.yaml` (its batch sizes,
learning rates, bf16 for scst...), each in its own process for `--init-steps` / `--scst-steps` / `--supervised-steps`
steps, and `eval` on the test split. Per stage: the median step time (first step left out), peak memory (the
process's peak resident set; on a GPU also torch's peak allocated memory).

The scst step is broken down by timing the trainer's own methods inside the run: the rollout (`roll_out`: sampling
with the greedy row, decoding), CLIP's text tower (`rewards`) and the discriminator's scoring (`Discriminator.scores`),
the two halves of `caption_rewards`; `advantages`; the loss's forward + backward (`compute_loss` and its backward, in
`Trainer.training_step`); the discriminator's update (`train_discriminator`, then `finish_step`'s
`Discriminator.clip_gradients` and `Discriminator.step`); the captioner's clipping (`Trainer._clip_grad_norm`) and
optimizer step (`trainer.optimizer.step()`); the rest. Then the same methods are called again one at a time, outside
the Trainer's loop, on the step's captured inputs (the median of 3 after a warm-up), so the step over the sum of these
standalone parts is what the Trainer's loop adds of its own (target: within 1.3x, no hidden waste). The step is also
compared to a teacher-forced cross-entropy step on the same sequences (the model's own loss on labels, backward, the
trainer's clipping and optimizer step; `scst_step / ce_step`, per sequence). Two savings are measured beside it:
CLIP's text tower run on the positions the captions use (the rewards' own encoder) rather than on its whole context
(open_clip's `encode_text` on 77 positions; same features, checked), and `roll_out` and `caption_rewards` run inside
the step's autocast, as `generate_and_score` runs them, rather than outside it.

Everything lands in `<workdir>/paper_scale.json` and a table on stdout. Weights are random: the timings are real,
the captions and metrics are not. Step times on a shared CPU vary; run it on an idle machine for figures you quote.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "coco_shutterstock.yaml"
CLIP_ARGS = ["--clip-model", "ViT-B-32", "--clip-pretrained", "random-rehearsal", "--rehearsal"]
GPT2_VOCAB, ROBERTA_VOCAB = 50257, 50265

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "grey"]
SHAPES = ["circle", "square", "triangle", "ball", "box", "kite", "sign", "plate"]
PLACES = ["on a table", "in a field", "near the water", "on the street", "in a kitchen", "on the grass",
          "next to a wall", "in the snow", "on a beach", "under a tree"]
SUBJECTS = ["a man", "a woman", "a dog", "a cat", "two people", "a child", "a group of people", "a bird"]
ACTIONS = ["holding", "looking at", "standing next to", "sitting beside", "playing with", "walking past"]
STYLES = ["", "close-up of ", "view of ", "photo of ", "portrait of "]


# ---------------------------------------------------------------------------------------------- the synthetic world

def caption(rng: random.Random, colour: str, shape: str) -> str:
    subject, action, place = rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(PLACES)
    forms = [f"{subject} {action} a {colour} {shape} {place}.", f"a {colour} {shape} {place}.",
             f"there is a {colour} {shape} {place} with {subject}.", f"{subject} {place} {action} a {shape}."]
    return rng.choice(forms)


def make_world(folder: Path, num_images: int, num_sentences: int, seed: int = 0) -> dict:
    """Images in OSCAR's layout and a ShutterStock-style sentence file; returns the paths."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images_dir, annotations = folder / "images", folder / "coco_caption"
    splits = {"val": max(8, num_images // 6), "test": max(8, num_images // 6)}
    splits["train"] = num_images - splits["val"] - splits["test"]
    image_id = 0
    for split, count in splits.items():
        (images_dir / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for _ in range(count):
            image_id += 1
            colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
            noise = np.random.default_rng(image_id).integers(0, 256, (224, 224, 3), dtype=np.uint8)
            image = Image.fromarray(noise).convert("RGB")
            draw = ImageDraw.Draw(image)
            x, y, size = rng.randint(20, 140), rng.randint(20, 140), rng.randint(30, 80)
            draw.ellipse((x, y, x + size, y + size), fill=colour) if shape in ("circle", "ball", "plate") else \
                draw.rectangle((x, y, x + size, y + size), fill=colour)
            file_name = f"{split}/{image_id:06d}.jpg"
            image.save(images_dir / file_name, quality=90)
            rows += [{"image_id": image_id, "id": image_id * 10 + k, "caption": caption(rng, colour, shape),
                      "file_name": file_name} for k in range(5)]
        annotations.mkdir(parents=True, exist_ok=True)
        (annotations / f"{split}_caption.json").write_text(json.dumps(rows))
    sentences, seen = [], set()
    while len(sentences) < num_sentences:
        sentence = rng.choice(STYLES) + caption(rng, rng.choice(COLOURS), rng.choice(SHAPES))
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    corpus = folder / "shutterstock_sentences.txt"
    corpus.write_text("\n".join(sentences) + "\n")
    return {"images": str(images_dir), "annotations": str(annotations), "corpus": str(corpus), "splits": splits}


def filler_text(seed: int, words: int = 600_000, lexicon: int = 90_000) -> list[str]:
    """Pseudo-words with a Zipf-like frequency, so that a byte-level BPE finds enough merges to reach GPT-2's
    vocabulary size; the captions' own words are learnt from the sentences beside them."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
               1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    vocabulary = ["".join(rng.choices(letters, weights, k=rng.randint(2, 11))) for _ in range(lexicon)]
    ranks = [1.0 / (rank + 10) for rank in range(lexicon)]
    chosen = rng.choices(vocabulary, ranks, k=words)
    return [" ".join(chosen[start:start + 12]) for start in range(0, words, 12)]


def make_models(folder: Path, sentences: list[str]) -> dict:
    """GPT-2 small (random weights) with a byte-level BPE at 50257 tokens; roberta-base's shape (random weights,
    one logit) with its own BPE at 50265 tokens. Returns folders and timings."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, RobertaConfig, RobertaForSequenceClassification,
        RobertaTokenizerFast,
    )

    timings = {}
    text = sentences * 20 + filler_text(0)
    started = time.perf_counter()
    gpt2_dir, roberta_dir = folder / "gpt2-small-random", folder / "roberta-base-random"
    for target, size, specials in ((gpt2_dir, GPT2_VOCAB, ["<|endoftext|>"]),
                                   (roberta_dir, ROBERTA_VOCAB, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])):
        bpe = ByteLevelBPETokenizer(add_prefix_space=False)
        bpe.train_from_iterator(text, vocab_size=size, min_frequency=2, special_tokens=specials, show_progress=False)
        if bpe.get_vocab_size() != size:
            raise RuntimeError(f"the BPE reached {bpe.get_vocab_size()} tokens, not {size}: more filler text needed")
        target.mkdir(parents=True, exist_ok=True)
        bpe.save_model(str(target))
    timings["tokenizers_s"] = time.perf_counter() - started

    started = time.perf_counter()
    gpt2_tokenizer = GPT2TokenizerFast(vocab=str(gpt2_dir / "vocab.json"), merges=str(gpt2_dir / "merges.txt"))
    assert len(gpt2_tokenizer) == GPT2_VOCAB and gpt2_tokenizer.eos_token_id == 0
    gpt2_tokenizer.save_pretrained(str(gpt2_dir))
    torch.manual_seed(0)
    # GPT-2 small exactly (124 M); its BOS/EOS is our tokenizer's <|endoftext|> (id 0 here, 50256 in OpenAI's).
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(str(gpt2_dir))
    roberta_tokenizer = RobertaTokenizerFast(vocab=str(roberta_dir / "vocab.json"), merges=str(roberta_dir / "merges.txt"))
    assert len(roberta_tokenizer) == ROBERTA_VOCAB and roberta_tokenizer.pad_token_id == 1
    roberta_tokenizer.save_pretrained(str(roberta_dir))
    roberta_config = RobertaConfig(  # roberta-base's config.json
        vocab_size=ROBERTA_VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, num_labels=1)
    RobertaForSequenceClassification(roberta_config).save_pretrained(str(roberta_dir))
    timings["models_s"] = time.perf_counter() - started
    timings["gpt2_parameters_m"] = round(sum(p.numel() for p in gpt2.parameters()) / 1e6, 1)
    return {"gpt2": str(gpt2_dir), "roberta": str(roberta_dir), **timings}


# ------------------------------------------------------------------------------------------------- subprocesses

def run(command: list[str], env: dict, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n" + "\n".join(tail))
    return time.perf_counter() - started


def prepare_tables(world: dict, data: Path, env: dict, log: Path, device: str) -> dict:
    """The recipe's preparation commands, as its header lists them (+ --train-references for the supervised bound)."""
    py = [sys.executable, "prepare_datasets.py"]
    common = CLIP_ARGS + ["--device", device, "--num-workers", "0", "--no-progress", "--batch-size", "32"]
    steps = {
        "coco": py + ["coco", "--images", world["images"], "--annotations", world["annotations"], "--output",
                      str(data), "--train-references"] + common,
        "corpus": py + ["corpus", "--source", "shutterstock", "--input", world["corpus"], "--output", str(data)]
        + common,
        "pseudo_pairs": py + ["pseudo-pairs", "--images", str(data / "coco" / "train"), "--corpus",
                              str(data / "corpus" / "shutterstock")] + common,
        "aggregate": py + ["aggregate", "--images", str(data / "coco" / "train"), "--corpus",
                           str(data / "corpus" / "shutterstock")] + common,
    }
    return {name: round(run(command, env, log), 1) for name, command in steps.items()}


def stage_command(stage: str, args, data: Path, runs: Path, models: dict, result: Path) -> list[str]:
    # Each stage refuses the flags it does not read: the test split is eval's, the validation split the trainings'.
    split = ("--test_table", "test") if stage == "eval" else ("--val_table", "val")
    tables = [split[0], str(data / "coco" / split[1])]
    if stage in ("init", "scst"):
        tables += ["--corpus_table", str(data / "corpus" / "shutterstock")]
    if stage == "init":
        tables += ["--train_table", str(data / "coco" / "train"),
                   "--pseudo_pairs_table", str(data / "coco" / "train_pseudo_pairs_shutterstock")]
    elif stage == "supervised":
        tables += ["--train_table", str(data / "coco" / "train")]  # made with --train-references
    elif stage == "scst":
        tables += ["--train_table", str(data / "coco" / "train_agg_shutterstock")]
    train = ["--config", str(RECIPE), "--stage", stage, "--rehearsal", "--output_dir", str(runs)] + tables
    steps = {"init": args.init_steps, "scst": args.scst_steps, "supervised": args.supervised_steps}
    if stage == "init":
        train += ["--decoder_name_or_path", models["gpt2"]]
    if stage == "supervised":
        train += ["--decoder_name_or_path", models["gpt2"]]
    if stage == "scst":
        train += ["--discriminator_name_or_path", models["roberta"], "--eval_on_start", "false"]
    if stage == "eval":
        train += ["--model_name_or_path", str(runs / "scst" / "final"), "--per_device_eval_batch_size", "8"]
    else:
        # Few steps, no evaluation or checkpoint inside them (the eval stage measures evaluation); logging every step.
        train += ["--max_steps", str(steps[stage]), "--eval_strategy", "no", "--save_strategy", "no",
                  "--load_best_model_at_end", "false", "--logging_steps", "1", "--report_to", "none",
                  "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    return [sys.executable, __file__, "--worker", stage, "--result", str(result), "--device", args.device,
            "--threads", str(args.threads), "--"] + train


# ------------------------------------------------------------------------------------- the worker (one stage)

class Timings:
    """Wall time of named parts, with the device synchronised around each."""

    def __init__(self, device: str):
        self.device = device
        self.parts = defaultdict(list)
        self.active = True

    def sync(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def part(self, name: str):
        self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            if self.active:
                self.parts[name].append(time.perf_counter() - started)

    def wrap(self, owner, method: str, name: str):
        original = getattr(owner, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.part(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)


def peak_memory_mb(device: str) -> dict:
    peaks = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        import torch

        peaks["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def median_ms(values: list[float]) -> float | None:
    return round(1000 * statistics.median(values), 1) if values else None


def wrap_step_parts(timings: Timings):
    """Time the scst step's parts in the run: non-overlapping calls made by SCSTTrainer.training_step / finish_step
    and the Trainer's loop (its optimizer step is timed by StepTimer); standalone_scst_parts calls the same methods
    one at a time."""
    from transformers import Trainer

    from trainers import ClipRewards, Discriminator, SCSTTrainer

    timings.wrap(SCSTTrainer, "roll_out", "rollout")
    timings.wrap(ClipRewards, "__call__", "clip_text_tower")  # with the next one: caption_rewards
    timings.wrap(Discriminator, "scores", "discriminator_scoring")
    timings.wrap(SCSTTrainer, "advantages", "advantages")
    timings.wrap(Trainer, "training_step", "loss_fwd_bwd")  # the captioner's compute_loss + backward (super call)
    timings.wrap(SCSTTrainer, "train_discriminator", "discriminator_update")
    timings.wrap(Discriminator, "clip_gradients", "discriminator_update")
    timings.wrap(Discriminator, "step", "discriminator_update")
    timings.wrap(Trainer, "_clip_grad_norm", "captioner_clip")


def in_step_breakdown(timings: Timings, step_ms: float) -> dict:
    """Median ms per step of each part (first step left out), and the rest of the step. A part called several times
    a step (discriminator_update: backward, clip, step) counts the sum of its calls."""
    steps = len(timings.parts["step"])
    per_step = {}
    for name, values in timings.parts.items():
        if name == "step":
            continue
        calls = len(values) // steps
        sums = [sum(values[i * calls:(i + 1) * calls]) for i in range(steps)]
        per_step[name] = median_ms(sums[1:] or sums)
    per_step["rest"] = round(step_ms - sum(per_step.values()), 1)
    return per_step


def worker(stage: str, result_path: Path, device: str, train_argv: list[str]):
    from transformers import TrainerCallback

    import train
    from trainers import SCSTTrainer
    from trainers.common import CaptionTrainer

    timings = Timings(device)
    trainers = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timings.sync()
            self.begin = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            timings.sync()
            self.optimizer_begin = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            timings.sync()
            timings.parts["captioner_optimizer"].append(time.perf_counter() - self.optimizer_begin)

        def on_step_end(self, args, state, control, **kwargs):
            timings.sync()
            timings.parts["step"].append(time.perf_counter() - self.begin)

    original_init = CaptionTrainer.__init__

    def init_with_timer(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(StepTimer())
        trainers.append(self)

    CaptionTrainer.__init__ = init_with_timer
    wrap_step_parts(timings)
    captured = {}
    original_generate_and_score = SCSTTrainer.generate_and_score

    def capture(self, inputs):
        batch = original_generate_and_score(self, inputs)
        captured.update(inputs=inputs, batch=batch)
        return batch

    SCSTTrainer.generate_and_score = capture

    started = time.perf_counter()
    train.main(train_argv)
    wall = time.perf_counter() - started
    result = {"stage": stage, "wall_s": round(wall, 1), **peak_memory_mb(device)}
    steps = timings.parts.get("step", [])
    if steps:
        counted = steps[1:] or steps  # the first step warms up allocators and caches
        result.update(steps=len(steps), step_ms_median=median_ms(counted), step_ms_all=[round(1000 * s) for s in steps])
        parts = {name: values[1:] or values for name, values in timings.parts.items() if name != "step"}
        if stage == "scst":
            result["in_step_ms"] = in_step_breakdown(timings, result["step_ms_median"])
        else:
            result["in_step_ms"] = {name: median_ms(values) for name, values in parts.items()}
        if stage in ("init", "supervised") and trainers:
            result["sequences_per_step"] = trainers[-1].args.per_device_train_batch_size
    if stage == "scst" and captured:
        timings.active = False
        result.update(standalone_scst_parts(trainers[-1], captured, device))
        result["sum_of_standalone_ms"] = round(sum(result["standalone_ms"].values()), 1)
        result["step_over_sum_of_parts"] = round(result["step_ms_median"] / result["sum_of_standalone_ms"], 3)
        sequences = len(captured["batch"].sample_texts)
        result["sequences_per_step"] = sequences
        result["scst_over_ce_per_sequence"] = round(result["step_ms_median"] / result["ce_step_ms"], 2)
    Path(result_path).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- the scst step's parts, one at a time

def timed_rounds(functions: dict, device: str, repeats: int, prepare=None) -> dict:
    """Median ms of each function over `repeats` rounds after a warm-up round; a round runs `prepare` (untimed), then
    the functions in order, so that parts which feed each other (gradients, then their clipping) stay in order."""
    timings = Timings(device)
    for _ in range(repeats + 1):
        if prepare is not None:
            prepare()
        for name, function in functions.items():
            with timings.part(name):
                function()
    return {name: median_ms(values[1:]) for name, values in timings.parts.items()}


class ScstParts:
    """The trainer's own methods for each part of an scst step, on the step's captured inputs: what
    `SCSTTrainer.training_step` and the Trainer's loop call, here one at a time outside that loop."""

    def __init__(self, trainer, captured: dict):
        import torch

        self.trainer, self.batch, inputs = trainer, captured["batch"], captured["inputs"]
        self.model = trainer.model_wrapped  # the model the Trainer's loop hands to training_step
        self.features, self.agg_features = inputs["prefix_features"], inputs.get("agg_features")
        greedy = self.batch.greedy_texts or []
        self.texts = self.batch.sample_texts + greedy
        # Each caption's image, listed as generate_and_score lists them: the samples image by image, then the greedy.
        images = torch.arange(len(self.features), device=self.features.device)
        self.images = torch.cat((images.repeat_interleave(trainer.args.num_samples), images[:len(greedy)]))
        self.rewards = self.caption_rewards()

    def autocast(self, mixed_precision: bool = True):
        # generate_and_score runs the rollout, the rewards and the advantages under the step's autocast
        return self.trainer.accelerator.autocast() if mixed_precision else contextlib.nullcontext()

    def roll_out(self, mixed_precision: bool = True):
        import torch

        with torch.no_grad(), self.autocast(mixed_precision):
            return self.trainer.roll_out(self.features)

    def caption_rewards(self, mixed_precision: bool = True):
        import torch

        with torch.no_grad(), self.autocast(mixed_precision):
            return self.trainer.caption_rewards(self.texts, self.features, self.agg_features, self.images)

    def clip_text_tower(self):  # caption_rewards' first half: ClipRewards, CLIP's text tower and the scores
        import torch

        agg_features = None if self.agg_features is None else self.agg_features[self.images]
        with torch.no_grad(), self.autocast():
            return self.trainer.rewards(self.texts, self.features[self.images], agg_features)

    def discriminator_scoring(self):  # caption_rewards' second half
        with self.autocast():
            return self.trainer.discriminator.scores(self.texts)

    def advantages(self):
        import torch

        with torch.no_grad(), self.autocast():
            return self.trainer.advantages(self.rewards, len(self.features), bool(self.batch.greedy_texts))

    def loss_fwd_bwd(self):
        # as Trainer.training_step runs it: training mode, its loss context, the accelerator's backward
        self.model.train()
        with self.trainer.compute_loss_context_manager():
            loss = self.trainer.compute_loss(self.model, self.batch)
        self.trainer.accelerator.backward(loss)

    def discriminator_update(self):  # its backward (training_step), then finish_step's clipping and step
        self.trainer.train_discriminator(self.batch.real["text"], self.batch.sample_texts)
        self.trainer.discriminator.clip_gradients()
        self.trainer.discriminator.step()

    def captioner_clip(self):  # the Trainer's loop clips when max_grad_norm > 0, before the optimizer step
        if self.trainer.args.max_grad_norm > 0:
            self.trainer._clip_grad_norm(self.model)

    def captioner_optimizer(self):
        self.trainer.optimizer.step()

    def zero_grad(self):  # as the Trainer's loop after every step: the next backward starts from no gradients
        self.model.zero_grad()

    def ce_step(self):
        """A teacher-forced cross-entropy step on the same sequences (the init stage's kind of step): the model's own
        loss on labels, the accelerator's backward, the trainer's clipping and optimizer step."""
        from trainers.scst_trainer import caption_mask

        mask = caption_mask(self.batch.samples, self.trainer.captioner_config.eos_token_id)
        self.model.train()
        with self.trainer.compute_loss_context_manager():
            loss = self.model(prefix_features=self.batch.prefix_features, input_ids=self.batch.samples,
                              attention_mask=mask, labels=self.batch.samples, use_cache=False).loss
        self.trainer.accelerator.backward(loss)
        self.captioner_clip()
        self.captioner_optimizer()


def standalone_scst_parts(trainer, captured: dict, device: str, repeats: int = 3) -> dict:
    """Each part of the scst step by the trainer's own method, alone, on the step's captured inputs (median of
    `repeats` runs after a warm-up); the teacher-forced cross-entropy step; the two savings. The weights the
    optimizers step do not matter to the timings; the step's metrics these calls gather are dropped at the end."""
    from trainers.scst_trainer import StepState, caption_mask

    if not trainer.accelerator.sync_gradients:  # AcceleratedOptimizer.step would do nothing: nothing to time
        raise RuntimeError("the accelerator is between micro-batches of a step: its optimizer would not step")
    parts = ScstParts(trainer, captured)
    rollout_side = {"rollout": parts.roll_out, "clip_text_tower": parts.clip_text_tower,
                    "discriminator_scoring": parts.discriminator_scoring, "advantages": parts.advantages}
    captioner_side = {name: getattr(parts, name) for name in ("loss_fwd_bwd", "captioner_clip", "captioner_optimizer")}
    measured = {**timed_rounds(rollout_side, device, repeats),
                **timed_rounds(captioner_side, device, repeats, prepare=parts.zero_grad),
                **timed_rounds({"discriminator_update": parts.discriminator_update}, device, repeats)}
    if trainer.args.max_grad_norm <= 0:
        measured.pop("captioner_clip")
    ce = timed_rounds({"ce_step": parts.ce_step}, device, repeats, prepare=parts.zero_grad)["ce_step"]
    # The rehearsal's random captions are long byte salad; the corpus sentences stand for a trained captioner's.
    sentence_sets = {"rehearsal_captions": parts.texts,
                     "corpus_sentences": parts.batch.real["text"][:len(parts.texts)]}
    result = {
        "standalone_ms": measured,
        "ce_step_ms": ce,
        "clip_text_context": clip_context_saving(trainer, sentence_sets, device, repeats),
        "rollout_precision": {"mixed_precision": trainer.accelerator.mixed_precision,
                              **rollout_precision(parts, device, repeats)},
        "sample_caption_tokens": float(caption_mask(parts.batch.samples, trainer.captioner_config.eos_token_id)
                                       .sum(1).float().mean()),
        "discriminator_tokens": int(trainer.discriminator.encode(parts.texts)["input_ids"].shape[1]),
    }
    parts.zero_grad()
    trainer.step = StepState()
    return result


def clip_context_saving(trainer, sentence_sets: dict, device: str, repeats: int) -> dict:
    """Saving: CLIP's text tower on the positions the captions use (the rewards' own encoder) instead of its whole
    context (open_clip's encode_text): with a causal mask and pooling at the end token, the positions after it do not
    change the feature. Both in float32, outside any autocast, to compare the features."""
    import torch

    clip, encode_text = trainer.rewards.clip, trainer.rewards.encode_text
    clip_device = next(clip.model.parameters()).device
    contexts = {}
    for label, sentences in sentence_sets.items():
        tokens = clip.tokenizer(sentences)

        def whole(sentences=sentences):
            with torch.no_grad():
                return clip.model.encode_text(clip.tokenizer(sentences).to(clip_device)).float()

        def cut(sentences=sentences):
            return encode_text(sentences)

        medians = timed_rounds({"cut": cut, "whole": whole}, device, repeats)
        positions = encode_text.causal_tower.positions(tokens) if encode_text.causal_tower else tokens.shape[1]
        contexts[label] = {"context": int(tokens.shape[1]), "positions_run": int(positions), "rows": len(sentences),
                           "whole_context_ms": medians["whole"], "cut_ms": medians["cut"],
                           "max_abs_difference": float((whole() - cut()).abs().max())}
    return contexts


def rollout_precision(parts: ScstParts, device: str, repeats: int) -> dict:
    """Saving: the rollout and the rewards inside the step's autocast (bf16 in the recipe), as generate_and_score runs
    them, instead of outside it: the reward models in float32 then, and the sampling's forwards each in an autocast of
    their own (the prepared forward autocasts, casting the weights again at every token)."""
    medians = timed_rounds({"rollout_outside": lambda: parts.roll_out(mixed_precision=False),
                            "rollout_inside": parts.roll_out,
                            "rewards_outside": lambda: parts.caption_rewards(mixed_precision=False),
                            "rewards_inside": parts.caption_rewards}, device, repeats)
    return {name: {"outside_autocast_ms": medians[f"{name}_outside"], "inside_autocast_ms": medians[f"{name}_inside"]}
            for name in ("rollout", "rewards")}


# -------------------------------------------------------------------------------------------------- orchestration

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where everything goes (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (0: torch's default)")
    parser.add_argument("--images", type=int, default=96, help="synthetic images in all (train / val / test)")
    parser.add_argument("--sentences", type=int, default=400, help="corpus sentences")
    parser.add_argument("--init-steps", type=int, default=3)
    parser.add_argument("--scst-steps", type=int, default=4)
    parser.add_argument("--supervised-steps", type=int, default=2)
    parser.add_argument("--stages", default="init,scst,supervised,eval")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the world, models and tables already in --workdir (and earlier stages' runs)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        os.chdir(ROOT)
        worker(args.worker, Path(args.result), args.device, [a for a in args.rest if a != "--"])
        return

    started = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="paper_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "paper_scale.log"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    report = {"device": args.device, "threads": args.threads, "workdir": str(workdir)}
    try:
        data = workdir / "data"
        previous = workdir / "paper_scale.json"
        if args.reuse and previous.is_file():
            report = {**json.loads(previous.read_text()), **report}
            models = {"gpt2": str(workdir / "models" / "gpt2-small-random"),
                      "roberta": str(workdir / "models" / "roberta-base-random")}
        else:
            t = time.perf_counter()
            world = make_world(workdir / "raw", args.images, args.sentences)
            report["world"] = {"splits": world["splits"], "sentences": args.sentences,
                               "seconds": round(time.perf_counter() - t, 1)}
            print(f"world: {world['splits']} images at 224 px, {args.sentences} sentences", flush=True)
            models = make_models(workdir / "models", Path(world["corpus"]).read_text().splitlines())
            report["models"] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in models.items()}
            print(f"tokenizers and random GPT-2 small / roberta-base: {report['models']}", flush=True)
            report["prepare_s"] = prepare_tables(world, data, env, log, args.device)
            print(f"prepare_datasets.py (s): {report['prepare_s']}", flush=True)
        report.setdefault("stages", {})
        for stage in args.stages.split(","):
            result = workdir / f"{stage}.json"
            command = stage_command(stage, args, data, workdir / "runs", models, result)
            seconds = run(command, env, log)
            report["stages"][stage] = {"process_s": round(seconds, 1), **json.loads(result.read_text())}
            print(f"{stage}: {json.dumps(report['stages'][stage])}", flush=True)
            previous.write_text(json.dumps(report, indent=1))
        report["total_s"] = round(time.perf_counter() - started, 1) + (report.get("total_s", 0) if args.reuse else 0)
        (workdir / "paper_scale.json").write_text(json.dumps(report, indent=1))
        print_summary(report)
        print(f"full results: {workdir / 'paper_scale.json'} (log: {log})")
    finally:
        if not args.keep and args.workdir is None:
            shutil.copy(log, Path(tempfile.gettempdir()) / "paper_scale_last.log") if log.exists() else None
            if (workdir / "paper_scale.json").exists():
                shutil.copy(workdir / "paper_scale.json", Path(tempfile.gettempdir()) / "paper_scale_last.json")
            shutil.rmtree(workdir, ignore_errors=True)


def print_summary(report: dict):
    print(f"\n== paper-scale rehearsal ({report['device']}, {report['threads'] or 'default'} thread(s)), "
          f"total {report['total_s']:.0f} s")
    print("stage       steps  step ms (median)  peak RSS MB  process s")
    for stage, values in report["stages"].items():
        print(f"{stage:<11} {values.get('steps', '-')!s:>5}  {values.get('step_ms_median', '-')!s:>16}  "
              f"{values['peak_rss_mb']:>11}  {values['process_s']:>9}")
    scst = report["stages"].get("scst")
    if scst and "standalone_ms" in scst:
        print("\nscst step part             in step ms  standalone ms")
        for name, value in scst["in_step_ms"].items():
            print(f"{name:<26} {value!s:>10}  {scst['standalone_ms'].get(name, '-')!s:>13}")
        print(f"step {scst['step_ms_median']} ms / sum of standalone parts {scst['sum_of_standalone_ms']} ms = "
              f"{scst['step_over_sum_of_parts']}: the Trainer loop's own overhead (target <= 1.3)")
        print(f"scst step / teacher-forced CE step on the same {scst['sequences_per_step']} sequences: "
              f"{scst['scst_over_ce_per_sequence']}x per sequence (CE step {scst['ce_step_ms']} ms)")
        for label, context in scst["clip_text_context"].items():
            print(f"CLIP text tower on {context['rows']} {label.replace('_', ' ')} (float32): "
                  f"{context['positions_run']} positions run instead of {context['context']}, "
                  f"{context['whole_context_ms']} ms -> "
                  f"{context['cut_ms']} ms, same features within {context['max_abs_difference']:.1e}")
        precision = scst["rollout_precision"]
        for name, method in (("rollout", "roll_out"), ("rewards", "caption_rewards")):
            print(f"{name} ({method}): {precision[name]['outside_autocast_ms']} ms outside the step's "
                  f"{precision['mixed_precision']} autocast -> {precision[name]['inside_autocast_ms']} ms inside")


if __name__ == "__main__":
    main()
