"""Expand a config's sweep into runs, launch them, and tabulate their final metrics.

    python launch/sweep.py --config=configs/F.py[:ARGS] [--launcher=local|tpu|slurm] \
        [--dry-run] [--max_parallel=N] [--root=DIR] [--launcher_args="..."] \
        [-- --config.KEY=VALUE ...]

The config file's `get_sweep(arg)` returns a list of override dicts (tcjepa_jax/sweeps.py has
the product / zip helpers). Every run gets a name derived from its overrides, stable across
re-runs, and the workdir ROOT/NAME (ROOT defaults to runs/sweeps/<config name>). Every override
is checked against the config before anything starts: an unknown field or an invalid value
stops the sweep with one message. Overrides after `--` apply to every run.

Launchers:
- local: `python -m tcjepa_jax.train` per run on this machine, --max_parallel at a time
  (default 1), output in WORKDIR/train.log.
- tpu: `python launch/tpu.py run --no_follow ...` per run (one slice per run; ROOT must be
  gs://); slurm: `python launch/slurm.py ...` per run (one job per run). --launcher_args go to
  that launcher (zone, project, TPU type; nodes, partition). With --max_parallel=N only N runs
  are in flight: the sweep waits (polling every --poll_s) for runs to finish before
  submitting more; without it every run is submitted at once.

A run is finished when WORKDIR/final_metrics.json exists (train.py writes it at the end).
Re-running the command skips finished runs; an unfinished local run is started again and
resumes from its latest checkpoint; a tpu/slurm run submitted earlier and not finished is left
alone (it may still be running) unless --resubmit. When every run has finished, the final
metrics go to ROOT/results.csv and ROOT/results.md; --collect only writes those tables.
"""

import argparse
import ast
import csv
import importlib.util
import io
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tcjepa_jax import paths, sweeps  # noqa: E402

FINAL_METRICS = "final_metrics.json"  # = tcjepa_jax.train.FINAL_METRICS (not imported: no jax)
STATE_FILE = "sweep_state.json"


# ---- Loading the sweep -----------------------------------------------------------------------

def load_config_module(config_arg: str):
    """(module, arg) of `path/to/config.py[:ARGS]`."""
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, arg or None


def parse_common_overrides(flags: list) -> dict:
    """`--config.KEY=VALUE` flags (given after `--`) as {KEY: value}."""
    common = {}
    for flag in flags:
        if not flag.startswith("--config.") or "=" not in flag:
            raise SystemExit(f"error: after `--` give overrides as --config.KEY=VALUE; got {flag!r}.")
        key, text = flag[len("--config."):].split("=", 1)
        try:
            common[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            common[key] = text
    return common


def plan(config_arg: str, common_flags: list):
    """(config name, [(run name, overrides)]), every run's config checked."""
    module, arg = load_config_module(config_arg)
    if not hasattr(module, "get_sweep"):
        raise SystemExit(f"error: {config_arg} defines no get_sweep(arg).")
    config = module.get_config(arg) if arg is not None else module.get_config()
    points = module.get_sweep(arg) if arg is not None else module.get_sweep()
    try:
        base = sweeps.apply_overrides(config, parse_common_overrides(common_flags))
        sweeps.check_sweep(base, points)
        names = sweeps.run_names(points)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return config.name, list(zip(names, points))


# ---- Launching -------------------------------------------------------------------------------

def train_command(config_arg, workdir, overrides, common_flags) -> list:
    return [sys.executable, "-m", "tcjepa_jax.train", f"--config={config_arg}",
            f"--workdir={workdir}", *common_flags, *sweeps.override_flags(overrides)]


def remote_command(launcher, sweep_name, run_name, config_arg, workdir, overrides,
                   common_flags, launcher_args) -> list:
    script = os.path.join(REPO, "launch", f"{launcher}.py")
    job = _job_name(f"{sweep_name}-{run_name}")
    head = [sys.executable, script] + (["run", "--no_follow"] if launcher == "tpu" else [])
    return head + [f"--name={job}", f"--config={config_arg}", f"--workdir={workdir}",
                   *shlex.split(launcher_args), "--", *common_flags,
                   *sweeps.override_flags(overrides)]


def _job_name(text: str) -> str:
    """Cloud TPU and SLURM job names: lower case, digits and hyphens, at most 60 characters."""
    import hashlib
    name = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    if len(name) > 60:
        name = name[:51] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def run_local(commands: dict, max_parallel: int) -> dict:
    """Runs {name: (argv, workdir)} with at most max_parallel at once; {name: exit status}."""
    pending, running, status = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < max(1, max_parallel):
            name = pending.pop(0)
            argv, workdir = commands[name]
            os.makedirs(workdir, exist_ok=True)
            log = open(os.path.join(workdir, "train.log"), "ab")
            print(f"[{name}] started: {shlex.join(argv)}", flush=True)
            running[name] = (subprocess.Popen(argv, cwd=REPO, stdout=log,
                                              stderr=subprocess.STDOUT), log)
        time.sleep(0.5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                status[name] = proc.returncode
                del running[name]
                print(f"[{name}] {'finished' if proc.returncode == 0 else 'FAILED'} "
                      f"(exit {proc.returncode})", flush=True)
    return status


# ---- Results ---------------------------------------------------------------------------------

def read_final(workdir: str):
    path = os.path.join(workdir, FINAL_METRICS)
    return json.loads(paths.read_bytes(path)) if paths.exists(path) else None


def results_table(root: str, runs: list) -> tuple:
    """(CSV text, Markdown text) of every run's overrides and final metrics."""
    finals = {name: read_final(os.path.join(root, name)) for name, _ in runs}
    keys = list(dict.fromkeys(k for _, point in runs for k in point))
    metrics = sorted({m for f in finals.values() if f for m in f["metrics"] if _tabulated(m)},
                     key=_metric_order)
    header = ["run", *keys, "step", *metrics]
    rows = []
    for name, point in runs:
        final = finals[name] or {"step": "", "metrics": {}}
        rows.append([name, *(sweeps.flag_value(point.get(k, "")) for k in keys), final["step"],
                     *(_fmt(final["metrics"].get(m)) for m in metrics)])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return text.getvalue(), "\n".join(md) + "\n"


def _tabulated(name: str) -> bool:
    """What a results table is for: losses, evaluators, health monitors, throughput (not the
    schedules' values or the ETA)."""
    return name.startswith(("loss", "eval/", "eval_init/", "monitor/")) or name == "images_per_s"


def _metric_order(name: str):
    first = ("loss", "loss_pred", "loss_sparse", "loss_consistency")
    return (0, first.index(name)) if name in first else (1 if name.startswith("probe/") else 2, name)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def write_results(root: str, runs: list) -> str:
    csv_text, md_text = results_table(root, runs)
    paths.write_text(os.path.join(root, "results.csv"), csv_text)
    paths.write_text(os.path.join(root, "results.md"), md_text)
    return md_text


# ---- Command line ----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, common_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="configs/F.py[:ARGS] with get_sweep(arg)")
    parser.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print what would run; start nothing")
    parser.add_argument("--max_parallel", type=int, default=None,
                        help="runs in flight at once (local default 1; tpu/slurm default all)")
    parser.add_argument("--root", default=None, help="parent of the runs' workdirs")
    parser.add_argument("--launcher_args", default="", help="flags for launch/tpu.py or slurm.py")
    parser.add_argument("--poll_s", type=float, default=300.0)
    parser.add_argument("--resubmit", action="store_true",
                        help="tpu/slurm: submit unfinished runs again even if submitted before")
    parser.add_argument("--collect", action="store_true", help="only write the results tables")
    args = parser.parse_args(own)

    sweep_name, runs = plan(args.config, common_flags)
    root = args.root or os.path.join("runs", "sweeps", sweep_name)
    if args.launcher == "tpu" and not paths.is_url(root):
        raise SystemExit("error: TPU pod hosts share no disk: give --root=gs://BUCKET/PATH.")
    print(f"sweep {sweep_name}: {len(runs)} runs under {root}", flush=True)
    if args.collect:
        print(write_results(root, runs))
        return 0

    state_path = os.path.join(root, STATE_FILE)
    if args.dry_run and paths.is_url(root):
        # A dry run needs neither bucket credentials nor a network.
        print(f"dry run: not reading {root} (which runs finished); every run is listed")
        finished, state = set(), {}
    else:
        finished = {name for name, _ in runs if read_final(os.path.join(root, name))}
        state = json.loads(paths.read_bytes(state_path)) if paths.exists(state_path) else {}
    todo = []
    for name, point in runs:
        if name in finished:
            print(f"[{name}] finished already: skipped")
        elif args.launcher != "local" and name in state and not args.resubmit:
            print(f"[{name}] submitted on {state[name]['submitted']}, not finished: left alone "
                  "(--resubmit submits it again)")
        else:
            todo.append((name, point))

    if args.launcher == "local":
        commands = {name: (train_command(args.config, os.path.join(root, name), point,
                                         common_flags), os.path.join(root, name))
                    for name, point in todo}
        if args.dry_run:
            for argv, _ in commands.values():
                print("$", shlex.join(argv))
            return 0
        status = run_local(commands, args.max_parallel or 1)
        failed = sorted(name for name, code in status.items() if code)
    else:
        failed = submit_remote(args, sweep_name, root, todo, common_flags, state, state_path)
        if args.dry_run:
            return 0

    if all(read_final(os.path.join(root, name)) for name, _ in runs):
        print(write_results(root, runs))
        print(f"results: {os.path.join(root, 'results.csv')} and results.md")
    else:
        print("some runs have not finished; re-run this command to continue, or --collect "
              "to tabulate what has finished.")
    if failed:
        print(f"failed runs: {', '.join(failed)} (see their train.log)", file=sys.stderr)
        return 1
    return 0


def submit_remote(args, sweep_name, root, todo, common_flags, state, state_path) -> list:
    """Submits todo's runs through launch/tpu.py or slurm.py, --max_parallel in flight."""
    failed, in_flight = [], []
    limit = args.max_parallel or len(todo) or 1
    for name, point in todo:
        while not args.dry_run and len(in_flight) >= limit:
            time.sleep(args.poll_s)
            in_flight = [n for n in in_flight if not read_final(os.path.join(root, n))]
        argv = remote_command(args.launcher, sweep_name, name, args.config,
                              os.path.join(root, name), point, common_flags, args.launcher_args)
        if args.dry_run:
            argv = argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):]
        print("$", shlex.join(argv), flush=True)
        if subprocess.run(argv, cwd=REPO).returncode:
            failed.append(name)
            continue
        if not args.dry_run:
            state[name] = {"overrides": point, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
            paths.makedirs(root)
            paths.write_text(state_path, json.dumps(state, indent=2, default=str))
            in_flight.append(name)
    return failed


if __name__ == "__main__":
    sys.exit(main())
