"""evaluate.py: the metrics on hand-made cases, the MMVP / V* loaders, and the script end to end."""
import json

import pytest
import torch

import checkpoint
import data
import lvr
import evaluate as evaluation
import tasks
from cli import InputError
from helpers import IDS, IM_END
from launch import run_here
from helpers import SMALL
from helpers import photo


def test_latent_hits_by_hand():
    feats = torch.eye(4)  # four merged image tokens, orthogonal
    latents = torch.tensor([[0.1, 2.0, 0.0, 0.3],  # nearest token 1: inside the ROI
                            [0.0, 0.2, 0.0, 1.0]])  # nearest token 3: outside
    assert evaluation.latent_hits(latents, feats, [1, 2]) == 1
    assert evaluation.latent_hits(latents, feats, [0]) == 0
    assert evaluation.latent_hits(latents[:0], feats, [1]) == 0


def test_scoring_and_format():
    assert data.is_correct("(B)", "(b)") and data.is_correct("B. a cat", "B")
    assert not data.is_correct("(C)", "(b)")  # a wrong letter
    assert not data.is_correct("blue", "(b)")  # a word is not the letter b
    assert data.is_correct("<answer> Red </answer>", "red") and not data.is_correct("red", "green")
    s, lat, e = IDS.start, IDS.latent, IDS.end
    assert data.is_lvr_format([s, lat, lat, e, 20, IM_END], IDS, [IM_END], "\nred")
    assert not data.is_lvr_format([s, lat, e, IM_END], IDS, [IM_END], "")  # no answer
    assert not data.is_lvr_format([20, IM_END], IDS, [IM_END], "red")  # no latent span


def test_multiple_choice_loaders(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in (1, 2):
        photo(64, 48, i).save(imgs / f"{i}.jpg")
    csv_path = tmp_path / "Questions.csv"
    csv_path.write_text('Index,Question,Options,Correct Answer\n1,Is the door open?,(a) Open (b) Closed,(a)\n'
                        '2,"Which side, left or right?",(a) Left (b) Right,(b)\n')
    exs = data.load_multiple_choice(str(csv_path), str(imgs), 256)
    assert [e["answer"] for e in exs] == ["(a)", "(b)"]
    assert "Which side, left or right?\n(a) Left (b) Right" in exs[1]["question"]
    assert exs[1]["images"][0].size == (64, 48)
    jsonl = tmp_path / "vstar.jsonl"
    jsonl.write_text(json.dumps({"image": "2.jpg", "question": "What colour is the cup?",
                                 "options": ["red", "blue"], "answer": "B"}) + "\n")
    (ex,) = data.load_multiple_choice(str(jsonl), str(imgs), 256)
    assert "(A) red\n(B) blue" in ex["question"] and ex["answer"] == "B" and ex["bboxes"] == []
    # MMVP: questions 2k-1 and 2k are a pair; per pair counts a pair only when both are right
    assert exs[0]["pair"] == exs[1]["pair"] == 0
    pairs = evaluation.by_group(exs + [{**exs[0], "pair": 1}, {**exs[1], "pair": 1}],
                                [True, True, True, False], "pair")
    assert {k: all(v) for k, v in pairs.items()} == {0: True, 1: False}
    # V* as its files lay it out: text (options inside), label, category; else the category is the image's
    # folder
    (imgs / "relative_position").mkdir()
    photo(64, 48, 3).save(imgs / "relative_position" / "3.jpg")
    jsonl.write_text(json.dumps({"image": "2.jpg", "text": "Colour?\n(A) red\n(B) blue", "label": "A",
                                 "category": "direct_attributes", "question_id": 0}) + "\n"
                     + json.dumps({"image": "relative_position/3.jpg", "text": "Left?", "label": "B"}) + "\n")
    a, b = data.load_multiple_choice(str(jsonl), str(imgs), 256)
    assert (a["category"], a["answer"], b["category"]) == ("direct_attributes", "A", "relative_position")
    assert dict(evaluation.by_group([a, b], [True, False], "category")) == {"direct_attributes": [True],
                                                                             "relative_position": [False]}
    jsonl.write_text(json.dumps({"image": "missing.jpg", "question": "q", "options": ["a"],
                                 "answer": "A"}) + "\n")
    try:
        data.load_multiple_choice(str(jsonl), str(imgs), 256)
        raise AssertionError("a missing image must raise")
    except InputError as err:
        assert "record 0" in str(err) and "missing.jpg" in str(err)


def test_eval_script_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    r = run_here("train_sft.py", *SMALL, "--max_iters", "2", "--eval_interval", "2", "--out_dir", out)
    assert r.returncode == 0, r.stderr
    r = run_here("evaluate.py", "--init_from", out, "--n_examples", "6", "--image_size", "112",
                 "--max_pixels", "12544", "--max_new_tokens", "8", "--max_latent_steps", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    on = next(x for x in lines if x.startswith("with latents")).split()
    off = next(x for x in lines if x.startswith("latents disabled")).split()
    assert 0 <= float(on[2]) <= 1 and off[-1] == "-" and float(off[-2]) == 0.0
    # a cosine-trained model's latents are fed at the targets' norm: the norm line says that it sets it
    norm = next(x for x in lines if x.startswith("latent norm / target norm"))
    assert "set by the rescale" in norm and checkpoint.read_config(out).extra["latent_norm"] > 0
    assert any(x.startswith("target value: oracle - dummy = ") for x in lines)  # the two conditions
    assert any(x.startswith("produced: ") for x in lines)


def test_eval_on_an_lvr_json_file(tmp_path):
    """evaluate.py on an LVR JSON file: accuracy, latent steps per example and per span, hit rate on
    its bboxes."""
    out, imgs = str(tmp_path / "out"), tmp_path / "imgs"
    imgs.mkdir()
    recs = []
    for i in range(3):
        ex = tasks.synthetic_example(i, 112)
        ex["images"][0].save(imgs / f"{i}.png")
        recs.append(
            {
                "image": f"{i}.png",
                "bboxes": ex["bboxes"],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + ex["question"]},
                    {"from": "gpt", "value": "<lvr>\n" + ex["answer"]},
                ],
            }
        )
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # a few steps: every training answer opens with <|lvr_start|>, so the greedy model does too
    r = run_here("train_sft.py", *SMALL, "--max_iters", "30", "--eval_interval", "30", "--lr", "3e-3",
                 "--out_dir", out)
    assert r.returncode == 0, r.stderr
    r = run_here("evaluate.py", "--init_from", out, "--data_path", str(tmp_path / "val.jsonl"),
                 "--image_root", str(imgs), "--max_new_tokens", "8", "--max_latent_steps", "3")
    assert r.returncode == 0, r.stderr
    assert "min_pixels=3136 max_pixels=12544" in r.stdout  # a data file's images at the sizes it trained on
    on = next(x for x in r.stdout.splitlines() if x.startswith("with latents")).split()
    assert 0 <= float(on[2]) <= 1 and float(on[4]) > 0 and 0 <= float(on[5]) <= 1, r.stdout  # steps, hit rate
    spans = next(x for x in r.stdout.splitlines() if x.startswith("latent steps per span"))
    pieces = spans.split("): ")[1].split(";")[0].split(", ")
    counts = {int(k): int(v) for k, v in (p.split(": ") for p in pieces)}
    assert spans.endswith(f"{counts.get(3, 0)} of {sum(counts.values())} spans ran to the budget of 3")
    assert sum(k * v for k, v in counts.items()) == round(3 * float(on[4])) and max(counts) <= 3, r.stdout


def test_diagnostics_replace_the_latent_inputs(tmp_path):
    """dummy, swapped and oracle rows really feed the given vectors at the latent steps (and what follows a
    fed vector changes); the oracle's vectors are the training targets, the ROI's merged image tokens."""
    import tasks
    import vision
    from helpers import tiny_model
    model, tok, ids = tiny_model(tmp_path)
    prompt = tok.prompt
    tok.prompt = lambda q, n=(): prompt(q, n) + [ids.start]  # every row opens its span at once
    exs = [tasks.synthetic("test", i, 0, 112) for i in range(3)]
    decode = lvr.Decode(decoding="steps", lvr_steps=2, max_latent_steps=2, max_new_tokens=5, force_end=True,
                        end_metric="mse", end_threshold=0.1)
    def run(feed=None):
        return evaluation.evaluate(model, tok, ids, exs, decode, (3136, 12544), 2, feed)
    own = run()
    assert [len(v) for v in own["latents"]] == [2, 2, 2]
    dummy = torch.randn(2, model.cfg.hidden_size)
    assert all(torch.allclose(v, dummy) for v in run([dummy] * 3)["latents"])
    swapped = run(own["latents"][1:] + own["latents"][:1])["latents"]
    assert all(torch.allclose(a, b) for a, b in zip(swapped, own["latents"][1:] + own["latents"][:1]))
    first = run([dummy[:1]] * 3)["latents"]  # only the first latent given: the second is the model's own,
    # from another input
    assert all(torch.allclose(v[0], dummy[0]) and not torch.allclose(v[1], o[1], atol=1e-3)
               for v, o in zip(first, own["latents"]))
    targets = evaluation.targets_of(model, tok, ids, exs, (3136, 12544))
    for e, t in zip(exs, targets):
        pv, grid = vision.preprocess(e["images"][0], max_pixels=12544)
        with torch.no_grad():
            feats = model.visual(pv, grid)
        assert torch.allclose(t, feats[lvr.roi_indices(e["bboxes"][0], grid[0])].mean(0, keepdim=True),
                              atol=1e-5)
    oracle = run(targets)["latents"]
    assert all(torch.allclose(v[:len(t)], t, atol=1e-6) for v, t in zip(oracle, targets))


def test_geometry_by_hand():
    """Norm ratio and the in-order distance between own latents and targets, on the steps both have."""
    own = {"latents": [torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(0, 2), torch.tensor([[1.0, 0.0]])]}
    targets = [torch.tensor([[0.0, 4.0]]), torch.tensor([[1.0, 1.0]]), None]
    g = evaluation.geometry(own, targets)
    assert g.distance == 3.0 and g.target_norm == 4.0 and g.norm_ratio == (5.0 + 0.0) / 2 / 4.0
    assert evaluation.geometry(own, [None, None, None]) is None


def test_eval_saves_every_example_and_can_skip_the_diagnostics(tmp_path):
    out = str(tmp_path / "out")  # (a checkpoint of no training: what is checked is what evaluate.py writes)
    r = run_here("train_sft.py", *SMALL, "--max_iters", "1", "--eval_interval", "1", "--eval_examples", "0",
                 "--data_workers", "0", "--out_dir", out)
    assert r.returncode == 0, r.stderr
    common = ["evaluate.py", "--init_from", out, "--n_examples", "5", "--image_size", "112",
              "--max_pixels", "12544", "--max_new_tokens", "6", "--max_latent_steps", "2"]
    r = run_here(*common, "--save", str(tmp_path / "all.json"))
    assert r.returncode == 0, r.stderr
    full = json.load(open(tmp_path / "all.json"))
    assert {"with latents", "latents disabled"} <= set(full["rows"])
    for row in full["rows"].values():
        assert len(row["right"]) == 5 and row["accuracy"] == sum(row["right"]) / 5
    r = run_here(*common, "--diagnostics", "false", "--save", str(tmp_path / "own.json"))
    assert r.returncode == 0 and "latents disabled" not in r.stdout, r.stderr
    own = json.load(open(tmp_path / "own.json"))
    assert list(own["rows"]) == ["with latents"]
    assert own["rows"]["with latents"] == full["rows"]["with latents"]


def test_the_two_conditions_from_known_rows():
    """value = oracle - dummy, produced = (own - dummy) / value; under 0.02 of value, no share at all."""
    def rows(own, dummy, oracle):
        return {"with latents": {"accuracy": own}, "dummy latents": {"accuracy": dummy},
                "oracle latents": {"accuracy": oracle}}
    c = evaluation.conditions(rows(own=0.40, dummy=0.20, oracle=0.90))
    assert abs(c.value - 0.70) < 1e-9 and abs(c.produced - 0.2 / 0.7) < 1e-9
    assert c.lines() == ["target value: oracle - dummy = +0.700",
                         "produced: (own - dummy) / (oracle - dummy) = 0.286"]
    none = evaluation.conditions(rows(own=0.50, dummy=0.30, oracle=0.31))
    assert none.produced is None and "carries nothing to produce" in none.lines()[1]
    assert evaluation.conditions(rows(0.5, 0.2, 0.9)).produced > 0
    assert evaluation.conditions({"with latents": {"accuracy": 0.5}}) is None  # a pause checkpoint's rows


def test_a_checkpoint_is_scored_on_the_task_it_trained_on_unless_a_flag_says_otherwise(tmp_path):
    """train_sft records its task (task, hops, level, image size); evaluate.py defaults to it and
    says where each value came from; a task other than its own is said in one line, then scored."""
    out = str(tmp_path / "h")
    r = run_here("train_sft.py", *SMALL, "--task", "hops", "--hops", "3", "--max_iters", "1",
                 "--eval_interval", "1", "--eval_examples", "0", "--out_dir", out)
    assert r.returncode == 0, r.stderr
    common = ["--init_from", out, "--n_examples", "2", "--max_new_tokens", "4", "--diagnostics",
              "false"]
    r = run_here("evaluate.py", *common)
    assert r.returncode == 0, r.stderr
    assert "task=hops(checkpoint) hops=3(checkpoint) level=3(checkpoint) image_size=112(checkpoint)" \
        in r.stdout and "note:" not in r.stdout
    r = run_here("evaluate.py", *common, "--task", "colour")
    assert r.returncode == 0, r.stderr
    note = [x for x in r.stdout.splitlines() if x.startswith("note:")]
    assert note == [f"note: {out} was trained on task=hops hops=3 level=3 image_size=112; it is "
                    f"scored here on task=colour"]
    # (and scored, at the colour task's own settings: the checkpoint's go with its task)
    assert "task=colour(flag) hops=1(default) level=3(default) image_size=168(default)" in r.stdout
    assert "with latents" in r.stdout
    r = run_here("evaluate.py", *common, "--hops", "3")  # the flag agrees with the checkpoint
    assert "hops=3(flag)" in r.stdout and "note:" not in r.stdout


def test_unseen_maps_needs_a_vsp_file():
    recs = [{"text_input": "q", "image_input": "a.png", "map_desc": [[1, 0], [0, 2]]}, {"x": 1}]
    with pytest.raises(InputError, match="f.jsonl record 1 has none"):
        evaluation.unseen(recs, "f.jsonl")
    r = run_here("evaluate.py", "--unseen_maps", "true", "--init_from", "nowhere")
    assert r.returncode == 1 and "--unseen_maps true filters a VSP data file" in r.stderr
