"""Demo parts run in their own processes, ``--jobs`` at a time, with pinned numerics and a relayed log.

:mod:`vlext.demo` runs one part per extension, :mod:`vlext.seeds` one part per training seed; both through
:func:`run_parts`. Each part is ``python -m vlext.demo --part <package> --out <folder>``, started with the
environment of :func:`vlext.numerics.pinned_environment` (the same kernels and the same thread count for its
whole run, whatever ``--jobs`` is and whenever the other parts finish), and writes
``<folder>/<package>/result.json``, which the driver collects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from vlext.atomic_files import atomic_write_json
from vlext.numerics import pinned_environment

__all__ = ["RESULT_FILE", "PartJob", "load_demo_function", "run_part", "run_parts"]

RESULT_FILE = "result.json"  # each part writes <out>/<package>/result.json, the driver collects them


def load_demo_function(run: str):
    """The demo function ``module:function`` names, or None when its package has not landed."""
    import importlib

    module_name, _, function = run.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            return None  # the extension's demo is not there yet
        raise
    return getattr(module, function)


def run_part(
    run: str, out_dir: Path, quick: bool, seed: int | None = None, config: dict | None = None
) -> dict:
    """Run one demo in this process; returns ``{"status", "seconds", "result"}`` and writes it to out_dir.

    ``config`` (overrides of the demo's own config) is passed on only when given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    function = load_demo_function(run)
    if function is None:
        entry = {"status": "missing", "detail": f"{run} does not exist"}
    else:
        start = time.perf_counter()
        try:
            kwargs = ({} if seed is None else {"seed": seed}) | ({} if config is None else {"config": config})
            result = function(out_dir, quick=quick, **kwargs)
            entry = {"status": "ok", "seconds": round(time.perf_counter() - start, 1), "result": result}
        except Exception:
            traceback.print_exc()
            entry = {"status": "failed", "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out_dir / RESULT_FILE, entry, indent=2, default=str)
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
    config: str | None = None  # JSON of the demo's config overrides (a benchmark's variant); None: its own


def _launch(job: PartJob, quick: bool, threads: int, native: bool) -> tuple:
    env = {
        # pinned kernels and the part's thread count for its whole run (vlext.numerics); set before the
        # child imports torch, and no process changes them later
        **pinned_environment(os.environ, threads, native),
        "PYTHONHASHSEED": "0",  # set and dict-of-str order the same in every run
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"),
    }
    cmd = [sys.executable, "-m", "vlext.demo", "--part", job.package, "--out", str(job.out)]
    cmd += (
        ["--threads", str(threads)]
        + (["--quick"] if quick else [])
        + (["--native-kernels"] if native else [])
    )
    cmd += [] if job.seed is None else ["--seed", str(job.seed)]
    cmd += [] if job.config is None else ["--config", job.config]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    start = time.perf_counter()
    return proc, _Relay(job.name, proc.stdout, start), start


def run_parts(
    jobs: list[PartJob], quick: bool, parallel: int, threads: int, native: bool = False
) -> dict[str, dict]:
    """Run ``jobs`` in their own processes, ``parallel`` at a time, each with ``threads`` torch threads.

    ``native`` leaves the CPU kernels to each library (``--native-kernels``); by default they are pinned.
    Returns each job's result entry (``status``, ``seconds``, ``wall_seconds``, ``result``) by name, in the
    order of ``jobs``. Results do not depend on ``parallel`` or on the order in which jobs finish.
    """
    pending, running, summary = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            what = f": {job.what}" if job.what else ""
            print(f"=== {job.name}{what} (started, {threads} thread(s))", flush=True)
            # a result.json left by an earlier run (--overwrite) must not be read as this run's
            (job.out / job.package / RESULT_FILE).unlink(missing_ok=True)
            running[job.name] = (job, *_launch(job, quick, threads, native))
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
