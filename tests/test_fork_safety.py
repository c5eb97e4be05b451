"""Workers forked from a warm Trac share no database handle: proven on SQLite and PostgreSQL.

Browsers create tickets through nginx while forked workers are replaced
every few requests.  A database handle that the mold had left open and its
workers shared would lose tickets, write them twice, or mix up the
replies; the logs would say "lost synchronization with server" or "database
disk image is malformed".
"""
import collections
import itertools
import os

import pytest

from stack import TicketLoad, recycles, trac_behind_nginx
from support import children, make_trac_env, trac_admin

DATABASE_ERRORS = ["server closed the connection unexpectedly", "lost synchronization with server",
                   "database disk image is malformed"]
names = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """A Trac env where anonymous may create tickets, on each database; its Trac log on file."""
    postgres = request.getfixturevalue("postgres") if request.param == "postgres" else None
    url = postgres.create_database("tickets%d" % next(names)) if postgres else "sqlite:db/trac.db"
    path = make_trac_env(tmp_path / "env", url)
    trac_admin(path, "permission", "add", "anonymous", "TICKET_CREATE")
    trac_admin(path, "config", "set", "logging", "log_type", "file")
    if postgres:
        # From here on its backends log a client that leaves without saying
        # goodbye (at DEBUG1: "unexpected EOF on client connection").
        name = url.rsplit("/", 1)[1]
        postgres.query(name, "ALTER DATABASE %s SET log_min_messages = debug1" % name)
    # The cluster serves the whole session: this test reads its log from here on.
    log_start = len(postgres.log()) if postgres else 0
    return collections.namedtuple("Database", "kind path postgres url log_start")(
        request.param, path, postgres, url, log_start)


def summaries_in_database(path):
    """{summary: rows} as Trac itself reads its database."""
    from trac.env import Environment
    env = Environment(path)
    try:
        return dict(env.db_query("SELECT summary, COUNT(*) FROM ticket GROUP BY summary"))
    finally:
        from trac.db.api import DatabaseManager
        DatabaseManager(env).shutdown()


def database_sockets(pid, postgres_port):
    """Inodes of PID's TCP connections to the PostgreSQL port, and their local ports."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = {}
    with open("/proc/%d/net/tcp" % pid) as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.split(":")[1], 16) == postgres_port:
                ports[inode] = int(local.split(":")[1], 16)
    return ports


def database_files(pid, env_path):
    """What PID holds open of the SQLite database."""
    found = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith(os.path.join(env_path, "db")):
            found.append(target)
    return found


def test_forked_workers_create_tickets_at_once_through_recycles_and_each_lands_exactly_once(
        started, tmp_path, database):
    (tmp_path / "site").mkdir()
    nginx, launcher = trac_behind_nginx(started, tmp_path / "site", database.path, "--workers", "3",
                                        env={"TRAC_FCGI_MAX_REQUESTS": "12"})
    [mold] = [int(e["pid"]) for e in launcher.events("mold-start")]
    load = TicketLoad(nginx.port, clients=6, tag="forked")
    # What PostgreSQL lists, sampled through the run: which workers held a
    # backend of their own at once depends on which of them had served yet,
    # and on a loaded machine one moment may catch a single one.
    seen_by_postgres = []

    def several_workers_seen_connected():
        return any(sum(1 for ports in sample.values() if ports) >= 2 for _, sample in seen_by_postgres)

    def enough(seconds):
        if database.postgres and seconds >= 2 and (not seen_by_postgres or seconds - seen_by_postgres[-1][0] >= 1):
            seen_by_postgres.append((seconds, backends_by_worker()))
        return (len(recycles(launcher)) >= 12 and seconds >= 5
                and (not database.postgres or several_workers_seen_connected()))

    def backends_by_worker():
        """{worker pid: {its local ports of connections PostgreSQL lists as its backends}}."""
        listed = {int(port) for [port] in database.postgres.query(
            database.url.rsplit("/", 1)[1],
            "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")}
        by_worker = {}
        for pid in set(children(launcher.pid)) - {mold}:
            try:
                ports = set(database_sockets(pid, database.postgres.port).values())
            except OSError:
                continue  # it exited meanwhile
            by_worker[pid] = ports & listed
        return by_worker

    load.run(stop=enough, max_seconds=120)
    report = "%s; %d recycles" % (load.summary(), len(recycles(launcher)))

    assert len(recycles(launcher)) >= 12, "too few recycles: " + report
    spawns = launcher.events("spawn", role="warming") + launcher.events("spawn", role="serving")
    assert spawns and all(e["how"] == "fork" for e in spawns), "every worker was forked: %s" % spawns
    created = [summary for summary, answer in load.created() if answer.complete]
    assert len(created) == len(load.answers), "every POST made a ticket: " + report
    in_database = summaries_in_database(database.path)
    sent = collections.Counter(created)
    assert sent and max(sent.values()) == 1
    assert in_database == dict.fromkeys(sent, 1), "each ticket exactly once: %s" % (
        {s: n for s, n in in_database.items() if n != 1} or set(sent) ^ set(in_database))

    # The mold holds no database handle; each worker holds its own.
    if database.postgres:
        assert not database_sockets(mold, database.postgres.port)
        assert several_workers_seen_connected(), "workers with their own backend: %s" % seen_by_postgres
        for _, by_worker in seen_by_postgres:
            every_port = [port for ports in by_worker.values() for port in ports]
            assert len(every_port) == len(set(every_port)), "a backend shared by two workers: %s" % by_worker
    else:
        assert not database_files(mold, database.path)

    logs = {"launcher and workers": launcher.log(), "nginx": nginx.errors(),
            "trac": (open(os.path.join(database.path, "log", "trac.log")).read()
                     if os.path.exists(os.path.join(database.path, "log", "trac.log")) else "")}
    if database.postgres:
        logs["postgres"] = database.postgres.log()[database.log_start:]
        # Workers leave without the interpreter's teardown (trac_fcgi.leave),
        # but each closes its connections first, as that teardown would.
        assert "unexpected EOF on client connection" not in logs["postgres"], logs["postgres"][-3000:]
    for name, text in logs.items():
        for error in DATABASE_ERRORS:
            assert error not in text, "%s in the %s log" % (error, name)
