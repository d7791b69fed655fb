"""Data files as editors leave them: a UTF-8 BOM and CRLF line endings are accepted; bytes that are not
UTF-8 are one line naming the file, line, byte and column (or a skipped, counted record under
data.skip_bad_samples); an empty file names itself and the config key it came from — never a traceback."""

import json

import pytest

from tests.conftest import tiny_config, write_config
from zerovl.cli import main
from zerovl.config import DataSettings
from zerovl.data.readers import ReadReport, read_dataset
from zerovl.errors import DataError

BOM = b"\xef\xbb\xbf"


def read(path, fmt="auto", skip_bad=False, key="data.train"):
    spec = DataSettings(datasets=[{"path": str(path), "format": fmt}]).train_datasets()[0]
    report = ReadReport(skip_bad=skip_bad, key=key)
    return read_dataset(spec, report), report


def line(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


def chat(question: str, answer: str = "ok") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("fmt", ["auto", "messages"])
def test_bom_and_crlf_are_accepted_in_json_lines_arrays_and_csv(tmp_path, fmt):
    (tmp_path / "m.jsonl").write_bytes(BOM + b"\r\n".join(line(chat(q)) for q in ("a", "b", "café")) + b"\r\n")
    samples, _ = read(tmp_path / "m.jsonl", fmt)
    assert [s.messages[0]["content"] for s in samples] == ["a", "b", "café"]
    assert samples[2].source.endswith("m.jsonl:3")
    array = json.dumps([chat("a"), chat("b")], indent=1).replace("\n", "\r\n").encode()
    (tmp_path / "m.json").write_bytes(BOM + array)
    samples, _ = read(tmp_path / "m.json", fmt)
    assert len(samples) == 2 and samples[1].source.endswith(f"m.json:{array.decode().splitlines().index(' {', 2) + 1}")


def test_bom_and_crlf_in_tables_and_coco(tmp_path):
    (tmp_path / "a.csv").write_bytes(BOM + b"instruction,output\r\nhi,there\r\n\"two\r\nlines\",x\r\n")
    samples, _ = read(tmp_path / "a.csv")  # the BOM would otherwise hide the 'instruction' column
    assert [s.messages[0]["content"] for s in samples] == ["hi", "two\nlines"]
    assert samples[1].source.endswith("a.csv:3")
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 1, "caption": "c"}]}
    (tmp_path / "captions.json").write_bytes(BOM + json.dumps(coco, indent=1).replace("\n", "\r\n").encode())
    assert read(tmp_path / "captions.json")[0][0].messages[1]["content"] == "c"


def test_non_utf8_bytes_name_file_line_byte_and_column_or_are_skipped(tmp_path):
    good, bad = line(chat("fine")), line(chat("caf")).replace(b"caf", b"caf\xe9")
    (tmp_path / "m.jsonl").write_bytes(b"\n".join([good, bad, good]) + b"\n")
    message = f"{tmp_path / 'm.jsonl'}: line 2 is not UTF-8 (byte 0xe9 at column 47); re-save the file as UTF-8"
    with pytest.raises(DataError) as err:
        read(tmp_path / "m.jsonl")
    assert str(err.value) == message
    samples, report = read(tmp_path / "m.jsonl", skip_bad=True)
    assert len(samples) == 2 and report.counts == {"not_utf8": 1} and report.examples == [message]

    array = b"[\n" + good + b",\n  " + bad + b"\n]"
    (tmp_path / "m.json").write_bytes(array)
    with pytest.raises(DataError, match=r"m.json: line 3 is not UTF-8 \(byte 0xe9 at column 49\)"):
        read(tmp_path / "m.json")
    assert len(read(tmp_path / "m.json", skip_bad=True)[0]) == 1

    (tmp_path / "t.csv").write_bytes(b"instruction,output\nok,fine\n\xff\xfe,x\n")
    with pytest.raises(DataError, match=r"t.csv: line 3 is not UTF-8 \(byte 0xff in column 'instruction'\)"):
        read(tmp_path / "t.csv")
    assert len(read(tmp_path / "t.csv", skip_bad=True)[0]) == 1


def test_non_utf8_in_whole_document_files(tmp_path):
    coco = json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                       "annotations": [{"id": 1, "image_id": 1, "caption": "ok"},
                                       {"id": 2, "image_id": 1, "caption": "BAD"}]}).encode()
    (tmp_path / "captions.json").write_bytes(coco.replace(b"BAD", b"caf\xe9"))
    with pytest.raises(DataError, match=r"captions.json:annotations\[1\]: its caption or file name is not UTF-8"):
        read(tmp_path / "captions.json", "coco")
    samples, report = read(tmp_path / "captions.json", "coco", skip_bad=True)
    assert len(samples) == 1 and report.counts == {"not_utf8": 1}
    (tmp_path / "dataset_info.json").write_bytes(b'{\n "x": {"file_name": "\xe9.json"}\n}')
    with pytest.raises(DataError, match=r"dataset_info.json: line 2 is not UTF-8 \(byte 0xe9 at column 22\)"):
        read(f"{tmp_path}/dataset_info.json#x")


@pytest.mark.parametrize("content", [b"", b"  \r\n\n", BOM])
@pytest.mark.parametrize("fmt", ["auto", "messages", "csv"])
def test_an_empty_file_names_itself_and_its_config_key(tmp_path, content, fmt):
    path = tmp_path / ("e.csv" if fmt == "csv" else "e.jsonl")
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read(path, fmt, key="data.val")
    assert str(err.value) == (f"{path}: the file is empty (from data.val); put records in it or point data.val "
                              "at another file")


def test_a_file_with_no_records_says_so(tmp_path):
    (tmp_path / "none.json").write_text("[]\n")
    (tmp_path / "header.csv").write_text("image,text\n")
    for name, fmt in (("none.json", "messages"), ("none.json", "auto"), ("header.csv", "csv")):
        with pytest.raises(DataError, match=rf"{name}: holds no records \(from data.datasets\[2\]\)"):
            read(tmp_path / name, fmt, key="data.datasets[2]")


def test_empty_val_file_is_one_line_from_the_cli(scenes, tmp_path, capsys):
    (tmp_path / "val.jsonl").write_bytes(b"")
    cfg = tiny_config(scenes, tmp_path / "run", data={"val": str(tmp_path / "val.jsonl")})
    assert main(["data", "check", str(write_config(cfg, tmp_path / "cfg.yaml"))]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"zerovl: error: {tmp_path / 'val.jsonl'}: the file is empty (from data.val); put records in it " \
                  "or point data.val at another file"
