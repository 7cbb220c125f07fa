"""Convert checkpoints of the original ClipCap and CgT-GAN into SCSTClipCap model folders.

    python convert_checkpoint.py clipcap --checkpoint coco_weights.pt --output models/clipcap-coco
    python convert_checkpoint.py clipcap --checkpoint transformer_weights.pt --output models/clipcap-coco-transformer \\
        --clip-model RN50x4
    python convert_checkpoint.py cgtgan --checkpoint output/best/model.pt --output models/cgtgan-coco

The folder loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` and, for the same CLIP embedding
and caption tokens, gives the logits of the original model; through the captioning pipeline it captions an image as
the original code does (same CLIP embedding, same greedy decoding, same length limit and stop token).

Both sources save `ClipCaptionModel.state_dict()`: the mapper under `clip_project.` (ClipCap's `MLP` or
`TransformerMapper`, whose parameter names ours share) and GPT-2 (`GPT2LMHeadModel`, lm_head tied to wte) under
`gpt.`; they become `mapper.` and `decoder.`. The rest is read from the tensor shapes: CLIP size, mapper kind,
prefix_length, clip_length, mapper layers and GPT-2's size. Flags given for these are checked against the shapes.
GPT-2's number of heads is not in the shapes: it follows from the hidden size for the released GPT-2s (768 -> 12,
1024 -> 16, 1280 -> 20, 1600 -> 25) unless `--n-head` says otherwise, and a released size with fewer layers than its
GPT-2 has (a layer lost from the file) is refused unless `--n-layer` confirms the count. The mapper's 8 heads are
fixed in both sources. Keys may sit inside {"state_dict": ...} or {"model": ...} and carry DataParallel's "module."
prefix. Every mistake (a file that is no checkpoint, a tokenizer that is not there, a flag that contradicts the
file, the wrong source) ends the command with one line on stderr and exit code 2.

Released checkpoints and their flags:

- ClipCap (Mokady, Hertz, Bermano 2021, "ClipCap: CLIP Prefix for Image Captioning",
  https://github.com/rmokady/CLIP_prefix_caption), `coco_weights.pt` and `conceptual_weights.pt`: MLP mapper,
  prefix_length 10, CLIP ViT-B/32 (512-d) read raw (`parse_coco.py`, `predict.py`), GPT-2 small fine-tuned. The
  defaults fit.
- ClipCap `transformer_weights.pt` (COCO): Transformer mapper, prefix_length 40, clip_length 40, 8 layers, GPT-2
  frozen (`ClipCaptionPrefix`). The notebook that runs it builds it with prefix_size 640, i.e. CLIP RN50x4, and
  L2-normalises the embedding first: add `--clip-model RN50x4` (normalisation is the default for this mapper).
- CgT-GAN ("CgT-GAN: CLIP-guided Text GAN for Image Captioning", https://github.com/Lihr747/CgtGAN), the
  generator's `best/model.pt` (the same `ClipCaptionModel` layout): MLP mapper, prefix_length 10, CLIP ViT-L/14
  (768-d), GPT-2 fine-tuned, raw CLIP embeddings. The `cgtgan` defaults fit; add `--normalize-prefix` for a model
  trained with `--normalize_prefix`.

The config records which CLIP embedding the model reads (`clip_embedding`: "raw" for the MLP weights and CgT-GAN,
"normalized" with `normalize_prefix` where the original normalises), so the pipeline feeds it the right one. The
saved generation config follows the originals' decoding: a caption ends at its first "." (`--stop-token`) and not at
<|endoftext|>, after at most 67 new tokens for ClipCap (`generate2`'s entry_length, which keeps a caption that
reaches it as it is) and 20 for CgT-GAN (`--max_gen_length`, whose generate makes the 20th token of such a caption
the stop token: `forced_eos_token_id`); `--max-new-tokens` changes the limit.
"""

import argparse
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config

from configuration_scstclipcap import SCSTClipCapConfig
from modeling_scstclipcap import SCSTClipCapForCaptioning
from pipeline_scstclipcap import make_pipeline_ready

RENAMED_PREFIXES = {"clip_project.": "mapper.", "gpt.": "decoder."}
WRAPPER_KEYS = ("state_dict", "model")
# GPT-2's causal-mask buffers: the transformers of 2021 saved them, today's rebuild them.
LEGACY_BUFFER = re.compile(r"gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
MAPPER_HEADS = 8
CLIP_EMBEDDING_DIMS = {
    "RN50": 1024, "RN101": 512, "RN50x4": 640, "RN50x16": 768, "RN50x64": 1024,
    "ViT-B-32": 512, "ViT-B-16": 512, "ViT-L-14": 768, "ViT-L-14-336": 768,
}
SOURCE_CLIP_MODELS = {"clipcap": "ViT-B-32", "cgtgan": "ViT-L-14"}
SOURCE_MAX_NEW_TOKENS = {"clipcap": 67, "cgtgan": 20}
# CgT-GAN's generate writes its eos token over the last token of a caption that reaches max_gen_length
# (`token_ids[:, -1].masked_fill_(unfinished, eos)`); ClipCap's generate2 and generate_beam stop at entry_length and
# keep the caption as it is.
SOURCE_FORCES_STOP_AT_LIMIT = {"clipcap": False, "cgtgan": True}
# The released GPT-2s: hidden size -> (name, layers, heads).
GPT2_SIZES = {768: ("small", 12, 12), 1024: ("medium", 24, 16), 1280: ("large", 36, 20), 1600: ("xl", 48, 25)}
# What a state dict is, by the first part of its keys, when it is no ClipCap / CgT-GAN captioner.
FOREIGN_ROOTS = {"transformer": "a GPT-2 language model alone", "lm_head": "a GPT-2 language model alone",
                 "visual": "a CLIP model", "text_projection": "a CLIP model", "mapper": "a model converted already",
                 "decoder": "a model converted already"}
PICKLE_PROTOCOL_MARK = 0x80  # the first byte of a pickle (torch.save's format before 1.6)
SOURCE_DESCRIPTIONS = {"clipcap": "a ClipCap ClipCaptionModel/ClipCaptionPrefix state dict",
                       "cgtgan": "a CgT-GAN generator state dict"}
CHECKED_FLAGS = {
    "mapping_type": "--mapping-type", "prefix_length": "--prefix-length", "clip_length": "--clip-length",
    "num_mapping_layers": "--num-layers",
}


class ConversionError(Exception):
    """A user mistake: the command ends with its message on one line and exit code 2."""


@dataclass
class Inferred:
    """A setting read from the checkpoint, with the evidence an error message quotes."""

    value: object
    evidence: str


def load_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise ConversionError("is a folder: pass the .pt file itself (a folder written by this converter loads with "
                              "AutoModel.from_pretrained)")
    if not path.is_file():
        raise ConversionError("no such file")
    with open(path, "rb") as handle:
        first_byte = handle.read(1)
    if not zipfile.is_zipfile(path) and first_byte != bytes([PICKLE_PROTOCOL_MARK]):
        kind = "a safetensors file" if path.suffix == ".safetensors" else "neither a zip archive nor a pickle"
        raise ConversionError(f"is not a PyTorch checkpoint ({kind}): pass the file torch.save wrote")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails on foreign or damaged files with any of a dozen error types
        if "Weights only load failed" in str(error):
            raise ConversionError("holds Python objects besides tensors, which are not loaded because unpickling "
                                  "them could run code: save the state dict alone, "
                                  "torch.save(model.state_dict(), path)") from None
        raise ConversionError(f"cannot be read as a torch checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'damaged file'})") from None
    for key in WRAPPER_KEYS:
        if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError("holds no state dict (a dict of parameter names to tensors)")
    not_tensors = [key for key, value in state_dict.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise ConversionError(f"is not a state dict: these entries are not tensors: {listing(not_tensors)}")
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return {key: value for key, value in state_dict.items() if not LEGACY_BUFFER.match(key)}


def tensor_at(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        roots = sorted({name.split(".")[0] for name in state_dict})
        kinds = sorted({FOREIGN_ROOTS[root] for root in roots if root in FOREIGN_ROOTS})
        looks_like = f" (it looks like {' or '.join(kinds)})" if kinds else ""
        raise ConversionError(f"has no {key!r}: its keys start with {roots}{looks_like}, where a ClipCap/CgT-GAN "
                              "state dict's start with clip_project and gpt")
    return state_dict[key]


def shape_of(state_dict: dict, key: str) -> str:
    return f"{key} has shape {tuple(state_dict[key].shape)}"


def layer_count(state_dict: dict, prefix: str) -> int:
    """The number of layers `prefix<i>.` in the state dict; a gap in the numbering is refused, naming the layer."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in state_dict if (match := pattern.match(key))}
    gaps = sorted(set(range(max(indices, default=-1) + 1)) - indices)
    if gaps:
        raise ConversionError(f"lacks layer {gaps[0]} ({prefix}{gaps[0]}.*) between layers 0 and {max(indices)}: "
                              "the file is incomplete")
    return len(indices)


def infer_decoder_shapes(state_dict: dict, n_layer: int | None = None) -> dict:
    """GPT-2's size: vocabulary and hidden size from wte, positions from wpe, layers, MLP width. A released GPT-2
    size with another layer count than that GPT-2's is refused unless `n_layer` confirms it."""
    vocab_size, n_embd = tensor_at(state_dict, "gpt.transformer.wte.weight").shape
    n_inner = tensor_at(state_dict, "gpt.transformer.h.0.mlp.c_fc.weight").shape[1]  # Conv1D: (in, out)
    layers = layer_count(state_dict, "gpt.transformer.h.")
    if n_layer is not None and n_layer != layers:
        raise ConversionError(f"--n-layer {n_layer} contradicts the checkpoint: gpt.transformer.h.* has {layers} "
                              "layers")
    if n_embd in GPT2_SIZES and n_layer is None and layers != GPT2_SIZES[n_embd][1]:
        name, expected, _ = GPT2_SIZES[n_embd]
        raise ConversionError(
            f"has {layers} GPT-2 layers (gpt.transformer.h.0-{layers - 1}), where GPT-2 {name} (hidden size {n_embd}) "
            f"has {expected}: layer {layers} (gpt.transformer.h.{layers}.*) is missing from the file? "
            f"Pass --n-layer {layers} if the model really has {layers}")
    return dict(
        vocab_size=vocab_size, n_embd=n_embd, n_positions=tensor_at(state_dict, "gpt.transformer.wpe.weight").shape[0],
        n_layer=layers, n_inner=None if n_inner == 4 * n_embd else n_inner,
    )


def head_count(n_embd: int, n_head: int | None) -> int:
    """GPT-2's attention heads: `--n-head`, or the released GPT-2's of this hidden size."""
    if n_head is None:
        if n_embd not in GPT2_SIZES:
            raise ConversionError(f"GPT-2's hidden size {n_embd} (gpt.transformer.wte.weight) is none of the released "
                                  f"GPT-2s' ({', '.join(map(str, GPT2_SIZES))}): pass its number of heads, --n-head")
        return GPT2_SIZES[n_embd][2]
    if n_head < 1 or n_embd % n_head:
        raise ConversionError(f"--n-head {n_head} must divide GPT-2's hidden size {n_embd} "
                              "(gpt.transformer.wte.weight): GPT-2 small has 12 heads, medium 16, large 20, xl 25")
    return n_head


def rows_per_embedding(state_dict: dict, key: str, n_embd: int) -> int:
    rows = tensor_at(state_dict, key).shape[0]
    if rows % n_embd:
        raise ConversionError(f"{shape_of(state_dict, key)}: {rows} rows are not a whole number of GPT-2 embeddings "
                         f"of size {n_embd}")
    return rows // n_embd


def infer_mapper(state_dict: dict, n_embd: int) -> dict[str, Inferred]:
    if "clip_project.model.0.weight" in state_dict:
        first, last = "clip_project.model.0.weight", "clip_project.model.2.weight"
        return dict(
            mapping_type=Inferred("mlp", f"{first} belongs to an MLP mapper"),
            prefix_dim=Inferred(state_dict[first].shape[1], shape_of(state_dict, first)),
            prefix_length=Inferred(rows_per_embedding(state_dict, last, n_embd), shape_of(state_dict, last)),
        )
    if "clip_project.linear.weight" in state_dict:
        linear, constants = "clip_project.linear.weight", "clip_project.prefix_const"
        fc1 = "clip_project.transformer.layers.0.mlp.fc1.weight"
        num_layers = layer_count(state_dict, "clip_project.transformer.layers.")
        return dict(
            mapping_type=Inferred("transformer", f"{linear} belongs to a Transformer mapper"),
            prefix_dim=Inferred(state_dict[linear].shape[1], shape_of(state_dict, linear)),
            clip_length=Inferred(rows_per_embedding(state_dict, linear, n_embd), shape_of(state_dict, linear)),
            prefix_length=Inferred(tensor_at(state_dict, constants).shape[0], shape_of(state_dict, constants)),
            num_mapping_layers=Inferred(num_layers, f"clip_project.transformer.layers.* has {num_layers} layers"),
            mapping_mlp_ratio=Inferred(tensor_at(state_dict, fc1).shape[0] / n_embd, shape_of(state_dict, fc1)),
        )
    if "clip_project.weight" in state_dict:
        raise ConversionError("has a single Linear mapper (clip_project.weight), which this model does not provide: "
                         "only the MLP and Transformer mappers convert")
    raise ConversionError("has no mapper: expected clip_project.model.0.weight (MLP) or clip_project.linear.weight "
                     "(Transformer)")


def check_flags(inferred: dict[str, Inferred], args: argparse.Namespace):
    if args.source == "cgtgan" and inferred["mapping_type"].value != "mlp":
        raise ConversionError(f"is no CgT-GAN generator, whose mapper is an MLP: {inferred['mapping_type'].evidence} "
                              "(ClipCap's transformer_weights.pt?): run `convert_checkpoint.py clipcap`")
    for name, flag in CHECKED_FLAGS.items():
        given = getattr(args, name)
        if given is None:
            continue
        if name not in inferred:
            raise ConversionError(f"{flag} {given} does not apply: the checkpoint has an MLP mapper "
                                  f"({inferred['mapping_type'].evidence})")
        if given != inferred[name].value:
            raise ConversionError(f"{flag} {given} contradicts the checkpoint: {inferred[name].evidence}, "
                                  f"i.e. {name} {inferred[name].value}")
    known_dim = CLIP_EMBEDDING_DIMS.get(args.clip_model)
    prefix_dim = inferred["prefix_dim"]
    if known_dim is not None and known_dim != prefix_dim.value:
        fitting = [name for name, dim in CLIP_EMBEDDING_DIMS.items() if dim == prefix_dim.value]
        other_sources = [source for source, clip in SOURCE_CLIP_MODELS.items()
                         if source != args.source and CLIP_EMBEDDING_DIMS[clip] == prefix_dim.value]
        hint = "".join(f"; or is it a {source} checkpoint? run `convert_checkpoint.py {source}`"
                       for source in other_sources)
        raise ConversionError(f"--clip-model {args.clip_model} gives {known_dim}-d embeddings, but the mapper takes "
                              f"{prefix_dim.value}-d ones ({prefix_dim.evidence}): name the CLIP it was trained on "
                              f"({', '.join(fitting) or 'none of the OpenAI CLIPs'}){hint}")


def load_tokenizer(name_or_path: str, vocab_size: int):
    """GPT-2's tokenizer from a folder or the Hub; what is not there is one message saying what to pass."""
    path = Path(name_or_path)
    if path.is_file():
        raise ConversionError(f"--gpt2 {name_or_path} is a file: pass the folder of the GPT-2 tokenizer "
                              "(tokenizer.json, or vocab.json and merges.txt) or a Hub id (gpt2)")
    if not path.exists() and name_or_path.startswith(("/", ".", "~")):
        raise ConversionError(f"--gpt2 {name_or_path}: no such folder; pass the folder of the GPT-2 tokenizer or a "
                              "Hub id (gpt2)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        if path.is_dir():
            raise ConversionError(f"--gpt2 {name_or_path}: no tokenizer in this folder (tokenizer.json, or vocab.json "
                                  "and merges.txt): pass the folder the GPT-2 tokenizer was saved to") from None
        raise ConversionError(
            f"--gpt2 {name_or_path}: not a folder here, and the Hub's tokenizer {name_or_path!r} cannot be loaded "
            f"({str(error).splitlines()[0]}). Offline, save it once where there is internet "
            f"(AutoTokenizer.from_pretrained({name_or_path!r}).save_pretrained('gpt2-tokenizer')) and pass "
            "--gpt2 gpt2-tokenizer") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"the tokenizer {name_or_path!r} has {len(tokenizer)} tokens, more than GPT-2's "
                              f"{vocab_size} embeddings (gpt.transformer.wte.weight): pass the one it was trained with")
    return tokenizer


def build_config(args, inferred: dict[str, Inferred], decoder_shapes: dict, tokenizer) -> SCSTClipCapConfig:
    decoder_config = GPT2Config(
        **decoder_shapes, n_head=head_count(decoder_shapes["n_embd"], args.n_head),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    mapping_type = inferred["mapping_type"].value
    freeze_decoder = args.freeze_decoder
    if freeze_decoder is None:  # ClipCap trains its Transformer mapper alone; CgT-GAN always tunes GPT-2
        freeze_decoder = args.source == "clipcap" and mapping_type == "transformer"
    normalize_prefix = args.normalize_prefix
    if normalize_prefix is None:  # ClipCap's Transformer notebook normalises; its MLP weights and CgT-GAN read raw
        normalize_prefix = args.source == "clipcap" and mapping_type == "transformer"
    try:
        return SCSTClipCapConfig(
            **{name: item.value for name, item in inferred.items()}, num_mapping_heads=MAPPER_HEADS,
            normalize_prefix=normalize_prefix, clip_embedding="normalized" if normalize_prefix else "raw",
            freeze_decoder=freeze_decoder, decoder_config=decoder_config.to_dict(), clip_model_name=args.clip_model,
            clip_pretrained=args.clip_pretrained,
        )
    except ValueError as error:
        raise ConversionError(str(error)) from None


def original_key(key: str) -> str:
    for original, ours in RENAMED_PREFIXES.items():
        if key.startswith(ours):
            return original + key[len(ours):]
    return key


def renamed_weights(state_dict: dict) -> dict[str, torch.Tensor]:
    weights = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in RENAMED_PREFIXES if key.startswith(p)), None)
        weights[RENAMED_PREFIXES[prefix] + key[len(prefix):] if prefix else key] = tensor
    word_embeddings = weights["decoder.transformer.wte.weight"]
    lm_head = weights.setdefault("decoder.lm_head.weight", word_embeddings)
    if not torch.equal(lm_head, word_embeddings):
        raise ConversionError("gpt.lm_head.weight differs from gpt.transformer.wte.weight, but GPT-2 ties them here")
    return weights


def listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: SCSTClipCapForCaptioning, weights: dict[str, torch.Tensor]):
    """Every parameter from the checkpoint, every checkpoint tensor into a parameter, shapes equal; or a clear error."""
    expected = model.state_dict()
    missing = [original_key(key) for key in expected if key not in weights]
    unexpected = [original_key(key) for key in weights if key not in expected]
    mismatched = [
        f"{original_key(key)} {tuple(tensor.shape)} where the model built from the other shapes has "
        f"{tuple(expected[key].shape)}"
        for key, tensor in weights.items() if key in expected and tensor.shape != expected[key].shape
    ]
    problems = [f"{what}: {listing(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)) if keys]
    if problems:
        raise ConversionError("does not fit a ClipCap model: " + "; ".join(problems))
    model.load_state_dict(weights, strict=True)


def stop_token_ids(tokenizer, stop_token: str) -> list[int]:
    """The tokens a caption ends at: the stop token alone, as in the originals (not <|endoftext|> too), or the
    end-of-text token when there is no stop token."""
    if not stop_token:
        return [tokenizer.eos_token_id]
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ConversionError(f"--stop-token {stop_token!r} is not a single token of the tokenizer: pass one that "
                              "is, or '' to stop at the end-of-text token only")
    return ids


def convert(args: argparse.Namespace) -> SCSTClipCapForCaptioning:
    """Read, check and convert the checkpoint, then write the model folder; a mistake raises ConversionError before
    anything is written."""
    try:
        state_dict = load_original_state_dict(args.checkpoint)
        decoder_shapes = infer_decoder_shapes(state_dict, args.n_layer)
        inferred = infer_mapper(state_dict, decoder_shapes["n_embd"])
        check_flags(inferred, args)
    except ConversionError as error:
        raise ConversionError(f"{args.checkpoint}: {error}") from None
    tokenizer = load_tokenizer(args.gpt2, decoder_shapes["vocab_size"])
    eos_token_id = stop_token_ids(tokenizer, args.stop_token)
    model = SCSTClipCapForCaptioning(build_config(args, inferred, decoder_shapes, tokenizer))
    try:
        load_weights(model, renamed_weights(state_dict))
    except ConversionError as error:
        raise ConversionError(f"{args.checkpoint}: {error}") from None
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.max_new_tokens = args.max_new_tokens or SOURCE_MAX_NEW_TOKENS[args.source]
    if SOURCE_FORCES_STOP_AT_LIMIT[args.source]:
        # transformers forces it as the last new token (max_new_tokens counts the caption only, not the prefix).
        model.generation_config.forced_eos_token_id = eos_token_id
    model.eval()
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    # `pipeline(model=folder, trust_remote_code=True)` then works; a local CLIP folder goes along.
    make_pipeline_ready(args.output)
    return model


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", type=Path, required=True, help="the original .pt state dict")
    common.add_argument("--output", type=Path, required=True, help="model folder to write")
    common.add_argument("--mapping-type", choices=("mlp", "transformer"), help="checked against the checkpoint")
    common.add_argument("--prefix-length", type=int, help="checked against the checkpoint")
    common.add_argument("--clip-length", type=int, help="Transformer mapper; checked against the checkpoint")
    common.add_argument("--num-layers", type=int, dest="num_mapping_layers", metavar="NUM_LAYERS",
                        help="Transformer mapper layers; checked against the checkpoint")
    common.add_argument("--n-head", type=int, help="GPT-2 attention heads, not in the shapes (default: those of the "
                        "released GPT-2 of the checkpoint's hidden size, 12 for 768)")
    common.add_argument("--n-layer", type=int, help="GPT-2 layers, checked against the checkpoint; needed only when a "
                        "released GPT-2 size has another count")
    common.add_argument("--gpt2", default="gpt2", help="Hub id or folder of the GPT-2 tokenizer")
    common.add_argument("--clip-model", help="open_clip name of the CLIP whose embeddings the mapper takes "
                        "(clipcap: ViT-B-32, cgtgan: ViT-L-14)")
    common.add_argument("--clip-pretrained", default="openai", type=lambda value: value or None,
                        help="open_clip pretrained tag; '' when --clip-model carries its weights")
    common.add_argument("--normalize-prefix", action=argparse.BooleanOptionalAction,
                        help="the model reads L2-normalised CLIP embeddings (default: as the source's code feeds "
                             "them: normalised for ClipCap's Transformer mapper, raw otherwise)")
    common.add_argument("--freeze-decoder", action=argparse.BooleanOptionalAction,
                        help="keep GPT-2 frozen in further training (default: as the source trained it)")
    common.add_argument("--stop-token", default=".", help="generation ends at this token, as in the originals "
                        "('' to end at <|endoftext|> instead)")
    common.add_argument("--max-new-tokens", type=int, help="saved caption length limit (default: the original's, "
                        "67 for clipcap, 20 for cgtgan, whose captions that reach it end with the stop token)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sources = parser.add_subparsers(dest="source", required=True)
    for source in SOURCE_CLIP_MODELS:
        sources.add_parser(source, parents=[common], help=SOURCE_DESCRIPTIONS[source])
    args = parser.parse_args(argv)
    args.clip_model = args.clip_model or SOURCE_CLIP_MODELS[args.source]
    return args


def main(argv=None) -> SCSTClipCapForCaptioning:
    args = parse_args(argv)
    try:
        model = convert(args)
    except ConversionError as error:
        print(f"convert_checkpoint.py {args.source}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.output}: {model.config.mapping_type} mapper, prefix_length {model.config.prefix_length}, "
          f"CLIP {model.config.clip_model_name} ({model.config.prefix_dim}-d, {model.config.clip_embedding})")
    return model


if __name__ == "__main__":
    main()
