"""Hold a Python process at start-up while the file named by START_GATE exists.

A test puts this directory on PYTHONPATH to open a window of its own choosing
between a worker's exec and its first line of code: signals sent inside that
window are certain to land while the new image starts, on any machine.
"""
import os
import time

_gate = os.environ.get("START_GATE")
_deadline = time.monotonic() + 120
while _gate and os.path.exists(_gate) and time.monotonic() < _deadline:
    time.sleep(0.01)
