"""hub_upload.py on a tiny trained-run folder and tiny tables made here. The Hub is a fake HTTP server behind
huggingface_hub's own client (`set_client_factory`), so create_repo / upload_folder run their real code."""

import base64
import json
import re

import httpx2
import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard, set_client_factory
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils._http import default_client_factory

from clip_scstclipcap import CaptioningClip, clip_metadata
from conftest import run_script_outside_the_project
from dataprep.common import table_description
from dataprep.tables import images_features, save_table
from hub_upload import main
from prepare_datasets import main as prepare_datasets
from test_pipeline import PIPELINE_SCRIPT, as_outputs, expected_captions, save_captioner
from test_pipeline import image_paths  # noqa: F401  (a fixture shared with the pipeline tests)
from trainers import InitConfig

REPO_ID = "someone/scstclipcap-tiny"
DATASET_REPO_ID = "someone/tiny-tables"
TOKEN = "hf_test_token"
METRICS = {"bleu_1": 0.61, "bleu_4": 0.21, "meteor": 0.24, "rouge_l": 0.5, "cider": 0.73,
           "attribute_precision": 0.8, "attribute_recall": 0.4, "skipped": {"spice": "no Stanford models"}}
CARD_METRICS = ("cider", "bleu_4", "meteor", "rouge_l", "attribute_precision", "attribute_recall")


@pytest.fixture
def trained_run(tmp_path, make_config, tiny_tokenizer, clip_name, image_paths):
    """runs/tiny/init/final as train.py leaves it: model, tokenizer, training_args.bin, test_metrics.json."""
    stage_dir = tmp_path / "runs" / "tiny" / "init"
    final = stage_dir / "final"
    save_captioner(final, make_config, tiny_tokenizer, clip_name, image_paths)
    (final / "test_metrics.json").write_text(json.dumps(METRICS))
    (stage_dir / "run_info.json").write_text(json.dumps({"stage": "init", "global_step": 120, "train_minutes": 0.5}))
    torch.save(InitConfig(output_dir=str(stage_dir), learning_rate=3e-4, noise_std=0.05, use_cpu=True),
               final / "training_args.bin")
    return final


@pytest.fixture
def tables(tmp_path, clip_name, image_paths):
    """A test images table (as prepare_datasets writes it), a corpus table made by prepare_datasets itself, and a
    `datasets` cache file that must not be uploaded."""
    root = tmp_path / "tables"
    features = CaptioningClip.load(clip_name).encode_images(image_paths).numpy()
    rows = {"image_id": [f"{k}" for k in range(len(image_paths))], "file_name": image_paths,
            "clip_features": features.tolist(), "references": [["a red circle"]] * len(image_paths)}
    description = table_description("images", clip_metadata(clip_name, None, features.shape[1], True),
                                    source="coco", split="test", references=True)
    save_table(Dataset.from_dict(rows, features=images_features(features.shape[1])), root / "coco" / "test",
               description)
    (root / "coco" / "test" / "cache-0123456789abcdef.arrow").write_bytes(b"a map cache")
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a red circle\na blue square\na green triangle\n")
    assert prepare_datasets(["corpus", "--source", "text", "--name", "tiny", "--input", str(sentences),
                             "--output", str(root), "--clip-model", clip_name, "--num-workers", "0",
                             "--no-progress"]) == 0
    return root


class FakeHub:
    """The Hub endpoints that creating a repo and committing regular (non-LFS) files use; it keeps what it got."""

    def __init__(self):
        self.requests, self.created, self.validated_cards = [], [], []
        self.commits = {}

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path, request.headers.get("authorization")))
        if path == "/api/repos/create":
            body = json.loads(request.content)
            self.created.append(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            self.validated_cards.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={})
        if match := re.fullmatch(r"/api/(models|datasets)/(.+)/preupload/main", path):
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False} for file in files]})
        if match := re.fullmatch(r"/api/(models|datasets)/(.+)/commit/main", path):
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            self.commits[(match[1], match[2])] = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines if line["key"] == "file"}
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{match[2]}/commit/{'0' * 40}",
                                              "commitOid": "0" * 40})
        return httpx2.Response(404, json={"error": f"{path} is not served here"})


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    set_client_factory(default_client_factory)


def folder_files(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.glob("**/*") if path.is_file()}


def listed_files(output: str) -> set[str]:
    return {line.split()[0] for line in output.splitlines() if line.startswith("  ")}


def test_dry_run_stages_a_folder_that_captions_in_a_fresh_process(
    trained_run, tables, clip_name, image_paths, tmp_path, fake_hub, capsys
):
    staged = tmp_path / "staged"
    assert main([str(trained_run), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(staged),
                 "--tables", str(tables)]) == 0
    output = capsys.readouterr().out
    assert fake_hub.requests == [], "a dry run sends nothing"
    assert REPO_ID in output and "dry run: nothing uploaded" in output

    staged_files = folder_files(staged)
    assert listed_files(output) == set(staged_files)
    model_files = folder_files(trained_run)
    copied = [name for name in model_files if name not in ("training_args.bin", "config.json")]
    assert {name: staged_files[name] for name in copied} == {name: model_files[name] for name in copied}
    assert {"README.md", "pipeline_scstclipcap.py", "clip_scstclipcap.py", "clip/open_clip_config.json",
            "clip/open_clip_model.safetensors"} <= set(staged_files)
    assert "training_args.bin" not in staged_files
    config = json.loads(staged_files["config.json"])
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}
    assert config["custom_pipelines"]["scstclipcap-captioning"]["impl"] == "pipeline_scstclipcap.SCSTClipCapPipeline"

    report = run_script_outside_the_project(PIPELINE_SCRIPT, [staged, json.dumps(image_paths)], tmp_path)
    assert report["batched"] == as_outputs(expected_captions(trained_run, clip_name, image_paths, max_new_tokens=7))
    assert report["clip"] == f"local-dir:{staged / 'clip'}"


def test_card_metadata_round_trips(trained_run, tables, tmp_path):
    staged = tmp_path / "staged"
    assert main([str(trained_run), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(staged),
                 "--tables", str(tables), "--dataset-repo-id", DATASET_REPO_ID, "--license", "apache-2.0"]) == 0
    card = ModelCard.load(staged / "README.md")
    assert card.data.license == "apache-2.0"
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "image-to-text")
    assert card.data.datasets == [DATASET_REPO_ID]
    model_name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert model_name == "scstclipcap-tiny"
    assert {result.metric_type: result.metric_value for result in results} == {
        name: METRICS[name] for name in CARD_METRICS}
    assert {(result.task_type, result.dataset_type, result.dataset_split) for result in results} == {
        ("image-to-text", DATASET_REPO_ID, "test")}

    assert "from transformers import pipeline\n" f'captioner = pipeline(model="{REPO_ID}", trust_remote_code=True)\n' \
           'captioner("image.jpg")' in card.text
    for row in ("| stage | init |", "| learning_rate | 0.0003 |", "| noise_std | 0.05 |", "| CIDEr | 0.7300 |"):
        assert row in card.text
    assert "coco test (4 images)" in card.text and "tiny (3 sentences from sentences.txt)" in card.text


def test_upload_sends_the_staged_folder_and_the_tables_through_huggingface_hub(
    trained_run, tables, tmp_path, fake_hub, capsys
):
    dry_staged = tmp_path / "dry"
    arguments = [str(trained_run), "--repo-id", REPO_ID, "--tables", str(tables), "--dataset-repo-id",
                 DATASET_REPO_ID, "--private", "--token", TOKEN]
    assert main([*arguments, "--dry-run", "--staging-dir", str(dry_staged)]) == 0
    assert main(arguments) == 0
    assert "uploaded the model to https://huggingface.co/someone/scstclipcap-tiny" in capsys.readouterr().out

    assert [(body["organization"], body["name"], body.get("visibility"), body.get("type")) for body in
            fake_hub.created] == [("someone", "scstclipcap-tiny", "private", None),
                                  ("someone", "tiny-tables", "private", "dataset")]
    assert fake_hub.commits[("models", REPO_ID)] == folder_files(dry_staged)
    table_files = folder_files(tables)
    assert fake_hub.commits[("datasets", DATASET_REPO_ID)] == {
        name: content for name, content in table_files.items() if not name.endswith("cache-0123456789abcdef.arrow")}
    assert fake_hub.validated_cards == [(dry_staged / "README.md").read_text()]
    hub_calls = [request for request in fake_hub.requests if "agent-harnesses" not in request[1]]
    assert hub_calls and all(authorization == f"Bearer {TOKEN}" for _, _, authorization in hub_calls)


def test_what_cannot_be_published_is_named(trained_run, tmp_path, make_config, tiny_tokenizer, capsys):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "old.txt").write_text("left over")
    assert main([str(trained_run), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(staged)]) == 2
    assert f"The staging folder {staged} is not empty" in capsys.readouterr().err

    # A config that names its CLIP relative to another working directory needs --clip.
    config = json.loads((trained_run / "config.json").read_text())
    clip_folder = config["clip_model_name"]
    config["clip_model_name"] = "local-dir:another/training/folder/clip"
    (trained_run / "config.json").write_text(json.dumps(config))
    assert main([str(trained_run), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(tmp_path / "a")]) == 2
    assert "--clip local-dir:PATH" in capsys.readouterr().err
    assert main([str(trained_run), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(tmp_path / "b"),
                 "--clip", clip_folder]) == 0
    assert (tmp_path / "b" / "clip" / "open_clip_model.safetensors").is_file()

    with pytest.raises(SystemExit):
        main([str(trained_run), "--repo-id", REPO_ID, "--dataset-repo-id", DATASET_REPO_ID])
    assert "--dataset-repo-id needs --tables" in capsys.readouterr().err


@pytest.mark.parametrize("clip_embedding, said", [("normalized", "(16-d, L2-normalised)"),
                                                  ("raw", "(16-d, raw encode_image output)")])
def test_model_card_names_the_clip_embedding_the_model_reads(clip_embedding, said):
    from hub_upload import _model_section

    config = {"clip_model_name": "ViT-B-32", "clip_pretrained": "openai", "prefix_dim": 16, "prefix_length": 4,
              "mapping_type": "mlp", "clip_embedding": clip_embedding, "decoder_config": {"n_layer": 2}}
    assert said in _model_section(config, {}, clip_bundled=False)
