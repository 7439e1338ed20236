#!/usr/bin/env bash
# Set up everything Stella Agent needs for development, tests and the demo on a
# Debian 12 host, installing only what is missing, so running it again is cheap:
#
#   - Debian packages: Docker Engine, the distribution registry, static busybox,
#     htpasswd (for the registry that requires a login)
#   - a virtual environment in .venv with the project and its dev dependencies
#   - buf (the protobuf linter) from npm, in .tools/
#   - the Compose v2 binary as a Docker CLI plugin
#   - dockerd, a registry on 127.0.0.1:5000 and one requiring a login on
#     127.0.0.1:5001, started in the background when they are not answering
#   - the test images, built from busybox and pushed to the registry
#
# Tools end up in .venv/bin and .tools/node_modules/.bin.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${STELLA_DEV_STATE:-/var/lib/stella-dev}"
VENV="$ROOT/.venv"
mkdir -p "$STATE"

log() { printf '[dev-env] %s\n' "$*" >&2; }

install_debian_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    [ -x /bin/busybox ] || missing+=(busybox-static)
    command -v htpasswd >/dev/null || missing+=(apache2-utils)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python_env() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtual environment $VENV"
        python3 -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp="$VENV/.stella-installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        log "installing the project and its dev dependencies"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e "$ROOT[dev]"
        touch "$stamp"
    fi
}

install_buf() {
    if [ ! -x "$ROOT/.tools/node_modules/.bin/buf" ]; then
        log "installing buf from npm"
        mkdir -p "$ROOT/.tools"
        npm install --silent --prefix "$ROOT/.tools" @bufbuild/buf@1 >/dev/null
    fi
}

install_compose_plugin() {
    local plugin_dir="$HOME/.docker/cli-plugins"
    mkdir -p "$plugin_dir"
    if [ ! -x "$plugin_dir/docker-compose" ]; then
        log "linking Compose v2 as a Docker CLI plugin"
        ln -sf "$VENV/bin/docker-compose" "$plugin_dir/docker-compose"
    fi
}

wait_until() {
    local what="$1" seconds="$2"
    shift 2
    for _ in $(seq 1 "$((seconds * 4))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    log "$what did not come up within ${seconds}s"
    return 1
}

start_dockerd() {
    if docker info >/dev/null 2>&1; then return 0; fi
    log "starting dockerd (log: /var/log/dockerd.log)"
    setsid dockerd --host unix:///var/run/docker.sock >/var/log/dockerd.log 2>&1 < /dev/null &
    wait_until "dockerd" 60 docker info
}

# A registry answers /v2/ with 200, or 401 when it requires a login.
registry_answers() {
    local code
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/v2/" || true)"
    [ "$code" = 200 ] || [ "$code" = 401 ]
}

start_registry() {
    local name="$1" port="$2" auth="$3"
    if registry_answers "$port"; then return 0; fi
    local dir="$STATE/$name"
    mkdir -p "$dir/data"
    {
        echo "version: 0.1"
        echo "log: {level: warn}"
        echo "storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}"
        echo "http: {addr: 127.0.0.1:$port}"
        if [ "$auth" = yes ]; then
            echo "auth: {htpasswd: {realm: stella-dev, path: $dir/htpasswd}}"
        fi
    } >"$dir/registry.yml"
    if [ "$auth" = yes ]; then
        htpasswd -Bbn stella-dev stella-dev-password >"$dir/htpasswd"
    fi
    log "starting registry $name on 127.0.0.1:$port"
    setsid docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 < /dev/null &
    wait_until "registry $name" 30 registry_answers "$port"
}

install_debian_packages
install_python_env
install_buf
install_compose_plugin
start_dockerd
start_registry registry 5000 no
start_registry registry-auth 5001 yes
bash "$ROOT/scripts/build-test-images.sh"
log "ready"
