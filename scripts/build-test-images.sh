#!/usr/bin/env bash
# Build the small busybox-based images that the tests and the demo deploy, push
# them to the loopback registries, and record each one's manifest digest in
# $STELLA_DEV_STATE/test-images.json. Needs dockerd and the registries running
# (scripts/dev-env.sh starts them).
#
#   web:v1, web:v2  httpd on port 8080 with a HEALTHCHECK, page says v1 or v2
#   broken:v1       serves pages, but its HEALTHCHECK always fails
#   crash:v1        exits with status 3 one second after it starts
#   worker:v1       no HEALTHCHECK, sleeps forever
#   tools:v1        plain busybox, for hooks and one-shot jobs
#   private:v1      like web:v1 with its own digest, pushed only to the registry
#                   that requires a login, and not kept in the engine's cache
set -euo pipefail

STATE="${STELLA_DEV_STATE:-/var/lib/stella-dev}"
REGISTRY="127.0.0.1:5000"
AUTH_REGISTRY="127.0.0.1:5001"
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT

cp /bin/busybox "$BUILD/busybox"

# Every image shares this base: busybox with its applets linked into /bin.
base() {
    cat <<'EOF'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/sh", "-c", "mkdir -p /tmp /www /var/stella && chmod 1777 /tmp"]
LABEL org.opencontainers.image.vendor="stella-agent-tests"
EOF
}

web() {
    base
    cat <<EOF
RUN ["/bin/sh", "-c", "echo $1 > /www/index.html"]
EXPOSE 8080
HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD ["/bin/sh", "-c", "$2"]
CMD ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
EOF
}

# Build the Dockerfile on stdin; the legacy builder's deprecation notice is
# shown only when the build fails.
build() {
    local name="$1"
    if ! docker build -q -t "$REGISTRY/stella-test/$name" -f - "$BUILD" \
        >/dev/null 2>"$BUILD/build.err"; then
        cat "$BUILD/build.err" >&2
        return 1
    fi
}

web v1 "wget -q -O- http://127.0.0.1:8080/ >/dev/null" | build web:v1
web v2 "wget -q -O- http://127.0.0.1:8080/ >/dev/null" | build web:v2
web broken "exit 1" | build broken:v1
{ base; echo 'CMD ["/bin/sh", "-c", "sleep 1; exit 3"]'; } | build crash:v1
{ base; echo 'CMD ["/bin/sleep", "2147483647"]'; } | build worker:v1
{ base; echo 'CMD ["/bin/sh"]'; } | build tools:v1

# The registry that requires a login gets its own copy of web:v1, and an
# image no other registry has.
docker tag "$REGISTRY/stella-test/web:v1" "$AUTH_REGISTRY/stella-test/web:v1"
{ web private "wget -q -O- http://127.0.0.1:8080/ >/dev/null"; echo 'LABEL stella-test.private="1"'; } \
    | build private:v1
docker tag "$REGISTRY/stella-test/private:v1" "$AUTH_REGISTRY/stella-test/private:v1"
docker rmi "$REGISTRY/stella-test/private:v1" >/dev/null
echo stella-dev-password | docker login -u stella-dev --password-stdin "$AUTH_REGISTRY" >/dev/null 2>&1

push() {
    local ref="$1" digest
    digest="$(docker push "$ref" | sed -n 's/.*digest: \(sha256:[0-9a-f]\{64\}\).*/\1/p')"
    if [ -z "$digest" ]; then
        echo "push of $ref printed no digest" >&2
        return 1
    fi
    echo "$digest"
}

{
    echo "{"
    for name in web:v1 web:v2 broken:v1 crash:v1 worker:v1 tools:v1; do
        digest="$(push "$REGISTRY/stella-test/$name")"
        printf '  "%s": {"repository": "%s", "digest": "%s"},\n' \
            "$name" "$REGISTRY/stella-test/${name%%:*}" "$digest"
    done
    digest="$(push "$AUTH_REGISTRY/stella-test/web:v1")"
    printf '  "auth/web:v1": {"repository": "%s", "digest": "%s"},\n' \
        "$AUTH_REGISTRY/stella-test/web" "$digest"
    digest="$(push "$AUTH_REGISTRY/stella-test/private:v1")"
    printf '  "auth/private:v1": {"repository": "%s", "digest": "%s"}\n' \
        "$AUTH_REGISTRY/stella-test/private" "$digest"
    echo "}"
} >"$STATE/test-images.json.tmp"

# Log out again so that no test can pass on stored credentials by accident.
docker logout "$AUTH_REGISTRY" >/dev/null 2>&1
docker rmi "$AUTH_REGISTRY/stella-test/web:v1" "$AUTH_REGISTRY/stella-test/private:v1" >/dev/null
mv "$STATE/test-images.json.tmp" "$STATE/test-images.json"
echo "[build-test-images] digests in $STATE/test-images.json" >&2
