"""Semantic rewards of stage `scst`: how well a caption matches its image, measured by the frozen CLIP.

Each score lives in CLIP's own space and is scaled by CLIP's logit scale (the exp of its learned temperature: 100
for ViT-B/32), as CLIP's logits are:

- `clip_cos`: cosine between the caption's CLIP text embedding and the image's CLIP embedding (CLIP-S without the
  clipping);
- `agg_cos`: cosine between the caption and the image's aggregated corpus embedding (the `agg_text_features` column
  written by `prepare_datasets.py aggregate`: the softmax(t * cos)-weighted mean of the corpus sentences' embeddings);
- `agg_l1`: 1 - the mean absolute difference between the same two unit vectors (CgT-GAN's L1 term).

The semantic reward is their weighted sum. The text tower comes from the captioner config's CLIP reference
(`clip_model_name`, `clip_pretrained`) and stays frozen; [`ClipTextEncoder`] runs it on the positions the captions
use rather than on CLIP's whole context where that gives the same features (CLIP-S in evaluation uses it too).

    >>> rewards = ClipRewards.from_model_config(model.config, SemanticRewardWeights(clip_cos=0.5, agg_cos=0.5))
    >>> rewards(["a red circle."], image_features, agg_features)["semantic"]
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from clip_scstclipcap import CaptioningClip


@dataclass(frozen=True)
class SemanticRewardWeights:
    """Weight of each CLIP score in the semantic reward; a score at weight 0 is still computed and logged."""

    clip_cos: float = 1.0
    agg_cos: float = 0.0
    agg_l1: float = 0.0

    def __post_init__(self):
        weights = asdict(self)
        if min(weights.values()) < 0 or sum(weights.values()) == 0:
            raise ValueError(f"semantic reward weights must be >= 0 and not all 0, got {weights}.")

    @property
    def needs_aggregates(self) -> bool:
        return self.agg_cos > 0 or self.agg_l1 > 0


def semantic_scores(text_features: torch.Tensor, image_features: torch.Tensor, agg_features: torch.Tensor | None,
                    weights: SemanticRewardWeights, logit_scale: float) -> dict[str, torch.Tensor]:
    """CLIP scores of N captions, one (N,) tensor each: `clip_cos`, `agg_cos` and `agg_l1` (when `agg_features` are
    given) and their weighted sum `semantic`. Inputs are (N, D) CLIP embeddings, normalised here."""
    if weights.needs_aggregates and agg_features is None:
        raise ValueError("the semantic reward weighs CLIP-agg but no aggregated embeddings were given.")
    text = F.normalize(text_features.float(), dim=-1)
    scores = {"clip_cos": logit_scale * (text * F.normalize(image_features.float(), dim=-1)).sum(-1)}
    if agg_features is not None:
        aggregate = F.normalize(agg_features.float(), dim=-1)
        scores["agg_cos"] = logit_scale * (text * aggregate).sum(-1)
        scores["agg_l1"] = logit_scale * (1 - (text - aggregate).abs().mean(-1))
    scores["semantic"] = sum(weight * scores[name] for name, weight in asdict(weights).items() if weight > 0)
    return scores


class ClipRewards:
    """The frozen CLIP text tower and the semantic reward it gives captions.

    Args:
        clip: the loaded CLIP (its metadata says which CLIP it is and holds its logit scale).
        weights: weights of the three CLIP scores.
    """

    def __init__(self, clip: CaptioningClip, weights: SemanticRewardWeights = SemanticRewardWeights()):
        if clip.metadata.get("logit_scale") is None:
            raise ValueError(f"CLIP {clip.metadata['model_name']} has no logit scale to scale the rewards with.")
        self.clip = clip
        self.weights = weights
        self.logit_scale = float(clip.metadata["logit_scale"])
        self.encode_text = clip.text_encoder

    @classmethod
    def from_model_config(cls, config, weights: SemanticRewardWeights = SemanticRewardWeights(),
                          device: str | torch.device = "cpu") -> "ClipRewards":
        """The CLIP the captioner's config refers to (`clip_model_name`, `clip_pretrained`), loaded frozen."""
        return cls(CaptioningClip.load(config.clip_model_name, config.clip_pretrained, device), weights)

    @property
    def metadata(self) -> dict:
        """Which CLIP this is, in the form the tables record (to check that they come from the same one)."""
        return self.clip.metadata

    def __call__(self, captions: list[str], image_features: torch.Tensor,
                 agg_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Float32 scores of each caption against its row of `image_features` (and of `agg_features`), see
        [`semantic_scores`]; on the device of `image_features`."""
        text = self.encode_text(captions).to(image_features.device)
        return semantic_scores(text, image_features, agg_features, self.weights, self.logit_scale)
