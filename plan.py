"""Goal-reaching evaluation on Push-T: plan towards a goal frame in the world model's imagination (Gaussian CEM,
categorical CEM or MPPI), act in the simulator, count successes (method.md s9, pusht.md s15).

Reads RUN/ckpt.pt (+ RUN/decoder.pt for la/vq) and the run's dataset split; writes RESULTS.json (contracts.md
fields, Wilson 95% CI, distances, tasks, resolved config) and mp4 videos of the first --videos episodes beside it.
Batched: every planner iteration is ONE world-model call over E episodes x N samples (E*N rollouts of H steps).
--opt-steps defaults to 30 (DINO-WM, stable-worldmodel); the seed's README numbers (0.52 / 0.02 / 0.19) used 10.
GPU:  python plan.py --run runs/full/vq --episodes 100 --protocol open-loop --opt-steps 10 --batch-episodes 10
        --out runs/full/results/vq_open-loop.json          (seconds per solve on a GPU: not yet measured)
CPU:  python plan.py --run /tmp/q/baseline --episodes 4 --protocol mpc --num-samples 16 --topk 4 --opt-steps 2
        --out /tmp/q/results/baseline_mpc.json   (tiny run: ~5 s on 2 cores, mostly start-up; 300/30/10 with
        10 episodes at once: ~1 s per episode-solve)
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import PushT, is_success, load_meta, load_split, macro_to_env, render_state
from decode import load_decoder
from dino import encode, load_dinov2
from wm import load_run


@dataclass
class Config:
    run: str = ""  # run folder written by train.py (and decode.py for la/vq)
    out: str = "results.json"  # RESULTS.json path; videos are written next to it
    episodes: int = 0  # evaluation episodes; 0 = the protocol's own (open-loop 100 as the seed, mpc 50 as swm)
    protocol: str = "open-loop"  # open-loop (pusht.md 15.1, the seed's) or mpc (15.2, stable-worldmodel, 50 steps)
    split: str = "val"  # dataset split the tasks come from; stable-worldmodel used train (in-distribution)
    data: str = ""  # dataset folder; "" = the one the run was trained on (ckpt data.root)
    planner: str = "auto"  # auto (categorical CEM for vq, Gaussian CEM otherwise), cem or mppi
    num_samples: int = 300  # N candidate plans per iteration; DINO-WM conf/planner/cem.yaml
    topk: int = 30  # M elites per iteration; DINO-WM cem.yaml (MPPI weights these too, as stable-worldmodel)
    opt_steps: int = 30  # planner iterations; DINO-WM and stable-worldmodel 30, the seed's README runs 10
    horizon: int = 5  # H macro actions per plan (goal_H 5 = 25 env steps)
    var_scale: float = 1.0  # multiplies the initial std sigma0; DINO-WM cem.yaml var_scale 1
    temperature: float = 0.5  # MPPI softmax temperature in cost units; stable-worldmodel MPPISolver default
    la_prior: str = "data"  # la start: data = run's latent_mean/std (method.md s11 defect 1), standard = N(0,1) (seed)
    objective: str = "last"  # last = last imagined frame (seed, DINO-WM); all = DINO-WM's 2^i-weighted frames
    alpha: float = 1.0  # weight of the proprio-embedding MSE in the cost (DINO-WM objective alpha; proprio runs)
    batch_episodes: int = 0  # episodes planned at once (E); 0 = all; lower it when E*N rollouts exceed memory
    videos: int = 2  # mp4 videos (simulator | goal) of the first N episodes
    seed: int = 0  # seeds task draws, per-episode planner noise and the random policy
    device: str = "auto"  # auto (cuda when available), cpu or cuda
    dino_weights: str = ""  # DINOv2 weights override (path or random); "" = the run's own
    compile: bool = True  # torch.compile the batched rollout-and-cost function on CUDA (never on CPU)
    bf16: bool = True  # bf16 autocast for world-model rollouts on CUDA (DINO-WM planned in fp32); ignored on CPU


# Shape legend: E episodes, N samples, M elites, H horizon (macro steps), A macro-action width (2*frameskip),
# L latent width, C conditioning width, K codes, P patches, D DINO width, S image side, T env steps.
GOAL_STEPS = 25  # env steps between start and goal (pusht.md s15: 5 macro actions x frameskip 5)
MPC_BUDGET = 50  # env steps per episode under --protocol mpc (stable-worldmodel eval budget)
PROTOCOL_EPISODES = {"open-loop": 100, "mpc": 50}  # seed n_evals 100; stable-worldmodel 50


def parse_config(cls, argv=None):
    """Flags from the dataclass: --field-name, help = the field's trailing comment, default shown."""
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kw = dict(action=argparse.BooleanOptionalAction) if f.type in (bool, "bool") else dict(type=type(f.default))
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=helps.get(f.name, " "), **kw)
    return cls(**vars(p.parse_args(argv)))


def wilson(k, n, z=1.96):
    """Wilson score interval for k successes in n trials (95% for z = 1.96); sane at 0 and n, unlike p +- 2se."""
    if n == 0:
        return 0.0, 1.0
    p, zz = k / n, z * z / n
    centre, half = (p + zz / 2) / (1 + zz), z * math.sqrt(p * (1 - p) / n + zz / (4 * n)) / (1 + zz)
    return max(0.0, centre - half), min(1.0, centre + half)


def proprio_of(states, stats, device):
    """(E, 7) states -> (E, 4) proprio [agent_x, agent_y, agent_vx, agent_vy], z-scored with the run's statistics."""
    p = torch.as_tensor(states[:, [0, 1, 5, 6]], dtype=torch.float32, device=device)  # (E, 4)
    return (p - torch.tensor(stats["proprio_mean"], device=device)) / torch.tensor(stats["proprio_std"], device=device)


def distances(goal, state):
    """The success test's two terms (pusht.md s8): ||d[agent_xy, block_xy]|| in px, |d angle| wrapped to [0, pi]."""
    d = abs(goal[4] - state[4]) % (2 * math.pi)
    return float(np.linalg.norm(goal[:4] - state[:4])), float(min(d, 2 * math.pi - d))


def draw(fn, E, shape, generator, device):
    """(E, *shape) draws of fn (torch.rand or torch.randn). With a list of E generators episode e draws only from
    generator e, so one batched call over E episodes gets exactly the noise (hence the plans) of E separate calls,
    and an episode's noise does not depend on --batch-episodes. One generator (or None) draws a single block."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([fn(shape, generator=g, device=device) for g in generator])  # (E, *shape)
    return fn((E, *shape), generator=generator, device=device)  # (E, *shape)


def cem_gaussian(cost_fn, mu, sigma, num_samples=300, topk=30, opt_steps=30, generator=None):
    """Gaussian cross-entropy method, batched over episodes (method.md s9.2; DINO-WM planning/cem.py).

    cost_fn:     samples (E, N, H, A) -> costs (E, N), lower is better; one batched world-model call per iteration
    mu, sigma:   (E, H, A) initial mean and std (baseline: 0 and var_scale in normalised action units;
                 la: the IDM's latent mean and std stored with the run)
    num_samples: N candidates per iteration; candidate 0 is always the current mean (DINO-WM)
    topk:        M elites; mean and unbiased std of the elites replace mu and sigma (no smoothing or clipping)
    opt_steps:   fixed iteration count (never stops early: planners do not see the simulator)
    generator:   None, a torch.Generator, or a list of E generators (one noise stream per episode, see draw)
    returns:     mu (E, H, A), the final mean
    """
    E = mu.shape[0]
    for _ in range(opt_steps):
        eps = draw(torch.randn, E, (num_samples, *mu.shape[1:]), generator, mu.device)  # (E, N, H, A)
        samples = mu[:, None] + sigma[:, None] * eps  # (E, N, H, A)
        samples[:, 0] = mu
        cost = cost_fn(samples)  # (E, N)
        elite = cost.topk(topk, dim=1, largest=False).indices  # (E, M)
        elites = torch.take_along_dim(samples, elite[:, :, None, None], dim=1)  # (E, M, H, A)
        mu, sigma = elites.mean(1), elites.std(1)  # (E, H, A) each; std is unbiased, as torch.std in DINO-WM
    return mu


def cem_categorical(cost_fn, E, H, K, num_samples=300, topk=30, opt_steps=30, temperature=1.5, min_prob=1e-3,
                    random_frac=0.1, pseudocount=1.0, momentum=0.7, device="cpu", generator=None):
    """Categorical CEM over code indices, batched over episodes: the seed's planning/discrete_cem.py with its
    published hyper-parameters (method.md s9.3), one independent categorical per macro step.

    cost_fn:     samples (E, N, H) long code indices -> costs (E, N)
    E, H, K:     episodes, horizon (one code per macro step), codebook size
    temperature: sample from softmax(log max(pi, min_prob) / temperature); 1.5 > 1 flattens pi
    min_prob:    probability floor applied after every update (keeps every code reachable)
    random_frac: the last int(random_frac * N) samples are uniform random indices (exploration injection)
    pseudocount: added to every code's elite count before the maximum-likelihood refit
    momentum:    pi <- momentum * pi_old + (1 - momentum) * pi_MLE (0.7 keeps 70 % of the OLD distribution)
    generator:   None, a torch.Generator, or a list of E generators (see draw)
    returns:     (E, H) long, the cheapest sample ever evaluated (best-ever tracker), not argmax pi: with
                 pseudocount 1 and momentum 0.7, pi stays broad for 10 iterations (method.md s9.3 note)
    """
    pi = torch.full((E, H, K), 1.0 / K, device=device)  # (E, H, K)
    best_cost = torch.full((E,), math.inf, device=device)  # (E,)
    best = torch.zeros(E, H, dtype=torch.long, device=device)  # (E, H)
    n_model = num_samples - int(random_frac * num_samples)  # samples drawn from pi; the rest are uniform
    for _ in range(opt_steps):
        q = torch.softmax(pi.clamp_min(min_prob).log() / temperature, dim=-1)  # (E, H, K)
        u = draw(torch.rand, E, (num_samples, H), generator, device)  # (E, N, H) uniforms in [0, 1)
        # inverse-CDF sampling: the first code whose cumulative probability reaches u (one draw per sample and step)
        idx = torch.searchsorted(q.cumsum(-1), u.transpose(1, 2).contiguous()).transpose(1, 2)  # (E, N, H)
        idx[:, n_model:] = (u[:, n_model:] * K).long()  # uniform exploration samples (seed: 10 %)
        idx = idx.clamp_max(K - 1)  # cumsum may end a hair below 1
        cost = cost_fn(idx)  # (E, N)
        elite_cost, elite = cost.topk(topk, dim=1, largest=False)  # (E, M) sorted, cheapest first
        elites = torch.take_along_dim(idx, elite[:, :, None], dim=1)  # (E, M, H)
        better = elite_cost[:, 0] < best_cost  # (E,)
        best_cost = torch.where(better, elite_cost[:, 0], best_cost)  # (E,)
        best = torch.where(better[:, None], elites[:, 0], best)  # (E, H)
        counts = F.one_hot(elites, K).sum(1).float() + pseudocount  # (E, H, K)
        mle = (counts / counts.sum(-1, keepdim=True)).clamp_min(min_prob)  # (E, H, K)
        pi = momentum * pi + (1 - momentum) * mle / mle.sum(-1, keepdim=True)  # (E, H, K)
        pi = pi.clamp_min(min_prob)
        pi = pi / pi.sum(-1, keepdim=True)  # (E, H, K)
    return best


def mppi(cost_fn, mu, sigma, num_samples=300, topk=30, opt_steps=30, temperature=0.5, generator=None):
    """Model-predictive path integral, batched over episodes. Sources: PLDM planning/planners/mppi_torch.py (after
    UM-ARM-Lab/pytorch_mppi, Williams et al. 2017) and stable-worldmodel solver/mppi.py, whose defaults we use
    (300 samples, 30 iterations, top 30, fixed std var_scale 1, temperature 0.5).

    cost_fn:     samples (E, N, H, A) -> costs (E, N)
    mu, sigma:   (E, H, A) initial mean and the FIXED sampling std (MPPI moves only the mean)
    topk:        the M cheapest samples enter the weighted mean (stable-worldmodel); topk = N gives PLDM's
                 all-sample weighting
    temperature: weights softmax(-cost / temperature) over the kept samples, in cost units (DINO-token MSE):
                 large = plain elite mean, small = the single best sample
    generator:   None, a torch.Generator, or a list of E generators (see draw)
    returns:     mu (E, H, A)
    """
    E = mu.shape[0]
    for _ in range(opt_steps):
        eps = draw(torch.randn, E, (num_samples, *mu.shape[1:]), generator, mu.device)  # (E, N, H, A)
        samples = mu[:, None] + sigma[:, None] * eps  # (E, N, H, A)
        samples[:, 0] = mu  # the current mean stays a candidate (stable-worldmodel)
        cost, keep = cost_fn(samples).topk(topk, dim=1, largest=False)  # (E, M) each
        w = torch.softmax(-cost / temperature, dim=1)  # (E, M); softmax is shift-invariant: no min-subtraction
        mu = (w[:, :, None, None] * torch.take_along_dim(samples, keep[:, :, None, None], dim=1)).sum(1)  # (E, H, A)
    return mu


def rollout_cost(model, z0, zg, plan, p0=None, pg=None, alpha=1.0, objective="last"):
    """Imagination cost of candidate plans (method.md s9.1): roll the world model out from the start tokens under
    every plan at once and compare the imagined tokens with the goal's.

    z0, zg (E, P, D) start and goal tokens; plan (E, N, H, ...) actions, latents or code indices;
    p0 (E, 4) normalised start proprio and pg (E, proprio_dim) goal proprio embedding (None without proprio).
    Fixed shapes and no Python branches on values, so torch.compile can take it whole. returns (E, N)."""
    E, N, H = plan.shape[:3]
    cond = model.plan_to_cond(plan.flatten(0, 1))  # (E*N, H, C)
    zs, ps = model.rollout(z0.repeat_interleave(N, 0), cond, None if p0 is None else p0.repeat_interleave(N, 0))
    frames = slice(H - 1, H) if objective == "last" else slice(0, H)  # only the frames the objective reads
    err = (zs[:, frames].float().unflatten(0, (E, N)) - zg[:, None, None]).square().mean((-1, -2))  # (E, N, H|1)
    if ps is not None:  # DINO-WM objectives.py: visual MSE + alpha * proprio MSE
        err = err + alpha * (ps[:, frames].float().unflatten(0, (E, N)) - pg[:, None, None]).square().mean(-1)
    if objective == "last":
        return err[..., 0]  # (E, N)
    # DINO-WM objective "all": weights 2^i / sum, later frames count more (it also counts the start frame, a constant)
    w = 2.0 ** torch.arange(H, device=err.device)  # (H,)
    return (err * w / w.sum()).mean(-1)  # (E, N)


def make_tasks(root, split, protocol, episodes, seed, img_size):
    """Start/goal pairs 25 env steps apart, the same for every run and planner given the seed (pusht.md s15).

    open-loop (15.1): episodes with length >= 26 drawn uniformly WITH replacement, offset uniform in [0, T-26];
      goal = the simulator state and frame after replaying the 25 recorded actions (exactly reachable). The start
      keeps the agent's recorded velocity, as DINO-WM does (the seed's env zeroed it).
    mpc (15.2): `episodes` (episode, step) rows with step <= T-26 drawn WITHOUT replacement by
      np.random.default_rng(seed) (stable-worldmodel used seed 42); goal = recorded state at step + 25, rendered.
    returns dict: episode, step (n,), start_state, goal_state (n, 7), actions (n, 25, 2) px, goal_frame (n, S, S, 3)."""
    d, rng = load_split(root, split), np.random.default_rng(seed)
    lengths, starts = d["lengths"], d["starts"]
    if protocol == "open-loop":
        ok = np.flatnonzero(lengths >= GOAL_STEPS + 1)
        if len(ok) == 0:
            raise ValueError(f"{root}/{split}: no episode has the {GOAL_STEPS + 1} frames a task needs; collect longer")
        ep = [int(rng.choice(ok)) for _ in range(episodes)]
        step = [int(rng.integers(0, lengths[e] - GOAL_STEPS)) for e in ep]  # high exclusive: [0, T-26]
    elif protocol == "mpc":
        per_ep = np.maximum(lengths - GOAL_STEPS, 0)  # (E,) rows per episode, episode-major, steps ascending
        rows_ep = np.repeat(np.arange(len(lengths)), per_ep)  # (R,)
        rows_step = np.arange(per_ep.sum()) - np.repeat(np.cumsum(per_ep) - per_ep, per_ep)  # (R,)
        if episodes > len(rows_ep):
            raise ValueError(f"{root}/{split}: --episodes {episodes} > {len(rows_ep)} start rows; lower --episodes")
        pick = rng.choice(len(rows_ep), size=episodes, replace=False)  # (n,)
        ep, step = rows_ep[pick].tolist(), rows_step[pick].tolist()
    else:
        raise ValueError(f"--protocol {protocol!r}: expected open-loop or mpc")
    g = np.array([starts[e] + t for e, t in zip(ep, step)], dtype=np.int64)  # (n,) global start frame
    start = d["states"][g]  # (n, 7)
    actions = d["actions"][g[:, None] + np.arange(GOAL_STEPS)].astype(np.float64)  # (n, 25, 2)
    if protocol == "mpc":
        goal = d["states"][g + GOAL_STEPS]  # (n, 7)
    else:  # replay in the simulator, as DINO-WM's goal construction does
        goal, env = [], PushT(img_size)
        for s, acts in zip(start, actions):
            env.set_state(s)
            for a in acts:
                env.advance(a)  # step() without the render
            goal.append(env.get_state())
        goal = np.stack(goal)  # (n, 7)
    goal_frame = np.stack([render_state(s, img_size) for s in goal])  # (n, S, S, 3)
    return dict(episode=np.array(ep), step=np.array(step), start_state=start, goal_state=goal, actions=actions,
                goal_frame=goal_frame)


def run_policy(tasks, idx, policy, budget, every_step, img_size, record=(), desc="env"):
    """Run `policy` for `budget` env steps from the start states of tasks[idx], one simulator per episode.

    policy(states (E, 7)) -> (E, T, 2) px actions; it is called again after T steps (frames are a pure function of
    the state: data.render_state). Success: open loop tests the final state only (pusht.md 15.1); mpc (every_step)
    tests after every env step and freezes an episode at its first success (15.2).
    record: local indices whose frames are kept for videos.
    returns success (E,) bool, final states (E, 7), best position distance (E,), clips {j: (frames, hits)}."""
    envs = [PushT(img_size) for _ in idx]
    for env, s in zip(envs, tasks["start_state"][idx]):
        env.set_state(s)
    state = np.stack([env.get_state() for env in envs])  # (E, 7)
    goal = tasks["goal_state"][idx]  # (E, 7)
    done, best = np.zeros(len(idx), bool), np.full(len(idx), np.inf)
    clips = {j: ([render_state(state[j], img_size)], [False]) for j in record}
    t, bar = 0, tqdm(total=budget, desc=desc, unit="step", leave=False)
    while t < budget:
        acts = policy(state)  # (E, T, 2)
        for a in acts.transpose(1, 0, 2)[: budget - t]:  # (E, 2) per env step
            for j, env in enumerate(envs):
                if not done[j]:  # a succeeded mpc episode stays frozen
                    env.advance(a[j])  # step() without its render
                    state[j] = env.get_state()
                    best[j] = min(best[j], distances(goal[j], state[j])[0])
                    done[j] = every_step and is_success(goal[j], state[j])
            for j in record:
                clips[j][0].append(render_state(state[j], img_size))
                clips[j][1].append(bool(done[j]))
            t += 1
            bar.update()
    bar.close()
    success = done if every_step else np.array([is_success(g, s) for g, s in zip(goal, state)])
    for j in record:  # open loop: the final frame shows the verdict
        clips[j][1][-1] = bool(success[j])
    return success, state, best, clips


def write_video(path, frames, hits, goal, side=256):
    """mp4 of one episode: simulator frame | goal frame, upscaled to `side` px, step counter and success mark."""
    path, big = Path(path), lambda f: cv2.resize(f, (side, side), interpolation=cv2.INTER_NEAREST)
    tmp = path.with_name(path.stem + ".tmp.mp4")  # VideoWriter picks the container from the suffix
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), 10, (2 * side, side))  # 10 Hz = env rate
    for t, (frame, hit) in enumerate(zip(frames, hits)):
        img = cv2.cvtColor(np.concatenate([big(frame), big(goal)], 1), cv2.COLOR_RGB2BGR)  # (side, 2*side, 3)
        cv2.putText(img, f"step {t}/{len(frames) - 1}", (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2)
        cv2.putText(img, "goal", (side + 6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2)
        if hit:
            cv2.putText(img, "success", (6, side - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 160, 0), 2)
        writer.write(img)
    writer.release()
    os.replace(tmp, path)


def references(tasks, stats, budget, every_step, img_size, seed):
    """Floor and ceiling on the same tasks (pusht.md 15.4): i.i.d. Gaussian px actions with the dataset's per-step
    mean and std, and the recorded actions replayed (then zero offsets). Replay is 1.0 open loop by construction."""
    n = len(tasks["episode"])
    rand = np.random.default_rng([seed, 1]).normal(stats["action_mean"], stats["action_std"], (n, budget, 2))
    replay, m = np.zeros((n, budget, 2)), min(budget, GOAL_STEPS)  # (n, T, 2)
    replay[:, :m] = tasks["actions"][:, :m]
    return {name: float(run_policy(tasks, np.arange(n), lambda s, a=a: a, budget, every_step, img_size,
                                   desc=name)[0].mean()) for name, a in (("random", rand), ("replay", replay))}


def plan_prior(variant, la_prior, var_scale, H, mc, stats, device):
    """(H, A|L) initial mean and std of the Gaussian planners (method.md s9.2); None for vq (categorical)."""
    if variant == "vq":
        return None, None
    if variant == "baseline":  # normalised macro actions: 0 is the dataset-mean action
        mu, sigma = torch.zeros(mc["action_dim"]), torch.ones(mc["action_dim"])  # (A,)
    elif la_prior == "data":  # the IDM's own latent statistics, stored by train.py (fixes defect 1)
        mu, sigma = torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"])  # (L,)
    else:  # the seed's N(0, 1), kept to reproduce its LA number
        mu, sigma = torch.zeros(mc["latent_dim"]), torch.ones(mc["latent_dim"])  # (L,)
    return mu.float().to(device).expand(H, -1), var_scale * sigma.float().to(device).expand(H, -1)  # (H, A|L)


def main(cfg):
    t_start = time.perf_counter()
    print(asdict(cfg))
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    print(f"device: {device}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, ckpt = load_run(cfg.run, device)
    mc, tc, stats = ckpt["model_config"], ckpt["train_config"], ckpt["stats"]
    variant, img_size, dino_size, H = mc["variant"], tc["img_size"], tc["dino_size"], cfg.horizon
    for flag, allowed in dict(protocol=("open-loop", "mpc"), planner=("auto", "cem", "mppi"), split=("train", "val"),
                              la_prior=("data", "standard"), objective=("last", "all")).items():
        if getattr(cfg, flag) not in allowed:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: expected one of {allowed}")
    if cfg.planner == "mppi" and variant == "vq":
        raise ValueError(f"--planner mppi needs continuous plans; {cfg.run} is a vq run (use auto or cem)")
    planner = "mppi" if cfg.planner == "mppi" else "cem_categorical" if variant == "vq" else "cem_gaussian"
    root = cfg.data or ckpt["data"]["root"]
    if load_meta(root)["fingerprint"] != ckpt["data"]["fingerprint"]:
        raise ValueError(f"{root} is not the dataset {cfg.run} was trained on (fingerprint differs); pass its --data")
    encoder = load_dinov2(tc["dino_name"], cfg.dino_weights or tc["dino_weights"] or None, device)
    decoder = load_decoder(cfg.run, ckpt, device) if variant != "baseline" else None
    n = cfg.episodes or PROTOCOL_EPISODES[cfg.protocol]
    E, every_step = cfg.batch_episodes or n, cfg.protocol == "mpc"
    budget = MPC_BUDGET if every_step else H * mc["frameskip"]  # open loop: one plan, executed whole
    print(f"variant {variant} | planner {planner} | {n} episodes in batches of {E} | budget {budget} env steps | "
          f"split {cfg.split} of {root}")

    # ---- the tasks, and the reference rows on the same tasks
    tasks = make_tasks(root, cfg.split, cfg.protocol, n, cfg.seed, img_size)
    ref = references(tasks, stats, budget, every_step, img_size, cfg.seed)

    # ---- one solve: encode the current frames once, plan (E*N rollouts per iteration), decode to px actions
    mu0, sigma0 = plan_prior(variant, cfg.la_prior, cfg.var_scale, H, mc, stats, device)
    use_compile = cfg.compile and device.type == "cuda"
    cost = torch.compile(rollout_cost, dynamic=False) if use_compile else rollout_cost  # fixed (E, N, H) shapes
    amp = torch.autocast("cuda", torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()

    @torch.inference_mode()
    def solve(state, zg, pg, gens, opt_steps):
        E = len(state)
        z0 = encode(encoder, np.stack([render_state(s, img_size) for s in state]), dino_size)  # (E, P, D)
        p0 = proprio_of(state, stats, device) if mc["proprio"] else None  # (E, 4)

        def cost_fn(samples):  # (E, N, H, ...) -> (E, N)
            with amp:
                return cost(model, z0, zg, samples, p0, pg, cfg.alpha, cfg.objective)
        kw = dict(num_samples=cfg.num_samples, topk=cfg.topk, opt_steps=opt_steps, generator=gens)
        if planner == "cem_categorical":
            plan = cem_categorical(cost_fn, E, H, mc["num_codes"], device=device, **kw)  # (E, H)
        elif planner == "mppi":
            plan = mppi(cost_fn, mu0.expand(E, -1, -1), sigma0.expand(E, -1, -1), temperature=cfg.temperature, **kw)
        else:
            plan = cem_gaussian(cost_fn, mu0.expand(E, -1, -1), sigma0.expand(E, -1, -1), **kw)  # (E, H, A|L)
        a = plan  # baseline: (E, H, A) normalised macro actions
        if decoder is not None:  # decode step h from frame h's tokens (real z0, then imagined) and plan h (s9.4)
            cond = model.plan_to_cond(plan)  # (E, H, C)
            zs, _ = model.rollout(z0, cond, p0)  # (E, H, P, D)
            tokens = torch.cat([z0[:, None], zs[:, :-1]], 1).flatten(0, 1)  # (E*H, P, D)
            a = decoder(tokens, cond.flatten(0, 1), zs.flatten(0, 1) if decoder.use_delta else None)  # (E*H, A)
        return macro_to_env(a.reshape(E, H, -1).float().cpu().numpy(), stats["action_mean"], stats["action_std"])

    # ---- the evaluation: batches of E episodes; each solves every H*frameskip env steps
    successes, finals, bests, solve_s, solves = [], [], [], 0.0, 0
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for b0 in range(0, n, E):
        idx = np.arange(b0, min(n, b0 + E))
        with torch.inference_mode():  # goals are encoded once per batch
            zg = encode(encoder, tasks["goal_frame"][idx], dino_size)  # (E, P, D)
            pg = model.embed_proprio(proprio_of(tasks["goal_state"][idx], stats, device)) if mc["proprio"] else None
        # one generator per episode, seeded by (seed, episode index): its noise does not depend on --batch-episodes
        gens = [torch.Generator(device).manual_seed(int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0]))
                for i in idx.tolist()]
        if use_compile and b0 == 0:  # compile outside the timed solves (skip the warm-up, rule 10)
            t0 = time.perf_counter()
            solve(tasks["start_state"][idx], zg, pg, None, 1)
            torch.cuda.synchronize()
            print(f"compiled rollout_cost in {time.perf_counter() - t0:.1f} s")

        def policy(state):
            nonlocal solve_s, solves
            t0 = time.perf_counter()
            acts = solve(state, zg, pg, gens, cfg.opt_steps)  # (E, H*frameskip, 2)
            if device.type == "cuda":
                torch.cuda.synchronize()
            solve_s, solves = solve_s + time.perf_counter() - t0, solves + len(idx)
            return acts
        record = [j for j, i in enumerate(idx) if i < cfg.videos]
        ok, final, best, clips = run_policy(tasks, idx, policy, budget, every_step, img_size, record,
                                            desc=f"episodes {b0}-{idx[-1]} of {n}")
        successes, bests = successes + ok.astype(int).tolist(), bests + best.tolist()
        finals.append(final)
        for j, (frames, hits) in clips.items():
            write_video(out.with_name(f"{out.stem}_ep{idx[j]:03d}.mp4"), frames, hits, tasks["goal_frame"][idx[j]])

    # ---- RESULTS.json (contracts.md fields first) and the one-line summary
    k = sum(successes)
    dist = np.array([distances(g, s) for g, s in zip(tasks["goal_state"], np.concatenate(finals))])  # (n, 2)
    results = dict(
        success_rate=k / n, successes=successes, episodes=n, protocol=cfg.protocol, planner=planner,
        seconds_per_solve=solve_s / max(solves, 1), variant=variant, reference=ref, ci95=list(wilson(k, n)),
        batch_episodes=E, split=cfg.split, budget=budget, device=str(device),
        mean_final_pos_dist=float(dist[:, 0].mean()), mean_final_angle_dist=float(dist[:, 1].mean()),
        mean_best_pos_dist=float(np.mean(bests)), total_seconds=time.perf_counter() - t_start, run=str(cfg.run),
        data=str(root), config=asdict(cfg),
        tasks={key: tasks[key].tolist() for key in ("episode", "step", "start_state", "goal_state")})
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out)
    lo, hi = results["ci95"]
    print(f"{variant} {cfg.protocol} {planner}: success {k}/{n} = {k / n:.2f} (95% CI {lo:.2f}-{hi:.2f}) | random "
          f"{ref['random']:.2f} | replay {ref['replay']:.2f} | {results['seconds_per_solve']:.3f} s/solve (batch {E}, "
          f"{device}) -> {out}")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
