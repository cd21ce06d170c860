#!/bin/sh
# Debian packages the server-backed tests need (PostgreSQL, Slurm). Skips quietly when not root or
# when apt is unavailable: those tests then skip themselves.
set -e
need=""
command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need="$need postgresql"
command -v slurmctld >/dev/null 2>&1 || need="$need munge slurmctld slurmd slurm-client"
# Slurm accounting (sacct, accounts, GPU TRES per job) for tests/services/slurm.py
[ -x /usr/sbin/slurmdbd ] || command -v slurmdbd >/dev/null 2>&1 || need="$need slurmdbd"
[ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1 || need="$need mariadb-server"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: not root or no apt-get; tests needing:$need will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq --no-install-recommends $need >/dev/null || echo "install.sh: apt-get failed for:$need; those tests will skip" >&2
