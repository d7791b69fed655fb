"""Peers' data as they are: alpaca, ms-swift query/response, MiniGPT4Qwen, caption records, OpenAI /
LLaMA-Factory content parts and LLaMA-Factory's dataset_info.json all become the same Sample, and
what zerovl cannot train (videos, image URLs, preference data, hub-only entries) is refused per
record or per entry in one line."""

import json

import pytest
from PIL import Image

from zerovl.config import DataSettings
from zerovl.data.readers import ReadReport, data_files, read_dataset, resolve_format
from zerovl.data.samples import ImageResolver
from zerovl.errors import DataError


def read(path, fmt="auto", skip_bad=False, **options):
    spec = DataSettings(datasets=[{"path": str(path), "format": fmt, **options}]).train_datasets()[0]
    report = ReadReport(skip_bad=skip_bad, key="data.datasets[0]")
    return read_dataset(spec, report), report


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(sample):
    return [(m["role"], m["content"]) for m in sample.messages]


def test_alpaca_joins_instruction_and_input_and_keeps_system_and_history(tmp_path):
    rows = [{"instruction": "Add", "input": "1+1", "output": "2", "system": "be brief", "history": [["hi", "hello"]]},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "no answer", "output": ""}]
    (samples, report) = read(jsonl(tmp_path / "a.jsonl", rows), skip_bad=True)
    assert chat(samples[0]) == [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "Add\n1+1"),
                                ("assistant", "2")]
    assert chat(samples[1]) == [("user", "Say hi"), ("assistant", "hi")]
    assert report.counts == {"bad_record": 1} and "a.jsonl:3: no 'output' to learn from" in report.examples[0]
    (tmp_path / "a.csv").write_text("system,instruction,input,output\n,Add,1+1,2\n")
    assert chat(read(tmp_path / "a.csv")[0][0]) == [("user", "Add\n1+1"), ("assistant", "2")]


def test_swift_inline_and_listed_images_pretraining_text_and_urls(tmp_path):
    rows = [{"query": "<img>a.png</img>what is it?", "response": "a square"},
            {"query": "and these?", "response": "two", "images": ["a.png", "b.png"], "history": [["hi", "yo"]]},
            {"response": "plain text to learn"},
            {"query": "<img>https://example.com/x.jpg</img>what?", "response": "?"}]
    samples, report = read(jsonl(tmp_path / "s.jsonl", rows), skip_bad=True)
    assert chat(samples[0]) == [("user", "<image>what is it?"), ("assistant", "a square")]
    assert samples[0].images == [str(tmp_path / "a.png")]
    assert chat(samples[1])[0] == ("user", "<image><image>\nhi")  # untagged images open the conversation
    assert chat(samples[2]) == [("user", ""), ("assistant", "plain text to learn")]
    assert report.counts == {"remote_image": 1}
    assert "s.jsonl:4: image https://example.com/x.jpg is a URL; zerovl reads local files only" in report.examples[0]


def test_minigpt4qwen_lists_are_turns_and_placeholders_are_image_tags(tmp_path):
    rows = [{"image": "a.jpg", "instruction": ["<Img><ImageHere></Img> what is it?", "colour?"],
             "output": ["a cat", "black"]},
            {"image": "b.jpg", "instruction": "describe", "output": "a dog"},
            {"image": "c.jpg", "instruction": ["one", "two"], "output": ["only one"]}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    samples, report = read(tmp_path / "m.json", skip_bad=True)
    assert chat(samples[0]) == [("user", "<image> what is it?"), ("assistant", "a cat"), ("user", "colour?"),
                                ("assistant", "black")]
    assert chat(samples[1])[0] == ("user", "<image>\ndescribe")
    assert "m.json:" in report.examples[0] and "2 'instruction' turns but 1 'output' turns" in report.examples[0]


def test_caption_records_give_one_sample_per_caption(tmp_path):
    (tmp_path / "anno.json").write_text(json.dumps([{"image_path": "i/a.png", "prompt": "a dog, oil painting"}]))
    (sample,), _ = read(tmp_path / "anno.json", caption_prompts=["describe"])
    assert chat(sample) == [("user", "<image>\ndescribe"), ("assistant", "a dog, oil painting")]
    rows = [{"id": "1", "image": "b.jpg", "captions": ["a cat", "a black cat"], "instances": []}]
    samples, _ = read(jsonl(tmp_path / "c.jsonl", rows))
    assert [s.messages[1]["content"] for s in samples] == ["a cat", "a black cat"]
    assert samples[0].meta == {"id": "1", "instances": []}


def test_content_parts_openai_and_llamafactory_v1(tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]},
                          {"role": "assistant", "content": "Kane."}], "images": ["1.jpg"]},
            {"messages": [{"role": "user", "content": [{"type": "text", "value": "And?"},
                                                       {"type": "image_url", "value": "2.jpg"}], "loss_weight": 0.0},
                          {"role": "assistant", "content": [{"type": "text", "value": "Muller."}]}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "3.jpg"}}]},
                          {"role": "assistant", "content": "x"}], "images": ["4.jpg"]},
            {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]},
                          {"role": "assistant", "content": "x"}]}]
    samples, report = read(jsonl(tmp_path / "p.jsonl", rows), skip_bad=True)
    assert chat(samples[0]) == [("user", "<image>Who?"), ("assistant", "Kane.")]
    assert samples[0].images == [str(tmp_path / "1.jpg")]
    assert chat(samples[1]) == [("user", "And?<image>"), ("assistant", "Muller.")]
    assert samples[1].images == [str(tmp_path / "2.jpg")]
    assert report.counts == {"bad_record": 1, "unsupported_media": 1}
    assert "p.jsonl:3: give each image once" in report.examples[0]
    assert "p.jsonl:4: the record has video parts; zerovl trains on images and text only" in report.examples[1]


def test_videos_are_refused_per_record_with_the_policy(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "<video>funny?"}, {"role": "assistant", "content": "yes"}],
             "videos": ["1.mp4"]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path = jsonl(tmp_path / "v.jsonl", rows)
    with pytest.raises(DataError, match=r"v.jsonl:1: the record has videos; zerovl trains on images and text only"):
        read(path)
    samples, report = read(path, skip_bad=True)
    assert len(samples) == 1 and report.counts == {"unsupported_media": 1}


def test_swift_sharegpt_pairs_and_tool_turns(tmp_path):
    rows = [{"system": "s", "conversation": [{"human": "a", "assistant": "b"}, {"human": "c", "assistant": "d"}]}]
    (sample,), _ = read(jsonl(tmp_path / "sg.jsonl", rows))
    assert chat(sample) == [("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]


# -- LLaMA-Factory dataset_info.json --------------------------------------------------------------------
@pytest.fixture
def lf_data(tmp_path):
    """A LLaMA-Factory ``data/`` folder: its registry, an alpaca file with renamed columns, a sharegpt file
    in role/content tags (its images relative to data/, the file itself in a subfolder), and entries that
    cannot train here."""
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(data / "imgs" / "1.png")
    (data / "qa.json").write_text(json.dumps([{"question": "2+2?", "answer": "4", "sys": "math", "history": [["x", "y"]]}]))
    (data / "sub" / "chat.json").write_text(json.dumps([{"messages": [
        {"role": "user", "content": "<image>who?"}, {"role": "assistant", "content": "me"}], "images": ["imgs/1.png"]}]))
    info = {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer", "system": "sys"}},
        "chat": {"file_name": "sub/chat.json", "formatting": "sharegpt",
                 "columns": {"messages": "messages", "images": "images"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
        "hub": {"hf_hub_url": "someone/set"},
        "dpo": {"file_name": "qa.json", "ranking": True},
        "gone": {"file_name": "gone.json"},
    }
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return data


def test_dataset_info_entries_read_with_their_columns_tags_and_media_dir(lf_data):
    samples, _ = read(f"{lf_data}/dataset_info.json#qa,chat")
    qa, lf_chat = samples
    # only mapped columns are read: 'history' is not mapped, as in LLaMA-Factory
    assert chat(qa) == [("system", "math"), ("user", "2+2?"), ("assistant", "4")]
    assert chat(lf_chat) == [("user", "<image>who?"), ("assistant", "me")]
    assert lf_chat.images == [str(lf_data / "imgs" / "1.png")]  # relative to data/, not data/sub/
    assert lf_chat.source == f"{lf_data / 'sub' / 'chat.json'}:1"
    same, _ = read(f"{lf_data}#chat")  # the folder, like LLaMA-Factory's dataset_dir
    assert chat(same[0]) == chat(lf_chat)
    spec = DataSettings(train=f"{lf_data}/dataset_info.json#qa,chat").train_datasets()[0]
    assert resolve_format(spec).format == "dataset_info"
    assert data_files(spec) == [str(lf_data / "dataset_info.json"), str(lf_data / "qa.json"),
                                str(lf_data / "sub" / "chat.json")]


@pytest.mark.parametrize("name,says", [
    ("qaa", r"no dataset 'qaa' \(did you mean qa\?\)"),
    ("hub", r"#hub: the entry has no file_name, only a hub or script source \(someone/set\); zerovl never downloads"),
    ("dpo", r"#dpo: preference data .* zerovl trains supervised fine-tuning"),
    ("gone", r"#gone: file_name gone.json not found in .*data"),
])
def test_dataset_info_entries_that_cannot_train_are_refused(lf_data, name, says):
    with pytest.raises(DataError, match=says) as err:
        read(f"{lf_data}/dataset_info.json#{name}")
    assert "\n" not in str(err.value)


def test_dataset_info_without_a_name_lists_the_local_entries(lf_data):
    with pytest.raises(DataError, match=r"dataset_info.json#qa \(entries: qa, chat, hub, dpo, gone\)"):
        read(lf_data / "dataset_info.json")
    with pytest.raises(DataError, match=r"name the datasets to train after '#'.*local files: qa, chat, dpo, gone"):
        read(lf_data / "dataset_info.json", fmt="dataset_info")


# -- image paths written relative to another root -----------------------------------------------------
def test_image_paths_are_found_where_other_tools_resolve_them(tmp_path, caplog):
    root = tmp_path / "llamafactory"
    (root / "mllm_demo_data").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "mllm_demo_data" / "1.jpg")
    resolve = ImageResolver(str(root), "v1.jsonl")
    # LLaMA-Factory v1 writes data/mllm_demo_data/1.jpg (relative to its repository root)
    assert resolve("data/mllm_demo_data/1.jpg", "s") == str(root / "mllm_demo_data" / "1.jpg")
    assert resolve("data/mllm_demo_data/2.jpg", "s") == str(root / "mllm_demo_data" / "2.jpg")  # same directory
    assert resolve("elsewhere/3.jpg", "s") == str(root / "elsewhere" / "3.jpg")  # found nowhere: as written
    repo = tmp_path / "repo"
    (repo / "data" / "d").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(repo / "data" / "d" / "x.png")
    # under the real layout (data/ inside the repository) the repository root itself holds it
    assert ImageResolver(str(repo / "data"))("data/d/x.png", "s") == str(repo / "data" / "d" / "x.png")
    assert ImageResolver(str(repo / "data"))("d/x.png", "s") == str(repo / "data" / "d" / "x.png")


def test_the_cache_fingerprints_the_format_auto_resolves_to(scenes, lf_data):
    """A cache prepared with an explicit format still matches under auto (and the other way round); a
    dataset_info source is fingerprinted by its registry and every entry file."""
    from transformers import AutoTokenizer

    from zerovl.data.cache import fingerprint
    from zerovl.data.template import ChatTemplate

    template = ChatTemplate(AutoTokenizer.from_pretrained(scenes["tokenizer"]), "<image>", 2)
    tokenizer = str(scenes["tokenizer"])
    auto = fingerprint(template, DataSettings(train=str(scenes["train"])), tokenizer)
    explicit = fingerprint(template, DataSettings(train=str(scenes["train"]), format="messages"), tokenizer)
    assert auto == explicit and auto["datasets"][0]["format"] == "messages"
    info = fingerprint(template, DataSettings(train=f"{lf_data}#qa,chat"), tokenizer)["datasets"][0]
    assert info["format"] == "dataset_info"
    assert [f["path"] for f in info["files"]] == [str(lf_data / n) for n in ("dataset_info.json", "qa.json",
                                                                             "sub/chat.json")]
