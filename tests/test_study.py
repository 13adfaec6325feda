"""study.py's quick mode end to end: every stage runs, one JSON line per run, the continuations matched on
compute, a rerun redoes nothing, and the tables come from the file alone."""
import json

import study
from test_train import run


def test_study_quick_runs_every_stage_and_resumes(tmp_path, capsys):
    args = ["study.py", "--quick", "true", "--results", str(tmp_path / "r.jsonl"), "--picture", str(tmp_path / "s.png"),
            "--work_dir", str(tmp_path / "runs")]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    recs = {x["key"]: x for x in map(json.loads, open(tmp_path / "r.jsonl"))}
    tuned = {"relation/lvr/seed0/lr0.001",
             "relation/grpo/seed0/lr2e-05/sigma0", "relation/grpo/seed0/lr2e-05/sigma1"}
    shown = {"relation/lvr/seed1/lr0.001",
             "relation/grpo/seed1/lr2e-05/sigma0", "relation/grpo/seed1/lr2e-05/sigma1", "relation/control/seed1",
             "relation/stage2/seed1"}
    assert set(recs) == tuned | shown
    assert all("val" in recs[k] and "test" not in recs[k] for k in tuned)  # tuning never sees the test split
    assert all(len(recs[k]["test"]["rows"]["with latents"]["right"]) == 4 for k in shown)
    # the reported SFT runs get the diagnostics (a 4-step model makes no latents to swap: those rows need them)
    assert "latents disabled" in recs["relation/lvr/seed1/lr0.001"]["test"]["rows"]
    assert set(recs["relation/control/seed1"]["test"]["rows"]) == {"with latents"}
    # the control and stage 2 continue the LVR run up to the explored GRPO run's compute, within 5%
    explored = recs["relation/grpo/seed1/lr2e-05/sigma1"]
    assert explored["latent_sigma"] > 0 and explored["steps"] >= 2 and explored["grpo_log"]
    for name in ("control", "stage2"):
        assert abs(recs[f"relation/{name}/seed1"]["macs"] / explored["macs"] - 1) < 0.05
    assert recs["relation/grpo/seed1/lr2e-05/sigma0"]["latent_sigma"] == 0.0
    assert (tmp_path / "s.png").stat().st_size > 0
    study.main(args[1:])  # resumes (in this process: no new one to start): every run is in the file already
    assert len(open(tmp_path / "r.jsonl").readlines()) == len(recs)
    capsys.readouterr()
    study.main([*args[1:], "--report", "true"])  # the tables, from the file alone
    out = capsys.readouterr().out
    assert "| relation | LVR + stage 2 - LVR + teacher-forced (control) | 1 |" in out
    row = next(x for x in out.splitlines() if x.startswith("| relation | LVR |"))
    acc = recs["relation/lvr/seed1/lr0.001"]["test"]["rows"]["with latents"]["accuracy"]
    assert f"{acc:.3f} ± 0.000 ({acc:.3f})" in row


def test_bootstrap_interval_covers_the_paired_difference():
    """A paired difference of +0.25 on every seed: the mean is exact, the interval holds it and excludes 0;
    a difference of 0 on average gives an interval around 0."""
    a = {s: [1, 1, 0, 0] * 25 for s in range(5)}
    b = {s: [1, 0, 0, 0] * 25 for s in range(5)}
    mean, low, high = study.bootstrap(a, b, 2000)
    assert mean == 0.25 and 0 < low < 0.25 < high
    c = {s: [0, 1, 0, 0] * 25 for s in range(5)}
    mean, low, high = study.bootstrap(b, c, 2000)
    assert mean == 0 and low < 0 < high
    # seeds that differ: the spread between them widens the interval
    d = {s: ([1] * 100 if s % 2 else [0] * 100) for s in range(6)}
    e = {s: [0] * 100 for s in range(6)}
    _, low, high = study.bootstrap(d, e, 2000)
    assert high - low > 0.3


def test_the_committed_study_matched_every_control_on_compute():
    """In assets/study.jsonl, every control and stage-2 run spent within 5% of the compute of the explored
    GRPO run of its task and seed."""
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "assets", "study.jsonl")
    recs = {x["key"]: x for x in map(json.loads, open(path))}
    explored = {}  # (task, seed) -> the explored GRPO run (latent_sigma > 0) of a reported seed
    for key, x in recs.items():
        task, name, seed = key.split("/")[:3]
        if name == "grpo" and x["latent_sigma"] > 0 and "test" in x:
            explored[task, seed] = x
    matched = 0
    for key, x in recs.items():
        task, name, seed = key.split("/")[:3]
        if name in ("control", "stage2") and seed != "seed0":
            assert abs(x["macs"] / explored[task, seed]["macs"] - 1) < 0.05, key
            matched += 1
    assert matched == 2 * len(explored) > 0
