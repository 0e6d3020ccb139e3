#!/usr/bin/env bash
# A single-node Slurm cluster on a Debian machine, for the tests and for local trials of `--executor slurm`.
#
#   slurm/local-cluster.sh up       install the Debian packages if missing, start munged, mariadbd, slurmdbd,
#                                   slurmctld and slurmd, create the account; prints the SLURM_CONF to export
#   slurm/local-cluster.sh down     cancel its jobs, stop exactly the daemons `up` started (their pid files)
#   slurm/local-cluster.sh status   which of its daemons run
#   slurm/local-cluster.sh env      `export SLURM_CONF=...` for eval
#
# Everything (configs, logs, pid files, database, spool) lives in one state folder, so a machine's own Slurm or
# munge is never touched. Needs root (daemons, apt-get); no systemd.
#
# Settings (environment):
#   QATFLOW_SLURM_STATE      state folder (default /tmp/qatflow-slurm); must be reachable by the munge and mysql
#                            users, so not under a 0700 folder
#   QATFLOW_SLURM_PORT_BASE  first of four TCP ports on 127.0.0.1: slurmctld, slurmd, slurmdbd, mariadb (16817)
#   QATFLOW_SLURM_ACCOUNT    the account jobs are charged to (default qatflow)
#   QATFLOW_SLURM_CPUS       CPUs the node announces (default: the real count, at least 4, so that short one-CPU
#                            jobs can run side by side on a small machine)
set -euo pipefail

STATE=${QATFLOW_SLURM_STATE:-/tmp/qatflow-slurm}
PORT_BASE=${QATFLOW_SLURM_PORT_BASE:-16817}
ACCOUNT=${QATFLOW_SLURM_ACCOUNT:-qatflow}
CLUSTER=qatflow
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
# Stop order; `up` starts them in reverse.
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)
MUNGE_SOCKET=/run/munge/munge.socket.2
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*"; }

pid_file() { echo "$STATE/run/$1.pid"; }

# The pid recorded for daemon $1 if that process is still that daemon (pids get reused).
live_pid() {
  local file pid comm
  file=$(pid_file "$1")
  [[ -s $file ]] || return 1
  pid=$(tr -dc '0-9' < "$file")
  [[ -n $pid && -r /proc/$pid/comm ]] || return 1
  comm=$(cat "/proc/$pid/comm")
  [[ $comm == "$1" ]] || return 1
  echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND (5 s per try) until it succeeds
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  while ((SECONDS < deadline)); do
    if [[ $(type -t "$1") == function ]]; then
      if "$@" > /dev/null 2>&1; then return 0; fi
    elif timeout 5 "$@" > /dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  die "$what did not come up in ${seconds}s; see the logs in $STATE/log"
}

port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }

install_packages() {
  local missing=()
  for cmd in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sbatch sacct; do
    command -v "$cmd" > /dev/null || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $EUID -eq 0 ]] || die "missing ${missing[*]}; run as root to install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps the packages' own services from starting; their "denied execution" lines are expected.
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" > "$STATE/log/apt.log" 2>&1 ||
    die "apt-get install failed; see $STATE/log/apt.log"
}

write_configs() {
  local cpus real_cpus memory
  real_cpus=$(nproc)
  cpus=${QATFLOW_SLURM_CPUS:-$((real_cpus > 4 ? real_cpus : 4))}
  memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  cat > "$STATE/etc/slurm.conf" << EOF
# Written by slurm/local-cluster.sh: one node, accounting through slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
PlugStackConfig=$STATE/etc/plugstack.conf
# No cgroups in a container: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
MinJobAge=300
# A job whose afterok dependency failed is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
# The node announces more CPUs than it has (see QATFLOW_SLURM_CPUS).
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=batch Nodes=localhost Default=YES MaxTime=04:00:00 State=UP
PartitionName=cpu Nodes=localhost MaxTime=01:00:00 State=UP
EOF
  : > "$STATE/etc/plugstack.conf"  # no SPANK plugins: no pyxis here
  cat > "$STATE/etc/slurmdbd.conf" << EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pid_file slurmdbd)
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$STATE/etc/db.password")
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$STATE/etc/slurmdbd.conf"
}

munge_works() { munge -n < /dev/null 2> /dev/null | unmunge > /dev/null 2>&1; }

# Slurm's clients reach munged at its default socket only (sacctmgr ignores AuthInfo=socket=...), so a munged
# already serving that socket is used as it is, and never stopped; otherwise ours serves it, with a key of its own.
start_munge() {
  if munge_works; then
    log "using the munged that already serves $MUNGE_SOCKET (not started here, so not stopped by down)"
    return 0
  fi
  mkdir -p "$STATE/munge" "$(dirname "$MUNGE_SOCKET")"
  if [[ ! -s $STATE/munge/munge.key ]]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$STATE/munge" "$(dirname "$MUNGE_SOCKET")"
  chmod 700 "$STATE/munge"
  chmod 755 "$(dirname "$MUNGE_SOCKET")"
  chmod 400 "$STATE/munge/munge.key"
  touch "$(pid_file munged)" "$STATE/log/munged.log"
  chown munge:munge "$(pid_file munged)" "$STATE/log/munged.log"
  # munged refuses root; it forks into the background and writes its pid file.
  setpriv --reuid munge --regid munge --init-groups munged --socket="$MUNGE_SOCKET" \
    --key-file="$STATE/munge/munge.key" --pid-file="$(pid_file munged)" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
  wait_for 10 munged munge_works
}

start_mariadb() {
  mkdir -p "$STATE/mysql"
  chown mysql:mysql "$STATE/mysql"
  if [[ ! -d $STATE/mysql/mysql ]]; then
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
      --skip-test-db > "$STATE/log/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
  fi
  touch "$(pid_file mariadbd)" "$STATE/log/mariadb.log"
  chown mysql:mysql "$(pid_file mariadbd)" "$STATE/log/mariadb.log"
  # mariadbd stays in the foreground: detach it from this shell; it writes its own pid file.
  setsid mariadbd --user=mysql --datadir="$STATE/mysql" --socket="$STATE/mysql/mysqld.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$(pid_file mariadbd)" \
    --log-error="$STATE/log/mariadb.log" < /dev/null > /dev/null 2>&1 &
  wait_for 30 mariadbd mariadb --socket="$STATE/mysql/mysqld.sock" -u root -e "SELECT 1"
  local password
  password=$(cat "$STATE/etc/db.password")
  mariadb --socket="$STATE/mysql/mysqld.sock" -u root << EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

up() {
  local running=() stopped=()
  for daemon in slurmd slurmctld slurmdbd mariadbd; do  # munged may be the machine's own: see start_munge
    if live_pid "$daemon" > /dev/null; then running+=("$daemon"); else stopped+=("$daemon"); fi
  done
  if [[ ${#stopped[@]} -eq 0 ]]; then
    log "already up ($STATE)"
    echo "export SLURM_CONF=$STATE/etc/slurm.conf"
    return 0
  fi
  [[ ${#running[@]} -eq 0 ]] || die "partly up (${running[*]} running, ${stopped[*]} not); run '$0 down' first"
  [[ $EUID -eq 0 ]] || die "must run as root (it starts daemons as root, munge and mysql)"
  for port in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
    port_free "$port" || die "port $port is in use; set QATFLOW_SLURM_PORT_BASE to a free range of four ports"
  done
  # A failed start stops what it had started, so nothing is left half up.
  trap 'code=$?; if ((code != 0)); then log "up failed: stopping what it started"; down; fi' EXIT
  mkdir -p "$STATE"/{etc,log,run,spool/ctld,spool/d}
  chmod 755 "$STATE" "$STATE/log"
  chmod 1777 "$STATE/run"  # munged (user munge) replaces its own pid file there
  install_packages
  if [[ ! -s $STATE/etc/db.password ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$STATE/etc/db.password")
  fi
  write_configs
  export SLURM_CONF=$STATE/etc/slurm.conf

  start_munge
  start_mariadb
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n show cluster
  # Cluster, account and the submitting users' associations (root, and the sudo caller if any).
  sacctmgr -i add cluster "$CLUSTER" > /dev/null 2>&1 || true
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=qatflow organization=qatflow \
    > /dev/null 2>&1 || true
  for user in root ${SUDO_USER:-}; do
    sacctmgr -i add user "$user" account="$ACCOUNT" cluster="$CLUSTER" > /dev/null 2>&1 || true
  done
  sacctmgr -n -P show assoc where account="$ACCOUNT" user=root format=user | grep -q root ||
    die "could not add the account $ACCOUNT; see $STATE/log/slurmdbd.log"
  slurmctld
  wait_for 30 slurmctld scontrol ping
  # The machine's hostname is no node name here: slurmd runs as node `localhost`.
  slurmd -N localhost
  wait_for 60 "node localhost" node_idle
  log "up: cluster $CLUSTER, account $ACCOUNT, partitions batch (default) and cpu; state in $STATE"
  echo "export SLURM_CONF=$STATE/etc/slurm.conf"
}

node_idle() { [[ $(sinfo -h -n localhost -o %T 2> /dev/null | head -n1) == idle* ]]; }

stop_pid() {  # stop_pid NAME PID: TERM, then KILL after 30 s
  local name=$1 pid=$2
  kill -TERM "$pid" 2> /dev/null || return 0
  for _ in $(seq 150); do
    [[ -d /proc/$pid ]] || return 0
    sleep 0.2
  done
  log "$name ($pid) ignored SIGTERM for 30s: SIGKILL"
  kill -KILL "$pid" 2> /dev/null || true
}

down() {
  export SLURM_CONF=$STATE/etc/slurm.conf
  # Jobs first: their slurmstepd processes would outlive slurmd.
  if live_pid slurmctld > /dev/null; then
    local jobs
    jobs=$(squeue -h -o %i 2> /dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2> /dev/null || true
      for _ in $(seq 100); do
        [[ -z $(squeue -h -o %i 2> /dev/null) ]] && break
        sleep 0.2
      done
    fi
  fi
  local pid
  for daemon in "${DAEMONS[@]}"; do
    if pid=$(live_pid "$daemon"); then
      stop_pid "$daemon" "$pid"
      log "stopped $daemon ($pid)"
    fi
    rm -f "$(pid_file "$daemon")"
  done
}

status() {
  local pid code=0
  for daemon in "${DAEMONS[@]}"; do
    if pid=$(live_pid "$daemon"); then
      echo "$daemon running ($pid)"
    elif [[ $daemon == munged ]] && munge_works; then
      echo "munged not ours (the machine's own serves $MUNGE_SOCKET)"
    else
      echo "$daemon stopped"
      code=3
    fi
  done
  return $code
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$STATE/etc/slurm.conf" ;;
  *) echo "usage: $0 up|down|status|env   (state folder: \$QATFLOW_SLURM_STATE, default /tmp/qatflow-slurm)" >&2
     exit 2 ;;
esac
