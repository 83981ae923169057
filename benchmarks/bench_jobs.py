"""Jobs: the event stream's cost, `queue ls` with 1,000 jobs, the worker's pick-up latency.

    python benchmarks/bench_jobs.py            # tiny preset 16x128, 6 rounds of 120-step pairs
    python benchmarks/bench_jobs.py --quick    # fewer steps and rounds

1. Event stream: the same training (a fresh trainer of the same seed) with and without what
   `mmnb.api` attaches to every session — the `EventWriter` listener with its heartbeat and the
   control-channel poll (`mmnb.jobs.session.open_session`) — with an event every step (the
   worst case). Pairs alternate which goes first; printed: median and range of the ratio of
   wall times, and of the process's CPU time (the writer thread's included; steadier than wall
   time on a shared machine). Target: <= 1.01.
2. `queue ls` of 1,000 jobs (990 ended, 5 running with event streams, 5 queued): the rows and
   the table built in this process (warm), and `python -m mmnb queue ls` as a fresh process
   (cold, interpreter start included). Target: < 0.2 s.
3. Pick-up: an idle `mmnb worker` (the default 0.2 s poll) and a job queued into it; the time
   from the job's creation to its process start, recorded by the worker. Target: < 1 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mmnb import launch  # noqa: E402
from mmnb.config import resolve  # noqa: E402
from mmnb.data import build_dataset, tokenizer_for  # noqa: E402
from mmnb.events import Event, encode  # noqa: E402
from mmnb.jobs import commands  # noqa: E402
from mmnb.jobs.queue import Queue  # noqa: E402
from mmnb.jobs.session import open_session  # noqa: E402
from mmnb.jobs.watch import format_jobs, job_rows  # noqa: E402
from mmnb.train import Trainer  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), python {platform.python_version()}"
    )


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.4f} (range {min(values):.4f}-{max(values):.4f})"


# ---- 1. the event stream's cost ----
def stream_cost(steps: int, rounds: int) -> None:
    model_cfg, train_cfg = resolve("tiny", batch_size=16, max_seq_len=128, log_every=1)
    train_cfg.max_steps = steps
    tokenizer = tokenizer_for(None, model_cfg.vocab_size, None)
    dataset = build_dataset(None, tokenizer, train_cfg.max_seq_len)
    folder = Path(tempfile.mkdtemp(prefix="bench-jobs-stream-"))

    def fit(with_stream: bool) -> tuple[float, float]:
        trainer = Trainer(model_cfg, train_cfg, dataset)
        writer = None
        if with_stream:
            run = types.SimpleNamespace(path=folder, name="bench")
            writer = open_session(run, trainer)
        start = time.perf_counter(), time.process_time()
        trainer.fit()
        if writer is not None:
            writer.close()  # its last flush counts too
        return time.perf_counter() - start[0], time.process_time() - start[1]

    fit(True)  # warm-up: caches, allocator, first-touch
    ratios, cpu_ratios, plain, streamed = [], [], [], []
    for i in range(rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {flag: fit(flag) for flag in order}
        plain.append(times[False][0])
        streamed.append(times[True][0])
        ratios.append(times[True][0] / times[False][0])
        cpu_ratios.append(times[True][1] / times[False][1])
    lines = sum(1 for _ in open(folder / "events.jsonl", "rb"))
    per_event = []
    event = Event("step", 1, {"loss": 3.0, "lr": 1e-3, "tokens": 2048, "grad_norm": 1.0})
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10_000):
            encode(event, 0.0)
        per_event.append((time.perf_counter() - start) / 10_000 * 1e6)
    print(f"1. event stream, tiny preset 16x128, {steps} steps, an event per step, {rounds} pairs")
    print(f"   without: {spread(plain)} s   with: {spread(streamed)} s")
    print(f"   with / without, wall: {spread(ratios)}   target <= 1.01")
    print(f"   with / without, CPU time of the process (all threads): {spread(cpu_ratios)}")
    print(f"   encoding one step record (writer thread): {statistics.median(per_event):.1f} us;"
          f" {lines} lines written in all")  # fmt: skip


# ---- 2. queue ls with 1,000 jobs ----
def queue_ls(rounds: int) -> None:
    store = Path(tempfile.mkdtemp(prefix="bench-jobs-queue-"))
    queue = Queue(store)
    names = set()
    t0 = time.perf_counter()
    for i in range(1000):
        command = commands.JobCommand("train", [f"r{i}", "--max-steps", "10"], f"r{i}")
        job = queue.add(command)
        names.add(job.run)
        if i < 990:
            queue.start_attempt(job.id, ["train"], {"pid": 0, "pgid": 0, "ticks": 0, "boot": ""})
            queue.end_attempt(job.id, state="done", exit_code=0, outcome="done",
                              final={"step": 10, "total": 10, "loss": 2.5})  # fmt: skip
        elif i < 995:
            queue.start_attempt(job.id, ["train"], launch.ProcessRecord.of(os.getpid()).to_dict())
            run = store / f"r{i}"
            run.mkdir()
            lines = [encode(Event("start", 0, {"total": 1000}), 1.0)]
            lines += [
                encode(Event("step", s, {"loss": 3.0, "lr": 1e-3, "tokens": 2048 * s}), 1.0 + s)
                for s in range(1, 2001)
            ]
            (run / "events.jsonl").write_bytes(b"".join(lines))
    fill = time.perf_counter() - t0
    queue.close()
    warm = []
    for _ in range(rounds):
        start = time.perf_counter()
        with Queue(store) as q:
            text = format_jobs(job_rows(q))
        warm.append(time.perf_counter() - start)
    cold = []
    env = dict(os.environ)
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmnb", "queue", "ls", "--store", str(store)],
                       check=True, capture_output=True, env=env)  # fmt: skip
        cold.append(time.perf_counter() - start)
    assert len(text.splitlines()) >= 1001
    print(f"2. queue ls, 1,000 jobs (5 running with 2,000-step streams), {rounds} rounds "
          f"(queue filled in {fill:.1f} s)")  # fmt: skip
    print(f"   in process (warm): {spread(warm)} s   target < 0.2 s")
    print(f"   `python -m mmnb queue ls` (cold, interpreter start included): {spread(cold)} s")


# ---- 3. the worker's pick-up latency ----
def pickup(rounds: int) -> None:
    store = Path(tempfile.mkdtemp(prefix="bench-jobs-pickup-"))
    worker = launch.start(["worker", "--store", str(store)], logs=store / ".worker")
    latencies = []
    try:
        with Queue(store) as queue:
            time.sleep(2.0)  # the worker is up and idle
            for i in range(rounds):
                # A job that ends at once (an unknown run): only its start is measured.
                job = queue.add(commands.JobCommand("resume", [f"ghost{i}", "--store", str(store)],
                                                    f"ghost{i}"))  # fmt: skip
                while queue.get(job.id).state == "queued":
                    time.sleep(0.01)
                ran = queue.get(job.id)
                latencies.append(ran.started - ran.created)
                while queue.get(job.id).state == "running":
                    time.sleep(0.05)
                time.sleep(0.3)  # idle again
    finally:
        worker.terminate()
    print(f"3. worker pick-up, {rounds} jobs: {spread(latencies)} s   target < 1 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # Long enough rounds (~12 s) that a 1% difference is not lost in run-to-run noise.
    steps, rounds = (15, 3) if args.quick else (120, 6)
    print(f"machine: {machine()}")
    stream_cost(steps, rounds)
    queue_ls(3 if args.quick else 7)
    pickup(3 if args.quick else 7)


if __name__ == "__main__":
    main()
