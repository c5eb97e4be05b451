"""load.py: the load, closed-loop and open-loop, through nginx.

Closed loop (wrk with mix.lua): N connections, each sending its next request
when the last is answered.  It measures capacity: whole 2xx pages a second.
Its latencies understate what users see under load: a slow answer delays the
next request instead of counting as a wait (coordinated omission).

Open loop (open_loop below): requests go out on a fixed schedule, RATE a
second, whether or not earlier ones were answered, each on its own
connection.  Each latency runs from the request's scheduled time, not from
when it was sent, as wrk2 does: a generator that falls behind, or a server
that stalls, shows up as waiting, as it would for a user.
"""

import asyncio
import json
import subprocess
import time
from pathlib import Path

import rows

BENCH = Path(__file__).resolve().parent


def wrk(wrk_path, url, tag, clients, seconds, paths):
    """One closed-loop run: wrk's own figures, as mix.lua prints them."""
    out = subprocess.run([wrk_path, "-t%d" % min(rows.WRK_THREADS, clients), "-c%d" % clients,
                          "-d%ds" % max(1, round(seconds)), "--timeout", rows.WRK_TIMEOUT,
                          "-s", str(BENCH / "mix.lua"), url, "--", tag] + list(paths),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def open_loop(port, paths, rate, seconds):
    """RATE requests a second for SECONDS, walking PATHS.

    Returns {rate, seconds, latency_ms, failed, statuses}: latency_ms[i] is
    request i's, scheduled at i / RATE seconds after the start; failed lists
    the i whose answer was not a whole 2xx page (a non-2xx, a cut-off body,
    a socket error, or no answer within the grace period).
    """
    return asyncio.run(_open_loop(port, list(paths), rate, seconds))


async def _open_loop(port, paths, rate, seconds):
    count = max(1, int(rate * seconds))
    latencies, failed, statuses = [None] * count, [], {}
    # Connections are capped so that a stalled server cannot exhaust nginx's;
    # a request waiting for one still counts its wait from its scheduled time.
    slots = asyncio.Semaphore(rows.OPEN_LOOP_MAX_CONNECTIONS)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(index):
        scheduled = start + index / rate
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        async with slots:
            status = await _get(port, paths[index % len(paths)])
        latencies[index] = round((loop.time() - scheduled) * 1000, 2)
        statuses[status] = statuses.get(status, 0) + 1
        if status != "2xx":
            failed.append(index)

    tasks = [asyncio.ensure_future(one(index)) for index in range(count)]
    deadline = seconds + rows.OPEN_LOOP_GRACE_S
    done, pending = await asyncio.wait(tasks, timeout=deadline + 0.05)
    for task in pending:
        task.cancel()
    for index, latency in enumerate(latencies):
        if latency is None:  # still unanswered at the deadline: a lower bound on its wait
            latencies[index] = round((loop.time() - start - index / rate) * 1000, 2)
            statuses["unanswered"] = statuses.get("unanswered", 0) + 1
            failed.append(index)
    return {"rate": round(rate, 3), "seconds": seconds, "latency_ms": latencies, "failed": sorted(failed),
            "statuses": statuses, "ended": time.time()}


async def _get(port, path):
    """One GET on a fresh connection: "2xx" for a whole page, else what went wrong."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "connect"
    try:
        writer.write(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % (path, port)).encode())
        await writer.drain()
        answer = await reader.read()
    except OSError:
        return "read"
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return "read"
    if not 200 <= status < 300:
        return str(status)
    if b"chunked" in head.lower():
        # nginx chunks a body of unknown length; the last chunk is empty.
        return "2xx" if body.rstrip().endswith(b"\r\n0") and b"</html>" in body else "cut_off"
    return "2xx" if b"</html>" in body else "cut_off"
