#!/usr/bin/env python3
"""apache_reuse.py: Apache mod_proxy_fcgi with and without enablereuse=on, while workers recycle.

examples/apache-proxy-fcgi.conf leaves enablereuse off.  This measures why:
the same Apache, launcher and Trac, 16 clients, workers recycling every 20
requests, once as the example is written (a connection per request) and
once with enablereuse=on on its ProxyPass lines, ROUNDS times each in turn,
each until RECYCLES handoffs (or 5 minutes).
It prints, per setting: requests, failures (non-200, cut off, errors),
recycles, req/s and latency, and Apache's AH01067 lines.

    .venv/bin/python bench/apache_reuse.py [ROUNDS] [RECYCLES]
"""
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests"), str(Path(__file__).resolve().parent.parent)]

from stack import START_TIMEOUT, TRAC_FCGI, Apache, Load, recycles  # noqa: E402
from support import make_trac_env, start_launcher  # noqa: E402

PATHS = ["/trac/wiki/WikiStart", "/trac/wiki/TracGuide"]


class ReusingApache(Apache):
    """The example, with enablereuse=on added to each ProxyPass line."""

    def config(self, listen):
        text = Apache.config(self, listen)
        return "\n".join(line + " enablereuse=on" if line.startswith("ProxyPass ") else line
                         for line in text.splitlines()) + "\n"


def run(directory, trac_env, front_class, want):
    launcher = start_launcher(directory, [TRAC_FCGI], "--workers", "2",
                              env={"TRAC_ENV": trac_env, "TRAC_FCGI_MAX_REQUESTS": "20"})
    front = None
    try:
        launcher.wait_for("all-ready", timeout=START_TIMEOUT)
        htpasswd = directory / "htpasswd"
        htpasswd.write_text("")
        front = front_class(directory / "apache", "apache-proxy-fcgi.conf",
                            {"socket": launcher.socket, "htpasswd": htpasswd})
        load = Load(front.port, PATHS, clients=16).run(stop=lambda s: len(recycles(launcher)) >= want,
                                                       max_seconds=300)
        return load, len(recycles(launcher)), front.errors().count("AH01067")
    finally:
        if front is not None:
            front.stop()
        launcher.stop()


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    want = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with tempfile.TemporaryDirectory(prefix="apache-reuse-") as top:
        top = Path(top)
        trac_env = make_trac_env(top / "env")
        for n in range(rounds):
            for name, front_class in (("as written", Apache), ("enablereuse=on", ReusingApache)):
                directory = top / ("%s-%d" % (name.split()[0].replace("=", "-"), n))
                directory.mkdir()
                load, recycled, ah01067 = run(directory, trac_env, front_class, want)
                print("%-15s round %d: %d recycles, %d AH01067; %s" % (
                    name, n + 1, recycled, ah01067, load.summary()), flush=True)


if __name__ == "__main__":
    main()
