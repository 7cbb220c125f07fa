"""Cost of an SCST step: time per generated sequence of one `SCSTTrainer` step, divided by the time per sequence of a
teacher-forced cross-entropy step (`InitTrainer`), same model and same batch.

    python benchmarks/scst_step.py                      # GPT-2 small shape, 8 images x 5 samples, 20 new tokens
    python benchmarks/scst_step.py --batch-size 4 --repeats 2 --threads 2

The SCST step samples `--num-samples` captions per image plus a greedy one (KV cache, no gradient), scores them with
a tiny random CLIP text tower and a small discriminator, makes one teacher-forced pass over the samples, backward,
the discriminator's step and the captioner's optimizer step. The cross-entropy step trains the same captioner on the
very captions the SCST step sampled (batch size images x samples), forward, backward and optimizer step. Weights are
random (the shapes are what costs); generation runs to `--new-tokens` since a random model hardly ever writes EOS.
Steps alternate between the two so that a slow phase of a shared machine hits both alike; the median counts. On a
CPU the default is one thread: when other jobs share the cores, every small operation of a decoding step waits for
the slowest thread, and the ratio then measures the machine's load more than the step.
Exits non-zero when an SCST step costs more than 2.5x a cross-entropy step per sequence.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_scstclipcap import clip_metadata, save_local_clip  # noqa: E402
from generation import build_model, time_round_robin  # noqa: E402
from trainers import CaptionCollator, InitConfig, InitTrainer  # noqa: E402
from trainers.discriminator import Discriminator  # noqa: E402
from trainers.scst_trainer import SCSTConfig, SCSTTrainer  # noqa: E402

MAX_RATIO = 2.5
PREFIX_DIM = 512
TINY_CLIP = {
    "embed_dim": PREFIX_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SMALL_DISCRIMINATOR = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 512, "max_position_embeddings": 64}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over GPT-2's vocabulary size: token i is the word `w<i>`, the last one is
    `<|endoftext|>`, which also pads (GPT-2's convention)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{index}": index for index in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def images_table(clip_name: str, logit_scale: float, count: int) -> Dataset:
    features = torch.nn.functional.normalize(torch.randn(count, PREFIX_DIM, generator=torch.Generator().manual_seed(1)),
                                             dim=-1)
    table = Dataset.from_dict({"image_id": [str(i) for i in range(count)], "clip_features": features.tolist()})
    table.info.description = json.dumps({"table": "images",
                                         "clip": clip_metadata(clip_name, None, PREFIX_DIM, True, logit_scale)})
    return table


def make_scst_trainer(model, tokenizer, folder: Path, args) -> SCSTTrainer:
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP)
    clip_name = save_local_clip(clip, TINY_CLIP, folder / "clip")
    model.config.clip_model_name, model.config.clip_pretrained = clip_name, None
    config = SCSTConfig(output_dir=str(folder / "scst"), per_device_train_batch_size=args.batch_size,
                        num_samples=args.num_samples, max_new_tokens=args.new_tokens, semantic_share=0.5,
                        report_to="none", use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    corpus = Dataset.from_dict({"text": [" ".join(f"w{i + j}" for j in range(8)) for i in range(256)]})
    discriminator = Discriminator.from_config(SMALL_DISCRIMINATOR, tokenizer)
    return SCSTTrainer(model=model, args=config, images=images_table(clip_name, clip.logit_scale.exp().item(),
                                                                     args.batch_size),
                       corpus=corpus, processing_class=tokenizer, discriminator=discriminator)


def ready_for_steps(trainer):
    """The optimizer and scheduler `train()` would make, so that single steps can be timed outside it."""
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1


def optimizer_step(trainer):
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.model.zero_grad(set_to_none=True)


def scst_step(trainer, batch):
    trainer.training_step(trainer.model, batch)  # outside `train()` every micro-batch ends a step
    optimizer_step(trainer)


def cross_entropy_step(trainer, batch):
    trainer.training_step(trainer.model, batch)
    optimizer_step(trainer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="images per SCST step")
    parser.add_argument("--num-samples", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per contender; the median counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, decoder_millions = build_model(prefix_dim=PREFIX_DIM)
    model.train()
    tokenizer = word_tokenizer(model.config.decoder_config.vocab_size)
    with tempfile.TemporaryDirectory() as folder:
        scst = make_scst_trainer(model, tokenizer, Path(folder), args)
        scst_batch = scst._prepare_inputs(next(iter(scst.get_train_dataloader())))
        sample_texts = scst.roll_out(scst_batch["prefix_features"])[1]
        sequences = len(sample_texts)
        corpus = Dataset.from_dict({
            "text": sample_texts,
            "clip_features": scst_batch["prefix_features"].repeat_interleave(args.num_samples, 0).tolist()})
        cross_entropy = InitTrainer(
            model=model, args=InitConfig(output_dir=str(Path(folder) / "ce"), per_device_train_batch_size=sequences,
                                         noise_std=0.0, max_caption_length=args.new_tokens + 1, report_to="none",
                                         use_cpu=not torch.cuda.is_available(), disable_tqdm=True),
            corpus=corpus, processing_class=tokenizer)
        ce_batch = cross_entropy._prepare_inputs(CaptionCollator(tokenizer, args.new_tokens + 1)(list(corpus)))
        for trainer in (scst, cross_entropy):
            ready_for_steps(trainer)
        contenders = {"scst": lambda: scst_step(scst, scst_batch),
                      "cross-entropy": lambda: cross_entropy_step(cross_entropy, ce_batch)}
        for step in contenders.values():
            step()  # warm-up: first calls pay for allocations and lazy imports
        seconds, _ = time_round_robin(contenders, args.repeats)

    print(f"GPT-2 {decoder_millions:.0f}M parameters, {args.batch_size} images x {args.num_samples} samples = "
          f"{sequences} sequences of {args.new_tokens} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, value in seconds.items():
        print(f"{name:>14} step: {value:7.2f} s  {1000 * value / sequences:7.1f} ms per sequence")
    ratio = seconds["scst"] / seconds["cross-entropy"]
    print(f"SCST step per generated sequence / cross-entropy step per sequence: {ratio:.2f}x "
          f"(target <= {MAX_RATIO}x)")
    print("target met" if ratio <= MAX_RATIO else "TARGET MISSED")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
