"""Stage `init`: the captioner learns from text alone.

Each corpus sentence is reconstructed from its own CLIP text embedding plus Gaussian noise (CapDec's remedy for the
image-text modality gap). Optional terms: cross-entropy on pseudo pairs (unpaired images with their nearest corpus
sentence) and an MMD term pulling mapped image prefixes onto mapped text prefixes. With true (image, caption) pairs
as the corpus and no noise, the same trainer is plain supervised ClipCap training.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import EarlyStoppingCallback

from .common import MMD_BANDWIDTHS, CaptionCollator, CaptionConfig, CaptionEvaluator, CaptionTrainer, mmd_rbf


@dataclass
class InitConfig(CaptionConfig):
    r"""Settings of the text-only initialization stage; the supervised bound's, [`SupervisedConfig`], are these
    without the text-only terms. The shared ones are [`CaptionConfig`]'s."""

    # Text-only reconstruction
    noise_std: float = field(
        default=0.1,
        metadata={
            "help": "Std of the Gaussian noise added to each sentence's CLIP embedding before mapping it "
            "(CapDec). 0 turns it off.",
            "aliases": ["--sigma"],
        },
    )
    max_caption_length: int = field(
        default=40, metadata={"help": "Caption tokens per sentence, EOS included; longer sentences are cut."}
    )

    # Extra terms, each off at weight 0
    pseudo_pair_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the cross-entropy on pseudo pairs (each unpaired image with its nearest corpus "
            "sentence, from `prepare_datasets.py pseudo-pairs`).",
            "aliases": ["--lambda1"],
        },
    )

    # Evaluation
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Stop once metric_for_best_model has not improved for this many evaluations (0: train "
                          "every epoch). The supervised bound uses it to train until validation stops improving."},
    )

    # Trainer defaults that suit this stage
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("noise_std", "pseudo_pair_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}.")
        if self.max_caption_length < 2:
            raise ValueError(f"max_caption_length must leave room for a word and EOS, got {self.max_caption_length}.")
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}.")
        if self.early_stopping_patience and not (self.load_best_model_at_end and self.metric_for_best_model):
            raise ValueError("early_stopping_patience needs a validation metric to watch: set metric_for_best_model "
                             "and load_best_model_at_end.")


@dataclass
class SupervisedConfig(InitConfig):
    r"""Settings of the supervised upper bound: plain ClipCap training on the true (image, reference) pairs of the
    train table. The text-only terms of [`InitConfig`] are off and no settings of it."""

    noise_std: float = field(default=0.0, init=False, metadata={"help": "No noise: the features are the images'."})
    pseudo_pair_weight: float = field(
        default=0.0, init=False, metadata={"help": "No pseudo pairs: every pair is a true one."}
    )
    mmd_weight: float = field(default=0.0, init=False, metadata={"help": "No MMD: the prefixes are the images'."})
    mmd_bandwidths: list[float] = field(
        default_factory=lambda: list(MMD_BANDWIDTHS), init=False, metadata={"help": "Unused without the MMD term."}
    )


class InitTrainingData(Dataset):
    """Corpus rows, each joined with a pseudo pair and an unpaired image (cycled) for the extra terms."""

    def __init__(self, corpus, pseudo_pairs=None, images=None):
        self.corpus = corpus
        self.pseudo_pairs = pseudo_pairs
        self.images = images

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> dict:
        row = self.corpus[index]
        item = {"text": row["text"], "clip_features": row["clip_features"]}
        if self.pseudo_pairs is not None:
            pair = self.pseudo_pairs[index % len(self.pseudo_pairs)]
            item.update(pair_text=pair["text"], pair_clip_features=pair["clip_features"])
        if self.images is not None:
            item["image_clip_features"] = self.images[index % len(self.images)]["clip_features"]
        return item


class InitTrainer(CaptionTrainer):
    """Text-only initialization of a [`SCSTClipCapForCaptioning`].

    Args:
        model: the captioner.
        args: [`InitConfig`] ([`SupervisedConfig`] for the supervised bound).
        corpus: table with `text` and `clip_features` (CLIP text embeddings).
        processing_class: the caption tokenizer (saved with every checkpoint).
        pseudo_pairs: table with `text` and `clip_features` (image embeddings); needed when `pseudo_pair_weight > 0`.
        images: table of unpaired images with `clip_features`; needed when `mmd_weight > 0` without pseudo pairs.
        evaluator: a [`CaptionEvaluator`] on the validation images; without it, evaluation is skipped.
    """

    def __init__(self, model, args: InitConfig, corpus, processing_class, pseudo_pairs=None, images=None,
                 evaluator: CaptionEvaluator | None = None, **kwargs):
        if args.pseudo_pair_weight > 0 and pseudo_pairs is None:
            raise ValueError("pseudo_pair_weight > 0 needs the pseudo-pairs table: pass pseudo_pairs=...")
        if args.mmd_weight > 0 and pseudo_pairs is None and images is None:
            raise ValueError("mmd_weight > 0 needs image embeddings: pass images=... or pseudo_pairs=...")
        use_pairs = pseudo_pairs if args.pseudo_pair_weight > 0 else None
        use_images = images if args.mmd_weight > 0 and use_pairs is None else None
        collator = CaptionCollator(
            processing_class, args.max_caption_length,
            {"pair_clip_features": "pair_prefix_features", "image_clip_features": "image_prefix_features"},
        )
        if evaluator is not None:
            # The Trainer wants an eval_dataset for its evaluation schedule; evaluate() reads the evaluator's.
            kwargs.setdefault("eval_dataset", evaluator.images)
        super().__init__(
            model=model, args=args, train_dataset=InitTrainingData(corpus, use_pairs, use_images),
            data_collator=collator, processing_class=processing_class, **kwargs,
        )
        self.evaluator = evaluator
        self._metrics = defaultdict(list)
        if args.early_stopping_patience:
            self.add_callback(EarlyStoppingCallback(args.early_stopping_patience))

    def noisy_text_prefix(self, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP text embeddings as the model will see them, plus noise (normalised first when the model is)."""
        if self.model.config.normalize_prefix:
            text_features = F.normalize(text_features, dim=-1)
        if self.args.noise_std > 0:
            text_features = text_features + torch.randn_like(text_features) * self.args.noise_std
        return text_features

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        text = model(
            prefix_features=self.noisy_text_prefix(inputs["prefix_features"]),
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["input_ids"],
        )
        loss = text.loss
        self._metrics["reconstruction_loss"].append(text.loss.item())
        image_prefix = None
        if self.args.pseudo_pair_weight > 0:
            pairs = model(
                prefix_features=inputs["pair_prefix_features"], input_ids=inputs["pair_input_ids"],
                attention_mask=inputs["pair_attention_mask"], labels=inputs["pair_input_ids"],
            )
            loss = loss + self.args.pseudo_pair_weight * pairs.loss
            image_prefix = pairs.prefix_embeds
            self._metrics["pseudo_pair_loss"].append(pairs.loss.item())
        if self.args.mmd_weight > 0:
            if image_prefix is None:
                image_prefix = model(prefix_features=inputs["image_prefix_features"], logits_to_keep=1).prefix_embeds
            mmd = mmd_rbf(image_prefix.flatten(1), text.prefix_embeds.flatten(1), tuple(self.args.mmd_bandwidths))
            loss = loss + self.args.mmd_weight * mmd
            self._metrics["mmd"].append(mmd.item())
        return (loss, text) if return_outputs else loss
