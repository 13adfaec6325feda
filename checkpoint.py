"""
The checkpoint directory, crash-safe. A checkpoint is a Hugging Face Qwen2.5-VL directory
(config.json, model.safetensors, tokenizer.json) plus train_state.pt (what resuming needs:
optimizer, step, RNG, config) and log.jsonl, the run's history: one JSON line per step and per
evaluation, as the Hugging Face Trainer keeps log_history, readable without torch:

    history = [json.loads(line) for line in open("out/log.jsonl")]
    plt.plot([x["step"] for x in history if "ce" in x], [x["ce"] for x in history if "ce" in x])

The save protocol, the one writer: write everything to a fresh `.tmp-<name>-*` dir beside out_dir
and fsync it; move the old checkpoint into a fresh `.old-<name>-*` dir; rename the new one to
out_dir; delete the old. A kill at any moment leaves a loadable checkpoint: before the first rename
the old one is untouched; between the two renames the old one lies in `.old-<name>-*/ckpt`, where
readers (resolve()) find it and the next save moves it back; whatever a kill leaves half-deleted
sits under a `.tmp-` name, which nothing reads. A save replaces out_dir whole, so out_dir may hold
nothing but these five files (check_out_dir), checked before a run starts and at every save.
"""
import json
import os
import re
import shutil
import tempfile

import torch

import qwen
from cli import InputError

CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "log.jsonl"}


def check_out_dir(out_dir, fresh):
    """A save replaces out_dir whole, so it may hold nothing but a checkpoint of ours, and a fresh
    run (no --resume) must find it empty or absent. Checked before a run starts (fail fast) and at
    every save."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out_dir {out_dir} is a file, not a directory")
    ckpt = resolve(out_dir)
    have = set(os.listdir(ckpt)) if os.path.isdir(ckpt) else set()
    if have - CHECKPOINT_FILES:
        raise InputError(
            f"--out_dir {out_dir} holds {', '.join(sorted(have - CHECKPOINT_FILES)[:3])}, which saving a "
            f"checkpoint there would delete: choose another --out_dir"
        )

    # a finished run's checkpoint, or a model (say the --init_from one) saved there
    if fresh and have:
        raise InputError(
            f"--out_dir {out_dir} already holds a checkpoint: --resume true continues a run saved there; "
            f"to start over, delete it or choose another --out_dir"
        )


def save(model, tok, out_dir, train_state, weights=None, history=()):
    """Write model + tokenizer + train_state.pt + log.jsonl (`history`, a list of dicts) to out_dir
    atomically: a temp dir beside it, fsync, then rename over the old one, so a kill at any moment
    leaves a loadable checkpoint."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    prev = resolve(out_dir)  # undo saves killed part-way: the previous checkpoint back in place,
    if prev != out_dir:
        os.rename(prev, out_dir)
    for d in sorted(os.listdir(parent)):  # and every leftover dropped
        if d.startswith((f".tmp-{name}-", f".old-{name}-")):
            discard(os.path.join(parent, d), name)

    check_out_dir(out_dir, fresh=False)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        model.save_pretrained(tmp, weights)
        tok.tok.save(os.path.join(tmp, "tokenizer.json"))
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
        with open(os.path.join(tmp, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in history)
        for f in os.listdir(tmp):
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as e:  # a full disk, say: drop the partial copy (it holds the space)
        discard(tmp, name)
        raise InputError(
            f"cannot write a checkpoint beside {out_dir} ({e}); {out_dir} is unchanged"
        ) from None

    old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
    if os.path.exists(out_dir):
        os.rename(out_dir, os.path.join(old, "ckpt"))
    os.rename(tmp, out_dir)  # a kill between the two renames is undone by the next save (above)
    discard(old, name)


def load_train_state(out_dir, config=None):
    """train_state.pt with weights_only=True: tensors and plain containers, never arbitrary pickle.
    Onto the CPU, whatever device saved it: set_optimizer_state_dict moves each rank's part to its
    device (without it, every rank's copy of a GPU run's Adam state lands on cuda:0). Prints the
    settings of `config` (this run's) that differ from the saved run's."""
    path = os.path.join(resolve(out_dir), "train_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or a pickle that wants to run code
        raise InputError(f"cannot resume from {path}: {str(e).splitlines()[0][:200]}") from None

    saved = state.get("config", {})
    changed = [
        f"{k} {saved[k]} -> {v}"
        for k, v in (config or {}).items()
        if k != "resume" and saved.get(k, v) != v
    ]
    if changed:  # allowed (more steps, a lower lr), but the run is then not the one it was
        print("resuming with changed settings: " + ", ".join(changed))
    return state


def read_log(out_dir):
    """A run's history (log.jsonl) -> a list of dicts; [] for a checkpoint that has none."""
    path = os.path.join(resolve(out_dir), "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def resolve(path):
    """path; or, while a save killed between its two renames has left it missing, the previous
    checkpoint that save moved aside. Readers use it in place: only the next save (the one writer)
    moves it back, so a reader never races a training run, nor DDP ranks each other."""
    parent, name = os.path.split(os.path.abspath(path))
    if os.path.exists(path) or not os.path.isdir(parent):
        return path
    aside = [
        os.path.join(parent, d, "ckpt")
        for d in sorted(os.listdir(parent))
        if d.startswith(f".old-{name}-")
    ]
    return next((p for p in aside if os.path.isdir(p)), path)


def discard(path, name):
    """Delete a dir after moving it into a fresh .tmp- dir: the rename is atomic, so a kill
    mid-delete never leaves a half-deleted (or stale) checkpoint under an .old- name, which the next
    save would move back."""
    trash = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=os.path.dirname(path))
    os.rename(path, os.path.join(trash, "x"))
    shutil.rmtree(trash, ignore_errors=True)


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")  # ORG/NAME, or ORG/NAME@REVISION
HUB_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
             # what loading reads (and the processor's bounds)
             "*.safetensors", "*.safetensors.index.json"]
HUB_INSTALL = "pip install huggingface_hub"


def locate(name):
    """--init_from -> a checkpoint directory: `name` itself when it is a directory (a local
    directory always wins over a hub id), else a Hugging Face hub id ORG/NAME[@REVISION] resolved
    through huggingface_hub (optional, imported here only): the files loading reads, from its cache,
    downloaded if missing, under HF_HOME, HF_HUB_OFFLINE and HF_TOKEN as every Hugging Face tool
    reads them. Anything else: unchanged (loading then says what is missing)."""
    if os.path.isdir(name) or not HUB_ID.match(name):
        return name
    repo, _, revision = name.partition("@")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise InputError(
            f"{name} is not a directory; to load it from the Hugging Face hub: {HUB_INSTALL} "
            f"(or: hf download {repo} --local-dir DIR, then --init_from DIR)"
        ) from None

    try:
        return huggingface_hub.snapshot_download(
            repo, revision=revision or None, allow_patterns=HUB_FILES
        )
    except errors.GatedRepoError:
        cause = "a gated model: accept its licence on the hub and set HF_TOKEN"
    except errors.RepositoryNotFoundError:
        cause = "no such model on the hub (or a private one: set HF_TOKEN)"
    except errors.RevisionNotFoundError:
        cause = f"no revision {revision!r}"
    except errors.LocalEntryNotFoundError:
        cause = "not in the Hugging Face cache, and the hub cannot be reached" + (
            " (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.is_offline_mode() else ""
        )
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__

    raise InputError(
        f"--init_from {name}: not a local directory, and from the Hugging Face hub: {cause}"
    )


def load(path, dtype=torch.float32, device="cpu"):
    """qwen.load on a checkpoint we may be writing: a save killed between its renames leaves the
    previous checkpoint aside, and that is what a reader loads."""
    return qwen.load(resolve(path), dtype, device)


def read_config(path):
    """qwen.read_config on a checkpoint we may be writing (as load)."""
    return qwen.read_config(resolve(path))


def load_tokenizer(path):
    """The tokenizer of a checkpoint we may be writing (as load)."""
    return qwen.QwenTokenizer(resolve(path))
