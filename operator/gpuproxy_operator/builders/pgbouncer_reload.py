"""PgBouncer without restarts: a POSIX-sh entrypoint that reloads pgbouncer (SIGHUP) when its
config or userlist changes, and the few settings a reload cannot change (the pod-template hash)."""

from __future__ import annotations

from gpuproxy_operator.api.cluster import GpuProxyCluster
from gpuproxy_operator.builders.common import stable_hash
from gpuproxy_operator.builders.pgbouncer_config import pgbouncer_settings

RUN_SCRIPT_FILE = "run-pgbouncer.sh"
# Seconds between content checks; the kubelet's own delay (sync period, ~1 min) dominates.
RELOAD_INTERVAL_SECONDS = 5

# Runs in the Alpine-based image's busybox sh as well as in dash: POSIX sh, cat, sleep, kill.
# The kubelet updates a mounted ConfigMap or Secret by swapping a symlink to a new directory,
# so file content is compared (an inotify watch on the path would not see the swap). The first
# snapshot is taken before pgbouncer starts, so a change in between causes an extra reload,
# never a missed one. exec keeps pgbouncer the container's main process: the kubelet's SIGTERM
# reaches it unchanged, and the watcher stops once pgbouncer is gone.
RUN_SCRIPT = f"""#!/bin/sh
# run-pgbouncer.sh PGBOUNCER_INI [MORE_FILES...]: start pgbouncer on PGBOUNCER_INI and send it
# SIGHUP (RELOAD) whenever the content of PGBOUNCER_INI or MORE_FILES changes.
set -u
interval="${{PGBOUNCER_RELOAD_INTERVAL_SECONDS:-{RELOAD_INTERVAL_SECONDS}}}"
last=$(cat "$@" 2>/dev/null)
watch_files() {{
    target=$1
    shift
    while kill -0 "$target" 2>/dev/null; do
        sleep "$interval"
        current=$(cat "$@" 2>/dev/null) || continue
        if [ "$current" != "$last" ]; then
            last=$current
            echo "run-pgbouncer: a watched file changed ($*); sending SIGHUP (reload)" >&2
            kill -HUP "$target" 2>/dev/null
        fi
    done
}}
watch_files "$$" "$@" &
exec pgbouncer "$1"
"""

# The settings PgBouncer reads only at start: CF_NO_RELOAD in the `bouncer_params` table of
# PgBouncer's src/main.c (1.24 sources; a test checks them against 1.18's `SHOW CONFIG`).
# Everything else, [databases] and the auth_file included, is applied by RELOAD / SIGHUP ("The
# PgBouncer process will reload its configuration files and update changeable settings. This
# includes the main configuration file as well as the files specified by the settings
# auth_file and auth_hba_file", https://www.pgbouncer.org/usage.html).
NO_RELOAD_SETTINGS = frozenset({
    "disable_pqexec", "job_name", "listen_addr", "listen_backlog", "listen_port", "pidfile",
    "pkt_buf", "resolv_conf", "so_reuseport", "track_extra_parameters", "unix_socket_dir",
    "unix_socket_group", "unix_socket_mode", "user",
})


def restart_key(cluster: GpuProxyCluster) -> dict[str, object]:
    """What a running PgBouncer cannot take by a reload: its start-only settings and the
    entrypoint script itself."""
    settings = {k: v for k, v in pgbouncer_settings(cluster) if k in NO_RELOAD_SETTINGS}
    return {"settings": settings, "script": RUN_SCRIPT}


def restart_hash(cluster: GpuProxyCluster) -> str:
    return stable_hash(restart_key(cluster))
