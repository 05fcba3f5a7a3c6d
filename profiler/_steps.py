"""From stamps to steps: the writer's side of the hot path (see :mod:`profiler._stamps`).

:class:`StepAssembler` reads the stamp stream in order and keeps the bookkeeping the training
thread no longer does: it pairs the outermost begin and end of each phase, counts phases timed
before a step towards it (the step starts where the first of them started), numbers the
steps, drops failed ones, and merges the communication intervals stamped by any thread. What it
yields is one raw tuple per finished step; the profiler turns those into records once their
marks can be read (on a GPU, once their events have completed).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

from ._stamps import (BEGIN, CANCEL, COMM_BEGIN_OP, COMM_END_OP, END, STEP_END_OP,
                      STEP_FAILED_OP, STEP_OP)

__all__ = ["StepAssembler", "MAX_CARRY"]

MAX_CARRY = 4096  # phase intervals kept for the next step while no step opens


class StepAssembler:
    """Turns stamps into finished steps, in order; not thread-safe (the profiler's collect
    lock guards it).

    A finished step is ``(number, start, end, intervals, samples, flops, comm, spare,
    sampled)``:
    ``start``/``end`` marks, ``intervals`` a list of ``(phase, begin mark, end mark)``,
    ``comm`` a list of ``(begin, end)`` ``perf_counter()`` times or None, ``spare`` a mark the
    step stamped but did not use (its start, when a phase before it started it), or None;
    ``sampled`` False when the automatic (hook) phases were off for the step.
    ``release(marks)`` gets the marks of failed steps (pooled CUDA events go back).
    """

    def __init__(self, release: Optional[Callable[[List[Any]], None]] = None) -> None:
        self._release = release
        self.in_step = False
        self.ended = 0  # finished steps so far
        self._depth: Dict[str, int] = {}
        self._open: Dict[str, Any] = {}  # phase -> mark of its outermost begin
        self._carry_start: Any = None
        self._intervals: List[tuple] = []  # the open step's, or the carry before a step
        self._comm: List[tuple] = []
        self._comm_inflight = 0
        self._comm_start = 0.0
        self._next_step = 0
        # (number, start, samples, flops, spare, sampled)
        self._step: tuple = (0, None, None, None, None, True)

    def feed(self, events: Deque[tuple], out: Deque[tuple]) -> None:
        """Consume every stamp in ``events`` (oldest first); append finished steps to ``out``."""
        popleft = events.popleft
        depth, open_ = self._depth, self._open
        while True:
            try:
                event = popleft()
            except IndexError:
                return
            op, name = event[0]
            mark = event[1]
            if op == BEGIN:
                level = depth.get(name, 0)
                depth[name] = level + 1
                if not level:
                    open_[name] = mark
                    if not self.in_step and self._carry_start is None:
                        self._carry_start = mark
            elif op == END:
                level = depth.get(name, 0)
                if level != 1:  # an inner end, or an end without a begin
                    if level:
                        depth[name] = level - 1
                    continue
                depth[name] = 0
                intervals = self._intervals
                intervals.append((name, open_.pop(name), mark))
                if not self.in_step and len(intervals) > MAX_CARRY:  # phases but never a step
                    del intervals[:-MAX_CARRY // 2]
            elif op == STEP_OP:
                self._begin_step(mark, event[2], name is None)
            elif op == STEP_END_OP:
                if self.in_step:
                    self.in_step = False
                    number, start, samples, flops, spare, sampled = self._step
                    comm = self._comm or None
                    if comm:
                        self._comm = []
                    out.append((number, start, mark, self._intervals, samples, flops, comm, spare,
                                sampled))
                    self._intervals = []
                    self.ended += 1
            elif op == STEP_FAILED_OP:
                self._fail_step(mark)
            elif op == CANCEL:
                level = depth.get(name, 0)
                if level:
                    depth[name] = level - 1
                    if level == 1:
                        open_.pop(name, None)
                        if not self.in_step and not self._intervals:
                            self._carry_start = None
            elif op == COMM_BEGIN_OP:
                if not self._comm_inflight:
                    self._comm_start = mark
                self._comm_inflight += 1
            elif op == COMM_END_OP:
                if self._comm_inflight:
                    self._comm_inflight -= 1
                    if not self._comm_inflight:
                        self._comm.append((self._comm_start, mark))

    def _begin_step(self, mark: Any, args: tuple, sampled: bool = True) -> None:
        samples, flops, number = args
        if number is not None:
            self._next_step = number
        current = self._next_step
        self._next_step += 1
        self.in_step = True
        if self._carry_start is not None:  # the step starts where its first phase started
            start, spare = self._carry_start, mark
            self._carry_start = None
        else:
            start, spare = mark, None
        self._step = (current, start, samples, flops, spare, sampled)

    def _fail_step(self, mark: Any) -> None:
        """A failed step is not a measurement: drop it, and the phases it left open."""
        if not self.in_step:
            return
        self.in_step = False
        _, start, _, _, spare, _ = self._step
        if self._release is not None:
            marks = [start, mark] + [m for _, a, b in self._intervals for m in (a, b)]
            marks.extend(self._open.values())
            if spare is not None:
                marks.append(spare)
            self._release(marks)
        self._intervals = []
        self._depth.clear()
        self._open.clear()


def new_stamp_queue() -> Deque[tuple]:
    """The stamp queue: bounded, so stamps made after ``close()`` (or while the writer is
    stalled for minutes) cannot grow without limit; the oldest are dropped first."""
    return deque(maxlen=1 << 20)
