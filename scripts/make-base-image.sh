#!/usr/bin/env bash
# Make a Debian + python3 base image without a container registry: debootstrap a
# minimal root filesystem and `docker import` it.  For machines that reach Debian's
# package mirror but no registry (CI); elsewhere just use python:3.12-slim.
#
#   bash scripts/make-base-image.sh [TAG]      # default: edgeproxy-base/python:bookworm
#   docker build --build-arg PYTHON_IMAGE=edgeproxy-base/python:bookworm .
#
# Idempotent and cached, so CI stays fast:
#   * TAG exists and was made by this recipe            -> nothing to do (well under a second);
#   * the root filesystem tarball is in the cache       -> `docker import` only (seconds);
#   * otherwise                                          -> debootstrap (a minute or two), then both.
# The recipe (suite, packages, mirror, architecture, this script's version) is hashed into
# the tarball's name and the image's label `org.edgeproxy.base.recipe`, so changing it
# rebuilds.  Concurrent runs are serialised with a lock in the cache folder.
#
# Environment (all optional):
#   EDGEPROXY_BASE_CACHE   tarball cache folder           (default /var/cache/edgeproxy)
#   EDGEPROXY_BASE_MIRROR  Debian mirror for debootstrap  (default http://deb.debian.org/debian)
#   EDGEPROXY_BASE_SUITE   Debian suite                   (default bookworm: python 3.11)
# Needs root, debootstrap and a running Docker Engine.
set -euo pipefail

tag=${1:-edgeproxy-base/python:bookworm}
cache=${EDGEPROXY_BASE_CACHE:-/var/cache/edgeproxy}
mirror=${EDGEPROXY_BASE_MIRROR:-http://deb.debian.org/debian}
suite=${EDGEPROXY_BASE_SUITE:-bookworm}
# python3-venv: `python3 -m venv` with pip; ca-certificates: pip and apt over https.
packages=python3,python3-venv,ca-certificates
recipe_version=1

say() { echo "make-base-image: $*" >&2; }
die() { say "$*"; exit 1; }

command -v docker >/dev/null || die "docker not found (apt-get install docker.io)"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "Docker Engine does not answer (python3 tests/engine.py ensure)"
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
recipe=$(printf '%s\n' "$recipe_version" "$suite" "$packages" "$mirror" "$arch" | sha256sum | cut -c1-12)
label=org.edgeproxy.base.recipe

have=$(docker image inspect --format "{{index .Config.Labels \"$label\"}}" "$tag" 2>/dev/null || true)
if [[ "$have" == "$recipe" ]]; then
    say "$tag is up to date (recipe $recipe)"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
tarball="$cache/python-$suite-$arch-$recipe.tar"

if [[ ! -s "$tarball" ]]; then
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    root=$(mktemp -d "${TMPDIR:-/var/tmp}/edgeproxy-rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    say "debootstrap $suite ($packages) from $mirror into $root"
    started=$SECONDS
    if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
            >"$root.log" 2>&1; then
        tail -n 30 "$root.log" >&2
        die "debootstrap failed; full log: $root.log"
    fi
    rm -f "$root.log"
    # What an image does not need: downloaded .debs, package lists, docs, logs.
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/*
    # Let apt in derived images see updates too, as in Debian's official images.
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
EOF
    # Docker mounts its own /dev, /proc and /sys; sorted names and numeric owners keep
    # the archive stable for the same packages.
    tar --numeric-owner --sort=name --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
        -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    trap - EXIT
    say "root filesystem cached in $tarball ($(du -h "$tarball" | cut -f1), $((SECONDS - started))s)"
fi

docker import \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "LABEL $label=$recipe" \
    --change 'CMD ["python3"]' \
    "$tarball" "$tag" >/dev/null
say "imported $tag from $tarball"
