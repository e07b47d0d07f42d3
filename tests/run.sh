#!/usr/bin/env bash
# Installs what the test suites need (Debian packages) and runs every check and test.
# Usage: tests/run.sh            (as root, or with sudo available)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(skopeo docker-registry containerd runc umoci openssl wrk busybox-static python3
  etcd-server containernetworking-plugins iptables iproute2 util-linux xz-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Debian starts containerd and docker-registry as services on install; the tests run their
  # own instances on their own sockets and ports, so keep the installs from starting anything
  # (policy-rc.d answers 101, "action forbidden", to invoke-rc.d and deb-systemd-invoke). A
  # policy-rc.d the machine already has is left alone, and nothing already running is touched.
  policy=/usr/sbin/policy-rc.d
  own_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    own_policy=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { [ -z "$own_policy" ] || $sudo rm -f "$policy"; exit 1; }
  [ -z "$own_policy" ] || $sudo rm -f "$policy"
fi

# The Helm chart is linted through the real Helm library (helm-sdkpy embeds it). Pinned: the
# committed manifests/ are Helm's output, which another Helm version may order differently.
helm_sdkpy="helm-sdkpy==0.1.32"
if ! python3 -c "import helm_sdkpy, yaml; assert helm_sdkpy.__version__ == '${helm_sdkpy#*==}'" 2>/dev/null; then
  echo "==> pip install $helm_sdkpy pyyaml"
  # (A distribution's own python3 refuses user installs without --break-system-packages.)
  python3 -m pip install -q --ignore-requires-python "$helm_sdkpy" pyyaml \
    || python3 -m pip install -q --break-system-packages --ignore-requires-python "$helm_sdkpy" pyyaml
fi

# The object-storage backend is tested against real emulators on loopback (started and stopped
# by the tests): Azurite, Microsoft's Azure Blob emulator, from npm, and moto's S3 server from
# PyPI. Pinned, installed once into a cache outside the work tree.
export OUTPOST_EMULATORS="${OUTPOST_EMULATORS:-$HOME/.cache/outpost-emulators}"
azurite="azurite@3.37.0"
if [ "$(cat "$OUTPOST_EMULATORS/azurite/.pinned" 2>/dev/null)" != "$azurite" ]; then
  echo "==> npm install $azurite"
  npm install -q --prefix "$OUTPOST_EMULATORS/azurite" --no-audit --no-fund "$azurite" >/dev/null
  echo "$azurite" >"$OUTPOST_EMULATORS/azurite/.pinned"
fi
moto="moto[server]==5.2.5"
if [ "$(cat "$OUTPOST_EMULATORS/moto/.pinned" 2>/dev/null)" != "$moto" ]; then
  echo "==> pip install $moto (venv)"
  python3 -m venv "$OUTPOST_EMULATORS/moto"
  "$OUTPOST_EMULATORS/moto/bin/python" -m pip install -q "$moto"
  echo "$moto" >"$OUTPOST_EMULATORS/moto/.pinned"
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> build"
cargo build --workspace --bins --locked
echo "==> tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole workspace (cargo prints one per test binary, the last of which
# is often a doc-test run with nothing in it).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
