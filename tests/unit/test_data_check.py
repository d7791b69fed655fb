"""``zerovl data check``: every kind of broken record is counted and named, lengths are reported, and
the exit code follows --max-error-rate."""

import json

import pytest
from PIL import Image

from tests.conftest import tiny_config, write_config
from zerovl.cli import main


def chat(question, answer, images=()):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": list(images)}


@pytest.fixture
def messy(scenes, tmp_path):
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    good = [chat("<image>what colour is the shape ?", "red", ["ok.png"]) for _ in range(12)]
    lines = [json.dumps(r) for r in good]
    lines += [json.dumps(chat("<image>what colour ?", "red", ["missing.png"])),         # line 13
              json.dumps(chat("<image>what colour ?", "red", ["corrupt.png"])),         # line 14
              json.dumps(chat("<image> <image> two tags", "red", ["ok.png"])),          # line 15
              "{not json",                                                               # line 16
              json.dumps(chat(" what colour is the shape ?" * 12 + "<image>", "red", ["ok.png"]))]  # 17: image cut
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(scenes, tmp_path / "run", data={"train": str(tmp_path / "train.jsonl"), "val": None,
                                                      "max_length": 48})
    return write_config(cfg, tmp_path / "cfg.yaml"), tmp_path


def test_check_counts_each_problem_and_follows_the_error_threshold(messy, capsys):
    config, tmp = messy
    code = main(["data", "check", str(config), "--out", str(tmp / "report")])
    out = capsys.readouterr().out
    assert code == 1 and "FAILED: 4 broken of 17 records" in out
    report = json.loads((tmp / "report" / "data_check.json").read_text())
    (train,) = report["datasets"]
    assert train["errors"] == {"missing_image": 1, "corrupt_image": 1, "tag_mismatch": 1, "bad_record": 1}
    assert train["over_max_length"] == {"image_tokens_cut": 1}
    assert train["records"] == 17 and train["usable"] == 13 and train["kept"] == 12
    examples = "\n".join(train["examples"])
    for where in ("train.jsonl:13: image", "train.jsonl:14: image", "train.jsonl:15: 2 <image>", "train.jsonl:16: not valid JSON"):
        assert where in examples
    assert report["samples_per_epoch"] == 12
    assert report["image_tokens_per_epoch"] == 12 * 4  # tiny tower: 4 tokens per image
    assert report["text_tokens_per_epoch"] > 12 * 5

    assert main(["data", "check", str(config), "--out", str(tmp / "report"), "--max-error-rate", "0.25"]) == 0
    assert "OK: 4 broken of 17 records = 23.53%" in capsys.readouterr().out


def test_check_draws_the_length_histogram(messy):
    pytest.importorskip("matplotlib")
    config, tmp = messy
    main(["data", "check", str(config), "--out", str(tmp / "report"), "--max-error-rate", "1"])
    png = (tmp / "report" / "token_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_check_bad_config_is_one_line(messy, capsys):
    config, tmp = messy
    assert main(["data", "check", str(config), "data.train=" + str(tmp / "nope.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.jsonl not found" in err
