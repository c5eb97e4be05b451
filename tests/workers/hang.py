"""A WSGI app for the liveness tests, run by hello.py with TRAC_FCGI_APP=hang:app.

/hang never returns: it waits on an event nobody sets, as a request waiting
on a dead repository or a lock would.  /slow?S sleeps S seconds, then
answers: slow, but finite.  Anything else answers at once.
"""
import os
import threading
import time

NOBODY_SETS_IT = threading.Event()


def app(environ, start_response):
    if environ["PATH_INFO"] == "/hang":
        NOBODY_SETS_IT.wait()  # the line a stuck request's stack names
    if environ["PATH_INFO"] == "/slow":
        time.sleep(float(environ.get("QUERY_STRING") or "1"))
    body = ("%s from pid %d\n" % (environ["PATH_INFO"], os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
