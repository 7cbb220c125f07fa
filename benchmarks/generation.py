"""Captioning throughput: `SCSTClipCapForCaptioning.generate` against hand-written decoding loops.

    python benchmarks/generation.py                      # GPT-2 small shape, batch 32, 20 new tokens
    python benchmarks/generation.py --batch-size 8 --repeats 1

Same random weights for every contender. Compares, as ratios measured in one run:
- greedy: our `generate` vs a naive ClipCap-style loop that re-runs the whole sequence at every step without a cache,
  and vs a minimal hand-written loop that does use the KV cache (the floor for this computation);
- beam search (3 beams) and 5 samples per image: our `generate` vs the naive loop of the same strategy.
Checks that the greedy captions of all three greedy contenders are identical. EOS is disabled so that every
contender writes exactly `--new-tokens` tokens. Exits non-zero when a target is missed:
greedy >= 4x the naive loop, and at most 1.3x the time of the cached hand-written loop.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Spinning OpenMP threads stall each other on a shared machine and distort per-step costs; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configuration_scstclipcap import SCSTClipCapConfig  # noqa: E402
from modeling_scstclipcap import SCSTClipCapForCaptioning  # noqa: E402
from transformers import DynamicCache  # noqa: E402

MIN_SPEEDUP_OVER_NAIVE = 4.0
MAX_SLOWDOWN_OVER_CACHED_LOOP = 1.3


def naive_greedy(model, prefix_features, new_tokens):
    """ClipCap's loop: the whole sequence through GPT-2 at every step, logits everywhere, no cache."""
    embeds = model.map_prefix(prefix_features)  # (B, P, H)
    tokens = []
    for _ in range(new_tokens):
        logits = model.decoder(inputs_embeds=embeds, use_cache=False).logits[:, -1]  # (B, V)
        next_token = logits.argmax(-1)
        tokens.append(next_token)
        embeds = torch.cat((embeds, model.decoder.get_input_embeddings()(next_token)[:, None]), dim=1)
    return torch.stack(tokens, dim=1)


def naive_sample(model, prefix_features, new_tokens, num_samples):
    embeds = model.map_prefix(prefix_features).repeat_interleave(num_samples, dim=0)  # (B*S, P, H)
    tokens = []
    for _ in range(new_tokens):
        logits = model.decoder(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        next_token = torch.multinomial(logits.softmax(-1), 1)[:, 0]
        tokens.append(next_token)
        embeds = torch.cat((embeds, model.decoder.get_input_embeddings()(next_token)[:, None]), dim=1)
    return torch.stack(tokens, dim=1)


def naive_beam(model, prefix_features, new_tokens, num_beams):
    """ClipCap's beam search, batched over images: every beam's whole sequence re-run at every step."""
    batch_size = prefix_features.shape[0]
    embeds = model.map_prefix(prefix_features).repeat_interleave(num_beams, dim=0)  # (B*K, P, H)
    scores = torch.zeros(batch_size, num_beams)
    scores[:, 1:] = -1e9  # all beams start identical: expand from the first only
    tokens = torch.zeros(batch_size * num_beams, 0, dtype=torch.long)
    for _ in range(new_tokens):
        logprobs = model.decoder(inputs_embeds=embeds, use_cache=False).logits[:, -1].log_softmax(-1)
        vocab_size = logprobs.shape[-1]
        candidates = (scores.view(-1, 1) + logprobs).view(batch_size, -1)  # (B, K*V)
        scores, flat = candidates.topk(num_beams, dim=-1)
        source = (flat // vocab_size + torch.arange(batch_size)[:, None] * num_beams).view(-1)
        next_token = (flat % vocab_size).view(-1)
        tokens = torch.cat((tokens[source], next_token[:, None]), dim=1)
        embeds = torch.cat((embeds[source], model.decoder.get_input_embeddings()(next_token)[:, None]), dim=1)
    return tokens.view(batch_size, num_beams, -1)[:, 0]


def cached_greedy(model, prefix_features, new_tokens):
    """The floor: the mapper once, then one token per step through GPT-2 with its KV cache."""
    cache = DynamicCache(config=model.config.decoder_config)
    out = model.decoder(inputs_embeds=model.map_prefix(prefix_features), cache=cache, use_cache=True, logits_to_keep=1)
    tokens = []
    for step in range(new_tokens):
        next_token = out.logits[:, -1].argmax(-1)
        tokens.append(next_token)
        if step + 1 < new_tokens:
            out = model.decoder(input_ids=next_token[:, None], cache=out.cache, use_cache=True)
    return torch.stack(tokens, dim=1)


def time_round_robin(contenders, repeats):
    """Median wall time of each contender over `repeats` rounds, and its last result.

    Rounds interleave the contenders so that a slow phase of a shared machine hits them all alike."""
    times = {name: [] for name in contenders}
    results = {}
    for _ in range(repeats):
        for name, function in contenders.items():
            start = time.perf_counter()
            results[name] = function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def build_model(prefix_dim):
    torch.manual_seed(0)
    config = SCSTClipCapConfig(prefix_dim=prefix_dim, prefix_length=10, decoder_config=dict(vocab_size=50257))
    model = SCSTClipCapForCaptioning(config).eval()
    parameters = sum(p.numel() for p in model.decoder.parameters()) / 1e6
    return model, parameters


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender; the median counts")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=5)
    args = parser.parse_args()

    model, decoder_millions = build_model(prefix_dim=512)
    prefix_features = torch.randn(args.batch_size, 512, generator=torch.Generator().manual_seed(1))
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    print(f"GPT-2 {decoder_millions:.0f}M parameters, batch {args.batch_size}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")

    with torch.inference_mode():
        contenders = {
            "generate greedy": lambda: model.generate(prefix_features, do_sample=False, **common),
            "cached loop greedy": lambda: cached_greedy(model, prefix_features, args.new_tokens),
            "naive loop greedy": lambda: naive_greedy(model, prefix_features, args.new_tokens),
            f"generate beam {args.num_beams}": lambda: model.generate(
                prefix_features, num_beams=args.num_beams, do_sample=False, **common),
            f"naive loop beam {args.num_beams}": lambda: naive_beam(
                model, prefix_features, args.new_tokens, args.num_beams),
            f"generate {args.num_samples} samples": lambda: model.generate(
                prefix_features, do_sample=True, top_k=0, num_return_sequences=args.num_samples, **common),
            f"naive loop {args.num_samples} samples": lambda: naive_sample(
                model, prefix_features, args.new_tokens, args.num_samples),
        }
        contenders["generate greedy"]()  # warm-up: first calls pay for allocations and lazy imports
        seconds, outputs = time_round_robin(contenders, args.repeats)
    for name in contenders:
        captions = outputs[name].shape[0]
        print(f"{name:>24}: {seconds[name]:7.2f} s  {captions / seconds[name]:7.1f} captions/s")

    greedy_identical = torch.equal(outputs["generate greedy"], outputs["cached loop greedy"]) and torch.equal(
        outputs["generate greedy"], outputs["naive loop greedy"]
    )
    speedup = seconds["naive loop greedy"] / seconds["generate greedy"]
    overhead = seconds["generate greedy"] / seconds["cached loop greedy"]
    beam_speedup = seconds[f"naive loop beam {args.num_beams}"] / seconds[f"generate beam {args.num_beams}"]
    sample_speedup = (seconds[f"naive loop {args.num_samples} samples"]
                      / seconds[f"generate {args.num_samples} samples"])
    print(f"greedy captions identical across the three: {greedy_identical}")
    print(f"greedy: generate is {speedup:.2f}x the naive loop's throughput (target >= {MIN_SPEEDUP_OVER_NAIVE}x)")
    print(f"greedy: generate takes {overhead:.2f}x the cached hand-written loop's time "
          f"(target <= {MAX_SLOWDOWN_OVER_CACHED_LOOP}x)")
    print(f"beam {args.num_beams}: {beam_speedup:.2f}x the naive loop; "
          f"{args.num_samples} samples: {sample_speedup:.2f}x the naive loop")
    met = greedy_identical and speedup >= MIN_SPEEDUP_OVER_NAIVE and overhead <= MAX_SLOWDOWN_OVER_CACHED_LOOP
    print("targets met" if met else "TARGET MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
