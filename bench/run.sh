#!/usr/bin/env bash
# The benchmark suite, one command (not part of CI): bench/run.sh
#
# Measures, in one run on this machine, side by side:
#   1. upload: central-probes upload vs sha256sum (one core and all cores)
#      + cp + sync of the same package (the local floor) vs nginx receiving it
#      over HTTPS with mutual TLS (curl -T); then the re-upload of the
#      unchanged package; then per-file fsync against group commit;
#   2. serving: Central's GetProbe and its HTTPS route /kernel-objects/ vs
#      nginx serving the same files over HTTP/2, all over mutual TLS,
#      driven by one harness (probe-bench) at
#      concurrency 1, 16, 64, 256, long-lived and new-per-request connections,
#      over all probes and over a hot set of 16 (a cluster's few kernels);
#   2b. export: central-probes export of the whole store vs GetProbe of the
#      same probes one by one, with the exporter's peak RSS;
#   3. fan-out: 1,000 concurrent GetProbe calls for a probe only the upstream has;
#   4. scale: a store of 100,000 probes: start-up time and RSS,
#      GetExistingProbes for 16,000 names, a ListProbes page;
#   5. Collector start: collector-client get-probe served by Central;
#   6. replicas on PostgreSQL: the same upload and GetProbe load against a
#      Central keeping probes in a local PostgreSQL 15 (fsync on), beside
#      the filesystem store's figures of sections 1 and 2; pgbench on the
#      same rows; start-up and queries with 100,000 probes in the database;
#   7. signed probes (bench/signed.sh): GetProbe of signed against unsigned
#      probes, and the Collector's CPU per signature check;
#   8. the pack store against the per-file store (bench/packs.sh): upload,
#      re-upload, start-up, GetProbe at 1-256 clients, export;
#   9. coverage of 8,128 kernels before a rollout (bench/coverage.sh);
#   10. support packages through an OCI registry (bench/oci.sh): push
#      against skopeo copy and curl, pull, cold GetProbe via the registry.
# bench/compare.sh (not run here) sets two builds of Central side by side.
# Sections 1-6 run Central with its default store, the pack store.
# Results: bench/work/results.md; section 2's rows also go to
# bench/work/serving.tsv, which bench/plot.py draws as bench/serving.svg.
# Settings: SECONDS_PER_RUN (default 5),
# SCALE_PROBES (default 100000).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BIN=${CARGO_TARGET_DIR:-target}/release
WORK=$(pwd)/bench/work
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
SCALE_PROBES=${SCALE_PROBES:-100000}
mkdir -p "$WORK"
RESULTS="$WORK/results.md"
SERVING_TSV="$WORK/serving.tsv"

ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_install=1
for tool in nginx curl /usr/bin/time; do
  command -v "$tool" >/dev/null || need_install=1
done
if [ -n "${need_install:-}" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx curl time postgresql >/dev/null
fi
cargo build --release --quiet -p central-probes -p collector-client -p probe-bench --features testing

cleanup() {
  # Every server this script started, also one whose start failed midway.
  kill $(jobs -p) 2>/dev/null || true
  [ -f "$WORK/nginx/nginx.pid" ] && kill "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null || true
  [ -n "${PG_STOP:-}" ] && "${PG_STOP[@]}" >/dev/null 2>&1 || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

PACKAGE="$WORK/support-pkg-2.5.0-bench.zip"
if [ ! -f "$PACKAGE" ]; then
  kernel_list "$WORK/kernels.txt"
  "$BIN/make-package" --out "$PACKAGE" --kernels "$WORK/kernels.txt" --kernel-modules
fi
SIZE=$(stat -c %s "$PACKAGE")
rm -rf "$WORK"/{pki,data,roxctl-data,nginx,upstream,middle,scale,copy.zip,files} "$WORK"/*.log
# ext4 without a journal (as on the machines this runs on) skips every inode
# freed in the last 60 s when it allocates a new one, checking each: the
# upload, which creates 16,256 files, would pay for the tens of thousands
# this line just removed, a large part of the upload's time. The upload
# below starts when that minute is over.
sync; removed_at=$(date +%s)
"$BIN/central-probes" pki init --out "$WORK/pki" >/dev/null
PKI=$WORK/pki
TLS=(--ca "$PKI/ca.pem" --cert "$PKI/collector.pem" --key "$PKI/collector-key.pem")

# Steal time (the hypervisor running others on this machine's cores),
# summed over the cores, per section: the figures of a section with much of
# it are the least trustworthy. section NAME starts a section.
steal_cs() { awk 'NR == 1 { print $9 }' /proc/stat; }
SECTIONS="$WORK/sections.txt"
: >"$SECTIONS"
section() {
  echo "== $1"
  echo "$(date +%s.%N) $(steal_cs) $1" >>"$SECTIONS"
}

RUN_DATE=$(date -u +%Y-%m-%dT%H:%MZ)
{
  echo "# Benchmark results"
  echo
  echo "$RUN_DATE, $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576}' /proc/meminfo),"
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), SHA-NI: $(grep -qw sha_ni /proc/cpuinfo && echo yes || echo no),"
  echo "package $((SIZE / 1048576)) MiB with 16,256 probes; ${SECONDS_PER_RUN} s per serving run."
} >"$RESULTS"

# ---------------------------------------------------------------- 1. upload
section "1. upload"
sha256sum "$PACKAGE" >/dev/null
t0=$(now); sha256sum "$PACKAGE" >/dev/null; sha_s=$(secs "$t0" "$(now)")
# SHA-256 on every core: each core hashes its share of the file.
share=$(( (SIZE + $(nproc) - 1) / $(nproc) / 1048576 + 1 ))
t0=$(now)
for i in $(seq 0 $(($(nproc) - 1))); do
  dd if="$PACKAGE" bs=1M skip=$((i * share)) count="$share" status=none | sha256sum >/dev/null &
done
wait
sha_all_s=$(secs "$t0" "$(now)")
sync; t0=$(now); cp "$PACKAGE" "$WORK/copy.zip" && sync; cp_s=$(secs "$t0" "$(now)"); rm -f "$WORK/copy.zip"; sync

export ROX_API_TOKEN
ROX_API_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role admin --name bench 2>/dev/null)
start_central "$WORK/data" "$PKI" --metrics-listen 127.0.0.1:0
MAIN_PID=$CENTRAL_PID; MAIN_ADDR=$CENTRAL_ADDR
sleep $((removed_at + 61 - $(date +%s))) 2>/dev/null || true
c0=$(cpu_of "$MAIN_PID")
/usr/bin/time -f "%e %M %U %S" -o "$WORK/time.txt" "$BIN/central-probes" upload "$PACKAGE" -e "$MAIN_ADDR" \
  --ca "$PKI/ca.pem" >"$WORK/upload.out" 2>"$WORK/upload.err"
read -r up_s up_rss up_u up_s2 <"$WORK/time.txt"
central_cpu=$(secs "$c0" "$(cpu_of "$MAIN_PID")"); central_rss=$(hwm_mib "$MAIN_PID")
/usr/bin/time -f "%e %M" -o "$WORK/time2.txt" "$BIN/central-probes" upload "$PACKAGE" -e "$MAIN_ADDR" \
  --ca "$PKI/ca.pem" >"$WORK/reupload.out" 2>"$WORK/reupload.err"
read -r re_s re_rss <"$WORK/time2.txt"
grep -q "Nothing to do" "$WORK/reupload.out" && re_bytes=0 || re_bytes="see $WORK/reupload.out"
re_read=$(sed -n 's/^Read \([0-9]*\) bytes of the package\./\1/p' "$WORK/reupload.err")
# The product's unmodified roxctl, as probe-bench roxctl-upload speaks its
# wire protocol (GetExistingProbes of v1, then POST
# /api/extensions/probeupload), into a second fresh Central.
rx_token=$("$BIN/central-probes" token create --data-dir "$WORK/roxctl-data" --role admin --name bench 2>/dev/null)
start_central "$WORK/roxctl-data" "$PKI"
RX_PID=$CENTRAL_PID
c0=$(cpu_of "$RX_PID")
/usr/bin/time -f "%e %M %U %S" -o "$WORK/time-roxctl.txt" "$BIN/probe-bench" roxctl-upload --package "$PACKAGE" \
  --address "$CENTRAL_ADDR" --ca "$PKI/ca.pem" --token "$rx_token" >"$WORK/roxctl.out"
read -r rx_s rx_rss rx_u rx_s2 <"$WORK/time-roxctl.txt"
rx_cpu=$(secs "$c0" "$(cpu_of "$RX_PID")"); rx_central_rss=$(hwm_mib "$RX_PID")
kill "$RX_PID"
durability=$("$BIN/probe-bench" durability --dir "$WORK" --files 2000 --size 130000 --group 64)

# nginx: static files for serving, WebDAV PUT for the upload, mutual TLS, HTTP/2.
mkdir -p "$WORK/nginx"/{body,upload,tmp}
NGINX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/probe-bench" extract --package "$PACKAGE" --out "$WORK/files" >/dev/null
cat >"$WORK/nginx/nginx.conf" <<CONF
user root;
worker_processes $(nproc);
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/tmp; fastcgi_temp_path $WORK/nginx/tmp;
  uwsgi_temp_path $WORK/nginx/tmp; scgi_temp_path $WORK/nginx/tmp;
  server {
    listen 127.0.0.1:$NGINX_PORT ssl http2;
    ssl_certificate $PKI/server.pem;
    ssl_certificate_key $PKI/server-key.pem;
    ssl_client_certificate $PKI/ca.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    location /upload/ {
      root $WORK/nginx;
      dav_methods PUT;
      client_max_body_size 0;
    }
    location / { root $WORK/files; }
  }
}
CONF
nginx -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log"
sleep 0.5
NGINX_WORKERS=$(pgrep -P "$(cat "$WORK/nginx/nginx.pid")" | tr '\n' ' ')
nginx_cpu() { local t=0; for w in $NGINX_WORKERS; do t=$(awk -v a="$t" -v b="$(cpu_of "$w")" 'BEGIN { print a + b }'); done; echo "$t"; }
# The extraction above left 2 GB to write back: written before nginx's
# PUT, as before Central's upload: with dirty pages left, nginx's PUT
# paid for writing them back and looked slower than it is.
sync
n0=0; for w in $NGINX_WORKERS; do n0=$(awk -v a="$n0" -v b="$(cpu_of "$w")" 'BEGIN { print a + b }'); done
/usr/bin/time -f "%e %M %U %S" -o "$WORK/time3.txt" curl -sS --fail -T "$PACKAGE" "${TLS[@]/#--ca/--cacert}" \
  "https://127.0.0.1:$NGINX_PORT/upload/pkg.zip" -o /dev/null
read -r ng_s curl_rss curl_u curl_s <"$WORK/time3.txt"
n1=0; nginx_rss=0
for w in $NGINX_WORKERS; do
  n1=$(awk -v a="$n1" -v b="$(cpu_of "$w")" 'BEGIN { print a + b }')
  nginx_rss=$((nginx_rss + $(hwm_mib "$w")))
done
nginx_cpu=$(secs "$n0" "$n1")
cmp -s "$PACKAGE" "$WORK/nginx/upload/pkg.zip" || echo "warning: nginx stored a different file" >&2

# The floor of the receive path: probe-bench sink, on Central's TLS and
# HTTP/2 stack, reads the same curl -T and drops it (then hashes it too),
# storing nothing. Central cannot spend less CPU per byte than this.
# sink_run NAME [--sha256]: sets NAME_s, NAME_cpu and NAME_curl_cpu.
sink_run() {
  local name=$1 out="$WORK/sink-$1.out" pid addr t0 c0 s u sy
  shift
  "$BIN/probe-bench" sink --cert "$PKI/server.pem" --key "$PKI/server-key.pem" "$@" >"$out" &
  pid=$!
  for _ in $(seq 100); do addr=$(sed -n 's/^listening on //p' "$out"); [ -n "$addr" ] && break; sleep 0.05; done
  sync
  c0=$(cpu_of "$pid"); t0=$(now)
  /usr/bin/time -f "%U %S" -o "$WORK/time-sink.txt" curl -sS --fail -T "$PACKAGE" "${TLS[@]/#--ca/--cacert}" \
    "https://$addr/sink" -o /dev/null
  s=$(secs "$t0" "$(now)")
  printf -v "${name}_cpu" %s "$(secs "$c0" "$(cpu_of "$pid")")"
  printf -v "${name}_s" %s "$s"
  read -r u sy <"$WORK/time-sink.txt"
  printf -v "${name}_curl_cpu" %s "$(awk -v a="$u" -v b="$sy" 'BEGIN{print a+b}')"
  grep -q "^$SIZE .* HTTP/2.0\$" "$out" || echo "warning: the sink did not read the package over HTTP/2: $(tail -1 "$out")" >&2
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
sink_run sink
sink_run sinksha --sha256

{
  echo
  echo "## 1. Upload of the package"
  echo
  echo "| run | seconds | MB/s | vs nginx | vs cp + sync | peak RSS server / client (MiB) | CPU s server / client |"
  echo "|---|---|---|---|---|---|---|"
  echo "| sha256sum (local, one core) | $sha_s | $(mbps "$SIZE" "$sha_s") | | | | |"
  echo "| sha256sum (local, $(nproc) cores, a share each) | $sha_all_s | $(mbps "$SIZE" "$sha_all_s") | | | | |"
  echo "| cp + sync (local floor) | $cp_s | $(mbps "$SIZE" "$cp_s") | | 1.00x | | |"
  echo "| nginx PUT over HTTPS mTLS (curl -T), no fsync | $ng_s | $(mbps "$SIZE" "$ng_s") | 1.00x | $(ratio "$cp_s" "$ng_s") | $nginx_rss / $((curl_rss / 1024)) | $nginx_cpu / $(awk -v a="$curl_u" -v b="$curl_s" 'BEGIN{print a+b}') |"
  echo "| receive floor: probe-bench sink (Central's TLS + HTTP/2 stack) reads the same curl -T, stores nothing | $sink_s | $(mbps "$SIZE" "$sink_s") | $(ratio "$ng_s" "$sink_s") | $(ratio "$cp_s" "$sink_s") | | $sink_cpu / $sink_curl_cpu |"
  echo "| receive floor + SHA-256: the same sink hashing every byte | $sinksha_s | $(mbps "$SIZE" "$sinksha_s") | $(ratio "$ng_s" "$sinksha_s") | $(ratio "$cp_s" "$sinksha_s") | | $sinksha_cpu / $sinksha_curl_cpu |"
  echo "| central-probes upload, every probe verified and fsync'd | $up_s | $(mbps "$SIZE" "$up_s") | $(ratio "$ng_s" "$up_s") | $(ratio "$cp_s" "$up_s") | $central_rss / $((up_rss / 1024)) | $central_cpu / $(awk -v a="$up_u" -v b="$up_s2" 'BEGIN{print a+b}') |"
  echo "| re-upload, unchanged package | $re_s | | | | - / $((re_rss / 1024)) | |"
  echo "| roxctl's wire protocol (probe-bench roxctl-upload) to /api/extensions/probeupload, every probe verified and fsync'd | $rx_s | $(mbps "$SIZE" "$rx_s") | $(ratio "$ng_s" "$rx_s") | $(ratio "$cp_s" "$rx_s") | $rx_central_rss / $((rx_rss / 1024)) | $rx_cpu / $(awk -v a="$rx_u" -v b="$rx_s2" 'BEGIN{print a+b}') |"
  echo
  echo "Re-upload: probe bytes sent: $re_bytes; package bytes read: $re_read of $SIZE; time $(awk -v a="$re_s" -v b="$up_s" 'BEGIN { printf "%.3f", a / b }') of the first upload."
  echo "First upload vs SHA-256 on all cores: $(ratio "$sha_all_s" "$up_s")."
  echo "roxctl's upload through the product route vs central-probes upload: $(ratio "$up_s" "$rx_s") of its rate."
  per_gb() { awk -v c="$1" -v b="$SIZE" 'BEGIN { printf "%.2f", c / (b / 1e9) }'; }
  echo "CPU seconds per GB of package in the first upload: uploader $(per_gb "$(awk -v a="$up_u" -v b="$up_s2" 'BEGIN{print a+b}')"), Central $(per_gb "$central_cpu"), nginx $(per_gb "$nginx_cpu")."
  echo "CPU seconds per GB to receive the package: the sink $(per_gb "$sink_cpu"), the sink with SHA-256 $(per_gb "$sinksha_cpu") (the floor of Central's $(per_gb "$central_cpu"): Central spends $(awk -v a="$central_cpu" -v b="$sinksha_cpu" 'BEGIN { printf "%.2f", a / b }')x of it)."
  echo
  echo "Durable commits of 2,000 files of 130 KB into one directory (probe-bench durability):"
  echo
  echo '```'
  echo "$durability"
  echo '```'
} >>"$RESULTS"

# --------------------------------------------------------------- 2. serving
section "2. serving"
(cd "$WORK/files" && find . -type f | sed "s|^\./||" | sort) >"$WORK/paths.txt"
{
  echo
  echo "## 2. Serving the probes (random picks over $(wc -l <"$WORK/paths.txt") files, mutual TLS)"
  echo
  echo "Central answers GetProbe (gRPC) and GET /kernel-objects/<module>/<file> (its HTTPS route, HTTP/2), nginx GET of"
  echo "the same files; one harness (probe-bench) drives all three. GetProbe is asked through tonic (G) and as plain"
  echo "HTTP/2 requests (P: h2 itself, the request's HEADERS and DATA in one write but in ~1% of calls; hyper's client, under tonic,"
  echo "writes the DATA in a second flush in about a quarter of one-client calls), decoding no protobuf. Both servers"
  echo "have read every probe once before; rows at one client are the medians of four runs of each, in the orders"
  echo "G P route nginx, nginx route P G, P G nginx route and route nginx G P (every run, with the steal during it,"
  echo "is in bench/work/serve-runs.txt)."
  echo
  echo "| connections | concurrency | GetProbe req/s G / P | route req/s | nginx req/s | GetProbe / nginx G / P | route / nginx | GetProbe MB/s | nginx MB/s | GetProbe p50 / p99 ms G / P | route p50 / p99 ms | nginx p50 / p99 ms | server CPU µs/request G / P / r / n | errors G / P / r / n |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
} >>"$RESULTS"
sed 's|^|kernel-objects/|' "$WORK/paths.txt" >"$WORK/route-paths.txt"
: >"$WORK/serve-runs.txt"
printf 'workload\tserver\tclients\trequests_per_s\tp99_ms\n' >"$SERVING_TSV"
# A cluster's nodes run a handful of kernels: 16 probes take every request.
shuf -n 16 --random-source=<(yes) "$WORK/paths.txt" >"$WORK/hot-paths.txt"
sed 's|^|kernel-objects/|' "$WORK/hot-paths.txt" >"$WORK/hot-route-paths.txt"
# The uploads above left gigabytes to write back: done before measuring,
# not during the first rows. Then every probe is read once from each
# server, so that both serve from the page cache (the pack store writes
# past it; nginx's files were just extracted through it).
sync
"$BIN/probe-bench" load --protocol grpc-plain --address "$MAIN_ADDR" "${TLS[@]}" --paths "$WORK/paths.txt" \
  --concurrency 16 --seconds 1 --each-once >/dev/null 2>>"$WORK/load.err"
"$BIN/probe-bench" load --protocol https --address "127.0.0.1:$NGINX_PORT" "${TLS[@]}" --paths "$WORK/paths.txt" \
  --concurrency 16 --seconds 1 --each-once >/dev/null 2>>"$WORK/load.err"
# serve_once WHICH CONCURRENCY PATHS ROUTE_PATHS [FLAGS...]: one run of G
# (g), P (p), the route (r) or nginx (h); prints probe-bench's "req/s MB/s
# p50 p99 errors" and the server's CPU seconds, and appends the same with
# the row and the steal during the run to serve-runs.txt.
serve_once() {
  local which=$1 c=$2 paths=$3 route_paths=$4 protocol address cpu0 steal0 out
  shift 4
  case $which in
    g) protocol=grpc address=$MAIN_ADDR ;;
    p) protocol=grpc-h2 address=$MAIN_ADDR ;;
    r) protocol=https address=$MAIN_ADDR paths=$route_paths ;;
    h) protocol=https address=127.0.0.1:$NGINX_PORT ;;
  esac
  if [ "$which" = h ]; then cpu0=$(nginx_cpu); else cpu0=$(cpu_of "$MAIN_PID"); fi
  steal0=$(steal_cs)
  out=$("$BIN/probe-bench" load --protocol "$protocol" --address "$address" "${TLS[@]}" --paths "$paths" \
    --concurrency "$c" --seconds "$SECONDS_PER_RUN" "$@" 2>>"$WORK/load.err")
  if [ "$which" = h ]; then out="$out $(secs "$cpu0" "$(nginx_cpu)")"; else out="$out $(secs "$cpu0" "$(cpu_of "$MAIN_PID")")"; fi
  echo "$mode c=$c $which $out steal_cs=$(($(steal_cs) - steal0))" >>"$WORK/serve-runs.txt"
  echo "$out"
}
# The median of serve_once lines, field by field (errors summed; the last
# field becomes the server's CPU µs per request, the median of each run's).
# At one client a burst of steal within one run moves its p99 by
# milliseconds (2.4 against 0.5 ms in a run with 7 s of steal over the
# section); the median of four runs is not moved by one such run.
median_of_runs() {
  local field fields=()
  for field in 1 2 3 4 7; do
    fields+=("$(awk -v f="$field" -v s="$SECONDS_PER_RUN" 'NF { print (f == 7 ? $6 / ($1 * s) * 1e6 : $f) }' <<<"$1" |
      sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }')")
  done
  printf "%.0f %.0f %.2f %.2f %d %.0f\n" "${fields[0]}" "${fields[1]}" "${fields[2]}" "${fields[3]}" \
    "$(awk 'NF { e += $5 } END { print e + 0 }' <<<"$1")" "${fields[4]}"
}
# new-full-handshake: a new connection per request without TLS session
# resumption in the plain client, as a Collector starting makes it (tonic's
# client, G, never resumes; in new-per-request, P, the route and nginx do).
for mode in long-lived new-per-request hot-16-probes new-full-handshake; do
  flag=(); [ "$mode" = new-per-request ] && flag=(--new-connection-per-request)
  [ "$mode" = new-full-handshake ] && flag=(--new-connection-per-request --full-handshakes)
  paths="$WORK/paths.txt"; [ "$mode" = hot-16-probes ] && paths="$WORK/hot-paths.txt"
  route_paths="$WORK/route-paths.txt"; [ "$mode" = hot-16-probes ] && route_paths="$WORK/hot-route-paths.txt"
  counts=(1 16 64 256); [ "$mode" = new-full-handshake ] && counts=(1)
  for c in "${counts[@]}"; do
    # At one client every run is as long as its slowest requests, and the
    # machine drifts within a row; so those rows run four times, each
    # server once in each place of the order, and give the medians.
    orders=("g p r h"); [ "$c" = 1 ] && orders=("g p r h" "h r p g" "p g h r" "r h g p")
    declare -A runs=([g]="" [p]="" [r]="" [h]="")
    for order in "${orders[@]}"; do
      for which in $order; do
        runs[$which]+="$(serve_once "$which" "$c" "$paths" "$route_paths" "${flag[@]}")"$'\n'
      done
    done
    read -r g_rps g_mbs g_p50 g_p99 g_err g_cpu <<<"$(median_of_runs "${runs[g]}")"
    read -r p_rps _ p_p50 p_p99 p_err p_cpu <<<"$(median_of_runs "${runs[p]}")"
    read -r r_rps _ r_p50 r_p99 r_err r_cpu <<<"$(median_of_runs "${runs[r]}")"
    read -r h_rps h_mbs h_p50 h_p99 h_err h_cpu <<<"$(median_of_runs "${runs[h]}")"
    g="$g_rps $g_mbs $g_p50 $g_p99 $g_err"; p="$p_rps - $p_p50 $p_p99 $p_err"
    r="$r_rps - $r_p50 $r_p99 $r_err"; h="$h_rps $h_mbs $h_p50 $h_p99 $h_err"
    echo "| $mode | $c | $g_rps / $p_rps | $r_rps | $h_rps | $(ratio "$g_rps" "$h_rps") / $(ratio "$p_rps" "$h_rps") | $(ratio "$r_rps" "$h_rps") | $g_mbs | $h_mbs | $g_p50 / $g_p99, $p_p50 / $p_p99 | $r_p50 / $r_p99 | $h_p50 / $h_p99 | $g_cpu / $p_cpu / $r_cpu / $h_cpu | $g_err / $p_err / $r_err / $h_err |" >>"$RESULTS"
    printf '%s\t%s\t%s\t%s\t%s\n' "$mode" G "$c" "$g_rps" "$g_p99" "$mode" P "$c" "$p_rps" "$p_p99" \
      "$mode" route "$c" "$r_rps" "$r_p99" "$mode" nginx "$c" "$h_rps" "$h_p99" >>"$SERVING_TSV"
    echo "$mode c=$c grpc: $g | grpc-h2: $p | route: $r | nginx: $h"
  done
done

# ------------------------------------------------------------ 2b. export
section "2b. export"
# The baseline is GetProbe-ing the same bytes: every stored probe once, one
# after the other, on one connection. Two rounds, alternating, so that
# neither side alone gets the warmer cache.
{
  echo
  echo "## 2b. Export (central-probes export of every stored probe into a support package)"
  echo
  echo "Baseline: GetProbe of every stored probe once, one client, one connection (the same bytes)."
  echo
  echo "| round | export MB/s | GetProbe MB/s | export / GetProbe | export peak RSS MiB | Central RSS growth MiB | GetProbe errors |"
  echo "|---|---|---|---|---|---|---|"
} >>"$RESULTS"
view_token=$("$BIN/central-probes" token create --data-dir "$WORK/data" --role view --name export-bench 2>/dev/null)
for round in 1 2; do
  read -r _ base_mbs _ _ base_err <<<"$("$BIN/probe-bench" load --protocol grpc --address "$MAIN_ADDR" "${TLS[@]}" \
    --paths "$WORK/paths.txt" --concurrency 1 --each-once 2>>"$WORK/load.err")"
  rss0=$(awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$MAIN_PID/status")
  t0=$(now)
  out=$(ROX_API_TOKEN=$view_token /usr/bin/time -f "%M" -o "$WORK/time-export.txt" "$BIN/central-probes" export \
    --out "$WORK/export.zip" -e "$MAIN_ADDR" --ca "$PKI/ca.pem")
  export_s=$(secs "$t0" "$(now)")
  rss1=$(awk '/VmRSS/ { printf "%d", $2 / 1024 }' "/proc/$MAIN_PID/status")
  exported=$(sed -n 's/.*probes (\([0-9]*\) bytes).*/\1/p' <<<"$out")
  export_mbs=$(mbps "$exported" "$export_s")
  echo "| $round | $export_mbs | $base_mbs | $(ratio "$export_mbs" "$base_mbs") | $(( $(cat "$WORK/time-export.txt") / 1024 )) | $((rss1 - rss0)) | $base_err |" >>"$RESULTS"
  echo "export round $round: $export_mbs MB/s, GetProbe one by one $base_mbs MB/s"
  rm -f "$WORK/export.zip"
done

# --------------------------------------------------------------- 3. fan-out
section "3. fan-out"
"$BIN/central-probes" token create --data-dir "$WORK/upstream" --role admin --name bench >"$WORK/upstream.token" 2>/dev/null
start_central "$WORK/upstream" "$PKI" --allow-anonymous-reads --metrics-listen 127.0.0.1:0
UP_ADDR=$CENTRAL_ADDR
UP_METRICS=$(sed -n 's|.*metrics on http://\([0-9.:]*\)/metrics.*|\1|p' "$WORK/upstream.log" | head -n 1)
"$BIN/make-package" --out "$WORK/one.zip" --kernels <(echo "6.1.0-99-cloud-amd64") >/dev/null
ROX_API_TOKEN=$(cat "$WORK/upstream.token") "$BIN/central-probes" upload "$WORK/one.zip" -e "$UP_ADDR" \
  --ca "$PKI/ca.pem" >/dev/null 2>&1
"$BIN/central-probes" token create --data-dir "$WORK/middle" --role view --name bench >/dev/null 2>&1
start_central "$WORK/middle" "$PKI" --upstream "https://$UP_ADDR" --upstream-ca "$PKI/ca.pem"
read -r fan_ms fan_failed <<<"$("$BIN/probe-bench" fanout --address "$CENTRAL_ADDR" "${TLS[@]}" \
  --path "2.5.0/collector-ebpf-6.1.0-99-cloud-amd64.o.gz" --clients 1000 2>>"$WORK/load.err")"
up_requests=$(curl -s "http://$UP_METRICS/metrics" | awk '/^central_probes_requests_total\{rpc="GetProbe"/ { n += $2 } END { print n + 0 }')
{
  echo
  echo "## 3. Fan-out"
  echo
  echo "1,000 concurrent GetProbe calls (each on a new connection) for a probe only the upstream has:"
  echo "all served in $fan_ms ms, $fan_failed failed; upstream requests: $up_requests."
} >>"$RESULTS"

# ----------------------------------------------------------------- 4. scale
section "4. scale ($SCALE_PROBES probes)"
rm -rf "$WORK/scale"
"$BIN/probe-bench" fill --data-dir "$WORK/scale" --probes "$SCALE_PROBES" --paths-out "$WORK/scale-paths.txt" >/dev/null
head -n 16000 "$WORK/scale-paths.txt" >"$WORK/scale-16k.txt"
SCALE_TOKEN=$("$BIN/central-probes" token create --data-dir "$WORK/scale" --role view --name bench 2>/dev/null)
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(now)
start_central "$WORK/scale" "$PKI"
start_s=$(secs "$t0" "$(now)")
scale_rss=$(hwm_mib "$CENTRAL_PID")
read -r asked found existing_first_ms existing_ms page list_ms <<<"$("$BIN/probe-bench" queries --address "$CENTRAL_ADDR" \
  --ca "$PKI/ca.pem" --token "$SCALE_TOKEN" --paths "$WORK/scale-16k.txt")"
{
  echo
  echo "## 4. Scale"
  echo
  echo "A store of $SCALE_PROBES probes in 6 module versions (cold page cache where the machine allows):"
  echo "start-up to listening $start_s s, RSS after start-up $scale_rss MiB;"
  echo "GetExistingProbes for $asked names ($found found), on an open connection: first call $existing_first_ms ms, median of 5 $existing_ms ms; a ListProbes page of $page $list_ms ms."
} >>"$RESULTS"

# ------------------------------------------------------- 5. Collector start
section "5. collector start"
KERNEL=$(sed -n 5p "$WORK/kernels.txt")
times=()
for _ in $(seq 1 20); do
  t0=$(now)
  "$BIN/collector-client" get-probe --module-version 2.5.0 --kernel "$KERNEL" --central "$MAIN_ADDR" \
    "${TLS[@]}" --out "$WORK/probe.o" >/dev/null 2>&1
  times+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", (b - a) * 1000 }')")
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 10p)
{
  echo
  echo "## 5. Collector start"
  echo
  echo "collector-client get-probe served by Central, process start to probe written: median of 20 runs $median ms."
} >>"$RESULTS"
# ------------------------------------------- 6. replicas on PostgreSQL
section "6. PostgreSQL store"
start_postgres "$WORK/pg"
ROX_API_TOKEN=$("$BIN/central-probes" token create --database-url "$PG_URL" --role admin --name bench 2>/dev/null)
rm -rf "$WORK/db-replica"
start_central "$WORK/db-replica" "$PKI" --database-url "$PG_URL"
DB_PID=$CENTRAL_PID; DB_ADDR=$CENTRAL_ADDR
c0=$(cpu_of "$DB_PID")
/usr/bin/time -f "%e %M" -o "$WORK/time-db.txt" "$BIN/central-probes" upload "$PACKAGE" -e "$DB_ADDR" \
  --ca "$PKI/ca.pem" >"$WORK/upload-db.out" 2>"$WORK/upload-db.err"
read -r db_up_s _ <"$WORK/time-db.txt"
db_central_cpu=$(secs "$c0" "$(cpu_of "$DB_PID")"); db_rss=$(hwm_mib "$DB_PID")
# The upload leaves PostgreSQL work to do (autovacuum of 2 GB of new rows,
# a checkpoint), which would take CPU from the first runs below and not
# from pgbench, measured last. Doing it now measures all on a quiet database.
PG_BIN_DIR=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
t0=$(now)
"$PG_BIN_DIR/psql" "$PG_URL" -qc "VACUUM (ANALYZE)" -c "CHECKPOINT" >/dev/null
vacuum_s=$(secs "$t0" "$(now)")
{
  echo
  echo "## 6. Central on PostgreSQL (one local PostgreSQL 15, fsync on, plain TCP)"
  echo
  echo "Upload of the package: $db_up_s s ($(mbps "$SIZE" "$db_up_s") MB/s), $(ratio "$up_s" "$db_up_s") of the filesystem store's upload in section 1;"
  echo "Central CPU $db_central_cpu s, peak RSS $db_rss MiB. Then VACUUM (ANALYZE) and CHECKPOINT, the work the upload"
  echo "leaves autovacuum and the checkpointer, took $vacuum_s s; every run below starts after them."
  echo
  echo "GetProbe, long-lived connections, random picks over all probes: \"cold\" with no local copy yet (each request"
  echo "copies its probe from the database first, where it has not been copied already), \"warm\" after every probe"
  echo "was fetched once through the replica."
  echo
  echo "| run | concurrency | req/s | vs filesystem store (section 2) | p50 / p99 ms | errors |"
  echo "|---|---|---|---|---|---|"
} >>"$RESULTS"
for pass in cold warm; do
  if [ "$pass" = warm ]; then
    "$BIN/probe-bench" load --protocol grpc --address "$DB_ADDR" "${TLS[@]}" --paths "$WORK/paths.txt" \
      --concurrency 16 --each-once >/dev/null 2>>"$WORK/load.err"
  fi
  for c in 16 64; do
    r=$("$BIN/probe-bench" load --protocol grpc --address "$DB_ADDR" "${TLS[@]}" --paths "$WORK/paths.txt" \
      --concurrency "$c" --seconds "$SECONDS_PER_RUN" 2>>"$WORK/load.err")
    read -r d_rps _ d_p50 d_p99 d_err <<<"$r"
    fs_rps=$(awk -v c="$c" -F' [|] ' '$1 == "| long-lived" && $2 == c { print $3 }' "$RESULTS")
    echo "| $pass | $c | $d_rps | $(ratio "$d_rps" "${fs_rps:-0.000001}") | $d_p50 / $d_p99 | $d_err |" >>"$RESULTS"
    echo "postgres $pass c=$c: $r"
  done
done

# PostgreSQL's own rate for the same rows: pgbench reading one random
# probe's chunk rows per transaction, as a cold GetProbe does.
max_blob=$("$PG_BIN_DIR/psql" "$PG_URL" -Atc "SELECT max(blob) FROM probes")
printf '\\set id random(1, %s)\nSELECT data FROM probe_chunks WHERE blob = :id ORDER BY seq;\n' "$max_blob" >"$WORK/pgbench.sql"
{
  echo
  echo "pgbench (PostgreSQL alone, plain TCP, no TLS), one random probe's chunk rows per transaction:"
  echo
  echo "| clients | transactions/s | cold GetProbe vs pgbench |"
  echo "|---|---|---|"
} >>"$RESULTS"
for c in 16 64; do
  tps=$("$PG_BIN_DIR/pgbench" -n -M prepared -f "$WORK/pgbench.sql" -c "$c" -j 2 -T "$SECONDS_PER_RUN" "$PG_URL" 2>/dev/null \
    | awk '/^tps/ { printf "%.0f", $3 }')
  cold=$(awk -v c="$c" -F' [|] ' '$1 == "| cold" && $2 == c { print $3 }' "$RESULTS")
  echo "| $c | $tps | $(ratio "${cold:-0}" "${tps:-1}") |" >>"$RESULTS"
  echo "pgbench c=$c: $tps tps"
done

# PostgreSQL's own ingest of the same rows, the bound of an upload into it:
# the chunk rows written to a file (untimed), then one binary COPY of them
# into an empty table of the same shape, committed durably, as fast as
# PostgreSQL takes bytes (one transaction, no client, no TLS).
"$PG_BIN_DIR/psql" "$PG_URL" -qc "COPY probe_chunks TO '$PG_DIR/chunks.bin' (FORMAT binary)" \
  -c "CREATE TABLE ingest_copy (LIKE probe_chunks INCLUDING ALL)" -c "CHECKPOINT" >/dev/null
t0=$(now)
"$PG_BIN_DIR/psql" "$PG_URL" -qc "COPY ingest_copy FROM '$PG_DIR/chunks.bin' (FORMAT binary)" >/dev/null
ingest_s=$(secs "$t0" "$(now)")
"$PG_BIN_DIR/psql" "$PG_URL" -qc "DROP TABLE ingest_copy" >/dev/null
rm -f "$PG_DIR/chunks.bin"
{
  echo
  echo "PostgreSQL alone ingesting the same chunk rows (one binary COPY from a file, committed): $ingest_s s,"
  echo "a rate of $(ratio "$up_s" "$ingest_s") of the filesystem store's upload in section 1; the upload into PostgreSQL"
  echo "reached $(ratio "$ingest_s" "$db_up_s") of PostgreSQL's own rate."
} >>"$RESULTS"
echo "postgres ingest: $ingest_s s"

# Scale on the database: 100,000 probe rows (made with SQL, as `probe-bench
# fill` makes them on disk for section 4), a replica's start and queries.
PSQL="$PG_BIN_DIR/psql"
"$PSQL" "$PG_URL" -qc "CREATE DATABASE scale" >/dev/null
SCALE_URL="${PG_URL%/*}/scale"
"$BIN/central-probes" token create --database-url "$SCALE_URL" --role view --name bench >"$WORK/scale-db.token" 2>/dev/null
"$PSQL" "$SCALE_URL" -qc "
INSERT INTO probe_chunks (blob, seq, data)
  SELECT i, 0, convert_to(repeat('probe ' || i, 20), 'UTF8') FROM generate_series(1, $SCALE_PROBES) i;
INSERT INTO probes (path, module_version, size, sha256, crc32, blob)
  SELECT '2.' || (i / 16667) || '.0/collector-ebpf-5.' || (i % 20) || '.' || (i % 7) || '-' || i || '-generic.o.gz',
         '2.' || (i / 16667) || '.0', length(repeat('probe ' || i, 20)),
         sha256(convert_to(repeat('probe ' || i, 20), 'UTF8')), 0, i
  FROM generate_series(1, $SCALE_PROBES) i;" >/dev/null
"$PSQL" "$SCALE_URL" -Atc "SELECT path FROM probes WHERE module_version = '2.0.0' ORDER BY path LIMIT 16000" >"$WORK/scale-db-16k.txt"
t0=$(now)
start_central "$WORK/db-scale" "$PKI" --database-url "$SCALE_URL"
db_start_s=$(secs "$t0" "$(now)")
read -r db_asked db_found db_existing_first_ms db_existing_ms db_page db_list_ms <<<"$("$BIN/probe-bench" queries --address "$CENTRAL_ADDR" \
  --ca "$PKI/ca.pem" --token "$(cat "$WORK/scale-db.token")" --paths "$WORK/scale-db-16k.txt")"
{
  echo
  echo "With $SCALE_PROBES probes in the database: a replica starts listening in $db_start_s s;"
  echo "GetExistingProbes for $db_asked names ($db_found found), on an open connection: first call $db_existing_first_ms ms, median of 5 $db_existing_ms ms; a ListProbes page of $db_page $db_list_ms ms."
} >>"$RESULTS"

# ------------------------------------------------------------ 7. signed probes
section "7. signed probes"
SKIP_BUILD=1 SECONDS_PER_RUN="$SECONDS_PER_RUN" SIGNED_BENCH_DIR="$WORK/signed" bash bench/signed.sh >>"$RESULTS"

# ------------------------------------------------- 8. pack store vs per-file
section "8. pack store against the per-file store"
SKIP_BUILD=1 SECONDS_PER_RUN="$SECONDS_PER_RUN" PACKS_BENCH_DIR="$WORK/packs" PACKAGE="$PACKAGE" bash bench/packs.sh >>"$RESULTS"
section "9. coverage"
SKIP_BUILD=1 COVERAGE_BENCH_DIR="$WORK/coverage" PACKAGE="$PACKAGE" bash bench/coverage.sh >>"$RESULTS"
section "10. through a registry"
SKIP_BUILD=1 OCI_BENCH_DIR="$WORK/oci" PACKAGE="$PACKAGE" bash bench/oci.sh >>"$RESULTS"
echo "$(date +%s.%N) $(steal_cs) end" >>"$SECTIONS"
{
  echo
  echo "## Steal time per section"
  echo
  echo "CPU time the hypervisor gave to others while each section ran, over both cores ($(nproc) cores, so"
  echo "$(nproc) s of steal per second would be all of it)."
  echo
  echo "| section | seconds | steal s | steal / wall |"
  echo "|---|---|---|---|"
  awk 'NR > 1 { printf "| %s | %.0f | %.1f | %.2f |\n", name, $1 - t, ($2 - st) / 100, ($2 - st) / 100 / ($1 - t) }
       { t = $1; st = $2; name = $3; for (i = 4; i <= NF; i++) name = name " " $i }' "$SECTIONS"
} >>"$RESULTS"
python3 bench/plot.py --date "$RUN_DATE" "$SERVING_TSV" bench/serving.svg
echo "results in $RESULTS; section 2 plotted in bench/serving.svg"
cat "$RESULTS"
