"""Fictitious CLIP embeddings: what the captioner says of them, and images synthesised to have them.

Three kinds are built from an images table and a corpus table of the model's CLIP:
- `noisy_text`: a sentence's embedding plus Gaussian noise of std sigma, renormalised (what text-only init sees);
- `interpolation`: from an image's embedding (alpha 0) to a sentence's (alpha 1), spherical or normalised linear;
- `gap_shifted`: a sentence's embedding moved by the modality gap (mean image embedding - mean sentence embedding,
  times a scale), renormalised.
Each is captioned greedily, and an image is synthesised whose CLIP embedding matches it, as CLIPig does: the pixels,
held as a colour-decorrelated Fourier spectrum and starting near a blurred grey, are optimised with Adam to maximise
the cosine of the CLIP embeddings of randomly jittered and cropped copies with the target. The synthesised image is
captioned too (from its own CLIP embedding). Writes `fictitious_table/` (a table with the CLIP metadata),
`fictitious.png`, `fictitious.html` and `fictitious.json` into the output folder.

    python tools/fictitious.py --model runs/shapes/scst/final --images-table data/shapes/tables/shapes/test \
        --corpus-table data/shapes/tables/corpus/in_domain --output-dir runs/shapes/fictitious --steps 200 --count 4
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Value
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_scstclipcap import CaptioningClip, model_reads, read_clip_metadata  # noqa: E402
from dataprep.common import table_description  # noqa: E402
from dataprep.tables import feature_column, feature_matrix, iter_feature_chunks, load_table, save_table  # noqa: E402
from tools.captions_page import png_data_uri  # noqa: E402
from tools.prefix_tokens import greedy_captions, load_captioner, model_clip_metadata  # noqa: E402

KINDS = ("noisy_text", "interpolation", "gap_shifted")
PARAMETER_NAMES = {"noisy_text": "sigma", "interpolation": "alpha", "gap_shifted": "gap scale"}
INTERPOLATIONS = ("slerp", "lerp")
# Square root of the colour covariance of natural images (as in lucid and CLIPig): optimising in these decorrelated
# colours lets every channel's step move the picture alike.
COLOUR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def noisy_text(text_features: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Text embeddings (N, D) plus Gaussian noise of std `sigma`, renormalised."""
    noise = torch.randn(text_features.shape, generator=generator) * sigma
    return F.normalize(text_features + noise, dim=-1)


def interpolate(image_features: torch.Tensor, text_features: torch.Tensor, alpha: float,
                mode: str = "slerp") -> torch.Tensor:
    """Unit embeddings from `image_features` (alpha 0) to `text_features` (alpha 1), both (N, D).

    `slerp` walks the great circle at constant angular speed; `lerp` normalises the straight mix.
    """
    start, end = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    if mode == "lerp":
        return F.normalize((1 - alpha) * start + alpha * end, dim=-1)
    if mode != "slerp":
        raise ValueError(f"unknown interpolation {mode!r}: use one of {INTERPOLATIONS}")
    angle = torch.arccos((start * end).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sine = torch.sin(angle)
    parallel = sine < 1e-6  # (nearly) the same direction: the linear weights are the limit
    safe_sine = torch.where(parallel, torch.ones_like(sine), sine)
    start_weight = torch.where(parallel, torch.full_like(sine, 1 - alpha), torch.sin((1 - alpha) * angle) / safe_sine)
    end_weight = torch.where(parallel, torch.full_like(sine, alpha), torch.sin(alpha * angle) / safe_sine)
    return F.normalize(start_weight * start + end_weight * end, dim=-1)


def gap_shift(text_features: torch.Tensor, image_mean: torch.Tensor, text_mean: torch.Tensor,
              scale: float = 1.0) -> torch.Tensor:
    """Text embeddings moved by `scale` times the modality gap (image mean - text mean), renormalised."""
    return F.normalize(text_features + scale * (image_mean - text_mean), dim=-1)


def mean_embedding(table: Dataset, column: str = "clip_features", chunk_rows: int = 65536) -> torch.Tensor:
    """Mean of a feature column, read in chunks so that a large corpus never sits in memory whole."""
    total = None
    for _, chunk in iter_feature_chunks(table, column, chunk_rows):
        part = chunk.astype(np.float64).sum(axis=0)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("cannot average the embeddings of an empty table")
    return torch.from_numpy(total / len(table)).float()


def modality_gap(image_mean: torch.Tensor, text_mean: torch.Tensor) -> float:
    """Distance between the centroids of the image and text embeddings (Liang et al., "Mind the Gap")."""
    return float((image_mean - text_mean).norm())


@dataclass
class FictitiousSettings:
    count: int = 4  # sentences per kind; images (each with its own sentence) for the interpolations
    sigma: float = 0.1
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    interpolation: str = "slerp"
    gap_scale: float = 1.0
    seed: int = 0


@dataclass
class FictitiousEmbedding:
    kind: str
    source: str
    parameter: float
    features: torch.Tensor  # (D,)


def _pick(table: Dataset, count: int, generator: torch.Generator) -> Dataset:
    order = torch.randperm(len(table), generator=generator)[:count]
    return table.select(order.tolist())


def _check_columns(table: Dataset, needed: set[str], what: str) -> None:
    missing = needed - set(table.column_names)
    if missing:
        raise ValueError(f"{what} has no column {', '.join(sorted(missing))} (columns: {table.column_names})")
    if len(table) == 0:
        raise ValueError(f"{what} has no rows")


def build_fictitious(images: Dataset, corpus: Dataset, settings: FictitiousSettings,
                     means: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[FictitiousEmbedding]:
    """Noisy, interpolated and gap-shifted embeddings of seeded random rows of `images` and `corpus`.

    `means`: the mean image and text embeddings when already known (a large corpus takes a pass to average).
    """
    _check_columns(images, {"image_id", "clip_features"}, "the images table")
    _check_columns(corpus, {"text", "clip_features"}, "the corpus table")
    if settings.count < 1:
        raise ValueError(f"count must be at least 1, got {settings.count}")
    generator = torch.Generator().manual_seed(settings.seed)
    sentences = _pick(corpus, settings.count, generator)
    pictures = _pick(images, settings.count, generator)
    texts, text_features = sentences["text"], torch.from_numpy(feature_matrix(sentences))
    image_features = torch.from_numpy(feature_matrix(pictures))
    image_mean, text_mean = means or (mean_embedding(images), mean_embedding(corpus))
    gap = modality_gap(image_mean, text_mean)

    made = [FictitiousEmbedding("noisy_text", f"text {text!r}", settings.sigma, features)
            for text, features in zip(texts, noisy_text(text_features, settings.sigma, generator))]
    for index, (image_id, text) in enumerate(zip(pictures["image_id"], texts)):
        source = f"{settings.interpolation} image {image_id} -> text {text!r}"
        made += [FictitiousEmbedding("interpolation", source, alpha, interpolate(
            image_features[index], text_features[index], alpha, settings.interpolation)) for alpha in settings.alphas]
    shifted = gap_shift(text_features, image_mean, text_mean, settings.gap_scale)
    made += [FictitiousEmbedding("gap_shifted", f"text {text!r} + modality gap (norm {gap:.3f})",
                                 settings.gap_scale, features) for text, features in zip(texts, shifted)]
    return made


def fictitious_features(dim: int) -> Features:
    return Features({"kind": Value("string"), "source": Value("string"), "parameter": Value("float32"),
                     "clip_features": feature_column(dim)})


def save_fictitious_table(embeddings: list[FictitiousEmbedding], path: str | Path, clip_meta: dict,
                          **description) -> Dataset:
    """Save the embeddings as a table whose description carries `clip_meta` as prepare_datasets.py writes it."""
    features = torch.stack([item.features for item in embeddings]).float().numpy()
    rows = Dataset.from_dict(
        {"kind": [item.kind for item in embeddings], "source": [item.source for item in embeddings],
         "parameter": [item.parameter for item in embeddings], "clip_features": features},
        features=fictitious_features(features.shape[1]))
    return save_table(rows, path, table_description("fictitious", clip_meta, **description))


@dataclass
class SynthesisSettings:
    steps: int = 200
    learning_rate: float = 0.05
    augmentations: int = 8  # jittered, cropped copies of each image per step
    jitter: float = 0.1  # largest shift, as a share of the image side
    min_crop: float = 0.75  # smallest crop side, as a share of the image side
    decay: float = 1.0  # 1/f^decay scaling of the spectrum: higher favours smoother images
    batch_size: int = 8  # images optimised together
    seed: int = 0


@dataclass
class SynthesisResult:
    image: Image.Image
    start_cosine: float  # of the starting image, through the CLIP's own preprocessing
    final_cosine: float  # of the final 8-bit image, through the CLIP's own preprocessing
    history: list[float]  # mean cosine of the augmented copies, per step
    features: torch.Tensor  # CLIP embedding of the final image (D,)


class FourierImages(nn.Module):
    """A batch of RGB images held as colour-decorrelated spectra scaled by 1/f^decay (as in lucid / CLIPig).

    Starts from a small random spectrum, i.e. a blurred, nearly uniform grey; the output is in [0, 1].
    """

    def __init__(self, count: int, size: tuple[int, int], decay: float, generator: torch.Generator):
        super().__init__()
        self.size = size
        height, width = size
        frequencies = torch.sqrt(torch.fft.fftfreq(height)[:, None] ** 2 + torch.fft.rfftfreq(width)[None, :] ** 2)
        self.register_buffer("scale", frequencies.clamp(min=1.0 / max(height, width)) ** -decay)
        self.register_buffer("colour", COLOUR_CORRELATION_SQRT / COLOUR_CORRELATION_SQRT.norm(dim=0).max())
        self.spectrum = nn.Parameter(0.01 * torch.randn(count, 3, height, width // 2 + 1, 2, generator=generator))

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        decorrelated = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / 4  # (N, 3, H, W)
        return torch.sigmoid(torch.einsum("ij,njhw->nihw", self.colour, decorrelated))


def random_views(images: torch.Tensor, count: int, jitter: float, min_crop: float,
                 generator: torch.Generator) -> torch.Tensor:
    """`count` jittered, cropped and resized copies of each of `images` (N, 3, H, W) -> (count * N, 3, H, W).

    No flips: left and right are part of what a caption says.
    """
    height, width = images.shape[-2:]
    pad = max(1, round(jitter * max(height, width)))
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    views = []
    for _ in range(count):
        share = min_crop + (1 - min_crop) * float(torch.rand((), generator=generator))
        crop_height, crop_width = max(1, round(share * height)), max(1, round(share * width))
        top = int(torch.randint(0, height + 2 * pad - crop_height + 1, (), generator=generator))
        left = int(torch.randint(0, width + 2 * pad - crop_width + 1, (), generator=generator))
        crop = padded[..., top:top + crop_height, left:left + crop_width]
        views.append(F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False))
    return torch.cat(views)


def clip_input_size(clip_model: nn.Module) -> tuple[int, int]:
    size = open_clip.get_model_preprocess_cfg(clip_model)["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def _to_pil(image: torch.Tensor) -> Image.Image:
    pixels = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def _synthesize_batch(clip: CaptioningClip, targets: torch.Tensor, settings: SynthesisSettings,
                      generator: torch.Generator) -> list[SynthesisResult]:
    preprocess_cfg = open_clip.get_model_preprocess_cfg(clip.model)
    mean = torch.tensor(preprocess_cfg["mean"], device=clip.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=clip.device).view(1, 3, 1, 1)
    targets = F.normalize(targets.float().to(clip.device), dim=-1)
    images = FourierImages(len(targets), clip_input_size(clip.model), settings.decay, generator).to(clip.device)
    start_pictures = [_to_pil(image) for image in images()]
    optimizer = torch.optim.Adam(images.parameters(), lr=settings.learning_rate)
    history = []
    for _ in range(settings.steps):
        views = random_views(images(), settings.augmentations, settings.jitter, settings.min_crop, generator)
        embeddings = clip.model.encode_image((views - mean) / std, normalize=True)
        cosines = (embeddings * targets.repeat(settings.augmentations, 1)).sum(-1)
        per_image = cosines.view(settings.augmentations, len(targets)).mean(0)
        optimizer.zero_grad(set_to_none=True)
        # A sum, not a mean: each image's gradient is then its own, whatever the batch.
        (-per_image.sum()).backward()
        optimizer.step()
        history.append(per_image.detach().cpu())
    final_pictures = [_to_pil(image) for image in images()]
    # The cosines reported are those of the 8-bit pictures saved, through the CLIP's own preprocessing.
    start_cosines = (clip.encode_images(start_pictures) * targets).sum(-1).cpu()
    final_features = clip.encode_images(final_pictures).cpu()
    final_cosines = (final_features * targets.cpu()).sum(-1)
    steps = torch.stack(history).T.tolist() if history else [[] for _ in final_pictures]
    return [SynthesisResult(picture, float(start), float(final), trace, features)
            for picture, start, final, trace, features
            in zip(final_pictures, start_cosines, final_cosines, steps, final_features)]


def synthesize_images(clip: CaptioningClip, targets: torch.Tensor, settings: SynthesisSettings = SynthesisSettings()
                      ) -> list[SynthesisResult]:
    """One image per target embedding (N, D) of `clip`, optimised to maximise the cosine of its CLIP embedding."""
    if targets.ndim != 2:
        raise ValueError(f"targets must be a (N, D) matrix, got shape {tuple(targets.shape)}")
    dim = clip.metadata.get("dim")
    if dim is not None and targets.shape[1] != dim:
        raise ValueError(f"targets have D={targets.shape[1]} but the CLIP {clip.metadata['model_name']} has D={dim}")
    generator = torch.Generator().manual_seed(settings.seed)
    results = []
    for start in range(0, len(targets), settings.batch_size):
        results += _synthesize_batch(clip, targets[start:start + settings.batch_size], settings, generator)
    return results


def _label(row: dict) -> str:
    return f"{row['kind']} ({PARAMETER_NAMES[row['kind']]} {row['parameter']:g})"


def _figure_lines(rows: list[dict], columns: int) -> list[list[dict]]:
    """One line per sentence kind and per interpolated pair, wrapped at `columns`."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["source"] if row["kind"] == "interpolation" else row["kind"], []).append(row)
    return [group[start:start + columns] for group in groups.values() for start in range(0, len(group), columns)]


def write_figure(rows: list[dict], path: str | Path, max_columns: int = 6) -> Path:
    """A grid of the synthesised images, each titled with its kind and cosine, above the caption of its embedding
    and that of the synthesised image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = _figure_lines(rows, max_columns)
    columns = max(len(line) for line in lines)
    figure, axes = plt.subplots(len(lines), columns, figsize=(2.8 * columns, 3.8 * len(lines)), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for line, line_axes in zip(lines, axes):
        for row, axis in zip(line, line_axes):
            axis.imshow(row["image"], interpolation="nearest")
            axis.set_title(f"{_label(row)}\ncos {row['start_cosine']:.2f} -> {row['final_cosine']:.2f}", fontsize=8)
            captions = (textwrap.fill("embedding: " + row["caption"], 36) + "\n"
                        + textwrap.fill("image: " + row["image_caption"], 36))
            axis.text(0.5, -0.04, captions, transform=axis.transAxes, ha="center", va="top", fontsize=6.5)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_page(rows: list[dict], path: str | Path, summary: dict) -> Path:
    """A self-contained HTML table: synthesised image, kind, parameter, source, captions and cosines."""
    facts = "".join(f"<li>{html.escape(str(key))}: {html.escape(str(value))}</li>" for key, value in summary.items())
    cells = "".join(
        f'<tr><td><img src="{png_data_uri(row["image"], max_side=None)}" alt="{html.escape(_label(row))}"></td>'
        f"<td>{html.escape(row['kind'])}</td><td>{PARAMETER_NAMES[row['kind']]} {row['parameter']:g}</td>"
        f"<td>{html.escape(row['source'])}</td><td><b>{html.escape(row['caption'])}</b></td>"
        f"<td>{html.escape(row['image_caption'])}</td>"
        f"<td>{row['start_cosine']:.3f} &rarr; {row['final_cosine']:.3f}</td></tr>"
        for row in rows)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Fictitious embeddings</title><style>'
        "body { font-family: sans-serif; margin: 1.5em; } table { border-collapse: collapse; font-size: 0.9em; } "
        "th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: middle; } "
        "img { width: 144px; image-rendering: pixelated; }</style></head><body>"
        f"<h1>Fictitious CLIP embeddings, their captions and synthesised images</h1><ul>{facts}</ul>"
        "<table><tr><th>synthesised image</th><th>kind</th><th>parameter</th><th>source</th>"
        "<th>caption of the embedding</th><th>caption of the synthesised image</th>"
        "<th>cosine with the target (start &rarr; final)</th></tr>"
        f"{cells}</table></body></html>\n")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved captioner folder")
    parser.add_argument("--images-table", required=True, help="images table (image_id, clip_features)")
    parser.add_argument("--corpus-table", required=True, help="corpus table (text, clip_features)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--count", type=int, default=4, help="sentences (and images) drawn per kind")
    parser.add_argument("--sigma", type=float, default=0.1, help="noise std of noisy_text")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="interpolation weights of the text (0: the image, 1: the sentence)")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS, default="slerp")
    parser.add_argument("--gap-scale", type=float, default=1.0, help="share of the modality gap added")
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps per synthesised image")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--augmentations", type=int, default=8, help="random views per image and step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_captioner(args.model, args.device)
    if model_reads(model.config) == "raw":
        raise ValueError(f"{args.model} reads raw CLIP embeddings (clip_embedding='raw'), and fictitious embeddings "
                         "are unit vectors without a raw norm: use a model that reads normalised embeddings")
    expected = model_clip_metadata(model.config)
    images = load_table(args.images_table, expected, "images table")
    corpus = load_table(args.corpus_table, expected, "corpus table")
    settings = FictitiousSettings(args.count, args.sigma, tuple(args.alphas), args.interpolation, args.gap_scale,
                                  args.seed)
    means = mean_embedding(images), mean_embedding(corpus)
    embeddings = build_fictitious(images, corpus, settings, means)
    gap = modality_gap(*means)
    save_fictitious_table(embeddings, output / "fictitious_table", read_clip_metadata(images),
                          images_table=str(args.images_table), corpus_table=str(args.corpus_table),
                          settings=asdict(settings), modality_gap=gap)
    targets = torch.stack([item.features for item in embeddings])
    captions = greedy_captions(model, tokenizer, targets)

    clip = CaptioningClip.load(model.config.clip_model_name, model.config.clip_pretrained, args.device)
    synthesis = SynthesisSettings(steps=args.steps, learning_rate=args.learning_rate,
                                  augmentations=args.augmentations, seed=args.seed)
    started = time.perf_counter()
    results = synthesize_images(clip, targets, synthesis)
    seconds = time.perf_counter() - started
    image_captions = greedy_captions(model, tokenizer, torch.stack([result.features for result in results]))

    rows = [{"kind": item.kind, "source": item.source, "parameter": item.parameter, "caption": caption,
             "image_caption": image_caption, "start_cosine": result.start_cosine,
             "final_cosine": result.final_cosine, "image": result.image}
            for item, caption, image_caption, result in zip(embeddings, captions, image_captions, results)]
    summary = {
        "model": args.model, "images table": args.images_table, "corpus table": args.corpus_table,
        "modality gap (distance of the centroids)": round(gap, 4), "steps": args.steps,
        "mean cosine start": round(float(np.mean([row["start_cosine"] for row in rows])), 4),
        "mean cosine final": round(float(np.mean([row["final_cosine"] for row in rows])), 4),
        "synthesis seconds": round(seconds, 1), "device": str(clip.device),
    }
    write_figure(rows, output / "fictitious.png")
    write_page(rows, output / "fictitious.html", summary)
    numbers = [{key: value for key, value in row.items() if key != "image"} for row in rows]
    (output / "fictitious.json").write_text(json.dumps({"summary": summary, "rows": numbers}, indent=1))
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value}")
    print(f"wrote {args.output_dir}/fictitious_table, fictitious.png, fictitious.html, fictitious.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
