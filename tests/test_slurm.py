"""The project's own sbatch scripts on a real SLURM cluster (slurmctld and two slurmd nodes on this host, CPU only):
a two-node pruning + QAT job completes with ranks on both nodes; a job preempted mid-epoch and mid-schedule is
requeued and ends bitwise equal to one never stopped, with one checkpoint; a later job in the same root folder starts
from scratch; bad input fails the job with a message, never a hang.

Every job is 2 nodes x 1 task over gloo, ``LC_ACCELERATOR=cpu``; the whole and preempted pair runs under DDP and under
DeepSpeed ZeRO-2, the multi-node script's default strategy. An epoch is 19 steps (2 ranks x 32 of 1,168
digits): the preemption at step 22 is inside the second epoch, inside the pruning ramp and before the QAT observers
freeze.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import slurm_cluster
import torch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
MULTINODE = REPO_ROOT / "slurm" / "train_multinode.sbatch"
SINGLE_NODE = REPO_ROOT / "slurm" / "train.sbatch"
MAX_STEPS = 30
HOLD_STEP = 22
RECIPE = f"""
seed_everything: 0
trainer:
  max_steps: {MAX_STEPS}
  log_every_n_steps: 5
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 2
  callbacks:
    - class_path: GradualPruning
      init_args: {{target_sparsity: 0.8, start_step: 4, end_step: 28, update_every: 4}}
    - class_path: QuantizationAwareTraining
      init_args: {{weight_bits: 8, activation_bits: 8, start_step: 8, freeze_observers_step: 26}}
    - class_path: CompressionMonitor
      init_args: {{log_every_n_steps: 5, measure_latency: false}}
model:
  class_path: lightning_compress.models.ImageClassifier
  init_args: {{image_size: 8}}
data:
  class_path: lightning_compress.data.DigitsDataModule
  init_args: {{batch_size: 32}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slurm_cluster.Cluster]:
    reason = slurm_cluster.available()
    if reason is not None:
        pytest.skip(f"no SLURM test cluster: {reason}")
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where jobs are submitted from (their output files) and their run folders go (``runs/``)."""
    folder = tmp_path_factory.mktemp("jobs")
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder


class Jobs:
    def __init__(self, cluster: slurm_cluster.Cluster, workdir: Path) -> None:
        self.cluster, self.workdir = cluster, workdir
        self.env = {
            "LC_ROOT": str(REPO_ROOT),
            "LC_PYTHON": sys.executable,
            "LC_RUNS": str(workdir / "runs"),
            "LC_ACCELERATOR": "cpu",
            "LC_STRATEGY": "ddp",
            "PYTHONPATH": str(REPO_ROOT / "tests" / "harness"),
            "LC_MASTER_ADDR": "127.0.0.1",  # the nodes n1 and n2 are names only this cluster knows
            "MASTER_PORT": "29400",  # a shell's leftover (CI's earlier tests leave one): two jobs must not share it
        }

    def submit(
        self, *args: str, sbatch: tuple[str, ...] = (), recipe: str | None = None, script: Path = MULTINODE, **env: str
    ) -> str:
        recipe = str(self.workdir / "recipe.yaml") if recipe is None else recipe
        return self.cluster.submit(
            f"--output={self.workdir}/slurm-%j.out", *sbatch, str(script), recipe, *args,
            cwd=self.workdir, env={**self.env, **env},
        )  # fmt: skip

    def run_dir(self, job: str) -> Path:
        return self.workdir / "runs" / job

    def output(self, job: str) -> str:
        return (self.workdir / f"slurm-{job}.out").read_text()

    def reports(self, job: str, restart: int = 0) -> list[dict[str, Any]]:
        return [json.loads((self.run_dir(job) / f"rank{r}-run{restart}.json").read_text()) for r in range(2)]

    def wait(self, job: str, timeout: float = 300) -> dict[str, str]:
        return self.cluster.wait(job, timeout=timeout)

    def hold_until_both_ranks_wait(self, job: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not all((self.run_dir(job) / f"holding-rank{r}").exists() for r in range(2)):
            state = self.cluster.job(job).get("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state}:\n{self.output(job)}"
            assert time.monotonic() < deadline, f"job {job} never reached step {HOLD_STEP}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def jobs(cluster: slurm_cluster.Cluster, workdir: Path) -> Jobs:
    return Jobs(cluster, workdir)


PROBE = "--trainer.callbacks+=slurm_probe.RankReport"


#: The strategies of the two-node jobs: DDP, and the multi-node script's default, DeepSpeed ZeRO-2 (Lightning's
#: strategy with its CUDA-only refusals removed, tests/harness/cpu_deepspeed.py), whose checkpoint is a folder.
STRATEGIES = {
    "ddp": ("--trainer.strategy=ddp",),
    "zero2": ("--trainer.strategy=cpu_deepspeed.CPUDeepSpeedStrategy", "--trainer.strategy.stage=2",
              "--trainer.strategy.micro_batch_size=32"),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(STRATEGIES))
def whole_and_preempted(request: pytest.FixtureRequest, jobs: Jobs) -> tuple[str, str]:
    """The same job twice, at once: one never stopped, one preempted with ``scancel --signal=USR1`` at step 22."""
    strategy = STRATEGIES[request.param]
    whole = jobs.submit(PROBE, *strategy)
    preempted = jobs.submit(PROBE, *strategy, f"--trainer.callbacks.hold_at_step={HOLD_STEP}")
    jobs.hold_until_both_ranks_wait(preempted)
    jobs.cluster.run("scancel", "--signal=USR1", preempted)
    for job in (whole, preempted):
        record = jobs.wait(job)
        assert record["JobState"] == "COMPLETED", f"job {job} {record['JobState']}:\n{jobs.output(job)}"
    return whole, preempted


def test_a_two_node_job_completes_with_a_rank_on_each_node(jobs: Jobs, whole_and_preempted: tuple[str, str]) -> None:
    whole, _ = whole_and_preempted
    reports = jobs.reports(whole)
    assert [(r["world_size"], r["num_nodes"], r["global_rank"]) for r in reports] == [(2, 2, 0), (2, 2, 1)]
    assert sorted(r["node_rank"] for r in reports) == [0, 1]
    assert sorted(r["slurm_node"] for r in reports) == ["n1", "n2"]
    assert [r["end_step"] for r in reports] == [MAX_STEPS, MAX_STEPS]
    assert reports[0]["weight_sparsity"] == pytest.approx(0.8, abs=0.01)


def test_the_two_node_job_logs_its_compress_metrics(jobs: Jobs, whole_and_preempted: tuple[str, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole, _ = whole_and_preempted
    (log_dir,) = (jobs.run_dir(whole) / "lightning_logs").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    sparsity = [event.value for event in events.Scalars("compress/weight_sparsity")]
    assert sparsity[0] == 0.0 and sparsity[-1] == pytest.approx(0.8, abs=0.01)
    assert {"compress/params_effective", "compress/bytes_compressed", "compress/flops_effective"} <= set(
        events.Tags()["scalars"]
    )


def test_a_preempted_job_is_requeued_and_ends_bitwise_equal_to_one_never_stopped(
    jobs: Jobs, whole_and_preempted: tuple[str, str]
) -> None:
    whole, preempted = whole_and_preempted
    assert jobs.cluster.job(preempted)["Restarts"] == "1"
    manifest = json.loads((jobs.run_dir(preempted) / "preemption.json").read_text())
    assert manifest["checkpoints"]["hpc_ckpt_1.ckpt"]["step"] == HOLD_STEP + 1  # saved at the end of the held step
    assert [r["start_step"] for r in jobs.reports(preempted, restart=1)] == [HOLD_STEP + 1] * 2
    expected = torch.load(jobs.run_dir(whole) / "final.pt", weights_only=True)
    resumed = torch.load(jobs.run_dir(preempted) / "final.pt", weights_only=True)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


def test_one_preemption_writes_exactly_one_checkpoint(
    jobs: Jobs, whole_and_preempted: tuple[str, str], request: pytest.FixtureRequest
) -> None:
    _, preempted = whole_and_preempted
    folder = jobs.run_dir(preempted)
    deepspeed = request.node.callspec.params["whole_and_preempted"] != "ddp"
    assert (folder / "hpc_ckpt_1.ckpt").is_dir() == deepspeed  # DeepSpeed's checkpoint: a folder of every rank's shards
    assert sorted(p.name for p in folder.iterdir() if "ckpt" in p.name or p.name.startswith(".writing")) == [
        "hpc_ckpt_1.ckpt"
    ]
    manifest = json.loads((folder / "preemption.json").read_text())
    assert manifest["checkpoints"]["hpc_ckpt_1.ckpt"]["job"] == preempted
    assert jobs.output(preempted).count("PreemptionCheckpoint: step") == 1
    assert f"PreemptionCheckpoint: requeueing SLURM job {preempted}" in jobs.output(preempted)


def test_a_later_job_in_the_same_root_folder_starts_from_scratch(
    jobs: Jobs, whole_and_preempted: tuple[str, str]
) -> None:
    _, preempted = whole_and_preempted
    later = jobs.submit(PROBE, "--trainer.max_steps=2")
    assert jobs.wait(later)["JobState"] == "COMPLETED", jobs.output(later)
    assert [r["start_step"] for r in jobs.reports(later)] == [0, 0]
    assert "Restored all states" not in jobs.output(later)
    assert jobs.run_dir(later) != jobs.run_dir(preempted)


def test_the_single_node_script_runs_one_rank_per_task_on_one_node(jobs: Jobs) -> None:
    job = jobs.submit(PROBE, "--trainer.max_steps=4", sbatch=("--ntasks-per-node=2",), script=SINGLE_NODE)
    assert jobs.wait(job)["JobState"] == "COMPLETED", jobs.output(job)
    reports = jobs.reports(job)
    assert [(r["world_size"], r["num_nodes"], r["global_rank"], r["end_step"]) for r in reports] == [
        (2, 1, 0, 4),
        (2, 1, 1, 4),
    ]
    assert len({r["slurm_node"] for r in reports}) == 1


@pytest.mark.parametrize(
    ("args", "sbatch", "recipe", "message"),
    [
        ((), (), "recipes/no_such_recipe.yaml", "the recipe 'recipes/no_such_recipe.yaml' does not exist"),
        (("--trainer.devices=2",), (), None, "You set `devices=2` in Lightning, but the number of tasks per node"),
        (("--trainer.num_nodes=1",), (), None, "You set `num_nodes=1` in Lightning, but the number of nodes"),
    ],
    ids=["missing-recipe", "devices-not-ntasks-per-node", "num-nodes-not-slurm-nnodes"],
)
def test_bad_input_fails_the_job_with_a_message(
    jobs: Jobs, args: tuple[str, ...], sbatch: tuple[str, ...], recipe: str | None, message: str
) -> None:
    job = jobs.submit(*args, sbatch=sbatch, recipe=recipe)
    record = jobs.wait(job, timeout=180)
    assert record["JobState"] == "FAILED", jobs.output(job)
    assert message in jobs.output(job)


def test_a_requeue_onto_a_damaged_checkpoint_fails_the_job_naming_it(jobs: Jobs) -> None:
    # LC_REQUEUE=false: the job saves and ends without requeueing itself, so the test damages the checkpoint first
    job = jobs.submit(PROBE, "--trainer.callbacks.hold_at_step=3", "--trainer.max_steps=6", LC_REQUEUE="false")
    jobs.hold_until_both_ranks_wait(job)
    jobs.cluster.run("scancel", "--signal=USR1", job)
    assert jobs.wait(job)["JobState"] == "COMPLETED", jobs.output(job)
    checkpoint = jobs.run_dir(job) / "hpc_ckpt_1.ckpt"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    jobs.cluster.run("scontrol", "requeue", job)
    record = jobs.wait(job)
    assert record["JobState"] == "FAILED", jobs.output(job)
    assert f"{checkpoint} (step 4) does not match what was written" in jobs.output(job)
