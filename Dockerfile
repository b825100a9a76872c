# The sanitised-dump job: a one-shot container that publishes a PostgreSQL dump
# with every column that is not allow-listed replaced by a fake (docs/deploy.md).
#
#   DOCKER_BUILDKIT=1 docker build -t sanitised-dump .
#   DOCKER_BUILDKIT=1 docker build --build-arg PG_MAJOR=18 -t sanitised-dump:pg18 .
#
# PG_MAJOR is the major of pg_dump, which must be >= the source server's:
# 17 is Debian trixie's own client; any other major (14 to 18) comes from the
# PostgreSQL project's apt repository (apt.postgresql.org).
#
# Behind a TLS-intercepting proxy, hand the build its CA bundle as a BuildKit
# secret; apt and pip use it during the build and it never lands in a layer
# (nor does the apt configuration of the build, /etc/apt/apt.conf.d/00build):
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt
# A proxy goes in through the predefined build args (http_proxy, https_proxy),
# which are not recorded in the image either.
#
# Targets: `runtime` (the default, last stage) and `test` (the test suite on
# top of the runtime image, for compose.test.yml's `tests` service).

ARG BASE_IMAGE=debian:trixie-slim

# ---------------------------------------------------------------------------
# build: a virtualenv with the app and its dependencies. Every dependency is
# pure Python, so no compiler is needed here either.
FROM ${BASE_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca \
    echo 'Dpkg::Options { "--force-unsafe-io"; };' >/etc/apt/apt.conf.d/00build \
    && if [ -s /run/secrets/ca ]; then \
        echo 'Acquire::https::CAInfo "/run/secrets/ca";' >>/etc/apt/apt.conf.d/00build; \
    fi \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-pip python3-setuptools python3-venv \
    && rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/00build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The venv gets no pip of its own (nothing to strip later): Debian's pip
# installs into it with --python, and wheels are built with Debian's setuptools.
RUN python3 -m venv --without-pip /opt/venv
WORKDIR /src

# Dependencies first, from pyproject.toml alone (with a stub package), so a
# change to the code reuses this layer. psycopg runs as pure Python over
# Debian's libpq5 (the one pg_dump uses, updated with it by apt): the binary
# wheel, with its own bundled libpq, is removed.
ARG EXTRAS=sentry
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && mkdir app && touch app/__init__.py \
    && python3 -m pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/stub . \
    && set -- /tmp/stub/*.whl \
    && python3 -m pip --python /opt/venv/bin/python install "$1[$EXTRAS]" \
    && python3 -m pip --python /opt/venv/bin/python uninstall --yes sanitised-dump psycopg-binary \
    && rm -rf app build ./*.egg-info /tmp/stub

COPY app ./app
RUN python3 -m pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheel . \
    && python3 -m pip --python /opt/venv/bin/python install --no-deps /tmp/wheel/*.whl \
    && rm -rf build ./*.egg-info /tmp/wheel

# ---------------------------------------------------------------------------
# test-venv: the same venv plus the test extra, for the `test` target only.
FROM build AS test-venv
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 -m pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheel . \
    && set -- /tmp/wheel/*.whl \
    && python3 -m pip --python /opt/venv/bin/python install "$1[test,$EXTRAS]" \
    && python3 -m pip --python /opt/venv/bin/python uninstall --yes psycopg-binary \
    && rm -rf build ./*.egg-info /tmp/wheel

# ---------------------------------------------------------------------------
# runtime: Debian's python3 and pg_dump, the venv, a non-root user.
FROM ${BASE_IMAGE} AS runtime
ARG PG_MAJOR=17
# 1: Debian's PostgreSQL server too, for SCRATCH_DATABASE_URL=embedded (about 200 MB more);
# 0: the client only.
ARG EMBEDDED_SERVER=1
ARG DEBIAN_FRONTEND=noninteractive
# postgresql-client-common ships apt.postgresql.org.sh, which adds the
# PostgreSQL apt repository (and its keyring) for the majors Debian lacks.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca \
    case "$PG_MAJOR" in \
        1[4-9]) ;; \
        *) echo "PG_MAJOR must be a PostgreSQL major from 14 on, not '$PG_MAJOR'" >&2; exit 1 ;; \
    esac \
    && echo 'Dpkg::Options { "--force-unsafe-io"; };' >/etc/apt/apt.conf.d/00build \
    && if [ -s /run/secrets/ca ]; then \
        echo 'Acquire::https::CAInfo "/run/secrets/ca";' >>/etc/apt/apt.conf.d/00build; \
    fi \
    && apt-get update \
    && if ! apt-cache show "postgresql-client-$PG_MAJOR" >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends ca-certificates postgresql-client-common \
        && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y; \
    fi \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 "postgresql-client-$PG_MAJOR" \
    && if [ "$EMBEDDED_SERVER" = 1 ]; then \
        mkdir -p /etc/postgresql-common/createcluster.d \
        && echo 'create_main_cluster = false' \
            >/etc/postgresql-common/createcluster.d/00-no-main.conf \
        && apt-get install -y --no-install-recommends "postgresql-$PG_MAJOR" \
        && rm -rf "/usr/lib/postgresql/$PG_MAJOR/lib/bitcode" \
        && "/usr/lib/postgresql/$PG_MAJOR/bin/initdb" --version; \
    fi \
    && rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/00build \
    && "/usr/lib/postgresql/$PG_MAJOR/bin/pg_dump" --version

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and a
# host folder can be chowned to it. /storage belongs to it, for named volumes.
RUN groupadd --system --gid 10001 sanitiser \
    && useradd --system --uid 10001 --gid sanitiser --home-dir /home/sanitiser \
        --create-home --shell /usr/sbin/nologin sanitiser \
    && install -d -o 10001 -g 10001 -m 0750 /storage

COPY --from=build /opt/venv /opt/venv
# allow_list.json is the default allow list (a mounted file or ALLOW_LIST
# replaces it); app.json is read by dokku from the working directory.
COPY allow_list.json app.json entrypoint.sh /app/
RUN chmod 0755 /app/entrypoint.sh

# pg_dump and friends from /usr/lib/postgresql/<major>/bin, not Debian's
# version-picking wrapper; psycopg over the system libpq.
ENV PG_MAJOR=${PG_MAJOR} \
    PATH=/opt/venv/bin:/usr/lib/postgresql/${PG_MAJOR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PG_DUMP=/usr/lib/postgresql/${PG_MAJOR}/bin/pg_dump \
    ALLOW_LIST=/app/allow_list.json \
    STORAGE_DIR=/storage \
    PSYCOPG_IMPL=python \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="sanitised-dump" \
      org.opencontainers.image.description="One-shot job: a PostgreSQL dump with every column that is not allow-listed replaced by a deterministic fake" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

WORKDIR /app
USER 10001:10001
VOLUME /storage
ENTRYPOINT ["/app/entrypoint.sh"]
CMD ["dump"]

# ---------------------------------------------------------------------------
# test: the test suite inside the runtime image, against TEST_DATABASE_URL
# (compose.test.yml's `tests` service). Not the default target.
FROM runtime AS test
COPY --from=test-venv /opt/venv /opt/venv
COPY . /src
WORKDIR /src
ENV HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider", "-m", "not container", "tests"]

# The default target: the job image.
FROM runtime
