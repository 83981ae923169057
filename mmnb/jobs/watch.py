"""Progress of jobs and runs from their event streams — no tensor, no HDF5 file is read.

`job_rows(queue)` is what `mmnb queue ls` and `%queue` show: for each job its state, run,
step/total, loss, tokens/s, ETA and attempts. Running jobs read the tail of their run's stream
(`mmnb.events.progress`); ended ones show what the worker recorded when they ended, so a queue
of a thousand jobs lists in milliseconds. `format_jobs` renders the rows as a table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..events import Progress, progress
from .queue import Queue, QueuedJob


def clock(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def job_row(job: QueuedJob, store_path: Path, live: Progress | None = None) -> dict[str, Any]:
    """One job as plain data (JSON-able): what `queue ls --json` prints."""
    row: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "run": job.run,
        "command": job.command.text(),
        "after": job.after,
        "nproc": job.nproc,
        "attempts": job.attempts,
        "restarts": job.restarts,
        "max_restarts": job.max_restarts,
        "exit_code": job.exit_code,
        "note": job.note,
        "stderr_tail": job.stderr_tail[-3:],
        "pipeline": job.pipeline,
        "stage": job.stage,
        "step": None,
        "total": None,
        "loss": None,
        "tokens_per_s": None,
        "eta": None,
    }
    if job.state == "queued" and job.not_before > time.time():
        row["note"] = f"restarting in {job.not_before - time.time():.0f}s ({job.note})"
    if job.state == "running" and job.run is not None:
        live = live or progress(store_path / job.run)
        if live is not None:
            row.update(
                step=live.step,
                total=live.total,
                loss=live.loss,
                tokens_per_s=live.tokens_per_s,
                eta=live.eta,
            )
    elif job.final:
        row.update({k: job.final.get(k) for k in ("step", "total", "loss")})
    return row


def job_rows(queue: Queue) -> list[dict[str, Any]]:
    return [job_row(job, queue.folder) for job in queue.jobs()]


def format_jobs(rows: list[dict[str, Any]]) -> str:
    """A table of `job_rows`, one line per job, plus a line of notes for ended/failed ones."""
    if not rows:
        return "the queue is empty"
    head = ("id", "state", "run", "progress", "loss", "tok/s", "ETA", "tries", "command")
    table = [head]
    notes = []
    for r in rows:
        if r["total"]:
            done = f"{r['step']}/{r['total']}"
            if r["state"] == "running":
                done += f" ({100 * r['step'] / r['total']:.0f}%)"
        elif r["step"] is not None:
            done = str(r["step"])
        elif r["after"] and r["state"] == "queued":
            done = "after " + ",".join(map(str, r["after"]))
        else:
            done = ""
        tries = str(r["attempts"]) + (f"/{r['max_restarts'] + 1}" if r["max_restarts"] else "")
        table.append(
            (
                str(r["id"]),
                r["state"],
                r["run"] or "",
                done,
                f"{r['loss']:.4f}" if r["loss"] is not None else "",
                f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "",
                clock(r["eta"]),
                tries,
                _short(r["command"], 60),
            )
        )
        if r["note"] and r["state"] != "done":
            notes.append(f"  job {r['id']}: {r['note']}")
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    return "\n".join(lines + notes)


def _short(text: str, width: int) -> str:
    text = text.removeprefix("mmnb ")
    return text if len(text) <= width else text[: width - 1] + "…"


def progress_line(name: str, p: Progress) -> str:
    """One line of `mmnb watch`: where a run stands."""
    parts = [f"run {name}"]
    if p.total:
        parts.append(f"step {p.step}/{p.total} ({100 * p.step / p.total:.0f}%)")
    else:
        parts.append(f"step {p.step}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.tokens_per_s:
        parts.append(f"{p.tokens_per_s:,.0f} tok/s")
    if p.eta is not None:
        parts.append(f"ETA {clock(p.eta)}")
    if p.recoveries:
        parts.append(f"{p.recoveries} recoveries")
    state = p.state
    if state in ("starting", "training") and p.alive() is False:
        state = "its process is gone"
    parts.append(state + (f": {p.error}" if p.error else ""))
    return " · ".join(parts)
