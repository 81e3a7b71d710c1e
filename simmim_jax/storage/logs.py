"""What a run prints, and what its log file keeps.

Console, quiet by default: simmim_jax's own lines (the start banner, progress lines, evaluations; `echo`
prints them to stdout), simmim_jax's warnings, and the errors of every library; the libraries' warnings
(tfds' "Variant folder ... has no dataset_info.json", say) go to the log file only. `--verbosity=1` (or
SIMMIM_VERBOSITY=1) adds the libraries' warnings and INFO logs (Orbax, absl, JAX) and TensorFlow's C++
notices; 2 adds DEBUG.

Log file: process 0 of a training run appends to `<workdir>/run.log` every INFO (and higher) record of the
Python loggers and every echoed line, whatever the verbosity. Records logged before the workdir passed its
checks are held in memory and written only once it has (`write_to`): a refused run writes nothing. One record
is one line: control characters in a message (a newline in a path or an argument) are escaped (`\\n`), and
the lines of a traceback are indented, so nothing can forge a record. run.log is opened without following a
link (safe_files). When it cannot be written (a full disk), the run says so once on stderr, stops writing
run.log and goes on: the log is a record of the run, not its result (checkpoints and metrics.jsonl are, and
their writes stop the run with exit 1).
"""

import importlib
import logging
import os
import sys
import tempfile

from absl import logging as absl_logging

from simmim_jax.storage import safe_files

LOG_FILENAME = "run.log"
VERBOSITY_ENV = "SIMMIM_VERBOSITY"
MAX_BUFFERED_RECORDS = 10_000  # records held before the workdir is known; later ones are dropped
_ECHO = logging.getLogger("simmim_jax.echo")  # lines already printed to stdout: for the log file only
_ECHO.setLevel(logging.INFO)
_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"  # run.log's lines


class _Buffer(logging.Handler):
  """Holds records until the log file exists (at most MAX_BUFFERED_RECORDS)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.records = []

  def emit(self, record: logging.LogRecord) -> None:
    if len(self.records) < MAX_BUFFERED_RECORDS:
      self.records.append(record)


_buffer = _Buffer()  # process-wide, as Python logging itself


def verbosity_from_env() -> int:
  """$SIMMIM_VERBOSITY as an int (0 when unset or not a number)."""
  try:
    return int(os.environ.get(VERBOSITY_ENV, "0") or 0)
  except ValueError:
    return 0


def configure(verbosity: int) -> None:
  """Console and buffer for a command-line program; call before TensorFlow or JAX start logging.
  `preload_quietly` then keeps TensorFlow's load-time notices off the console."""
  # TensorFlow's (and XLA's) C++ logging reads this when it loads: 1 hides INFO notices (oneDNN, CPU flags).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity >= 1 else "1")
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.DEBUG if verbosity >= 2 else absl_logging.INFO)  # records for the file
  console = absl_logging.get_absl_handler()
  console.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
  for old in [f for f in console.filters if isinstance(f, _Console)]:
    console.removeFilter(old)
  console.addFilter(_Console(verbosity))
  root = logging.getLogger()
  root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
  if _buffer not in root.handlers:
    root.addHandler(_buffer)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # simmim_jax/


class _Console(logging.Filter):
  """What reaches the console: never the echoed lines (already printed); at verbosity 0 only simmim_jax's own
  records (absl logs them as "absl": told apart by the file that logged) and the libraries' errors."""

  def __init__(self, verbosity: int):
    super().__init__()
    self.verbosity = verbosity

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == _ECHO.name:
      return False
    own = record.name.startswith("simmim_jax") or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)
    return self.verbosity >= 1 or own or record.levelno >= logging.ERROR


def echo(message: str) -> None:
  """Prints `message` (stdout) and keeps it for the log file."""
  print(message, flush=True)
  _ECHO.info(message)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)] if chr(c) != "\t"}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_control(text: str) -> str:
  """`text` on one line: newlines and other control characters as backslash escapes (tabs stay)."""
  return text.translate(_CONTROL)


class _OneLineFormatter(logging.Formatter):
  """run.log's format (_FORMAT) with the message on one line (`escape_control`) and the lines of a traceback indented."""

  def format(self, record: logging.LogRecord) -> str:
    message = escape_control(record.getMessage())
    record = logging.makeLogRecord({**record.__dict__, "msg": message, "args": None})
    first, *rest = super().format(record).split("\n")
    return "\n".join([first, *("    " + line for line in rest)])


class _RunLog(logging.FileHandler):
  """run.log, appended to through safe_files (never through a link). A failed write is reported once on
  stderr; then the handler stops writing (no "--- Logging error ---" per record)."""

  def __init__(self, workdir: str):
    self._workdir = workdir
    self.failed = False
    super().__init__(os.path.join(workdir, LOG_FILENAME), mode="a", encoding="utf-8")

  def _open(self):
    return safe_files.open_append(self.baseFilename, inside=self._workdir)

  def emit(self, record: logging.LogRecord) -> None:
    if not self.failed:
      super().emit(record)

  def handleError(self, record: logging.LogRecord) -> None:
    error = sys.exc_info()[1]
    if self.failed or not isinstance(error, OSError):
      return super().handleError(record)
    self.failed = True  # first: the warning below reaches this handler too, which now skips it
    stream, self.stream = self.stream, None
    if stream is not None:
      safe_files.close_quietly(stream)
    logging.getLogger("simmim_jax").warning("cannot write %s (%s): the run goes on without run.log",
                                            self.baseFilename, error.strerror or error)

  def close(self) -> None:
    try:
      super().close()
    except OSError:
      pass  # the flush of what a failed write left in the buffer


def write_to(workdir: str) -> logging.Handler:
  """Starts `<workdir>/run.log` (appending), with the records held since `configure`; returns the handler
  to pass to `stop_writing`."""
  handler = _RunLog(workdir)
  handler.setLevel(logging.INFO)
  handler.setFormatter(_OneLineFormatter(_FORMAT))
  handler.emit(logging.LogRecord("simmim_jax", logging.INFO, __file__, 0, f"command: {' '.join(sys.argv)}",
                                 None, None))
  root = logging.getLogger()
  for record in _buffer.records:
    handler.handle(record)
  _buffer.records.clear()
  root.removeHandler(_buffer)
  root.addHandler(handler)
  return handler


def stop_writing(handler: logging.Handler) -> None:
  logging.getLogger().removeHandler(handler)
  handler.close()


def preload_quietly(module_name: str, verbosity: int) -> None:
  """Imports `module_name` (if installed) with file descriptor 2 captured at verbosity 0: TensorFlow's C++
  notices at load (oneDNN, CPU instructions) are printed before absl::InitializeLog, which no variable
  silences. The captured lines go to the log at INFO (W / E / F lines at their level)."""
  if verbosity >= 1 or module_name in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      importlib.import_module(module_name)
    except ImportError:
      pass  # not installed: the program that needs it says so
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      _log_native_lines(module_name, captured.read().decode(errors="replace"))


def _log_native_lines(source: str, text: str) -> None:
  logger = logging.getLogger(f"{source}.native")
  levels = {"W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
  for line in text.splitlines():
    if line.strip():
      level = levels.get(line[:1], logging.INFO) if line[1:2].isdigit() else logging.INFO  # I1130 / W0000 ...
      logger.log(level, line)
