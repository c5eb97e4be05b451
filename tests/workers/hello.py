"""A small worker for launcher tests: trac_fcgi's server around a tiny WSGI app.

Environment knobs (all optional):
  HELLO_DELAY             seconds each request sleeps (a slow app); ?delay=S per request
  (no knob)               ?bytes=N answers N bytes of "x" instead of its greeting (a download)
  HELLO_LEAK              bytes each request leaks (a growing app)
  HELLO_BALLAST           bytes allocated and filled at start (a big app)
  HELLO_START_DELAY       seconds to sleep before serving (a slow warm-up)
  HELLO_NOTIFY            0: never speak the notify protocol (like a stock trac.fcgi)
  HELLO_FAIL_IF_EXISTS    path: exit 1 at start while it exists (a broken replacement)
  HELLO_SILENT_IF_EXISTS  path: while it exists, start but never say READY=1 nor serve
  HELLO_TRACE             path: append "PID ready|hup MONOTONIC" lines, so a test
                          can order events across processes
  HELLO_PICKUP_DELAY      seconds between a connection being accepted and its
                          thread starting on it: widens the "accepted but not
                          started" window so a test can hit it every time
  HELLO_CONNECTION_BUG    1: a request for ?bug ends, once answered, in an
                          exception raised inside the connection code, where a
                          bug of trac_fcgi's own would raise one
  (no knob)               /overlap answers the most requests there have been in
                          the application at once
"""
import logging
import os
import random
import sys
import threading
import time

_leak = []
# Filled, so resident and private: a worker this much bigger than hello's own.
_ballast = bytearray(b"x") * int(os.environ.get("HELLO_BALLAST", "0"))
# A log handler that logging.shutdown() flushes at exit.  /hold-log-lock holds
# its lock for the request's delay, as a request stuck writing to a full log
# pipe would.
_handler = logging.StreamHandler(sys.stderr)
logging.getLogger("hello").addHandler(_handler)
# Requests in the application now, and the most there have been at once
# (answered by /overlap, which is not counted itself).
_inside = {"now": 0, "most": 0}
_inside_lock = threading.Lock()


def app(environ, start_response):
    if environ["PATH_INFO"] == "/overlap":
        body = b"%d\n" % _inside["most"]
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    with _inside_lock:
        _inside["now"] += 1
        _inside["most"] = max(_inside["most"], _inside["now"])
    try:
        return greet(environ, start_response)
    finally:
        with _inside_lock:
            _inside["now"] -= 1


def greet(environ, start_response):
    """Says which process answered; /broken answers 500; /raise raises; /random, a number from `random`;
    /hold-log-lock holds a log handler's lock while it sleeps."""
    if environ["PATH_INFO"] == "/raise":
        raise RuntimeError("hello was asked to fail")
    delay = float(os.environ.get("HELLO_DELAY", "0"))
    if environ.get("QUERY_STRING", "").startswith("delay="):
        delay = float(environ["QUERY_STRING"][len("delay="):])
    if delay and environ["PATH_INFO"] == "/hold-log-lock":
        with _handler.lock:
            time.sleep(delay)
    elif delay:
        time.sleep(delay)
    leak = int(os.environ.get("HELLO_LEAK", "0"))
    if leak:
        _leak.append(bytearray(b"x") * leak)  # filled, so resident; no temporary copy
    body = ("hello from pid %d\n" % os.getpid()).encode()
    if environ["PATH_INFO"] == "/random":
        body = ("%r\n" % random.random()).encode()
    if environ.get("QUERY_STRING", "").startswith("bytes="):
        body = b"x" * int(environ["QUERY_STRING"][len("bytes="):])
    start_response("500 Broken" if environ["PATH_INFO"] == "/broken" else "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def trace(what):
    with open(os.environ["HELLO_TRACE"], "a") as log:
        log.write("%d %s %.6f\n" % (os.getpid(), what, time.monotonic()))


def main():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    time.sleep(float(os.environ.get("HELLO_START_DELAY", "0")))
    if os.path.exists(os.environ.get("HELLO_FAIL_IF_EXISTS", "/nonexistent")):
        sys.exit(1)
    if os.path.exists(os.environ.get("HELLO_SILENT_IF_EXISTS", "/nonexistent")):
        time.sleep(3600)
    if os.environ.get("HELLO_NOTIFY") == "0":
        os.environ.pop("NOTIFY_SOCKET", None)
    os.environ.setdefault("TRAC_FCGI_APP", "hello:app")
    import trac_fcgi
    if os.environ.get("HELLO_TRACE"):
        notify, hup = trac_fcgi.sd_notify, trac_fcgi.RecyclingWSGIServer._hupHandler

        def traced_notify(message):
            if message.startswith("READY=1"):
                trace("ready")
            notify(message)

        def traced_hup(server, signum, frame):
            trace("hup")
            hup(server, signum, frame)

        trac_fcgi.sd_notify = traced_notify
        trac_fcgi.RecyclingWSGIServer._hupHandler = traced_hup
    pickup_delay = float(os.environ.get("HELLO_PICKUP_DELAY", "0"))
    if pickup_delay:
        run = trac_fcgi.CountedConnection.run

        def late_run(connection):
            time.sleep(pickup_delay)
            run(connection)

        trac_fcgi.CountedConnection.run = late_run
    if os.environ.get("HELLO_CONNECTION_BUG") == "1":
        end_request = trac_fcgi.CountedConnection.end_request

        def buggy_end_request(connection, req, *args, **kw):
            end_request(connection, req, *args, **kw)
            if req.params.get("QUERY_STRING") == "bug":
                raise ZeroDivisionError("injected by HELLO_CONNECTION_BUG")

        trac_fcgi.CountedConnection.end_request = buggy_end_request
    sys.exit(trac_fcgi.main([]))


if __name__ == "__main__":
    main()
