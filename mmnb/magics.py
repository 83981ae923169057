"""IPython connectivity: `%load_ext mmnb` adds %train, %resume, %checkpoint and %runs.

The magics are thin: each parses its line with `IPython.core.magic_arguments` (the options are
declared once in `mmnb.options`, shared with the CLI) and calls the Python API in `mmnb.api`.
A user's mistake (bad flag, unknown run or step, missing data) is one line: `UsageError`.

- `%train` and `%resume` bind the run handle to `run` in the user namespace and return it
  (`a = %train a` keeps several). A run's own name is never bound: it could shadow anything.
- Blocking training draws ONE output, updated in place (`mmnb.display.NotebookProgress`).
  Kernel → Interrupt commits the last completed step, prints one line saying where, and
  re-raises KeyboardInterrupt so "Run All" stops at that cell.
- `--background` trains in a thread that never prints or draws; `%train --status` and `%runs`
  show its progress, and the next cell after it ends says how it ended (a `post_run_cell` hook).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import threading
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import (
    argument,
    argument_group,
    magic_arguments,
    parse_argstring,
)

from . import api
from .cli import sample_text, user_errors, user_message
from .display import NotebookProgress
from .options import (
    COMMON_OPTIONS,
    DIST_OPTIONS,
    INIT_OPTIONS,
    JOB_OPTIONS,
    NAME_OPTIONS,
    NOTEBOOK_OPTIONS,
    RUN_OPTIONS,
    SAMPLE_OPTIONS,
    SESSION_OPTIONS,
    Option,
    collect,
)
from .progress import ConsoleProgress
from .store import Run, StepInfo, Store, StoreError

USER_ERRORS = user_errors()
BOUND_NAME = "run"  # the user-namespace variable %train and %resume bind

# %resume's own flags. --epochs is the extension target, or the branch's length with --branch.
RESUME_OPTIONS: list[Option] = [
    (("--step",), dict(type=int, help="checkpoint to continue from (same as RUN@STEP)")),
    (("--epochs",), dict(type=int, help="extend the plan to E epochs in all")),
    (("--more-epochs",), dict(type=int, help="extend the plan by K epochs")),
    (("--name",), dict(dest="new_name", help="name of the run an extension creates")),
]
BRANCH_OPTIONS: list[Option] = [
    (("--branch",), dict(metavar="NAME", help="start a new run NAME from the checkpoint")),
    *[o for o in RUN_OPTIONS if o[0][0] not in ("--preset", "--epochs")],
]
BACKGROUND = [o for o in NOTEBOOK_OPTIONS if o[0][0] == "--background"]


def _options(*groups: tuple[str, list[Option]]) -> Callable[[Callable], Callable]:
    """Declare option tables as magic arguments, one help section per table."""
    decorators: list[Callable] = []
    for title, table in groups:
        decorators.append(argument_group(title))
        decorators += [argument(*flags, **kwargs) for flags, kwargs in table]

    def apply(func: Callable) -> Callable:
        # magic_arguments adds the last-applied decorator to the parser first.
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


class _Session:
    """A run this kernel trains or trained: its live handle and what its progress listener saw.

    The handle holds the model and optimizer, so the registry holds it weakly (the user's `run`
    decides how long it lives) — except a background run's, held until its end is announced.
    """

    def __init__(self, run: Run, progress: NotebookProgress, background: bool) -> None:
        self.progress = progress
        self._ref = weakref.ref(run)
        self._held: Run | None = run if background else None

    @property
    def run(self) -> Run | None:
        return self._ref()

    @property
    def training(self) -> bool:
        run = self.run
        return run is not None and run.training

    @property
    def unannounced(self) -> bool:
        """A background run whose end this kernel has not reported yet."""
        return self._held is not None

    def announced(self) -> None:
        self._held = None


@magics_class
class MmnbMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        # Runs trained in this kernel, oldest first, keyed by (store folder, run name).
        self.sessions: dict[tuple[Path, str], _Session] = {}
        self._dashboards: dict[tuple[Path, str], Any] = {}  # background runs' dashboards

    # ---- %train ----
    @magic_arguments()
    @argument("name", nargs="?", metavar="RUN", help="run name (default run-NNN)")
    @_options(
        ("run name", NAME_OPTIONS),
        ("model and training (mmnb train)", RUN_OPTIONS + INIT_OPTIONS),
        ("this session", SESSION_OPTIONS),
        ("store and device", COMMON_OPTIONS),
        ("sample at the end", SAMPLE_OPTIONS),
        ("notebook", NOTEBOOK_OPTIONS),
        ("processes: a torchrun job of N ranks (mmnb.distmagics)", DIST_OPTIONS),
        ("outlive the kernel (mmnb.jobs)", JOB_OPTIONS),
    )
    @line_magic
    def train(self, line: str) -> Run | None:
        """Train a new run in this kernel; the handle is returned and bound to `run`.

        Blocking: one progress display updated in place. Kernel → Interrupt checkpoints the
        last completed step and stops "Run All" at this cell; %resume continues it.
        --background: train in a thread; %train --status [RUN], %train --stop [RUN].
        """
        args = parse_argstring(self.train, line)
        store = Store(args.store)
        if args.status or args.stop:
            return self._control(args, store)
        if args.name and args.run_flag and args.name != args.run_flag:
            raise UsageError(f"two run names given: {args.name!r} and {args.run_flag!r}")
        name = args.name or args.run_flag
        if args.detach:  # a process of its own that outlives this kernel (mmnb.jobmagics)
            from .jobmagics import detach_from_magic

            return detach_from_magic("train", args, store)
        if args.nproc is not None:  # a torchrun job of N processes
            return self._group("train", args, store)
        options = collect(args, RUN_OPTIONS + INIT_OPTIONS + SESSION_OPTIONS)
        return self._start(functools.partial(api.train, name, **options), args, store, name)

    def _control(self, args: argparse.Namespace, store: Store) -> None:
        if args.status and args.stop:
            raise UsageError("give --status or --stop, not both")
        given = collect(args, RUN_OPTIONS + INIT_OPTIONS + SESSION_OPTIONS + COMMON_OPTIONS[1:])
        if given or args.background or args.run_flag:
            raise UsageError("--status and --stop take only RUN and --store")
        if args.stop:
            self._stop(args.name, store)
        elif args.name is not None:
            session = self._session(store, args.name)
            print(self._status_line(session) if session else _store_line(_run(store, args.name)))
        elif not self.sessions:
            print("no run was trained in this kernel; %runs lists the store")
        else:
            for session in self.sessions.values():
                print(self._status_line(session))

    def _stop(self, name: str | None, store: Store) -> None:
        if name is None:
            live = [s for s in self.sessions.values() if s.training]
            session = live[-1] if live else None
        else:
            session = self._session(store, name)
        if session is None or not session.training:
            what = f"run {name!r} is" if name else "no run is"
            raise UsageError(f"{what} training in the background in this kernel")
        run = session.run
        session.announced()  # this cell says how it ended
        run.stop()  # waits for the checkpoint; re-raises what made training fail
        latest = run.latest()
        print(f"stopped run {run.name} at step {latest.step}: {run.path / latest.file}")

    # ---- %resume ----
    @magic_arguments()
    @argument(
        "name",
        nargs="?",
        metavar="RUN[@STEP]",
        help="run to continue, from checkpoint STEP (default: the newest run, its newest step)",
    )
    @_options(
        ("continue or extend", RESUME_OPTIONS),
        ("branch: a new run from the checkpoint, with overrides", BRANCH_OPTIONS),
        ("this session", SESSION_OPTIONS),
        ("store and device", COMMON_OPTIONS),
        ("sample at the end", SAMPLE_OPTIONS),
        ("notebook", BACKGROUND),
        ("processes: a torchrun job of N ranks (mmnb.distmagics)", DIST_OPTIONS),
        ("outlive the kernel (mmnb.jobs)", JOB_OPTIONS),
    )
    @line_magic
    def resume(self, line: str) -> Run | None:
        """Continue a run from the store alone (after a kernel restart too); bound to `run`.

        %resume                          the newest run, from its newest checkpoint
        %resume base --more-epochs 1     extend (a decayed WSD run continues as base-<E>ep)
        %resume base@120 --branch hot --lr 3e-3     another lr from step 120
        %resume base --branch sft --data chat       fine-tune on the bundled chat set
        """
        args = parse_argstring(self.resume, line)
        store = Store(args.store)
        name, step = _split_step(args.name)
        if args.step is not None:
            if step is not None and step != args.step:
                raise UsageError(f"two steps given: @{step} and --step {args.step}")
            step = args.step
        name = name or _newest(store)
        session = collect(args, SESSION_OPTIONS)
        overrides = collect(args, BRANCH_OPTIONS[1:])
        if args.branch is not None:
            if args.more_epochs is not None or args.new_name is not None:
                raise UsageError(
                    "--more-epochs and --name extend a run in place; a branch's length is "
                    "--epochs and its name --branch"
                )
            if args.epochs is not None:
                overrides["epochs"] = args.epochs
            if args.detach:
                from .jobmagics import detach_from_magic

                branch = argparse.Namespace(**vars(args))
                branch.name, branch.step, branch.new_name = name, step, args.branch
                return detach_from_magic("branch", branch, store)
            if args.nproc is not None:
                branch = argparse.Namespace(**vars(args))
                branch.name, branch.step, branch.new_name = name, step, args.branch
                return self._group("branch", branch, store)
            call = functools.partial(api.branch, name, step, args.branch, **overrides, **session)
            return self._start(call, args, store, args.branch)
        if overrides:
            flag = "--" + next(iter(overrides)).replace("_", "-")
            raise UsageError(
                f"{flag} changes the run's trajectory; add --branch NAME to try it on a new run"
            )
        if args.detach:
            from .jobmagics import detach_from_magic

            resumed = argparse.Namespace(**vars(args))
            resumed.name, resumed.step = name, step
            return detach_from_magic("resume", resumed, store)
        if args.nproc is not None:
            resumed = argparse.Namespace(**vars(args))
            resumed.name, resumed.step = name, step
            return self._group("resume", resumed, store)
        call = functools.partial(
            api.resume,
            name,
            step=step,
            epochs=args.epochs,
            more_epochs=args.more_epochs,
            name=args.new_name,
            **session,
        )
        # An extension may continue in a new run; its first checkpoint names it in the display.
        extends = args.epochs is not None or args.more_epochs is not None
        return self._start(call, args, store, None if extends else name)

    # ---- %checkpoint ----
    @magic_arguments()
    @argument(
        "name",
        nargs="?",
        metavar="RUN",
        help="run (default: the last run trained in this kernel, else the store's newest)",
    )
    @argument("--tag", action="append", metavar="NAME", help="tag the checkpoint (repeatable)")
    @argument("--list", action="store_true", help="list RUN's checkpoints instead")
    @_options(("store", COMMON_OPTIONS[:1]))
    @line_magic
    def checkpoint(self, line: str) -> None:
        """Save RUN's state now: at once when it is idle, at the next optimizer step while it
        trains in the background. Prints the step, file and size. --list lists them."""
        args = parse_argstring(self.checkpoint, line)
        store = Store(args.store)
        run = self._target(store, args.name)
        if args.list:
            if args.tag:
                raise UsageError("--tag saves a checkpoint; --list only lists them")
            print(_checkpoint_table(run))
            return
        try:
            info = run.checkpoint(tags=args.tag or [])
        except USER_ERRORS as err:
            raise UsageError(user_message(err)) from None
        tags = f" [{', '.join(info.tags)}]" if info.tags else ""
        print(
            f"checkpoint: run {run.name} step {info.step}{tags} → {run.path / info.file} "
            f"({_size(info.bytes)})"
        )

    # ---- %runs ----
    @magic_arguments()
    @_options(("store", COMMON_OPTIONS[:1]))
    @line_magic
    def runs(self, line: str) -> None:
        """The store's runs as a tree (branches under their parent's step), with checkpoints."""
        args = parse_argstring(self.runs, line)
        store = Store(args.store)
        runs = []
        for r in store.runs():  # a damaged run is named and skipped; the others are listed
            try:
                r.parent, r.steps(), r.status()
                runs.append(r)
            except StoreError as err:
                print(f"warning: {err}; skipping run {r.name}", file=sys.stderr)
        if not runs:
            print(f"no runs in {store.path}")
            return
        names = {r.name for r in runs}
        children: dict[str | None, list[tuple[int, Run]]] = {}
        for r in runs:
            parent = r.parent
            key = parent[0] if parent and parent[0] in names else None
            children.setdefault(key, []).append((parent[1] if parent else -1, r))
        lines = [f"store {store.path}"]

        def walk(parent: str | None, prefix: str) -> None:
            kids = sorted(children.get(parent, []), key=lambda kid: (kid[0], kid[1].name))
            for i, (step, r) in enumerate(kids):
                if parent is None:
                    lines.append(self._tree_line(store, r))
                    walk(r.name, "")
                    continue
                last = i == len(kids) - 1
                branch = ("└─ " if last else "├─ ") + f"@{step} "
                lines.append(prefix + branch + self._tree_line(store, r))
                walk(r.name, prefix + ("   " if last else "│  "))

        walk(None, "")
        print("\n".join(lines))
        if getattr(self.shell, "kernel", None) is not None:
            from IPython.display import display

            from .widgets import browse  # the history browser, where widgets render

            display(browse(store))

    # ---- shared ----
    def _start(
        self, call: Callable[..., Run], args: argparse.Namespace, store: Store, name: str | None
    ) -> Run:
        """Run `call` (api.train/resume/branch) with the notebook's listeners; bind the run."""
        background = args.background
        dashboard = self._dashboard(name)
        if dashboard is not None and not background:
            dashboard.serve_clicks()  # Stop / Checkpoint now while this cell blocks
        in_place = not background and self._updates_in_place() and dashboard is None
        progress = NotebookProgress(show=in_place, run=name)
        listeners: list[Callable] = [progress]
        if not background and not in_place and dashboard is None:
            listeners.append(ConsoleProgress())  # terminal IPython: a tqdm bar
        kwargs: dict[str, Any] = {"store": store, "listeners": listeners, "background": background}
        if args.device:
            kwargs["device"] = args.device
        if dashboard is not None:  # not in `listeners`: _close() must not remove its view
            kwargs["listeners"] = [*listeners, dashboard]
        try:
            run = call(**kwargs)
            if dashboard is not None:
                dashboard.attach(run)  # its Stop and Checkpoint buttons act on this run
        except KeyboardInterrupt as err:
            _close(listeners)
            self._interrupted(progress, store)
            if dashboard is not None:
                dashboard.freeze()
            err._mmnb_short_traceback = True  # type: ignore[attr-defined]  # see _short_tb
            raise
        except BaseException as err:
            _close(listeners)
            if dashboard is not None:
                # Never left at "waiting for training to start": gone when nothing started,
                # else it says how training ended.
                dashboard.discard() if dashboard.state == "waiting" else dashboard.fail(err)
            if isinstance(err, USER_ERRORS):
                raise UsageError(user_message(err)) from None
            raise
        key = (store.path.resolve(), run.name)
        self.sessions.pop(key, None)  # re-inserted: the newest session comes last
        self.sessions[key] = _Session(run, progress, background)
        self.shell.push({BOUND_NAME: run})
        if background:
            if dashboard is not None:  # frozen by report_finished once training has ended
                self._dashboards[key] = dashboard
            for text in progress.notices:
                print(f"note: {text}")
            print(
                f"run {run.name} trains in the background: %train --status {run.name} "
                f"shows it; %train --stop {run.name} or run.stop() stops it"
            )
            return run
        _close(listeners)
        if dashboard is not None:
            dashboard.freeze()  # a saved notebook shows the final state, not the first frame
        if run.trainer is not None and len(listeners) > 1:
            # The tqdm bar is done; a later %checkpoint must not print through it again.
            run.trainer.listeners.remove(listeners[1])
        print(_store_line(run))
        if not args.no_sample:
            print("sample:", sample_text(run, args))
        return run

    def _group(self, verb: str, args: argparse.Namespace, store: Store) -> Run:
        """`--nproc N`: a torchrun job of this kernel (mmnb.distmagics); the run is bound."""
        from .distmagics import name_of, train_group

        try:
            run = train_group(self, verb, args, store, name_of(verb, args, store))
        except KeyboardInterrupt:
            with_name = name_of(verb, args, store)
            if with_name and (store.path / with_name).is_dir():
                self.shell.push({BOUND_NAME: store.run(with_name)})
            raise
        self.shell.push({BOUND_NAME: run})
        print(_store_line(run))
        if not args.no_sample:
            print("sample:", sample_text(run, args))
        return run

    def _interrupted(self, progress: NotebookProgress, store: Store) -> None:
        saved = progress.interrupted
        if saved is None:
            print("interrupted before training began; nothing was saved")
            return
        run = store.run(saved.run)
        self.shell.push({BOUND_NAME: run})
        print(
            f"interrupted: step {saved.step} of run {run.name} is checkpointed in "
            f"{run.run_file} (%resume {run.name} continues it)"
        )

    def _dashboard(self, name: str | None) -> Any:
        """In a kernel (a front-end that renders widgets) the live dashboard of
        `mmnb.widgets`, displayed now; None elsewhere (terminal IPython, tests' shells)."""
        if getattr(self.shell, "kernel", None) is None:
            return None
        from .widgets import Dashboard  # ipywidgets and matplotlib only when a kernel asks

        dashboard = Dashboard(name).show()
        return dashboard

    def _updates_in_place(self) -> bool:
        # A kernel's front-end replaces an output by display_id; IPython's capture records the
        # updates. A terminal would print every update as a new line: it gets a tqdm bar.
        return getattr(self.shell, "kernel", None) is not None or isinstance(
            self.shell.display_pub, CapturingDisplayPublisher
        )

    def _session(self, store: Store, name: str) -> _Session | None:
        return self.sessions.get((store.path.resolve(), name))

    def _target(self, store: Store, name: str | None) -> Run:
        """The live handle of a run trained in this kernel, else the store's (read-only) one."""
        if name is None:
            folder = store.path.resolve()
            mine = [run_name for path, run_name in self.sessions if path == folder]
            name = mine[-1] if mine else _newest(store)
        session = self._session(store, name)
        live = session.run if session else None
        return live if live is not None else _run(store, name)

    def _status_line(self, session: _Session) -> str:
        run, snap = session.run, session.progress.snapshot
        line = f"{snap.text()}{' (background)' if session.training else ''}"
        if run is not None and run.error is not None:
            line += f" — failed: {type(run.error).__name__}: {run.error} (run.wait() raises it)"
        return line

    def _tree_line(self, store: Store, run: Run) -> str:
        session = self._session(store, run.name)
        if session is not None and session.training:
            return f"{run.name}  [{self._status_line(session)}]"
        own = [s for s in run.steps() if not s.inherited]
        latest = run.latest()
        loss = f"  loss {latest.loss:.4f}" if latest and latest.loss is not None else ""
        size = _size(sum(s.bytes for s in own))
        return f"{run.name}  [{run.status()}]{loss}  checkpoints: {_steps_text(own)}  ({size})"

    def report_finished(self, result: Any = None) -> None:
        """post_run_cell hook: say once, from the main thread, how background training ended."""
        for session in self.sessions.values():
            if session.unannounced and not session.training:
                run, snap = session.run, session.progress.snapshot
                session.announced()
                key = (run.store.path.resolve(), run.name)
                dashboard = self._dashboards.pop(key, None)
                if dashboard is not None:
                    dashboard.freeze()  # from the main thread, now that training has ended
                if run.error is not None:
                    print(
                        f"background run {run.name} failed after step {snap.step}: "
                        f"{type(run.error).__name__}: {run.error} (run.wait() raises it)",
                        file=sys.stderr,
                    )
                else:
                    print(f"background run {run.name} ended: {snap.text()}")


# ---- helpers ----
def _run(store: Store, name: str) -> Run:
    try:
        return store.run(name)
    except StoreError as err:
        raise UsageError(str(err)) from None


def _newest(store: Store) -> str:
    try:
        return store.newest().name
    except StoreError as err:
        raise UsageError(str(err)) from None


def _split_step(spec: str | None) -> tuple[str | None, int | None]:
    """'base@120' → ('base', 120); run names never contain '@'."""
    if spec is None or "@" not in spec:
        return spec, None
    name, _, step = spec.rpartition("@")
    try:
        return name or None, int(step)
    except ValueError:
        raise UsageError(f"RUN@STEP needs an integer step, got {spec!r}") from None


def _close(listeners: list[Callable]) -> None:
    for listener in listeners:
        listener.close()


def _store_line(run: Run) -> str:
    latest = run.latest()
    if latest is None:
        return f"run {run.name}: no checkpoint, status {run.status()} ({run.run_file})"
    loss = f", loss {latest.loss:.4f}" if latest.loss is not None else ""
    return f"run {run.name}: step {latest.step}{loss}, status {run.status()} ({run.run_file})"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _steps_text(steps: list[StepInfo]) -> str:
    shown = [str(s.step) for s in steps]
    if len(shown) > 10:
        shown = [*shown[:4], "…", *shown[-5:]]
    return " ".join(shown) or "none"


def _checkpoint_table(run: Run) -> str:
    lines = [
        f"run {run.name} ({run.run_file})",
        f"{'step':>8}  {'epoch':>5}  {'loss':>8}  {'lr':>9}  {'size':>9}  reasons [tags]",
    ]
    for s in run.steps():
        loss = f"{s.loss:.4f}" if s.loss is not None else "-"
        lr = f"{s.lr:.2e}" if s.lr is not None else "-"
        size = "-" if s.inherited else _size(s.bytes)
        tags = f" [{', '.join(s.tags)}]" if s.tags else ""
        origin = f" (run {s.run})" if s.inherited else ""
        lines.append(
            f"{s.step:>8}  {s.epoch:>5}  {loss:>8}  {lr:>9}  {size:>9}  "
            f"{', '.join(s.reasons)}{tags}{origin}"
        )
    return "\n".join(lines)


# ---- the extension ----
def load_ipython_extension(ip: Any) -> None:
    """`%load_ext mmnb`; loading it again changes nothing."""
    if _loaded(ip) is not None:
        return
    _preload_in_background()
    magics = MmnbMagics(ip)
    ip.register_magics(magics)
    from .jobmagics import JobMagics  # %attach, %queue, %pipeline

    ip.register_magics(JobMagics(ip))
    ip.events.register("post_run_cell", magics.report_finished)
    if not ip.custom_exceptions:  # never replace a handler the user installed
        ip.set_custom_exc((KeyboardInterrupt,), _short_tb)


def unload_ipython_extension(ip: Any) -> None:
    """Remove every magic and hook `load_ipython_extension` added; training runs keep going."""
    magics = _loaded(ip)
    if magics is None:
        return
    ip.events.unregister("post_run_cell", magics.report_finished)
    if ip.custom_exceptions == (KeyboardInterrupt,) and _is_ours(ip.CustomTB):
        ip.set_custom_exc((), None)
    jobs = ip.magics_manager.registry.get("JobMagics")
    for each in (magics, jobs):
        if each is None:
            continue
        if hasattr(each, "close"):
            each.close()
        for kind, names in each.magics.items():
            for name in names:
                ip.magics_manager.magics[kind].pop(name, None)
        ip.magics_manager.registry.pop(type(each).__name__, None)


def _preload_in_background() -> None:
    """Import `torch._dynamo` (and sympy under it) on a daemon thread.

    The first checkpoint read in a process imports it (the store checks shapes against a model
    built on the meta device), and so does `--compile`. In a kernel that import would otherwise
    happen on the main thread while a cell runs, where Kernel → Interrupt can land inside it and
    leave sympy half-imported: every later load in that kernel then fails. Signals reach only
    the main thread, so an import on another thread always completes; a main thread that needs
    the module meanwhile waits on the import lock, where an interrupt leaves nothing half-done.
    """
    if "torch._dynamo" in sys.modules:
        return
    threading.Thread(
        target=importlib.import_module, args=("torch._dynamo",), name="mmnb-preload", daemon=True
    ).start()


def _short_tb(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> Any:
    """An interrupt of training shows its one line (printed by the magic) and the cell's own
    frame — not ~100 lines through magics, the API, the trainer and autograd. It is still a
    KeyboardInterrupt, so "Run All" stops at this cell; other interrupts are shown as always."""
    if not getattr(value, "_mmnb_short_traceback", False):
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        return None
    cell = tb.tb_next or tb  # the first frame is IPython's run_code, the next the cell's
    short = types.TracebackType(None, cell.tb_frame, cell.tb_lasti, cell.tb_lineno)
    stb = shell.InteractiveTB.structured_traceback(etype, value, short, tb_offset=0)
    shell._showtraceback(etype, value, stb)
    return None


def _is_ours(handler: Any) -> bool:
    # IPython wraps the handler in a closure; its cell holds ours.
    cells = getattr(getattr(handler, "__func__", None), "__closure__", None) or ()
    return any(getattr(c, "cell_contents", None) is _short_tb for c in cells)


def _loaded(ip: Any) -> MmnbMagics | None:
    return ip.magics_manager.registry.get(MmnbMagics.__name__)
