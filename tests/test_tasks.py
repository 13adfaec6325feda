"""The synthetic tasks: each bbox covers the object the question names, the helper image is what it claims
to be, and --task reaches every script."""
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import tasks
from helpers import tiny_model
from launch import run_here
from helpers import SMALL

SEEDS = range(12)


def crop(img, bbox):
    w, h = img.size
    x0, y0, x1, y1 = (round(v * s) for v, s in zip(bbox, (w, h, w, h)))
    return np.asarray(img.crop((x0, y0, x1, y1)))


def drawn(shape, colour, bbox, size):
    """The named object alone, drawn where its bbox says: what the image must hold there."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    tasks.draw_shape(ImageDraw.Draw(img), shape, [round(v * size) for v in bbox], tasks.COLOURS[colour])
    return crop(img, bbox)


@pytest.mark.parametrize("task", ["colour", "search"])
def test_the_bbox_holds_the_named_shape_in_the_answer_colour(task):
    for s in SEEDS:
        e = tasks.synthetic("train", s, 1, task=task)
        shape = re.match(r"What colour is the (\w+)\?", e["question"]).group(1)
        size = e["images"][0].size[0]
        assert size == tasks.TASKS[task][1] and len(e["bboxes"]) == 1
        assert np.array_equal(crop(e["images"][0], e["bboxes"][0]),
                              drawn(shape, e["answer"], e["bboxes"][0], size))
    e = tasks.synthetic("train", 0, 1, task="search")
    colours = [tuple(c) for c in np.asarray(e["images"][0]).reshape(-1, 3)]
    counts = {k: sum(np.array_equal(c, v) for c in colours[::7]) for k, v in tasks.COLOURS.items()}
    # every colour worn: no colour prior
    assert e["images"][0].size == (336, 336) and min(counts.values()) > 0


def test_relation_bboxes_are_the_anchor_then_its_neighbour(tmp_path):
    for s in SEEDS:
        e = tasks.synthetic("train", s, 1, task="relation")
        asked = r"What colour is the shape (right of|left of|above|below) the (\w+) (\w+)\?"
        where, colour, shape = re.match(asked, e["question"]).groups()
        anchor, target = e["bboxes"]
        assert np.array_equal(crop(e["images"][0], anchor), drawn(shape, colour, anchor, 168))
        dx, dy = round((target[0] - anchor[0]) * 6), round((target[1] - anchor[1]) * 6)
        assert (dx, dy) == {"right of": (1, 0), "left of": (-1, 0), "above": (0, -1), "below": (0, 1)}[where]
        pixels = crop(e["images"][0], target).reshape(-1, 3)
        assert (pixels == tasks.COLOURS[e["answer"]]).all(1).any()  # the target wears the answer's colour
        assert e["assistant"].count("<lvr>") == 2
    model, tok, ids = tiny_model(tmp_path)
    lvr_rows = data.encode(e, tok, ids, data.LatentTargets("lvr"), pixels=(3136, 28224))
    mirage_rows = data.encode(e, tok, ids, data.LatentTargets("mirage", k=3), pixels=(3136, 28224))
    # two looks; one imagining
    assert lvr_rows["latent_slot"] == [0, 0] and mirage_rows["latent_slot"] == [0, 1, 2]


def test_imagine_bbox_is_where_the_moves_end_and_the_helper_draws_the_path():
    for s in SEEDS:
        e = tasks.synthetic("train", s, 1, task="imagine")
        img, helper = np.asarray(e["images"][0]), np.asarray(e["helper"]).astype(int)
        # the image, as the helper
        plain = np.asarray(e["images"][0].resize((112, 112), Image.BICUBIC)).astype(int)

        def darker(y, x):  # the helper drew black at (y, x) of the 168-px grid, where the image has none
            y, x = y * 2 // 3, x * 2 // 3
            return helper[y, x].sum() < plain[y, x].sum() - 150
        dot = np.argwhere((img == 0).all(-1)).mean(0)  # the black dot: the start cell
        r, c = int(dot[0] // 28), int(dot[1] // 28)
        for m in re.match(r"Start at the dot and move (.*)\. What", e["question"]).group(1).split(", "):
            step = (r + {"up": -1, "down": 1}.get(m, 0), c + {"left": -1, "right": 1}.get(m, 0))
            (pr, pc), (r, c) = (r, c), step
        x0, y0 = round(e["bboxes"][0][0] * 168), round(e["bboxes"][0][1] * 168)
        assert (y0 // 28, x0 // 28) == (r, c)  # the bbox is the cell where the moves end
        assert (img[y0 + 2, x0 + 2] == tasks.COLOURS[e["answer"]]).all()  # and the answer is its colour
        # the helper image is the imagined state: the end cell framed and the path drawn, on the same grid
        assert darker(r * 28 + 1, c * 28 + 14) and darker(r * 28 + 14, c * 28 + 1)  # the end cell framed,
        assert darker((r + pr) * 14 + 14, (c + pc) * 14 + 14)  # the path, on its last move into that cell
        assert helper.shape == (112, 112, 3) and np.abs(helper - plain).mean() < 40  # the same grid otherwise


def test_task_reaches_every_script(tmp_path):
    out = str(tmp_path / "out")
    r = run_here("train_sft.py", *SMALL, "--task", "relation", "--max_iters", "2", "--eval_interval", "2",
                 "--out_dir", out)
    assert r.returncode == 0 and "held-out accuracy" in r.stdout, r.stderr
    small = ["--image_size", "168", "--max_pixels", "28224"]
    ev = run_here("evaluate.py", "--init_from", out, "--task", "search", "--n_examples", "4", *small,
                  "--max_new_tokens", "6")
    gr = run_here("train_grpo.py", "--init_from", out, "--task", "imagine", "--batch_size", "2",
                  "--group_size", "2", "--max_iters", "1", "--max_new_tokens", "6", "--out_dir",
                  str(tmp_path / "g"))
    assert ev.returncode == 0 and "with latents" in ev.stdout, ev.stderr
    assert gr.returncode == 0 and "step 1:" in gr.stdout, gr.stderr
    saved = torch.load(str(tmp_path / "g" / "train_state.pt"), weights_only=True)["config"]
    assert (saved["image_size"], saved["max_pixels"]) == (168, 28224)  # 0: imagine's own side, unresized


def test_no_example_is_drawn_by_two_seeds_or_two_splits(monkeypatch):
    """The study's seeds (0 to 5) draw a run's stream and more (the first and last of each seed's block, and
    examples on the way): every id drawn is drawn by one (split, seed) alone; past the block is an error."""
    seen = {}

    def record(example_id, size):
        seen.setdefault(example_id, set()).add(owner)
        return example_id
    monkeypatch.setitem(tasks.TASKS, "colour", (record, 168))
    for split in tasks.SPLITS:
        for seed in [*range(6), 1337]:
            owner = (split, seed)
            for i in [*range(0, 40_000, 7), tasks.STREAM - 1]:
                tasks.synthetic(split, i, seed)
    assert all(len(owners) == 1 for owners in seen.values())
    assert len({o for owners in seen.values() for o in owners}) == len(tasks.SPLITS) * 7
    with pytest.raises(Exception, match="draws examples 0 to 999999"):
        tasks.synthetic("train", tasks.STREAM, 0)
    a, b = tasks.synthetic_example(tasks.example_id("train", 0, 1)), tasks.synthetic_example(
        tasks.example_id("train", 0, 2))  # (the real drawing: neighbouring seeds differ)
    assert not np.array_equal(np.asarray(a["images"][0]), np.asarray(b["images"][0]))


# -----------------------------------------------------------------------------
# VSP spatial planning

MAP = [[1, 0, -1],
       [0, 0, 0],
       [-1, 0, 2]]  # start top left, goal bottom right, holes at (0, 2) and (2, 0)


def test_vsp_plans_are_judged_by_simulation_as_mirage_judges_them():
    assert tasks.solves(MAP, "R D R D") and tasks.solves(MAP, "D R D R")  # two shortest plans, both right
    assert tasks.solves(MAP, "U L R D R D")  # moves off the edge are ignored
    assert not tasks.solves(MAP, "R R D D")  # (0, 2) is a hole: the walk ends there
    assert not tasks.solves(MAP, "D D R R")  # so is (2, 0)
    assert tasks.walk(MAP, "R R D D") == [(0, 1), (0, 2)]
    assert tasks.solves(MAP, "R D R D R")  # a move after the goal, off the edge: still on the goal
    assert not tasks.solves(MAP, "R D R D U")  # passes the goal and leaves it: not there at the end
    # case, separators
    assert tasks.solves(MAP, "r, d; r -> d") and tasks.solves(MAP, "RIGHT DOWN RIGHT DOWN")
    assert not tasks.solves(MAP, "") and not tasks.solves(MAP, "no plan")  # "no plan": N O P L A N -> L
    assert tasks.shortest_plan(MAP) == "DRDR"  # breadth first, moves tried in U D L R order
    # everywhere an answer is judged: eval's rows and GRPO's accuracy reward credit a plan that is not the
    # gold one
    assert data.is_correct("<answer>R D R D</answer>", "D R D R", MAP)
    assert not data.is_correct("D R", "D R", MAP)
    assert data.is_correct("The plan is \\boxed{R, D, R, D}.", "D R D R", MAP)
    import grpo
    assert grpo.accuracy_reward("R D R D", [], "D R D R", None, [], MAP) == 1.0
    assert grpo.accuracy_reward("R R D D", [], "D R D R", None, [], MAP) == 0.0


@pytest.mark.parametrize("level", [3, 4, 5, 6])
def test_vsp_maps_are_seeded_solvable_and_hold_mirages_hole_counts(level):
    import random
    holes = []
    for s in range(300):
        desc = tasks.vsp_map(random.Random(s), level)
        assert desc == tasks.vsp_map(random.Random(s), level)  # seeded
        flat = [v for row in desc for v in row]
        assert len(desc) == level and flat.count(1) == 1 and flat.count(2) == 1
        plan = tasks.shortest_plan(desc)
        assert plan and tasks.solves(desc, plan)  # always solvable, by its gold plan
        holes.append(flat.count(-1))
    table = tasks.VSP_HOLES[level]
    assert min(table) <= min(holes) and max(holes) <= max(table)
    want = sum(k * w for k, w in table.items()) / sum(table.values())  # Mirage's: 1.2, 2.5, 4.5, 6.4
    assert abs(sum(holes) / len(holes) - want) < 0.35
    e = tasks.synthetic("train", 0, 1, task="vsp", level=str(level))
    assert e["images"][0].size == (64 * level, 64 * level) and tasks.solves(e["map_desc"], e["answer"])
    x0, y0, x1, y1 = e["bboxes"][0]  # the box around every cell the plan walks through
    cells = [tasks.find(e["map_desc"], 1)] + tasks.walk(e["map_desc"], e["answer"])
    assert all(x0 * level <= c < x1 * level and y0 * level <= r < y1 * level for r, c in cells)


def test_vsp_maps_are_gymnasiums_own_render():
    from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv
    for s in range(3):
        e = tasks.synthetic("test", s, 0, task="vsp", level="3-6")
        desc = ["".join({1: "S", 2: "G", -1: "H", 0: "F"}[v] for v in row) for row in e["map_desc"]]
        env = FrozenLakeEnv(desc=desc, render_mode="rgb_array")
        env.reset(seed=0)
        assert np.array_equal(np.asarray(e["images"][0]), env.render())  # the elf at the start
        env.unwrapped.s = [k for k, ch in enumerate("".join(desc)) if ch == "G"][0]
        assert np.array_equal(np.asarray(e["helper"]), env.render())  # Mirage's helper: the elf on the gift
        env.close()


def test_vsp_without_gymnasium_is_one_line_naming_the_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "gymnasium.envs.toy_text.frozen_lake", None)
    with pytest.raises(data.InputError, match=r'pip install "gymnasium\[toy-text\]==0.29.1"'):
        tasks.synthetic("train", 0, 0, task="vsp")
    with pytest.raises(data.InputError, match="VSP levels are 3 to 6"):
        tasks.synthetic("train", 0, 0, task="vsp", level="7")


def test_vsp_reaches_every_script_and_a_mirage_file_of_its_maps_scores_alike(tmp_path):
    """--task vsp trains (LVR), evaluates and runs GRPO; the same maps written as a Mirage VSP file
    (PNG images, text_input with <image>, map_desc) make the same prompts, pixels and judgements, so
    evaluate.py scores the file as it scores the built-in maps."""
    import json
    exs = [tasks.synthetic("test", i, 1337, task="vsp") for i in range(4)]
    for i, e in enumerate(exs):
        e["images"][0].save(tmp_path / f"{i}.png")
    path = tmp_path / "vsp_test.jsonl"
    path.write_text("".join(json.dumps({"text_input": "<image>" + e["question"], "image_input": f"{i}.png",
                                        "map_desc": e["map_desc"]}) + "\n" for i, e in enumerate(exs)))
    read = [data.record_example(r, str(tmp_path), "r") for r in data.load_records(str(path))]
    _, tok, _ = tiny_model(tmp_path / "m")
    a, b = data.prompt_batch(exs, tok), data.prompt_batch(read, tok)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    for plan in ["U D L R", exs[0]["answer"], "R R", "D D L"]:
        assert [data.is_correct(plan, e["answer"], e["map_desc"]) for e in exs] == \
               [data.is_correct(plan, r["answer"], r["map_desc"]) for r in read]
    out = str(tmp_path / "out")
    r = run_here("train_sft.py", "--task", "vsp", "--batch_size", "2", "--max_iters", "2", "--eval_interval",
                 "2", "--eval_examples", "2", "--warmup_iters", "1", "--max_latents", "2", "--out_dir", out)
    assert r.returncode == 0 and "held-out accuracy" in r.stdout, r.stderr
    # 192 px -> 196: the processor's resize
    assert "first example: 1 image(s) of 49 merged tokens" in r.stdout
    common = ["--n_examples", "4", "--max_new_tokens", "8", "--diagnostics", "false"]
    built, filed, gr = (run_here(*argv) for argv in (
        ["evaluate.py", "--init_from", out, "--task", "vsp", *common, "--save", str(tmp_path / "a.json")],
        ["evaluate.py", "--init_from", out, "--data_path", str(path), "--image_root", str(tmp_path), *common,
         "--save", str(tmp_path / "b.json")],
        ["train_grpo.py", "--init_from", out, "--task", "vsp", "--batch_size", "2", "--group_size", "2",
         "--max_iters", "1", "--max_new_tokens", "6", "--out_dir", str(tmp_path / "g")]))
    assert built.returncode == 0 and filed.returncode == 0, built.stderr + filed.stderr
    rows = [json.loads((tmp_path / f).read_text())["rows"]["with latents"] for f in ("a.json", "b.json")]
    assert rows[0] == rows[1]
    assert gr.returncode == 0 and "step 1:" in gr.stdout, gr.stderr

    # a file of the test maps and three training maps, mixed: --unseen_maps keeps the test maps alone,
    # in order, and scores them as the file of test maps alone
    train = [tasks.synthetic("train", i, 1337, task="vsp") for i in range(3)]
    assert all(tasks.map_split(e["map_desc"]) == "train" for e in train)
    for i, e in enumerate(train):
        e["images"][0].save(tmp_path / f"t{i}.png")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    recs[1:1] = [{"text_input": "<image>" + e["question"], "image_input": f"t{i}.png",
                  "map_desc": e["map_desc"]} for i, e in enumerate(train[:2])]
    recs.append({"text_input": "<image>" + train[2]["question"], "image_input": "t2.png",
                 "map_desc": train[2]["map_desc"]})
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = run_here("evaluate.py", "--init_from", out, "--data_path", str(mixed), "--image_root",
                 str(tmp_path), "--unseen_maps", "true", *common, "--save", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    assert "--unseen_maps: kept 4 of 7 maps" in r.stdout and "VSP maps: 0 of 4" in r.stdout
    assert json.loads((tmp_path / "c.json").read_text())["rows"]["with latents"] == rows[1]


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_hops_chains_look_from_a_unique_anchor_to_an_occupied_last_cell(hops):
    """The question's chain, walked on the image: the anchor is the only object of its colour and shape;
    every cell of the chain is inside the grid and holds a shape; the answer is the last one's colour;
    hops + 1 bboxes in looking order; every colour is worn by as many objects (no colour prior)."""
    words = {"right of": (1, 0), "left of": (-1, 0), "above": (0, -1), "below": (0, 1)}
    for s in SEEDS:
        e = tasks.synthetic("train", s, 1, task="hops", hops=hops)
        img = np.asarray(e["images"][0])
        asked = r"What colour is ((?:the shape (?:right of|left of|above|below) )+)the (\w+) (\w+)\?"
        q = re.fullmatch(asked, e["question"])
        moves = re.findall(r"the shape (right of|left of|above|below) ", q.group(1))[::-1]  # anchor outwards
        colour, shape = q.group(2), q.group(3)
        assert len(moves) == hops and len(e["bboxes"]) == hops + 1
        assert e["assistant"].count("<lvr>") == hops + 1
        cells = [(round(b[0] * 6 - 4 / 28), round(b[1] * 6 - 4 / 28)) for b in e["bboxes"]]
        for (x, y), m, (nx, ny) in zip(cells, moves, cells[1:]):  # each look is the move from the last one
            assert (nx - x, ny - y) == words[m] and 0 <= nx < 6 and 0 <= ny < 6
        assert len(set(cells)) == hops + 1  # a chain never walks back onto a cell it looked at
        anchor = e["bboxes"][0]
        assert np.array_equal(crop(e["images"][0], anchor), drawn(shape, colour, anchor, 168))

        def wearing(x, y):  # the colour of the shape at the centre of cell (x, y), or None (background)
            c = img[y * 28 + 14, x * 28 + 14 + 2]
            return next((k for k, v in tasks.COLOURS.items() if tuple(c) == v), None)
        worn = [wearing(x, y) for y in range(6) for x in range(6)]
        assert all(wearing(x, y) for x, y in cells) and wearing(*cells[-1]) == e["answer"]
        assert {worn.count(c) for c in tasks.COLOURS} == {2}  # two of each colour, the answer's included
        same = [(x, y) for y in range(6) for x in range(6) if wearing(x, y) == colour and (x, y) != cells[0]]
        def cell(x, y):  # an object's 20 px box in its 28 px cell
            return [x / 6 + 4 / 168, y / 6 + 4 / 168, x / 6 + 24 / 168, y / 6 + 24 / 168]

        assert all(not np.array_equal(crop(e["images"][0], cell(x, y)), drawn(shape, colour, anchor, 168))
                   for x, y in same)  # the anchor's colour on another object: another shape


def test_hops_are_seeded_and_disjoint_across_splits_and_seeds():
    """The same id draws the same example; two seeds or two splits draw different ones (ids are
    tasks.example_id's, tested above for every task); another chain length is another question."""
    a = tasks.synthetic("train", 3, 1, task="hops", hops=3)
    again = tasks.synthetic("train", 3, 1, task="hops", hops=3)
    assert a["question"] == again["question"] and np.array_equal(np.asarray(a["images"][0]),
                                                                 np.asarray(again["images"][0]))
    others = [tasks.synthetic(sp, 3, sd, task="hops", hops=3)
              for sp, sd in [("train", 2), ("test", 1), ("eval", 1)]]
    assert all(not np.array_equal(np.asarray(a["images"][0]), np.asarray(o["images"][0])) for o in others)
