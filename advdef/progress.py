"""Progress reporting that pipelines call and the CLI renders with rich.

Pipelines only see the small `Reporter` interface, so tests run them silently and the CLI shows
bars (on a terminal) or nothing extra (off a TTY, e.g. in CI logs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, amount: int = 1, status: str = "") -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: int) -> Iterator[Task]: ...
    def message(self, text: str) -> None: ...


class _NullTask:
    def advance(self, amount: int = 1, status: str = "") -> None:
        pass


class SilentReporter:
    """Reports nothing; the default for library calls and tests."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
        yield _NullTask()

    def message(self, text: str) -> None:
        pass


class RichReporter:
    """Rich progress bars on stderr; messages printed above the bars."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )

    def __enter__(self) -> RichReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Task]:
        task_id = self.progress.add_task(description, total=total, status="")
        progress = self.progress

        class _Task:
            def advance(self, amount: int = 1, status: str = "") -> None:
                progress.update(task_id, advance=amount, status=status)

        try:
            yield _Task()
        finally:
            progress.stop_task(task_id)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)
