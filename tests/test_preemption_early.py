"""A SIGUSR1/SIGTERM that arrives before the training loop's PreemptionGuard (issue 10)."""
import os
import signal
import time

from mpidl import checkpoint as C


def test_early_signal_is_taken_over_by_the_first_guard():
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        C.catch_early_signals()
        os.kill(os.getpid(), signal.SIGUSR1)       # while "starting": must not kill us
        time.sleep(0.05)
        with C.PreemptionGuard() as g:
            assert g.requested and g.signum == signal.SIGUSR1
            assert g.should_stop()
        with C.PreemptionGuard() as g:            # taken over once, not again
            assert not g.requested and not g.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)       # after the guard: recorded, not fatal
        time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    finally:
        C._EARLY.clear()
        for s, h in old.items():
            signal.signal(s, h)
