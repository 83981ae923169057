"""The job queue of a store: `<store>/queue.sqlite`, SQLite in WAL mode, schema versioned.

    q = Queue(store)
    job = q.add(commands.parse("train", ["a", "--epochs", "2"], store))
    q.add(commands.parse("branch", ["a", "--name", "sft", "--data", "chat"], store), after=[job.id])
    q.jobs()            # every job, in queue order
    q.cancel(job.id)    # a queued job: cancelled (and what depends on it); a running one: stopped
    q.move(3, before=1)

Why SQLite: many processes (kernels, `mmnb queue …`, the worker) read and change the queue at
once; SQLite gives them atomic transactions and crash safety in one file, WAL mode lets readers
run while the worker writes, and nothing is rewritten whole. The schema version is SQLite's
`user_version`; `_UPGRADES` takes an older file forward, and a newer one is refused.

States: queued → running → done | failed | cancelled; a crashed attempt goes back to queued
(with `not_before`, the back-off) while restarts are left. A job runs when it is queued, its
`not_before` has passed and every job it waits for (`after`) is done; a job whose dependency
failed or was cancelled is cancelled too, saying why.

The store is untrusted, its queue too: the file is opened with `trusted_schema` off and refused
unless its schema is exactly ours (no triggers, no views); a command read from it is checked by
the CLI's parser again before it runs (`mmnb.jobs.worker`), and runs as an argument list, never
through a shell; log folders are derived from the job id, never read from the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .commands import JobCommand

FILE = "queue.sqlite"
JOBS_DIR = ".jobs"  # <store>/.jobs/<id>/attempt-<n>/: logs and process records of a job
SCHEMA_VERSION = 1
STATES = ("queued", "running", "done", "failed", "cancelled")
ENDED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    position INTEGER NOT NULL,
    command TEXT NOT NULL,
    run TEXT,
    nproc INTEGER NOT NULL DEFAULT 1,
    max_restarts INTEGER NOT NULL DEFAULT 0,
    stall_timeout REAL,
    restart_delay REAL NOT NULL DEFAULT 2.0,
    attempts INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    exit_code INTEGER,
    stderr_tail TEXT,
    process TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    final TEXT,
    pipeline TEXT,
    stage TEXT,
    stage_key TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL
);
CREATE TABLE deps (
    job INTEGER NOT NULL,
    after INTEGER NOT NULL,
    PRIMARY KEY (job, after)
);
CREATE TABLE attempts (
    job INTEGER NOT NULL,
    n INTEGER NOT NULL,
    argv TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    outcome TEXT,
    PRIMARY KEY (job, n)
);
CREATE INDEX jobs_by_state ON jobs (state, position);
"""
_TABLES = {"jobs", "deps", "attempts", "sqlite_sequence"}
_INDEXES = {"jobs_by_state"}
_UPGRADES: dict[int, str] = {}  # version -> SQL taking a file of that version to version + 1


class QueueError(ValueError):
    """A queue request that cannot be done (unknown job, wrong state…): one line."""


@dataclass
class QueuedJob:
    """One row of the queue, decoded."""

    id: int
    state: str
    position: int
    command: JobCommand
    run: str | None
    nproc: int = 1
    max_restarts: int = 0
    stall_timeout: float | None = None
    restart_delay: float = 2.0
    attempts: int = 0
    restarts: int = 0
    not_before: float = 0.0
    exit_code: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    process: dict[str, Any] | None = None
    cancel_requested: bool = False
    note: str | None = None
    final: dict[str, Any] | None = None
    pipeline: str | None = None
    stage: str | None = None
    stage_key: str | None = None
    created: float = 0.0
    started: float | None = None
    ended: float | None = None
    after: list[int] = field(default_factory=list)

    @property
    def ended_state(self) -> bool:
        return self.state in ENDED


def _json(text: str | None, default: Any) -> Any:
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


class Queue:
    """The queue of `store` (a Store or a folder); the file is created on first use."""

    def __init__(self, store: Any, *, timeout: float = 10.0) -> None:
        self.folder = Path(getattr(store, "path", store))
        self.path = self.folder / FILE
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<mmnb Queue {self.path}>"

    # ---- the connection ----
    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._connect()
        return self._db

    def _connect(self) -> sqlite3.Connection:
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise QueueError(f"{self.path} is not a regular file; refused")
        for suffix in ("-wal", "-shm", "-journal"):  # SQLite's side files: never elsewhere
            side = self.path.with_name(self.path.name + suffix)
            if side.is_symlink():
                raise QueueError(f"{side} is a symlink; refused")
        self.folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA trusted_schema = OFF")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints
            with _transaction(db):
                self._migrate(db)
        except sqlite3.DatabaseError as err:
            db.close()
            raise QueueError(f"{self.path} is not a usable queue ({err})") from None
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        objects = db.execute("SELECT type, name FROM sqlite_master").fetchall()
        if version == 0 and not objects:
            _script(db, _SCHEMA)  # statement by statement: executescript would COMMIT
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"{self.path} has queue schema {version}, newer than this mmnb's "
                f"{SCHEMA_VERSION}; upgrade mmnb"
            )
        while version < SCHEMA_VERSION:
            if version not in _UPGRADES:
                raise QueueError(f"{self.path}: no upgrade from queue schema {version}")
            _script(db, _UPGRADES[version])
            version += 1
            db.execute(f"PRAGMA user_version = {version}")
        kinds = {(t, n) for t, n in objects if not n.startswith("sqlite_autoindex")}
        expected = {("table", t) for t in _TABLES} | {("index", i) for i in _INDEXES}
        if not kinds <= expected:
            extra = ", ".join(f"{t} {n}" for t, n in sorted(kinds - expected))
            raise QueueError(f"{self.path} holds objects that are not mmnb's ({extra}); refused")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reading ----
    def _row(self, row: sqlite3.Row, after: list[int]) -> QueuedJob:
        data = dict(row)
        try:
            command = JobCommand.from_dict(json.loads(data["command"]))
        except (ValueError, KeyError, TypeError):
            command = JobCommand("train", [], data.get("run"))  # shown, never run (re-checked)
        return QueuedJob(
            id=int(data["id"]),
            state=str(data["state"]),
            position=int(data["position"]),
            command=command,
            run=data["run"],
            nproc=int(data["nproc"]),
            max_restarts=int(data["max_restarts"]),
            stall_timeout=data["stall_timeout"],
            restart_delay=float(data["restart_delay"]),
            attempts=int(data["attempts"]),
            restarts=int(data["restarts"]),
            not_before=float(data["not_before"]),
            exit_code=data["exit_code"],
            stderr_tail=_json(data["stderr_tail"], []),
            process=_json(data["process"], None),
            cancel_requested=bool(data["cancel_requested"]),
            note=data["note"],
            final=_json(data["final"], None),
            pipeline=data["pipeline"],
            stage=data["stage"],
            stage_key=data["stage_key"],
            created=float(data["created"]),
            started=data["started"],
            ended=data["ended"],
            after=after,
        )

    def jobs(self, states: Iterable[str] | None = None) -> list[QueuedJob]:
        """Jobs in queue order: running, queued (by position), then ended ones (newest last)."""
        deps: dict[int, list[int]] = {}
        for job, after in self.db.execute("SELECT job, after FROM deps ORDER BY after"):
            deps.setdefault(job, []).append(after)
        sql = "SELECT * FROM jobs"
        params: list[Any] = []
        if states is not None:
            states = list(states)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params = states
        order = {"running": 0, "queued": 1}
        rows = [self._row(r, deps.get(r["id"], [])) for r in self.db.execute(sql, params)]
        rows.sort(key=lambda j: (order.get(j.state, 2), j.position if j.state == "queued" else 0,
                                 j.ended or 0, j.id))  # fmt: skip
        return rows

    def get(self, job_id: int) -> QueuedJob:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise QueueError(f"no job {job_id} in the queue of {self.folder}")
        deps = self.db.execute("SELECT after FROM deps WHERE job = ?", (row["id"],))
        after = [a for (a,) in deps]
        return self._row(row, after)

    def taken_names(self) -> set[str]:
        """Runs that queued or running jobs will write (a new run name must avoid them)."""
        rows = self.db.execute("SELECT run FROM jobs WHERE state IN ('queued', 'running')")
        return {r for (r,) in rows if r}

    def logs(self, job_id: int, attempt: int | None = None) -> Path:
        """Where attempt `attempt` (default: the newest) of a job keeps its logs."""
        attempt = attempt if attempt is not None else max(self.get(job_id).attempts, 1)
        return self.folder / JOBS_DIR / str(int(job_id)) / f"attempt-{int(attempt)}"

    # ---- changing ----
    def add(
        self,
        command: JobCommand,
        *,
        after: Iterable[int] = (),
        max_restarts: int = 0,
        stall_timeout: float | None = None,
        restart_delay: float = 2.0,
        pipeline: str | None = None,
        stage: str | None = None,
        stage_key: str | None = None,
    ) -> QueuedJob:
        """Queue `command` (checked by `commands.parse`) at the end; `after`: job ids it waits for."""
        if max_restarts < 0:
            raise QueueError(f"--max-restarts must not be negative, got {max_restarts}")
        if stall_timeout is not None and not stall_timeout > 0:
            raise QueueError(f"--stall-timeout must be positive, got {stall_timeout}")
        if not restart_delay >= 0:
            raise QueueError(f"--restart-delay must not be negative, got {restart_delay}")
        after = sorted({int(a) for a in after})
        with _transaction(self.db):
            for dep in after:
                row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (dep,)).fetchone()
                if row is None:
                    raise QueueError(f"--after {dep}: no such job in the queue")
                if row[0] in ("failed", "cancelled"):
                    raise QueueError(f"--after {dep}: that job is {row[0]}; it will never be done")
            if command.run and command.verb != "resume" and command.run in self.taken_names():
                raise QueueError(f"run {command.run!r} is already the target of a queued job")
            position = self.db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs")
            cursor = self.db.execute(
                "INSERT INTO jobs (state, position, command, run, nproc, max_restarts, "
                "stall_timeout, restart_delay, pipeline, stage, stage_key, created) "
                "VALUES ('queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    position.fetchone()[0],
                    json.dumps(command.to_dict()),
                    command.run,
                    command.nproc,
                    max_restarts,
                    stall_timeout,
                    restart_delay,
                    pipeline,
                    stage,
                    stage_key,
                    time.time(),
                ),
            )
            job_id = cursor.lastrowid
            self.db.executemany(
                "INSERT INTO deps (job, after) VALUES (?, ?)", [(job_id, a) for a in after]
            )
        return self.get(job_id)

    def cancel(self, job_id: int) -> QueuedJob:
        """Cancel a queued job (and the jobs waiting for it); ask a running one to stop at its
        next step with a checkpoint (the worker records it as cancelled when it has)."""
        job = self.get(job_id)
        if job.ended_state:
            raise QueueError(f"job {job.id} is {job.state} already")
        if job.state == "running":
            with _transaction(self.db):
                self.db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
            return self.get(job.id)
        with _transaction(self.db):
            self._end(job.id, "cancelled", note="cancelled")
        return self.get(job.id)

    def move(self, job_id: int, *, before: int | None = None, first: bool = False) -> QueuedJob:
        """Put a queued job before another queued job (or first); the order of the others stays."""
        job = self.get(job_id)
        if job.state != "queued":
            raise QueueError(f"job {job.id} is {job.state}; only queued jobs can move")
        if (before is None) == (not first):
            raise QueueError("give --before ID or --first")
        with _transaction(self.db):
            order = [
                i
                for (i,) in self.db.execute(
                    "SELECT id FROM jobs WHERE state = 'queued' ORDER BY position, id"
                )
            ]
            order.remove(job.id)
            if first:
                order.insert(0, job.id)
            else:
                if before not in order:
                    other = self.get(before)
                    raise QueueError(f"job {other.id} is {other.state}, not queued")
                order.insert(order.index(before), job.id)
            self.db.executemany(
                "UPDATE jobs SET position = ? WHERE id = ?",
                [(pos, i) for pos, i in enumerate(order, 1)],
            )
        return self.get(job.id)

    def clear(self, states: Iterable[str] = ENDED) -> int:
        """Forget ended jobs (their runs stay in the store); how many were removed."""
        states = [s for s in states if s in ENDED]
        marks = ",".join("?" * len(states))
        with _transaction(self.db):
            ids = [
                i
                for (i,) in self.db.execute(f"SELECT id FROM jobs WHERE state IN ({marks})", states)
            ]
            waiting = self.db.execute(
                f"SELECT COUNT(*) FROM deps JOIN jobs ON deps.job = jobs.id "
                f"WHERE deps.after IN ({','.join('?' * len(ids)) or 'NULL'}) "
                "AND jobs.state IN ('queued', 'running')",
                ids,
            ).fetchone()[0]
            if waiting:
                raise QueueError("a queued job still waits for one of them; cancel it first")
            for table, column in (("deps", "job"), ("deps", "after"), ("attempts", "job")):
                self.db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(i,) for i in ids])
            self.db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    # ---- the worker's side ----
    def runnable(self, now: float | None = None) -> list[QueuedJob]:
        """Queued jobs that may start now, in queue order."""
        now = time.time() if now is None else now
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE state = 'queued' AND not_before <= ? AND NOT EXISTS ("
            " SELECT 1 FROM deps JOIN jobs AS d ON d.id = deps.after"
            " WHERE deps.job = jobs.id AND d.state != 'done') ORDER BY position, id",
            (now,),
        ).fetchall()
        return [self._row(r, []) for r in rows]

    def start_attempt(self, job_id: int, argv: list[str], process: dict[str, Any]) -> int:
        """Record that attempt n of a job runs as `process`; return n."""
        with _transaction(self.db):
            n = (
                self.db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
                + 1
            )
            now = time.time()
            self.db.execute(
                "UPDATE jobs SET state = 'running', attempts = ?, process = ?, started = "
                "COALESCE(started, ?), note = NULL WHERE id = ?",
                (n, json.dumps(process), now, job_id),
            )
            self.db.execute(
                "INSERT OR REPLACE INTO attempts (job, n, argv, started) VALUES (?, ?, ?, ?)",
                (job_id, n, json.dumps(argv), now),
            )
        return n

    def next_attempt(self, job_id: int) -> int:
        return (
            int(self.db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            + 1
        )

    def end_attempt(
        self,
        job_id: int,
        *,
        state: str,
        exit_code: int | None,
        outcome: str,
        stderr_tail: list[str] = (),
        final: dict[str, Any] | None = None,
        not_before: float = 0.0,
        restart: bool = False,
    ) -> QueuedJob:
        """Record how the running attempt ended: the job's new state (queued again for a
        restart), its exit code, a one-line outcome, the last lines of stderr."""
        if state not in STATES:
            raise ValueError(state)
        with _transaction(self.db):
            now = time.time()
            self.db.execute(
                "UPDATE attempts SET ended = ?, exit_code = ?, outcome = ? "
                "WHERE job = ? AND n = (SELECT attempts FROM jobs WHERE id = ?)",
                (now, exit_code, outcome, job_id, job_id),
            )
            self.db.execute(
                "UPDATE jobs SET exit_code = ?, stderr_tail = ?, final = COALESCE(?, final), "
                "not_before = ?, restarts = restarts + ?, process = NULL WHERE id = ?",
                (
                    exit_code,
                    json.dumps(list(stderr_tail)),
                    json.dumps(final) if final is not None else None,
                    not_before,
                    int(restart),
                    job_id,
                ),
            )
            if state in ENDED:
                self._end(job_id, state, note=outcome)
            else:
                self.db.execute(
                    "UPDATE jobs SET state = ?, note = ? WHERE id = ?", (state, outcome, job_id)
                )
        return self.get(job_id)

    def attempts(self, job_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT n, argv, started, ended, exit_code, outcome FROM attempts WHERE job = ? "
            "ORDER BY n",
            (job_id,),
        )
        return [
            {"n": n, "argv": _json(argv, []), "started": s, "ended": e, "exit_code": c,
             "outcome": o}
            for n, argv, s, e, c, o in rows
        ]  # fmt: skip

    def _end(self, job_id: int, state: str, note: str) -> None:
        """End a job and cancel what waits for it unless it is done (inside a transaction)."""
        self.db.execute(
            "UPDATE jobs SET state = ?, note = ?, ended = ?, cancel_requested = 0 WHERE id = ?",
            (state, note, time.time(), job_id),
        )
        if state == "done":
            return
        waiting = self.db.execute(
            "SELECT jobs.id FROM deps JOIN jobs ON jobs.id = deps.job "
            "WHERE deps.after = ? AND jobs.state = 'queued'",
            (job_id,),
        ).fetchall()
        for (other,) in waiting:
            self._end(other, "cancelled", note=f"job {job_id} {state}")


def _script(db: sqlite3.Connection, sql: str) -> None:
    for statement in sql.split(";"):
        if statement.strip():
            db.execute(statement)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT: one writer at a time, readers undisturbed (WAL)."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def jobs_folder(store: Any) -> Path:
    return Path(getattr(store, "path", store)) / JOBS_DIR


def ensure_private(path: Path) -> None:
    """Create a folder of the store's own (`.jobs`), refusing one that is a symlink."""
    if path.is_symlink():
        raise QueueError(f"{path} is a symlink; refused")
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
