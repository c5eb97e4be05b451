"""Writes through the recommended front: every ticket a client is told was created exists exactly once.

Real Trac form posts (the form token in a field and a cookie) go through
nginx with examples/nginx.conf as written, to spawn-fcgi -> launcher ->
trac_fcgi -> Trac, on a fresh Trac environment where anyone may create
tickets; the SQLite database then says what really happened.
"""
import hashlib
import http.client
import os
import random
import signal

import pytest

from stack import (FORM_TOKEN, TicketLoad, exchange, form_post, recycles, serving_workers, ticket_summaries,
                   trac_behind_nginx, writable_trac_env)
from support import children

# Trac's [attachment] max_size in these tests: above 10 MB (nginx's old
# client_max_body_size) and below examples/nginx.conf's.
MAX_UPLOAD = 50 << 20


@pytest.fixture
def trac_env(tmp_path):
    return writable_trac_env(tmp_path / "env", max_upload=MAX_UPLOAD)


def create_ticket(port, summary, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body, headers = form_post({"field_summary": summary, "submit": "Create ticket"})
        return exchange(conn, "/newticket", "POST", body, headers)
    finally:
        conn.close()


def test_a_post_that_waited_until_nginx_answered_504_is_never_run_and_the_worker_says_it_dropped_it(
        started, tmp_path, trac_env):
    # Injects: every worker stopped (SIGSTOP), so a POST waits in the listen
    # backlog until nginx's fastcgi_read_timeout (3 s here) answers 504.
    # Holds: once the workers go on, none runs that POST (nginx has closed
    # its connection); the worker logs that it dropped it, and how long it waited.
    read_timeout = 3
    nginx, launcher = trac_behind_nginx(started, tmp_path, trac_env, "--workers", "2",
                                        directives={"fastcgi_read_timeout": "%ds" % read_timeout})
    assert create_ticket(nginx.port, "served at once").status == 303
    workers = children(launcher.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        answer = create_ticket(nginx.port, "waited too long")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert answer.status == 504, answer
    dropped = launcher.wait_for("dropped")[0]
    assert (dropped["method"], dropped["path"]) == ("POST", "/newticket"), dropped
    assert float(dropped["waited_s"]) >= read_timeout, dropped
    assert create_ticket(nginx.port, "served after").status == 303
    assert ticket_summaries(trac_env) == {"served at once": 1, "served after": 1}


def multipart(fields, file_field, file_name, data):
    boundary = "trac-fcgi-test-%016x" % random.getrandbits(64)
    parts = [b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
             % (boundary.encode(), name.encode(), value.encode()) for name, value in fields.items()]
    parts.append(b'--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                 b"Content-Type: application/octet-stream\r\n\r\n" % (boundary.encode(), file_field.encode(),
                                                                      file_name.encode()))
    body = b"".join(parts) + data + b"\r\n--%s--\r\n" % boundary.encode()
    return body, {"Content-Type": "multipart/form-data; boundary=" + boundary,
                  "Cookie": "trac_form_token=" + FORM_TOKEN}


def test_an_attachment_bigger_than_ten_megabytes_goes_through_the_example_config_and_comes_back_whole(
        started, tmp_path, trac_env):
    nginx, launcher = trac_behind_nginx(started, tmp_path, trac_env)
    assert create_ticket(nginx.port, "has an attachment").status == 303
    data = os.urandom(12 << 20)
    body, headers = multipart({"__FORM_TOKEN": FORM_TOKEN, "action": "new", "realm": "ticket", "id": "1",
                               "description": "12 MiB of noise"}, "attachment", "noise.bin", data)
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=120)
    try:
        upload = exchange(conn, "/attachment/ticket/1/", "POST", body, headers)
        assert upload.status == 303, upload
        download = exchange(conn, "/raw-attachment/ticket/1/noise.bin")
    finally:
        conn.close()
    assert download.ok, download
    assert hashlib.sha256(download.body).hexdigest() == hashlib.sha256(data).hexdigest()


def test_tickets_created_through_recycles_and_sigkills_each_exist_exactly_once(started, tmp_path, trac_env):
    # Injects: 8 clients creating tickets through Trac's form, workers that
    # recycle every ~12 requests, and a serving worker SIGKILLed every 4 s,
    # or, where a cold start takes longer, once both slots serve again.
    # Holds: each ticket answered 303 is in the database exactly once, and no
    # ticket is there twice: nginx never sends a POST again after a worker
    # has started it.  A kill may fail the POSTs in flight (502): those may
    # or may not have been saved, as with any server that dies mid-request.
    nginx, launcher = trac_behind_nginx(started, tmp_path, trac_env, "--workers", "2",
                                        env={"TRAC_FCGI_MAX_REQUESTS": "12"})
    load = TicketLoad(nginx.port, clients=8, tag="kill-test")
    killed = []

    def stop(seconds):
        victims = serving_workers(launcher)
        if seconds >= (killed[-1][0] if killed else 0) + 4 and len(victims) == 2:
            victim = random.choice(victims)
            os.kill(victim, signal.SIGKILL)
            killed.append((seconds, victim))
        return len(killed) >= 5 and len(load.created()) >= 150

    load.run(stop, max_seconds=600)
    in_db = ticket_summaries(trac_env)
    created = load.created()
    failed = [summary for summary, answer in load.posts() if answer.status != 303]
    report = "%d tickets asked, %d answered 303, %d failed (%d of them saved anyway); %d kills, %d recycles\n%s\n" \
        "nginx errors:\n%s" % (len(load.posts()), len(created), len(failed), sum(1 for f in failed if in_db[f]),
                                len(killed), len(recycles(launcher)), load.summary(), nginx.errors()[-3000:])
    assert [summary for summary, _ in created if in_db[summary] != 1] == [], report
    assert [summary for summary, count in in_db.items() if count > 1] == [], report
    assert len(killed) >= 5, report
    assert len(created) >= 150, report
    # Every ticket in the database was asked for, and what a client saw of the
    # rest is a failure it can see, never a 200 or a 303.
    asked = {summary: answer for summary, answer in load.posts()}
    assert set(in_db) <= set(asked), report
    assert all(answer.status != 200 for answer in asked.values()), report
    print(report.split("\nnginx errors:")[0])
