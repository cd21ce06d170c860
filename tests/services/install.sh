#!/bin/sh
# Debian packages the server-backed tests need (PostgreSQL, Slurm). When they cannot be installed (not
# root, no apt-get, apt-get fails): locally a note and exit 0, and those tests skip with the reason;
# under CI (CI=true) exit 1, since CI must not go green having skipped them (conftest.service_unavailable
# fails them there too).
set -e
case "$(printf %s "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
    true|1|yes) ci=1 ;;
    *) ci=0 ;;
esac

# cannot_install MESSAGE: the end of this script when the packages cannot be had
cannot_install() {
    if [ "$ci" = 1 ]; then
        echo "install.sh: $1; CI is set, so this is an error (the tests needing them would only skip)" >&2
        exit 1
    fi
    echo "install.sh: $1; the tests needing them will skip" >&2
    exit 0
}

missing() {
    need=""
    command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need="$need postgresql"
    command -v slurmctld >/dev/null 2>&1 || need="$need munge slurmctld slurmd slurm-client"
    # Slurm accounting (sacct, accounts, GPU TRES per job) for tests/services/slurm.py
    [ -x /usr/sbin/slurmdbd ] || command -v slurmdbd >/dev/null 2>&1 || need="$need slurmdbd"
    [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1 || need="$need mariadb-server"
    echo "$need"
}

need=$(missing)
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    cannot_install "not root or no apt-get for:$need"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || echo "install.sh: apt-get update failed; trying the install anyway" >&2
# shellcheck disable=SC2086  # $need is a list of package names
apt-get install -y -qq --no-install-recommends $need >/dev/null || cannot_install "apt-get install failed for:$need"
still=$(missing)
[ -z "$still" ] || cannot_install "installed, but still missing:$still"
