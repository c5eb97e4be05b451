#!/usr/bin/env python3
"""ceiling.py: the most one process can do on these pages, the bench's ceiling row.

    ceiling.py SOCKET [--threads N] PATH...

Loads Trac's WSGI application as trac_fcgi does (its load_application and
warm_up, read-only), serves each PATH once, collects and freezes as a worker
does after its warm-up (trac_fcgi.freeze_warm_set), then waits on the unix
socket SOCKET for the driver's cells.  A cell is one JSON line,
{"clients": N, "seconds": S, "paths": [...]}: N threads call the
application in a loop for S seconds, each walking the paths from its own
place as wrk's clients do, and the answer is one JSON line with wrk's
figures (mix.lua's), so that analysis.py reads both alike.

Nothing stands between a thread and the application: no FastCGI, no nginx,
no launcher, no per-request checks.  The threads are as many as the cell's
clients, the requests in flight that ours has at most under the same cell;
--threads N fixes them instead (N=1: one request at a time, no thread ever
waits for the GIL).
Before each cell, with nothing in flight, it freezes again, as a worker's
Refreezer does at its 1st, 2nd, 4th... request: the ceiling walks no more
objects in its collections than ours.
"""

import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trac_fcgi  # noqa: E402

APP = "trac.web.main:dispatch_request"


def environ_for(path):
    """A GET of PATH as nginx's fastcgi_params give it to a worker: the query apart, a Host, a client."""
    path_info, _, query = path.partition("?")
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path_info, "QUERY_STRING": query,
            "REQUEST_URI": path, "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "localhost", "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False}


def serve(application, path):
    """(status, whole): one request, its body read as a server would send it; whole if it ends the page.

    Trac writes its pages through start_response's write(), not the iterable."""
    status, tail = [], [b""]

    def write(data):
        if data:
            tail[0] = (tail[0] + data)[-64:]

    def start_response(line, headers, exc_info=None):
        status.append(int(line.split()[0]))
        return write

    result = application(environ_for(path), start_response)
    try:
        for chunk in result:
            write(chunk)
    finally:
        if hasattr(result, "close"):
            result.close()
    return status[-1], b"</html>" in tail[0]


def cell(application, clients, seconds, paths):
    """N threads for SECONDS: wrk's figures (mix.lua's JSON)."""
    latencies, counts = [[] for _ in range(clients)], {"non2xx": 0, "cut_off": 0}
    lock, start = threading.Lock(), time.monotonic()
    deadline = start + seconds

    def client(number):
        position, mine = number * len(paths) // clients, latencies[number]
        while time.monotonic() < deadline:
            sent = time.monotonic()
            status, whole = serve(application, paths[position % len(paths)])
            mine.append(time.monotonic() - sent)
            position += 1
            if not 200 <= status < 300 or not whole:
                with lock:
                    counts["non2xx" if not 200 <= status < 300 else "cut_off"] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    duration = time.monotonic() - start
    every = sorted(x for mine in latencies for x in mine)

    def percentile(p):
        return int(1e6 * every[max(0, -(-len(every) * p // 100) - 1)]) if every else 0
    return dict(counts, requests=len(every), duration_us=int(duration * 1e6), p50_us=percentile(50),
                p99_us=percentile(99), max_us=int(1e6 * every[-1]) if every else 0,
                connect=0, read=0, write=0, timeout=0)


def main():
    address, paths, threads = sys.argv[1], sys.argv[2:], None
    if paths[:1] == ["--threads"]:
        threads, paths = int(paths[1]), paths[2:]
    application = trac_fcgi.load_application(APP)
    for path in sorted(set(paths)):
        serve(application, path)
    frozen = trac_fcgi.freeze_warm_set()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(1)
    print("event=ready pid=%d frozen=%d" % (os.getpid(), frozen), flush=True)
    while True:
        connection, _ = listener.accept()
        with connection, connection.makefile("rw") as stream:
            asked = json.loads(stream.readline())
            trac_fcgi.freeze_warm_set()
            figures = cell(application, threads or asked["clients"], asked["seconds"], asked["paths"])
            stream.write(json.dumps(figures) + "\n")


def run_cell(address, clients, seconds, paths):
    """The driver's side: one cell on the ceiling at ADDRESS, its figures."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(address))
        with connection.makefile("rw") as stream:
            stream.write(json.dumps({"clients": clients, "seconds": seconds, "paths": list(paths)}) + "\n")
            stream.flush()
            return json.loads(stream.readline())


if __name__ == "__main__":
    main()
