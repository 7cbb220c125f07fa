"""Stage `scst`: self-critical sequence training of the captioner with CLIP rewards and a naturalness discriminator.

Every step, on a batch of unpaired images (`SCSTTrainer.training_step` reads top-down):
1. `num_samples` captions per image are sampled and, for the `greedy` baseline, one greedy caption written (in the
   same decoding loop), without gradient, by the unwrapped model with the KV cache, in the mode and under the mixed
   precision the loss is scored in (dropout off for the stage by default, as TRL's `disable_dropout`);
2. each caption gets a semantic reward from the frozen CLIP ([`ClipRewards`]: CLIP-cos against the image, CLIP-agg
   against the image's aggregated corpus embedding) and a naturalness reward, the [`Discriminator`]'s logit of "real",
   both under the same mixed precision and returned in float32;
3. each reward's advantage is its value minus its baseline: the greedy caption's (SCST, Rennie et al.) or the mean of
   the image's other samples (Luo); each advantage is divided by its scale ([`AdvantageScales`]: its root mean square
   over the micro-batch, a running one over steps, or 1 for CgT-GAN's raw-scale mix), and the two are mixed as
   w * semantic + (1 - w) * naturalness, so that w is the semantic share of the advantage whatever the rewards'
   scales; w is 0 for `naturalness_only_steps` steps, then ramps (linearly, or at once) over `semantic_ramp_steps`
   steps up to `semantic_share`;
4. one teacher-forced pass of the samples through the wrapped model gives their token log-probabilities under the
   sampling distribution (the same temperature / top-k / top-p warpers applied to the scored logits), and
   loss = -sum(advantage * log p(token)) / number of caption tokens (a mean over the micro-batch's caption tokens,
   EOS included: the loss keeps the scale of a cross-entropy whatever the caption length; gradient accumulation and
   the processes then average these means), plus an optional MMD term
   between the mapped image prefixes and the mapped prefixes of real corpus sentences;
5. the discriminator learns, by binary cross-entropy, the step's sampled captions (fake) from as many corpus
   sentences (real), and takes its optimizer step together with the captioner's; with `discriminator_steps` > 1 it
   then takes further updates on fresh corpus sentences and captions drawn from the step's samples and a replay of
   earlier steps' (`discriminator_replay`).

A step whose rewards, losses or gradient norms are not finite (on any process) is skipped by both networks: their
gradients are dropped before the optimizer steps, a warning says why, and `skipped_steps` counts it. Under DeepSpeed
the engine steps inside backward, so there the guard covers the discriminator only.
"""

import contextlib
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate.utils import gather_object, set_seed
from transformers import (
    LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from clip_scstclipcap import check_clip_metadata, read_clip_metadata

from .common import CaptionConfig, CaptionEvaluator, CaptionTrainer, caption_statistics, mmd_rbf
from .discriminator import Discriminator
from .rewards import ClipRewards, SemanticRewardWeights

logger = logging.getLogger(__name__)

BASELINES = ("greedy", "mean")
RAMPS = ("linear", "constant")
ADVANTAGE_SCALINGS = ("batch_rms", "running_rms", "none")
DISCRIMINATOR_FOLDER = "discriminator"
REWARD_SAMPLES_FILE = "rewards.jsonl"
REWARD_KINDS = ("semantic", "naturalness")
STEP_PROBLEMS = ("rewards", "loss", "generator gradients", "discriminator gradients")


@dataclass
class SCSTConfig(CaptionConfig):
    r"""Settings of the SCST + adversarial stage; the shared ones are [`CaptionConfig`]'s."""

    # Sampling
    num_samples: int = field(default=5, metadata={"help": "Captions sampled per image and step."})
    baseline: str = field(
        default="greedy",
        metadata={"help": "greedy: the reward of the image's greedy caption (SCST); mean: the mean reward of the "
                          "image's other samples.", "choices": BASELINES},
    )
    max_new_tokens: int = field(default=20, metadata={"help": "Caption length limit while training."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (1: the model's own)."})
    sample_top_k: int = field(default=0, metadata={"help": "Sample among the k likeliest tokens (0: all)."})
    sample_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: all tokens)."})
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn the captioner's dropout off for the stage, so that the samples and the scored "
                          "log-probabilities come from one distribution (on-policy). False keeps dropout on in "
                          "both, with a different mask in each pass."},
    )

    # Semantic reward
    clip_cos_weight: float = field(
        default=1.0, metadata={"help": "Weight of CLIP-cos (caption vs image) in the semantic reward."}
    )
    agg_cos_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the cosine between the caption and the image's aggregated corpus embedding "
                          "(needs an images table with agg_text_features, from `prepare_datasets.py aggregate`)."},
    )
    agg_l1_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of 1 - mean |caption - aggregated embedding| (CgT-GAN's L1 term; needs "
                          "agg_text_features)."},
    )

    # Mixing semantic and naturalness rewards
    semantic_share: float = field(
        default=0.5,
        metadata={"help": "Final share w of the semantic reward in the advantage; the discriminator's gets 1 - w. Each "
                          "reward's advantage is put on one scale first (advantage_scaling), so that w is a share "
                          "whatever the rewards' scales.", "aliases": ["--reward_weight"]},
    )
    naturalness_only_steps: int = field(
        default=0,
        metadata={"help": "Steps trained on the naturalness reward alone (w = 0) at the start (CgT-GAN: 150).",
                  "aliases": ["--gan_training_steps"]},
    )
    semantic_ramp_steps: int = field(
        default=0,
        metadata={"help": "Steps over which w then ramps linearly up to semantic_share (the seed's --gan_warm_steps).",
                  "aliases": ["--gan_warm_steps"]},
    )
    semantic_ramp: str = field(
        default="linear",
        metadata={"help": "linear: ramp w over semantic_ramp_steps; constant: w = semantic_share as soon as the "
                          "naturalness-only steps are over.", "choices": RAMPS, "aliases": ["--reward_ramp"]},
    )
    advantage_scaling: str = field(
        default="batch_rms",
        metadata={"help": "How each reward's advantage is put on one scale before mixing. batch_rms: divided by its "
                          "root mean square over the micro-batch (a near-chance discriminator's noise then gets a "
                          "full share); running_rms: by a running root mean square over steps (momentum "
                          "advantage_scale_momentum), which does not blow up one batch's noise; none: mixed at the "
                          "rewards' raw scales, as CgT-GAN mixes its two policy-gradient losses (w is then not a "
                          "share).", "choices": ADVANTAGE_SCALINGS},
    )
    advantage_scale_momentum: float = field(
        default=0.99,
        metadata={"help": "Momentum of running_rms's mean square per micro-batch (0.99: about the last 100)."},
    )
    shuffle_semantic_reward: bool = field(
        default=False,
        metadata={"help": "Control run: each caption's semantic reward is computed against another image of the "
                          "micro-batch, so the reward does not know the caption's image. A method whose gain survives "
                          "this learns something other than the image."},
    )

    # Discriminator
    discriminator_name_or_path: str = field(
        default="roberta-base",
        metadata={"help": "Pretrained sequence classifier encoder (Hub id or folder) for the naturalness reward."},
    )
    discriminator_config: str | None = field(
        default=None,
        metadata={"help": "JSON transformers config (with model_type, e.g. a small bert) of a discriminator trained "
                          "from scratch on the caption tokenizer; overrides discriminator_name_or_path."},
    )
    discriminator_learning_rate: float = field(default=1e-5, metadata={"help": "Discriminator AdamW learning rate."})
    discriminator_weight_decay: float = field(default=0.0, metadata={"help": "Discriminator AdamW weight decay."})
    discriminator_lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Discriminator scheduler (a transformers scheduler name)."}
    )
    discriminator_warmup_steps: int = field(
        default=0, metadata={"help": "Discriminator warm-up, in its updates (discriminator_steps per captioner step)."}
    )
    discriminator_max_grad_norm: float = field(
        default=1.0, metadata={"help": "Discriminator gradient clipping (0 turns it off)."}
    )
    discriminator_max_length: int = field(
        default=40, metadata={"help": "Discriminator tokens per sentence; longer sentences are cut."}
    )
    discriminator_steps: int = field(
        default=1,
        metadata={"help": "Discriminator updates per captioner step. The first learns the step's samples (fake) from "
                          "as many corpus sentences (real); each further one draws as many corpus sentences and as many "
                          "captions from the step's samples and the replayed ones of earlier steps "
                          "(discriminator_replay), so that the discriminator keeps up with a drifting captioner and "
                          "does not forget the faults it was shown. One update a step lets a from-scratch "
                          "discriminator be gamed (docs/shapes_quality.md)."},
    )
    discriminator_replay: int = field(
        default=0,
        metadata={"help": "Captions of earlier steps kept (the latest, gathered from every process) for the further "
                          "discriminator updates to draw fakes from; 0: the step's own samples only."},
    )
    discriminator_heldout_share: float = field(
        default=0.05,
        metadata={"help": "Share of the corpus (a seeded draw) kept from the discriminator's training: each evaluation "
                          "reports its accuracy on these real sentences and on the validation captions."},
    )

    # Trainer defaults that suit this stage
    learning_rate: float = field(
        default=5e-5, metadata={"help": "Captioner AdamW learning rate (higher rates let CLIP's reward be hacked)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}.")
        if self.baseline == "mean" and self.num_samples < 2:
            raise ValueError("the mean baseline averages the other samples of an image: set num_samples >= 2.")
        if self.semantic_ramp not in RAMPS:
            raise ValueError(f"semantic_ramp must be one of {RAMPS}, got {self.semantic_ramp!r}.")
        if not 0 <= self.semantic_share <= 1:
            raise ValueError(f"semantic_share must lie in [0, 1], got {self.semantic_share}.")
        if self.advantage_scaling not in ADVANTAGE_SCALINGS:
            raise ValueError(f"advantage_scaling must be one of {ADVANTAGE_SCALINGS}, got {self.advantage_scaling!r}.")
        if self.discriminator_steps < 1:
            raise ValueError(f"discriminator_steps must be >= 1, got {self.discriminator_steps}.")
        if self.discriminator_replay < 0:
            raise ValueError(f"discriminator_replay must be >= 0, got {self.discriminator_replay}.")
        if self.discriminator_replay and self.discriminator_steps == 1:
            raise ValueError("replayed captions are drawn by the discriminator's further updates only: set "
                             "discriminator_steps > 1, or discriminator_replay 0.")
        if not 0 <= self.discriminator_heldout_share < 1:
            raise ValueError(f"discriminator_heldout_share must lie in [0, 1), got {self.discriminator_heldout_share}.")
        if not 0 <= self.advantage_scale_momentum < 1:
            raise ValueError(f"advantage_scale_momentum must lie in [0, 1), got {self.advantage_scale_momentum}.")
        if self.shuffle_semantic_reward and self.per_device_train_batch_size < 2:
            raise ValueError("shuffle_semantic_reward pairs each caption with another image of its micro-batch: set "
                             "per_device_train_batch_size >= 2.")
        for name in ("naturalness_only_steps", "semantic_ramp_steps", "discriminator_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.fp16 or self.mixed_precision == "fp16":
            raise ValueError("the scst stage trains two networks, which fp16's single loss scaler does not cover: use "
                             "bf16 or full precision.")
        self.semantic_reward_weights  # raises on bad weights

    @property
    def semantic_reward_weights(self) -> SemanticRewardWeights:
        return SemanticRewardWeights(self.clip_cos_weight, self.agg_cos_weight, self.agg_l1_weight)

    def semantic_share_at(self, step: int) -> float:
        """w at the step with 0-based index `step`: 0 for the first `naturalness_only_steps` steps, then
        semantic_share * i / semantic_ramp_steps on the i-th step after them (linear), or semantic_share at once
        (constant, or no ramp steps)."""
        steps_after = step - self.naturalness_only_steps + 1
        if steps_after <= 0:
            return 0.0
        if self.semantic_ramp == "constant" or self.semantic_ramp_steps == 0:
            return self.semantic_share
        return self.semantic_share * min(1.0, steps_after / self.semantic_ramp_steps)


class AdvantageScales:
    """The scale each reward's advantage is divided by before the rewards are mixed (`advantage_scaling`).

    CLIP's reward (logit scale x cosine) and a discriminator logit live on scales tens of times apart; divided by its
    own scale, each advantage gets the share it is given. `batch_rms` divides by the root mean square over the
    micro-batch, as GRPO scales rewards per batch (the root mean square, since baselined advantages are already
    centred per image); but a near-chance discriminator's advantages are noise, and that scaling hands the noise a
    full share. `running_rms` divides by a bias-corrected running mean square (averaged over the processes, so every
    process uses one scale), which follows a reward's typical size without amplifying one batch. `none` keeps the
    raw scales: CgT-GAN's mix of its two policy-gradient losses. The running state travels with every checkpoint.
    """

    def __init__(self, scaling: str, momentum: float = 0.99,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.scaling, self.momentum = scaling, momentum
        self.reduce = reduce or (lambda value: value)
        self.mean_square: dict[str, float] = {}
        self.updates: dict[str, int] = {}

    def __call__(self, kind: str, advantage: torch.Tensor) -> torch.Tensor:
        if self.scaling == "none":
            return torch.ones((), device=advantage.device)
        mean_square = advantage.float().pow(2).mean()
        if self.scaling == "running_rms":
            batch = float(self.reduce(mean_square.detach()))
            self.updates[kind] = self.updates.get(kind, 0) + 1
            self.mean_square[kind] = self.momentum * self.mean_square.get(kind, 0.0) + (1 - self.momentum) * batch
            mean_square = torch.tensor(self.mean_square[kind] / (1 - self.momentum ** self.updates[kind]),
                                       device=advantage.device)
        return mean_square.sqrt().clamp_min(1e-6)

    def state_dict(self) -> dict:
        return {"mean_square": dict(self.mean_square), "updates": dict(self.updates)}

    def load_state_dict(self, state: dict):
        self.mean_square, self.updates = dict(state["mean_square"]), dict(state["updates"])


@dataclass
class MixedAdvantages:
    """The rewards of one micro-batch mixed into one advantage per sample.

    Attributes:
        advantages: (B, K) each sample's mixed advantage.
        sample_rewards: (B, K) each sample's mixed reward, sum(share * reward / scale), the quantity the advantages
            are baselined differences of.
        greedy_rewards: (B,) the greedy captions' mixed reward, or None.
        scales: {kind: ()} what each reward's advantage was divided by.
    """

    advantages: torch.Tensor
    sample_rewards: torch.Tensor
    greedy_rewards: torch.Tensor | None
    scales: dict[str, torch.Tensor]


def mixed_advantages(sample_rewards: dict[str, torch.Tensor], greedy_rewards: dict[str, torch.Tensor] | None,
                     shares: dict[str, float], baseline: str,
                     scales: AdvantageScales | None = None) -> MixedAdvantages:
    """Advantages mixed from several rewards put on one scale (see [`MixedAdvantages`]).

    Each reward ({kind: (B, K)}, greedy captions' {kind: (B,)}) gets its advantage against its own baseline, divided
    by its scale (`scales`, per-batch root mean square by default, see [`AdvantageScales`]); the scaled advantages are
    then summed with `shares` ({kind: share}; kinds at share 0 are left out of the sum, though a running scale still
    follows them), and so are the scaled rewards.
    """
    scales = scales or AdvantageScales("batch_rms")
    advantages, used = {}, {}
    for kind, share in shares.items():
        advantage = self_critical_advantages(sample_rewards[kind], greedy_rewards and greedy_rewards[kind], baseline)
        used[kind] = scales(kind, advantage)
        if share > 0:
            advantages[kind] = share * advantage / used[kind]
    if not advantages:
        raise ValueError(f"every reward has share 0 ({shares}): nothing to learn from.")

    def mixed(rewards: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(shares[kind] * rewards[kind] / used[kind] for kind in advantages)

    return MixedAdvantages(sum(advantages.values()), mixed(sample_rewards),
                           mixed(greedy_rewards) if greedy_rewards else None, used)


def self_critical_advantages(sample_rewards: torch.Tensor, greedy_rewards: torch.Tensor | None,
                             baseline: str) -> torch.Tensor:
    """(B, K) advantages of K samples per image: minus the image's greedy reward (B,), or minus the mean of the
    image's other K - 1 samples."""
    if baseline == "greedy":
        return sample_rewards - greedy_rewards[:, None]
    others = (sample_rewards.sum(dim=1, keepdim=True) - sample_rewards) / (sample_rewards.shape[1] - 1)
    return sample_rewards - others


def caption_mask(captions: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on the caption tokens up to and including the first EOS, 0 on what generation padded after it (the padding
    token may be EOS itself, as GPT-2's is)."""
    is_eos = (captions == eos_token_id).long()
    return ((is_eos.cumsum(dim=-1) - is_eos) == 0).long()


def trim_padding(captions: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The captions without the trailing columns that are padding in every row."""
    width = int(caption_mask(captions, eos_token_id).any(dim=0).nonzero().max()) + 1
    return captions[:, :width]


def policy_gradient_loss(token_log_probs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-sum(advantage * log p(token)) over the caption tokens, divided by their number."""
    weighted = advantages[:, None] * token_log_probs * mask
    return -weighted.sum() / mask.sum().clamp_min(1)


def shared_caption_share(captions: list[str]) -> float:
    """Share of the images whose caption is also another image's caption."""
    counts = Counter(captions)
    return sum(counts[caption] > 1 for caption in captions) / max(len(captions), 1)


def sampling_warpers(args: SCSTConfig) -> LogitsProcessorList:
    """The processors that turn the model's logits into the sampling distribution, in `generate`'s order
    (temperature, top-k, top-p): applied when sampling and again to the scored logits."""
    warpers = []
    if args.sample_temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(args.sample_temperature))
    if args.sample_top_k > 0:
        warpers.append(TopKLogitsWarper(args.sample_top_k))
    if args.sample_top_p < 1.0:
        warpers.append(TopPLogitsWarper(args.sample_top_p))
    return LogitsProcessorList(warpers)


def disable_dropout_in_model(model: torch.nn.Module):
    """Dropout probability 0 in every dropout layer (as TRL's `disable_dropout_in_model`); the saved config keeps the
    model's own rates."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class GreedyRows(LogitsProcessor):
    """Leaves only the likeliest token in the last of every `period` rows, so that sampling picks it: those rows
    decode greedily inside a sampling `generate` call. Custom processors run after the model's own ones (whose
    result greedy decoding takes the argmax of) and before temperature, top-k and top-p, which keep the argmax."""

    def __init__(self, period: int):
        self.period = period

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = torch.arange(len(scores), device=scores.device) % self.period == self.period - 1
        best = scores.argmax(dim=-1, keepdim=True)
        only_best = torch.full_like(scores, float("-inf")).scatter(-1, best, scores.gather(-1, best))
        return torch.where(rows[:, None], only_best, scores)


class ImageCollator:
    """Rows of an images table -> `prefix_features` (B, D) and, when the table has them, `agg_features` (B, D)."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"prefix_features": torch.tensor([row["clip_features"] for row in rows], dtype=torch.float32)}
        if "agg_text_features" in rows[0]:
            batch["agg_features"] = torch.tensor([row["agg_text_features"] for row in rows], dtype=torch.float32)
        return batch


class CorpusStream:
    """The discriminator's real sentences: the corpus in a seeded order, reshuffled every pass, read at positions
    fixed by the step, the micro-batch and the process, so that a resumed run reads what an uninterrupted one would."""

    def __init__(self, corpus, seed: int, with_features: bool = False):
        self.corpus = corpus.select_columns(["text", "clip_features"] if with_features else ["text"])
        self.seed = seed
        self._pass, self._order = None, None

    def __len__(self) -> int:
        return len(self.corpus)

    def rows(self, start: int, count: int) -> list[int]:
        indices = []
        for position in range(start, start + count):
            corpus_pass, offset = divmod(position, len(self.corpus))
            if corpus_pass != self._pass:
                generator = torch.Generator().manual_seed(self.seed + corpus_pass)
                self._pass, self._order = corpus_pass, torch.randperm(len(self.corpus), generator=generator).tolist()
            indices.append(self._order[offset])
        return indices

    def take(self, start: int, count: int) -> dict[str, list]:
        """`count` rows from stream position `start`: {"text": [...]} (and "clip_features")."""
        return self.corpus[self.rows(start, count)]


@dataclass
class SCSTBatch:
    """One micro-batch after rollout and scoring, everything the loss and the discriminator need.

    Attributes:
        prefix_features: (B*K, D) each image's CLIP embedding, once per sample.
        samples: (B*K, T) sampled caption token ids, trimmed of all-padding columns.
        advantages: (B*K,) each sample's mixed, scaled advantage.
        sample_texts: the B*K sampled captions.
        greedy_texts: the B greedy captions (`greedy` baseline) or None.
        real: the discriminator's real sentences of this micro-batch ({"text": [...]}, and "clip_features" when the MMD
            term needs them).
    """

    prefix_features: torch.Tensor
    samples: torch.Tensor
    advantages: torch.Tensor
    sample_texts: list[str]
    greedy_texts: list[str] | None
    real: dict[str, list]


@dataclass
class StepState:
    """What one optimizer step gathers over its micro-batches; the trainer starts a new one after every step.

    Attributes:
        micro_batch: index of the next micro-batch in the step (it fixes where the corpus stream is read).
        metrics: {name: [one value per micro-batch]}, averaged into the logs when the step ends.
        problems: the parts of the step found not finite (`STEP_PROBLEMS`): the step is skipped.
        reward_samples: the latest micro-batch's per-sample rewards and caption lengths, for reward histograms.
        fakes: the step's sampled captions (every micro-batch's), for the discriminator's further updates.
    """

    micro_batch: int = 0
    metrics: defaultdict = field(default_factory=lambda: defaultdict(list))
    problems: set = field(default_factory=set)
    reward_samples: dict = field(default_factory=dict)
    fakes: list = field(default_factory=list)


class ProcessSeeds(TrainerCallback):
    """Every process was seeded alike; without its own stream each would sample the same captions. A resumed run then
    loads each process's saved generator states over these."""

    def on_train_begin(self, args, state, control, **kwargs):
        set_seed(args.seed, device_specific=True)


class SCSTTrainer(CaptionTrainer):
    """SCST with CLIP rewards and a naturalness discriminator for a [`SCSTClipCapForCaptioning`].

    One optimizer step reads top-down: [`training_step`] (per micro-batch) calls [`generate_and_score`] (rollout,
    [`caption_rewards`], [`advantages`]; no gradient), then the Trainer's own step, which takes [`compute_loss`] and
    its backward, then the discriminator's backward; on the step's last micro-batch [`finish_step`] steps the
    discriminator or skips both networks, just before the Trainer steps the captioner. What a step gathers lives in
    `self.step` ([`StepState`]), replaced by a new one when the step ends.

    Args:
        model: the captioner, usually the output of stage `init`.
        args: [`SCSTConfig`].
        images: table of unpaired training images with `clip_features` (and `agg_text_features` when the semantic
            reward weighs CLIP-agg); it is the training set, one row per image.
        corpus: table with `text` (the discriminator's real sentences; and `clip_features` when `mmd_weight > 0`).
        processing_class: the caption tokenizer (saved with every checkpoint).
        discriminator: a ready [`Discriminator`]; by default built from `args` (`discriminator_config` on the caption
            tokenizer, or `discriminator_name_or_path`).
        rewards: ready [`ClipRewards`]; by default the CLIP of `model.config` (`clip_model_name`, `clip_pretrained`).
            The images table must come from that same CLIP.
        evaluator: a [`CaptionEvaluator`] on the validation images; without it, evaluation is skipped.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model, args: SCSTConfig, images, corpus, processing_class,
                 discriminator: Discriminator | None = None, rewards: ClipRewards | None = None,
                 evaluator: CaptionEvaluator | None = None, **kwargs):
        check_tables(images, corpus, args)
        if evaluator is not None:
            # The Trainer wants an eval_dataset for its evaluation schedule; evaluate() reads the evaluator's.
            kwargs.setdefault("eval_dataset", evaluator.images)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        super().__init__(model=model, args=args, train_dataset=images, data_collator=ImageCollator(),
                         processing_class=processing_class, **kwargs)
        self.add_callback(ProcessSeeds())
        if args.mmd_weight > 0 and self.is_fsdp_enabled:
            raise ValueError("mmd_weight > 0 maps corpus embeddings outside the model's forward, which FSDP's sharded "
                             "parameters do not allow: set mmd_weight 0 or use DDP / DeepSpeed.")
        self.captioner_config = model.config
        if self.captioner_config.eos_token_id is None:
            raise ValueError("the captioner's config has no eos_token_id: captions could not end.")
        self.rewards = rewards or ClipRewards.from_model_config(model.config, args.semantic_reward_weights, args.device)
        check_clip_metadata(read_clip_metadata(images), self.rewards.metadata,
                            "the training images table (its features feed the CLIP rewards)")
        self.discriminator = (discriminator or build_discriminator(args, processing_class)).to(args.device)
        self.sampling_warpers = sampling_warpers(args)
        self.advantage_scales = AdvantageScales(args.advantage_scaling, args.advantage_scale_momentum,
                                                reduce=lambda value: self.accelerator.reduce(value, "mean"))
        training_sentences, self.heldout_sentences = split_heldout(corpus, args.discriminator_heldout_share, args.seed)
        self.corpus_stream = CorpusStream(training_sentences, args.seed, with_features=args.mmd_weight > 0)
        self.evaluator = evaluator
        if evaluator is not None:
            evaluator.extra_metrics.append(self.discriminator_accuracy)
        self.skipped_steps = 0
        self._metrics = defaultdict(list)
        self.step, self.finished_step = StepState(), StepState()
        self.replay: list[str] = []  # earlier steps' captions, the same on every process (see discriminator_replay)

    # ---- one step, top-down

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: rollout and rewards, the captioner's loss and backward (the Trainer's step), the
        discriminator's backward; after the step's last micro-batch, the discriminator's optimizer step or the skip
        of both networks (the Trainer then clips and steps the captioner)."""
        self.ensure_discriminator_scheduler()
        batch = self.generate_and_score(self._prepare_inputs(inputs))
        loss = super().training_step(model, batch, num_items_in_batch)
        self.train_discriminator(batch.real["text"], batch.sample_texts)
        self.step.micro_batch += 1
        if self.accelerator.sync_gradients:
            self.finish_step()
        return loss

    def _prepare_inputs(self, inputs):
        # Trainer.training_step prepares its inputs again: the scored batch passes as it is.
        return inputs if isinstance(inputs, SCSTBatch) else super()._prepare_inputs(inputs)

    @torch.no_grad()
    def generate_and_score(self, inputs: dict[str, torch.Tensor]) -> SCSTBatch:
        """Samples (and greedy captions) of the micro-batch's images, their rewards and advantages, the
        discriminator's real sentences, and the captions' statistics."""
        features = inputs["prefix_features"]
        # Under the autocast the loss runs in (accelerate wraps the prepared captioner's forward in it; transformers'
        # compute_loss_context_manager adds none): the prefix that `generate` maps outside the forward is the one the
        # loss maps, so the captions are sampled from the distribution they are scored under; the reward models run
        # at the step's precision (a float32 discriminator is several times slower under bf16); and autocast, which
        # caches its bf16 copies of the weights while it lasts, casts them once per rollout, not once per token.
        with self.accelerator.autocast():
            samples, sample_texts, greedy_texts = self.roll_out(features)
            images = torch.arange(len(features), device=features.device).repeat_interleave(self.args.num_samples)
            if greedy_texts:
                images = torch.cat((images, torch.arange(len(features), device=features.device)))
            rewards = self.caption_rewards(sample_texts + (greedy_texts or []), features, inputs.get("agg_features"),
                                           images)
            advantages = self.advantages(rewards, len(features), with_greedy=bool(greedy_texts))
        self.record_captions(sample_texts, greedy_texts, samples)
        num_samples = self.args.num_samples
        return SCSTBatch(
            prefix_features=features.repeat_interleave(num_samples, dim=0), samples=samples,
            advantages=advantages.flatten(), sample_texts=sample_texts, greedy_texts=greedy_texts,
            real=self.corpus_stream.take(self.stream_position(), len(sample_texts)))

    def compute_loss(self, model, inputs: SCSTBatch, return_outputs=False, num_items_in_batch=None):
        """-mean(advantage * log p(token)) over the samples' caption tokens (+ the MMD term)."""
        token_log_probs, mask, prefix_embeds = self.sample_log_probs(model, inputs.prefix_features, inputs.samples)
        loss = policy_gradient_loss(token_log_probs, mask, inputs.advantages)
        self.step.metrics["policy_loss"].append(loss.item())
        if self.args.mmd_weight > 0:
            image_prefix = prefix_embeds[:: self.args.num_samples]
            loss = loss + self.args.mmd_weight * self.mmd(model, image_prefix, inputs.real["clip_features"])
        if not torch.isfinite(loss):
            self.step.problems.add("loss")
        return loss

    # ---- rollout and rewards (no gradient)

    def roll_out(self, features: torch.Tensor) -> tuple[torch.Tensor, list[str], list[str] | None]:
        """(B*K, T) sampled captions, their texts, and the B greedy captions' texts (or None), with the KV cache.

        Sampling runs in the mode the loss is scored in (training mode, dropout off by `disable_dropout`) and through
        `self.sampling_warpers`, the processors that also shape the scored distribution (see `sample_log_probs`). The
        greedy captions come out of the same `generate` call, as one more row per image that [`GreedyRows`] restricts
        to its likeliest token: one decoding loop instead of two."""
        num_samples, greedy = self.args.num_samples, self.args.baseline == "greedy"
        rows_per_image = num_samples + int(greedy)
        config = self.captioner_config
        processors = ([GreedyRows(rows_per_image)] if greedy else []) + list(self.sampling_warpers)
        with self.generation_model() as generator:
            # temperature 1, top_k 0 and top_p 1 turn generate's own warpers off: ours are the only ones.
            captions = generator.generate(
                features, do_sample=True, num_return_sequences=rows_per_image, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=self.args.max_new_tokens, eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id, logits_processor=LogitsProcessorList(processors),
                synced_gpus=self.generation_is_collective)
        captions = captions.view(len(features), rows_per_image, -1)
        samples = trim_padding(captions[:, :num_samples].flatten(0, 1), config.eos_token_id)
        return samples, self.decode(samples), self.decode(captions[:, num_samples]) if greedy else None

    @property
    def generation_is_collective(self) -> bool:
        """Whether every forward gathers sharded parameters, so that all processes must run as many forwards."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return (zero3 or self.is_fsdp_enabled) and self.accelerator.num_processes > 1

    @contextlib.contextmanager
    def generation_model(self):
        """The model `generate` runs on, as transformers' Seq2SeqTrainer chooses it: FSDP (v1) with its parameters
        gathered; FSDP2 and DeepSpeed ZeRO-3 as they are (each forward gathers what it needs); otherwise the
        unwrapped model, outside DDP."""
        if self.is_fsdp_enabled:
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(self.model, FullyShardedDataParallel):
                with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
                    yield self.model
                return
            yield self.model
            return
        yield self.accelerator.unwrap_model(self.model_wrapped)

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        texts = self.processing_class.batch_decode(token_ids, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def caption_rewards(self, texts: list[str], features: torch.Tensor, agg_features: torch.Tensor | None,
                        images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each caption's float32 rewards (N,): the CLIP scores against its image (row `images[i]` of `features`;
        `clip_cos`, ..., and their weighted sum `semantic`, see [`ClipRewards`]) and the discriminator's
        `naturalness`. A reward that is not finite marks the step to be skipped."""
        if self.args.shuffle_semantic_reward:
            images = (images + 1) % len(features)  # each caption judged against the next image of the micro-batch
        rewards = self.rewards(texts, features[images], None if agg_features is None else agg_features[images])
        rewards["naturalness"] = self.discriminator.scores(texts).to(features.device)
        if not all(torch.isfinite(rewards[kind]).all() for kind in REWARD_KINDS):
            self.step.problems.add("rewards")
        return rewards

    def advantages(self, rewards: dict[str, torch.Tensor], num_images: int, with_greedy: bool) -> torch.Tensor:
        """(B, K) advantages of the samples: the semantic and naturalness rewards of the captions (the B * K samples,
        then the B greedy captions when `with_greedy`) put on one scale and mixed at this step's semantic share (see
        [`mixed_advantages`])."""
        share, sample_count = self.args.semantic_share_at(self.state.global_step), num_images * self.args.num_samples
        mixed = mixed_advantages(
            {kind: rewards[kind][:sample_count].view(num_images, -1) for kind in REWARD_KINDS},
            {kind: rewards[kind][sample_count:] for kind in REWARD_KINDS} if with_greedy else None,
            {"semantic": share, "naturalness": 1 - share}, self.args.baseline, self.advantage_scales)
        self.record_rewards({name: values[:sample_count] for name, values in rewards.items()}, mixed, share)
        return mixed.advantages

    def record_rewards(self, sample_rewards: dict[str, torch.Tensor], mixed: MixedAdvantages, share: float):
        """The step's reward metrics: each reward's and the mixed reward's mean over the samples (and the greedy
        captions'), the scales, the share, and the per-sample values for reward histograms."""
        logged = {**{f"reward_{name}": values for name, values in sample_rewards.items()},
                  "reward": mixed.sample_rewards.flatten()}
        for name, values in logged.items():
            self.step.metrics[name].append(values.mean().item())
            self.step.reward_samples[name] = values.tolist()
        if mixed.greedy_rewards is not None:
            self.step.metrics["reward_greedy"].append(mixed.greedy_rewards.mean().item())
        for kind, scale in mixed.scales.items():
            self.step.metrics[f"advantage_scale_{kind}"].append(scale.item())
        self.step.metrics["semantic_share"].append(share)
        advantages = mixed.advantages
        self.step.metrics["advantage_std"].append(advantages.std().item() if advantages.numel() > 1 else 0.0)

    def discriminator_accuracy(self, predictions: dict[str, str]) -> dict[str, float]:
        """The discriminator's accuracy on sentences it never trained on: held-out corpus sentences (real) and the
        captions of the evaluation images (fake)."""
        def scores(texts: list[str]) -> torch.Tensor:
            return torch.cat([self.discriminator.scores(texts[start:start + 256])
                              for start in range(0, len(texts), 256)])

        metrics = {"discriminator_accuracy_fake": (scores(list(predictions.values())) < 0).float().mean().item()}
        if self.heldout_sentences:
            metrics["discriminator_accuracy_real"] = (scores(self.heldout_sentences) > 0).float().mean().item()
        return metrics

    def stream_position(self) -> int:
        """Where this micro-batch reads the corpus stream: one slot per (step, micro-batch, process)."""
        slot = (self.state.global_step * self.args.gradient_accumulation_steps + self.step.micro_batch) \
            * self.accelerator.num_processes + self.accelerator.process_index
        return slot * self.args.per_device_train_batch_size * self.args.num_samples

    def record_captions(self, sample_texts: list[str], greedy_texts: list[str] | None, samples: torch.Tensor):
        self.step.reward_samples["caption_length"] = [len(text.split()) for text in sample_texts]
        statistics = caption_statistics(sample_texts)
        for name in ("caption_length", "distinct_1", "distinct_2", "repeated_word_share"):
            self.step.metrics[name].append(statistics[name])
        per_image = greedy_texts or sample_texts[:: self.args.num_samples]
        self.step.metrics["same_caption_share"].append(shared_caption_share(per_image))
        mask = caption_mask(samples, self.captioner_config.eos_token_id)
        self.step.metrics["caption_tokens"].append(mask.sum(dim=1).float().mean().item())

    # ---- the loss's parts (with gradient)

    def sample_log_probs(self, model, prefix_features: torch.Tensor, captions: torch.Tensor):
        """Token log-probabilities (N, T) of the captions under the distribution they were sampled from, their mask,
        and the mapped prefixes.

        One teacher-forced pass of the wrapped model, its logits shaped by the same warpers as sampling was
        (temperature, top-k, top-p), so the gradient is on-policy. We follow self-critical.pytorch, which scores the
        samples in a second pass as here, rather than CgT-GAN, which keeps the log-probabilities of its sampling pass
        (in training mode, dropout on); the samples here come from `generate` with the KV cache, and the model's
        dropout is off during the stage (`disable_dropout`), so both passes see the same distribution."""
        mask = caption_mask(captions, self.captioner_config.eos_token_id)
        outputs = model(prefix_features=prefix_features, input_ids=captions, attention_mask=mask,
                        logits_to_keep=captions.shape[1] + 1, use_cache=False)
        logits = outputs.logits[:, :-1].float()  # (N, T, V): position i predicts caption token i
        warped = self.sampling_warpers(captions, logits.flatten(0, 1)).view_as(logits)
        log_probs = warped.log_softmax(dim=-1).gather(-1, captions[..., None]).squeeze(-1)
        # Padding after EOS may lie outside top-k / top-p (log p = -inf): it is masked, and must not make NaNs.
        return torch.where(mask.bool(), log_probs, torch.zeros_like(log_probs)), mask, outputs.prefix_embeds

    def mmd(self, model, image_prefix: torch.Tensor, real_features: list) -> torch.Tensor:
        text_features = torch.tensor(real_features, dtype=torch.float32, device=image_prefix.device)
        # The text side goes through the mapper alone; its gradient joins the wrapped pass's on the same parameters.
        text_prefix = self.accelerator.unwrap_model(model).map_prefix(text_features)
        value = mmd_rbf(image_prefix.flatten(1), text_prefix.flatten(1), tuple(self.args.mmd_bandwidths))
        self.step.metrics["mmd"].append(value.item())
        return value

    def train_discriminator(self, real: list[str], fake: list[str]):
        """Backward of the discriminator's loss on this micro-batch; its step comes with the captioner's."""
        with self.accelerator.autocast():
            output = self.discriminator.loss(real, fake)
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        (output.loss / accumulation).backward()
        if not torch.isfinite(output.loss):
            self.step.problems.add("loss")
        self.step.metrics["discriminator_loss"].append(output.loss.item())
        self.step.metrics["discriminator_accuracy_real"].append(output.accuracy_real)
        self.step.metrics["discriminator_accuracy_fake"].append(output.accuracy_fake)
        self.step.fakes.extend(fake)

    # ---- the end of an optimizer step

    def finish_step(self):
        """The discriminator's optimizer step, or, when anything of this step is not finite on any process, the skip
        of both networks' steps (the captioner's gradients are dropped before the Trainer steps it)."""
        self.discriminator.all_reduce_gradients()
        discriminator_norm = self.discriminator.clip_gradients()
        if not torch.isfinite(discriminator_norm):
            self.step.problems.add("discriminator gradients")
        if not gradients_are_finite(self.model_wrapped):
            self.step.problems.add("generator gradients")
        local = torch.tensor([float(problem in self.step.problems) for problem in STEP_PROBLEMS],
                             device=self.args.device)
        problems = [name for name, flag in zip(STEP_PROBLEMS, self.accelerator.reduce(local, "sum")) if flag > 0]
        if problems:
            for parameter in self.model_wrapped.parameters():
                parameter.grad = None
            self.discriminator.skip()
            self.skipped_steps += 1
            logger.warning("step %d: non-finite %s; the step is skipped for the captioner and the discriminator "
                           "(%d skipped so far).", self.state.global_step + 1, ", ".join(problems), self.skipped_steps)
        else:
            self.discriminator.step()
            self.further_discriminator_updates()
        self.step.metrics["discriminator_grad_norm"].append(discriminator_norm.item())
        self.publish_step_metrics()
        self.step, self.finished_step = StepState(), self.step

    def further_discriminator_updates(self):
        """The discriminator's updates after the step's first (`discriminator_steps - 1` of them): each on corpus
        sentences and captions drawn from this step's samples and the replayed earlier ones, as many of each as the
        step sampled here, by a generator seeded by the seed, the step and the process, so that a resumed run draws
        what an uninterrupted one would. An update whose gradients are not finite (on any process) is dropped."""
        fakes = self.replay + self.step.fakes
        count, corpus = len(self.step.fakes), self.corpus_stream.corpus
        slot = self.state.global_step * self.accelerator.num_processes + self.accelerator.process_index
        generator = torch.Generator().manual_seed(self.args.seed + 1_000_003 * (slot + 1))
        for _ in range(self.args.discriminator_steps - 1):
            real = corpus[torch.randint(len(corpus), (count,), generator=generator).tolist()]["text"]
            fake = [fakes[row] for row in torch.randint(len(fakes), (count,), generator=generator).tolist()]
            with self.accelerator.autocast():
                output = self.discriminator.loss(real, fake)
            output.loss.backward()
            self.discriminator.all_reduce_gradients()
            if torch.isfinite(self.discriminator.clip_gradients()):
                self.discriminator.step()
            else:
                self.discriminator.skip()
            self.step.metrics["discriminator_further_loss"].append(output.loss.item())
        if self.args.discriminator_replay:
            self.replay = (self.replay + gather_object(self.step.fakes))[-self.args.discriminator_replay:]

    def publish_step_metrics(self):
        """This step's metrics, averaged over its micro-batches and over the processes, into the logging buffer."""
        names = sorted(self.step.metrics)
        local = torch.tensor([sum(values) / len(values) for values in map(self.step.metrics.get, names)],
                             dtype=torch.float64, device=self.args.device)
        for name, value in zip(names, self.accelerator.reduce(local, "mean").tolist()):
            self._metrics[name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["skipped_steps"] = self.skipped_steps  # a running count, not averaged over the logging window
            if self.finished_step.reward_samples and self.args.should_save:
                self.write_reward_samples()
        super().log(logs, start_time)

    def write_reward_samples(self):
        """The latest step's per-sample rewards and caption lengths (this process's samples), one JSON line per
        logging step, for reward histograms."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, REWARD_SAMPLES_FILE), "a") as samples:
            samples.write(json.dumps({"step": self.state.global_step, **self.finished_step.reward_samples}) + "\n")

    # ---- schedules, checkpoints

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        self.discriminator.create_scheduler(num_training_steps * self.args.discriminator_steps)
        return scheduler

    def ensure_discriminator_scheduler(self):
        """A DeepSpeed config with its own scheduler bypasses `create_scheduler`: the discriminator's is made here."""
        if self.discriminator.scheduler is None:
            self.discriminator.create_scheduler(self.state.max_steps * self.args.discriminator_steps)

    def _save_checkpoint(self, model, trial):
        checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            self.discriminator.save(os.path.join(checkpoint, DISCRIMINATOR_FOLDER),
                                    extra_state={"skipped_steps": self.skipped_steps,
                                                 "advantage_scales": self.advantage_scales.state_dict(),
                                                 "replay": self.replay})
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.ensure_discriminator_scheduler()
            with zero3_init_disabled(self.args):
                extra = self.discriminator.load(os.path.join(checkpoint, DISCRIMINATOR_FOLDER))
            self.skipped_steps = extra.get("skipped_steps", 0)
            if "advantage_scales" in extra:
                self.advantage_scales.load_state_dict(extra["advantage_scales"])
            self.replay = list(extra.get("replay", []))


def gradients_are_finite(model) -> bool:
    """Whether this process's share of the model's gradients is finite (sharded gradients count their local part)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads = [grad.to_local() if hasattr(grad, "to_local") else grad for grad in grads]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def split_heldout(corpus, share: float, seed: int):
    """The corpus rows the discriminator trains on, and the texts of a seeded `share` of them kept out."""
    count = int(share * len(corpus))
    if count == 0:
        return corpus, []
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed)).tolist()
    return corpus.select(sorted(order[count:])), corpus.select(sorted(order[:count]))["text"]


def check_tables(images, corpus, args: SCSTConfig):
    """Clear errors for tables that lack what the settings need."""
    if "clip_features" not in images.column_names:
        raise ValueError(f"the training images table has no clip_features column (columns: {images.column_names}).")
    if args.semantic_reward_weights.needs_aggregates and "agg_text_features" not in images.column_names:
        raise ValueError("agg_cos_weight / agg_l1_weight > 0 need agg_text_features in the training images table: "
                         "make it with `prepare_datasets.py aggregate`.")
    if "text" not in corpus.column_names or len(corpus) == 0:
        raise ValueError(f"the corpus table must hold sentences in a text column (columns: {corpus.column_names}, "
                         f"{len(corpus)} rows).")
    if args.mmd_weight > 0 and "clip_features" not in corpus.column_names:
        raise ValueError("mmd_weight > 0 needs clip_features in the corpus table.")


def build_discriminator(args: SCSTConfig, caption_tokenizer) -> Discriminator:
    """The discriminator the settings describe, replicated on every process (never partitioned by DeepSpeed ZeRO-3,
    whose engine only holds the captioner)."""
    settings = dict(max_length=args.discriminator_max_length, learning_rate=args.discriminator_learning_rate,
                    weight_decay=args.discriminator_weight_decay,
                    lr_scheduler_type=args.discriminator_lr_scheduler_type,
                    warmup_steps=args.discriminator_warmup_steps, max_grad_norm=args.discriminator_max_grad_norm)
    with zero3_init_disabled(args):
        if args.discriminator_config:
            return Discriminator.from_config(args.discriminator_config, caption_tokenizer, **settings)
        return Discriminator.from_pretrained(args.discriminator_name_or_path, **settings)


@contextlib.contextmanager
def zero3_init_disabled(args: TrainingArguments):
    """While transformers knows a ZeRO-3 config, `from_pretrained` / `from_config` build partitioned models. The config
    is registered by `--deepspeed` (`hf_deepspeed_config`) or by an accelerate DeepSpeed plugin (`dschf`), even with
    accelerate's zero3_init_flag off."""
    plugin = getattr(args, "deepspeed_plugin", None)
    deepspeed_config = getattr(args, "hf_deepspeed_config", None) or getattr(plugin, "dschf", None)
    if deepspeed_config is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(deepspeed_config)

