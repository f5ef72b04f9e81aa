"""What launch/tpu.py runs, never running it: gcloud argv lists and the workers' shell scripts.

Every function here turns the parsed flags (`args`, launch/tpu.py's argparse namespace) and the
slice (`tpu`, parse_tpu's dict) into a command, and nothing else: no subprocess, no sleeping, no
network (wheel_name only reads setup.py). That keeps them testable as plain data (the tests
compare the argv lists and run the scripts under bash with a fake trainer), and it keeps
launch/tpu.py, which prints and runs them, short. launch/tpu.py re-exports what it uses.
"""

import math
import os
import re
import shlex
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- Constants --------------------------------------------------------------------------------

# generation: (accelerator-type prefix, type units per chip, default runtime version). Runtime
# versions: cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX"), 2026.
GENERATIONS = {"v4": ("v4", 2, "tpu-ubuntu2204-base"), "v5p": ("v5p", 2, "v2-alpha-tpuv5"),
               "v5e": ("v5litepod", 1, "v2-alpha-tpuv5-lite"), "v6e": ("v6e", 1, "v2-alpha-tpuv6e")}
TYPE_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
SINGLE_HOST_MAX_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}  # larger slices: 4 chips a host
# USD per chip-hour, (on-demand, spot): approximate list prices in us-central regions as of
# 2026; check cloud.google.com/tpu/pricing. Spot prices change often.
PRICES = {"v4": (3.22, 0.97), "v5e": (1.20, 0.48), "v5p": (4.20, 1.68), "v6e": (2.70, 1.08)}

EXIT_LOST = 255      # ssh lost the connection, or the training's exit status is unknown
EXIT_PREEMPTED = 75  # training saved a checkpoint on SIGTERM and exited (train.py's log line)
RUN_DIR = "tcjepa"   # on every worker, relative to the home directory: venv/, configs -> package
COORDINATOR_PORT = 8476
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


class LaunchError(Exception):
    """A mistake in the flags or a failed command: one line, exit status 1."""


# ---- The slice: TPU type / topology, hosts, price ---------------------------------------------

def parse_tpu(spec: str) -> dict:
    """'v5p:4x4x4' or 'v5p-128' -> {generation, chips, hosts, type}; LaunchError if invalid."""
    topo = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", spec or "")
    typed = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", spec or "")
    if not (topo or typed):
        raise LaunchError(f"--tpu={spec!r}: use an accelerator type (v4-16, v5p-128, v5litepod-16, "
                          f"v6e-16) or a topology GENERATION:AxB[xC] (v4:2x2x2, v5p:4x4x4, "
                          f"v5e:4x4, v6e:4x4); generations: {', '.join(GENERATIONS)}.")
    generation = TYPE_PREFIXES[(topo or typed)[1]]
    prefix, per_chip, _ = GENERATIONS[generation]
    if topo:
        chips = math.prod(int(d) for d in topo[2].split("x"))
    elif int(typed[2]) % per_chip:
        raise LaunchError(f"--tpu={spec}: {generation} types count TensorCores, 2 per chip.")
    else:
        chips = int(typed[2]) // per_chip
    if generation in ("v5e", "v6e") and chips not in (1, 4, 8, 16, 32, 64, 128, 256):
        raise LaunchError(f"--tpu={spec}: {generation} slices have 1, 4, 8, 16, ... 256 chips.")
    if generation in ("v4", "v5p") and (chips < 4 or chips % 4):
        raise LaunchError(f"--tpu={spec}: {generation} slices have a multiple of 4 chips "
                          f"({generation}:2x2x1 = {generation}-8 is the smallest).")
    hosts = 1 if chips <= SINGLE_HOST_MAX_CHIPS[generation] else chips // 4
    return dict(generation=generation, chips=chips, hosts=hosts,
                type=f"{prefix}-{chips * per_chip}")


def cost_line(args, tpu: dict) -> str:
    """The '# ...' line printed before a slice is created, so the hourly cost is seen before it
    is spent: from PRICES, or --price_per_chip_hour for a negotiated or regional rate."""
    price = args.price_per_chip_hour or PRICES[tpu["generation"]][1 if args.spot else 0]
    source = "--price_per_chip_hour" if args.price_per_chip_hour else (
        f"{'approximate spot' if args.spot else 'on-demand list'} price, us-central, 2026; check "
        f"cloud.google.com/tpu/pricing")
    return (f"# {tpu['type']}: {tpu['chips']} chips on {tpu['hosts']} host(s); about "
            f"${tpu['chips'] * price:,.2f}/hour = {tpu['chips']} chips x ${price:.2f}/chip-hour "
            f"({source})" + "; reserved capacity costs your commitment's rate" * args.reserved)


# ---- gcloud commands for the slice ------------------------------------------------------------

def gcloud_cmd(args, verb: str, kind: str = "") -> list:
    """`gcloud compute tpus KIND VERB NAME --zone --project`, the start of every command. KIND
    defaults to the resource --queued picks; ssh and scp always go through tpu-vm."""
    kind = kind or ("queued-resources" if args.queued else "tpu-vm")
    return ["gcloud", "compute", "tpus", kind, verb, args.name,
            f"--zone={args.zone}", f"--project={args.project}"]


def create_cmd(args, tpu: dict) -> list:
    """Creates the TPU VM or the queued resource (whose flags differ: --node-id,
    --runtime-version, and --valid-until-duration for how long it may wait in the queue)."""
    version = args.runtime_version or GENERATIONS[tpu["generation"]][2]
    cap = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if not args.queued:
        return [*gcloud_cmd(args, "create"), f"--accelerator-type={tpu['type']}",
                f"--version={version}", *cap]
    until = [f"--valid-until-duration={d}" for d in [args.valid_until_duration] if d]
    return [*gcloud_cmd(args, "create"), f"--node-id={args.name}",
            f"--accelerator-type={tpu['type']}", f"--runtime-version={version}", *cap, *until]


def state_cmd(args) -> list:
    """Prints only the state (READY, PREEMPTED, ...), which the launcher polls; a queued resource
    keeps it one level deeper."""
    field = "state.state" if args.queued else "state"
    return [*gcloud_cmd(args, "describe"), f"--format=value({field})"]


def delete_cmd(args) -> list:
    """Deletes without asking; a queued resource needs --force to delete its TPU VM too."""
    return [*gcloud_cmd(args, "delete"), *["--force"] * args.queued, "--quiet"]


def ssh_cmd(args, worker: str, command: str, keepalive: bool = False) -> list:
    """Runs `command` on `worker` ("all" or a number). keepalive: for a long ssh (following the
    log), so that a dead connection ends it within about 2 minutes instead of hanging."""
    alive = ["--ssh-flag=-oServerAliveInterval=30", "--ssh-flag=-oServerAliveCountMax=4"]
    return [*gcloud_cmd(args, "ssh", "tpu-vm"), f"--worker={worker}", *alive * keepalive,
            f"--command={command}"]


def scp_cmd(args, source: str, dest: str) -> list:
    """Copies `source` (a file or directory) to `dest` on every worker."""
    # gcloud's scp takes the slice name on the destination: `scp SRC NAME:DEST`.
    cmd = gcloud_cmd(args, "scp", "tpu-vm")
    return [*cmd[:5], source, f"{args.name}:{dest}", "--worker=all", "--recurse", *cmd[6:]]


# ---- Installing on the workers ----------------------------------------------------------------

def wheel_name() -> str:
    """The wheel `pip wheel` builds from this checkout; its version is read from setup.py
    (not imported: building a command must not need the package's dependencies)."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        version = re.search(r'version="([^"]+)"', f.read())[1]
    return f"tcjepa_jax-{version}-py3-none-any.whl"


def install_cmds(args) -> list:
    """Build + copy the wheel (or install from git) into ~/tcjepa/venv on every worker: a
    Python >= 3.11 venv made by uv (TPU images ship 3.10), our package always replaced, its
    dependencies installed when missing, ~/tcjepa/configs linked to the installed configs."""
    py, cmds = f"{RUN_DIR}/venv/bin/python", []
    if args.from_git:
        url = args.from_git if args.from_git.startswith("git+") else "git+" + args.from_git
        full, ours = f'"tcjepa_jax[tpu] @ {url}"', f'"tcjepa_jax @ {url}"'
    else:
        dist = os.path.join(tempfile.gettempdir(), "tcjepa_tpu_wheels")
        cmds += [[sys.executable, "-m", "pip", "wheel", "--no-deps", f"--wheel-dir={dist}", REPO],
                 scp_cmd(args, os.path.join(dist, wheel_name()), "/tmp/")]
        full, ours = f'"/tmp/{wheel_name()}[tpu]"', f"/tmp/{wheel_name()}"
    dirs = sorted({f"{RUN_DIR}/{os.path.dirname(p)}".rstrip("/") for p in args.upload})
    script = "; ".join([
        f"set -e; mkdir -p {' '.join([RUN_DIR] + dirs)}",
        f"if [ ! -x {py} ]; then (PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user -q "
        f"-U uv || curl -LsSf https://astral.sh/uv/install.sh | sh) && ~/.local/bin/uv venv -q "
        f"--seed --python {args.python} {RUN_DIR}/venv; fi",
        f"{py} -m pip install -q --force-reinstall --no-deps {ours}",  # our code, always
        f"{py} -m pip install -q {full}",  # its dependencies, when missing
        f'ln -sfn "$({py} -P -c "import configs, os; print(os.path.dirname(configs.__file__))")"'
        f" {RUN_DIR}/configs",
        f'{py} -c "import jax, tcjepa_jax; print(jax.__version__)"'])
    cmds.append(ssh_cmd(args, "all", script))
    for path in args.upload:
        cmds.append(scp_cmd(args, path, f"{RUN_DIR}/{os.path.dirname(path)}/".replace("//", "/")))
    return cmds


# ---- Training on the workers: start, follow, stop ---------------------------------------------

def _files(args) -> tuple:
    """~/tcjepa_NAME.{log,pid,exit}: the training's output, process id and exit status, kept on
    each worker so that later ssh sessions (logs, stop, a re-attach) can find the run."""
    return tuple(f"tcjepa_{args.name}.{ext}" for ext in ("log", "pid", "exit"))


def train_cmd(args, tpu: dict, overrides: list) -> list:
    """Starts training on every worker, detached (the ssh returns): the process's pid, output
    and exit status go to ~/tcjepa_NAME.{pid,log,exit}."""
    log, pid, code = _files(args)
    argv = ["venv/bin/python", "-m", "tcjepa_jax.train", f"--config={args.config}",
            f"--workdir={args.workdir}", *overrides]
    steps = [f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo "tcjepa: '
             f'{args.name} is already running here; see launch/tpu.py logs or stop" >&2; '
             f"exit 1; fi", f"rm -f {code}", "unset JAX_PLATFORMS"]
    if tpu["hosts"] > 1:
        # tcjepa_jax/distributed.py joins the hosts when JAX_COORDINATOR_ADDRESS is set; JAX then
        # reads the process count and id from the TPU VM metadata. The coordinator is worker 0
        # (the first worker-network-endpoint; its last ':' field is the IP), as JAX itself picks.
        steps += [f"ep=$(curl -sf -H Metadata-Flavor:Google {METADATA}worker-network-endpoints "
                  f"| cut -d, -f1 | rev | cut -d: -f1 | rev)",
                  'export JAX_COORDINATOR_ADDRESS="${JAX_COORDINATOR_ADDRESS:-${ep:?no '
                  f'worker-network-endpoints in the metadata}}:{COORDINATOR_PORT}}}"']
    after = ""
    if args.delete_at_end and (args.command == "train" or args.no_follow):
        # Nobody follows the run: worker 0 deletes the slice itself (needs its service account
        # to hold roles/tpu.admin); `run` without --no_follow deletes it from here instead.
        after = (f"; if [ \"$(curl -sf -H Metadata-Flavor:Google {METADATA}agent-worker-number)\" "
                 f"= 0 ]; then {shlex.join(delete_cmd(args))}; fi")
    steps.append(f'cd {RUN_DIR} || exit 1; (trap "" HUP; nohup {shlex.join(argv)} & echo $! > '
                 f"../{pid}; wait $!; echo $? > ../{code}{after}) > ../{log} 2>&1 < /dev/null &")
    return ssh_cmd(args, "all", "; ".join(steps))


def follow_cmd(args, from_start: bool = True) -> list:
    """Worker 0's log until its training process ends; exits with the training's exit status
    (EXIT_PREEMPTED when it saved a checkpoint on SIGTERM, EXIT_LOST when unknown)."""
    log, pid, code = _files(args)
    return ssh_cmd(args, "0", "; ".join([
        f'tail -n {"+1" if from_start else "20"} -F --pid="$(cat {pid} 2>/dev/null || echo 1)" '
        f"{log}",
        f"code=$(cat {code} 2>/dev/null || echo {EXIT_LOST})",
        f'[ "$code" = 0 ] && grep -q "Preempted: saved step" {log} && code={EXIT_PREEMPTED}',
        "exit $code"]), keepalive=True)


def stop_cmd(args) -> list:
    """SIGTERM to training on every worker: train.py saves a checkpoint and exits."""
    pid = _files(args)[1]
    return ssh_cmd(args, "all", f'kill -TERM "$(cat {pid})" && echo "stopping $(hostname)"')
