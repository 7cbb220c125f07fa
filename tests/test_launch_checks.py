"""Launch checks of `train.py` that need neither DeepSpeed nor an accelerator.

`accelerate launch --cpu --config_file configs/accelerate/deepspeed_zero3.yaml train.py ...` (accelerate 1.16) takes
the simple launcher: one process, whose environment holds ACCELERATE_USE_CPU=True, ACCELERATE_MIXED_PRECISION (the
config's bf16), MASTER_ADDR/MASTER_PORT (the config asks for 2 processes) and the dynamo settings, and nothing of
DeepSpeed (ACCELERATE_USE_DEEPSPEED is exported only by the DeepSpeed launcher). The one trace of the dropped config is
the launcher's command line, the parent of the training process, which `train.py` reads.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

import train
from conftest import PROJECT_ROOT
from trainers.discriminator import Discriminator
from trainers.stages import verify_ranks_agree

DEEPSPEED_CONFIG = "configs/accelerate/deepspeed_zero3.yaml"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def test_accelerate_launch_cpu_with_a_deepspeed_config_is_refused_in_one_line(tmp_path):
    """Through a real `accelerate launch`: refused before anything is loaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [ACCELERATE, "launch", "--cpu", "--config_file", DEEPSPEED_CONFIG, "train.py", "--stage", "init",
         "--output_dir", str(tmp_path / "run"), "--report_to", "none"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: `accelerate launch --cpu` dropped the DeepSpeed of {DEEPSPEED_CONFIG}: it started this one process "
        "without DeepSpeed instead of 2 under it, which would train unsharded; drop --cpu (DeepSpeed runs on CPU "
        "processes, with DS_ACCELERATOR=cpu), or launch without the DeepSpeed config to train unsharded"
    ], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_only_a_cpu_launch_with_a_deepspeed_config_counts_as_dropping_it():
    script = ["train.py", "--stage", "init"]
    python = [sys.executable]
    assert train.dropped_deepspeed_config(python + [ACCELERATE, "launch", "--cpu", "--config_file", DEEPSPEED_CONFIG]
                                          + script, str(PROJECT_ROOT)) == (DEEPSPEED_CONFIG, 2)
    assert train.dropped_deepspeed_config(python + ["-m", "accelerate.commands.launch", "--cpu", "--config_file",
                                                    str(PROJECT_ROOT / DEEPSPEED_CONFIG)] + script, "/") is not None
    for kept in ([ACCELERATE, "launch", "--config_file", DEEPSPEED_CONFIG],  # the DeepSpeed launcher runs it
                 [ACCELERATE, "launch", "--cpu", "--config_file", "configs/accelerate/multi_gpu.yaml"],
                 [ACCELERATE, "launch", "--cpu"],
                 ["-m", "torch.distributed.run", "--nproc_per_node", "2"]):
        assert train.dropped_deepspeed_config(python + kept + script, str(PROJECT_ROOT)) is None, kept
    # pytest is no launcher: the check is silent in an ordinary process.
    assert train.deepspeed_config_dropped_by_cpu_launch() is None


def test_the_discriminator_is_compared_across_ranks_under_zero3_and_a_partitioned_captioner_is_not(tiny_tokenizer):
    """Under ZeRO-3 the captioner's parameters are DeepSpeed's partitions (marked with `ds_id`, which is how
    DeepSpeed's own `is_zero_param` tells them), the discriminator's are whole: only the latter has a fingerprint to
    compare across ranks."""
    discriminator = Discriminator.from_config({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "intermediate_size": 32,
                                               "max_position_embeddings": 48}, tiny_tokenizer).model
    fingerprint = verify_ranks_agree(discriminator)
    assert isinstance(fingerprint, str) and len(fingerprint) == 64
    partitioned = torch.nn.Linear(2, 2)
    for index, parameter in enumerate(partitioned.parameters()):
        parameter.ds_id = index
    assert verify_ranks_agree(partitioned) is None
