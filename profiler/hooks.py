"""Automatic phases: PyTorch module/optimizer/DDP hooks and a Keras callback.

PyTorch: a forward pre-hook and hook on the model (the top-level module only: one pair of
calls per step, whatever the model's depth) time ``forward``; a hook on the output's
gradient (added the cheapest way that works, see :func:`_grad_hook_adder`) marks the start
of ``backward`` and queues an autograd-engine callback that
runs when the backward pass ends (before DDP's own end-of-backward wait, so gradient
synchronisation is not counted as backward); the phase's own begin/end, registered directly
as optimizer step pre/post hooks, time ``optimizer``; a DDP communication hook wrapping allreduce times ``comm`` (the wall time with
any gradient bucket in flight, which is where fast ranks wait for slow ones).
"""
from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Callable, List, Optional

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


def _grad_hook_adder(torch: Any) -> Callable[[Any, Callable], None]:
    """``add(tensor, fn)``: call ``fn(grad)`` when backward reaches a non-leaf ``tensor``.

    Adding a hook per step is the costliest part of the hooks after a real step (cold caches):
    ``Tensor.register_hook`` and ``Node.register_prehook`` build an OrderedDict and a
    ``RemovableHandle`` in Python each time. The fast path does what ``Tensor.register_hook``
    itself does underneath (a hooks dict on the tensor, registered with its autograd node)
    without the handle: about a third of the cost. It is used only if a self-check on a tiny
    graph shows the hook firing exactly once; otherwise the public ``register_prehook``.
    """
    key = "elastic-prof"
    ordered = collections.OrderedDict

    def fast(tensor: Any, fn: Callable) -> None:
        hooks = tensor._backward_hooks
        if hooks is None:
            tensor._backward_hooks = hooks = ordered()  # what register_hook expects to find
            hooks[key] = fn
            tensor.grad_fn._register_hook_dict(tensor)
        else:  # the user's hooks dict, already registered with the node
            hooks[key] = fn

    def public(tensor: Any, fn: Callable) -> None:
        tensor.grad_fn.register_prehook(fn)

    try:
        fired = []
        with torch.enable_grad():
            out = torch.ones(1, requires_grad=True) * 2
            fast(out, lambda grad: fired.append("ours"))
            out.register_hook(lambda grad: fired.append("user's"))  # the user's, alongside
            out.sum().backward()
        if fired == ["ours", "user's"]:
            return fast
    except Exception:  # a torch without these internals
        pass
    return public


def attach_torch(prof: "StepProfiler", model: Any = None, optimizer: Any = None,
                 comm_hook: Any = None) -> List[Any]:
    """Register the hooks; returns handles whose ``remove()`` detaches them."""
    from elastic.lazy import require

    torch = require("torch", "PyTorch profiler hooks")
    handles: List[Any] = []
    if model is not None:
        handles.extend(_attach_model(prof, model, torch))
        ddp_cls = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
        if ddp_cls is not None and isinstance(model, ddp_cls):
            _attach_ddp(prof, model, comm_hook)
    if optimizer is not None:
        phase = prof.phase("optimizer")  # begin/end take (optimizer, args, kwargs) and ignore them
        handles.append(optimizer.register_step_pre_hook(phase.begin))
        handles.append(optimizer.register_step_post_hook(phase.end))
    return handles


def _attach_model(prof: "StepProfiler", model: Any, torch: Any) -> List[Any]:
    forward = prof.phase("forward")
    backward = prof.phase("backward")
    begin_forward, end_forward = forward.begin, forward.end
    begin_backward = backward.begin
    end_backward = backward.end  # queue_callback calls it with no arguments
    queue_callback = torch.autograd.Variable._execution_engine.queue_callback
    is_grad_enabled = torch.is_grad_enabled
    tensor_cls = torch.Tensor
    add_grad_hook = _grad_hook_adder(torch)
    skipped = [False]

    def on_backward_start(*_: Any) -> None:
        begin_backward()
        queue_callback(end_backward)

    def pre_forward(module: Any, args: Any) -> None:
        # Evaluation outside a step (no grad) is not part of a training step.
        if not prof._in_step and not is_grad_enabled():
            skipped[0] = True
            return
        skipped[0] = False
        begin_forward()

    def post_forward(module: Any, args: Any, output: Any) -> None:
        if skipped[0]:
            return
        end_forward()
        if is_grad_enabled():
            tensor = output if type(output) is tensor_cls else _first_grad_tensor(output, torch)
            if tensor is None or not tensor.requires_grad:
                return
            if tensor.grad_fn is not None:
                add_grad_hook(tensor, on_backward_start)
            elif getattr(tensor, "_elastic_prof_hook", None) is not on_backward_start:
                # the output is a leaf (a parameter): its hooks outlive the step, so once
                tensor._elastic_prof_hook = on_backward_start
                prof._hook_handles.append(tensor.register_hook(on_backward_start))

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

    class ProfilerCallback(keras.callbacks.Callback):
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
