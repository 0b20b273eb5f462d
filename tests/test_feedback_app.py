"""The comparison web app in a real browser (Debian's chromium, headless, through selenium): a rater
compares a pair with the keyboard, the row lands in the store with the side that was shown, undo removes
it, and prompt text is escaped. .ci/run installs the browser; without one these tests fail, never skip."""

import shutil
import threading
import time

import pytest
from werkzeug.serving import make_server

from dalle.feedback.app import create_app
from dalle.feedback.store import Store

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HOSTILE = '<script>document.title="pwned"</script> a red circle & "quotes"'


@pytest.fixture(scope="module")
def browser():
    if not (BROWSER and DRIVER):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: "
                    "apt-get install -y chromium chromium-driver (.ci/run does this)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture()
def server(tmp_path):
    store = Store(tmp_path / "c.db")
    pid = store.prompt(HOSTILE, "train")
    png = (tmp_path / "p.png")
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(png)
    a, b = (store.add_sample(pid, "m@1", s, {}, [s], png.read_bytes()) for s in (0, 1))
    pair = store.add_pair(a, b)
    app = create_app(tmp_path / "c.db")
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}", store, pair, (a, b)
    http.shutdown()


def eventually(read, timeout=10.0):
    """What `read` returns once it is truthy: a click or key submits a form, and the browser returns
    before the server has handled it, so the test waits for the effect instead of racing it."""
    deadline = time.monotonic() + timeout
    while not (value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_a_comparison_by_keyboard_lands_in_the_store_and_undo_removes_it(browser, server):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def text(element_id):  # the element's text on whatever page has loaded, "" while none has it
        try:
            return "".join(e.text for e in browser.find_elements(By.ID, element_id))
        except StaleElementReferenceException:  # the page was replaced while it was read
            return ""

    def comparisons():
        return store.db.execute("SELECT pair_id, left_id, choice, rater FROM comparisons").fetchall()

    url, store, pair, samples = server
    browser.get(f"{url}/compare?rater=ann")
    assert browser.find_element(By.ID, "prompt").text == HOSTILE  # shown as text, not run
    assert browser.title == "compare"
    assert browser.find_element(By.ID, "progress").text == "0 of 1 pairs judged by ann"
    left = int(browser.find_element(By.ID, "left").get_attribute("data-sample"))
    right = int(browser.find_element(By.ID, "right").get_attribute("data-sample"))
    assert {left, right} == set(samples)
    browser.find_element(By.TAG_NAME, "body").send_keys("2")  # the right-hand image
    assert eventually(lambda: text("done") == "Nothing left to compare.")
    assert comparisons() == [(pair, left, "right", "ann")]
    assert store.judgements()[0].winner_id == right
    browser.find_element(By.TAG_NAME, "body").send_keys("u")
    assert eventually(lambda: text("progress") == "0 of 1 pairs judged by ann")  # the compare page again
    assert store.counts()["comparisons"] == 0
    left = int(browser.find_element(By.ID, "left").get_attribute("data-sample"))  # the sides are drawn anew
    browser.find_element(By.ID, "b3").click()  # a tie, by mouse
    assert eventually(comparisons) == [(pair, left, "tie", "ann")]


def test_stats_page_and_generate_without_a_model(browser, server):
    from selenium.webdriver.common.by import By

    url, store, pair, (a, b) = server
    store.record(pair, a, "left", "bob")
    browser.get(f"{url}/stats")
    assert "1 comparisons" in browser.find_element(By.ID, "counts").text
    assert "bob" in browser.find_element(By.ID, "raters").text
    browser.get(f"{url}/generate?prompt=a+red+circle")
    assert "without a model" in browser.find_element(By.ID, "error").text


def test_feedback_tool_samples_simulates_exports_and_serves_generation(tiny_parts, tmp_path, capsys):
    from dalle_tools import feedback

    db, model = str(tmp_path / "fb.db"), str(tiny_parts / "model")
    assert feedback.main(["sample", "--store", db, "--model", model, "--shapes", "train", "--n", "3",
                          "--pairs-per-prompt", "2", "--cond-scale", "1", "--device", "cpu"]) == 0
    store = Store(db)
    assert store.counts() == {"prompts": 3, "samples": 12, "pairs": 6, "comparisons": 0}
    # a prompt file or model that cannot be read is refused before the store is made
    (tmp_path / "empty.txt").write_text("\n")
    new = tmp_path / "new.db"
    with pytest.raises(SystemExit, match="empty.txt"):
        feedback.main(["sample", "--store", str(new), "--model", model, "--prompts", str(tmp_path / "empty.txt")])
    with pytest.raises(SystemExit, match="cannot load the model"):
        feedback.main(["sample", "--store", str(new), "--model", str(tmp_path / "nowhere"), "--shapes", "train"])
    assert not new.exists()
    assert feedback.main(["simulate", "--store", db, "--rater", "sim"]) == 0
    assert store.counts()["comparisons"] == 6 and store.next_pair("sim") is None
    assert feedback.main(["export", "--store", db, "--out", str(tmp_path / "c.jsonl")]) == 0
    with pytest.raises(SystemExit, match="exists"):
        feedback.main(["export", "--store", db, "--out", str(tmp_path / "c.jsonl")])
    other = str(tmp_path / "other.db")
    assert feedback.main(["import", "--store", other, "--file", str(tmp_path / "c.jsonl"), "--model", model,
                          "--device", "cpu"]) == 0
    assert Store(other).counts()["comparisons"] == 6
    # The generate page ranks a prompt's candidates with the model's reranker.
    from dalle.pipeline import load_pipeline

    app = create_app(db, pipeline=load_pipeline(model, reranker_dir=tiny_parts / "reranker"), keep=2,
                     candidates=4)
    page = app.test_client().get("/generate?prompt=a+red+circle").get_data(as_text=True)
    assert page.count("data:image/png;base64,") == 2 and page.count('class="score"') == 2
