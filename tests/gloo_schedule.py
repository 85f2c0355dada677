"""A gdb script (``gdb -nx -x tests/gloo_schedule.py --args python ...``) that schedules one
rank's threads to reproduce the abort of #18 on demand. Used by ``test_rank_exit.py``.

A rank's last collectives are run by gloo's run loop threads (``ProcessGroupGloo::runLoop``).
The one that completes a work wakes the main thread, then drops its reference to the work.
If the main thread drops the Python tensors first, the tensors keep their PyObjects, and the
run loop thread's drop takes the GIL to release them. The script holds that thread in the
window (at the return of ``AsyncWork::execute``) while every other thread runs on (gdb's
non-stop mode), then lets each go in turn:

1. the main thread: the script's end, up to ``Py_FinalizeEx``;
2. the held thread: it drops the work, up to ``PyEval_AcquireThread``;
3. the main thread: the runtime marks itself finalizing (``FINALIZING_AT`` follows);
4. the held thread, to whatever end it meets.

A rank that never reaches ``Py_FinalizeEx`` (``os._exit``) ends with steps 1 to 4 unreached.

Environment: ``HOLD_AT``, the work to hold, counted from the rank's start (0: hold none, and
say every work's type); ``FINALIZING_AT``, the CPython function ``Py_FinalizeEx`` calls just
after it marks the runtime finalizing; ``SCHEDULE_LOG``, the file the schedule is said in (the
rank's and gdb's own output share gdb's). x86-64 only: a work is read from ``$rdi``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import gdb

HOLD_AT = int(os.environ.get("HOLD_AT", "0"))
EXECUTE = (
    "'c10d::ProcessGroupGloo::AsyncWork::execute(c10::intrusive_ptr<c10d::ProcessGroupGloo::"
    "AsyncWork, c10::detail::intrusive_target_default_null_type<c10d::ProcessGroupGloo::"
    "AsyncWork> > const&)'"
)
MAIN = 1  # gdb's number for the first thread
state: dict[str, int | None] = {"works": 0, "held": None}
log = open(os.environ["SCHEDULE_LOG"], "a", buffering=1)  # noqa: SIM115 (gdb's lifetime)


def say(line: str) -> None:
    log.write(f"{line}\n")


def resume(thread: int) -> None:
    def go() -> None:
        gdb.execute(f"thread {thread}")
        gdb.execute("continue &")

    gdb.post_event(go)


class Completed(gdb.FinishBreakpoint):
    """The return of the held work's ``execute``: the work is complete, not yet dropped."""

    def stop(self) -> bool:
        state["held"] = gdb.selected_thread().num
        say(f"work {HOLD_AT} complete; its run loop thread {state['held']} is held")
        return True


class Execute(gdb.Breakpoint):
    """Counts the works; stops the thread that starts work ``HOLD_AT`` (``on_stop`` goes on)."""

    def stop(self) -> bool:
        state["works"] += 1
        if HOLD_AT == 0:
            # The first argument: a reference to the intrusive_ptr, whose pointee's first word
            # is the vtable of the work's class.
            vtable = gdb.parse_and_eval("**(void ***)$rdi")
            name = gdb.execute(f"info symbol {int(vtable)}", to_string=True)
            say(f"work {state['works']} {name.split('::')[-1].split()[0]}")
        return state["works"] == HOLD_AT


class Step(gdb.Breakpoint):
    """Stops the thread it is for, once, and lets the next thread of the schedule go."""

    def __init__(
        self, where: str, thread_of: Callable[[], int | None], then: Callable[[], int | None],
        what: str,
    ) -> None:  # fmt: skip
        super().__init__(where, internal=True)
        self.thread_of, self.then, self.what = thread_of, then, what
        self.done = False  # breakpoints are not changed in stop(): a flag, not self.enabled

    def stop(self) -> bool:
        then = self.then()
        if self.done or gdb.selected_thread().num != self.thread_of() or then is None:
            return False
        self.done = True
        say(self.what)
        resume(then)
        return True


def on_stop(event: gdb.StopEvent) -> None:
    if isinstance(event, gdb.SignalEvent):
        say(f"thread {gdb.selected_thread().num} received {event.stop_signal}")
        gdb.execute("bt 24")
        gdb.post_event(lambda: gdb.execute("continue -a &"))
    elif isinstance(event, gdb.BreakpointEvent) and execute in event.breakpoints:
        # Created here, not in Execute.stop, where gdb forbids adding breakpoints.
        Completed(gdb.newest_frame(), internal=True)
        resume(gdb.selected_thread().num)


def on_exit(event: gdb.ExitedEvent) -> None:
    if hasattr(event, "exit_code"):
        say(f"exit code {event.exit_code}")
    say(f"works {state['works']}")
    log.close()
    gdb.post_event(lambda: gdb.execute("quit"))


for setting in ("pagination off", "confirm off", "non-stop on", "breakpoint pending on"):
    gdb.execute(f"set {setting}")
gdb.events.stop.connect(on_stop)
gdb.events.exited.connect(on_exit)
execute = Execute(EXECUTE, internal=True)
if HOLD_AT:
    Step("Py_FinalizeEx", lambda: MAIN, lambda: state["held"], "the main thread finalizes")
    Step(
        "PyEval_AcquireThread",
        lambda: state["held"],
        lambda: MAIN,
        "the held thread, dropping the work, takes the GIL",
    )
    Step(
        os.environ["FINALIZING_AT"],
        lambda: MAIN,
        lambda: state["held"],
        "the runtime is finalizing",
    )
gdb.execute("run &")
