# edgeproxy's image: the proxy in a virtualenv on a slim Python, run as an unprivileged user.
#
#   docker build -t edgeproxy:local .
#   docker run -d -p 8080:8080 -p 127.0.0.1:8081:8081 \
#       -v /var/run/docker.sock:/var/run/docker.sock:ro \
#       --group-add "$(stat -c %g /var/run/docker.sock)" edgeproxy:local
#
# User: `edgeproxy`, uid 10001, gid 10001, no home, no shell.  To read a mounted
#   Docker socket it needs the socket's group (`--group-add`, compose `group_add`),
#   or DOCKER_HOST pointing at a socket proxy (see README, "Deploying with Compose").
# Ports: 8080 proxied traffic, 8081 admin API (/healthz, /routes); publish 8081 on
#   127.0.0.1 only.  The admin listener binds 0.0.0.0 inside the container so that
#   Docker can publish it.
# Stop: SIGTERM -> stop accepting, drain in-flight requests for EDGEPROXY_DRAIN_TIMEOUT
#   (8s), exit 0: inside Compose's default 10 s stop_grace_period.
#
# Build arguments:
#   PYTHON_IMAGE       any image with python3 (3.11+) and its venv module, used by both
#                      stages; with no registry at hand: scripts/make-base-image.sh.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX, PIP_TRUSTED_HOST
#                      handed to pip as they are (they are pip's own variables).
# Offline builds: wheels in .cache/wheelhouse/ (scripts/make-wheelhouse.sh fills it)
#   are always offered to pip; add --build-arg PIP_NO_INDEX=1 to use nothing else.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_FIND_LINKS=/tmp/deps
RUN python3 -m venv /opt/edgeproxy
# Dependencies first, in their own layer, so that a code change does not reinstall
# them.  They are read from setup.cfg, the one list: install_requires plus the "fast"
# extra (uvloop, orjson) and the "otel" extra (OpenTelemetry SDK and OTLP/HTTP exporter,
# imported only when OTEL_EXPORTER_OTLP_ENDPOINT is set), which the image always wants.
# `.cach[e]` is a pattern so that the wheelhouse is optional (a pattern may match nothing,
# with the classic builder and BuildKit alike): this copies .cache/wheelhouse/* if there is
# one.
COPY setup.cfg .cach[e]/wheelhouse /tmp/deps/
RUN python3 -c 'import configparser; c = configparser.ConfigParser(); c.read("/tmp/deps/setup.cfg"); print(c["options"]["install_requires"] + "\n" + c["options.extras_require"]["fast"] + "\n" + c["options.extras_require"]["otel"])' \
        > /tmp/deps/requirements.txt \
    && /opt/edgeproxy/bin/pip install -r /tmp/deps/requirements.txt
COPY setup.cfg setup.py README.md /src/
COPY edgeproxy/ /src/edgeproxy/
# A wheel build (PEP 517) with any pip, old (bookworm's 23.0) or new; then pip and
# setuptools go: the runtime needs no installer (about 20 MB less).
RUN /opt/edgeproxy/bin/pip install --no-deps --use-pep517 /src \
    && /opt/edgeproxy/bin/pip check \
    && /opt/edgeproxy/bin/pip uninstall --yes --quiet pip setuptools wheel \
    && /opt/edgeproxy/bin/edgeproxy --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="edgeproxy" \
      org.opencontainers.image.description="Docker-label-driven edge proxy" \
      org.opencontainers.image.licenses="MIT"
# Written by hand rather than with useradd so that any base image (Debian, Alpine) works.
RUN echo 'edgeproxy:x:10001:10001:edgeproxy:/nonexistent:/sbin/nologin' >> /etc/passwd \
    && echo 'edgeproxy:x:10001:' >> /etc/group
COPY --from=build /opt/edgeproxy /opt/edgeproxy
ENV PATH=/opt/edgeproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGEPROXY_LISTEN=0.0.0.0:8080 \
    EDGEPROXY_ADMIN_LISTEN=0.0.0.0:8081 \
    EDGEPROXY_DRAIN_TIMEOUT=8s
USER 10001:10001
EXPOSE 8080 8081
STOPSIGNAL SIGTERM
# No curl in slim images: ask the admin listener with Python, wherever it listens.  /healthz
# answers 503 (urlopen raises: exit 1) while Docker discovery is on and failing, e.g. without
# the socket's group: the container turns unhealthy instead of looking fine routing nothing.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; h, _, p = os.environ.get('EDGEPROXY_ADMIN_LISTEN', '127.0.0.1:8081').rpartition(':'); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '[::]': '[::1]'}.get(h, h); urllib.request.urlopen(f'http://{h}:{p}/healthz', timeout=2)"]
ENTRYPOINT ["edgeproxy"]
