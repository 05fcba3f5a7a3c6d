#!/usr/bin/env bash
# Bootstraps .venv for elastic-run on a fresh machine; idempotent: a second run with nothing
# changed returns in about a second (a stamp holds the hash of everything that shapes the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
CACHE=${ELASTIC_RUN_CACHE:-$HOME/.cache/elastic-run}
WHEELS=$CACHE/wheels
HOROVOD_VERSION=0.28.1
export PIP_CONSTRAINT=$ROOT/.ci/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1
log() { printf '[setup] %s\n' "$*" >&2; }

stamp_now() { cat .ci/bootstrap.sh .ci/constraints.txt setup.py | sha256sum | cut -d' ' -f1; }
if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$(stamp_now)" ] && command -v etcd >/dev/null && command -v nft >/dev/null; then
  log "environment up to date ($VENV)"; exit 0
fi
SECONDS=0

# 1. System packages: etcd (server for the etcd backend and its tests), Debian's cmake (Horovod's
#    gloo build refuses cmake 4 from PyPI), nftables and iptables (the chaos harness's partitions
#    and packet loss between network-namespace hosts).
need=()
command -v etcd >/dev/null || need+=(etcd-server)
[ -x /usr/bin/cmake ] || need+=(cmake)
command -v nft >/dev/null || need+=(nftables)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts an etcd service on install; tests start their own on free ports.
  (systemctl stop etcd || service etcd stop || pkill -x etcd) >/dev/null 2>&1 || true
fi

# 2. The venv with the frameworks (torch first, pinned to the CPU wheel).
[ -x "$PY" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
"$PY" -m pip install -q --upgrade pip wheel 'setuptools<81' 
log "installing torch, tensorflow-cpu and the runtime dependencies"
# tf-keras: Keras 2 for TensorFlow, which Horovod's Keras elastic state needs (TF_USE_LEGACY_KERAS=1).
"$PY" -m pip install -q torch==2.13.0 tensorflow-cpu==2.21.0 tf-keras==2.21.0 numpy packaging cloudpickle pyyaml psutil cffi

# 3. Horovod 0.28.1 from source with Gloo, for PyTorch and TensorFlow; the wheel is cached
#    outside the repo so a machine builds it once (~4 min on 2 cores).
if ! "$PY" -c "import horovod" 2>/dev/null; then
  whl=$(ls "$WHEELS"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ]; then
    log "building Horovod $HOROVOD_VERSION from source (once per machine, a few minutes)"
    mkdir -p "$WHEELS"
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$src" horovod==$HOROVOD_VERSION
    tar -xzf "$src"/horovod-$HOROVOD_VERSION.tar.gz -C "$src"
    tree=$src/horovod-$HOROVOD_VERSION
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$tree/CMakeLists.txt" "$tree/horovod/torch/CMakeLists.txt"
    sed -i '/xla_mpi_ops.cc/d' "$tree/horovod/tensorflow/CMakeLists.txt"
    build() {  # $1: extra env assignments
      rm -rf "$tree/build"
      env PATH="/usr/bin:$PATH" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" "$@" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS" "$tree" > "$CACHE/horovod-build.log" 2>&1
    }
    # Both halves or nothing: a PyTorch-only Horovod would leave the TensorFlow tests with
    # nothing to run, so a failed build stops the setup here.
    if ! build HOROVOD_WITH_TENSORFLOW=1; then
      log "ERROR: Horovod $HOROVOD_VERSION failed to build with TensorFlow and PyTorch"
      log "ERROR: build log: $CACHE/horovod-build.log"
      tail -n 30 "$CACHE/horovod-build.log" >&2 || true
      exit 1
    fi
    whl=$(ls "$WHEELS"/horovod-$HOROVOD_VERSION-*.whl | head -1)
  fi
  "$PY" -m pip install -q "$whl"
fi
# Whatever the wheel's origin (cached from an older setup, installed by hand), Horovod must
# carry both frameworks: importing each half loads its compiled extension. On failure the
# cached wheel and the install go, so the next `make setup` builds afresh.
if ! err=$(TF_CPP_MIN_LOG_LEVEL=3 "$PY" -c "import horovod.torch, horovod.tensorflow" 2>&1); then
  log "ERROR: the installed Horovod lacks a framework (import horovod.torch, horovod.tensorflow failed):"
  printf '%s\n' "$err" | tail -n 5 >&2
  log "ERROR: build log: $CACHE/horovod-build.log; removing the cached wheel ($WHEELS/horovod-$HOROVOD_VERSION-*.whl)"
  log "ERROR: and the installed Horovod; rerun make setup to rebuild it"
  rm -f "$WHEELS"/horovod-$HOROVOD_VERSION-*.whl
  "$PY" -m pip uninstall -q -y horovod >/dev/null 2>&1 || true
  exit 1
fi

# 4. The project itself with every extra and the test tools.
log "installing elastic-run (editable) with its extras"
"$PY" -m pip install -q -e ".[all,test,lint]"

stamp_now > "$VENV/.stamp"
log "done in ${SECONDS}s"
