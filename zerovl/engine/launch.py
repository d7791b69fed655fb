"""Start ranks with torchrun on the user's behalf, and say why they failed in the ranks' own words.

When a rank fails, torchrun ends with its own traceback and a summary whose ``traceback :`` field
reads "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"; the real cause
— the rank's ``zerovl: error: ...`` line, or the last line of its Python traceback — sits further up
among the ranks' output, where nobody looks. ``zerovl demo``, ``zerovl bench`` and the benchmark
scripts all launch through :func:`run_ranks`, which keeps the combined output in a log file (and
echoes it live when asked, up to where torchrun starts tearing down) and pulls that line out with
:func:`rank_error`, so each of them can report it instead of the launcher's boilerplate.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ERROR_PREFIX = "zerovl: error: "
_CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
# the first line torchrun's agent writes once a rank has died: everything after it is teardown
_TEARDOWN = re.compile(rb"^[EW]\d{4} [\d:.]+ \d+ \S*torch/distributed/elastic/\S+\] "
                       rb"(failed \(exitcode|Sending process \d+ closing signal)", re.M)
_RANK_PREFIX = re.compile(r"^\[(rank|default)\d+\]:")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failed|Warning)\w*)(:.*)?$")


def torchrun(nproc: int, *target: str) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N TARGET...`` for this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]


@dataclass
class Launch:
    """How a launch ended: torchrun's exit code, the failed rank's own exit code when torchrun
    reported one, and the line that says why (None when it succeeded)."""

    exit_code: int
    wall_s: float
    log_path: Path
    error: str | None = None
    rank_exit_code: int | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def reason(self) -> str:
        """The error without its ``zerovl: error:`` prefix, for embedding in another message."""
        text = self.error or f"exit code {self.exit_code}"
        return text[len(ERROR_PREFIX):] if text.startswith(ERROR_PREFIX) else text


def run_ranks(cmd: list[str], log_path: str | Path, echo: bool = False, timeout: float | None = None,
              env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Launch:
    """Run ``cmd`` (a torchrun command line) with stdout and stderr combined into ``log_path``.

    ``echo``: also copy the output to this process's stdout as it comes (progress bars included),
    stopping where torchrun starts tearing down so its boilerplate stays in the log only.
    ``timeout``: seconds before the whole process group is killed (it then runs in its own session,
    so only torchrun and its ranks are hit)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.perf_counter()
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=timeout is not None)
        copier = threading.Thread(target=_copy, args=(proc.stdout, log, echo), daemon=True)
        copier.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: torchrun and its ranks only
            code, timed_out = proc.wait(), True
        except BaseException:  # Ctrl-C or an error here: never leave ranks running
            _stop(proc, own_session=timeout is not None)
            raise
        finally:
            copier.join(timeout=30)
    wall = time.perf_counter() - started
    result = Launch(code, wall, log_path, timed_out=timed_out)
    if code != 0:
        text = log_path.read_text(errors="replace")
        result.error = f"timed out after {timeout:.0f} s" if timed_out else rank_error(text)
        result.rank_exit_code = root_cause_exit_code(text)
    return result


def _copy(stream, log, echo: bool) -> None:
    muted = not echo
    while chunk := os.read(stream.fileno(), 65536):
        log.write(chunk)
        log.flush()
        if muted:
            continue
        teardown = _TEARDOWN.search(chunk)
        if teardown:
            chunk, muted = chunk[:teardown.start()], True
        out = getattr(sys.stdout, "buffer", None)  # None when something (a test) replaced stdout
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
    stream.close()


def _stop(proc: subprocess.Popen, own_session: bool) -> None:
    try:
        if own_session:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()  # torchrun passes SIGTERM on to its ranks
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        if own_session:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


def rank_error(text: str) -> str:
    """The line that says why a torchrun launch failed, from its combined output: the first
    ``zerovl: error:`` line; else the last line of a rank's Python traceback (torchrun's own
    ``ChildFailedError`` traceback is skipped); else what torchrun's summary says of the first
    failed rank (a signal, an exit code)."""
    # torch prefixes an uncaught exception's lines with "[rank0]:" once a process group exists
    lines = [_RANK_PREFIX.sub("", line).strip() for line in re.split(r"[\r\n]+", text)]
    for line in lines:
        if ERROR_PREFIX in line:
            return line[line.index(ERROR_PREFIX):]
    last_exception = None
    in_traceback = False
    for line in lines:
        if line == "Traceback (most recent call last):":
            in_traceback = True
        elif in_traceback and _EXCEPTION_LINE.match(line):
            in_traceback = False
            if line.startswith(_CHILD_FAILED):
                break  # torchrun's own traceback: the ranks' came before it
            last_exception = line
    if last_exception is not None:
        return last_exception
    return _root_cause_summary(text) or "the ranks failed without an error message (see the log)"


def _root_cause(text: str) -> dict[str, str]:
    block = text.split("Root Cause (first observed failure):", 1)
    if len(block) < 2:
        return {}
    fields = {}
    for line in block[1].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("rank", "exitcode", "traceback"):
            fields.setdefault(key.strip(), value.strip())
    return fields


def root_cause_exit_code(text: str) -> int | None:
    """The first failed rank's exit code as torchrun's summary gives it (torchrun itself exits 1)."""
    match = re.match(r"-?\d+", _root_cause(text).get("exitcode", ""))
    return int(match.group()) if match else None


def _root_cause_summary(text: str) -> str | None:
    cause = _root_cause(text)
    if not cause:
        return None
    rank = cause.get("rank", "?").split(" ")[0]
    detail = cause.get("traceback", "")
    if detail.startswith("Signal"):
        return f"rank {rank}: {detail} (killed from outside; out of memory is the usual reason)"
    return f"rank {rank} exited with code {cause.get('exitcode', '?').split(' ')[0]} and printed no error"
