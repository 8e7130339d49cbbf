"""Tier 3: 8 fake CPU devices (data x fsdp x tensor) match 1 device; params really shard."""

import json
import os
import re
import subprocess
import sys

import multiproc
import pytest

pytestmark = pytest.mark.slow


def _run(repo, tokenizer_run, workdir, devices: int, mesh: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, str(repo / "tests" / "sharded_run.py"), str(repo),
         str(tokenizer_run["tokenizer"]), str(tokenizer_run["cache"]), str(workdir), mesh],
        env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_device(repo, tokenizer_run, tmp_path_factory) -> dict:
    return _run(repo, tokenizer_run, tmp_path_factory.mktemp("one"), 1, "1,1,1,1")


@pytest.mark.parametrize("mesh", ["8,1,1,1", "1,8,1,1", "4,1,1,2", "1,1,8,1", "2,1,2,2"],
                         ids=["data", "fsdp", "tensor", "sequence", "mix"])
def test_each_parallelism_matches_one_device_and_shards_what_it_promises(repo, tokenizer_run,
                                                                        one_device, tmp_path,
                                                                        mesh):
    """Data, FSDP, tensor and sequence parallelism (and a mix) on 8 devices (mesh
    data,fsdp,sequence,tensor) give the 1-device losses, and the compiled train step's
    per-device memory (XLA's memory_analysis) shrinks as the rules promise, so silent
    replication fails: arguments (state + batch) and temporaries (activations)."""
    one = one_device
    eight = _run(repo, tokenizer_run, tmp_path / "eight", 8, mesh)
    for step in ("1", "2", "3"):
        assert abs(one["losses"][step] - eight["losses"][step]) <= 1e-4 * one["losses"][step], (
            step, one["losses"], eight["losses"])
    full, per_device = one["argument_bytes_per_device"], eight["argument_bytes_per_device"]
    data, fsdp, sequence, tensor = (int(x) for x in mesh.split(","))
    if fsdp == 8:  # params, moments and batch all split 8 ways (norms stay whole)
        assert per_device < 0.16 * full, (per_device, full)
    elif tensor == 2:  # matrices split over tensor: less than 3/4 of the state per device
        assert per_device < 0.75 * full, (per_device, full)
    else:  # data / sequence parallelism replicate the state: only the batch is split
        assert 0.9 * full < per_device < full, (per_device, full)
    # every mesh splits the activations 8 ways (rows, heads or the sequence)
    temp_one, temp_eight = one["temp_bytes_per_device"], eight["temp_bytes_per_device"]
    assert temp_eight < 0.2 * temp_one, (temp_eight, temp_one)


def test_eight_devices_match_one_device(repo, tokenizer_run, tmp_path):
    one = _run(repo, tokenizer_run, tmp_path / "one", 1, "1,1,1")
    eight = _run(repo, tokenizer_run, tmp_path / "eight", 8, "2,2,2")
    assert one["devices"] == 1 and eight["devices"] == 8
    for step in ("1", "2", "3"):
        # same math, different reduction order across shards: float32 rounding only
        assert abs(one["losses"][step] - eight["losses"][step]) <= 1e-4 * one["losses"][step], (
            step, one["losses"], eight["losses"])
    # fsdp=2 x tensor=2 splits every matrix 4 ways; only norms stay replicated
    assert one["param_bytes_per_device"] == one["param_bytes"]
    assert eight["param_bytes_per_device"] < 0.3 * eight["param_bytes"]


MULTI_HOST_MESHES = {
    "ici": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
    # each process one "slice": fsdp inside it, data across the two (DCN)
    "dcn": ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.dcn.data=2"],
}


@pytest.mark.parametrize("mesh", list(MULTI_HOST_MESHES))
def test_two_processes_of_four_devices_match_one_process_of_eight(repo, tokenizer_run, tmp_path,
                                                                  mesh):
    """Multi-host: 2 local processes x 4 CPU devices (jax.distributed, gloo collectives on
    localhost) train the tiny config and match 1 process with 8 devices: on mesh
    data=2 x fsdp=2 x tensor=2, and on a two-slice mesh (fsdp=4 inside each process,
    mesh.dcn.data=2 across them)."""
    common = [sys.executable, "-m", "mmgen.cli", "train", "--config",
              str(repo / "configs/tiny.py:smoke"),
              f"--config.tokenizer.checkpoint={tokenizer_run['tokenizer']}",
              f"--config.data.cache_dir={tokenizer_run['cache']}",
              "--config.data.num_train_scenes=512",
              "--config.train.steps=3", "--config.train.log_every=1", *MULTI_HOST_MESHES[mesh]]

    one = subprocess.run([*common, "--workdir", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=600, start_new_session=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu",
                                  XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert one.returncode == 0, one.stderr[-2000:]
    procs = multiproc.start([*common, "--workdir", str(tmp_path / "two")], 2, devices=4)
    outs = multiproc.finish_all(procs, timeout=600)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-1500:] + outs[1][-1500:]
    assert "on 8 device(s)" in outs[0]
    a = multiproc.logged_losses(tmp_path / "one")
    b = multiproc.logged_losses(tmp_path / "two")
    assert sorted(b) == [1, 2, 3]
    for step in a:  # same math, reductions split differently across processes
        assert abs(a[step] - b[step]) <= 1e-4 * a[step], (step, a, b)


_SLICES = """
import json, jax
from mmgen.parallel.distributed import initialize_from_env
from mmgen.parallel.mesh import make_mesh
initialize_from_env()
mesh = make_mesh({"data": 1, "fsdp": 4, "dcn": {"data": 2}})
rows = [[d.process_index for d in mesh.devices[i].flat] for i in range(mesh.shape["data"])]
print("ROWS", json.dumps({"shape": dict(mesh.shape), "rows": rows}))
from mmgen.parallel.distributed import agree_with_process_zero
print("AGREED", json.dumps(agree_with_process_zero([5 + jax.process_index(), -1])))
"""


def test_dcn_axis_crosses_processes_and_ici_axes_stay_inside_one(repo):
    """mesh.dcn.data=2 over 2 processes: the data axis is the process (slice) boundary,
    the fsdp axis lies wholly inside one process, so fsdp collectives never cross it. The
    same processes then agree on process 0's start-up readings."""
    procs = multiproc.start([sys.executable, "-c", _SLICES], 2, cwd=repo, devices=4)
    outs = multiproc.finish_all(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-1500:]
    got = json.loads(next(x for x in outs[0].splitlines() if x.startswith("ROWS"))[5:])
    assert got["shape"]["data"] == 2 and got["shape"]["fsdp"] == 4
    assert [sorted(set(r)) for r in got["rows"]] == [[0], [1]]
    # start-up readings that differ per process (tasks.pin_source_steps) become process 0's
    agreed = [json.loads(next(x for x in out.splitlines() if x.startswith("AGREED"))[7:])
              for out in outs]
    assert agreed == [[5, -1], [5, -1]], agreed


def test_a_vocabulary_that_does_not_divide_over_mesh_tensor_is_one_line(repo, tokenizer_run,
                                                                         tmp_path):
    """The unembedding's vocabulary rows split over mesh.tensor: on 3 devices with
    tensor=3 (heads and widths chosen to divide) the padded vocabulary, a multiple of 128,
    cannot, and training stops before building anything, naming both numbers."""
    r = subprocess.run(
        [sys.executable, "-m", "mmgen.cli", "train", "--config", str(repo / "configs/tiny.py"),
         "--workdir", str(tmp_path / "run"),
         f"--config.tokenizer.checkpoint={tokenizer_run['tokenizer']}",
         f"--config.data.cache_dir={tokenizer_run['cache']}", "--config.mesh.data=1",
         "--config.mesh.tensor=3", "--config.model.num_heads=3",
         "--config.model.num_kv_heads=3", "--config.model.head_dim=32"],
        capture_output=True, text=True, timeout=300, start_new_session=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=3"))
    lines = [x for x in r.stderr.splitlines() if x.startswith("mmgen train: error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "does not divide over mesh tensor=3" in lines[0], lines
    rows = int(re.search(r"vocabulary \((\d+) rows", lines[0]).group(1))
    assert rows % 128 == 0 and rows % 3 != 0, lines
    assert not (tmp_path / "run" / "checkpoints").exists()
