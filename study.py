"""
The study: what closes the gap between a model's own latents and its oracle? Plain SFT, LVR and Mirage,
then three ways to continue each LVR run at equal compute: LVR stage 2 (trained on its own latents),
GRPO_latent (latent_sigma 0) and GRPO that explores its latents (latent_sigma tuned), against a control
that continues the same run under teacher forcing.

    python study.py                    # the whole study: hours on 2 CPU cores, resumable, results as it goes
    python study.py --quick true       # a tiny version: CI's smoke test (no accuracy asserted)
    python study.py --report true      # run nothing: the tables (markdown) and the picture, from the file

Protocol (one tuning budget for all; docs/study.md says it in full):
- seeds: every (split, seed) draws its own examples (tasks.example_id), so no two seeds share one;
  `tune_seed` makes every choice, on `val_examples` of the validation split; `seeds` are reported, on the
  test split, and never choose anything.
- SFT methods try each learning rate in `lrs` (Mirage: with each k in `mirage_ks`, chosen by its oracle
  row, since a k whose targets cannot carry the answer cannot be rescued by the model).
- compute is counted in multiply-accumulates (qwen's Qwen2_5_VL.macs), never in seconds. Every
  continuation starts from the LVR run of its seed and gets `budget` times that run's compute. The control
  and stage 2 continue the run itself (train_sft --resume on a copy: its AdamW state, its data stream where
  it stopped, the schedule's final learning rate) up to the compute the explored GRPO run spent.
- GRPO tries each rate in `grpo_lrs` at latent_sigma 0, then each of `sigmas` (multiples of the typical
  per-dimension distance between a latent and its target, measured on the validation split) at that rate.
- every comparison is a paired difference with a 95% interval: a bootstrap over seeds and test examples.
Every finished run is one JSON line in `results` (never redone); the tables and the picture are drawn from
that file alone (matplotlib, only here).
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

import cli

# -----------------------------------------------------------------------------
tasks = "relation,search"  # comma-separated: which tasks, in this order
methods = "none,lvr,mirage,stage2,grpo"  # comma-separated: none | lvr | mirage; LVR continued: stage2 | grpo
seeds = "1,2,3,4,5"  # comma-separated: the reported seeds
tune_seed = 0  # [0, inf) the seed of every tuning run (never reported)
lrs = "1e-3"  # comma-separated: the SFT learning rates each SFT method tries
mirage_ks = "4,16"  # comma-separated: Mirage's latents per helper image tried (16: one per helper token)
grpo_lrs = "2e-5,1e-4"  # comma-separated: the GRPO learning rates tried (at latent_sigma 0)
sigmas = "0.5,1,2"  # comma-separated: latent_sigma tried, times the per-dimension latent-target distance
max_iters = 1000  # [2, inf) SFT steps per run (Mirage: three quarters stage 1, a quarter stage 2)
batch_size = 16  # [1, inf) examples per SFT step
eval_interval = 500  # [1, inf) points on the learning curve (validation accuracy)
eval_examples = 128  # [1, inf) validation examples per learning-curve point
val_examples = 512  # [1, inf) validation examples behind every tuning choice
test_examples = 256  # [1, inf) test examples for the reported runs
budget = 0.25  # (0, inf) every continuation's compute, as a fraction of the LVR run's
grpo_iters = 10000  # [1, inf) a cap on GRPO steps (the compute budget ends the run first)
resamples = 10000  # [100, inf) bootstrap resamples per interval
results = "assets/study.jsonl"  # one JSON line per finished run
picture = "assets/study.png"  # held-out accuracy against compute, per task and method
work_dir = "study_runs"  # checkpoints of the runs (large; not committed)
quick = False  # a tiny version, for CI (the flags in QUICK, before the ones given)
report = False  # run nothing: print the tables (markdown, for the docs) and draw the picture
# -----------------------------------------------------------------------------
# --quick true: LVR and its continuations (plain SFT and Mirage are tested on their own), tiny: one task,
# one seed, a few steps
QUICK = ["--tasks", "relation", "--methods", "lvr,stage2,grpo", "--max_iters", "4",
         "--batch_size", "2", "--eval_interval", "2", "--eval_examples", "4", "--val_examples", "4",
         "--test_examples", "4", "--seeds", "1", "--grpo_lrs", "2e-5", "--sigmas", "1",
         "--budget", "8", "--resamples", "200"]
NAMES = {"none": "plain SFT", "lvr": "LVR", "mirage": "Mirage",
         "control": "LVR + teacher-forced (control)", "stage2": "LVR + stage 2",
         "grpo0": "LVR + GRPO_latent (sigma 0)", "grpo": "LVR + GRPO (sigma tuned)"}
COMPARISONS = [("lvr", "none"), ("mirage", "lvr"), ("stage2", "control"), ("grpo", "control"),
               ("grpo0", "control"), ("grpo", "grpo0"), ("stage2", "lvr"), ("grpo", "lvr"),
               ("control", "lvr")]  # (a, b): a - b


def run(script, *args):
    """Run a script -> its stdout; a failure stops the study with its error."""
    r = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise cli.InputError(f"{script} {' '.join(map(str, args))} failed: {last}")
    return r.stdout


def curve(stdout):
    """train_sft's periodic held-out accuracies -> [[step, accuracy], ...]."""
    return [[int(s), float(a)] for s, a in re.findall(r"step (\d+): held-out accuracy ([\d.]+)", stdout)]


def macs_of(out):
    """The compute a run directory has recorded: train_sft's running total, or the sum of GRPO's steps."""
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=True)
    return state["macs"] if "macs" in state else sum(x["macs"] for x in state["log"])


def evaluate(task, out, split, n, diagnostics, k=0):
    """eval.py on a checkpoint -> {"rows": {name: {accuracy, ..., right}}, "geometry": ...}."""
    path = f"{out}.{split}.json"  # (beside the checkpoint: a checkpoint directory holds only its own files)
    run("eval.py", "--init_from", out, "--task", task, "--n_examples", n, "--split", split,
        "--diagnostics", diagnostics, "--save", path,
        *(["--decoding", "steps", "--lvr_steps", k] if k else []))  # (Mirage: its k steps)
    with open(path) as f:
        return json.load(f)


def tested(task, out, k=0, diagnostics=True):
    """A reported run's test-split evaluation fields."""
    return {"test": evaluate(task, out, "test", test_examples, diagnostics, k)}


def validated(task, out, k=0, diagnostics=False):
    """A tuning run's validation-split evaluation fields."""
    return {"val": evaluate(task, out, "eval", val_examples, diagnostics, k)}


def record(done, key, fn):
    """The result of `key`: from the file, or computed now by fn() and appended (a finished run is not
    redone). `done`: every finished run, by key."""
    if key not in done:
        t0 = time.time()
        rec = {"key": key, **fn()}
        rec["wall_s"] = time.time() - t0
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[key] = rec
        short = {k: v for k, v in rec.items() if k not in ("key", "test", "val")}
        print(f"{key}: {json.dumps(short)[:300]}", flush=True)
    return done[key]


def fresh(*dirs):
    """Clear what a killed run left (it starts again)."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def sft(done, task, method, seed, lr, k=4):
    """One SFT run (Mirage: stage 1 then 2), recorded -> (record, checkpoint directory). Tuning runs are
    validated, reported ones tested."""
    out = os.path.join(work_dir, f"{task}_{method}_s{seed}_lr{lr}" + (f"_k{k}" if method == "mirage" else ""))
    key = f"{task}/{method}/seed{seed}/lr{lr}" + (f"/k{k}" if method == "mirage" else "")

    def go():
        fresh(out, out + "_stage1")
        common = ["--task", task, "--batch_size", batch_size, "--eval_interval", eval_interval,
                  "--eval_examples", eval_examples, "--seed", seed, "--lr", lr, "--min_lr", lr / 10,
                  "--warmup_iters", min(50, max_iters // 10)]
        if method != "mirage":
            stdout = run("train_sft.py", *common, "--method", method, "--max_iters", max_iters,
                         "--out_dir", out)
            rec = {"curve": curve(stdout), "macs": macs_of(out)}
        else:
            n1 = max_iters * 3 // 4
            s1 = run("train_sft.py", *common, "--method", "mirage", "--mirage_k", k, "--max_iters", n1,
                     "--out_dir", out + "_stage1")
            s2 = run("train_sft.py", *common, "--method", "mirage", "--mirage_k", k, "--stage", 2,
                     "--init_from", out + "_stage1", "--latent_loss", "cosine", "--ce_weight", 1.0,
                     "--latent_weight", 0.1, "--warmup_iters", 0, "--max_iters", max_iters - n1,
                     "--out_dir", out)
            rec = {"curve": curve(s1) + [[n1 + s, a] for s, a in curve(s2)],
                   "macs": macs_of(out + "_stage1") + macs_of(out)}
        lvr_k = k if method == "mirage" else 0
        if seed == tune_seed:  # Mirage is chosen by its oracle row: the validation table in full
            return {**rec, **validated(task, out, lvr_k, diagnostics=method == "mirage")}
        return {**rec, **tested(task, out, lvr_k, diagnostics=method != "none")}
    return record(done, key, go), out


def continued(done, task, name, seed, base, lvr_lr, target_macs):
    """The LVR run `base` continued under --resume (its optimizer, its data stream, the schedule's final
    learning rate) until it has spent target_macs more: teacher-forced (control) or on its own latents
    (stage2), recorded."""
    out = os.path.join(work_dir, f"{task}_{name}_s{seed}")

    def go():
        fresh(out)
        shutil.copytree(base, out)
        base_macs = macs_of(base)
        final = lvr_lr / 10  # (sft's --min_lr)
        run("train_sft.py", "--resume", "true", "--out_dir", out, "--stage", 2 if name == "stage2" else 1,
            "--task", task, "--method", "lvr", "--batch_size", batch_size, "--seed", seed,
            "--lr", final, "--min_lr", final, "--warmup_iters", 0, "--max_iters", 100 * max_iters,
            "--max_macs", base_macs + target_macs, "--eval_examples", 0, "--eval_interval", 100 * max_iters)
        rec = {"macs": macs_of(out) - base_macs, "lr": final}
        checked = validated(task, out) if seed == tune_seed else tested(task, out, diagnostics=False)
        return {**rec, **checked}
    return record(done, f"{task}/{name}/seed{seed}", go)


def grpo(done, task, seed, base, lr, sigma, macs, sigma_name):
    """GRPO on the LVR run `base` for `macs` of compute, recorded (tuning runs validated)."""
    out = os.path.join(work_dir, f"{task}_grpo_s{seed}_lr{lr}_sigma{sigma_name}")

    def go():
        fresh(out)
        run("train_grpo.py", "--init_from", base, "--task", task, "--seed", seed, "--lr", lr,
            "--latent_sigma", sigma, "--max_iters", grpo_iters, "--max_macs", macs,
            "--eval_interval", grpo_iters, "--out_dir", out)
        log = torch.load(os.path.join(out, "train_state.pt"), weights_only=True)["log"]
        rec = {"macs": macs_of(out), "latent_sigma": sigma, "steps": len(log),
               "grpo_log": [{k: x[k] for k in ("reward", "flat_groups", "kept_groups", "draws", "kl")}
                            for x in log]}
        checked = validated(task, out) if seed == tune_seed else tested(task, out, diagnostics=False)
        return {**rec, **checked}
    return record(done, f"{task}/grpo/seed{seed}/lr{lr}/sigma{sigma_name}", go)


def val_accuracy(rec, row="with latents"):
    return rec["val"]["rows"].get(row, {"accuracy": 0.0})["accuracy"]


def study(done, task):
    """Every run of one task, in order: 1) SFT tuning and the reported SFT seeds, 2) the continuations."""
    wanted = methods.split(",")
    continuing = {"stage2", "grpo"} & set(wanted)
    sft_methods = [m for m in ("none", "lvr", "mirage") if m in wanted or m == "lvr" and continuing]
    chosen = {}  # method -> (lr, k)
    for method in sft_methods:  # 1) tuning, then the reported seeds
        ks = [int(k) for k in mirage_ks.split(",")] if method == "mirage" else [4]
        trials = {(float(lr), k): sft(done, task, method, tune_seed, float(lr), k)[0]
                  for lr in lrs.split(",") for k in ks}
        row = "oracle latents" if method == "mirage" else "with latents"
        chosen[method] = max(trials, key=lambda t: (val_accuracy(trials[t], row), val_accuracy(trials[t])))
        for seed in map(int, seeds.split(",")):
            sft(done, task, method, seed, *chosen[method])
    if not continuing:
        return
    # 2) the continuations of each LVR run: the GRPO settings chosen on tune_seed's, then every seed
    lvr_lr = chosen["lvr"][0]
    base0_rec, base0 = sft(done, task, "lvr", tune_seed, lvr_lr)
    geo = base0_rec["val"]["geometry"]
    with open(os.path.join(base0, "config.json")) as f:
        hidden = json.load(f)["hidden_size"]
    unit = geo["distance"] / hidden ** 0.5 if geo else 1.0  # the typical latent-target distance, per dim
    lr_trials = {float(g): grpo(done, task, tune_seed, base0, float(g), 0.0, budget * base0_rec["macs"], "0")
                 for g in grpo_lrs.split(",")}
    g_best = max(lr_trials, key=lambda g: val_accuracy(lr_trials[g]))
    s_trials = {m: grpo(done, task, tune_seed, base0, g_best, float(m) * unit, budget * base0_rec["macs"], m)
                for m in sigmas.split(",")}
    s_best = max(s_trials, key=lambda m: val_accuracy(s_trials[m]))
    for seed in map(int, seeds.split(",")):
        base_rec, base = sft(done, task, "lvr", seed, lvr_lr)
        target = budget * base_rec["macs"]
        explored = grpo(done, task, seed, base, g_best, float(s_best) * unit, target, s_best)
        grpo(done, task, seed, base, g_best, 0.0, target, "0")
        continued(done, task, "control", seed, base, lvr_lr, explored["macs"])
        if "stage2" in wanted:
            continued(done, task, "stage2", seed, base, lvr_lr, explored["macs"])


def reported(recs, task, method):
    """The reported runs of a method (the table's rows: control, stage2, grpo0, grpo too), by seed."""
    out = {}
    for r in recs:
        parts = r["key"].split("/")
        if parts[0] != task or "test" not in r:
            continue
        name = parts[1]
        if name == "grpo":
            name = "grpo0" if parts[4] == "sigma0" else "grpo"
        if name == method:
            out[int(parts[2][4:])] = r
    return dict(sorted(out.items()))


def bootstrap(a, b, n, seed=0):
    """Paired difference of two methods' test correctness, {seed: [0/1]} each, over their common seeds ->
    (mean, low, high): a 95% interval from resampling seeds and test examples together."""
    common = sorted(set(a) & set(b))
    d = torch.tensor([[float(x) - float(y) for x, y in zip(a[s], b[s])] for s in common])  # (S, N)
    g = torch.Generator().manual_seed(seed)
    S, N = d.shape
    means = torch.empty(n)
    for i in range(0, n, 500):  # (500 resamples at a time: (500, S, N) indices)
        m = min(500, n - i)
        si = torch.randint(S, (m, S), generator=g)
        ei = torch.randint(N, (m, 1, N), generator=g).expand(m, S, N)
        means[i:i + m] = d[si].gather(2, ei).mean((1, 2))
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    return float(d.mean()), low, high


def summary(recs):
    """The tables, markdown: 1) per task and method, test accuracy over the reported seeds and the latent
    diagnostics; 2) the paired comparisons, each with its 95% interval."""
    rows = ["| task | method | accuracy: mean ± std (each seed) | hit rate | latent-target distance | "
            "oracle | compute (x LVR run) | flat groups |", "|---|---|---|---|---|---|---|---|"]
    pairs = ["| task | comparison | seeds | difference | 95% interval | real? |", "|---|---|---|---|---|---|"]
    for task in tasks.split(","):
        lvr_macs = {s: r["macs"] for s, r in reported(recs, task, "lvr").items()}
        for method in NAMES:
            runs = reported(recs, task, method)
            if not runs:
                continue
            acc = [r["test"]["rows"]["with latents"]["accuracy"] for r in runs.values()]
            mean = statistics.mean(acc)
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            hits = [r["test"]["rows"]["with latents"]["hit_rate"] for r in runs.values()]
            dist = [r["test"]["geometry"]["distance"] for r in runs.values() if r["test"].get("geometry")]
            oracle = [r["test"]["rows"]["oracle latents"]["accuracy"] for r in runs.values()
                      if "oracle latents" in r["test"]["rows"]]
            ratio = [r["macs"] / lvr_macs[s] for s, r in runs.items() if s in lvr_macs]
            flat = [x["flat_groups"] for r in runs.values() for x in r.get("grpo_log", [])]
            each = ", ".join(f"{x:.3f}" for x in acc)
            hits = [h for h in hits if h is not None]
            rows.append(f"| {task} | {NAMES[method]} | {mean:.3f} ± {sd:.3f} ({each}) | {avg(hits)} | "
                        f"{avg(dist)} | {avg(oracle)} | {avg(ratio)} | {avg(flat)} |")
        for a, b in COMPARISONS:
            ra, rb = reported(recs, task, a), reported(recs, task, b)
            if not set(ra) & set(rb):
                continue
            right = {s: r["test"]["rows"]["with latents"]["right"] for s, r in ra.items()}
            other = {s: r["test"]["rows"]["with latents"]["right"] for s, r in rb.items()}
            mean, low, high = bootstrap(right, other, resamples)
            real = "yes" if low > 0 or high < 0 else "no"
            pairs.append(f"| {task} | {NAMES[a]} - {NAMES[b]} | {len(set(ra) & set(rb))} | {mean:+.3f} | "
                         f"[{low:+.3f}, {high:+.3f}] | {real} |")
    return "\n".join(rows) + "\n\n" + "\n".join(pairs)


def avg(v):
    return f"{sum(v) / len(v):.3f}" if v else "-"


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
        study(done, task)
        draw(list(done.values()))  # after every task: the picture so far


def draw(recs):
    """Validation accuracy against SFT steps (mean over the reported seeds, min-max shaded), one panel per
    task; the continuations as markers (test accuracy, mean and min-max) at the compute they spent."""
    try:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
        return
    names = [t for t in tasks.split(",") if any(r["key"].startswith(t + "/") for r in recs)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.6 * max(1, len(names)), 3.6), squeeze=False)
    colours = {"none": "tab:gray", "lvr": "tab:blue", "mirage": "tab:green", "control": "tab:orange",
               "stage2": "tab:purple", "grpo0": "tab:brown", "grpo": "tab:red"}
    for ax, task in zip(axes[0], names):
        for method in ("none", "lvr", "mirage"):
            runs = [r for r in reported(recs, task, method).values() if r["curve"]]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            accs = [[dict(r["curve"]).get(s, float("nan")) for s in steps] for r in runs]
            ax.plot(steps, [sum(a[i] for a in accs) / len(accs) for i in range(len(steps))],
                    color=colours[method], label=NAMES[method] + " (validation)")
            low = [min(a[i] for a in accs) for i in range(len(steps))]
            high = [max(a[i] for a in accs) for i in range(len(steps))]
            ax.fill_between(steps, low, high, color=colours[method], alpha=0.2)
        for j, method in enumerate(("lvr", "control", "stage2", "grpo0", "grpo")):
            runs = reported(recs, task, method)
            if not runs or method == "lvr" and not reported(recs, task, "control"):  # (LVR: where continued)
                continue
            vals = [r["test"]["rows"]["with latents"]["accuracy"] for r in runs.values()]
            m = sum(vals) / len(vals)
            x = max_iters * (1 + (budget if method != "lvr" else 0) + 0.02 * j)  # (the compute, in SFT steps)
            ax.errorbar([x], [m], yerr=[[m - min(vals)], [max(vals) - m]], fmt="o", color=colours[method],
                        label=NAMES[method] + " (test)")
        ax.set(title=task, xlabel=f"compute, in LVR SFT steps (batch {batch_size})", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(picture) or ".", exist_ok=True)
    fig.savefig(picture, dpi=110)
    print(f"wrote {picture}")


if __name__ == "__main__":
    cli.run(main)
