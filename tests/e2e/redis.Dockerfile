# Redis for the end-to-end test, where no registry is reachable to pull redis:7-alpine:
# Debian's redis-server on the debootstrap base image (scripts/make-base-image.sh).
# It stands in for compose.example.yml's `redis` service (healthcheck `redis-cli ping`).
ARG BASE_IMAGE=edgeproxy-base/python:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6379
# As the official image does: every address, no protected mode (the network is the
# boundary); and no snapshots, which would fail in a read-only working directory.
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
