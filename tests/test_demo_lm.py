"""The LM setting (trakjax.text_lm) and `trakjax demo --task lm`, end to end at tiny sizes."""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import scipy.stats

from trakjax import cli, demo_lm, text_lm

TINY = ["--checkpoints", "1", "--proj-dim", "32", "--train-size", "48", "--targets", "4",
        "--width", "16", "--sequence-length", "16", "--steps", "5", "--minibatch", "8",
        "--lds-subsets", "5", "--batch-size", "16", "--top-k", "3"]


def test_corpus_list_hash_is_pinned_and_content_hash_is_the_files():
    # The list is fixed in the package: its hash must not change silently.
    assert text_lm.list_hash(text_lm.CORPUS_FILES) == hashlib.sha256(
        "\n".join(text_lm.CORPUS_FILES).encode()).hexdigest()
    assert text_lm.list_hash(text_lm.CORPUS_FILES) == (
        "12cd2572877f5881176c83fccb75126b339e9c49343bf1b31a4ddfdbc3d0c126")
    corpus = text_lm.load_corpus(64)
    again = text_lm.load_corpus(64)
    np.testing.assert_array_equal(corpus.ids, again.ids)
    assert corpus.content_hash == again.content_hash
    # The content hash, recomputed independently from the files on disk.
    digest = hashlib.sha256()
    root = text_lm.stdlib_directory()
    for name in text_lm.CORPUS_FILES:
        data = (root / name).read_bytes()
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    assert corpus.content_hash == digest.hexdigest()
    # Windows round-trip: row r decodes to its file's bytes at its offset.
    for row in (0, 500, corpus.ids.shape[0] - 1):
        name = corpus.files[corpus.file_index[row]]
        data = (root / name).read_bytes()[corpus.offset[row] : corpus.offset[row] + 64]
        assert text_lm.decode(corpus.ids[row]) == data.decode("utf-8", errors="replace")
        assert bytes(corpus.ids[row].astype(np.uint8).tolist()) == data


def test_corpus_hash_changes_with_one_byte(tmp_path):
    files = ("bisect.py", "colorsys.py")
    for name in files:
        shutil.copy(text_lm.stdlib_directory() / name, tmp_path / name)
    before = text_lm.load_corpus(32, files, tmp_path)
    data = bytearray((tmp_path / "bisect.py").read_bytes())
    data[100] ^= 1
    (tmp_path / "bisect.py").write_bytes(bytes(data))
    after = text_lm.load_corpus(32, files, tmp_path)
    assert after.list_hash == before.list_hash and after.content_hash != before.content_hash
    train, targets = text_lm.split_corpus(before, 20, 5, seed=3)
    assert not set(train.index.tolist()) & set(targets.index.tolist())
    np.testing.assert_array_equal(train.ids, before.ids[train.index])


def test_lm_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "lm"
    assert cli.main(["demo", "--task", "lm", "--out", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    for bar in ("train", "featurize", "score", "LDS retrain"):
        assert bar in captured.err, f"no {bar!r} progress bar"
    assert "LDS" in captured.out and "CI" in captured.out and "held-out loss" in captured.out

    record = json.loads((out / "run.json").read_text())
    assert record["decoder"] == "bytes" and record["complete"] is True
    assert not (out / "attributions.png").exists()  # windows of 16 bytes are not 4×4 images
    summary = json.loads((out / "summary.json").read_text())
    corpus = text_lm.load_corpus(16)
    assert summary["corpus"]["content_hash"] == corpus.content_hash
    assert summary["corpus"]["list_hash"] == text_lm.list_hash(text_lm.CORPUS_FILES)

    scores = np.load(out / "store" / "experiments" / demo_lm.EXPERIMENT / "scores.npy")
    assert scores.shape == (48, 4) and np.isfinite(scores).all()
    train, targets = text_lm.split_corpus(corpus, 48, 4, seed=0)
    np.testing.assert_array_equal(np.load(out / "data" / "train_inputs.npy"), train.ids)

    # The LDS equals scipy's Spearman correlation of the same retrained outputs.
    settings = demo_lm.LMDemoSettings(train_size=48, num_targets=4, lds_subsets=5, steps=5,
                                      minibatch=8, width=16, sequence_length=16)
    masks = demo_lm.lds_masks(settings)
    outputs = np.concatenate([
        text_lm.retrain_outputs(demo_lm.lm_config(settings), train.ids, targets.ids,
                                masks[s : s + demo_lm.LDS_CHUNK], steps=5, seed=10_000 + s,
                                batch_size=8, learning_rate=settings.learning_rate,
                                chunk_size=demo_lm.LDS_CHUNK)
        for s in range(0, 5, demo_lm.LDS_CHUNK)])
    predicted = masks.astype(np.float64) @ scores.astype(np.float64)
    expected = np.mean([scipy.stats.spearmanr(predicted[:, j], outputs[:, j])[0] for j in range(4)])
    assert summary["lds"]["mean"] == pytest.approx(expected, abs=1e-9)
    assert summary["lds"]["ci_low"] <= summary["lds"]["mean"] <= summary["lds"]["ci_high"]

    # The top-k table agrees with the scores, and the explorer holds the decoded windows.
    table = json.loads((out / "topk.json").read_text())
    for entry in table["targets"]:
        j = entry["target"]
        assert [e["train_index"] for e in entry["proponents"]] == list(
            np.argsort(-scores[:, j], kind="stable")[:3])
    page = (out / "index.html").read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="trakjax-data">(.*?)</script>', page, re.S)
    data = json.loads(found.group(1))
    assert data["kind"] == "tokens" and data["decoded"] is True
    assert data["content"]["target"]["0"]["text"] == text_lm.decode(targets.ids[0])
    first = table["targets"][0]["proponents"][0]["train_index"]
    assert data["content"]["train"][str(first)]["text"] == text_lm.decode(train.ids[first])

    # show: redraws the table and the explorer (decoded text, the demo's summary) from the store.
    before = (out / "topk.csv").read_text()
    (out / "topk.csv").unlink()
    (out / "index.html").unlink()
    assert cli.main(["show", str(out), "--quiet"]) == 0
    assert (out / "topk.csv").read_text() == before
    assert (out / "index.html").read_text(encoding="utf-8") == page
    assert not (out / "attributions.png").exists()


def test_lm_demo_rejects_flags_of_the_other_task(tmp_path, capsys):
    assert cli.main(["demo", "--task", "lm", "--out", str(tmp_path / "x"), "--hidden", "8"]) == 2
    assert "--hidden" in capsys.readouterr().err
