# make demo   install what serving needs and serve a demo Trac through nginx
# make test   install what the suite needs and run it (real nginx, spawn-fcgi, Trac)
# make bench  run the benchmark in bench/

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: all venv serve-venv debs serve-debs test demo bench clean

all: test

# The package and what it needs to serve (Trac, flup): all make demo installs.
$(VENV)/.serving: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip' 'setuptools<81'
	$(PY) -m pip install -q -e .
	touch $@

# And the test extras.
$(VENV)/.installed: $(VENV)/.serving
	$(PY) -m pip install -q -e '.[test]'
	touch $@

serve-venv: $(VENV)/.serving
venv: $(VENV)/.installed

# What serving needs from Debian: nginx and spawn-fcgi, when missing.
serve-debs:
	@missing=""; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v spawn-fcgi >/dev/null || missing="$$missing spawn-fcgi"; \
	$(APT_GET_MISSING)

# Debian packages, installed only when a command is missing.  systemd brings
# systemd-socket-activate and systemd-analyze, which the recipe tests run;
# lighttpd, apache2 and mod_fcgid are the other fronts tests/test_fronts.py runs.
# prometheus-node-exporter reads the launcher's metrics file in its tests;
# postgresql, the server the fork-safety tests run Trac on; iproute2 (ip, ss),
# the network namespaces tests/test_hosts.py makes its hosts of.  mod_wsgi is
# a row of make bench: Apache in mod_wsgi's daemon mode, as Trac's docs advise.
debs:
	@missing=""; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v spawn-fcgi >/dev/null || missing="$$missing spawn-fcgi"; \
	command -v cgi-fcgi >/dev/null || missing="$$missing libfcgi-bin"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v systemd-socket-activate >/dev/null || missing="$$missing systemd"; \
	command -v lighttpd >/dev/null || [ -x /usr/sbin/lighttpd ] || missing="$$missing lighttpd"; \
	command -v apache2 >/dev/null || [ -x /usr/sbin/apache2 ] || missing="$$missing apache2"; \
	[ -e /usr/lib/apache2/modules/mod_fcgid.so ] || missing="$$missing libapache2-mod-fcgid"; \
	[ -e /usr/lib/apache2/modules/mod_wsgi.so ] || missing="$$missing libapache2-mod-wsgi-py3"; \
	command -v htpasswd >/dev/null || missing="$$missing apache2-utils"; \
	command -v prometheus-node-exporter >/dev/null || missing="$$missing prometheus-node-exporter"; \
	command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing="$$missing iproute2"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	$(APT_GET_MISSING)

# The end of both recipes above: install what they found $$missing.
APT_GET_MISSING = if [ -n "$$missing" ]; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: venv debs
	$(PY) -m pytest

demo: serve-venv serve-debs
	$(PY) examples/demo.py

bench: venv debs
	bench/run

clean:
	rm -rf $(VENV) demo bench/work *.egg-info build
