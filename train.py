"""Train the world model (baseline / la / vq, wm.py) on Push-T windows, from any token source (state, dinov2, jepa).

Reads DIR (data.py layout; --tokens dinov2 also DIR/{split}/features.npy from `dino.py encode`, else encodes frames
every step, or with --features memory every frame once, into GPU memory as int8). Writes RUN/ckpt.pt (weights,
optimiser, step, configs, data stats and fingerprint, la/vq latent prior, RNG; atomic), config.json and log.jsonl
(validations add the collapse diagnostics defined here). The same --out again resumes exactly (flags given again must
match, except runtime ones such as a raised --steps); the run folder is locked while training.
GPU:  python train.py --data runs/full/data --variant vq --out runs/full/vq     (DINOv2 tokens; H200: not yet measured)
      DINO-WM setting: --num-hist 3 --proprio --cond-dim 10 --batch-size 32 --lr-predictor 5e-4 --lr-action 5e-4;
      multi-GPU: torchrun --standalone --nproc_per_node 4 train.py ... (batch per GPU); unoptimised: --no-compile
      --features off --dtype float32
CPU:  python train.py --data runs/quick/data --variant la --out /tmp/la --tokens state --steps 2000 --batch-size 256
      --depth 4 --heads 4 --dim-head 32 --mlp-dim 512 --dropout 0 ... (`reproduce.sh quick`; ~45 steps/s on one core)
"""
import contextlib
import itertools
import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import dino
import wm
from data import require
from wm import CKPT_FORMAT, WMConfig, WorldModel


@dataclass
class TrainConfig:
    data: str = "runs/data"  # dataset folder written by data.py
    out: str = "runs/baseline"  # run folder; an existing one is resumed
    steps: int = 162000  # optimiser steps; seed: 10 epochs of its 10k subset at batch 64 = 162k
    batch_size: int = 64  # windows per step and process; seed 64, DINO-WM 32
    lr_predictor: float = 5e-5  # AdamW lr of the predictor; seed 5e-5 (DINO-WM code 5e-4)
    lr_action: float = 2e-4  # AdamW lr of the action and proprio encoders; seed 2e-4 (DINO-WM 5e-4)
    lr_idm: float = 2.5e-5  # AdamW lr of the IDM + latent_action_down; seed 2.5e-5
    weight_decay: float = 0.01  # AdamW weight decay, all parameters (torch default, as seed and DINO-WM)
    schedule: Literal["constant", "cosine"] = "constant"  # lr schedule: constant (seed) or cosine to 0 at --steps
    eval_every: int = 2000  # steps between validation + checkpoint (also at the last step)
    val_batches: int = 20  # fixed val batches per validation (deterministic order)
    stats_batches: int = 50  # fixed train batches for the la/vq latent prior (planning's CEM init)
    log_every: int = 100  # steps between log lines (the only host syncs of the loop)
    num_workers: int = -1  # loader processes rendering or reading frames; -1 = one per CPU core (state tokens: 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    seed: int = 0  # seeds model init, data order and dropout; seed 0 as upstream
    labels: int = -1  # baseline: train on a fixed, seeded subset of this many labelled train windows; -1 = all
    dino_weights: str = ""  # DINOv2 .pth, "" = official file from the hub cache, random = tests only
    features: Literal["cache", "memory", "off"] = "cache"  # dinov2: the dino.py cache when one matches (else DINOv2
    # per batch); memory: every frame encoded once at start into device memory as int8; off: DINOv2 on every batch
    compile: bool = True  # torch.compile the predictor and IDM (CUDA only; ignored on CPU)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # CUDA precision: bf16 autocast, or fp32 everywhere (TF32 off)
    dry_run: bool = False  # print this run's GPU time in `reproduce.sh full` (FLOPs from the layer sizes) and exit
    frames: int = 0  # for --dry-run of dinov2 tokens before the dataset exists: its frames (0 = count them in --data)

    def __post_init__(self):
        data.check_choices(self)
        require(min(self.steps, self.batch_size, self.eval_every, self.val_batches, self.stats_batches,
                    self.log_every) >= 1, "--steps, --batch-size, --eval-every, --val-batches, --stats-batches and "
                "--log-every must be >= 1")
        require(min(self.lr_predictor, self.lr_action, self.lr_idm) > 0 and self.weight_decay >= 0,
                "learning rates must be > 0 and --weight-decay >= 0")
        require(self.frames >= 0 and self.num_workers >= -1 and (self.labels == -1 or self.labels >= 1),
                "--frames must be >= 0, --num-workers >= -1, --labels >= 1 (labelled windows) or -1 (all of them)")


# Shape legend: B batch, T = num_hist + 1 frames, P tokens per frame, D token width, A macro action, C cond, L latent.
# Settings a resumed run may change (its folder's path too: runs move); the rest is what the run *is* and must match.
RUNTIME = ("out", "steps", "data", "device", "num_workers", "compile", "log_every", "features", "eval_every",
           "dry_run", "frames")


def lr_factor(step, cfg):
    """Constant, or cosine decay to 0 at cfg.steps (no warm-up: the seed and DINO-WM have none)."""
    return 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps))) if cfg.schedule == "cosine" else 1.0


def encoder_flops(name="dinov2_vits14", size=196):
    """FLOPs of one image at size x size px (2 per multiply-add): patch embed, per block qkv, proj, MLP, attention."""
    D, depth, _, _ = dino.ARCHS[name.removesuffix("_reg")]
    P = (size // dino.PATCH) ** 2
    N = 1 + P + (4 if name.endswith("_reg") else 0)  # CLS, registers, patches
    return 2 * (P * 3 * dino.PATCH ** 2 * D + depth * (12 * N * D * D + 2 * N * N * D))


def model_macs(mc):
    """Multiply-adds per window of the predictor's and (la/vq) the IDM's forward pass, from the layer sizes."""
    W = mc.visual_dim + (mc.proprio_dim if mc.proprio else 0) + mc.cond_dim
    inner, tok = mc.heads * mc.dim_head, mc.num_hist * mc.num_patches
    pred = mc.depth * tok * (4 * W * inner + 2 * W * mc.mlp_dim + 2 * tok * inner)  # full mask computed by SDPA
    if mc.variant == "baseline":
        return pred, 0
    d, S, T = mc.idm_dim, mc.num_patches + 1, mc.num_hist + 1
    block = 8 * d * d + 2 * d * mc.idm_mlp_dim + 2 * (S + T) * d  # per token: spatial + temporal attention, FFN
    # the last block: k, v of every token (spatial attention), the rest for the prompt token only (wm.IDM)
    return pred, T * S * (mc.visual_dim * d + (mc.idm_depth - 1) * block + 2 * d * d) + T * (block - 2 * d * d)


def train_flops(mc):
    """Model FLOPs per training window: 3 x forward (backward = 2x), 2 FLOPs per multiply-add."""
    return 3 * 2 * sum(model_macs(mc))


def resume(cfg, mc, given):
    """-> (cfg, mc, checkpoint or None): a run folder holding ckpt.pt resumes with its own stored settings."""
    path = Path(cfg.out) / "ckpt.pt"
    if not path.exists():
        return cfg, mc, None
    ckpt = data.load_pt(path, "delete it to start over, or choose another --out", fmt=CKPT_FORMAT)
    cfg, mc = data.merge_resume(path, given, (cfg, ckpt["train_config"], RUNTIME), (mc, ckpt["model_config"], ()))
    require(cfg.steps >= ckpt["step"], f"--steps {cfg.steps} is below the step {ckpt['step']} that {path} reached")
    fp = data.load_meta(cfg.data, verify=True)["fingerprint"]
    require(fp == ckpt["data"]["fingerprint"], f"--data {cfg.data} (fingerprint {fp}) is not the dataset {path} was "
                                               f"trained on ({ckpt['data']['root']}, {ckpt['data']['fingerprint']})")
    return cfg, mc, ckpt


def check_finite(first_bad, parts, ckpt_path):
    """Stop at the first non-finite loss part (first_bad: (len(parts),) first bad step or -1, kept on the device)."""
    bad = first_bad.tolist()  # host sync: called only at log and eval steps
    if max(bad) >= 0:
        step = min(s for s in bad if s >= 0)
        names = ", ".join(p for p, s in zip(parts, bad) if s == step)
        raise FloatingPointError(f"non-finite {names} at step {step}: training stopped; the last good checkpoint "
                                 f"{ckpt_path} is left untouched (resume from it, e.g. with a lower lr)")


# ---- Diagnostics (the seed's collapse checks, codebook use, what jepa tokens keep): per validation and in eval.py
# SIGReg aims at a per-dimension std of 1; a median per-dimension jepa token std (eval mode, val frames) below this is
# a collapsed encoder (they sit at 1e-4 and below), which plan.py refuses.
COLLAPSE_STD = 0.01


@torch.no_grad()
def _diagnostic_predictions(model, z, action, proprio, perms):
    """Eval-mode visual predictions of frames 1..n under each cond permutation -> list of (B, n, P, D), target."""
    was = model.training
    model.eval()  # dropout off, no EMA update
    n, D = model.cfg.num_hist, model.cfg.visual_dim
    cond = model.conditioning(z, action)["cond"][:, :n]  # (B, n, C)
    obs = model.observe(z, proprio)[:, :n]  # (B, n, P, O)
    preds = [model.predict(obs, cond if p is None else cond[p])[..., :D].float() for p in perms]
    model.train(was)
    return preds, z[:, 1:].float()


def swap_score(model, z, action=None, proprio=None, num_perms=8, generator=None):
    """Information-bypass score (the seed's collapse check): fraction of (i, perm) where sample i, conditioned on
    A[perm(i)], lands closer to target perm(i) than to its own (margin 1e-3 * median distance). > 0.65 = shortcut."""
    perms = [torch.randperm(z.shape[0], generator=generator).to(z.device) for _ in range(num_perms)]
    preds, tgt = _diagnostic_predictions(model, z, action, proprio, perms)
    tgt = F.normalize(tgt.flatten(1), dim=1)  # (B, n*P*D)
    wins = []
    for perm, pred in zip(perms, preds):
        pred = F.normalize(pred.flatten(1), dim=1)  # (B, n*P*D)
        d_own, d_swap = (pred - tgt).norm(dim=1), (pred - tgt[perm]).norm(dim=1)  # (B,), (B,)
        wins.append((d_swap < d_own - 1e-3 * d_own.median()).float().mean())
    return torch.stack(wins).mean().item()


def shuffle_delta(model, z, action=None, proprio=None, generator=None):
    """Relative MSE increase when the conditioning is permuted within the batch (the seed's check). ~0 = ignored."""
    perm = torch.randperm(z.shape[0], generator=generator).to(z.device)
    (base, shuf), tgt = _diagnostic_predictions(model, z, action, proprio, [None, perm])
    mse_base, mse_shuf = F.mse_loss(base, tgt), F.mse_loss(shuf, tgt)
    return ((mse_shuf - mse_base) / mse_base).item()


def perplexity(codes, K):
    """Codebook usage over a set of code indices (any shape) -> (perplexity exp(H(p)), dead codes = never used)."""
    counts = torch.bincount(codes.flatten(), minlength=K).float()  # (K,)
    p = counts / counts.sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item(), int((counts == 0).sum())


def token_stats(z):
    """Collapse statistics of tokens z (N, D): per-dimension std (min, median), effective rank (exp of the entropy of
    the normalised covariance spectrum, Roy & Vetterli 2007: D = no redundancy, 1 = a line), collapsed flag."""
    z = z.double().flatten(1)  # (N, D)
    std = z.std(0)  # (D,)
    ev = torch.linalg.eigvalsh(torch.cov(z.T)).clamp_min(0)  # (D,)
    p = ev / ev.sum().clamp_min(1e-300)
    rank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum())
    med = std.median().item()
    return {"token_std_min": std.min().item(), "token_std_median": med, "effective_rank": rank.item(),
            "collapsed": med < COLLAPSE_STD}


# What a probe reads from one frame's tokens: agent xy and block xy (px), and the block angle as cos and sin.
PROBE_GROUPS = {"agent": slice(0, 2), "block": slice(2, 4), "angle": slice(4, 6)}


def probe_targets(state):
    """(..., 7) simulator states -> (..., 6) probe targets [agent xy, block xy, cos, sin]."""
    s = torch.as_tensor(state, dtype=torch.float64)
    return torch.cat([s[..., :4], s[..., 4:5].cos(), s[..., 4:5].sin()], -1)


def probe_r2(x_fit, y_fit, x, y):
    """R^2 of a linear probe per group of PROBE_GROUPS (mean over its dims); NaN with too few frames."""
    pred = wm.linear_probe(x_fit, y_fit, x)
    r = wm.r2(pred, y.double()) if pred is not None else torch.full((y.shape[1],), math.nan)  # (6,)
    return {f"probe_{k}": r[s].mean().item() for k, s in PROBE_GROUPS.items()}


@torch.no_grad()
def evaluate(model, val_loader, stats_loader, input_of, device, ctx, seed):
    """Validation metrics (one-step latent MSE of the visual dims; la/vq: the seed's collapse diagnostics) and la/vq's
    CEM prior, per-dim mean/std of pre-VQ IDM latents of train transitions (the seed sampled N(0, 1); its IDM's latents
    had per-dim means and stds of about 2)."""
    model.eval()
    variant, rows, codes, toks = model.cfg.variant, [], [], []
    g = torch.Generator().manual_seed(seed)  # same permutations at every validation
    for batch in val_loader:
        a, p = batch["action"].to(device), batch["proprio"].to(device)
        with ctx:
            out = model(input_of(batch), a, p)
            z = out["tokens"]  # (B, T, P, D)
            row = {"val_latent_mse": out["visual_loss"].item(), "val_loss": out["pred_loss"].item()}
            if variant != "baseline":
                row.update(swap_score=swap_score(model, z, a, p, generator=g),
                           shuffle_delta=shuffle_delta(model, z, a, p, generator=g))
        if variant == "vq":
            codes.append(out["codes"].flatten())
        if model.encoder is not None:  # jepa: first-frame tokens and states for the collapse statistics and probes
            toks.append((z[:, 0].float().cpu(), batch["state"][:, 0]))
        rows.append(row)
    metrics = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}  # means over the batches
    require(math.isfinite(metrics["val_loss"]), "the validation loss is not finite: a corrupt feature cache? rebuild "
                                                "it with `python dino.py encode --data DIR --overwrite`")
    if codes:
        metrics["perplexity"], metrics["dead_codes"] = perplexity(torch.cat(codes), model.cfg.num_codes)
    if toks:
        trained = model.encoder.convs[1].num_batches_tracked.item() > 0  # step 0: BatchNorm has no statistics yet
        metrics.update(jepa_metrics(torch.cat([t[0] for t in toks]), torch.cat([t[1] for t in toks]), trained))
    prior = {}
    if variant != "baseline":
        with ctx:
            lat = torch.cat([model.conditioning(model.encode(input_of(b)))["latent"].flatten(0, 1).float()
                             for b in stats_loader])  # (N, L)
        prior = {"latent_mean": lat.mean(0).tolist(), "latent_std": lat.std(0).tolist(), "latent_count": lat.shape[0]}
    model.train()
    return metrics, prior


def jepa_metrics(z, state, warn=True):
    """jepa tokens (N, 1, D) of val frames, states (N, 7) -> token_stats, probe_r2 (fit on half, scored on the rest)."""
    h, y = len(z) // 2, probe_targets(state)
    m = {**token_stats(z), **probe_r2(z[:h], y[:h], z[h:], y[h:])}
    if m["collapsed"] and warn:
        print(f"WARNING: the jepa encoder has collapsed: median per-dimension token std {m['token_std_median']:.2e} "
              f"< {COLLAPSE_STD} (plan.py will refuse this run)")
    return m


# --dry-run plans the seed's table before anything exists: FLOPs from the layer sizes at an ASSUMED rate (~30 % of an
# H200's 989 dense bf16 TFLOP/s, small 384-wide ViTs rarely do better; ~60 % of its 67 fp32; gpu-check measures it).
ASSUMED_TFLOPS, GPU_BYTES = {"bfloat16": 300, "float32": 40}, 139 * 2 ** 30  # one H200, as torch reports it
SEED_PAIRS, SEED_PLANS = 110_000, {"open-loop": (100, 1, 10), "mpc": (50, 2, 30)}  # decoder pairs; tasks, solves, iters


def dry_run(cfg, mc, ckpt):
    """One `estimate STAGE: N GPU-s` line per stage of this run in `reproduce.sh full` (training, la/vq: decoder
    labels, planning SEED_PLANS), the feature mode's disk or GPU memory checked; writes RUN/config.json for later."""
    require(mc.tokens != "jepa", "--dry-run covers --tokens state and dinov2")
    root, start = Path(cfg.data), ckpt["step"] if ckpt else 0
    have = (root / "meta.json").is_file()
    mc = wm.derive(mc, data.load_meta(root) if have else {"img_size": 224})  # no dataset yet: collect's 224 px
    frames = sum(len(data.load_split(root, s)["states"]) for s in ("train", "val")) if have else cfg.frames
    require(frames or mc.tokens == "state", f"--dry-run: --data {root} does not exist yet; pass --frames N, the "
                                            "frames it will hold")
    dino_flops = encoder_flops(mc.dino_name, mc.dino_size) if mc.tokens == "dinov2" else 0  # per image
    pred, idm = model_macs(mc)
    found = have and mc.tokens == "dinov2" and dino.load_features(root, "train", mc.dino_name, mc.dino_size,
                                                                   cfg.dino_weights or None, mc.img_size) is not None
    size = frames * mc.num_patches * (2 * mc.visual_dim if cfg.features == "cache" else mc.visual_dim + 4)  # fp16
    # cache, or int8 codes + a float32 scale per token (dino.FeatureStore)
    if mc.tokens != "dinov2" or cfg.features == "off":
        per_window, once, note = dino_flops * (mc.num_hist + 1), 0, "DINOv2 on every batch" * (dino_flops > 0)
    elif cfg.features == "cache":
        if not found:  # with the spare that `dino.py encode` keeps
            data.need_disk(root, size + dino.DISK_RESERVE, "--features cache (else --features memory or off)")
        per_window, once, note = 0, 0 if found else frames * dino_flops, f"fp16 cache, {size / 1e9:.1f} GB of disk"
    else:
        require(size + dino.STORE_SPARE <= GPU_BYTES, f"--features memory: {size / 1e9:.1f} GB of int8 features do "
                f"not fit next to training in {GPU_BYTES / 2 ** 30:.0f} GiB: --features off")
        per_window, once, note = 0, frames * dino_flops, f"{frames:,} frames as int8 in GPU memory, {size / 1e9:.1f} GB"
    B, evals = cfg.batch_size, (cfg.steps - start) // cfg.eval_every + 1
    la = mc.variant != "baseline"  # validation: a forward pass; la/vq add 10 predictions (swap, shuffle), 2 IDM passes
    per_eval = cfg.val_batches * B * (per_window + 2 * pred + la * (20 * pred + 4 * idm))
    stages = {f"train-{mc.variant}": (cfg.steps - start) * B * (train_flops(mc) + per_window) + evals * per_eval}
    if mc.tokens == "dinov2" and once and cfg.features == "cache":
        stages["encode"] = once  # `dino.py encode`, once per dataset
    elif once:
        stages[f"train-{mc.variant}"] += once  # every training process fills its own store
    rate = ASSUMED_TFLOPS[cfg.dtype] * 1e12
    if la:  # labelling the pairs, then fitting: up to 200 epochs of batch 256, launch-bound at ~1 ms a batch
        stages[f"decode-{mc.variant}"] = SEED_PAIRS * (2 * idm + (0 if found else 2 * dino_flops)) + rate * (
            200 * math.ceil(SEED_PAIRS / 256) * 1e-3)
    for protocol, (tasks, solves, iters) in SEED_PLANS.items():  # 300 samples x horizon 5 predictor calls per iteration
        stages[f"plan-{mc.variant}-{protocol}"] = tasks * solves * (iters * 300 * 5 * 2 * pred + 2 * dino_flops)
    print(f"train.py --dry-run: {mc.variant}, {mc.tokens} tokens (P {mc.num_patches}, D {mc.visual_dim}), batch {B}, "
          f"steps {start} -> {cfg.steps}; features: {note or 'none'}; {train_flops(mc) / 1e9:.3g} GFLOP per window, "
          f"DINOv2 {dino_flops / 1e9:.3g} GFLOP per frame")
    for name, flops in stages.items():  # FLOP-equivalents: the decoder's launch-bound fitting is counted at the rate
        print(f"estimate {name}: {flops / rate:.0f} GPU-s ({flops / 1e15:.1f} PFLOP at an assumed "
              f"{ASSUMED_TFLOPS[cfg.dtype]} TFLOP/s {cfg.dtype})")
    if ckpt is None:  # what the later stages of the recipe read before the run has a checkpoint (makes the folder)
        data.atomic_write(Path(cfg.out) / "config.json", {"train": asdict(cfg), "model": asdict(mc)})
    return stages


def log_row(run, row, line=None):
    """One JSON line in RUN/log.jsonl, and one console line (default: the row as "step N | name value | ...")."""
    tqdm.write(line or f"step {row['step']:7d} | " + " | ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def main(cfg: TrainConfig, mc: WMConfig = None, given=None):
    # --- setup: processes, the run folder (locked; resumed when it holds a checkpoint), device and precision
    if cfg.dry_run:
        return dry_run(*resume(cfg, mc or WMConfig(), given))
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    data.output_folder(cfg.out, "--out", "ckpt.pt", cfg.data)  # never into the dataset or a folder of other files
    ddp = "WORLD_SIZE" in os.environ  # launched by torchrun: DDP even for one process (NCCL path of gpu-check)
    run, main_proc = Path(cfg.out), rank == 0
    with data.locked(run) if main_proc else contextlib.nullcontext():
        cfg, mc, ckpt = resume(cfg, mc or WMConfig(), given)
        meta = data.load_meta(cfg.data, verify=ckpt is None)  # resume() has verified a resumed run's arrays
        mc = wm.derive(mc, meta)  # the model sizes the token source and the dataset imply
        wm.refuse_pixel_flags(mc, dino_weights=cfg.dino_weights, features=cfg.features != "cache")
        require(cfg.labels == -1 or mc.variant == "baseline", f"--labels {cfg.labels}: a {mc.variant} run learns "
                "without action labels; its decoder or adapter takes them (decode.py --pairs)")
        device, ctx = data.setup(cfg.device, cfg.seed, cfg.dtype, int(os.environ.get("LOCAL_RANK", 0)))
        if ddp:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        print({**asdict(cfg), **asdict(mc)})

        # --- data: windows of num_hist + 1 frames; the train stream (resumed where the checkpoint stopped; --labels:
        # a fixed subset), fixed val and latent-prior batches, and input_of(batch), the token source's frozen part
        start = ckpt["step"] if ckpt else 0
        ds = {s: dino.windows(mc, cfg.data, s, mc.num_hist + 1, cfg.dino_weights, cfg.features, device, ctx)
              for s in ("train", "val")}
        subset = data.label_subset(len(ds["train"]), cfg.labels, cfg.seed, cfg.batch_size)  # (N,) window indices
        gen = torch.Generator().manual_seed(cfg.seed)  # endless: a fresh seeded permutation per epoch (DINO-WM: once)
        order = (int(subset[i]) for _ in itertools.count() for i in torch.randperm(len(subset), generator=gen).tolist())
        order = itertools.islice(order, start * cfg.batch_size * world + rank, None, world)  # resumed; rank r's share
        train_loader = data.loader(ds["train"], cfg.batch_size, order, cfg.num_workers, device, drop_last=True)
        # the same batches at every evaluation: evenly spread windows (the seed shuffled its val loader)
        fixed = {s: torch.linspace(0, len(ds[s]) - 1, min(n * cfg.batch_size, len(ds[s]))).round().long().unique()
                 for s, n in (("val", cfg.val_batches), ("train", cfg.stats_batches))}  # window indices
        val_loader, stats_loader = (data.loader(ds[s], cfg.batch_size, fixed[s].tolist(), cfg.num_workers, device)
                                    for s in ("val", "train"))
        input_of = dino.make_input(mc, device, cfg.dino_weights or None)
        source = "computed per batch" if ds["train"].features is None else "feature cache" if cfg.features == "cache" \
            else "int8 features in device memory"
        print(f"windows: train {len(ds['train'])}, val {len(ds['val'])} | tokens: {mc.tokens} (P {mc.num_patches}, "
              f"D {mc.visual_dim}; {source}) | loader workers: {train_loader.num_workers}"
              + (f" | labels: {len(subset)}" if cfg.labels > 0 else ""))

        # --- model: raw (uncompiled) is what we save, model what trains (compiled, DDP); AdamW, the seed's lr groups
        raw = WorldModel(mc).to(device)
        lrs = dict(predictor=cfg.lr_predictor, encoder=cfg.lr_predictor, jepa_idm=cfg.lr_predictor, idm=cfg.lr_idm,
                   latent_action_down=cfg.lr_idm, action_encoder=cfg.lr_action, proprio_encoder=cfg.lr_action)
        groups = {}
        for name, prm in raw.named_parameters():
            groups.setdefault(name.split(".")[0], []).append(prm)
        opt = torch.optim.AdamW([{"params": v, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, v in groups.items()],
                                betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        if ckpt:
            raw.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
            print(f"resuming {cfg.out} at step {ckpt['step']} (ckpt_id {ckpt['ckpt_id']})")
        if device.type == "cuda" and cfg.compile:
            # Compile the hot, fixed-shape transformers in place (Module.compile keeps state_dict keys, so raw is what
            # we save). The VQ's in-place EMA and its DDP collectives stay eager: no graph breaks to reason about.
            for module in [m for m in (raw.predictor, getattr(raw, "idm", None), raw.encoder) if m is not None]:
                module.compile()
        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
        params = sum(p.numel() for p in raw.parameters())
        print(f"parameters: {params / 1e6:.2f} M | model GFLOPs per training window: {train_flops(mc) / 1e9:.3g}")
        data.need_disk(run, 2 * 12 * params + 10 ** 6, "the checkpoint (weights + AdamW, twice while it is replaced)")
        labels = len(subset) if mc.variant == "baseline" else 0  # labelled windows the world model is trained on
        stats = ckpt["stats"] if ckpt else {**data.train_stats(meta), "labels": labels}
        data.atomic_write(run / "config.json", {"train": asdict(cfg), "model": asdict(mc)}) if main_proc else None
        if main_proc and (run / "log.jsonl").is_file():  # drop the rows a killed run logged after its checkpoint
            rows = [r for r in (run / "log.jsonl").read_text().splitlines() if r.startswith("{") and r.endswith("}")]
            rows = [r for r in rows if json.loads(r).get("step", 0) <= (start if ckpt else -1)]  # logged again
            data.atomic_write(run / "log.jsonl", "".join(r + "\n" for r in rows).encode())

        # --- the loop
        parts = ["loss", "pred_loss", "visual_loss"] + (["commit_loss"] if mc.variant == "vq" else []) + (
            ["reg_loss"] if mc.tokens == "jepa" else []) + (["idm_loss"] if mc.jepa_idm else [])  # logged, in order
        first_bad = torch.full((len(parts),), -1, device=device)  # first step at which each part was non-finite
        it, t0, t_step = iter(train_loader), time.perf_counter(), start
        bar = tqdm(total=cfg.steps, initial=start, disable=None if main_proc else True, unit="step")
        for step in range(start, cfg.steps + 1):
            last = step == cfg.steps
            # evaluate and checkpoint (the checkpoint holds the weights after `step` updates)
            if (step % cfg.eval_every == 0 or last) and not (ckpt and step == start):
                check_finite(first_bad, parts, run / "ckpt.pt")  # host sync; runs before anything is written
                if main_proc:
                    metrics, prior = evaluate(raw, val_loader, stats_loader, input_of, device, ctx, cfg.seed)
                    stats.update(prior)
                    # atomically, with the dataset's path also relative to the run (a run moved with its data finds it)
                    root = Path(cfg.data).resolve()
                    rng = {"torch": torch.get_rng_state(),  # and the RNG state, for exact resume
                           **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}
                    data.atomic_write(run / "ckpt.pt", {
                        "format": CKPT_FORMAT, "model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "model_config": asdict(mc), "train_config": asdict(cfg), "stats": stats, "rng": rng,
                        "data": {"root": str(root), "relative": os.path.relpath(root, run.resolve()),
                                 "fingerprint": meta["fingerprint"]}, "ckpt_id": f"{step:08x}-{secrets.token_hex(4)}"})
                    log_row(run, {"step": step, **metrics})
                if ddp:
                    dist.barrier()
                t0, t_step = time.perf_counter(), step  # validation is not part of the throughput
            if last:
                break
            # train step: the loss parts and the gradient norm stay on the device (no host sync)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, cfg)
            batch = next(it)
            with ctx:
                out = model(input_of(batch), batch["action"].to(device), batch["proprio"].to(device))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), math.inf)  # the global norm; nothing clipped
            opt.step()
            vals = torch.stack([out[k].detach().float() for k in parts] + [gnorm.float()])  # (len(parts) + 1,)
            first_bad = torch.where(~torch.isfinite(vals[:-1]) & (first_bad < 0), step, first_bad)
            bar.update(1)
            if device.type == "cuda" and step == start and main_proc:
                torch.cuda.synchronize()  # one-off sync: compile + first step reported apart from the throughput
                bar.write(f"first step (compile, warm-up): {time.perf_counter() - t0:.1f} s")
                t0, t_step = time.perf_counter(), step + 1
            if (step + 1) % cfg.log_every == 0 and main_proc:
                check_finite(first_bad, parts, run / "ckpt.pt")  # host sync point: the only one per log interval
                dt = (time.perf_counter() - t0) / max(1, step + 1 - t_step)
                row = {"step": step + 1, **dict(zip(parts + ["grad_norm"], vals.tolist())),
                       "lr": lr_factor(step, cfg) * cfg.lr_predictor, "ms_per_step": 1e3 * dt,
                       "samples_per_s": cfg.batch_size * world / dt}
                line = (f"step {step + 1:7d} | " + " | ".join(f"{k} {row[k]:.4g}" for k in parts + ["grad_norm"])
                        + f" | lr {row['lr']:.2e} | {1e3 * dt:.1f} ms/step | {row['samples_per_s']:.0f} samples/s")
                if device.type == "cuda":
                    row["tflops"] = train_flops(mc) * row["samples_per_s"] / world / 1e12
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                    line += f" | {row['tflops']:.1f} TFLOP/s/GPU | peak {row['peak_mem_gb']:.1f} GB"
                log_row(run, row, line)
                t0, t_step = time.perf_counter(), step + 1
        bar.close()
        if ddp:
            dist.destroy_process_group()
    return raw


if __name__ == "__main__":
    data.cli(main, TrainConfig, WMConfig, doc=__doc__)
