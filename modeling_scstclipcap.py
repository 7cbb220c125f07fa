"""SCSTClipCap: a frozen CLIP embedding -> prefix mapper -> GPT-2 captioner (ClipCap architecture).

This file is self-contained on purpose: a saved model folder carries it, and
`AutoModel.from_pretrained(folder, trust_remote_code=True)` imports it without the project installed.

    >>> model = SCSTClipCapForCaptioning.from_pretrained("path/to/model")
    >>> model.generate_captions(clip_image_features)  # (batch, D) -> list of strings
    >>> model.caption_images(["photo.jpg"])  # images -> list of strings, through the model's own CLIP

The image side (CLIP loading, image decoding and encoding) lives beside this file in `clip_scstclipcap.py`, imported
only when images are captioned; the `transformers` pipeline in `pipeline_scstclipcap.py`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, GenerationMixin, GPT2LMHeadModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_scstclipcap import SCSTClipCapConfig
except ImportError:
    from configuration_scstclipcap import SCSTClipCapConfig

# Caption length when neither the call nor the saved generation config sets one (ClipCap's captions stay under it).
DEFAULT_MAX_NEW_TOKENS = 30


class MLPMapper(nn.Module):
    """ClipCap's MLP mapper: Linear -> Tanh -> Linear from one CLIP vector to `prefix_length` embeddings."""

    def __init__(self, config: SCSTClipCapConfig):
        super().__init__()
        hidden_size = config.decoder_config.n_embd
        out_features = hidden_size * config.prefix_length
        self.prefix_length = config.prefix_length
        self.model = nn.Sequential(
            nn.Linear(config.prefix_dim, out_features // 2),
            nn.Tanh(),
            nn.Linear(out_features // 2, out_features),
        )

    def forward(self, prefix_features: torch.Tensor) -> torch.Tensor:
        # (B, D) -> (B, P, H)
        return self.model(prefix_features).view(prefix_features.shape[0], self.prefix_length, -1)


class MappingAttention(nn.Module):
    """Multi-head self-attention with ClipCap's parameter layout (separate query and key-value projections)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(hidden_size, hidden_size, bias=False)
        self.to_keys_values = nn.Linear(hidden_size, hidden_size * 2, bias=False)
        self.project = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, length, hidden_size = hidden_states.shape
        head_dim = hidden_size // self.num_heads
        # (B, L, H) -> (B, heads, L, head_dim)
        queries = self.to_queries(hidden_states).view(batch_size, length, self.num_heads, head_dim).transpose(1, 2)
        keys_values = self.to_keys_values(hidden_states).view(batch_size, length, 2, self.num_heads, head_dim)
        keys, values = keys_values.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(queries, keys, values)
        return self.project(attended.transpose(1, 2).reshape(batch_size, length, hidden_size))


class MappingMLP(nn.Module):
    def __init__(self, hidden_size: int, inner_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.fc2 = nn.Linear(inner_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(hidden_states)))


class MappingTransformerLayer(nn.Module):
    """Pre-norm Transformer layer, as in ClipCap's mapper."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = MappingAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = MappingMLP(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


class MappingTransformer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_layers: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(
            MappingTransformerLayer(hidden_size, num_heads, mlp_ratio) for _ in range(num_layers)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class TransformerMapper(nn.Module):
    """ClipCap's Transformer mapper: the CLIP vector becomes `clip_length` tokens, followed by `prefix_length`
    learned constants; after the Transformer, the constants' positions are the prefix."""

    def __init__(self, config: SCSTClipCapConfig):
        super().__init__()
        hidden_size = config.decoder_config.n_embd
        self.clip_length = config.clip_length
        self.linear = nn.Linear(config.prefix_dim, config.clip_length * hidden_size)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, hidden_size))
        self.transformer = MappingTransformer(
            hidden_size, config.num_mapping_heads, config.num_mapping_layers, config.mapping_mlp_ratio
        )

    def forward(self, prefix_features: torch.Tensor) -> torch.Tensor:
        batch_size = prefix_features.shape[0]
        clip_tokens = self.linear(prefix_features).view(batch_size, self.clip_length, -1)  # (B, C, H)
        constants = self.prefix_const.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, H)
        hidden_states = self.transformer(torch.cat((clip_tokens, constants), dim=1))  # (B, C + P, H)
        return hidden_states[:, self.clip_length :]


class SCSTClipCapPreTrainedModel(PreTrainedModel):
    config_class = SCSTClipCapConfig
    base_model_prefix = "scstclipcap"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TransformerMapper):
            nn.init.normal_(module.prefix_const, mean=0.0, std=1.0)


@dataclass
class SCSTClipCapOutput(CausalLMOutputWithPast):
    """
    Args:
        prefix_embeds (`torch.FloatTensor` of shape `(batch_size, prefix_length, hidden_size)`, *optional*):
            The mapper's output, i.e. the GPT-2 input embeddings that stand for the image (returned on the first,
            uncached pass).
    """

    prefix_embeds: torch.FloatTensor | None = None


class SCSTClipCapForCaptioning(SCSTClipCapPreTrainedModel, GenerationMixin):
    """A prefix mapper and GPT-2: captions from CLIP embeddings.

    `forward` scores a caption given the CLIP embedding (teacher forcing); `generate(prefix_features=...)` writes
    captions through [`GenerationMixin`] (greedy, sampling, beam search) with the KV cache, returning the caption
    token ids only.
    """

    def __init__(self, config: SCSTClipCapConfig):
        super().__init__(config)
        self.mapper = MLPMapper(config) if config.mapping_type == "mlp" else TransformerMapper(config)
        if config.mapping_type == "transformer":
            # FSDP auto-wrapping looks up every class named here, so the MLP variant must not name this one.
            self._no_split_modules = ["GPT2Block", "MappingTransformerLayer"]
        self.decoder = GPT2LMHeadModel(config.decoder_config)
        self.decoder.loss_type = "ForCausalLM"
        if config.freeze_decoder:
            self.decoder.requires_grad_(False)
        self._caption_tokenizer = None
        self._caption_clip = None
        self.post_init()
        # Tied copies (the LM head is GPT-2's word embedding matrix) are not saved. Declaring them as keys left out of
        # a save makes `Trainer` re-tie instead of reporting them missing when it loads a checkpoint (resume, best
        # model).
        self._keys_to_ignore_on_save = set(self.all_tied_weights_keys)
        if self.generation_config.max_new_tokens is None:
            # A length of our own, so that `generate` neither warns nor stops at the library's 20 tokens.
            room = config.decoder_config.n_positions - config.prefix_length
            self.generation_config.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)

    @classmethod
    def from_decoder_pretrained(cls, decoder_name_or_path: str, **config_kwargs) -> "SCSTClipCapForCaptioning":
        """A new captioner (randomly initialised mapper) around a pretrained GPT-2.

        Args:
            decoder_name_or_path (`str`):
                Hub id (`"gpt2"`) or local folder of a GPT-2 language model.
            config_kwargs:
                Remaining [`SCSTClipCapConfig`] settings (`prefix_dim`, `mapping_type`, ...).
        """
        decoder = GPT2LMHeadModel.from_pretrained(decoder_name_or_path)
        model = cls(SCSTClipCapConfig(decoder_config=decoder.config.to_dict(), **config_kwargs))
        model.decoder.load_state_dict(decoder.state_dict())
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.decoder.set_output_embeddings(new_embeddings)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_decoder:
            # A frozen GPT-2 also keeps dropout off, as in ClipCap.
            self.decoder.eval()
        return self

    def map_prefix(self, prefix_features: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings `(batch, D)` -> GPT-2 input embeddings `(batch, prefix_length, hidden)`."""
        prefix_features = prefix_features.to(self.mapper_dtype)
        if self.config.normalize_prefix:
            prefix_features = F.normalize(prefix_features, dim=-1)
        return self.mapper(prefix_features)

    @property
    def mapper_dtype(self) -> torch.dtype:
        return next(self.mapper.parameters()).dtype

    def forward(
        self,
        prefix_features: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache=None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SCSTClipCapOutput:
        r"""
        Args:
            prefix_features (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`):
                CLIP embeddings of the images (or, in text-only training, of the sentences).
            input_ids (`torch.LongTensor` of shape `(batch_size, caption_length)`, *optional*):
                Caption tokens that follow the prefix. After the first pass of generation (when `cache` holds the
                prefix), only the new tokens.
            attention_mask (`torch.LongTensor` of shape `(batch_size, caption_length)`, *optional*):
                1 for caption tokens, 0 for padding. With `prefix_features` it covers the caption only; the prefix
                positions are added. During cached generation it covers prefix and caption, as `generate` keeps it.
            labels (`torch.LongTensor` of shape `(batch_size, caption_length)`, *optional*):
                Targets for the caption positions (usually `input_ids`); `-100` and padded positions are ignored.
                The loss never covers the prefix.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, length, hidden_size)`, *optional*):
                Ready-made GPT-2 input embeddings, bypassing the mapper (used by `generate` for the prefix).
            cache (`transformers.Cache`, *optional*):
                KV cache of the positions already seen.
            position_ids (`torch.LongTensor`, *optional*):
                Positions, when not the natural `0..length-1` continuation of the cache.
            use_cache (`bool`, *optional*):
                Return the KV cache.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                Compute logits for the last `logits_to_keep` positions only (0: all).

        Returns:
            `SCSTClipCapOutput`: `loss` (mean cross-entropy over caption tokens, when `labels` is given), `logits`
            over the prefix and caption positions, `cache`, and `prefix_embeds`.
        """
        prefix_embeds = None
        if prefix_features is not None:
            if inputs_embeds is not None:
                raise ValueError("Pass either prefix_features or inputs_embeds, not both.")
            prefix_embeds = self.map_prefix(prefix_features)
            inputs_embeds, attention_mask, labels = self._prepend_prefix(prefix_embeds, input_ids, attention_mask,
                                                                         labels)
            input_ids = None
        elif attention_mask is None and input_ids is not None:
            attention_mask = self._all_seen_mask(input_ids, cache)
        outputs = self.decoder(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, cache=cache,
            position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
        )
        return SCSTClipCapOutput(loss=outputs.loss, logits=outputs.logits, cache=outputs.cache,
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                 prefix_embeds=prefix_embeds)

    @staticmethod
    def _all_seen_mask(input_ids: torch.LongTensor, cache) -> torch.LongTensor:
        """A mask over every cached and new position. `generate` drops an all-ones mask; GPT-2 would then take the
        pad tokens fed after a caption has ended for padding and warn."""
        seen = cache.get_seq_length() if cache is not None else 0
        return input_ids.new_ones(input_ids.shape[0], seen + input_ids.shape[1])

    def _prepend_prefix(self, prefix_embeds, input_ids, attention_mask, labels):
        batch_size, prefix_length, _ = prefix_embeds.shape
        device = prefix_embeds.device
        if input_ids is None:
            input_ids = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        token_embeds = self.decoder.get_input_embeddings()(input_ids).to(prefix_embeds.dtype)  # (B, T, H)
        inputs_embeds = torch.cat((prefix_embeds, token_embeds), dim=1)  # (B, P + T, H)
        prefix_mask = attention_mask.new_ones(batch_size, prefix_length)
        full_mask = torch.cat((prefix_mask, attention_mask), dim=1)  # (B, P + T)
        if labels is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
            labels = torch.cat((labels.new_full((batch_size, prefix_length), -100), labels), dim=1)
        return inputs_embeds, full_mask, labels

    @torch.no_grad()
    def generate(self, prefix_features: torch.FloatTensor | None = None, **generation_kwargs) -> torch.LongTensor:
        """Write captions for CLIP embeddings through [`GenerationMixin.generate`].

        Args:
            prefix_features (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`):
                CLIP embeddings of the images.
            generation_kwargs:
                Any `generate` argument: `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`,
                `num_beams`, `num_return_sequences`, `generation_config`, `return_dict_in_generate`, ...

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, caption_length)`: caption token ids only
            (no prefix positions), padded with the pad token after EOS; or a `GenerateOutput` when
            `return_dict_in_generate=True`.
        """
        if prefix_features is None:
            return super().generate(**generation_kwargs)
        prefix_embeds = self.map_prefix(prefix_features.to(self.device))
        attention_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=self.device)
        return super().generate(inputs_embeds=prefix_embeds, attention_mask=attention_mask, **generation_kwargs)

    def generate_captions(self, prefix_features: torch.FloatTensor, tokenizer=None, **generation_kwargs) -> list[str]:
        """Captions as strings.

        Args:
            prefix_features (`torch.FloatTensor` of shape `(batch_size, prefix_dim)`):
                CLIP embeddings of the images.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                Defaults to the tokenizer saved beside the model (loaded once from `name_or_path`).
            generation_kwargs:
                Passed to [`generate`].

        Returns:
            `list[str]` of length `batch_size * num_return_sequences`.
        """
        tokenizer = tokenizer or self.caption_tokenizer
        token_ids = self.generate(prefix_features, **generation_kwargs)
        return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    @property
    def caption_tokenizer(self):
        """The tokenizer saved beside the model."""
        if self._caption_tokenizer is None:
            if not self.name_or_path:
                raise ValueError(
                    "This model was not loaded from a folder, so it has no tokenizer of its own: "
                    "pass tokenizer=... to generate_captions."
                )
            # The tokenizer is a standard one: given the model's config, it neither reads the folder's model code
            # nor asks whether to run it.
            self._caption_tokenizer = AutoTokenizer.from_pretrained(
                self.name_or_path, config=self.config, trust_remote_code=False
            )
        return self._caption_tokenizer

    @property
    def caption_clip(self):
        """The CLIP image encoder whose embeddings this model reads (`clip_scstclipcap.CaptioningClip`), loaded
        once: the one bundled in the model's folder or Hub repo (`clip/`), otherwise `config.clip_model_name` /
        `config.clip_pretrained` through open_clip."""
        if self._caption_clip is None:
            self._caption_clip = _clip_class().for_captioner(self.config, self.name_or_path, device=self.device)
        return self._caption_clip

    def caption_images(
        self, images, clip=None, *, batch_size: int = 32, tokenizer=None, timeout: float | None = None,
        **generation_kwargs
    ) -> list[str]:
        """Captions of images, as the captioning pipeline gives them: the CLIP embedding the model reads
        (`config.clip_embedding`) by the CLIP module the pipeline uses (clip_scstclipcap.py), then [`generate`].

        Args:
            images (PIL image, path or URL, or a list of them):
                The images. One that cannot be captioned (a missing file, data that is no image, a URL that does not
                answer) raises one error, which names it and, in a list, its index.
            clip (`clip_scstclipcap.CaptioningClip`, *optional*):
                The image encoder; defaults to [`caption_clip`].
            batch_size (`int`, defaults to 32):
                Images encoded and captioned together.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                Defaults to the tokenizer saved beside the model.
            timeout (`float`, *optional*):
                Seconds a URL may take to connect and to send each part of the image (`clip_scstclipcap.URL_TIMEOUT`
                when not given).
            generation_kwargs:
                Passed to [`generate`] (`max_new_tokens`, defaulting to the generation config's, `num_beams`,
                `do_sample`, ...).

        Returns:
            `list[str]` of length `len(images) * num_return_sequences` (`num_return_sequences` for one image).
        """
        clip = clip or self.caption_clip
        normalize = self.config.clip_embedding == "normalized"
        if isinstance(images, (list, tuple)):
            features = clip.encode_images(images, batch_size=batch_size, normalize=normalize, timeout=timeout)
        else:
            features = clip.encode(clip.pixel_values(images, timeout=timeout), normalize=normalize)
        return [caption for start in range(0, len(features), batch_size)
                for caption in self.generate_captions(features[start : start + batch_size], tokenizer,
                                                      **generation_kwargs)]


def _clip_class():
    """`CaptioningClip` from clip_scstclipcap.py beside this file. The import is relative so that `save_pretrained`
    copies that file too and remote code fetches it."""
    try:
        from .clip_scstclipcap import CaptioningClip
    except ImportError:
        from clip_scstclipcap import CaptioningClip
    return CaptioningClip


SCSTClipCapForCaptioning.register_for_auto_class("AutoModel")

__all__ = ["SCSTClipCapPreTrainedModel", "SCSTClipCapForCaptioning", "SCSTClipCapOutput"]
