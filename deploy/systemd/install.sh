#!/bin/sh
# Install the FlowForge systemd units, their sandbox drop-in and an environment file.
#   deploy/systemd/install.sh [--prefix DIR] [--root DIR]
# --prefix: the virtualenv holding flowforge-orchestrator (default /opt/flowforge);
# --root: install under DIR instead of / (packaging, tests).
set -eu

prefix=/opt/flowforge
root=
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        -h | --help) sed -n '2,5s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
if [ ! -x "$prefix/bin/flowforge-orchestrator" ]; then
    echo "install.sh: no $prefix/bin/flowforge-orchestrator; install the package first:" >&2
    echo "  python3 -m venv $prefix && $prefix/bin/pip install flowforge-orchestrator" >&2
    exit 1
fi

units=$root/etc/systemd/system
for unit in flowforge-orchestrator.service flowforge-worker@.service; do
    install -d -m 0755 "$units/$unit.d"
    sed "s|/opt/flowforge/bin/|$prefix/bin/|g" "$here/$unit" >"$units/$unit"
    chmod 0644 "$units/$unit"
    install -m 0644 "$here/hardening.conf" "$units/$unit.d/10-hardening.conf"
done

# Root-only: systemd reads these before dropping privileges; they hold credentials.
install -d -m 0700 "$root/etc/flowforge" "$root/etc/flowforge/workers"
if [ ! -e "$root/etc/flowforge/flowforge.env" ]; then
    install -m 0600 "$here/flowforge.env.example" "$root/etc/flowforge/flowforge.env"
fi

echo "installed into $units. Next:"
echo "  edit /etc/flowforge/flowforge.env (database and Redis URLs)"
echo "  systemctl daemon-reload"
echo "  systemctl enable --now flowforge-orchestrator.service flowforge-worker@1.service"
