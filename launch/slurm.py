"""Submit a multi-node GPU training run to SLURM.

    python launch/slurm.py --config=configs/in1k_vit_b16.py --workdir=/shared/runs/b16 \\
        --nodes=4 --gpus_per_node=8 [--per=gpu|node] [--partition=P] [--account=A] \\
        [--time=HH:MM:SS] [--setup='source /shared/venv/bin/activate'] [--name=NAME] \\
        [--requeue] [--dry-run] [-- --config.KEY=VALUE ...]

Fills in launch/slurm.sbatch, writes it to WORKDIR/slurm/NAME.sbatch and submits it with
`sbatch` (printing the command and the job id); `--dry-run` prints the script and submits nothing.
Every task runs `python -m tcjepa_jax.train --config=... --workdir=... OVERRIDES`; jax.distributed
finds the coordinator, the process count and the process id in SLURM's environment.

Layouts (--per):
  gpu   one process per GPU (--ntasks-per-node=G); each process drives the GPU of its
        SLURM_LOCALID (JAX_LOCAL_DEVICE_IDS). The default.
  node  one process per node (--ntasks-per-node=1) driving all G GPUs of its node.

The workdir must be on storage that every node reads and writes (checkpoints are written by all
processes together); a workdir under /tmp and the like is refused unless --allow_local_workdir.
Running the same command again resumes from the workdir's latest checkpoint.

Standard library only. `build_script` is a pure function (arguments -> script text);
`launch(argv)` submits and returns at once (sbatch does not wait for the job) with the job id,
for a sweep runner; `--wait` passes sbatch --wait to block until the job ends.
"""

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TEMPLATE = os.path.join(HERE, "slurm.sbatch")

# Directories that are local to each node on any cluster: a workdir there is not shared.
LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/scratch/local", "/local")

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


def _is_url(path: str) -> bool:
    return "://" in path


class LaunchError(Exception):
    """A mistake in the launch flags: reported as one message."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What goes into the script; paths are absolute."""
    config: str                 # configs/F.py[:ARGS], the file part absolute
    workdir: str
    nodes: int
    gpus_per_node: int
    per: str = "gpu"            # gpu | node
    overrides: tuple = ()       # --config.KEY=VALUE ...
    name: str = ""              # default: the workdir's basename
    partition: str = ""
    account: str = ""
    time: str = ""              # "" = the partition's default limit
    setup: str = ""             # shell lines run before training (modules, venv)
    cpus_per_gpu: int = 8
    signal_seconds: int = 300   # SIGUSR1 this long before the time limit -> checkpoint
    requeue: bool = False
    sbatch_options: tuple = ()  # extra `#SBATCH` options, e.g. ("--exclusive", "--mem=0")
    chdir: str = REPO           # the tasks' working directory (relative paths in configs)

    @property
    def job_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.workdir))

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.per == "gpu" else 1

    @property
    def cpus_per_task(self) -> int:
        return self.cpus_per_gpu * (1 if self.per == "gpu" else self.gpus_per_node)

    @property
    def slurm_dir(self) -> str:
        """Script and logs: WORKDIR/slurm, or CHDIR/slurm for a gs:// (or other URL) workdir."""
        return os.path.join(self.chdir if _is_url(self.workdir) else self.workdir, "slurm")

    @property
    def script_path(self) -> str:
        return os.path.join(self.slurm_dir, f"{self.job_name}.sbatch")

    @property
    def log_path(self) -> str:
        return os.path.join(self.slurm_dir, f"{self.job_name}-%j.log")

    def train_args(self) -> list:
        return [f"--config={self.config}", f"--workdir={self.workdir}", *self.overrides]


def _task_env(job: Job) -> str:
    """Shell lines run in every task before the trainer (inside single quotes: none allowed)."""
    if job.per == "node":
        ids = ",".join(str(i) for i in range(job.gpus_per_node))
        return f"export JAX_LOCAL_DEVICE_IDS={ids}  # all GPUs of this node"
    return ("# This process drives GPU SLURM_LOCALID of its node; if SLURM shows a task only its\n"
            "# own GPU (one entry in CUDA_VISIBLE_DEVICES), that GPU is device 0.\n"
            "case \"${CUDA_VISIBLE_DEVICES:-}\" in\n"
            "  \"\"|*,*) export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID ;;\n"
            "  *) export JAX_LOCAL_DEVICE_IDS=0 ;;\n"
            "esac")


def check(job: Job, allow_local_workdir: bool = False) -> None:
    if job.per not in ("gpu", "node"):
        raise LaunchError(f"--per={job.per!r}: use gpu (one process per GPU) or node.")
    if job.nodes < 1 or job.gpus_per_node < 1 or job.cpus_per_gpu < 1:
        raise LaunchError("--nodes, --gpus_per_node and --cpus_per_gpu must be >= 1.")
    if not (os.path.isabs(job.workdir) or _is_url(job.workdir)):
        raise LaunchError(f"The workdir must be an absolute path, got {job.workdir!r}.")
    for flag, path in (("--workdir", job.workdir), ("--chdir", job.chdir)):
        if re.search(r"[\s%'\"]", path):
            raise LaunchError(f"{flag}={path!r}: no spaces, quotes or % in the path, please "
                              "(it goes into #SBATCH lines).")
    if not allow_local_workdir and any(
            job.workdir == p or job.workdir.startswith(p + "/") for p in LOCAL_PREFIXES):
        raise LaunchError(
            f"--workdir={job.workdir} looks local to one machine, but every node reads and "
            "writes the workdir (checkpoints, logs): put it on shared storage (e.g. your home "
            "or project file system), or pass --allow_local_workdir if that path is shared.")
    if job.time and not _TIME.match(job.time):
        raise LaunchError(f"--time={job.time!r}: use HH:MM:SS or D-HH:MM:SS.")
    if not _NAME.match(job.job_name):
        raise LaunchError(f"Job name {job.job_name!r}: use letters, digits and ._+- only "
                          "(set --name).")
    if job.signal_seconds < 60:
        raise LaunchError("--signal_seconds must be >= 60 (SLURM sends the signal up to a "
                          "minute late).")
    for option in job.sbatch_options:
        if not option.startswith("--") or "\n" in option:
            raise LaunchError(f"--sbatch={option!r}: give one sbatch option, e.g. --exclusive.")


def build_script(job: Job, template: str | None = None) -> str:
    """The sbatch script for `job` (pure: no files written, nothing checked on disk)."""
    if template is None:
        with open(TEMPLATE, encoding="utf-8") as f:
            template = f.read()
    extra = [f"#SBATCH {option}" for option in job.sbatch_options]
    if job.requeue:
        extra.append("#SBATCH --requeue")
    values = {
        "JOB_NAME": job.job_name,
        "NODES": str(job.nodes),
        "GPUS_PER_NODE": str(job.gpus_per_node),
        "TASKS_PER_NODE": str(job.tasks_per_node),
        "CPUS_PER_TASK": str(job.cpus_per_task),
        "TIME": job.time,
        "PARTITION": job.partition,
        "ACCOUNT": job.account,
        "CHDIR": job.chdir,
        "LOG": job.log_path,
        "SIGNAL_SECONDS": str(job.signal_seconds),
        "EXTRA_SBATCH": "\n".join(extra),
        "LAYOUT_TEXT": ("one process per GPU" if job.per == "gpu" else "one process per node"),
        "REQUEUE": "1" if job.requeue else "0",
        "REQUEUE_TEXT": ("; the job is then requeued and resumes from that checkpoint"
                         if job.requeue else ""),
        "SETUP": job.setup.strip() or "# (none: python is the one on PATH)",
        "WORKDIR": shlex.quote(job.workdir),
        "SLURM_DIR": shlex.quote(job.slurm_dir),
        "TRAIN_ARGS": shlex.join(job.train_args()),
        "TASK_ENV": _task_env(job),
    }
    if "'" in values["TASK_ENV"]:
        raise AssertionError("TASK_ENV goes inside single quotes")

    lines = []
    for line in template.splitlines():
        names = _PLACEHOLDER.findall(line)
        unknown = set(names) - set(values)
        if unknown:
            raise KeyError(f"Unknown placeholders in the template: {sorted(unknown)}")
        # An optional `#SBATCH` option (or the whole extra block) left empty is dropped.
        if names and all(values[n] == "" for n in names) and (
                line.startswith("#SBATCH") or line.strip() == "{{EXTRA_SBATCH}}"):
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


# ---- Command line --------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/slurm.py", description=__doc__.split("\n\n")[0],
        epilog="Overrides for the trainer follow `--` (e.g. -- --config.batch_size=1024); "
               "--config.KEY=VALUE flags before it are taken as overrides too.")
    p.add_argument("--config", required=True, help="configs/F.py[:ARGS]")
    p.add_argument("--workdir", required=True, help="run directory on shared storage")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", type=int, required=True)
    p.add_argument("--per", choices=("gpu", "node"), default="gpu",
                   help="one process per GPU (default) or per node")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--time", default="", help="time limit, HH:MM:SS (default: the partition's)")
    p.add_argument("--setup", default=None,
                   help="shell lines run first on each node (module load ...; source VENV/bin/"
                        "activate); default: activate the virtualenv active here, if any")
    p.add_argument("--name", default="", help="job name (default: the workdir's basename)")
    p.add_argument("--chdir", default="",
                   help="the tasks' working directory (default: the current one); relative "
                        "data paths in configs are read from there")
    p.add_argument("--cpus_per_gpu", type=int, default=8)
    p.add_argument("--signal_seconds", type=int, default=300,
                   help="checkpoint and stop this long before the time limit (default 300)")
    p.add_argument("--requeue", action="store_true",
                   help="after stopping at the time limit, requeue the job (it resumes)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--allow_local_workdir", action="store_true",
                   help="accept a workdir under /tmp etc. (only if it is in fact shared)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the script, submit nothing")
    p.add_argument("--wait", action="store_true", help="sbatch --wait: return when the job ends")
    return p


def _config_path(config: str) -> str:
    path, sep, args = config.partition(":")
    if not os.path.isfile(path):
        raise LaunchError(f"--config={config}: no file {path!r}.")
    return os.path.abspath(path) + sep + args


def parse(argv) -> tuple:
    """argv -> (Job, options namespace)."""
    argv = list(argv)
    overrides = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    args, rest = _parser().parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        _parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = rest + overrides
    for o in overrides:
        if not o.startswith("--"):
            raise LaunchError(f"Trainer override {o!r}: write --config.KEY=VALUE.")
        if o.split("=")[0] in ("--config", "--workdir", "--coordinator_address",
                               "--num_processes", "--process_id"):
            raise LaunchError(f"{o}: give --config/--workdir before `--`; jax.distributed "
                              "finds the coordinator and process ids in SLURM's environment.")
    setup = args.setup
    if setup is None:
        venv = os.environ.get("VIRTUAL_ENV")
        setup = f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}" if venv else ""
    workdir = args.workdir if _is_url(args.workdir) else os.path.abspath(args.workdir)
    job = Job(config=_config_path(args.config), workdir=workdir,
              nodes=args.nodes, gpus_per_node=args.gpus_per_node, per=args.per,
              overrides=tuple(overrides), name=args.name, partition=args.partition,
              account=args.account, time=args.time, setup=setup,
              cpus_per_gpu=args.cpus_per_gpu, signal_seconds=args.signal_seconds,
              requeue=args.requeue, sbatch_options=tuple(args.sbatch),
              chdir=os.path.abspath(args.chdir or os.getcwd()))
    check(job, args.allow_local_workdir)
    return job, args


@dataclasses.dataclass
class Submission:
    script_path: str
    command: list               # [] in a dry run
    job_id: str = ""            # "" in a dry run


def launch(argv, out=None) -> Submission:
    """Writes the script and submits it (or, with --dry-run, prints it); returns at once."""
    out = out or sys.stdout
    job, args = parse(argv)
    script = build_script(job)
    if args.dry_run:
        fd, path = tempfile.mkstemp(prefix=f"{job.job_name}-", suffix=".sbatch")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(script)
        out.write(script)
        print(f"# dry run: script written to {path}; not submitted.", file=sys.stderr)
        return Submission(path, [])
    os.makedirs(os.path.dirname(job.script_path), exist_ok=True)
    with open(job.script_path, "w", encoding="utf-8") as f:
        f.write(script)
    command = ["sbatch", "--parsable"] + (["--wait"] if args.wait else []) + [job.script_path]
    print("$ " + shlex.join(command), file=out, flush=True)
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: run this on a SLURM login node (or use --dry-run).")
    except subprocess.CalledProcessError as e:
        if args.wait and e.stdout and e.stdout.strip():   # submitted; the job itself failed
            raise LaunchError(f"Job {e.stdout.split()[0].split(';')[0]} ended with status "
                              f"{e.returncode}; see {job.log_path}.") from None
        raise LaunchError(f"sbatch failed with status {e.returncode}.") from None
    # --parsable prints "JOBID" or "JOBID;CLUSTER"; with --wait, the id is still the first line.
    lines = result.stdout.strip().splitlines()
    job_id = lines[0].split(";")[0].strip() if lines else ""
    print(f"Submitted job {job_id}. Log: {job.log_path.replace('%j', job_id)}", file=out)
    return Submission(job.script_path, command, job_id)


def main(argv=None) -> int:
    try:
        launch(sys.argv[1:] if argv is None else argv)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
