#!/usr/bin/env bash
# Device-plane benchmark: the relay driving large simulated fleets (`ucrelay sim phones`, each phone
# on its own loopback address) for the reference cloud (`ucrelay sim cloud`), all on this machine.
#
#   usage: bench/devices.sh
#
# It measures:
#   1. a reboot task to BENCH_TASK_PHONES (50,000) phones that answer after 50-200 ms: wall time
#      from the task's creation at the cloud until every target's result is at the cloud, relay
#      CPU seconds and peak RSS (target: under 30 s);
#   2. one monitoring cycle over BENCH_POLL_PHONES (50,000) phones with poll_interval compressed to
#      BENCH_POLL_PERIOD (5m), from the moment the relay holds the whole device list: relay CPU
#      (average cores) and peak RSS over the period, how many devices were polled, and how many
#      the cloud received a report of, each exactly once (targets: every device, under 0.2 core,
#      under 100 MB RSS).
#
# Knobs (environment): BENCH_TASK_PHONES, BENCH_POLL_PHONES, BENCH_POLL_PERIOD (seconds, default
# 300), BENCH_TASK_CONCURRENCY (task_concurrency and max_sessions, default 512: a task works on at
# most max_sessions targets at once, whatever its own limit), BENCH_BIN (a release binary to use
# instead of building one), BENCH_KEEP=1 (keep the temp dir).
# A benchmark, not a test: exits 0 whatever the numbers are. Output: Markdown on stdout and in
# bench/results-devices.md. All traffic stays on 127.0.0.0/8.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
task_phones=${BENCH_TASK_PHONES:-50000}
task_concurrency=${BENCH_TASK_CONCURRENCY:-512}
poll_phones=${BENCH_POLL_PHONES:-50000}
poll_period=${BENCH_POLL_PERIOD:-300}
results=$here/results-devices.md

# shellcheck source=bench/lib.sh
source "$here/lib.sh"

command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
command -v curl >/dev/null || die "curl is needed"

bench_binary
tmp=$(mktemp -d /tmp/ucrelay-bench-devices.XXXXXX)
# 50,000 phones and their connections need more than the usual 1,024 descriptors.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cpu_s() { # pid -> utime+stime seconds
    awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}
hwm_mb() { awk '/VmHWM/ { printf "%.1f", $2 * 1024 / 1e6 }' "/proc/$1/status"; }
rss_mb() { awk '/VmRSS/ { printf "%.1f", $2 * 1024 / 1e6 }' "/proc/$1/status"; }

# Starts a reference cloud, `count` phones from base_ip, and a relay; sets cloud/phones/relay pids,
# cloud_url and phones_port.
start_world() { # name count base_ip poll_interval [phone flags...]
    local name=$1 count=$2 base=$3 poll=$4 dir=$tmp/$1
    shift 4
    mkdir -p "$dir"
    "$bin" sim cloud --listen 127.0.0.1:0 --tenant bench --pin 424242 >"$dir/cloud.out" 2>"$dir/cloud.err" &
    cloud_pid=$!
    pids+=("$cloud_pid")
    for _ in $(seq 100); do
        cloud_url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$dir/cloud.out" "$dir/cloud.err" 2>/dev/null | head -1 | cut -d: -f2-) || true
        [[ -n $cloud_url ]] && break
        sleep 0.1
    done
    [[ -n $cloud_url ]] || die "reference cloud did not start ($dir)"
    RUST_LOG=warn "$bin" sim phones --count "$count" --base-ip "$base" --reboot-time 3s "$@" >"$dir/phones.out" 2>"$dir/phones.err" &
    phones_pid=$!
    pids+=("$phones_pid")
    for _ in $(seq 600); do
        phones_port=$(grep -o 'port [0-9]*' "$dir/phones.out" 2>/dev/null | head -1 | cut -d' ' -f2) || true
        [[ -n $phones_port ]] && break
        sleep 0.1
    done
    [[ -n $phones_port ]] || die "phones did not start ($dir)"
    cat >"$dir/relay.toml" <<EOF
state_dir = "$dir/state"

[cloud]
url = "$cloud_url"
tenant_id = "bench"
pin = "424242"
heartbeat_interval = "5s"

[admin]
socket = "$dir/admin.sock"

[devices]
subnets = ["127.0.0.0/8"]
poll_interval = "$poll"
request_timeout = "10s"
task_concurrency = $task_concurrency
max_sessions = $task_concurrency
EOF
    RUST_LOG=warn "$bin" run --config "$dir/relay.toml" 2>"$dir/relay.err" &
    relay_pid=$!
    pids+=("$relay_pid")
    for _ in $(seq 200); do
        "$bin" status --socket "$dir/admin.sock" --json 2>/dev/null | jq -e '.cloud.channel == "connected"' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "relay did not connect ($dir)"
}

stop_world() {
    kill -TERM "$relay_pid" "$phones_pid" "$cloud_pid" 2>/dev/null || true
    wait "$relay_pid" "$phones_pid" "$cloud_pid" 2>/dev/null || true
}

targets_json() { # count base_ip port
    python3 -c '
import ipaddress, json, sys
n, base, port = int(sys.argv[1]), ipaddress.IPv4Address(sys.argv[2]), sys.argv[3]
print(json.dumps([f"{base + i}:{port}" for i in range(n)]))' "$@"
}

# ---------------------------------------------------------------------------------------------
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
say "1. reboot task to $task_phones phones answering after 50-200 ms"
start_world task "$task_phones" 127.1.0.1 2h --answer-delay-ms 50-200
targets_json "$task_phones" 127.1.0.1 "$phones_port" >"$tmp/targets.json"
cpu0=$(cpu_s "$relay_pid")
others0=$(awk -v a="$(cpu_s "$cloud_pid")" -v b="$(cpu_s "$phones_pid")" 'BEGIN { print a + b }')
machine0=$(machine_ticks)
t0=$(date +%s.%N)
task_id=$(jq -n --slurpfile t "$tmp/targets.json" '{type: "reboot", targets: $t[0], name: "bench reboot wave"}' |
    curl -sf -X POST -H 'content-type: application/json' --data-binary @- "$cloud_url/sim/tasks" | jq -r .task_id)
[[ -n $task_id && $task_id != null ]] || die "task not created"
done_n=0
fail_n=0
for _ in $(seq 3000); do
    # The summaries, not the task itself: that carries every target's result.
    if task_progress "$cloud_url" "$task_id"; then
        done_n=$task_done fail_n=$task_failed
        [[ $task_status == done && $done_n -ge $task_phones ]] && break
    fi
    sleep 0.1
done
t1=$(date +%s.%N)
task_wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
task_cpu=$(awk -v a="$cpu0" -v b="$(cpu_s "$relay_pid")" 'BEGIN { printf "%.1f", b - a }')
task_hwm=$(hwm_mb "$relay_pid")
others_cpu=$(awk -v a="$(cpu_s "$cloud_pid")" -v b="$(cpu_s "$phones_pid")" -v c="$others0" 'BEGIN { printf "%.1f", a + b - c }')
read -r busy1 total1 <<<"$(machine_ticks)"
read -r busy0 total0 <<<"$machine0"
machine_busy=$(awk -v b0="$busy0" -v b1="$busy1" -v t0="$total0" -v t1="$total1" 'BEGIN { printf "%.0f", 100 * (b1 - b0) / (t1 - t0) }')
say "task: cloud + phones CPU $others_cpu s; the machine was ${machine_busy}% busy"
say "task: $done_n results ($fail_n failed) at the cloud in $task_wall s, relay CPU $task_cpu s, peak RSS $task_hwm MB"
stop_world

# ---------------------------------------------------------------------------------------------
say "2. monitoring cycle over $poll_phones phones, poll_interval ${poll_period}s"
start_world poll "$poll_phones" 127.2.0.1 "${poll_period}s"
targets_json "$poll_phones" 127.2.0.1 "$phones_port" | jq '{devices: map({address: .})}' |
    curl -sf -X POST -H 'content-type: application/json' --data-binary @- "$cloud_url/sim/devices" >/dev/null
# The cycle starts when the relay holds the whole list: a device is polled once per period from
# the moment the relay knows it.
for _ in $(seq 600); do
    known=$("$bin" status --socket "$tmp/poll/admin.sock" --json 2>/dev/null | jq '.devices.devices.known') || true
    [[ $known == "$poll_phones" ]] && break
    sleep 0.1
done
[[ $known == "$poll_phones" ]] || die "the relay did not take the device list"
rss_base=$(rss_mb "$relay_pid")
polls0=$("$bin" status --socket "$tmp/poll/admin.sock" --json | jq '.devices.polls')
cpu0=$(cpu_s "$relay_pid")
t0=$(date +%s)
peak=0
while (($(date +%s) - t0 < poll_period)); do
    r=$(rss_mb "$relay_pid")
    peak=$(awk -v a="$peak" -v b="$r" 'BEGIN { print (b > a) ? b : a }')
    sleep 1
done
elapsed=$(($(date +%s) - t0))
poll_cpu=$(awk -v a="$cpu0" -v b="$(cpu_s "$relay_pid")" 'BEGIN { printf "%.1f", b - a }')
poll_cores=$(awk -v c="$poll_cpu" -v e="$elapsed" 'BEGIN { printf "%.2f", c / e }')
poll_hwm=$(hwm_mb "$relay_pid")
st=$("$bin" status --socket "$tmp/poll/admin.sock" --json || true)
polled=$(($(jq '.devices.polls' <<<"$st") - polls0))
online=$(jq '.devices.devices.online' <<<"$st")
# Reports per device at the cloud during the period: every device exactly once.
curl -sf "$cloud_url/sim/devices" | jq '[.reported_by[] | add]' >"$tmp/reported.json"
reported=$(jq 'length' "$tmp/reported.json")
once=$(jq 'map(select(. == 1)) | length' "$tmp/reported.json")
say "monitoring: $polled polls ($online online), $reported devices reported ($once exactly once) in ${elapsed}s, relay CPU $poll_cpu s ($poll_cores cores), RSS $rss_base -> peak $poll_hwm MB"
stop_world

task_ok=$(awk -v w="$task_wall" 'BEGIN { print (w < 30) ? "met" : "**not met**" }')
cpu_ok=$(awk -v c="$poll_cores" 'BEGIN { print (c < 0.2) ? "met" : "**not met**" }')
rss_ok=$(awk -v r="$poll_hwm" 'BEGIN { print (r < 100) ? "met" : "**not met**" }')
all_ok=$( ((polled == poll_phones && once == poll_phones)) && echo met || echo "**not met**")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo "# Device plane benchmark"
    echo
    echo "- when: $(date -u '+%Y-%m-%d %H:%M UTC'); ucrelay $(git -C "$repo" rev-parse --short HEAD), release build, RUST_LOG=warn"
    echo "- machine: $(nproc) cores, shared: load average $load_before before, $load_after after; reference cloud, phone simulator and relay on the same machine"
    echo "- relay: task_concurrency and max_sessions $task_concurrency; the task's phones answer after 50-200 ms"
    echo
    echo "| run | devices | wall s | relay CPU s | relay CPU cores avg | relay peak RSS MB | outcome | target |"
    echo "|---|--:|--:|--:|--:|--:|---|---|"
    echo "| reboot task, results at the cloud | $task_phones | $task_wall | $task_cpu | $(awk -v c="$task_cpu" -v w="$task_wall" 'BEGIN { printf "%.2f", c / w }') | $task_hwm | $done_n results, $fail_n failed | < 30 s: $task_ok |"
    echo "| monitoring cycle (poll_interval ${poll_period}s) | $poll_phones | $elapsed | $poll_cpu | $poll_cores | $poll_hwm | $polled polls, $online online, $reported reported ($once exactly once) | every device once: $all_ok; < 0.2 core: $cpu_ok; < 100 MB: $rss_ok |"
    echo
    echo "During the task the reference cloud and the phone simulator used $others_cpu CPU s together; the whole machine was ${machine_busy}% busy."
    echo
    echo "Each poll is one TLS connection with three REST requests (device/info, lineInfo, callStatus);"
    echo "each reboot target one TLS connection and one request. RSS is VmHWM of the relay process."
} | tee "$results"
