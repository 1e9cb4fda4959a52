# Shared by demo.sh, python-check.sh and bench/upload.sh: where the binaries
# are, and starting a Central on a free loopback port.

# BIN: the directory holding central-probes, make-package, collector-client.
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/debug}

# build_bins [CARGO FLAG...]: builds every binary the scripts run, in one
# cargo invocation: the packages named with -p and the feature by its own
# name (`--features central-probes/testing` does not satisfy make-package's
# `required-features = ["testing"]`: cargo 1.95 silently leaves the bin out).
build_bins() {
  cargo build --quiet -p central-probes -p collector-client --features testing --bins "$@"
}

# Kernel releases for synthetic packages: 8,128 real release strings (public
# names, as a support package of the product covers them), kept in the
# repository so that every clone builds the same realistic packages.
kernel_list() {
  cp tests/data/kernel-versions.txt "$1"
}

# start_central DATA_DIR PKI_DIR [serve flags...]
# Starts Central on 127.0.0.1:0 and sets CENTRAL_PID and CENTRAL_ADDR.
start_central() {
    local data=$1 pki=$2
  shift 2
  : >"$data.log"

  "$BIN/central-probes" serve --listen 127.0.0.1:0 --data-dir "$data" \
    --tls-cert "$pki/server.pem" --tls-key "$pki/server-key.pem" --client-ca "$pki/ca.pem" "$@" \
    >"$data.log" 2>&1 &
  CENTRAL_PID=$!
  CENTRAL_ADDR=
  for _ in $(seq 1 200); do
    CENTRAL_ADDR=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$data.log" | head -n 1)
    [ -n "$CENTRAL_ADDR" ] && return 0
    kill -0 "$CENTRAL_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "Central did not start; its log:" >&2
  cat "$data.log" >&2
  return 1
}

# start_postgres DIR: a throwaway PostgreSQL cluster in DIR on a free
# loopback port (fsync on: durable commits, as in production); sets PG_URL
# to its database "probes" and PG_DIR. As root, it runs as user postgres.
start_postgres() {
  local dir=$1 bin
  bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
  [ -x "$bin/initdb" ] || { echo "PostgreSQL's server binaries are needed (apt-get install postgresql, or PG_BIN)" >&2; return 1; }
  local as=()
  [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  rm -rf "$dir"; mkdir -p "$dir"; chmod 777 "$dir"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${as[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
  "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir/data -c listen_addresses=127.0.0.1 -c shared_buffers=256MB" start >/dev/null
  "${as[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres probes
  PG_DIR=$dir
  PG_URL="postgres://postgres@127.0.0.1:$port/probes"
  PG_STOP=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop)
}

# collector_get_probe KERNEL CENTRAL_ADDR OUT [FLAG...]: collector-client as
# the demos run it: the eBPF probe of module version 2.5.0 for KERNEL from
# Central, with the Collector identity of the demo PKI in $WORK/pki, written
# to OUT (decompressed), giving up after $RETRY_BUDGET (default 10s).
collector_get_probe() {
  local kernel=$1 central=$2 out=$3
  shift 3
  RUST_LOG=warn "$BIN/collector-client" get-probe --collection-method ebpf --module-version 2.5.0 --kernel "$kernel" \
    --central "$central" --ca "$WORK/pki/ca.pem" --cert "$WORK/pki/collector.pem" --key "$WORK/pki/collector-key.pem" \
    --out "$out" --retry-budget "${RETRY_BUDGET:-10s}" "$@"
}

# Benchmark arithmetic: seconds between two `now`s, MB/s of bytes over
# seconds, the ratio a / b, and a process's CPU seconds and peak RSS (MiB).
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
cpu_of() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }
hwm_mib() { awk '/VmHWM/ { printf "%d", $2 / 1024 }' "/proc/$1/status"; }
