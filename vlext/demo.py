"""``make demo``: run each extension's demo on the built-in toy world, then write one page to look at.

Each demo is ``run(out_dir: Path, quick: bool) -> dict`` (registry.yaml's ``demos:`` lists them) and prints
its own report. The driver runs every demo in its own process, ``--jobs`` at a time with the cores split
between them (the demos are small, so two single-threaded demos on two cores finish sooner than two
two-threaded ones in turn), prefixes their output with the part's name and elapsed time, and writes
``<out>/summary.json`` and ``<out>/index.html`` (static, relative links). ``--quick`` runs the same functions
with smaller numbers (minutes; the test of this command). A demo that raises fails the run (exit status 1);
a demo whose package has not landed is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from vlext.atomic_files import atomic_write_text
from vlext.manifest import load_demos

RESULT_FILE = "result.json"  # each part writes <out>/<package>/result.json, the driver collects them
THREADS_DIR_ENV = "VLEXT_DEMO_THREADS_DIR"  # where the driver tells each part how many threads to use


def _load(run: str):
    import importlib

    module_name, _, function = run.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None  # the extension's demo is not there yet
        raise
    return getattr(module, function)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def extension_demo_command(package: str, run, description: str, argv: list[str] | None = None) -> None:
    """``python -m <package>.demo [--out DIR] [--quick]``: one extension's demo on its own, in this process.

    ``run(out_dir, quick=...)`` is the same function ``make demo`` runs; the extensions' ``main`` only parse
    these two flags, so their ``--help`` answers before torch or the host library is imported.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {package}.demo", description=description, allow_abbrev=False
    )
    parser.add_argument(
        "--out", type=Path, default=Path(f"demo_out/{package}"), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the same path on a few samples for one epoch (a test of the command)",
    )
    args = parser.parse_args(argv)
    run(args.out, quick=args.quick)


def run_part(run: str, out_dir: Path, quick: bool) -> dict:
    """Run one demo in this process; returns ``{"status", "seconds", "result"}`` and writes it to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    function = _load(run)
    if function is None:
        entry = {"status": "missing", "detail": f"{run} does not exist"}
    else:
        start = time.perf_counter()
        try:
            result = function(out_dir, quick=quick)
            entry = {"status": "ok", "seconds": round(time.perf_counter() - start, 1), "result": result}
        except Exception:
            traceback.print_exc()
            entry = {"status": "failed", "seconds": round(time.perf_counter() - start, 1)}
    _write_json(out_dir / RESULT_FILE, entry)
    return entry


class _Relay:
    """Copies a child's output to ours, each line prefixed with the part and its elapsed seconds.

    tqdm redraws its bar with carriage returns; those updates are passed on at most every
    ``every`` seconds as whole lines, so two parts running side by side stay readable in a log.
    """

    def __init__(self, name: str, stream, start: float, every: float = 15.0):
        self.name, self.stream, self.start, self.every = name, stream, start, every
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _emit(self, text: str) -> None:
        text = text.rstrip()
        if text:
            print(f"[{self.name} {time.perf_counter() - self.start:5.0f}s] {text}", flush=True)

    def _copy(self) -> None:
        buffer, last_bar = b"", 0.0
        while chunk := self.stream.read1(4096):
            buffer += chunk
            while True:
                cut = min((i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                piece, sep, buffer = buffer[:cut], buffer[cut : cut + 1], buffer[cut + 1 :]
                text = piece.decode(errors="replace")
                if sep == b"\r":  # a progress-bar redraw
                    if time.perf_counter() - last_bar >= self.every:
                        last_bar = time.perf_counter()
                        self._emit(text)
                else:
                    self._emit(text)
        self._emit(buffer.decode(errors="replace"))


def follow_thread_budget(folder: Path, package: str) -> None:
    """In a part's process: use the thread count the driver writes to ``folder/<package>`` from now on.

    When the last parts run alone, the driver gives them the cores the finished ones used: it writes the
    new count to ``folder/<package>`` and, once ``folder/<package>.ready`` exists, sends SIGUSR1. The
    handler only calls ``torch.set_num_threads`` (it runs between bytecodes, so never inside an operator).
    The marker is written after the handler is installed and the count read after the marker, so a count
    written before the part was ready is still picked up.
    """
    if not hasattr(signal, "SIGUSR1"):
        return
    budget = folder / package

    def apply(*_) -> None:
        import torch

        try:
            threads = int(budget.read_text())
        except (OSError, ValueError):
            return
        if threads >= 1 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    signal.signal(signal.SIGUSR1, apply)
    signal.siginterrupt(signal.SIGUSR1, False)  # restart system calls it lands in (C code may not retry)
    (folder / f"{package}.ready").touch()
    apply()


def stop_following_thread_budget() -> None:
    """A part that is done ignores the driver's signal from now on.

    While Python shuts down it resets a Python-level handler to the default action, and SIGUSR1's default
    ends the process: a signal sent just as the part finished made the driver report a finished part as
    killed. An ignored signal stays ignored through shutdown.
    """
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _give_threads(folder: Path, package: str, proc: subprocess.Popen, threads: int) -> None:
    """Driver side of :func:`follow_thread_budget`."""
    tmp = folder / f"{package}.tmp"
    tmp.write_text(str(threads))
    os.replace(tmp, folder / package)
    if hasattr(signal, "SIGUSR1") and (folder / f"{package}.ready").exists() and proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)


def _launch(demo, out: Path, quick: bool, threads: int, threads_dir: Path) -> tuple:
    env = {
        **os.environ,
        THREADS_DIR_ENV: str(threads_dir),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"),
    }
    cmd = [sys.executable, "-m", "vlext.demo", "--part", demo.package, "--out", str(out)]
    proc = subprocess.Popen(
        cmd + (["--quick"] if quick else []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    start = time.perf_counter()
    return proc, _Relay(demo.package, proc.stdout, start), start


def _run_all(demos, out: Path, quick: bool, jobs: int) -> dict[str, dict]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vlext-demo-threads-") as threads_dir:
        return _schedule(demos, out, quick, jobs, Path(threads_dir))


def _schedule(demos, out: Path, quick: bool, jobs: int, threads_dir: Path) -> dict[str, dict]:
    cores = os.cpu_count() or 1
    threads = max(1, cores // jobs)
    pending, running, summary = list(demos), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            demo = pending.pop(0)
            print(f"=== {demo.package}: {demo.what} (started, {threads} thread(s))", flush=True)
            running[demo.package] = (demo, *_launch(demo, out, quick, threads, threads_dir))
        time.sleep(0.2)
        for package, (_, proc, relay, start) in list(running.items()):
            if proc.poll() is None:
                continue
            relay.thread.join()
            del running[package]
            if not pending and running and (share := max(1, cores // len(running))) > threads:
                threads = share  # the last parts get the finished ones' cores
                for other, (_, other_proc, *_) in running.items():
                    _give_threads(threads_dir, other, other_proc, threads)
                print(f"=== {', '.join(running)}: now {threads} thread(s) ({package} finished)", flush=True)
            result_file = out / package / RESULT_FILE
            entry = json.loads(result_file.read_text()) if result_file.is_file() else {"status": "failed"}
            if proc.returncode != 0 and entry["status"] == "ok":
                entry["status"] = "failed"
            entry["wall_seconds"] = round(time.perf_counter() - start, 1)  # with imports, as the user waits
            summary[package] = entry
            print(f"--- {package}: {entry['status']} after {time.perf_counter() - start:.0f} s", flush=True)
    return {demo.package: summary[demo.package] for demo in demos}  # registry order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)"
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="run only these packages (e.g. lavis_ext clip_ext); default: all",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the same demos with smaller numbers (a few minutes)"
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="demos run at the same time, cores split between them (default 2)"
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one demo in this process
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    demos = load_demos()
    known = {demo.package for demo in demos}
    for name in [*(args.only or []), *([args.part] if args.part else [])]:
        if name not in known:
            parser.error(f"unknown package {name!r}; registry.yaml lists {sorted(known)}")
    if args.part:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        if os.environ.get(THREADS_DIR_ENV):
            follow_thread_budget(Path(os.environ[THREADS_DIR_ENV]), args.part)
        (demo,) = [d for d in demos if d.package == args.part]
        status = run_part(demo.run, args.out / demo.package, args.quick)["status"]
        stop_following_thread_budget()
        return 0 if status != "failed" else 1
    if args.only:
        demos = [demo for demo in demos if demo.package in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = _run_all(demos, args.out, args.quick, min(args.jobs, len(demos)))
    total = time.perf_counter() - started
    _write_json(
        args.out / "summary.json", {"quick": args.quick, "total_seconds": round(total, 1), "parts": summary}
    )

    from vlext.report import write_index

    page = write_index(args.out)
    print("\n=== summary")
    for package, entry in summary.items():
        print(
            f"{package:>14}: {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else "")
        )
    print(f"total: {total:.0f} s; results: {args.out / 'summary.json'}; page: {page}")
    return 1 if any(entry["status"] == "failed" for entry in summary.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
