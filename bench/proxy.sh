#!/usr/bin/env bash
# Provisioning-proxy benchmark: ucrelay's device-facing HTTPS edge against nginx as a
# TLS-terminating reverse proxy, with Pingora (bench/pingora: a minimal TLS reverse proxy on
# Cloudflare's Rust proxy framework) as a third column, the control. All three sit in front of the
# same plain-HTTP upstream (a second nginx) serving one 2 KB phone config file, all present the
# same certificate, all are loaded by the same wrk at the same connection counts, in one run.
#
#   usage: bench/proxy.sh            (from anywhere; needs root for apt-get when wrk is missing)
#
# Knobs (environment, all optional):
#   BENCH_CONNS="16 256"   connection counts
#   BENCH_DURATION=10s     measured wrk run per row
#   BENCH_WARMUP=2s        unmeasured wrk run before each measured one
#   BENCH_ROUNDS=3         rounds of the whole nginx/ucrelay/pingora alternation; the table shows
#                          medians
#   BENCH_THREADS=2        wrk threads
#   BENCH_NICE=-10         niceness of everything measured (as root; 0 to leave it alone), so that
#                          niced background work (builds, test suites) gets out of the way
#   BENCH_KEEP=1           keep the temp dir (configs, logs, raw wrk output) and print its path
#   BENCH_BIN              a release binary to measure instead of building one
#   BENCH_PINGORA=0        leave the Pingora column out (no build either)
#   BENCH_PINGORA_BIN      a prebuilt bench/pingora binary instead of building one
#   BENCH_PINGORA_THREADS  Pingora's worker threads (default: the CPUs the proxy may use)
#   BENCH_PINGORA_STEAL=0  Pingora with one single-threaded runtime per thread (its
#                          work_stealing: false) instead of one work-stealing runtime
#   BENCH_PIN=1            pin mode: wrk, the upstream and the reference cloud on CPU 0, the proxy
#                          under test alone on CPU 1 with one worker (nginx worker_processes 1,
#                          ucrelay TOKIO_WORKER_THREADS=1, Pingora 1 thread), so that CPU per request
#                          compares without the client on the proxy's core
#
# A benchmark, not a test: it never judges the numbers and exits 0 whatever they are. It exits
# non-zero only when it cannot set up the comparison (build, PKI, a server that does not come up).
# Output: a Markdown table on stdout and in bench/results-proxy.md. Traffic stays on 127.0.0.1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
conns_list=${BENCH_CONNS:-16 256}
duration=${BENCH_DURATION:-10s}
warmup=${BENCH_WARMUP:-2s}
rounds=${BENCH_ROUNDS:-3}
threads=${BENCH_THREADS:-2}
with_pingora=${BENCH_PINGORA:-1}
pin=${BENCH_PIN:-0}
fqdn=relay.bench.test
file=000000000000.cfg
results=$here/results-proxy.md
# Pin mode: the proxy under test gets CPU 1 alone and one worker; everything else shares CPU 0.
ncpus=$(nproc) # before any pinning: nproc counts the CPUs this process may use
proxy_cpus=$ncpus
proxy_wrap=()
if [[ $pin == 1 ]]; then
    ((ncpus >= 2)) || { echo "[bench] error: BENCH_PIN=1 needs at least 2 CPUs" >&2; exit 1; }
    proxy_cpus=1
    proxy_wrap=(taskset -c 1)
    results=$here/results-proxy-pinned.md
fi
pingora_threads=${BENCH_PINGORA_THREADS:-$proxy_cpus}
pingora_steal=${BENCH_PINGORA_STEAL:-1}

# shellcheck source=bench/lib.sh
source "$here/lib.sh"

# 200 and exactly the file's bytes, over verified TLS (the CA, the FQDN) or plain HTTP.
fetch_ok() { # url [curl args...]
    local url=$1
    shift
    local code
    code=$(curl -sS -o "$tmp/fetched" -w '%{http_code}' --max-time 2 "$@" "$url" 2>/dev/null) || return 1
    [[ $code == 200 ]] && cmp -s "$tmp/fetched" "$tmp/www/$file"
}

# ---------------------------------------------------------------------------------------------
# 1. Build.
bench_binary

# 2. Tools.
if ! command -v wrk >/dev/null; then
    say "installing wrk"
    if ! apt-get install -y wrk >/dev/null 2>&1; then
        apt-get update >/dev/null && apt-get install -y wrk >/dev/null
    fi
fi
if ! command -v nginx >/dev/null; then
    say "installing nginx"
    if ! apt-get install -y nginx >/dev/null 2>&1; then
        apt-get update >/dev/null && apt-get install -y nginx >/dev/null
    fi
fi
for t in wrk nginx openssl curl; do
    command -v "$t" >/dev/null || die "$t is required"
done
[[ $pin != 1 ]] || command -v taskset >/dev/null || die "taskset is required for BENCH_PIN=1"
ulimit -n 65536 2>/dev/null || true

# 2b. The Pingora control (bench/pingora, its own workspace and Cargo.lock). Building it the
#     first time takes several minutes and needs cmake (for zlib-ng, a -sys dependency).
pingora_bin=""
pingora_version=""
if [[ $with_pingora != 0 ]]; then
    pingora_version=$(awk '/^name = "pingora"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' "$here/pingora/Cargo.lock")
    if [[ -n ${BENCH_PINGORA_BIN:-} ]]; then
        pingora_bin=$BENCH_PINGORA_BIN
        say "using the prebuilt Pingora proxy $pingora_bin (BENCH_PINGORA_BIN)"
    else
        pingora_bin=$here/pingora/target/release/pingora-bench-proxy
        if [[ ! -x $pingora_bin ]] && ! command -v cmake >/dev/null; then
            say "installing cmake (to build bench/pingora)"
            if ! apt-get install -y cmake >/dev/null 2>&1; then
                apt-get update >/dev/null && apt-get install -y cmake >/dev/null
            fi
        fi
        say "building the Pingora control (bench/pingora, cargo build --release --locked; minutes the first time)"
        (cd "$here/pingora" && CARGO_TARGET_DIR=$here/pingora/target nice -n 10 cargo build --release --locked) >&2
    fi
    [[ -x $pingora_bin ]] || die "$pingora_bin not found after the build"
fi

# From here on every process inherits this niceness; the build above kept the default.
bench_nice=${BENCH_NICE:--10}
[[ $(id -u) == 0 ]] || bench_nice=${BENCH_NICE:-0}
if [[ $bench_nice != 0 ]]; then
    renice --priority "$bench_nice" -p $$ >/dev/null 2>&1 || say "could not renice to $bench_nice; running at the default priority"
fi
# Pin mode: this script and all it starts from here on (upstream, cloud, wrk) run on CPU 0; each
# proxy under test is started through `taskset -c 1` instead.
if [[ $pin == 1 ]]; then
    taskset -pc 0 $$ >/dev/null || die "could not pin the benchmark to CPU 0"
    say "pin mode: wrk, the upstream and the cloud on CPU 0, the proxy under test on CPU 1"
fi

tmp=$(mktemp -d /tmp/ucrelay-bench.XXXXXX)
mkdir -p "$tmp/www" "$tmp/logs" "$tmp/raw"

# 3. One PKI; both servers present the same chain (leaf, intermediate, root) and key.
say "making a throw-away PKI for $fqdn"
bash "$repo/certs-example/gen-certs.sh" "$tmp/pki" "$fqdn" >"$tmp/logs/gen-certs.log" 2>&1 ||
    die "gen-certs.sh failed: $(cat "$tmp/logs/gen-certs.log")"
pki=$tmp/pki
openssl pkcs12 -in "$pki/relay.pfx" -passin "file:$pki/relay.pfx.pass" -clcerts -nokeys |
    pem_blocks >"$pki/nginx-chain.pem"
openssl pkcs12 -in "$pki/relay.pfx" -passin "file:$pki/relay.pfx.pass" -cacerts -nokeys |
    pem_blocks >>"$pki/nginx-chain.pem"
openssl pkcs12 -in "$pki/relay.pfx" -passin "file:$pki/relay.pfx.pass" -nocerts -nodes |
    pem_blocks >"$pki/nginx-key.pem"
chmod 0600 "$pki/nginx-key.pem"

# 4. The upstream: plain HTTP, one 2 KB config file, no auth, no access log.
head -c 2048 /dev/urandom | base64 -w 64 | head -c 2048 >"$tmp/www/$file"
[[ $(stat -c %s "$tmp/www/$file") == 2048 ]] || die "could not write the 2 KB config file"

user_line=""
[[ $(id -u) == 0 ]] && user_line="user root;" # the temp dirs are 0700

nginx_common() { # prefix name [workers]: the parts both nginx instances share
    cat <<EOF
$user_line
worker_processes ${3:-auto};
pid $1/$2.pid;
error_log $tmp/logs/$2-error.log warn;
events { worker_connections 8192; }
EOF
}
nginx_temp_paths() {
    cat <<EOF
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}

upstream_port=$(free_port)
mkdir -p "$tmp/upstream"
{
    nginx_common "$tmp/upstream" upstream "$([[ $pin == 1 ]] && echo 1 || echo auto)"
    cat <<EOF
http {
$(nginx_temp_paths "$tmp/upstream")
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {
        listen 127.0.0.1:$upstream_port;
        root $tmp/www;
        location / { }
    }
}
EOF
} >"$tmp/upstream/nginx.conf"

start_nginx() { # dir [wrapper...] -> pid in $started
    local dir=$1
    shift
    "$@" nginx -p "$dir" -c "$dir/nginx.conf" -e "$tmp/logs/$(basename "$dir")-startup.log" \
        -g 'daemon off;' >"$tmp/logs/$(basename "$dir").out" 2>&1 &
    started=$!
    pids+=("$started")
}
say "starting the upstream (nginx, http://127.0.0.1:$upstream_port)"
start_nginx "$tmp/upstream"
wait_until 10 fetch_ok "http://127.0.0.1:$upstream_port/$file" ||
    die "upstream nginx did not come up: $(cat "$tmp/logs/upstream-"*.log 2>/dev/null)"

# 5. The reference cloud the relay registers with.
say "starting the reference cloud"
"$bin" sim cloud --listen 127.0.0.1:0 --tenant bench --pin 1 \
    >"$tmp/logs/cloud.out" 2>"$tmp/logs/cloud.log" &
pids+=("$!")
cloud_ready() { grep -q '^ucrelay sim cloud listening on http://' "$tmp/logs/cloud.out"; }
wait_until 20 cloud_ready || die "the reference cloud did not start: $(cat "$tmp/logs/cloud.log")"
cloud_url=$(sed -n '1s/^ucrelay sim cloud listening on //p' "$tmp/logs/cloud.out")

# 7. nginx as the TLS-terminating reverse proxy: one instance, two servers on two ports, one with
#    a buffered access log, one without; the same upstream pool behind both.
nginx_log_port=$(free_port)
nginx_nolog_port=$(free_port)
mkdir -p "$tmp/nginx"
nginx_server() { # port access_log-line
    cat <<EOF
    server {
        listen 127.0.0.1:$1 ssl;
        server_name $fqdn;
        $2
        location / {
            proxy_pass http://provisioning;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
        }
    }
EOF
}
{
    nginx_common "$tmp/nginx" nginx "$([[ $pin == 1 ]] && echo 1 || echo auto)"
    cat <<EOF
http {
$(nginx_temp_paths "$tmp/nginx")
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $pki/nginx-chain.pem;
    ssl_certificate_key $pki/nginx-key.pem;
    upstream provisioning {
        server 127.0.0.1:$upstream_port;
        keepalive 64;
        keepalive_requests 1000000;
    }
$(nginx_server "$nginx_log_port" "access_log $tmp/logs/nginx-access.log combined buffer=64k;")
$(nginx_server "$nginx_nolog_port" "access_log off;")
}
EOF
} >"$tmp/nginx/nginx.conf"
say "starting nginx as the TLS reverse proxy (ports $nginx_log_port, $nginx_nolog_port)"
start_nginx "$tmp/nginx" "${proxy_wrap[@]}"
nginx_pid=$started
tls_args=(--cacert "$pki/root-ca.crt")
resolve_to() { echo "--resolve" "$fqdn:$1:127.0.0.1"; }
# shellcheck disable=SC2046
wait_until 10 fetch_ok "https://$fqdn:$nginx_log_port/$file" "${tls_args[@]}" $(resolve_to "$nginx_log_port") ||
    die "nginx proxy did not come up: $(cat "$tmp/logs/nginx-"*.log 2>/dev/null)"
# shellcheck disable=SC2046
fetch_ok "https://$fqdn:$nginx_nolog_port/$file" "${tls_args[@]}" $(resolve_to "$nginx_nolog_port") ||
    die "nginx proxy (no access log) does not serve the file"

# 6. The relay; started once per log level.
relay_pid=""
relay_port=""
start_relay() { # RUST_LOG value
    relay_port=$(free_port)
    local cfg=$tmp/relay-$1.toml
    cat >"$cfg" <<EOF
state_dir = "$tmp/relay-state"

[cloud]
url = "$cloud_url"
tenant_id = "bench"
pin = "1"

[admin]
socket = "$tmp/admin.sock"

[edge]
listen = "127.0.0.1:$relay_port"
fqdn = ["$fqdn"]
pfx = "$pki/relay.pfx"
pfx_password_file = "$pki/relay.pfx.pass"
# Every bench client is 127.0.0.1: lift the per-host cap to the edge's.
max_connections_per_ip = 10000

[provisioning]
upstream = "http://127.0.0.1:$upstream_port"

[devices]
subnets = ["127.0.0.0/8"]
EOF
    "$bin" check --config "$cfg" >"$tmp/logs/relay-check-$1.log" 2>&1 ||
        die "ucrelay check refused the bench config: $(cat "$tmp/logs/relay-check-$1.log")"
    say "starting ucrelay (RUST_LOG=$1, edge https://127.0.0.1:$relay_port)"
    local workers=()
    [[ $pin == 1 ]] && workers=(TOKIO_WORKER_THREADS=1)
    env RUST_LOG="$1" "${workers[@]}" "${proxy_wrap[@]}" "$bin" run --config "$cfg" 2>"$tmp/logs/relay-$1.log" &
    relay_pid=$!
    pids+=("$relay_pid")
    edge_up() {
        kill -0 "$relay_pid" 2>/dev/null || return 1
        { "$bin" status --socket "$tmp/admin.sock" --json 2>/dev/null || true; } | grep -Eq '"edge": *\{'
    }
    wait_until 30 edge_up || die "ucrelay did not report its edge: $(tail -n 20 "$tmp/logs/relay-$1.log")"
    # shellcheck disable=SC2046
    wait_until 10 fetch_ok "https://$fqdn:$relay_port/$file" "${tls_args[@]}" $(resolve_to "$relay_port") ||
        die "ucrelay's edge does not serve the file: $(tail -n 20 "$tmp/logs/relay-$1.log")"
}
stop_relay() {
    stop_pid "$relay_pid"
    wait "$relay_pid" 2>/dev/null || true
    forget_pid "$relay_pid"
    relay_pid=""
}

# 6b. The Pingora control; started once per logging setting, like the relay: with its access log
#     (one combined line per request, 64 KiB buffer, as nginx's) or without.
pingora_pid=""
pingora_port=""
start_pingora() { # log|nolog
    pingora_port=$(free_port)
    local extra_args=()
    [[ $1 == log ]] && extra_args=(--access-log "$tmp/logs/pingora-access.log")
    [[ $pingora_steal == 0 ]] && extra_args+=(--no-work-stealing)
    say "starting Pingora (threads $pingora_threads, access log $([[ $1 == log ]] && echo on || echo off), https://127.0.0.1:$pingora_port)"
    "${proxy_wrap[@]}" "$pingora_bin" --listen "127.0.0.1:$pingora_port" \
        --cert "$pki/nginx-chain.pem" --key "$pki/nginx-key.pem" \
        --upstream "127.0.0.1:$upstream_port" --threads "$pingora_threads" "${extra_args[@]}" \
        >"$tmp/logs/pingora-$1.out" 2>"$tmp/logs/pingora-$1.log" &
    pingora_pid=$!
    pids+=("$pingora_pid")
    pingora_up() {
        kill -0 "$pingora_pid" 2>/dev/null || return 1
        # shellcheck disable=SC2046
        fetch_ok "https://$fqdn:$pingora_port/$file" "${tls_args[@]}" $(resolve_to "$pingora_port")
    }
    wait_until 20 pingora_up || die "Pingora does not serve the file: $(tail -n 20 "$tmp/logs/pingora-$1.log")"
}
stop_pingora() {
    [[ -n $pingora_pid ]] || return 0
    stop_pid "$pingora_pid"
    wait "$pingora_pid" 2>/dev/null || true
    forget_pid "$pingora_pid"
    pingora_pid=""
}


# ---------------------------------------------------------------------------------------------
# 8. Load.
peak_rss_kb() { # pids...: sum of VmHWM
    local total=0 pid kb
    for pid in "$@"; do
        kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}


to_ms() { # "1.23ms" / "456.78us" / "1.02s" / "2.00m" -> milliseconds
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else printf "nan" }'
}

run_wrk() { # out-file wrk-args...: wrk as a recorded child, waited on
    wrk "${@:2}" >"$1" 2>&1 &
    local pid=$!
    pids+=("$pid")
    local rc=0
    wait "$pid" || rc=$?
    forget_pid "$pid"
    return "$rc"
}

# One line per measured run, tab-separated:
#   label kind mode conns round req/s p50_ms p99_ms errors server_cpu_us_per_req peak_rss_kb
#   other_cpu_% idle_cpu_% idle_cpu1_%
rows=$tmp/rows.tsv
: >"$rows"
idle_pct() { # "idle0 total0" "idle1 total1" -> idle share in %
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[2] - x[2]
        printf "%.0f", (t > 0 ? (y[1] - x[1]) * 100 / t : 0) }'
}
measure() { # label kind(relay|pingora|nginx) mode(log|nolog) port conns round
    local label=$1 kind=$2 mode=$3 port=$4 n=$5 round=$6
    local url=https://127.0.0.1:$port/$file
    local raw=$tmp/raw/$kind-$mode-$n-$round.txt
    say "round $round/$rounds: $label, $n connections: warm-up $warmup, then $duration"
    run_wrk "$tmp/raw/warmup.txt" -t"$threads" -c"$n" -d"$warmup" "$url" || true
    local sp
    read -r -a sp <<<"$(server_pids "$kind")"
    reset_hwm "${sp[@]}"
    local c0 c1 m0 m1 o0 o1
    local i0 i1 j0 j1
    c0=$(cpu_ticks "${sp[@]}")
    read -r -a m0 <<<"$(machine_ticks)"
    i0=$(idle_ticks)
    j0=$(idle_ticks cpu1)
    o0=$(own_ticks)
    run_wrk "$raw" -t"$threads" -c"$n" -d"$duration" --latency "$url" || say "wrk exited non-zero (see below)"
    o1=$(own_ticks)
    j1=$(idle_ticks cpu1)
    i1=$(idle_ticks)
    read -r -a m1 <<<"$(machine_ticks)"
    c1=$(cpu_ticks "${sp[@]}")
    # Idle share of the machine (and of CPU 1, the proxy's own in pin mode) during the run.
    local idle idle1
    idle=$(idle_pct "$i0" "$i1")
    idle1=$(idle_pct "$j0" "$j1")
    # Share of the machine's CPU that processes outside the benchmark took during the run.
    local other
    other=$(awk -v busy=$((m1[0] - m0[0])) -v total=$((m1[1] - m0[1])) -v own=$((o1 - o0)) \
        'BEGIN { o = total > 0 ? (busy - own) * 100 / total : 0; printf "%.0f", o < 0 ? 0 : o }')
    if ((other > 10)); then
        say "other processes took ${other}% of the CPU during this run: its numbers are disturbed"
    fi
    local rss
    rss=$(peak_rss_kb "${sp[@]}")
    local rps p50 p99 reqs non2xx sockerr
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$raw")
    p50=$(awk '/Latency Distribution/ {d=1} d && $1 == "50%" {print $2; exit}' "$raw")
    p99=$(awk '/Latency Distribution/ {d=1} d && $1 == "99%" {print $2; exit}' "$raw")
    reqs=$(awk '/requests in/ {print $1; exit}' "$raw")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$raw")
    sockerr=$(sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1 \2 \3 \4/p' "$raw" |
        awk '{print $1 + $2 + $3 + $4}')
    if [[ -z $rps ]]; then
        say "no result from wrk for $label at $n connections:"
        sed 's/^/    /' "$raw" >&2
    fi
    local errors=$(( ${non2xx:-0} + ${sockerr:-0} ))
    local cpu_us
    cpu_us=$(awk -v t=$((c1 - c0)) -v hz="$clk_tck" -v r="${reqs:-0}" \
        'BEGIN { if (r > 0) printf "%.0f", t * 1e6 / hz / r; else printf "n/a" }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$kind" "$mode" "$n" "$round" \
        "${rps:-0}" "$(to_ms "${p50:-nan}")" "$(to_ms "${p99:-nan}")" "$errors" "$cpu_us" "$rss" "$other" \
        "$idle" "$idle1" >>"$rows"
}

tls_nginx=$(tls_info "$nginx_log_port")
tls_pingora=""
for mode in log nolog; do
    if [[ $mode == log ]]; then
        start_relay info
        tls_relay=$(tls_info "$relay_port")
        nginx_port=$nginx_log_port
        relay_label="ucrelay, RUST_LOG=info"
        nginx_label="nginx, access_log buffered"
        pingora_label="pingora, access log buffered"
    else
        start_relay warn
        nginx_port=$nginx_nolog_port
        relay_label="ucrelay, RUST_LOG=warn"
        nginx_label="nginx, access_log off"
        pingora_label="pingora, access log off"
    fi
    if [[ -n $pingora_bin ]]; then
        start_pingora "$mode"
        [[ -n $tls_pingora ]] || tls_pingora=$(tls_info "$pingora_port")
    fi
    # Alternate nginx, relay and Pingora at each connection count, round after round, so that
    # drift and noisy neighbours hit all alike; the table reports the median of the rounds.
    for ((round = 1; round <= rounds; round++)); do
        for n in $conns_list; do
            measure "$nginx_label" nginx "$mode" "$nginx_port" "$n" "$round"
            measure "$relay_label" relay "$mode" "$relay_port" "$n" "$round"
            if [[ -n $pingora_bin ]]; then
                measure "$pingora_label" pingora "$mode" "$pingora_port" "$n" "$round"
            fi
        done
    done
    stop_relay
    stop_pingora
done

# ---------------------------------------------------------------------------------------------
# 9. Report.
IFS='|' read -r nginx_fp nginx_certs nginx_tls <<<"$tls_nginx"
IFS='|' read -r relay_fp relay_certs relay_tls <<<"$tls_relay"
IFS='|' read -r pingora_fp pingora_certs pingora_tls <<<"$tls_pingora"
same_cert="yes"
[[ -n $nginx_fp && $nginx_fp == "$relay_fp" && $nginx_certs == "$relay_certs" ]] || same_cert="NO"
if [[ -n $pingora_bin ]]; then
    [[ $nginx_fp == "$pingora_fp" && $nginx_certs == "$pingora_certs" ]] || same_cert="NO"
fi
table() { # medians over the rounds; ratios to nginx from the medians
    awk -F'\t' -v modes="log nolog" -v conns="$conns_list" -v pin="$pin" '
        function median(key, col,    n, i, j, v, a) {
            n = cnt[key]
            for (i = 1; i <= n; i++) a[i] = val[key, i, col] + 0
            for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        function spread(key, col,    i, lo, hi, v) {
            lo = hi = val[key, 1, col] + 0
            for (i = 2; i <= cnt[key]; i++) { v = val[key, i, col] + 0; if (v < lo) lo = v; if (v > hi) hi = v }
            return sprintf("%.0f–%.0f", lo, hi)
        }
        function ratio(a, b) { return b > 0 ? sprintf("**%.2fx**", a / b) : "n/a" }
        {
            key = $3 SUBSEP $4 SUBSEP $2
            label[key] = $1; i = ++cnt[key]
            val[key, i, "rps"] = $6; val[key, i, "p50"] = $7; val[key, i, "p99"] = $8; val[key, i, "cpu"] = $10
            val[key, i, "idle"] = $13; val[key, i, "idle1"] = $14
            err[key] += $9; if ($11 + 0 > rss[key]) rss[key] = $11 + 0
            if ($12 + 0 > other[key]) other[key] = $12 + 0
        }
        END {
            h = "| server | conns | req/s | p50 ms | p99 ms | req/s ÷ nginx | p99 ÷ nginx | CPU/req ÷ nginx | RSS ÷ nginx | req/s range | errors | server CPU µs/req | peak RSS MiB | idle CPU %"
            d = "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:"
            if (pin == 1) { h = h " | CPU 1 idle %"; d = d "|--:" }
            print h " | other CPU % |"; print d "|--:|"
            nm = split(modes, M, " "); nc = split(conns, C, " "); ns = split("nginx relay pingora", S, " ")
            for (m = 1; m <= nm; m++) for (c = 1; c <= nc; c++) {
                nk = M[m] SUBSEP C[c] SUBSEP "nginx"
                if (!(nk in cnt)) continue
                nrps = median(nk, "rps"); np99 = median(nk, "p99"); ncpu = median(nk, "cpu")
                for (s = 1; s <= ns; s++) {
                    k = M[m] SUBSEP C[c] SUBSEP S[s]
                    if (!(k in cnt)) continue
                    rps = median(k, "rps"); p99 = median(k, "p99"); cpu = median(k, "cpu")
                    if (s == 1) rr = pr = cr = mr = "-"
                    else { rr = ratio(rps, nrps); pr = ratio(p99, np99); cr = ratio(cpu, ncpu); mr = ratio(rss[k], rss[nk]) }
                    printf "| %s | %s | %.0f | %.2f | %.2f | %s | %s | %s | %s | %s | %d | %.0f | %.1f | %.0f", \
                        label[k], C[c], rps, median(k, "p50"), p99, rr, pr, cr, mr, spread(k, "rps"), err[k], \
                        cpu, rss[k] / 1024, median(k, "idle")
                    if (pin == 1) printf " | %.0f", median(k, "idle1")
                    printf " | %d |\n", other[k]
                }
            }
        }' "$rows"
}
head_sha=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=""
[[ -n $(git -C "$repo" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && dirty=" (src/ modified)"
cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
if [[ $pin == 1 ]]; then
    placement="pin mode: wrk, the upstream and the reference cloud on CPU 0, the proxy under test alone on CPU 1"
    worker_setup="nginx worker_processes 1, upstream keepalive 64; ucrelay TOKIO_WORKER_THREADS=1"
else
    placement="wrk, the proxies and the upstream share these CPUs"
    worker_setup="nginx worker_processes auto, upstream keepalive 64; ucrelay on tokio's default runtime ($ncpus workers)"
fi
server_lines="- nginx $(nginx -v 2>&1 | sed 's/^nginx version: nginx\///'), $worker_setup"
if [[ -n $pingora_bin ]]; then
    server_lines+=$'\n'"- Pingora ${pingora_version:-?} (bench/pingora, rustls): threads $pingora_threads, $([[ $pingora_steal == 0 ]] && echo "one single-threaded runtime per thread" || echo "one work-stealing tokio runtime"), its connector's keep-alive pool to the upstream"
fi
report=$(
    cat <<EOF
# ucrelay provisioning-proxy benchmark

- when: $(date -u '+%Y-%m-%d %H:%M UTC'); ucrelay $head_sha$dirty, release build
- machine: $ncpus CPUs ($cpu_model), kernel $(uname -r); $placement
- load: wrk $(dpkg-query -W -f '${Version}' wrk 2>/dev/null || echo '?'), $threads threads, $rounds rounds of $duration per row, each after a $warmup warm-up, GET of a 2048-byte \`$file\`, keep-alive
- niceness of everything measured: $bench_nice
$server_lines
- TLS as OpenSSL (wrk's library) negotiates it: nginx ${nginx_tls:-?}, ucrelay ${relay_tls:-?}${pingora_bin:+, Pingora ${pingora_tls:-?}}; same certificate and chain on all: $same_cert (leaf SHA-256 ${relay_fp:0:23}…, ${relay_certs} certificates sent by ucrelay, ${nginx_certs} by nginx${pingora_bin:+, ${pingora_certs} by Pingora})

$(table)

Each figure is the median over the rounds; "req/s range" is the lowest and highest round. Ratios
are the server's / nginx's (medians) at the same connection count and logging setting: for
ucrelay, req/s at or above 1.00x and p99 at or below 1.00x meet the target; Pingora's row is the
control, another Rust proxy on tokio measured the same way. "errors" counts non-2xx answers plus
socket errors over all rounds. Server CPU is utime+stime of the proxy's processes (nginx: master
and workers) during the measured runs, per request. Peak RSS is the highest VmHWM of a measured
run (nginx: summed over its processes, so shared pages count more than once). "idle CPU %" is the
median share of the whole machine's CPU time that was idle during the runs (from /proc/stat)$([[ $pin == 1 ]] && printf '%s' '; "CPU 1 idle %" is the same for CPU 1, the proxy'"'"'s own in pin mode').
"other CPU %" is the largest share of the machine's CPU that processes outside the benchmark took
during one of the row's runs (approximate): above about 10 the row was disturbed by other work and
is worth rerunning.
EOF
)
printf '%s\n' "$report"
printf '%s\n' "$report" >"$results"
say "wrote $results"
