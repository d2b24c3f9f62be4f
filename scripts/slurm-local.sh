#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for testing profiles/slurm (tests/test_slurm.py, CI).
#
#   bash scripts/slurm-local.sh start     install (once), configure, start munged/slurmctld/slurmd, wait for idle
#   bash scripts/slurm-local.sh status    daemons and `sinfo`
#   bash scripts/slurm-local.sh stop      stop slurmd, slurmctld and munged (cancels running jobs)
#
# Needs root (or sudo) and a Debian/Ubuntu apt. Works without systemd: the daemons are started directly.
# Idempotent: a second `start` changes nothing; if the generated configuration differs from what is on
# disk, it is rewritten and the daemons restarted. The node is `localhost` with the machine's CPUs and
# memory (`slurmd -C`) and a *counted* GRES `gpu:N` (no real devices: Slurm 22.05 ignores a GPU without
# File=, so each is a symlink /run/slurm-local/gpuK -> /dev/null), so GPU requests (`--gpus=1`,
# `--gres=gpu:1`) schedule on a CPU-only machine. No accounting database: `sacct` does not work here,
# use the Slurm profile's squeue status command.
#
# Environment: SLURM_LOCAL_GPUS (counted GPUs, default 2), SLURM_LOCAL_TIMEOUT (seconds to wait for the
# node, default 60), SLURM_LOCAL_FORCE=1 (overwrite a slurm.conf that this script did not write).
set -euo pipefail

GPUS="${SLURM_LOCAL_GPUS:-2}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
ETC=/etc/slurm
CONF="$ETC/slurm.conf"
GRES_CONF="$ETC/gres.conf"
MARKER="# Written by rpat scripts/slurm-local.sh (one-node test cluster); rerun the script to update."
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
NODE=localhost
GPU_DIR=/run/slurm-local   # counted GPUs: gpu0.. symlinks to /dev/null (see fake_gpus)

say() { echo "slurm-local: $*"; }
die() {
  echo "slurm-local: ERROR: $*" >&2
  exit 1
}

show_logs() {
  local f n
  for f in "$LOG_DIR/slurmctld.log:25" "$LOG_DIR/slurmd.log:25" /var/log/munge/munged.log:8; do
    n="${f##*:}"
    f="${f%:*}"
    if as_root test -s "$f"; then
      echo "----- last $n lines of $f -----" >&2
      as_root tail -n "$n" "$f" >&2
    fi
  done
}

fail() {
  echo "slurm-local: ERROR: $*" >&2
  show_logs
  exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "needs root (or sudo) to install packages and start daemons"
  SUDO=(sudo -n)
  "${SUDO[@]}" true 2>/dev/null || die "needs root or password-less sudo"
fi
as_root() { "${SUDO[@]}" "$@"; }

pid_alive() { # pidfile
  local pid
  [ -r "$1" ] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && as_root kill -0 "$pid" 2>/dev/null
}

stop_pidfile() { # pidfile name
  local pid i
  if ! pid_alive "$1"; then
    as_root rm -f "$1"
    return 0
  fi
  pid="$(cat "$1")"
  say "stopping $2 (pid $pid)"
  as_root kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    as_root kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if as_root kill -0 "$pid" 2>/dev/null; then
    say "$2 did not stop after 10 s; sending SIGKILL"
    as_root kill -KILL "$pid" 2>/dev/null || true
  fi
  as_root rm -f "$1"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ] || missing+=(slurmd)
  command -v sinfo >/dev/null 2>&1 || missing+=(slurm-client)
  command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || missing+=(munge)
  if [ ${#missing[@]} -eq 0 ]; then
    say "Slurm and munge already installed ($(sinfo --version 2>/dev/null || echo '?'))"
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  say "installing slurm-wlm (slurmctld slurmd slurm-client) and munge with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
    || die "apt-get update failed (no access to the Debian package mirror?)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurm-wlm slurmctld slurmd slurm-client munge \
    || die "apt-get install slurm-wlm slurmctld slurmd slurm-client munge failed"
}

node_line() {
  # `slurmd -C` prints e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2
  # ThreadsPerCore=1 RealMemory=24105"; fall back to nproc/free when it fails.
  local c cpus mem topo="" key val
  c="$(as_root /usr/sbin/slurmd -C 2>/dev/null | head -n 1 || true)"
  cpus="$(sed -n 's/.*CPUs=\([0-9]\+\).*/\1/p' <<<"$c")"
  mem="$(sed -n 's/.*RealMemory=\([0-9]\+\).*/\1/p' <<<"$c")"
  for key in Boards SocketsPerBoard CoresPerSocket ThreadsPerCore; do
    val="$(sed -n "s/.*[[:space:]]$key=\([0-9]\+\).*/\1/p" <<<"$c")"
    [ -n "$val" ] && topo="$topo $key=$val"
  done
  [ -n "$cpus" ] || { cpus="$(nproc)"; topo=""; }
  [ -n "$mem" ] || mem="$(free -m | awk '/^Mem:/ {print $2}')"
  [ -n "$cpus" ] && [ -n "$mem" ] || die "could not determine CPUs/memory (slurmd -C: '$c')"
  # Leave a little memory out so the node is never drained for "Low RealMemory".
  mem=$((mem * 95 / 100))
  echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus$topo RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN"
}

fake_gpus() {
  # Slurm 22.05 drops GPUs without File= ("Removing file-less GPU gpu:(null) from final GRES list") and
  # wants character devices, so each counted GPU is a symlink to /dev/null. TaskPlugin=task/none: nothing
  # is bound or confined; jobs only get CUDA_VISIBLE_DEVICES set.
  local i
  as_root mkdir -p "$GPU_DIR"
  as_root find "$GPU_DIR" -maxdepth 1 -name "gpu*" -type l -delete
  for i in $(seq 0 $((GPUS - 1))); do
    as_root ln -sfn /dev/null "$GPU_DIR/gpu$i"
  done
}

write_if_changed() { # path content -> returns 0 if written
  local path="$1" content="$2"
  if [ -f "$path" ] && [ "$(cat "$path")" == "$content" ]; then
    return 1
  fi
  printf '%s\n' "$content" | as_root tee "$path.tmp" >/dev/null
  as_root mv -f "$path.tmp" "$path"
  return 0
}

configure() { # sets CHANGED=1 when a file changed
  CHANGED=0
  as_root mkdir -p "$ETC" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${SLURM_LOCAL_FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; refusing to overwrite it (SLURM_LOCAL_FORCE=1 to override)"
  fi
  local conf gres
  conf="$MARKER
ClusterName=rpatlocal
SlurmctldHost=$NODE
# Root daemons: a throwaway test machine. Use a dedicated 'slurm' user on anything shared.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked through /proc, tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting database: sacct is unavailable, the Snakemake plugin uses squeue (MinJobAge >= 120 s).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
# Counted GPUs (gres.conf: File= symlinks to /dev/null), so GPU requests schedule on a CPU-only machine.
GresTypes=gpu
$(node_line)
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP"
  gres="$MARKER
NodeName=$NODE Name=gpu Count=$GPUS File=$GPU_DIR/gpu[0-$((GPUS - 1))]"
  if write_if_changed "$CONF" "$conf"; then CHANGED=1; say "wrote $CONF"; fi
  if write_if_changed "$GRES_CONF" "$gres"; then CHANGED=1; say "wrote $GRES_CONF"; fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    as_root mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1 || [ -x /usr/sbin/mungekey ]; then
      as_root /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
  fi
  if id munge >/dev/null 2>&1; then
    as_root chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    as_root install -d -o munge -g munge -m 0755 /run/munge
  else
    as_root install -d -m 0755 /run/munge
  fi
  as_root chmod 0700 /etc/munge
  as_root chmod 0400 /etc/munge/munge.key
  if munge_ok; then
    say "munged already running"
    return 0
  fi
  stop_pidfile "$MUNGE_PID" munged
  say "starting munged"
  if id munge >/dev/null 2>&1; then
    as_root runuser -u munge -- /usr/sbin/munged || fail "munged failed to start: runuser -u munge -- /usr/sbin/munged"
  else
    as_root /usr/sbin/munged --force || fail "munged failed to start: /usr/sbin/munged --force"
  fi
  local i
  for i in $(seq 1 20); do
    munge_ok && return 0
    sleep 0.5
  done
  fail "munged started but 'munge -n | unmunge' still fails: $(munge -n 2>&1 | unmunge 2>&1 | tail -n 3)"
}

start_slurm() {
  if [ "$CHANGED" = 1 ]; then
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
  fi
  if pid_alive "$CTLD_PID"; then
    say "slurmctld already running (pid $(cat "$CTLD_PID"))"
  else
    say "starting slurmctld"
    # -c: start from a clean state after a configuration change (a test cluster keeps no jobs worth saving).
    local args=()
    [ "$CHANGED" = 1 ] && args+=(-c)
    as_root /usr/sbin/slurmctld "${args[@]}" || fail "slurmctld failed to start: /usr/sbin/slurmctld ${args[*]}"
  fi
  local i
  for i in $(seq 1 "$TIMEOUT"); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    pid_alive "$CTLD_PID" || fail "slurmctld exited right after starting"
    sleep 1
  done
  scontrol ping 2>/dev/null | grep -q 'is UP' || fail "slurmctld not answering after ${TIMEOUT} s: $(scontrol ping 2>&1)"
  if pid_alive "$SLURMD_PID"; then
    say "slurmd already running (pid $(cat "$SLURMD_PID"))"
  else
    say "starting slurmd -N $NODE"
    as_root /usr/sbin/slurmd -N "$NODE" || fail "slurmd failed to start: /usr/sbin/slurmd -N $NODE"
  fi
}

wait_idle() {
  local state="" i
  for i in $(seq 1 "$TIMEOUT"); do
    state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
      idle | mixed | allocated | completing)
        say "node $NODE is $state"
        sinfo -N -o '%N %P %T %c %m %G' || true
        return 0
        ;;
      drain* | down* | fail*)
        # e.g. left down by an earlier run: bring it back.
        as_root scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    pid_alive "$SLURMD_PID" || [ "$i" -lt 5 ] || fail "slurmd is not running (it exited after starting)"
    sleep 1
  done
  fail "node $NODE not idle after ${TIMEOUT} s (state '${state:-none}'); $(sinfo -N -R 2>&1 | tail -n 3)"
}

status() {
  local ok=0
  for d in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
    if pid_alive "${d#*:}"; then
      say "${d%%:*} running (pid $(cat "${d#*:}"))"
    else
      say "${d%%:*} not running"
      ok=1
    fi
  done
  command -v sinfo >/dev/null 2>&1 && sinfo -N -o '%N %P %T %c %m %G' 2>&1 || true
  return $ok
}

case "${1:-start}" in
  start)
    install_packages
    [ "$GPUS" -ge 1 ] 2>/dev/null || die "SLURM_LOCAL_GPUS must be a positive integer (got '$GPUS')"
    configure
    fake_gpus
    start_munge
    start_slurm
    wait_idle
    say "cluster up: try 'srun --gpus=1 hostname' or 'snakemake --profile profiles/slurm --workflow-profile none'"
    ;;
  stop)
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$MUNGE_PID" munged
    say "stopped"
    ;;
  restart)
    bash "$0" stop
    exec bash "$0" start
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 [start|stop|restart|status]" >&2
    exit 2
    ;;
esac
