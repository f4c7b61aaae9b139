"""Goal-conditioned policy baselines next to DINO-WM, as stable-worldmodel lists them (no world model, no planner): one
forward pass maps current and goal tokens to the next H = 5 normalised macro actions (a 25-step chunk). gcbc: behaviour
cloning under hindsight goals (swm scripts/train/gcbc.py); iql: goal-conditioned IQL + AWR (Kostrikov et al. 2022;
OGBench impls/agents/gciql.py, swm scripts/train/gciql.py). Tokens as wm.py (`state`, `dinov2`). train reads DIR
(data.py layout), writes POLICY/policy.pt (weights, configs, data statistics, fingerprint); eval writes RESULTS.json as
plan.py does (same tasks, protocols, references), videos and the ceiling cache beside it.
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
import plan
import wm
from data import require


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
    opt_steps: int = 30  # CEM iterations of the reference ceiling (plan.py --opt-steps; equal flags share its cache)
    ceiling_episodes: int = 20  # tasks the simulator-as-model ceiling runs on (0 = none; ~7 s each per core)
    workers: int = -1  # processes for the ceiling's simulator rollouts; -1 = one per CPU core
    videos: int = 2  # mp4 videos (simulator | goal) of the first N episodes
    seed: int = 0  # seeds the task draws and the random policy (plan.py's tasks with the same seed)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # CUDA: bf16 autocast (the DINOv2 encoder included), or fp32
    run = property(lambda self: self.policy)  # RESULTS.json's "run" (plan.write_results reads cfg.run): the policy

    def __post_init__(self):
        data.check_choices(self)
        require(self.policy, "--policy POLICY_DIR is required: a folder written by `policy.py train`")
        require(min(self.episodes, self.ceiling_episodes, self.videos) >= 0 and self.opt_steps >= 1
                and self.workers >= -1, "--episodes, --ceiling-episodes, --videos must be >= 0")


# Shape legend: B batch, T = H + 1 frames (frameskip apart), P tokens per frame, D token width, A macro action (2 x
# frameskip), H chunk length, E episodes, V val windows, F frames of a split (one-frame window i = frame i).
FORMAT = "dinowm-la-policy-v2"  # policy.pt "format"
RUNTIME = ("out", "log_every", "device", "compile", "dtype", "features")  # settings that are not the policy itself
AWR_CLIP = 100.0  # max AWR weight; OGBench gciql.py and stable-worldmodel gciql.py clip exp(beta * A) at 100


def actor_goals(rng, t, end, goal_steps):
    """Goal frames (B,) of chunks from frames t (B,): goal_steps ahead, capped at the episode end (F,); 0: uniform."""
    return np.minimum(t + goal_steps, end[t]) if goal_steps else rng.integers(t + 1, end[t] + 1)


def value_goals(rng, t, end, cfg, frameskip=5):
    """IQL's value goals (B,): a random frame, the Geometric(1 - discount) future or t itself, as cfg.p_* (OGBench)."""
    u = rng.random(len(t))  # (B,)
    future = np.minimum(t + frameskip * rng.geometric(1 - cfg.discount, len(t)), end[t])  # (B,)
    g = np.where(u < cfg.p_random, rng.integers(0, len(end), len(t)), future)
    return np.where(u >= 1 - cfg.p_current, t, g)  # (B,)


class GCNet(nn.Module):
    """f(s, g [, a]) -> (B, out): one linear projection of every token of both frames, flattened (mean pooling would
    blur where the T is), with the action, into an MLP with LayerNorm + GELU (as OGBench's goal-conditioned MLPs)."""

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
    """GC-IQL on macro-step transitions s -> s' (tokens z0 -> z1 (B, P, D), action a0 (B, A), state s0 (B, 7)), value
    goals (tokens zgv, states sgv) and AWR weights under the actor goals zga -> losses, weights (B,), logged parts."""
    with torch.no_grad():  # reward (OGBench): 0 and episode over at the goal, else -1 (tested on states; swm: pixels)
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


def episode_ends(root, split):
    """(F,) the last frame of each frame's episode: hindsight goals stay inside the episode."""
    d = data.load_split(root, split)
    return np.repeat(d["starts"] + d["lengths"] - 1, d["lengths"])  # (F,)


def train(cfg: TrainConfig):
    """Train a goal-conditioned policy (gcbc or iql) into --out."""
    # --- setup: chunks from windows of H + 1 frames (states, actions), tokens from one-frame windows (only those used)
    out, path = Path(cfg.out), Path(cfg.out) / "policy.pt"
    data.output_folder(out, "--out", "policy.pt", cfg.data)  # never into the dataset or a folder of other files
    with data.locked(out):  # one trainer per folder
        t_start, meta = time.perf_counter(), data.load_meta(cfg.data, verify=True)
        fp = meta["fingerprint"]
        if path.is_file():  # this very policy (same settings and dataset) is left as it is; another is an error
            old = data.load_pt(path, "delete it to start over, or choose another --out", fmt=FORMAT)
            diff = data.differences(old["config"], asdict(cfg), "the policy has", RUNTIME + ("data",))
            if old["data"]["fingerprint"] != fp:
                diff.append(f"--data {cfg.data} (fingerprint {fp}; the policy's dataset: {old['data']['root']}, "
                            f"fingerprint {old['data']['fingerprint']})")
            require(not diff, f"{path} holds another policy: {'; '.join(diff)}. Choose another --out or delete it")
            print(f"{path} already holds this policy ({old['step']} steps); nothing to do")
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
        subset = data.label_subset(len(ds), cfg.labels // H if cfg.labels > 0 else -1, cfg.seed, cfg.batch_size)
        labels = H * len(subset) if cfg.labels > 0 else len(data.WindowDataset(cfg.data, "train", 2, mc.frameskip))
        order = (int(subset[i]) for _ in itertools.count() for i in torch.randperm(len(subset), generator=gen).tolist())
        it = iter(data.loader(ds, cfg.batch_size, order, 0, device, drop_last=True))  # a NumPy gather per batch
        input_of = dino.make_input(mc, device, cfg.dino_weights or None)
        tokens = lambda d, idx: input_of(d.__getitems__(idx))[:, 0]  # noqa: E731  frames idx (B,) -> (B, P, D)
        print(f"{cfg.algo} on {mc.tokens} tokens (P {mc.num_patches}, D {mc.visual_dim}) | windows: train "
              f"{len(ds)}, val {len(val)} | labels {labels} ({len(subset)} chunks) | chunk {H} x {A} | features: "
              f"{'none' if frames.features is None else cfg.features}")

        # --- networks, optimiser, and a fixed val batch (up to 256 windows, their actor goals) for the logged chunk MSE
        nets = {k: m.to(device) for k, m in build(cfg, mc).items()}
        trained = [p for k, m in nets.items() if "target" not in k for p in m.parameters()]  # not the EMA targets
        opt = torch.optim.Adam(trained, lr=cfg.lr)  # OGBench: Adam, on the sum of three losses of disjoint parameters
        if device.type == "cuda" and cfg.compile:
            for m in nets.values():
                m.compile()  # in place: the state_dict keys stay the raw module's
        vb = val.__getitems__(np.linspace(0, len(val) - 1, min(256, len(val))).round().astype(int))
        v_goals = actor_goals(np.random.default_rng(cfg.seed), vb["index"].numpy(), val_end, cfg.goal_steps)  # (V,)
        v_z, v_zg = tokens(val_frames, vb["index"].numpy()), tokens(val_frames, v_goals)  # (V, P, D) each
        v_a = vb["action"][:, :H].flatten(1).to(device)  # (V, H*A)
        print(f"parameters: {sum(p.numel() for p in trained) / 1e6:.2f} M | val chunk MSE of the dataset-mean action: "
              f"{v_a.square().mean().item():.4f}")

        # --- the loop: the three networks trained jointly as OGBench does (swm: the critics first, then the actor)
        parts = ["actor_loss", "value_loss", "critic_loss", "v_mean", "adv_mean", "w_mean"]  # gcbc logs the first
        cosine = cfg.schedule == "cosine" or (cfg.schedule == "auto" and cfg.algo == "gcbc")
        t0, t_step = time.perf_counter(), 0
        for step, batch in zip(tqdm(range(cfg.steps), disable=None, unit="step"), it):
            t = batch["index"].numpy()  # (B,) frame 0 of each window: the current frame
            opt.param_groups[0]["lr"] = cfg.lr * (0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cosine else 1.0)
            with ctx:  # gcbc: the chunk MSE under hindsight actor goals; iql: the same weighted by AWR, + V, Q losses
                z0, zga = tokens(frames, t), tokens(frames, actor_goals(rng, t, end, cfg.goal_steps))  # (B, P, D) each
                chunk = batch["action"][:, :H].flatten(1).to(z0.device)  # (B, H*A) the recorded chunk, z-scored
                err = (nets["actor"](z0, zga).float() - chunk).square().mean(1)  # (B,)
                loss, vals = err.mean(), [err.mean()]
                if cfg.algo == "iql":
                    gv = frames.__getitems__(value_goals(rng, t, end, cfg, mc.frameskip))  # value goals, with states
                    value_loss, critic_loss, w, vals = iql_losses(
                        nets, z0, tokens(frames, t + mc.frameskip), chunk[:, :A], input_of(gv)[:, 0],
                        gv["state"][:, 0].to(z0.device), batch["state"][:, 0].to(z0.device), zga, cfg)
                    actor_loss = (w * err).mean()  # AWR: weighted MSE = Gaussian log-likelihood with a fixed std
                    loss, vals = actor_loss + value_loss + critic_loss, [actor_loss] + vals
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.algo == "iql":  # Polyak-averaged V and Q targets (OGBench target_update, swm TeacherStudentWrapper)
                with torch.no_grad():
                    for k in ("value", "critic"):
                        for p_t, p in zip(nets[k + "_target"].parameters(), nets[k].parameters()):
                            p_t.lerp_(p, 1 - cfg.target_ema)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:  # logging: the only host syncs
                with torch.no_grad(), ctx:
                    val_mse = F.mse_loss(nets["actor"](v_z, v_zg).float(), v_a).item()
                dt = (time.perf_counter() - t0) / (step + 1 - t_step)
                tqdm.write(f"step {step + 1:6d} | " + " | ".join(f"{k} {x:.4g}" for k, x in zip(parts, torch.stack(
                    vals).tolist())) + f" | val_mse {val_mse:.4f} | {1e3 * dt:.1f} ms/step | {cfg.batch_size / dt:.0f} "
                    f"samples/s")
                t0, t_step = time.perf_counter(), step + 1

        # --- save: plain tensors, numbers and strings (read with torch.load(weights_only=True)), atomically
        seconds, root = time.perf_counter() - t_start, Path(cfg.data).resolve()
        data.atomic_write(path, {
            "format": FORMAT, "algo": cfg.algo, "tokens": mc.tokens, "step": cfg.steps, "config": asdict(cfg),
            "model_config": asdict(mc), "train_seconds": seconds, "val_mse": val_mse, "labels": labels,
            **{k: m.state_dict() for k, m in nets.items() if "target" not in k}, "stats": data.train_stats(meta),
            "data": {"root": str(root), "relative": os.path.relpath(root, out.resolve()), "fingerprint": fp}})
        print(f"trained {cfg.algo} ({mc.tokens} tokens) for {cfg.steps} steps in {seconds:.1f} s: val chunk MSE "
              f"{val_mse:.4f} -> {path}")
        return val_mse


def evaluate_policy(cfg: EvalConfig):
    """Evaluate a trained policy on plan.py's tasks and protocols -> RESULTS.json in plan.py's format."""
    # --- setup: the policy (on its own token source and dataset, else an error names both), tasks, reference rows
    t_start, folder = time.perf_counter(), Path(cfg.policy)
    device, ctx = data.setup(cfg.device, cfg.seed, cfg.dtype)
    data.writable(cfg.out, "--out", plan.RESULT_KEYS)  # a .json, never a checkpoint or another file of the user's
    ck = data.load_pt(folder / "policy.pt", f"train one with `python policy.py train --out {folder} ...`", fmt=FORMAT)
    require(not cfg.tokens or cfg.tokens == ck["tokens"], f"--tokens {cfg.tokens}: {folder} is a {ck['algo']} policy "
                                                          f"trained on {ck['tokens']} tokens, not {cfg.tokens} tokens")
    root = data.dataset_of(folder, ck["data"], cfg.data, f"{ck['algo']} policy on {ck['tokens']} tokens")
    mc, tc, stats = wm.WMConfig(**ck["model_config"]), ck["config"], ck["stats"]
    actor = build(replace(TrainConfig(**tc), algo="gcbc"), mc)["actor"].to(device).eval()
    actor.load_state_dict(ck["actor"])
    img, H, A, every_step = mc.img_size or 224, tc["horizon"], mc.action_dim, cfg.protocol == "mpc"
    n = cfg.episodes or plan.PROTOCOL_EPISODES[cfg.protocol]
    budget = plan.MPC_BUDGET if every_step else H * mc.frameskip  # open loop: one chunk, executed whole
    # mpc: chunk-end goals run whole chunks (every 25 steps, as plan.py replans), uniform ones 1 macro step (as swm)
    execute = (H if tc["goal_steps"] else 1) if every_step else H
    input_of = dino.make_input(mc, device, tc["dino_weights"] or None)
    encode = lambda states: input_of(dino.batch_of_states(states, mc))[:, 0]  # noqa: E731 (E, P, D)
    print(f"{ck['algo']} ({mc.tokens} tokens, {ck['step']} steps) | {n} episodes | budget {budget} env steps, "
          f"{execute} macro action(s) per query | split {cfg.split} of {root}")
    tasks = plan.make_tasks(root, cfg.split, cfg.protocol, n, cfg.seed, img)
    ceil_cfg = plan.PlanConfig(run=cfg.policy, horizon=H, opt_steps=cfg.opt_steps, workers=cfg.workers, seed=cfg.seed,
                               ceiling_episodes=cfg.ceiling_episodes)  # plan.py's default CEM budget: the same ceiling
    ref = plan.references(tasks, ceil_cfg, stats, budget, every_step, img, Path(cfg.out).parent / "ceiling")

    # --- act: one forward pass per query, every episode at once
    def policy_for(idx):
        with torch.inference_mode(), ctx:
            zg = encode(tasks["goal_state"][idx])  # (E, P, D), encoded once

        def policy(state):
            with torch.inference_mode(), ctx:
                a = actor(encode(state), zg).view(len(state), H, A)[:, :execute].float().cpu()  # (E, execute, A)
                return data.macro_to_env(a.numpy(), stats["action_mean"], stats["action_std"])  # (E, T, 2)
        return policy
    res = plan.evaluate(tasks, policy_for, n, budget, every_step, img, cfg.out, cfg.videos)

    # --- RESULTS.json and the one-line summary
    return plan.write_results(cfg, tasks, res, ck["algo"], ck["algo"], mc.tokens, ref, ck["algo"], ck["labels"], dict(
        budget=budget, mpc_execute=execute, device=str(device), data=str(root), train_steps=ck["step"],
        train_seconds=ck["train_seconds"], train_config=tc, total_seconds=time.perf_counter() - t_start))


if __name__ == "__main__":
    data.cli(None, doc=__doc__, commands={"train": (train, TrainConfig), "eval": (evaluate_policy, EvalConfig)})
