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

from typing import Any, Callable, NamedTuple, Optional, Tuple

__all__ = ["BEGIN", "END", "CANCEL", "STEP", "STEP_UNSAMPLED", "STEP_END", "STEP_FAILED",
           "COMM_BEGIN", "COMM_END", "phase_codes", "stamper", "Phase", "Step", "make_step"]

# ops (the first item of a code)
BEGIN, END, CANCEL, STEP_OP, STEP_END_OP, STEP_FAILED_OP, COMM_BEGIN_OP, COMM_END_OP = range(8)
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


class Step(NamedTuple):
    """A profiler's step boundaries, made by :func:`make_step`: ``open`` is
    ``StepProfiler.step`` and returns ``context``; the rest let the profiler read and set
    what the closures hold."""

    open: Callable[..., Any]
    context: Any
    state: Callable[[], int]
    set_state: Callable[[int], None]
    set_code: Callable[[Code], None]


def make_step(append: Callable[[Any], None], mark: Callable[[], Any], every: int,
              refuse: Callable[[int], None], on_boundary: Callable[[], None],
              on_phase: Callable[[], Tuple[int, Code]], phase_left: int) -> Step:
    """The step boundaries: ``open(samples, flops, step)`` checks the state, stamps the
    start (``STEP``, or ``STEP_UNSAMPLED`` for a step without the automatic hooks) and returns
    the context, whose ``__enter__`` is a C no-op (one Python call per step fewer) and whose
    ``__exit__`` stamps the end, or a failure (a failed step is dropped), and counts steps.

    Every ``every`` steps ``on_boundary`` runs the window's exchange; when ``phase_left``
    steps have ended (never if it starts < 1) ``on_phase`` puts the automatic hooks in or
    takes them out and returns the next countdown and start code. A failed step counts for
    neither. ``__exit__`` counts down one number, the steps to the next of those events. The
    state lives in closure cells, not an object's slots: after a real step, with cold caches,
    that makes the step's end about a third cheaper.
    """
    state, code = IDLE, STEP
    left, countdown = every, phase_left  # steps to the next boundary, to the next on_phase
    due = span = min(left, countdown) if countdown > 0 else left  # to the next of either
    idle, opened, end, failed = IDLE, OPEN, STEP_END, STEP_FAILED

    def open_step(samples: Optional[int] = None, flops: Optional[float] = None,
                  step: Optional[int] = None) -> Any:
        nonlocal state
        if state:
            refuse(state)
        state = opened
        append((code, mark(), (samples, flops, step)))
        return context

    def advance() -> None:
        """``span`` steps have ended since the last call: run what is due, count anew."""
        nonlocal left, countdown, code, due, span
        left -= span
        phase_due = False
        if countdown > 0:  # below 1: never
            countdown -= span
            phase_due = not countdown
        due = span = 1 << 62  # if what follows raises, count from here rather than never again
        try:
            if phase_due:
                countdown, code = on_phase()
            if not left:
                left = every
                on_boundary()
        finally:
            due = span = min(left, countdown) if countdown > 0 else left

    class StepContext:
        __slots__ = ()

        # ``with`` looks ``__enter__`` up on the type: a staticmethod of a C callable runs
        # no Python (NoneType() returns None; ``with prof.step() as s`` binds None)
        __enter__: "staticmethod[[], None]" = staticmethod(type(None))

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            nonlocal state, due
            if state != opened:
                return
            state = idle
            if exc_type is None:
                append((end, mark()))
                due -= 1
                if not due:
                    advance()
            else:  # a failed step is not a measurement
                append((failed, mark()))

    context = StepContext()

    def get_state() -> int:
        return state

    def set_state(value: int) -> None:
        nonlocal state
        state = value

    def set_code(value: Code) -> None:
        nonlocal code
        code = value

    return Step(open_step, context, get_state, set_state, set_code)
