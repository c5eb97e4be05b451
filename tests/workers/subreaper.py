"""Run a command as a child subreaper, the way init would adopt orphans, and log every reap.

Used to watch what happens to workers after their launcher is SIGKILLed: they
are reparented to us instead of to this machine's PID 1, and each reap is
logged as "reaped pid=N status=S", so a test can tell gone from zombie.
Exits once the command and every orphan it left are reaped.
"""
import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36

ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
child = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
print("started pid=%d" % child, file=sys.stderr, flush=True)
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    print("reaped pid=%d status=%d" % (pid, os.waitstatus_to_exitcode(status)), file=sys.stderr, flush=True)
