"""End to end in a real browser: `mmhub demo` served, driven by Playwright in headless Chromium.

The browser is Debian's ``chromium`` at /usr/bin/chromium (never a downloaded one);
`.ci/run` installs it and Playwright. Screenshots are written to ``artifacts/browser/``
(or ``$MMHUB_ARTIFACTS/browser``). Without Chromium or Playwright the test is skipped,
unless MMHUB_REQUIRE_REAL_WEIGHTS=1 (CI), where their absence is a failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REQUIRE = os.environ.get("MMHUB_REQUIRE_REAL_WEIGHTS") == "1"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MMHUB_ARTIFACTS", ROOT / "artifacts")) / "browser"
RUNS = ARTIFACTS / "runs"

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    from mmhub.data.easy_vqa import SOURCE
    from mmhub.errors import WeightsNotFoundError
    from mmhub.weights import resolve

    try:
        resolve(SOURCE)
    except WeightsNotFoundError:
        return f"easy-VQA is not here (`mmhub weights fetch {SOURCE}`)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    missing = _missing()
    if missing:
        if REQUIRE:
            pytest.fail(f"the browser test needs {missing}; `.ci/run` installs it")
        pytest.skip(missing)
    port = _free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "demo-server.log", "w")
    import shutil

    shutil.rmtree(RUNS, ignore_errors=True)  # the Train tab's run folders of this server only
    proc = subprocess.Popen([sys.executable, "-m", "mmhub.cli", "demo", "--port", str(port), "--runs", str(RUNS)],
                            stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`mmhub demo` exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 300:
                pytest.fail(f"`mmhub demo` did not answer on {url} within 300 s; see {log.name}")
            time.sleep(1)
        (ARTIFACTS / "startup.json").write_text(json.dumps({"seconds_to_http_200": round(time.perf_counter() - t0, 1)}))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _question(kind: str = "color") -> tuple[Path, str, str]:
    """The first easy-VQA test question of a kind: (image path, question, expected answer)."""
    from mmhub.data.easy_vqa import SOURCE, question_type, read_questions
    from mmhub.weights import resolve

    root = resolve(SOURCE) / "test"
    q, a, image = next(x for x in read_questions(root / "questions.json") if question_type(x[1]) == kind)
    return root / "images" / f"{image}.png", q, a


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url, wait_until="load", timeout=120_000)
    page.wait_for_selector("#model-note p", timeout=180_000)
    return page


def _send(page, text: str, files: list[Path] = ()) -> None:
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_selector("#chat-input img, #chat-input .thumbnail-item", timeout=30_000)
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def _answers(page) -> list[str]:
    return [t.strip() for t in page.locator("#chatbot .bot").all_inner_texts()]


def _wait_answer(page, n: int, timeout_s: float = 180, allow_empty: bool = False) -> str:
    """The n-th (1-based) assistant message once the status line has cleared (with `allow_empty`, an empty reply,
    shown as "…", counts once generation has finished)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        answers = _answers(page)
        busy = "generating" in page.locator("#chat-status").inner_text()
        empty = ("", "Loading content") if allow_empty else ("", "…", "Loading content")
        if len(answers) >= n and not busy and answers[n - 1] not in empty:
            return answers[n - 1]
        time.sleep(0.25)
    raise AssertionError(f"no answer #{n} within {timeout_s} s; answers so far {_answers(page)}")


def _status(page, contains: str, timeout_s: float = 60) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = page.locator("#chat-status").inner_text()
        if contains in text:
            return text
        time.sleep(0.25)
    raise AssertionError(f"status never showed {contains!r}; it shows {page.locator('#chat-status').inner_text()!r}")


def test_chat_answers_an_easy_vqa_question(server, browser, tmp_path):
    image, question, answer = _question("color")
    page = _open(browser, server)
    page.screenshot(path=str(ARTIFACTS / "01-first-page.png"), full_page=True)
    # bad input first: each gets a message and the app keeps serving
    fake = tmp_path / "not-an-image.png"
    fake.write_text("plain text renamed to .png\n" * 20)
    _send(page, question, [fake])
    _status(page, "not a readable image")
    page.screenshot(path=str(ARTIFACTS / "02-bad-upload.png"), full_page=True)
    _send(page, "x" * 10_000)  # the refused file is still attached: the prompt is checked first
    _status(page, "10,000 characters")
    page.reload(wait_until="load")
    page.wait_for_selector("#model-note p", timeout=120_000)
    # the real question
    _send(page, question, [image])
    shown = _wait_answer(page, 1)
    page.screenshot(path=str(ARTIFACTS / "03-answer.png"), full_page=True)
    assert shown.lower().strip(" .") == answer, \
        f"asked {question!r} about {image.name}: shown {shown!r}, expected {answer!r}"


def test_two_users_at_once(server, browser):
    image, question, answer = _question("color")
    shape_image, shape_q, shape_a = _question("shape")
    a, b = _open(browser, server), _open(browser, server)
    _send(a, question, [image])
    _send(b, shape_q, [shape_image])
    assert _wait_answer(a, 1).lower().strip(" .") == answer
    assert _wait_answer(b, 1).lower().strip(" .") == shape_a
    b.screenshot(path=str(ARTIFACTS / "04-second-user.png"), full_page=True)


def test_plugins_tab_lists_builtins(server, browser):
    page = _open(browser, server)
    page.get_by_role("tab", name="Plugins").click()
    table = page.locator("#components-table")
    table.wait_for(timeout=30_000)
    search = table.locator("input.search-input")  # the browser renders only a long table's visible rows
    for name in ("timm", "open_clip", "qformer", "perceiver", "hf_causal_lm", "hf_seq2seq_lm"):
        search.fill(name)
        for _ in range(50):  # the filter applies after the input event
            cells = [line.strip() for line in table.inner_text().splitlines()]
            if name in cells:  # a cell holding exactly the name, not a longer one containing it
                break
            page.wait_for_timeout(200)
        assert name in cells, f"{name} is not listed on the Plugins tab (searched for it): {cells[:40]}"
    data = page.locator("#data-table").inner_text()
    for name in ("easy_vqa", "llava_json", "easy_vqa_draw"):
        assert name in data, f"{name} is not listed among the datasets and eval tasks"
    from mmhub.registry import get_registry

    failed = len(get_registry().failed)  # the server runs with this process's environment, so the same plugins
    summary = page.locator("#plugins-summary").inner_text()  # markdown rendered: the ** of the bold are gone
    expected = f"{failed} plugin(s) failed to load (below)." if failed else "No plugin failed to load."
    assert summary.strip().endswith(expected), (expected, summary)
    assert ("No plugin failed" in summary) != bool(failed)
    page.screenshot(path=str(ARTIFACTS / "05-plugins.png"), full_page=True)


def test_assemble_tab_validates_a_spec(server, browser):
    page = _open(browser, server)
    page.get_by_role("tab", name="Assemble").click()
    page.locator("#form-to-yaml").click()
    page.wait_for_function("document.querySelector('#spec-yaml').innerText.includes('hf_causal_lm')", timeout=30_000)
    page.locator("#validate").click()
    page.wait_for_function("document.querySelector('#assemble-result').innerText.includes('Valid')", timeout=60_000)
    result = page.locator("#assemble-result").inner_text()
    assert result.startswith("Valid: my-model: image: open_clip -> mlp"), result
    page.locator("#build").click()
    page.wait_for_function("document.querySelector('#assemble-result').innerText.includes('Built')", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "06-assemble.png"), full_page=True)


def test_switching_models_without_restarting(server, browser):
    page = _open(browser, server)
    default_note = page.locator("#model-note").inner_text()
    page.locator("#model-select input").click()
    page.get_by_role("option", name="preset: llava-1.5:tiny", exact=False).first.click()
    page.wait_for_function("document.querySelector('#model-note').innerText.includes('llava-1.5:tiny')",
                           timeout=120_000)
    assert "random weights" in page.locator("#model-note").inner_text()
    _send(page, "hello")
    _wait_answer(page, 1)  # an untrained preset answers noise, but it answers
    page.locator("#model-select input").click()
    page.get_by_role("option", name="default:", exact=False).first.click()
    page.wait_for_function("document.querySelector('#model-note').innerText.includes('easyvqa')", timeout=120_000)
    assert page.locator("#model-note").inner_text() == default_note
    page.screenshot(path=str(ARTIFACTS / "07-switched-back.png"), full_page=True)


def test_the_default_model_draws_on_request(server, browser):
    """The demo's default model has an image generator: a drawing request shows the image inline, in the asked
    colour."""
    from PIL import Image

    from mmhub.demo_model import find_default
    from mmhub.recipes.easyvqa_draw import dominant_color

    found = find_default()
    spec = json.loads((found.path / "mmhub_spec.json").read_text())
    if "image" not in (spec.get("generators") or {}):
        pytest.skip(f"the default model here ({found.name}) has no image generator")
    page = _open(browser, server)
    _send(page, "draw a red rectangle")
    _wait_answer(page, 1)
    img = page.locator("#chatbot .bot img").first
    img.wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "08-drawing.png"), full_page=True)
    img.screenshot(path=str(ARTIFACTS / "08-drawn-image.png"))
    assert dominant_color(Image.open(ARTIFACTS / "08-drawn-image.png").convert("RGB")) == "red"


def test_a_drawing_shows_at_a_readable_size(server, browser):
    """A drawing (64x64 px from the default model) shows at least 200 px wide in the chat, and its original pixels
    are linked for download beside it."""
    from mmhub.demo_model import find_default

    found = find_default()
    spec = json.loads((found.path / "mmhub_spec.json").read_text())
    if "image" not in (spec.get("generators") or {}):
        pytest.skip(f"the default model here ({found.name}) has no image generator")
    page = _open(browser, server)
    _send(page, "draw a blue circle")
    _wait_answer(page, 1)
    img = page.locator("#chatbot .bot img").first
    img.wait_for(timeout=60_000)
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "09-drawing-size.png"), full_page=True)
    box = img.bounding_box()
    assert box and box["width"] >= 200, f"the drawing shows {box} in the chat; expected at least 200 px wide"
    link = page.locator("#chatbot .bot a", has_text="image-0-original.png")
    assert link.count() == 1, f"no download link for the original; the reply reads {_answers(page)}"
    # the link serves the model's own pixels; the picture shown is their nearest-neighbour enlargement
    import io

    import numpy as np
    from PIL import Image

    from mmhub.apps.chat import display_copy

    def fetch(url: str) -> Image.Image:
        with urllib.request.urlopen(urllib.parse.urljoin(server, url), timeout=30) as r:
            return Image.open(io.BytesIO(r.read())).convert("RGB")

    original, shown = fetch(link.get_attribute("href")), fetch(img.get_attribute("src"))
    assert max(original.size) < 200 and max(shown.size) == 256, (original.size, shown.size)
    assert np.array_equal(np.asarray(display_copy(original)), np.asarray(shown))


def _heldout(name: str) -> list[dict]:
    path = ROOT / "mmhub" / "recipes" / "heldout" / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_reworded_question_follow_ups_and_a_refused_photo(server, browser, tmp_path):
    """The default model in the browser, on held-out material (mmhub/recipes/heldout/, never trained on): a
    reworded which-figure question, a three-turn conversation about one image (the last turn the kind that failed
    before: "Is there a circle in this picture?" after a colour and a shape question), and a held-out real photo,
    which it declines."""
    pytest.importorskip("skimage")
    from mmhub.data.easy_vqa import SOURCE
    from mmhub.data.photos import load_photo
    from mmhub.evaluation.refusal import is_refusal
    from mmhub.weights import resolve

    images = resolve(SOURCE) / "test" / "images"
    item = next(r for r in _heldout("easy_vqa_reworded.jsonl") if r["type"] == "which_shape")
    page = _open(browser, server)
    _send(page, item["question"], [images / f"{item['image']}.png"])
    assert _wait_answer(page, 1).lower().strip(" .") == item["answer"], item
    conv = next(c for c in _heldout("easy_vqa_followup.jsonl") if len(c["images"]) == 1 and len(c["turns"]) >= 3)
    page = _open(browser, server)
    for k, turn in enumerate(conv["turns"][:3]):
        _send(page, turn["question"], [images / f"{conv['images'][0]}.png"] if k == 0 else [])
        shown = _wait_answer(page, k + 1)
        assert shown.lower().strip(" .") == turn["answer"], (conv["id"], k, turn, shown)
    page.screenshot(path=str(ARTIFACTS / "09-follow-ups.png"), full_page=True)
    held = json.loads((ROOT / "mmhub" / "recipes" / "heldout" / "photos.json").read_text())["held_out"][0]
    photo = tmp_path / f"{held['name']}.png"
    load_photo(held["source"]).save(photo)
    page = _open(browser, server)
    _send(page, "What shape is in the image?", [photo])
    shown = _wait_answer(page, 1)
    page.screenshot(path=str(ARTIFACTS / "10-refused-photo.png"), full_page=True)
    assert is_refusal(shown), f"{held['name']}: {shown!r}"


# -- the Train and Runs tabs ------------------------------------------------------------------------------------------
def _pick(page, field: str, option: str) -> None:
    """Choose `option` in the Gradio dropdown `#field`."""
    page.locator(f"#{field} input").click()
    page.get_by_role("option", name=option, exact=True).first.click()


def _type(page, field: str, text: str) -> None:
    page.locator(f"#{field} textarea, #{field} input").first.fill(text)


def _until(page, selector: str, test, what: str, timeout_s: float = 120) -> str:
    deadline = time.time() + timeout_s
    text = ""
    while time.time() < deadline:
        text = page.locator(selector).inner_text()
        if test(text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"{selector} never showed {what}; it shows {text!r}")


def _step(status: str) -> int:
    import re

    found = re.search(r"step (\d+)/(\d+)", status)
    return int(found.group(1)) if found else -1


def _load_tiny_spec(page, steps: int) -> None:
    page.get_by_role("tab", name="Train").click()
    _pick(page, "train-source", "llava-1.5:tiny")
    page.locator("#train-load").click()
    page.wait_for_function("document.querySelector('#train-spec').innerText.includes('pretrain')", timeout=30_000)
    _pick(page, "train-dataset", "easy_vqa")
    page.locator("#train-dataset + button, button:has-text('Use this dataset')").first.click()
    _until(page, "#train-said", lambda t: "data: easy_vqa set on every stage" in t, "the dataset set")
    page.locator("#train-steps input").fill(str(steps))
    page.get_by_label("batch size").fill("4")
    page.locator("#train-apply").click()
    _until(page, "#train-said", lambda t: f"max_steps {steps}" in t, "the settings applied")
    time.sleep(2.5)  # past a tick of the run-status timer, which must not wipe what the button said
    assert f"max_steps {steps}" in page.locator("#train-said").inner_text()


def test_train_tab_starts_watches_stops_resumes_evaluates_and_chats(server, browser):
    """A tiny preset trained from the Train tab on a built-in dataset: the curve and the progress bar appear and move,
    Stop keeps a checkpoint, Resume runs to the end; the Runs tab evaluates it and opens it in Chat, which answers.
    The time from Start to the first curve point is written to train-timing.json beside the screenshots."""
    page = _open(browser, server)
    _load_tiny_spec(page, steps=1000)
    _type(page, "train-name", "browser-tiny")
    t0 = time.perf_counter()
    page.locator("#train-start").click()
    _until(page, "#train-status", lambda t: "browser-tiny" in t, "the run's status")  # Start selects the new run
    first = _until(page, "#train-status", lambda t: _step(t) > 0, "a step", timeout_s=240)
    page.wait_for_selector("#train-loss canvas, #train-loss svg", timeout=60_000)
    first_point_s = round(time.perf_counter() - t0, 1)
    (ARTIFACTS / "train-timing.json").write_text(json.dumps({"start_to_first_curve_point_s": first_point_s}))
    page.screenshot(path=str(ARTIFACTS / "10-train-running.png"), full_page=True)
    later = _until(page, "#train-status", lambda t: _step(t) > _step(first) + 2, "the progress moving")
    import re

    assert "ETA" in later and re.search(r"\[[#-]{20}\]", later), later  # the progress bar and the time left
    page.locator("#train-stop").click()
    stopped = _until(page, "#train-status", lambda t: "(not running)" in t, "the run stopped", timeout_s=120)
    assert "all done" not in stopped, "stopped after the end: give the run more steps"
    assert "stopped in stage" in page.locator("#train-log textarea").input_value()
    page.locator("#train-resume").click()
    done = _until(page, "#train-status", lambda t: "all done" in t and "(not running)" in t, "the run finished",
                  timeout_s=600)
    assert "stages done: pretrain, instruct" in done, done
    page.screenshot(path=str(ARTIFACTS / "11-train-done.png"), full_page=True)

    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-refresh").click()
    _until(page, "#runs-table", lambda t: "browser-tiny" in t, "the run in the table")
    _pick(page, "runs-pick", "browser-tiny")
    page.wait_for_function("document.querySelector('#runs-model-path textarea, #runs-model-path input').value"
                           ".endsWith('instruct/model')", timeout=30_000)
    page.get_by_label("items (first N)").fill("8")
    page.locator("#runs-evaluate").click()
    scores = _until(page, "#runs-eval", lambda t: "strict" in t, "the evaluation", timeout_s=300)
    assert "browser-tiny / instruct, easy_vqa on 8 items" in scores, scores
    page.screenshot(path=str(ARTIFACTS / "12-runs-evaluated.png"), full_page=True)
    page.locator("#runs-chat").click()
    page.wait_for_function("document.querySelector('#model-note').innerText.includes('browser-tiny')",
                           timeout=120_000)
    image, question, _ = _question("color")
    _send(page, question, [image])
    _wait_answer(page, 1, allow_empty=True)  # a 300-step tiny model answers, right or not (often nothing: "…")
    assert "Error" not in page.locator("#chat-status").inner_text()
    page.screenshot(path=str(ARTIFACTS / "13-chat-with-run.png"), full_page=True)


def test_an_upload_with_a_broken_row_shows_the_preflight(server, browser, tmp_path):
    import io
    import zipfile

    from PIL import Image

    rows, pics = [], {}
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(buf, "PNG")
        pics[f"pics/{i}.png"] = buf.getvalue()
        rows.append({"id": f"s{i}", "image": "pics/gone.png" if i == 3 else f"pics/{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                       {"from": "gpt", "value": "blue"}]})
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with zipfile.ZipFile(tmp_path / "pics.zip", "w") as z:
        for name, data in pics.items():
            z.writestr(name, data)
    page = _open(browser, server)
    _load_tiny_spec(page, steps=5)
    page.locator("#train-data-file input[type=file]").set_input_files(str(tmp_path / "rows.json"))
    page.locator("#train-media-zip input[type=file]").set_input_files(str(tmp_path / "pics.zip"))
    _type(page, "train-upload-name", "broken-row")
    page.locator("#train-upload").click()
    said = _until(page, "#train-said", lambda t: "Pre-flight" in t or "would be skipped" in t, "the pre-flight",
                  timeout_s=120)
    page.screenshot(path=str(ARTIFACTS / "14-upload-preflight.png"), full_page=True)
    assert "stored 6 llava_json records and 6 media files" in said, said
    assert "Start would be refused" in said and "1 of 6 checked samples" in said and "missing_file: 1" in said, said


def test_the_assemble_diagram_names_every_slot(server, browser, tmp_path):
    page = _open(browser, server)
    page.get_by_role("tab", name="Assemble").click()
    page.locator("#form-to-yaml").click()
    page.wait_for_function("document.querySelector('#spec-yaml').innerText.includes('hf_causal_lm')", timeout=30_000)
    page.locator("#build").click()
    text = _until(page, "#assemble-result", lambda t: "Diagram:" in t, "the diagram's caption", timeout_s=180)
    page.wait_for_selector("#model-diagram img", timeout=60_000)
    for slot in ("encoders.image", "projectors.image", "backbone"):
        assert f"{slot} " in text.split("Diagram:")[1], (slot, text)
    page.screenshot(path=str(ARTIFACTS / "15-assemble-diagram.png"), full_page=True)
    # the Train tab starts from the Assemble tab's spec, or from a spec file
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-from-assemble").click()
    page.wait_for_function("document.querySelector('#train-spec').innerText.includes('my-model')", timeout=30_000)
    spec_file = tmp_path / "uploaded.yaml"
    spec_file.write_text("name: from-a-file\nencoders: {}\n")
    page.locator("#train-spec-file input[type=file]").set_input_files(str(spec_file))
    page.wait_for_function("document.querySelector('#train-spec').innerText.includes('from-a-file')",
                           timeout=30_000)
