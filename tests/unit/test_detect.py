"""``data.format: auto``: each format is told from a few records of its own shape, the choice is logged
once, and files that are not training data (or match nothing) say what they are in one line.
The same detection over the real peer files lives in tests/realworld/test_datasets.py."""

import json
import logging

import pytest

from zerovl.config import DataSettings
from zerovl.data.detect import detect_format
from zerovl.data.readers import ReadReport, read_dataset
from zerovl.errors import DataError

TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
FROM_VALUE = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]

# (file name, records written as JSON lines / a JSON array by the name's extension, expected format)
JSON_CASES = [
    ("messages.jsonl", [{"messages": TURNS}], "messages"),
    ("parts.jsonl", [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                                   {"role": "assistant", "content": "x"}], "images": ["a.png"]}], "messages"),
    ("lf_v1.jsonl", [{"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}]},
                                   {"role": "assistant", "content": [{"type": "text", "value": "x"}]}]}], "messages"),
    ("sharegpt.json", [{"conversations": FROM_VALUE, "system": "s"}], "sharegpt"),
    ("sharegpt_roles.json", [{"conversations": TURNS}], "sharegpt"),
    ("sharegpt_messages_from.jsonl", [{"messages": FROM_VALUE}], "sharegpt"),
    ("swift_sharegpt.jsonl", [{"conversation": [{"human": "hi", "assistant": "hello"}]}], "sharegpt"),
    ("llava.json", [{"id": "1", "image": "a.jpg", "conversations": FROM_VALUE}], "llava"),
    ("alpaca.json", [{"instruction": "add", "input": "1+1", "output": "2"}], "alpaca"),
    ("swift.jsonl", [{"query": "hi", "response": "hello", "history": [["a", "b"]]}], "swift"),
    ("swift_pre.jsonl", [{"response": "plain text"}], "swift"),
    ("minigpt4qwen.json", [{"image": "a.jpg", "instruction": ["q1", "q2"], "output": ["a1", "a2"]}], "minigpt4qwen"),
    ("image2prompt.json", [{"image_path": "a.png", "prompt": "a dog"}], "captions"),
    ("captions.jsonl", [{"image": "a.png", "captions": ["a dog", "a cat"]}], "captions"),
]


def write_records(path, records):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=2))
    return path


@pytest.mark.parametrize("name,records,expected", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_each_json_format_is_told_from_its_records(tmp_path, name, records, expected):
    path = write_records(tmp_path / name, records * 3)
    found = detect_format(str(path))
    assert found.format == expected
    assert "record at line" in found.reason


def test_mixed_records_take_the_majority(tmp_path):
    # a LLaVA file where the first record is text-only still reads as llava
    rows = [{"id": "0", "conversations": FROM_VALUE}] + [{"id": str(i), "image": "a.jpg",
                                                          "conversations": FROM_VALUE} for i in range(3)]
    assert detect_format(str(write_records(tmp_path / "l.json", rows))).format == "llava"


def test_coco_tables_shards_and_dataset_info_are_told_apart(tmp_path):
    coco = {"info": {}, "images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1,
                                                                                       "caption": "x"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))  # one line, like COCO's own files
    (tmp_path / "c2.json").write_text(json.dumps(coco, indent=2))
    (tmp_path / "t.csv").write_text("image,text\na.png,a dog\n")
    (tmp_path / "a.csv").write_text("system,instruction,input,output\n,hi,,there\n")
    (tmp_path / "s.tsv").write_text("query\tresponse\nhi\tthere\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "x.json"}}))
    found = {n: detect_format(str(tmp_path / n)).format for n in ("c.json", "c2.json", "t.csv", "a.csv", "s.tsv")}
    assert found == {"c.json": "coco", "c2.json": "coco", "t.csv": "csv", "a.csv": "alpaca", "s.tsv": "swift"}
    assert detect_format(str(tmp_path / "shards/{000..009}.tar")).format == "webdataset"
    assert detect_format(str(tmp_path / "dataset_info.json#x")).format == "dataset_info"
    assert detect_format(f"{tmp_path}#x").format == "dataset_info"  # the folder, as LLaMA-Factory's dataset_dir
    with pytest.raises(DataError, match=r"dataset_info.json is a LLaMA-Factory dataset_info.json: name the "
                                        r"datasets to train after '#', as in .*dataset_info.json#x"):
        detect_format(str(tmp_path / "dataset_info.json"))


def test_auto_is_the_default_and_shards_stream_without_reading(tmp_path):
    data = DataSettings(train=str(tmp_path / "x.jsonl"), datasets=[])
    assert data.format == "auto" and data.train_datasets()[0].format == "auto"
    shards = DataSettings(train=str(tmp_path / "s-{0..3}.tar")).train_datasets()[0]
    assert shards.format == "webdataset"  # known before any file is opened (the streamed-source checks)


@pytest.mark.parametrize("records,says", [
    ([{"question_id": 0, "image": "a.jpg", "text": "what is it?", "category": "conv"}], "evaluation questions"),
    ([{"image_id": 1, "caption": "a dog"}], "caption results"),
    ([{"ms_dataset_id": "x/y", "hf_dataset_id": "y"}], "ms-swift's registry"),
], ids=["eval-questions", "caption-results", "swift-registry"])
def test_known_non_training_files_are_refused_with_what_they_are(tmp_path, records, says):
    path = write_records(tmp_path / "f.jsonl", records)
    with pytest.raises(DataError, match=says) as err:
        detect_format(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_eval_prompt_mapping_is_refused(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps({"cat": [["describe it", "./cat.png"]]}, indent=1))
    with pytest.raises(DataError, match=r"e.json: a mapping of names to \[\[prompt, image\]\] pairs: evaluation"):
        detect_format(str(tmp_path / "e.json"))


def test_a_file_matching_nothing_says_what_it_saw_and_what_exists(tmp_path):
    path = write_records(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(DataError) as err:
        detect_format(str(path))
    message = str(err.value)
    assert "odd.jsonl: cannot tell the format: json lines whose record at line 1 has keys foo, bar" in message
    for name in ("messages", "sharegpt", "llava", "alpaca", "swift", "minigpt4qwen", "coco", "csv", "dataset_info"):
        assert f"{name} (" in message
    (tmp_path / "notes.txt").write_text("just some prose\n")
    with pytest.raises(DataError, match=r"notes.txt: not JSON, JSON lines, CSV or TSV \(first line: 'just some"):
        detect_format(str(tmp_path / "notes.txt"))
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"cols.csv: cannot tell the format: CSV header: a, b; a table needs"):
        detect_format(str(tmp_path / "cols.csv"))


def test_the_choice_is_logged_once_per_file(tmp_path, caplog):
    path = write_records(tmp_path / "once.json", [{"instruction": "q", "output": "a"}])
    spec = DataSettings(train=str(path)).train_datasets()[0]
    with caplog.at_level(logging.INFO, logger="zerovl.data.readers"):
        for _ in range(2):
            assert len(read_dataset(spec, ReadReport(key="data.train"))) == 1
    lines = [r.getMessage() for r in caplog.records if "format alpaca" in r.getMessage()]
    assert lines == [f"data.train: {path}: format alpaca (json array; record at line 2 has keys instruction, output)"]


def test_a_huge_json_array_is_detected_from_its_head(tmp_path, monkeypatch):
    import zerovl.data.records as records

    monkeypatch.setattr(records, "HEAD_BYTES", 256)  # the first record alone is longer than the first read
    rows = [{"instruction": "x" * 400, "output": "y"}] + [{"instruction": "q", "output": "a"}] * 50
    path = write_records(tmp_path / "big.json", rows)
    assert detect_format(str(path)).format == "alpaca"


def test_every_format_is_listed_in_the_no_match_message():
    from typing import get_args

    from zerovl.config import DataFormat
    from zerovl.data.detect import FORMATS

    assert set(FORMATS) | {"auto"} == set(get_args(DataFormat))
