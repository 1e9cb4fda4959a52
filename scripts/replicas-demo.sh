#!/usr/bin/env bash
# Two Central replicas sharing one PostgreSQL database, end to end: a local
# throwaway PostgreSQL (needs its server binaries: apt-get install
# postgresql, or PG_BIN), a token made in the database, a support package
# uploaded through replica A and found there by B, and Collectors served the
# same bytes by either replica. Leaves everything in $DEMO_DIR (a fresh
# temporary directory by default) and stops the servers on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

echo "== building"
build_bins
WORK=${DEMO_DIR:-$(mktemp -d)}
mkdir -p "$WORK"
# Run as root, PostgreSQL runs as user postgres, which must reach its
# directory below this one (mktemp makes it private).
chmod 755 "$WORK"
trap 'kill $(jobs -p) 2>/dev/null; [ -n "${PG_STOP:-}" ] && "${PG_STOP[@]}" >/dev/null 2>&1; wait 2>/dev/null || true' EXIT

echo "== a local PostgreSQL in $WORK/pg"
start_postgres "$WORK/pg"
echo "database: $PG_URL"

echo "== certificates in $WORK/pki; an admin token, kept in the database"
# A rerun in the same DEMO_DIR keeps the CA (pki init refuses to replace it).
[ -f "$WORK/pki/ca.pem" ] || "$BIN/central-probes" pki init --out "$WORK/pki"
export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --database-url "$PG_URL" --role admin --name demo-admin 2>/dev/null)

echo "== replicas A and B, each with its own data directory for local copies"
start_central "$WORK/a" "$WORK/pki" --database-url "$PG_URL"
A=$CENTRAL_ADDR
start_central "$WORK/b" "$WORK/pki" --database-url "$PG_URL"
B=$CENTRAL_ADDR
echo "A on $A, B on $B"

kernel_list "$WORK/kernels.txt"
kernel() { sed -n "${1}p" "$WORK/kernels.txt"; }
echo "== a support package for kernels 1-30, uploaded through A"
"$BIN/make-package" --out "$WORK/pkg.zip" --kernels "$WORK/kernels.txt" --limit 30 --kernel-modules
"$BIN/central-probes" upload "$WORK/pkg.zip" -e "$A" --ca "$WORK/pki/ca.pem"
echo "== and again through B: B finds every file there"
"$BIN/central-probes" upload "$WORK/pkg.zip" -e "$B" --ca "$WORK/pki/ca.pem"

collector() {
  echo "== a Collector on kernel $1, served by replica $2"
  collector_get_probe "$1" "$3" "$WORK/probe-$2.o"
}
collector "$(kernel 12)" B "$B"
collector "$(kernel 12)" A "$A"
cmp "$WORK/probe-A.o" "$WORK/probe-B.o" && echo "A and B served the same bytes"
echo "== the listing, through B"
"$BIN/central-probes" ls -e "$B" --ca "$WORK/pki/ca.pem" | head -n 4
echo "== demo finished; files in $WORK"
