"""Run a lavis_ext command's ``main(argv)`` inside the test process and return what it printed and logged.

A subprocess pays 15-25 s importing torch, transformers and LAVIS before it trains for a few seconds. Tests
whose property is not about the process boundary (what a run computes, saves, logs or resumes) call ``main``
here instead, under the same conditions the subprocess helper sets: one thread (``OMP_NUM_THREADS=1``),
the given working directory, INFO logging as LAVIS's ``setup_logger`` gives a command-line run. Tests that
are about the process (another working directory as a user runs it, SIGKILL, torchrun) stay subprocesses.
"""

import contextlib
import io
import logging
import os

import torch


def run_main(main, argv, cwd=None):
    """``main(argv)`` with one thread, from ``cwd`` if given; return ``(its return value, stdout+stderr+log)``.

    Everything is restored afterwards (working directory, thread count, root logger, and the one-process gloo
    group that ``lavis_ext.train.main`` starts), so later tests in the same worker see the process as it was."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    root = logging.getLogger()
    level, threads, old_cwd = root.level, torch.get_num_threads(), os.getcwd()
    had_group = torch.distributed.is_initialized()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    torch.set_num_threads(1)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            result = main([str(a) for a in argv])
    finally:
        os.chdir(old_cwd)
        root.removeHandler(handler)
        root.setLevel(level)
        torch.set_num_threads(threads)
        if not had_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return result, buffer.getvalue()


def train(*options, cfg, cwd=None):
    """``python -m lavis_ext.train --cfg-path cfg --options ...`` in this process; return (runner, output)."""
    from lavis_ext.train import main

    return run_main(main, ["--cfg-path", cfg, "--options", *options], cwd=cwd)
