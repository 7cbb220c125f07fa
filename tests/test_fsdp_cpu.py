"""Sharded training on CPU: what accelerate does with an FSDP request on 2 CPU processes (gloo, torchrun), FSDP2
run for real through `train.py` (init and scst) against the DDP run of the same seed, and the folder a model wrapped
by FSDP2 saves.

Measured with accelerate 1.15 / torch 2.14 / transformers 5: `AcceleratorState` turns an FSDP plugin into
`DistributedType.FSDP` only on accelerator devices (MULTI_GPU, MULTI_NPU, ...); on CPU processes it keeps `MULTI_CPU`
and drops the plugin without a word, so `train.py --fsdp "full_shard auto_wrap"` under torchrun on CPU would train
with DDP: `train.py` refuses it. DeepSpeed (measured with deepspeed 0.19.8 installed beside the project,
`DS_ACCELERATOR=cpu`) is kept on CPU processes: the Trainer's Accelerator is made without accelerate's CPU flag, so
`AcceleratorState` turns ACCELERATE_USE_DEEPSPEED into `DistributedType.DEEPSPEED` over the gloo group, and ZeRO-3
trains init and scst through `train.py` to DDP's weights (within 1e-6); only with that flag on (ACCELERATE_USE_CPU,
`accelerate launch --cpu`) does accelerate drop DeepSpeed, and `train.py` refuses that. deepspeed is no requirement of
the project: its runs are not part of this suite; the refusal is tested without the package. The rank script below can
force the FSDP plugin in (mode `fsdp-forced`: the state's distributed type set to FSDP with the plugin, as accelerate
does on GPUs), which runs torch's own FSDP2 (`fully_shard`, DTensor parameters, gloo) under the project's trainers:
that is the closest run of the FSDP code path (sharded generation with `synced_gpus`, full state dict at save) a
CPU-only machine allows.

The two-process runs are launched as a script under torchrun:
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/test_fsdp_cpu.py WORK STAGE MODE
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

FSDP2 = ["--fsdp", "full_shard auto_wrap", "--fsdp_config",
         json.dumps({"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"], "reshard_after_forward": True,
                     "state_dict_type": "FULL_STATE_DICT"})]
WORDS = "a the red blue green circle square triangle small big left right of above below is and".split()
# Same weights after a few steps up to the order of floating-point sums (all-reduce vs reduce-scatter).
ATOL = 1e-5


def build_setup(work: Path):
    """A tiny local CLIP, tables with its features, a word tokenizer, a tiny GPT-2 shape and discriminator config."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tiny_clip
    from clip_scstclipcap import CaptioningClip

    work.mkdir(parents=True, exist_ok=True)
    clip_name = make_tiny_clip(work / "clip")
    clip = CaptioningClip.load(clip_name)
    vocab = {"<pad>": 0, "<|endoftext|>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(str(work / "tokenizer"))
    sentences = [f"a {size} {colour} {shape}" for size in ("small", "big") for colour in ("red", "blue", "green")
                 for shape in ("circle", "square", "triangle")]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text = clip.model.encode_text(clip.tokenizer(sentences), normalize=True)
    images = torch.nn.functional.normalize(text[torch.arange(16) % len(sentences)]
                                           + 0.3 * torch.randn(16, text.shape[1], generator=generator), dim=-1)
    description = lambda kind: json.dumps({"table": kind, "clip": clip.metadata})  # noqa: E731
    corpus = Dataset.from_dict({"text": sentences, "clip_features": text.tolist(), "source": ["toy"] * len(sentences)})
    train = Dataset.from_dict({"image_id": [str(i) for i in range(16)], "file_name": [f"{i}.png" for i in range(16)],
                               "clip_features": images.tolist(), "references": [[] for _ in range(16)]})
    for name, table, kind in (("corpus", corpus, "corpus"), ("train", train, "images")):
        table.info.description = description(kind)
        table.save_to_disk(str(work / name))
    (work / "decoder.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2,
                                                   "n_positions": 32}))
    (work / "discriminator.json").write_text(json.dumps({
        "model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 48}))


def stage_args(work: Path, stage: str, output: Path, start_from: Path | None = None) -> list[str]:
    common = ["--stage", stage, "--corpus_table", str(work / "corpus"), "--train_table", str(work / "train"),
              "--output_dir", str(output), "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
              "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0", "--use_cpu"]
    if stage == "init":
        return common + ["--tokenizer_name_or_path", str(work / "tokenizer"), "--decoder_config",
                         str(work / "decoder.json"), "--prefix_length", "2", "--max_steps", "3",
                         "--per_device_train_batch_size", "4", "--learning_rate", "3e-3"]
    return common + ["--model_name_or_path", str(start_from), "--max_steps", "2", "--per_device_train_batch_size", "2",
                     "--num_samples", "2", "--max_new_tokens", "5", "--learning_rate", "1e-3",
                     "--discriminator_config", str(work / "discriminator.json"), "--semantic_share", "0.5"]


def force_fsdp_on_cpu():
    """Let an FSDP plugin through on CPU processes, as accelerate lets it through on GPUs (it drops it on CPU)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def full_state_dict_on_cpu(marker: Path):
    """FSDP2's full state dict as accelerate takes it (`get_model_state_dict` with `cpu_offload=True`) holds, on CPU,
    tensors whose storage FSDP frees again: `save_model` then fails in safetensors with "RuntimeError: Attempted to
    access the data pointer on an invalid python storage." Gathered without the offload (every rank, then copied), the
    full weights save."""
    from accelerate import Accelerator
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    original = Accelerator.get_state_dict

    def get_state_dict(self, model, unwrap=True):
        if not any(hasattr(parameter, "full_tensor") for parameter in model.parameters()):  # not sharded
            return original(self, model, unwrap)
        sharded = [name for name, parameter in model.named_parameters() if hasattr(parameter, "full_tensor")]
        marker.write_text(json.dumps({"dtensor_parameters": len(sharded), "parameters": len(list(model.parameters())),
                                      "distributed_type": str(self.state.distributed_type)}))
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        return {name: tensor.detach().clone() for name, tensor in state.items()}

    Accelerator.get_state_dict = get_state_dict


def rank_main(work: Path, stage: str, mode: str):
    """One rank: `train.py` `stage` in `mode` (ddp | fsdp-forced), run_info.json as train.py writes it; the rank ends
    as train.py's command line ends it (`end_rank`)."""
    import train

    if mode == "fsdp-forced":
        force_fsdp_on_cpu()
        rank = os.environ.get("RANK", "0")
        full_state_dict_on_cpu(work / f"sharded_{stage}_rank{rank}.json")
    output = work / f"run_{stage}_{mode}"
    start_from = work / "run_init_ddp" / "init" / "final" if stage == "scst" else None
    argv = stage_args(work, stage, output, start_from) + (FSDP2 if mode == "fsdp-forced" else [])
    train.run_from_command_line(argv)


def launch(work: Path, stage: str, mode: str) -> subprocess.CompletedProcess:
    return torchrun([__file__, str(work), stage, mode], work)


def torchrun(script_and_args: list[str], work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{PROJECT_ROOT}:{PROJECT_ROOT / 'tests'}",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           *script_and_args], cwd=work, env=env, capture_output=True, text=True, timeout=600)


def final_weights(work: Path, stage: str, mode: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(work / f"run_{stage}_{mode}" / stage / "final" / "model.safetensors"))


def run_info(work: Path, stage: str, mode: str) -> dict:
    return json.loads((work / f"run_{stage}_{mode}" / stage / "run_info.json").read_text())


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[name].float() - second[name].float()).abs().max()) for name in first)


LOAD_AS_REMOTE_CODE = """
import json, sys
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
torch.save(model.state_dict(), sys.argv[1] + "/loaded_state_dict.pt")
print(json.dumps({"model_class": type(model).__name__,
                  "from_the_folder": type(model).__module__.startswith("transformers_modules")}))
"""


def test_a_captioner_saved_under_fully_shard_carries_its_own_code(tmp_path):
    """FSDP2's `fully_shard` turns the captioner's class into torch's `FSDPSCSTClipCapForCaptioning`; the trainer's
    save (every checkpoint and the final folder: `_save` with the gathered state dict, as `Trainer.save_model` calls it
    under FSDP) still writes the project's code and `auto_map`, and the folder loads as remote code in a fresh
    process, as a downstream user loads it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from conftest import run_script_outside_the_project, tiny_decoder_config
    from configuration_scstclipcap import SCSTClipCapConfig
    from modeling_scstclipcap import SCSTClipCapForCaptioning
    from trainers import CaptionConfig, CaptionTrainer

    model = SCSTClipCapForCaptioning(SCSTClipCapConfig(prefix_dim=16, prefix_length=2,
                                                       decoder_config=tiny_decoder_config()))
    trainer = CaptionTrainer(model=model, args=CaptionConfig(output_dir=str(tmp_path / "run"), use_cpu=True,
                                                             report_to="none"))
    folder = tmp_path / "final"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert type(model).__name__ == "FSDPSCSTClipCapForCaptioning"
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        trainer._save(str(folder), state_dict={name: tensor.clone() for name, tensor in state_dict.items()})
        assert isinstance(model, FSDPModule)  # still sharded after the save
    finally:
        dist.destroy_process_group()
    files = set(os.listdir(folder))
    assert {"modeling_scstclipcap.py", "configuration_scstclipcap.py"} <= files
    assert not [name for name in files if name.startswith("_fsdp")], files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_scstclipcap.SCSTClipCapForCaptioning"
    report = run_script_outside_the_project(LOAD_AS_REMOTE_CODE, [folder], tmp_path)
    assert report == {"model_class": "SCSTClipCapForCaptioning", "from_the_folder": True}
    loaded = torch.load(folder / "loaded_state_dict.pt")
    assert loaded.keys() == state_dict.keys()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state_dict[name]), name


END_RANK = """
import atexit, sys
from pathlib import Path
import train
atexit.register(lambda: Path(sys.argv[1]).write_text("atexit ran"))
print("unflushed line", end="")
train.end_rank(3)
"""


def test_a_rank_ends_with_its_status_after_its_atexit_callbacks(tmp_path):
    """A rank of a multi-process run exits without the interpreter's finalization (see `train.end_rank`): its atexit
    callbacks still run, its last output still comes out, and its exit status is kept."""
    marker = tmp_path / "marker"
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", END_RANK, str(marker)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert marker.read_text() == "atexit ran"
    assert result.stdout.endswith("unflushed line")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_cpu")
    build_setup(folder)
    return folder


@pytest.fixture(scope="module")
def work(setup):
    result = launch(setup, "init", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    return setup


def test_train_py_refuses_an_fsdp_request_that_accelerate_drops(setup):
    """`torchrun ... train.py --fsdp ...` on CPU processes, where accelerate keeps MULTI_CPU and drops FSDP, stops
    before training with one line saying what to change, exit code 2. (When accelerate starts honouring FSDP on CPU
    this test fails: then run FSDP for real below without forcing.)

    Every rank refuses, but torchrun stops the other rank (SIGTERM) as soon as one has failed, so the second rank's
    line is there only when that rank got to it first: one line or two, each whole (the ranks share stderr)."""
    output = setup / "run_init_fsdp_asked"
    result = torchrun([str(PROJECT_ROOT / "train.py"), *stage_args(setup, "init", output), *FSDP2], setup)
    assert result.returncode != 0
    assert "failed (exitcode: 2)" in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) in (1, 2) and len(set(errors)) == 1, result.stderr[-3000:]
    assert errors[0].count("error: ") == 1 and errors[0].endswith("drop the FSDP request to train unsharded"), errors
    assert errors[0].startswith("error: FSDP was asked for (--fsdp) but accelerate runs DistributedType.MULTI_CPU on "
                                "2 cpu process(es) without sharding"), errors[0]
    assert "configs/accelerate/fsdp.yaml" in errors[0] and "drop the FSDP request" in errors[0]
    assert not (output / "init" / "final").exists()


def test_train_py_refuses_an_accelerate_fsdp_config_that_accelerate_drops(setup, monkeypatch):
    """FSDP asked for by an accelerate config (`accelerate launch` exports ACCELERATE_USE_FSDP) in one CPU process:
    refused the same way, naming the accelerate config."""
    import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    output = setup / "run_init_fsdp_config"
    with pytest.raises(SystemExit, match=r"FSDP was asked for \(the accelerate config\) but accelerate runs "
                                         r"DistributedType.NO on 1 cpu process"):
        train.main(stage_args(setup, "init", output))
    assert not (output / "init" / "final").exists()


def test_train_py_refuses_an_accelerate_deepspeed_config_that_accelerate_drops(setup, monkeypatch):
    """DeepSpeed asked for by an accelerate config (`accelerate launch` exports ACCELERATE_USE_DEEPSPEED) while
    accelerate's own CPU flag is on (ACCELERATE_USE_CPU): `AcceleratorState` takes DeepSpeed only when that flag is off,
    so it runs without it, and `train.py` refuses before training with one line saying what to change.

    Runs without the deepspeed package: without it the request would already fail loudly where the package is
    required (TrainingArguments: `DeepSpeedPlugin.set_deepspeed_weakref` builds transformers' HfDeepSpeedConfig, which
    raises PackageNotFoundError "deepspeed>=0.9.3"; Accelerator: ImportError "DeepSpeed is not installed"), so those two
    package checks are stood in for here; the plugin and accelerate's decision to drop it are real."""
    import accelerate.accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    import train

    monkeypatch.setattr(DeepSpeedPlugin, "set_deepspeed_weakref", lambda self: None)
    monkeypatch.setattr(accelerate.accelerator, "is_deepspeed_available", lambda: True)
    compare_versions = accelerate.accelerator.compare_versions
    monkeypatch.setattr(accelerate.accelerator, "compare_versions",
                        lambda library, operation, version: library != "deepspeed"
                        and compare_versions(library, operation, version))
    offered = []
    original = AcceleratorState.__init__

    def init(self, *args, deepspeed_plugin=None, **kwargs):
        original(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        offered.append((deepspeed_plugin, self.distributed_type))

    monkeypatch.setattr(AcceleratorState, "__init__", init)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    output = setup / "run_init_deepspeed_config"
    with pytest.raises(SystemExit, match=r"DeepSpeed was asked for \(the accelerate config\) but accelerate runs "
                                         r"DistributedType.NO on 1 cpu process\(es\) without it .*ACCELERATE_USE_CPU.*"
                                         r"drop the DeepSpeed request"):
        train.main(stage_args(setup, "init", output))
    # The Trainer offered accelerate a DeepSpeed plugin, and accelerate dropped it.
    assert [isinstance(plugin, DeepSpeedPlugin) for plugin, _ in offered] == [True], offered
    assert offered[0][1] != DistributedType.DEEPSPEED
    assert not (output / "init" / "final").exists()


def test_fsdp2_on_cpu_matches_ddp_for_init_and_scst(work):
    """FSDP2 (forced through on CPU) trains init and scst to DDP's weights within ATOL, generation included, and the
    final folders carry the project's code, not torch's FSDP files."""
    for stage in ("init", "scst"):
        if stage == "scst":
            result = launch(work, "scst", "ddp")
            assert result.returncode == 0, result.stderr[-3000:]
        result = launch(work, stage, "fsdp-forced")
        assert result.returncode == 0, result.stderr[-3000:]
        info = run_info(work, stage, "fsdp-forced")
        assert info["num_processes"] == 2, info
        for rank in (0, 1):  # the captioner's parameters were DTensors (FSDP2) on both ranks when it was saved
            sharded = json.loads((work / f"sharded_{stage}_rank{rank}.json").read_text())
            assert sharded["dtensor_parameters"] == sharded["parameters"] > 0, sharded
        difference = max_difference(final_weights(work, stage, "fsdp-forced"), final_weights(work, stage, "ddp"))
        assert difference < ATOL, (stage, difference)
        final = set(os.listdir(work / f"run_{stage}_fsdp-forced" / stage / "final"))
        assert "modeling_scstclipcap.py" in final and not any(name.startswith("_fsdp") for name in final), final
        assert info["global_step"] == run_info(work, stage, "ddp")["global_step"]


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
