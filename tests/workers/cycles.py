"""A WSGI app (TRAC_FCGI_APP=cycles:app) that makes reference cycles and tells whether they were collected.

Like Trac, it ends every request with a full gc.collect().

  /cycle?name=N[&hold=PATH]   makes cycle N, alive until this request's
                              response is closed (the response is part of it);
                              with hold, first creates PATH.started, then waits
                              (at most 60 s) until PATH exists
  /collected?name=N           collects, then says "yes" if cycle N has been
                              collected, else "no"
  anything else               "ok"
"""
import gc
import os
import time
import urllib.parse
import weakref

collected = set()


class CyclicBody:
    """A response body that refers to itself, so only the cycle collector can free it."""

    def __init__(self, name, text):
        self.me = self
        self.chunks = [text.encode()]
        weakref.finalize(self, collected.add, name)

    def __iter__(self):
        return iter(self.chunks)


def app(environ, start_response):
    try:
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        path = environ["PATH_INFO"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        if path == "/cycle":
            body = CyclicBody(query["name"], "made %s\n" % query["name"])
            if "hold" in query:
                open(query["hold"] + ".started", "w").close()
                deadline = time.monotonic() + 60
                while not os.path.exists(query["hold"]) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return body
        if path == "/collected":
            gc.collect()
            return [b"yes\n" if query["name"] in collected else b"no\n"]
        return [b"ok\n"]
    finally:
        gc.collect()
