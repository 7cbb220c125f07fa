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

    >>> rewards = ClipRewards.from_model_config(model.config, SemanticWeights(clip_cos=0.5, agg_cos=0.5))
    >>> rewards(["a red circle."], image_features, agg_features)["semantic"]
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool

from dataprep.clip import LoadedClip


@dataclass(frozen=True)
class SemanticWeights:
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
                    weights: SemanticWeights, logit_scale: float) -> dict[str, torch.Tensor]:
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


@dataclass(frozen=True)
class CausalTextTower:
    """An open_clip text tower whose caption features can be computed on the caption's positions alone.

    With a causal attention mask a position's output depends on the positions before it only, and pooling at the end
    token (`argmax`: the highest token id, `eos`: the end token) reads a position inside the caption: the padding after
    the batch's longest caption changes no feature, and the tower can run on the tokens cut there. OpenAI's CLIPs
    (ViT-B/32: 77 positions for captions of ~15 tokens) and the shapes world's are such towers.

    Attributes:
        module: what holds the tower's parts (`token_embedding`, `positional_embedding`, `attn_mask`, `transformer`,
            `ln_final`, `text_projection`): the `CLIP` itself, or a `CustomTextCLIP`'s `TextTransformer`.
        pool_type: `argmax` or `eos`.
        eos_token_id: the end token, for `eos` pooling.
    """

    module: torch.nn.Module
    pool_type: str
    eos_token_id: int | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "CausalTextTower | None":
        """The tower of an open_clip model, or None where cutting the tokens would change the features: without a
        causal mask (every position sees the padding), pooled at the first or last position (the last one moves with
        the cut), with CoCa's class token appended after the padding, or a Hugging Face text model."""
        if isinstance(model, open_clip.CLIP):
            tower, pool_type, eos_token_id = model, model.text_pool_type, model.text_eos_id
        elif isinstance(getattr(model, "text", None), TextTransformer) and model.text.cls_emb is None:
            tower, pool_type, eos_token_id = model.text, model.text.pool_type, model.text.eos_id
        else:
            return None
        if tower.attn_mask is None or pool_type not in ("argmax", "eos"):
            return None
        return cls(tower, pool_type, eos_token_id)

    def positions(self, tokens: torch.Tensor) -> int:
        """Positions the captions need: up to the last pooled position of the batch."""
        if self.pool_type == "argmax":
            pooled = tokens.argmax(dim=-1)
        else:
            pooled = (tokens == self.eos_token_id).int().argmax(dim=-1)
        return int(pooled.max()) + 1

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's `encode_text` (raw embeddings) on the first [`positions`] of `tokens`, with the positional
        table and the causal mask cut to them (open_clip sizes the mask to the whole context)."""
        length = self.positions(tokens)
        tokens, tower = tokens[:, :length], self.module
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = text_global_pool(tower.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_token_id)
        if tower.text_projection is None:
            return x
        if isinstance(tower.text_projection, torch.nn.Linear):
            return tower.text_projection(x)
        return x @ tower.text_projection


class ClipTextEncoder:
    """Raw float32 CLIP text embeddings `(N, D)` of captions, as open_clip's `encode_text` gives them, computed on the
    positions the batch's longest caption needs where the tower allows it ([`CausalTextTower`]), on CLIP's whole
    context otherwise.

    Args:
        model: the open_clip model.
        tokenizer: its open_clip tokenizer (padding to the model's context length).
    """

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.causal_tower = CausalTextTower.of(model)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(next(self.model.parameters()).device)
        if self.causal_tower is None:
            return self.model.encode_text(tokens).float()
        return self.causal_tower.encode(tokens).float()


class ClipRewards:
    """The frozen CLIP text tower and the semantic reward it gives captions.

    Args:
        clip: the loaded CLIP (its metadata says which CLIP it is and holds its logit scale).
        weights: weights of the three CLIP scores.
    """

    def __init__(self, clip: LoadedClip, weights: SemanticWeights = SemanticWeights()):
        if clip.metadata.get("logit_scale") is None:
            raise ValueError(f"CLIP {clip.metadata['model_name']} has no logit scale to scale the rewards with.")
        self.clip = clip
        self.weights = weights
        self.logit_scale = float(clip.metadata["logit_scale"])
        self.encode_text = ClipTextEncoder(clip.model, clip.tokenizer)

    @classmethod
    def from_model_config(cls, config, weights: SemanticWeights = SemanticWeights(),
                          device: str | torch.device = "cpu") -> "ClipRewards":
        """The CLIP the captioner's config refers to (`clip_model_name`, `clip_pretrained`), loaded frozen."""
        return cls(LoadedClip.load(config.clip_model_name, config.clip_pretrained, device), weights)

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
