#!/usr/bin/env bash
# What the tests need beyond pip: Prometheus's server and promtool (Debian/Ubuntu's `prometheus` package;
# the observability tests run the real ones). Installs them when missing: as root directly, otherwise
# through sudo (the only step of the test command that needs it). Already there: does nothing.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "tests/system_deps.sh: install Prometheus (server and promtool, >= 2.37) with your package manager" >&2
    exit 1
fi
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
export DEBIAN_FRONTEND=noninteractive
install=("${as_root[@]}" apt-get install -y --no-install-recommends prometheus)
# a fresh machine may have no package lists yet: update them once and try again
"${install[@]}" || { "${as_root[@]}" apt-get update && "${install[@]}"; }
command -v prometheus >/dev/null && command -v promtool >/dev/null
