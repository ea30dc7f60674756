"""Launcher environment parsing: torchrun, MPI (Open MPI, MPICH/Hydra), SLURM, bad env."""

import pytest

from heddle.dist import detect_launch_env
from heddle.dist.bootstrap import expand_first_host


def test_torchrun():
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    e = detect_launch_env(env)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == \
        ("torchrun", 3, 4, 1, "10.0.0.1", 29500)


def test_torchrun_incomplete_names_missing():
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT"):
        detect_launch_env(dict(RANK="0", WORLD_SIZE="2"))
    with pytest.raises(ValueError, match="RANK"):
        detect_launch_env(dict(WORLD_SIZE="2", MASTER_ADDR="a", MASTER_PORT="1"))


def test_contradictions():
    with pytest.raises(ValueError, match="rank 4 is outside"):
        detect_launch_env(dict(RANK="4", WORLD_SIZE="4", MASTER_ADDR="a", MASTER_PORT="1"))
    with pytest.raises(ValueError, match="must be an integer"):
        detect_launch_env(dict(RANK="x", WORLD_SIZE="4", MASTER_ADDR="a", MASTER_PORT="1"))
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        detect_launch_env(dict(PMI_RANK="1", PMI_SIZE="2", SLURM_PROCID="0"))


def test_openmpi():
    e = detect_launch_env(dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2",
                               OMPI_COMM_WORLD_LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="123"))
    assert (e.source, e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == ("mpi", 1, 2, 1, "h", 123)


def test_mpich_without_master_defers_to_mpi4py():
    e = detect_launch_env(dict(PMI_RANK="0", PMI_SIZE="2"))
    assert (e.source, e.rank, e.world_size, e.local_rank, e.master_addr) == ("mpi", 0, 2, -1, None)
    with pytest.raises(ValueError, match="PMI_SIZE"):
        detect_launch_env(dict(PMI_RANK="0"))


def test_slurm():
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NODELIST="gpu[07-10,12],cpu1",
               SLURM_JOB_ID="123456")
    e = detect_launch_env(env)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == \
        ("slurm", 5, 8, 1, "gpu07", 15000 + 3456)
    env.pop("SLURM_NODELIST")
    with pytest.raises(ValueError, match="SLURM_NODELIST"):
        detect_launch_env(env)


def test_expand_first_host():
    assert expand_first_host("node[01-04]") == "node01"
    assert expand_first_host("a1,b2") == "a1"
    assert expand_first_host("x[3,5-6]") == "x3"


def test_no_launcher_is_single_process():
    e = detect_launch_env({})
    assert (e.source, e.rank, e.world_size) == ("single", 0, 1)


def test_local_rank_outside_local_world():
    base = dict(RANK="1", WORLD_SIZE="4", MASTER_ADDR="a", MASTER_PORT="1")
    with pytest.raises(ValueError, match="LOCAL_RANK=2 must be < LOCAL_WORLD_SIZE=2"):
        detect_launch_env(dict(base, LOCAL_RANK="2", LOCAL_WORLD_SIZE="2"))
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE=8 must be in \[1, WORLD_SIZE=4\]"):
        detect_launch_env(dict(base, LOCAL_RANK="0", LOCAL_WORLD_SIZE="8"))
    with pytest.raises(ValueError, match="RANK=5 must be in"):
        detect_launch_env(dict(base, RANK="5"))
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_LOCAL_RANK=1 must be < OMPI_COMM_WORLD_LOCAL_SIZE=1"):
        detect_launch_env(dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1",
                               OMPI_COMM_WORLD_LOCAL_SIZE="1"))
    with pytest.raises(ValueError, match="SLURM_LOCALID=3 must be < SLURM_NTASKS_PER_NODE=2"):
        detect_launch_env(dict(SLURM_PROCID="1", SLURM_NTASKS="4", SLURM_LOCALID="3", SLURM_NTASKS_PER_NODE="2",
                               SLURM_NODELIST="n1", SLURM_JOB_ID="7"))
    # consistent values pass; a heterogeneous SLURM_NTASKS_PER_NODE ("4(x2),2") is not a bound
    assert detect_launch_env(dict(base, LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")).local_rank == 1
    assert detect_launch_env(dict(SLURM_PROCID="1", SLURM_NTASKS="4", SLURM_LOCALID="3",
                                  SLURM_NTASKS_PER_NODE="4(x1)", SLURM_NODELIST="n1", SLURM_JOB_ID="7")).local_rank == 3


def test_init_distributed_timeout_argument():
    from heddle.dist import init_distributed

    with pytest.raises(ValueError, match="timeout=-1"):
        init_distributed(timeout=-1, env={})
    with pytest.raises(TypeError, match="timeout='x'"):
        init_distributed(timeout="x", env={})
