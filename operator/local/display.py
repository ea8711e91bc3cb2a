"""What ``branchmerge run`` shows while it works: a live rich view on a terminal (the DAG with each stage's
phase, a bar per running stage fed by its progress events, elapsed time and ETA), plain lines otherwise
(CI logs): one per phase change and a progress line at most every ``interval`` seconds per stage."""
from __future__ import annotations

import sys
import time

from ...api import conditions as cond

PHASE_STYLE = {"Succeeded": "green", "Failed": "red", "Running": "cyan", "Waiting": "yellow",
               "Pending": "dim", "Suspended": "magenta"}


def eta_seconds(fraction: float | None, elapsed: float, first: tuple[float, float] | None = None,
                now: float | None = None) -> float | None:
    """Remaining seconds at the rate observed so far. With ``first`` = (time, fraction) of the first progress
    event, the rate excludes the stage's start-up (imports, model loading), which would inflate the ETA."""
    if not fraction or fraction < 0.02 or fraction >= 1:
        return None
    if first is not None and now is not None and fraction - first[1] > 0.01 and now > first[0]:
        return (now - first[0]) * (1 - fraction) / (fraction - first[1])
    return elapsed * (1 - fraction) / fraction


class EtaTracker:
    """Remembers each stage's first progress event to estimate its rate."""

    def __init__(self):
        self.first: dict[str, tuple[float, float]] = {}

    def eta(self, key: str, fraction: float, started: float) -> float | None:
        now = time.time()
        if key not in self.first or fraction < self.first[key][1]:
            self.first[key] = (now, fraction)
        return eta_seconds(fraction, now - started, self.first[key], now)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def reason_of(record: dict) -> str:
    return (cond.get_condition(record.get("status", {}), "Ready") or {}).get("reason", "")


class PlainDisplay:
    def __init__(self, stream=None, interval: float = 15.0):
        self.stream = stream or sys.stdout
        self.interval = interval
        self.t0 = time.time()
        self._last_progress: dict[str, tuple[float, float]] = {}
        self.etas = EtaTracker()

    def _print(self, text: str) -> None:
        print(f"[{fmt_duration(time.time() - self.t0):>6}] {text}", file=self.stream, flush=True)

    def start(self, runner) -> None:
        self.t0 = time.time()
        self._print(f"running {len(runner.selected)} stage(s) with --jobs {runner.options.jobs}; "
                    f"workdir {runner.workdir.root}")

    def update(self, key: str, record: dict) -> None:
        pass

    def transition(self, key: str, phase: str, reason: str, message: str) -> None:
        self._print(f"{key:<28} {phase:<10} {reason}" + (f": {message}" if message else ""))

    def progress(self, key: str, record: dict, started: float) -> None:
        progress = record["status"].get("progress") or {}
        fraction = float(progress.get("fraction") or 0.0)
        now = time.time()
        eta = self.etas.eta(key, fraction, started)
        last_time, last_fraction = self._last_progress.get(key, (started, 0.0))
        if now - last_time < self.interval and fraction - last_fraction < 0.25:
            return
        self._last_progress[key] = (now, fraction)
        self._print(f"{key:<28} {fraction * 100:5.1f}%  eta {fmt_duration(eta):>6}  {progress.get('message', '')}")

    def stop(self) -> None:
        pass


class LiveDisplay:
    """rich.live view, redrawn a few times a second from the runner's records."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console()
        self.runner = None
        self.live = None
        self.started: dict[str, float] = {}
        self.etas = EtaTracker()
        self.eta: dict[str, float | None] = {}
        self.t0 = time.time()

    def start(self, runner) -> None:
        from rich.live import Live

        self.runner = runner
        self.t0 = time.time()
        self.live = Live(get_renderable=self.render, console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, key: str, record: dict) -> None:
        pass

    def transition(self, key: str, phase: str, reason: str, message: str) -> None:
        if phase == "Running":
            self.started[key] = time.time()
        elif phase == "Failed" and reason not in (cond.UPSTREAM_FAILED,) and self.live:
            self.live.console.print(f"[red]{key} failed[/red] ({reason}): {message}")

    def progress(self, key: str, record: dict, started: float) -> None:
        self.started[key] = started
        fraction = float((record["status"].get("progress") or {}).get("fraction") or 0.0)
        self.eta[key] = self.etas.eta(key, fraction, started)

    def render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        runner = self.runner
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for col in ("STAGE", "PHASE", "", "%", "ELAPSED", "ETA", "MESSAGE"):
            table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=60 if col == "MESSAGE" else None)
        for key in runner.selected:
            record = runner.records[key]
            status = record.get("status", {})
            phase = status.get("phase", "Pending")
            ups = runner.dag.upstreams.get(key, [])
            label = Text(key, style="bold" if phase == "Running" else "")
            if ups:
                label.append("  <- " + ", ".join(u.split("/", 1)[1] for u in ups), style="dim")
            progress = status.get("progress") or {}
            fraction = float(progress.get("fraction") or (1.0 if phase == "Succeeded" else 0.0))
            running = key in runner.running
            elapsed = time.time() - self.started[key] if running and key in self.started else None
            message = progress.get("message", "") if running else reason_of(record)
            table.add_row(
                label,
                Text(phase, style=PHASE_STYLE.get(phase, "")),
                ProgressBar(total=1.0, completed=fraction, width=24) if running or phase == "Succeeded" else "",
                f"{fraction * 100:3.0f}%" if running else "",
                fmt_duration(elapsed) if running else "",
                fmt_duration(self.eta.get(key)) if running else "",
                message,
            )
        done = sum(1 for k in runner.selected if runner.records[k]["status"].get("phase") == "Succeeded")
        head = Text(f"branchmerge run: {done}/{len(runner.selected)} succeeded, {len(runner.running)} running, "
                    f"elapsed {fmt_duration(time.time() - self.t0)}", style="bold")
        return Group(head, table)

    def stop(self) -> None:
        if self.live:
            self.live.stop()


def make_display(plain: bool | None = None):
    """LiveDisplay on a terminal, PlainDisplay otherwise (or when asked)."""
    if plain is None:
        plain = not sys.stdout.isatty()
    return PlainDisplay() if plain else LiveDisplay()
