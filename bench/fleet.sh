#!/usr/bin/env bash
# Fleet benchmark: two relays (`ucrelay run`, on 127.0.0.2 and 127.0.0.3) in front of one reference
# cloud (`ucrelay sim cloud`) and BENCH_FLEET_PHONES (50,000) simulated phones that answer after
# 50-200 ms, all on this machine.
#
#   usage: bench/fleet.sh
#
# It measures:
#   1. the monitoring split: each relay's share of the device list (target: within 10% of even);
#   2. a reboot task to every phone, spread over both relays, with relay A SIGKILLed once half of
#      the results are at the cloud: the time until every target's result is at the cloud, the
#      targets the cloud moved from A to B, duplicate results (a target reported by both relays;
#      counted once in the totals) and phones rebooted twice (the window docs/protocol.md section 10
#      describes).
#
# Knobs (environment): BENCH_FLEET_PHONES, BENCH_INACTIVE_AFTER (10s: how long the cloud waits for
# a silent relay), BENCH_TASK_CONCURRENCY (512, per relay), BENCH_BIN (a release binary to use
# instead of building one), BENCH_KEEP=1 (keep the temp dir). A benchmark, not a test: exits 0
# whatever the numbers are. Output: Markdown on stdout and in bench/results-fleet.md. All traffic
# stays on 127.0.0.0/8.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
phones=${BENCH_FLEET_PHONES:-50000}
inactive_after=${BENCH_INACTIVE_AFTER:-10s}
concurrency=${BENCH_TASK_CONCURRENCY:-512}
results=$here/results-fleet.md

# shellcheck source=bench/lib.sh
source "$here/lib.sh"

command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
command -v curl >/dev/null || die "curl is needed"

bench_binary
tmp=$(mktemp -d /tmp/ucrelay-bench-fleet.XXXXXX)
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

"$bin" sim cloud --listen 127.0.0.1:0 --tenant bench --pin 424242 --inactive-after "$inactive_after" \
    --heartbeat-interval 2s >"$tmp/cloud.out" 2>"$tmp/cloud.err" &
cloud_pid=$!
pids+=("$cloud_pid")
cloud_url=""
for _ in $(seq 100); do
    cloud_url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$tmp/cloud.out" 2>/dev/null | head -1) || true
    [[ -n $cloud_url ]] && break
    sleep 0.1
done
[[ -n $cloud_url ]] || die "reference cloud did not start"

RUST_LOG=warn "$bin" sim phones --count "$phones" --base-ip 127.3.0.1 --reboot-time 3s \
    --answer-delay-ms 50-200 >"$tmp/phones.out" 2>"$tmp/phones.err" &
phones_pid=$!
pids+=("$phones_pid")
phones_port=""
for _ in $(seq 600); do
    phones_port=$(grep -o 'port [0-9]*' "$tmp/phones.out" 2>/dev/null | head -1 | cut -d' ' -f2) || true
    [[ -n $phones_port ]] && break
    sleep 0.1
done
[[ -n $phones_port ]] || die "phones did not start"

start_relay() { # name address -> sets relay_pid_<name>
    local name=$1 addr=$2 dir=$tmp/$1
    mkdir -p "$dir"
    cat >"$dir/relay.toml" <<EOF
state_dir = "$dir/state"

[cloud]
url = "$cloud_url"
tenant_id = "bench"
pin = "424242"
heartbeat_interval = "2s"
addresses = ["$addr"]

[admin]
socket = "$dir/admin.sock"

[devices]
subnets = ["127.0.0.0/8"]
poll_interval = "2h"
request_timeout = "10s"
task_concurrency = $concurrency
max_sessions = $concurrency
EOF
    RUST_LOG=warn "$bin" run --config "$dir/relay.toml" 2>"$dir/relay.err" &
    local pid=$!
    pids+=("$pid")
    printf -v "relay_pid_$name" '%s' "$pid"
    wait_until 20 sh -c "'$bin' status --socket '$dir/admin.sock' --json 2>/dev/null | jq -e '.cloud.channel == \"connected\"' >/dev/null" ||
        die "relay $name did not connect"
}
start_relay a 127.0.0.2
start_relay b 127.0.0.3
a_id=$("$bin" status --socket "$tmp/a/admin.sock" --json | jq -r .relay_id)

python3 -c '
import ipaddress, json, sys
n, base, port = int(sys.argv[1]), ipaddress.IPv4Address(sys.argv[2]), sys.argv[3]
print(json.dumps([f"{base + i}:{port}" for i in range(n)]))' "$phones" 127.3.0.1 "$phones_port" >"$tmp/targets.json"

# ---------------------------------------------------------------------------------------------
say "1. monitoring split of $phones devices over two relays"
jq '{devices: map({address: .})}' "$tmp/targets.json" |
    curl -sf -X POST -H 'content-type: application/json' --data-binary @- "$cloud_url/sim/devices" >/dev/null
shares=""
for _ in $(seq 300); do
    shares=$(curl -sf "$cloud_url/sim/relays" | jq -r '[.[].devices_assigned] | map(tostring) | join(" ")')
    read -r s1 s2 <<<"$shares"
    ((${s1:-0} + ${s2:-0} == phones)) && break
    sleep 0.1
done
read -r s1 s2 <<<"$shares"
even=$((phones / 2))
dev=$(awk -v a="$s1" -v b="$s2" -v e="$even" 'BEGIN { d1 = (a > e ? a - e : e - a) / e; d2 = (b > e ? b - e : e - b) / e; printf "%.1f", 100 * (d1 > d2 ? d1 : d2) }')
say "shares: $s1 and $s2 (furthest from even: $dev%)"

# ---------------------------------------------------------------------------------------------
say "2. reboot task to $phones phones over both relays; relay A SIGKILLed at half"
t0=$(date +%s.%N)
task_id=$(jq -n --slurpfile t "$tmp/targets.json" '{type: "reboot", targets: $t[0], name: "bench fleet reboot"}' |
    curl -sf -X POST -H 'content-type: application/json' --data-binary @- "$cloud_url/sim/tasks" | jq -r .task_id)
[[ -n $task_id && $task_id != null ]] || die "task not created"
killed_at=""
done_n=0
status=""
for _ in $(seq 6000); do
    # The list of summaries, not the task itself: that carries every target's result.
    task_progress "$cloud_url" "$task_id" && status=$task_status done_n=$task_done
    if [[ -z $killed_at ]] && ((done_n >= phones / 2)); then
        kill -KILL "$relay_pid_a"
        killed_at=$(date +%s.%N)
        say "relay A ($a_id) killed at $done_n results"
    fi
    [[ $status == done ]] && break
    sleep 0.1
done
t1=$(date +%s.%N)
wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
after_kill=$(awk -v a="${killed_at:-$t1}" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
stats=$(curl -sf "$cloud_url/sim/stats")
moved=$(jq .targets_moved <<<"$stats")
dups=$(jq .duplicate_target_results <<<"$stats")
t=$(curl -sf "$cloud_url/sim/tasks/$task_id")
total=$(jq .total <<<"$t")
success=$(jq .success <<<"$t")
failure=$(jq .failure <<<"$t")
entries=$(jq '.results | length' <<<"$t")
distinct=$(jq '[.results[].target] | unique | length' <<<"$t")
reboots=$(curl -sf "http://127.3.0.1:$phones_port/sim/stats" | jq .reboots)
twice=$((reboots - phones))
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
say "task $status: $success success, $failure failure of $total in $wall s ($after_kill s after the kill); $moved targets moved; $dups duplicate results; $entries entries for $distinct targets; $twice phones rebooted twice"

split_ok=$(awk -v d="$dev" 'BEGIN { print (d <= 10) ? "met" : "**not met**" }')
{
    echo "# Fleet benchmark"
    echo
    echo "- when: $(date -u '+%Y-%m-%d %H:%M UTC'); ucrelay $(git -C "$repo" rev-parse --short HEAD), release build, RUST_LOG=warn"
    echo "- machine: $(nproc) cores, shared: load average $load_before before, $load_after after; cloud, $phones phones (answering after 50-200 ms) and two relays on the same machine"
    echo "- cloud --inactive-after $inactive_after, relays heartbeat every 2s, task_concurrency and max_sessions $concurrency each"
    echo
    echo "| measure | result | target |"
    echo "|---|---|---|"
    echo "| monitoring shares of $phones devices | $s1 / $s2 (furthest $dev% from even) | within 10% of even: $split_ok |"
    echo "| reboot task over both relays, A SIGKILLed at half: every result at the cloud | $wall s ($after_kill s after the kill) | |"
    echo "| totals | $success success, $failure failure of $total; $entries result entries for $distinct targets | one per target |"
    echo "| targets moved from A to B | $moved | |"
    echo "| duplicate results (counted once) | $dups | 0 |"
    echo "| phones rebooted twice (A's in-flight and unsent results at the kill) | $twice | at most A's concurrency + one results batch |"
} | tee "$results"
