#!/usr/bin/env bash
# Runs one of hmm's fuzz targets for a while:
#
#   fuzz/run.sh ops|api [seconds] [more libFuzzer flags...]
#
# New inputs go to fuzz/corpus/<target>, crashes to fuzz/artifacts/<target>
# (save the ones that show a bug under fuzz/regressions/<target>/). Needs the
# nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); set
# CARGO_TARGET_DIR to build elsewhere. Shrink the corpus afterwards with
# `cargo +nightly fuzz cmin <target>` (with the same ASAN_OPTIONS).
#
# The flags every run needs:
# - no leak checks (`detect_leaks=0`, both): LeakSanitizer's check can fork a
#   symbolizer while it holds the allocator's lock, and with hmm's
#   userfaultfd (EVENT_FORK) that fork waits for the fault service, which
#   waits for the lock: the process hangs;
# - SIGBUS left alone (`handle_sigbus=0`, `-handle_bus=0`): the ops target's
#   children touch pages lost with a failed device and must die of SIGBUS,
#   which the sanitizer and libFuzzer would otherwise catch and report.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh ops|api [seconds] [libFuzzer flags...]}
seconds=${2:-180}
shift $(($# < 2 ? $# : 2))
export ASAN_OPTIONS="detect_leaks=0:handle_sigbus=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
exec cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -detect_leaks=0 \
    -handle_bus=0 -rss_limit_mb=4096 -timeout=60 -max_len=1024 "$@"
