"""Feature extraction: throughput against the bare CLIP forward, and peak memory as images grow.

    python benchmarks/features.py                      # defaults below; exit 1 if a target is missed
    python benchmarks/features.py --images 64 --memory-images 100

Throughput: the images-table pipeline (file index, decoding in DataLoader workers, CLIP forward,
Arrow shards, save_to_disk) on COCO-sized JPEGs, against the same model's forward alone on the
same images already decoded and preprocessed in memory, same batch size. The model is a
random-init open_clip ViT-B-32 (the real default architecture) saved as a `local-dir:` folder.
Target: pipeline throughput >= 0.8 x bare forward.

Memory: `prepare_datasets.py coco` in a subprocess on N and on 10 N images, peak RSS from wait4
(the largest of the process and its DataLoader workers), with a small random-init model whose input is
224 px and D = 512, so anything kept per image would show. Target: peak(10 N) <= 1.3 x peak(N).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as prepare_datasets.py does, before torch loads

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clip_scstclipcap import save_local_clip  # noqa: E402
from dataprep.common import ClipRequest, RunOptions  # noqa: E402
from dataprep.images import build_images_tables  # noqa: E402
from dataprep.sources import SkipReport  # noqa: E402

THROUGHPUT_TARGET = 0.8
MEMORY_TARGET = 1.3
SMALL_CLIP = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> dict[str, list[str]]:
    """`count` smooth random JPEGs with COCO names; returns OSCAR-style image_id -> captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = {}
    for number in range(1, count + 1):
        coarse = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        image.save(folder / f"COCO_train2014_{number:012d}.jpg", quality=90)
        captions[str(number)] = [f"picture number {number}"]
    return captions


def save_clip(model_cfg: dict | str, folder: Path) -> str:
    torch.manual_seed(0)
    if isinstance(model_cfg, str):
        model_cfg = open_clip.get_model_config(model_cfg)
    return save_local_clip(open_clip.CLIP(**model_cfg), model_cfg, folder)


def bare_forward_seconds(clip, paths: list[Path], batch_size: int) -> float:
    pixels = torch.stack([clip.preprocess(Image.open(path)) for path in paths])
    with torch.inference_mode():
        clip.model.encode_image(pixels[:batch_size], normalize=True)
        started = time.perf_counter()
        for start in range(0, len(pixels), batch_size):
            clip.model.encode_image(pixels[start:start + batch_size], normalize=True)
        return time.perf_counter() - started


def pipeline_seconds(clip_request: ClipRequest, images: Path, captions: dict, output: Path, options: RunOptions) -> float:
    warm = dict(list(captions.items())[:options.batch_size])
    build_images_tables({"train": warm}, {"train": SkipReport("warm")}, images.parent, output / "warm", clip_request,
                        options, False, "bench")
    started = time.perf_counter()
    build_images_tables({"train": captions}, {"train": SkipReport("timed")}, images.parent, output / "timed",
                        clip_request, options, False, "bench")
    return time.perf_counter() - started


def measure_throughput(work: Path, count: int, batch_size: int, num_workers: int, model: str) -> dict:
    captions = write_images(work / "images" / "train2014", count, (640, 480))
    clip_request = ClipRequest(save_clip(model, work / "clip"), None, "cpu")
    clip = clip_request.load()
    options = RunOptions(batch_size=batch_size, num_workers=num_workers, device="cpu", overwrite=True, progress=False)
    paths = sorted((work / "images" / "train2014").iterdir())
    bare = bare_forward_seconds(clip, paths, batch_size)
    pipeline = pipeline_seconds(clip_request, work / "images" / "train2014", captions, work / "tables", options)
    return {"images": count, "bare_images_per_s": count / bare, "pipeline_images_per_s": count / pipeline,
            "ratio": bare / pipeline}


# A child's peak RSS starts at its parent's peak (Linux carries the high-water mark across fork and
# exec), so the command runs under a small launcher and the launcher reports its child's peak.
_LAUNCHER = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "_, status, usage = os.wait4(child.pid, 0); print(usage.ru_maxrss); sys.exit(1 if status else 0)")


def peak_rss_mib(command: list[str]) -> float:
    """Peak RSS of `command` (the largest of it and its waited-for DataLoader workers), in MiB."""
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) / 1024


def coco_command(work: Path, count: int, clip_name: str, batch_size: int, num_workers: int) -> list[str]:
    images, annotations = work / f"images_{count}", work / f"annotations_{count}"
    captions = write_images(images / "train2014", count, (320, 240))
    annotations.mkdir()
    entries = [{"image_id": key, "id": index, "caption": texts[0]} for index, (key, texts) in enumerate(captions.items())]
    for split, part in (("train", entries[2:]), ("val", entries[:1]), ("test", entries[1:2])):
        (annotations / f"{split}_caption.json").write_text(json.dumps(part))
    return [sys.executable, "prepare_datasets.py", "coco", "--images", str(images), "--annotations", str(annotations),
            "--output", str(work / f"tables_{count}"), "--clip-model", clip_name, "--batch-size", str(batch_size),
            "--num-workers", str(num_workers), "--device", "cpu", "--no-progress"]


def measure_memory(work: Path, count: int, batch_size: int, num_workers: int) -> dict:
    clip_name = save_clip(SMALL_CLIP, work / "small_clip")
    small = peak_rss_mib(coco_command(work, count, clip_name, batch_size, num_workers))
    large = peak_rss_mib(coco_command(work, 10 * count, clip_name, batch_size, num_workers))
    return {"images": [count, 10 * count], "peak_rss_mib": [round(small, 1), round(large, 1)], "ratio": large / small}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="images for the throughput measurement")
    parser.add_argument("--memory-images", type=int, default=300, help="N of the memory measurement (and 10 N)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture of the throughput model")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        throughput = measure_throughput(work / "throughput", args.images, args.batch_size, args.num_workers, args.model)
        memory = measure_memory(work / "memory", args.memory_images, args.batch_size, args.num_workers)
    print(f"throughput ({args.model}, {args.images} JPEGs 640x480, batch {args.batch_size}, "
          f"{args.num_workers} workers): pipeline {throughput['pipeline_images_per_s']:.1f} img/s, "
          f"bare forward {throughput['bare_images_per_s']:.1f} img/s, "
          f"ratio {throughput['ratio']:.2f} (target >= {THROUGHPUT_TARGET})")
    print(f"peak RSS: {memory['peak_rss_mib'][0]} MiB for {memory['images'][0]} images, "
          f"{memory['peak_rss_mib'][1]} MiB for {memory['images'][1]}, "
          f"ratio {memory['ratio']:.2f} (target <= {MEMORY_TARGET})")
    missed = throughput["ratio"] < THROUGHPUT_TARGET or memory["ratio"] > MEMORY_TARGET
    print("TARGET MISSED" if missed else "targets met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
