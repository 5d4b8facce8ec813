#!/usr/bin/env bash
# Single-node SLURM 22.05 test cluster on Debian 12 (munge + MariaDB + slurmdbd + slurmctld + slurmd).
#
#   scripts/slurm_local.sh up      install packages if missing, write configs, start daemons, wait for idle node
#   scripts/slurm_local.sh down    stop the daemons by the pids in their pid files (never by name)
#   scripts/slurm_local.sh status  print sinfo (exit 0 if the controller answers, 1 otherwise)
#
# Idempotent: `up` on a running cluster only checks it (about 1 s). Must run as root.
# Exit codes: 0 ok, 1 cluster failed to come up / not running, 2 prerequisites missing (not root, no apt,
# package installation failed) -- the pytest fixture skips on 2.
# Environment: SLURM_LOCAL_LOGDIR (default /var/log/slurm-local), SLURM_LOCAL_WAIT (seconds to wait for
# the node to become idle, default 90).
# The Snakemake SLURM plugin polls job status with sacct, hence accounting (slurmdbd + MariaDB).
set -euo pipefail

LOGDIR=${SLURM_LOCAL_LOGDIR:-/var/log/slurm-local}
WAIT=${SLURM_LOCAL_WAIT:-90}
CLUSTER=local
PARTITION=debug
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
SLURM_LOG=/var/log/slurm
RUN=/run/slurm
PID_CTLD=$RUN/slurmctld.pid
PID_SLURMD=$RUN/slurmd.pid
PID_DBD=$RUN/slurmdbd.pid
PID_MUNGE=/run/munge/munged.pid
PID_MYSQL=/run/mysqld/mysqld.pid
MYSQL_SOCK=/run/mysqld/mysqld.sock
DB_NAME=slurm_acct_db
DB_USER=slurm
NODE=$(hostname -s)

T0=$(date +%s%N)
log() {
    local ds=$((($(date +%s%N) - T0) / 100000000))
    printf '[slurm_local %3d.%ds] %s\n' $((ds / 10)) $((ds % 10)) "$*"
}
die() { local rc=$1; shift; echo "[slurm_local] ERROR: $*" >&2; exit "$rc"; }

# --- process helpers (pid files only) --------------------------------------------------------------
# pid_alive PIDFILE NAME...: true if the pid in PIDFILE runs and its comm is one of NAMEs.
pid_alive() {
    local f=$1; shift
    [[ -s $f ]] || return 1
    local pid comm n
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    for n in "$@"; do [[ $comm == "$n" ]] && return 0; done
    return 1
}

# stop_pids LABEL:PIDFILE:NAME[,NAME]... : SIGTERM the pids from the pid files (if they still belong
# to a process named NAME), wait up to 30 s for all of them, then SIGKILL those pids that are left.
stop_pids() {
    local spec label f names pid i
    local -a pids=() labels=() files=() n
    for spec in "$@"; do
        IFS=: read -r label f names <<<"$spec"
        IFS=, read -r -a n <<<"$names"
        if pid_alive "$f" "${n[@]}"; then
            pid=$(tr -dc '0-9' <"$f")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            labels+=("$label")
            files+=("$f")
        else
            rm -f "$f"
            log "$label not running"
        fi
    done
    for ((i = 0; i < ${#pids[@]}; i++)); do
        local t
        for ((t = 0; t < 300; t++)); do
            kill -0 "${pids[i]}" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "${pids[i]}" 2>/dev/null; then
            log "${labels[i]} (pid ${pids[i]}) ignored SIGTERM for 30 s, sending SIGKILL"
            kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
        rm -f "${files[i]}"
        log "stopped ${labels[i]} (pid ${pids[i]})"
    done
}

# wait_for SECONDS DESCRIPTION LOGFILE CMD...: poll CMD every 0.5 s.
wait_for() {
    local secs=$1 what=$2 logf=$3; shift 3
    local i
    for ((i = 0; i < secs * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die 1 "$what not ready after ${secs}s; see $logf"
}

# write_if_changed PATH OWNER MODE < content; returns 0 if the file was (re)written.
write_if_changed() {
    local path=$1 owner=$2 mode=$3 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        chown "$owner" "$path"
        chmod "$mode" "$path"
        return 1
    fi
    install -o "${owner%%:*}" -g "${owner##*:}" -m "$mode" "$tmp" "$path"
    rm -f "$tmp"
    return 0
}

# --- steps -------------------------------------------------------------------------------------------
check_prereqs() {
    [[ $(uname -s) == Linux ]] || die 2 "needs Linux (Debian 12)"
    [[ $EUID -eq 0 ]] || die 2 "must run as root (it installs packages and starts system daemons)"
}

install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "packages present"
        return 0
    fi
    command -v apt-get >/dev/null || die 2 "missing packages (${missing[*]}) and no apt-get"
    log "installing ${missing[*]} (apt log: $LOGDIR/apt.log)"
    # Keep package maintainer scripts from starting daemons themselves; this script starts them with
    # known pid files. Only add a policy-rc.d if there is none (Docker images already have one).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q &&
            apt-get install -y -q --no-install-recommends \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
    } >>"$LOGDIR/apt.log" 2>&1 || rc=$?
    ((created_policy)) && rm -f "$policy"
    ((rc == 0)) || die 2 "apt-get failed (rc=$rc) installing ${missing[*]}; see $LOGDIR/apt.log"
    log "packages installed"
}

setup_dirs() {
    install -d -o slurm -g slurm -m 755 "$RUN" "$SLURM_LOG" /var/spool/slurmctld
    install -d -o root -g root -m 755 /var/spool/slurmd
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o mysql -g mysql -m 755 /run/mysqld
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    chown -R munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    if pid_alive "$PID_MUNGE" munged; then
        log "munged running"
        return 0
    fi
    rm -f "$PID_MUNGE"
    # --force: start even if a stale socket from a killed munged is left behind
    runuser -u munge -- /usr/sbin/munged --force </dev/null >>"$LOGDIR/munged.out" 2>&1 ||
        die 1 "munged failed to start; see /var/log/munge/munged.log"
    wait_for 10 munged /var/log/munge/munged.log bash -c 'munge -n </dev/null | unmunge'
    log "started munged"
}

mysql_ping() { mariadb-admin --protocol=socket -S "$MYSQL_SOCK" ping; }

start_mariadb() {
    if mysql_ping >/dev/null 2>&1; then
        log "mariadb running"
    else
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            log "initialising MariaDB data directory"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOGDIR/mariadb.log" 2>&1 ||
                die 1 "mariadb-install-db failed; see $LOGDIR/mariadb.log"
        fi
        rm -f "$PID_MYSQL"
        setsid /usr/sbin/mariadbd --user=mysql --pid-file="$PID_MYSQL" --socket="$MYSQL_SOCK" \
            --log-error="$LOGDIR/mariadb.log" </dev/null >>"$LOGDIR/mariadb.log" 2>&1 &
        wait_for 60 MariaDB "$LOGDIR/mariadb.log" mysql_ping
        log "started mariadb"
    fi
}

db_password() {
    # Reuse the password of an existing slurmdbd.conf so re-runs stay consistent.
    local pw=""
    [[ -f $DBD_CONF ]] && pw=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" | head -n1)
    [[ -n $pw ]] || pw=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
    printf '%s' "$pw"
}

setup_database() {
    local pw=$1
    mariadb --protocol=socket -S "$MYSQL_SOCK" -u root >>"$LOGDIR/mariadb.log" 2>&1 <<SQL ||
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pw';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
        die 1 "creating database $DB_NAME failed; see $LOGDIR/mariadb.log"
}

write_configs() {
    # sets DBD_CHANGED / SLURM_CHANGED
    local pw=$1 cpus mem_total_mb mem
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the cores, whatever a test set for its threads
    mem_total_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    # a bit under the total: 95 %, and at least 256 MB below it
    mem=$((mem_total_mb * 95 / 100))
    ((mem > mem_total_mb - 256)) && mem=$((mem_total_mb - 256))
    ((mem > 256)) || mem=256
    DBD_CHANGED=0
    SLURM_CHANGED=0
    write_if_changed "$DBD_CONF" slurm:slurm 600 <<EOF && DBD_CHANGED=1
# written by scripts/slurm_local.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$pw
StorageLoc=$DB_NAME
LogFile=$SLURM_LOG/slurmdbd.log
PidFile=$PID_DBD
EOF
    write_if_changed "$SLURM_CONF" root:root 644 <<EOF && SLURM_CHANGED=1
# written by scripts/slurm_local.sh for host $NODE ($cpus CPUs, ${mem_total_mb} MB RAM)
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MailProg=/bin/true
SlurmctldPidFile=$PID_CTLD
SlurmdPidFile=$PID_SLURMD
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$SLURM_LOG/slurmctld.log
SlurmdLogFile=$SLURM_LOG/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    ((DBD_CHANGED)) && log "wrote $DBD_CONF"
    ((SLURM_CHANGED)) && log "wrote $SLURM_CONF (NodeName=$NODE CPUs=$cpus RealMemory=$mem)"
    return 0
}

start_slurmdbd() {
    if pid_alive "$PID_DBD" slurmdbd; then
        if ((DBD_CHANGED)); then stop_pids "slurmdbd:$PID_DBD:slurmdbd"; else log "slurmdbd running"; fi
    fi
    if ! pid_alive "$PID_DBD" slurmdbd; then
        rm -f "$PID_DBD"
        setsid /usr/sbin/slurmdbd </dev/null >>"$LOGDIR/slurmdbd.out" 2>&1 ||
            die 1 "slurmdbd failed to start; see $SLURM_LOG/slurmdbd.log"
        log "started slurmdbd"
    fi
    wait_for 60 slurmdbd "$SLURM_LOG/slurmdbd.log" sacctmgr -n -P list cluster format=cluster
}

add_cluster() {
    if sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        log "cluster '$CLUSTER' registered"
        return 0
    fi
    local out
    out=$(sacctmgr -i add cluster "$CLUSTER" 2>&1) || grep -qi 'already exists' <<<"$out" ||
        die 1 "sacctmgr add cluster $CLUSTER failed: $out"
    log "added cluster '$CLUSTER' to accounting"
}

start_slurm_daemons() {
    if ((SLURM_CHANGED)); then # restart running daemons so they pick up the new slurm.conf
        pid_alive "$PID_SLURMD" slurmd && stop_pids "slurmd:$PID_SLURMD:slurmd"
        pid_alive "$PID_CTLD" slurmctld && stop_pids "slurmctld:$PID_CTLD:slurmctld"
    fi
    start_daemon slurmctld "$PID_CTLD"
    wait_for 60 slurmctld "$SLURM_LOG/slurmctld.log" scontrol ping
    start_daemon slurmd "$PID_SLURMD"
}

start_daemon() { # NAME PIDFILE: start /usr/sbin/NAME unless the process in PIDFILE is already it
    local name=$1 pidfile=$2
    if pid_alive "$pidfile" "$name"; then
        log "$name running"
    else
        rm -f "$pidfile"
        setsid "/usr/sbin/$name" </dev/null >>"$LOGDIR/$name.out" 2>&1 ||
            die 1 "$name failed to start; see $SLURM_LOG/$name.log"
        log "started $name"
    fi
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

wait_idle() {
    local i state="" resumed=0
    for ((i = 0; i < WAIT * 2; i++)); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) break ;;
            down* | drain*)
                if ((!resumed)) && ((i > 4)); then
                    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        sleep 0.5
    done
    case $state in
        idle | mixed | allocated | completing) log "node $NODE is $state -- cluster up" ;;
        *) die 1 "node $NODE not idle after ${WAIT}s (state: '${state:-none}'); see" \
            "$SLURM_LOG/slurmctld.log and $SLURM_LOG/slurmd.log" ;;
    esac
}

cmd_up() {
    check_prereqs
    mkdir -p "$LOGDIR"
    install_packages
    setup_dirs
    start_munge
    start_mariadb
    local pw
    pw=$(db_password)
    setup_database "$pw"
    write_configs "$pw"
    start_slurmdbd
    add_cluster
    start_slurm_daemons
    wait_idle
    sinfo
}

cmd_down() {
    check_prereqs
    # in dependency order; daemons within one call stop in parallel
    stop_pids "slurmd:$PID_SLURMD:slurmd" "slurmctld:$PID_CTLD:slurmctld"
    stop_pids "slurmdbd:$PID_DBD:slurmdbd"
    stop_pids "mariadb:$PID_MYSQL:mariadbd,mysqld" "munged:$PID_MUNGE:munged"
}

cmd_status() {
    local spec label f names ctld_up=0
    local -a n
    for spec in "munged:$PID_MUNGE:munged" "mariadb:$PID_MYSQL:mariadbd,mysqld" "slurmdbd:$PID_DBD:slurmdbd" \
        "slurmctld:$PID_CTLD:slurmctld" "slurmd:$PID_SLURMD:slurmd"; do
        IFS=: read -r label f names <<<"$spec"
        IFS=, read -r -a n <<<"$names"
        if pid_alive "$f" "${n[@]}"; then
            echo "$label: running (pid $(tr -dc '0-9' <"$f"))"
            [[ $label == slurmctld ]] && ctld_up=1
        else
            echo "$label: stopped"
        fi
    done
    # without a local slurmctld, sinfo would retry for ~10 s before giving up
    if ((ctld_up)) && timeout 20 sinfo; then return 0; fi
    echo "sinfo: controller not reachable" >&2
    return 1
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 {up|down|status}" >&2
        exit 64
        ;;
esac
