#!/bin/sh
# sh tests/tools/haproxy.sh: print the path of HAProxy, installing Debian's package first if it is
# missing (tests/test_fleet.py balances replicas on 127.0.0.1 with it; needs apt-get and the
# package index).
set -eu
if ! command -v haproxy >/dev/null 2>&1; then
    apt-get install -y -q haproxy >&2 || { apt-get update -q >&2 && apt-get install -y -q haproxy >&2; }
fi
command -v haproxy
