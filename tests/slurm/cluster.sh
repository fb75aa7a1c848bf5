#!/usr/bin/env bash
# A real single-node SLURM cluster for the test suite, without systemd or root-owned /etc files.
#
#   cluster.sh install        apt-get the Debian packages (slurmctld slurmd slurm-client munge)
#   cluster.sh start DIR      start munged, slurmctld, slurmd with all state under DIR; prints
#                             the SLURM_CONF to export; fails (and cleans up) within ~60 s
#   cluster.sh stop DIR       cancel leftover jobs, kill the daemons recorded in DIR/pids
#                             (waiting until they are gone), remove the /etc/slurm link
#
# Needs root (slurmd runs jobs as any user). Ports are the first free pair from 6817 upwards.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
node=segpipe1

die() { echo "cluster.sh: $*" >&2; exit 1; }

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s; fail after SECONDS, or at once
# if the process $watch (when set) has exited.
wait_for() {
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [[ -n ${watch:-} ]] && ! kill -0 "$watch" 2>/dev/null; then
            echo "cluster.sh: exited while waiting for $what" >&2; return 1
        fi
        ((SECONDS < deadline)) || { echo "cluster.sh: timed out after ${seconds}s waiting for $what" >&2; return 1; }
        sleep 0.2
    done
}

# launch NAME COMMAND...: start a foreground daemon in the background, record its pid in $watch.
launch() {
    local name=$1; shift
    "$@" >>"$dir/log/$name.out" 2>&1 &
    watch=$!
    echo "$watch" >> "$dir/pids"
}

gone() { ! kill -0 "$1"; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

stop() {
    local dir=$1 pid watch=
    [[ -d $dir ]] || return 0
    dir=$(cd "$dir" && pwd)
    if [[ -f $dir/pids ]]; then
        # Jobs outlive slurmd: cancel what is left, then stop the daemons.
        SLURM_CONF=$dir/etc/slurm.conf scancel --user "$(id -un)" 2>/dev/null || true
        SLURM_CONF=$dir/etc/slurm.conf wait_for 30 "jobs to end" queue_empty || true
        # In reverse order: slurmd (it ends running jobs), slurmctld, munged (the others need it).
        for pid in $(tac "$dir/pids"); do
            kill "$pid" 2>/dev/null || continue
            wait_for 15 "pid $pid to exit" gone "$pid" || kill -9 "$pid" 2>/dev/null || true
        done
        rm -f "$dir/pids"
    fi
    unlink_default_conf "$dir"
}

# The jobstep plugin strips SLURM_CONF from the environment of the srun it runs inside each
# job, so srun reads the compiled-in /etc/slurm/slurm.conf: link it to ours for the cluster's
# lifetime. A regular file there is a real installation's and is never touched.
default_conf=/etc/slurm/slurm.conf

link_default_conf() {
    local dir=$1 target
    if [[ -L $default_conf ]]; then
        target=$(readlink "$default_conf")
        [[ ! -f $(dirname "$(dirname "$target")")/pids ]] \
            || die "$default_conf points to a running test cluster ($target)"
    elif [[ -e $default_conf ]]; then
        die "$default_conf exists: this machine has its own SLURM, refusing to replace it"
    fi
    mkdir -p "$(dirname "$default_conf")"
    ln -sfn "$dir/etc/slurm.conf" "$default_conf"
}

unlink_default_conf() {
    [[ $(readlink "$default_conf" 2>/dev/null) != "$1/etc/slurm.conf" ]] || rm -f "$default_conf"
}

queue_empty() { [[ -z $(squeue -h -t PENDING,RUNNING,COMPLETING -o %i) ]]; }

node_idle() { sinfo -h -n "$node" -o %T | grep -qx idle; }

start() {
    local dir=$1 watch=
    [[ ! -f $dir/pids ]] || die "$dir/pids exists: a cluster is already running there (stop it first)"
    mkdir -p "$dir"/{etc,munge,ctld,spool,log}
    dir=$(cd "$dir" && pwd)
    chmod 755 "$dir" "$dir/munge"
    trap 'echo "cluster.sh: start failed; logs in $dir/log" >&2; tail -n 20 "$dir"/log/* >&2 || true; stop "$dir"' ERR

    local ctld_port=6817
    until port_free "$ctld_port" && port_free $((ctld_port + 1)); do ctld_port=$((ctld_port + 2)); done
    sed -e "s|@STATE@|$dir|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@NODE@|$node|g" \
        -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$((ctld_port + 1))|g" \
        "$here/slurm.conf.in" > "$dir/etc/slurm.conf"
    sed -e "s|@NODE@|$node|g" "$here/gres.conf.in" > "$dir/etc/gres.conf"
    export SLURM_CONF=$dir/etc/slurm.conf   # daemons and clients find gres.conf beside it
    link_default_conf "$dir"

    dd if=/dev/urandom of="$dir/munge/munge.key" bs=128 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    rm -f "$dir/munge/munge.socket"
    launch munged munged --foreground --force --socket="$dir/munge/munge.socket" \
        --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
        --seed-file="$dir/munge/munged.seed"
    wait_for 10 munged test -S "$dir/munge/munge.socket"
    launch slurmctld slurmctld -D -c -f "$SLURM_CONF"
    wait_for 20 slurmctld scontrol ping
    launch slurmd slurmd -D -N "$node" -f "$SLURM_CONF"
    wait_for 30 "node $node to be idle" node_idle
    trap - ERR
    echo "SLURM_CONF=$SLURM_CONF"
}

case ${1:-} in
    install) install ;;
    start) [[ $# -eq 2 ]] || die "usage: cluster.sh start DIR"; start "$2" ;;
    stop) [[ $# -eq 2 ]] || die "usage: cluster.sh stop DIR"; stop "$2" ;;
    *) die "usage: cluster.sh {install|start DIR|stop DIR}" ;;
esac
