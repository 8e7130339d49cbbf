"""`mmgen launch {tpu-vm,gke,slurm,local}`: from a config to a running multi-host job.

Every target prints what it renders (a launcher script, a JobSet manifest or an sbatch
script, from the templates in `mmgen/launch_templates/`) and the exact commands it runs.
Before any of that, every target loads the config with its overrides as `mmgen train`
does, so a typo fails in one line (exit 2) before a job exists. `--dry-run` stops after
printing. Without it, `local` starts the processes itself and the cloud targets write the
rendered file and run its command, refusing in one line when their tool (gcloud, kubectl,
sbatch) is not on PATH. Every target hands the processes the
MMGEN_COORDINATOR / MMGEN_NUM_PROCESSES / MMGEN_PROCESS_ID variables that
`mmgen/parallel/distributed.py` reads, and treats exit 75 (preempted after a complete
checkpoint, docs/checkpoints.md) as "rerun to resume". See docs/launching.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mmgen.argtypes import exact_options, int_in

EXIT_PREEMPTED = 75  # same as mmgen.train.loop.EXIT_PREEMPTED (not imported: no jax here)
COORDINATOR_PORT = 8476  # the port JAX itself uses for TPU pod coordinators


class LaunchError(Exception):
    """A usage error reported as one line, exit status 2."""


# -- accelerators ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Accelerator:
    name: str             # e.g. v5p-32
    chips: int
    chips_per_host: int
    gke_label: str        # cloud.google.com/gke-tpu-accelerator
    runtime: str          # default TPU VM software version

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


# generation -> (count in the name is "cores" or "chips", chips per host of multi-host
# slices, GKE accelerator label, default TPU VM runtime version). Public Cloud TPU docs:
# v4 and v5p names count TensorCores (2 per chip), 4 chips per host; v5e (v5litepod) and
# v6e names count chips: 1, 4 and 8 chips fit on one host, larger slices have 4 per host.
_GENERATIONS = {
    "v4": ("cores", 4, "tpu-v4-podslice", "tpu-ubuntu2204-base"),
    "v5p": ("cores", 4, "tpu-v5p-slice", "tpu-ubuntu2204-base"),
    "v5litepod": ("chips", 4, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite"),
    "v6e": ("chips", 4, "tpu-v6e-slice", "v2-alpha-tpuv6e"),
}
_SINGLE_HOST_CHIPS = (1, 4, 8)  # v5litepod / v6e slices on one host


def parse_accelerator(name: str) -> Accelerator:
    """`v5p-32` -> 16 chips on 4 hosts. Raises LaunchError for unknown or impossible types."""
    known = ("known types: v4-N and v5p-N (N TensorCores, a multiple of 8), "
             "v5litepod-N and v6e-N (N chips: 1, 4, 8 or a multiple of 16)")
    gen, _, count = name.partition("-")
    if gen not in _GENERATIONS or not count.isdigit() or int(count) <= 0:
        raise LaunchError(f"unknown accelerator {name!r}; {known}")
    unit, per_host, label, runtime = _GENERATIONS[gen]
    n = int(count)
    if unit == "cores":
        if n % 8:
            raise LaunchError(f"unknown accelerator {name!r}: {gen} slices have a multiple of "
                              f"8 TensorCores; {known}")
        chips = n // 2
    else:
        if n not in _SINGLE_HOST_CHIPS and n % 16:
            raise LaunchError(f"unknown accelerator {name!r}: {gen} slices have 1, 4, 8 or a "
                              f"multiple of 16 chips; {known}")
        chips = n
        if n in _SINGLE_HOST_CHIPS:
            per_host = n
    return Accelerator(name, chips, per_host, label, runtime)


# -- templates ---------------------------------------------------------------------------------

class _Template(string.Template):
    """`@{name}` placeholders, `@@` for a literal @: shell and YAML keep their `$`."""

    delimiter = "@"


def render(template: str, **values) -> str:
    """Renders `mmgen/launch_templates/<template>`; a missing value is an error (KeyError)."""
    text = (resources.files("mmgen") / "launch_templates" / template).read_text()
    return _Template(text).substitute({k: str(v) for k, v in values.items()})


# -- shared arguments --------------------------------------------------------------------------

def _train_args(args) -> list[str]:
    """The arguments after `mmgen train` that every process gets."""
    out = ["--config", args.config, "--workdir", args.workdir]
    if args.resume:
        out.append(f"--resume={args.resume}")
    return out + list(args.overrides)


def _check_config(args, print_fn=print) -> None:
    """Loads --config with its overrides as `mmgen train` will (mmgen.config.load_config,
    --resume included), so a missing file, a refused `:ARG` or an unknown or mistyped key
    fails here in one line, before anything is rendered, started or submitted. Remote
    targets run from --repo-dir, so a relative config path is read from there; a config
    that exists only where the job runs (a container image, a mount of the workers) is
    not checked here, with a note."""
    from mmgen.config import ConfigError, load_config  # lazily: the parser stays cheap

    spec = args.config
    repo_dir = getattr(args, "repo_dir", None)
    if repo_dir and not Path(spec.split(":")[0]).is_absolute():
        spec = str(Path(repo_dir) / spec)
    file = Path(spec.split(":")[0])
    if args.target != "local" and not file.is_file():
        print_fn(f"mmgen launch: note: {file} is not on this machine; the config is checked "
                 "where the job runs")
        return
    overrides = list(args.overrides)
    if args.resume:  # as _train_args hands it to the processes
        overrides.append(f"--config.train.resume={args.resume}")
    try:
        load_config(spec, overrides)
    except ConfigError as e:
        raise LaunchError(f"--config {args.config}: {e}") from None


def _check_shared_workdir(args, hosts: int) -> None:
    """Every process writes the same checkpoints, so on several hosts the workdir must be
    one shared path; a relative one is a different directory on each host."""
    if hosts > 1 and not Path(args.workdir).is_absolute():
        raise LaunchError(f"--workdir {args.workdir!r} must be an absolute path on storage "
                          f"all {hosts} hosts mount (NFS, Filestore, Cloud Storage FUSE); a "
                          "relative one is a different directory on each host")


def _default_workdir(config: str) -> str:
    return str(Path("runs") / Path(config.split(":")[0]).stem)


def _default_repo_dir() -> str:
    root = Path(__file__).resolve().parents[1]
    return str(root) if (root / "pyproject.toml").exists() else "."


def _out_path(args, default_name: str) -> Path:
    return Path(args.out) if args.out else Path("runs") / "launch" / default_name


def _require_tool(tool: str, target: str) -> None:
    if shutil.which(tool) is None:
        raise LaunchError(f"{tool} is not on PATH; `mmgen launch {target}` needs it to submit "
                          f"(use --dry-run to print the {target} files and commands only)")


def _emit(title: str, text: str, commands: list[list[str]], print_fn) -> None:
    print_fn(f"# ---- {title} ----")
    print_fn(text.rstrip("\n"))
    print_fn("# ---- commands ----")
    for c in commands:
        print_fn(shlex.join(c))


def _write(path: Path, text: str, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(0o755)


# -- SLURM -------------------------------------------------------------------------------------

def _slurm_log_dir(args) -> Path:
    """Absolute: sbatch resolves --output against the submit directory, the script runs in
    --repo-dir, and the directory must exist before the job starts."""
    return Path(args.repo_dir).resolve() / args.workdir / "launch"


def render_slurm(args) -> str:
    task = ("export MMGEN_PROCESS_ID=$SLURM_PROCID; exec "
            + shlex.join([args.python, "-m", "mmgen.cli", "train", *_train_args(args)]))
    extra = []
    if args.partition:
        extra.append(f"#SBATCH --partition={args.partition}")
    if args.time:
        extra.append(f"#SBATCH --time={args.time}")
    log_dir = str(_slurm_log_dir(args))
    return render("slurm.sbatch.tmpl", name=args.name, nodes=args.nodes,
                  gpus_per_node=args.gpus_per_node, log_dir=log_dir,
                  signal_seconds=args.signal_seconds, extra_sbatch="\n".join(extra),
                  repo_dir=shlex.quote(str(Path(args.repo_dir).resolve())),
                  port=args.port, task_cmd=shlex.quote(task))


def cmd_slurm(args, print_fn) -> int:
    limit = slurm_seconds(args.time) if args.time else None
    if limit is not None and args.signal_seconds >= limit:
        raise LaunchError(f"--signal-seconds {args.signal_seconds} is not less than --time "
                          f"{args.time} ({limit} s): the job would be told to save and "
                          "requeue as soon as it starts")
    text = render_slurm(args)
    path = _out_path(args, f"{args.name}.sbatch")
    commands = [["mkdir", "-p", str(_slurm_log_dir(args))], ["sbatch", str(path)]]
    _emit(f"sbatch script ({path})", text, commands, print_fn)
    if args.dry_run:
        return 0
    _require_tool("sbatch", "slurm")
    _write(path, text)
    _slurm_log_dir(args).mkdir(parents=True, exist_ok=True)
    return subprocess.call(commands[1])


# -- GKE JobSet --------------------------------------------------------------------------------

def render_jobset(args, acc: Accelerator) -> str:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", args.name):
        raise LaunchError(f"--name {args.name!r} must be a DNS label of at most 40 characters "
                          "(lower-case letters, digits, '-'); pods are named after it")
    dims = args.topology.split("x")
    if not all(d.isdigit() and int(d) > 0 for d in dims) or len(dims) not in (2, 3):
        raise LaunchError(f"--topology {args.topology!r} is not AxB or AxBxC")
    product = 1
    for d in dims:
        product *= int(d)
    if product != acc.chips:
        raise LaunchError(f"--topology {args.topology} has {product} chips but {acc.name} has "
                          f"{acc.chips}")
    # JobSet's headless service (named after the JobSet) gives pod 0 a stable DNS name.
    coordinator = f"{args.name}-workers-0-0.{args.name}:{args.port}"
    task = ("export MMGEN_PROCESS_ID=$JOB_COMPLETION_INDEX; exec "
            + shlex.join([args.python, "-m", "mmgen.cli", "train", *_train_args(args)]))
    return render("jobset.yaml.tmpl", name=args.name, namespace=args.namespace,
                  accelerator=acc.name, hosts=acc.hosts, chips_per_host=acc.chips_per_host,
                  max_restarts=args.max_restarts, gke_accelerator=acc.gke_label,
                  topology=args.topology, image=json.dumps(args.image), port=args.port,
                  coordinator=coordinator, task_cmd=json.dumps(task))


def xpk_command(args, acc: Accelerator) -> list[str]:
    """The same workload through xpk (its JobSet names pod 0 `<name>-slice-job-0-0`)."""
    task = (f"export MMGEN_COORDINATOR={args.name}-slice-job-0-0.{args.name}:{args.port} "
            f"MMGEN_NUM_PROCESSES={acc.hosts} MMGEN_PROCESS_ID=$JOB_COMPLETION_INDEX; "
            + shlex.join([args.python, "-m", "mmgen.cli", "train", *_train_args(args)]))
    return ["xpk", "workload", "create", "--cluster", args.cluster or "CLUSTER",
            "--workload", args.name, "--docker-image", args.image, "--tpu-type", acc.name,
            "--num-slices", "1", "--max-restarts", str(args.max_restarts), "--command", task]


def cmd_gke(args, print_fn) -> int:
    acc = parse_accelerator(args.accelerator)
    _check_shared_workdir(args, acc.hosts)
    text = render_jobset(args, acc)
    path = _out_path(args, f"{args.name}.jobset.yaml")
    commands = [["kubectl", "apply", "-f", str(path)]]
    _emit(f"JobSet manifest ({path}; {acc.hosts} hosts x {acc.chips_per_host} chips)",
          text, commands, print_fn)
    if not args.resume or args.resume in ("latest", "latest_valid"):
        print_fn("# ---- or, equivalently, with xpk ----")
        print_fn(shlex.join(xpk_command(args, acc)))
    else:  # xpk's JobSet gives the command no restart count (MMGEN_RESTART)
        print_fn(f"# ---- no xpk equivalent with --resume={args.resume}: its restarts would "
                 "apply it again ----")
    if args.dry_run:
        return 0
    _require_tool("kubectl", "gke")
    _write(path, text)
    return subprocess.call(commands[0])


# -- TPU VM ------------------------------------------------------------------------------------

def tpu_vm_commands(args, acc: Accelerator) -> dict[str, list[str]]:
    project = ["--project", args.project] if args.project else []
    where = ["--zone", args.zone, *project]
    create = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *where,
              "--accelerator-type", acc.name, "--version", args.version or acc.runtime]
    if args.spot:
        create.append("--spot")
    pack = f"git ls-files -z | tar --null -T - -czf /tmp/mmgen-src-{args.name}.tgz"
    scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"/tmp/mmgen-src-{args.name}.tgz",
           f"{args.name}:mmgen-src.tgz", "--worker=all", *where]
    install = ("mkdir -p ~/mmgen && tar -xzf ~/mmgen-src.tgz -C ~/mmgen && cd ~/mmgen && "
               "python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'")
    worker_id = ("${TPU_WORKER_ID:-$(curl -s -H Metadata-Flavor:Google http://metadata."
                 "google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}")
    run = (f"export MMGEN_NUM_PROCESSES={acc.hosts} MMGEN_PROCESS_ID={worker_id}; "
           "cd ~/mmgen && exec "
           + shlex.join([".venv/bin/python", "-m", "mmgen.cli", "train", *_train_args(args)]))
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, "--worker=all", *where]
    return {"create": create, "pack": pack, "scp": scp, "install": install, "run": run,
            "ssh": ssh}


def render_tpu_vm(args, acc: Accelerator) -> str:
    c = tpu_vm_commands(args, acc)
    project = shlex.join(["--project", args.project]) if args.project else ""
    return render("tpu_vm.sh.tmpl", name=shlex.quote(args.name), zone=shlex.quote(args.zone),
                  accelerator=acc.name, hosts=acc.hosts, chips_per_host=acc.chips_per_host,
                  version=shlex.quote(args.version or acc.runtime), port=args.port,
                  max_restarts=args.max_restarts, project_flags=project,
                  create_cmd=shlex.join(c["create"]),
                  repo_dir=shlex.quote(str(Path(args.repo_dir).resolve())),
                  install_cmd=shlex.quote(c["install"]), run_cmd=shlex.quote(c["run"]))


def cmd_tpu_vm(args, print_fn) -> int:
    acc = parse_accelerator(args.accelerator)
    _check_shared_workdir(args, acc.hosts)
    text = render_tpu_vm(args, acc)
    path = _out_path(args, f"{args.name}.tpu_vm.sh")
    c = tpu_vm_commands(args, acc)
    commands = [["bash", str(path)], c["create"], ["bash", "-c", c["pack"]], c["scp"],
                [*c["ssh"], "--command", c["install"]],
                [*c["ssh"], "--command", "export MMGEN_COORDINATOR=<worker 0 IP>:"
                 f"{args.port} MMGEN_RESTART=<restarts so far>; {c['run']}"]]
    _emit(f"TPU VM launcher ({path}; {acc.hosts} workers x {acc.chips_per_host} chips)",
          text, commands[:1], print_fn)
    print_fn("# ---- which runs (after copying the repo to every worker) ----")
    for cmd in commands[1:]:
        print_fn(shlex.join(cmd))
    if args.dry_run:
        return 0
    _require_tool("gcloud", "tpu-vm")
    _write(path, text, executable=True)
    return subprocess.call(commands[0])


# -- local -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_envs(n: int, devices: int, port: int, base: dict[str, str]) -> list[dict[str, str]]:
    flags = base.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return [dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
                 MMGEN_COORDINATOR=f"127.0.0.1:{port}", MMGEN_NUM_PROCESSES=str(n),
                 MMGEN_PROCESS_ID=str(i)) for i in range(n)]


def _kill_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_all(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every live process group (mmgen saves and exits 75), SIGKILL after `grace`."""
    for p in procs:
        if p.poll() is None:
            _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(p, signal.SIGKILL)
            p.wait()


def cmd_local(args, print_fn) -> int:
    port = args.port if args.port else _free_port()
    cmd = [sys.executable, "-m", "mmgen.cli", "train", *_train_args(args)]
    envs = local_envs(args.processes, args.devices_per_process, port, dict(os.environ))
    log_dir = Path(args.workdir) / "launch"
    logs = [log_dir / f"process_{i}.log" for i in range(args.processes)]
    print_fn(f"# ---- {args.processes} local processes x {args.devices_per_process} CPU "
             f"devices, logs in {log_dir}/process_<i>.log ----")
    for i in range(args.processes):
        keys = ("JAX_PLATFORMS", "XLA_FLAGS", "MMGEN_COORDINATOR", "MMGEN_NUM_PROCESSES",
                "MMGEN_PROCESS_ID")
        env = " ".join(f"{k}={shlex.quote(envs[i][k])}" for k in keys)
        print_fn(f"{env} {shlex.join(cmd)} > {shlex.quote(str(logs[i]))} 2>&1")
    if args.dry_run:
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def on_sigterm(signum, frame):  # a preemption notice to the launcher: same as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for i in range(args.processes):
            with open(logs[i], "ab") as f:  # the child keeps its own descriptor
                procs.append(subprocess.Popen(cmd, env=envs[i], stdout=f,
                                              stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL,
                                              start_new_session=True))
        return _wait_local(procs, logs, args, print_fn)
    except KeyboardInterrupt:
        print_fn("mmgen launch: interrupted; asking every process to save and stop")
        _stop_all(procs, args.grace)
        codes = [p.returncode for p in procs]
        print_fn(f"mmgen launch: exit statuses {codes}")
        return next((c for c in codes if c), EXIT_PREEMPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_all(procs, args.grace)


LOG_TAIL_LINES = 5  # of a failed process's log, printed so the reason is on screen


def _log_tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))  # the end of a long log
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [x for x in text.splitlines() if x.strip()][-n:]


def _wait_local(procs: list[subprocess.Popen], logs: list[Path], args, print_fn) -> int:
    """Waits for all; the first non-zero exit stops the others, after printing the end of
    its log. Returns that status (0 if all succeeded, 124 on --timeout)."""
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c]
        if failed:
            i, c = failed[0]
            print_fn(f"mmgen launch: process {i} exited {c}; stopping the others")
            tail = _log_tail(logs[i])
            if tail:
                print_fn(f"mmgen launch: last {len(tail)} lines of {logs[i]}:")
                for line in tail:
                    print_fn(f"  {line}")
            _stop_all(procs, args.grace)
            return c
        if all(c == 0 for c in codes):
            print_fn(f"mmgen launch: all {len(procs)} processes exited 0")
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print_fn(f"mmgen launch: --timeout {args.timeout}s reached; stopping all")
            _stop_all(procs, args.grace)
            return 124
        time.sleep(0.2)


# -- parser ------------------------------------------------------------------------------------

def _seconds(lo_open: bool):
    """An argparse type: a finite number of seconds, > 0 (lo_open) or >= 0."""
    want = "> 0" if lo_open else ">= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > 0 if lo_open else value >= 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds {want}, "
                                             f"got {text!r}")
        return value

    return parse


def slurm_seconds(text: str) -> int | None:
    """sbatch's --time in seconds (None: no limit); ValueError unless it is one of the
    formats sbatch documents, MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (0 = no
    limit), or UNLIMITED / INFINITE. Like sbatch, fields after the first are not
    range-checked (90:00 is 90 minutes)."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, dash, rest = text.partition("-")
    fields = [days, *rest.split(":")] if dash else text.split(":")
    if not all(f.isascii() and f.isdigit() for f in fields) or len(fields) > 4 - (not dash):
        raise ValueError(text)
    n = [int(f) for f in fields]
    if dash:  # days-hours[:minutes[:seconds]]
        d, h, m, sec = n + [0] * (4 - len(n))
    elif len(n) == 3:  # hours:minutes:seconds
        d, h, m, sec = 0, *n
    else:  # minutes[:seconds]
        d, h, m, sec = 0, 0, n[0], n[1] if len(n) == 2 else 0
    return (((d * 24 + h) * 60 + m) * 60 + sec) or None


def _slurm_time(text: str) -> str:
    try:
        slurm_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an sbatch time: use MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
            "D-HH:MM:SS (e.g. 24:00:00 or 1-00 for a day)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgen launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="target", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True,
                        help="configs/NAME.py[:ARG], a path every process can read")
    common.add_argument("--workdir", help="run directory every process can write (default "
                        "runs/CONFIG_NAME); must be shared storage on several hosts")
    common.add_argument("--resume", help="passed to `mmgen train --resume`")
    common.add_argument("--dry-run", action="store_true",
                        help="print the rendered file and the commands; run nothing")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--out", help="where to write the rendered file "
                        "(default runs/launch/NAME.<kind>)")
    remote.add_argument("--port", type=int_in(1, 65535), default=COORDINATOR_PORT,
                        help=f"coordinator port on process 0 (default {COORDINATOR_PORT})")
    remote.add_argument("--repo-dir", default=_default_repo_dir(),
                        help="the mmgen repository to run from (default: the one this mmgen "
                        "is installed from in editable mode, else .)")
    retry = argparse.ArgumentParser(add_help=False)
    retry.add_argument("--max-restarts", type=int_in(0), default=20,
                       help="reruns after exit 75 / a lost slice (default 20)")

    t = sub.add_parser("tpu-vm", parents=[common, remote, retry],
                       help="a Cloud TPU VM slice via gcloud")
    t.add_argument("--name", required=True)
    t.add_argument("--zone", required=True)
    t.add_argument("--accelerator", required=True, help="e.g. v5p-32, v4-16, v5litepod-16")
    t.add_argument("--version", help="TPU VM software version (default tpu-ubuntu2204-base "
                   "for v4/v5p, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e)")
    t.add_argument("--project")
    t.add_argument("--spot", action="store_true")
    t.set_defaults(fn=cmd_tpu_vm, python=".venv/bin/python")

    g = sub.add_parser("gke", parents=[common, remote, retry],
                       help="a JobSet on a GKE TPU node pool (or the xpk command)")
    g.add_argument("--name", required=True, help="JobSet name (a DNS label)")
    g.add_argument("--image", required=True, help="container image with mmgen installed")
    g.add_argument("--accelerator", required=True, help="e.g. v5p-32")
    g.add_argument("--topology", required=True, help="e.g. 2x2x4 for v5p-32")
    g.add_argument("--namespace", default="default")
    g.add_argument("--cluster", help="GKE cluster name, for the printed xpk command")
    g.add_argument("--python", default="python3", help="python in the image (default python3)")
    g.set_defaults(fn=cmd_gke)

    s = sub.add_parser("slurm", parents=[common, remote],
                       help="an sbatch script: one process per node")
    s.add_argument("--nodes", type=int_in(1), required=True)
    s.add_argument("--gpus-per-node", type=int_in(1), default=8)
    s.add_argument("--partition")
    s.add_argument("--time", type=_slurm_time, help="time limit in a format sbatch takes: "
                   "MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    s.add_argument("--name", default="mmgen", help="job name (default mmgen)")
    s.add_argument("--signal-seconds", type=int_in(1, 65535, " (sbatch --signal)"),
                   default=300,
                   help="SIGTERM this long before the time limit: save, exit 75, requeue")
    s.add_argument("--python", default="python3",
                   help="python with mmgen installed, on the nodes (default python3)")
    s.set_defaults(fn=cmd_slurm)

    loc = sub.add_parser("local", parents=[common],
                         help="N processes on this machine (CPU devices)")
    loc.add_argument("--processes", type=int_in(1), required=True)
    loc.add_argument("--devices-per-process", type=int_in(1), default=1)
    loc.add_argument("--port", type=int_in(0, 65535), default=0,
                     help="coordinator port (default 0: a free one)")
    loc.add_argument("--timeout", type=_seconds(lo_open=True),
                     help="stop everything after this many seconds")
    loc.add_argument("--grace", type=_seconds(lo_open=False), default=60.0,
                     help="seconds between SIGTERM and SIGKILL when stopping (default 60)")
    loc.set_defaults(fn=cmd_local)
    return exact_options(p)


def main(argv: list[str] | None = None, print_fn=None) -> int:
    print_fn = print_fn or (lambda s: print(s, flush=True))
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [r for r in rest if r.startswith("--config.")]
    args.workdir = args.workdir or _default_workdir(args.config)
    try:
        if "://" in args.workdir:
            raise LaunchError(f"--workdir {args.workdir}: mmgen train writes its workdir with "
                              "file I/O, so URLs are not supported; mount the bucket "
                              "(Cloud Storage FUSE) and pass the mount path")
        _check_config(args, print_fn)
        return args.fn(args, print_fn)
    except LaunchError as e:
        print(f"mmgen launch {args.target}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
