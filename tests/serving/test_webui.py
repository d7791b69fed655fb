"""``zerovl webui`` as users run it: its own process on a loopback port over a trained run, driven by
headless Chromium (upload an image, ask, read the streamed reply, ask again, open the curves), plus the
chat and curves handlers called in process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.distributed.helpers import free_port
from tests.serving.conftest import running

gr = pytest.importorskip("gradio", reason="zerovl[webui] not installed")
pytest.importorskip("selenium", reason="selenium is in zerovl[dev]")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from zerovl.serving.batcher import Batcher  # noqa: E402
from zerovl.serving.generation import Sampling  # noqa: E402
from zerovl.serving.webui import (  # noqa: E402
    NO_RUN,
    build_ui,
    chat_turn,
    curves,
    new_conversation,
    sampling,
    tagged,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
FIRST, SECOND = "what colour is the shape ?", "and what shape is it ?"
MAX_TOKENS = 64  # the slider's default
UPLOAD_SIZE = (48, 40)


def _images(scenes) -> list[str]:
    return [str(p) for p in sorted((scenes["train"].parent / "images").glob("*.png"))]


def _image(scenes) -> str:
    return _images(scenes)[0]


@pytest.fixture(scope="module")
def batcher(composed_bot):
    b = Batcher(composed_bot, 4, 0.01)
    yield b
    b.close()


def test_chat_turn_streams_the_reply_chat_gives(composed_bot, batcher, scenes):
    assert isinstance(build_ui(composed_bot, batcher), gr.Blocks)
    image = _image(scenes)
    turns = list(chat_turn(composed_bot, batcher, FIRST, image, new_conversation(), Sampling(max_tokens=8)))
    shown, conversation, box = turns[-1]
    expected = composed_bot.answer(FIRST, [image], 8)
    assert shown == [{"role": "user", "content": FIRST}, {"role": "assistant", "content": expected}]
    assert conversation == {"messages": shown, "images": [image]} and box == ""
    streamed = [t[0][-1]["content"] for t in turns[:-1]]
    assert streamed[0] == "" and streamed[-1] == expected  # the reply grows from empty to the full text
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))

    second = list(chat_turn(composed_bot, batcher, SECOND, None, conversation, Sampling(max_tokens=8)))[-1]
    history = tagged(conversation["messages"], 1)
    assert second[0][-1]["content"] == composed_bot.answer(SECOND, [image], 8, history=history)
    assert len(second[1]["messages"]) == 4 and second[1]["images"] == [image]


def test_the_sliders_become_the_serving_settings():
    assert sampling(32.0, 0.7, 0.9, -1) == Sampling(max_tokens=32, temperature=0.7, top_p=0.9, seed=None)
    assert sampling(8, 0, 1, 5.0).seed == 5 and sampling(8, 0, 1, None).seed is None


def test_a_bad_image_is_a_warning_not_a_crash(composed_bot, batcher, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.warns(UserWarning):
        (shown, conversation, box), = chat_turn(composed_bot, batcher, FIRST, str(broken), new_conversation(),
                                                Sampling(max_tokens=4))
    assert shown == [] and conversation == new_conversation() and box == FIRST  # the question is kept


def test_curves_plot_a_run_and_explain_an_export(trained_run, tmp_path):
    fig, note = curves(trained_run)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "samples/s"]
    assert len(fig.axes[0].lines[0].get_xdata()) == 3 and "3 train steps" in note
    assert curves(None) == (None, NO_RUN)
    fig, note = curves(tmp_path)
    assert fig is None and "metrics.jsonl not found" in note


# ---- the browser test -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webui(trained_run, tmp_path_factory):
    """``zerovl webui RUN`` in its own process group, up once its page answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "webui.log"
    url = f"http://127.0.0.1:{port}/"
    with running(["webui", str(trained_run), "--port", str(port)], log, url):
        yield url, log


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _bot_messages(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")]


def _ask(driver, question: str, turn: int, expected: str) -> None:
    """Type, send, and wait for the turn's reply to stream in completely."""
    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#send").click()
    try:
        WebDriverWait(driver, 60).until(lambda d: _bot_messages(d)[turn - 1:] == [expected])
    except Exception:
        pytest.fail(f"turn {turn}: expected {expected!r}, the page shows {_bot_messages(driver)}")


def _save(driver, path: Path) -> Path:
    driver.save_screenshot(str(path))
    if os.environ.get("ZEROVL_ARTIFACTS"):
        Path(os.environ["ZEROVL_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["ZEROVL_ARTIFACTS"]) / path.name)
    return path


def test_browser_chat_with_an_image_two_turns_and_the_curves(webui, browser, trained_run, scenes, tmp_path):
    from zerovl.recipes.chat import Chatbot  # the answers `zerovl chat` gives: greedy, so the page must match

    # an upload of a size no scene has: the server's log of what each turn showed the model names it
    image = tmp_path / "upload.png"
    Image.open(_image(scenes)).convert("RGB").resize(UPLOAD_SIZE).save(image)
    image = str(image)
    bot = Chatbot.from_run(trained_run)
    first = bot.answer(FIRST, [image], MAX_TOKENS)
    history = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": first}]
    second = bot.answer(SECOND, [image], MAX_TOKENS, history=tagged(history, 1))
    assert first.strip(), "the trained run answers with nothing; the page check would prove little"
    url, log = webui

    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(image)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    _ask(browser, FIRST, 1, first)
    _ask(browser, SECOND, 2, second)
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='user']")]
    assert users == [FIRST, SECOND]
    chat_png = _save(browser, tmp_path / "webui-chat.png")

    tabs = browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
    next(t for t in tabs if "Training curves" in t.text).click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#curves img"))
    assert "3 train steps" in browser.find_element(By.CSS_SELECTOR, "#curves-note").text
    curves_png = _save(browser, tmp_path / "webui-curves.png")
    assert chat_png.stat().st_size > 10_000 and curves_png.stat().st_size > 10_000
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(u.startswith(url) or u.startswith(("data:", "blob:")) for u in fetched), \
        [u for u in fetched if not u.startswith(url)]  # no fonts, scripts or telemetry from elsewhere
    shown = f"1 image ({UPLOAD_SIZE[0]}x{UPLOAD_SIZE[1]})"
    turns = [line for line in log.read_text().splitlines() if "] turn " in line]
    assert len(turns) == 2 and all(shown in t for t in turns), turns  # the uploaded file, at both turns
