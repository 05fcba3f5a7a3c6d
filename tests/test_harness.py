"""The multi-process harness tells a hang, a death by signal and a non-zero exit apart."""
import signal
import time

import pytest

from harness import Hang, KilledBySignal, NonZeroExit


def test_clean_exit_passes(procs):
    procs.start("ok", ["-c", "print('hello')"], python=True)
    results = procs.wait(timeout_s=30)
    assert results["ok"].returncode == 0
    assert "hello" in results["ok"].output


def test_hang_is_reported_as_hang_and_killed(procs):
    procs.start("sleeper", ["-c", "import time; print('up', flush=True); time.sleep(600)"], python=True)
    procs.start("ok", ["-c", "pass"], python=True)
    procs.wait_for_output("sleeper", "up", timeout_s=30)
    start = time.monotonic()
    with pytest.raises(Hang) as info:
        procs.wait(timeout_s=1)
    assert time.monotonic() - start < 20  # the deadline holds, the process tree is gone
    hung = {r.name: r for r in info.value.results}
    assert hung["sleeper"].hung and not hung["ok"].hung
    assert procs["sleeper"].poll() is not None
    assert "up" in str(info.value)  # each process's output is attached


def test_signal_death_is_reported_as_signal(procs):
    procs.start("victim", ["-c", "import os, signal; print('bye', flush=True); os.kill(os.getpid(), signal.SIGKILL)"],
                python=True)
    with pytest.raises(KilledBySignal) as info:
        procs.wait(timeout_s=30)
    (result,) = info.value.results
    assert result.signal == signal.SIGKILL
    assert "SIGKILL" in str(info.value) and "bye" in str(info.value)
    assert not isinstance(info.value, (Hang, NonZeroExit))


def test_nonzero_exit_is_reported_as_exit_code(procs):
    procs.start("failer", ["-c", "import sys; print('oops', flush=True); sys.exit(3)"], python=True)
    with pytest.raises(NonZeroExit) as info:
        procs.wait(timeout_s=30)
    (result,) = info.value.results
    assert result.returncode == 3 and result.signal is None
    assert "exit 3" in str(info.value) and "oops" in str(info.value)


def test_children_of_a_process_are_killed_with_it(procs, tmp_path):
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
        "print('ready', flush=True); time.sleep(600)\n"
    )
    procs.start("parent", ["-c", code], python=True)
    procs.wait_for_output("parent", "ready", timeout_s=30)
    with pytest.raises(Hang):
        procs.wait(timeout_s=0.5)
    import os
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # a killed child stays a zombie until reaped by init; check its state
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.05)
    else:
        pytest.fail("child of a hung process survived the harness")
