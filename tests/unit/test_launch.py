"""The torchrun launcher helper reports a failed rank's own error line, never torchrun's boilerplate."""

import sys

from zerovl.engine.launch import rank_error, root_cause_exit_code, run_ranks

TORCHRUN_TAIL = """\
W1202 02:32:22.524000 11489 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 11515 closing signal SIGTERM
E1202 02:32:22.596000 11489 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2) local_rank: 1 (pid: 11516) of binary: python
Traceback (most recent call last):
  File "/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
zerovl FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_02:32:22
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 11516)
  error_file: <N/A>
  traceback : {traceback}
============================================================
"""
BOILERPLATE = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"


def _tail(code=2, traceback=BOILERPLATE):
    return TORCHRUN_TAIL.format(code=code, traceback=traceback)


def test_the_ranks_zerovl_error_line_wins():
    text = "train:  40%|####      | 2/5\rzerovl: error: [rank 1] data file /x/train.jsonl not found\n" + _tail()
    assert rank_error(text) == "zerovl: error: [rank 1] data file /x/train.jsonl not found"
    assert root_cause_exit_code(text) == 2


def test_else_the_last_line_of_the_ranks_traceback():
    rank = ('Traceback (most recent call last):\n  File "x.py", line 3, in <module>\n    raise KeyError("a")\n'
            "KeyError: 'a'\n\nDuring handling of the above exception, another exception occurred:\n\n"
            'Traceback (most recent call last):\n  File "x.py", line 5, in <module>\n'
            "    raise ValueError('boom')\nValueError: boom\n")
    assert rank_error(rank + _tail(code=1)) == "ValueError: boom"


def test_else_what_torchrun_says_of_the_first_failed_rank():
    killed = _tail(code=-9, traceback="Signal 9 (SIGKILL) received by PID 11516")
    assert rank_error(killed).startswith("rank 1: Signal 9 (SIGKILL) received by PID 11516")
    assert rank_error(_tail(code=3)) == "rank 1 exited with code 3 and printed no error"
    assert BOILERPLATE not in rank_error(_tail())


def test_run_ranks_logs_everything_and_reports_the_error(tmp_path, capsys):
    script = "import sys; print('step 1', flush=True); sys.exit(\"zerovl: error: bad thing\")"
    launch = run_ranks([sys.executable, "-c", script], tmp_path / "log" / "ranks.log", echo=True)
    assert not launch.ok and launch.exit_code == 1
    assert launch.error == "zerovl: error: bad thing" and launch.reason == "bad thing"
    assert "step 1" in (tmp_path / "log" / "ranks.log").read_text()
    assert "step 1" in capsys.readouterr().out  # echoed live
    ok = run_ranks([sys.executable, "-c", "print('fine')"], tmp_path / "ok.log", timeout=60)
    assert ok.ok and ok.error is None


def test_run_ranks_timeout_kills_the_group(tmp_path):
    launch = run_ranks([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "t.log", timeout=1)
    assert launch.timed_out and not launch.ok and launch.error == "timed out after 1 s"
    assert launch.wall_s < 30
