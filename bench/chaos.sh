#!/usr/bin/env bash
# The chaos profiles: the reference cloud, two relays and 1,000 simulated phones under faults that
# happen together, with the relay's promises checked while they run and after they stop. The
# harness is crates/chaos (`ucrelay-chaos`); see bench/README.md for what it does and checks.
#
#   usage: bench/chaos.sh short|long [SEED]
#
#   short   the CI profile: seeds 1, 2 and 3, 40 s of faults each (about 2.5 minutes in all),
#           every kind of fault and every kill point in each seed; a debug build.
#   long    the soak: one random seed (printed), an hour of faults with the cloud killed every
#           60 s; a release build. CHAOS_DURATION=600 shortens it to 10 minutes.
#   SEED    replays that seed alone: the same faults at the same offsets against the same work.
#
# Needs root (network namespaces, tmpfs mounts) and iproute2. Everything it creates is removed on
# any exit, Ctrl-C included. Exit 0 when no promise broke; the last line printed is the figures.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
profile=${1:-}
seed=${2:-}
case $profile in
short | long) ;;
*)
    echo "usage: bench/chaos.sh short|long [SEED]" >&2
    exit 2
    ;;
esac
if [[ -n $seed && ! $seed =~ ^[0-9]+$ ]]; then
    echo "chaos: SEED must be a number, got $seed" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "chaos: needs root (network namespaces, tmpfs mounts); run it as root, as CI does" >&2
    exit 2
fi
command -v ip >/dev/null 2>&1 || {
    echo "chaos: needs ip (apt-get install iproute2)" >&2
    exit 2
}

cd "$repo"
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir=$repo/$target_dir
if [[ $profile == short ]]; then
    cargo build --locked -p ucrelay -p ucrelay-chaos >&2
    bin=$target_dir/debug
else
    cargo build --release --locked -p ucrelay -p ucrelay-chaos >&2
    bin=$target_dir/release
fi

args=(--profile "$profile" --bin "$bin/ucrelay")
[[ -n $seed ]] && args+=(--seed "$seed")
[[ -n ${CHAOS_DURATION:-} ]] && args+=(--duration "$CHAOS_DURATION")
[[ ${CHAOS_KEEP:-0} == 1 ]] && args+=(--keep)
exec "$bin/ucrelay-chaos" "${args[@]}"
