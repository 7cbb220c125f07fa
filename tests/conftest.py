import json
import os
import subprocess
import sys
from pathlib import Path

# Spinning OpenMP threads stall each other on a busy machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from configuration_scstclipcap import SCSTClipCapConfig  # noqa: E402

TINY_WORDS = "a the red blue green circle square triangle small big left right of above below is and".split()


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(folder, seed: int = 0) -> str:
    """A random tiny open_clip saved as a `local-dir:` folder; returns its open_clip model name."""
    import open_clip

    from clip_scstclipcap import save_local_clip

    torch.manual_seed(seed)
    return save_local_clip(open_clip.CLIP(**TINY_CLIP), TINY_CLIP, folder)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: models this small run many times faster so on a machine shared with other
    jobs, and a resumed run can then equal a straight one bit for bit (CPU results depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_name(tmp_path_factory) -> str:
    """One random tiny open_clip per test module, as a `local-dir:` folder."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


def write_random_images(folder: Path, count: int, greyscale_last: bool = False) -> list[str]:
    """`count` PNG files of random pixels, of another size than the tiny CLIP's input (the last one greyscale when
    asked); returns their paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8))
        if greyscale_last and index == count - 1:
            image = image.convert("L")
        paths.append(str(folder / f"image_{index}.png"))
        image.save(paths[-1])
    return paths


def tiny_decoder_config(vocab_size: int = 64) -> dict:
    return dict(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )


@pytest.fixture
def make_config():
    """Factory of tiny configs: `make_config(mapping_type="transformer", freeze_decoder=True)`."""

    def make(**overrides) -> SCSTClipCapConfig:
        settings = dict(
            prefix_dim=16, prefix_length=4, clip_length=3, num_mapping_layers=2, num_mapping_heads=2,
            decoder_config=tiny_decoder_config(),
        )
        settings.update(overrides)
        return SCSTClipCapConfig(**settings)

    return make


@pytest.fixture
def tiny_tokenizer():
    """A word-level tokenizer with the project's conventions: pad 0, `<|endoftext|>` 1 as bos/eos, unk 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<|endoftext|>": 1, "<unk>": 2}
    vocab.update({word: index + 3 for index, word in enumerate(TINY_WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<unk>",
    )


def run_script_outside_the_project(script: str, args: list[str], tmp_path: Path) -> dict:
    """Run `script` in a fresh Python process, in an empty folder, without the project on its path and offline, as a
    downstream user would; returns the JSON object its last output line prints."""
    (tmp_path / "script.py").write_text(script)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(tmp_path / "script.py"), *map(str, args)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
