"""eval.py: the metrics on hand-made cases, the MMVP / V* loaders, and the script end to end."""
import json

import torch

import data
import eval as evaluation
import lvr
from test_grpo import IDS, IM_END
from test_train import SMALL, run
from helpers import photo


def test_latent_hits_by_hand():
    feats = torch.eye(4)  # four merged image tokens, orthogonal
    latents = torch.tensor([[0.1, 2.0, 0.0, 0.3],  # nearest token 1: inside the ROI
                            [0.0, 0.2, 0.0, 1.0]])  # nearest token 3: outside
    assert evaluation.latent_hits(latents, feats, [1, 2]) == 1
    assert evaluation.latent_hits(latents, feats, [0]) == 0
    assert evaluation.latent_hits(latents[:0], feats, [1]) == 0


def test_scoring_and_format():
    assert lvr.is_correct("(B)", "(b)") and lvr.is_correct("B. a cat", "B")
    assert not lvr.is_correct("(C)", "(b)")  # a wrong letter
    assert not lvr.is_correct("blue", "(b)")  # a word is not the letter b
    assert lvr.is_correct("<answer> Red </answer>", "red") and not lvr.is_correct("red", "green")
    s, lat, e = IDS.start, IDS.latent, IDS.end
    assert lvr.is_lvr_format([s, lat, lat, e, 20, IM_END], IDS, [IM_END], "\nred")
    assert not lvr.is_lvr_format([s, lat, e, IM_END], IDS, [IM_END], "")  # no answer
    assert not lvr.is_lvr_format([20, IM_END], IDS, [IM_END], "red")  # no latent span


def test_multiple_choice_loaders(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in (1, 2):
        photo(64, 48, i).save(imgs / f"{i}.jpg")
    csv_path = tmp_path / "Questions.csv"
    csv_path.write_text('Index,Question,Options,Correct Answer\n1,Is the door open?,(a) Open (b) Closed,(a)\n'
                        '2,"Which side, left or right?",(a) Left (b) Right,(b)\n')
    exs = evaluation.load_multiple_choice(str(csv_path), str(imgs))
    assert [e["answer"] for e in exs] == ["(a)", "(b)"]
    assert "Which side, left or right?\n(a) Left (b) Right" in exs[1]["question"] and exs[1]["images"][0].size == (64, 48)
    jsonl = tmp_path / "vstar.jsonl"
    jsonl.write_text(json.dumps({"image": "2.jpg", "question": "What colour is the cup?",
                                 "options": ["red", "blue"], "answer": "B"}) + "\n")
    (ex,) = evaluation.load_multiple_choice(str(jsonl), str(imgs))
    assert "(A) red\n(B) blue" in ex["question"] and ex["answer"] == "B" and ex["bbox"] is None
    jsonl.write_text(json.dumps({"image": "missing.jpg", "question": "q", "options": ["a"], "answer": "A"}) + "\n")
    try:
        evaluation.load_multiple_choice(str(jsonl), str(imgs))
        raise AssertionError("a missing image must raise")
    except data.InputError as err:
        assert "record 0" in str(err) and "missing.jpg" in str(err)


def test_eval_script_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    r = run("train_sft.py", *SMALL, "--max_iters", "2", "--eval_interval", "2", "--out_dir", out)
    assert r.returncode == 0, r.stderr
    r = run("eval.py", "--init_from", out, "--n_examples", "6", "--image_size", "112", "--max_pixels", "12544",
            "--max_new_tokens", "8", "--max_latent_steps", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    on = next(x for x in lines if x.startswith("with latents")).split()
    off = next(x for x in lines if x.startswith("latents disabled")).split()
    assert 0 <= float(on[2]) <= 1 and off[-1] == "-" and float(off[-2]) == 0.0
