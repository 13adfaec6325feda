"""Qwen2.5-VL parity with the reference transformers implementation, on tiny random checkpoints."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import helpers
import qwen
import tasks
import vision
from cli import InputError
from launch import run_here

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(path, reference model) per head type, written once per module."""
    made = {}

    def get(tie=True):
        if tie not in made:
            path = str(tmp_path_factory.mktemp(f"tie{tie}"))
            made[tie] = (path, helpers.tiny_reference(path, tie=tie, seed=int(tie)))
        return made[tie]
    return get


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


def ours_and_ref_logits(path, ref, ims, question="What shape is left of the square?"):
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    tok = qwen.QwenTokenizer(path)
    ids, pv, grid, kw = helpers.reference_inputs(tok, ims, question)
    with torch.no_grad():
        a = ref(input_ids=ids, **kw).logits
        h = model(ids, pixel_values=pv, grid_thw=grid)
        b = model.lm_head(h)
    assert h.shape == (1, ids.shape[1], model.cfg.hidden_size)
    return a, b


# -----------------------------------------------------------------------------
# preprocessing

@pytest.mark.parametrize("w,h,max_pixels", [(640, 480, 12845056), (333, 517, 200000), (60, 2000, 100000),
                                            (1000, 37, 50000), (20, 20, 12845056), (451, 451, 3136 * 4)])
def test_preprocess_matches_reference(w, h, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    im = helpers.photo(w, h, seed=w)
    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=max_pixels)(images=[im], return_tensors="pt")
    pv, grid = vision.preprocess(im, max_pixels=max_pixels)
    assert grid.dtype == torch.int64 and pv.dtype == torch.float32
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert torch.equal(pv, ref["pixel_values"])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_preprocess_modes_match_reference(mode):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    im = helpers.photo(150, 90, seed=3)
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.tile(np.linspace(0, 255, 150, dtype=np.uint8), (90, 1)))
        im = im.convert(mode[:-1]) if mode == "LA" else im
        im.putalpha(alpha)
    else:
        im = im.convert(mode)
    ref = Qwen2VLImageProcessorPil()(images=[im], return_tensors="pt")
    pv, _ = vision.preprocess(im)
    assert torch.equal(pv, ref["pixel_values"])


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(1, 4000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = int(rng.integers(3136, 50000)), int(rng.integers(50000, 2_000_000))
        assert vision.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi)
    with pytest.raises(InputError, match="aspect ratio"):
        vision.smart_resize(10, 2500)


def test_patch_layout_is_merge_block_order():
    """Row i of pixel_values is the patch at (block_row, block_col, in_row, in_col), columns C,T,py,px."""
    im = helpers.photo(56, 84, seed=5)
    pv, grid = vision.preprocess(im, min_pixels=56 * 84, max_pixels=56 * 84)
    assert grid.tolist() == [[1, 6, 4]]
    ref = np.asarray(im, np.float64) / 255
    ref = (ref - np.array(vision.CLIP_MEAN)) / np.array(vision.CLIP_STD)  # (84, 56, 3)
    row = (1 * 2 + 1) * 4 + 1 * 2 + 0  # block (1, 1), in-block (1, 0): patch row 3, col 2
    patch = pv[row].view(3, 2, 14, 14)
    assert torch.equal(patch[:, 0], patch[:, 1])  # the frame is repeated in time
    expect = torch.from_numpy(ref[3 * 14:4 * 14, 2 * 14:3 * 14]).permute(2, 0, 1).float()
    assert torch.allclose(patch[:, 0], expect, atol=1e-5)


# -----------------------------------------------------------------------------
# vision tower and full model

def test_vision_tower_matches_reference(ckpt):
    path, ref = ckpt(True)
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    ims = [helpers.photo(300, 420, 1), helpers.photo(140, 140, 2), helpers.photo(560, 112, 3)]  # edge windows
    pvs, grids = zip(*[vision.preprocess(im, max_pixels=200000) for im in ims])
    pv, grid = torch.cat(pvs), torch.cat(grids)
    with torch.no_grad():
        a = ref.model.visual(pv, grid_thw=grid).pooler_output
        b = model.visual(pv, grid)
    assert a.shape == b.shape == (int(grid.prod(-1).sum()) // 4, 64)
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_reference_two_nonsquare_images(ckpt, tie):
    path, ref = ckpt(tie)
    a, b = ours_and_ref_logits(path, ref, [helpers.photo(300, 200, 1), helpers.photo(90, 250, 2)])
    assert rel_err(a, b) < 1e-4
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_flat_config_sharded_renamed_keys(ckpt, tmp_path):
    """Official flat config + shards with an index + the newer model.language_model./model.visual. keys."""
    path, ref = ckpt(False)
    shutil.copy(os.path.join(path, "tokenizer.json"), tmp_path)
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    helpers.flatten_config(str(tmp_path))
    state = load_file(os.path.join(path, "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1).replace("visual.", "model.visual.", 1): v
               for k, v in state.items()}
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, str(tmp_path / name))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    with open(tmp_path / "config.json") as f:
        assert "text_config" not in json.load(f)
    a, b = ours_and_ref_logits(str(tmp_path), ref, [helpers.photo(200, 330, 4)])
    assert rel_err(a, b) < 1e-4
    model = qwen.Qwen2_5_VL.from_pretrained(str(tmp_path))
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # (untied) a change the reload must see
    model.save_pretrained(str(tmp_path))  # over the shards, which would otherwise shadow the new file
    assert not [f for f in os.listdir(tmp_path) if f.startswith("model-") or f.endswith(".index.json")]
    assert torch.equal(qwen.Qwen2_5_VL.from_pretrained(str(tmp_path)).lm_head.weight, model.lm_head.weight)
    for name, ks in shards.items():  # old shards beside it again: model.safetensors wins, as in transformers
        save_file({k: renamed[k] for k in ks}, str(tmp_path / name))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    assert torch.equal(qwen.Qwen2_5_VL.from_pretrained(str(tmp_path)).lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("layout", ["4.54", "current"])
def test_config_as_each_transformers_writes_it(ckpt, tmp_path, layout):
    """transformers 4.54 (the official LVR pin: nested text_config with null token ids under the top level's)
    and the current reference (nested, rope_parameters) both load and give the reference's logits."""
    path, ref = ckpt(True)
    for f in ("tokenizer.json", "config.json", "model.safetensors"):
        shutil.copy(os.path.join(path, f), tmp_path)
    if layout == "4.54":
        helpers.config_as_454(str(tmp_path))
        with open(tmp_path / "config.json") as f:
            assert json.load(f)["text_config"]["image_token_id"] is None
    cfg = qwen.read_config(str(tmp_path))
    assert cfg.image_token_id == ref.config.image_token_id and cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == 1e-6 and cfg.mrope_section == [2, 3, 3]
    a, b = ours_and_ref_logits(str(tmp_path), ref, [helpers.photo(200, 150, 5)])
    assert rel_err(a, b) < 1e-4


def test_config_nulls_and_missing_fields():
    """A null never overrides a value set elsewhere; a shape field set nowhere is one line naming it."""
    base = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vision_config": {"hidden_size": 32}}
    cfg = qwen.Config.from_dict({**base, "image_token_id": None, "text_config": {"image_token_id": 7,
                                                                                 "hidden_size": None}})
    assert cfg.image_token_id == 7 and cfg.hidden_size == 64
    cfg = qwen.Config.from_dict({**base, "image_token_id": 9, "text_config": {"image_token_id": None}})
    assert cfg.image_token_id == 9
    with pytest.raises(InputError, match="num_key_value_heads is missing"):
        qwen.Config.from_dict({**{k: v for k, v in base.items() if k != "num_key_value_heads"},
                               "text_config": {"num_key_value_heads": None}})


def test_get_rope_index_matches_reference(ckpt):
    path, ref = ckpt(True)
    tok = qwen.QwenTokenizer(path)
    rows, pvs, grids = [], [], []
    for i, (w, h) in enumerate([(300, 200), (90, 250)]):
        pv, grid = vision.preprocess(helpers.photo(w, h, i), max_pixels=40000)
        rows.append(tok.prompt("hi" * (i + 1) * 3, [int(grid.prod()) // 4]))
        pvs.append(pv)
        grids.append(grid)
    ids, mask = qwen.left_pad(rows, tok.endoftext)
    grid = torch.cat(grids)
    ours = qwen.get_rope_index(ids, grid, mask, tok.image_pad)
    deltas = ours.amax(dim=(0, 2)) + 1 - mask.sum(1)  # rope_deltas: max position + 1 - unpadded length
    theirs, ref_deltas = ref.model.get_rope_index(ids, (ids == tok.image_pad).int(), grid,
                                                  attention_mask=mask)
    assert torch.equal(ours[:, mask.bool()], theirs[:, mask.bool()])
    assert torch.equal(deltas.view(-1), ref_deltas.view(-1))
    # hand-worked: text then a 1x(H',W') image, text continues at s + max(H', W')
    g = grid[0]
    s = rows[0].index(tok.image_pad)
    n = int(g.prod()) // 4
    h2, w2 = int(g[1]) // 2, int(g[2]) // 2
    p = ours[:, 0, mask[0].bool()]
    assert p[:, s - 1].tolist() == [s - 1] * 3
    assert p[:, s + n - 1].tolist() == [s, s + h2 - 1, s + w2 - 1]
    assert p[:, s + n].tolist() == [s + max(h2, w2)] * 3


def test_left_padded_batch(ckpt):
    """A left-padded batch equals each prompt alone, and the reference on the same batch."""
    path, ref = ckpt(True)
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    tok = qwen.QwenTokenizer(path)
    rows, pvs, grids = [], [], []
    for i, (w, h, question) in enumerate([(300, 200, "What colour?"),
                                          (90, 250, "Which shape is left of the star?")]):
        pv, grid = vision.preprocess(helpers.photo(w, h, i), max_pixels=30000)
        rows.append(tok.prompt(question, [int(grid.prod()) // 4]))
        pvs.append(pv)
        grids.append(grid)
    ids, mask = qwen.left_pad(rows, tok.endoftext)
    pv, grid = torch.cat(pvs), torch.cat(grids)
    with torch.no_grad():
        batch = model.lm_head(model(ids, pv, grid, attention_mask=mask))
        theirs = ref(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                     mm_token_type_ids=(ids == tok.image_pad).int()).logits
        for i, row in enumerate(rows):
            alone = model.lm_head(model(torch.tensor([row]), pvs[i], grids[i]))
            assert rel_err(alone[0], batch[i, -len(row):]) < 1e-5
    assert not batch.isnan().any()
    assert rel_err(theirs[mask.bool()], batch[mask.bool()]) < 1e-4


def test_greedy_generation_matches_reference(ckpt):
    path, ref = ckpt(False)
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    tok = qwen.QwenTokenizer(path)
    rows, pvs, grids = [], [], []
    for i, (w, h) in enumerate([(260, 180), (120, 330)]):
        pv, grid = vision.preprocess(helpers.photo(w, h, 10 + i), max_pixels=30000)
        rows.append(tok.prompt("Describe" + " it" * i, [int(grid.prod()) // 4]))
        pvs.append(pv)
        grids.append(grid)
    ids, mask = qwen.left_pad(rows, tok.endoftext)
    pv, grid = torch.cat(pvs), torch.cat(grids)
    ours = model.generate(ids, pv, grid, attention_mask=mask, max_new_tokens=24,
                          sampling=qwen.Sampling(stop_ids=[-1]))
    with torch.no_grad():
        theirs = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                              mm_token_type_ids=(ids == tok.image_pad).int(), max_new_tokens=24,
                              do_sample=False, eos_token_id=None)
    assert ours.shape == theirs.shape == (2, ids.shape[1] + 24)
    assert torch.equal(ours, theirs)


def test_cached_equals_uncached_logits(ckpt):
    path, _ = ckpt(True)
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    tok = qwen.QwenTokenizer(path)
    ids, pv, grid, _ = helpers.reference_inputs(tok, [helpers.photo(200, 150, 7)])
    extra = torch.tensor([tok.encode(" the small red circle is left")])
    full = torch.cat([ids, extra], 1)
    with torch.no_grad():
        want = model.lm_head(model(full, pv, grid))
        cache = qwen.KVCache(model.cfg, 1, full.shape[1], "cpu", torch.float32)
        got = [model.lm_head(model(ids, pv, grid, cache=cache))]
        got.append(model.lm_head(model(extra[:, :2], cache=cache)))  # a chunk of two
        for t in range(2, extra.shape[1]):
            got.append(model.lm_head(model(extra[:, t:t + 1], cache=cache)))  # then one by one
    assert rel_err(want, torch.cat(got, 1)) < 1e-5


def test_stop_tokens_and_sampling(ckpt):
    path, _ = ckpt(True)
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    tok = qwen.QwenTokenizer(path)
    ids, pv, grid, _ = helpers.reference_inputs(tok, [helpers.photo(100, 100, 8)])
    greedy = model.generate(ids, pv, grid, max_new_tokens=6,
                            sampling=qwen.Sampling(stop_ids=[-1]))[0, ids.shape[1]:]
    stop = int(greedy[2])  # pretend the third greedy token is a stop token
    out = model.generate(ids, pv, grid, max_new_tokens=6,
                         sampling=qwen.Sampling(stop_ids=[stop]))[0, ids.shape[1]:]
    assert out.tolist() == greedy[:3].tolist()
    g1, g2 = (model.generate(ids, pv, grid, max_new_tokens=8, sampling=qwen.Sampling(
        temperature=1.0, top_k=20, top_p=0.9, stop_ids=[-1], generator=torch.Generator().manual_seed(0)))
        for _ in range(2))
    assert torch.equal(g1, g2)


def test_sampling_filters_match_reference():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for t, k, p in [(0.7, 0, 0.9), (1.3, 5, 1.0), (0.9, 10, 0.5)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        kept = torch.stack([torch.bincount(qwen.sample(logits, t, k, p, torch.Generator().manual_seed(s)),
                                           minlength=50) for s in range(300)]).sum(0) > 0
        assert (kept <= torch.isfinite(ref).any(0)).all()  # we never sample what the reference filters out


def test_bf16_runs(ckpt):
    """bf16: the LM matches the reference's bf16 bit for bit on the same embeddings, the tower to bf16
    rounding (our batched window SDPA sums in another order), and end to end we are as close to fp32."""
    path, ref = ckpt(True)
    m32 = qwen.Qwen2_5_VL.from_pretrained(path)
    m16 = qwen.Qwen2_5_VL.from_pretrained(path, dtype=torch.bfloat16)
    assert m16.lm_head.weight.dtype == torch.bfloat16
    assert m16.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    ref16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    tok = qwen.QwenTokenizer(path)
    ids, pv, grid, kw = helpers.reference_inputs(tok, [helpers.photo(200, 150, 9)])
    with torch.no_grad():
        feats = m16.visual(pv.bfloat16(), grid)
        ref_feats = ref16.model.visual(pv.bfloat16(), grid_thw=grid)
        assert rel_err(getattr(ref_feats, "pooler_output", ref_feats), feats) < 2e-2
        x = m16.embed(ids, feats=feats, grid_thw=grid)
        pos = qwen.get_rope_index(ids, grid, None, m16.cfg.image_token_id)
        assert torch.equal(m16.lm_head(m16(inputs_embeds=x, position_ids=pos)),
                           ref16(inputs_embeds=x, position_ids=pos).logits)
        a = m32.lm_head(m32(ids, pv, grid))
        b = m16.lm_head(m16(ids, pv, grid))
        c = ref16(input_ids=ids, **kw).logits
    assert b.dtype == torch.bfloat16
    assert (b.argmax(-1) == c.argmax(-1)).float().mean() > 0.95
    assert rel_err(a, b) < 1.5 * rel_err(a, c) + 1e-2
    out = m16.generate(ids, pv, grid, max_new_tokens=4, sampling=qwen.Sampling(stop_ids=[-1]))
    assert out.shape == (1, ids.shape[1] + 4)


def test_save_roundtrip_both_ways(ckpt, tmp_path):
    path, ref = ckpt(True)
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    model.save_pretrained(str(tmp_path))
    shutil.copy(os.path.join(path, "tokenizer.json"), tmp_path)
    with open(tmp_path / "config.json") as f:
        assert "rope_scaling" in json.load(f)  # official flat layout
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))  # tied
    ref2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ims = [helpers.photo(220, 160, 11)]
    a, b = ours_and_ref_logits(str(tmp_path), ref2, ims)
    c, _ = ours_and_ref_logits(path, ref, ims)
    assert rel_err(a, b) < 1e-4 and rel_err(c, b) < 1e-5


def test_prompt_format(ckpt):
    path, _ = ckpt(True)
    tok = qwen.QwenTokenizer(path)
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|><|vision_start|>" + "<|image_pad|>" * 2
            + "<|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.prompt("What is it?", [3, 2]) == tok.encode(text)
    assert tok.decode(tok.encode("a red circle")) == "a red circle"


# -----------------------------------------------------------------------------
# bad input

def test_bad_images(tmp_path):
    with pytest.raises(InputError, match="not found"):
        vision.preprocess(str(tmp_path / "missing.png"))
    (tmp_path / "noise.png").write_bytes(os.urandom(300))
    with pytest.raises(InputError, match="cannot read image"):
        vision.preprocess(str(tmp_path / "noise.png"))
    helpers.photo(120, 80).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="cut.jpg"):
        vision.preprocess(str(tmp_path / "cut.jpg"))
    with pytest.raises(InputError, match="aspect ratio"):
        vision.preprocess(Image.new("RGB", (1, 300)))
    pv, grid = vision.preprocess(Image.new("RGB", (1, 1)))  # 1 pixel: scaled up to min_pixels
    assert grid.tolist() == [[1, 4, 4]]


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(os.path.join(dst, "model.safetensors"))
    edit(state)
    save_file(state, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_bad_checkpoints(ckpt, tmp_path):
    path, _ = ckpt(False)
    cases = [
        (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
         "missing key model.layers.1.mlp.up_proj.weight"),
        (lambda s: s.update({"model.layers.9.bogus": torch.zeros(1)}), "unexpected key model.layers.9.bogus"),
        (lambda s: s.update({"visual.merger.mlp.2.bias": torch.zeros(3)}),
         "visual.merger.mlp.2.bias has shape"),
        (lambda s: s.pop("lm_head.weight"), "missing key lm_head.weight"),  # untied: the head is required
        (lambda s: s.update(
            {"model.norm.weight": torch.ones(s["model.norm.weight"].shape, dtype=torch.int32)}),
         "model.norm.weight has dtype torch.int32, weights must be floats"),
    ]
    for i, (edit, msg) in enumerate(cases):
        with pytest.raises(InputError, match=msg):
            qwen.Qwen2_5_VL.from_pretrained(broken_copy(path, tmp_path / str(i), edit))
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupted"):
        qwen.Qwen2_5_VL.from_pretrained(str(cut))
    (cut / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])  # a corrupted header
    with pytest.raises(InputError, match="truncated or corrupted"):
        qwen.Qwen2_5_VL.from_pretrained(str(cut))
    with pytest.raises(InputError, match="no config.json"):
        qwen.Qwen2_5_VL.from_pretrained(str(tmp_path))
    os.remove(cut / "model.safetensors")
    # cut
    (cut / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": "model-0000')
    with pytest.raises(InputError, match="index.json: not a valid safetensors index"):
        qwen.Qwen2_5_VL.from_pretrained(str(cut))


def test_config_tokenizer_mismatch(ckpt, tmp_path):
    path, _ = ckpt(True)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["image_token_id"] = cfg.get("image_token_id", 5) + 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="config.json image_token_id = .* but the tokenizer says"):
        qwen.load(str(bad))


def test_tokenizer_without_qwen_tokens(tmp_path):
    tasks.build_tokenizer(str(tmp_path / "tokenizer.json"), special=["<|endoftext|>", "<|im_start|>"])
    with pytest.raises(InputError, match=r"lacks the Qwen special tokens <\|im_end\|>"):
        qwen.QwenTokenizer(str(tmp_path))


def test_image_token_count_mismatch(ckpt):
    path, _ = ckpt(True)
    model = qwen.Qwen2_5_VL.from_pretrained(path)
    tok = qwen.QwenTokenizer(path)
    ids, pv, grid, _ = helpers.reference_inputs(tok, [helpers.photo(100, 100, 1)])
    short = ids[:, torch.arange(ids.shape[1]) != (ids[0] == tok.image_pad).nonzero()[0, 0]]
    with pytest.raises(InputError, match="image tokens and image features do not match"):
        model(short, pv, grid)
    with pytest.raises(InputError, match="no image was given"):
        model(ids)


def test_sample_script(ckpt, tmp_path):
    path, ref = ckpt(True)
    helpers.photo(240, 160, 12).save(tmp_path / "x.jpg")
    r = run_here("sample.py", "--init_from", path, "--image", str(tmp_path / "x.jpg"), "--q", "What colour?",
                 "--max_new_tokens", "5")
    assert r.returncode == 0, r.stderr
    model, tok = qwen.load(path)
    ids, pv, grid, _ = helpers.reference_inputs(tok, [Image.open(tmp_path / "x.jpg")], "What colour?",
                                                max_pixels=12845056)
    out = model.generate(ids, pv, grid, max_new_tokens=5,
                         sampling=qwen.Sampling(stop_ids=[tok.im_end, tok.endoftext]))
    assert r.stdout.strip().endswith(tok.decode(out[0, ids.shape[1]:].tolist()).strip())
    cases = [(["--image", str(tmp_path / "nope.jpg")], "image not found"),
             (["--max_new_tokens", "many"], "--max_new_tokens expects int"),
             (["--frobnicate", "1"], "unknown flag --frobnicate"),
             (["--init_from", str(tmp_path)], "no config.json"),
             (["--q", "  "], "--q is empty"),
             (["--max_new_tokens", "200000"], "exceeds the context")]
    for args, msg in cases:
        r = run_here("sample.py", "--init_from", path, *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(InputError, match=r"image too large \(over 59999 pixels\)"):
        vision.load_image(str(tmp_path / "big.png"))
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 300 * 200)
    assert vision.load_image(str(tmp_path / "big.png")).size == (300, 200)
