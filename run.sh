#!/bin/sh
# Install pciguard from this checkout, then run it or its tests.
#
#   sh run.sh audit [OPTIONS]   install, then `pciguard audit` this host
#   sh run.sh test [PYTEST ARGS] install with the test tools, then the whole suite
#
# It installs into the virtual environment that is active, or else into .venv here,
# which it makes with the python3 on PATH (Debian's, pyenv's or any other, 3.11 or
# newer): Debian's own python3 refuses `pip install` outside a venv.
# As root, `test` also installs the Debian packages the tests use (pciutils, pci.ids,
# Graphviz, libudev1; the real-kernel lab adds QEMU and busybox-static and downloads a
# Debian kernel, which it unpacks under ~/.cache/pciguard-lab and never installs).
set -eu
cd "$(dirname "$0")"

job=${1:-}
case $job in
    audit | test) shift ;;
    *)
        echo "usage: sh run.sh audit [OPTIONS] | sh run.sh test [PYTEST ARGS]" >&2
        exit 2
        ;;
esac

as_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "$@" >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "run.sh: pciguard needs Python 3.11 or newer; '$python' is $("$python" --version 2>&1 || echo missing)" >&2
    exit 2
fi

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    venv=$VIRTUAL_ENV
else
    venv=$(pwd)/.venv
    if [ ! -x "$venv/bin/python" ]; then
        if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            if as_root && command -v apt-get >/dev/null; then
                echo "== installing python3-venv (Debian's python3 keeps venv apart) =="
                apt_install python3-venv
                "$python" -m venv "$venv"
            else
                echo "run.sh: '$python -m venv' failed; on Debian install python3-venv (as root), or activate a venv first" >&2
                exit 2
            fi
        fi
    fi
fi

if [ "$job" = audit ]; then
    # The audit needs no verifier: no compiling it (see setup.py).
    PCIGUARD_COMPILE=0 "$venv/bin/python" -m pip install -q --disable-pip-version-check -e .
    exec "$venv/bin/python" -m pciguard audit "$@"
fi

if as_root && command -v apt-get >/dev/null; then
    if ! command -v lspci >/dev/null || ! command -v dot >/dev/null || ! ldconfig -p | grep -q 'libudev.so.1 '; then
        echo "== installing the Debian packages the tests use: pciutils, pci.ids, graphviz, libudev1 =="
        apt_install pciutils pci.ids graphviz libudev1
    fi
    # The install compiles the verifier (setup.py): a C compiler and this Python's headers.
    if ! command -v cc >/dev/null || ! "$venv/bin/python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        echo "== installing what compiling the verifier needs: gcc, python3-dev =="
        apt_install gcc python3-dev
    fi
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
exec "$venv/bin/python" -m pytest "$@"
