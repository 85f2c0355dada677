#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for trying the Hydra launcher profiles
# (hydra/launcher=slurm) locally and in CI.
#
#   launch/slurm_cluster.sh up       install (if missing) + configure + start; idempotent
#   launch/slurm_cluster.sh status   daemons, node and queue; exit 0 only if healthy
#   launch/slurm_cluster.sh down     cancel jobs, stop the daemons; fine when nothing runs
#
# Debian/Ubuntu only (apt). Needs root; re-runs itself with sudo when it can.
# No systemd needed: munged, slurmctld and slurmd are started directly as daemons and
# stopped through their pid files.
#
# The cluster: SlurmctldHost = NodeName = `hostname -s` (addressed as 127.0.0.1), one node
# with CPUs=$(nproc) and RealMemory = MemTotal minus headroom, one default partition,
# no cgroups (proctrack/linuxproc, task/none), no accounting (sacct fails; submitit warns
# and falls back to waiting for its result files), jobs may run as root, jobs can be
# requeued (`scontrol requeue`, which submitit itself calls on USR2; a requeued job may
# start again 30 s later).
# Without accounting submitit cannot see that a job ended without a result file (scancel,
# node failure): the Hydra sweep then waits forever. Put a `timeout` around sweeps in tests.
#
# Environment knobs (all optional):
#   SLURM_PARTITION        partition name                   (default: debug)
#   SLURM_MEM_HEADROOM_MIB memory left out of RealMemory     (default: 10% of RAM, <= 2048)
#   SLURM_UP_TIMEOUT       seconds to wait for an idle node  (default: 60)
#   SLURM_KEEP_JOBS=1      `down` leaves running jobs alone  (default: cancel them)
set -euo pipefail

readonly CLUSTER_NAME=titan2tune
readonly PARTITION="${SLURM_PARTITION:-debug}"
readonly UP_TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
readonly CONF_DIR=/etc/slurm
readonly SLURM_CONF="$CONF_DIR/slurm.conf"
# State folders of this cluster alone: a leftover state of another cluster in the default
# /var/spool/slurmctld would stop slurmctld with "CLUSTER NAME MISMATCH".
readonly STATE_DIR=/var/spool/$CLUSTER_NAME/slurmctld
readonly SPOOL_DIR=/var/spool/$CLUSTER_NAME/slurmd
readonly LOG_DIR=/var/log/slurm
readonly RUN_DIR=/run/slurm
readonly CTLD_PID="$RUN_DIR/slurmctld.pid"
readonly SLURMD_PID="$RUN_DIR/slurmd.pid"
readonly MUNGE_PID=/run/munge/munged.pid
# Marker: munged was started by this script, so `down` may stop it.
readonly MUNGE_OURS="$RUN_DIR/munged.started-by-slurm_cluster"
readonly MARKER="# Written by titan2tune launch/slurm_cluster.sh"
readonly PACKAGES=(slurmctld slurmd slurm-client munge)

log() { printf '[slurm_cluster] %s\n' "$*"; }
die() { printf '[slurm_cluster] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
}

ensure_root() {
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            exec sudo -E -- bash "$0" "$@"
        fi
        die "must run as root (and sudo is not available)"
    fi
}

node_name() { hostname -s; }

# pid from a pid file if that process is alive, else nothing (and status 1).
live_pid() {
    local file=$1 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# ---------------------------------------------------------------------------------- install

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "packages missing (${missing[*]}) and no apt-get"
    log "installing ${missing[*]} ..."
    # Keep the packages' maintainer scripts from starting services (no init system in CI
    # containers; on systemd hosts we still want to start the daemons ourselves).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                "${missing[@]}"
    } || rc=$?
    ((created_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

# ------------------------------------------------------------------------------------ munge

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        log "munged already running"
        return 0
    fi
    local p
    if p=$(live_pid "$MUNGE_PID"); then
        die "munged (pid $p) runs but credentials do not verify; check /var/log/munge/munged.log"
    fi
    id munge >/dev/null 2>&1 || die "user 'munge' missing; is the munge package installed?"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    log "starting munged as user munge"
    # munged refuses group/world-writable parents of its log/socket dirs (seen in some
    # containers); retry with --force only then, and say so.
    if ! runuser -u munge -- /usr/sbin/munged 2>/tmp/munged.start.err; then
        log "munged refused to start: $(tr '\n' ' ' </tmp/munged.start.err); retrying with --force"
        runuser -u munge -- /usr/sbin/munged --force
    fi
    install -d -m 0755 "$RUN_DIR"
    touch "$MUNGE_OURS"
    local i
    for i in $(seq 1 50); do
        munge_ok && return 0
        sleep 0.1
    done
    tail -n 20 /var/log/munge/munged.log >&2 || true
    die "munged started but 'munge -n | unmunge' fails"
}

# ----------------------------------------------------------------------------- slurm.conf

mem_total_mib() { awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo; }

render_conf() {
    local node cpus total headroom real defmem
    node=$(node_name)
    cpus=$(nproc)
    total=$(mem_total_mib)
    if [[ -n ${SLURM_MEM_HEADROOM_MIB:-} ]]; then
        headroom=$SLURM_MEM_HEADROOM_MIB
    else
        headroom=$((total / 10))
        ((headroom > 2048)) && headroom=2048
    fi
    real=$((total - headroom))
    ((real >= 256)) || die "too little memory: MemTotal ${total} MiB, headroom ${headroom} MiB"
    # Jobs that ask for no memory get this much per CPU (else each job would be given the
    # whole node and jobs would run one at a time).
    defmem=$((real / cpus))
    ((defmem > 1024)) && defmem=1024
    cat <<EOF
$MARKER; rewritten by 'up'. Edits are lost.
# One-node test cluster: controller and compute node are this machine.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s); 30 s keeps requeue tests short.
AuthInfo=cred_expire=30
MpiDefault=none
# No mail program on these machines; silences "Configured MailProg is invalid".
MailProg=/bin/true
SwitchType=switch/none

# No cgroups: track job processes via /proc, bind nothing (works in containers/CI).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting database: sacct fails (submitit warns and falls back; expected).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none

SchedulerType=sched/backfill
# Look at pending jobs every few seconds (default 60 s/30 s), so a requeued job starts
# soon after its eligible time instead of at the next minute's pass.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem

# root may submit and run jobs (the default; spelt out because we rely on it).
DisableRootJobs=NO
# Jobs may be requeued (scontrol requeue; submitit requeues itself on USR2).
JobRequeue=1
# A node that was DOWN comes back by itself once its slurmd registers with a valid config.
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled/requeued (submitit ignores
# SIGTERM, so a plain 'scontrol requeue' of a submitit job takes this long).
KillWait=10
UnkillableStepTimeout=120
SlurmctldTimeout=30
SlurmdTimeout=60
MinJobAge=300

StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

# Writes slurm.conf; status 0 if it changed (or was new), 1 if identical.
write_conf() {
    local new
    new=$(mktemp)
    render_conf >"$new"
    install -d -m 0755 "$CONF_DIR"
    if [[ -f $SLURM_CONF ]] && cmp -s "$new" "$SLURM_CONF"; then
        rm -f "$new"
        return 1
    fi
    if [[ -f $SLURM_CONF ]] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
        local backup
        backup="$SLURM_CONF.bak.$(date +%Y%m%d%H%M%S)"
        cp -p "$SLURM_CONF" "$backup"
        log "existing $SLURM_CONF was not ours; saved as $backup"
    fi
    install -m 0644 "$new" "$SLURM_CONF"
    rm -f "$new"
    log "wrote $SLURM_CONF"
    return 0
}

# --------------------------------------------------------------------------------- daemons

node_state() { sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n1; }

ctld_responds() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

healthy() {
    live_pid "$CTLD_PID" >/dev/null && live_pid "$SLURMD_PID" >/dev/null && ctld_responds \
        || return 1
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -r $f ]] || continue
        printf '\n----- last lines of %s -----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

# Waits up to $3 tenths of a second for pid $2 to exit; then TERM, wait 10 s, KILL.
stop_pid() {
    local name=$1 pid=$2 grace=${3:-0} i
    for ((i = 0; i < grace; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

stray_daemon() {
    # A daemon of that name running without our pid file (e.g. started by systemd).
    local name=$1 file=$2 pids
    live_pid "$file" >/dev/null && return 1
    pids=$(pids_named "$name")
    [[ -n $pids ]] || return 1
    echo "$pids"
}

# Pids of processes whose command name is exactly $1 (no procps needed in slim images).
pids_named() {
    local d comm out=()
    for d in /proc/[0-9]*; do
        comm=$(cat "$d/comm" 2>/dev/null) || continue
        [[ $comm == "$1" ]] && out+=("${d#/proc/}")
    done
    echo "${out[*]}"
}

# A SLURM this script did not start: refuse before anything is changed (slurm.conf included).
refuse_foreign_slurm() {
    local p pf stray
    for p in slurmctld slurmd; do
        pf="$CTLD_PID"
        [[ $p == slurmd ]] && pf="$SLURMD_PID"
        if stray=$(stray_daemon "$p" "$pf"); then
            die "$p is already running (pid $stray) but was not started by this script (no $pf); nothing was changed. Stop it first (e.g. 'systemctl stop $p'), or use that cluster as it is"
        fi
    done
}

start_slurm() {
    install -d -m 0755 "$RUN_DIR" "$LOG_DIR"
    install -d -m 0755 "$STATE_DIR" "$SPOOL_DIR"
    if ! live_pid "$CTLD_PID" >/dev/null; then
        log "starting slurmctld"
        slurmctld || { show_logs; die "slurmctld failed to start"; }
    fi
    # slurmd registers with the controller; give the controller a moment first.
    local i
    for i in $(seq 1 50); do
        ctld_responds && break
        sleep 0.2
    done
    if ! live_pid "$SLURMD_PID" >/dev/null; then
        log "starting slurmd"
        slurmd || { show_logs; die "slurmd failed to start"; }
    fi
}

wait_idle() {
    local node state deadline resumed=0
    node=$(node_name)
    deadline=$((SECONDS + UP_TIMEOUT))
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case "$state" in
            idle | mixed | allocated | completing)
                return 0 ;;
            *drain* | *down* | *fail*)
                # Left over from an earlier run (e.g. 'Kill task failed', 'Node unexpectedly
                # rebooted', a config change). Our node, our cluster: put it back.
                if ((resumed < 3)); then
                    log "node $node is '$state' ($(sinfo -h -R -n "$node" -o '%E' 2>/dev/null || true)); resuming it"
                    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
                    resumed=$((resumed + 1))
                fi ;;
        esac
        sleep 1
    done
    printf '\n' >&2
    sinfo -N -l >&2 || true
    show_logs
    die "node $node is not idle after ${UP_TIMEOUT}s (state: '${state:-unknown}'); see logs above"
}

print_usage_hint() {
    local node
    node=$(node_name)
    cat <<EOF

SLURM cluster '$CLUSTER_NAME' is up: node $node, partition '$PARTITION' (default).
$(sinfo -h -N -o '  %N %P %T cpus=%c mem=%mMiB' 2>/dev/null)

  sinfo                      # nodes and partitions
  squeue                     # queued / running jobs
  scontrol show node $node
  python convert.py -m experiment=a,b hydra/launcher=slurm   # a Hydra sweep on this cluster
  $0 status | down
Logs: $LOG_DIR/slurmctld.log, $LOG_DIR/slurmd.log (job logs: <sweep dir>/.submitit/)
Accounting is off: submitit's warning that 'sacct' failed is expected.
EOF
}

# -------------------------------------------------------------------------------- commands

cmd_up() {
    install_packages
    local b
    for b in slurmctld slurmd sinfo scontrol munge; do
        command -v "$b" >/dev/null || die "$b not found after installing ${PACKAGES[*]}"
    done
    refuse_foreign_slurm
    start_munge
    local changed=0
    write_conf && changed=1
    if healthy; then
        if ((changed)); then
            log "configuration changed; restarting the daemons"
            stop_daemons
        else
            log "already up and healthy"
            print_usage_hint
            return 0
        fi
    elif live_pid "$CTLD_PID" >/dev/null || live_pid "$SLURMD_PID" >/dev/null; then
        log "daemons partly up or unhealthy; restarting them"
        stop_daemons
    fi
    start_slurm
    wait_idle
    print_usage_hint
}

stop_daemons() {
    # Take the pids first: slurmctld deletes its pid file before it has finished exiting.
    local ctld sd
    ctld=$(live_pid "$CTLD_PID") || ctld=
    sd=$(live_pid "$SLURMD_PID") || sd=
    if [[ -n $ctld ]] && ctld_responds; then
        # Stops slurmctld and every slurmd; running jobs' slurmstepd are left alone.
        log "scontrol shutdown"
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    [[ -n $sd ]] && stop_pid slurmd "$sd" 100
    [[ -n $ctld ]] && stop_pid slurmctld "$ctld" 100
    rm -f "$CTLD_PID" "$SLURMD_PID"
}

cancel_jobs() {
    ctld_responds || return 0
    local jobs=()
    mapfile -t jobs < <(squeue -h -o '%i' 2>/dev/null)
    ((${#jobs[@]} > 0)) || return 0
    if [[ ${SLURM_KEEP_JOBS:-0} == 1 ]]; then
        log "leaving jobs running (SLURM_KEEP_JOBS=1): ${jobs[*]}"
        return 0
    fi
    log "cancelling jobs: ${jobs[*]}"
    scancel "${jobs[@]}" 2>/dev/null || true
    local i
    for i in $(seq 1 30); do
        [[ -z $(squeue -h -t running,completing -o '%i' 2>/dev/null) ]] && return 0
        sleep 1
    done
    log "some jobs are still completing; stopping anyway"
}

cmd_down() {
    if ! command -v slurmctld >/dev/null 2>&1; then
        log "slurm is not installed; nothing to stop"
        return 0
    fi
    cancel_jobs
    stop_daemons
    if [[ -e $MUNGE_OURS ]]; then
        local mp
        if mp=$(live_pid "$MUNGE_PID"); then
            stop_pid munged "$mp" 0
        fi
        rm -f "$MUNGE_OURS"
    fi
    log "down"
}

cmd_status() {
    local name file pid rc=0
    for name in munged slurmctld slurmd; do
        case $name in
            munged) file=$MUNGE_PID ;;
            slurmctld) file=$CTLD_PID ;;
            slurmd) file=$SLURMD_PID ;;
        esac
        if pid=$(live_pid "$file"); then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-10s not running\n' "$name"
            rc=1
        fi
    done
    if ! command -v sinfo >/dev/null 2>&1; then
        echo "slurm is not installed"
        return 1
    fi
    if ctld_responds; then
        echo
        sinfo -N -o '%N %P %T %c %m %E' || true
        echo
        squeue || true
        healthy || rc=1
    else
        echo "slurmctld does not respond"
        rc=1
    fi
    if ((rc == 0)); then echo; echo "healthy"; else echo; echo "NOT healthy"; fi
    return $rc
}

main() {
    local cmd=${1:-}
    case "$cmd" in
        up | down | status) ;;
        -h | --help | help) usage; return 0 ;;
        *) usage >&2; return 2 ;;
    esac
    ensure_root "$@"
    "cmd_$cmd"
}

main "$@"
