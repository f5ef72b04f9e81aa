"""The smallest TPU slice where each paper model's train step fits: docs/scaling.md's table.

    python benchmarks/scaling_table.py [--results=benchmarks/results/aot_scaling.jsonl] \
        [--models=B/16,L/16,H/14,G/16] [--modes=tcjepa,ijepa] [--generations=v5p,v6e]

For every (model, mode, generation) it runs `python -m tcjepa_jax.tools.aot` (a separate
process per compile, so memory is returned between them) from a first guess of slice, walks
down the generation's slices while the step fits and up while it does not, and stops at the
smallest slice that fits next to one that does not (or the generation's smallest slice). Every
compile uses the paper config at batch 2048 with `model.scan_layers=True` (one layer compiled
instead of all: minutes instead of most of an hour on a 2-core host), `model.remat=full` and
the fsdp axis over all chips: the settings that need the least memory without changing the
batch. Each compile's report is appended to --results, and a re-run reuses it, so an
interrupted run continues where it stopped. Prints the Markdown table at the end.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICES = {  # each generation's slices, smallest first
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    # v6e-1 (1x1) exists, but libtpu compiles v6e topologies only in whole 2x2 hosts.
    "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
}
CONFIGS = {"B/16": "in1k_vit_b16", "L/16": "in1k_vit_l16", "H/14": "in1k_vit_h14",
           "G/16": "in1k_vit_h14"}
# G/16 has no config of its own: the H/14 recipe with a G/16 encoder and the 16-layer predictor
# of configs/common.py's PREDICTOR_DEPTH, and the mask caps of its 14 x 14 grid.
EXTRA = {"G/16": ["--config.model.encoder=G/16", "--config.model.predictor_depth=16",
                  "--config.masks.max_context=54", "--config.masks.max_target=36"]}
# From the memory per chip measured on v5p (95 GiB) scaled to v6e's 32 GiB: a compile or two
# per row instead of a walk from the smallest slice.
FIRST_GUESS = {"v5p": {"B/16": "2x2x1", "L/16": "2x2x1", "H/14": "2x2x1", "G/16": "2x2x1"},
               "v6e": {"B/16": "2x2", "L/16": "2x4", "H/14": "2x4", "G/16": "2x4"}}
SETTINGS = ["--config.model.scan_layers=True", "--config.model.remat=full",
            '--config.mesh=(("data", 1), ("fsdp", -1), ("tensor", 1))']


def compile_once(model: str, mode: str, topology: str) -> dict:
    config = f"configs/{CONFIGS[model]}.py" + (":ijepa" if mode == "ijepa" else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "tcjepa_jax.tools.aot", f"--config={config}",
               f"--topology={topology}", f"--json={out}", *SETTINGS, *EXTRA.get(model, [])]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode not in (0, 2) or not os.path.exists(out):
            raise RuntimeError(f"aot failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        with open(out, encoding="utf-8") as f:
            report = json.load(f)
    report.update(model=model, mode=mode, command=" ".join(cmd[1:]))
    return report


def smallest_fit(model, mode, generation, done: dict, record) -> list:
    """The reports of the compiles needed to bracket the smallest fitting slice."""
    slices = SLICES[generation]
    i = slices.index(FIRST_GUESS[generation][model])
    seen = {}
    while True:
        topology = f"{generation}:{slices[i]}"
        key = (model, mode, topology)
        if key not in done:
            done[key] = compile_once(model, mode, topology)
            record(done[key])
        seen[i] = done[key]["fits"]
        print(f"  {model} {mode} {topology}: {'fits' if seen[i] else 'does not fit'}", flush=True)
        if seen[i] and (i == 0 or seen.get(i - 1) is False):
            return [done[(model, mode, f"{generation}:{slices[j]}")] for j in sorted(seen)]
        if not seen[i] and seen.get(i + 1):
            return [done[(model, mode, f"{generation}:{slices[j]}")] for j in sorted(seen)]
        if not seen[i] and i + 1 == len(slices):
            return [done[(model, mode, f"{generation}:{slices[j]}")] for j in sorted(seen)]
        i = i - 1 if seen[i] else i + 1


def row(report: dict, smaller: dict | None) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1) or "1 chip"
    mem = report["memory"]
    if not report["fits"]:
        return (f"| {report['model']} | {report['mode']} | none up to {report['topology']} | "
                f"| | needs {mem['total'] / 2**30:.1f} GiB | | | |")
    below = "—" if smaller is None else (
        f"{smaller['topology']}: {smaller['memory']['total'] / 2**30:.1f} GiB needed")
    return (f"| {report['model']} | {'TC-JEPA' if report['mode'] == 'tcjepa' else 'I-JEPA'} | "
            f"{report['topology']} ({report['num_chips']}) | {mesh} | {report['remat']} | "
            f"{mem['total'] / 2**30:.2f} GiB = {mem['total'] / report['hbm_bytes_per_device']:.0%}"
            f" | {report['flops_per_device']:.3g} | {report['est_step_s'] * 1e3:.0f} ms, "
            f"{report['est_images_per_s']:.0f} | {below} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results",
                                                          "aot_scaling.jsonl"))
    parser.add_argument("--models", default="B/16,L/16,H/14,G/16")
    parser.add_argument("--modes", default="tcjepa,ijepa")
    parser.add_argument("--generations", default="v5p,v6e")
    args = parser.parse_args()
    done = {}
    if os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                done[(r["model"], r["mode"], r["topology"])] = r
    os.makedirs(os.path.dirname(args.results), exist_ok=True)

    def record(report):
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(report, default=str) + "\n")

    lines = ["| model | mode | smallest slice (chips) | mesh | remat | memory / chip | "
             "FLOPs / step / chip | est. step, images/s @ 40% MFU | next smaller slice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for generation in args.generations.split(","):
        for model in args.models.split(","):
            for mode in args.modes.split(","):
                reports = smallest_fit(model, mode, generation, done, record)
                fitting = [r for r in reports if r["fits"]]
                best = fitting[0] if fitting else reports[-1]
                smaller = [r for r in reports if not r["fits"]
                           and SLICES[generation].index(r["topology"].split(":")[1])
                           < SLICES[generation].index(best["topology"].split(":")[1])]
                lines.append(row(best, smaller[-1] if smaller else None))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
