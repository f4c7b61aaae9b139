"""Train the world model (baseline / la / vq, wm.py) on frozen DINOv2 tokens of Push-T windows (method.md s5-s7).

Reads DIR (data.py layout) and, when present and matching, DIR/{split}/features.npy (`dino.py encode`); else it
renders frames in DataLoader workers and encodes them on the device every step. Writes RUN/ckpt.pt (raw weights,
optimiser, step, configs, data stats, latent prior, sampler/RNG state; atomic), RUN/config.json, RUN/log.jsonl.
Re-running with the same --out resumes exactly (flags that differ from their default must match; --steps may rise).
GPU:  python train.py --data runs/data --variant vq --out runs/vq          (H200 wall-clock: not yet measured)
      DINO-WM setting: --num-hist 3 --proprio --cond-dim 10 --batch-size 32 --lr-predictor 5e-4 --lr-action 5e-4
      multi-GPU: torchrun --standalone --nproc_per_node 4 train.py ... (batch-size is per GPU)
      unoptimised reference for speed ratios: add --no-compile --no-features --dtype float32
CPU:  python train.py --data runs/quick/data --variant vq --out /tmp/vq --steps 200 --dino-weights random
      --dino-size 28 --batch-size 16 --depth 2 --heads 4 --mlp-dim 256 --idm-depth 1 --idm-heads 4 --num-workers 0
"""
import argparse
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import secrets
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import dino
from wm import CKPT_FORMAT, WMConfig, WorldModel, perplexity, shuffle_delta, swap_score


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
    schedule: str = "constant"  # lr schedule after warm-up: constant (seed, DINO-WM) or cosine (to 0 at --steps)
    warmup: int = 0  # linear lr warm-up steps; seed and DINO-WM 0
    grad_clip: float = 0.0  # max global grad norm, 0 = off (seed and DINO-WM clip nothing); the norm is logged anyway
    eval_every: int = 2000  # steps between validation + checkpoint (also at the last step)
    val_batches: int = 20  # fixed val batches per validation (deterministic order)
    stats_batches: int = 50  # fixed train batches for the la/vq latent prior (planning's CEM init)
    log_every: int = 100  # steps between log lines (the only host syncs of the loop)
    num_workers: int = 4  # DataLoader workers (render + load); 0 = in the main process
    device: str = "auto"  # auto (cuda when available), cpu or cuda
    seed: int = 0  # seeds model init, data order and dropout; seed 0 as upstream
    dino_name: str = "dinov2_vits14"  # frozen encoder; DINO-WM ViT-S/14
    dino_weights: str = ""  # DINOv2 .pth, "" = official file from the hub cache, random = tests only
    dino_size: int = 196  # encoder input side in px (224 resized to 196 -> 14x14 patches, DINO-WM)
    img_size: int = 0  # render size in px, 0 = the dataset's img_size
    features: bool = True  # use the dino.py feature cache when present and matching (same tokens, no encoder)
    compile: bool = True  # torch.compile the training forward (CUDA only; ignored on CPU)
    dtype: str = "bfloat16"  # CUDA autocast dtype: bfloat16 or float32 (DINO-WM and seed ran fp32); CPU is fp32
    wandb: bool = False  # also log to Weights & Biases (imported only when set)


# Shape legend: B batch, T = num_hist + 1 frames, P patches, D DINO width, A macro action, C cond, L latent.
DERIVED = ("action_dim", "visual_dim", "num_patches")  # WMConfig fields main() derives from data and encoder
# May differ on resume (the dataset is checked by fingerprint); every other given flag must match the run.
RUNTIME = ("steps", "data", "device", "num_workers", "compile", "dtype", "log_every", "wandb", "features")


def parse_config(*classes, argv=None):
    """Flags from the dataclasses' fields: --field-name, help = the field's trailing comment, default shown.
    Generalised from the house version to several dataclasses, so WMConfig's fields are flags too without
    being copied into TrainConfig; fields in DERIVED are not flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cls in classes:
        helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
        group = p.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            if f.name in DERIVED:
                continue
            kw = dict(action=argparse.BooleanOptionalAction) if f.type in (bool, "bool") else dict(type=type(f.default))
            group.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=helps.get(f.name, " "), **kw)
    args = vars(p.parse_args(argv))
    return tuple(cls(**{f.name: args[f.name] for f in fields(cls) if f.name in args}) for cls in classes)


def train_order(n, seed, start, rank=0, world=1):
    """Infinite window-index stream, a fresh permutation every epoch (fixes defect 12) from a torch.Generator
    seeded by --seed; skips the `start` samples already consumed (exact resume), rank r takes every world-th."""
    def epochs():
        g = torch.Generator().manual_seed(seed)
        while True:
            yield from torch.randperm(n, generator=g).tolist()
    return itertools.islice(epochs(), start + rank, None, world)


def fixed_subset(ds, count):
    """Deterministic, evenly spread windows (val order never changes, fixes defect 14)."""
    idx = torch.linspace(0, len(ds) - 1, min(count, len(ds))).round().long().unique()  # (count,)
    return torch.utils.data.Subset(ds, idx.tolist())


def lr_factor(step, cfg):
    """Linear warm-up, then constant or cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    return 1.0


def train_flops(mc):
    """Model FLOPs per training window: 3 x forward (backward = 2x), matmuls + attention, encoder excluded."""
    W = mc.visual_dim + (mc.proprio_dim if mc.proprio else 0) + mc.cond_dim
    inner, tok = mc.heads * mc.dim_head, mc.num_hist * mc.num_patches
    macs = mc.depth * tok * (4 * W * inner + 2 * W * mc.mlp_dim + 2 * tok * inner)  # full mask computed by SDPA
    if mc.variant != "baseline":
        d, S, T = mc.idm_dim, mc.num_patches + 1, mc.num_hist + 1
        macs += T * S * (mc.visual_dim * d + mc.idm_depth * (8 * d * d + 2 * d * mc.idm_mlp_dim + 2 * (S + T) * d))
    return 3 * 2 * macs


def resolve_resume(cfg, mc, ckpt, path):
    """The stored config wins. A field that differs from its default counts as given and must equal the stored
    value, except RUNTIME fields, which then override it. Returns the effective (TrainConfig, WMConfig)."""
    bad, merged = [], []
    for given, stored, cls in ((cfg, ckpt["train_config"], TrainConfig), (mc, ckpt["model_config"], WMConfig)):
        kw = dict(stored)
        for f in fields(cls):
            value = getattr(given, f.name)
            if f.name in DERIVED or value == f.default or value == stored[f.name]:
                continue
            if f.name in RUNTIME:
                kw[f.name] = value
            else:
                bad.append(f"--{f.name.replace('_', '-')} {value!r} (run has {stored[f.name]!r})")
        merged.append(cls(**kw))
    if bad:
        raise ValueError(f"{path} was trained with other settings: {'; '.join(bad)}. Drop these flags to resume, "
                         "or choose another --out")
    if merged[0].steps < ckpt["step"]:
        raise ValueError(f"--steps {merged[0].steps} is below the checkpoint's step {ckpt['step']} in {path}")
    return merged[0], merged[1]


def check_finite(first_bad, parts, ckpt_path):
    """Stop at the first non-finite loss part (first_bad: (len(parts),) first bad step or -1, kept on the device)."""
    bad = first_bad.tolist()  # host sync: called only at log and eval steps
    if max(bad) >= 0:
        step = min(s for s in bad if s >= 0)
        names = ", ".join(p for p, s in zip(parts, bad) if s == step)
        raise FloatingPointError(f"non-finite {names} at step {step}: training stopped; the last good checkpoint "
                                 f"{ckpt_path} is left untouched (resume from it, e.g. with a lower lr)")


def save_checkpoint(path, ckpt):
    """Atomic: write a temp file, then rename, so a kill leaves the previous checkpoint intact."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def get_tokens(batch, encoder, dino_size):
    """Batch on the device -> DINO tokens (B, T, P, D) float32: from the cache, or the frozen encoder now."""
    if "feat" in batch:
        return batch["feat"].float()  # (B, T, P, D)
    B, T = batch["obs"].shape[:2]
    z = dino.encode(encoder, batch["obs"].flatten(0, 1), dino_size)  # (B*T, P, D), frozen, inference mode
    return z.view(B, T, *z.shape[1:])  # (B, T, P, D)


@torch.no_grad()
def evaluate(model, loader, tokens, device, ctx, seed):
    """Validation: one-step latent MSE (visual dims) and, for la/vq, the collapse diagnostics (method.md s7)."""
    model.eval()
    variant, sums, codes, n = model.cfg.variant, {}, [], 0
    g = torch.Generator().manual_seed(seed)  # same permutations at every validation
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        z, a, p = tokens(batch), batch["action"], batch["proprio"]
        with ctx:
            out = model(z, a, p)
            row = {"val_latent_mse": out["visual_loss"].item(), "val_loss": out["pred_loss"].item()}
            if variant != "baseline":
                row.update(swap_score=swap_score(model, z, a, p, generator=g),
                           shuffle_delta=shuffle_delta(model, z, a, p, generator=g))
        if variant == "vq":
            codes.append(out["codes"].flatten())
        sums = {k: sums.get(k, 0.0) + v for k, v in row.items()}
        n += 1
    metrics = {k: v / max(n, 1) for k, v in sums.items()}
    if codes:
        metrics["perplexity"], metrics["dead_codes"] = perplexity(torch.cat(codes), model.cfg.num_codes)
    model.train()
    return metrics


@torch.no_grad()
def latent_stats(model, loader, tokens, device, ctx):
    """Per-dim mean/std of pre-VQ IDM latents of real train transitions: planning's la CEM prior (defect 1)."""
    model.eval()
    lat = []
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with ctx:
            lat.append(model.conditioning(tokens(batch))["latent"].flatten(0, 1).float())  # (B*(T-1), L)
    model.train()
    x = torch.cat(lat)  # (N, L)
    return {"latent_mean": x.mean(0).tolist(), "latent_std": x.std(0).tolist(), "latent_count": x.shape[0]}


def main(cfg: TrainConfig, mc: WMConfig = None):
    mc = mc or WMConfig()
    # --- processes, device, precision ---
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    amp = cuda and dtype != torch.float32  # the EMA codebook update stays fp32 inside (wm.VectorQuantizer)
    ctx = torch.autocast("cuda", dtype=dtype) if amp else nullcontext()
    out_dir, main_proc = Path(cfg.out), rank == 0
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    if ckpt is not None:
        if ckpt.get("format") != CKPT_FORMAT:
            raise ValueError(f"{ckpt_path}: format {ckpt.get('format')!r}, expected {CKPT_FORMAT!r}; use another --out")
        cfg, mc = resolve_resume(cfg, mc, ckpt, ckpt_path)
    if cfg.schedule not in ("constant", "cosine") or cfg.dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--schedule {cfg.schedule!r} / --dtype {cfg.dtype!r}: expected constant|cosine, "
                         "bfloat16|float32")
    meta = data.load_meta(cfg.data)
    if ckpt is not None and ckpt["data"]["fingerprint"] != meta["fingerprint"]:
        raise ValueError(f"{cfg.data} (fingerprint {meta['fingerprint']}) is not the dataset {ckpt_path} was "
                         f"trained on ({ckpt['data']['root']}, {ckpt['data']['fingerprint']})")
    cfg = dataclasses.replace(cfg, img_size=cfg.img_size or meta["img_size"])
    if main_proc:
        print(f"device: {device} x {world} | autocast: {cfg.dtype if amp else 'off (fp32)'} | "
              f"compile: {'on' if cuda and cfg.compile else 'off'}")
    torch.manual_seed(cfg.seed)

    # --- data: cached features when present and matching, else frames rendered by workers ---
    T = mc.num_hist + 1
    feats = {s: dino.load_features(cfg.data, s, cfg.dino_name, cfg.dino_size, cfg.dino_weights or None,
                                   img_size=cfg.img_size) if cfg.features else None for s in ("train", "val")}
    encoder = None
    if any(f is None for f in feats.values()):
        encoder = dino.load_dinov2(cfg.dino_name, cfg.dino_weights or None, device)
    P, D = next(f.shape[1:] for f in feats.values() if f is not None) if encoder is None else \
        get_tokens({"obs": torch.zeros(1, 1, cfg.img_size, cfg.img_size, 3, dtype=torch.uint8, device=device)},
                   encoder, cfg.dino_size).shape[2:]
    mc = dataclasses.replace(mc, action_dim=2 * mc.frameskip, visual_dim=D, num_patches=P)
    ds = {s: data.WindowDataset(cfg.data, s, T, mc.frameskip, cfg.img_size, feats[s]) for s in ("train", "val")}
    if main_proc:
        print({**asdict(cfg), **asdict(mc)})
        print(f"windows: train {len(ds['train'])}, val {len(ds['val'])}; tokens: "
              f"{'cache' if encoder is None else 'encoded on the fly'} (P {P}, D {D})")
    start = ckpt["step"] if ckpt is not None else 0
    loader_kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=cuda,
                     persistent_workers=cfg.num_workers > 0)
    # Explicit generators, so building/iterating loaders never draws from the global RNG (exact resume).
    train_loader = torch.utils.data.DataLoader(
        ds["train"], sampler=train_order(len(ds["train"]), cfg.seed, start * cfg.batch_size * world, rank, world),
        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    val_loader, stats_loader = (torch.utils.data.DataLoader(fixed_subset(d, n * cfg.batch_size), shuffle=False,
                                                            generator=torch.Generator(), **loader_kw)
                                for d, n in ((ds["val"], cfg.val_batches), (ds["train"], cfg.stats_batches)))
    tokens = functools.partial(get_tokens, encoder=encoder, dino_size=cfg.dino_size)  # batch -> (B, T, P, D)

    # --- model, optimiser (one param group per module, method.md s6), resume ---
    raw = WorldModel(mc).to(device)
    lrs = {"predictor": cfg.lr_predictor, "action_encoder": cfg.lr_action, "proprio_encoder": cfg.lr_action,
           "idm": cfg.lr_idm, "latent_action_down": cfg.lr_idm}
    groups = {}
    for name, prm in raw.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(prm)
    opt = torch.optim.AdamW([{"params": v, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, v in groups.items()],
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    stats = {"action_mean": meta["action_mean"], "action_std": meta["action_std"],
             "proprio_mean": meta["proprio_mean"], "proprio_std": meta["proprio_std"]}
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        stats = ckpt["stats"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        if main_proc:
            print(f"resuming {ckpt_path} at step {start} (ckpt_id {ckpt['ckpt_id']})")
    if cuda and cfg.compile:
        # Compile the hot, fixed-shape transformers in place (Module.compile keeps state_dict keys, so raw is still
        # what we save). The VQ's in-place EMA and its DDP collectives stay eager: no graph breaks to reason about.
        for module in (raw.predictor, getattr(raw, "idm", None)):
            if module is not None:
                module.compile()
    model = raw
    if world > 1:  # the VQ keeps its buffers identical itself (all-reduce + rank-0 candidates)
        model = DDP(model, device_ids=[device.index] if cuda else None)
    if main_proc:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", {"train": asdict(cfg), "model": asdict(mc)})
        print(f"parameters: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f} M | "
              f"model GFLOPs per training window: {train_flops(mc) / 1e9:.2f}")
    run = None
    if cfg.wandb and main_proc:
        import wandb  # optional dependency, imported only when asked for
        run = wandb.init(project="dinowm-latent-actions", name=out_dir.name, config={**asdict(cfg), **asdict(mc)})

    def log(row):
        with open(out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if run is not None:
            run.log(row, step=row["step"])

    # --- the loop ---
    parts = ["loss", "pred_loss", "visual_loss"] + (["commit_loss"] if mc.variant == "vq" else [])
    first_bad = torch.full((len(parts),), -1, device=device)  # first step at which each part was non-finite
    it, t0, t_step = iter(train_loader), time.perf_counter(), start
    bar = tqdm(total=cfg.steps, initial=start, disable=not main_proc, unit="step")
    for step in range(start, cfg.steps + 1):
        last = step == cfg.steps
        # evaluate and checkpoint (the checkpoint holds the weights after `step` updates)
        if (step % cfg.eval_every == 0 or last) and not (ckpt is not None and step == start):
            check_finite(first_bad, parts, ckpt_path)  # host sync; the NaN guard runs before anything is written
            if main_proc:
                metrics = evaluate(raw, val_loader, tokens, device, ctx, cfg.seed)
                if mc.variant != "baseline":
                    stats.update(latent_stats(raw, stats_loader, tokens, device, ctx))
                rng = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
                save_checkpoint(ckpt_path, {
                    "format": CKPT_FORMAT, "model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "model_config": asdict(mc), "train_config": asdict(cfg), "stats": stats,
                    "data": {"root": str(cfg.data), "fingerprint": meta["fingerprint"]}, "rng": rng,
                    "ckpt_id": f"{step:08x}-{secrets.token_hex(4)}"})
                log({"step": step, **metrics})
                bar.write(f"step {step:7d} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if world > 1:
                dist.barrier()
            t0, t_step = time.perf_counter(), step  # exclude validation from the throughput
        if last:
            break
        # train step
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        z = tokens(batch)  # (B, T, P, D)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg)
        with ctx:
            out = model(z, batch["action"], batch["proprio"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        vals = torch.stack([out[k].detach().float() for k in parts])  # (len(parts),), stays on the device
        first_bad = torch.where(~torch.isfinite(vals) & (first_bad < 0), step, first_bad)
        bar.update(1)
        if cuda and step == start and main_proc:
            torch.cuda.synchronize()  # one-off sync: report compile + first step separately from the throughput
            bar.write(f"first step (compile, warm-up): {time.perf_counter() - t0:.1f} s")
            t0, t_step = time.perf_counter(), step + 1
        # logging
        if (step + 1) % cfg.log_every == 0 and main_proc:
            v = torch.cat([vals, gnorm[None].float()]).tolist()  # host sync point: the only one per log interval
            check_finite(first_bad, parts, ckpt_path)
            dt = (time.perf_counter() - t0) / max(1, step + 1 - t_step)
            row = {"step": step + 1, **dict(zip(parts, v)), "grad_norm": v[-1],
                   "lr": lr_factor(step, cfg) * cfg.lr_predictor,  # the predictor's; other groups scale alike
                   "ms_per_step": 1e3 * dt, "samples_per_s": cfg.batch_size * world / dt}
            line = (f"step {step + 1:7d} | " + " | ".join(f"{k} {x:.4g}" for k, x in zip(parts, v))
                    + f" | gnorm {v[-1]:.3f} | lr {row['lr']:.2e} | {row['ms_per_step']:.1f} ms/step"
                    + f" | {row['samples_per_s']:.0f} samples/s")
            if cuda:
                row["tflops"] = train_flops(mc) * row["samples_per_s"] / world / 1e12
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                line += f" | {row['tflops']:.1f} TFLOP/s/GPU | peak {row['peak_mem_gb']:.1f} GB"
            bar.write(line)
            log(row)
            t0, t_step = time.perf_counter(), step + 1
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return raw


if __name__ == "__main__":
    main(*parse_config(TrainConfig, WMConfig))
