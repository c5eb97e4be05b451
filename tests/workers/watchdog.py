"""hello.py's worker, speaking the watchdog and SIGUSR2 parts of the notify protocol.

The launcher's watchdog is tested with this worker so that its tests do not
depend on how trac_fcgi.py's own server will send them: it says
"READY=1\nWATCHDOG=1" and then WATCHDOG=1 from its main loop every quarter
of WATCHDOG_USEC, as systemd's watchdog contract asks; SIGSTOP or a main loop
that blocks silences it, as it would any worker.  SIGUSR2 logs
`event=stacks` and the worker goes on serving.  Should trac_fcgi.py send
WATCHDOG=1 itself, a second one on the same beat changes nothing.

A mold started from this script has the same additions: it is trac_fcgi's
own mold, which sends WATCHDOG=1 from its fork-request loop.
"""
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", ".."), HERE]

import hello  # noqa: E402
import trac_fcgi  # noqa: E402


def speak_watchdog():
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit():
        return
    period = int(usec) / 4e6
    notify, periodic = trac_fcgi.sd_notify, trac_fcgi.RecyclingWSGIServer._mainloopPeriodic
    last = [0.0]

    def ready_and_watchdog(message):
        if message == "READY=1":
            message, last[0] = "READY=1\nWATCHDOG=1", time.monotonic()
        notify(message)

    def beating(server):
        if time.monotonic() - last[0] >= period:
            last[0] = time.monotonic()
            notify("WATCHDOG=1")
        periodic(server)

    trac_fcgi.sd_notify = ready_and_watchdog
    trac_fcgi.RecyclingWSGIServer._mainloopPeriodic = beating


def stacks(signum, frame):
    trac_fcgi.log("stacks", threads=len(sys._current_frames()))


if __name__ == "__main__":
    speak_watchdog()
    signal.signal(signal.SIGUSR2, stacks)
    hello.main()
