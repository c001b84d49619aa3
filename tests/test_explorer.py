"""The HTML explorer (trakjax.explorer): its pure parts against closed forms, the files it writes,
and the page itself in a real browser (headless Chromium, opened from disk).

The browser tests skip, saying why, only where Chromium is not installed or is a snap stub
(``.ci/run`` installs Debian's ``chromium``). Set ``TRAKJAX_EXPLORER_SCREENSHOT=PATH`` to keep the
screenshot the test takes (docs/explorer.png is one).
"""

import base64
import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from trakjax import explorer, report
from trakjax.errors import StoreError
from trakjax.scores import top_k

# --------------------------------------------------------------------------- pure parts


def test_embedded_json_holds_no_less_than_sign_and_reads_back():
    content = {"text": "</script><!-- <b>&amp;</b>", "nested": ["<", 1.5]}
    embedded = explorer.embed_json(content)
    assert "<" not in embedded
    assert json.loads(embedded) == content


def test_byte_decoder_replaces_invalid_utf8_and_marks_ids_out_of_range():
    ids = np.array([*b"ok ", 0xFF, *"é".encode(), 300, -1, *b"</script>"])
    assert explorer.decode_tokens(ids, "bytes") == "ok \ufffdé⟨300⟩⟨-1⟩</script>"


def test_text_is_cut_to_share_the_budget():
    assert explorer.text_limit(10) == explorer.MAX_TEXT_CHARACTERS
    assert explorer.text_limit(explorer.TEXT_BUDGET_CHARACTERS // 500) == 500
    assert explorer.text_limit(10**9) == explorer.MIN_TEXT_CHARACTERS
    row = np.frombuffer(b"abcdefgh", np.uint8)[None].astype(np.int32)
    assert explorer.example_content(row, 0, "tokens", "bytes", 3) == {"text": "abc", "cut": True}


def test_vocabulary_files_list_object_and_lines(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["a", "<b>", "c"]))
    (tmp_path / "object.json").write_text(json.dumps({"a": 0, "c": 2, "<b>": 1}))
    (tmp_path / "lines.txt").write_text("a\n<b>\nc\n")
    for name in ("list.json", "object.json", "lines.txt"):
        vocabulary = explorer.load_vocabulary(tmp_path / name)
        assert vocabulary == ["a", "<b>", "c"], name
        assert explorer.decode_tokens(np.array([2, 1, 0, 3]), vocabulary) == "c<b>a⟨3⟩"


@pytest.mark.parametrize("num_images, shape, budget, expected", [
    (100, (32, 32, 3), 100 * 32 * 32 * 3, (1, 100)),         # fits as it is
    (100, (32, 32, 3), 100 * 16 * 16 * 3, (2, 100)),         # every 2nd row and column
    (100, (32, 32, 3), 100 * 11 * 11 * 3, (3, 100)),         # ceil(32/3) = 11
    (100, (32, 32, 3), 10 * 8 * 8 * 3, (4, 10)),             # at 8×8, only 10 fit
    (5, (4, 4), 0, (1, 0)),                                   # no room at all
])
def test_thumbnail_layout_fits_the_budget(num_images, shape, budget, expected):
    assert explorer.thumbnail_layout(num_images, shape, budget) == expected


def test_packed_thumbnails_are_the_scaled_subsampled_pixels():
    rng = np.random.default_rng(0)
    targets = rng.uniform(-1.0, 3.0, size=(4, 20, 20)).astype(np.float32)
    train = rng.uniform(0.0, 1.0, size=(9, 20, 20)).astype(np.float32)
    train_order = np.array([7, 2, 5])
    step = 2  # budget for (4 + 3) images of 10×10
    layout, chunks = explorer.pack_thumbnails(
        [(targets, np.arange(4)), (train, train_order)], budget_bytes=7 * 100, chunk_bytes=300)
    assert (layout["height"], layout["width"], layout["channels"], layout["step"]) == (10, 10, 1, step)
    assert layout["per_chunk"] == 3 and len(chunks) == 3  # 7 images, 3 per chunk
    assert layout["slots"] == [[0, 1, 2, 3], [4, 5, 6]]
    raw = np.frombuffer(b"".join(data for _, data in chunks), np.uint8).reshape(7, 10, 10)
    for images, picked, slots in ((targets, np.arange(4), layout["slots"][0]),
                                  (train, train_order, layout["slots"][1])):
        chosen = images[picked].astype(np.float64)
        low, high = chosen.min(), chosen.max()
        expected = np.round((chosen - low) * 255.0 / (high - low))[:, ::step, ::step]
        np.testing.assert_array_equal(raw[slots], expected.astype(np.uint8))
    name, data = chunks[0]
    assert name == f"pixels-{explorer._hash(data)}.js"
    script = explorer.pixel_script(name, data)
    assert base64.b64decode(re.search(r',"([^"]*)"\)', script).group(1)) == data


@pytest.mark.parametrize("kind, train, target, expected", [
    ("auto", np.zeros((4, 8, 8)), np.zeros((2, 8, 8)), "image"),
    ("auto", np.zeros((4, 8, 8)), np.zeros((2, 6, 6)), "none"),           # shapes differ
    ("auto", np.zeros((4, 64), np.int32), np.zeros((2, 64), np.int32), "tokens"),
    ("image", np.zeros((4, 64), np.int32), np.zeros((2, 64), np.int32), "image"),
    ("image", np.zeros((4, 5)), np.zeros((2, 5)), "table"),              # not drawable: as found
    ("image", np.zeros((4, 2, 2, 2, 2)), np.zeros((2, 2, 2, 2, 2)), "none"),
    ("tokens", {"mask": np.zeros((4, 3))}, {"mask": np.zeros((2, 3))}, "none"),
    ("tokens", {"input_ids": np.zeros((4, 3), np.int32)}, {"input_ids": np.zeros((2, 3), np.int32)}, "tokens"),
    ("auto", None, None, "none"),
])
def test_input_kind_follows_the_request_where_the_inputs_fit_it(kind, train, target, expected):
    assert explorer.resolve_kind(kind, train, target) == expected


def test_non_finite_labels_and_scores_reach_the_page_as_text(tmp_path):
    records = [{"target": 0, "label": float("nan"), "proponents": [
        {"rank": 1, "train_index": 3, "label": [1.0, float("inf")], "score": float("nan")}], "opponents": []}]
    data = _page_data(explorer.write_explorer(tmp_path, records)[-1])
    assert data["targets"][0]["y"] == "nan" and data["targets"][0]["ps"] == ["nan"]
    assert data["train_labels"] == {"3": [1.0, "inf"]}


def _records(num_train=30, num_targets=6, k=4, seed=0):
    scores = np.random.default_rng(seed).normal(size=(num_train, num_targets)).astype(np.float32)
    labels = np.arange(num_train) % 3
    return report.top_k_records(top_k(iter([(0, scores)]), k), train_labels=labels,
                                target_labels=np.arange(num_targets) % 3)


def _page_data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="trakjax-data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


def test_written_files_are_content_named_index_last_and_stale_assets_go(tmp_path):
    records = _records()
    rng = np.random.default_rng(1)
    train, targets = rng.uniform(size=(30, 6, 6)), rng.uniform(size=(6, 6, 6))
    files = explorer.write_explorer(tmp_path, records, train_inputs=train, target_inputs=targets,
                                    summary={"lds": {"mean": 0.5}, "seconds": {"score": 1.25}})
    assert files[-1] == tmp_path / explorer.PAGE_FILE
    relative = [str(f.relative_to(tmp_path)) for f in files]
    assert all(any(Path(r).match(p) for p in explorer.OWNED_PATTERNS) for r in relative), relative
    on_disk = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == sorted(relative)  # nothing else, no temporary files left
    data = _page_data(files[-1])
    assert data["kind"] == "image" and data["summary"] == [["lds.mean", "0.5"], ["seconds.score", "1.25"]]
    for entry, record in zip(data["targets"], records, strict=True):
        assert entry["p"] == [e["train_index"] for e in record["proponents"]]
        assert entry["o"] == [e["train_index"] for e in record["opponents"]]
        np.testing.assert_allclose(entry["ps"], [e["score"] for e in record["proponents"]], rtol=1e-5)
    assert data["images"]["train"] == explorer.referenced_train(records).tolist()
    # Other images: new pixel files, the old ones removed; app and style stay.
    again = explorer.write_explorer(tmp_path, records, train_inputs=train + 1.5, target_inputs=targets * 2)
    assert [f.name for f in again[:2]] == [f.name for f in files[:2]]
    assert set(p.name for p in (tmp_path / explorer.ASSET_DIR).iterdir()) == {f.name for f in again[:-1]}


def test_token_page_decodes_bytes_and_undrawable_inputs_still_get_a_page(tmp_path):
    records = _records(num_train=5, num_targets=2, k=2)
    tokens = np.array([list(f"<{i}/>".encode()) + [0xFF] for i in range(5)], np.int32)
    explorer.write_explorer(tmp_path / "text", records, train_inputs=tokens, target_inputs=tokens[:2],
                            decoder="bytes")
    data = _page_data(tmp_path / "text" / explorer.PAGE_FILE)
    assert data["kind"] == "tokens" and data["content"]["train"]["3"] == {"text": "<3/>\ufffd", "cut": False}
    explorer.write_explorer(tmp_path / "ids", records, train_inputs=tokens, target_inputs=tokens[:2])
    ids = _page_data(tmp_path / "ids" / explorer.PAGE_FILE)["content"]["target"]["1"]
    assert ids == {"ids": tokens[1].tolist(), "length": 5}
    five_d = np.zeros((5, 2, 2, 2, 2))
    files = explorer.write_explorer(tmp_path / "none", records, train_inputs=five_d, target_inputs=five_d[:2])
    data = _page_data(files[-1])
    assert data["kind"] == "none" and data["images"] is None and len(data["targets"]) == 2
    assert not list((tmp_path / "none" / explorer.ASSET_DIR).glob("pixels-*"))


def test_toml_decoder_is_bytes_or_an_existing_vocabulary_file(tmp_path):
    import sys

    from trakjax import run_config
    from trakjax.errors import ConfigError

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from _cli_project import write_config
    finally:
        sys.path.pop(0)
    project = tmp_path / "project"
    for name in ("ckpt/0", "ckpt/1"):
        (project / name).mkdir(parents=True)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        np.save(project / f"{name}.npy", np.zeros(2))
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    assert run_config.parse(write_config(tmp_path, project)).decoder is None
    assert run_config.parse(write_config(tmp_path, project, decoder='"bytes"')).decoder == "bytes"
    parsed = run_config.parse(write_config(tmp_path, project, decoder='"vocab.txt"'))
    assert parsed.decoder == tmp_path / "vocab.txt"
    with pytest.raises(ConfigError, match="decoder names a vocabulary file that does not exist"):
        run_config.parse(write_config(tmp_path, project, decoder='"nowhere.txt"'))


def test_show_on_an_unfinished_run_says_what_is_missing(tmp_path):
    report.write_run_record(tmp_path, {"kind": "demo", "complete": False})
    with pytest.raises(StoreError, match=r"did not finish .*store .* does not exist yet"):
        report.show(tmp_path)


# --------------------------------------------------------------------------- in a browser

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--hide-scrollbars", "--window-size=1280,900")


def chromium() -> str:
    """The Chromium binary, or a skip saying why there is none."""
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if found is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium package)")
    real = os.path.realpath(found)
    stub = real.startswith("/snap/") or (os.path.getsize(real) < 65536 and b"snap" in Path(real).read_bytes())
    if stub:
        pytest.skip(f"{found} is a snap stub, which does not run here")
    return found


def run_chromium(*args: str, timeout: float = 60.0) -> str:
    """Run headless Chromium with a fresh profile; its stdout. The process group is killed after."""
    with tempfile.TemporaryDirectory(prefix="trakjax-chromium-") as profile:
        command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        # the page must work as users open it: never with file access widened for the test
        assert not any(flag.startswith("--allow-file-access") for flag in command)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode("utf-8")


def rendered_dom(url: str) -> str:
    return run_chromium("--virtual-time-budget=10000", "--dump-dom", url)


class Page(html.parser.HTMLParser):
    """What a dumped DOM shows: body's data-ready, the error box's text, the target entries with
    their examples in order, the text of ``pre.text`` elements and every tag seen."""

    def __init__(self, dom: str):
        super().__init__()
        self.ready, self.errors, self.entries, self.texts, self.tags = None, "", [], [], set()
        self._in = None
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "body":
            self.ready = attrs.get("data-ready")
        if attrs.get("id") == "trakjax-errors":
            self._in = "errors"
        if "data-target" in attrs:
            self.entries.append((int(attrs["data-target"]), []))
        if "data-example" in attrs:
            self.entries[-1][1].append(int(attrs["data-example"]))
        if tag == "pre" and attrs.get("class") == "text":
            self._in = "text"
            self.texts.append("")

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in = None

    def handle_data(self, data):
        if self._in == "errors":
            self.errors += data
        elif self._in == "text":
            self.texts[-1] += data


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    """A tiny digits demo's output directory (the real pipeline, so the screenshot is real)."""
    chromium()
    from trakjax import demo

    out = tmp_path_factory.mktemp("explorer") / "demo"
    settings = demo.DemoSettings(out=out, checkpoints=3, proj_dim=128, train_size=400, num_targets=8,
                                 hidden=32, steps=200, batch_size=200, top_k=5, lds_subsets=4)
    demo.run(settings, quiet=True, log=lambda text: None)
    return out


def test_page_in_chromium_lists_topk_and_jumps(demo_page):
    table = json.loads((demo_page / "topk.json").read_text())["targets"]
    listed = {r["target"]: [e["train_index"] for e in r["proponents"] + r["opponents"]] for r in table}
    page = Page(rendered_dom((demo_page / explorer.PAGE_FILE).as_uri()))
    assert page.ready == "1" and page.errors.strip() == ""
    assert [j for j, _ in page.entries] == list(range(8))  # first screen: target 0 first, all 8
    assert dict(page.entries) == listed

    focused = Page(rendered_dom((demo_page / explorer.PAGE_FILE).as_uri() + "#target=5"))
    assert focused.ready == "1" and focused.errors.strip() == ""
    assert focused.entries[0] == (5, listed[5])

    train = table[0]["proponents"][0]["train_index"]
    jumped = Page(rendered_dom((demo_page / explorer.PAGE_FILE).as_uri() + f"#train={train}"))
    assert [j for j, _ in jumped.entries] == [j for j, ex in listed.items() if train in ex]

    # Sorted by Σ|scores| (highest first); filtered by label and sorted by the top proponent.
    total = {r["target"]: sum(abs(e["score"]) for e in r["proponents"] + r["opponents"]) for r in table}
    view = Page(rendered_dom((demo_page / explorer.PAGE_FILE).as_uri() + "#sort=total"))
    assert [j for j, _ in view.entries] == sorted(listed, key=lambda j: (-total[j], j))
    label = table[0]["label"]
    view = Page(rendered_dom((demo_page / explorer.PAGE_FILE).as_uri() + f"#sort=top&label={label}"))
    top = {r["target"]: r["proponents"][0]["score"] for r in table}
    expected = sorted((j for j in listed if table[j]["label"] == label), key=lambda j: (-top[j], j))
    assert [j for j, _ in view.entries] == expected and view.errors.strip() == ""


def test_page_in_chromium_screenshot_is_not_blank(demo_page, tmp_path):
    from PIL import Image

    shot = tmp_path / "explorer.png"
    run_chromium("--virtual-time-budget=10000", f"--screenshot={shot}", (demo_page / explorer.PAGE_FILE).as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert pixels.shape == (900, 1280, 3)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # the thumbnails are drawn: many near-black pixels (ink of the digits), not only text
    assert (pixels.max(axis=2) < 40).mean() > 0.01
    keep = os.environ.get("TRAKJAX_EXPLORER_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_text_page_in_chromium_shows_markup_as_text(tmp_path):
    chromium()
    records = _records(num_train=5, num_targets=45, k=2)
    texts = ["</script><b>bold</b> & co", "<!-- x -->", "é\xff", "plain", "<img src=x onerror=alert(1)>"]
    tokens = [list(t.encode("latin-1" if "\xff" in t else "utf-8")) for t in texts]
    width = max(len(t) for t in tokens)
    ids = np.array([t + [32] * (width - len(t)) for t in tokens], np.int32)
    explorer.write_explorer(tmp_path, records, train_inputs=ids, target_inputs=ids[np.arange(45) % 5],
                            decoder="bytes", title="</title><b>x</b>")
    page = Page(rendered_dom((tmp_path / explorer.PAGE_FILE).as_uri()))
    assert page.ready == "1" and page.errors.strip() == ""
    # lazy: the first batch only (more render as the page is scrolled), in target order
    assert 0 < len(page.entries) < 45 and [j for j, _ in page.entries] == list(range(len(page.entries)))
    assert "b" not in page.tags and "img" not in page.tags
    shown = {explorer.decode_tokens(row, "bytes") for row in ids}
    assert page.texts and set(page.texts) <= shown
    assert any(t.startswith("</script><b>bold</b> & co") for t in page.texts)
