"""Coroutines stepped by hand instead of run as Tasks: the one place that does it.

Two hot paths use it. A socket's heartbeat (ws_heartbeats.py) is a store call run without a
Task of its own: its first step runs at once in the socket's reader, and every later step from
the done callback of the future it waits on. A message to a socket (ws_connection.py) is the
ASGI send, stepped once by whoever delivers it; only a send that has to wait is awaited to its
end, by a writer task.

What this relies on, beyond the public asyncio API (checked against CPython 3.11.7, uvicorn
0.54.0 with its websockets-sansio protocol, redis-py 8.1.0):

- What `asyncio.Task` does with what a coroutine yields (its private `__step`): an asyncio
  future, marked by `_asyncio_future_blocking` (the attribute asyncio's futures carry for
  `isfuture`), is waited on and the coroutine resumed from its done callback; a bare yield
  (None) resumes it at the next loop iteration; anything else is an error.
- That the code awaited never needs a current Task: in a step run from a done callback,
  `asyncio.current_task()` is None, so `asyncio.timeout`, `asyncio.TaskGroup` and anyio's
  cancel scopes fail there. The store path of a heartbeat (leases -> service -> store ->
  batch.py, which times out its own tasks) must stay free of them.
- That uvicorn's ASGI send completes in its first step while the transport is writable: a
  send that yields still works, but goes through a writer task (slower, same order).

What it bought (docs/performance.md, "What changed, and what each change bought"; commit
1bf81bc, "Heartbeats 14k/s -> 26k/s per node"): no Task per heartbeat took a heartbeat from
32.3 to 25.7 us of node CPU in-process, the largest step after the hiredis reader; sending at
once took fan-out from 29.7 to 27.5 us per delivery (1.36x -> 1.26x bare Starlette) together
with the other ws.py changes. tests/web/test_internals.py fails if any of this changes.
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

Step = Coroutine[Any, Any, Any] | Generator[Any, Any, Any]  # a coroutine, or an __await__()
Done = Callable[[BaseException], None]  # StopIteration (with the value) or what it raised


def _step_of(awaitable: Awaitable[Any]) -> Step:
    if isinstance(awaitable, types.CoroutineType):  # the common case: no wrapper object
        return awaitable
    return awaitable.__await__()


def first_step(awaitable: Awaitable[Any]) -> tuple[Step, Any] | None:
    """Run `awaitable` up to its first wait: None if it finished, else what `finish` needs.

    An exception it raises in that step is raised here.
    """
    step = _step_of(awaitable)
    try:
        yielded = step.send(None)
    except StopIteration:
        return None
    return step, yielded


@types.coroutine
def finish(step: Step, yielded: Any) -> Generator[Any, Any, None]:
    """Await the rest of `step`, whose first step already ran (elsewhere) and yielded
    `yielded`: what `await step` would have done from there on, in the awaiting task."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            step.close()
            raise
        except BaseException as exc:  # the awaiting task was cancelled: so is the step
            try:
                yielded = step.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = step.send(sent)
            except StopIteration:
                return


def drive(awaitable: Awaitable[Any], done: Done) -> None:
    """Run `awaitable` to its end as a Task would, without one; `done` gets how it ended.

    Its first step runs now, in the caller; each later one from the done callback of the
    future it waits on. An exception while creating its step is reported to `done` too.
    """
    try:
        step = _step_of(awaitable)
    except BaseException as exc:
        done(exc)
        return
    _advance(step, done, None)


def _resume(step: Step, done: Done, _: object) -> None:
    _advance(step, done, None)


def _advance(step: Step, done: Done, error: BaseException | None) -> None:
    try:
        yielded = step.send(None) if error is None else step.throw(error)
    except BaseException as exc:  # StopIteration when it is done
        done(exc)
        return
    # What Task.__step does with what a coroutine yields.
    if getattr(yielded, "_asyncio_future_blocking", None):
        yielded._asyncio_future_blocking = False
        yielded.add_done_callback(functools.partial(_resume, step, done))
    elif yielded is None:
        asyncio.get_running_loop().call_soon(_resume, step, done, None)
    else:
        _advance(step, done, RuntimeError(f"a stepped coroutine got bad yield: {yielded!r}"))
