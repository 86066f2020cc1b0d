# Helpers shared by the benchmark scripts (sourced, not run). The including script sets `here` and
# `repo` first and runs under `set -euo pipefail`.
#
# Every process a script starts is recorded in `pids` and stopped on any exit: normal end,
# failure, Ctrl-C or SIGTERM. Long runs (wrk, curl) go through `run_child`, a recorded background
# child the script waits on, so a signal interrupts the wait at once. `tmp` is removed on exit
# unless BENCH_KEEP=1.

say() { printf '[bench] %s\n' "$*" >&2; }
die() {
    printf '[bench] error: %s\n' "$*" >&2
    exit 1
}

pids=()
tmp=""

stop_pid() { # pid: TERM, up to 10 s to go, then KILL
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        stop_pid "$pid"
    done
    wait 2>/dev/null || true
    if [[ -n $tmp && -d $tmp ]]; then
        if [[ ${BENCH_KEEP:-0} == 1 ]]; then
            say "kept $tmp"
        else
            rm -rf "$tmp"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() { # drop a pid that has ended from the cleanup list
    local keep=() p
    for p in "${pids[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    pids=("${keep[@]}")
}

run_child() { # out-file cmd...: run cmd as a recorded child with stdout+stderr to out-file, wait
    "${@:2}" >"$1" 2>&1 &
    local pid=$! rc=0
    pids+=("$pid")
    wait "$pid" || rc=$?
    forget_pid "$pid"
    return "$rc"
}

# A port nobody listens on, not handed out before in this run. Ports come from a range below the
# kernel's ephemeral range so that outgoing connections (wrk's, the proxies') cannot take them.
used_ports=" "
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 12000))
        [[ $used_ports == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            used_ports+="$p "
            echo "$p"
            return 0
        fi
    done
    die "no free port found on 127.0.0.1"
}

# Polls `cmd...` every 0.1 s until it succeeds, for at most $1 seconds.
wait_until() {
    local secs=$1 i
    shift
    for ((i = 0; i < secs * 10; i++)); do
        if "$@"; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

secs_of() { # "20s" / "2m" / "20" -> seconds
    awk -v v="$1" 'BEGIN { m = 1; if (v ~ /m$/) m = 60; if (v ~ /h$/) m = 3600; sub(/[smh]$/, "", v); print v * m }'
}

# Sets `bin`: BENCH_BIN when given, otherwise a release build of this checkout.
bench_binary() {
    if [[ -n ${BENCH_BIN:-} ]]; then
        bin=$BENCH_BIN
        say "using the prebuilt binary $bin (BENCH_BIN)"
    else
        say "building the release binary (cargo build --release --locked)"
        (cd "$repo" && cargo build --release --locked) >&2
        local target_dir=${CARGO_TARGET_DIR:-target}
        [[ $target_dir == /* ]] || target_dir=$repo/$target_dir
        bin=$target_dir/release/ucrelay
    fi
    [[ -x $bin ]] || die "$bin not found after the build"
}

pem_blocks() { sed -n '/-----BEGIN/,/-----END/p'; }

# The served certificate and the negotiated TLS parameters, as OpenSSL (wrk's library) sees them:
# "leaf fingerprint|certificates sent|protocol cipher". Needs `fqdn`.
tls_info() { # port
    local out fp certs proto
    out=$(openssl s_client -connect "127.0.0.1:$1" -servername "$fqdn" -showcerts </dev/null 2>/dev/null) || true
    fp=$(printf '%s\n' "$out" | openssl x509 -noout -fingerprint -sha256 2>/dev/null | sed 's/.*=//')
    certs=$(printf '%s\n' "$out" | grep -c 'BEGIN CERTIFICATE' || true)
    proto=$(printf '%s\n' "$out" | sed -n 's/^New, \(.*\), Cipher is \(.*\)$/\1 \2/p' | head -n 1)
    echo "$fp|$certs|$proto"
}

clk_tck=$(getconf CLK_TCK)
cpu_ticks() { # pids...: utime + stime, all threads
    local total=0 pid f
    for pid in "$@"; do
        [[ -r /proc/$pid/stat ]] || continue
        read -r -a f <<<"$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
reset_hwm() { # pids...: start VmHWM afresh (root or owner only; harmless when refused)
    local pid
    for pid in "$@"; do
        { echo 5 >"/proc/$pid/clear_refs"; } 2>/dev/null || true
    done
}
server_pids() { # relay|pingora|nginx: the relay, Pingora, or nginx's master and workers
    # (`relay_pid`, `pingora_pid`, `nginx_pid`)
    if [[ $1 == relay ]]; then
        echo "$relay_pid"
    elif [[ $1 == pingora ]]; then
        echo "$pingora_pid"
    else
        { echo "$nginx_pid"; pgrep -P "$nginx_pid" || true; } | tr '\n' ' '
    fi
}
# task_progress CLOUD_URL TASK_ID: sets task_status, task_done (success + failure + not
# applicable) and task_failed from the cloud's task summaries, or returns 1 before the task is
# listed. Read with bash alone, no jq: these benchmarks poll ten times a second for half a minute
# while the machine is saturated, and a jq per poll cost it 3-4 CPU s, taken from the processes
# being measured. The world holds this one task, so each field appears once.
task_progress() {
    local sums field
    sums=$(curl -sf "$1/sim/tasks") || return 1
    [[ $sums =~ \"id\":\"$2\" && $sums =~ \"status\":\"([a-z_]+)\" ]] || return 1
    task_status=${BASH_REMATCH[1]}
    task_done=0
    for field in success failure not_applicable; do
        [[ $sums =~ \"$field\":([0-9]+) ]] && task_done=$((task_done + BASH_REMATCH[1]))
    done
    task_failed=0
    if [[ $sums =~ \"failure\":([0-9]+) ]]; then task_failed=${BASH_REMATCH[1]}; fi
}

# CPU ticks of the whole machine, busy and total, from /proc/stat.
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
# Idle (idle + iowait) and total CPU ticks from /proc/stat, of the whole machine or of one CPU.
idle_ticks() { # [cpuN]
    awk -v c="${1:-cpu}" '$1 == c {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit}' /proc/stat
}
# CPU ticks of everything this script runs: its long-lived children (and nginx workers), plus
# itself and every child it has reaped (wrk, curl, awk...).
own_ticks() {
    local all=() p f
    for p in "${pids[@]}"; do
        all+=("$p")
        mapfile -t -O "${#all[@]}" all < <(pgrep -P "$p" || true)
    done
    read -r -a f <<<"$(sed 's/^.*) //' "/proc/$$/stat")"
    echo $(($(cpu_ticks "${all[@]}") + f[11] + f[12] + f[13] + f[14]))
}
