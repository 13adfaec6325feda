"""
The study: does each stage matter? Plain SFT, LVR, Mirage (stage 1 then 2) and LVR + GRPO (against an
SFT control given the same extra compute) on every synthetic task, several seeds, equal steps x batch.

    python study.py                    # the whole study: hours on 2 CPU cores, resumable, results as it goes
    python study.py --quick true       # a tiny version: CI's smoke test (no accuracy asserted)

Protocol (one tuning budget for all): for each task and method, every learning rate in `lrs` is tried
once with `tune_seed`, and the one with the best final accuracy on the validation split (train_sft's
periodic held-out set, tasks.py's eval split) is kept; the reported runs use `seeds` (never used for
tuning) and report eval.py's table on the test split. GRPO's learning rate is tuned the same way, on the
tuned LVR run of `tune_seed`. Every finished run is one JSON line in `results` (never redone); the picture
is drawn from that file (matplotlib, only here).
"""
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

import torch

import cli

# -----------------------------------------------------------------------------
tasks = "relation,imagine,colour,search"  # comma-separated: which tasks, in this order (search: slowest)
methods = "none,lvr,mirage,grpo"  # comma-separated: none | lvr | mirage | grpo (LVR, then GRPO + control)
seeds = "1,2,3"  # comma-separated: the reported seeds
tune_seed = 0  # [0, inf) the seed of the tuning runs (never reported)
lrs = "1e-3,3e-3"  # comma-separated: the SFT learning rates each method tries
grpo_lrs = "2e-5,1e-4"  # comma-separated: the GRPO learning rates tried
max_iters = 1000  # [2, inf) SFT steps per run (Mirage: three quarters stage 1, a quarter stage 2)
batch_size = 16  # [1, inf) examples per SFT step
eval_interval = 250  # [1, inf) points on the learning curve (validation accuracy)
eval_examples = 128  # [1, inf) validation examples per point
test_examples = 256  # [1, inf) test examples for the reported table
grpo_iters = 60  # [1, inf) GRPO steps on top of LVR
results = "assets/study.jsonl"  # one JSON line per finished run
picture = "assets/study.png"  # held-out accuracy against steps, per task and method
work_dir = "study_runs"  # checkpoints of the runs (large; not committed)
quick = False  # a tiny version of everything, for CI (the flags in QUICK, before the ones given)
report = False  # run nothing: print the results table (markdown, for the README) and draw the picture
# -----------------------------------------------------------------------------


def run(script, *args):
    """Run a script -> (stdout, seconds); a failure stops the study with its error. The seconds are the
    child's CPU time (user + system), which another program disturbs less than the wall clock (not by
    nothing: oversubscribed, OpenMP's spinning threads inflate it); the wall clock is added to `WALL`."""
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1]
        raise cli.InputError(f"{script} {' '.join(map(str, args))} failed: {last}")
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    WALL.append(time.time() - t0)
    return r.stdout, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)


WALL = []  # wall seconds of every script run, in order
NAMES = {"none": "plain SFT", "lvr": "LVR", "mirage": "Mirage", "grpo": "LVR + GRPO",
         "control": "LVR + SFT (control)"}


def curve(stdout):
    """train_sft's periodic held-out accuracies -> [[step, accuracy], ...]."""
    return [[int(s), float(a)] for s, a in re.findall(r"step (\d+): held-out accuracy ([\d.]+)", stdout)]


def table(stdout):
    """eval.py's rows -> {row name: {accuracy, format, latent_steps, hit_rate}}, and the norm ratio."""
    found = re.findall(r"^(with latents|latents disabled|dummy latents|swapped latents|oracle latents)\s+"
                       r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|-)$", stdout, re.M)
    rows = {name: {"accuracy": float(a), "format": float(f), "latent_steps": float(n),
                   "hit_rate": None if h == "-" else float(h)} for name, a, f, n, h in found}
    norm = re.search(r"latent norm / target norm \(own latents\): ([\d.]+)", stdout)
    return rows, float(norm.group(1)) if norm else None


def sft(task, method, seed, lr, out):
    """One SFT run (Mirage: stage 1 then stage 2) -> record fields."""
    common = ["--task", task, "--batch_size", batch_size, "--eval_interval", eval_interval,
              "--eval_examples", eval_examples, "--seed", seed, "--lr", lr, "--min_lr", lr / 10,
              "--warmup_iters", min(50, max_iters // 10)]
    if method != "mirage":
        stdout, cpu = run("train_sft.py", *common, "--method", method, "--max_iters", max_iters,
                          "--out_dir", out)
        return {"curve": curve(stdout), "cpu_s": cpu, "wall_s": WALL[-1]}
    n1 = max_iters * 3 // 4
    s1, w1 = run("train_sft.py", *common, "--method", "mirage", "--max_iters", n1,
                 "--out_dir", out + "_stage1")
    s2, w2 = run("train_sft.py", *common, "--method", "mirage", "--stage", 2, "--init_from", out + "_stage1",
                 "--latent_loss", "cosine", "--ce_weight", 1.0, "--latent_weight", 0.1, "--warmup_iters", 0,
                 "--max_iters", max_iters - n1, "--out_dir", out)
    both = curve(s1) + [[n1 + s, a] for s, a in curve(s2)]
    return {"curve": both, "cpu_s": w1 + w2, "wall_s": sum(WALL[-2:])}


def evaluate(task, method, out):
    stdout, _ = run("eval.py", "--init_from", out, "--task", task, "--n_examples", test_examples,
                    *(["--decoding", "steps", "--lvr_steps", 4] if method == "mirage" else []))
    rows, norm = table(stdout)
    return {"test": rows, "norm_ratio": norm}


def grpo(task, seed, lr, lvr_out, out, control_out, sft_step_s, sft_end_lr):
    """GRPO on an LVR checkpoint, and its control: the same checkpoint trained further with SFT (at the
    end of its schedule's learning rate) for the same CPU time."""
    _, cpu = run("train_grpo.py", "--init_from", lvr_out, "--task", task, "--seed", seed, "--lr", lr,
                  "--max_iters", grpo_iters, "--eval_interval", grpo_iters, "--out_dir", out)
    log = torch.load(os.path.join(out, "train_state.pt"), weights_only=True)["log"]
    rec = {
        "cpu_s": cpu,
        "wall_s": WALL[-1],
        "grpo_log": [{k: x[k] for k in ("reward", "flat_groups", "kept_groups", "draws", "kl")} for x in log],
    }
    n = max(1, round(cpu / sft_step_s))
    _, ccpu = run("train_sft.py", "--init_from", lvr_out, "--task", task, "--seed", seed, "--method", "lvr",
                   "--latent_loss", "cosine", "--ce_weight", 1.0, "--latent_weight", 0.1, "--lr", sft_end_lr,
                   "--min_lr", sft_end_lr, "--warmup_iters", 0, "--max_iters", n, "--eval_interval", n,
                   "--eval_examples", eval_examples, "--batch_size", batch_size, "--out_dir", control_out)
    return rec, {"cpu_s": ccpu, "wall_s": WALL[-1], "steps": n}


def summary(recs):
    """The results table: per task and method, test accuracy mean ± std over the reported seeds (each
    seed's value), the diagnostics' accuracies, hit rate, latent/target norm, and CPU time per run."""
    def ms(v):
        m, sd = statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{m:.3f} ± {sd:.3f} ({', '.join(f'{x:.3f}' for x in v)})"
    lines = [
        "| task | method | accuracy (seeds) | disabled | dummy | swapped | oracle | hit rate | norm "
        "| CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks.split(","):
        for method in ("none", "lvr", "mirage", "grpo", "control"):
            src = "grpo" if method == "control" else method
            runs = [r for r in recs if r["key"].startswith(f"{task}/{src}/") and "test" in r]
            runs = [{**r["control"], "norm_ratio": None} if method == "control" else r for r in runs]
            if not runs:
                continue
            def col(row, k="accuracy"):
                v = [r["test"][row][k] for r in runs if row in r["test"] and r["test"][row][k] is not None]
                return f"{sum(v) / len(v):.3f}" if v else "-"
            norms = [r["norm_ratio"] for r in runs if r.get("norm_ratio")]
            lines.append(
                f"| {task} | {NAMES[method]} | {ms([r['test']['with latents']['accuracy'] for r in runs])} | "
                f"{col('latents disabled')} | {col('dummy latents')} | {col('swapped latents')} | "
                f"{col('oracle latents')} | {col('with latents', 'hit_rate')} | "
                f"{f'{sum(norms) / len(norms):.2f}' if norms else '-'} | "
                f"{sum(r['cpu_s'] for r in runs) / len(runs):.0f} |"
            )
    return "\n".join(lines)


# --quick true: every stage, tiny (one task, one seed, one learning rate, a few steps), as these flags
QUICK = ["--tasks", "relation", "--max_iters", "4", "--eval_interval", "2", "--eval_examples", "4",
         "--test_examples", "4", "--grpo_iters", "1", "--seeds", "1", "--lrs", "1e-3", "--grpo_lrs", "2e-5"]


def record(done, key, fn):
    """The result of `key`: from the file, or computed now by fn() and appended (a finished run is not
    redone). `done`: every finished run, by key."""
    if key not in done:
        rec = {"key": key, **fn()}
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[key] = rec
        print(f"{key}: {json.dumps({k: v for k, v in rec.items() if k != 'key'})[:300]}", flush=True)
    return done[key]


def sft_run(done, task, method, seed, lr):
    """One SFT run, recorded -> (its record, its checkpoint directory). The reported seeds are tested."""
    out = os.path.join(work_dir, f"{task}_{method}_s{seed}_lr{lr}")

    def fresh():
        for d in (out, out + "_stage1"):  # what a killed run left: it starts again
            shutil.rmtree(d, ignore_errors=True)
        rec = sft(task, method, seed, lr, out)
        return {**rec, **(evaluate(task, method, out) if seed != tune_seed else {})}
    return record(done, f"{task}/{method}/seed{seed}/lr{lr}", fresh), out


def grpo_run(done, task, seed, lr, lvr_lr, sft_step_s):
    """GRPO (and its control) on the LVR run of `seed`, recorded. tune_seed: validation accuracy only."""
    _, lvr_out = sft_run(done, task, "lvr", seed, lvr_lr)
    out = os.path.join(work_dir, f"{task}_grpo_s{seed}_lr{lr}")

    def fresh():
        for d in (out, out + "_control"):
            shutil.rmtree(d, ignore_errors=True)
        rec, control = grpo(task, seed, lr, lvr_out, out, out + "_control", sft_step_s, lvr_lr / 10)
        if seed == tune_seed:  # tuning: the validation split, as for SFT
            stdout, _ = run("eval.py", "--init_from", out, "--task", task, "--n_examples", eval_examples,
                            "--split", "eval")
            return {**rec, "val": table(stdout)[0]}
        control = {**control, **evaluate(task, "lvr", out + "_control")}
        return {**rec, **evaluate(task, "lvr", out), "control": control}
    return record(done, f"{task}/grpo/seed{seed}/lr{lr}", fresh)


def main(argv):
    if "--quick" in argv and argv[argv.index("--quick") + 1:][:1] == ["true"]:
        argv = [*QUICK, *argv]
    cli.configure(globals(), argv)
    done = {}  # finished runs, by key
    if os.path.exists(results):
        done = {r["key"]: r for r in map(json.loads, open(results))}
    if report:
        print(summary(list(done.values())))
        return draw(list(done.values()))
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    for task in tasks.split(","):
        sft_methods = [m for m in methods.split(",") if m != "grpo"] + (["lvr"] if "grpo" in methods else [])
        best = {}
        for method in dict.fromkeys(sft_methods):  # 1) tuning: every lr once, tune_seed, validation accuracy
            trials = {float(lr): sft_run(done, task, method, tune_seed, float(lr))[0]
                      for lr in lrs.split(",")}
            best[method] = max(trials, key=lambda lr: (trials[lr]["curve"] or [[0, 0.0]])[-1][1])
        for method in dict.fromkeys(sft_methods):  # 2) the reported seeds at the tuned lr
            for seed in seeds.split(","):
                sft_run(done, task, method, int(seed), best[method])
        if "grpo" not in methods:
            continue
        # 3) GRPO: its lr tuned on tune_seed's LVR run, then the reported seeds
        step_s = sft_run(done, task, "lvr", tune_seed, best["lvr"])[0]["cpu_s"] / max_iters  # per SFT step
        trials = {float(g): grpo_run(done, task, tune_seed, float(g), best["lvr"], step_s)
                  for g in grpo_lrs.split(",")}
        best_g = max(trials, key=lambda g: trials[g]["val"].get("with latents", {}).get("accuracy", 0.0))
        for seed in seeds.split(","):
            grpo_run(done, task, int(seed), best_g, best["lvr"], step_s)
        draw(list(done.values()))  # after every task: the picture so far
    draw(list(done.values()))


def draw(recs):
    """Held-out (validation) accuracy against SFT steps, mean over the reported seeds with min-max shaded,
    one panel per task; GRPO and its control as markers at the end (test accuracy)."""
    try:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
        return
    names = [t for t in tasks.split(",") if any(r["key"].startswith(t + "/") for r in recs)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.4), squeeze=False)
    for ax, task in zip(axes[0], names):
        for method, colour in (("none", "tab:gray"), ("lvr", "tab:blue"), ("mirage", "tab:green")):
            runs = [
                r for r in recs if r["key"].startswith(f"{task}/{method}/") and "test" in r and r["curve"]
            ]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            accs = [[dict(r["curve"]).get(s, float("nan")) for s in steps] for r in runs]
            mean = [sum(a[i] for a in accs) / len(accs) for i in range(len(steps))]
            ax.plot(steps, mean, color=colour, label=NAMES[method])
            ax.fill_between(steps, [min(a[i] for a in accs) for i in range(len(steps))],
                            [max(a[i] for a in accs) for i in range(len(steps))], color=colour, alpha=0.2)
        for key, colour in (("grpo", "tab:red"), ("control", "tab:orange")):
            vals = [(r if key == "grpo" else r["control"])["test"]["with latents"]["accuracy"]
                    for r in recs if r["key"].startswith(f"{task}/grpo/") and "test" in r]
            if vals:
                m = sum(vals) / len(vals)  # (at the end of the SFT curves)
                ax.errorbar(
                    [max_iters * (1.03 if key == "grpo" else 1.06)],
                    [m],
                    yerr=[[m - min(vals)], [max(vals) - m]],
                    fmt="o",
                    color=colour,
                    label=NAMES[key] + " (test)",
                )
        ax.set(title=task, xlabel="SFT steps (batch 16)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(picture) or ".", exist_ok=True)
    fig.savefig(picture, dpi=110)
    print(f"wrote {picture}")


if __name__ == "__main__":
    cli.run(main)
