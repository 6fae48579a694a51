"""Progress of long work: a live bar with ETA on a terminal (rich), plain lines otherwise.

* :class:`RoundProgress` - one federation: a bar over its rounds, advanced as each client's
  reply comes in (in-process engine) or as each round lands in summary.json (Ray engine). The
  ServerApp's own per-round table keeps printing above the bar; off a terminal there is no bar,
  and that table is the plain-line progress.
* :class:`SweepProgress` - a sweep, plain: one line per cell with its outcome, elapsed time and
  ETA. :class:`LiveSweepProgress` - the same lines printed above a live bar (cells done, failed,
  running, elapsed, ETA). :func:`sweep_progress` picks one for the stream.

Rich comes with Flower (``flwr`` depends on it).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (rich's test: honours TERM=dumb, NO_COLOR...)."""
    return Console(file=stream).is_terminal


def clock(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _FlowerLogsThroughRich:
    """While a live display runs, Flower's console log handler writes through it, above the bar."""

    def __enter__(self) -> None:
        from flwr.common.logger import console_handler

        self._handler = console_handler
        self._stream = console_handler.setStream(sys.stderr)  # rich's redirected stderr

    def __exit__(self, *exc: Any) -> None:
        self._handler.setStream(self._stream)


class RoundProgress:
    """A live bar over one federation's rounds, on a terminal; no output at all elsewhere.

    Parameters
    ----------
    rounds : int
        The run's rounds.
    stream : TextIO or None
        Where the bar goes (default: stdout, where the ServerApp prints its table).
    label : str
        Shown before the bar.
    enabled : bool
        False: no bar even on a terminal (verbose runs, whose logs would tear it).
    """

    def __init__(self, rounds: int, *, stream: TextIO | None = None, label: str = "federation",
                 enabled: bool = True) -> None:
        self.rounds = rounds
        self.stream = stream if stream is not None else sys.stdout
        self.label = label
        self.live = enabled and is_terminal(self.stream)
        self._progress: Progress | None = None
        self._logs = _FlowerLogsThroughRich()

    def __enter__(self) -> RoundProgress:
        if self.live:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[where]}"),
                                      TimeElapsedColumn(), console=Console(file=self.stream),
                                      redirect_stdout=True, redirect_stderr=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.rounds, where=f"round 1/{self.rounds}")
            self._logs.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._logs.__exit__(*exc)
            self._progress.stop()
            self._progress = None

    def client_done(self, server_round: int, done: int, batch: int) -> None:
        """``done`` of the ``batch`` clients of ``server_round`` have replied."""
        if self._progress is not None:
            self._progress.update(self._task, completed=server_round - 1 + done / max(batch, 1),
                                  where=f"round {server_round}/{self.rounds}, client {done}/{batch}")

    def round_done(self, server_round: int) -> None:
        """``server_round`` is complete."""
        if self._progress is not None:
            self._progress.update(self._task, completed=server_round,
                                  where=f"round {min(server_round + 1, self.rounds)}/{self.rounds}")


class SweepProgress:
    """One line per cell: a text bar, cells finished/total, the outcome, elapsed time and ETA.

    Lines are written when a cell ends, so cells running at once in several workers never
    share a line. The ETA is the mean seconds of the cells run so far times the cells left,
    divided by the workers.

    Parameters
    ----------
    total : int
        Cells in the grid.
    to_run : int
        Cells that will run (the rest were done before).
    stream : TextIO or None
        Default: stderr.
    width : int
        Characters of the text bar.
    jobs : int
        Workers running cells at once.
    """

    def __init__(self, total: int, to_run: int, stream: TextIO | None = None, width: int = 20, jobs: int = 1) -> None:
        self.total, self.to_run, self.width, self.jobs = total, to_run, width, max(1, jobs)
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.index = 0
        self.failed = 0
        self.running: list[str] = []
        self.ran_seconds: list[float] = []

    def __enter__(self) -> SweepProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def start(self, cell: Any, *, newline: bool = False) -> None:
        """``cell`` starts; with ``newline`` (verbose runs, whose logs follow) a line says so."""
        self.running.append(self._name(cell))
        if newline:
            width = len(str(self.total))
            self._write(f"{self._prefix()}{self.index:>{width}}/{self.total} {self._name(cell)}: running")

    def finish(self, result: Any, *, ran_seconds: float | None) -> None:
        """``result`` (a CellResult) is in; ``ran_seconds`` None means it was skipped, done before."""
        self.index += 1
        name = self._name(result.cell)
        if name in self.running:
            self.running.remove(name)
        if ran_seconds is not None:
            self.ran_seconds.append(ran_seconds)
        if result.status == "failed":
            self.failed += 1
        self._write(self.line(result, ran_seconds))

    def line(self, result: Any, ran_seconds: float | None) -> str:
        """The line for a finished cell."""
        if result.status == "failed":
            outcome = f"FAILED ({result.error})"
        elif result.final_accuracy is None:
            outcome = result.status
        else:
            outcome = f"final accuracy {result.final_accuracy:.4f}"
        how = "skipped, done before" if ran_seconds is None else f"{ran_seconds:.1f} s"
        return (f"{self._prefix()}{self.index:>{len(str(self.total))}}/{self.total} {self._name(result.cell)}: "
                f"{outcome} ({how}) | elapsed {clock(self.elapsed)}, ETA {self.eta()}")

    @property
    def elapsed(self) -> float:
        """Seconds since the sweep started."""
        return time.perf_counter() - self.started

    def eta(self) -> str:
        """Time left: cells left x mean cell seconds / workers (``?`` before the first cell ends)."""
        left = self.to_run - len(self.ran_seconds)
        if left <= 0:
            return clock(0)
        if not self.ran_seconds:
            return "?"
        return clock(sum(self.ran_seconds) / len(self.ran_seconds) * left / min(self.jobs, left))

    def _prefix(self) -> str:
        filled = round(self.width * self.index / max(self.total, 1))
        return "[" + "#" * filled + "." * (self.width - filled) + "] "

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    @staticmethod
    def _name(cell: Any) -> str:
        return f"{cell.attack} x {cell.aggregator}, seed {cell.seed}"


class LiveSweepProgress(SweepProgress):
    """:class:`SweepProgress` on a terminal: each ran cell's line above a live bar.

    Skipped cells (done before) advance the bar without a line each; one line counts them.
    """

    def __enter__(self) -> LiveSweepProgress:
        self._skipped = 0
        self._progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[failed]}"), TimeElapsedColumn(),
                                  TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[running]}"),
                                  console=Console(file=self.stream), redirect_stdout=True, redirect_stderr=True)
        self._progress.start()
        self._task = self._progress.add_task("sweep", total=self.total, failed="", eta="?", running="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._flush_skipped()
        self._refresh()
        self._progress.stop()

    def start(self, cell: Any, *, newline: bool = False) -> None:
        self._flush_skipped()
        self.running.append(self._name(cell))
        self._refresh()

    def finish(self, result: Any, *, ran_seconds: float | None) -> None:
        if ran_seconds is None:
            self.index += 1
            self._skipped += 1
            self._refresh()
            return
        self._flush_skipped()
        super().finish(result, ran_seconds=ran_seconds)
        self._refresh()

    def _prefix(self) -> str:
        return ""  # the live bar below shows it

    def _flush_skipped(self) -> None:
        if self._skipped:
            self._write(f"{self._skipped} cells done before: skipped")
            self._skipped = 0

    def _write(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _refresh(self) -> None:
        running = ", ".join(self.running[:3]) + (f" +{len(self.running) - 3}" if len(self.running) > 3 else "")
        self._progress.update(self._task, completed=self.index, eta=self.eta(),
                              failed=f"{self.failed} failed" if self.failed else "",
                              running=f"running: {running}" if running else "")


def sweep_progress(total: int, to_run: int, *, jobs: int, verbose: bool = False,
                   stream: TextIO | None = None) -> SweepProgress:
    """A live bar on a terminal (unless ``verbose``: logs interleave), plain lines elsewhere."""
    stream = stream if stream is not None else sys.stderr
    kind = LiveSweepProgress if is_terminal(stream) and not verbose else SweepProgress
    return kind(total, to_run, stream=stream, jobs=jobs)
