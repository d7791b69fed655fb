"""``zerovl webui``: a browser chat with a run, checkpoint or export, and the run's training curves.

A thin Gradio client of the serving path: every turn is encoded by ``generation.encode`` (the template
and image code ``serve`` and ``chat`` use) and queued to the same ``Batcher``, so browser users who send
together generate as one batch, and the reply streams to the page through the row's ``on_text``.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zerovl.data.samples import IMAGE_TAG
from zerovl.errors import DataError, ZeroVLError
from zerovl.recipes.chat import Chatbot
from zerovl.recipes.report import load_run, pyplot
from zerovl.serving.batcher import Batcher
from zerovl.serving.generation import Row, Sampling, encode

log = logging.getLogger("zerovl.webui")

Conversation = dict[str, list]  # {"messages": [{"role", "content"} as typed and answered], "images": [paths]}
Turn = tuple[list[dict[str, str]], Conversation, str]  # (chatbot messages, conversation, question box)

NO_RUN = "This model is an export: it has no training metrics. Open its run directory to see the curves."
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no Google Fonts: clusters are often offline


def _gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry or version checks from a training cluster
    try:
        import gradio
    except ImportError:
        raise ZeroVLError("zerovl webui needs Gradio, which is not installed: "
                          "pip install 'zerovl[webui]'") from None
    return gradio


def new_conversation() -> Conversation:
    return {"messages": [], "images": []}


def sampling(max_tokens: float, temperature: float, top_p: float, seed: float | None) -> Sampling:
    """The sliders as the serving path's settings (Gradio hands numbers over as floats)."""
    return Sampling(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                    seed=None if seed is None or seed < 0 else int(seed))


def tagged(messages: list[dict[str, str]], images: int) -> list[dict[str, str]]:
    """The model's view: one ``<image>`` tag per image at the start of the first user turn, as
    ``Chatbot.answer`` puts them (unless the user typed the tags)."""
    out = [dict(m) for m in messages]
    first = next((m for m in out if m["role"] == "user"), None)
    if images and first is not None and IMAGE_TAG not in first["content"]:
        first["content"] = IMAGE_TAG * images + first["content"]
    return out


def _describe(images: list[str]) -> str:
    """What the model is shown, for the log: ``1 image (640x480)`` (the encode step has read them)."""
    from PIL import Image

    sizes = []
    for path in images:
        with Image.open(path) as im:
            sizes.append(f"{im.width}x{im.height}")
    return f"{len(images)} image" + ("" if len(images) == 1 else "s") + (f" ({', '.join(sizes)})" if sizes else "")


def chat_turn(bot: Chatbot, batcher: Batcher, question: str, image: str | None, conversation: Conversation,
              settings: Sampling) -> Iterator[Turn]:
    """One user turn: yields the chatbot messages with the reply growing, then the conversation with
    the finished turn in it. A bad image or a failed generation is a warning and leaves the
    conversation (and the question, to send again) as it was."""
    gr = _gradio()
    before = conversation["messages"]
    question = (question or "").strip()
    if not question:
        yield before, conversation, ""
        return
    images = conversation["images"] or ([image] if image and not before else [])
    messages = before + [{"role": "user", "content": question}]
    try:
        prompt, vision = encode(bot, tagged(messages, len(images)), images, "webui")
    except DataError as e:
        gr.Warning(str(e))
        yield before, conversation, question
        return
    log.info("turn %d: %s, %d prompt tokens", len(messages) // 2 + 1, _describe(images), len(prompt))
    pieces: queue.Queue = queue.Queue()
    row = Row(prompt, vision, settings, on_text=pieces.put)
    batcher.submit(row, lambda _, error: pieces.put(("done", error)))
    reply = ""
    try:
        yield messages + [{"role": "assistant", "content": reply}], conversation, ""
        while isinstance(item := pieces.get(), str):
            reply += item
            yield messages + [{"role": "assistant", "content": reply}], conversation, ""
    finally:
        row.cancelled.set()  # a closed tab stops its row at the next token
    if item[1] is not None:
        gr.Warning(f"generation failed ({item[1].__class__.__name__}: {item[1]})")
        yield before, conversation, question
        return
    messages = messages + [{"role": "assistant", "content": row.text}]
    yield messages, {"messages": messages, "images": images}, ""


def _points(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def curves(run_dir: Path | None) -> tuple[Any | None, str]:
    """The run's loss, learning rate and samples/s as one matplotlib figure, with a one-line note; no
    figure and the reason when there is no run directory or no metrics yet."""
    if run_dir is None:
        return None, NO_RUN
    try:
        train, val = load_run(run_dir)
        plt = pyplot()
    except ZeroVLError as e:
        return None, str(e)
    from matplotlib.ticker import MaxNLocator

    fig, (loss, lr, speed) = plt.subplots(1, 3, figsize=(15, 4))
    loss.plot(*_points(train, "loss"), label="train")
    if any("loss" in r for r in val):
        loss.plot(*_points(val, "loss"), "o-", label="val")
    loss.legend()
    lr.plot(*_points(train, "lr"), color="tab:green")
    speed.plot(*_points(train, "samples_per_s"), color="tab:orange")
    for ax, title in ((loss, "loss"), (lr, "learning rate"), (speed, "samples/s")):
        ax.set(title=title, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    plt.close(fig)  # Gradio renders the figure itself; pyplot need not keep it
    validations = f"{len(val)} validation" + ("" if len(val) == 1 else "s")
    return fig, f"{len(train)} train steps and {validations}, from {Path(run_dir) / 'metrics.jsonl'}"


def _chat_tab(gr, bot: Chatbot, batcher: Batcher) -> None:
    conversation = gr.State(new_conversation())
    with gr.Row():
        with gr.Column(scale=1):  # image_mode=None: the uploaded file itself, as `zerovl chat` would read it
            image = gr.Image(type="filepath", image_mode=None, sources=["upload"], height=280,
                             label="Image (a new one starts a new conversation)", elem_id="image")
            with gr.Accordion("Generation", open=True):
                max_tokens = gr.Slider(1, 1024, value=64, step=1, label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                seed = gr.Number(-1, precision=0, label="Seed (sampling only; -1: a new draw each time)")
        with gr.Column(scale=2):
            chatbot = gr.Chatbot(elem_id="chatbot", label=bot.name, height=480, feedback_options=None,
                                 buttons=["copy", "copy_all"])
            with gr.Row():
                question = gr.Textbox(placeholder="Ask about the image", show_label=False, scale=5,
                                      elem_id="question")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            clear = gr.Button("Clear", elem_id="clear")

    def respond(text, picture, convo, tokens, temp, p, seed_value):
        yield from chat_turn(bot, batcher, text, picture, convo, sampling(tokens, temp, p, seed_value))

    inputs = [question, image, conversation, max_tokens, temperature, top_p, seed]
    for event in (send.click, question.submit):  # the batcher, not Gradio's queue, is the limit
        event(respond, inputs, [chatbot, conversation, question], concurrency_limit=batcher.max_batch,
              concurrency_id="chat")
    def restart():
        return [], new_conversation()

    image.upload(restart, None, [chatbot, conversation])
    image.clear(restart, None, [chatbot, conversation])
    chatbot.clear(restart, None, [chatbot, conversation])  # its own trash button
    clear.click(lambda: ([], new_conversation(), None, ""), None, [chatbot, conversation, image, question])


def _curves_tab(gr, bot: Chatbot, tab) -> None:
    note = gr.Markdown(elem_id="curves-note")
    plot = gr.Plot(format="png", elem_id="curves", show_label=False, visible=False)
    refresh = gr.Button("Refresh", elem_id="refresh")

    def show():
        """Read at each opening: a run still training has new steps."""
        fig, message = curves(bot.run_dir)
        return gr.Plot(value=fig, visible=fig is not None), message

    tab.select(show, None, [plot, note])
    refresh.click(show, None, [plot, note])


def build_ui(bot: Chatbot, batcher: Batcher):
    """The Blocks (not launched): a Chat tab and a Training curves tab."""
    gr = _gradio()
    with gr.Blocks(title=f"zerovl · {bot.name}") as demo:
        gr.Markdown(f"## zerovl · {bot.name}\nTemperature 0 decodes greedily, as `zerovl chat` does.")
        with gr.Tab("Chat"):
            _chat_tab(gr, bot, batcher)
        with gr.Tab("Training curves") as tab:
            _curves_tab(gr, bot, tab)
    return demo


def theme(gr):
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])


def launch(source: str, host: str = "127.0.0.1", port: int = 7860, max_batch: int = 8) -> None:
    gr = _gradio()
    bot = Chatbot.load(source)
    batcher = Batcher(bot, max_batch, 0.01)
    demo = build_ui(bot, batcher)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the web UI on %s has no login: anyone who can reach this port can use the model", host)
    log.info("web UI for %s, batches of up to %d", source, max_batch)
    try:
        demo.queue().launch(server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False,
                            theme=theme(gr), max_file_size="32mb")
    finally:
        batcher.close()
