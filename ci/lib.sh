# shellcheck shell=bash
# Helpers shared by the ci/<system>/start and stop scripts. Source it; it defines functions only.

# The calling script's name from the repository root, e.g. ci/slurm/start, however it was invoked.
case $0 in
    */ci/*) JQMS_CI_NAME=ci/${0##*/ci/} ;;
    *) JQMS_CI_NAME=$0 ;;
esac

# Print one line, prefixed with the calling script's name, on stderr.
say() { printf '%s: %s\n' "$JQMS_CI_NAME" "$*" >&2; }

# Seconds since the epoch, with a fraction.
now() { date +%s.%N; }

# Seconds elapsed since $1 (a `now` value), one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# quiet COMMAND...: run COMMAND with its output hidden; on failure show the output and return its status.
quiet() {
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if [ $rc -ne 0 ]; then
        say "failed (exit $rc): $*"
        printf '%s\n' "$out" >&2
    fi
    return $rc
}

# poll TIMEOUT_S COMMAND...: run COMMAND every 0.1 s until it succeeds (return 0) or TIMEOUT_S passes (return 1).
poll() {
    local deadline
    deadline=$(awk -v t="$(now)" -v d="$1" 'BEGIN { printf "%.3f", t + d }')
    shift
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        awk -v t="$(now)" -v d="$deadline" 'BEGIN { exit !(t > d) }' && return 1
        sleep 0.1
    done
}

# The pid in pidfile $1 if that process is alive, else nothing (and return 1).
live_pid() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # A zombie answers kill -0 but is gone for our purposes.
    [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
    echo "$pid"
}

pids_gone() {
    local p
    for p in "$@"; do
        kill -0 "$p" 2>/dev/null && [ "$(awk '{ print $3 }' "/proc/$p/stat" 2>/dev/null)" != Z ] && return 1
    done
    return 0
}

# stop_pidfiles TIMEOUT_S PIDFILE...: SIGTERM each live pid, wait until all are gone, SIGKILL stragglers after
# TIMEOUT_S and wait again (5 s). Removes the pidfiles. Returns 1 if a process survived SIGKILL.
stop_pidfiles() {
    local timeout=$1 f pid pids=()
    shift
    for f in "$@"; do
        if pid=$(live_pid "$f"); then pids+=("$pid"); fi
    done
    if [ ${#pids[@]} -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        if ! poll "$timeout" pids_gone "${pids[@]}"; then
            say "still alive after SIGTERM and ${timeout} s, sending SIGKILL: ${pids[*]}"
            kill -KILL "${pids[@]}" 2>/dev/null || true
            poll 5 pids_gone "${pids[@]}" || { say "could not kill: ${pids[*]}"; return 1; }
        fi
    fi
    rm -f "$@"
}
