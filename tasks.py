"""
What an example is, and the built-in world that makes them, so nothing is ever downloaded.

An example is a dict: images (PIL), question, answer, and for training: assistant (the answer with
one `<lvr>` placeholder per latent span, where the latent steps go), bboxes (one per `<lvr>`,
normalised [x0, y0, x1, y1]: the image region each span reconstructs, LVR's targets), bbox_images
(each bbox's image index, with several images) and helper (the helper image Mirage's latents
reconstruct). A VSP example also has map_desc, the map its plans are judged on.

Here: seeded tasks drawn with PIL (and VSP's maps, drawn by gymnasium), then a tiny byte-level BPE
tokenizer and Qwen2.5-VL-shaped config, written as a real checkpoint so the default run loads
through exactly the same code as an official one.

The tokenizer is trained in a fraction of a second on a small corpus, so it can encode any text;
it holds every Qwen special token, and the checkpoint code looks them up by string exactly as it
does for the real tokenizer. Seeds: each split (train, eval, grpo, test) and each seed within it
draws from its own block of ids, so held-out examples never meet training ones and two seeds never
share an example.
"""
import hashlib
import os
import random

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import lvr
import qwen
from cli import InputError

LATENT_SPECIAL = list(lvr.LVR_TOKENS.values()) + list(lvr.MIRAGE_TOKENS.values())

# -----------------------------------------------------------------------------
# the synthetic task: one small object among distractors, a question about it, its bbox

COLOURS = {
    "red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20),
    "purple": (140, 50, 180), "orange": (245, 130, 20),
}
SHAPES = ["circle", "square", "triangle"]


def draw_shape(d, shape, box, fill):
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "diamond":
        d.polygon(
            [((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)],
            fill=fill,
        )
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def cell_box(k, n, cell=28, obj=20):
    """The box of an object centred in cell k (row-major) of an n x n grid of `cell`-pixel cells."""
    x, y = (k % n) * cell + (cell - obj) // 2, (k // n) * cell + (cell - obj) // 2
    return x, y, x + obj, y + obj


def example(img, question, answer, boxes, size, helper):
    """The example dict (data.py's format): one span per box, boxes normalised."""
    return {
        "images": [img],
        "question": question,
        "assistant": "<lvr>\n" * len(boxes) + answer,
        "answer": answer,
        "bboxes": [[v / size for v in b] for b in boxes],
        "helper": helper,
    }


def zoom(img, box, size, pad=10):
    """Mirage's helper image: the region around `box`, enlarged to 112 px."""
    x0, y0, x1, y1 = box
    return img.crop(
        (max(0, x0 - pad), max(0, y0 - pad), min(size, x1 + pad), min(size, y1 + pad))
    ).resize((112, 112), Image.BICUBIC)


def synthetic_example(seed, size=168, n_objects=5, obj=20, cell=28):
    """A seeded image of small shapes and a question answerable only by looking at one of them.

    The shapes sit centred in distinct cells of a 28-pixel grid, the size of one merged image
    token, so the object the question names is exactly one token. "What colour is the <shape>?":
    that shape occurs once; the answer is its colour (one word), the bbox its box. The helper
    image (Mirage) is the object's neighbourhood, enlarged.
    """
    rng = random.Random(seed)
    n = size // cell
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    shape = rng.choice(SHAPES)
    objects = [(shape, rng.choice(list(COLOURS)))]
    objects += [
        (rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(COLOURS)))
        for _ in range(n_objects - 1)
    ]
    boxes = [cell_box(k, n, cell, obj=obj) for k in rng.sample(range(n * n), n_objects)]
    for (s, c), box in zip(objects, boxes):
        draw_shape(d, shape=s, box=box, fill=COLOURS[c])
    colour = objects[0][1]
    helper = zoom(img, box=boxes[0], size=size, pad=obj // 2)
    return example(
        img, question=f"What colour is the {shape}?", answer=colour, boxes=boxes[:1], size=size,
        helper=helper,
    )


def search_example(seed, size=336, n_objects=18):
    """Fine-grained search, as in V*: 18 small shapes on a 336-px image (144 merged tokens), one of
    them the only <shape>; every colour is worn by three objects, so two distractors share the
    answer's colour and the image's colours say nothing about it. "What colour is the <shape>?": one
    token among 144."""
    rng = random.Random(seed)
    n, shapes = size // 28, SHAPES + ["diamond"]
    shape = rng.choice(shapes)
    colours = [c for c in COLOURS for _ in range(n_objects // len(COLOURS))]
    rng.shuffle(colours)
    objects = [(shape, colours[0])] + [
        (rng.choice([s for s in shapes if s != shape]), c) for c in colours[1:]
    ]
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    boxes = [cell_box(k, n) for k in rng.sample(range(n * n), n_objects)]
    for (s, c), box in zip(objects, boxes):
        draw_shape(d, shape=s, box=box, fill=COLOURS[c])
    return example(
        img, question=f"What colour is the {shape}?", answer=colours[0], boxes=boxes[:1], size=size,
        helper=zoom(img, boxes[0], size),
    )


MOVES = {"right": (0, 1), "left": (0, -1), "above": (-1, 0), "below": (1, 0)}


def relation_example(seed, size=168, n_objects=7):
    """Two looks: "What colour is the shape right of (left of, above, below) the <colour> <shape>?"
    The anchor is the only object of its colour and shape; the target fills the next cell that way.
    Two latent spans, the anchor's then the target's: the order in which one has to look (one span
    per bbox, as the LVR data format pairs them)."""
    rng = random.Random(seed)
    n = size // 28
    word = rng.choice(list(MOVES))
    dr, dc = MOVES[word]
    a = rng.choice([k for k in range(n * n) if 0 <= k // n + dr < n and 0 <= k % n + dc < n])
    t = a + dr * n + dc
    anchor = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
    others = [(s, c) for s in SHAPES for c in COLOURS if (s, c) != anchor]
    objects = [anchor] + [rng.choice(others) for _ in range(n_objects - 1)]
    cells = [a, t] + rng.sample([k for k in range(n * n) if k not in (a, t)], n_objects - 2)
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    boxes = [cell_box(k, n) for k in cells]
    for (s, c), box in zip(objects, boxes):
        draw_shape(d, shape=s, box=box, fill=COLOURS[c])
    where = "right of" if word == "right" else "left of" if word == "left" else word
    helper = zoom(img, (min(boxes[0][0], boxes[1][0]), min(boxes[0][1], boxes[1][1]),
                        max(boxes[0][2], boxes[1][2]), max(boxes[0][3], boxes[1][3])), size)
    return example(
        img, question=f"What colour is the shape {where} the {anchor[1]} {anchor[0]}?",
        answer=objects[1][1], boxes=boxes[:2], size=size, helper=helper,
    )


def chain(rng, n, hops):
    """A unique anchor cell and `hops` moves from it, each into a cell inside the n x n grid that
    the chain has not visited -> (cells, the cells in looking order: anchor first; moves, their
    words)."""
    while True:  # (a chain that walks into a dead end is drawn again)
        cells, moves = [rng.randrange(n * n)], []
        for _ in range(hops):
            r, c = divmod(cells[-1], n)
            options = [w for w, (dr, dc) in MOVES.items()
                       if 0 <= r + dr < n and 0 <= c + dc < n and (r + dr) * n + c + dc not in cells]
            if not options:
                break
            word = rng.choice(options)
            moves.append(word)
            cells.append((r + MOVES[word][0]) * n + c + MOVES[word][1])
        if len(moves) == hops:
            return cells, moves


def hops_example(seed, size=168, hops=1, n_objects=12):
    """A chain of looks: "What colour is the shape right of the shape above the red circle?" (hops
    2). The anchor is the only object of its colour and shape; every cell of the chain holds a
    shape; the answer is the last one's colour. Every colour is worn by two objects, so the image's
    colours say nothing about the answer (as search's). hops + 1 latent spans, one per look in the
    order one has to look: the anchor, then each hop's cell (relation is hops 1, without the
    balanced colours)."""
    rng = random.Random(seed)
    n = size // 28
    cells, moves = chain(rng, n, hops)
    cells += rng.sample([k for k in range(n * n) if k not in cells], n_objects - len(cells))
    colours = [c for c in COLOURS for _ in range(n_objects // len(COLOURS))]
    rng.shuffle(colours)
    anchor = rng.choice(SHAPES)
    # (the anchor's colour on any other object comes in another shape: the anchor is unique)
    shapes = [anchor] + [
        rng.choice([s for s in SHAPES if s != anchor or c != colours[0]]) for c in colours[1:]
    ]
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    boxes = [cell_box(k, n) for k in cells]
    for s, c, box in zip(shapes, colours, boxes):
        draw_shape(d, shape=s, box=box, fill=COLOURS[c])
    look = boxes[:hops + 1]
    where = "".join(f"the shape {'right of' if w == 'right' else 'left of' if w == 'left' else w} "
                    for w in reversed(moves))
    helper = zoom(img, (min(b[0] for b in look), min(b[1] for b in look),
                        max(b[2] for b in look), max(b[3] for b in look)), size)
    return example(
        img, question=f"What colour is {where}the {colours[0]} {anchor}?", answer=colours[hops],
        boxes=look, size=size, helper=helper,
    )


def imagine_example(seed, size=168):
    """Mental imagery (the VSP family of the Mirage paper): a 6 x 6 grid of coloured cells, one
    merged token each, a black dot in one; "Start at the dot and move right, down, down. What colour
    is the cell where you stop?" The image never shows where the moves end: the helper image does
    (the path drawn, the end cell framed), and the LVR bbox is that cell."""
    rng = random.Random(seed)
    n = size // 28
    grid = [rng.choice(list(COLOURS)) for _ in range(n * n)]
    r, c = rng.randrange(n), rng.randrange(n)
    path, moves = [(r, c)], []
    for _ in range(rng.randint(2, 4)):
        word = rng.choice(
            [m for m, (dr, dc) in MOVES.items() if 0 <= r + dr < n and 0 <= c + dc < n]
        )
        r, c = r + MOVES[word][0], c + MOVES[word][1]
        path.append((r, c))
        moves.append({"above": "up", "below": "down"}.get(word, word))

    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    for k, col in enumerate(grid):
        d.rectangle(cell_box(k, n, obj=26), fill=COLOURS[col])
    (r0, c0), (r1, c1) = path[0], path[-1]
    d.ellipse((c0 * 28 + 9, r0 * 28 + 9, c0 * 28 + 19, r0 * 28 + 19), fill=(0, 0, 0))
    helper = img.copy()
    h = ImageDraw.Draw(helper)
    h.line([(cc * 28 + 14, rr * 28 + 14) for rr, cc in path], fill=(0, 0, 0), width=3)
    h.rectangle((c1 * 28, r1 * 28, c1 * 28 + 27, r1 * 28 + 27), outline=(0, 0, 0), width=3)
    return example(
        img,
        question=f"Start at the dot and move {', '.join(moves)}. What colour is the cell where you stop?",
        answer=grid[r1 * n + c1], boxes=[cell_box(r1 * n + c1, n)], size=size,
        helper=helper.resize((112, 112), Image.BICUBIC),
    )


# -----------------------------------------------------------------------------
# VSP spatial planning, Mirage's own task: FrozenLake maps drawn by gymnasium, plans judged by
# walking them

# how many holes Mirage's 400 test maps have at each level (n x n cells), as weights: maps are drawn
# from it
VSP_HOLES = {3: {0: 30, 1: 31, 2: 27, 3: 11, 4: 1},
             4: {0: 4, 1: 20, 2: 27, 3: 27, 4: 14, 5: 6, 6: 2},
             5: {1: 2, 2: 10, 3: 20, 4: 25, 5: 17, 6: 13, 7: 10, 8: 1, 9: 1, 13: 1},
             6: {2: 1, 3: 10, 4: 6, 5: 17, 6: 21, 7: 13, 8: 14, 9: 12, 10: 4, 12: 1, 13: 1}}
VSP_MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
START, GOAL, HOLE, ICE = 1, 2, -1, 0  # Mirage's map_desc values
VSP_QUESTION = "Plan the moves from the elf to the gift without falling into a hole: U, D, L or R."
VSP_INSTALL = 'pip install "gymnasium[toy-text]==0.29.1"'


def find(desc, value):
    """(row, col) of the first cell of `value` in a map (rows of START, GOAL, HOLE, ICE)."""
    return next((r, c) for r, row in enumerate(desc) for c, v in enumerate(row) if v == value)


def walk(desc, plan):
    """The cells a plan visits, by Mirage's rule (its simulate_vsp): every U/D/L/R of the
    upper-cased plan in order, anything else skipped; a move off the edge is ignored; entering a
    hole ends the walk there."""
    (r, c), cells = find(desc, START), []
    for move in plan.upper():
        if move not in VSP_MOVES:
            continue
        dr, dc = VSP_MOVES[move]
        if 0 <= r + dr < len(desc) and 0 <= c + dc < len(desc[0]):
            r, c = r + dr, c + dc
            cells.append((r, c))
            if desc[r][c] == HOLE:
                break

    return cells


def solves(desc, plan):
    """Mirage's judgement of a plan: it never enters a hole and it ends on the goal."""
    cells = walk(desc, plan) or [find(desc, START)]
    return desc[cells[-1][0]][cells[-1][1]] == GOAL


def shortest_plan(desc):
    """A shortest plan (breadth-first, moves tried in U D L R order), or None when the goal is cut
    off."""
    n, start = len(desc), find(desc, START)
    came = {start: ""}
    frontier = [start]
    for r, c in frontier:
        if desc[r][c] == GOAL:
            return came[(r, c)]
        for move, (dr, dc) in VSP_MOVES.items():
            nxt = (r + dr, c + dc)
            if (
                0 <= nxt[0] < n
                and 0 <= nxt[1] < n
                and nxt not in came
                and desc[nxt[0]][nxt[1]] != HOLE
            ):
                came[nxt] = came[(r, c)] + move
                frontier.append(nxt)

    return None


def map_split(desc):
    """The split a map belongs to, from its description alone: test or eval (a tenth each) or train
    (GRPO's prompts too). Level 3 has about 3,100 distinct solvable maps, so a training stream drawn
    from all of them holds most of any test set; split by identity, no eval or test map is ever
    trained on."""
    key = ";".join(",".join(map(str, row)) for row in desc)
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return {0: "test", 1: "eval"}.get(bucket, "train")


def vsp_map(rng, n, split="train"):
    """A random solvable n x n map of a split (map_split; grpo draws training maps): start, goal,
    and a hole count drawn as Mirage's test maps have them."""
    want = "train" if split == "grpo" else split
    while True:
        holes = rng.choices(list(VSP_HOLES[n]), weights=list(VSP_HOLES[n].values()))[0]
        start, goal, *pits = rng.sample(range(n * n), holes + 2)
        desc = [[ICE] * n for _ in range(n)]
        desc[start // n][start % n], desc[goal // n][goal % n] = START, GOAL
        for k in pits:
            desc[k // n][k % n] = HOLE
        if shortest_plan(desc) is not None and map_split(desc) == want:
            return desc


def draw_map(desc, player=None):
    """The map as Mirage's images show it: gymnasium 0.29.1's FrozenLake `rgb_array` render, 64 px a
    cell, the elf at `player` (row, col; default the start). gymnasium is imported here only."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # (pygame draws off screen, and quietly)
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv
        letters = {START: "S", GOAL: "G", HOLE: "H", ICE: "F"}
        env = FrozenLakeEnv(
            desc=["".join(letters[v] for v in row) for row in desc], render_mode="rgb_array"
        )
        env.reset(seed=0)
        r, c = player or find(desc, START)
        env.unwrapped.s = r * len(desc) + c
        img = Image.fromarray(env.render())
        env.close()
    except ImportError:  # (gymnasium, or its pygame: DependencyNotInstalled is an ImportError)
        raise InputError(f"--task vsp draws its maps with gymnasium: {VSP_INSTALL}") from None

    return img


def draw_path(desc, plan):
    """A Mirage helper candidate: the map with the plan drawn on it (a line through the cells it
    walks)."""
    img = draw_map(desc)
    cells = [find(desc, START)] + walk(desc, plan)
    ImageDraw.Draw(img).line(
        [(c * 64 + 32, r * 64 + 32) for r, c in cells], fill=(200, 30, 30), width=8
    )
    return img


VSP_TARGETS = (
    "box+goal", "box+path", "moves+goal", "moves+path",
)  # LVR's regions + Mirage's helper


def vsp_example(seed, level=3, vsp_targets=VSP_TARGETS[0], split="train"):
    """A VSP map of `level` x `level` cells, drawn at 64 px a cell (192 px at level 3), and a
    shortest plan. The answer is the plan ("R D D"), judged by simulation against map_desc, so any
    plan that reaches the goal is right. `vsp_targets` (LVR's regions + Mirage's helper): box, one
    span over the box around the cells the plan walks through (its start and goal included), or
    moves, one span per move over the cell it enters; goal, the map with the elf moved to the goal, or
    path, the map with the plan drawn on it. `split`: the example's, whose maps it draws from
    (map_split)."""
    rng = random.Random(seed)
    desc = vsp_map(rng, level, split)
    plan = shortest_plan(desc)
    regions, helper = vsp_targets.split("+")
    cells = [find(desc, START)] + walk(desc, plan)
    answer = " ".join(plan)
    if regions == "box":
        rows, cols = [r for r, _ in cells], [c for _, c in cells]
        boxes = [
            [min(cols) / level, min(rows) / level, (max(cols) + 1) / level, (max(rows) + 1) / level]
        ]
        assistant = "<lvr>\n" + answer
    else:  # one look per move, at the cell it enters, before the move is written
        boxes = [[c / level, r / level, (c + 1) / level, (r + 1) / level] for r, c in cells[1:]]
        assistant = " ".join(f"<lvr>{m}" for m in plan)

    return {
        "images": [draw_map(desc)],
        "question": VSP_QUESTION,
        "assistant": assistant,
        "answer": answer,
        "bboxes": boxes,
        "map_desc": desc,
        "helper": draw_map(desc, find(desc, GOAL)) if helper == "goal" else draw_path(desc, plan),
    }


def vsp_levels(levels):
    """--level "3", "3,4" or "3-6" -> the list of levels a VSP example draws from."""
    try:
        lo, _, hi = levels.partition("-")
        out = list(range(int(lo), int(hi) + 1)) if hi else [int(v) for v in levels.split(",")]
    except ValueError:
        out = []

    if not out or not set(out) <= set(VSP_HOLES):
        raise InputError(
            f"--level {levels!r}: VSP levels are 3 to 6: one (3), a list (3,4) or a range (3-6)"
        )

    return out


TASKS = {
    "colour": (synthetic_example, 168),
    "search": (search_example, 336),
    "relation": (relation_example, 168),
    "imagine": (imagine_example, 168),
    "hops": (hops_example, 168),
    "vsp": (vsp_example, 0),
# the example function and its image side (0: drawn by a library at its own size, resized as a
# file's)
}
STREAM = 10**6  # examples a seed can draw from each split: seeds own disjoint blocks of example ids
SPLITS = {"train": 0, "eval": 10**12, "grpo": 2 * 10**12, "test": 3 * 10**12}  # disjoint id ranges


def example_id(split, i, seed):
    """The id (the PIL drawing's random seed) of example i of a seed's stream in a split. Every
    (split, seed) owns its block of STREAM ids, so two seeds, or two splits, never draw the same
    example."""
    if not 0 <= i < STREAM or not 0 <= seed < 10 ** 12 // STREAM:
        raise InputError(
            f"synthetic example {i} of seed {seed}: a seed draws examples 0 to {STREAM - 1} "
            f"of each split, and seeds run from 0 to {10 ** 12 // STREAM - 1}"
        )

    return SPLITS[split] + seed * STREAM + i


def synthetic(split, i, seed, size=0, task="colour", level="3", vsp_targets=VSP_TARGETS[0],
              hops=1):  # wide: a task's every setting
    """Example i of a task's split: train (train_sft), eval (its periodic accuracy), grpo
    (train_grpo's prompts), test (evaluate.py). size 0: the task's own image side. VSP: `level`
    (vsp_levels) and `vsp_targets` (vsp_example) instead; hops: its chain's length."""
    fn, own = TASKS[task]
    k = example_id(split, i, seed)
    if task == "vsp":  # (each example draws its level from the list, by its own id)
        levels = vsp_levels(level)
        return fn(k, levels[k % len(levels)], vsp_targets, split)
    if task == "hops":
        return fn(k, size or own, hops)

    return fn(k, size or own)


# -----------------------------------------------------------------------------
# the tiny tokenizer and model config (the default run's scratch checkpoint)

CORPUS = [
    "system\nYou are a helpful assistant.", "user\n", "assistant\n",
    "What colour is the small circle? red green blue yellow purple orange white black",
    "What shape is left of the square? circle square triangle star cross diamond",
    "Which object is above, below, left of, right of the other one? The answer is: yes no",
    "What shape is the red object? What colour is the triangle?",
    "<answer> </answer> 0 1 2 3 4 5 6 7 8 9 A B C D a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def build_tokenizer(path=None, vocab_size=512, special=qwen.SPECIAL, corpus=CORPUS):
    """Byte-level BPE with the given special tokens; written to `path` (tokenizer.json) if given."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    if path:
        tok.save(path)
    return tok


def tiny_config(tok):
    """A Qwen2.5-VL-shaped config small enough to train on a CPU in minutes (any image size: the
    processor decides the grid)."""
    sid = tok.token_to_id
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "image_token_id": sid("<|image_pad|>"),
        "video_token_id": sid("<|video_pad|>"),
        "vision_start_token_id": sid("<|vision_start|>"),
        "vision_end_token_id": sid("<|vision_end|>"),
        "bos_token_id": sid("<|endoftext|>"),
        "eos_token_id": sid("<|im_end|>"),
        "vision_config": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
            "hidden_act": "silu",
        },
    }
