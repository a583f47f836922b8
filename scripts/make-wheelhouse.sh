#!/usr/bin/env bash
# Download the wheels that a Dockerfile installs into a folder, for image builds that
# cannot reach the package index themselves (no network during the build, or an index
# behind a certificate authority that only this machine trusts):
#
#   bash scripts/make-wheelhouse.sh IMAGE [DIR [REQUIREMENTS]]
#   docker build --build-arg PYTHON_IMAGE=IMAGE --build-arg PIP_NO_INDEX=1 .
#
#   IMAGE         the base image the wheels are for (the Dockerfiles' PYTHON_IMAGE)
#   DIR           where the wheels go (default .cache/wheelhouse, where the Dockerfile looks)
#   REQUIREMENTS  a requirements file, e.g. examples/whoami/requirements.txt; without it:
#                 edgeproxy's setup.cfg install_requires, "fast" and "otel" extras, plus pip,
#                 setuptools and wheel
#                 to build edgeproxy itself
#
# pip runs inside IMAGE, so wheel tags and environment markers (`python_full_version <
# "3.11.3"`) are those of the image's own Python, but with this machine's network, CA
# bundle, proxy and index settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST,
# PIP_CERT, http_proxy, https_proxy, no_proxy).  A stamp of the requirements and the
# image makes a second run with nothing changed a no-op; otherwise DIR is refilled.
# Each Dockerfile looks for .cache/wheelhouse/ in its own build context.
set -euo pipefail

image=${1:?usage: make-wheelhouse.sh IMAGE [DIR [REQUIREMENTS]]}
dest=$(realpath -m "${2:-.cache/wheelhouse}")
if [[ -n "${3:-}" ]]; then
    reqs=$(cat "$3")
else
    cd "$(dirname "$0")/.."
    reqs=$(python3 -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(c["options"]["install_requires"] + "\n" + c["options.extras_require"]["fast"] + "\n" + c["options.extras_require"]["otel"])')
    reqs+=$'\npip\nsetuptools\nwheel'
fi
image_id=$(docker image inspect --format '{{.Id}}' "$image")
stamp=$(printf '%s\n%s\n' "$image_id" "$reqs" | sha256sum | cut -c1-16)
mkdir -p "$dest"
if [[ -f "$dest/.stamp" && "$(cat "$dest/.stamp")" == "$stamp" ]]; then
    echo "make-wheelhouse: $dest is up to date for $image" >&2
    exit 0
fi
# Start afresh, so that the folder holds exactly one resolution (no stale versions).
rm -f "$dest"/*.whl "$dest"/*.tar.gz "$dest"/*.zip "$dest/.stamp"

ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
args=(--rm -i --network host --user "$(id -u):$(id -g)" -e HOME=/tmp -e PIP_NO_CACHE_DIR=1
      -e PIP_DISABLE_PIP_VERSION_CHECK=1 -v "$dest:/wheelhouse")
if [[ -f "$ca" ]]; then
    args+=(-v "$ca:/run/host-ca.crt:ro" -e PIP_CERT=/run/host-ca.crt)
fi
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST http_proxy https_proxy no_proxy \
           HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    if [[ -n "${!var:-}" ]]; then args+=(-e "$var"); fi
done
echo "make-wheelhouse: downloading for $image into $dest" >&2
# shellcheck disable=SC2016  # expanded by the container's shell
printf '%s\n' "$reqs" | docker run "${args[@]}" "$image" sh -c '
    cat > /tmp/requirements.txt &&
    python3 -m venv /tmp/venv &&
    /tmp/venv/bin/pip download --quiet --prefer-binary --dest /wheelhouse -r /tmp/requirements.txt'
echo "$stamp" >"$dest/.stamp"
echo "make-wheelhouse: $(find "$dest" -name '*.whl' | wc -l) wheels in $dest" >&2
