# Sourced by the sbatch scripts in this folder (bash). Defines run_with_requeue.
#
#   run_with_requeue srun ... python examples/train_sft.py ...
#
# Runs the command (a job step) in the background and waits for it. On USR1 (sent to the batch
# shell by `#SBATCH --signal=B:USR1@<seconds>` before the time limit) it passes USR1 to every
# process of the job's steps; the training processes save a checkpoint and exit 0, and then the
# job is requeued. On SIGTERM (preemption) it only keeps waiting: Slurm signals the training
# processes itself and requeues a preempted --requeue job on its own. Returns the step's status;
# a step that failed is never requeued, so a crash cannot loop.

_requeue_stop_requested=0
_requeue_signals_seen=0

_requeue_on_usr1() {
    _requeue_signals_seen=$((_requeue_signals_seen + 1))
    if [[ $_requeue_stop_requested == 0 ]]; then
        _requeue_stop_requested=1
        echo "[$(date -Is)] time limit near: asking the training processes to save and exit"
        # --signal goes to every process of the job's steps, not to this batch shell.
        scancel --signal=USR1 "$SLURM_JOB_ID"
    fi
}

_requeue_on_term() {
    _requeue_signals_seen=$((_requeue_signals_seen + 1))
    echo "[$(date -Is)] SIGTERM: the training processes save and exit; waiting for them"
}

run_with_requeue() {
    trap _requeue_on_usr1 USR1
    trap _requeue_on_term TERM
    "$@" &
    local pid=$! rc seen
    # A trapped signal interrupts `wait` (status > 128) before the step ends: then wait again.
    while true; do
        seen=$_requeue_signals_seen
        rc=0
        wait "$pid" || rc=$?
        (( rc > 128 && _requeue_signals_seen != seen )) || break
    done
    if [[ $_requeue_stop_requested == 1 && $rc == 0 ]]; then
        echo "[$(date -Is)] checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
