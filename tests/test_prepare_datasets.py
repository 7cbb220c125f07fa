"""prepare_datasets.py on small fixture files written here, with tiny random open_clip models saved as
`local-dir:` folders, so loading goes through open_clip's real code path."""

import json
import os
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from clip_scstclipcap import (
    CaptioningClip, CausalTextTower, ClipMismatchError, check_clip_metadata, check_model_features, clip_metadata,
    model_prefix_features, read_clip_metadata, table_prefix_features,
)
from conftest import TINY_CLIP, make_tiny_clip
from dataprep.common import RunOptions
from dataprep.corpus import split_for_pretraining
from dataprep.neighbors import aggregated_targets, nearest_sentences
from dataprep.world import prepare_shapes
from dataprep.world_clip import ClipTraining
from prepare_datasets import main

DIM = TINY_CLIP["embed_dim"]


@pytest.fixture(scope="module")
def other_clip_name(tmp_path_factory) -> str:
    return make_tiny_clip(tmp_path_factory.mktemp("clip_b"), seed=1)


def write_image(path, seed: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def caption(image_id, text, annotation_id):
    return {"image_id": image_id, "id": annotation_id, "caption": text}


@pytest.fixture
def coco_raw(tmp_path):
    """OSCAR-style COCO: a missing file, a corrupt file, an empty caption, a non-text caption,
    malformed rows, a duplicate annotation id, an image in two splits and a val image without captions."""
    images, annotations = tmp_path / "coco", tmp_path / "coco_caption"
    for number in (1, 2):
        write_image(images / "train2014" / f"COCO_train2014_{number:012d}.jpg", number)
    for number in (3, 10, 11, 20):
        write_image(images / "val2014" / f"COCO_val2014_{number:012d}.jpg", number)
    (images / "val2014" / f"COCO_val2014_{21:012d}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    train = [caption("1", "A cat on a mat.", 1), caption("1", "A cat sitting.", 2), caption("2", "  ", 3),
             caption("2", "A dog.", 4), caption("3", "A bird.", 5), caption("4", "No file for me.", 6),
             caption("20", "Also in test.", 7), "oops", {"caption": "no image id", "id": 8},
             caption("3", "Same id again.", 5)]
    val = [caption("10", f"Ten number {k}.", 100 + k) for k in range(5)]
    val += [caption("11", f"Eleven number {k}.", 110 + k) for k in range(4)] + [caption("11", 123, 115)]
    val += [caption("12", "", 120)]
    test = [caption("20", f"Twenty number {k}.", 200 + k) for k in range(5)]
    test += [caption("21", f"Corrupt number {k}.", 210 + k) for k in range(5)]
    annotations.mkdir()
    for split, entries in (("train", train), ("val", val), ("test", test)):
        (annotations / f"{split}_caption.json").write_text(json.dumps(entries))
    return images, annotations


def run_coco(coco_raw, output, clip_name, *extra):
    images, annotations = coco_raw
    return main(["coco", "--images", str(images), "--annotations", str(annotations), "--output", str(output),
                 "--clip-model", clip_name, "--batch-size", "2", "--num-workers", "0", "--no-progress", *extra])


def load_report(table):
    return json.loads((table.parent / f"{table.name}.report.json").read_text())


def arrow_mtime(table):
    return os.stat(table / "data-00000-of-00001.arrow").st_mtime_ns


def test_coco_tables_schema_metadata_counts_report_and_references(tmp_path, coco_raw, clip_name):
    assert run_coco(coco_raw, tmp_path / "out", clip_name, "--num-workers", "2") == 0
    group = tmp_path / "out" / "coco"
    train, val, test = (datasets.load_from_disk(str(group / split)) for split in ("train", "val", "test"))

    assert train.features["clip_features"] == datasets.List(datasets.Value("float32"), length=DIM)
    assert set(train.column_names) == {"image_id", "file_name", "clip_features", "clip_features_norm", "references"}
    assert train[:]["image_id"] == ["1", "2", "3"]
    assert train[:]["references"] == [[], [], []]
    assert train[2]["file_name"] == os.path.join("val2014", f"COCO_val2014_{3:012d}.jpg")
    assert val[:]["image_id"] == ["10", "11"] and len(val[1]["references"]) == 4
    assert test[:]["image_id"] == ["20"]

    meta = read_clip_metadata(group / "train")
    assert meta == read_clip_metadata(train)
    assert (meta["model_name"], meta["dim"], meta["normalized"]) == (clip_name, DIM, True)
    check_clip_metadata(meta, clip_metadata(clip_name, None, DIM, True), "train")

    clip = CaptioningClip.load(clip_name)
    expected = clip.encode_images([str(coco_raw[0] / name) for name in train[:]["file_name"]])
    np.testing.assert_allclose(np.array(train[:]["clip_features"]), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.array(val[:]["clip_features"]), axis=1), 1.0, atol=1e-5)
    # The norm beside each normalised feature gives encode_image's raw output back (what ClipCap's weights read).
    raw = clip.encode_images([str(coco_raw[0] / name) for name in train[:]["file_name"]], normalize=False)
    restored = np.array(train[:]["clip_features"]) * np.array(train[:]["clip_features_norm"])[:, None]
    np.testing.assert_allclose(restored, raw.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(raw.norm(dim=1).numpy(), 1.0, atol=1e-2)

    assert load_report(group / "train")["skipped_by_reason"] == {
        "duplicate_annotation_id": 1, "duplicate_image_id": 1, "empty": 1, "missing_image_file": 1,
        "unreadable_row": 2}
    assert load_report(group / "val")["skipped_by_reason"] == {"empty": 1, "no_references": 1, "non_text": 1}
    test_report = load_report(group / "test")
    assert test_report["kept"] == 1 and test_report["skipped_by_reason"] == {"corrupt_image": 1}
    corrupt = test_report["skipped_items"]["corrupt_image"][0]
    corrupt_file = os.path.join("val2014", f"COCO_val2014_{21:012d}.jpg")
    # The file named once, then the decoder's own error.
    assert corrupt["item"] == "21" and corrupt["detail"] == (
        f"{corrupt_file}: UnidentifiedImageError: cannot identify image file {str(coco_raw[0] / corrupt_file)!r}")

    references = COCO(str(group / "val_references.json"))
    assert sorted(references.getImgIds()) == ["10", "11"]
    assert [ann["caption"] for ann in references.imgToAnns["11"]] == [f"Eleven number {k}." for k in range(4)]
    results = references.loadRes([{"image_id": "10", "caption": "a thing"}, {"image_id": "11", "caption": "b"}])
    assert sorted(results.getImgIds()) == ["10", "11"]


def test_rerun_reuses_tables_and_overwrite_rebuilds(tmp_path, coco_raw, clip_name, other_clip_name, capsys):
    output = tmp_path / "out"
    assert run_coco(coco_raw, output, clip_name) == 0
    before = arrow_mtime(output / "coco" / "train")
    assert run_coco(coco_raw, output, clip_name) == 0
    assert arrow_mtime(output / "coco" / "train") == before

    capsys.readouterr()
    assert run_coco(coco_raw, output, other_clip_name) == 2
    error = capsys.readouterr().err
    assert "--overwrite" in error and clip_name in error and other_clip_name in error

    assert run_coco(coco_raw, output, other_clip_name, "--overwrite") == 0
    assert arrow_mtime(output / "coco" / "train") != before
    assert read_clip_metadata(output / "coco" / "train")["model_name"] == other_clip_name


def test_train_references_are_kept_on_request(tmp_path, coco_raw, clip_name):
    assert run_coco(coco_raw, tmp_path / "out", clip_name, "--train-references") == 0
    train = datasets.load_from_disk(str(tmp_path / "out" / "coco" / "train"))
    assert train[:]["references"] == [["A cat on a mat.", "A cat sitting."], ["A dog."], ["A bird."]]


def test_nothing_usable_or_unreadable_input_fails_with_the_file_named(tmp_path, coco_raw, clip_name, capsys):
    images, annotations = coco_raw
    (annotations / "test_caption.json").write_text(json.dumps([caption("21", "Only the corrupt one.", 1)]))
    assert run_coco(coco_raw, tmp_path / "out", clip_name) == 2
    error = capsys.readouterr().err
    assert "nothing usable" in error and "test.report.json" in error
    assert load_report(tmp_path / "out" / "coco" / "test")["skipped_by_reason"] == {"corrupt_image": 1}
    assert not (tmp_path / "out" / "coco" / "test").exists()

    (annotations / "val_caption.json").write_text("{not json")
    assert run_coco(coco_raw, tmp_path / "out2", clip_name) == 2
    assert "val_caption.json" in capsys.readouterr().err


def test_flickr30k_from_karpathy_json(tmp_path, clip_name):
    images = tmp_path / "flickr30k-images"
    for number in range(4):
        write_image(images / f"{1000 + number}.jpg", number)

    def image(name, split, *texts):
        return {"filename": name, "split": split, "sentences": [{"raw": text, "tokens": text.split()} for text in texts]}

    karpathy = {"dataset": "flickr30k", "images": [
        image("1000.jpg", "train", "A man."), image("1001.jpg", "restval", "A woman."),
        image("1002.jpg", "val", *[f"Val {k}." for k in range(5)]), image("1003.jpg", "test", "Test one.", ""),
        {"split": "train", "sentences": []}, image("1000.jpg", "test", "Again."),
    ]}
    annotations = tmp_path / "dataset_flickr30k.json"
    annotations.write_text(json.dumps(karpathy))
    assert main(["flickr30k", "--images", str(images), "--annotations", str(annotations), "--output",
                 str(tmp_path / "out"), "--clip-model", clip_name, "--num-workers", "0", "--no-progress"]) == 0
    group = tmp_path / "out" / "flickr30k"
    assert datasets.load_from_disk(str(group / "train"))[:]["image_id"] == ["1000", "1001"]
    test = datasets.load_from_disk(str(group / "test"))
    assert test[:]["references"] == [["Test one."]]
    references = json.loads((group / "test_references.json").read_text())
    assert references["images"] == [{"id": "1003", "file_name": "1003.jpg"}]
    assert references["annotations"] == [{"image_id": "1003", "id": 1, "caption": "Test one."}]
    assert json.loads((group / "annotations.report.json").read_text())["skipped_by_reason"] == {
        "duplicate_image_id": 1, "empty": 1, "unreadable_row": 1}


@pytest.fixture
def own_images(tmp_path):
    """A user's own images, in folders and with names that follow no convention: image id -> path below the root."""
    files = {"7": "val/0007.jpg", "8": "val/sub/eight.png", "9": "holiday/beach.jpg"}
    for number, (image_id, name) in enumerate(files.items()):
        write_image(tmp_path / "mine" / name, number, "PNG" if name.endswith(".png") else "JPEG")
    return tmp_path / "mine", files


def run_coco_on(annotations, images, output, clip_name, *extra):
    return main(["coco", "--images", str(images), "--annotations", str(annotations), "--output", str(output),
                 "--clip-model", clip_name, "--num-workers", "0", "--no-progress", *extra])


@pytest.mark.parametrize("key", ["file_name", "filename", "image", "file_path"])
def test_caption_rows_that_name_their_files_find_every_image(tmp_path, own_images, clip_name, key):
    root, files = own_images
    rows = [{"image_id": int(image_id), "id": number, key: name, "caption": f"Picture {image_id}."}
            for number, (image_id, name) in enumerate(files.items())]
    rows[2][key] = "elsewhere/beach.jpg"  # a stale folder: the file is still found by its name below --images
    (tmp_path / "captions.json").write_text(json.dumps(rows))

    assert run_coco_on(tmp_path / "captions.json", root, tmp_path / "out", clip_name, "--name", "mine") == 0

    test = datasets.load_from_disk(str(tmp_path / "out" / "mine" / "test"))
    assert dict(zip(test[:]["image_id"], test[:]["file_name"])) == files
    assert load_report(tmp_path / "out" / "mine" / "test")["skipped"] == 0


def test_official_coco_captions_format_finds_every_image(tmp_path, own_images, clip_name):
    root, files = own_images
    official = {"info": {}, "licenses": [], "images": [{"id": int(i), "file_name": name} for i, name in files.items()],
                "annotations": [{"image_id": int(i), "id": n, "caption": f"Picture {i}."}
                                for n, i in enumerate(files)]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(official))

    assert run_coco_on(tmp_path / "captions_val2014.json", root, tmp_path / "out", clip_name, "--split", "val") == 0

    val = datasets.load_from_disk(str(tmp_path / "out" / "coco" / "val"))
    assert dict(zip(val[:]["image_id"], val[:]["file_name"])) == files
    assert val[:]["references"] == [[f"Picture {i}."] for i in files]
    assert not (tmp_path / "out" / "coco" / "test").exists()


def test_karpathy_coco_split_json_finds_every_image(tmp_path, clip_name):
    images = tmp_path / "coco"
    entries = []
    for number, (cocoid, split, folder) in enumerate(((9, "train", "train2014"), (15, "restval", "val2014"),
                                                      (42, "val", "val2014"), (77, "test", "val2014"))):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_image(images / folder / name, number)
        entries.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split,
                        "sentences": [{"raw": f"Image {cocoid} number {k}.", "tokens": []} for k in range(2)]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))

    assert run_coco_on(tmp_path / "dataset_coco.json", images, tmp_path / "out", clip_name) == 0

    group = tmp_path / "out" / "coco"
    found = {split: datasets.load_from_disk(str(group / split))[:]["image_id"] for split in ("train", "val", "test")}
    assert found == {"train": ["9", "15"], "val": ["42"], "test": ["77"]}
    references = json.loads((group / "test_references.json").read_text())
    assert references["images"] == [{"id": "77", "file_name": os.path.join("val2014", "COCO_val2014_000000000077.jpg")}]


def test_images_found_nowhere_name_the_lookups_and_an_example_path(tmp_path, own_images, clip_name, capsys):
    root, files = own_images
    rows = [{"image_id": image_id, "id": n, "file_name": f"gone/{image_id}.jpg", "caption": "A picture."}
            for n, image_id in enumerate(files)]
    (tmp_path / "captions.json").write_text(json.dumps(rows))

    assert run_coco_on(tmp_path / "captions.json", root, tmp_path / "out", clip_name) == 2

    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "no image file found for any of the 3 images" in error
    assert str(root / "gone" / "7.jpg") in error and "COCO_val2014_000000000007.*" in error
    assert "--images" in error


def test_model_features_from_tables_as_the_model_reads_them(tmp_path, coco_raw, clip_name, make_config):
    assert run_coco(coco_raw, tmp_path / "out", clip_name) == 0
    table_path = tmp_path / "out" / "coco" / "train"
    train = datasets.load_from_disk(str(table_path))
    clip = CaptioningClip.load(clip_name)
    paths = [str(coco_raw[0] / name) for name in train[:]["file_name"]]
    raw = clip.encode_images(paths, normalize=False)
    normalised = clip.encode_images(paths)

    ours = make_config(prefix_dim=DIM)
    clipcap = make_config(prefix_dim=DIM, clip_embedding="raw")
    self_normalising = make_config(prefix_dim=DIM, clip_embedding="raw", normalize_prefix=True)
    torch.testing.assert_close(table_prefix_features(train, ours), normalised, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table_prefix_features(train, clipcap), raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table_prefix_features(train, self_normalising), normalised, atol=1e-5, rtol=1e-5)
    raw_rows = model_prefix_features(raw, ours, normalized=False)
    torch.testing.assert_close(raw_rows, normalised, atol=1e-5, rtol=1e-5)

    # A table made before norms were recorded feeds our models, and refuses ClipCap's with what to do.
    old = train.remove_columns("clip_features_norm")
    check_model_features(old, ours, "old table")
    with pytest.raises(ClipMismatchError, match=r"old table stores L2-normalised .* prepare_datasets\.py --overwrite"):
        check_model_features(old, clipcap, "old table")
    with pytest.raises(ClipMismatchError, match=rf"train table {table_path} holds {DIM}-d features .* reads 32-d"):
        check_model_features(table_path, make_config(prefix_dim=32), "train table")
    check_model_features(table_path, clipcap, "train table")


def run_corpus(tmp_path, clip_name, source, path, *extra, output="out"):
    return main(["corpus", "--source", source, "--input", str(path), "--output", str(tmp_path / output),
                 "--clip-model", clip_name, "--batch-size", "3", "--num-workers", "0", "--no-progress", *extra])


def test_shutterstock_corpus_cleaning_features_and_report(tmp_path, clip_name):
    dump = tmp_path / "sentences.txt"
    dump.write_text("  a man   riding a horse .\n\nA man riding a horse\nDogs\n" + "word " * 50
                    + "\ntwo cats on a sofa\n")
    assert run_corpus(tmp_path, clip_name, "shutterstock", dump) == 0
    table = tmp_path / "out" / "corpus" / "shutterstock"
    corpus = datasets.load_from_disk(str(table))
    assert corpus[:]["text"] == ["A man riding a horse.", "Dogs", "Two cats on a sofa"]
    assert set(corpus[:]["source"]) == {"shutterstock"}
    assert corpus.features["clip_features"] == datasets.List(datasets.Value("float32"), length=DIM)
    assert read_clip_metadata(table)["model_name"] == clip_name
    clip = CaptioningClip.load(clip_name)
    np.testing.assert_allclose(np.array(corpus[:]["clip_features"]), clip.encode_text(corpus[:]["text"]).numpy(),
                               atol=1e-5)
    raw = clip.encode_text(corpus[:]["text"], normalize=False)
    np.testing.assert_allclose(corpus[:]["clip_features_norm"], raw.norm(dim=1).numpy(), rtol=1e-5)
    report = load_report(table)
    assert report["skipped_by_reason"] == {"duplicate_sentence": 1, "empty": 1, "too_long": 1}
    assert report["skipped_items"]["duplicate_sentence"][0]["item"] == "sentences.txt:3"


# Batches of two: the longest sentence of each sets its width; the last one fills the tiny CLIP's 24 positions.
SENTENCES_BY_TWO = ["a red circle", "a big blue square above a small green triangle", "two shapes.", "a dog",
                    "word " * 30]


def test_text_features_run_on_the_sentences_positions_with_the_whole_contexts_features(clip_name):
    """`CaptioningClip.encode_text` / `iter_text_features` (the corpus's features) run the causal text tower on the
    positions up to each batch's longest sentence's end token, and give open_clip's encode_text features on the whole
    context: tables made before stay compatible."""
    clip = CaptioningClip.load(clip_name)
    model, tokenizer = clip.model, clip.tokenizer
    widths = []
    model.transformer.register_forward_hook(lambda _, inputs, __: widths.append(inputs[0].shape[1]))
    tokens = tokenizer(SENTENCES_BY_TWO)
    context = tokens.shape[1]
    with torch.no_grad():
        full = model.encode_text(tokens).float()
    assert widths == [context]
    needed = [int((tokens[start:start + 2] != 0).sum(dim=1).max()) for start in range(0, len(tokens), 2)]
    assert needed[0] < context and needed[1] < needed[0] and needed[2] == context  # 30 words: cut at the context

    widths.clear()
    raw = clip.encode_text(SENTENCES_BY_TWO, batch_size=2, normalize=False)
    assert widths == needed
    torch.testing.assert_close(raw, full, atol=1e-5, rtol=1e-5)
    batches = list(clip.iter_text_features(SENTENCES_BY_TWO, batch_size=2))
    assert [index for batch in batches for index in batch.indices] == list(range(len(SENTENCES_BY_TWO)))
    torch.testing.assert_close(torch.cat([batch.features for batch in batches]),
                               torch.nn.functional.normalize(full, dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([batch.norms for batch in batches]), full.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_corpus_table_features_equal_the_whole_contexts_on_fewer_positions(tmp_path, clip_name, monkeypatch):
    """`prepare_datasets.py corpus` encodes through the same cut tower: its table equals full-context features."""
    widths = []
    encode = CausalTextTower.encode

    def spy(tower, tokens):
        widths.append(tower.positions(tokens))
        return encode(tower, tokens)

    monkeypatch.setattr(CausalTextTower, "encode", spy)
    dump = tmp_path / "sentences.txt"
    dump.write_text("\n".join(SENTENCES_BY_TWO[:4]) + "\n")
    assert run_corpus(tmp_path, clip_name, "text", dump, "--batch-size", "2") == 0
    corpus = datasets.load_from_disk(str(tmp_path / "out" / "corpus" / "sentences"))
    clip = CaptioningClip.load(clip_name)
    tokens = clip.tokenizer(corpus[:]["text"])
    with torch.no_grad():
        full = clip.model.encode_text(tokens).float()
    assert widths and max(widths) < tokens.shape[1]
    np.testing.assert_allclose(np.array(corpus[:]["clip_features"]),
                               torch.nn.functional.normalize(full, dim=-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(corpus[:]["clip_features_norm"], full.norm(dim=-1).numpy(), rtol=1e-5)


def test_uic_sentence_pickle(tmp_path, clip_name):
    dump = tmp_path / "sentences.pkl"
    dump.write_bytes(pickle.dumps([["<S>", "a", "dog", "runs", ".", "</S>"], ["<S>", "a", "cat", "</S>"], 7]))
    assert run_corpus(tmp_path, clip_name, "shutterstock", dump) == 0
    corpus = datasets.load_from_disk(str(tmp_path / "out" / "corpus" / "shutterstock"))
    assert corpus[:]["text"] == ["A dog runs.", "A cat"]
    assert load_report(tmp_path / "out" / "corpus" / "shutterstock")["skipped_by_reason"] == {"non_text": 1}


def test_gcc_tsv_with_short_sentence_filter_and_malformed_rows(tmp_path, clip_name):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a photo of a cat on a mat\thttp://a\nshort one\thttp://b\nno tab in this row\n"
                   "\thttp://c\nactor attends the premiere of the film\thttp://d\n")
    assert run_corpus(tmp_path, clip_name, "gcc", tsv) == 0
    corpus = datasets.load_from_disk(str(tmp_path / "out" / "corpus" / "gcc"))
    assert corpus[:]["text"] == ["A photo of a cat on a mat", "Actor attends the premiere of the film"]
    assert load_report(tmp_path / "out" / "corpus" / "gcc")["skipped_by_reason"] == {
        "empty": 1, "too_short": 1, "unreadable_row": 1}
    assert run_corpus(tmp_path, clip_name, "gcc", tsv, "--min-words", "1", "--name", "gcc_all") == 0
    assert len(datasets.load_from_disk(str(tmp_path / "out" / "corpus" / "gcc_all"))) == 3


def test_training_captions_as_corpus(tmp_path, coco_raw, clip_name):
    assert run_corpus(tmp_path, clip_name, "coco", coco_raw[1] / "train_caption.json") == 0
    coco = datasets.load_from_disk(str(tmp_path / "out" / "corpus" / "coco"))
    assert "A cat on a mat." in coco[:]["text"] and "Same id again." in coco[:]["text"]
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "one"}]},
        {"filename": "2.jpg", "split": "restval", "sentences": [{"tokens": ["two", "dogs"]}]},
        {"filename": "3.jpg", "split": "test", "sentences": [{"raw": "held out"}]}]}))
    assert run_corpus(tmp_path, clip_name, "flickr30k", karpathy) == 0
    flickr = datasets.load_from_disk(str(tmp_path / "out" / "corpus" / "flickr30k"))
    assert flickr[:]["text"] == ["One", "Two dogs"]


def test_pretrain_split_is_seeded_and_partitions_the_corpus(tmp_path, clip_name):
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(f"sentence number {k}" for k in range(20)))
    assert run_corpus(tmp_path, clip_name, "text", text, "--pretrain-split", "0.25", "--seed", "3") == 0
    table = tmp_path / "out" / "corpus" / "lines"

    def parts():
        return [datasets.load_from_disk(str(table.with_name(f"lines_{part}")))[:]["text"] for part in ("init", "real")]

    init, real = parts()
    assert len(init) == 5 and len(real) == 15
    assert sorted(init + real) == sorted(datasets.load_from_disk(str(table))[:]["text"])
    assert read_clip_metadata(table.with_name("lines_init"))["model_name"] == clip_name
    split_for_pretraining(table, 0.25, seed=3)
    assert parts() == [init, real]
    split_for_pretraining(table, 0.25, seed=4)
    assert parts()[0] != init


@pytest.fixture(scope="module")
def images_and_corpus(tmp_path_factory, clip_name):
    """An images table and a corpus table of the same CLIP, shared: tests write their outputs elsewhere."""
    root = tmp_path_factory.mktemp("images_and_corpus")
    for number in range(6):
        write_image(root / "images" / f"img{number}.png", number, fmt="PNG")
    (root / "annotations").mkdir()
    for remainder, split in enumerate(("train", "val", "test")):
        entries = [caption(f"img{number}", "A picture.", number) for number in range(6) if number % 3 == remainder]
        (root / "annotations" / f"{split}_caption.json").write_text(json.dumps(entries))
    text = root / "corpus.txt"
    text.write_text("\n".join(f"a {colour} {shape}" for colour in ("red", "blue", "green", "gray")
                              for shape in ("circle", "square", "cat")))
    assert main(["coco", "--images", str(root / "images"), "--annotations", str(root / "annotations"), "--output",
                 str(root / "out"), "--clip-model", clip_name, "--num-workers", "0", "--no-progress"]) == 0
    assert run_corpus(root, clip_name, "text", text) == 0
    return root / "out" / "coco" / "train", root / "out" / "corpus" / "corpus"


def table_matrix(dataset, column="clip_features"):
    return torch.tensor(np.array(dataset[:][column]), dtype=torch.float64)


def test_aggregate_equals_a_direct_computation(tmp_path, images_and_corpus):
    images_path, corpus_path = images_and_corpus
    output = tmp_path / "agg"
    assert main(["aggregate", "--images", str(images_path), "--corpus", str(corpus_path), "--temperature", "7",
                 "--output", str(output), "--no-progress", "--device", "cpu"]) == 0
    aggregated = datasets.load_from_disk(str(output))
    images, corpus = datasets.load_from_disk(str(images_path)), datasets.load_from_disk(str(corpus_path))
    assert aggregated[:]["image_id"] == images[:]["image_id"] == ["img0", "img3"]
    image_features, corpus_features = table_matrix(images), table_matrix(corpus)
    weights = torch.softmax(7 * image_features @ corpus_features.T, dim=1)
    direct = torch.nn.functional.normalize(weights @ corpus_features, dim=1)
    np.testing.assert_allclose(table_matrix(aggregated, "agg_text_features").numpy(), direct.numpy(), atol=1e-5)
    assert json.loads(aggregated.info.description)["aggregation"]["temperature"] == 7.0
    assert aggregated[:]["clip_features_norm"] == images[:]["clip_features_norm"]


def test_online_softmax_over_chunks_matches_one_softmax():
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=1)
    corpus = torch.nn.functional.normalize(torch.randn(23, 8, generator=generator), dim=1)
    direct = torch.nn.functional.normalize(torch.softmax(175 * images.double() @ corpus.double().T, 1)
                                           @ corpus.double(), dim=1)
    chunked = aggregated_targets(images, corpus, 175.0, corpus_chunk=4)
    np.testing.assert_allclose(chunked.numpy(), direct.numpy(), atol=1e-5)
    index, similarity = nearest_sentences(images, corpus, corpus_chunk=4)
    assert index.tolist() == (images @ corpus.T).argmax(1).tolist()
    np.testing.assert_allclose(similarity.numpy(), (images @ corpus.T).max(1).values.numpy(), atol=1e-6)


def test_default_temperature_and_output_path(images_and_corpus, clip_name):
    images_path, corpus_path = images_and_corpus
    assert main(["aggregate", "--images", str(images_path), "--corpus", str(corpus_path), "--no-progress"]) == 0
    aggregation = json.loads(datasets.load_from_disk(str(images_path.with_name("train_agg_corpus"))).info.description)
    scale = float(CaptioningClip.load(clip_name).model.logit_scale.exp())
    assert aggregation["aggregation"]["temperature"] == pytest.approx(scale)


def test_pseudo_pairs_pick_the_nearest_sentence(tmp_path, images_and_corpus):
    images_path, corpus_path = images_and_corpus
    assert main(["pseudo-pairs", "--images", str(images_path), "--corpus", str(corpus_path), "--output",
                 str(tmp_path / "pairs"), "--no-progress"]) == 0
    pairs = datasets.load_from_disk(str(tmp_path / "pairs"))
    assert set(pairs.column_names) == {"image_id", "clip_features", "clip_features_norm", "text", "text_features",
                                       "similarity"}
    images = datasets.load_from_disk(str(images_path))
    assert pairs[:]["clip_features_norm"] == images[:]["clip_features_norm"]
    corpus = datasets.load_from_disk(str(corpus_path))
    similarity = table_matrix(pairs) @ table_matrix(corpus).T
    assert pairs[:]["text"] == [corpus[int(i)]["text"] for i in similarity.argmax(1)]
    np.testing.assert_allclose(pairs[:]["similarity"], similarity.max(1).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(pairs[0]["text_features"]),
                               np.array(corpus[int(similarity[0].argmax())]["clip_features"]), atol=1e-6)


def test_tables_of_different_clips_are_refused_before_any_work(tmp_path, images_and_corpus, other_clip_name,
                                                               clip_name, capsys):
    images_path, _ = images_and_corpus
    text = tmp_path / "other.txt"
    text.write_text("a red circle\na blue square\n")
    assert run_corpus(tmp_path, other_clip_name, "text", text) == 0
    other_corpus = tmp_path / "out" / "corpus" / "other"
    capsys.readouterr()
    for command, extra in (("aggregate", ["--temperature", "10"]), ("pseudo-pairs", [])):
        assert main([command, "--images", str(images_path), "--corpus", str(other_corpus), "--no-progress",
                     *extra]) == 2
        error = capsys.readouterr().err
        assert clip_name in error and other_clip_name in error and str(other_corpus) in error
    assert not images_path.with_name("train_agg_other").exists()
    assert not images_path.with_name("train_pseudo_pairs_other").exists()


def test_check_clip_metadata_compares_dim_and_normalisation(clip_name):
    found = clip_metadata(clip_name, None, DIM, True)
    check_clip_metadata(found, clip_metadata(clip_name, None, None, None), "table")
    with pytest.raises(ClipMismatchError, match="dim 16 != 32"):
        check_clip_metadata(found, clip_metadata(clip_name, None, 32, True), "table")
    with pytest.raises(ClipMismatchError, match="ViT-B-32"):
        check_clip_metadata(found, clip_metadata("ViT-B-32", "openai", DIM, True), "table")


def test_shapes_world_tables_are_deterministic(tmp_path):
    sizes = dict(n_clip_pretrain=16, n_train=12, n_val=3, n_test=3, n_in_domain=20, n_cross_domain=20,
                 clip_training=ClipTraining(steps=1, batch_size=16, tagging_steps=1))
    options = RunOptions(batch_size=8, num_workers=0, device="cpu", progress=False)
    manifests = [prepare_shapes(tmp_path / run, seed=5, options=options, log=lambda line: None, **sizes)
                 for run in ("one", "two")]
    for key in ("train", "test", "corpus_in_domain_init", "corpus_cross_domain_real", "train_agg_in_domain",
                "train_pseudo_pairs_cross_domain"):
        first, second = (datasets.load_from_disk(manifest[key]) for manifest in manifests)
        assert len(first) > 0
        assert first.to_dict() == second.to_dict(), key
    train = datasets.load_from_disk(manifests[0]["train"])
    assert all(train[:]["references"]), "the shapes world keeps the train references (supervised bound)"
    assert read_clip_metadata(train)["model_name"] == manifests[0]["clip_model"]
    test_references = json.loads(open(manifests[0]["test_references"]).read())
    assert len(test_references["annotations"]) == 5 * len(test_references["images"])
