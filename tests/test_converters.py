"""Converters of original ClipCap / CgT-GAN checkpoints: same logits, clear errors.

The `Original*` modules below copy the forward passes of ClipCap's train.py (github.com/rmokady/CLIP_prefix_caption),
which CgT-GAN's models.py (github.com/Lihr747/CgtGAN) repeats, at tiny sizes and with dropout left out.
"""

import argparse
import re
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

import convert_checkpoint
from clip_scstclipcap import CaptioningClip
from conftest import PROJECT_ROOT, write_random_images
from convert_checkpoint import main

N_EMBD, N_HEAD, VOCAB_SIZE = 32, 2, 64
WORDS = "a the red blue green circle square small big left right of above is and .".split()
# Every id of the tiny GPT-2 is a word, so that any caption decodes.
WORDS += [f"w{index}" for index in range(VOCAB_SIZE - 2 - len(WORDS))]


class OriginalMLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class OriginalMlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.fc2 = nn.Linear(h_dim, in_dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class OriginalMultiHeadAttention(nn.Module):
    def __init__(self, dim_self, num_heads, bias):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim_self // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_self, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)

    def forward(self, x):
        b, n, c = x.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        keys_values = self.to_keys_values(x).reshape(b, n, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c))


class OriginalTransformerLayer(nn.Module):
    def __init__(self, dim_self, num_heads, mlp_ratio, bias=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_self)
        self.attn = OriginalMultiHeadAttention(dim_self, num_heads, bias=bias)
        self.norm2 = nn.LayerNorm(dim_self)
        self.mlp = OriginalMlpTransformer(dim_self, int(dim_self * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OriginalTransformer(nn.Module):
    def __init__(self, dim_self, num_heads, num_layers, mlp_ratio=2.0):
        super().__init__()
        self.layers = nn.ModuleList(OriginalTransformerLayer(dim_self, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class OriginalTransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, num_layers):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = OriginalTransformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding))

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length :]


class OriginalClipCaptionModel(nn.Module):
    """ClipCap's `ClipCaptionModel` (CgT-GAN's generator): GPT-2 under `gpt`, the mapper under `clip_project`."""

    def __init__(self, prefix_length, prefix_size, mapping_type="mlp", clip_length=None, num_layers=8, n_layer=2,
                 n_positions=64):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = GPT2LMHeadModel(
            GPT2Config(n_layer=n_layer, n_embd=N_EMBD, n_head=N_HEAD, n_positions=n_positions, vocab_size=VOCAB_SIZE)
        )
        if mapping_type == "mlp":
            self.clip_project = OriginalMLP((prefix_size, N_EMBD * prefix_length // 2, N_EMBD * prefix_length))
        else:
            self.clip_project = OriginalTransformerMapper(prefix_size, N_EMBD, prefix_length, clip_length, num_layers)

    def forward(self, tokens, prefix, mask):
        embedding_text = self.gpt.transformer.wte(tokens)
        prefix_projections = self.clip_project(prefix).view(-1, self.prefix_length, N_EMBD)
        return self.gpt(inputs_embeds=torch.cat((prefix_projections, embedding_text), dim=1), attention_mask=mask)


def original_model(seed=0, **settings) -> OriginalClipCaptionModel:
    torch.manual_seed(seed)
    model = OriginalClipCaptionModel(**settings).eval()
    with torch.no_grad():  # every weight random, biases and norms included, so no misplaced tensor hides
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def legacy_gpt2_buffers(num_layers=2, positions=64) -> dict:
    """The causal-mask buffers that the transformers of 2021 wrote into every GPT-2 state dict."""
    causal = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    buffers = {}
    for layer in range(num_layers):
        buffers[f"gpt.transformer.h.{layer}.attn.bias"] = causal
        buffers[f"gpt.transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return buffers


def caption_batch(prefix_dim, batch_size=3, length=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randn(batch_size, prefix_dim, generator=generator)
    tokens = torch.randint(0, VOCAB_SIZE, (batch_size, length), generator=generator)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[0, 4:] = 0  # the first caption is padded as ClipCap pads: token 0, mask 0
    tokens[0, 4:] = 0
    return prefix, tokens, mask


def original_logits(model, prefix, tokens, mask):
    prefix_mask = torch.ones(tokens.shape[0], model.prefix_length, dtype=mask.dtype)
    with torch.no_grad():
        return model(tokens, prefix, torch.cat((prefix_mask, mask), dim=1)).logits


def converted_logits(model, prefix, tokens, mask):
    with torch.no_grad():
        return model(prefix_features=prefix, input_ids=tokens, attention_mask=mask).logits


def assert_same_logits(model, original, prefix, tokens, mask):
    expected = original_logits(original, prefix, tokens, mask)
    torch.testing.assert_close(converted_logits(model, prefix, tokens, mask), expected)


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A word-level GPT-2-style tokenizer folder: `<|endoftext|>` as eos, no pad token (as GPT-2 has none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    vocab.update({word: index + 2 for index, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def convert(source, checkpoint, output, tokenizer_dir, *flags):
    return main([source, "--checkpoint", str(checkpoint), "--output", str(output), "--gpt2", str(tokenizer_dir),
                 "--n-head", str(N_HEAD), *flags])


def conversion_error(capsys, *args) -> str:
    """The one line a refused conversion writes to stderr (after checking it ends with exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert(*args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    return error


def test_clipcap_mlp_checkpoint_gives_the_original_logits(tmp_path, tokenizer_dir):
    original = original_model(prefix_length=10, prefix_size=512)
    torch.save({**original.state_dict(), **legacy_gpt2_buffers()}, tmp_path / "coco_weights.pt")

    convert("clipcap", tmp_path / "coco_weights.pt", tmp_path / "out", tokenizer_dir)

    model = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    config = model.config
    assert (config.mapping_type, config.prefix_length, config.prefix_dim) == ("mlp", 10, 512)
    assert (config.clip_model_name, config.clip_pretrained) == ("ViT-B-32", "openai")
    assert not config.freeze_decoder and not config.normalize_prefix
    assert config.clip_embedding == "raw", "ClipCap's parse_coco.py and predict.py feed raw encode_image output"
    prefix, tokens, mask = caption_batch(512)
    assert_same_logits(model, original, prefix, tokens, mask)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    # generate2 / generate_beam: entry_length 67, stop at "." only.
    assert model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids(".")]
    assert model.generation_config.max_new_tokens == 67
    assert model.generation_config.forced_eos_token_id is None, "generate2 keeps a caption cut at the limit as it is"
    assert len(model.generate_captions(prefix, max_new_tokens=4)) == 3


def test_clipcap_transformer_checkpoint_gives_the_original_logits(tmp_path, tokenizer_dir):
    original = original_model(prefix_length=5, prefix_size=640, mapping_type="transformer", clip_length=3, num_layers=2)
    torch.save(original.state_dict(), tmp_path / "transformer_weights.pt")

    convert("clipcap", tmp_path / "transformer_weights.pt", tmp_path / "out", tokenizer_dir, "--clip-model", "RN50x4",
            "--mapping-type", "transformer", "--prefix-length", "5", "--clip-length", "3", "--num-layers", "2")

    model = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    config = model.config
    assert (config.mapping_type, config.prefix_length, config.clip_length, config.num_mapping_layers) == (
        "transformer", 5, 3, 2)
    assert (config.prefix_dim, config.clip_model_name, config.num_mapping_heads) == (640, "RN50x4", 8)
    assert config.freeze_decoder, "ClipCap's Transformer variant trains with GPT-2 frozen"
    assert config.normalize_prefix and config.clip_embedding == "normalized"
    # The notebook that runs transformer_weights.pt divides encode_image's output by its norm before the mapper.
    prefix, tokens, mask = caption_batch(640)
    normalised = prefix / prefix.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(converted_logits(model, 5 * prefix, tokens, mask),
                               original_logits(original, normalised, tokens, mask))


def test_cgtgan_checkpoint_gives_the_original_logits_on_normalised_features(tmp_path, tokenizer_dir):
    original = original_model(prefix_length=10, prefix_size=768)
    torch.save(original.state_dict(), tmp_path / "model.pt")

    model = convert("cgtgan", tmp_path / "model.pt", tmp_path / "out", tokenizer_dir, "--normalize-prefix")

    config = model.config
    assert (config.clip_model_name, config.prefix_dim) == ("ViT-L-14", 768)
    assert config.normalize_prefix and not config.freeze_decoder
    assert model.generation_config.max_new_tokens == 20, "CgT-GAN's --max_gen_length"
    assert model.generation_config.forced_eos_token_id == model.generation_config.eos_token_id, \
        "CgT-GAN writes its eos token over the last token of a caption that reaches the limit"
    # CgT-GAN with --normalize_prefix feeds x/|x| to its model; the converted one normalises inside.
    prefix, tokens, mask = caption_batch(768)
    normalised = prefix / prefix.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(
        converted_logits(model, 3 * prefix, tokens, mask), original_logits(original, normalised, tokens, mask)
    )


def test_cgtgan_checkpoint_reads_raw_embeddings_by_default(tmp_path, tokenizer_dir):
    original = original_model(prefix_length=10, prefix_size=768)
    torch.save(original.state_dict(), tmp_path / "model.pt")

    model = convert("cgtgan", tmp_path / "model.pt", tmp_path / "out", tokenizer_dir)

    assert not model.config.normalize_prefix and model.config.clip_embedding == "raw"
    prefix, tokens, mask = caption_batch(768)
    assert_same_logits(model, original, prefix, tokens, mask)


def clipcap_generate2(model, tokenizer, embed, entry_length=67, top_p=0.8, temperature=1.0, stop_token="."):
    """ClipCap's `generate2` (predict.py) for one embedding: greedy decoding without a cache until the stop token.
    Returns the generated token ids."""
    stop_token_index = tokenizer.encode(stop_token)[0]
    tokens = None
    filter_value = -float("inf")
    with torch.no_grad():
        generated = embed
        for _ in range(entry_length):
            outputs = model.gpt(inputs_embeds=generated)
            logits = outputs.logits
            logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
            sorted_logits, sorted_indices = torch.sort(logits, descending=True)
            cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
            sorted_indices_to_remove = cumulative_probs > top_p
            sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
            sorted_indices_to_remove[..., 0] = 0
            indices_to_remove = sorted_indices[sorted_indices_to_remove]
            logits[:, indices_to_remove] = filter_value
            next_token = torch.argmax(logits, -1).unsqueeze(0)
            next_token_embed = model.gpt.transformer.wte(next_token)
            tokens = next_token if tokens is None else torch.cat((tokens, next_token), dim=1)
            generated = torch.cat((generated, next_token_embed), dim=1)
            if stop_token_index == next_token.item():
                break
    return tokens.squeeze(0).tolist()


def cgtgan_generate(model, tokenizer, img_feats, max_length=20, eos_token="."):
    """CgT-GAN's `generate_cap` and greedy `generate` (models.py) as its evaluation runs them: GPT-2 with its cache,
    finished captions continued with <|endoftext|>, and the eos token written over the last token of every caption
    still unfinished at max_length. Returns the token ids, a row per caption, and which captions were unfinished."""
    input_embeds = model.clip_project(img_feats).view(-1, model.prefix_length, N_EMBD)
    eos_token_id = tokenizer.encode(eos_token)[0]
    pad_token_id = tokenizer.encode("<|endoftext|>")[0]
    cur_unfinished = torch.ones(input_embeds.shape[0], dtype=torch.long)
    past, token_ids, next_token, cur_len = None, None, None, 0
    with torch.no_grad():
        while cur_len < max_length:
            if past is not None:
                outputs = model.gpt(input_ids=next_token.unsqueeze(-1), cache=past)
            else:
                outputs = model.gpt(inputs_embeds=input_embeds)
            past = outputs.cache
            next_token = torch.argmax(outputs.logits[:, -1, :], dim=-1)
            tokens_to_add = next_token * cur_unfinished + pad_token_id * (1 - cur_unfinished)
            token_ids = tokens_to_add[:, None] if token_ids is None else torch.cat([token_ids, tokens_to_add[:, None]],
                                                                                   dim=-1)
            cur_unfinished = cur_unfinished.mul(next_token.ne(eos_token_id).long())
            cur_len += 1
            if cur_unfinished.max() == 0:
                break
        if cur_len == max_length:
            token_ids[:, -1].masked_fill_(cur_unfinished.to(dtype=torch.bool), eos_token_id)
    return token_ids, cur_unfinished.bool()


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[str]:
    return write_random_images(tmp_path_factory.mktemp("images"), 8)


# Each source as its original code captions an image: CLIP embedding (raw, or divided by its norm as ClipCap's
# transformer notebook does), mapper, greedy decoding to the original's length limit. The seed draws random weights
# under which these images get captions of both kinds.
SOURCES = {
    "clipcap-mlp": dict(source="clipcap", mapping_type="mlp", normalise=False, limit=67, seed=0),
    "clipcap-transformer": dict(source="clipcap", mapping_type="transformer", normalise=True, limit=67, seed=3),
    "cgtgan": dict(source="cgtgan", mapping_type="mlp", normalise=False, limit=20, seed=0),
}


def original_captions(original, tokenizer, features, settings) -> tuple[list[list[int]], list[bool]]:
    """The original code's caption tokens for each embedding, and whether each caption reached the length limit
    unfinished (no "." of its own)."""
    if settings["normalise"]:
        features = features / features.norm(dim=-1, keepdim=True)
    dot = tokenizer.convert_tokens_to_ids(".")
    if settings["source"] == "cgtgan":
        token_ids, unfinished = cgtgan_generate(original, tokenizer, features)
        return [ids[: ids.index(dot) + 1] for ids in token_ids.tolist()], unfinished.tolist()
    captions = []
    for row in features:
        embed = original.clip_project(row[None]).view(1, original.prefix_length, -1)
        captions.append(clipcap_generate2(original, tokenizer, embed))
    return captions, [len(ids) == settings["limit"] and ids[-1] != dot for ids in captions]


@pytest.mark.parametrize("name", SOURCES)
def test_converted_models_caption_image_files_through_the_pipeline_as_the_original_code(
        tmp_path, tokenizer_dir, clip_name, image_paths, name):
    settings = SOURCES[name]
    clip = CaptioningClip.load(clip_name)
    with torch.no_grad():  # the originals' image side: PIL image, CLIP's transform, encode_image
        raw = clip.model.encode_image(torch.stack([clip.preprocess(Image.open(path)) for path in image_paths]))
    mapper_input = F.normalize(raw, dim=-1) if settings["normalise"] else raw
    original = original_model(settings["seed"], prefix_length=4, prefix_size=raw.shape[1], n_positions=128,
                              mapping_type=settings["mapping_type"], clip_length=3, num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        # A random CLIP maps all images close to one direction: centre the mapper's first layer on them and amplify,
        # so the images get captions of their own; "." made likely enough that some captions end before the limit.
        first = original.clip_project.model[0] if settings["mapping_type"] == "mlp" else original.clip_project.linear
        first.weight.mul_(30)
        first.bias.copy_(-first.weight @ mapper_input.mean(0))
        original.gpt.transformer.wte.weight[tokenizer.convert_tokens_to_ids(".")] *= 3
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    convert(settings["source"], tmp_path / "weights.pt", tmp_path / "out", tokenizer_dir, "--clip-model", clip_name,
            "--clip-pretrained", "")

    tokens, reached_limit = original_captions(original, tokenizer, raw, settings)
    expected = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    captioner = pipeline(model=str(tmp_path / "out"), trust_remote_code=True)
    captions = [output[0]["generated_text"] for output in captioner(image_paths, batch_size=4)]
    model = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()

    assert any(reached_limit) and not all(reached_limit), "captions that end at '.' and captions cut at the limit"
    assert len(set(expected)) > 1
    assert all(len(ids) == settings["limit"] for ids, cut in zip(tokens, reached_limit) if cut)
    if settings["source"] == "cgtgan":
        assert all(caption.endswith(".") for caption in expected), "CgT-GAN writes '.' over the 20th token"
    assert captions == expected
    assert model.caption_images(image_paths, batch_size=3) == expected
    if not settings["normalise"]:
        normalised = model.generate_captions(F.normalize(raw, dim=-1), tokenizer=tokenizer)
        assert normalised != expected, "fed normalised embeddings, the model would caption otherwise"


@pytest.mark.parametrize("source", ["clipcap", "cgtgan"])
def test_beam_search_equals_gpt2_beam_search_on_the_same_prefix(tmp_path, tokenizer_dir, source):
    prefix_dim = {"clipcap": 512, "cgtgan": 768}[source]
    original = original_model(prefix_length=4, prefix_size=prefix_dim, n_positions=128)
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    model = convert(source, tmp_path / "weights.pt", tmp_path / "out", tokenizer_dir)
    prefix = torch.randn(3, prefix_dim, generator=torch.Generator().manual_seed(2))
    settings = dict(num_beams=4, num_return_sequences=2, max_new_tokens=12, length_penalty=1.0)

    ours = model.generate(prefix_features=prefix, **settings)

    # Plain GPT-2 generate on the mapper's output, with the same stopping rules.
    embeds = original.clip_project(prefix).view(3, original.prefix_length, -1)
    with torch.no_grad():
        reference = original.gpt.generate(inputs_embeds=embeds, attention_mask=torch.ones(3, 4, dtype=torch.long),
                                          generation_config=model.generation_config, **settings)
    assert ours.shape[0] == 6
    assert torch.equal(ours, reference[:, -ours.shape[1]:])
    assert len({tuple(row) for row in ours.tolist()}) > 1


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state: {"state_dict": state, "epoch": 3},
        lambda state: {"model": {f"module.{key}": value for key, value in state.items()}},
        lambda state: {f"module.{key}": value for key, value in state.items()},
    ],
    ids=["state_dict", "model+module", "module"],
)
def test_wrapped_state_dicts_convert(tmp_path, tokenizer_dir, wrap):
    original = original_model(prefix_length=4, prefix_size=512)
    torch.save(wrap(original.state_dict()), tmp_path / "wrapped.pt")

    model = convert("clipcap", tmp_path / "wrapped.pt", tmp_path / "out", tokenizer_dir)

    prefix, tokens, mask = caption_batch(512)
    assert_same_logits(model, original, prefix, tokens, mask)


def save_broken(path, change, **settings):
    state = original_model(**{"prefix_length": 4, "prefix_size": 512, **settings}).state_dict()
    change(state)
    torch.save(state, path)


def drop_layer(state, layer):
    for key in [key for key in state if key.startswith(f"gpt.transformer.h.{layer}.")]:
        del state[key]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda state: state.pop("gpt.transformer.h.1.mlp.c_fc.bias"),
         r"missing keys: gpt\.transformer\.h\.1\.mlp\.c_fc\.bias"),
        (lambda state: state.update({"clip_project.extra.weight": torch.zeros(2)}),
         r"unexpected keys: clip_project\.extra\.weight"),
        (lambda state: state.update({"discriminator.mlp.weight": torch.zeros(2)}),
         r"unexpected keys: discriminator\.mlp\.weight"),
        (lambda state: state.update({"clip_project.model.2.bias": torch.zeros(7)}),
         r"wrong shapes: clip_project\.model\.2\.bias \(7,\) where the model built from the other shapes has \(128,\)"),
        (lambda state: state.update({"gpt.lm_head.weight": torch.zeros(VOCAB_SIZE, N_EMBD)}),
         r"gpt\.lm_head\.weight differs"),
        (lambda state: state.pop("clip_project.model.0.weight"), r"has no mapper"),
        (lambda state: state.pop("gpt.transformer.wte.weight"), r"has no 'gpt\.transformer\.wte\.weight'"),
        (lambda state: drop_layer(state, 1), r"lacks layer 1 \(gpt\.transformer\.h\.1\.\*\) between layers 0 and 2"),
    ],
    ids=["missing", "unexpected", "foreign", "shape", "untied-head", "no-mapper", "no-gpt2", "layer-gap"],
)
def test_checkpoints_that_do_not_fit_name_the_keys(tmp_path, tokenizer_dir, capsys, change, message):
    save_broken(tmp_path / "broken.pt", change, n_layer=3)
    error = conversion_error(capsys, "clipcap", tmp_path / "broken.pt", tmp_path / "out", tokenizer_dir)
    assert re.search(message, error) and str(tmp_path / "broken.pt") in error
    assert not (tmp_path / "out").exists()


def test_a_lost_last_layer_of_a_released_gpt2_size_is_refused(tmp_path, tokenizer_dir, capsys, monkeypatch):
    # The tiny GPT-2 stands for a released size: hidden size 32 "has" 3 layers and 2 heads.
    monkeypatch.setitem(convert_checkpoint.GPT2_SIZES, N_EMBD, ("tiny", 3, N_HEAD))
    save_broken(tmp_path / "weights.pt", lambda state: drop_layer(state, 2), n_layer=3)

    error = conversion_error(capsys, "clipcap", tmp_path / "weights.pt", tmp_path / "out", tokenizer_dir)
    assert "has 2 GPT-2 layers (gpt.transformer.h.0-1), where GPT-2 tiny (hidden size 32) has 3" in error
    assert "--n-layer 2" in error

    model = main(["clipcap", "--checkpoint", str(tmp_path / "weights.pt"), "--output", str(tmp_path / "out"),
                  "--gpt2", str(tokenizer_dir), "--n-layer", "2"])
    assert (model.config.decoder_config.n_layer, model.config.decoder_config.n_head) == (2, N_HEAD)


def test_heads_follow_the_hidden_size_unless_told(tmp_path, tokenizer_dir, capsys, monkeypatch):
    save_broken(tmp_path / "weights.pt", lambda state: None)
    error = conversion_error(capsys, "clipcap", tmp_path / "weights.pt", tmp_path / "out", tokenizer_dir,
                             "--n-head", "5")
    assert "--n-head 5 must divide GPT-2's hidden size 32" in error
    without_flag = ["clipcap", "--checkpoint", str(tmp_path / "weights.pt"), "--output", str(tmp_path / "out"),
                    "--gpt2", str(tokenizer_dir)]
    with pytest.raises(SystemExit):
        main(without_flag)
    assert "hidden size 32 (gpt.transformer.wte.weight) is none of the released GPT-2s' (768, 1024, 1280, " \
           "1600): pass its number of heads, --n-head" in capsys.readouterr().err
    monkeypatch.setitem(convert_checkpoint.GPT2_SIZES, N_EMBD, ("tiny", 2, 4))
    assert main(without_flag).config.decoder_config.n_head == 4


class NotATensor:
    pass


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: path.write_text("not a checkpoint"), r"notes\.pt: is not a PyTorch checkpoint"),
        (lambda path: path.write_text("junk\n"), r"notes\.pt: is not a PyTorch checkpoint"),
        (lambda path: torch.save({"clip_project": "mlp", "gpt": "gpt2"}, path),
         r"entries are not tensors: clip_project, gpt"),
        (lambda path: torch.save({"model": {}}, path), r"holds no state dict"),
        (lambda path: torch.save({"args": argparse.Namespace(lr=1), "model": {}}, path),
         r"holds Python objects besides tensors, .* torch\.save\(model\.state_dict\(\), path\)"),
        (lambda path: path.write_bytes(b"PK\x03\x04 broken zip"), r"notes\.pt: (is not|cannot be read as) a"),
        (lambda path: path.mkdir(), r"notes\.pt: is a folder: pass the \.pt file itself"),
        (lambda path: None, r"notes\.pt: no such file"),
    ],
    ids=["text", "short-text", "not-tensors", "empty", "objects", "broken-zip", "folder", "missing"],
)
def test_a_file_that_is_no_state_dict_is_refused(tmp_path, tokenizer_dir, capsys, write, message):
    write(tmp_path / "notes.pt")
    error = conversion_error(capsys, "clipcap", tmp_path / "notes.pt", tmp_path / "out", tokenizer_dir)
    assert re.search(message, error), error
    assert "weights_only" not in error


@pytest.mark.parametrize(
    "mapping_type, flags, message",
    [
        ("transformer", ["--prefix-length", "10"],
         r"--prefix-length 10 contradicts the checkpoint: "
         r"clip_project\.prefix_const has shape \(5, 32\), i\.e\. prefix_length 5"),
        ("transformer", ["--clip-length", "40"],
         r"--clip-length 40 contradicts the checkpoint: clip_project\.linear\.weight has shape \(96, 640\)"),
        ("transformer", ["--num-layers", "8"], r"--num-layers 8 contradicts .* has 2 layers"),
        ("transformer", ["--mapping-type", "mlp"], r"--mapping-type mlp contradicts .* Transformer mapper"),
        ("transformer", ["--clip-model", "ViT-B-32"],
         r"ViT-B-32 gives 512-d embeddings, but the mapper takes 640-d .*RN50x4"),
        ("mlp", ["--clip-length", "10"], r"--clip-length 10 does not apply: the checkpoint has an MLP mapper"),
        ("mlp", ["--prefix-length", "40"],
         r"clip_project\.model\.2\.weight has shape \(320, 160\), i\.e\. prefix_length 10"),
        ("mlp", ["--n-head", "5"], r"--n-head 5 must divide GPT-2's hidden size 32"),
        ("mlp", ["--n-layer", "3"], r"--n-layer 3 contradicts the checkpoint: gpt\.transformer\.h\.\* has 2 layers"),
        ("mlp", ["--stop-token", "zebra"], r"--stop-token 'zebra' is not a single token"),
    ],
)
def test_flags_that_contradict_the_checkpoint_are_refused(tmp_path, tokenizer_dir, capsys, mapping_type, flags,
                                                          message):
    if mapping_type == "mlp":
        original = original_model(prefix_length=10, prefix_size=640)
    else:
        original = original_model(
            prefix_length=5, prefix_size=640, mapping_type="transformer", clip_length=3, num_layers=2
        )
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    error = conversion_error(capsys, "clipcap", tmp_path / "weights.pt", tmp_path / "out", tokenizer_dir,
                             "--clip-model", "RN50x4", *flags)
    assert re.search(message, error), error


def test_the_wrong_source_kind_says_which_to_run(tmp_path, tokenizer_dir, capsys):
    transformer = original_model(prefix_length=5, prefix_size=640, mapping_type="transformer", clip_length=3,
                                 num_layers=2)
    torch.save(transformer.state_dict(), tmp_path / "transformer_weights.pt")
    error = conversion_error(capsys, "cgtgan", tmp_path / "transformer_weights.pt", tmp_path / "out", tokenizer_dir)
    assert "is no CgT-GAN generator" in error and "convert_checkpoint.py clipcap" in error

    torch.save(original_model(prefix_length=10, prefix_size=768).state_dict(), tmp_path / "model.pt")
    error = conversion_error(capsys, "clipcap", tmp_path / "model.pt", tmp_path / "out", tokenizer_dir)
    assert "ViT-B-32 gives 512-d embeddings" in error and "convert_checkpoint.py cgtgan" in error

    gpt2_alone = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB_SIZE))
    torch.save(gpt2_alone.state_dict(), tmp_path / "gpt2.pt")
    error = conversion_error(capsys, "clipcap", tmp_path / "gpt2.pt", tmp_path / "out", tokenizer_dir)
    assert "it looks like a GPT-2 language model alone" in error


def test_a_missing_tokenizer_folder_is_one_line(tmp_path, capsys):
    save_broken(tmp_path / "weights.pt", lambda state: None)
    error = conversion_error(capsys, "clipcap", tmp_path / "weights.pt", tmp_path / "out", tmp_path / "no-such-dir")
    assert f"--gpt2 {tmp_path / 'no-such-dir'}: no such folder" in error

    (tmp_path / "empty").mkdir()
    error = conversion_error(capsys, "clipcap", tmp_path / "weights.pt", tmp_path / "out", tmp_path / "empty")
    assert "no tokenizer in this folder" in error
    assert not (tmp_path / "out").exists()


def test_offline_default_tokenizer_is_one_line_without_traceback(tmp_path):
    """As a user runs it: the default `--gpt2 gpt2`, no network, an empty Hugging Face cache."""
    save_broken(tmp_path / "weights.pt", lambda state: None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "convert_checkpoint.py"), "clipcap", "--checkpoint",
         str(tmp_path / "weights.pt"), "--output", str(tmp_path / "out"), "--n-head", str(N_HEAD)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("convert_checkpoint.py clipcap: error: --gpt2 gpt2: not a folder here")
    assert "--gpt2 gpt2-tokenizer" in lines[0]
