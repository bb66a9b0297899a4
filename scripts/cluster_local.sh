#!/usr/bin/env bash
# A multi-node Ray on this machine, for development and CI: the same `ray start` a `ray up`
# cluster runs on each machine, one node per `ray start`.
#
#   scripts/cluster_local.sh up N     start a head (tb-node-0) and N worker nodes (tb-node-1..N)
#   scripts/cluster_local.sh env      the exports that point a shell at it:
#                                       eval "$(scripts/cluster_local.sh env)"
#   scripts/cluster_local.sh status   its nodes and how many of its processes run
#   scripts/cluster_local.sh down     stop exactly the processes `up` started
#
# Every node has its own CPUs and custom resources: a resource naming it (tb-node-<k>: 1),
# and on the head threadbound-supervisor: 1 (the supervisor is pinned to nodes that have it).
# Each node is one `ray start --block` process (with its own temp directory, so the nodes
# start in parallel without racing for socket and log file names); the Ray processes of
# the node are its children. `up` records every one of them, with its start time, in
# $TMPDIR/threadbound-cluster-local-<uid>/pids (a 0700 directory of yours); `down` signals only those (and their children), by
# PID: TERM to each node's `ray start`, which stops its node, then TERM, then KILL, to
# whatever is left after a grace period. It never runs `ray stop`, which stops every Ray of
# the machine. The nodes use their own ports and temp directories, never /tmp/ray, so other
# Ray instances on this machine neither see them nor are seen by them.
#
# Token authentication is on, as Ray 2.60 turns it on for local clusters: the token comes
# from RAY_AUTH_TOKEN, else from the file RAY_AUTH_TOKEN_PATH names (made, mode 0600, if it
# does not exist), else from ~/.ray/auth_token (made if it does not exist, as `ray.init()`
# does). Set RAY_AUTH_TOKEN_PATH to keep the token out of your home directory.
# RAY_AUTH_MODE=disabled turns authentication off.
#
# Settings (environment): CLUSTER_LOCAL_HEAD_CPUS (default 1), CLUSTER_LOCAL_WORKER_CPUS (2),
# CLUSTER_LOCAL_OBJECT_STORE_MB (200, per node), CLUSTER_LOCAL_GRACE_S (15: how long `down`
# waits for a graceful stop before it signals the rest), CLUSTER_LOCAL_START_TIMEOUT_S (120),
# PYTHON (python3: picks free ports), TMPDIR (where the state goes).

set -euo pipefail

STATE_DIR="${TMPDIR:-/tmp}"
STATE_DIR="${STATE_DIR%/}/threadbound-cluster-local-$(id -u)"
PIDS="$STATE_DIR/pids"        # one line per process: PID START_TIME NODE/NAME
ENV_FILE="$STATE_DIR/env"     # the exports `env` prints
INFO="$STATE_DIR/info"        # address, dashboard, node count, Ray temp root
LOGS="$STATE_DIR/logs"        # each node's `ray start` output

HEAD_CPUS="${CLUSTER_LOCAL_HEAD_CPUS:-1}"
WORKER_CPUS="${CLUSTER_LOCAL_WORKER_CPUS:-2}"
OBJECT_STORE_MB="${CLUSTER_LOCAL_OBJECT_STORE_MB:-200}"
GRACE_S="${CLUSTER_LOCAL_GRACE_S:-15}"
START_TIMEOUT_S="${CLUSTER_LOCAL_START_TIMEOUT_S:-120}"
PYTHON="${PYTHON:-python3}"

say() { printf '%s\n' "$*"; }

# $1 quoted for a POSIX shell, as Python's shlex.quote does: bare if it holds only safe
# characters, else in single quotes, each ' inside written as '"'"'.
shell_quote() {
    case "$1" in
        '') printf "''" ;;
        *[!A-Za-z0-9@%+=:,./_-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\"'\"'/g")" ;;
        *) printf '%s' "$1" ;;
    esac
}
die() { printf 'cluster_local.sh: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

# --- the state directory: this user's alone -------------------------------------------------

# `env` prints a file of it for the shell to eval, and `down` signals the PIDs it lists: in a
# shared TMPDIR, a directory someone else made (or can write) would run their commands and
# stop processes they chose. So it must be a real directory of ours with mode 0700, or absent.
own_state_dir() {
    if [ -L "$STATE_DIR" ] || { [ -e "$STATE_DIR" ] && [ ! -d "$STATE_DIR" ]; }; then
        die "$STATE_DIR is not a directory of its own (a link or a file); remove it, or set TMPDIR to a private directory"
    fi
    [ -d "$STATE_DIR" ] || return 0
    local owner mode
    owner=$(stat -c %u "$STATE_DIR")
    mode=$(stat -c %a "$STATE_DIR")
    [ "$owner" = "$(id -u)" ] || die "$STATE_DIR belongs to uid $owner, not to you; remove it, or set TMPDIR to a private directory"
    [ "$mode" = 700 ] || die "$STATE_DIR has mode $mode, so others may change what it records; it must be 700: remove it, or chmod 700 it if you made it"
}

make_state_dir() {
    own_state_dir
    mkdir -m 700 -p "$STATE_DIR"
    own_state_dir  # made by someone else between the check and mkdir -p
}

# --- processes, by PID and start time ------------------------------------------------------

# The start time of PID (clock ticks since boot, field 22 of /proc/PID/stat); nothing if
# the process is gone or a zombie. A PID with another start time is another process.
start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }            # the fields after "pid (comm) "; comm may hold spaces
    # shellcheck disable=SC2086
    set -- $stat                 # $1 is field 3 (state), so field 22 is $20
    [ "$1" = Z ] && return 0
    printf '%s' "${20}"
}

# True if the process recorded as PID with START_TIME still runs.
running() {
    [ -n "$2" ] && [ "$(start_time "$1")" = "$2" ]
}

# Every process below the given PIDs, the PIDs included (one per line).
descendants() {
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            grown = 1
            while (grown) {
                grown = 0
                for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grown = 1 }
            }
            for (p in keep) if (p in parent) print p
        }'
}

# Record every live process below the nodes' `ray start` processes that is not yet in $PIDS.
record_descendants() {
    local roots="" pid st name
    while read -r pid st name; do
        case "$name" in */*) ;; *) running "$pid" "$st" && roots="$roots $pid" ;; esac
    done < "$PIDS"
    [ -n "$roots" ] || return 0
    for pid in $(descendants $roots); do
        grep -q "^$pid " "$PIDS" && continue
        st=$(start_time "$pid")
        [ -n "$st" ] || continue
        printf '%s %s %s\n' "$pid" "$st" "$(node_of "$pid")/$(cat "/proc/$pid/comm" 2>/dev/null || echo unknown)" >> "$PIDS"
    done
}

# The node (tb-node-k) a process belongs to: the node of its nearest recorded ancestor.
node_of() {
    local pid=$1 line
    while [ -n "$pid" ] && [ "$pid" -gt 1 ]; do
        line=$(grep "^$pid " "$PIDS" | head -n 1 || true)
        if [ -n "$line" ]; then set -- $line; printf '%s' "${3%%/*}"; return; fi
        pid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ')
    done
    printf 'unknown'
}

# How many recorded processes still run.
count_running() {
    local n=0 pid st name
    while read -r pid st name; do running "$pid" "$st" && n=$((n + 1)); done < "$PIDS"
    printf '%s' "$n"
}

# The names (node/process) of the recorded processes that still run, on one line.
running_names() {
    local pid st name out=""
    while read -r pid st name; do running "$pid" "$st" && out="$out $name($pid)"; done < "$PIDS"
    printf '%s' "${out# }"
}

# Signal every recorded process that still runs (and whose name matches $2, a grep pattern).
signal_recorded() {
    local sig=$1 pattern=${2:-.} pid st name
    while read -r pid st name; do
        printf '%s\n' "$name" | grep -q -- "$pattern" || continue
        running "$pid" "$st" && kill "-$sig" "$pid" 2>/dev/null || true
    done < "$PIDS"
}

# Wait up to $1 seconds for every recorded process to end; true if they all did.
wait_recorded() {
    local deadline=$((SECONDS + $1))
    while [ "$(count_running)" -gt 0 ]; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# Stop exactly what $PIDS records: the nodes' `ray start` first (each stops its own node),
# then whatever is left, TERM and then KILL. True if nothing recorded runs any more.
stop_recorded() {
    [ -f "$PIDS" ] || return 0
    record_descendants                      # e.g. Ray workers started since `up`
    signal_recorded TERM '^tb-node-[0-9]*$'
    wait_recorded "$GRACE_S" && return 0
    say "still running ${GRACE_S}s after the nodes were asked to stop: $(running_names); TERM, then KILL"
    record_descendants
    signal_recorded TERM
    wait_recorded 5 && return 0
    signal_recorded KILL
    wait_recorded 5
}

# --- subcommands -----------------------------------------------------------------------------

is_up() {
    [ -f "$PIDS" ] || return 1
    [ "$(count_running)" -gt 0 ]
}

info() { sed -n "s/^$1=//p" "$INFO" 2>/dev/null || true; }

# The nodes' Ray temp directories (session logs, sockets), made by `up` with mktemp.
remove_ray_root() {
    local ray_root
    ray_root=$(info ray_root)
    case "$ray_root" in */tbcl.??????) rm -rf "$ray_root" ;; esac
}

cmd_up() {
    local n=${1:-}
    case "$n" in ''|*[!0-9]*) die "usage: $0 up N   (N = the number of worker nodes, e.g. 2)" ;; esac
    make_state_dir
    exec 9> "$STATE_DIR/lock"
    flock -n 9 || die "another 'up' or 'down' of the local cluster in $STATE_DIR is running"
    if is_up; then
        die "a local cluster is already up (RAY_ADDRESS=$(info address), $(count_running) processes): run '$0 down' first"
    fi
    remove_ray_root                         # a previous cluster's leftovers
    rm -rf "$PIDS" "$ENV_FILE" "$INFO" "$LOGS"
    mkdir -p "$LOGS"
    : > "$PIDS"

    # Token authentication, as Ray 2.60 does it for a local cluster; the nodes inherit it.
    local auth="${RAY_AUTH_MODE:-token}" token_path=""
    if [ "$auth" = token ]; then
        export RAY_AUTH_MODE=token
        if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
            token_path=""
        else
            token_path="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
            if [ ! -s "$token_path" ]; then
                mkdir -p "$(dirname "$token_path")"
                (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$token_path")
                say "wrote a new Ray token to $token_path"
            fi
            [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && export RAY_AUTH_TOKEN_PATH
        fi
    else
        say "token authentication is off (RAY_AUTH_MODE=$auth)"
    fi
    unset RAY_ADDRESS                       # `ray start --head` must not join another Ray
    export RAY_USAGE_STATS_ENABLED=0        # no usage report: nothing leaves the machine

    # Ray's temp directories, one per node. Unix socket paths must stay under 108 bytes,
    # so a long $TMPDIR gives way to /tmp.
    local base="${TMPDIR:-/tmp}"
    base="${base%/}"
    [ "${#base}" -le 40 ] || base=/tmp
    local ray_root
    ray_root=$(mktemp -d "$base/tbcl.XXXXXX")

    # Ports of the head: free now, picked together so they differ, between Ray's worker ports
    # (10002-19999) and the OS's ephemeral range: the OS hands ephemeral ports to the processes
    # the head starts before its dashboard listens. Worker nodes pick their own (port 0: the OS
    # chooses), and so do the Ray workers (--min/max-worker-port=0).
    local gcs_port client_port dashboard_port
    read -r gcs_port client_port dashboard_port < <("$PYTHON" -c '
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
span = max(low, 20100) - 20000  # the ports from 20000 up to the ephemeral ones
found, start = [], random.randrange(span)
for k in range(span):
    port = 20000 + (start + k) % span
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    found.append(port)
    if len(found) == 3:
        break
print(*found)')

    local object_store=$((OBJECT_STORE_MB * 1024 * 1024)) started=$SECONDS
    trap 'say "interrupted: stopping what was started"; stop_recorded; exit 130' INT TERM

    # start_node NAME ARGS...: one `ray start --block`, in a session of its own (so a signal
    # to this script's terminal does not reach it), recorded at once.
    start_node() {
        local name=$1
        shift
        setsid ray start --block --temp-dir="$ray_root/${name#tb-node-}" \
            --dashboard-agent-listen-port=0 --min-worker-port=0 --max-worker-port=0 \
            --object-store-memory="$object_store" "$@" \
            < /dev/null > "$LOGS/$name.log" 2>&1 9>&- &
        local pid=$!
        printf '%s %s %s\n' "$pid" "$(start_time "$pid")" "$name" >> "$PIDS"
    }

    # wait_node NAME: until its `ray start` says the node runs; on failure stop everything.
    wait_node() {
        local name=$1 pid st rest deadline=$((SECONDS + START_TIMEOUT_S))
        read -r pid st rest < <(grep " $name\$" "$PIDS")
        until grep -q "Ray runtime started" "$LOGS/$name.log"; do
            if ! running "$pid" "$st" || [ "$SECONDS" -ge "$deadline" ]; then node_failed "$name"; fi
            sleep 0.2
        done
    }

    # node_failed NAME: show why, stop everything `up` started, and fail.
    node_failed() {
        say "$1 did not start within ${START_TIMEOUT_S}s or exited; the end of its log ($LOGS/$1.log):" >&2
        tail -n 25 "$LOGS/$1.log" | sed 's/^/    /' >&2
        stop_recorded
        die "'up' failed; nothing it started is left running"
    }

    # wait_gcs NAME PORT: until the head's GCS accepts connections (bash's /dev/tcp).
    wait_gcs() {
        local pid st rest deadline=$((SECONDS + START_TIMEOUT_S))
        read -r pid st rest < <(grep " $1\$" "$PIDS")
        until (exec 3<> "/dev/tcp/127.0.0.1/$2") 2> /dev/null; do
            if ! running "$pid" "$st" || [ "$SECONDS" -ge "$deadline" ]; then node_failed "$1"; fi
            sleep 0.2
        done
    }

    printf 'address=\nray_root=%s\n' "$ray_root" > "$INFO"   # so that `down` finds ray_root
    start_node tb-node-0 --head --port="$gcs_port" --ray-client-server-port="$client_port" \
        --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" --disable-usage-stats \
        --num-cpus="$HEAD_CPUS" --resources='{"tb-node-0": 1, "threadbound-supervisor": 1}'
    # The workers need only the head's GCS: they start as soon as it listens, while the
    # head still starts its dashboard and the rest.
    wait_gcs tb-node-0 "$gcs_port"
    local k
    for k in $(seq 1 "$n"); do
        start_node "tb-node-$k" --address="127.0.0.1:$gcs_port" --num-cpus="$WORKER_CPUS" \
            --resources="{\"tb-node-$k\": 1}"
    done
    for k in $(seq 0 "$n"); do wait_node "tb-node-$k"; done
    local address
    address=$(cat "$ray_root/0/ray_current_cluster")   # ip:port, as the head registered it
    record_descendants
    trap - INT TERM

    # Every value quoted as the shell reads it back (as Python's shlex.quote does), so that
    # `eval "$(... env)"` sets exactly these variables whatever the token's path holds.
    {
        printf 'export RAY_ADDRESS=%s' "$(shell_quote "$address")"
        [ "$auth" = token ] && printf ' RAY_AUTH_MODE=token'
        [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && printf ' RAY_AUTH_TOKEN_PATH=%s' "$(shell_quote "$RAY_AUTH_TOKEN_PATH")"
        printf '\n'
    } > "$ENV_FILE"
    printf 'address=%s\ndashboard=http://127.0.0.1:%s\nworkers=%s\nray_root=%s\n' \
        "$address" "$dashboard_port" "$n" "$ray_root" > "$INFO"

    local workers="no worker node"
    [ "$n" -ge 1 ] && workers="$n worker node(s) tb-node-1..tb-node-$n ($WORKER_CPUS CPUs each)"
    say "local Ray cluster up in $((SECONDS - started)) s: head tb-node-0 ($HEAD_CPUS CPU," \
        "threadbound-supervisor) and $workers"
    say "  dashboard  http://127.0.0.1:$dashboard_port (it asks for the token: ray get-auth-token)"
    say "  processes  $(count_running), recorded in $PIDS; logs in $LOGS and $ray_root"
    say "use it from a shell:"
    say "  $(cat "$ENV_FILE")"
    [ -n "${RAY_AUTH_TOKEN:-}" ] && [ "$auth" = token ] && say "  (and the same RAY_AUTH_TOKEN)"
    say "  or: eval \"\$($0 env)\""
    say "stop it: $0 down"
    say "RAY_ADDRESS=$address"
}

cmd_down() {
    if [ ! -f "$PIDS" ]; then
        say "no local cluster is up (nothing recorded in $STATE_DIR)"
        return 0
    fi
    exec 9> "$STATE_DIR/lock"
    flock -w 30 9 || die "another 'up' or 'down' of the local cluster in $STATE_DIR is running"
    local running_before
    running_before=$(count_running)
    if [ "$running_before" -eq 0 ]; then
        say "no local cluster is up (its recorded processes have all ended); clearing $STATE_DIR"
    elif stop_recorded; then
        say "stopped the local cluster at $(info address): its $(wc -l < "$PIDS") recorded processes are gone"
    else
        die "$(count_running) recorded processes still run after KILL; see $PIDS"
    fi
    remove_ray_root
    rm -rf "$STATE_DIR"
}

cmd_status() {
    if ! is_up; then
        say "no local cluster is up"
        return 0
    fi
    record_descendants
    say "local Ray cluster at $(info address), dashboard $(info dashboard)"
    local pid st name
    while read -r pid st name; do
        case "$name" in
            */*) ;;
            *) if running "$pid" "$st"; then say "  $name  up    (ray start pid $pid)"
               else say "  $name  DOWN  (ray start pid $pid has ended; see $LOGS/$name.log)"; fi ;;
        esac
    done < "$PIDS"
    say "  $(count_running) of its $(wc -l < "$PIDS") recorded processes run"
    say "$(cat "$ENV_FILE")"
}

cmd_env() {
    is_up || die "no local cluster is up: start one with '$0 up N'"
    cat "$ENV_FILE"
}

case "${1:-}" in
    up|down|status|env) own_state_dir ;;
esac
case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac
