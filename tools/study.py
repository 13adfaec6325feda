"""
The study: where does latent reasoning pay, and is it the latents' content or the extra positions?
Plain SFT, LVR and Mirage against the controls: pause tokens (LVR's slots, one learned input: extra
positions without content) and LIVR (pause tokens under the bottleneck, then normal attention), and
LVR under the bottleneck. Then ways to continue each run at equal compute: LVR stage 2 (trained on
its own latents), GRPO_latent (latent_sigma 0) and GRPO that explores its latents (latent_sigma
tuned), against a control that continues the same run under teacher forcing.

    python -m tools.study                 # the whole study: hours on 2 cores, resumable, results as it goes
    python -m tools.study --quick true    # a tiny version: CI's smoke test (no accuracy asserted)
    python -m tools.study --report true   # run nothing: the tables (markdown) and the picture, from the file

Protocol (one tuning budget for all; docs/study.md says it in full):
- seeds: every (split, seed) draws its own examples (tasks.example_id), so no two seeds share one;
  `tune_seed` makes every choice, on `val_examples` of the validation split; `seeds` are reported,
  on the test split, and never choose anything.
- SFT methods try each learning rate in `lrs` (Mirage: with each k in `mirage_ks`, chosen by its
  oracle row, since a k whose targets cannot carry the answer cannot be rescued by the model). A
  method with one candidate has nothing to choose: no tuning run.
- compute is counted in multiply-accumulates (qwen's Qwen2_5_VL.macs), never in seconds. Every
  continuation starts from the LVR run of its seed and gets `budget` times that run's compute. The
  control and stage 2 continue the run itself (train_sft --resume on a copy: its AdamW state, its
  data stream where it stopped, the schedule's final learning rate) up to the compute the explored
  GRPO run spent.
- GRPO tries each rate in `grpo_lrs` at latent_sigma 0, then each of `sigmas` (multiples of the
  typical per-dimension distance between a latent and its target, measured on the validation split)
  at that rate.
- every comparison is a paired difference with a 95% interval: a bootstrap over seeds and test
  examples.
Every finished run is one JSON line in `results` (never redone); the tables and the picture are
drawn from that file alone (matplotlib, only here).
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import torch

import checkpoint
import cli
import evaluate

# -----------------------------------------------------------------------------
tasks = "hops1,hops2,hops3"  # comma-separated, in order: a task, or hopsK (--task hops --hops K)
level = "3"  # VSP's map size (train_sft's --level): 3 to 6, a list or a range
methods = "none,lvr,pause"  # comma-separated: SFT (BASES), then continued: grpo | stage2 (LVR)
seeds = "1,2,3,4,5"  # comma-separated: the reported seeds
tune_seed = 0  # [0, inf) the seed of every tuning run (never reported)
lrs = "1e-3"  # comma-separated: the SFT learning rates each SFT method tries
mirage_ks = "16"  # comma-separated: Mirage's latents per helper image tried (v2: 4,16)
lvr_regions = "box:16"  # comma-separated: VSP's LVR regions tried, region:max_latents (v3: box:16,moves:1)
mirage_helpers = "goal,path"  # comma-separated: VSP's Mirage helper images tried (tasks.vsp_example)
grpo_lrs = "2e-5,1e-4"  # comma-separated: the GRPO learning rates tried (at latent_sigma 0)
sigmas = ""  # comma-separated: LVR's latent_sigma tried, times the latent-target distance (v2: 0.5,1,2)
max_iters = 1000  # [2, inf) SFT steps per run (Mirage: three quarters stage 1, a quarter stage 2)
test_every = 0  # [0, inf) also test reported runs (not Mirage's) every this many steps (0: at the end)
batch_size = 16  # [1, inf) examples per SFT step
eval_interval = 500  # [1, inf) points on the learning curve (validation accuracy)
eval_examples = 128  # [1, inf) validation examples per learning-curve point
val_examples = 512  # [1, inf) validation examples behind every tuning choice
test_examples = 256  # [1, inf) test examples for the reported runs
budget = 0.25  # (0, inf) every continuation's compute, as a fraction of the SFT run it continues
grpo_iters = 10000  # [1, inf) a cap on GRPO steps (the compute budget ends the run first)
grpo_batch_size = 8  # [1, inf) prompts per GRPO step (train_grpo's --batch_size)
group_size = 8  # [2, inf) completions per prompt (train_grpo's --group_size)
resamples = 10000  # [100, inf) bootstrap resamples per interval
results = "assets/study_v5.jsonl"  # one JSON line per finished run (v2-v4: assets/study*.jsonl)
picture = "assets/study_v5.png"  # held-out accuracy against compute, per task and method
work_dir = "study_runs"  # checkpoints of the runs (large; not committed)
quick = False  # a tiny version, for CI (the flags in QUICK, before the ones given)
report = False  # run nothing: print the tables (markdown, for the docs) and draw the picture
# -----------------------------------------------------------------------------
# --quick true: LVR on VSP, its GRPO continuation and control (plain SFT and Mirage are the same
# functions with other flags, tested on their own), tiny: one seed, a few steps, one trial
QUICK = ["--tasks", "vsp", "--methods", "lvr,grpo", "--max_iters", "4",
         "--batch_size", "2", "--eval_interval", "4", "--eval_examples", "4", "--val_examples", "4",
         "--test_examples", "4", "--seeds", "1", "--grpo_lrs", "2e-5", "--lvr_regions", "box:2",
         "--budget", "4", "--grpo_batch_size", "2", "--group_size", "4", "--resamples", "200"]
BASES = {"none": "plain SFT", "lvr": "LVR", "mirage": "Mirage", "pause": "pause tokens",
         "livr": "pause + bottleneck (LIVR)", "lvrbn": "LVR + bottleneck",
         "box": "box as text", "crop": "box, then its region"}
FLAGS = {"livr": ["--method", "pause", "--bottleneck", "true"],
         "lvrbn": ["--method", "lvr", "--bottleneck", "true"]}  # (the others: --method itself)
CONTINUED = {
    "control": "teacher-forced (control)", "stage2": "stage 2", "grpo0": "GRPO_latent (sigma 0)",
    "grpo": "GRPO (sigma tuned)",
}
NAMES = {
    **BASES,
    **{f"{b}+{c}": f"{n} + {cn}" for b, n in BASES.items() for c, cn in CONTINUED.items()},
}
COMPARISONS = [("lvr", "none"), ("mirage", "none"), ("mirage", "lvr"), ("pause", "none"),
               ("livr", "none"), ("lvrbn", "none"), ("lvr", "pause"), ("mirage", "pause"),
               ("livr", "pause"), ("lvrbn", "pause"), ("lvrbn", "lvr"), ("lvr", "box"),
               ("lvr", "crop"), ("box", "none"), ("crop", "none"), ("crop", "box")] + [
    pair for b in BASES for pair in [(f"{b}+grpo0", f"{b}+control"), (f"{b}+grpo", f"{b}+control"),
                                     (f"{b}+stage2", f"{b}+control"), (f"{b}+grpo", f"{b}+grpo0"),
                                     (f"{b}+grpo0", b), (f"{b}+stage2", b), (f"{b}+grpo", b),
                                     (f"{b}+control", b)]]  # (a, b): a - b


def run(script, *args):
    """Run a script -> its stdout; a failure stops the study with its error."""
    r = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                       # (the repository)
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise cli.InputError(f"{script} {' '.join(map(str, args))} failed: {last}")

    return r.stdout


def task_flags(task):
    """A study task -> the scripts' flags: hopsK is --task hops --hops K (each K its own task in the
    tables); VSP gets --level."""
    if re.fullmatch(r"hops\d+", task):
        return ["--task", "hops", "--hops", task[4:]]
    return ["--task", task, "--level", level]


def curve(stdout):
    """train_sft's periodic held-out accuracies -> [[step, accuracy], ...]."""
    return [
        [int(s), float(a)] for s, a in re.findall(r"step (\d+): held-out accuracy ([\d.]+)", stdout)
    ]


def macs_of(out):
    """The compute a run has recorded in its history (log.jsonl): train_sft's running total at its
    last step, or the sum of GRPO's steps."""
    steps = [x for x in checkpoint.read_log(out) if "macs" in x]
    return steps[-1]["macs"] if "ce" in steps[-1] else sum(x["macs"] for x in steps)


def evaluated(task, out, split, n, diagnostics, k=0):
    """evaluate.py on a checkpoint -> {"rows": {name: {accuracy, ..., right}}, "geometry": ...}."""
    # (beside the checkpoint: a checkpoint directory holds only its own files)
    path = f"{out}.{split}.json"
    run("evaluate.py", "--init_from", out, *task_flags(task), "--n_examples", n,
        "--split", split,
        "--diagnostics", diagnostics, "--save", path,
        *(["--decoding", "steps", "--lvr_steps", k] if k else []))  # (Mirage: its k steps)
    with open(path) as f:
        return json.load(f)


def checked(task, out, seed, k=0, diagnostics=False):
    """A run's evaluation fields: a tuning run's on the validation split, a reported run's on the
    test one."""
    if seed == tune_seed:
        return {
            "val": evaluated(task, out, split="eval", n=val_examples, diagnostics=diagnostics, k=k)
        }

    return {
        "test": evaluated(task, out, split="test", n=test_examples, diagnostics=diagnostics, k=k)
    }


def record(done, key, fn):
    """The result of `key`: from the file, or computed now by fn() and appended (a finished run is
    not redone). `done`: every finished run, by key."""
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


class Trial(NamedTuple):
    """An SFT method's settings: its learning rate, VSP's targets (tasks.vsp_example), Mirage's k
    and LVR's max_latents."""
    lr: float
    targets: str = ""
    k: int = 4
    max_latents: int = 0


def trials(task, method):
    """The settings an SFT method tries on tune_seed: each lr, and on VSP each LVR region or Mirage
    helper (Mirage: with each k)."""
    ks = [int(k) for k in mirage_ks.split(",")] if method == "mirage" else [4]
    targets = [("", 0)]
    if task == "vsp" and method in ("lvr", "lvrbn"):
        targets = [
            (f"{r.split(':')[0]}+goal", int(r.split(":")[1])) for r in lvr_regions.split(",")
        ]

    if task == "vsp" and method == "mirage":
        targets = [(f"box+{h}", 0) for h in mirage_helpers.split(",")]
    return [
        Trial(float(lr), targets=t, k=k, max_latents=m)
        for lr in lrs.split(",")
        for t, m in targets
        for k in ks
    ]


def sft(done, task, method, seed, trial, need=False):
    """One SFT run (Mirage: stage 1 then 2), recorded -> (record, checkpoint directory). Tuning runs
    are validated (LVR and Mirage with every diagnostic row: their oracle rows choose), reported
    ones tested. A run recorded in the file whose checkpoint is gone (a study resumed on another
    machine) is trained again, unrecorded, when a continuation needs it (`need`): the same seed and
    settings, the same run."""
    lr, targets, k, max_latents = trial
    tag = (f"_t{targets}" if targets else "") + (f"_k{k}" if method == "mirage" else "") + (
        f"_m{max_latents}" if max_latents else "")
    out = os.path.join(work_dir, f"{task}_{method}_s{seed}_lr{lr}{tag}")
    key = f"{task}/{method}/seed{seed}/lr{lr}" + (f"/t{targets}" if targets else "") + (
        f"/k{k}" if method == "mirage" else "") + (f"/m{max_latents}" if max_latents else "")

    def go():
        fresh(out, out + "_stage1")
        common = [*task_flags(task), "--batch_size", batch_size, "--eval_interval",
                  eval_interval, "--eval_examples", eval_examples, "--seed", seed, "--lr", lr,
                  "--min_lr", lr / 10, "--warmup_iters", min(50, max_iters // 10),
                  *(["--vsp_targets", targets] if targets else []),
                  *(["--max_latents", max_latents] if max_latents else [])]
        if method != "mirage":  # (test_every: in pieces of one schedule, each tested, resumed)
            every = test_every if test_every and seed != tune_seed else max_iters
            stops = [*range(every, max_iters, every), max_iters]
            stdout, points = "", []
            for i, stop in enumerate(stops):
                stdout += run(
                    "train_sft.py", *common, *FLAGS.get(method, ["--method", method]),
                    "--max_iters", stop, "--lr_decay_iters", max_iters, "--out_dir", out,
                    *(["--resume", "true"] if i else []),
                )
                if stop < max_iters:
                    points.append({"step": stop, **checked(task, out, seed)})
            rec = {"curve": curve(stdout), "macs": macs_of(out)}
            rec.update({"checkpoints": points} if points else {})
        else:
            n1 = max_iters * 3 // 4
            s1 = run(
                "train_sft.py", *common, "--method", "mirage", "--mirage_k", k, "--max_iters", n1,
                "--out_dir", out + "_stage1",
            )
            s2 = run("train_sft.py", *common, "--method", "mirage", "--mirage_k", k, "--stage", 2,
                     "--init_from", out + "_stage1", "--latent_loss", "cosine", "--ce_weight", 1.0,
                     "--latent_weight", 0.1, "--warmup_iters", 0, "--max_iters", max_iters - n1,
                     "--out_dir", out)
            rec = {"curve": curve(s1) + [[n1 + s, a] for s, a in curve(s2)],
                   "macs": macs_of(out + "_stage1") + macs_of(out)}
        diagnostics = method != "none" and (
            seed != tune_seed or method == "mirage" or task == "vsp"
        )
        return {
            **rec,
            **checked(task, out, seed, k=k if method == "mirage" else 0, diagnostics=diagnostics),
        }

    if need and key in done and not os.path.isdir(out):
        go()  # (its record stays the file's)
    return record(done, key, go), out


def base_prefix(task, base_method):
    """A continuation's base in its key: none for LVR's outside VSP (v2's keys:
    relation/control/seed1), else `base+` (vsp/lvr+control/seed1, search/box+grpo/...)."""
    return "" if task != "vsp" and base_method == "lvr" else f"{base_method}+"


def continued_key(task, base_method, name, seed):
    """A continuation's key in the results file (base_prefix)."""
    return f"{task}/{base_prefix(task, base_method)}{name}/seed{seed}"


def grpo_key(task, base_method, seed, lr, sigma_name):
    """A GRPO run's key in the results file (base_prefix; v2's, of LVR runs:
    relation/grpo/seed1/lr2e-05/sigma0)."""
    return f"{task}/{base_prefix(task, base_method)}grpo/seed{seed}/lr{lr}/sigma{sigma_name}"


def continued(done, task, base_method, name, seed, base, trial, target_macs):
    """The SFT run `base` continued under --resume (its optimizer, its data stream, the schedule's
    final learning rate) until it has spent target_macs more: teacher-forced (control) or on its own
    latents (stage2), recorded. (v2's LVR continuations are keyed without the base:
    relation/control/seed1.)"""
    out = os.path.join(work_dir, f"{task}_{base_method}+{name}_s{seed}")
    key = continued_key(task, base_method, name, seed=seed)

    def go():
        fresh(out)
        shutil.copytree(base, out)
        base_macs = macs_of(base)
        final = trial.lr / 10  # (sft's --min_lr)
        k = trial.k if base_method == "mirage" else 0
        run(
            "train_sft.py", "--resume", "true", "--out_dir", out, "--stage",
            2 if name == "stage2" else 1, *task_flags(task), "--method", base_method,
            "--batch_size", batch_size, "--seed", seed, "--lr", final, "--min_lr", final,
            "--warmup_iters", 0, "--max_iters", 100 * max_iters, "--max_macs",
            base_macs + target_macs, "--eval_examples", 0, "--eval_interval", 100 * max_iters,
            *(["--vsp_targets", trial.targets] if trial.targets else []),
            *(["--mirage_k", k] if k else []),
            *(["--max_latents", trial.max_latents] if trial.max_latents else []),
        )
        return {"macs": macs_of(out) - base_macs, "lr": final, **checked(task, out, seed, k=k)}

    return record(done, key, go)


# long: a run's identity (task, base, seed, lr, sigma) and its budget, each named in its key
def grpo_run(done, task, base_method, seed, base, lr, sigma, macs, sigma_name, k=0):
    """GRPO on the SFT run `base` for `macs` of compute, recorded (tuning runs validated)."""
    prefix = base_prefix(task, base_method)
    out = os.path.join(work_dir, f"{task}_{prefix}grpo_s{seed}_lr{lr}_sigma{sigma_name}")

    def go():
        fresh(out)
        run(
            "train_grpo.py", "--init_from", base, *task_flags(task), "--seed", seed,
            "--lr", lr, "--latent_sigma", sigma, "--max_iters", grpo_iters, "--max_macs", macs,
            "--batch_size", grpo_batch_size, "--group_size", group_size, "--save_interval",
            grpo_iters, "--out_dir", out, *(["--decoding", "steps", "--lvr_steps", k] if k else []),
        )  # (Mirage: its k steps)
        log = checkpoint.read_log(out)
        rec = {
            "macs": macs_of(out),
            "latent_sigma": sigma,
            "steps": len(log),
            "grpo_log": [
                {k: x[k] for k in ("reward", "flat_groups", "kept_groups", "draws", "kl")}
                for x in log
            ],
        }
        return {**rec, **checked(task, out, seed, k=k)}

    return record(done, grpo_key(task, base_method, seed, lr=lr, sigma_name=sigma_name), go)


def own_row(rows):
    """An evaluation's own row: with latents, or (box, crop) with own boxes."""
    return rows["with latents"] if "with latents" in rows else rows["with own boxes"]


def three_rows(rows):
    """An evaluation's (own, base, oracle) rows, or None without them: LVR's with / dummy / oracle
    latents; box and crop's own / swapped / oracle boxes (the base: a row without the example's
    content)."""
    for names in [("with latents", "dummy latents", "oracle latents"),
                  ("with own boxes", "swapped boxes", "oracle boxes")]:
        if set(names) <= set(rows):
            return [rows[n] for n in names]
    return None


def val_accuracy(rec, row="with latents"):
    return rec["val"]["rows"].get(row, {"accuracy": 0.0})["accuracy"]


# long: the protocol's three phases in its order, each a loop of recorded runs
def study(done, task):
    """Every run of one task, in order: 1) each SFT method's trials on tune_seed, chosen by the
    oracle row (plain SFT: its own row); 2) GRPO's learning rate for each SFT method, on its
    tune_seed run; 3) seed by seed, each SFT method's reported run and its continuations (GRPO, its
    compute-matched control, LVR's stage 2), so that a study stopped early has every method on the
    same seeds."""
    wanted = methods.split(",")
    sft_methods = [m for m in BASES if m in wanted or m == "lvr" and "stage2" in wanted]
    chosen = {}
    for method in sft_methods:  # 1) tuning (one candidate: nothing to choose)
        if len(trials(task, method)) == 1:
            chosen[method] = trials(task, method)[0]
            continue
        runs = {
            t: sft(done, task, method, seed=tune_seed, trial=t)[0] for t in trials(task, method)
        }
        row = "with latents" if method in ("none", "pause", "livr") else "oracle latents"
        chosen[method] = max(
            runs, key=lambda t: (val_accuracy(runs[t], row), val_accuracy(runs[t]))
        )

    g_best, unit, s_best = {}, 1.0, None
    for method in sft_methods if "grpo" in wanted else []:  # 2) GRPO's lr, for each base
        pending = [
            grpo_key(task, base_method=method, seed=tune_seed, lr=float(g), sigma_name="0")
            for g in grpo_lrs.split(",")
        ]
        base_rec, base = sft(
            done, task, method, seed=tune_seed, trial=chosen[method], need=set(pending) - set(done)
        )
        k = chosen[method].k if method == "mirage" else 0
        lr_trials = {
            float(g): grpo_run(
                done, task, base_method=method, seed=tune_seed, base=base, lr=float(g), sigma=0.0,
                macs=budget * base_rec["macs"], sigma_name="0", k=k,
            )
            for g in grpo_lrs.split(",")
        }
        g_best[method] = max(lr_trials, key=lambda g: val_accuracy(lr_trials[g]))
        if method == "lvr" and sigmas:  # exploring LVR's latents: sigma in latent-target distances
            geo = base_rec["val"]["geometry"]
            unit = (
                geo["distance"]
                / json.load(open(os.path.join(base, "config.json")))["hidden_size"] ** 0.5
            )
            s_trials = {
                m: grpo_run(
                    done, task, base_method=method, seed=tune_seed, base=base, lr=g_best[method],
                    sigma=float(m) * unit, macs=budget * base_rec["macs"], sigma_name=m,
                )
                for m in sigmas.split(",")
            }
            s_best = max(s_trials, key=lambda m: val_accuracy(s_trials[m]))

    for seed in map(int, seeds.split(",")):  # 3) the reported seeds
        for method in sft_methods:
            stage2 = method == "lvr" and "stage2" in wanted
            pending = []  # (its continuations not in the file yet)
            if method in g_best:
                pending += [
                    grpo_key(task, base_method=method, seed=seed, lr=g_best[method], sigma_name="0")
                ]
            if method in g_best or stage2:  # (every continuation against its control)
                pending += [continued_key(task, base_method=method, name="control", seed=seed)]
            if stage2:
                pending += [continued_key(task, base_method=method, name="stage2", seed=seed)]
            base_rec, base = sft(
                done, task, method, seed=seed, trial=chosen[method], need=set(pending) - set(done)
            )
            target = budget * base_rec["macs"]
            k = chosen[method].k if method == "mirage" else 0
            matched = target  # (the control and stage 2 get what the GRPO run spent)
            if method in g_best:
                g = g_best[method]
                matched = grpo_run(
                    done, task, base_method=method, seed=seed, base=base, lr=g, sigma=0.0,
                    macs=target, sigma_name="0", k=k,
                )["macs"]
                if method == "lvr" and s_best is not None:  # (v2: matched to the explored run)
                    matched = grpo_run(
                        done, task, base_method=method, seed=seed, base=base, lr=g,
                        sigma=float(s_best) * unit, macs=target, sigma_name=s_best,
                    )["macs"]
            if method in g_best or stage2:
                continued(
                    done, task, base_method=method, name="control", seed=seed, base=base,
                    trial=chosen[method], target_macs=matched,
                )
            if stage2:
                continued(
                    done, task, base_method=method, name="stage2", seed=seed, base=base,
                    trial=chosen[method], target_macs=matched,
                )


def reported(recs, task, method):
    """The reported runs of a method (NAMES: an SFT method, or base+continuation), by seed."""
    out = {}
    for r in recs:
        parts = r["key"].split("/")
        if parts[0] != task or "test" not in r:
            continue
        base, _, name = parts[1].rpartition("+")
        if name in BASES:
            base, name = name, ""
        if name == "grpo":
            name = "grpo0" if parts[4] == "sigma0" else "grpo"
        # (v2's continuations are LVR's, keyed bare)
        full = (base or "lvr") + "+" + name if name else base
        if full == method:
            out[int(parts[2][4:])] = r

    return dict(sorted(out.items()))


def bootstrap(a, b, n, seed=0):
    """Paired difference of two methods' test correctness, {seed: [0/1]} each, over their common
    seeds -> (mean, low, high): a 95% interval from resampling seeds and test examples together."""
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


def tuning(recs):
    """The tuning runs' table, markdown: each tune_seed run's validation rows (accuracy), in file
    order; "" where no run tuned (one candidate each)."""
    names = [
        "with latents", "latents disabled", "dummy latents", "swapped latents", "oracle latents",
    ]
    lines = ["| run (validation) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in recs:
        if r["key"].split("/")[0] in tasks.split(",") and "val" in r:
            acc = [r["val"]["rows"].get(n, {}).get("accuracy") for n in names]
            cells = ["-" if a is None else f"{a:.3f}" for a in acc]
            lines.append(f"| {r['key']} | " + " | ".join(cells) + " |")

    return "\n".join(lines) if len(lines) > 2 else ""


def interval(recs, task, a, b):
    """a - b on their common seeds: "+0.050 [+0.010, +0.090]", or "-" without common seeds."""
    ra, rb = reported(recs, task, a), reported(recs, task, b)
    if not set(ra) & set(rb) or a == b:
        return "-"
    right = {s: own_row(r["test"]["rows"])["right"] for s, r in ra.items()}
    other = {s: own_row(r["test"]["rows"])["right"] for s, r in rb.items()}
    mean, low, high = bootstrap(right, other, resamples)
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def answer(recs):
    """The README's table, markdown: per task and SFT method, test accuracy (mean ± std over the
    reported seeds), its paired difference with plain SFT and with the pause control (95% intervals),
    and its own row minus its dummy row (box, crop: its swapped row; does the content matter?)."""
    lines = ["| task | method | seeds | accuracy | - plain SFT | - pause | own - dummy | value | "
             "produced |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks.split(","):
        for method in BASES:
            runs = reported(recs, task, method)
            if not runs:
                continue
            rows = [r["test"]["rows"] for r in runs.values()]
            acc = [own_row(x)["accuracy"] for x in rows]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            gap = [t[0]["accuracy"] - t[1]["accuracy"] for t in map(three_rows, rows) if t]
            lines.append(f"| {task} | {NAMES[method]} | {len(acc)} | {statistics.mean(acc):.3f} ± "
                         f"{sd:.3f} | {interval(recs, task, method, 'none')} | "
                         f"{interval(recs, task, method, 'pause')} | "
                         f"{f'{statistics.mean(gap):+.3f}' if gap else '-'} | "
                         f"{' | '.join(two_conditions(rows))} |")
    return "\n".join(lines)


def two_conditions(rows):
    """The seeds' test rows -> (value, produced) as table cells: the mean of oracle - dummy (box,
    crop: - swapped), and the mean of own - dummy over it (a ratio of means: a seed's own share is
    noise where its value is small); "-" without the rows, "none" where the value is under
    evaluate.MIN_VALUE."""
    have = [t for t in map(three_rows, rows) if t]  # (box, crop: the swapped row is the base)
    if not have:
        return "-", "-"
    value = statistics.mean(oracle["accuracy"] - base["accuracy"] for _, base, oracle in have)
    gap = statistics.mean(own["accuracy"] - base["accuracy"] for own, base, _ in have)
    return f"{value:+.3f}", f"{gap / value:.3f}" if value >= evaluate.MIN_VALUE else "none"


def summary(recs):
    """The tables, markdown: 1) per task and method, test accuracy over the reported seeds and the
    latent diagnostics; 2) the paired comparisons, each with its 95% interval."""
    rows = [
        "| task | method | accuracy: mean ± std (each seed) | hit rate | box IoU | "
        "latent-target distance | oracle | value | produced | compute (x LVR run) | flat groups |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs = [
        "| task | comparison | seeds | difference | 95% interval | real? |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks.split(","):
        lvr_macs = {s: r["macs"] for s, r in reported(recs, task, "lvr").items()}
        for method in NAMES:
            runs = reported(recs, task, method)
            if not runs:
                continue
            acc = [own_row(r["test"]["rows"])["accuracy"] for r in runs.values()]
            mean = statistics.mean(acc)
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            hits = [own_row(r["test"]["rows"])["hit_rate"] for r in runs.values()]
            ious = [own_row(r["test"]["rows"]).get("iou") for r in runs.values()]
            dist = [
                r["test"]["geometry"]["distance"]
                for r in runs.values()
                if r["test"].get("geometry")
            ]
            oracle = [three_rows(r["test"]["rows"])[2]["accuracy"] for r in runs.values()
                      if three_rows(r["test"]["rows"])]
            ratio = [r["macs"] / lvr_macs[s] for s, r in runs.items() if s in lvr_macs]
            flat = [x["flat_groups"] for r in runs.values() for x in r.get("grpo_log", [])]
            each = ", ".join(f"{x:.3f}" for x in acc)
            hits = [h for h in hits if h is not None]
            rows.append(
                f"| {task} | {NAMES[method]} | {mean:.3f} ± {sd:.3f} ({each}) | {avg(hits)} | "
                f"{avg([v for v in ious if v is not None])} | {avg(dist)} | {avg(oracle)} | "
                f"{' | '.join(two_conditions([r['test']['rows'] for r in runs.values()]))} | "
                f"{avg(ratio)} | {avg(flat)} |"
            )
        for a, b in COMPARISONS:
            ra, rb = reported(recs, task, a), reported(recs, task, b)
            if not set(ra) & set(rb):
                continue
            right = {s: own_row(r["test"]["rows"])["right"] for s, r in ra.items()}
            other = {s: own_row(r["test"]["rows"])["right"] for s, r in rb.items()}
            mean, low, high = bootstrap(right, other, resamples)
            real = "yes" if low > 0 or high < 0 else "no"
            pairs.append(
                f"| {task} | {NAMES[a]} - {NAMES[b]} | {len(set(ra) & set(rb))} | {mean:+.3f} | "
                f"[{low:+.3f}, {high:+.3f}] | {real} |"
            )

    return "\n".join(rows) + "\n\n" + "\n".join(pairs)


def tested(rec):
    """A reported run's test evaluations along its schedule -> [(step, test fields)], the last one
    at its end (test_every: one every so many steps; else the end alone)."""
    points = [(p["step"], p["test"]) for p in rec.get("checkpoints", [])]
    return points + [(max_iters, rec["test"])]


def along(recs):
    """The table of runs tested along their schedule (test_every), markdown: per task, method and
    step, the test accuracy (mean ± std over the seeds, and each seed) and LVR's latent-target
    distance; "" when no run was."""
    lines = ["| task | method | step | accuracy: mean ± std (each seed) | latent-target distance |",
             "|---|---|---|---|---|"]
    for task in tasks.split(","):
        for method in BASES:
            runs = [r for r in reported(recs, task, method).values() if r.get("checkpoints")]
            by_step = {}
            for r in runs:
                for step, test in tested(r):
                    by_step.setdefault(step, []).append(test)
            for step, tests in sorted(by_step.items()):
                acc = [own_row(t["rows"])["accuracy"] for t in tests]
                sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
                dist = [t["geometry"]["distance"] for t in tests if t.get("geometry")]
                lines.append(f"| {task} | {NAMES[method]} | {step} | {statistics.mean(acc):.3f} ± "
                             f"{sd:.3f} ({', '.join(f'{a:.3f}' for a in acc)}) | {avg(dist)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def draw_distance(recs, plt):
    """One point per LVR (seed, checkpoint) tested along its schedule: its latent-target distance
    against its test accuracy, one panel per task (the picture's name + _distance)."""
    names = [t for t in tasks.split(",")
             if any(r.get("checkpoints") for r in reported(recs, t, "lvr").values())]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.6), squeeze=False)
    for ax, task in zip(axes[0], names):
        for seed, r in reported(recs, task, "lvr").items():
            points = [(t["geometry"]["distance"], own_row(t["rows"])["accuracy"], step)
                      for step, t in tested(r) if t.get("geometry")]
            ax.plot([d for d, _, _ in points], [a for _, a, _ in points], "o-", alpha=0.7,
                    label=f"seed {seed}", markersize=4)
            for d, a, step in points[-1:]:
                ax.annotate(str(step), (d, a), fontsize=6)
        ax.set(title=f"{task}: LVR along its schedule", xlabel="latent-target distance (own)",
               ylabel="test accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = picture.replace(".png", "_distance.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


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
        recs = list(done.values())
        tables = [answer(recs), tuning(recs), summary(recs)]
        print("\n\n".join(t for t in tables if t))
        print(("\n" + along(recs)) if along(recs) else "")
        return draw(list(done.values()))

    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    for task in tasks.split(","):
        study(done, task)
        draw(list(done.values()))  # after every task: the picture so far


def draw(recs):
    """Validation accuracy against SFT steps (mean over the reported seeds, min-max shaded), one
    panel per task; each SFT method's test accuracy at its last step and each continuation's past
    it, at the compute it spent as a fraction of its run's (markers: mean and min-max over the
    seeds)."""
    try:
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
        return

    names = [t for t in tasks.split(",") if any(r["key"].startswith(t + "/") for r in recs)]
    fig, axes = plt.subplots(
        1, max(1, len(names)), figsize=(4.6 * max(1, len(names)), 3.6), squeeze=False
    )
    colours = {
        "none": "tab:gray", "lvr": "tab:blue", "mirage": "tab:green", "control": "tab:orange",
        "stage2": "tab:purple", "grpo0": "tab:brown", "grpo": "tab:red", "pause": "tab:olive",
        "livr": "tab:cyan", "lvrbn": "tab:pink", "box": "magenta", "crop": "black",
    }
    for ax, task in zip(axes[0], names):
        for method in BASES:
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
        # (SFT methods first, then continuations)
        markers = [m for m in NAMES if reported(recs, task, m)]
        for j, method in enumerate(markers):
            runs = reported(recs, task, method)
            if not runs:
                continue
            vals = [own_row(r["test"]["rows"])["accuracy"] for r in runs.values()]
            m = sum(vals) / len(vals)
            # (the compute, in SFT steps)
            x = max_iters * (1 + (budget if "+" in method else 0) + 0.02 * j)
            colour = colours[method.split("+")[-1]] if "+" in method else colours[method]
            ax.errorbar([x], [m], yerr=[[m - min(vals)], [max(vals) - m]], color=colour,
                        fmt={"none": "s", "lvr": "o", "mirage": "D", "pause": "v", "livr": "^",
                             "lvrbn": "P", "box": "X", "crop": "*"}[method.split("+")[0]],
                        label=NAMES[method] + " (test)")
        xlabel = f"SFT steps (batch {batch_size})" + (
            f"\ncontinuations: +{budget:g} of their run's compute"
            if any("+" in m for m in markers) else "")
        ax.set(title=task, xlabel=xlabel, ylim=(0, 1.02))
        ax.grid(alpha=0.3)

    axes[0][0].set_ylabel("accuracy")

    entries = {}  # label -> handle, from every panel (beside the last one)
    for ax in axes[0]:
        entries.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0][-1].legend(entries.values(), entries.keys(), fontsize=6, loc="center left",
                       bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(picture) or ".", exist_ok=True)
    fig.savefig(picture, dpi=110, bbox_inches="tight")
    print(f"wrote {picture}")
    draw_distance(recs, plt)


if __name__ == "__main__":
    cli.run(main)
