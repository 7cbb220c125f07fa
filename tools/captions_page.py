"""Sample test images beside the captions of every stage: a self-contained HTML page and a PNG grid.

    python tools/captions_page.py runs/shapes --images-table data/shapes/tables/shapes/test \
        --images-dir data/shapes/raw/images [--scenes data/shapes/raw/scenes/test.json] [--num-images 24]

reads each stage's `final/test_predictions/predictions-step-0.json` and writes `captions.html` (images embedded
as base64 PNG, so the page opens offline and can be mailed as one file) and `captions.png` (a grid for the README)
into the run folder, or `--output-dir`. The images, a seeded sample of those every stage captioned, are the same
for every stage and for both files; each shows its first reference caption and, given the shapes world's scenes,
the true scene and how many of each caption's attributes are true of it.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import random
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import datasets
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metrics import caption_grounding  # noqa: E402
from tools.curves import TEST_PREDICTIONS, read_json, read_predictions, stage_dirs  # noqa: E402

EMBEDDED_MAX_SIDE = 384  # pixels; larger photos are shrunk so the page stays a few MB
GRID_WRAP = 42  # characters per caption line in the PNG grid


@dataclass(frozen=True)
class SampledImage:
    row: int
    image_id: str
    file_name: str
    reference: str | None


def _read_table(images_table: str) -> datasets.Dataset:
    table = datasets.load_from_disk(str(images_table))
    missing = [column for column in ("image_id", "file_name") if column not in table.column_names]
    if missing:
        raise ValueError(f"images table {images_table} has no {' / '.join(missing)} column")
    return table.select_columns([column for column in ("image_id", "file_name", "references")
                                 if column in table.column_names])


def sample_images(predictions: dict[str, dict[str, str]], images_table: str, num_images: int,
                  seed: int = 0) -> list[SampledImage]:
    """A seeded sample of the table's images that every stage captioned, in table order."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not predictions:
        raise ValueError("no stage predictions given")
    table = _read_table(images_table)
    captioned = set.intersection(*(set(rows) for rows in predictions.values()))
    rows = [index for index, image_id in enumerate(table["image_id"]) if image_id in captioned]
    if not rows:
        raise ValueError(f"no image of {images_table} was captioned by every stage ({', '.join(predictions)})")
    random.Random(seed).shuffle(rows)
    # A prefix of one seeded shuffle: a smaller sample is a subset of a larger one with the same seed.
    chosen = sorted(rows[:num_images])
    picked = table.select(chosen)
    references = picked["references"] if "references" in picked.column_names else [[]] * len(chosen)
    return [SampledImage(row, image_id, file_name, refs[0] if refs else None)
            for row, image_id, file_name, refs in zip(chosen, picked["image_id"], picked["file_name"], references)]


def load_image(images_dir: str, sample: SampledImage, images_table: str) -> Image.Image:
    path = Path(images_dir) / sample.file_name
    where = f"row {sample.row} (image_id {sample.image_id!r}) of the images table {images_table}"
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found; it is named by {where}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image file {path} ({where}) cannot be read: {error}") from None


def png_data_uri(image: Image.Image, max_side: int | None = EMBEDDED_MAX_SIDE) -> str:
    """The image as a `data:` URI (PNG, shrunk to `max_side` pixels when larger), so a page needs nothing beside it."""
    if max_side is not None:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def describe_scene(scene: dict) -> str:
    """One line of what a shapes-world scene holds."""
    objects = [" ".join(value for value in (obj.get("size"), None if obj.get("texture") == "solid"
                                            else obj.get("texture"), obj.get("colour"), obj.get("shape")) if value)
               + (f" ({obj['position']})" if obj.get("position") else "") for obj in scene.get("objects", [])]
    parts = [" and ".join(objects)]
    if scene.get("relation"):
        parts.append(f"first {scene['relation']} second")
    if scene.get("background"):
        parts.append(f"{scene['background']} background")
    if scene.get("distractors"):
        count = len(scene["distractors"])
        parts.append(f"{count} distractor{'s' if count > 1 else ''}")
    return "; ".join(part for part in parts if part)


def true_attributes(caption: str, scene: dict) -> str:
    """"k/n attributes true": how many of the attributes the caption mentions hold in the scene."""
    counts = caption_grounding(caption, scene).values()
    return f"{sum(count['true'] for count in counts)}/{sum(count['mentioned'] for count in counts)} attributes true"


def _caption_rows(sample: SampledImage, predictions: dict[str, dict[str, str]], references: bool,
                  scene: dict | None) -> str:
    rows = []
    if references and sample.reference is not None:
        rows.append(f'<tr class="reference"><th>reference</th><td>{html.escape(sample.reference)}</td></tr>')
    for stage, captions in predictions.items():
        caption = captions[sample.image_id]
        grounding = f' <span class="grounding">({true_attributes(caption, scene)})</span>' if scene else ""
        rows.append(f"<tr><th>{html.escape(stage)}</th><td>{html.escape(caption)}{grounding}</td></tr>")
    return "\n".join(rows)


def _card(sample: SampledImage, image: Image.Image, predictions: dict[str, dict[str, str]], references: bool,
          scenes: dict | None) -> str:
    scene = scenes.get(sample.image_id) if scenes else None
    scene_line = f'<p class="scene">scene: {html.escape(describe_scene(scene))}</p>' if scene else ""
    return (f'<figure><img src="{png_data_uri(image)}" alt="{html.escape(sample.image_id)}">'
            f'<figcaption><p class="id">{html.escape(sample.image_id)}</p>{scene_line}'
            f"<table>{_caption_rows(sample, predictions, references, scene)}</table></figcaption></figure>")


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.cards { display: flex; flex-wrap: wrap; gap: 1em; }
figure { width: 330px; margin: 0; padding: 0.6em; border: 1px solid #ccc; border-radius: 6px; }
img { width: 192px; display: block; margin: 0 auto; image-rendering: pixelated; }
.id { font-family: monospace; font-size: 0.8em; color: #777; margin: 0.3em 0; text-align: center; }
.scene { font-size: 0.8em; color: #555; margin: 0.2em 0 0.4em; }
table { border-collapse: collapse; font-size: 0.85em; }
th { text-align: left; vertical-align: top; padding: 0.15em 0.5em 0.15em 0; white-space: nowrap; }
td { padding: 0.15em 0; }
.reference td, .reference th { color: #666; font-style: italic; }
.grounding { color: #888; font-size: 0.85em; }
"""


def write_captions_page(predictions: dict[str, dict[str, str]], images_table: str, images_dir: str, output: Path,
                        num_images: int = 24, references: bool = True, scenes: dict | None = None,
                        seed: int = 0) -> Path:
    """Write an HTML page of `num_images` sampled images, each beside every stage's caption (`predictions` maps
    stage -> {image_id: caption}), its first reference caption and, with `scenes` ({image_id: shapes-world scene}),
    the scene and the share of each caption's attributes true of it."""
    samples = sample_images(predictions, images_table, num_images, seed)
    cards = [_card(sample, load_image(images_dir, sample, images_table), predictions, references, scenes)
             for sample in samples]
    title = f"Captions of {', '.join(predictions)}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>"
            f"<p>{len(samples)} images of {html.escape(str(images_table))}, sampled with seed {seed}.</p>\n"
            f'<div class="cards">\n' + "\n".join(cards) + "\n</div></body></html>\n")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    return output


def _caption_blocks(sample: SampledImage, predictions: dict[str, dict[str, str]],
                    references: bool) -> list[tuple[str, str, str]]:
    """(wrapped text, colour, font style) of each caption under an image in the grid."""
    blocks = []
    if references and sample.reference is not None:
        blocks.append((textwrap.fill(f"ref: {sample.reference}", GRID_WRAP), "dimgray", "italic"))
    for index, (stage, captions) in enumerate(predictions.items()):
        blocks.append((textwrap.fill(f"{stage}: {captions[sample.image_id]}", GRID_WRAP), f"C{index % 10}", "normal"))
    return blocks


def write_captions_grid(predictions: dict[str, dict[str, str]], images_table: str, images_dir: str, output: Path,
                        num_images: int = 12, references: bool = True, columns: int = 4, seed: int = 0) -> Path:
    """Write a PNG grid of sampled images with every stage's caption (and the first reference) wrapped under each;
    with the same seed its images are among those `write_captions_page` shows."""
    samples = sample_images(predictions, images_table, num_images, seed)
    images = [load_image(images_dir, sample, images_table) for sample in samples]
    blocks = [_caption_blocks(sample, predictions, references) for sample in samples]
    cell_width, image_height, line_height, pad = 3.0, 2.0, 0.16, 0.12  # inches
    columns = min(columns, len(samples))
    row_starts = range(0, len(samples), columns)
    row_heights = [image_height + pad * 2 + line_height * max(
        sum(text.count("\n") + 1 for text, _, _ in cell) for cell in blocks[start:start + columns])
        for start in row_starts]
    width, height = cell_width * columns, sum(row_heights)
    figure = Figure(figsize=(width, height))
    top = height
    for start, row_height in zip(row_starts, row_heights):
        for column, index in enumerate(range(start, min(start + columns, len(samples)))):
            left = column * cell_width
            ax = figure.add_axes(((left + 0.1) / width, (top - pad - image_height) / height,
                                  (cell_width - 0.2) / width, image_height / height))
            ax.imshow(images[index], interpolation="nearest")
            ax.set_axis_off()
            y = top - pad - image_height - pad / 2
            for text, colour, style in blocks[index]:
                figure.text((left + 0.12) / width, y / height, text, color=colour, fontstyle=style, fontsize=7.5,
                            va="top", ha="left", family="sans-serif")
                y -= line_height * (text.count("\n") + 1)
        top -= row_height
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120, facecolor="white")
    return output


def read_stage_predictions(run_dir: Path) -> dict[str, dict[str, str]]:
    """{stage: {image_id: caption}} from each stage's test predictions."""
    stages = stage_dirs(run_dir, lambda path: (path / TEST_PREDICTIONS).is_file())
    if not stages:
        raise FileNotFoundError(f"no test predictions in {run_dir}: expected <stage>/{TEST_PREDICTIONS} "
                                f"in its stage folders (or {TEST_PREDICTIONS} in it)")
    return {stage: read_predictions(folder / TEST_PREDICTIONS) for stage, folder in stages.items()}


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run folder (with stage folders) or one stage folder")
    parser.add_argument("--images-table", required=True, help="images table of the test split")
    parser.add_argument("--images-dir", required=True, help="folder the table's file_name column is relative to")
    parser.add_argument("--scenes", type=Path, help="shapes-world scenes JSON ({image_id: scene}) of the split")
    parser.add_argument("--num-images", type=int, default=24, help="images on the HTML page")
    parser.add_argument("--grid-images", type=int, default=12, help="images in the PNG grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample")
    parser.add_argument("--output-dir", type=Path, help="where captions.html / captions.png go (default: run folder)")
    args = parser.parse_args(argv)
    predictions = read_stage_predictions(args.run_dir)
    scenes = read_json(args.scenes) if args.scenes else None
    output_dir = args.output_dir or args.run_dir
    page = write_captions_page(predictions, args.images_table, args.images_dir, output_dir / "captions.html",
                               args.num_images, scenes=scenes, seed=args.seed)
    grid = write_captions_grid(predictions, args.images_table, args.images_dir, output_dir / "captions.png",
                               args.grid_images, seed=args.seed)
    print(f"wrote {page}\nwrote {grid}")
    return page, grid


if __name__ == "__main__":
    main()
