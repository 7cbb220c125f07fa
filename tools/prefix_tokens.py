"""What the prefix says in words: the GPT-2 vocabulary tokens nearest to each prefix embedding (ClipCap's reading).

For the first images of an images table, the CLIP embedding is mapped to the prefix; for every prefix position the
k tokens of GPT-2's input embedding matrix nearest to it are listed under three distances: Euclidean (smallest
first), cosine and dot product (largest first). Writes a self-contained HTML page, with each image's greedy caption
and, given --images-dir, the image itself, and a JSON file of the same data beside it (`<output>.json`).

    python tools/prefix_tokens.py --model runs/shapes/scst/final --images-table data/shapes/tables/shapes/test \
        --images-dir data/shapes/raw/images --num-images 8 --k 5 --output runs/shapes/prefix_tokens.html
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import mimetypes
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_scstclipcap import clip_metadata, table_prefix_features  # noqa: E402
from dataprep.tables import load_table  # noqa: E402
from modeling_scstclipcap import SCSTClipCapForCaptioning  # noqa: E402

DISTANCES = ("euclidean", "cosine", "dot")
CAPTION_MAX_NEW_TOKENS = 30
PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.image { border-top: 1px solid #ccc; padding: 1em 0; display: flex; gap: 1.5em; align-items: flex-start; }
.image img { width: 192px; image-rendering: pixelated; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
td.tokens { font-family: monospace; white-space: pre; }
.caption { font-size: 1.1em; margin: 0.3em 0 0.8em; }
"""


def load_captioner(model_dir: str | Path, device: str | torch.device = "cpu"):
    """The captioner and its tokenizer from a saved model folder, in eval mode."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a saved model folder (no config.json)")
    model = SCSTClipCapForCaptioning.from_pretrained(str(model_dir)).to(device).eval()
    # The tokenizer is a plain saved one; the folder's own code concerns the model only.
    return model, AutoTokenizer.from_pretrained(str(model_dir), config=model.config, trust_remote_code=False)


def model_clip_metadata(config) -> dict:
    """The CLIP record a table must match to feed this model: its CLIP's weights and D."""
    return clip_metadata(config.clip_model_name, config.clip_pretrained, config.prefix_dim, None)


def greedy_captions(model, tokenizer, prefix_features: torch.Tensor, batch_size: int = 64) -> list[str]:
    """One greedy caption per CLIP embedding."""
    captions = []
    for start in range(0, len(prefix_features), batch_size):
        batch = prefix_features[start:start + batch_size].to(model.device)
        captions += model.generate_captions(batch, tokenizer=tokenizer, do_sample=False, num_beams=1,
                                            max_new_tokens=CAPTION_MAX_NEW_TOKENS)
    return captions


def nearest_tokens(vectors: torch.Tensor, embeddings: torch.Tensor, k: int, distance: str):
    """The `k` rows of `embeddings` (V, H) nearest to each row of `vectors` (N, H), best first.

    Returns (scores, token_ids), each (N, k): Euclidean distances (ascending), or cosine similarities / dot
    products (descending).
    """
    if not 1 <= k <= embeddings.shape[0]:
        raise ValueError(f"k={k} must lie between 1 and the vocabulary size {embeddings.shape[0]}")
    vectors, embeddings = vectors.float(), embeddings.float()
    if distance == "euclidean":
        # The matrix-product shortcut loses the ranking of near ties; the direct form does not.
        scores = torch.cdist(vectors, embeddings, compute_mode="donot_use_mm_for_euclid_dist")
        return scores.topk(k, dim=-1, largest=False)
    if distance == "cosine":
        scores = F.normalize(vectors, dim=-1) @ F.normalize(embeddings, dim=-1).T
    elif distance == "dot":
        scores = vectors @ embeddings.T
    else:
        raise ValueError(f"unknown distance {distance!r}: use one of {DISTANCES}")
    return scores.topk(k, dim=-1)


@torch.no_grad()
def prefix_neighbours(model, tokenizer, prefix_features: torch.Tensor, k: int) -> list[list[dict]]:
    """Per image, per prefix position: its norm and its `k` nearest vocabulary tokens under each distance.

    Each position is `{"position": p, "norm": float, "euclidean": [{"id", "token", "score"}, ...], "cosine": [...],
    "dot": [...]}`, tokens best first.
    """
    prefix = model.map_prefix(prefix_features.to(model.device)).float()  # (B, P, H)
    embeddings = model.get_input_embeddings().weight.float()  # (V, H)
    batch_size, prefix_length, hidden_size = prefix.shape
    flat = prefix.reshape(-1, hidden_size)
    ranked = {distance: nearest_tokens(flat, embeddings, k, distance) for distance in DISTANCES}
    norms = flat.norm(dim=-1).tolist()
    positions = []
    for row in range(len(flat)):
        entry = {"position": row % prefix_length, "norm": norms[row]}
        for distance, (scores, ids) in ranked.items():
            token_ids = ids[row].tolist()
            tokens = tokenizer.convert_ids_to_tokens(token_ids)
            entry[distance] = [{"id": token_id, "token": token, "score": score}
                               for token_id, token, score in zip(token_ids, tokens, scores[row].tolist())]
        positions.append(entry)
    return [positions[start:start + prefix_length] for start in range(0, len(positions), prefix_length)]


def image_data_uri(path: str | Path) -> str:
    """A file as a `data:` URI, so the page needs nothing beside it."""
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _tokens_cell(tokens: list[dict]) -> str:
    return "\n".join(f"{html.escape(repr(item['token']))} {item['score']:.3f}" for item in tokens)


def _image_section(entry: dict) -> str:
    rows = "".join(
        f"<tr><td>{position['position']}</td><td>{position['norm']:.2f}</td>"
        + "".join(f'<td class="tokens">{_tokens_cell(position[distance])}</td>' for distance in DISTANCES)
        + "</tr>"
        for position in entry["positions"])
    header = "<tr><th>position</th><th>norm</th>" + "".join(
        f"<th>{distance}</th>" for distance in DISTANCES) + "</tr>"
    picture = (f'<img src="{entry["image_uri"]}" alt="{html.escape(entry["image_id"])}">'
               if entry.get("image_uri") else "")
    return (f'<div class="image">{picture}<div><h2>{html.escape(entry["image_id"])}</h2>'
            f'<p class="caption">greedy caption: <b>{html.escape(entry["caption"])}</b></p>'
            f"<table>{header}{rows}</table></div></div>")


def write_prefix_page(output: str | Path, entries: list[dict], summary: dict) -> tuple[Path, Path]:
    """Write the HTML page and `<output>.json`; returns both paths.

    `entries`: per image `{"image_id", "file_name", "caption", "positions"}` (positions as from
    `prefix_neighbours`) and optionally `"image_uri"` (shown, not repeated in the JSON). `summary`: facts shown at
    the top (model, table, k, the median norm of the token embeddings).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    facts = "".join(f"<li>{html.escape(str(key))}: {html.escape(str(value))}</li>" for key, value in summary.items())
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Prefix tokens</title>'
        f"<style>{PAGE_STYLE}</style></head><body><h1>Nearest vocabulary tokens of each prefix position</h1>"
        f"<ul>{facts}</ul><p>Euclidean: distance, smallest first; cosine and dot: similarity, largest first. "
        "Tokens are shown as the tokenizer spells them.</p>"
        + "".join(_image_section(entry) for entry in entries) + "</body></html>\n")
    output.write_text(page, encoding="utf-8")
    json_path = output.with_suffix(".json")
    data = [{key: value for key, value in entry.items() if key != "image_uri"} for entry in entries]
    json_path.write_text(json.dumps({"summary": summary, "images": data}, indent=1), encoding="utf-8")
    return output, json_path


def _table_rows(table, num_images: int, table_path, config) -> tuple[list[str], list[str], torch.Tensor]:
    """Ids, file names and the CLIP embeddings the model reads (normalised or raw, `config.clip_embedding`) of the
    first `num_images` rows."""
    missing = {"image_id", "clip_features"} - set(table.column_names)
    if missing:
        raise ValueError(f"{table_path}: not an images table (no column {', '.join(sorted(missing))})")
    count = min(num_images, len(table))
    if count == 0:
        raise ValueError(f"{table_path}: the table has no rows")
    rows = table.select(range(count))
    file_names = rows["file_name"] if "file_name" in rows.column_names else [""] * count
    features = table_prefix_features(rows, config, what=f"the images table {table_path}")
    return list(rows["image_id"]), list(file_names), features


def _image_uri(images_dir: Path, file_name: str, image_id: str, table_path) -> str:
    path = images_dir / file_name
    if not file_name or not path.is_file():
        raise FileNotFoundError(f"{table_path}, image {image_id}: image file {path} not found "
                                "(is --images-dir the folder the table's file_name column is relative to?)")
    return image_data_uri(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved captioner folder")
    parser.add_argument("--images-table", required=True, help="images table (image_id, clip_features)")
    parser.add_argument("--images-dir", help="folder the table's file_name column is relative to; shows the images")
    parser.add_argument("--num-images", type=int, default=8, help="first rows of the table to show")
    parser.add_argument("--k", type=int, default=5, help="tokens listed per position and distance")
    parser.add_argument("--output", required=True, help="HTML page to write; the JSON goes beside it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[Path, Path]:
    model, tokenizer = load_captioner(args.model, args.device)
    table = load_table(args.images_table, model_clip_metadata(model.config), "images table")
    image_ids, file_names, features = _table_rows(table, args.num_images, args.images_table, model.config)
    captions = greedy_captions(model, tokenizer, features)
    neighbours = prefix_neighbours(model, tokenizer, features, args.k)
    entries = []
    for image_id, file_name, caption, positions in zip(image_ids, file_names, captions, neighbours):
        entry = {"image_id": image_id, "file_name": file_name, "caption": caption, "positions": positions}
        if args.images_dir:
            entry["image_uri"] = _image_uri(Path(args.images_dir), file_name, image_id, args.images_table)
        entries.append(entry)
    token_norms = model.get_input_embeddings().weight.detach().float().norm(dim=-1)
    summary = {"model": args.model, "images table": args.images_table, "k": args.k,
               "median token embedding norm": round(float(token_norms.median()), 3)}
    return write_prefix_page(args.output, entries, summary)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        page, data = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {page} and {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
