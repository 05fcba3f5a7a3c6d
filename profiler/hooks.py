"""Automatic phases: PyTorch module/optimizer/DDP hooks and a Keras callback.

PyTorch: a forward pre-hook and hook on the model (the top-level module only: one pair of
calls per step, whatever the model's depth) time ``forward``; a hook on the output's
gradient (added the cheapest way that works, see :func:`_grad_hook_adder`) marks the start
of ``backward`` and queues an autograd-engine callback that
runs when the backward pass ends (before DDP's own end-of-backward wait, so gradient
synchronisation is not counted as backward); the phase's own begin/end, registered directly
as optimizer step pre/post hooks, time ``optimizer``; a DDP communication hook wrapping
allreduce times ``comm`` (the wall time with any gradient bucket in flight, which is where
fast ranks wait for slow ones).

The module and optimizer hooks (and a leaf output's tensor hook) are in their hook dicts for
one step in ``phase_every`` only (the profiler takes them out and puts them back, see
:mod:`profiler.core`); the DDP communication hook cannot be taken out and times ``comm`` on
every step, which the straggler detection needs.
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from ._stamps import OPEN, phase_codes

if TYPE_CHECKING:  # pragma: no cover
    from .core import StepProfiler

__all__ = ["attach_torch", "keras_callback"]


def _first_grad_tensor(output: Any, torch: Any) -> Optional[Any]:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = _first_grad_tensor(item, torch)
            if found is not None:
                return found
    return None


_ADDERS: dict = {}  # torch module id -> the maker that passed the self-check


def _grad_hook_adder(torch: Any) -> Callable[[Callable], Tuple[Callable[[Any, Any], None],
                                                                Callable[[], None]]]:
    """``make(fn)`` gives ``(add, tend)``: ``add(tensor, node)`` calls ``fn(grad)`` when
    backward reaches a non-leaf ``tensor`` whose autograd node is ``node``; ``tend()`` keeps
    its pool of hooks dicts full, off the training thread (the profiler's writer calls it).

    Adding a hook per step is the costliest part of the hooks after a real step (cold caches):
    ``Tensor.register_hook`` and ``Node.register_prehook`` build an OrderedDict and a
    ``RemovableHandle`` in Python each time. The fast path does what ``Tensor.register_hook``
    itself does underneath (a hooks dict on the tensor, registered with its autograd node)
    without the handle, and takes the dict, already holding ``fn``, from a pool that ``tend``
    fills (making 64 of them on the training thread after a step cost ~40 us); each dict
    serves one tensor only, so a user's hook added to it never reaches another step. It is
    used only if a self-check on a tiny graph (once per process) shows the hook firing exactly
    once, beside the user's; otherwise the public ``register_prehook``.
    """
    key = "elastic-prof"
    ordered = collections.OrderedDict

    def make_fast(fn: Callable) -> Tuple[Callable[[Any, Any], None], Callable[[], None]]:
        pool: List[Any] = []
        entry = ((key, fn),)

        def add(tensor: Any, node: Any) -> None:
            hooks = tensor._backward_hooks
            if hooks is None:
                # what register_hook expects to find; the pool is empty only if the writer
                # fell far behind (list.pop and list.append are atomic)
                tensor._backward_hooks = pool.pop() if pool else ordered(entry)
                node._register_hook_dict(tensor)
            else:  # the user's hooks dict, already registered with the node
                hooks[key] = fn

        def tend() -> None:
            while len(pool) < 64:
                pool.append(ordered(entry))

        tend()
        return add, tend

    def make_public(fn: Callable) -> Tuple[Callable[[Any, Any], None], Callable[[], None]]:
        def add(tensor: Any, node: Any) -> None:
            node.register_prehook(fn)

        return add, lambda: None

    chosen = _ADDERS.get(id(torch))
    if chosen is not None:
        return chosen
    chosen = make_public
    try:
        fired = []
        with torch.enable_grad():
            out = torch.ones(1, requires_grad=True) * 2
            make_fast(lambda grad: fired.append("ours"))[0](out, out.grad_fn)
            out.register_hook(lambda grad: fired.append("user's"))  # the user's, alongside
            out.sum().backward()
        if fired == ["ours", "user's"]:
            chosen = make_fast
    except Exception:  # a torch without these internals
        pass
    _ADDERS[id(torch)] = chosen
    return chosen


def attach_torch(prof: "StepProfiler", model: Any = None, optimizer: Any = None,
                 comm_hook: Any = None,
                 instrument: Optional[Callable[[Callable], Callable]] = None) -> List[Any]:
    """Register the hooks; returns handles whose ``remove()`` detaches them.

    ``instrument(fn)``, if given, wraps every function the hooks call on the training thread
    (the overhead benchmark meters them this way).
    """
    from elastic.lazy import require

    torch = require("torch", "PyTorch profiler hooks")
    wrap = instrument or (lambda fn: fn)
    handles: List[Any] = []
    if model is not None:
        handles.extend(_attach_model(prof, model, torch, wrap))
        ddp_cls = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
        if ddp_cls is not None and isinstance(model, ddp_cls):
            _attach_ddp(prof, model, comm_hook)
    if optimizer is not None:
        phase = prof.phase("optimizer")  # begin/end take (optimizer, args, kwargs) and ignore them
        handles.append(optimizer.register_step_pre_hook(wrap(phase.begin)))
        handles.append(optimizer.register_step_post_hook(wrap(phase.end)))
    return handles


def _attach_model(prof: "StepProfiler", model: Any, torch: Any,
                  wrap: Callable[[Callable], Callable]) -> List[Any]:
    # The hooks stamp inline (see profiler._stamps): a nested call costs as much as a stamp.
    append, mark = prof._stamps.append, prof._mark
    begin_forward, end_forward, _ = phase_codes(prof.phase("forward").name)
    begin_backward, _, _ = phase_codes(prof.phase("backward").name)
    end_backward = wrap(prof.phase("backward").end)  # queue_callback calls it with no arguments
    step_state = prof._steps.state
    queue_callback = torch.autograd.Variable._execution_engine.queue_callback
    is_grad_enabled = torch.is_grad_enabled
    tensor_cls = torch.Tensor
    skipped = [False]

    @wrap
    def on_backward_start(grad: Any) -> None:
        append((begin_backward, mark()))
        queue_callback(end_backward)

    add_grad_hook, tend = _grad_hook_adder(torch)(on_backward_start)
    prof._tenders.append(tend)

    @wrap
    def pre_forward(module: Any, args: Any) -> None:
        # Evaluation outside a step (no grad) is not part of a training step.
        if not is_grad_enabled() and step_state() != OPEN:
            skipped[0] = True
            return
        skipped[0] = False
        append((begin_forward, mark()))

    @wrap
    def post_forward(module: Any, args: Any, output: Any) -> None:
        if skipped[0]:
            return
        append((end_forward, mark()))
        # under no_grad nothing requires grad, so there is no backward to find
        tensor = output if type(output) is tensor_cls else _first_grad_tensor(output, torch)
        if tensor is None or not tensor.requires_grad:
            return
        node = tensor.grad_fn
        if node is not None:
            add_grad_hook(tensor, node)
        elif getattr(tensor, "_elastic_prof_hook", None) is not on_backward_start \
                and is_grad_enabled():
            # the output is a leaf (a parameter): its hooks outlive the step, so once
            tensor._elastic_prof_hook = on_backward_start
            prof._add_hook_handle(tensor.register_hook(on_backward_start))

    return [model.register_forward_pre_hook(pre_forward),
            model.register_forward_hook(post_forward)]


def _attach_ddp(prof: "StepProfiler", ddp: Any, comm_hook: Any) -> None:
    if comm_hook is None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        comm_hook = allreduce_hook
    begin, end = prof.comm_begin, prof.comm_end

    def done(fut: Any) -> Any:
        end()
        return fut.value()

    def timed_hook(state, bucket):  # DDP checks the annotations: leave them empty
        begin()
        try:
            fut = comm_hook(state, bucket)
        except BaseException:
            end()
            raise
        return fut.then(done)

    ddp.register_comm_hook(None, timed_hook)


def keras_callback(prof: "StepProfiler", batch_size: Optional[int] = None) -> Any:
    """A Keras callback: each training batch is one step (``samples`` = ``batch_size``)."""
    from elastic.lazy import require

    keras = require("tensorflow", "the Keras profiler callback").keras
    step_ctx = {}

    callback_base: Any = keras.callbacks.Callback  # tensorflow ships no stubs: the base is Any

    class ProfilerCallback(callback_base):
        """Times every training batch as a profiler step; closes nothing (the profiler's owner does)."""

        def on_train_batch_begin(self, batch, logs=None):
            ctx = prof.step(samples=batch_size)
            ctx.__enter__()
            step_ctx["open"] = ctx

        def on_train_batch_end(self, batch, logs=None):
            ctx = step_ctx.pop("open", None)
            if ctx is not None:
                ctx.__exit__(None, None, None)

        def on_train_end(self, logs=None):
            prof.flush()

    return ProfilerCallback()
