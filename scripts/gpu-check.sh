#!/usr/bin/env bash
# Placement by GPU memory on a real NVIDIA GPU, on a machine without network (issue 25).
#
# It starts trioserve with two small models on one GPU whose budget fits only one of them. Each
# model is scripts/gpu-check/holder.py, which takes a CUDA context and GPU memory through the
# driver's own libcuda.so.1 (ctypes; no model file, no download) and answers /health and
# /v1/chat/completions. scripts/gpu-check/check.py then prints the placement (devices' budget,
# used and free; each model's memory, estimated and NVML-measured, and waiting_for), asks for the
# first model, keeps it busy while asking for the second, and prints the wait and the eviction
# from /admin/events. Exit 0: the two never held the GPU at once and NVML measured them.
#
#   scripts/gpu-check.sh --bundle [PIP-DOWNLOAD-OPTIONS]   on a machine with network: fill
#       scripts/gpu-check/wheels/ with trioserve's runtime dependencies as wheels, for this
#       Python and platform unless the options say others, e.g. for the GPU box's Python 3.12:
#         --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
#   scripts/gpu-check.sh                                   on the GPU machine: the check
#
# Carry the repo over with its wheels (about 30 MiB, under 64 MiB; --bundle prints the figure):
#   tar czf gpu-check.tgz $(git ls-files) scripts/gpu-check/wheels
#
# The run installs trioserve from this copy and the wheels into a venv of its own (pip
# --no-index: nothing is fetched), under a work directory that also holds the daemon's state,
# config and log.
#
# Environment:
#   PYTHON                 the interpreter (3.11+) for --bundle and for the check's venv;
#                          default python3
#   GPU_CHECK_DEVICE       the GPU, as trioserve names it (NVML's index); default cuda:0
#   GPU_CHECK_MIB          GPU memory each model allocates; default 1024
#   GPU_CHECK_CONTEXT_MIB  allowance for each process's CUDA context, added to its declared
#                          memory; default 512 (a larger context shows as a warning)
#   GPU_CHECK_BUSY         seconds the first model is kept busy; default 5
#   GPU_CHECK_DIR          work directory (kept, and its venv reused); default a new temporary
#                          one, removed after a pass
#   GPU_CHECK_LIBCUDA      the driver library to load; default libcuda.so.1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/scripts/gpu-check
WHEELS=$HERE/wheels
PYTHON=${PYTHON:-python3}
LIMIT_MIB=64

log() { printf '[gpu-check] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

mib_of() { echo $((($1 + 1048575) / 1048576)); }

# Bytes a copy of the repo holds without its wheels: the tracked files (git ls-files), or, in a
# copy without .git, everything but local caches and venvs.
repo_bytes() {
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 stat -c %s 2>/dev/null) |
            awk '{ s += $1 } END { print s + 0 }'
    else
        du -sb --exclude=.venv --exclude=.cache --exclude=.git --exclude=wheels "$ROOT" |
            cut -f1
    fi
}

bundle() {
    command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an interpreter"
    mkdir -p "$WHEELS"
    local requirements=$WHEELS/requirements.txt
    # trioserve's own runtime dependencies, read from pyproject.toml; the build backend (the
    # run installs trioserve from the copied sources); nvidia-ml-py for NVML.
    "$PYTHON" - "$ROOT/pyproject.toml" >"$requirements" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as file:
    project = tomllib.load(file)
for requirement in project["project"]["dependencies"]:
    print(requirement)
for requirement in project["build-system"]["requires"]:
    print(requirement)
print("wheel")
print("nvidia-ml-py")
EOF
    find "$WHEELS" -maxdepth 1 -name '*.whl' -delete
    log "downloading wheels for: $(paste -sd' ' "$requirements")"
    # Wheels only: an sdist would have to be built on the GPU machine, whose build
    # requirements would need the network again.
    "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$WHEELS" \
        -r "$requirements" "$@" ||
        die "pip download failed (above); a dependency without a wheel for this Python/platform?"
    local wheels_bytes repo total
    wheels_bytes=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
    repo=$(repo_bytes)
    total=$((wheels_bytes + repo))
    log "$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(mib_of "$wheels_bytes") MiB; the largest:"
    du -b "$WHEELS"/*.whl | sort -rn | head -5 |
        while read -r bytes path; do log "    $(mib_of "$bytes") MiB  $(basename "$path")"; done
    log "a copy of the repo with them: $(mib_of "$total") MiB (the repo $(mib_of "$repo") MiB; limit $LIMIT_MIB MiB)"
    if ((total > LIMIT_MIB * 1048576)); then
        die "over $LIMIT_MIB MiB"
    fi
}

run() {
    command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an interpreter"
    # The driver first: without it there is nothing to check (exit 2, the holder's message).
    log "GPUs the driver's CUDA sees:"
    "$PYTHON" "$HERE/holder.py" --probe || exit $?

    compgen -G "$WHEELS/*.whl" >/dev/null ||
        die "no wheels in $WHEELS: run scripts/gpu-check.sh --bundle on a machine with network (for this machine's Python, $("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')) and copy them along"

    local work=${GPU_CHECK_DIR:-} keep=1
    if [[ -z $work ]]; then
        work=$(mktemp -d "${TMPDIR:-/tmp}/trioserve-gpu-check.XXXXXX")
        keep=0
    fi
    mkdir -p "$work"
    work=$(cd "$work" && pwd)
    # A fresh state store: one kept from an earlier run would show its measurements as this one's.
    rm -rf "$work/state"
    local venv=$work/venv
    if [[ ! -x $venv/bin/python ]]; then
        log "creating the check's venv in $venv"
        "$PYTHON" -m venv "$venv"
    fi
    # The sources are copied: building in place would write build/ and *.egg-info into the
    # copy of the repo, which may be read-only.
    rm -rf "$work/src"
    mkdir -p "$work/src"
    cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/trioserve" "$ROOT/cli" "$work/src/"
    log "installing trioserve and its dependencies from $WHEELS (no network)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
        --find-links "$WHEELS" "$work/src" ||
        die "installing from $WHEELS failed (above): were the wheels made for this Python $("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') and platform? (--bundle --python-version X.Y --platform TAG)"

    local device=${GPU_CHECK_DEVICE:-cuda:0} mib=${GPU_CHECK_MIB:-1024}
    local context=${GPU_CHECK_CONTEXT_MIB:-512} busy=${GPU_CHECK_BUSY:-5}
    [[ $device =~ ^cuda:[0-9]+$ ]] || die "GPU_CHECK_DEVICE=$device: write cuda:N"
    local size=$((mib + context))
    local budget=$((size * 3 / 2)) # one model fits, two do not
    local port key
    port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    key=gpu-check-$("$venv/bin/python" -c 'import secrets; print(secrets.token_hex(8))')
    local config=$work/gpu-check.toml
    # JSON strings are TOML basic strings: a quote or backslash in a path stays one; braces
    # are doubled, as cmd's placeholder syntax wants.
    local holder state
    holder=$("$venv/bin/python" -c 'import json, sys; print(json.dumps(sys.argv[1].replace("{", "{{").replace("}", "}}")))' "$HERE/holder.py")
    state=$("$venv/bin/python" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$work/state")
    local model_cmd='"{python}", '$holder', "--port", "{port}", "--mib", "'$mib'"'
    cat >"$config" <<EOF
# Written by scripts/gpu-check.sh: two models of $size MiB each on $device, whose budget of
# $budget MiB fits only one.
[server]
host = "127.0.0.1"
port = $port
state_dir = $state
admin_keys = ["$key"]
admin_socket = ""
first_byte_timeout = 120

[supervisor]
max_loaded = 2
start_timeout = 60
memory = { "$device" = "$budget MiB" }
swap_after = 2

[models.gpu-a]
cmd = [$model_cmd, "--name", "gpu-a"]
memory = "$size MiB"
devices = ["$device"]
ttl = 0

[models.gpu-b]
cmd = [$model_cmd, "--name", "gpu-b"]
memory = "$size MiB"
devices = ["$device"]
ttl = 0
EOF
    log "config: $config"
    local daemon_log=$work/daemon.log
    "$venv/bin/trioserve" start --config "$config" >"$daemon_log" 2>&1 &
    local daemon=$!
    # shellcheck disable=SC2064 # the values are meant to be fixed now
    trap "kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null" EXIT
    "$venv/bin/python" - "$port" "$daemon" <<'EOF' || { tail -n 30 "$daemon_log" >&2; die "trioserve did not answer /health within 30 s (log above: $daemon_log)"; }
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
    local verdict=0
    "$venv/bin/python" "$HERE/check.py" --url "http://127.0.0.1:$port" --key "$key" \
        --device "$device" --mib "$mib" --busy "$busy" gpu-a gpu-b || verdict=$?
    if command -v nvidia-smi >/dev/null; then
        echo
        echo "== nvidia-smi's view of the GPU's processes now (compare with 'measured' above)"
        nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv || true
    fi
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    trap - EXIT
    if ((verdict != 0)); then
        log "the daemon's log: $daemon_log (kept, with the config and state, in $work)"
        exit "$verdict"
    fi
    if ((keep == 0)); then
        rm -rf "$work"
    fi
}

case "${1:-}" in
--bundle)
    shift
    bundle "$@"
    ;;
"") run ;;
-h | --help) usage ;;
*)
    usage >&2
    die "unknown argument: $1"
    ;;
esac
