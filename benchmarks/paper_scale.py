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
process's peak resident set; on a GPU also torch's peak allocated memory). The scst step is broken down (sampling with
the greedy row, CLIP text tower, discriminator scoring, teacher-forced forward + backward, discriminator update,
captioner optimizer step, the rest) by timing the trainer's own methods in the run; then each part is run again on its
own (plain library calls on the step's captured inputs) and the step is compared to the sum of those standalone
times (target: within 1.3x, no hidden waste), and to a teacher-forced cross-entropy step on the same sequences
(`scst_step / ce_step`, per sequence). Two savings are measured beside it: CLIP's text tower run on the positions the
captions use rather than on its whole context (77 positions; same features, checked), and the rollout (sampling,
CLIP's text tower, the discriminator's scoring) run inside the step's autocast rather than outside it.

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
    tables = ["--val_table", str(data / "coco" / "val"), "--test_table", str(data / "coco" / "test")]
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


def worker(stage: str, result_path: Path, device: str, train_argv: list[str]):
    from transformers import Trainer, TrainerCallback

    import train
    from trainers import ClipRewards, Discriminator, SCSTTrainer
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
    # The scst step's parts: non-overlapping calls made by SCSTTrainer.training_step / finish_step.
    timings.wrap(SCSTTrainer, "roll_out", "sampling")
    timings.wrap(ClipRewards, "__call__", "clip_text_tower")
    timings.wrap(Discriminator, "scores", "discriminator_scoring")
    timings.wrap(Trainer, "training_step", "teacher_forced_fwd_bwd")  # the captioner's loss + backward (super call)
    timings.wrap(SCSTTrainer, "train_discriminator", "discriminator_update")
    timings.wrap(Discriminator, "clip_gradients", "discriminator_update")
    timings.wrap(Discriminator, "step", "discriminator_update")
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
            # parts per step: discriminator_update has three calls per step (backward, clip, step); sum them per step
            per_step = {}
            for name, values in timings.parts.items():
                if name == "step":
                    continue
                calls = len(values) // len(steps)
                sums = [sum(values[i * calls:(i + 1) * calls]) for i in range(len(steps))]
                per_step[name] = median_ms(sums[1:] or sums)
            per_step["rest"] = round(result["step_ms_median"] - sum(per_step.values()), 1)
            result["in_step_ms"] = per_step
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


def standalone_scst_parts(trainer, captured: dict, device: str, repeats: int = 3) -> dict:
    """Each part of the scst step alone, on the step's captured inputs, by plain library calls; the median of
    `repeats` runs after one warm-up."""
    import torch
    import torch.nn.functional as F
    from transformers import LogitsProcessorList

    from trainers.scst_trainer import GreedyRows, caption_mask

    timings = Timings(device)
    model = trainer.accelerator.unwrap_model(trainer.model)
    args, config = trainer.args, trainer.captioner_config
    features, batch = captured["inputs"]["prefix_features"], captured["batch"]
    texts = batch.sample_texts + (batch.greedy_texts or [])
    rows = args.num_samples + int(args.baseline == "greedy")
    clip, discriminator = trainer.rewards.clip, trainer.discriminator
    encode_text = trainer.rewards.encode_text  # the trainer's own: the tower on the positions the captions use
    autocast = trainer.accelerator.autocast
    captioner_parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(captioner_parameters, lr=1e-12)
    disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=1e-12)

    # Sampling and scoring run as the trainer runs them: under the autocast of the loss (bf16 in the recipe).
    def sampling(mixed_precision: bool = True):
        # Without the outer autocast the prepared forward still autocasts, one token's forward at a time.
        with torch.no_grad(), autocast() if mixed_precision else contextlib.nullcontext():
            out = model.generate(features, do_sample=True, num_return_sequences=rows, max_new_tokens=args.max_new_tokens,
                                 temperature=1.0, top_k=0, top_p=1.0, eos_token_id=config.eos_token_id,
                                 pad_token_id=config.pad_token_id, logits_processor=LogitsProcessorList([GreedyRows(rows)]))
        trainer.processing_class.batch_decode(out, skip_special_tokens=True)

    def clip_text(sentences: list[str] | None = None, mixed_precision: bool = True, whole_context: bool = False):
        with torch.no_grad(), autocast() if mixed_precision else contextlib.nullcontext():
            if whole_context:  # open_clip's encode_text on CLIP's whole context (77 positions)
                return clip.model.encode_text(clip.tokenizer(sentences or texts).to(features.device)).float()
            return encode_text(sentences or texts)

    def disc_scoring(mixed_precision: bool = True):
        with torch.no_grad(), autocast() if mixed_precision else contextlib.nullcontext():
            discriminator.model.eval()
            discriminator.model(**discriminator.encode(texts)).logits

    def disc_update():
        with autocast():
            discriminator.model.train()
            logits = discriminator.model(**discriminator.encode(batch.real["text"] + batch.sample_texts)).logits[:, 0]
        labels = torch.cat((torch.ones(len(batch.real["text"])), torch.zeros(len(batch.sample_texts))))
        F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device)).backward()
        torch.nn.utils.clip_grad_norm_(discriminator.parameters(), 1.0)
        disc_optimizer.step()
        disc_optimizer.zero_grad(set_to_none=True)

    def teacher_forced(labels: bool):
        mask = caption_mask(batch.samples, config.eos_token_id)
        with autocast():
            out = model(prefix_features=batch.prefix_features, input_ids=batch.samples, attention_mask=mask,
                        labels=batch.samples if labels else None, use_cache=False)
            loss = out.loss if labels else out.logits[:, :-1].float().log_softmax(-1).gather(
                -1, batch.samples[..., None]).mean()
        loss.backward()

    def captioner_step():
        torch.nn.utils.clip_grad_norm_(captioner_parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    plan = {"sampling": sampling, "clip_text_tower": clip_text, "discriminator_scoring": disc_scoring,
            "teacher_forced_fwd_bwd": lambda: teacher_forced(False), "discriminator_update": disc_update}
    for name, function in plan.items():
        function()
        for _ in range(repeats):
            with timings.part(name):
                function()
    # the captioner's optimizer step needs gradients: a backward first (untimed)
    for _ in range(repeats + 1):
        teacher_forced(False)
        with timings.part("captioner_optimizer"):
            captioner_step()
    timings.parts["captioner_optimizer"] = timings.parts["captioner_optimizer"][1:]
    measured = {name: median_ms(values) for name, values in timings.parts.items()}
    # A teacher-forced cross-entropy step on the same B*K sequences: forward, backward, optimizer step.
    ce = []
    for index in range(repeats + 1):
        timings.sync()
        started = time.perf_counter()
        teacher_forced(True)
        captioner_step()
        timings.sync()
        if index:
            ce.append(time.perf_counter() - started)
    # Saving: CLIP's text tower on the positions the captions use instead of its whole context (causal mask, pooling
    # at the end token: the positions after it do not change the feature), both in float32 to compare the features.
    # The rehearsal's random captions are long byte salad; the corpus sentences stand for a trained captioner's.
    contexts = {}
    for label, sentences in (("rehearsal_captions", texts), ("corpus_sentences", batch.real["text"][:len(texts)])):
        tokens = clip.tokenizer(sentences)
        whole = clip_text(sentences, mixed_precision=False, whole_context=True)
        cut = clip_text(sentences, mixed_precision=False)
        parts = Timings(device)
        for _ in range(repeats):
            with parts.part("cut"):
                clip_text(sentences, mixed_precision=False)
            with parts.part("whole"):
                clip_text(sentences, mixed_precision=False, whole_context=True)
        positions = encode_text.causal_tower.positions(tokens) if encode_text.causal_tower else tokens.shape[1]
        contexts[label] = {"context": int(tokens.shape[1]), "positions_run": int(positions), "rows": len(sentences), "whole_context_ms": median_ms(parts.parts["whole"]),
                           "cut_ms": median_ms(parts.parts["cut"]),
                           "max_abs_difference": float((whole - cut).abs().max())}
    # Saving: the rollout inside the run's autocast (bf16 in the recipe) instead of outside it: the reward models in
    # float32 then, and the sampling's forwards each in an autocast of their own (casting the weights at every token).
    precision = {}
    for name, part in (("sampling", sampling), ("clip_text_tower", clip_text), ("discriminator_scoring", disc_scoring)):
        parts = Timings(device)
        part(mixed_precision=False)
        for _ in range(repeats):
            with parts.part("outside"):
                part(mixed_precision=False)
            with parts.part("inside"):
                part()
        precision[name] = {"outside_autocast_ms": median_ms(parts.parts["outside"]),
                           "inside_autocast_ms": median_ms(parts.parts["inside"])}
    return {
        "standalone_ms": measured,
        "ce_step_ms": median_ms(ce),
        "clip_text_context": contexts,
        "rollout_precision": {"mixed_precision": trainer.accelerator.mixed_precision, **precision},
        "sample_caption_tokens": float(caption_mask(batch.samples, config.eos_token_id).sum(1).float().mean()),
        "discriminator_tokens": int(discriminator.encode(texts)["input_ids"].shape[1]),
    }


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
              f"{scst['step_over_sum_of_parts']} (target <= 1.3)")
        print(f"scst step / teacher-forced CE step on the same {scst['sequences_per_step']} sequences: "
              f"{scst['scst_over_ce_per_sequence']}x per sequence (CE step {scst['ce_step_ms']} ms)")
        for label, context in scst["clip_text_context"].items():
            print(f"CLIP text tower on {context['rows']} {label.replace('_', ' ')} (float32): "
                  f"{context['positions_run']} positions run instead of {context['context']}, "
                  f"{context['whole_context_ms']} ms -> "
                  f"{context['cut_ms']} ms, same features within {context['max_abs_difference']:.1e}")
        precision = scst["rollout_precision"]
        for name in ("sampling", "clip_text_tower", "discriminator_scoring"):
            print(f"{name.replace('_', ' ')}: {precision[name]['outside_autocast_ms']} ms outside the step's "
                  f"{precision['mixed_precision']} autocast -> {precision[name]['inside_autocast_ms']} ms inside")


if __name__ == "__main__":
    main()
