"""The one launcher of every process mmnb starts, and the handle we keep on each.

Two kinds of process, one handle (`Job`):

    job = launch.start(["train", "a", "--epochs", "2"], logs=folder)            # one process
    job = launch.start(["train", "a"], logs=folder, nproc=2, max_restarts=0)    # a torchrun group

A single process is `python -m mmnb ARGS`; a group of N ranks is torchrun's elastic agent
(`python -m torch.distributed.run --standalone --nproc-per-node N [--max-restarts K] -m mmnb
ARGS`), which starts, watches and (with K) restarts the ranks — we never spawn ranks ourselves.

Detached (the default) means its own session and process group (`setsid`): a kernel's
interrupt or shutdown (jupyter_client signals the kernel's whole process group), a terminal's
Ctrl-C, or the death of whoever started it does not reach it. Its stdout and stderr go to files
(`stdout.log`, `stderr.log` in `logs`), never to pipes: a pipe would break when its reader dies.
`detach=False` keeps the child in the caller's group (a foreground `--nproc` run: Ctrl-C reaches
every rank), still with its output in files unless `capture=False`.

A job is its leader's process group plus its members: torchrun starts each rank in a session
of its own, so `Job.members()` finds them through the process tree and through the records
the ranks write to the log folder as they start (`register_rank`), which still find them after
their agent died. `kill()` reaches all of them.

Finding a process again from another process (a new kernel, a restarted worker) needs more than
a pid, which the kernel reuses: a `ProcessRecord` holds pid, process group, the process's start
time in clock ticks since boot (`/proc/<pid>/stat` field 22) and the boot id. A pid is "ours"
only while all of them match; only then do we signal it. The record is JSON (`Job.save` /
`Job.load`), kept by the caller: in the queue's database, in the job's log folder, and in the
run's event stream (`mmnb.events`).

Exit status: the parent (`Popen`) gets it exactly. Any other process reads it from `exit.json`
in `logs`, which `python -m mmnb` writes as it exits (`record_exit`, from `$MMNB_EXIT_FILE`); a
process killed by a signal while no handle of ours was its parent leaves none: `poll()` then
returns `EXIT_LOST`.

Linux only for the identity check (`/proc`); elsewhere a live pid is trusted as is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_LOST = -255  # poll(): the process is gone and nobody recorded how it ended
EXIT_FILE_ENV = "MMNB_EXIT_FILE"  # where `python -m mmnb` records its exit status
STDOUT, STDERR, EXIT, RECORD = "stdout.log", "stderr.log", "exit.json", "process.json"
_TAIL_BYTES = 64 * 1024  # how much of a log `tail()` reads, at most


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot; None if there is no such process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of stat


def _state(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[0] if fields else None


_BOOT_ID: str | None = None


def boot_id() -> str:
    """This boot's id: a record from before a reboot never matches a process of this one."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            _BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


@dataclass(frozen=True)
class ProcessRecord:
    """What another process needs to find, verify and signal a process we started."""

    pid: int
    pgid: int  # the process group: the process and everything it started (ranks)
    ticks: int | None  # start time in clock ticks since boot; None where /proc is missing
    boot: str  # boot id
    argv: list[str] = field(default_factory=list)
    logs: str | None = None  # folder with stdout.log, stderr.log and exit.json
    started: float = 0.0  # Unix time
    host: str = ""  # the machine it runs on (a store may be shared by several)

    @classmethod
    def of(cls, pid: int, **kw: Any) -> ProcessRecord:
        """The record of a running process (this one: `ProcessRecord.of(os.getpid())`)."""
        pgid = os.getpgid(pid)
        kw.setdefault("host", socket.gethostname())
        return cls(pid=pid, pgid=pgid, ticks=start_ticks(pid), boot=boot_id(), **kw)

    @classmethod
    def from_dict(cls, data: Any) -> ProcessRecord:
        """From JSON that may come from an untrusted store: types checked, one ValueError."""
        try:
            pid, pgid = int(data["pid"]), int(data["pgid"])
            ticks = None if data.get("ticks") is None else int(data["ticks"])
            argv = [str(a) for a in data.get("argv", [])]
            logs = None if data.get("logs") is None else str(data["logs"])
            return cls(
                pid=pid,
                pgid=pgid,
                ticks=ticks,
                boot=str(data.get("boot", "")),
                argv=argv,
                logs=logs,
                started=float(data.get("started", 0.0)),
                host=str(data.get("host", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a process record ({err})") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def local(self) -> bool:
        """Whether it runs on this machine (only then can it be checked or signalled)."""
        return not self.host or self.host == socket.gethostname()

    def matches(self) -> bool:
        """True while `pid` is the very process this record describes (not a reused pid);
        False for a process of another machine."""
        if self.pid <= 0 or not self.local:
            return False
        if self.ticks is None or not os.path.exists("/proc/self/stat"):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        if self.boot and self.boot != boot_id():
            return False
        return start_ticks(self.pid) == self.ticks


class Job:
    """A process (or torchrun group) we started or found again: find, signal, wait, clean up."""

    def __init__(self, record: ProcessRecord, popen: subprocess.Popen | None = None) -> None:
        self.record = record
        self._popen = popen  # only in the process that started it
        self._code: int | None = None

    def __repr__(self) -> str:
        code = self.poll()
        state = "running" if code is None else f"exited {code}"
        return f"<mmnb Job pid {self.pid} ({state}): {' '.join(self.record.argv[-6:])}>"

    @property
    def pid(self) -> int:
        return self.record.pid

    @property
    def pgid(self) -> int:
        return self.record.pgid

    @property
    def logs(self) -> Path | None:
        return Path(self.record.logs) if self.record.logs else None

    # ---- finding it again ----
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the record as JSON, atomically (a reader never sees half of it)."""
        write_json(Path(path), self.record.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Job:
        """The job whose record `save` wrote; ValueError naming the file if it is unreadable."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(ProcessRecord.from_dict(data))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the process record {path}: {err}") from None

    @classmethod
    def of(cls, record: ProcessRecord | dict[str, Any]) -> Job:
        return cls(record if isinstance(record, ProcessRecord) else ProcessRecord.from_dict(record))

    # ---- state ----
    def alive(self) -> bool:
        """True while the process runs (a stopped, SIGSTOPped process counts as running)."""
        if self._popen is not None:
            return self._popen.poll() is None
        if not self.record.matches():
            return False
        return _state(self.pid) not in ("Z", "X")  # a zombie has ended

    def poll(self) -> int | None:
        """None while it runs; then its exit status (negative: killed by that signal), or
        EXIT_LOST when it ended unobserved and recorded nothing."""
        if self._code is not None:
            return self._code
        if self._popen is not None:
            code = self._popen.poll()
        elif self.alive():
            code = None
        else:
            recorded = self.recorded_exit()
            code = recorded if recorded is not None else EXIT_LOST
        self._code = code
        return code

    def recorded_exit(self) -> int | None:
        """The exit status the process wrote to `exit.json` in its log folder, if any."""
        if self.logs is None:
            return None
        try:
            # The file is removed when the job starts: whatever is there is this job's.
            data = json.loads((self.logs / EXIT).read_text(encoding="utf-8"))
            return int(data["code"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int | None:
        """Wait for the end; its exit status, or None when `timeout` passed first."""
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
            return self.poll()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(interval)
        return code

    # ---- signals ----
    def members(self) -> list[ProcessRecord]:
        """Every live process of the job besides the leader's own group: what it started in
        other sessions (torchrun starts each rank in its own) and the ranks that registered
        in the log folder (found even after their agent died)."""
        found: dict[int, ProcessRecord] = {}
        for pid in descendants(self.pid) if self.alive() else []:
            with contextlib.suppress(OSError):
                found[pid] = ProcessRecord.of(pid)
        for path in sorted(self.logs.glob("rank-*.json")) if self.logs else []:
            with contextlib.suppress(ValueError):
                record = Job.load(path).record
                if record.matches():
                    found.setdefault(record.pid, record)
        return [r for r in found.values() if r.pgid != self.pgid]

    def signal(self, sig: int, group: bool = True) -> bool:
        """Send `sig` to the job: its process group and every member's group (or only to the
        leader with `group=False`); False if the leader has ended."""
        alive = self.alive()
        targets = [(self.pgid, True)] if alive and group else []
        if alive and not group:
            targets = [(self.pid, False)]
        if group:
            targets += [(m.pgid, True) for m in self.members()]
        sent = False
        for target, is_group in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                (os.killpg if is_group else os.kill)(target, sig)
                sent = True
        return sent and alive

    def interrupt(self) -> bool:
        """SIGINT to the leader: a training process checkpoints its last completed optimizer
        step and exits (130). Prefer the run's control channel (`mmnb.jobs.control`), which
        works for torchrun groups too."""
        return self.signal(signal.SIGINT, group=False)

    def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL the whole job — its group, a SIGSTOPped one too, and every member — and
        wait for the leader."""
        self.signal(signal.SIGKILL)
        return self.wait(timeout)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the job, then SIGKILL what is left after `timeout`."""
        if self.signal(signal.SIGTERM):
            code = self.wait(timeout)
            if code is not None and not self.members():
                return code
        return self.kill()

    # ---- output ----
    def tail(self, lines: int = 20, stream: str = "stderr") -> list[str]:
        """The last `lines` lines of its stdout or stderr (progress bars' \\r frames split)."""
        if self.logs is None:
            return []
        return tail_lines(self.logs / (STDERR if stream == "stderr" else STDOUT), lines)


def descendants(pid: int) -> list[int]:
    """Pids of every process below `pid` in the process tree (from /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                fields = _proc_stat(int(entry.name))
                if fields and len(fields) > 1:
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tail_lines(path: Path, lines: int = 20, max_bytes: int = _TAIL_BYTES) -> list[str]:
    """The last `lines` non-empty lines of a text file, reading at most `max_bytes`."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    kept = [line.rstrip() for line in text.split("\n") if line.strip()]
    if size > max_bytes and kept:
        kept = kept[1:]  # the first line read is probably cut
    return kept[-lines:] if lines > 0 else []


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- starting processes ----
def mmnb_argv(args: Sequence[str], nproc: int = 1, max_restarts: int = 0) -> list[str]:
    """The command line that runs `mmnb ARGS`: one process, or a torchrun group of `nproc`."""
    if nproc < 1:
        raise ValueError(f"nproc must be positive, got {nproc}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must not be negative, got {max_restarts}")
    if nproc == 1 and max_restarts == 0:
        return [sys.executable, "-m", "mmnb", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "mmnb",
        *args,
    ]


def start(
    args: Sequence[str],
    *,
    logs: str | os.PathLike[str] | None,
    nproc: int = 1,
    max_restarts: int = 0,
    detach: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Job:
    """Start `mmnb ARGS` (see `mmnb_argv`) and return its handle.

    `logs` (created if missing) receives stdout.log, stderr.log, process.json (the record) and,
    at the end, exit.json. `env` is added to this process's environment. With `detach` the
    process gets its own session; otherwise it stays in the caller's process group.
    """
    return spawn(mmnb_argv(args, nproc, max_restarts), logs=logs, detach=detach, env=env, cwd=cwd)


def spawn(
    argv: Sequence[str],
    *,
    logs: str | os.PathLike[str] | None,
    detach: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Job:
    """Start any command the way `start` does (the worker uses it for `mmnb worker` too)."""
    folder = Path(logs) if logs is not None else None
    full_env = dict(os.environ, **(env or {}))
    if folder is not None:
        if folder.is_symlink():
            raise ValueError(f"log folder {folder} is a symlink; refused")
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [folder / EXIT, *folder.glob("rank-*.json")]:
            stale.unlink(missing_ok=True)
        full_env[EXIT_FILE_ENV] = str((folder / EXIT).resolve())
        out = open(folder / STDOUT, "ab")  # closed below; the child keeps its copy
        err = open(folder / STDERR, "ab")
    else:
        # No folder of its own: a job started inside a job (`mmnb train --nproc N` run by the
        # worker) keeps the outer job's, so its ranks register there and die with it.
        out = err = None
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=full_env,
            cwd=cwd,
            start_new_session=detach,
            close_fds=True,
        )
    finally:
        for f in (out, err):
            if f is not None:
                f.close()
    record = ProcessRecord(
        pid=popen.pid,
        pgid=popen.pid if detach else os.getpgid(0),
        ticks=start_ticks(popen.pid),
        boot=boot_id(),
        argv=list(argv),
        logs=str(folder.resolve()) if folder is not None else None,
        started=time.time(),
        host=socket.gethostname(),
    )
    job = Job(record, popen)
    if folder is not None:
        job.save(folder / RECORD)
    return job


def register_rank() -> None:
    """Called by `python -m mmnb` as it starts: a torchrun rank of a group we launched writes
    its process record to the group's log folder, so the group can be killed whole even after
    its agent died (torchrun starts each rank in a session of its own)."""
    path, rank = os.environ.get(EXIT_FILE_ENV), os.environ.get("RANK")
    if not path or rank is None or not rank.isdigit():
        return
    with contextlib.suppress(OSError):
        record = ProcessRecord.of(os.getpid(), argv=[], started=time.time())
        write_json(Path(path).parent / f"rank-{rank}.json", record.to_dict())


def record_exit(code: int) -> None:
    """Called by `python -m mmnb` as it exits: write its status where its launcher asked.

    Only the process the launcher started writes (a torchrun rank inherits the variable, but
    its agent is the process the launcher knows)."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path or os.environ.get("RANK") not in (None, "0"):
        return
    with contextlib.suppress(OSError):
        write_json(Path(path), {"pid": os.getpid(), "code": int(code), "time": time.time()})


@contextlib.contextmanager
def exit_recorder() -> Iterator[None]:
    """Register a rank, then record the exit status of the block: SystemExit's code, 1 for
    an uncaught error, 130 for KeyboardInterrupt (what a shell reports after Ctrl-C)."""
    register_rank()
    try:
        yield
    except SystemExit as done:
        code = done.code
        record_exit(code if isinstance(code, int) else (0 if code is None else 1))
        raise
    except KeyboardInterrupt:
        record_exit(130)
        raise
    except BaseException:
        record_exit(1)
        raise
    record_exit(0)
