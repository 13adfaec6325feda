"""study.py's quick mode end to end: every stage runs, one JSON line per run, a rerun redoes nothing."""
import json

from test_train import run


def test_study_quick_runs_every_stage_and_resumes(tmp_path):
    args = ["study.py", "--quick", "true", "--results", str(tmp_path / "r.jsonl"), "--picture", str(tmp_path / "s.png"),
            "--work_dir", str(tmp_path / "runs")]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    keys = {x["key"] for x in recs}
    for method in ("none", "lvr", "mirage"):
        assert {f"relation/{method}/seed0/lr0.001", f"relation/{method}/seed1/lr0.001"} <= keys  # tuned, reported
    reported = [x for x in recs if "/seed1/" in x["key"]]
    assert all({"with latents", "latents disabled"} <= set(x["test"]) for x in reported)
    grpo = next(x for x in recs if x["key"] == "relation/grpo/seed1/lr2e-05")
    assert grpo["control"]["steps"] >= 1 and "with latents" in grpo["control"]["test"] and grpo["grpo_log"]
    assert all(x["curve"] for x in recs if "curve" in x) and (tmp_path / "s.png").stat().st_size > 0
    r = run(*args)  # resumes: every run is in the file already
    assert r.returncode == 0 and len(open(tmp_path / "r.jsonl").readlines()) == len(recs), r.stderr
    r = run(*args, "--report", "true")  # the table, from the file alone
    assert r.returncode == 0 and "| relation | LVR + SFT (control) |" in r.stdout, r.stderr
    row = next(x for x in r.stdout.splitlines() if x.startswith("| relation | LVR |"))
    lvr = next(x for x in recs if x["key"] == "relation/lvr/seed1/lr0.001")
    assert f"{lvr['test']['with latents']['accuracy']:.3f} ± 0.000" in row
