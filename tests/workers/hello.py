"""A small worker for launcher tests: trac_fcgi's server around a tiny WSGI app.

Environment knobs (all optional):
  HELLO_DELAY        seconds each request sleeps (a slow app)
  HELLO_LEAK         bytes each request leaks (a growing app)
  HELLO_START_DELAY  seconds to sleep before serving (a slow warm-up)
  HELLO_NOTIFY       0: never speak the notify protocol (like a stock trac.fcgi)
"""
import os
import time

_leak = []


def app(environ, start_response):
    delay = float(os.environ.get("HELLO_DELAY", "0"))
    if environ.get("QUERY_STRING", "").startswith("delay="):
        delay = float(environ["QUERY_STRING"][len("delay="):])
    if delay:
        time.sleep(delay)
    leak = int(os.environ.get("HELLO_LEAK", "0"))
    if leak:
        _leak.append(bytearray(leak))
    body = ("hello from pid %d\n" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    time.sleep(float(os.environ.get("HELLO_START_DELAY", "0")))
    if os.environ.get("HELLO_NOTIFY") == "0":
        os.environ.pop("NOTIFY_SOCKET", None)
    os.environ.setdefault("TRAC_FCGI_APP", "hello:app")
    os.environ.setdefault("TRAC_FCGI_WARMUP", "/")
    import trac_fcgi
    sys.exit(trac_fcgi.main([]))
