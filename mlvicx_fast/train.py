"""python -m mlvicx_fast.train: MLVICX pretraining.

Reads a prepared dataset (a folder written by `python -m mlvicx_fast.data.prepare`, or one of its
.beton files); with no --data it builds the built-in phantom chest X-ray set once (cached) and
uses that. Writes a run folder: config.json (the resolved configuration), log.csv (one row per
step), epochs.csv, checkpoints/ckpt-*.pt (every epoch and every --ckpt-every steps, last --keep
kept), final.pt, loss.png, and TensorBoard events when tensorboard is installed.

The step: two augmented views of each image (fused GPU augmentation), the MLVICX network on each
view, MLVICXLoss = global_weight * VICReg(z1, z2) + lambda * VICReg(m1, m2), backward, LARS with
warmup + cosine. channels_last everywhere; on a GPU also bf16 autocast and the whole step in one
CUDA graph (each can be turned off for comparison); --compile adds torch.compile of the network.

Examples:
  python -m mlvicx_fast.train                                   # built-in default, any machine
  python -m mlvicx_fast.train --data prepared/nih --preset official --epochs 300 --batch-size 256
  python -m mlvicx_fast.train --config my.toml --resume runs/nih-1  # continue a run exactly
  torchrun --nproc-per-node 8 -m mlvicx_fast.train --data prepared/nih   # one node, 8 GPUs
  torchrun --nproc-per-node 8 --max-restarts 3 -m mlvicx_fast.train --data prepared/nih --out runs/nih
                                                                # a failed process: all restart, the run continues
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from .checkpoint import (CheckpointManager, UnsafeCheckpoint, atomic_save, atomic_write_text, load,
                         make_deterministic, remove_stale_temps, rng_state, set_rng_state)
from .host import reuse_freed_memory
from .nn.loss import MLVICXLoss
from .optim import LARS, scaled_lr, warmup_cosine_lr

BUILTIN_LR = 1.0  # peak lr of the built-in default run (see resolve)
PHANTOM_SEED = 0  # the built-in phantom set's
TERMS = ("global/inv", "global/var", "global/cov", "multi/inv", "multi/var", "multi/cov")


# --------------------------------------------------------------------------------------------
# Configuration: defaults < config file < command line
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    data: Optional[str] = field(default=None, metadata=dict(
        help="prepared dataset folder or .beton file (default: the built-in phantom set, built once and cached)"))
    preset: str = field(default="paper", metadata=dict(
        choices=["paper", "official"], help="network preset: paper (D=2048) or official (D=4096, final BN); the "
                                             "optimiser and batch 64 are the official code's for both"))
    dim: int = field(default=0, metadata=dict(help="expander width D (0: the preset's, 2048 paper / 4096 official)"))
    epochs: int = field(default=0, metadata=dict(
        help="epochs (0: 300; the built-in default run: 4 on a CPU, 100 on a GPU)"))
    batch_size: int = field(default=0, metadata=dict(
        help="images per view per step, over all processes (0: 64, the official config's and the paper's; "
             "the built-in default run: 32 on a CPU)"))
    lr: float = field(default=0.0, metadata=dict(
        help="peak learning rate (0: base_lr * batch_size / 256; the built-in default run: 1.0 unless --base-lr "
             "is given)"))
    base_lr: Optional[float] = field(default=None, metadata=dict(
        help="learning rate per 256 images, the official code's (default: 0.2)"))
    warmup_epochs: Optional[float] = field(default=None, metadata=dict(
        help="linear warmup length in epochs (default: 2, the official code; 10%% of a built-in default run)"))
    weight_decay: float = field(default=1e-6, metadata=dict(help="LARS weight decay (official 1e-6)"))
    lambda_: float = field(default=1.0, metadata=dict(
        flag="--lambda", metavar="LAMBDA", help="weight of the multi-level loss (0: plain VICReg, global only)"))
    global_weight: float = field(default=1.0, metadata=dict(help="weight of the global loss (0: multi-level only)"))
    image_size: int = field(default=0, metadata=dict(help="view side in pixels (0: 224; 128 for the built-in default on a CPU)"))
    in_chans: int = field(default=3, metadata=dict(choices=[1, 3], help="network input channels (3: gray replicated)"))
    init: str = field(default="", metadata=dict(
        help="start the ResNet18 backbone from these weights instead of a random initialisation: a "
             "torchvision or timm resnet18 state_dict file (the official code starts from ImageNet "
             "weights; 'fc.*' is ignored, the stem converted for --in-chans 1), or an MLVICX "
             "checkpoint or run folder (its backbone only)"))
    precision: str = field(default="auto", metadata=dict(
        choices=["auto", "bf16", "fp16", "fp32"], help="autocast precision (auto: bf16 on GPU, fp32 on CPU)"))
    fp32_heads: Optional[bool] = field(default=None, metadata=dict(
        help="run the two expanders in float32 under bf16/fp16 autocast (default: on a CPU, where bf16 expanders "
             "lowered the demo's probe margin at each of three seeds and fp32 ones cost no time; off on a GPU, "
             "where neither the gain nor the cost is measured yet)"))
    compile: bool = field(default=False, metadata=dict(
        help="torch.compile the network (off by default until measured together with the CUDA graph)"))
    cuda_graph: Optional[bool] = field(default=None, metadata=dict(
        help="capture the whole step in one CUDA graph (default: on GPU)"))
    channels_last: bool = field(default=True, metadata=dict(
        help="channels_last memory format (on by default: on 2 CPU cores too, the built-in step is ~15%% faster)"))
    workers: int = field(default=0, metadata=dict(
        help="FFCV loader threads for .beton data (0: this process's share of the machine's cores, at most 8)"))
    out: str = field(default="", metadata=dict(
        help="run folder (default: a new runs/<date>-<time>); one that holds another run is refused"))
    resume: str = field(default="", metadata=dict(help="run folder or checkpoint to continue exactly"))
    seed: int = field(default=0, metadata=dict(help="seed of data order, augmentation and initialisation"))
    max_steps: int = field(default=0, metadata=dict(
        help="stop after this many steps in total (0: all epochs); the lr schedule still spans --epochs"))
    ckpt_every: int = field(default=0, metadata=dict(help="also checkpoint every N steps (0: only every epoch)"))
    keep: int = field(default=3, metadata=dict(help="checkpoints kept in the run folder (epoch and step ones, newest first)"))
    quiet: bool = field(default=False, metadata=dict(
        help="no progress bar (the run's messages, log.csv and TensorBoard events stay)"))
    log_every: int = field(default=0, metadata=dict(help="steps between loss reads (a host sync) (0: 1 on CPU, 10 on GPU)"))
    device: str = field(default="auto", metadata=dict(help="cuda, cpu or auto"))
    backend: str = field(default="auto", metadata=dict(
        choices=["auto", "triton", "torch"], help="fused ops backend (auto: Triton on CUDA)"))
    aggregation: str = field(default="exact", metadata=dict(
        choices=["exact", "official"], help="multi-level aggregation: exact pool-first or the official 64x64 form"))
    deterministic: bool = field(default=False, metadata=dict(
        help="deterministic algorithms and fixed loss-kernel tiles, MLVICX_AUTOTUNE=0 (slower; exact resume on GPU)"))
    phantom_n: int = field(default=2000, metadata=dict(help="images in the built-in phantom set"))
    phantom_size: int = field(default=0, metadata=dict(
        help="stored side of the built-in phantom set (0: from the view size, 160 px for 128 px views, else 256)"))
    config: str = field(default="", metadata=dict(help="TOML or YAML file whose keys are these option names"))


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.rstrip("_").replace("_", "-"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlvicx_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                  help=f.metadata["help"] + ("" if f.default in (None, "") else f" (default: {f.default})"))
        if f.type in ("Optional[bool]", "bool") or isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "Optional[float]": float}.get(str(f.type), str)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            if "metavar" in f.metadata:
                kw["metavar"] = f.metadata["metavar"]
        p.add_argument(_flag(f), **kw)
    return p


def read_config_file(path: str) -> Dict[str, Any]:
    """Keys are option names, with '-' or '_' (``lambda`` for --lambda)."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"train: config file {path} does not exist")
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the same parser as the tomli package
            import tomli as tomllib

        raw = tomllib.loads(p.read_text())
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit("train: reading a YAML config needs pyyaml (pip install pyyaml), or use TOML")
        raw = yaml.safe_load(p.read_text()) or {}
    else:
        raise SystemExit(f"train: config file {path} must end in .toml, .yaml or .yml")
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "config"}
    names = {**{n.rstrip("_"): n for n in fields}, **{n: n for n in fields}}
    out = {}
    for key, value in raw.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            known = ", ".join(sorted(n.rstrip("_") for n in fields))
            raise SystemExit(f"train: unknown key {key!r} in {path}; known keys: {known}")
        out[name] = _config_value(fields[name], key, value, path)
    return out


def _config_value(f: dataclasses.Field, key: str, value: Any, path: str) -> Any:
    """value checked as the command line checks it: its type (a number written as a string, as
    YAML reads 1e-3, is converted) and its choices."""
    kind = str(f.type)
    if value is None and kind.startswith("Optional"):
        return None
    if "bool" in kind:
        ok, wanted = isinstance(value, bool), "true or false"
    elif "float" in kind:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif kind == "int":
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, wanted = isinstance(value, str), "a string"
    choices = f.metadata.get("choices")
    if ok and choices and value not in choices:
        ok, wanted = False, "one of " + ", ".join(map(str, choices))
    if not ok:
        raise SystemExit(f"train: {key} = {value!r} in {path}: expected {wanted}")
    return value


def given_options(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """The options given explicitly: the config file's, and the command line's over them."""
    ns = vars(build_parser().parse_args(argv))
    values = read_config_file(ns["config"]) if ns.get("config") else {}
    values.update(ns)
    return values


def parse_config(argv: Optional[List[str]] = None) -> Config:
    return Config(**given_options(argv))


# --------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------
def is_main() -> bool:
    """Rank 0, or a single process. Before the process group exists (the resume and precision
    messages) torchrun's RANK says which, so those lines are printed once, not once per process."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def say(msg: str) -> None:
    if is_main():
        print(f"[train] {msg}", flush=True)


def say_in_handler(msg: str) -> None:
    """say() from a signal handler: written to the file descriptor, past sys.stdout's buffer (the
    handler runs between two bytecodes of the main thread, maybe inside a print or the progress
    bar's write to the same stream, and a buffered write from there raises 'reentrant call')."""
    if not is_main():
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None  # a stream without a descriptor (a captured one): it has no such lock
    if fd is None:
        say(msg)
        return
    try:
        os.write(fd, f"\n[train] {msg}\n".encode())
    except OSError:
        pass  # a closed terminal: the run still stops and saves


def on_cuda(device: str) -> bool:
    """Whether --device (cuda, cuda:N, cpu or auto) runs on a GPU here."""
    return torch.cuda.is_available() if device == "auto" else device.startswith("cuda")


def resolve(cfg: Config) -> Config:
    """Fill the 'auto' values for this machine; paths made absolute (config.json then names the
    same files from any working directory, so --resume works from anywhere)."""
    for name in ("data", "init", "out"):
        if getattr(cfg, name):
            setattr(cfg, name, str(Path(getattr(cfg, name)).expanduser().absolute()))
    cuda = on_cuda(cfg.device)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("train: --device cuda asked for, but torch sees no CUDA device")
    cfg.device = ("cuda" if cuda else "cpu") if cfg.device == "auto" else cfg.device
    if cfg.precision == "auto":
        cfg.precision = "bf16" if cuda else "fp32"
    if cfg.fp32_heads is None:
        cfg.fp32_heads = not cuda and cfg.precision != "fp32"
    if cfg.cuda_graph is None:
        cfg.cuda_graph = cuda
    if cfg.cuda_graph and not cuda:
        raise SystemExit("train: --cuda-graph needs a CUDA device")
    if cfg.cuda_graph and cfg.precision == "fp16":
        say("fp16 needs a dynamic loss scale, which a CUDA graph cannot hold: running without the graph")
        cfg.cuda_graph = False
    builtin = cfg.data is None
    if cfg.image_size == 0:
        cfg.image_size = 224 if cuda or not builtin else 128
    if cfg.batch_size == 0:
        cfg.batch_size = 64 if cuda or not builtin else 32  # configs/resnet18/mlvicx.yaml: batch_size 64
    if cfg.epochs == 0:
        cfg.epochs = 300 if not builtin else (100 if cuda else 4)
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = 2.0 if not builtin else 0.1 * cfg.epochs
    if cfg.log_every == 0:
        cfg.log_every = 10 if cuda else 1
    if builtin and cfg.phantom_size == 0:
        cfg.phantom_size = phantom_size(cfg.image_size)  # saved with the run, so a resume reads the same set
    builtin_lr = builtin and cfg.base_lr is None  # an explicit --base-lr has the official rule
    if cfg.base_lr is None:
        cfg.base_lr = 0.2
    if cfg.lr == 0.0:
        # the official rule gives 0.025 at batch 32, and LARS (eta 1e-3) then moves the weights by
        # ~2.5e-5 of their norm per step: a built-in run of a few hundred steps learns nothing.
        # Measured on the phantom demo: peak lr 1.0 gives +0.053 mean AUC over random init, 0.025 +0.024.
        cfg.lr = BUILTIN_LR if builtin_lr else scaled_lr(cfg.base_lr, cfg.batch_size)
    check_values(cfg)
    return cfg


def check_values(cfg: Config) -> None:
    """Values no run can use stop here, before the run folder is made."""
    values = {_flag(f): getattr(cfg, f.name) for f in dataclasses.fields(Config)}
    bad = [f"{flag} {v} (must be a finite number)" for flag, v in values.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # NaN passes every comparison below
        raise SystemExit("train: " + "; ".join(bad))
    bad = [f"--{name.replace('_', '-')} {getattr(cfg, name)} (must be >= {low})"
           for name, low in (("epochs", 1), ("keep", 1), ("max_steps", 0), ("ckpt_every", 0),
                             ("warmup_epochs", 0), ("lr", 0), ("base_lr", 0), ("weight_decay", 0), ("image_size", 16),
                             ("dim", 0),
                             ("phantom_n", 16), ("log_every", 1), ("seed", 0))
           if getattr(cfg, name) < low]
    bad += [f"{flag} {getattr(cfg, name)} (must be >= 0)" for name, flag in (("lambda_", "--lambda"),
                                                                              ("global_weight", "--global-weight"))
            if getattr(cfg, name) < 0]
    if cfg.batch_size < 2:  # per process, checked again when the process count is known
        bad.append(f"--batch-size {cfg.batch_size} (must be >= 2: the variance term and batch norm need two samples)")
    if 0 < cfg.phantom_size < 32:
        bad.append(f"--phantom-size {cfg.phantom_size} (must be 0 or >= 32)")
    if cfg.lambda_ == 0 and cfg.global_weight == 0:
        bad.append("--lambda 0 with --global-weight 0 (no loss left to train on)")
    if bad:
        raise SystemExit("train: " + "; ".join(bad))


# --------------------------------------------------------------------------------------------
# The network for two views (one module, so DDP, torch.compile and a CUDA graph see one call)
# --------------------------------------------------------------------------------------------
class TwoViews(torch.nn.Module):
    """z1, m1, z2, m2 = net(x1, x2): the MLVICX network on each view (BN statistics per view,
    as the official code's two separate forward passes). A head whose loss weight is 0 (the
    ablations) is not run: its outputs are None and its parameters get no gradient, under
    DistributedDataParallel as in one process."""

    def __init__(self, model: torch.nn.Module, global_head: bool = True, multilevel_head: bool = True):
        super().__init__()
        self.model = model
        self.heads = dict(global_head=global_head, multilevel_head=multilevel_head)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        z1, m1 = self.model(x1, **self.heads)
        z2, m2 = self.model(x2, **self.heads)
        return z1, m1, z2, m2


def model_args(cfg: Config) -> Dict[str, Any]:
    """The MLVICX constructor arguments a checkpoint records (evaluation rebuilds from them)."""
    from .models.mlvicx import PRESETS

    dim = cfg.dim or PRESETS[cfg.preset]["dim"]
    return dict(preset=cfg.preset, in_chans=cfg.in_chans, dim=dim, final_bn=PRESETS[cfg.preset]["final_bn"])


def build_model(cfg: Config) -> torch.nn.Module:
    from .models.mlvicx import MLVICX

    model = MLVICX(**model_args(cfg), backend=cfg.backend, aggregation=cfg.aggregation, fp32_heads=cfg.fp32_heads)
    return model


@dataclass
class Training:
    model: torch.nn.Module
    opt: LARS
    scaler: torch.amp.GradScaler
    lr: torch.Tensor
    step: Any  # step(x1, x2) -> tensor [loss, six terms]


def load_init(path: str, in_chans: int) -> Dict[str, torch.Tensor]:
    """The backbone state_dict --init names (see its help), or SystemExit saying why not."""
    from .evaluate import EvaluationError, load_pretrained_encoder

    try:
        return load_pretrained_encoder(path, in_chans=in_chans, backend="torch").state_dict()
    except (FileNotFoundError, EvaluationError) as e:
        raise SystemExit(f"train: --init {path}: {e}") from None


def build_training(cfg: Config, device: torch.device, world: int = 1,
                   backbone_state: Optional[Dict[str, torch.Tensor]] = None) -> Training:
    """The network (SyncBatchNorm and DDP when world > 1), MLVICXLoss, LARS, and the step function.
    backbone_state: weights for the ResNet18 backbone (--init), loaded before anything else."""
    model = build_model(cfg)
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    model = model.to(device)
    if world > 1:
        model = convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # an ablation's zero-weight head is not run, so no gradient reaches it and LARS leaves it as it is
    net: torch.nn.Module = TwoViews(model, global_head=cfg.global_weight != 0, multilevel_head=cfg.lambda_ != 0)
    if world > 1:
        # zero gradients in each parameter's own layout before DDP is built, which then makes them
        # views of its buckets: the first backward adds into them. Otherwise the first gradients of
        # the aggregation's 1x1 projections (plain strides on their size-1 dimensions, the
        # parameters channels_last's) were copied into the buckets once, with DDP's warning "Grad
        # strides do not match bucket view strides ... may impair performance" in every run.
        # The heads left off keep no gradient (DDP leaves those of unused parameters alone).
        skip = {id(p) for head in model.modules_off(**net.heads) for p in head.parameters()}
        for p in model.parameters():
            if p.requires_grad and id(p) not in skip:
                p.grad = torch.zeros_like(p)
        # gradients as views of DDP's all-reduce buckets (torch's docs: no copy between gradients
        # and buckets, less peak memory); the gradients stay allocated (zero_grad set_to_none=False)
        # an ablation (--lambda 0 or --global-weight 0) leaves one expander without gradients,
        # which DDP must be told of, or its next step fails waiting for their reduction
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                        gradient_as_bucket_view=True,
                                                        find_unused_parameters=cfg.lambda_ == 0 or cfg.global_weight == 0)
    loss_fn = MLVICXLoss(lambda_=cfg.lambda_, global_weight=cfg.global_weight, gather_distributed=world > 1,
                         backend="auto")
    lr = torch.zeros((), device=device)  # a tensor, so a captured CUDA graph sees each step's value
    opt = LARS(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    run = torch.compile(net) if cfg.compile else net

    def step(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Forward both views, loss, backward, LARS update. Returns [loss, six terms] (float32)."""
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            z1, m1, z2, m2 = run(x1, x2)
        loss, terms = loss_fn(*(None if e is None else e.float() for e in (z1, z2, m1, m2)), return_terms=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)
        zero = torch.zeros((), device=device)
        return torch.stack([loss.detach()] + [terms.get(k, zero) for k in TERMS]).float()

    return Training(model, opt, scaler, lr, step)


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Batch statistics over all processes: torch's SyncBatchNorm on GPUs, ours on CPUs (gloo),
    where torch's refuses to run."""
    if next(model.parameters()).is_cuda:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from .nn.sync_bn import convert_sync_batchnorm_cpu

    return convert_sync_batchnorm_cpu(model)


# --------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous)
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("MLVICX_CACHE", Path.home() / ".cache" / "mlvicx_fast"))


def phantom_size(view: int) -> int:
    """Stored side of the built-in phantom set for `view`-pixel views: 256 (its usual size) unless
    that is over 1.5x the view (the crop-resize does not antialias, so larger crops would alias),
    then the view + 25 % rounded up to a multiple of 4 (160 px for the CPU run's 128 px views)."""
    return 256 if 1.5 * view >= 256 else 4 * math.ceil(1.25 * view / 4)


def resolve_data(cfg: Config):
    """(prepared folder, split) for --data; with none, the built-in phantom set (built once, cached)."""
    if cfg.data is None:
        # one phantom set whatever --seed says: the seed varies the run (order, augmentation,
        # initialisation), not the data, and a new seed does not build another set
        size = cfg.phantom_size or phantom_size(cfg.image_size)
        root = cache_dir() / (f"phantom-n{cfg.phantom_n}-seed{PHANTOM_SEED}" + ("" if size == 256 else f"-{size}px"))
        if is_main():
            from .data.prepare import ensure_phantom

            if not (root / "nih" / "meta.json").is_file():
                say(f"building the built-in phantom chest X-ray set ({cfg.phantom_n} images, {size} px) "
                    f"in {root} (once)")
            ensure_phantom(root, n=cfg.phantom_n, seed=PHANTOM_SEED, size=size)
        if dist.is_initialized():
            dist.barrier()
        return root / "nih", "train"
    p = Path(cfg.data).expanduser()
    if p.suffix == ".beton":
        folder, split = p.parent, p.stem
    else:
        folder, split = p, "train"
    if not p.exists():
        raise SystemExit(f"train: --data {cfg.data} does not exist")
    if not (folder / "meta.json").is_file():
        raise SystemExit(f"train: --data {cfg.data} is not a prepared dataset (no meta.json in {folder}); "
                         "make one with python -m mlvicx_fast.data.prepare")
    return folder, split


class Joined(NamedTuple):
    """The processes of one torchrun attempt, met in its store before the process group exists."""
    store: "dist.Store"  # a namespace fresh for this attempt, the same on every process
    rank: int
    world: int
    restarts: int  # the largest TORCHELASTIC_RESTART_COUNT of the attempt's processes (>= 1 after an earlier attempt)


def join_processes() -> Optional[Joined]:
    """With several processes (WORLD_SIZE > 1): meet the others in the env:// store and agree on
    a fresh namespace for the process group and on whether this attempt is a restart.

    torchrun's workers share one store server across restarts (its static and its c10d
    rendezvous alike), so the keys a failed attempt's process group wrote are still there; and its
    restart count is the agent's own: an agent whose processes did not fail restarts them for the
    others without counting it. A prefix taken from that count split a two-node restart between
    two namespaces (a hang, or a connection to a dead process), and the node whose count stayed 0
    started the run over. See mlvicx_fast.distributed.elastic_store_and_restarts."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from .distributed import elastic_store_and_restarts

    store, rank, world = next(dist.rendezvous("env://"))
    fresh, restarts = elastic_store_and_restarts(store, rank, world)
    return Joined(fresh, rank, world, restarts)


def setup_distributed(cfg: Config, joined: Optional[Joined] = None):
    """(rank, process count), the process group initialised when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    # every process checks the same values, so all stop alike (after the store handshake, before
    # the process group)
    if cfg.batch_size % world:
        raise SystemExit(f"train: --batch-size {cfg.batch_size} must be divisible by the {world} processes")
    if cfg.batch_size // world < 2:
        raise SystemExit(f"train: --batch-size {cfg.batch_size} over {world} processes leaves {cfg.batch_size // world} "
                         "per process; batch norm needs at least 2 (--batch-size is the global batch)")
    joined = joined or join_processes()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(local)
        cfg.device = f"cuda:{local}"
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, store=joined.store, rank=joined.rank, world_size=joined.world)
    return dist.get_rank(), world


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
class RunLog:
    """log.csv (a row per logged step), epochs.csv, TensorBoard events when tensorboard is installed."""

    STEP_COLUMNS = ["step", "epoch", "lr", "loss", *TERMS, "pairs_per_s", "elapsed_s"]
    EPOCH_COLUMNS = ["epoch", "steps", "mean_loss", "seconds"]

    def __init__(self, run: Path, resume_step: Optional[int], steps_per_epoch: int):
        """resume_step: the step a resumed run continues from. Its files are kept up to that step
        and continued; rows past it (logged after the checkpoint, by the run that stopped or by a
        continuation being replaced) are dropped, so the log never holds a step twice. The epoch
        that step is in is logged again when it ends. None (a new run): the files start anew."""
        keep_step = (lambda r: int(r["step"]) <= resume_step) if resume_step is not None else None
        keep_epoch = (lambda r: int(r["epoch"]) < resume_step // steps_per_epoch) if resume_step is not None else None
        self._steps, self.steps = self._open(run / "log.csv", self.STEP_COLUMNS, keep_step)
        self._epochs, self.epochs = self._open(run / "epochs.csv", self.EPOCH_COLUMNS, keep_epoch)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events of the steps past the resumed one, as the csv rows
            self.tb = SummaryWriter(str(run / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    @staticmethod
    def _open(path: Path, columns: List[str], keep):
        if keep is None or not path.is_file():  # a new run: the file starts anew
            f = open(path, "w", newline="")
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            return f, writer
        # a resumed run: the kept rows replace the file atomically (rewritten in place, a kill before
        # the next flush left it empty or cut short), then new rows are appended
        with open(path, newline="") as f:
            old = f.read().replace("\0", "")  # a power cut can leave NUL bytes at the end
        # a kill leaves the last line cut short (wherever the write buffer ended): dropped, as a
        # step cut to "12" would otherwise pass for step 12 a second time, with no values
        complete = [r for r in csv.DictReader(io.StringIO(old, newline=""))
                    if None not in r and all(r.get(c) is not None for c in columns)]
        rows = [r for r in complete if keep(r)]
        text = io.StringIO(newline="")
        kept = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        kept.writeheader()
        kept.writerows(rows)
        atomic_write_text(path, text.getvalue())
        f = open(path, "a", newline="")
        return f, csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")

    def step(self, row: Dict[str, float]) -> None:
        self.steps.writerow(row)
        if self.tb is not None:
            for k in ("loss", "lr", "pairs_per_s", *TERMS):
                if isinstance(row.get(k), (int, float)):  # a term of a zero-weight loss is logged as ""
                    self.tb.add_scalar(k, row[k], row["step"])

    def epoch(self, row: Dict[str, float]) -> None:
        self.epochs.writerow(row)

    def flush(self) -> None:
        """To disk (before each checkpoint, so a killed run's log holds every step it saved)."""
        for f in (self._steps, self._epochs):
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self._steps.close()
        self._epochs.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(run: Path) -> Optional[Path]:
    """loss.png from log.csv: the total loss and the six unweighted terms against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no loss.png")
        return None
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, [float(r["loss"]) for r in rows])
    axes[0].set(title="MLVICX loss", xlabel="step", ylabel="loss")
    for key in TERMS:
        values = [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]
        if not all(math.isnan(v) for v in values):
            axes[1].plot(steps, values, label=key)
    axes[1].set(title="unweighted terms", xlabel="step", yscale="log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = run / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------
# options that may change when a run is continued (when given); everything else comes from the
# checkpoint. The last five change how a step runs, not what it computes (precision and fp32_heads
# change its rounding): a run moved from a GPU to a CPU needs them.
RESUME_OVERRIDES = ("resume", "out", "max_steps", "workers", "log_every", "ckpt_every", "keep", "device", "quiet",
                    "cuda_graph", "compile", "channels_last", "precision", "fp32_heads",
                    "data")  # the same dataset moved (its steps per epoch are checked against the run's)


def find_checkpoint(path: str) -> Tuple[Path, Dict[str, Any]]:
    """(path, state) of the checkpoint --resume names: a .pt file, or a run folder's newest
    checkpoint that loads (a damaged newer one is reported and passed over)."""
    p = Path(path)
    if p.is_file():
        try:
            state = load(p)
        except UnsafeCheckpoint as e:
            raise SystemExit(f"train: --resume {path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - torch raises many kinds; say what the file is not
            raise SystemExit(f"train: --resume {path}: could not read it as a checkpoint "
                             f"({type(e).__name__}: {e})") from None
        missing = [k for k in ("optimizer", "rng", "step", "config") if k not in state]
        if missing:
            raise SystemExit(f"train: --resume {path}: not a training checkpoint (it has no {', '.join(missing)}"
                             f"{'; final.pt holds the weights only' if p.name == 'final.pt' else ''}); resume from "
                             "the run folder or one of its checkpoints/ckpt-*.pt")
        return p, state
    manager = CheckpointManager(p / "checkpoints")
    found = manager.list() if p.is_dir() else []
    try:
        good = manager.load_latest() if found else None
    except UnsafeCheckpoint as e:
        raise SystemExit(f"train: --resume {path}: {e}") from None
    if good is None:
        raise SystemExit(f"train: --resume {path}: no checkpoint there that loads (expected a .pt file or a run "
                         "folder with checkpoints/ckpt-*.pt)")
    if good[0] != found[-1][1]:
        say(f"--resume: {found[-1][1]} does not load (damaged?); using {good[0]}, the newest that does")
    return good


def run_folder_of(ckpt: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (run/checkpoints/ckpt-*.pt), or None."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def resume_config(given: Dict[str, Any], ckpt_path: Path, saved: Dict[str, Any]) -> Config:
    """The saved run's configuration, with the RESUME_OVERRIDES among the options given
    (:func:`given_options`). The run folder is the checkpoint's own unless --out names another."""
    names = {f.name: _flag(f) for f in dataclasses.fields(Config)}
    ignored = sorted(set(given) - set(RESUME_OVERRIDES) - {"config"})
    if ignored:
        say(f"--resume keeps the run's own settings; ignoring {', '.join(names[k] for k in ignored)}")
    saved = saved_config(saved)
    out = dict(saved, **{k: v for k, v in given.items() if k in RESUME_OVERRIDES})
    if "out" not in given:
        folder = run_folder_of(ckpt_path)
        out["out"] = str(folder) if folder is not None else saved["out"]
    if str(out["device"]).startswith("cuda") and "device" not in given and not torch.cuda.is_available():
        say(f"--resume: the run was on {out['device']} and this machine has no CUDA device; continuing on the CPU")
        out["device"] = "cpu"
    if out["cuda_graph"] and "cuda_graph" not in given and not on_cuda(out["device"]):
        say("--resume: this machine has no CUDA device; continuing without the run's CUDA graph")
        out["cuda_graph"] = False
    return Config(**out)


def saved_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A configuration saved by any version, complete: the options added since had their defaults
    (and a built-in run from before 2026-12-02 read the 256 px phantom set, one from before
    2026-12-04 ran its expanders in the autocast dtype)."""
    out = dataclasses.asdict(Config())
    if saved.get("data") is None and "phantom_size" not in saved:
        out["phantom_size"] = 256
    out["fp32_heads"] = False
    out.update({k: v for k, v in saved.items() if k in out})
    return out


# what two runs' configurations may differ in and still be one run: the options a resume may
# change, and the config file's name
SAME_RUN_SKIP = frozenset(RESUME_OVERRIDES) | {"config"}


def run_differences(have: Dict[str, Any], want: Dict[str, Any], skip=SAME_RUN_SKIP) -> List[str]:
    """The options in which a saved run (have, see saved_config) differs from want (both resolved
    configurations), as 'flag value (the run: value)', the options in skip aside."""
    have = saved_config(have)
    flags = {f.name: _flag(f) for f in dataclasses.fields(Config)}
    return [f"{flags[k]} {want[k]} (the run: {have[k]})" for k in flags
            if k not in skip and k in want and have[k] != want[k]]


def folder_config(folder: Path) -> Optional[Dict[str, Any]]:
    """The configuration a run folder's config.json holds, or None (no file, or not one that reads)."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def resumed_folder(ckpt_path: Path, saved: Dict[str, Any]) -> Optional[Path]:
    """The folder of the run a checkpoint continues: the run folder it lies in, or else (a copy
    moved elsewhere) the folder it was saved from, when that folder still holds the same run or none
    (another run there since is not this one's to write over)."""
    folder = run_folder_of(ckpt_path)
    if folder is not None:
        return folder
    folder = Path(saved["out"])
    there = folder_config(folder)
    if not run_contents(folder) or (there is not None and not run_differences(there, saved_config(saved))):
        return folder
    return None


def run_contents(folder: Path) -> List[str]:
    """What in folder a new run there would replace: its step checkpoints, final.pt and logged
    steps (a folder left by a run that stopped before its first step holds none of them)."""
    found = []
    n = len(CheckpointManager(folder / "checkpoints").list())
    if n:
        found.append(f"{n} checkpoint(s)")
    if (folder / "final.pt").is_file():
        found.append("final.pt")
    log = folder / "log.csv"
    if log.is_file():
        with open(log, newline="") as f:
            rows = sum(1 for _ in csv.DictReader(f))
        if rows:
            found.append(f"log.csv with {rows} step(s)")
    return found


def check_run_folder(cfg: Config, own: Optional[Path]) -> None:
    """A new run (or a continuation written to another --out) stops here when --out holds another
    run: its checkpoints would be pruned as if they were the new run's, its logs started anew.
    own: the folder of the run being resumed (writing there is the point of --resume)."""
    if not cfg.out:
        return  # a new default folder, see claim_run_folder
    run = Path(cfg.out)
    if own is not None and run.resolve() == own.resolve():  # the same folder however spelled (links, ..)
        return
    found = run_contents(run)
    if found:
        resumable = bool(CheckpointManager(run / "checkpoints").list())  # a run stopped before its first has none
        hint = (f"continue it with --resume {run}, " if resumable else "") + "give another --out, or remove it"
        raise SystemExit(f"train: --out {run} already holds a run ({', '.join(found)}); a new run there would "
                         f"replace them: {hint}")


def claim_run_folder(cfg: Config) -> Path:
    """The run folder, made: --out, or a new runs/<date>-<time> (-2, -3, ... when that exists: two
    runs started in the same second get a folder each; mkdir is the atomic claim)."""
    if cfg.out:
        run = Path(cfg.out)
        run.mkdir(parents=True, exist_ok=True)
        return run
    base = Path("runs").absolute() / time.strftime("%Y%m%d-%H%M%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        run = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
    raise SystemExit(f"train: could not make a new run folder beside {base}")


def lock_run_folder(run: Path):
    """Hold run/.lock (an exclusive flock) while this process writes the run folder: a second run
    on the folder meanwhile (the same command in two terminals, a resume of a run still going)
    stops naming the writer, instead of both writing one set of checkpoints. The lock ends with the
    process however it ends. The open file (keep it open), or None where there are no locks."""
    try:
        import fcntl
    except ImportError:  # not on a POSIX system
        return None
    f = open(run / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"train: {run} is being written by another run ({holder}); wait for it to end, "
                         "or give another --out") from None
    except OSError:
        f.close()
        return None  # a file system without locks (some network mounts)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def elastic_restarts(given: Dict[str, Any]) -> int:
    """How often torchrun has restarted this process's workers (its --max-restarts), 0 outside
    torchrun; with several processes they agree on the largest count (join_processes). Restarted
    processes continue the run from its folder, so that folder must be known: a new default folder
    each time would start the run over."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) and not (given.get("out") or given.get("resume")):
        raise SystemExit("train: torchrun --max-restarts: give --out (or --resume), so that restarted processes "
                         "find the run's folder and continue from its newest checkpoint")
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restart_point(cfg: Config, resumed: Optional[Dict[str, Any]]) -> Tuple[bool, Optional[Tuple[Path, Dict[str, Any]]]]:
    """After a torchrun restart: (whether cfg.out is this run's folder, the newest checkpoint there
    when it is newer than the one resumed from, else None). The folder is this run's when its
    config.json holds this run's configuration (an earlier attempt of the command wrote it); a
    folder of another run is left to check_run_folder, which refuses it as the first attempt did."""
    folder = Path(cfg.out)
    there = folder_config(folder)
    if there is None or run_differences(there, dataclasses.asdict(cfg)):
        return False, None
    if not CheckpointManager(folder / "checkpoints").list():
        return True, None
    path, state = find_checkpoint(str(folder))
    if resumed is not None and state["step"] <= resumed["step"]:
        return True, None
    return True, (path, state)


def unused_name(path: Path) -> Path:
    """path, or path-2, path-3, ... the first that does not exist."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


def resume_notes(saved: Dict[str, Any], cfg: Config, data_given: bool = True) -> List[str]:
    """What a resumed run (cfg, resolved) does differently from the run it continues (saved).
    data_given: --data was given again (else the run's own, maybe saved relative by an old version)."""
    notes = []
    if saved.get("precision") != cfg.precision:
        notes.append(f"--precision {cfg.precision}, the run trained in {saved.get('precision')}: the steps from "
                     "here round differently from an uninterrupted run's")
    elif cfg.precision != "fp32" and not on_cuda(cfg.device) and on_cuda(str(saved.get("device", "cpu"))):
        notes.append(f"the run's {cfg.precision} autocast continues on the CPU (--precision fp32 changes it; "
                     "the steps then round differently)")
    for name, flag in (("channels_last", "--channels-last"), ("compile", "--compile"), ("fp32_heads", "--fp32-heads")):
        if bool(saved.get(name)) != bool(getattr(cfg, name)):
            state = flag if getattr(cfg, name) else "--no-" + flag[2:]
            notes.append(f"{state}, unlike the run: the same steps, rounded slightly differently")
    if data_given and saved.get("data") != cfg.data:
        notes.append(f"reading {cfg.data or 'the built-in phantom set'} (the run read "
                     f"{saved.get('data') or 'the built-in phantom set'}); its steps per epoch are checked")
    return notes


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    pass


def first_non_finite(steps: List[int], values: torch.Tensor) -> Tuple[int, Optional[str]]:
    """values: (k, 7) = loss and the six terms of k steps. (index of the first bad step, a message
    naming it and its bad terms), or (k, None) when every value is finite."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return len(steps), None
    row = int(bad.any(dim=1).nonzero()[0])
    names = [name for name, b in zip(("loss", *TERMS), bad[row].tolist()) if b]
    detail = ", ".join(f"{n} = {values[row, i].item()}" for i, n in enumerate(("loss", *TERMS)) if n in names)
    return row, f"non-finite loss at step {steps[row]} ({detail})"


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
        return _train(argv, held)


def _train(argv: Optional[List[str]], held: contextlib.ExitStack) -> int:
    given = given_options(argv)
    restarts = elastic_restarts(given)
    joined = join_processes()  # before anything that depends on whether this is a restart
    if joined is not None and (given.get("out") or given.get("resume")):
        # a restart the agents did not count (see elastic_store_and_restarts) continues the run as
        # a counted one does; without a folder named there is no run to continue (each attempt
        # starts one in a new default folder, as before)
        restarts = joined.restarts
    cfg = Config(**given)
    resumed: Optional[Dict[str, Any]] = None
    own: Optional[Path] = None  # the folder of the run continued (a resume writes there)
    if cfg.resume:
        source = Path(cfg.resume)
        if restarts and not source.exists() and run_folder_of(source) is not None:
            # the attempt before continued from this checkpoint into its folder, and --keep pruned
            # it there: the folder's newest checkpoint is where this run stands
            source = run_folder_of(source)
        ckpt_path, resumed = find_checkpoint(str(source))
        cfg = resume_config(given, ckpt_path, resumed["config"])
        own = resumed_folder(ckpt_path, resumed["config"])
    cfg = resolve(cfg)
    if restarts:
        # torchrun started the processes again (--max-restarts): the run continues from the newest
        # checkpoint its folder holds, which an earlier attempt of this command may have written
        is_own, newer = restart_point(cfg, resumed)
        own = Path(cfg.out) if is_own else own
        if newer is not None:
            ckpt_path, resumed = newer
            overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDES and k != "resume"}
            cfg = resolve(resume_config(dict(overrides, resume=cfg.out), ckpt_path, resumed["config"]))
        say(f"torchrun restart {restarts}: " + (f"continuing from {ckpt_path}" if resumed is not None
                                                else "no checkpoint of this run yet; starting it again"))
    if resumed is not None:
        for note in resume_notes(resumed["config"], cfg, data_given="data" in given):
            say(f"--resume: {note}")
    # before any work (the phantom build, the loader): a --out holding another run stops here
    check_run_folder(cfg, own)
    rank, world = setup_distributed(cfg, joined)
    if world > 1 and cfg.cuda_graph:
        say("a CUDA graph around DistributedDataParallel's all-reduces is not validated yet: running without it")
        cfg.cuda_graph = False
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        make_deterministic()
    from .data.loader import drop_numba_finalizer_errors, make_loader, resolve_device

    drop_numba_finalizer_errors()  # see mlvicx_fast/data/loader.py

    device = resolve_device(cfg.device)  # cuda gets its index, as the loader's batches have
    if device.type == "cuda":
        # streams, CUDA-graph capture and the Triton launches all use the current device
        torch.cuda.set_device(device)
    else:
        reuse_freed_memory()  # ~20 % off a CPU step (see mlvicx_fast/host.py)

    data_dir, split = resolve_data(cfg)  # a missing or wrong --data stops here, before any other work
    init_state = None
    if cfg.init and resumed is None:  # so does a wrong --init; a resumed run has its own weights
        init_state = load_init(cfg.init, cfg.in_chans)
        say(f"backbone initialised from {cfg.init}")
    view_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
    loader = make_loader(data_dir, split=split, mode="pretrain", batch_size=cfg.batch_size // world,
                         size=cfg.image_size, workers=cfg.workers or None, device=device, seed=cfg.seed,
                         channels=cfg.in_chans, backend=cfg.backend, out_dtype=view_dtype,
                         rank=rank, world_size=world, shuffle=True, drop_last=True)  # any split, e.g. --data x/val.beton
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        per = f" ({cfg.batch_size // world} per process)" if world > 1 else ""
        raise SystemExit(f"train: {data_dir} split {split!r} holds fewer images than one batch of "
                         f"{cfg.batch_size}{per}; lower --batch-size")
    if resumed is not None and resumed.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise SystemExit(f"train: --resume: {data_dir} split {split!r} gives {steps_per_epoch} steps per epoch, the run "
                         f"took {resumed['steps_per_epoch']}: not the dataset the run was started on")
    schedule_steps = cfg.epochs * steps_per_epoch  # the lr schedule spans all epochs ...
    total_steps = min(schedule_steps, cfg.max_steps) if cfg.max_steps else schedule_steps  # ... --max-steps only stops early
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    run, problem = None, None
    if is_main():
        try:
            run = claim_run_folder(cfg)
            lock = lock_run_folder(run)
            if lock is not None:
                held.callback(lock.close)
        except SystemExit as e:
            problem = str(e)
    if world > 1:  # the default folder's name is rank 0's (another process may start a second later), so is a refusal
        box = [(str(run) if run is not None else None, problem)]
        dist.broadcast_object_list(box, src=0)
        name, problem = box[0]
        run = Path(name) if name else None
    if problem:
        raise SystemExit(problem)
    assert run is not None
    cfg.out = str(run)
    if is_main():
        atomic_write_text(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    ckpts = CheckpointManager(run / "checkpoints", keep=cfg.keep)
    if resumed is not None and is_main():
        # resuming from an older checkpoint of this folder: its later ones belong to the
        # continuation being replaced; moved aside, they neither crowd out the new ones when
        # --keep prunes nor get picked by a later --resume
        later = [path for s, path in ckpts.list() if s > resumed["step"]]
        final = run / "final.pt"  # so is a final.pt of theirs: evaluate would take it for this run's
        if final.is_file() and load(final).get("step", 0) > resumed["step"]:
            later.append(final)
        if later:
            # a second continuation set aside from the same step gets a folder of its own
            aside = unused_name(ckpts.folder / f"abandoned-after-{resumed['step']:08d}")
            aside.mkdir(parents=True)
            for path in later:
                path.rename(aside / path.name)
            say(f"--resume from step {resumed['step']}: moved the {len(later)} later checkpoint file(s) to {aside}")

    # network, loss, optimiser, and the step that uses them
    parts = build_training(cfg, device, world, backbone_state=init_state)
    model, opt, scaler, lr_now = parts.model, parts.opt, parts.scaler, parts.lr
    step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        opt.param_groups[0]["lr"] = lr_now
        if resumed["scaler"]:  # empty when saved without fp16 (a disabled scaler), e.g. resumed with --precision fp16
            scaler.load_state_dict(resumed["scaler"])
        set_rng_state(resumed["rng"])
        step = resumed["step"]
        say(f"resuming {run} at step {step} from {ckpt_path}")
        if resumed.get("world_size", world) != world:
            say(f"--resume: {world} process(es) now, {resumed['world_size']} before: each process reads its own shard "
                "with its own augmentation draws, so the steps from here differ from an uninterrupted run's "
                "(exactly the same needs the same number of processes)")
        if step >= total_steps:
            say(f"--resume: the run has taken all its {total_steps} steps already; nothing to train "
                "(--max-steps sets a later stop)")
    present = [cfg.global_weight != 0] * 3 + [cfg.lambda_ != 0] * 3
    run_step = parts.step
    if cfg.cuda_graph:
        from .cuda_graph import GraphedStep

        run_step = GraphedStep(parts.step, model, opt)

    log = RunLog(run, step if resumed is not None else None, steps_per_epoch) if is_main() else None
    stop = {"requested": 0}  # the signal number asked to stop with, 0 for none

    def on_signal(signum, frame):
        """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption; torchrun passes Ctrl-C on to its
        processes as SIGTERM): finish the step, save, stop. A second Ctrl-C quits at once."""
        if stop["requested"]:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        stop["requested"] = signum
        say_in_handler(f"{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping "
                       "(Ctrl-C again to quit now)")

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop_agreed(sync_point: bool) -> bool:
        """Whether to stop after this step. With several processes they decide together, at steps
        they all reach (the loss reads and checkpoints), so all stop after the same step; a signal
        seen by one process stops them all."""
        if world == 1:
            return bool(stop["requested"])
        if not sync_point:
            return False
        flag = torch.tensor([float(stop["requested"])], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        # every process returns the value agreed on, and none drops its own request: a signal that
        # arrives during the all-reduce (or while .item() waits for it) is sent at the next sync
        # point. (Reading stop["requested"] before .item() and storing after it lost such a
        # signal, and returning a request the others had not seen stopped one process alone.)
        agreed = int(flag.item())
        if agreed and not stop["requested"]:
            stop["requested"] = agreed
        return bool(agreed)

    def weights_state() -> Dict[str, Any]:
        """What evaluation needs (final.pt); step checkpoints add what resuming needs."""
        return dict(kind="mlvicx-pretrain", model=model.state_dict(), model_args=model_args(cfg),
                    step=step, epoch=step // steps_per_epoch, config=dataclasses.asdict(cfg))

    def save(reason: str) -> Optional[Path]:
        # a finite loss does not make finite weights: the update after it can still overflow (one
        # inf gradient element is NaN through LARS's trust ratio). Every process checks (DDP keeps
        # them equal), so all stop together, and a checkpoint is only ever one to resume from.
        if not finite_state(model, opt):
            raise NonFiniteLoss(f"non-finite parameters or momenta after the update of step {step} "
                                "(its loss was finite)")
        if not is_main():
            return None
        if log is not None:
            log.flush()  # the log holds every step the checkpoint does, whatever stops the run next
        state = dict(weights_state(), optimizer=_optimizer_state(opt), scaler=scaler.state_dict(),
                     rng=rng_state(), reason=reason, steps_per_epoch=steps_per_epoch, world_size=world,
                     epoch_losses=list(epoch_losses))  # the losses so far of the epoch in progress
        return ckpts.save(step, state)

    from .progress import progress

    bar = progress(total=total_steps, initial=step, disable=not is_main() or cfg.quiet, unit="step",
                   dynamic_ncols=True)
    pending_steps: List[int] = []
    pending_lrs: List[float] = []
    pending: List[torch.Tensor] = []
    t_last, steps_last, start = time.perf_counter(), step, time.perf_counter()
    # a run resumed inside an epoch averages that epoch over all its steps, not the ones after the resume
    epoch_losses: List[float] = list(resumed.get("epoch_losses", [])) if resumed and step % steps_per_epoch else []
    status = 0
    # what the first step does beyond a step (so a long silence on a GPU has a stated cause)
    first_call = " and ".join(what for what, on in (("compiling the network", cfg.compile),
                                                    ("capturing the CUDA graph", cfg.cuda_graph)) if on) or None
    try:
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            for i, (x1, x2) in enumerate(loader):
                if i < offset:  # resuming inside an epoch: same order and augmentation draws as before
                    continue
                lr = warmup_cosine_lr(step, schedule_steps, warmup_steps, cfg.lr)
                lr_now.fill_(lr)
                if first_call is not None:
                    say(f"first step: {first_call} (can take minutes; later steps replay it)")
                    t_first = time.perf_counter()
                values = run_step(x1, x2)
                if first_call is not None:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    say(f"first step took {time.perf_counter() - t_first:.1f} s")
                    first_call = None
                step += 1
                pending_steps.append(step)
                pending_lrs.append(lr)
                pending.append(values)
                end_of_epoch = step % steps_per_epoch == 0
                ckpt_due = end_of_epoch or step == total_steps or bool(cfg.ckpt_every and step % cfg.ckpt_every == 0)
                stopping = stop_agreed(ckpt_due or len(pending) >= cfg.log_every)
                ckpt_due = ckpt_due or stopping
                if len(pending) >= cfg.log_every or ckpt_due:
                    vals = torch.stack(pending).cpu()  # absent terms are 0 (see build_training's step)
                    good, problem = first_non_finite(pending_steps, vals)
                    now = time.perf_counter()
                    rate = (step - steps_last) * cfg.batch_size / max(now - t_last, 1e-9)
                    t_last, steps_last = now, step
                    for s, lr_s, v in zip(pending_steps[:good], pending_lrs, vals[:good].tolist()):
                        epoch_losses.append(v[0])
                        if log is not None:
                            row = dict(step=s, epoch=(s - 1) // steps_per_epoch, lr=lr_s, loss=v[0],
                                       pairs_per_s=rate, elapsed_s=now - start)
                            row.update({k: (x if p else "") for k, x, p in zip(TERMS, v[1:], present)})
                            log.step(row)
                    if problem:  # the finite steps before it are logged
                        raise NonFiniteLoss(problem)
                    last = vals[-1].tolist()
                    inv, var, cov = last[1:4] if cfg.global_weight != 0 else last[4:7]  # the global terms, if trained
                    bar.set_postfix(refresh=False, loss=f"{last[0]:.3f}", inv=f"{inv:.3g}", var=f"{var:.3g}",
                                    cov=f"{cov:.3g}", pairs_s=f"{rate:.0f}")
                    bar.update(len(pending))
                    pending_steps, pending_lrs, pending = [], [], []
                if ckpt_due:
                    # the epoch's row first, so the checkpoint's flush puts it on disk with the steps
                    # (written after it, a killed run lost the row for good: the resume starts past it)
                    if end_of_epoch and log is not None:
                        log.epoch(dict(epoch=(step - 1) // steps_per_epoch, steps=len(epoch_losses),
                                       mean_loss=sum(epoch_losses) / max(len(epoch_losses), 1),
                                       seconds=time.perf_counter() - start))
                    path = save("interrupt" if stopping else "epoch" if end_of_epoch else "step")
                    t_last = time.perf_counter()  # pairs/s is of the steps: checkpoint writes are left out
                    if end_of_epoch:  # on every process (only rank 0 logs, all keep the list)
                        epoch_losses = []
                    if stopping:
                        raise Interrupted(path)
                if step >= total_steps or end_of_epoch:
                    break
        if is_main():
            remove_stale_temps(atomic_save(weights_state(), run / "final.pt"))
    except NonFiniteLoss as e:
        good = ckpts.list()
        say(f"stopping: {e}. Parameters after it are not saved; last good checkpoint: "
            f"{good[-1][1] if good else 'none'}")
        status = 1
    except Interrupted as e:
        say(f"interrupted at step {step}; saved {e.args[0]}; continue with --resume {run}")
        status = 128 + stop["requested"]  # 130 after Ctrl-C, 143 after SIGTERM
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if log is not None:
            log.close()
        if world > 1:
            dist.destroy_process_group()
    if rank == 0 and status == 0:  # (after destroy_process_group every process counts as main)
        plot = plot_losses(run)
        say(f"done: {step} steps; run folder {run} (final.pt, log.csv{', loss.png' if plot else ''})")
    return status


def finite_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Whether every parameter and every floating-point optimiser state is finite (one host sync)."""
    tensors = list(model.parameters()) + [t for st in opt.state.values() for t in st.values()
                                          if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _optimizer_state(opt: LARS) -> Dict[str, Any]:
    """The optimiser state without the live lr tensor (the schedule recomputes it from the step)."""
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["lr"] = 0.0
    return state


if __name__ == "__main__":
    sys.exit(main())
