"""CLIP-S, the reference-free caption score of Hessel et al. (2021), "CLIPScore".

CLIP-S(image, caption) = weight * max(cos(E_image, E_text("A photo depicts " + caption)), 0),
weight 2.5, averaged over images. Image features are precomputed (the images table's
`clip_features`); captions are encoded by an open_clip model + tokenizer or any callable.

    from clip_scstclipcap import CaptioningClip
    from metrics.clip_score import clip_score
    clip = CaptioningClip.load("ViT-B-32", "openai")
    clip_score(image_features, captions, encode_text=clip.text_encoder)   # or model=clip.model, tokenizer=clip.tokenizer
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip_scstclipcap import ClipTextEncoder

CLIP_S_WEIGHT = 2.5
# Hessel et al. prefix every caption with this prompt; it slightly improves correlation with humans.
HESSEL_PROMPT = "A photo depicts"

Features = torch.Tensor | np.ndarray


def clip_s_per_image(image_features: Features, text_features: Features, weight: float = CLIP_S_WEIGHT) -> torch.Tensor:
    """weight * max(cos(image_i, text_i), 0) for each row i of two [N, D] feature matrices."""
    images = _as_matrix(image_features, "image_features")
    texts = _as_matrix(text_features, "text_features").to(images.device)
    if images.shape != texts.shape:
        raise ValueError(
            f"image_features {tuple(images.shape)} and text_features {tuple(texts.shape)} "
            "must have the same shape [N, D]"
        )
    cosine = F.cosine_similarity(images, texts, dim=-1)
    return weight * cosine.clamp(min=0)


@torch.no_grad()
def encode_captions(
    captions: Sequence[str],
    model: torch.nn.Module | None = None,
    tokenizer: Callable | None = None,
    encode_text: Callable[[list[str]], Features] | None = None,
    prompt: str = HESSEL_PROMPT,
    batch_size: int = 256,
) -> torch.Tensor:
    """Text features [N, D] of `captions` (each prefixed with `prompt`), by an open_clip
    model + tokenizer or by `encode_text` (list of str -> [n, D] features)."""
    if encode_text is None:
        if model is None or tokenizer is None:
            raise ValueError("encode captions with either model and tokenizer (open_clip) or encode_text")
        encode_text = ClipTextEncoder(model, tokenizer)
    texts = [f"{prompt} {caption}" if prompt else caption for caption in captions]
    batches = [
        _as_matrix(encode_text(texts[start : start + batch_size]), "encoded captions").cpu()
        for start in range(0, len(texts), batch_size)
    ]
    return torch.cat(batches)


def clip_score(
    image_features: Features,
    captions: Sequence[str] | None = None,
    *,
    text_features: Features | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Callable | None = None,
    encode_text: Callable[[list[str]], Features] | None = None,
    prompt: str = HESSEL_PROMPT,
    weight: float = CLIP_S_WEIGHT,
    batch_size: int = 256,
) -> float:
    """Mean CLIP-S over images: row i of `image_features` [N, D] against caption i, given as
    text (`captions`, encoded as in `encode_captions`) or as precomputed `text_features`."""
    if (captions is None) == (text_features is None):
        raise ValueError("give exactly one of captions and text_features")
    if captions is not None:
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of str, one per image, not a single str")
        text_features = encode_captions(captions, model, tokenizer, encode_text, prompt, batch_size)
    return float(clip_s_per_image(image_features, text_features, weight).mean())


def _as_matrix(features: Features, name: str) -> torch.Tensor:
    matrix = torch.as_tensor(features).float()
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix, got shape {tuple(matrix.shape)}")
    return matrix
