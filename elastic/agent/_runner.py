"""The worker entry point: runs the user's script and records how it failed.

Two modes:

``python -m elastic.agent._runner --standby [--preload torch,...]``
    A warm standby: imports the frameworks first, then blocks on stdin for one JSON line
    ``{"argv": [...], "module": bool, "env": {...}, "cwd": "..."}`` and runs that script in
    this already-warm interpreter. The agent keeps one ready per local worker so a replacement
    starts in milliseconds instead of paying interpreter start and ``import torch`` again.

``python -m elastic.agent._runner --fork-server SOCKET [--preload torch,...]``
    The node's fork server (:mod:`elastic.agent.forkserver`): imports once, forks workers.

``python -m elastic.agent._runner [-m] SCRIPT ARGS...``
    A cold start with the environment already set.

Either way an uncaught exception is written as JSON to ``$TORCHELASTIC_ERROR_FILE`` (the same
file torchrun's ``@record`` writes), so the agent's failure summary can show the traceback of
the first failing rank without the script having to do anything.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import time
import traceback


def _user_traceback(exc: BaseException) -> str:
    """The traceback without this runner's and runpy's frames: it starts in the user's code."""
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>")
                              or tb.tb_frame.f_code.co_filename.endswith("runpy.py")):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _write_error_file(exc: BaseException) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {
        "message": f"{type(exc).__name__}: {exc}",
        "extraInfo": {"py_callstack": _user_traceback(exc), "timestamp": str(int(time.time()))},
    }}
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _run(argv: list, module: bool) -> int:
    sys.argv = list(argv)
    if os.environ.get("HOROVOD_RANK") and os.environ.get("ELASTIC_NODE_ID"):
        from elastic import _hvd_bridge  # unmodified @hvd.elastic.run scripts follow the agent's rounds

        _hvd_bridge.install()
    if not module:
        script_dir = os.path.dirname(os.path.abspath(argv[0]))
        sys.path.insert(0, script_dir)
    else:
        sys.path.insert(0, os.getcwd())
    try:
        if module:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: B902 - report everything, like the interpreter does
        _write_error_file(exc)
        sys.stderr.write(_user_traceback(exc))
        return 1
    return 0


# What a warm standby imports for each framework the script uses: the framework and the
# modules its first distributed calls import lazily (DDP's first construction imports
# torch._dynamo, over a second of a restart if left to the worker).
_WARM_IMPORTS = {
    "torch": ["torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo"],
    "tensorflow": ["tensorflow"],
}


def warm_import(preload: list) -> None:
    """Import what the script's frameworks need before the script runs (a standby's or the fork
    server's one import per node); a module that is missing is left for the script to report."""
    for name in [m for p in preload for m in _WARM_IMPORTS.get(p, [p])]:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _standby(preload: list) -> int:
    warm_import(preload)
    ready = os.environ.pop("ELASTIC_STANDBY_READY", "")
    if ready:  # tell the agent we are warm (it waits for that before joining a running job)
        open(f"{ready}.{os.getpid()}", "w").close()
    line = sys.stdin.readline()
    if not line:
        return 0  # the agent no longer needs us
    spec = json.loads(line)
    # The script owns stdin no more than a cold-started worker would.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    return _run(spec["argv"], bool(spec.get("module")))


def _die_with_parent() -> None:
    """A worker must not outlive its agent (a killed node takes its workers with it)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the agent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def main() -> int:
    _die_with_parent()
    args = sys.argv[1:]
    if args[:1] == ["--fork-server"]:
        from .forkserver import main as fork_server

        return fork_server(args[1:])
    if args[:1] == ["--standby"]:
        preload = []
        if args[1:2] == ["--preload"] and len(args) > 2:
            preload = [m for m in args[2].split(",") if m]
        return _standby(preload)
    module = args[:1] == ["-m"]
    if module:
        args = args[1:]
    return _run(args, module)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
