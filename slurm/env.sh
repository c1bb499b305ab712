# The environment every script in slurm/ runs in; sourced, never run. It finds the project and its Python
# environment, gives the job a run folder of its own, and defines `lc_fit`, which starts one training process per
# task with srun.
#
# Set these before `sbatch` to change a default (sbatch passes the submitting shell's environment to the job):
#   LC_ROOT         the project checkout                 default: the folder sbatch was called from
#   LC_PYTHON       the Python that has lightning_compress default: $LC_ROOT/.venv/bin/python
#   LC_RUNS         the root of the run folders          default: $LC_ROOT/runs
#   LC_ACCELERATOR  cpu | gpu | auto                      default: auto (gpu when the job was given GPUs)
#                   cpu runs the same scripts on CPU-only partitions: one process per task, gloo
#   LC_REQUEUE      true | false | null                  default: null (requeue, as this is a SLURM job)
#                   false: on the preemption signal save the checkpoint and end, without `scontrol requeue`
#   LC_MASTER_ADDR  the host the ranks meet at            default: the job's first node (SLURM's node list)
#                   set it where node names do not resolve to addresses
#
# Distributed-launch variables inherited from the submitting shell (MASTER_PORT, RANK, WORLD_SIZE, ...) are
# dropped: they would override what SLURM gives each job, and two jobs with one inherited MASTER_PORT collide.
#
# The run folder is $LC_RUNS/<job id> (<array job id>_<task id> for an array task). A requeued job keeps its id, so
# it finds its folder and its checkpoint again; no other job writes there.

set -euo pipefail

LC_ROOT="${LC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
LC_PYTHON="${LC_PYTHON:-$LC_ROOT/.venv/bin/python}"
LC_RUNS="${LC_RUNS:-$LC_ROOT/runs}"
LC_ACCELERATOR="${LC_ACCELERATOR:-auto}"

unset MASTER_PORT WORLD_SIZE RANK LOCAL_RANK NODE_RANK GROUP_RANK LOCAL_WORLD_SIZE
if [ -n "${LC_MASTER_ADDR:-}" ]; then export MASTER_ADDR="$LC_MASTER_ADDR"; else unset MASTER_ADDR; fi

case "$LC_ACCELERATOR" in
  cpu | gpu) ;;
  auto) if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ]; then LC_ACCELERATOR=gpu; else LC_ACCELERATOR=cpu; fi ;;
  *) echo "slurm/env.sh: LC_ACCELERATOR must be cpu, gpu or auto; got '$LC_ACCELERATOR'" >&2; exit 2 ;;
esac

if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  LC_JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  LC_JOB="${SLURM_JOB_ID:?slurm/env.sh is for SLURM jobs: submit the script with sbatch}"
fi
LC_RUN_DIR="$LC_RUNS/$LC_JOB"

# lc_fit RECIPE [LIGHTNING-CLI ARGS...]: train RECIPE with one process per task on every node of the job.
# Nodes and processes per node come from the job (--nodes, --ntasks-per-node); arguments after the recipe are
# LightningCLI's and win over the recipe (a --trainer.devices that disagrees with the job is refused by Lightning).
lc_fit() {
  local recipe="${1:?usage: lc_fit RECIPE [ARGS...]}"
  shift
  if [ ! -f "$recipe" ]; then
    echo "slurm: the recipe '$recipe' does not exist (paths are relative to $LC_ROOT)" >&2
    return 2
  fi
  if [ ! -x "$LC_PYTHON" ]; then
    echo "slurm: no Python at '$LC_PYTHON'; run 'bash scripts/setup.sh' in $LC_ROOT or set LC_PYTHON" >&2
    return 2
  fi
  mkdir -p "$LC_RUN_DIR"
  echo "slurm: job $LC_JOB (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $recipe -> $LC_RUN_DIR"
  srun --kill-on-bad-exit=1 "$LC_PYTHON" -m lightning_compress.cli fit \
    --config "$recipe" \
    --trainer.accelerator "$LC_ACCELERATOR" \
    --trainer.num_nodes "${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" \
    --trainer.devices "${SLURM_NTASKS_PER_NODE:-1}" \
    --trainer.default_root_dir "$LC_RUN_DIR" \
    --trainer.callbacks+=lightning_compress.PreemptionCheckpoint \
    --trainer.callbacks.requeue "${LC_REQUEUE:-null}" \
    "$@"
}

cd "$LC_ROOT"
