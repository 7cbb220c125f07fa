"""Converters of original ClipCap / CgT-GAN checkpoints: same logits, clear errors.

The `Original*` modules below copy the forward passes of ClipCap's train.py (github.com/rmokady/CLIP_prefix_caption),
which CgT-GAN's models.py (github.com/Lihr747/CgtGAN) repeats, at tiny sizes and with dropout left out.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from convert_checkpoint import main

N_EMBD, N_HEAD, VOCAB_SIZE = 32, 2, 64
WORDS = "a the red blue green circle square small big left right of above is and .".split()


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

    def __init__(self, prefix_length, prefix_size, mapping_type="mlp", clip_length=None, num_layers=8):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=N_EMBD, n_head=N_HEAD, n_positions=64, vocab_size=VOCAB_SIZE)
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


def test_clipcap_mlp_checkpoint_gives_the_original_logits(tmp_path, tokenizer_dir):
    original = original_model(prefix_length=10, prefix_size=512)
    torch.save({**original.state_dict(), **legacy_gpt2_buffers()}, tmp_path / "coco_weights.pt")

    convert("clipcap", tmp_path / "coco_weights.pt", tmp_path / "out", tokenizer_dir)

    model = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    config = model.config
    assert (config.mapping_type, config.prefix_length, config.prefix_dim) == ("mlp", 10, 512)
    assert (config.clip_model_name, config.clip_pretrained) == ("ViT-B-32", "openai")
    assert not config.freeze_decoder and not config.normalize_prefix
    prefix, tokens, mask = caption_batch(512)
    assert_same_logits(model, original, prefix, tokens, mask)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id]
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
    prefix, tokens, mask = caption_batch(640)
    assert_same_logits(model, original, prefix, tokens, mask)


def test_cgtgan_checkpoint_gives_the_original_logits_on_normalised_features(tmp_path, tokenizer_dir):
    original = original_model(prefix_length=10, prefix_size=768)
    torch.save(original.state_dict(), tmp_path / "model.pt")

    model = convert("cgtgan", tmp_path / "model.pt", tmp_path / "out", tokenizer_dir, "--normalize-prefix")

    config = model.config
    assert (config.clip_model_name, config.prefix_dim) == ("ViT-L-14", 768)
    assert config.normalize_prefix and not config.freeze_decoder
    # CgT-GAN with --normalize_prefix feeds x/|x| to its model; the converted one normalises inside.
    prefix, tokens, mask = caption_batch(768)
    normalised = prefix / prefix.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(
        converted_logits(model, 3 * prefix, tokens, mask), original_logits(original, normalised, tokens, mask)
    )


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


def save_broken(path, change):
    state = original_model(prefix_length=4, prefix_size=512).state_dict()
    change(state)
    torch.save(state, path)


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
    ],
    ids=["missing", "unexpected", "foreign", "shape", "untied-head", "no-mapper", "no-gpt2"],
)
def test_checkpoints_that_do_not_fit_name_the_keys(tmp_path, tokenizer_dir, change, message):
    save_broken(tmp_path / "broken.pt", change)
    with pytest.raises(SystemExit, match=message):
        convert("clipcap", tmp_path / "broken.pt", tmp_path / "out", tokenizer_dir)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: path.write_text("not a checkpoint"), r"notes\.pt: cannot be read as a torch checkpoint"),
        (lambda path: path.write_text("junk\n"), r"notes\.pt: cannot be read as a torch checkpoint"),
        (lambda path: torch.save({"clip_project": "mlp", "gpt": "gpt2"}, path),
         r"entries are not tensors: clip_project, gpt"),
        (lambda path: torch.save({"model": {}}, path), r"holds no state dict"),
    ],
    ids=["text", "short-text", "not-tensors", "empty"],
)
def test_a_file_that_is_no_state_dict_is_refused(tmp_path, tokenizer_dir, write, message):
    write(tmp_path / "notes.pt")
    with pytest.raises(SystemExit, match=message):
        convert("clipcap", tmp_path / "notes.pt", tmp_path / "out", tokenizer_dir)


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
        ("mlp", ["--stop-token", "zebra"], r"--stop-token 'zebra' is not a single token"),
    ],
)
def test_flags_that_contradict_the_checkpoint_are_refused(tmp_path, tokenizer_dir, mapping_type, flags, message):
    if mapping_type == "mlp":
        original = original_model(prefix_length=10, prefix_size=640)
    else:
        original = original_model(
            prefix_length=5, prefix_size=640, mapping_type="transformer", clip_length=3, num_layers=2
        )
    torch.save(original.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(SystemExit, match=message):
        convert("clipcap", tmp_path / "weights.pt", tmp_path / "out", tokenizer_dir, "--clip-model", "RN50x4", *flags)
