"""The guard names the daemon it outlived by the pid the daemon told it, not by its own parent:
a daemon that dies while the guard starts up leaves it re-parented (to init, or to a
subreaper), and its parent then is someone else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.support.guard_parent import Adopter, Exits


def test_the_guard_names_the_daemons_real_pid_after_being_re_parented(
    tmp_path: Path, adopter: Adopter
) -> None:
    log = tmp_path / "guard.log"
    read_end, write_end = os.pipe()
    # A stand-in daemon that starts the guard and is gone at once, long before the guard's
    # Python is up: the guard is re-parented to us (the subreaper) before it runs a line.
    starts_the_guard = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-m', 'trioserve.host.guard'],"
        " stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], 'w'))\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", starts_the_guard, str(log)], stdin=read_end)
    os.close(read_end)
    daemon.wait()
    hello = {
        "op": "hello",
        "instance": "guard-pid-test",
        "grace": 0.5,
        "daemon_pid": daemon.pid,
        "daemon_pgid": os.getpgrp(),
    }
    (guard,) = psutil.Process().children()  # adopted: its parent is gone
    with Exits([guard.pid]) as exits:
        os.write(write_end, json.dumps(hello).encode() + b"\n")
        os.close(write_end)  # the daemon's death, as the guard sees it
        exits.wait(20)
    assert adopter.reap(guard.pid) == 0
    assert f"daemon pid {daemon.pid} is gone" in log.read_text(), log.read_text()
