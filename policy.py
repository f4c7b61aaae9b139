"""Goal-conditioned policy baselines next to DINO-WM, as stable-worldmodel lists them: no world model, no planner;
one forward pass maps (current tokens, goal tokens) to the next H = 5 normalised macro actions (a 25-step chunk).

gcbc: goal-conditioned behaviour cloning (stable-worldmodel scripts/train/gcbc.py): MSE to the recorded chunk under
      hindsight goals from the same episode (default: the chunk's own last frame; --goal-steps 0: uniform future, swm).
iql:  goal-conditioned IQL (Kostrikov et al. 2022; OGBench impls/agents/gciql.py, swm scripts/train/gciql.py): Q and
      V on macro-step transitions with a sparse goal-reaching reward, and the same regression weighted by AWR, all
      three trained jointly in one loop as OGBench does (swm trains the critics first, then the actor).
Token sources as wm.py: `state` (one 12-d token per frame) or `dinov2` (196 x 384 frozen patches; the dino.py cache).
train reads DIR (data.py layout), writes POLICY/policy.pt (weights, configs, data statistics and fingerprint); eval
writes RESULTS.json in plan.py's format (same tasks, protocols and references), videos and the ceiling cache beside it.
CPU:  python policy.py train --algo gcbc --data runs/quick/data --tokens state --out runs/quick/gcbc   (~1 min, 1 core)
      python policy.py eval --policy runs/quick/gcbc --protocol open-loop --out runs/quick/results/gcbc-open-loop.json
GPU:  python policy.py train --algo iql --data runs/full/data --tokens dinov2 --out runs/full/iql --steps 100000
      (reads the DINOv2 feature cache of `dino.py encode`; H200 wall-clock: not yet measured)
"""
import copy
import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dino
import wm
from data import macro_to_env, require
from plan import (MPC_BUDGET, PROTOCOL_EPISODES, RESULT_KEYS, PlanConfig, ceiling, evaluate, make_tasks, references,
                  results_json, summary)


@dataclass
class TrainConfig:
    algo: Literal["gcbc", "iql"] = "gcbc"  # goal-conditioned behaviour cloning, or goal-conditioned IQL + AWR
    data: str = ""  # dataset folder written by data.py (required)
    out: str = ""  # policy folder (required); one that already holds this very policy is left as it is
    tokens: Literal["state", "dinov2"] = "state"  # token source (wm.py): simulator state, or frozen DINOv2 patches
    steps: int = 4000  # optimiser steps (gcbc on state tokens: ~1 min on one CPU core)
    batch_size: int = 256  # windows per step; stable-worldmodel GCBC 128, GC-IQL 32, OGBench 1024
    lr: float = 3e-4  # Adam lr of every network; OGBench and stable-worldmodel GC-IQL 3e-4 (its GCBC 1e-4)
    schedule: Literal["auto", "cosine", "constant"] = "auto"  # auto: cosine to 0 for gcbc (swm), constant for iql (swm)
    hidden: int = 256  # MLP width; OGBench 512 (256 trains the state mode on one CPU core in a minute)
    layers: int = 3  # hidden layers per MLP; OGBench (512, 512, 512)
    patch_dim: int = 16  # channels per token after the per-token projection (dinov2: 196 x 16 per frame)
    horizon: int = 5  # H macro actions per chunk; H x frameskip 5 = plan.py's 25-step goals
    goal_steps: int = 25  # actor goals this many env steps ahead (25: the chunk's end); 0 = uniform future (swm)
    discount: float = 0.99  # gamma per macro step (also the geometric value-goal distribution's); OGBench, swm 0.99
    expectile: float = 0.9  # tau of V's expectile regression; OGBench and swm 0.9
    beta: float = 10.0  # AWR inverse temperature: weights exp(beta * A), clipped at 100; swm awr_alpha 10
    target_ema: float = 0.995  # EMA of the target V and Q; swm value_ema_tau 0.995 (OGBench tau 0.005)
    p_random: float = 0.3  # value goals: a random frame of the split; OGBench and swm 0.3
    p_future: float = 0.5  # value goals: the geometric future of the same episode; OGBench and swm 0.5
    p_current: float = 0.2  # value goals: the current frame (reward 0, episode over); OGBench and swm 0.2
    log_every: int = 500  # steps between log lines (with a fixed validation batch's chunk MSE)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    seed: int = 0  # seeds init, window order and goal draws
    labels: int = -1  # labelled macro transitions: a fixed seeded subset of labels // horizon chunks; -1 = all
    dino_name: str = "dinov2_vits14"  # frozen encoder for --tokens dinov2; DINO-WM ViT-S/14
    dino_size: int = 196  # encoder input side in px (DINO-WM: 224 resized to 196, 14 x 14 patches)
    dino_weights: str = ""  # DINOv2 .pth, "" = the official file from the hub cache, random = tests only
    features: Literal["cache", "memory", "off"] = "cache"  # dinov2 tokens: as train.py --features
    compile: bool = True  # torch.compile the networks on CUDA (never on CPU)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # CUDA: bf16 autocast, or fp32 everywhere (TF32 off)

    def __post_init__(self):
        data.check_choices(self)
        require(self.data and self.out, "--data DIR and --out POLICY_DIR are required")
        require(min(self.steps, self.batch_size, self.hidden, self.layers, self.patch_dim, self.horizon,
                    self.log_every) >= 1 and self.goal_steps >= 0, "--steps, --batch-size, --hidden, --layers, "
                                                                   "--patch-dim, --horizon, --log-every must be >= 1")
        require(0 < self.discount < 1 and 0 < self.expectile < 1 and 0 <= self.target_ema < 1 and self.lr > 0,
                "--discount and --expectile in (0, 1), --target-ema in [0, 1), --lr > 0")
        require(self.labels == -1 or self.labels >= self.horizon, f"--labels {self.labels}: at least one chunk of "
                f"--horizon {self.horizon} labelled transitions, or -1 for all of them")
        require(min(self.p_random, self.p_future, self.p_current) >= 0 and
                abs(self.p_random + self.p_future + self.p_current - 1) < 1e-6, "--p-* must be >= 0 and sum to 1")


@dataclass
class EvalConfig:
    policy: str = ""  # policy folder written by `policy.py train` (required)
    out: str = "results.json"  # RESULTS.json path (plan.py's format); videos and the ceiling's cache go next to it
    data: str = ""  # dataset folder, "" = the one the policy was trained on; another dataset is an error
    tokens: Literal["", "state", "dinov2"] = ""  # the token source you expect, "" = the policy's own; else must match
    episodes: int = 0  # evaluation episodes; 0 = the protocol's own (open-loop 100, mpc 50), as plan.py
    protocol: Literal["open-loop", "mpc"] = "open-loop"  # one chunk (25 steps), or re-query within 50 steps
    split: Literal["val", "train"] = "val"  # dataset split the tasks come from, as plan.py
    mpc_execute: int = 0  # macro actions run per mpc query; 0 = by the policy's goals (chunk-end: H, uniform: 1)
    opt_steps: int = 30  # CEM iterations of the reference ceiling (plan.py --opt-steps; equal flags share its cache)
    ceiling_episodes: int = 20  # tasks the simulator-as-model ceiling runs on (0 = none; ~7 s each per core)
    workers: int = -1  # processes for the ceiling's simulator rollouts; -1 = one per CPU core
    videos: int = 2  # mp4 videos (simulator | goal) of the first N episodes
    seed: int = 0  # seeds the task draws and the random policy (plan.py's tasks with the same seed)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # CUDA: bf16 autocast (the DINOv2 encoder included), or fp32

    def __post_init__(self):
        data.check_choices(self)
        require(self.policy, "--policy POLICY_DIR is required: a folder written by `policy.py train`")
        require(min(self.episodes, self.ceiling_episodes, self.videos, self.mpc_execute) >= 0 and self.opt_steps >= 1
                and self.workers >= -1, "--episodes, --ceiling-episodes, --videos, --mpc-execute must be >= 0")

    @property
    def run(self):  # RESULTS.json's "run" (results_json reads cfg.run): the policy folder
        return self.policy


# Shape legend: B batch, T = H + 1 frames of a chunk's window (frameskip apart), P tokens per frame, D token width,
# A macro-action width (2 x frameskip), H chunk length in macro actions, E episodes, V validation windows.
# Frames are indexed globally within a split (a one-frame window's index is its frame's index).
FORMAT = "dinowm-la-policy-v2"  # policy.pt "format"
RUNTIME = ("out", "log_every", "device", "compile", "dtype", "features")  # settings that are not the policy itself
AWR_CLIP = 100.0  # max AWR weight; OGBench gciql.py and stable-worldmodel gciql.py clip exp(beta * A) at 100


def actor_goals(rng, t, end, goal_steps):
    """Goal frames of the regressed chunks for windows starting at frames t (B,); end (F,) = each frame's episode end.
    goal_steps k: the frame k env steps ahead (25 = the chunk's last frame: the chunk is the one that ends at its
    goal, which is what an open-loop task asks for); 0: uniform over (t, end] (swm GCBC, OGBench actor goals). (B,)"""
    return np.minimum(t + goal_steps, end[t]) if goal_steps else rng.integers(t + 1, end[t] + 1)


def value_goals(rng, t, end, cfg, frameskip=5):
    """IQL's value goals (OGBench value_p_*, swm goal_probabilities): a random frame of the split (p_random), the frame
    frameskip * k ahead with k ~ Geometric(1 - discount) macro steps, capped at the episode's end (p_future), or the
    current frame (p_current). -> (B,)"""
    u = rng.random(len(t))  # (B,)
    future = np.minimum(t + frameskip * rng.geometric(1 - cfg.discount, len(t)), end[t])  # (B,)
    g = np.where(u < cfg.p_random, rng.integers(0, len(end), len(t)), future)
    return np.where(u >= 1 - cfg.p_current, t, g)  # (B,)


class GCNet(nn.Module):
    """f(s, g [, a]) -> (B, out): a linear projection of every token, shared by the current and the goal frame, both
    flattened (DINOv2's 14 x 14 layout is kept: mean pooling would blur where the T is), concatenated with the action,
    then an MLP with LayerNorm + GELU (OGBench's goal-conditioned MLPs use LayerNorm)."""

    def __init__(self, P, D, patch_dim, action_in, hidden, layers, out):
        super().__init__()
        self.proj = nn.Linear(D, patch_dim)  # no input LayerNorm: a state token's scale is the state itself
        dims = [2 * P * patch_dim + action_in] + [hidden] * layers
        blocks = [m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.LayerNorm(b), nn.GELU())]
        self.mlp = nn.Sequential(*blocks, nn.Linear(dims[-1], out))

    def forward(self, z, zg, a=None):
        """z, zg (B, P, D), a (B, A) or None -> (B, out)"""
        x = [self.proj(z).flatten(1), self.proj(zg).flatten(1)] + ([] if a is None else [a.to(z.dtype)])
        return self.mlp(torch.cat(x, -1))  # (B, out)


def build(cfg, mc):
    """{actor: s, g -> (H * A) chunk}; for iql also V(s, g), Q(s, a, g) and their EMA targets (swm's teacher V, Q)."""
    def net(a_in, out):
        return GCNet(mc.num_patches, mc.visual_dim, cfg.patch_dim, a_in, cfg.hidden, cfg.layers, out)
    nets = {"actor": net(0, cfg.horizon * mc.action_dim)}
    if cfg.algo == "iql":  # one Q, as stable-worldmodel (OGBench takes the min of two)
        nets.update(value=net(0, 1), critic=net(mc.action_dim, 1))
        nets.update(value_target=copy.deepcopy(nets["value"]), critic_target=copy.deepcopy(nets["critic"]))
    return nets


def iql_losses(nets, z0, z1, a0, zgv, sgv, s0, zga, cfg):
    """GC-IQL on macro-step transitions s -> s' (tokens z0 -> z1 (B, P, D), action a0 (B, A), state s0 (B, 7)) with
    value goals (tokens zgv, states sgv), and the AWR weights under the actor goals zga. Reward (OGBench's convention;
    'reached' = DINO-WM's success test on the dataset's states, where swm compares pixels): 0 and episode over when s
    is at the goal, else -1."""
    with torch.no_grad():
        mask = 1.0 - data.is_success(sgv, s0).float()  # (B,) DINO-WM's success test: goal reached
        y = -mask + cfg.discount * mask * nets["value_target"](z1, zgv)[:, 0].float()  # r + gamma m V_target(s', g)
        q_t = nets["critic_target"](z0, zgv, a0)[:, 0].float()  # (B,) Q_target(s, a, g)
    v = nets["value"](z0, zgv)[:, 0].float()  # (B,)
    u = q_t - v  # V is the tau-expectile of Q_target (IQL eq. 5): |tau - 1(u < 0)| u^2
    value_loss = (torch.where(u > 0, cfg.expectile, 1 - cfg.expectile) * u.square()).mean()
    critic_loss = F.mse_loss(nets["critic"](z0, zgv, a0)[:, 0].float(), y)
    with torch.no_grad():  # AWR advantage of the chunk's first macro action, online networks (OGBench actor_loss awr)
        adv = (nets["critic"](z0, zga, a0) - nets["value"](z0, zga))[:, 0].float()  # (B,)
        w = torch.exp(cfg.beta * adv).clamp(max=AWR_CLIP)  # (B,)
    return value_loss, critic_loss, w, [value_loss, critic_loss, v.mean(), adv.mean(), w.mean()]


def losses(nets, cfg, mc, batch, rng, frames, end, tokens, input_of):
    """One batch of windows (frame 0 = the current frame t) -> (total loss, [logged parts]). gcbc: the chunk MSE under
    hindsight actor goals; iql: the same weighted by AWR, plus the value and critic losses."""
    t, H, A = batch["index"].numpy(), cfg.horizon, mc.action_dim  # t (B,): frame 0 of each window
    z0, zga = tokens(frames, t), tokens(frames, actor_goals(rng, t, end, cfg.goal_steps))  # (B, P, D) each
    chunk = batch["action"][:, :H].flatten(1).to(z0.device)  # (B, H*A) the recorded chunk, z-scored
    err = (nets["actor"](z0, zga).float() - chunk).square().mean(1)  # (B,)
    if cfg.algo == "gcbc":
        return err.mean(), [err.mean()]
    gv = frames.__getitems__(value_goals(rng, t, end, cfg, mc.frameskip))  # value goals, with their states
    value_loss, critic_loss, w, vals = iql_losses(
        nets, z0, tokens(frames, t + mc.frameskip), chunk[:, :A], input_of(gv)[:, 0],
        gv["state"][:, 0].to(z0.device), batch["state"][:, 0].to(z0.device), zga, cfg)
    actor_loss = (w * err).mean()  # AWR: weighted MSE = Gaussian log-likelihood with a fixed std
    return actor_loss + value_loss + critic_loss, [actor_loss] + vals


@torch.no_grad()
def update_targets(nets, ema):
    """Polyak-averaged V and Q targets (OGBench target_update, swm TeacherStudentWrapper)."""
    for k in ("value", "critic"):
        for p_t, p in zip(nets[k + "_target"].parameters(), nets[k].parameters()):
            p_t.lerp_(p, 1 - ema)


def episode_ends(root, split):
    """(F,) the last frame of each frame's episode: hindsight goals stay inside the episode."""
    d = data.load_split(root, split)
    return np.repeat(d["starts"] + d["lengths"] - 1, d["lengths"])  # (F,)


def existing(path, cfg, fp):
    """True when path holds this very policy (same settings and dataset); an error naming both when it holds another."""
    if not path.is_file():
        return False
    old = data.load_pt(path, "delete it to start over, or choose another --out")
    diff = data.differences(old["config"], asdict(cfg), "the policy has", RUNTIME + ("data",))
    if old["data"]["fingerprint"] != fp:
        diff.append(f"--data {cfg.data} (fingerprint {fp}; the policy's dataset: {old['data']['root']}, fingerprint "
                    f"{old['data']['fingerprint']})")
    require(not diff, f"{path} holds another policy: {'; '.join(diff)}. Choose another --out or delete it")
    print(f"{path} already holds this policy ({old['step']} steps); nothing to do")
    return True


def train(cfg: TrainConfig):
    """Train a goal-conditioned policy (gcbc or iql) into --out."""
    # --- setup: token source and device; chunks come from windows of H + 1 frames (states and actions only), tokens
    # from one-frame windows (window i = frame i): only the frames used are read (the current one, s', the goals)
    out = Path(cfg.out)
    data.output_folder(out, "--out", "policy.pt", cfg.data)  # never into the dataset or a folder of other files
    with data.locked(out):  # one trainer per folder
        t_start, meta = time.perf_counter(), data.load_meta(cfg.data, verify=True)
        if existing(out / "policy.pt", cfg, meta["fingerprint"]):
            return None
        mc = wm.derive(wm.WMConfig(tokens=cfg.tokens, dino_name=cfg.dino_name, dino_size=cfg.dino_size), meta)
        wm.refuse_pixel_flags(mc, dino_weights=cfg.dino_weights, features=cfg.features != "cache")
        device, ctx = data.setup(cfg.device, cfg.seed, cfg.dtype)
        print(asdict(cfg))
        H, A, rng = cfg.horizon, mc.action_dim, np.random.default_rng([cfg.seed, 1])
        ds, val = (data.WindowDataset(cfg.data, s, H + 1, mc.frameskip) for s in ("train", "val"))
        frames, val_frames = (dino.windows(replace(mc, frameskip=1), cfg.data, s, 1, cfg.dino_weights, cfg.features,
                                         device, ctx) for s in ("train", "val"))
        end, val_end = episode_ends(cfg.data, "train"), episode_ends(cfg.data, "val")
        gen = torch.Generator().manual_seed(cfg.seed)
        subset = data.label_subset(len(ds), cfg.labels // H if cfg.labels > 0 else -1, cfg.seed)  # (N,) its chunks
        labels = H * len(subset) if cfg.labels > 0 else len(data.WindowDataset(cfg.data, "train", 2, mc.frameskip))
        order = (int(subset[i]) for _ in itertools.count() for i in torch.randperm(len(subset), generator=gen).tolist())
        it = iter(data.loader(ds, cfg.batch_size, order, 0, device, drop_last=True))  # a NumPy gather per batch
        input_of = dino.make_input(mc, device, cfg.dino_weights or None)
        tokens = lambda d, idx: input_of(d.__getitems__(idx))[:, 0]  # noqa: E731  frames idx (B,) -> (B, P, D)
        print(f"{cfg.algo} on {mc.tokens} tokens (P {mc.num_patches}, D {mc.visual_dim}) | windows: train "
              f"{len(ds)}, val {len(val)} | labels {labels} ({len(subset)} chunks) | chunk {H} x {A} | features: "
              f"{'none' if frames.features is None else cfg.features}")

        # --- networks, optimiser, and a fixed validation batch: the chunk MSE we log
        nets = {k: m.to(device) for k, m in build(cfg, mc).items()}
        trained = [p for k in ("actor", "value", "critic") if k in nets for p in nets[k].parameters()]
        opt = torch.optim.Adam(trained, lr=cfg.lr)  # OGBench: Adam; the three losses touch disjoint parameters
        if device.type == "cuda" and cfg.compile:
            for m in nets.values():
                m.compile()  # in place: the state_dict keys stay the raw module's
        v_z, v_zg, v_a = val_batch(val, val_frames, val_end, cfg, tokens, device)
        print(f"parameters: {sum(p.numel() for p in trained) / 1e6:.2f} M | val chunk MSE of the dataset-mean action: "
              f"{v_a.square().mean().item():.4f}")

        # --- the loop
        parts = ["actor_loss"] + (["value_loss", "critic_loss", "v_mean", "adv_mean", "w_mean"] if cfg.algo == "iql"
                                  else [])
        cosine = cfg.schedule == "cosine" or (cfg.schedule == "auto" and cfg.algo == "gcbc")
        bar, t0, t_step = tqdm(total=cfg.steps, disable=None, unit="step"), time.perf_counter(), 0
        for step in range(cfg.steps):
            batch = next(it)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cosine else 1.0)
            with ctx:
                loss, vals = losses(nets, cfg, mc, batch, rng, frames, end, tokens, input_of)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.algo == "iql":
                update_targets(nets, cfg.target_ema)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:  # logging: the only host syncs
                with torch.no_grad(), ctx:
                    val_mse = F.mse_loss(nets["actor"](v_z, v_zg).float(), v_a).item()
                dt = (time.perf_counter() - t0) / (step + 1 - t_step)
                bar.write(f"step {step + 1:6d} | " + " | ".join(f"{k} {x:.4g}" for k, x in zip(parts, torch.stack(
                    vals).tolist())) + f" | val_mse {val_mse:.4f} | {1e3 * dt:.1f} ms/step | {cfg.batch_size / dt:.0f} "
                    f"samples/s")
                t0, t_step = time.perf_counter(), step + 1
        bar.close()

        # --- save
        save(out, cfg, mc, nets, meta, time.perf_counter() - t_start, val_mse, labels)
        return val_mse


def val_batch(val, frames, end, cfg, tokens, device):
    """A fixed batch of up to 256 val windows and their actor goals -> tokens, goal tokens (V, P, D), chunks (V, H*A):
    the validation chunk MSE every log line reports."""
    vb = val.__getitems__(np.linspace(0, len(val) - 1, min(256, len(val))).round().astype(int))
    goals = actor_goals(np.random.default_rng(cfg.seed), vb["index"].numpy(), end, cfg.goal_steps)  # (V,)
    with torch.no_grad():
        z, zg = tokens(frames, vb["index"].numpy()), tokens(frames, goals)  # (V, P, D) each
    return z, zg, vb["action"][:, :cfg.horizon].flatten(1).to(device)


def save(out, cfg, mc, nets, meta, seconds, val_mse, labels):
    """POLICY/policy.pt: plain tensors, numbers and strings (read with torch.load(weights_only=True)), atomically."""
    root = Path(cfg.data).resolve()
    data.atomic_write(out / "policy.pt", {
        "format": FORMAT, "algo": cfg.algo, "tokens": mc.tokens, "step": cfg.steps, "config": asdict(cfg),
        "model_config": asdict(mc), "train_seconds": seconds, "val_mse": val_mse, "labels": labels,
        **{k: nets[k].state_dict() for k in ("actor", "value", "critic") if k in nets},
        "stats": data.train_stats(meta),
        "data": {"root": str(root), "relative": os.path.relpath(root, out.resolve()),
                 "fingerprint": meta["fingerprint"]}})
    print(f"trained {cfg.algo} ({mc.tokens} tokens) for {cfg.steps} steps in {seconds:.1f} s: val chunk MSE "
          f"{val_mse:.4f} -> {out / 'policy.pt'}")


def load_policy(folder, device, data_dir="", tokens=""):
    """POLICY/policy.pt -> (actor in eval mode, checkpoint, the token source's WMConfig, dataset root). The token source
    and the dataset must be the policy's own: a mismatch is an error naming both."""
    folder = Path(folder)
    ck = data.load_pt(folder / "policy.pt", f"train one with `python policy.py train --out {folder} ...`")
    require(ck.get("format") == FORMAT, f"{folder}/policy.pt: format {ck.get('format')!r}, this policy.py reads "
                                        f"{FORMAT!r}; retrain it with this code")
    require(not tokens or tokens == ck["tokens"], f"--tokens {tokens}: {folder} is a {ck['algo']} policy trained on "
                                                  f"{ck['tokens']} tokens, not {tokens} tokens")
    root = data.dataset_of(folder, ck["data"], data_dir, f"{ck['algo']} policy on {ck['tokens']} tokens")
    mc, cfg = wm.WMConfig(**ck["model_config"]), TrainConfig(**ck["config"])
    actor = build(replace(cfg, algo="gcbc"), mc)["actor"]
    actor.load_state_dict(ck["actor"])
    return actor.to(device).eval(), ck, mc, root


def evaluate_policy(cfg: EvalConfig):
    """Evaluate a trained policy on plan.py's tasks and protocols -> RESULTS.json in plan.py's format."""
    # --- setup: the policy and its token source, the tasks, the reference rows on the same tasks
    t_start = time.perf_counter()
    device, ctx = data.setup(cfg.device, cfg.seed, cfg.dtype)
    data.writable(cfg.out, "--out", RESULT_KEYS)  # a .json, never a checkpoint or another file of the user's
    actor, ck, mc, root = load_policy(cfg.policy, device, cfg.data, cfg.tokens)
    tc, stats, img = ck["config"], ck["stats"], mc.img_size or 224
    H, A, every_step = tc["horizon"], mc.action_dim, cfg.protocol == "mpc"
    n = cfg.episodes or PROTOCOL_EPISODES[cfg.protocol]
    budget = MPC_BUDGET if every_step else H * mc.frameskip  # open loop: one chunk, executed whole
    # mpc: a policy trained towards goals at its chunk's end runs the whole chunk (re-queried every 25 steps, as plan.py
    # replans); one trained on uniform-future goals re-queries every macro step (closed loop, as swm runs policies)
    execute = min(cfg.mpc_execute or (H if tc["goal_steps"] else 1), H) if every_step else H
    input_of = dino.make_input(mc, device, tc["dino_weights"] or None)
    print(f"{ck['algo']} ({mc.tokens} tokens, {ck['step']} steps) | {n} episodes | budget {budget} env steps, "
          f"{execute} macro action(s) per query | split {cfg.split} of {root}")
    tasks = make_tasks(root, cfg.split, cfg.protocol, n, cfg.seed, img)
    ceil_cfg = PlanConfig(run=cfg.policy, horizon=H, opt_steps=cfg.opt_steps, ceiling_episodes=cfg.ceiling_episodes,
                          workers=cfg.workers, seed=cfg.seed)  # plan.py's default CEM budget: the same ceiling
    ref = {**references(tasks, stats, budget, every_step, img, cfg.seed),
           **ceiling(tasks, ceil_cfg, stats, budget, every_step, img, Path(cfg.out).parent / "ceiling")}

    # --- act: one forward pass per query, every episode at once
    encode = lambda states: input_of(dino.batch_of_states(states, mc))[:, 0]  # noqa: E731 (E, P, D)

    def policy_for(idx):
        with torch.inference_mode(), ctx:
            zg = encode(tasks["goal_state"][idx])  # (E, P, D), encoded once

        @torch.inference_mode()
        def policy(state):
            with ctx:
                a = actor(encode(state), zg).view(len(state), H, A)[:, :execute]  # (E, execute, A)
            return macro_to_env(a.float().cpu().numpy(), stats["action_mean"], stats["action_std"])  # (E, T, 2)
        return policy
    res = evaluate(tasks, policy_for, n, budget, every_step, img, cfg.out, cfg.videos)

    # --- RESULTS.json and the one-line summary
    results = results_json(cfg, tasks, res, ck["algo"], ck["algo"], mc.tokens, ref, ck["algo"], ck["labels"], dict(
        budget=budget, mpc_execute=execute, device=str(device), data=str(root), train_steps=ck["step"],
        train_seconds=ck["train_seconds"], train_config=tc, total_seconds=time.perf_counter() - t_start))
    data.atomic_write(cfg.out, results)
    print(summary(results, cfg.out))
    return results


if __name__ == "__main__":
    data.cli(None, doc=__doc__, commands={"train": (train, TrainConfig), "eval": (evaluate_policy, EvalConfig)})
