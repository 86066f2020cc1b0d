#!/usr/bin/env bash
# Image-serving benchmark: phones downloading a firmware image from ucrelay's download agent
# (the image cached from the reference cloud, served on the HTTPS edge) against nginx serving the
# very same bytes as a static file over TLS with the same certificate, same machine, one run.
#
#   usage: bench/download.sh        (from anywhere; root only needed to apt-get missing tools)
#
# It measures:
#   1. aggregate HTTPS throughput with BENCH_CONNS (64) wrk connections each downloading the
#      BENCH_SIZE_MB (256) MB image, relay against nginx (target: at least 1.0x nginx);
#   2. the relay's RSS at BENCH_MEM_CONNS (1000) concurrent downloads: baseline before, peak during,
#      growth (target: under 64 MB), with nginx's figures beside it for context.
#
# Knobs (environment, all optional):
#   BENCH_CONNS=64          connections of the throughput runs
#   BENCH_MEM_CONNS=1000    connections of the memory runs
#   BENCH_DURATION=20s      each wrk run (one run per server and connection count)
#   BENCH_THREADS=2         wrk threads
#   BENCH_SIZE_MB=256       size of the random image, in MiB (268435456 bytes by default)
#   BENCH_NICE=-10          niceness of everything measured (as root; 0 to leave it alone), so that
#                           niced background work (builds, test suites) gets out of the way
#   BENCH_KEEP=1            keep the temp dir (configs, logs, raw wrk output) and print its path
#   CARGO_TARGET_DIR        where the release binary is built (cargo's default: the repo's target/)
#   BENCH_BIN               a release binary to measure instead of building one
#
# A benchmark, not a test: it never judges the numbers by its exit code and exits 0 whatever they
# are; it exits non-zero only when it cannot set the comparison up (build, tools, PKI, a server
# that does not come up or serves different bytes). Output: Markdown tables on stdout and in
# bench/results-download.md. All traffic stays on 127.0.0.1; every run is time-bounded.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
conns=${BENCH_CONNS:-64}
mem_conns=${BENCH_MEM_CONNS:-1000}
duration=${BENCH_DURATION:-20s}
threads=${BENCH_THREADS:-2}
size_mb=${BENCH_SIZE_MB:-256}
fqdn=relay.bench.test
image=fw-256.bin
results=$here/results-download.md

# shellcheck source=bench/lib.sh
source "$here/lib.sh"

# ---------------------------------------------------------------------------------------------
# 1. Build.
bench_binary
# What was built: HEAD, plus whether the work tree's sources differed from it (checked again at
# the end, so that an edit during the run is not passed off as the measured code).
src_state() { { git -C "$repo" diff HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || true; } | sha256sum | cut -c1-16; }
clean_state=$(: | sha256sum | cut -c1-16)
built_state=$(src_state)

# 2. Tools.
apt_updated=0
need_pkg() { # command package
    command -v "$1" >/dev/null && return 0
    say "installing $2"
    if ! apt-get install -y "$2" >/dev/null 2>&1; then
        if [[ $apt_updated == 0 ]]; then
            apt-get update >/dev/null 2>&1 || true
            apt_updated=1
        fi
        apt-get install -y "$2" >/dev/null 2>&1 || true
    fi
    command -v "$1" >/dev/null || die "$1 is required (apt-get install $2)"
}
need_pkg wrk wrk
need_pkg nginx nginx-light
need_pkg curl curl
need_pkg openssl openssl
need_pkg jq jq
need_pkg sha256sum coreutils

# Every concurrent download holds a socket and an open file in the server, and a socket in wrk.
fd_need=$((2 * mem_conns + 512))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fd_have=$(ulimit -n)
nginx_nofile=$fd_have
[[ $fd_have == unlimited ]] && nginx_nofile=65536
if [[ $fd_have != unlimited ]] && ((fd_have < fd_need)); then
    die "open-file limit is $fd_have; $mem_conns concurrent downloads need at least $fd_need (raise the hard limit: ulimit -Hn, /etc/security/limits.conf or the container's nofile)"
fi

# From here on every process inherits this niceness; the build above kept the default.
bench_nice=${BENCH_NICE:--10}
[[ $(id -u) == 0 ]] || bench_nice=${BENCH_NICE:-0}
if [[ $bench_nice != 0 ]]; then
    renice --priority "$bench_nice" -p $$ >/dev/null 2>&1 || {
        say "could not renice to $bench_nice; running at the default priority"
        bench_nice=0
    }
fi

tmp=$(mktemp -d /tmp/ucrelay-download-bench.XXXXXX)
mkdir -p "$tmp/logs" "$tmp/raw" "$tmp/images" "$tmp/www/images"

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
tls_args=(--cacert "$pki/root-ca.crt")

# 4. The image: random bytes, published by the cloud, linked into nginx's docroot.
size_bytes=$((size_mb * 1024 * 1024))
say "writing a $size_mb MiB random image ($image)"
head -c "$size_bytes" /dev/urandom >"$tmp/images/$image"
[[ $(stat -c %s "$tmp/images/$image") == "$size_bytes" ]] || die "could not write $image"
ln "$tmp/images/$image" "$tmp/www/images/$image" 2>/dev/null || cp "$tmp/images/$image" "$tmp/www/images/$image"
want_sha=$(sha256sum "$tmp/images/$image" | cut -d' ' -f1)

# 5. The reference cloud the relay registers with and fetches the image from.
say "starting the reference cloud"
"$bin" sim cloud --listen 127.0.0.1:0 --tenant bench --pin 1 --images "$tmp/images" \
    >"$tmp/logs/cloud.out" 2>"$tmp/logs/cloud.log" &
pids+=("$!")
cloud_ready() { grep -q '^ucrelay sim cloud listening on http://' "$tmp/logs/cloud.out"; }
wait_until 30 cloud_ready || die "the reference cloud did not start: $(cat "$tmp/logs/cloud.log")"
cloud_url=$(sed -n '1s/^ucrelay sim cloud listening on //p' "$tmp/logs/cloud.out")

# 6. The relay. Started once for the throughput run and afresh for the memory run.
relay_port=$(free_port)
sock=$tmp/admin.sock
cfg=$tmp/relay.toml
cat >"$cfg" <<EOF
state_dir = "$tmp/relay-state"

[cloud]
url = "$cloud_url"
tenant_id = "bench"
pin = "1"

[admin]
socket = "$sock"

[edge]
listen = "127.0.0.1:$relay_port"
fqdn = ["$fqdn"]
pfx = "$pki/relay.pfx"
pfx_password_file = "$pki/relay.pfx.pass"
# Every bench client is 127.0.0.1: the per-host cap would stop the memory run at 256.
max_connections_per_ip = 10000

[devices]
subnets = ["127.0.0.0/8"]

[images]
max_downloads = 4000
min_free = "1MB"
EOF
"$bin" check --config "$cfg" >"$tmp/logs/relay-check.log" 2>&1 ||
    die "ucrelay check refused the bench config: $(cat "$tmp/logs/relay-check.log")"

relay_pid=""
relay_runs=0
edge_up() {
    kill -0 "$relay_pid" 2>/dev/null || return 1
    { "$bin" status --socket "$sock" --json 2>/dev/null || true; } | jq -e '.edge != null' >/dev/null 2>&1
}
image_synced() {
    kill -0 "$relay_pid" 2>/dev/null || return 1
    { "$bin" images --socket "$sock" --json 2>/dev/null || true; } |
        jq -e --arg id "$image" 'any(.images[]; .id == $id and .state == "synced")' >/dev/null 2>&1
}
start_relay() {
    relay_runs=$((relay_runs + 1))
    local log=$tmp/logs/relay-$relay_runs.log
    say "starting ucrelay (RUST_LOG=warn, edge https://127.0.0.1:$relay_port)"
    RUST_LOG=warn "$bin" run --config "$cfg" 2>"$log" &
    relay_pid=$!
    pids+=("$relay_pid")
    wait_until 30 edge_up || die "ucrelay did not report its edge: $(tail -n 20 "$log")"
    say "waiting for the relay to sync and verify $image"
    wait_until 600 image_synced || {
        "$bin" images --socket "$sock" --json >&2 2>&1 || true
        die "the image did not reach 'synced' within 600 s: $(tail -n 20 "$log")"
    }
}
stop_relay() {
    stop_pid "$relay_pid"
    wait "$relay_pid" 2>/dev/null || true
    forget_pid "$relay_pid"
    relay_pid=""
}
start_relay

# 7. nginx serving the same file over TLS with the same certificate and key.
nginx_port=$(free_port)
user_line=""
[[ $(id -u) == 0 ]] && user_line="user root;" # the temp dir is 0700
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
$user_line
worker_processes auto;
worker_rlimit_nofile $nginx_nofile;
pid $tmp/nginx/nginx.pid;
error_log $tmp/logs/nginx-error.log warn;
events { worker_connections $((mem_conns + 1024)); }
http {
    client_body_temp_path $tmp/nginx/body;
    proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi;
    uwsgi_temp_path $tmp/nginx/uwsgi;
    scgi_temp_path $tmp/nginx/scgi;
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    keepalive_timeout 65;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $pki/nginx-chain.pem;
    ssl_certificate_key $pki/nginx-key.pem;
    server {
        listen 127.0.0.1:$nginx_port ssl;
        server_name $fqdn;
        root $tmp/www;
        location / { }
    }
}
EOF
say "starting nginx (https://127.0.0.1:$nginx_port)"
nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/logs/nginx-startup.log" \
    -g 'daemon off;' >"$tmp/logs/nginx.out" 2>&1 &
nginx_pid=$!
pids+=("$nginx_pid")
head_ok() { # port: a verified-TLS HEAD of the image answers 200
    local code
    code=$(curl -sS -o /dev/null -I -w '%{http_code}' --max-time 2 "${tls_args[@]}" \
        --resolve "$fqdn:$1:127.0.0.1" "https://$fqdn:$1/images/$image" 2>/dev/null) || return 1
    [[ $code == 200 ]]
}
wait_until 10 head_ok "$nginx_port" || die "nginx did not come up: $(cat "$tmp/logs/nginx"*.log 2>/dev/null)"
wait_until 10 head_ok "$relay_port" || die "ucrelay's edge does not serve /images/$image"

# 8. Both serve byte-identical content (whole downloads over verified TLS; this also brings the
#    relay's cached copy and nginx's file into the page cache before the timed runs).
fetch_sha() { # port: sha256 of a whole download over verified TLS (pipefail is inherited)
    curl -sS --fail --max-time 300 "${tls_args[@]}" --resolve "$fqdn:$1:127.0.0.1" \
        "https://$fqdn:$1/images/$image" | sha256sum
}
for side in nginx relay; do
    port=$nginx_port
    [[ $side == relay ]] && port=$relay_port
    say "checking $side's bytes (full download, sha256)"
    run_child "$tmp/logs/curl-$side.log" fetch_sha "$port" ||
        die "downloading the image from $side failed: $(cat "$tmp/logs/curl-$side.log")"
    got=$(cut -d' ' -f1 "$tmp/logs/curl-$side.log")
    [[ $got == "$want_sha" ]] || die "$side served different bytes: sha256 $got, want $want_sha"
done

IFS='|' read -r nginx_fp nginx_certs nginx_tls <<<"$(tls_info "$nginx_port")"
IFS='|' read -r relay_fp relay_certs relay_tls <<<"$(tls_info "$relay_port")"
same_cert="yes"
[[ -n $nginx_fp && $nginx_fp == "$relay_fp" && $nginx_certs == "$relay_certs" ]] || same_cert="NO"

# ---------------------------------------------------------------------------------------------
# 9. Measuring helpers.
status_kb() { # field pids...: sum of a /proc/PID/status field (VmRSS, VmHWM), in kB
    local field=$1 total=0 pid kb
    shift
    for pid in "$@"; do
        kb=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}
to_mbps() { # wrk's "Transfer/sec" value ("1.02GB", "512.34MB", "900.00KB", "12B") -> MB/s (10^6)
    awk -v v="$1" 'BEGIN {
        m = 1
        if (v ~ /TB$/) m = 1024 ^ 4; else if (v ~ /GB$/) m = 1024 ^ 3
        else if (v ~ /MB$/) m = 1024 ^ 2; else if (v ~ /KB$/) m = 1024
        sub(/[KMGT]?B$/, "", v); printf "%.1f", v * m / 1e6 }'
}

# Sampler for the memory runs: every second, the server's summed VmRSS (kB) and, for the relay,
# its active downloads as the relay itself counts them.
sampler() { # kind out pids...
    local kind=$1 out=$2 active
    shift 2
    while :; do
        active=""
        if [[ $kind == relay ]]; then
            active=$({ "$bin" images --socket "$sock" --json 2>/dev/null || true; } | jq -r '.downloads_active // ""' 2>/dev/null || true)
        fi
        printf '%s\t%s\n' "$(status_kb VmRSS "$@")" "${active:-}" >>"$out"
        sleep 1
    done
}

# One wrk run against one server. Writes one tab-separated row:
#   kind conns MB/s requests errors server_cpu_s other_cpu_% base_rss_kb peak_rss_kb max_active
rows=$tmp/rows.tsv
: >"$rows"
measure() { # kind(relay|nginx) conns sample-memory(0|1)
    local kind=$1 n=$2 mem=$3 port=$nginx_port
    [[ $kind == relay ]] && port=$relay_port
    local raw=$tmp/raw/$kind-$n.txt samples=$tmp/raw/$kind-$n-rss.tsv
    local sp
    read -r -a sp <<<"$(server_pids "$kind")"
    say "$kind, $n connections, $duration"
    local base_kb peak_kb sampler_pid=""
    base_kb=$(status_kb VmRSS "${sp[@]}")
    reset_hwm "${sp[@]}"
    : >"$samples"
    if [[ $mem == 1 ]]; then
        sampler "$kind" "$samples" "${sp[@]}" &
        sampler_pid=$!
        pids+=("$sampler_pid")
    fi
    local c0 c1 m0 m1 o0 o1
    c0=$(cpu_ticks "${sp[@]}")
    read -r -a m0 <<<"$(machine_ticks)"
    o0=$(own_ticks)
    run_child "$raw" wrk -t"$threads" -c"$n" -d"$duration" --timeout 60s "https://127.0.0.1:$port/images/$image" ||
        say "wrk exited non-zero (see $raw)"
    o1=$(own_ticks)
    read -r -a m1 <<<"$(machine_ticks)"
    c1=$(cpu_ticks "${sp[@]}")
    peak_kb=$(status_kb VmHWM "${sp[@]}")
    if [[ -n $sampler_pid ]]; then
        stop_pid "$sampler_pid"
        wait "$sampler_pid" 2>/dev/null || true
        forget_pid "$sampler_pid"
    fi
    local sampled_peak max_active
    sampled_peak=$(awk -F'\t' '$1 + 0 > m { m = $1 + 0 } END { print m + 0 }' "$samples")
    ((sampled_peak > peak_kb)) && peak_kb=$sampled_peak
    max_active=$(awk -F'\t' '$2 != "" && $2 + 0 > m { m = $2 + 0; s = 1 } END { print s ? m : "" }' "$samples")
    local other
    other=$(awk -v busy=$((m1[0] - m0[0])) -v total=$((m1[1] - m0[1])) -v own=$((o1 - o0)) \
        'BEGIN { o = total > 0 ? (busy - own) * 100 / total : 0; printf "%.0f", o < 0 ? 0 : o }')
    ((other > 10)) && say "other processes took ${other}% of the CPU during this run: its numbers are disturbed"
    local tps mbps reqs non2xx sockerr
    tps=$(awk '/^Transfer\/sec:/ {print $2}' "$raw")
    [[ -n $tps ]] || {
        say "no result from wrk for $kind at $n connections:"
        sed 's/^/    /' "$raw" >&2
    }
    mbps=$(to_mbps "${tps:-0B}")
    reqs=$(awk '/requests in/ {print $1; exit}' "$raw")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$raw")
    sockerr=$(sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1 \2 \3 \4/p' "$raw" |
        awk '{print $1 + $2 + $3 + $4}')
    local cpu_s
    cpu_s=$(awk -v t=$((c1 - c0)) -v hz="$clk_tck" 'BEGIN { printf "%.1f", t / hz }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$n" "$mbps" "${reqs:-0}" \
        $((${non2xx:-0} + ${sockerr:-0})) "$cpu_s" "$other" "$base_kb" "$peak_kb" "${max_active:-}" >>"$rows"
}

# ---------------------------------------------------------------------------------------------
# 10. Throughput: one run per server, nginx first, both warm (the checks above read every byte).
measure nginx "$conns" 0
measure relay "$conns" 0

# 11. Memory at $mem_conns concurrent downloads. The relay is restarted so that its baseline is an
#     idle process with the image synced, not one still holding what the throughput run left;
#     one small request warms its TLS and HTTP paths first.
measure nginx "$mem_conns" 1
stop_relay
start_relay
curl -sS --fail -o /dev/null --max-time 10 -r 0-65535 "${tls_args[@]}" \
    --resolve "$fqdn:$relay_port:127.0.0.1" "https://$fqdn:$relay_port/images/$image" ||
    die "the restarted relay does not serve the image"
measure relay "$mem_conns" 1

# ---------------------------------------------------------------------------------------------
# 12. Report.
dur_s=$(secs_of "$duration")
throughput_table() {
    awk -F'\t' -v conns="$conns" -v dur="$dur_s" '
        $2 == conns { mb[$1] = $3; req[$1] = $4; err[$1] = $5; cpu[$1] = $6; oth[$1] = $7 }
        END {
            print "| server | clients | MB/s | ratio vs nginx | requests completed | errors | server CPU s | server CPU s per GB | other CPU % |"
            print "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
            split("nginx relay", K, " ")
            for (i = 1; i <= 2; i++) {
                k = K[i]; if (!(k in mb)) continue
                name = k == "relay" ? "ucrelay" : "nginx"
                ratio = "1.00x"
                if (k == "relay") ratio = "n/a"
                if (k == "relay" && mb["nginx"] > 0) ratio = sprintf("**%.2fx**", mb[k] / mb["nginx"])
                gb = mb[k] * dur / 1000
                per_gb = "n/a"
                if (gb > 0) per_gb = sprintf("%.2f", cpu[k] / gb)
                printf "| %s | %s | %.1f | %s | %s | %s | %s | %s | %s |\n", name, conns, mb[k], ratio, req[k], err[k], cpu[k], per_gb, oth[k]
            }
        }' "$rows"
}
memory_table() {
    awk -F'\t' -v conns="$mem_conns" '
        $2 == conns { mb[$1] = $3; err[$1] = $5; cpu[$1] = $6; oth[$1] = $7; base[$1] = $8; peak[$1] = $9; act[$1] = $10 }
        END {
            print "| server | concurrent downloads | baseline RSS MB | peak RSS MB | growth MB | target | MB/s | errors | server CPU s | other CPU % |"
            print "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|"
            split("relay nginx", K, " ")
            for (i = 1; i <= 2; i++) {
                k = K[i]; if (!(k in mb)) continue
                b = base[k] * 1024 / 1e6; p = peak[k] * 1024 / 1e6; g = p - b
                if (k == "relay") {
                    name = "ucrelay"
                    target = "< 64 MB: **not met**"
                    if (g < 64) target = "< 64 MB: met"
                    dl = conns
                    if (act[k] != "") dl = sprintf("%s (relay counted up to %d)", conns, act[k])
                } else {
                    name = "nginx (master + workers)"; target = "context only"; dl = conns
                }
                printf "| %s | %s | %.1f | %.1f | **%.1f** | %s | %.1f | %s | %s | %s |\n", name, dl, b, p, g, target, mb[k], err[k], cpu[k], oth[k]
            }
        }' "$rows"
}
ratio=$(awk -F'\t' -v c="$conns" '$2 == c { mb[$1] = $3 } END { if (mb["nginx"] > 0) printf "%.2f", mb["relay"] / mb["nginx"]; else print "n/a" }' "$rows")
tput_verdict="not met"
[[ $ratio != n/a ]] && awk -v r="$ratio" 'BEGIN { exit !(r >= 1.0) }' && tput_verdict="met"

head_sha=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=""
[[ $built_state != "$clean_state" ]] && dirty=" with uncommitted changes to src/ or Cargo files (diff ${built_state})"
[[ $(src_state) != "$built_state" ]] && dirty+="; the sources changed while the benchmark ran"
cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
report=$(
    cat <<EOF
# ucrelay image-serving benchmark

- when: $(date -u '+%Y-%m-%d %H:%M UTC'); ucrelay $head_sha$dirty, release build, RUST_LOG=warn
- machine: $(nproc) CPUs ($cpu_model), kernel $(uname -r), $(awk '/^MemTotal:/ {printf "%.0f GB RAM", $2 * 1024 / 1e9}' /proc/meminfo); wrk and the server under test share these CPUs
- niceness of everything measured: $bench_nice
- load: wrk $(dpkg-query -W -f '${Version}' wrk 2>/dev/null || echo '?'), $threads threads, one $duration run per row, \`--timeout 60s\`, GET of a $size_mb MiB ($size_bytes-byte) random image, keep-alive
- ucrelay: the download agent's cached copy (synced from the reference cloud and verified), served by the edge; $(nproc) tokio workers
- nginx $(nginx -v 2>&1 | sed 's/^nginx version: nginx\///'): static file, worker_processes auto, sendfile on, access_log off, keepalive_timeout 65
- TLS as OpenSSL (wrk's library) negotiates it: nginx ${nginx_tls:-?}, ucrelay ${relay_tls:-?}; same certificate and chain on both: $same_cert (leaf SHA-256 ${relay_fp:0:23}…)
- both served byte-identical content before the runs (sha256 ${want_sha:0:16}…)

## Throughput, $conns concurrent downloads

$(throughput_table)

Target: ucrelay at least 1.00x nginx: **$tput_verdict** (${ratio}x).

## Memory, $mem_conns concurrent downloads

$(memory_table)

MB are 10^6 bytes. MB/s is wrk's Transfer/sec (every body byte read, finished downloads or not).
"requests completed" counts whole $size_mb MiB downloads finished within the run; "errors" counts
non-2xx answers and socket errors (connect, read, write, timeout). Server CPU is utime+stime of the
server's processes during the run (nginx: master and workers); per GB it is CPU seconds per 10^9
bytes delivered. "other CPU %" is the share of the machine's CPU taken by processes outside the
benchmark during the run (approximate): above about 10 the row was disturbed and is worth rerunning.
Baseline RSS is VmRSS just before the run (ucrelay: a freshly started relay with the image synced and
one small request served); peak is the larger of VmHWM at the end of the run (reset just before it)
and VmRSS sampled every second during it; growth is peak minus baseline. nginx's figures are summed
over its processes, so pages they share count more than once.
EOF
)
printf '%s\n' "$report"
printf '%s\n' "$report" >"$results"
say "wrote $results"
