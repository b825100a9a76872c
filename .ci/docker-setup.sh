#!/usr/bin/env bash
# Make this machine ready to build and run the job's image, from nothing:
# Debian's docker.io, debootstrap and shellcheck; a dockerd on loopback only
# (no bridge, no iptables: builds and containers use --network=host); a local
# stand-in for debian:trixie-slim when no registry can give us the real one;
# and the image itself, tagged sanitised-dump:test. Safe to run again: each
# step is skipped when its result is already there.
#
#   .ci/docker-setup.sh          install, start, import the base, build
#   .ci/docker-setup.sh --no-build   everything but the build
#   .ci/docker-setup.sh --stop   stop the dockerd this script started
#
# Environment: IMAGE (sanitised-dump:test), PG_MAJOR (17), BASE_IMAGE
# (debian:trixie-slim), DEBIAN_MIRROR (http://deb.debian.org/debian),
# CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt, passed to the build as the
# BuildKit secret "ca" when it exists), DOCKERD_LOG.
set -euo pipefail

IMAGE=${IMAGE:-sanitised-dump:test}
PG_MAJOR=${PG_MAJOR:-17}
BASE_IMAGE=${BASE_IMAGE:-debian:trixie-slim}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/sanitised-dump-dockerd.log}
# Only a dockerd whose pid is in this file was started by us (and is ours to stop).
OUR_PIDFILE=/run/sanitised-dump-dockerd.pid
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[docker-setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Debian's CLI builds with BuildKit on its own; a newer CLI without the buildx
# plugin refuses DOCKER_BUILDKIT=1, so prefer Debian's when both are there.
docker_cli() {
    if [[ -n ${DOCKER:-} ]]; then printf '%s\n' "$DOCKER"
    elif [[ -x /usr/bin/docker ]]; then printf '%s\n' /usr/bin/docker
    else command -v docker
    fi
}

engine_answers() { "$(docker_cli)" info >/dev/null 2>&1; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
    # Compose v1 is only used to check compose.test.yml (`docker-compose config`).
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    if ((${#missing[@]} == 0)); then
        log "packages: already installed"
        return
    fi
    [[ $(id -u) == 0 ]] || die "need root to install ${missing[*]}"
    log "packages: installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

start_dockerd() {
    if engine_answers; then
        log "dockerd: already answering"
        return
    fi
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
        log "dockerd: running but not answering yet"
    else
        [[ $(id -u) == 0 ]] || die "need root to start dockerd"
        log "dockerd: starting (log: $DOCKERD_LOG)"
        mkdir -p "$(dirname "$DOCKERD_LOG")"
        # Nothing listens beyond loopback: no bridge, no NAT rules, no TCP socket.
        setsid dockerd --bridge=none --iptables=false --ip6tables=false \
            >>"$DOCKERD_LOG" 2>&1 </dev/null &
        echo $! >"$OUR_PIDFILE"
    fi
    local i
    for ((i = 0; i < 120; i++)); do
        engine_answers && { log "dockerd: answering"; return; }
        sleep 0.5
    done
    tail -n 20 "$DOCKERD_LOG" >&2 || true
    die "dockerd did not answer within 60 s"
}

stop_dockerd() {
    if [[ ! -s $OUR_PIDFILE ]]; then
        log "dockerd: not started by this script, leaving it alone"
        return
    fi
    local pid
    pid=$(cat "$OUR_PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        log "dockerd: stopping pid $pid"
        kill -TERM "$pid"
        local i
        for ((i = 0; i < 60; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
    fi
    rm -f "$OUR_PIDFILE"
}

# The real image is debootstrap --variant=minbase plus "slimming" (no docs,
# man pages or translations) and deb822 sources with updates and security:
# do the same, so sizes measured here are close to what a registry build gives.
import_base_image() {
    local cli
    cli=$(docker_cli)
    if "$cli" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image: $BASE_IMAGE present"
        return
    fi
    [[ $BASE_IMAGE == debian:trixie-slim ]] \
        || die "base image $BASE_IMAGE missing and only debian:trixie-slim can be made here"
    local work root
    work=$(mktemp -d /var/tmp/trixie-slim.XXXXXX)
    root=$work/root
    # shellcheck disable=SC2064  # expand now: the trap must remove this very folder
    trap "rm -rf '$work'" EXIT
    log "base image: debootstrap --variant=minbase trixie (about 30 s)"
    debootstrap --variant=minbase trixie "$root" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }

    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
# as in the official slim images: no documentation, manuals or translations
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{info,man,groff,linda,lintian}/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
    printf 'Acquire::GzipIndexes "true";\n' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
    printf 'APT::AutoRemove::SuggestsImportant "false";\n' \
        >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/*
    : >"$root/etc/hostname"
    : >"$root/etc/resolv.conf"

    log "base image: importing as $BASE_IMAGE"
    tar --numeric-owner -C "$root" -c . | "$cli" import \
        --change 'CMD ["bash"]' \
        --change 'LABEL org.opencontainers.image.description="local stand-in for debian:trixie-slim (.ci/docker-setup.sh)"' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$work"
    trap - EXIT
}

build_image() {
    local cli args=()
    cli=$(docker_cli)
    args=(build --network=host --build-arg "PG_MAJOR=$PG_MAJOR" --tag "$IMAGE")
    if [[ -s $CA_BUNDLE ]]; then
        args+=(--secret "id=ca,src=$CA_BUNDLE")
    fi
    # A proxy of the host's apt goes in as a predefined build arg: used by the
    # build, never written into the image or its history.
    local apt_proxy
    apt_proxy=$(apt-config shell P Acquire::http::Proxy 2>/dev/null | sed -n "s/^P='\(.*\)'$/\1/p")
    [[ -n ${http_proxy:-} ]] && args+=(--build-arg "http_proxy=$http_proxy")
    [[ -z ${http_proxy:-} && -n $apt_proxy ]] && args+=(--build-arg "http_proxy=$apt_proxy")
    [[ -n ${https_proxy:-} ]] && args+=(--build-arg "https_proxy=$https_proxy")
    [[ -n ${no_proxy:-} ]] && args+=(--build-arg "no_proxy=$no_proxy")
    local revision
    if revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null); then
        args+=(--build-arg "REVISION=$revision")
    fi
    log "build: $IMAGE (PG_MAJOR=$PG_MAJOR)"
    local start=$SECONDS
    DOCKER_BUILDKIT=1 "$cli" "${args[@]}" "$REPO"
    log "build: done in $((SECONDS - start)) s, $("$cli" image inspect --format '{{.Size}}' "$IMAGE" \
        | awk '{printf "%.0f MB", $1 / 1e6}')"
    # Earlier builds of this image, now untagged; nobody else's images.
    "$cli" image prune --force --filter "label=org.opencontainers.image.title=sanitised-dump" >/dev/null
}

main() {
    case ${1:-} in
        --stop) stop_dockerd; return ;;
        --no-build | "") ;;
        *) die "unknown argument: $1 (use --no-build or --stop)" ;;
    esac
    local start=$SECONDS
    install_packages
    start_dockerd
    import_base_image
    [[ ${1:-} == --no-build ]] || build_image
    log "ready in $((SECONDS - start)) s"
}

main "$@"
