"""peer.priority: a process's helper processes (every thread of each) get the background nice value; the
process itself keeps its own."""

import os
import subprocess
import sys
import time

from peer.priority import lower_background_priority
from peer.processes import descendants

# a child with an extra thread that starts a grandchild; both print their pid and wait for stdin to close
CHILD = """
import subprocess, sys, threading
threading.Thread(target=sys.stdin.read, daemon=True).start()
grandchild = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
print(grandchild.pid, flush=True)
sys.stdin.read()
grandchild.stdin.close()
grandchild.wait(10)
"""


def nice_of_threads(pid: int) -> list[int]:
    return [os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def test_helpers_and_all_their_threads_get_the_nice_value_and_we_keep_ours():
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {child.pid, grandchild} <= descendants()
        assert lower_background_priority(0) == 0  # 0: leave them alone
        assert set(nice_of_threads(child.pid)) == {ours}
        target = ours + 7
        changed = lower_background_priority(target)
        assert changed >= 3  # the child's two threads and the grandchild
        assert set(nice_of_threads(child.pid)) == {target}
        assert set(nice_of_threads(grandchild)) == {target}
        assert os.getpriority(os.PRIO_PROCESS, 0) == ours
        assert lower_background_priority(target) == 0  # already there; never lowered either
        assert lower_background_priority(target - 3) == 0 and set(nice_of_threads(grandchild)) == {target}
    finally:
        child.stdin.close()
        child.wait(20)
