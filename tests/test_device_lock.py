"""The lock that keeps CUDA graph captures apart from other threads' generate() calls (CPU, threads)."""

import threading
import time

from specdec.device_lock import SharedExclusive


def _start(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_capture_waits_for_running_calls_and_new_calls_wait_for_it():
    lock, events = SharedExclusive(), []
    inside, leave = threading.Event(), threading.Event()

    def call(name):
        with lock.shared():
            events.append(f"{name} in")
            inside.set()
            leave.wait(5)
            events.append(f"{name} out")

    def capture():
        with lock.exclusive():
            events.append("capture")

    first = _start(lambda: call("a"))
    inside.wait(5)
    writer = _start(capture)
    time.sleep(0.1)
    late = _start(lambda: call("b"))        # arrives while the capture waits: goes after it
    time.sleep(0.1)
    assert events == ["a in"]
    leave.set()
    for t in (first, writer, late):
        t.join(5)
    assert events[:3] == ["a in", "a out", "capture"] and events[3:] == ["b in", "b out"]


def test_two_calls_that_both_capture_do_not_wait_on_each_other():
    lock, both_in, done = SharedExclusive(), threading.Barrier(2), []

    def call(name):
        with lock.shared():
            both_in.wait(5)
            with lock.exclusive():          # upgrade: gives up this thread's share while waiting
                done.append(name)
            with lock.shared():             # nested share: already held
                pass

    threads = [_start(lambda n=n: call(n)) for n in "ab"]
    for t in threads:
        t.join(5)
    assert sorted(done) == ["a", "b"] and not any(t.is_alive() for t in threads)


def test_a_call_waiting_on_another_steps_out_so_a_capture_can_run():
    lock, handed_back, captured = SharedExclusive(), threading.Event(), threading.Event()

    def waiting_call():
        with lock.shared():
            with lock.released():
                handed_back.wait(5)         # e.g. a static runner another call holds

    def capture():
        with lock.exclusive():
            captured.set()
        handed_back.set()

    waiter = _start(waiting_call)
    time.sleep(0.1)
    writer = _start(capture)
    for t in (waiter, writer):
        t.join(5)
    assert captured.is_set() and not waiter.is_alive()


def test_the_writer_may_nest_and_take_shares():
    lock = SharedExclusive()
    with lock.exclusive():
        with lock.exclusive():
            with lock.shared():
                pass
    with lock.shared():                     # everything given back
        pass
    assert lock._readers == 0 and lock._writer is None
