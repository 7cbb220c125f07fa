"""Configuration of the SCSTClipCap captioner: a CLIP vector -> prefix mapper -> GPT-2."""

from typing import Literal

from transformers import GPT2Config, PreTrainedConfig

MAPPING_TYPES = ("mlp", "transformer")
CLIP_EMBEDDINGS = ("normalized", "raw")


class SCSTClipCapConfig(PreTrainedConfig):
    r"""
    Configuration of [`SCSTClipCapForCaptioning`]: a prefix mapper that turns one CLIP embedding into
    `prefix_length` GPT-2 input embeddings, and the GPT-2 that writes the caption after them.

    The two ClipCap variants are `mapping_type="mlp"` (Linear-Tanh-Linear, GPT-2 fine-tuned) and
    `mapping_type="transformer"` (a Transformer encoder over `clip_length` tokens projected from the CLIP vector plus
    `prefix_length` learned constants, GPT-2 usually frozen).

    Args:
        prefix_dim (`int`, defaults to 512):
            Size D of the CLIP embedding fed to the mapper (512 for ViT-B/32).
        prefix_length (`int`, defaults to 10):
            Number of GPT-2 input embeddings the mapper produces.
        mapping_type (`str`, defaults to `"mlp"`):
            `"mlp"` or `"transformer"`.
        clip_length (`int`, defaults to 10):
            Transformer mapper only: number of tokens the CLIP vector is projected to.
        num_mapping_layers (`int`, defaults to 8):
            Transformer mapper only: number of Transformer layers.
        num_mapping_heads (`int`, defaults to 8):
            Transformer mapper only: attention heads; must divide the decoder's hidden size.
        mapping_mlp_ratio (`float`, defaults to 2.0):
            Transformer mapper only: width of each layer's MLP relative to the hidden size.
        normalize_prefix (`bool`, defaults to `False`):
            L2-normalise the CLIP embedding before mapping it. The model then gives the same captions for a raw and a
            normalised embedding of an image.
        clip_embedding (`str`, defaults to `"normalized"`):
            Which CLIP image embedding the model was trained on, and so must be given: `"normalized"` (L2-normalised,
            as the tables of `prepare_datasets.py` store them; every model trained here) or `"raw"` (open_clip's
            `encode_image` output as is, as ClipCap's released COCO / Conceptual weights and CgT-GAN read it). The
            captioning pipeline, `caption_images` and evaluation feed this kind.
        freeze_decoder (`bool`, defaults to `False`):
            Keep GPT-2's weights fixed; only the mapper trains.
        decoder_config (`dict` or `GPT2Config`, *optional*):
            The GPT-2 that writes captions. Defaults to GPT-2 small.
        clip_model_name (`str`, defaults to `"ViT-B-32"`):
            open_clip architecture (or `local-dir:` / `hf-hub:` reference) whose embeddings feed the mapper; used by the
            captioning pipeline and by the CLIP rewards.
        clip_pretrained (`str`, *optional*, defaults to `"openai"`):
            open_clip pretrained tag or checkpoint file for `clip_model_name`; `None` when the name carries its weights.

    Example:

    ```python
    >>> from configuration_scstclipcap import SCSTClipCapConfig
    >>> config = SCSTClipCapConfig(mapping_type="transformer", freeze_decoder=True)
    ```
    """

    model_type = "scstclipcap"
    sub_configs_defaults = {"decoder_config": GPT2Config}

    prefix_dim: int = 512
    prefix_length: int = 10
    mapping_type: Literal["mlp", "transformer"] = "mlp"
    clip_length: int = 10
    num_mapping_layers: int = 8
    num_mapping_heads: int = 8
    mapping_mlp_ratio: float = 2.0
    normalize_prefix: bool = False
    clip_embedding: Literal["normalized", "raw"] = "normalized"
    freeze_decoder: bool = False
    decoder_config: dict | PreTrainedConfig | None = None
    clip_model_name: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_settings()
        # Generation and the KV cache read the special tokens from the top-level config.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name, None) is None:
                setattr(self, name, getattr(self.decoder_config, name, None))

    def validate_settings(self):
        """Raise a `ValueError` that says what to change when the settings cannot build a model."""
        if self.mapping_type not in MAPPING_TYPES:
            raise ValueError(f"mapping_type={self.mapping_type!r} is not supported: use one of {MAPPING_TYPES}.")
        if self.clip_embedding not in CLIP_EMBEDDINGS:
            raise ValueError(f"clip_embedding={self.clip_embedding!r} is not supported: use one of {CLIP_EMBEDDINGS}.")
        for name in ("prefix_dim", "prefix_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.decoder_config.model_type != "gpt2":
            raise ValueError(
                f"decoder_config must be a GPT-2 config, got model_type={self.decoder_config.model_type!r}."
            )
        max_positions = self.decoder_config.n_positions
        if self.prefix_length >= max_positions:
            raise ValueError(
                f"prefix_length={self.prefix_length} leaves no room for a caption in GPT-2's {max_positions} "
                "positions: lower prefix_length or raise decoder_config.n_positions."
            )
        if self.mapping_type == "transformer":
            self._validate_transformer_mapper()

    def _validate_transformer_mapper(self):
        for name in ("clip_length", "num_mapping_layers", "num_mapping_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"mapping_type='transformer' needs {name} >= 1, got {getattr(self, name)!r}."
                )
        hidden_size = self.decoder_config.n_embd
        if hidden_size % self.num_mapping_heads:
            raise ValueError(
                f"num_mapping_heads={self.num_mapping_heads} must divide the decoder's hidden size {hidden_size}: "
                "choose a divisor of it."
            )
        if self.mapping_mlp_ratio <= 0:
            raise ValueError(f"mapping_mlp_ratio must be positive, got {self.mapping_mlp_ratio}.")

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The GPT-2 config: the KV cache and generation utilities size themselves from it."""
        return self.decoder_config


SCSTClipCapConfig.register_for_auto_class()

__all__ = ["SCSTClipCapConfig"]
