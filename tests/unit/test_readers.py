"""Every format reader yields the same Sample, names the record at fault, and handles multi-image and
interleaved <image> tags; webdataset shards stream and resume by shard and offset."""

import csv
import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from zerovl.config import ConfigError, DataSettings, from_dict
from zerovl.data.readers import READERS, ReadReport, read_dataset
from zerovl.data.samples import Sample
from zerovl.data.template import ChatTemplate
from zerovl.errors import DataError

CHAT = [{"role": "user", "content": "<image>what colour is the circle ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and this one <image> ?"},
        {"role": "assistant", "content": "blue"}]


def spec(path, fmt, **options):
    return DataSettings(datasets=[{"path": str(path), "format": fmt, **options}]).train_datasets()[0]


def read(path, fmt, skip_bad=False, **options):
    report = ReadReport(skip_bad=skip_bad)
    return read_dataset(spec(path, fmt, **options), report), report


def as_turns(messages, speaker="from", text="value", names=("human", "gpt")):
    role_name = {"user": names[0], "assistant": names[1], "system": "system"}
    return [{speaker: role_name[m["role"]], text: m["content"]} for m in messages]


def test_registry_covers_every_config_format():
    from typing import get_args

    from zerovl.config import DataFormat

    assert set(READERS) == set(get_args(DataFormat))


def test_messages_llava_and_sharegpt_give_the_same_interleaved_multi_image_sample(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": CHAT, "images": ["a.png", "b.png"]}) + "\n")
    llava = [{"id": "x", "image": ["a.png", "b.png"], "conversations": as_turns(CHAT)}]
    (tmp_path / "l.json").write_text(json.dumps(llava, indent=2))
    (tmp_path / "s.jsonl").write_text(json.dumps({"messages": as_turns(CHAT, "role", "content", ("user", "assistant")),
                                                  "images": ["a.png", "b.png"]}) + "\n")
    got = [read(tmp_path / n, f)[0][0] for n, f in (("m.jsonl", "messages"), ("l.json", "llava"),
                                                      ("s.jsonl", "sharegpt"))]
    for sample in got:
        assert sample.messages == CHAT
        assert sample.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert got[1].source == f"{tmp_path / 'l.json'}:2"  # the line where the record starts in the array
    assert got[1].meta == {"id": "x"}


def test_json_array_errors_name_the_line_of_the_record(tmp_path):
    good = {"image": "a.png", "conversations": as_turns(CHAT[:2])}
    bad = {"image": "a.png", "conversations": as_turns(CHAT)}  # two tags, one image
    text = json.dumps([good, good, bad], indent=2)
    (tmp_path / "l.json").write_text(text)
    starts = [i + 1 for i, row in enumerate(text.splitlines()) if row == "  {"]
    assert len(starts) == 3
    with pytest.raises(DataError, match=rf"l.json:{starts[2]}: 2 <image> tag\(s\) in the text but 1 image"):
        read(tmp_path / "l.json", "llava")
    samples, report = read(tmp_path / "l.json", "llava", skip_bad=True)
    assert len(samples) == 2 and report.counts == {"tag_mismatch": 1}


def test_sharegpt_system_and_speaker_names(tmp_path):
    rows = [{"system": "you are helpful", "conversations": as_turns(CHAT[:2]), "images": "a.png"},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "x"}]},
            {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{}"},
                               {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"s.jsonl:2: turn 1 has speaker 'narrator'"):
        read(tmp_path / "s.jsonl", "sharegpt")
    samples, report = read(tmp_path / "s.jsonl", "sharegpt", skip_bad=True)
    assert samples[0].messages[0] == {"role": "system", "content": "you are helpful"}
    assert samples[0].images == [str(tmp_path / "a.png")] and report.skipped == 1
    # LLaMA-Factory tool turns: the call is the model's, the tool's result is input to it
    assert [m["role"] for m in samples[1].messages] == ["user", "assistant", "user", "assistant"]


def test_coco_captions_become_prompted_samples_deterministically(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "one.jpg"}, {"id": 2, "file_name": "two.jpg"}],
            "annotations": [{"id": 10 + i, "image_id": 1 + i % 2, "caption": f"a caption {i}"} for i in range(40)]
            + [{"id": 99, "image_id": 7, "caption": "orphan"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    prompts = ["describe <image> please", "caption:"]
    with pytest.raises(DataError, match=r"c.json:annotations\[40\]: image_id 7 has no entry"):
        read(tmp_path / "c.json", "coco", caption_prompts=prompts)
    samples, report = read(tmp_path / "c.json", "coco", skip_bad=True, caption_prompts=prompts,
                           image_root=str(tmp_path / "imgs"))
    assert len(samples) == 40 and report.counts == {"bad_record": 1}
    assert samples[1].images == [str(tmp_path / "imgs" / "two.jpg")]
    assert samples[1].messages[1] == {"role": "assistant", "content": "a caption 1"}
    users = [s.messages[0]["content"] for s in samples]
    assert set(users) == {"describe <image> please", "<image>\ncaption:"}  # both prompts used, tag added once
    again, _ = read(tmp_path / "c.json", "coco", skip_bad=True, caption_prompts=prompts)
    assert [s.messages[0]["content"] for s in again] == users  # same prompt per annotation every time


def test_csv_and_tsv_with_custom_columns_multi_image_and_line_numbers(tmp_path):
    rows = [["path", "question", "answer"],
            ["a.png", "what is <image> ?", "a circle"],
            ['["a.png", "b.png"]', "compare <image> with\n<image>", "same"],  # quoted cell spans two lines
            ["a.png", "two tags <image> <image>", "oops"]]
    for name, delim in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f, delimiter=delim).writerows(rows)
        fmt = name.split(".")[1]
        options = {"image_column": "path", "text_column": "answer", "prompt_column": "question"}
        with pytest.raises(DataError, match=rf"{name}:5: 2 <image> tag\(s\) in the text but 1 image"):
            read(tmp_path / name, fmt, **options)  # line 5: the 2-line quoted cell shifted it
        samples, report = read(tmp_path / name, fmt, skip_bad=True, **options)
        assert [len(s.images) for s in samples] == [1, 2] and report.counts == {"tag_mismatch": 1}
        assert samples[1].messages[0]["content"] == "compare <image> with\n<image>"
        assert samples[1].source.endswith(f"{name}:3")
    with pytest.raises(DataError, match=r"d.csv:1: no column 'image' for image_column \(header: path, question"):
        read(tmp_path / "d.csv", "csv")


def test_csv_without_prompt_column_uses_caption_prompts(tmp_path):
    (tmp_path / "c.csv").write_text("image,text\nx.png,a red circle\n,how many sides does a square have ? four\n")
    samples, _ = read(tmp_path / "c.csv", "csv", caption_prompts=["describe ."])
    assert samples[0].messages[0]["content"] == "<image>\ndescribe ." and samples[0].images == [str(tmp_path / "x.png")]
    assert samples[1].images == [] and "<image>" not in samples[1].messages[0]["content"]


def test_mixture_config_inherits_reader_options_and_rejects_ambiguity(tmp_path):
    data = DataSettings(image_root=str(tmp_path), text_column="caption",
                        datasets=[{"path": "a.csv", "format": "csv", "weight": 3},
                                  {"path": "b.csv", "format": "csv", "text_column": "answer", "name": "b"}])
    a, b = data.train_datasets()
    assert (a.text_column, b.text_column) == ("caption", "answer")
    assert a.image_root == b.image_root == str(tmp_path) and (a.weight, b.label) == (3, "b")
    base = {"model": {"llm": {"config": {"model_type": "qwen2"}}, "tokenizer": "t"}}
    with pytest.raises(ConfigError, match="data.train .* or data.datasets"):
        from_dict({**base, "data": {"train": "x.jsonl", "datasets": [{"path": "y.jsonl"}]}})
    with pytest.raises(ConfigError, match=r"data.datasets.0: unknown key 'wieght' in a dataset entry \(did you mean weight\?\)"):
        from_dict({**base, "data": {"datasets": [{"path": "y.jsonl", "wieght": 2}]}})
    with pytest.raises(ConfigError, match="data.datasets.0.weight: Input should be greater than 0"):
        from_dict({**base, "data": {"datasets": [{"path": "y.jsonl", "weight": 0}]}})


# -- webdataset -------------------------------------------------------------------------------------------
def png_bytes(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def caption_record(i: int) -> dict[str, bytes]:
    return {"png": png_bytes(i), "txt": f"caption {i}".encode()}


def test_webdataset_reader_chat_caption_multi_image_and_errors(tmp_path):
    pytest.importorskip("webdataset")
    chat = {"messages": CHAT, "images": ["0.png", "1.png"]}
    write_shard(tmp_path / "s-000.tar", {
        "k0": caption_record(0),
        "k1": {"0.png": png_bytes(1), "1.png": png_bytes(2), "json": json.dumps(chat).encode()},
        "k2": {"png": png_bytes(3), "json": json.dumps({"messages": CHAT}).encode()},  # 2 tags, 1 image
    })
    write_shard(tmp_path / "s-001.tar", {"k3": {"json": json.dumps({"caption": "c", "prompt": "say"}).encode(),
                                                "jpg": png_bytes(4)}})
    pattern = str(tmp_path / "s-{000..001}.tar")
    with pytest.raises(DataError, match=r"s-000.tar:k2: 2 <image> tag\(s\) in the text but 1 image"):
        read(pattern, "webdataset")
    samples, report = read(pattern, "webdataset", skip_bad=True, caption_prompts=["what is it ?"])
    assert [s.source.rsplit("/", 1)[1] for s in samples] == ["s-000.tar:k0", "s-000.tar:k1", "s-001.tar:k3"]
    assert samples[0].messages == [{"role": "user", "content": "<image>\nwhat is it ?"},
                                   {"role": "assistant", "content": "caption 0"}]
    assert samples[1].messages == CHAT and samples[1].meta["image_bytes"] == [png_bytes(1), png_bytes(2)]
    assert samples[2].messages[0]["content"] == "<image>\nsay" and report.counts == {"tag_mismatch": 1}
    with pytest.raises(DataError, match="shard .*s-002.tar not found"):
        read(str(tmp_path / "s-{000..009}.tar"), "webdataset")


class _Proc:
    def __call__(self, images):
        return {"pixel_values": torch.stack([torch.tensor(im.getpixel((0, 0))[:1], dtype=torch.float32)
                                             for im in images])}


def _stream(tmp_path, scenes, world, rank, num_shards=3, per_shard=7, batch=2):
    from zerovl.data.streaming import ShardSampler, WebDatasetStream

    paths = [write_shard(tmp_path / f"w-{s}.tar", {f"{s}-{i:03d}": caption_record(s * per_shard + i)
                                                   for i in range(per_shard)}) for s in range(num_shards)]
    tok = AutoTokenizer.from_pretrained(scenes["tokenizer"])
    tpl = ChatTemplate(tok, "<image>", 2)
    sampler = ShardSampler.scan(paths, batch, rank, world, shuffle=True, seed=5)
    stream = WebDatasetStream(sampler, spec(tmp_path / "w-{0..2}.tar", "webdataset", caption_prompts=["what ?"]),
                              tpl, _Proc(), 64, 10_000)
    return sampler, stream


def _ids(batch):  # the shade of each image is its sample number
    return [int(x) for x in batch["pixel_values"].flatten()]


def test_webdataset_stream_is_resumable_by_shard_and_offset_across_world_sizes(tmp_path, scenes):
    pytest.importorskip("webdataset")
    from zerovl.data.loader import BatchStream

    def run(world, steps, state=None):
        streams = []
        for rank in range(world):
            sampler, ds = _stream(tmp_path, scenes, world, rank)
            stream = BatchStream(ds, sampler, _Collate())
            if state is not None:
                stream.load_state_dict(state)
            streams.append(stream)
        taken = [i for _ in range(steps) for s in streams for i in _ids(s.next())]
        return taken, streams[0].state_dict()

    # 3 shards x 7 samples; 2 ranks x 2 per micro-batch: 6 micro-batches each = the epoch + 1 wrapped pad
    full, _ = run(2, 6)
    assert len(full) == 22 and set(full) == set(range(21))
    first, state = run(2, 2)
    assert first == full[:8]  # deterministic
    assert state["consumed"] == 8 and {"shard", "offset", "shard_path"} <= set(state)
    assert 8 == 7 * state["shard"] + state["offset"]  # where the 9th sample of the epoch's shard order lies
    rest, _ = run(3, 3, state)  # resumed on 3 ranks: the other 13 samples (+2 wrapped pads), none repeated
    assert len(rest) == 15 and set(first) | set(rest) == set(range(21)) and not set(first) & set(rest)
    changed = dict(state, shard_path="/elsewhere.tar")
    with pytest.raises(DataError, match="webdataset shards changed since the checkpoint"):
        run(2, 1, changed)


def test_webdataset_stream_workers_keep_the_order(tmp_path, scenes):
    pytest.importorskip("webdataset")
    from zerovl.data.loader import BatchStream

    orders = []
    for workers in (0, 2):
        sampler, ds = _stream(tmp_path, scenes, 1, 0)
        stream = BatchStream(ds, sampler, _Collate(), num_workers=workers)
        orders.append([i for _ in range(6) for i in _ids(stream.next())])
    assert orders[0] == orders[1] and len(set(orders[0])) == 12


class _Collate:
    def __call__(self, items):
        from zerovl.data.collate import pad_collate

        return pad_collate(items, 0)


def test_sample_dataclass_is_what_every_reader_returns(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": CHAT[:2], "images": ["a.png"], "type": "q"}) + "\n")
    sample = read(tmp_path / "m.jsonl", "messages")[0][0]
    assert isinstance(sample, Sample) and sample.meta == {"type": "q"}


def test_webdataset_val_set_loads_images_from_the_shard(tmp_path, scenes):
    pytest.importorskip("webdataset")
    from zerovl.data.dataset import build_dataset

    write_shard(tmp_path / "v-0.tar", {f"k{i}": caption_record(10 + i) for i in range(3)})
    data = DataSettings(train="unused.jsonl", val=str(tmp_path / "v-0.tar"), format="webdataset",
                        caption_prompts=["what ?"], max_length=64)
    tpl = ChatTemplate(AutoTokenizer.from_pretrained(scenes["tokenizer"]), "<image>", 2)
    val = build_dataset(data.val, data, tpl, _Proc(), "data.val")
    assert [int(val[i]["pixel_values"][0, 0]) for i in range(3)] == [10, 11, 12]
    assert int(val.load_images(val.samples[2])["pixel_values"][0, 0]) == 12  # what evaluation uses
