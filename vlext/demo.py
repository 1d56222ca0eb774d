"""``make demo``: run each extension's demo on the built-in toy world, then write one page to look at.

Each demo is ``run(out_dir: Path, quick: bool) -> dict`` (registry.yaml's ``demos:`` lists them) and prints
its own report. The driver runs every demo in its own process, ``--jobs`` at a time, prefixes their output
with the part's name and elapsed time, and writes ``<out>/summary.json`` and ``<out>/index.html`` (static,
relative links). ``--quick`` runs the same functions with smaller numbers (minutes; the test of this
command). A demo that raises fails the run (exit status 1); a demo whose package has not landed is reported
as missing.

Reproducible figures: every part runs with ``--threads`` torch threads (default 1) from its first operator
to its last, whatever ``--jobs`` is and whenever the other parts finish. A float reduction split over two
threads adds in another order than over one (``torch.randn(10**6).sum()`` differs in the last bits), and
over hundreds of training steps such differences grow into different recalls; so the thread count is fixed
per part, and ``--jobs`` only decides how many parts run side by side. Two runs on one machine with the
same ``--threads`` write the same ``summary.json`` apart from its timings (tests/test_demo_command.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from vlext.atomic_files import atomic_write_text
from vlext.manifest import load_demos

RESULT_FILE = "result.json"  # each part writes <out>/<package>/result.json, the driver collects them
DEFAULT_THREADS = 1


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
    """``python -m <package>.demo [--out DIR] [--quick] [--seed S]``: one extension's demo, in this process.

    ``run(out_dir, quick=..., seed=...)`` is the same function ``make demo`` runs; the extensions' ``main``
    only parse these flags, so their ``--help`` answers before torch or the host library is imported.
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
    parser.add_argument(
        "--seed", type=int, default=None, help="training seed (default: the demo's own, as in make demo)"
    )
    args = parser.parse_args(argv)
    run(args.out, quick=args.quick, **({} if args.seed is None else {"seed": args.seed}))


def run_part(run: str, out_dir: Path, quick: bool, seed: int | None = None) -> dict:
    """Run one demo in this process; returns ``{"status", "seconds", "result"}`` and writes it to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    function = _load(run)
    if function is None:
        entry = {"status": "missing", "detail": f"{run} does not exist"}
    else:
        start = time.perf_counter()
        try:
            result = function(out_dir, quick=quick, **({} if seed is None else {"seed": seed}))
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


@dataclass(frozen=True)
class PartJob:
    """One demo part to run in its own process: ``python -m vlext.demo --part <package> --out <out>``."""

    name: str  # shown in the log prefix and used as the summary key
    package: str
    out: Path  # the part writes into out/<package>
    what: str = ""
    seed: int | None = None


def _launch(job: PartJob, quick: bool, threads: int) -> tuple:
    env = {
        **os.environ,
        # the part's thread count for its whole run (vlext.demo docstring); no process changes it later
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONHASHSEED": "0",  # set and dict-of-str order the same in every run
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"),
    }
    cmd = [sys.executable, "-m", "vlext.demo", "--part", job.package, "--out", str(job.out)]
    cmd += ["--threads", str(threads)] + (["--quick"] if quick else [])
    cmd += [] if job.seed is None else ["--seed", str(job.seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    start = time.perf_counter()
    return proc, _Relay(job.name, proc.stdout, start), start


def run_parts(jobs: list[PartJob], quick: bool, parallel: int, threads: int) -> dict[str, dict]:
    """Run ``jobs`` in their own processes, ``parallel`` at a time, each with ``threads`` torch threads.

    Returns each job's result entry (``status``, ``seconds``, ``wall_seconds``, ``result``) by name, in the
    order of ``jobs``. Results do not depend on ``parallel`` or on the order in which jobs finish.
    """
    pending, running, summary = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            what = f": {job.what}" if job.what else ""
            print(f"=== {job.name}{what} (started, {threads} thread(s))", flush=True)
            running[job.name] = (job, *_launch(job, quick, threads))
        time.sleep(0.2)
        for name, (job, proc, relay, start) in list(running.items()):
            if proc.poll() is None:
                continue
            relay.thread.join()
            del running[name]
            result_file = job.out / job.package / RESULT_FILE
            entry = json.loads(result_file.read_text()) if result_file.is_file() else {"status": "failed"}
            if proc.returncode != 0 and entry["status"] == "ok":
                entry["status"] = "failed"
            entry["wall_seconds"] = round(time.perf_counter() - start, 1)  # with imports, as the user waits
            summary[name] = entry
            print(f"--- {name}: {entry['status']} after {time.perf_counter() - start:.0f} s", flush=True)
    return {job.name: summary[job.name] for job in jobs}


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
        "--jobs",
        type=int,
        default=2,
        help="demos run at the same time (default 2); results do not depend on it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch threads of each demo for its whole run (default %(default)s); the figures depend on it, "
        "so compare runs with the same value",
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one demo in this process
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # internal, with --part (vlext.seeds)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    demos = load_demos()
    known = {demo.package for demo in demos}
    for name in [*(args.only or []), *([args.part] if args.part else [])]:
        if name not in known:
            parser.error(f"unknown package {name!r}; registry.yaml lists {sorted(known)}")
    if args.part:
        import torch

        torch.set_num_threads(args.threads)
        (demo,) = [d for d in demos if d.package == args.part]
        status = run_part(demo.run, args.out / demo.package, args.quick, args.seed)["status"]
        return 0 if status != "failed" else 1
    if args.only:
        demos = [demo for demo in demos if demo.package in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [PartJob(demo.package, demo.package, args.out, demo.what) for demo in demos]
    summary = run_parts(jobs, args.quick, min(args.jobs, len(jobs)), args.threads)
    total = time.perf_counter() - started
    _write_json(
        args.out / "summary.json",
        {"quick": args.quick, "threads": args.threads, "total_seconds": round(total, 1), "parts": summary},
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
