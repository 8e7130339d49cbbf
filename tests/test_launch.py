"""`mmgen launch`: rendered SLURM / JobSet / TPU VM files (dry runs, no cloud tools, no
network) and a real 2-process local run."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from mmgen import launch
from mmgen.cli import main as mmgen

CONFIG = "configs/tokenizer_tiny.py"


def _dry(capsys, *argv: str) -> tuple[int, str, str]:
    rc = launch.main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    return rc, out, err


def _section(out: str, title: str) -> str:
    """The rendered file printed between `# ---- <title> ...` and `# ---- commands ----`."""
    start = out.index(f"# ---- {title}")
    body = out[out.index("\n", start) + 1:]
    return body[:body.index("# ---- commands ----")]


def _bash_n(text: str, tmp_path) -> None:
    script = tmp_path / "script.sh"
    script.write_text(text)
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name,chips,hosts", [
    ("v5p-32", 16, 4), ("v5p-8", 4, 1), ("v4-32", 16, 4), ("v4-8", 4, 1),
    ("v5litepod-16", 16, 4), ("v5litepod-8", 8, 1), ("v5litepod-4", 4, 1),
    ("v5litepod-256", 256, 64), ("v6e-64", 64, 16)])
def test_accelerator_table(name, chips, hosts):
    acc = launch.parse_accelerator(name)
    assert (acc.chips, acc.hosts) == (chips, hosts)
    assert acc.hosts * acc.chips_per_host == acc.chips


@pytest.mark.parametrize("name", ["v7x-8", "v5p-12", "v5litepod-12", "v5p", "tpu", "v4-0"])
def test_unknown_accelerator_is_one_line_exit_2(capsys, name):
    rc, out, err = _dry(capsys, "tpu-vm", "--config", CONFIG, "--name", "t", "--zone", "z",
                        "--accelerator", name)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "error:" in err and name in err, err


def test_slurm_script(capsys, tmp_path):
    rc, out, _ = _dry(capsys, "slurm", "--config", CONFIG, "--nodes", "4", "--partition",
                      "gpu", "--time", "04:00:00", "--workdir", "runs/x",
                      "--config.train.steps=10")
    assert rc == 0
    script = _section(out, "sbatch script")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=04:00:00", "#SBATCH --signal=TERM@300"):
        assert line in script.splitlines(), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert 'export MMGEN_NUM_PROCESSES="$SLURM_NTASKS"' in script
    assert 'export MMGEN_COORDINATOR="${head_node}:8476"' in script
    assert 'export MMGEN_RESTART="${SLURM_RESTART_COUNT:-0}"' in script
    srun = next(x for x in script.splitlines() if x.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--nodes=4" in srun
    task = shlex.split(srun)[-1]  # the per-task command, expanded by each task
    assert task.startswith("export MMGEN_PROCESS_ID=$SLURM_PROCID; exec python3 -m mmgen.cli "
                           "train --config configs/tokenizer_tiny.py --workdir runs/x")
    assert task.endswith("--config.train.steps=10")
    assert re.search(r'if \[ "\$rc" -eq 75 \]; then\n.*\n\s*scontrol requeue "\$SLURM_JOB_ID"',
                     script)
    assert "sbatch runs/launch/mmgen.sbatch" in out.split("# ---- commands ----")[1]
    _bash_n(script, tmp_path)


def test_jobset_manifest(capsys):
    yaml = pytest.importorskip("yaml")
    rc, out, _ = _dry(capsys, "gke", "--config", CONFIG, "--name", "mm1", "--image",
                      "gcr.io/p/mmgen:1", "--accelerator", "v5p-32", "--topology", "2x2x4",
                      "--namespace", "research", "--workdir", "/gcs/run",
                      "--config.train.steps=10")
    assert rc == 0
    doc = yaml.safe_load(_section(out, "JobSet manifest"))
    assert doc["kind"] == "JobSet" and doc["metadata"]["namespace"] == "research"
    (rjob,) = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1 and job["parallelism"] == job["completions"] == 4
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and 75 not in rule["onExitCodes"]["values"]
    assert doc["spec"]["failurePolicy"]["maxRestarts"] > 0
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x2x4"}
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["google.com/tpu"] == 4 and c["image"] == "gcr.io/p/mmgen:1"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env == {"MMGEN_COORDINATOR": "mm1-workers-0-0.mm1:8476", "MMGEN_NUM_PROCESSES": "4",
                   "MMGEN_RESTART": {"fieldRef": {"fieldPath": "metadata.annotations"
                                                  "['jobset.sigs.k8s.io/restart-attempt']"}}}
    assert c["command"][:2] == ["bash", "-c"]
    assert c["command"][2].startswith("export MMGEN_PROCESS_ID=$JOB_COMPLETION_INDEX; exec ")
    assert c["command"][2].endswith("--workdir /gcs/run --config.train.steps=10")
    assert "kubectl apply -f runs/launch/mm1.jobset.yaml" in out
    xpk = next(x for x in out.splitlines() if x.startswith("xpk workload create"))
    assert "--tpu-type v5p-32" in xpk and "--docker-image gcr.io/p/mmgen:1" in xpk


def test_jobset_topology_must_match(capsys):
    rc, out, err = _dry(capsys, "gke", "--config", CONFIG, "--name", "mm1", "--image", "i",
                        "--accelerator", "v5p-32", "--topology", "2x2x2",
                        "--workdir", "/gcs/run")
    assert rc == 2 and "8 chips but v5p-32 has 16" in err and err.count("\n") == 1


def test_tpu_vm_script(capsys, tmp_path):
    rc, out, _ = _dry(capsys, "tpu-vm", "--config", CONFIG, "--name", "tpu1", "--zone",
                      "us-east5-a", "--accelerator", "v5p-32", "--project", "p1", "--spot",
                      "--workdir", "/mnt/b/run", "--config.train.steps=10")
    assert rc == 0
    script = _section(out, "TPU VM launcher")
    assert "4 workers x 4 chips" in out
    _bash_n(script, tmp_path)
    assert ("gcloud compute tpus tpu-vm create tpu1 --zone us-east5-a --project p1 "
            "--accelerator-type v5p-32 --version tpu-ubuntu2204-base --spot") in script
    assert 'if [ "$rc" -eq 75 ]; then' in script and "while true; do" in script
    ssh = [x for x in out.splitlines()
           if x.startswith("gcloud compute tpus tpu-vm ssh tpu1 --worker=all")]
    assert len(ssh) == 2  # install, run
    run = shlex.split(ssh[1])[-1]
    assert "MMGEN_NUM_PROCESSES=4" in run and "MMGEN_PROCESS_ID=${TPU_WORKER_ID:-" in run
    assert run.endswith("train --config configs/tokenizer_tiny.py --workdir /mnt/b/run "
                        "--config.train.steps=10")
    assert "networkEndpoints[0].ipAddress" in script
    assert 'MMGEN_RESTART=${restarts}; "' in script and "restarts=$((restarts + 1))" in script


@pytest.mark.parametrize("target, extra", [
    ("tpu-vm", ["--name", "t", "--zone", "z", "--accelerator", "v5p-32"]),
    ("gke", ["--name", "t", "--image", "i", "--accelerator", "v5p-32", "--topology", "2x2x4"]),
    ("slurm", ["--nodes", "2"]),
])
def test_workdirs_every_host_cannot_share_are_refused(capsys, target, extra):
    """A gs:// workdir used to become a local directory named "gs:" on each host; a relative
    one (the default included) is a different directory on each TPU VM worker or pod."""
    rc, _, err = _dry(capsys, target, "--config", CONFIG, *extra, "--workdir", "gs://b/run")
    assert rc == 2 and "URLs are not supported" in err and err.count("\n") == 1
    if target != "slurm":  # SLURM runs in --repo-dir, on the shared filesystem
        rc, _, err = _dry(capsys, target, "--config", CONFIG, *extra)
        assert rc == 2 and "must be an absolute path" in err and err.count("\n") == 1


def test_xpk_equivalent_is_not_offered_with_an_explicit_resume_step(capsys):
    args = ["gke", "--config", CONFIG, "--name", "mm1", "--image", "i", "--accelerator",
            "v5p-32", "--topology", "2x2x4", "--workdir", "/gcs/run"]
    rc, out, _ = _dry(capsys, *args, "--resume", "500")
    assert rc == 0 and "xpk workload create" not in out and "no xpk equivalent" in out
    job = _section(out, "JobSet manifest")
    assert "--resume=500" in job and "jobset.sigs.k8s.io/restart-attempt" in job


def test_missing_tool_is_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda tool: None)
    rc = launch.main(["slurm", "--config", CONFIG, "--nodes", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "sbatch is not on PATH" in err and err.count("\n") == 1


def test_template_missing_key_is_an_error():
    with pytest.raises(KeyError):
        launch.render("slurm.sbatch.tmpl", name="x")


def test_cli_verb_passes_overrides(capsys):
    rc = mmgen(["launch", "local", "--config", CONFIG, "--processes", "3", "--workdir", "w",
                "--config.train.steps=2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [x for x in out.splitlines() if "mmgen.cli train" in x]
    assert len(lines) == 3 and all("--config.train.steps=2" in x for x in lines)
    assert "MMGEN_PROCESS_ID=2" in lines[2] and "MMGEN_NUM_PROCESSES=3" in lines[2]
    assert "--xla_force_host_platform_device_count=1" in lines[0]


def test_local_two_processes_train(tmp_path, repo):
    """A real 2-process run: both exit 0, logs exist, one checkpoint at step 2 written by
    2 processes."""
    work = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "mmgen.cli", "launch", "local", "--processes", "2",
         "--config", str(repo / CONFIG), "--workdir", str(work), "--timeout", "400",
         "--config.model.channels=16", "--config.model.num_res_blocks=1",
         "--config.train.steps=2", "--config.train.global_batch=8",
         f"--config.data.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=500)
    logs = [work / "launch" / f"process_{i}.log" for i in range(2)]
    detail = r.stdout + r.stderr + "".join(x.read_text()[-2000:] for x in logs if x.exists())
    assert r.returncode == 0, detail
    assert all(x.exists() and x.stat().st_size > 0 for x in logs)
    assert "all 2 processes exited 0" in r.stdout
    from mmgen.train.checkpoint import Checkpointer

    assert Checkpointer(work / "checkpoints", read_only=True).meta(2)["process_count"] == 2


def test_local_failure_stops_the_group(tmp_path, repo):
    """One bad process (a value `mmgen train` refuses when it validates: exit 2) stops the
    run with its status, and the end of its log, with the reason, is printed."""
    r = subprocess.run(
        [sys.executable, "-m", "mmgen.launch", "local", "--processes", "2", "--config",
         str(repo / CONFIG), "--workdir", str(tmp_path / "bad"), "--timeout", "120",
         "--grace", "5", "--config.train.steps=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=200)
    assert r.returncode == 2, r.stdout + r.stderr
    i = re.search(r"process (\d) exited 2; stopping the others", r.stdout).group(1)
    log = tmp_path / "bad" / "launch" / f"process_{i}.log"
    tail = r.stdout.split(f"lines of {log}:\n")[1].splitlines()
    assert 1 <= len(tail) <= launch.LOG_TAIL_LINES
    assert "train.steps must be >= 1, got 0" in tail[-1], r.stdout


def test_log_tail(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)) + "\n\n")
    assert launch._log_tail(log) == [f"line {i}" for i in range(995, 1000)]
    assert launch._log_tail(tmp_path / "missing.log") == []


_TARGETS = {
    "local": ["--processes", "2"],
    "slurm": ["--nodes", "2"],
    "tpu-vm": ["--name", "t", "--zone", "z", "--accelerator", "v5p-32", "--workdir", "/m/r"],
    "gke": ["--name", "t", "--image", "i", "--accelerator", "v5p-32", "--topology", "2x2x4",
            "--workdir", "/m/r"],
}
_BAD_CONFIGS = [
    (["--config", "configs/nope.py"], "config file not found: "),
    (["--config", "configs/tiny.py:nope"], "unknown arg 'nope'"),
    (["--config", "configs/tiny.py", "--config.trian.steps=3"],
     "unknown config key 'trian.steps' (did you mean train.steps?)"),
    (["--config", "configs/tiny.py:smoke", "--config.train.steps=abc"],
     "config key 'train.steps': cannot set 'abc'"),
]


# a config file missing here fails only the local target: a remote one may run a config
# that exists only where the job runs (test_remote_targets_read_a_relative_config...)
_BAD_CONFIG_CASES = [(target, config, message) for target in _TARGETS
                     for config, message in _BAD_CONFIGS
                     if target == "local" or "nope.py" not in config[1]]


@pytest.mark.parametrize("target, config, message", _BAD_CONFIG_CASES)
def test_config_is_loaded_before_anything_is_rendered(capsys, target, config, message):
    """The config and its overrides are loaded as `mmgen train` loads them, so a typo fails
    in one line before a job is rendered, started or submitted."""
    rc, out, err = _dry(capsys, target, *config, *_TARGETS[target])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and f"mmgen launch {target}: error: --config " in err, err
    assert message in err, err


def test_bad_config_starts_no_process_and_submits_nothing(capsys, monkeypatch, tmp_path):
    rc = launch.main(["local", "--config", "configs/nope.py", "--processes", "2",
                      "--workdir", str(tmp_path / "x")])
    assert rc == 2 and not (tmp_path / "x").exists()
    monkeypatch.setattr(launch.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("submitted"))
    rc = launch.main(["slurm", "--config", CONFIG, "--nodes", "2", "--out",
                      str(tmp_path / "job.sbatch"), "--config.train.stepz=3"])
    assert rc == 2 and not (tmp_path / "job.sbatch").exists()
    assert "did you mean train.steps?" in capsys.readouterr().err


def test_remote_targets_read_a_relative_config_from_repo_dir(capsys, monkeypatch, tmp_path,
                                                             repo):
    """Their scripts run from --repo-dir, so that is where the config must be."""
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _dry(capsys, "slurm", "--config", CONFIG, "--nodes", "2", "--repo-dir",
                      str(repo), "--resume", "latest_valid")
    assert rc == 0 and "--resume=latest_valid" in out
    # not under --repo-dir here: it may exist where the job runs (a container image, a
    # mount of the workers), so it is rendered with a note instead of refused
    for target in ("slurm", "gke"):
        rc, out, _ = _dry(capsys, target, "--config", CONFIG, *_TARGETS[target],
                          "--repo-dir", str(tmp_path))
        assert rc == 0 and f"note: {tmp_path / CONFIG} is not on this machine" in out, out


@pytest.mark.parametrize("target, argv, message", [
    ("slurm", ["--nodes", "0"], "argument --nodes: must be >= 1, got 0"),
    ("slurm", ["--nodes", "two"], "argument --nodes: must be an integer >= 1, got 'two'"),
    ("slurm", ["--nodes", "2", "--gpus-per-node", "0"], "argument --gpus-per-node: must be"),
    ("slurm", ["--nodes", "2", "--time", "25h"], "argument --time: '25h' is not an sbatch "
     "time"),
    ("slurm", ["--nodes", "2", "--time", "1:00:00:00"], "is not an sbatch time"),
    ("slurm", ["--nodes", "2", "--signal-seconds", "0"], "--signal-seconds: must be in [1, "
     "65535]"),
    ("slurm", ["--nodes", "2", "--signal-seconds", "70000"], "--signal-seconds: must be in"),
    ("slurm", ["--nodes", "2", "--port", "0"], "argument --port: must be in [1, 65535]"),
    ("gke", [*_TARGETS["gke"][:-2], "--max-restarts", "-1"], "--max-restarts: must be >= 0"),
    ("tpu-vm", [*_TARGETS["tpu-vm"], "--port", "65536"], "--port: must be in [1, 65535]"),
    ("local", ["--processes", "0"], "argument --processes: must be >= 1, got 0"),
    ("local", ["--processes", "2", "--devices-per-process", "0"],
     "--devices-per-process: must be >= 1"),
    ("local", ["--processes", "2", "--port", "-1"], "--port: must be in [0, 65535]"),
    ("local", ["--processes", "2", "--timeout", "0"], "--timeout: must be a finite number"),
    ("local", ["--processes", "2", "--grace", "nan"], "--grace: must be a finite number"),
])
def test_out_of_range_flags_are_usage_errors(capsys, target, argv, message):
    with pytest.raises(SystemExit) as e:
        launch.main([target, "--config", CONFIG, *argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"mmgen launch {target}: error: ")
    assert message in err.splitlines()[-1], err


@pytest.mark.parametrize("time_limit, seconds", [
    ("30", 1800), ("30:30", 1830), ("4:30:30", 16230), ("4-12", 388800),
    ("4-12:15", 389700), ("4-12:15:30", 389730), ("0", None), ("UNLIMITED", None)])
def test_slurm_time_formats(capsys, time_limit, seconds):
    assert launch.slurm_seconds(time_limit) == seconds
    rc, out, _ = _dry(capsys, "slurm", "--config", CONFIG, "--nodes", "1", "--time",
                      time_limit, "--signal-seconds", "60")
    assert rc == 0 and f"#SBATCH --time={time_limit}" in out.splitlines()


def test_slurm_signal_must_come_before_the_time_limit(capsys):
    rc, out, err = _dry(capsys, "slurm", "--config", CONFIG, "--nodes", "1", "--time", "5")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "--signal-seconds 300 is not less than --time 5 (300 s)" in err


def test_local_sigterm_saves_and_returns_75(tmp_path, repo):
    """SIGTERM to the launcher (a preemption notice) reaches every process: they save one
    complete checkpoint at the same step and exit 75, and so does the launcher."""
    work = tmp_path / "long"
    p = subprocess.Popen(
        [sys.executable, "-m", "mmgen.launch", "local", "--processes", "2", "--config",
         str(repo / CONFIG), "--workdir", str(work), "--timeout", "400",
         "--config.model.channels=16", "--config.model.num_res_blocks=1",
         "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
         "--config.train.global_batch=8", "--config.train.log_every=1",
         f"--config.data.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log0 = work / "launch" / "process_0.log"
    deadline = time.monotonic() + 300
    while not (log0.exists() and "step 3/" in log0.read_text()):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"no step 3 in {log0}: {p.communicate()[0]}")
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 75, out + log0.read_text()[-2000:]
    assert "exit statuses [75, 75]" in out
    from mmgen.train.checkpoint import Checkpointer

    ckpt = Checkpointer(work / "checkpoints", read_only=True)
    (step,) = ckpt.steps()
    assert step >= 3 and ckpt.problem(step) is None
