"""The training thread's side of the profiler: stamps, and nothing else.

After a real training step the caches are cold and every line of Python on the training
thread costs many times its warm price, so a step or phase boundary reads one clock and
appends one small tuple to a deque, whatever thread it runs on (``deque.append`` is atomic):
no lock, no dict, no nesting bookkeeping, no record. :mod:`profiler._steps` turns the stamps
into steps on the writer thread.

An event is ``(code, mark)``; a step's start is ``(STEP, mark, (samples, flops, number))``
(``STEP_UNSAMPLED`` for a step on which the automatic hooks are off, see
:class:`Step`). A code is a constant tuple ``(op, name)``. A mark is a ``perf_counter()`` float on a CPU and a
``(CUDA event, perf_counter())`` pair on a GPU (see :mod:`profiler._clock`); communication
stamps are always ``perf_counter()`` floats.
"""
from __future__ import annotations

from itertools import repeat, starmap
from typing import Any, Callable, Iterator, Optional, Tuple

__all__ = ["BEGIN", "END", "CANCEL", "FETCH_BEGIN", "FETCH_END", "FETCH_CANCEL", "STEP",
           "STEP_UNSAMPLED", "STEP_END", "STEP_FAILED", "COMM_BEGIN", "COMM_END", "phase_codes",
           "fetch_codes", "stamper", "stamps", "Phase", "Step"]

# ops (the first item of a code)
(BEGIN, END, CANCEL, STEP_OP, STEP_END_OP, STEP_FAILED_OP, COMM_BEGIN_OP, COMM_END_OP,
 FETCH_BEGIN, FETCH_END, FETCH_CANCEL) = range(11)
Code = Tuple[int, Optional[str]]

STEP: Code = (STEP_OP, None)
STEP_UNSAMPLED: Code = (STEP_OP, "unsampled")  # a step without the automatic (hook) phases
STEP_END: Code = (STEP_END_OP, None)
STEP_FAILED: Code = (STEP_FAILED_OP, None)
COMM_BEGIN: Code = (COMM_BEGIN_OP, None)
COMM_END: Code = (COMM_END_OP, None)


def phase_codes(name: str) -> Tuple[Code, Code, Code]:
    """The begin, end and cancel codes of a phase."""
    return (BEGIN, name), (END, name), (CANCEL, name)


def fetch_codes(name: str) -> Tuple[Code, Code, Code]:
    """The begin, end and cancel codes of a loader's fetch timed as phase ``name``: like a
    phase's, except that a fetch begun while an earlier one of the phase never ended (the
    loader raised) restarts it instead of nesting in it."""
    return (FETCH_BEGIN, name), (FETCH_END, name), (FETCH_CANCEL, name)


def stamps(append: Callable[[Any], None], mark: Callable[[], Any], code: Code,
           times: Optional[int] = None) -> Iterator[None]:
    """An iterator each ``next`` of which stamps ``code`` and yields None, ``times`` times
    (None: without end), all in C when ``mark`` is: no Python frame on the training thread
    (what the loader wrapper is built from)."""
    no_args = repeat(()) if times is None else repeat((), times)
    return map(append, zip(repeat(code), starmap(mark, no_args)))


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
    """The step context manager, opened by ``StepProfiler.step()`` (a state check and a
    stamp there: entering the context is a C no-op, one Python call per step fewer); leaving
    it stamps the end and, every ``exchange_every`` steps, runs the window's exchange
    (``on_boundary``). A failed step is stamped as such and dropped.

    It also counts steps for the sampled phases: when ``phase_left`` steps have ended,
    ``on_phase`` runs (the profiler puts its automatic hooks in or takes them out, sets the
    next countdown and ``code``: ``STEP``, or ``STEP_UNSAMPLED`` for steps without the
    hooks). A failed step does not count.
    """

    __slots__ = ("state", "left", "phase_left", "code", "_append", "_mark", "_on_boundary",
                 "_on_phase")

    def __init__(self, append: Callable[[Any], None], mark: Callable[[], Any], every: int,
                 on_boundary: Callable[[], None], on_phase: Callable[[], None],
                 phase_left: int) -> None:
        self.state = IDLE
        self.left = every  # steps to the end of the exchange window
        self.phase_left = phase_left  # steps to the next on_phase (never when it starts < 1)
        self.code = STEP
        self._append = append
        self._mark = mark
        self._on_boundary = on_boundary
        self._on_phase = on_phase

    # ``with`` looks ``__enter__`` up on the type: a staticmethod of a C callable runs no
    # Python (NoneType() returns None; ``with prof.step() as s`` binds None)
    __enter__: "staticmethod[[], None]" = staticmethod(type(None))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.state != OPEN:
            return
        self.state = IDLE
        if exc_type is None:
            self._append((STEP_END, self._mark()))
            self.phase_left -= 1
            if not self.phase_left:
                self._on_phase()
            self.left -= 1
            if not self.left:
                self._on_boundary()
        else:  # a failed step is not a measurement
            self._append((STEP_FAILED, self._mark()))
