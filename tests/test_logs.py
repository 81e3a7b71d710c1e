"""run.log: one record per line (nothing forges a line), never written through a link, and a full disk is
reported once, then the run goes on without it."""

import errno
import logging
import os
import sys

import pytest

from simmim_jax.storage import logs, safe_files


@pytest.fixture
def run_log(tmp_path, monkeypatch):
  """logs.write_to(tmp_path) for a command line whose workdir holds a newline; stopped after the test."""
  monkeypatch.setattr(sys, "argv", ["simmim-pretrain", "--workdir=/tmp/a\n2026-01-01 00:00:00,000 I forged: x"])
  monkeypatch.setattr(logs._buffer, "records", [])  # records an earlier test left for a run.log to come
  handlers = []
  yield lambda: handlers.append(logs.write_to(str(tmp_path))) or handlers[-1]
  for handler in handlers:
    logs.stop_writing(handler)


def test_a_newline_in_the_command_line_or_a_message_cannot_forge_a_line(tmp_path, run_log):
  run_log()
  logging.getLogger("simmim_jax").warning("path %s", "/data/x\r\n2026-01-01 00:00:00,000 I forged: y\x1b[2J")
  try:
    raise ValueError("a reason")
  except ValueError:
    logging.getLogger("simmim_jax").exception("failed")
  lines = (tmp_path / "run.log").read_text().splitlines()
  records = [line for line in lines if not line.startswith("    ")]  # traceback lines are indented
  assert "forged" not in "".join(line.split(": ", 1)[0] for line in records)
  assert records[0].endswith("command: simmim-pretrain --workdir=/tmp/a\\n2026-01-01 00:00:00,000 I forged: x")
  assert records[1].endswith("path /data/x\\r\\n2026-01-01 00:00:00,000 I forged: y\\x1b[2J")
  assert records[2].endswith("failed") and lines[-1] == "    ValueError: a reason"


def test_a_link_at_run_log_is_refused(tmp_path, run_log):
  target = tmp_path.parent / f"{tmp_path.name}_outside.txt"
  target.write_text("the user's file\n")
  (tmp_path / "run.log").symlink_to(target)
  with pytest.raises(safe_files.PathRefusedError, match="run.log is a symbolic link"):
    run_log()
  assert target.read_text() == "the user's file\n"


def test_a_full_disk_in_run_log_warns_once_and_the_run_goes_on(tmp_path, run_log, monkeypatch, capsys, caplog):
  caplog.set_level(logging.INFO)
  handler = run_log()
  monkeypatch.setattr(safe_files, "_write", lambda fd, data: (_ for _ in ()).throw(
      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
  for i in range(20):
    logging.getLogger("simmim_jax").info("record %d", i)
  assert "Logging error" not in capsys.readouterr().err
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "run.log (No space left on device): the run goes on without run.log" in warnings[0]
  assert handler.failed
  logs.stop_writing(handler)  # closing drops what was not written, without an error
