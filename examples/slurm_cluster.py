"""
On a SLURM cluster with dask-jobqueue
=====================================

One GPU per SLURM job, one Dask worker per job; the same daskrecon code as on a laptop.
``make_cluster()`` is separate so that the job script it generates can be checked without
SLURM (``tests/test_examples.py`` does). Needs ``pip install 'daskrecon[hpc]'``.
"""

import os

from dask_jobqueue import SLURMCluster


def make_cluster(jobs: int = 4) -> SLURMCluster:
    cluster = SLURMCluster(
        queue=os.environ.get("DASKRECON_QUEUE", "gpu"),
        account=os.environ.get("DASKRECON_ACCOUNT", "myproject"),
        cores=8,
        processes=1,
        memory="64GB",
        walltime="02:00:00",
        job_extra_directives=["--gres=gpu:1"],
        job_script_prologue=["module load cuda", f"source {os.environ.get('VIRTUAL_ENV', '~/venv')}/bin/activate"],
        worker_extra_args=["--resources", "GPU=1", "--lifetime", "115m", "--lifetime-stagger", "4m"],
        log_directory="dask-logs",
        # The scheduler must be reachable from the compute nodes; its dashboard need not be:
        # open it through an SSH tunnel (ssh -L 8787:127.0.0.1:8787 login-node).
        scheduler_options={"dashboard_address": "127.0.0.1:8787"},
    )
    return cluster


if __name__ == "__main__" and (os.environ.get("SLURM_JOB_ID") is not None or os.environ.get("DASKRECON_RUN_SLURM")):
    import daskrecon as dr
    from daskrecon.demo import demo_problem
    from daskrecon.models import bundled_denoiser

    cluster = make_cluster()
    cluster.scale(jobs=4)
    with dr.DistributedContext(cluster, timeout=900) as ctx:  # waits for the first job to start
        x_true, ops, y = demo_problem(2048)
        x = dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(bundled_denoiser(), ctx, patch_size=512, overlap=8),
                           algorithm="red", n_iter=30, step_size=0.3, red_weight=0.3, x_true=x_true,
                           checkpoint="ckpt-slurm", resume=True)
    cluster.close()
elif __name__ == "__main__":
    print(make_cluster().job_script())  # not on SLURM: show the job script that would be submitted
