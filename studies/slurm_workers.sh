#!/usr/bin/env bash
# Optuna study workers on a SLURM cluster: one `optstudy study run` per array task, all sharing one PostgreSQL
# storage (Optuna) and one MLflow tracking server. Tasks can start, die and come back in any order: the first worker
# creates the study, the others join it, each runs trials until the study's budget is spent and then exits 0.
#
# Before: the repository with its .venv (scripts/setup.sh) on a filesystem the nodes share; a PostgreSQL server and an
# MLflow server the nodes reach, e.g. on a head node `docker compose up -d postgres mlflow optuna-dashboard` with
# BIND_ADDRESS and MLFLOW_ALLOWED_HOSTS set in .env (see .env.example). The password goes in ~/.pgpass (mode 600,
# `headnode:5432:optuna:optstudy:PASSWORD`) or PGPASSWORD, not in the URL, which `ps` shows to everyone.
#
# Submit from the repository root (sbatch passes the submitting shell's environment to the job):
#   export OPTSTUDY_STORAGE=postgresql+psycopg://optstudy@headnode:5432/optuna
#   export MLFLOW_TRACKING_URI=http://headnode:5000
#   sbatch studies/slurm_workers.sh studies/bounds.yaml                          # 8 CPU workers (array 0-7)
#   sbatch --array=0-31%8 studies/slurm_workers.sh studies/bounds.yaml           # 32 tasks, at most 8 at once
#   sbatch studies/slurm_workers.sh studies/bounds.yaml trainer.max_epochs=2     # Hydra overrides after the file
#   sbatch --gres=gpu:1 studies/slurm_workers.sh studies/bounds.yaml trainer=gpu # one GPU per worker
#   sbatch --gres=gpu:4 --cpus-per-task=16 studies/slurm_workers.sh studies/bounds.yaml trainer=ddp trainer.devices=4
#   squeue --me; tail -f slurm-<jobid>_0.out                                      # one line per finished trial
#   optstudy study status bounds --storage "$OPTSTUDY_STORAGE"                   # progress, from anywhere
#   scancel <jobid>                                                              # stop every worker
#
# Multi-GPU trials (trainer=ddp): the worker runs each trial as a train.py process of its own (Lightning's DDP starts
# the other ranks by re-running the command that started it, which must be train.py, not a study driver), on the GPUs
# of this task; one task per trial, no srun. So that Lightning starts those ranks itself instead of expecting srun to
# have started one task per GPU, this script hides the job from Lightning's SLURM detection
# (SLURM_JOB_NAME=interactive).
#
# Time limit and pre-emption: SLURM sends USR1 to this script 120 s before the time limit (--signal=B:USR1@120); the
# script requeues the task (`scontrol requeue`, which --requeue allows) and kills its worker. The trial it was running
# stays RUNNING without heartbeats, so Optuna fails it after two missed beats (--heartbeat 30: a minute) and a worker
# runs it again; the requeued task resumes the study with the same command. A task pre-empted by a higher-priority job
# is requeued by SLURM itself (PreemptMode=REQUEUE); scancel ends it for good (TERM: kill the worker, no requeue).
#SBATCH --job-name=optstudy-worker
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: sbatch $0 STUDY.yaml [OVERRIDE ...]" >&2; exit 2; }
: "${OPTSTUDY_STORAGE:?export OPTSTUDY_STORAGE=postgresql+psycopg://USER@HOST:5432/optuna before sbatch}"
: "${MLFLOW_TRACKING_URI:?export MLFLOW_TRACKING_URI=http://HOST:5000 before sbatch}"
case $OPTSTUDY_STORAGE in
  postgresql*) ;;
  *) echo "OPTSTUDY_STORAGE must be a PostgreSQL URL: a journal file is for the processes of one machine" >&2; exit 2 ;;
esac

# sbatch runs a copy of this script from its spool directory: the repository is where sbatch was called
ROOT=${OPTSTUDY_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
[ -x .venv/bin/python ] || { echo "no .venv in $ROOT: run scripts/setup.sh there (or set OPTSTUDY_ROOT)" >&2; exit 2; }
. .venv/bin/activate
study=$1
shift

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}  # torch's threads: this task's cores, not the node's
export SLURM_JOB_NAME=interactive                 # Lightning: no SLURM environment (see the header)
task="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${SLURM_ARRAY_TASK_ID:-0}"
echo "task $task on $(hostname), start $((${SLURM_RESTART_COUNT:-0} + 1)): $study $*"

# Optuna's tables: when all tasks open an empty database at once, all but one lose the race to create them
for attempt in 1 2 3 4 5; do
  python -c "import sys; from optstudy.study.storage import open_storage; open_storage(sys.argv[1])" \
    "$OPTSTUDY_STORAGE" && break
  [ "$attempt" = 5 ] && exit 1
  sleep $((RANDOM % 10 + 1))
done

worker=
stop() {  # $1: requeue or not
  if [ "$1" = requeue ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "task $task: time limit near, requeueing"
    scontrol requeue "$SLURM_JOB_ID" || echo "task $task: scontrol requeue failed" >&2
  fi
  # the whole process group (train.py and its DDP ranks too); KILL, so that the trial is retried, not failed as done
  [ -n "$worker" ] && kill -KILL -- "-$worker" 2>/dev/null
  exit 0
}
trap 'stop requeue' USR1
trap 'stop no' TERM INT

# in the background, in a process group of its own: bash runs a trap only between commands, and `wait` is one
setsid optstudy study run "$study" --storage "$OPTSTUDY_STORAGE" "$@" &
worker=$!
set +e
wait "$worker"
rc=$?
echo "task $task: worker exited with $rc"
exit "$rc"
