"""The training thread's side of the profiler: stamps, and nothing else.

After a real training step the caches are cold and every line of Python on the training
thread costs many times its warm price, so a step or phase boundary reads one clock and
appends one small tuple to a deque, whatever thread it runs on (``deque.append`` is atomic):
no lock, no dict, no nesting bookkeeping, no record. :mod:`profiler._steps` turns the stamps
into steps on the writer thread.

An event is ``(code, mark)``; a step's start is ``(STEP, mark, (samples, flops, number))``. A
code is a constant tuple ``(op, name)``. A mark is a ``perf_counter()`` float on a CPU and a
``(CUDA event, perf_counter())`` pair on a GPU (see :mod:`profiler._clock`); communication
stamps are always ``perf_counter()`` floats.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

__all__ = ["BEGIN", "END", "CANCEL", "STEP", "STEP_END", "STEP_FAILED", "COMM_BEGIN",
           "COMM_END", "phase_codes", "stamper", "Phase", "Step"]

# ops (the first item of a code)
BEGIN, END, CANCEL, STEP_OP, STEP_END_OP, STEP_FAILED_OP, COMM_BEGIN_OP, COMM_END_OP = range(8)
STEP = (STEP_OP, None)
STEP_END = (STEP_END_OP, None)
STEP_FAILED = (STEP_FAILED_OP, None)
COMM_BEGIN = (COMM_BEGIN_OP, None)
COMM_END = (COMM_END_OP, None)

Code = Tuple[int, Optional[str]]


def phase_codes(name: str) -> Tuple[Code, Code, Code]:
    """The begin, end and cancel codes of a phase."""
    return (BEGIN, name), (END, name), (CANCEL, name)


def stamper(append: Callable[[Any], None], mark: Callable[[], Any], code: Code) -> Callable[..., None]:
    """A function that stamps ``code``; it takes and ignores any arguments, so it can be
    registered directly as a hook (an optimizer's step hooks pass ``(optimizer, args,
    kwargs)``, the autograd engine's final callbacks nothing)."""

    def stamp(*_: Any, _append=append, _mark=mark, _code=code) -> None:
        _append((_code, _mark()))

    return stamp


class Phase:
    """A reusable context manager for one phase name; re-entering an open phase is a no-op
    (the writer pairs the outermost begin and end).

    ``begin``/``end`` are plain functions (see :func:`stamper`) so they can be registered
    directly as hooks.
    """

    __slots__ = ("name", "begin", "end", "_append", "_mark", "_begin_code", "_end_code",
                 "_cancel_code")

    def __init__(self, name: str, append: Callable[[Any], None], mark: Callable[[], Any]) -> None:
        self.name = name
        self._append = append
        self._mark = mark
        self._begin_code, self._end_code, self._cancel_code = phase_codes(name)
        self.begin = stamper(append, mark, self._begin_code)
        self.end = stamper(append, mark, self._end_code)

    def cancel(self) -> None:
        """Forget an open phase that measured nothing (the loader was exhausted)."""
        self._append((self._cancel_code, self._mark()))

    def __enter__(self) -> "Phase":
        self._append((self._begin_code, self._mark()))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._append((self._end_code, self._mark()))


#: ``Step.state``: no step open, a step open, the profiler closed.
IDLE, OPEN, CLOSED = 0, 1, 2


class Step:
    """The step context manager: a state check, a stamp and, every ``exchange_every`` steps,
    the window's exchange (``on_boundary``). A failed step is stamped as such and dropped."""

    __slots__ = ("state", "args", "left", "_append", "_mark", "_refuse", "_on_boundary")

    def __init__(self, append: Callable[[Any], None], mark: Callable[[], Any], every: int,
                 refuse: Callable[[], None], on_boundary: Callable[[], None]) -> None:
        self.state = IDLE
        self.args: Tuple[Optional[int], Optional[float], Optional[int]] = (None, None, None)
        self.left = every  # steps to the end of the exchange window
        self._append = append
        self._mark = mark
        self._refuse = refuse
        self._on_boundary = on_boundary

    def __enter__(self) -> "Step":
        if self.state:
            self._refuse()
        self.state = OPEN
        self._append((STEP, self._mark(), self.args))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.state != OPEN:
            return
        self.state = IDLE
        if exc_type is None:
            self._append((STEP_END, self._mark()))
            self.left -= 1
            if not self.left:
                self._on_boundary()
        else:  # a failed step is not a measurement
            self._append((STEP_FAILED, self._mark()))
