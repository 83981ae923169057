"""The browser's Queue tab: the store's jobs with their progress, pipelines by stage, Cancel,
and Attach: the live dashboard of a running job, fed from its run's event stream.

Read from `<store>/queue.sqlite` and the runs' event streams (`mmnb.jobs.watch`), never from a
checkpoint: Refresh is cheap. Also shown on its own by `%queue` in a kernel.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as w

from ..jobs.queue import FILE, Queue
from ..jobs.watch import format_jobs, job_rows
from .log import Log


class QueueTab:
    def __init__(self, store_path: str | Path, log: Log | None = None) -> None:
        self.store_path = Path(store_path)
        self.log = log or Log()
        self.rows: list[dict[str, Any]] = []
        self.table = w.HTML()
        self.table.add_class("mmnb-queue")
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.job = w.Dropdown(options=[], description="job", layout=w.Layout(width="16em"))
        self.cancel_button = w.Button(description="Cancel", icon="times", disabled=True)
        self.attach_button = w.Button(description="Attach", icon="eye", disabled=True)
        self.refresh_button.on_click(self.log.guard(lambda _: self.refresh(), "refresh queue"))
        self.cancel_button.on_click(self.log.guard(lambda _: self.cancel(), "cancel job"))
        self.attach_button.on_click(self.log.guard(lambda _: self.attach(), "attach job"))
        self.dashboards = w.VBox()
        self.attachments: list[Any] = []
        self.view = w.VBox(
            [
                w.HBox([self.refresh_button, self.job, self.cancel_button, self.attach_button]),
                self.table,
                self.dashboards,
            ]
        )
        if log is None:
            self.view.children = (*self.view.children, self.log.output)
        self.refresh()

    def refresh(self) -> None:
        if not (self.store_path / FILE).is_file():
            self.rows = []
        else:
            with Queue(self.store_path) as queue:
                self.rows = job_rows(queue)
        live = [r for r in self.rows if r["state"] in ("queued", "running")]
        self.job.options = [(f"{r['id']} {r['run'] or ''} ({r['state']})", r["id"]) for r in live]
        self.cancel_button.disabled = self.attach_button.disabled = not live
        self.table.value = f"<pre style='font-size:85%'>{html.escape(self.text())}</pre>"

    def text(self) -> str:
        """The jobs table, then each pipeline's stages and where they stand."""
        lines = [format_jobs(self.rows)]
        pipelines: dict[str, list[dict[str, Any]]] = {}
        for row in sorted(self.rows, key=lambda r: r["id"]):
            if row["pipeline"]:
                pipelines.setdefault(row["pipeline"], []).append(row)
        for name, rows in pipelines.items():
            stages = {}
            for row in rows:  # the newest job of each stage
                stages[row["stage"]] = row
            chain = " → ".join(
                f"{stage} [{row['state']}{_percent(row)}] ({row['run']})"
                for stage, row in stages.items()
            )
            lines.append(f"pipeline {name}: {chain}")
        return "\n".join(lines)

    def cancel(self) -> None:
        if self.job.value is None:
            raise ValueError("choose a queued or running job first")
        with Queue(self.store_path) as queue:
            job = queue.cancel(self.job.value)
        if job.state == "running" and job.run and (self.store_path / job.run).is_dir():
            from ..jobs import control

            control.send(self.store_path / job.run, "stop")
        self.log.message(f"job {job.id}: {'stopping' if job.state == 'running' else job.state}")
        self.refresh()

    def attach(self) -> Any:
        """The live dashboard of the chosen job's run, below the table (`%attach` here)."""
        from ..jobs.attach import Attachment
        from ..store import Store
        from .dashboard import Dashboard

        row = next((r for r in self.rows if r["id"] == self.job.value), None)
        if row is None or not row["run"]:
            raise ValueError("choose a queued or running job first")
        if not (self.store_path / row["run"] / "run.h5").is_file():
            raise ValueError(
                f"job {row['id']} is {row['state']}: run {row['run']} does not exist yet; "
                "attach once it runs"
            )
        run = Store(self.store_path).run(row["run"])
        dashboard = Dashboard(run.name)
        attachment = Attachment(run, dashboard, keep_following=lambda: self._live(run.name))
        dashboard.attach(attachment.remote)
        attachment.replay()
        attachment.start()
        self.attachments.append(attachment)
        self.dashboards.children = (*self.dashboards.children, dashboard.view)
        return dashboard

    def _live(self, run: str) -> bool:
        with Queue(self.store_path) as queue:
            return any(j.run == run for j in queue.jobs(["queued", "running"]))

    def close(self) -> None:
        for attachment in self.attachments:
            attachment.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.view._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = self.text()
        return bundle


def _percent(row: dict[str, Any]) -> str:
    if row["state"] == "running" and row["total"]:
        return f" {100 * row['step'] / row['total']:.0f}%"
    return ""
