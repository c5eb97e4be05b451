"""A plain parent that is not a launcher: it counts the SIGUSR1s it receives.

usage: usr1_counter.py COUNT_FILE [COMMAND ...]

Writes the number of SIGUSR1s received so far to COUNT_FILE, at start (0)
and after each one.  With a COMMAND it runs it as its child (stdin, stdout and
stderr inherited, nothing else: no LAUNCHER_PID of its own making) and exits
when the child does; SIGTERM is passed on to the child.  Whatever happens, it
exits after 120 s.
"""
import os
import signal
import subprocess
import sys
import time

count_file = sys.argv[1]
received = 0
terminated = False


def write_count():
    with open(count_file + ".tmp", "w") as out:
        out.write("%d\n" % received)
    os.replace(count_file + ".tmp", count_file)


def on_usr1(signum, frame):
    global received
    received += 1
    write_count()


def on_term(signum, frame):
    global terminated
    terminated = True


signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, on_term)
write_count()
child = subprocess.Popen(sys.argv[2:]) if len(sys.argv) > 2 else None
deadline = time.monotonic() + 120
while time.monotonic() < deadline and not terminated and (child is None or child.poll() is None):
    time.sleep(0.05)
if child is not None and child.poll() is None:
    child.terminate()
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
sys.exit(0)
