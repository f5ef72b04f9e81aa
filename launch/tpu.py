#!/usr/bin/env python3
"""Train on a Cloud TPU slice (TPU VM or queued resource) through the gcloud CLI.

    python launch/tpu.py run --name=h14 --project=P --zone=us-east5-a --tpu=v5p:4x4x4 \
        --workdir=gs://BUCKET/h14 --config=configs/in1k_vit_h14.py [-- --config.KEY=VALUE ...]

Subcommands: create, install, train, logs, status, stop, delete, and run (create unless it
exists, install, train, follow the log). Each gcloud command is printed (`$ ...`) before it runs;
--dry-run only prints them. docs/launch.md has the setup and what happens on the workers.
--tpu is a gcloud accelerator type (v5p-128, v4-16, v5litepod-16, v6e-16) or a topology as in
tools/aot.py (v5p:4x4x4). Types count TensorCores on v4 and v5p (2 a chip: v5p:4x4x4 = 64 chips
= v5p-128) and chips on v5e and v6e (v6e:4x4 = v6e-16; v5e's type is v5litepod-N); a v4/v5p
chip count gets Google's default shape for that count.

This file is the command line and the loop that runs the commands; the commands themselves
(gcloud argv lists, the workers' shell scripts, TPU types, prices) are built, without
running anything, in launch/tpu_commands.py.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

# Run as a script (python launch/tpu.py), sys.path starts at launch/ rather than at the
# repository root, where the package launch/ is; put the root first so that both the script and
# `import launch.tpu` (tests) find launch.tpu_commands. Its names are re-exported from here
# (wheel_name only for the tests), so callers need only launch.tpu.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.tpu_commands import (  # noqa: E402, F401
    EXIT_LOST, EXIT_PREEMPTED, REPO, RUN_DIR, LaunchError, cost_line, create_cmd, delete_cmd,
    follow_cmd, gcloud_cmd, install_cmds, parse_tpu, state_cmd, stop_cmd, train_cmd, wheel_name)

READY = {"READY", "ACTIVE"}                       # TPU VM / queued resource usable
GONE = {"PREEMPTED", "TERMINATED", "SUSPENDING", "SUSPENDED", "FAILED"}  # recreate to continue


# ---- Running the commands: print each, run it unless --dry-run --------------------------------

class Runner:
    """Prints every command as a shell line; runs it unless dry. `execute(argv, capture)` ->
    (exit status, stdout) is replaceable (tests)."""

    def __init__(self, dry_run: bool, execute=None, sleep=time.sleep, out=None):
        self.dry_run, self.sleep, self.out = dry_run, sleep, out or sys.stdout
        self.execute = execute or self._subprocess

    def say(self, text: str):
        print(text, file=self.out, flush=True)

    def run(self, argv: list, check: bool = True, capture: bool = False, quiet: bool = False):
        if not quiet:
            self.say("$ " + shlex.join(argv))
        if self.dry_run:
            return 0, ""
        rc, out = self.execute(argv, capture)
        if check and rc != 0:
            raise LaunchError(f"exit status {rc} from: {shlex.join(argv)}")
        return rc, out

    @staticmethod
    def _subprocess(argv, capture):
        if shutil.which(argv[0]) is None:
            raise LaunchError(f"{argv[0]} not found on PATH" + (
                "; install the Google Cloud CLI (cloud.google.com/sdk/docs/install) or use "
                "--dry-run" if argv[0] == "gcloud" else ""))
        proc = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None)
        return proc.returncode, proc.stdout or ""


def get_state(args, r: Runner, quiet: bool = False):
    """The slice's state (READY, PREEMPTED, ACTIVE, SUSPENDED, ...); None if it does not exist."""
    rc, out = r.run(state_cmd(args), check=False, capture=True, quiet=quiet)
    return out.strip() or None if rc == 0 else None


def wait_ready(args, r: Runner):
    r.say(f"# waiting for {args.name} to be {'ACTIVE' if args.queued else 'READY'} (polling every "
          f"{args.poll_interval:g} s, at most {args.wait_timeout:g} s):")
    if r.dry_run:
        return r.run(state_cmd(args))
    deadline, quiet = time.monotonic() + args.wait_timeout, False
    while True:
        state = get_state(args, r, quiet=quiet)
        quiet = True
        if state in READY:
            return r.say(f"# {args.name}: {state}")
        if state in GONE:
            raise LaunchError(f"{args.name} is {state} instead of starting; see "
                              f"`{shlex.join(gcloud_cmd(args, 'describe'))}`.")
        if time.monotonic() > deadline:
            raise LaunchError(f"{args.name} is not ready after {args.wait_timeout:g} s (state "
                              f"{state}); it may still come up: launch/tpu.py status.")
        r.sleep(args.poll_interval)


def create(args, tpu, r: Runner, state=None):
    """Creates the slice (deleting it first when it exists in `state`) and waits for it."""
    if state is not None:
        r.say(f"# {args.name} is {state}: deleting it and creating it again")
        r.run(delete_cmd(args))
    r.say(cost_line(args, tpu))
    r.run(create_cmd(args, tpu))
    wait_ready(args, r)


def start(args, tpu, overrides, r: Runner):
    for argv in install_cmds(args):
        r.run(argv)
    r.run(train_cmd(args, tpu, overrides))


def run(args, tpu, overrides, r: Runner) -> int:
    """create unless it exists -> install -> train -> follow (-> recreate after preemption)."""
    state = None if r.dry_run else get_state(args, r)
    if state in READY:
        r.say(f"# {args.name} exists and is {state}\n" + cost_line(args, tpu))
    elif state is None or state in GONE:
        create(args, tpu, r, state)
    else:
        wait_ready(args, r)
    start(args, tpu, overrides, r)
    if args.no_follow:
        return 0
    if r.dry_run:
        r.run(follow_cmd(args))
        if args.recreate_on_preemption:
            r.say(f"# if {args.name} is preempted (at most --max_restarts={args.max_restarts}):")
            create(args, tpu, r, "PREEMPTED")
            start(args, tpu, overrides, r)
            r.run(follow_cmd(args))
        if args.delete_at_end:
            r.say("# when training has ended:")
            r.run(delete_cmd(args))
        return 0
    restarts, lost, from_start = 0, 0, True
    while True:
        rc = r.run(follow_cmd(args, from_start), check=False)[0]
        from_start = False
        if rc == 0:
            return finish(args, r, 0, "training finished")
        if rc in (EXIT_LOST, EXIT_PREEMPTED):
            r.sleep(args.poll_interval)  # a preempted slice takes a moment to say so
        state = get_state(args, r)
        if state in READY and rc != EXIT_LOST:  # failed, or stopped by SIGTERM, on a healthy slice
            stopped = rc == EXIT_PREEMPTED
            return finish(args, r, 0 if stopped else rc, f"training exited with status {rc}"
                          + " after saving a checkpoint on SIGTERM" * stopped)
        if state in READY:
            lost += 1
            if lost > 10:
                raise LaunchError(f"lost the connection to {args.name} 10 times; it is {state}.")
            r.say(f"# lost the log of {args.name} ({state}); re-attaching")
        elif state is None or state in GONE:
            if not args.recreate_on_preemption or restarts >= args.max_restarts:
                raise LaunchError(f"{args.name} is {state or 'gone'} after {restarts} restarts; "
                                  f"run the same command again to recreate it and resume from "
                                  f"the latest checkpoint (--recreate_on_preemption does it).")
            restarts, from_start = restarts + 1, True
            create(args, tpu, r, state)
            start(args, tpu, overrides, r)
        else:
            r.say(f"# {args.name} is {state}; waiting")


def finish(args, r: Runner, rc: int, message: str) -> int:
    r.say(f"# {message}")
    if args.delete_at_end and get_state(args, r) is not None:
        r.run(delete_cmd(args))
    return rc


# ---- Command line -----------------------------------------------------------------------------

FLAGS = {  # group: [(flag, argparse keywords)]; subcommands take the groups in SUBCOMMANDS
    "common": [("--name", dict(required=True, help="slice name: a-z, 0-9, -")),
               ("--project", dict(required=True)), ("--zone", dict(required=True)),
               ("--tpu", dict(help="accelerator type (v5p-128) or topology (v5p:4x4x4)")),
               ("--queued", dict(action="store_true", help="a queued resource, not a TPU VM")),
               ("--dry-run", dict(action="store_true", help="print the commands, run nothing"))],
    "slice": [("--runtime_version", dict(default="", help="default: Google's image for JAX")),
              ("--spot", dict(action="store_true", help="spot capacity (can be preempted)")),
              ("--reserved", dict(action="store_true", help="use the project's reservation")),
              ("--valid_until_duration", dict(default="", help="queued: wait at most, e.g. 6h")),
              ("--wait_timeout", dict(type=float, default=3600, help="s to wait for READY")),
              ("--poll_interval", dict(type=float, default=30, help="s between state polls")),
              ("--price_per_chip_hour", dict(type=float, default=0, help="USD, for the estimate"))],
    "install": [("--from_git", dict(default="", help="URL@REF: pip install from git, no wheel")),
                ("--python", dict(default="3.11", help="Python of the workers' venv (uv)")),
                ("--upload", dict(action="append", default=[], help="relative PATH copied to "
                                  "~/tcjepa/PATH on every worker (e.g. captions); repeatable"))],
    "train": [("--config", dict(required=True, help="configs/F.py[:ARGS]")),
              ("--workdir", dict(default="", help="gs://BUCKET/DIR")),
              ("--bucket", dict(default="", help="shorthand for --workdir=gs://BUCKET/NAME")),
              ("--delete_at_end", dict(action="store_true", help="delete the slice at the end"))],
    "run": [("--no_follow", dict(action="store_true", help="return once training started")),
            ("--recreate_on_preemption", dict(action="store_true",
                                              help="recreate, reinstall, resume when preempted")),
            ("--max_restarts", dict(type=int, default=10))],
}
SUBCOMMANDS = {
    "create": (["slice"], "create the slice and wait until it is READY / ACTIVE"),
    "install": (["install"], "install tcjepa_jax on every worker"),
    "train": (["train"], "start training on every worker, detached; train flags after --"),
    "logs": ([], "follow worker 0's log until training ends (re-attach)"),
    "status": ([], "describe the slice / queued resource"),
    "stop": ([], "SIGTERM to training: it saves a checkpoint and exits"),
    "delete": ([], "delete the slice / queued resource"),
    "run": (["slice", "install", "train", "run"], "create unless it exists, install, train, "
            "follow"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command, (groups, help_) in SUBCOMMANDS.items():
        s = sub.add_parser(command, help=help_, description=help_)
        for flag, kw in [f for g in ["common", *groups] for f in FLAGS[g]]:
            s.add_argument(flag, *["--dry_run"] * (flag == "--dry-run"), **kw)
    return p


def parse(argv: list):
    """Flags before `--` are ours, the rest go to tcjepa_jax.train; validates them all."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args, overrides = parser().parse_args(argv[:cut]), argv[cut + 1:]
    get = lambda flag: getattr(args, flag, None)  # noqa: E731  (flags of other subcommands)
    checks = [
        (re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.name), f"--name={args.name!r}: "
         "lower-case letters, digits and hyphens, starting with a letter, at most 63 characters"),
        (args.project.strip() and args.zone.strip(), "--project and --zone must not be empty"),
        (args.tpu or args.command not in ("create", "run", "train"),
         f"{args.command} needs --tpu, e.g. --tpu=v5p:4x4x4 or --tpu=v5p-128"),
        (not (get("spot") and get("reserved")), "--spot and --reserved exclude each other"),
        (args.queued or not get("valid_until_duration"), "--valid_until_duration needs --queued"),
        (args.command in ("train", "run") or not overrides,
         f"`{args.command}` takes no training flags after --"),
        (not [o for o in overrides if not o.startswith("--") or o.startswith(("--config=",
         "--workdir="))], "after -- come tcjepa_jax.train flags such as --config.KEY=VALUE; "
         "give --config and --workdir before --")]
    for path in get("upload") or []:
        checks += [(not (os.path.isabs(path) or ".." in path.split("/") or path.startswith(
            "configs")), f"--upload={path}: give a relative path in this directory, not configs/ "
            "(the workers link the installed configs)"),
            (os.path.exists(path), f"--upload={path}: no such file or directory")]
    for ok, message in checks:
        if not ok:
            raise LaunchError(message + ".")
    tpu = parse_tpu(args.tpu) if args.tpu else None
    if args.command not in ("train", "run"):
        return args, tpu, overrides
    args.workdir = args.workdir or (f"gs://{args.bucket}/{args.name}" if args.bucket else "")
    config_file = args.config.split(":")[0]
    if not args.workdir:
        raise LaunchError("give --workdir=gs://BUCKET/DIR (or --bucket=BUCKET).")
    if not args.workdir.startswith("gs://") and tpu["hosts"] > 1:
        raise LaunchError(f"--workdir={args.workdir}: the {tpu['hosts']} hosts of a {tpu['type']} "
                          f"share no disk, and each writes its part of every checkpoint into the "
                          f"workdir; use gs://BUCKET/DIR.")
    if not args.workdir.startswith("gs://"):
        warn(f"--workdir={args.workdir} is on the TPU VM's disk: deleting the slice deletes it.")
    if config_file.startswith("configs/") and not os.path.exists(os.path.join(REPO, config_file)):
        raise LaunchError(f"--config={args.config}: {config_file} does not exist.")
    if not config_file.startswith("configs/") and not any(
            config_file == u or config_file.startswith(u.rstrip("/") + "/") for u in args.upload):
        warn(f"--config={config_file} must exist under ~/{RUN_DIR} on the workers: "
             f"--upload={config_file} copies it there.")
    return args, tpu, overrides


def warn(message: str):
    print(f"launch/tpu.py: warning: {message}", file=sys.stderr)


def main(argv=None, execute=None, sleep=time.sleep, out=None) -> int:
    try:
        args, tpu, overrides = parse(sys.argv[1:] if argv is None else list(argv))
        r = Runner(args.dry_run, execute, sleep, out)
        if args.command == "run":
            return run(args, tpu, overrides, r)
        if args.command == "create":
            return create(args, tpu, r) or 0
        commands = {"install": lambda: install_cmds(args),
                    "train": lambda: [train_cmd(args, tpu, overrides)],
                    "logs": lambda: [follow_cmd(args)],
                    "status": lambda: [gcloud_cmd(args, "describe")],
                    "stop": lambda: [stop_cmd(args)], "delete": lambda: [delete_cmd(args)]}
        for cmd in commands[args.command]():
            rc = r.run(cmd, check=args.command != "logs")[0]
        if args.command == "train":
            r.say(f"# started; follow it: python launch/tpu.py logs --name={args.name} "
                  f"--project={args.project} --zone={args.zone}")
        return rc  # logs: the training's exit status
    except LaunchError as e:
        print(f"launch/tpu.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("launch/tpu.py: interrupted; the slice and its training keep running "
              "(launch/tpu.py logs / stop / delete).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
