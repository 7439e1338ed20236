#!/usr/bin/env bash
# The main job, end to end on this host: set up what is missing, create
# development certificates, start the reference orchestrator and an agent, and
# deploy through them over mutual TLS:
#
#   1. web v1 (pinned by digest, from the loopback registry)
#   2. upgrade to web v2
#   3. an image whose health check fails: the agent rolls back to v2
#   4. a Compose stack (web, worker and a one-shot migration) from a lock file
#      whose images are pinned by digest, fetched by the agent over mTLS
#   5. a deploy whose pre-deploy hook (run in a sandbox container) fails:
#      nothing changes
#   6. a read of the version sticker, which names release r2
#
# Each result is printed as JSON. The deployed container stays running; the
# last lines say how to remove it. State and logs go to ./demo-state.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/dev-env.sh
export PATH="$ROOT/.venv/bin:$PATH"

DEMO="$ROOT/demo-state"
STATE="${STELLA_DEV_STATE:-/var/lib/stella-dev}"
AGENT_ID="demo-agent"
CONTAINER="stella-demo-web"
WEB_PORT="${STELLA_DEMO_WEB_PORT:-18080}"
STACK_PORT="${STELLA_DEMO_STACK_PORT:-18081}"
STACK="stella-demo-shop"
mkdir -p "$DEMO"

# Headings in bold when the output is a terminal.
if [ -t 1 ]; then
    say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
    say() { printf '\n==> %s\n' "$*"; }
fi

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

say "creating development certificates in $DEMO/certs"
stella-agent certs init --dir "$DEMO/certs" --agent-id "$AGENT_ID" >/dev/null

PORT="$(free_port)"
ADDRESS="127.0.0.1:$PORT"
say "starting the reference orchestrator on $ADDRESS (log: $DEMO/orchestrator.log)"
stella-agent orchestrator --listen "$ADDRESS" --certs "$DEMO/certs" --heartbeat-interval 5 \
    >"$DEMO/orchestrator.log" 2>&1 &
ORCHESTRATOR_PID=$!

cat >"$DEMO/agent.yaml" <<EOF
agent_id: $AGENT_ID
state_dir: $DEMO/agent-state
orchestrator:
  address: $ADDRESS
tls:
  ca_file: $DEMO/certs/ca.crt
  cert_file: $DEMO/certs/agent-$AGENT_ID.crt
  key_file: $DEMO/certs/agent-$AGENT_ID.key
tasks:
  health_timeout_seconds: 30
hooks:
  image: $(python -c 'import json, sys; i = json.load(open(sys.argv[1]))["tools:v1"]; print(i["repository"] + "@" + i["digest"])' "$STATE/test-images.json")
sticker:
  path: $DEMO/stella/version.json
EOF

cleanup() {
    [ -n "${AGENT_PID:-}" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    kill "$ORCHESTRATOR_PID" 2>/dev/null && wait "$ORCHESTRATOR_PID" 2>/dev/null
    return 0
}
trap cleanup EXIT

for _ in $(seq 1 100); do
    grep -q "orchestrator listening" "$DEMO/orchestrator.log" && break
    sleep 0.1
done

say "starting the agent (log: $DEMO/agent.log)"
stella-agent run --config "$DEMO/agent.yaml" >"$DEMO/agent.log" 2>&1 &
AGENT_PID=$!

OPERATOR=(--address "$ADDRESS" --certs "$DEMO/certs")
for _ in $(seq 1 100); do
    stella-agent agents "${OPERATOR[@]}" 2>/dev/null | grep -q "\"$AGENT_ID\"" && break
    sleep 0.2
done
stella-agent agents "${OPERATOR[@]}"

# Write a deploy task file for one of the test images.
write_task() {
    local file="$1" image="$2" release="$3"
    python - "$STATE/test-images.json" "$image" "$release" "$CONTAINER" "$WEB_PORT" >"$file" <<'EOF'
import json, sys
images, name, release, container, port = sys.argv[1:]
image = json.load(open(images))[name]
print(json.dumps({
    "type": "deploy",
    "executor": "docker",
    "deploy": {
        "image": image["repository"],
        "digest": image["digest"],
        "config": {
            "container_name": container,
            "ports": [f"127.0.0.1:{port}:8080"],
            "release_id": release,
            "release_name": f"web {release}",
            "environment": {"GREETING": "hello from stella"},
            "health_check": {"timeout": "30s"},
        },
    },
}, indent=2))
EOF
}

deploy() {
    local image="$1" release="$2"
    write_task "$DEMO/task-$release.json" "$image" "$release"
    say "deploying $image as release $release"
    stella-agent submit "$DEMO/task-$release.json" --agent "$AGENT_ID" "${OPERATOR[@]}" \
        | tee "$DEMO/result-$release.json" || true
}

serving() {
    say "http://127.0.0.1:$WEB_PORT/ serves: $(curl -fsS "http://127.0.0.1:$WEB_PORT/" || echo '(nothing)')"
}

deploy web:v1 r1
serving
deploy web:v2 r2
serving
say "next: an image whose health check always fails; expect a failed result and a rollback to r2"
deploy broken:v1 r3-broken
serving

say "deploying the Compose stack $STACK"
python - "$STATE/test-images.json" "$STACK_PORT" "$DEMO/compose.stella.lock.yml" "$STACK" \
    >"$DEMO/task-stack.json" <<'EOF'
import json, sys
images_file, port, lock_path, stack = sys.argv[1:]
images = json.load(open(images_file))
def ref(name):
    return f"{images[name]['repository']}@{images[name]['digest']}"
lock = {"services": {
    "web": {"image": ref("web:v2"), "ports": [f"127.0.0.1:{port}:8080"],
            "depends_on": {"migrate": {"condition": "service_completed_successfully"}}},
    "worker": {"image": ref("worker:v1")},
    "migrate": {"image": ref("tools:v1"), "restart": "no",
                "command": ["sh", "-c", "echo migrated"]},
}}
with open(lock_path, "w") as handle:
    json.dump(lock, handle, indent=2)
expected = {"web": "web:v2", "worker": "worker:v1", "migrate": "tools:v1"}
print(json.dumps({
    "type": "deploy",
    "executor": "compose",
    "deploy": {
        "config": {
            "stack_name": stack,
            "release_id": "shop-1",
            "expected_digests": {s: images[i]["digest"] for s, i in expected.items()},
            "health_check": {"timeout": "60s"},
        },
        "artifacts": [{"name": "compose.stella.lock.yml", "type": "compose_lock"}],
    },
}, indent=2))
EOF
stella-agent submit "$DEMO/task-stack.json" --agent "$AGENT_ID" "${OPERATOR[@]}" \
    --artifact "compose.stella.lock.yml=$DEMO/compose.stella.lock.yml" \
    | tee "$DEMO/result-stack.json" || true
say "http://127.0.0.1:$STACK_PORT/ (the stack's web service) serves: $(curl -fsS "http://127.0.0.1:$STACK_PORT/" || echo '(nothing)')"

say "next: a deploy whose pre-deploy hook runs in a sandbox and fails; expect hook_failed and r2 untouched"
write_task "$DEMO/task-r4-hook.json" web:v1 r4-hook
python - "$DEMO/task-r4-hook.json" <<'EOF'
import json, sys
task = json.load(open(sys.argv[1]))
task["deploy"]["hooks"] = {"pre_deploy": {"timeout": "30s", "command": [
    "sh", "-c",
    "echo hook as uid $(id -u), $(grep CapEff /proc/self/status);"
    " touch /x 2>/dev/null || echo the root filesystem is read-only;"
    " echo refusing this release >&2; exit 1"]}}
json.dump(task, open(sys.argv[1], "w"), indent=2)
EOF
stella-agent submit "$DEMO/task-r4-hook.json" --agent "$AGENT_ID" "${OPERATOR[@]}" \
    | tee "$DEMO/result-r4-hook.json" || true
serving

say "reading the version sticker that the deploys wrote"
echo '{"type": "read-sticker", "executor": "docker", "read_sticker": {}}' >"$DEMO/task-sticker.json"
stella-agent submit "$DEMO/task-sticker.json" --agent "$AGENT_ID" "${OPERATOR[@]}" \
    | tee "$DEMO/result-sticker.json" || true

ok=true
grep -q '"error_type": "hook_failed"' "$DEMO/result-r4-hook.json" || ok=false
grep -q '"release_id": "r2"' "$DEMO/result-sticker.json" || ok=false
grep -q '"success": true' "$DEMO/result-stack.json" || ok=false
grep -q '"success": true' "$DEMO/result-r1.json" || ok=false
grep -q '"success": true' "$DEMO/result-r2.json" || ok=false
grep -q '"error_type": "health_check_failed"' "$DEMO/result-r3-broken.json" || ok=false
grep -q '"rolled_back": true' "$DEMO/result-r3-broken.json" || ok=false
[ "$(curl -fsS "http://127.0.0.1:$WEB_PORT/")" = v2 ] || ok=false

say "done"
echo "The container $CONTAINER still runs release r2 on http://127.0.0.1:$WEB_PORT/."
echo "The Compose project $STACK runs on http://127.0.0.1:$STACK_PORT/."
echo "Remove both with: docker rm -f $CONTAINER && docker compose -p $STACK \\"
echo "    -f $DEMO/agent-state/stacks/$STACK/compose.stella.lock.yml down"
if [ "$ok" != true ]; then
    echo "the demo did not end as expected; see $DEMO/agent.log" >&2
    exit 1
fi
echo "Every step ended as expected."
