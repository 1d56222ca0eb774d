"""The demo driver hands finished parts' cores to the parts still running (vlext.demo.follow_thread_budget)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlext.demo import _give_threads

REPO = Path(__file__).resolve().parents[1]
# a stand-in part: follows the budget, then prints its torch thread count for every line it reads
PART = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from vlext.demo import follow_thread_budget
follow_thread_budget(Path(sys.argv[1]), "part")
print(torch.get_num_threads(), flush=True)
for _ in sys.stdin:
    print(torch.get_num_threads(), flush=True)
"""

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1 (POSIX)")


def _start(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", PART, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _ask(proc: subprocess.Popen) -> int:
    proc.stdin.write("\n")
    proc.stdin.flush()
    return int(proc.stdout.readline())


def test_a_running_part_switches_to_the_thread_count_it_is_given(tmp_path):
    proc = _start(tmp_path)
    try:
        assert int(proc.stdout.readline()) == 1  # ready, still on its first budget
        assert (tmp_path / "part.ready").exists()
        _give_threads(tmp_path, "part", proc, 2)
        deadline, threads = time.monotonic() + 10, 1
        while threads != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            threads = _ask(proc)
        assert threads == 2
        assert proc.poll() is None  # the signal did not end the part
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_budget_given_before_the_part_is_ready_is_picked_up_without_a_signal(tmp_path):
    (tmp_path / "part").write_text("2")  # the driver wrote it while the part was still importing
    proc = _start(tmp_path)
    try:
        assert int(proc.stdout.readline()) == 2
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_the_driver_does_not_signal_a_part_that_is_not_ready(tmp_path):
    # SIGUSR1's default action ends a process: a part still importing must not receive it
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        _give_threads(tmp_path, "part", proc, 2)
        assert (tmp_path / "part").read_text() == "2"
    finally:
        assert proc.wait(timeout=30) == 0


# a part that has finished: follows, stops following, says so and exits (torch loaded: a slower shutdown)
DONE_PART = """
import sys
from pathlib import Path
import torch
from vlext.demo import follow_thread_budget, stop_following_thread_budget
follow_thread_budget(Path(sys.argv[1]), "part")
stop_following_thread_budget()
print("done", flush=True)
"""


def test_a_finished_part_is_not_ended_by_a_late_signal(tmp_path):
    """SIGUSR1's default action ends a process, and Python restores it for its own handlers at shutdown;
    a finished part ignores the signal, so the driver's signals while it exits cannot kill it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", DONE_PART, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "done"
    sent = 0
    while proc.poll() is None:  # signal it all through its shutdown
        try:
            os.kill(proc.pid, signal.SIGUSR1)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.001)
    assert proc.wait(timeout=30) == 0, f"ended by signal {-proc.returncode} after {sent} signals"
    assert sent > 0
