#!/bin/sh
# Entrypoint of the sanitised-dump image.
#
# No arguments, an app command (dump, check, ...) or an option (--help): run
# `python -m app` with them (dump by default), exec'd so that SIGTERM reaches
# the job itself, which then drops its scratch schema. Anything else is a
# command of its own and is exec'd as given (`docker run IMAGE bash`,
# `dokku run APP python -m app check`).
#
# Before a dump, the storage folder must exist and be writable: a clear
# message and exit 2 (configuration) otherwise, before anything touches the
# database. Nothing here prints the environment: it holds the credentials.
set -eu

fail() {
    # One log line in the app's format (LOG_FORMAT, JSON by default), exit 2.
    if [ "${LOG_FORMAT:-json}" = text ]; then
        printf '%s ERROR %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$1" >&2
    else
        message=$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')
        printf '{"time": "%s", "level": "ERROR", "message": "%s", "exit_code": 2}\n' \
            "$(date '+%Y-%m-%d %H:%M:%S')" "$message" >&2
    fi
    exit 2
}

check_storage() {
    dir=${STORAGE_DIR:-/storage}
    who="uid $(id -u), gid $(id -g)"
    if [ -e "$dir" ] && [ ! -d "$dir" ]; then
        fail "storage folder $dir (STORAGE_DIR) is not a folder: mount a folder there (docker run -v /srv/dumps:$dir)"
    fi
    if [ ! -d "$dir" ]; then
        fail "storage folder $dir (STORAGE_DIR) does not exist: mount a volume there (docker run -v /srv/dumps:$dir)"
    fi
    # Write for real: a read-only mount, root squashing or a wrong owner all
    # show up here, not after the copy.
    if probe=$(mktemp "$dir/.entrypoint-write-test.XXXXXX" 2>&1); then
        rm -f "$probe"
    else
        fail "storage folder $dir (STORAGE_DIR) is not writable by $who (${probe##*: }): mount it read-write, owned by this user (chown 10001:10001 on the host folder), or run as the folder's owner (docker run --user \"\$(id -u):\$(id -g)\"; Kubernetes: fsGroup)"
    fi
}

if [ "$#" -eq 0 ]; then
    set -- dump
fi

case $1 in
    dump | check | plan | restore | inspect | scan | -*) ;;
    *) exec "$@" ;;
esac

if [ "$1" = dump ]; then
    help=no
    for arg in "$@"; do
        case $arg in -h | --help) help=yes ;; esac
    done
    if [ "$help" = no ]; then
        check_storage
    fi
fi

exec python -m app "$@"
