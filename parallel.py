"""
Several processes under torchrun, for train_sft.py and train_grpo.py: the process group, FSDP2
sharding, the checkpoint every rank takes part in, and the rollout's gathered weights.

    torchrun --nproc_per_node 8 train_sft.py ...              # data parallel (DDP)
    torchrun --nproc_per_node 8 train_grpo.py --fsdp true ...  # FSDP2: weights, grads, Adam sharded

Every forward goes through one module, `Root`, whose forward runs a function of the model (a loss,
a rollout, log-probs): FSDP2 and DDP hook the root's forward, and the model's pieces (the tower, the
embedding, the head) are called in many places. Units: one per decoder layer, one for the vision
tower, the rest (embeddings, head, norm) at the root, as torchtitan shards Llama.
"""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import checkpoint
import cli
import qwen
from cli import InputError


class Root(torch.nn.Module):
    """The one module a training script calls: root(fn, *args) = fn(model, *args)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


# Rank 0 evaluates and writes a checkpoint (a 3B model's weights and Adam state: about 40 GB,
# fsynced) while the other ranks wait in a barrier: NCCL's default 10 minutes is too short for that.
TIMEOUT = datetime.timedelta(hours=2)


def setup(device, fsdp=False):
    """-> (rank, world size, device, distributed?). Under torchrun: the process group (nccl on GPUs,
    gloo on CPU) and this rank's GPU. On CUDA, TF32 matmuls (what fp32 work remains under bf16
    autocast)."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if "RANK" not in os.environ:
        if fsdp:
            raise InputError(
                "--fsdp true shards across processes: launch with torchrun --nproc_per_node N"
            )
        return 0, 1, device, False

    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    if device.startswith("cuda"):
        device = local_device(device)
        torch.cuda.set_device(device)

    return dist.get_rank(), dist.get_world_size(), device, True


def local_device(device):
    """This process's device: under torchrun on CUDA, its LOCAL_RANK's GPU."""
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def autocast_dtype(dtype, device):
    """--dtype auto: bfloat16 autocast on CUDA (the official LVR runs in bf16), float32
    elsewhere."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def shard(model, sum_grads=False):
    """FSDP2 units (module docstring) -> the Root over them. sum_grads: gradients are summed over
    the ranks (GRPO normalises its loss globally) instead of averaged (SFT's per-rank mean loss)."""
    from torch.distributed.fsdp import fully_shard
    root = Root(model)
    units = [*model.model.layers, *([model.visual] if hasattr(model, "visual") else []), root]
    for m in units:  # the root last: its forward runs first, so it sets up the others
        fully_shard(m)
        # (a plain SUM, which every backend has, rather than NCCL's pre-multiplied one)
        if sum_grads:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)

    return root


def load_sharded(path, dtype, device, init=None, fix=None):
    """An FSDP2 model that no rank ever holds whole: built on the meta device, sharded (shard), then
    each rank copies its rows of each weight from the memory-mapped safetensors, one tensor at a
    time. init(model): run on the meta model before sharding (add a latent head, the latent tokens);
    fix(name, full): edit a full tensor on the CPU before it is split (the latent tokens' rows). A
    latent head the checkpoint lacks starts as qwen.latent_head's init, seeded alike on every rank.
    -> (the Root over the shards, the model, what init returned)."""
    rank, world = rank_world()
    cfg = qwen.read_config(path)
    with torch.device("meta"):
        model = qwen.Qwen2_5_VL(cfg)
        made = init(model) if init is not None else None

    where = qwen.weight_index(path, cfg.tie_word_embeddings)
    new_head = {k for k in model.state_dict() if k.startswith("lvr_head.") and k not in where}
    qwen.check_keys(
        path, {k: v.shape for k, v in model.state_dict().items() if k not in new_head}, where
    )
    if new_head:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            head = {
                f"lvr_head.{k}": v.detach()
                for k, v in qwen.latent_head(model.cfg).named_parameters()
            }

    root = shard(model)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        # one full tensor at a time, on the CPU
        full = (
            head[name]
            if name in new_head
            else qwen.read_weights(where, [name], torch.float32)[name]
        )
        full = (fix(name, full) if fix is not None else full).to(dtype)
        local = p.to_local()  # this rank's rows of dim 0: FSDP2 splits as torch.chunk does
        rows = -(-full.shape[0] // world)
        with torch.no_grad():
            local.copy_(full[rank * rows:rank * rows + local.shape[0]])

    return root, model, made


@contextlib.contextmanager
def gathered(root, fsdp):
    """FSDP: every unit's full weights held on every rank for the duration, so that forwards need no
    collective. A rollout needs it: each rank decodes as many steps as its own rows take."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in root.modules() if isinstance(m, FSDPModule)] if fsdp else []
    for m in units:
        if m is not root:
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()

    try:
        yield
    finally:
        for m in units:
            m.reshard()
            if m is not root:
                m.set_reshard_after_forward(True, recurse=False)


def all_reduce_grads(params):
    """DDP's gradient sync, done once per update: sum each gradient over the ranks (a rank whose
    rows all went elsewhere contributes zeros). By hand, because ranks run different numbers of
    micro-batches."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)

    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for w in works:
        w.wait()


# long: what a checkpoint holds, and the stop it may end with
def save(model, tok, opt, out_dir, train_state, history, fsdp, rank, signalled=None):
    """Write out_dir atomically (checkpoint.save), with the run's history. Every rank calls this
    (FSDP gathers the full state collectively); rank 0 writes. The optimizer state is keyed by
    parameter name, so FSDP, DDP and one-process runs resume each other at any world size.
    signalled: a stop asked for (cli.stop_flag), which ends the run once this step is saved."""
    # (here: importing it costs every start 1 s)
    from torch.distributed.checkpoint import state_dict as dcp
    opts = dcp.StateDictOptions(full_state_dict=fsdp, cpu_offload=fsdp)
    weights = dcp.get_model_state_dict(model, options=opts) if fsdp else None
    opt_state = dcp.get_optimizer_state_dict(model, opt, options=opts)
    if rank == 0:
        checkpoint.save(
            model, tok, out_dir, train_state={**train_state, "optimizer": opt_state},
            weights=weights, history=history,
        )

    if dist.is_initialized():  # no rank reads or moves on before it is written
        dist.barrier()

    if signalled is not None:
        cli.stop_saved(signalled, train_state["step"], out_dir, rank=rank)


def load_optimizer(model, opt, state, fsdp):
    """The saved optimizer state (by parameter name) into `opt`, sharded as the model is."""
    from torch.distributed.checkpoint import state_dict as dcp
    opts = dcp.StateDictOptions(full_state_dict=fsdp)
    dcp.set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)


@contextlib.contextmanager
def finishing(ddp, skipped, data_path, device, rank):
    """Around a training loop, however it ends (out of memory included): then the peak memory, the
    bad records it skipped, and the process group."""
    try:
        yield
    finally:
        if device.startswith("cuda"):  # this rank's peak (tools/gpu_check.py reads the line)
            print(
                f"peak GPU memory rank {rank}: {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
            )
        if skipped and rank == 0:
            print(f"skipped {len(skipped)} bad records of {data_path}: {sorted(skipped)}")
        if ddp:
            dist.destroy_process_group()


def rank_world():
    """-> (this process's rank, the number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(t, op=dist.ReduceOp.SUM):
    """t reduced over the ranks (summed, by default), in place; t itself in one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op)
    return t


def every_ranks(flags, mine, n):
    """(n_mine,) this rank's flags, at slice `mine` of the n rows every rank holds in turn -> (n,)
    every rank's, on the CPU (GRPO's cross-rank filter: which groups, in the stream's order, have
    reward spread)."""
    whole = torch.zeros(n, device=flags.device)
    whole[mine] = flags.float()
    return all_reduce(whole).cpu().bool()


def as_many_as_any_rank(items, pad, device):
    """FSDP: every micro-batch's forward is a collective, so each rank runs as many as the busiest
    one: `items` padded with `pad` (a micro-batch that weighs nothing) to the ranks' most."""
    n = int(all_reduce(torch.tensor(len(items), device=device), dist.ReduceOp.MAX))
    return items + [pad] * (n - len(items))
