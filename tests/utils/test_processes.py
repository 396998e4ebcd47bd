"""Child processes die with their parent (dints3d/utils/processes.py): a SIGKILLed parent leaves no orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from support import alive, children, wait_until

#: a parent that starts a guarded child (python -m timeit running a 10-minute sleep) and waits for it
PARENT = textwrap.dedent('''
    import sys
    from dints3d.utils.processes import guarded, run_child
    run_child([sys.executable, "-m", *guarded(["timeit", "-n1", "-r1", "import time; time.sleep(600)"])])
''')


def test_a_child_dies_with_its_sigkilled_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        wait_until(lambda: children(parent.pid), 60, "the child process")
        (child,) = children(parent.pid)
        wait_until(lambda: "timeit" in open(f"/proc/{child}/cmdline").read(), 60, "the child to run its module")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not alive(child), 10, f"the orphaned child {child} to die")
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_does_not_start():
    """The parent may die between fork and the child's request to die with it: the child notices and exits."""
    env = {**os.environ, "DINTS3D_PARENT_PID": "1"}  # not our parent: as if it had died and we were re-parented
    done = subprocess.run([sys.executable, "-m", "dints3d.utils.processes", "timeit", "-n1", "-r1", "pass"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGKILL and done.stdout == ""
