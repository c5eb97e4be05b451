#!/bin/sh
# Start Trac under spawn-fcgi: spawn-fcgi creates the socket, then execs the
# launcher (-n, no fork: a supervisor such as systemd or runit watches the
# launcher itself), which keeps WORKER_PATH's workers on that socket.
#
# Each setting below can be overridden from the environment, as the tests do.
set -eu

VENV=${VENV:-/srv/trac/venv}              # where trac-fcgi-launcher is pip-installed
TRAC_ENV=${TRAC_ENV:-/srv/trac/project}   # made by `trac-admin /srv/trac/project initenv`
SOCKET=${SOCKET:-/run/trac/trac.sock}     # nginx.conf's fastcgi_server is unix:$SOCKET
WORKERS=${WORKERS:-2}
# Trac runs as TRAC_USER, and nginx's group WEB_GROUP may use the socket
# (mode 0660).  spawn-fcgi changes user only when started as root; set both
# empty to stay who you are.
TRAC_USER=${TRAC_USER-www-data}
WEB_GROUP=${WEB_GROUP-www-data}

export TRAC_ENV
export WORKER_PATH="$VENV/bin/trac-fcgi"
# The worker's limits (`trac-fcgi --help` lists them all), e.g.:
export TRAC_FCGI_MAX_RSS="${TRAC_FCGI_MAX_RSS:-128M}"

exec spawn-fcgi -n -s "$SOCKET" -M 0660 \
    ${TRAC_USER:+-u "$TRAC_USER" -U "$TRAC_USER"} ${WEB_GROUP:+-G "$WEB_GROUP"} \
    -- "$VENV/bin/trac-fcgi-launcher" --workers "$WORKERS"
