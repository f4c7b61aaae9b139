"""Goal-reaching evaluation on Push-T: plan towards a goal in the world model's imagination (Gaussian or categorical
CEM), act in the simulator, count successes; with the floor (random actions), the replay of the recorded actions,
and the planner's ceiling (the same planner and budget with the true simulator as its model).

Reads RUN/ckpt.pt (+ RUN/decoder.pt for la/vq, or RUN/adapter.pt with --via adapter) and the run's dataset split
(--data for a moved run); writes RESULTS.json (success_rate, successes, via, labels, reference {random, replay,
ceiling}, Wilson 95% CI, distances, tasks, config), mp4 videos of the first --videos episodes and the ceiling's cache
(ceiling/, shared by every run planned on the same tasks and budget) beside it. Batched: every planner iteration is
ONE world-model call over E episodes x N samples. --opt-steps: 30 as DINO-WM and stable-worldmodel; the seed used 10.
GPU:  python plan.py --run runs/full/vq --protocol open-loop --opt-steps 10 --out runs/full/results/vq-open-loop.json
      (DINOv2 tokens, 100 episodes; seconds per solve on an H200: not yet measured)
CPU:  python plan.py --run runs/quick/baseline --opt-steps 10 --out runs/quick/results/baseline-open-loop.json
      (state tokens, open loop, 100 episodes: ~0.1 s per episode-solve on 2 cores)
"""
import hashlib
import json
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import dino
import train
import wm
from data import PushT, UserError, distances, is_success, load_split, macro_to_env, render_state, require
from decode import load_head


@dataclass
class PlanConfig:
    run: str = ""  # run folder written by train.py (and decode.py for la/vq)
    out: str = "results.json"  # RESULTS.json path; videos and the ceiling's cache go next to it
    data: str = ""  # dataset folder, "" = the one the run was trained on (for a run moved away from its data)
    episodes: int = 0  # evaluation episodes; 0 = the protocol's own (open-loop 100 as the seed, mpc 50 as swm)
    protocol: Literal["open-loop", "mpc"] = "open-loop"  # one 25-step plan (the seed), or replan under 50 steps (swm)
    split: Literal["val", "train"] = "val"  # dataset split the tasks come from; stable-worldmodel used train
    via: Literal["auto", "actions", "decoder", "adapter"] = "auto"  # auto: actions (baseline), decoder (la/vq); adapter
    num_samples: int = 300  # N candidate plans per iteration; DINO-WM conf/planner/cem.yaml
    topk: int = 30  # M elites per iteration; DINO-WM cem.yaml
    opt_steps: int = 30  # planner iterations; DINO-WM and stable-worldmodel 30, the seed's README runs 10
    horizon: int = 5  # H macro actions per plan (goal_H 5 = 25 env steps)
    var_scale: float = 1.0  # multiplies the initial std sigma0; DINO-WM cem.yaml var_scale 1
    pseudocount: float = 1.0  # categorical CEM: added to every code's elite count; the seed's discrete_cem.py 1.0
    la_prior: Literal["data", "standard"] = "data"  # la start: the run's latent mean/std, or N(0, 1) as the seed
    alpha: float = 1.0  # weight of the proprio-embedding MSE in the cost (DINO-WM objective alpha; proprio runs)
    batch_episodes: int = 0  # episodes planned at once (E); 0 = as many as fit in free memory (computed)
    ceiling_episodes: int = 20  # tasks the simulator-as-model ceiling runs on (the first ones; ~7 s each per core)
    workers: int = -1  # processes for the ceiling's simulator rollouts; -1 = one per CPU core
    videos: int = 2  # mp4 videos (simulator | goal) of the first N episodes
    seed: int = 0  # seeds task draws, per-episode planner noise and the random policy
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    dino_weights: str = ""  # DINOv2 weights override (path or random); "" = the run's own (pixel tokens only)
    compile: bool = True  # torch.compile the batched rollout-and-cost function on CUDA (never on CPU)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # CUDA: bf16 autocast (the encoder included), or fp32, TF32 off
    allow_collapsed: bool = False  # plan even with a collapsed jepa encoder (median token std < train.COLLAPSE_STD)

    def __post_init__(self):
        data.check_choices(self)
        require(self.run, "--run RUN is required: a run folder written by train.py")
        require(min(self.num_samples, self.topk, self.opt_steps, self.horizon) >= 1 and self.topk <= self.num_samples,
                "--num-samples, --topk, --opt-steps and --horizon must be >= 1, with --topk <= --num-samples")
        require(self.episodes >= 0 and self.batch_episodes >= 0 and self.ceiling_episodes >= 0 and self.videos >= 0
                and self.workers >= -1, "--episodes, --batch-episodes, --ceiling-episodes and --videos must be >= 0")
        require(self.var_scale > 0 and self.alpha >= 0 and self.pseudocount >= 0,
                "--var-scale must be > 0, --alpha and --pseudocount >= 0")


# Shape legend: E episodes, N samples, M elites, H horizon (macro steps), A macro-action width (2*frameskip),
# L latent width, C conditioning width, K codes, P tokens per frame, D token width, S image side, T env steps.
GOAL_STEPS = 25  # env steps between start and goal (5 macro actions x frameskip 5, the seed's goal_H)
MPC_BUDGET = 50  # env steps per episode under --protocol mpc (stable-worldmodel eval budget)
PROTOCOL_EPISODES = {"open-loop": 100, "mpc": 50}  # seed n_evals 100; stable-worldmodel 50
RESULT_KEYS = ("success_rate", "successes", "episodes", "protocol", "planner", "variant", "via", "labels", "reference")


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


def draw(fn, E, shape, generator, device):
    """(E, *shape) draws of fn (torch.rand or torch.randn). With a list of E generators episode e draws only from
    generator e, so one batched call over E episodes gets exactly the noise (hence the plans) of E separate calls,
    and an episode's noise does not depend on --batch-episodes. One generator (or None) draws a single block."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([fn(shape, generator=g, device=device) for g in generator])  # (E, *shape)
    return fn((E, *shape), generator=generator, device=device)  # (E, *shape)


def cem_gaussian(cost_fn, mu, sigma, num_samples=300, topk=30, opt_steps=30, generator=None):
    """Gaussian cross-entropy method, batched over episodes (DINO-WM planning/cem.py).

    cost_fn:     samples (E, N, H, A) -> costs (E, N), lower is better; one batched world-model call per iteration
    mu, sigma:   (E, H, A) initial mean and std (baseline: 0 and var_scale, normalised; la: the run's latent stats)
    num_samples: N candidates per iteration; candidate 0 is always the current mean (DINO-WM)
    topk:        M elites; mean and unbiased std of the elites replace mu and sigma (no smoothing or clipping)
    opt_steps:   fixed iteration count (never stops early: planners do not see the simulator)
    generator:   None, a torch.Generator, or a list of E generators (one noise stream per episode, see draw)
    returns:     mu (E, H, A), the final mean"""
    for _ in range(opt_steps):
        eps = draw(torch.randn, len(mu), (num_samples, *mu.shape[1:]), generator, mu.device)  # (E, N, H, A)
        samples = mu[:, None] + sigma[:, None] * eps  # (E, N, H, A)
        samples[:, 0] = mu
        elite = cost_fn(samples).topk(topk, dim=1, largest=False).indices  # (E, M) the cheapest samples
        elites = torch.take_along_dim(samples, elite[:, :, None, None], dim=1)  # (E, M, H, A)
        mu, sigma = elites.mean(1), elites.std(1)  # (E, H, A) each; std is unbiased, as torch.std in DINO-WM
    return mu


def cem_categorical(cost_fn, E, H, K, num_samples=300, topk=30, opt_steps=30, temperature=1.5, min_prob=1e-3,
                    random_frac=0.1, pseudocount=1.0, momentum=0.7, device="cpu", generator=None):
    """Categorical CEM over code indices, batched over episodes: the seed's planning/discrete_cem.py with its
    published hyper-parameters, one independent categorical per macro step.

    cost_fn:     samples (E, N, H) long code indices -> costs (E, N)
    E, H, K:     episodes, horizon (one code per macro step), codebook size
    temperature: sample from softmax(log max(pi, min_prob) / temperature); 1.5 > 1 flattens pi
    min_prob:    probability floor applied after every update (keeps every code reachable)
    random_frac: the last int(random_frac * N) samples are uniform random indices (exploration injection)
    pseudocount: added to every code's elite count before the maximum-likelihood refit
    momentum:    pi <- momentum * pi_old + (1 - momentum) * pi_MLE (0.7 keeps 70 % of the OLD distribution)
    generator:   None, a torch.Generator, or a list of E generators (see draw)
    returns:     (E, H) long, the cheapest sample ever evaluated (best-ever tracker), not argmax pi: with
                 pseudocount 1 and momentum 0.7, pi stays broad for 10 iterations (a unanimous elite reaches 31/62)"""
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
        elite_cost, elite = cost_fn(idx).topk(topk, dim=1, largest=False)  # (E, M) sorted, cheapest first
        elites = torch.take_along_dim(idx, elite[:, :, None], dim=1)  # (E, M, H)
        better = elite_cost[:, 0] < best_cost  # (E,)
        best_cost = torch.where(better, elite_cost[:, 0], best_cost)  # (E,)
        best = torch.where(better[:, None], elites[:, 0], best)  # (E, H)
        counts = F.one_hot(elites, K).sum(1).float() + pseudocount  # (E, H, K)
        mle = (counts / counts.sum(-1, keepdim=True)).clamp_min(min_prob)  # (E, H, K)
        pi = (momentum * pi + (1 - momentum) * mle / mle.sum(-1, keepdim=True)).clamp_min(min_prob)  # (E, H, K)
        pi = pi / pi.sum(-1, keepdim=True)  # (E, H, K)
    return best


def rollout_cost(model, z0, zg, plan, p0=None, pg=None, alpha=1.0, adapter=None):
    """Imagination cost of candidate plans (DINO-WM planning/objectives.py, objective "last" as the seed): roll the
    world model out from the start tokens under every plan at once and compare the last imagined tokens with the goal's.

    z0, zg (E, P, D) start and goal tokens; plan (E, N, H, ...) actions, latents or code indices;
    p0 (E, 4) normalised start proprio and pg (E, proprio_dim) goal proprio embedding (None without proprio);
    adapter: plans are real macro actions, imagined through it (wm.WorldModel.rollout). Fixed shapes and no Python
    branches on values, so torch.compile can take it whole. returns (E, N)."""
    E, N = plan.shape[:2]
    cond = plan.flatten(0, 1) if adapter is not None else model.plan_to_cond(plan.flatten(0, 1))  # (E*N, H, C|A)
    zs, ps = model.rollout(z0.repeat_interleave(N, 0), cond, None if p0 is None else p0.repeat_interleave(N, 0),
                           adapter)
    err = (zs[:, -1].float().unflatten(0, (E, N)) - zg[:, None]).square().mean((-1, -2))  # (E, N)
    if ps is not None:  # DINO-WM objectives.py: visual MSE + alpha * proprio MSE
        err = err + alpha * (ps[:, -1].float().unflatten(0, (E, N)) - pg[:, None]).square().mean(-1)
    return err  # (E, N)


def make_tasks(root, split, protocol, episodes, seed, img_size):
    """Start/goal pairs 25 env steps apart, the same for every run and planner given the seed.
    open-loop (the seed's): episodes of >= 26 frames drawn WITH replacement, offset uniform in [0, T-26]; goal = the
      state after replaying the 25 recorded actions (exactly reachable); the start keeps the agent's recorded
      velocity, as DINO-WM does (the seed's env zeroed it).
    mpc (stable-worldmodel scripts/plan/eval_wm.py): (episode, step <= T-26) rows drawn WITHOUT replacement (swm used
      seed 42); goal = the recorded state at step + 25.
    -> dict: episode, step (n,), start_state, goal_state (n, 7), actions (n, 25, 2) px, goal_frame (n, S, S, 3)."""
    d, rng = load_split(root, split), np.random.default_rng(seed)
    lengths, starts = d["lengths"], d["starts"]
    if protocol == "open-loop":
        ok = np.flatnonzero(lengths >= GOAL_STEPS + 1)
        require(len(ok) > 0, f"{root}/{split}: no episode has the {GOAL_STEPS + 1} frames a task needs; collect longer")
        ep = [int(rng.choice(ok)) for _ in range(episodes)]
        step = [int(rng.integers(0, lengths[e] - GOAL_STEPS)) for e in ep]  # high exclusive: [0, T-26]
    else:  # mpc
        per_ep = np.maximum(lengths - GOAL_STEPS, 0)  # (E,) rows per episode, episode-major, steps ascending
        rows_ep = np.repeat(np.arange(len(lengths)), per_ep)  # (R,)
        rows_step = np.arange(per_ep.sum()) - np.repeat(np.cumsum(per_ep) - per_ep, per_ep)  # (R,)
        require(episodes <= len(rows_ep), f"{root}/{split} has {len(rows_ep)} start rows: lower --episodes {episodes}")
        pick = rng.choice(len(rows_ep), size=episodes, replace=False)  # (n,)
        ep, step = rows_ep[pick].tolist(), rows_step[pick].tolist()
    g = np.array([starts[e] + t for e, t in zip(ep, step)], dtype=np.int64)  # (n,) global start frame
    start = d["states"][g]  # (n, 7)
    actions = d["actions"][g[:, None] + np.arange(GOAL_STEPS)].astype(np.float64)  # (n, 25, 2)
    goal = d["states"][g + GOAL_STEPS]  # (n, 7) mpc: the recorded state
    if protocol == "open-loop":  # replay in the simulator, as DINO-WM's goal construction does
        goal = np.stack([PushT(img_size).replay(s, acts) for s, acts in zip(start, actions)])  # (n, 7)
    return dict(episode=np.array(ep), step=np.array(step), start_state=start, goal_state=goal, actions=actions,
                goal_frame=np.stack([render_state(s, img_size) for s in goal]))  # goal_frame (n, S, S, 3)


def run_policy(tasks, idx, policy, budget, every_step, img_size, record=(), desc="env"):
    """Run policy(states (E, 7)) -> (E, T, 2) px actions for `budget` env steps from the start states of tasks[idx], one
    simulator per episode, called again every T steps. Open loop tests the final state (the seed); mpc (every_step)
    tests every step and freezes an episode at its first success (stable-worldmodel). record: indices kept for videos.
    -> success (E,), final states (E, 7), best position distance (E,), clips, (seconds in policy, episode-solves)."""
    envs = [PushT(img_size) for _ in idx]
    state = np.stack([env.replay(s, []) for env, s in zip(envs, tasks["start_state"][idx])])  # (E, 7): place(s)
    goal = tasks["goal_state"][idx]  # (E, 7)
    done, best, seconds, solves = np.zeros(len(idx), bool), np.full(len(idx), np.inf), 0.0, 0
    clips = {j: ([render_state(state[j], img_size)], [False]) for j in record}
    t, bar = 0, tqdm(total=budget, desc=desc, unit="step", leave=False, disable=None)
    while t < budget:
        t0 = time.perf_counter()
        acts = policy(state)  # (E, T, 2); returning NumPy synchronises any GPU work
        seconds += time.perf_counter() - t0
        solves += len(state)
        for a in acts.transpose(1, 0, 2)[: budget - t]:  # (E, 2) per env step
            for j, env in enumerate(envs):
                if not done[j]:  # a succeeded mpc episode stays frozen
                    env.advance(a[j])
                    state[j] = env.get_state()
                    best[j] = min(best[j], distances(goal[j], state[j])[0])
                    done[j] = every_step and is_success(goal[j], state[j])
            for j in record:
                clips[j][0].append(render_state(state[j], img_size))
                clips[j][1].append(bool(done[j]))
            t += 1
            bar.update()
    bar.close()
    success = done if every_step else is_success(goal, state)
    for j in record:  # open loop: the final frame shows the verdict
        clips[j][1][-1] = bool(success[j])
    return success, state, best, clips, (seconds, solves)


def evaluate(tasks, policy_for, batch, budget, every_step, img_size, out, videos=0):
    """Every task, in batches of `batch` episodes: policy_for(idx) gives the policy of those episodes (run_policy).
    Writes videos of the first `videos` episodes next to `out`. -> dict of per-episode results, solve seconds."""
    n, res = len(tasks["episode"]), {"successes": [], "final": [], "best": [], "seconds": 0.0, "solves": 0}
    for b0 in range(0, n, batch):
        idx = np.arange(b0, min(n, b0 + batch))
        record = [j for j, i in enumerate(idx) if i < videos]
        ok, final, best, clips, (seconds, solves) = run_policy(tasks, idx, policy_for(idx), budget, every_step,
                                                               img_size, record, desc=f"episodes {b0}-{idx[-1]} of {n}")
        res["successes"] += ok.astype(int).tolist()
        res["final"].append(final), res["best"].extend(best.tolist())
        res["seconds"], res["solves"] = res["seconds"] + seconds, res["solves"] + solves
        for j, (frames, hits) in clips.items():
            write_video(Path(out).with_name(f"{Path(out).stem}_ep{idx[j]:03d}.mp4"), frames, hits,
                        tasks["goal_frame"][idx[j]])
    res["final"] = np.concatenate(res["final"])
    return res


def references(tasks, cfg, stats, budget, every_step, img_size, cache_dir):
    """The reference rows on the same tasks: the floor, i.i.d. Gaussian px actions with the dataset's per-step mean and
    std; the recorded actions replayed (then zero offsets), 1.0 open loop by construction; the ceiling (ceiling())."""
    n = len(tasks["episode"])
    rand = np.random.default_rng([cfg.seed, 1]).normal(stats["action_mean"], stats["action_std"], (n, budget, 2))
    replay, m = np.zeros((n, budget, 2)), min(budget, GOAL_STEPS)  # (n, T, 2)
    replay[:, :m] = tasks["actions"][:, :m]
    ref = {name: float(run_policy(tasks, np.arange(n), lambda s, a=a: a, budget, every_step, img_size,
                                  desc=name)[0].mean()) for name, a in (("random", rand), ("replay", replay))}
    return {**ref, **ceiling(tasks, cfg, stats, budget, every_step, img_size, cache_dir)}


def sim_costs(state, goal, acts):
    """The ceiling's model: the simulator from `state` as the env's get_state() returned it (placed without set_state's
    extra physics step, which would move it away from the env's start) under each px action sequence acts (N, T, 2) ->
    (N,) costs, the squared state distance in units of the success tolerances (20 px, 20 deg)."""
    env = PushT()
    dist = [distances(goal, env.replay(state, seq, settle=False)) for seq in acts]  # (pos px, angle rad) per sequence
    return torch.tensor([(pos / data.SUCCESS_PX) ** 2 + (ang / data.SUCCESS_ANGLE) ** 2 for pos, ang in dist])  # (N,)


def sim_solve(job):
    """One Gaussian CEM solve whose model is the true simulator (the ceiling): job = (state, goal, noise seed, plan
    config dict, action stats) -> (H * frameskip, 2) px actions. Runs in a worker process."""
    state, goal, seed, c, stats = job
    torch.set_num_threads(1)
    shape = (1, c["horizon"], 2 * 5)  # (1, H, A): macro actions of frameskip 5
    cost_fn = lambda samples: sim_costs(state, goal, macro_to_env(  # noqa: E731  (1, N, H, A) -> (1, N)
        samples[0].numpy(), stats["action_mean"], stats["action_std"]))[None]
    mu = cem_gaussian(cost_fn, torch.zeros(shape), c["var_scale"] * torch.ones(shape), c["num_samples"], c["topk"],
                      c["opt_steps"], torch.Generator().manual_seed(seed))
    return macro_to_env(mu[0].numpy(), stats["action_mean"], stats["action_std"])


def ceiling(tasks, cfg, stats, budget, every_step, img_size, cache_dir):
    """The planner's ceiling: Gaussian CEM over actions with the planner's budget, the true simulator as its model, the
    same protocol, on the first cfg.ceiling_episodes tasks. Cached in cache_dir by a digest of the tasks and budget."""
    n = min(cfg.ceiling_episodes, len(tasks["episode"]))
    if n == 0:
        return {"ceiling": None, "ceiling_episodes": 0}
    budget_cfg = {k: getattr(cfg, k) for k in ("num_samples", "topk", "opt_steps", "horizon", "var_scale", "seed")}
    digest = hashlib.sha256(json.dumps([tasks["start_state"][:n].tolist(), tasks["goal_state"][:n].tolist(),
                                        budget, every_step, budget_cfg, stats["action_std"], "placed once"]).encode()
                            ).hexdigest()[:16]  # "placed once": caches of the earlier, twice-placed model are stale
    path = Path(cache_dir) / f"ceiling-{digest}.json"
    keys = ("ceiling", "ceiling_episodes", "ceiling_successes")
    if path.is_file():
        try:
            hit = data.load_json(path, "", keys)
            print(f"ceiling: {hit['ceiling']:.2f} on {n} tasks (cached in {path})")
            return {k: hit[k] for k in keys}
        except UserError as e:
            print(f"{e}: solving the ceiling again")
    data.writable(path, "--out")  # the cache sits next to --out: checked before minutes of solving
    solves = iter(range(10 ** 6))  # one noise seed per solve, whatever the pool's order
    with multiprocessing.Pool(cfg.workers if cfg.workers > 0 else os.cpu_count()) as pool:
        def policy(state):
            jobs = [(s, g, int(np.random.SeedSequence([cfg.seed, i, next(solves)]).generate_state(1)[0]), budget_cfg,
                     stats) for i, (s, g) in enumerate(zip(state, tasks["goal_state"][:n]))]
            return np.stack(pool.map(sim_solve, jobs))  # (n, H*frameskip, 2)
        ok = run_policy(tasks, np.arange(n), policy, budget, every_step, img_size,
                        desc="ceiling (simulator as model)")[0]
    result = {"ceiling": float(ok.mean()), "ceiling_episodes": n, "ceiling_successes": ok.astype(int).tolist()}
    data.atomic_write(path, {**result, "budget": budget_cfg, "protocol_budget": budget, "every_step": every_step})
    print(f"ceiling: {result['ceiling']:.2f} on {n} tasks (simulator as the planner's model) -> {path}")
    return result


def auto_batch(cfg, model, n, device, width, adapter=None):
    """Episodes per solve (E): cfg.batch_episodes, else as many as fit in half the free memory: on CUDA the measured
    peak of a 2-episode batched rollout (plans of `width` per step, None = code indices), on the CPU an upper bound
    by the shapes (the predictor's activations and attention weights of N samples) against the available RAM."""
    if cfg.batch_episodes:
        return min(n, cfg.batch_episodes)
    mc, N, H = model.cfg, cfg.num_samples, cfg.horizon
    if device.type == "cuda":
        z = torch.zeros(2, mc.num_patches, mc.visual_dim, device=device)  # (2, P, D)
        plan = torch.zeros(2, N, H, dtype=torch.long, device=device) if width is None else \
            torch.zeros(2, N, H, width, device=device)  # (2, N, H[, A|L])
        torch.cuda.synchronize(device), torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            rollout_cost(model, z, z, plan, adapter=adapter)
        per_episode, free = (torch.cuda.max_memory_allocated(device) - base) / 2, torch.cuda.mem_get_info(device)[0]
    else:
        W, T = mc.visual_dim + mc.cond_dim + mc.proprio_dim * mc.proprio, mc.num_hist * mc.num_patches
        per_episode, free = N * 4 * (16 * T * max(W, mc.mlp_dim) + 2 * mc.heads * T * T), dino.available_ram()
    require(per_episode < 0.5 * free, f"one episode's {N} samples need {per_episode / 1e9:.1f} GB, more than half of "
                                      f"the {free / 1e9:.1f} GB free on {device}: lower --num-samples")
    E = max(1, min(n, int(0.5 * free / max(per_episode, 1))))
    print(f"batch episodes: {E} (one episode's rollout peaks at {per_episode / 1e9:.2f} GB; {free / 1e9:.0f} GB free)")
    return E


def write_results(cfg, tasks, res, planner, variant, tokens, ref, via, labels, extra):
    """RESULTS.json of plan.py and policy.py (contract fields first, then the details) -> cfg.out, plus the one-line
    verdict, printed. via: how plans become actions; labels: the labelled transitions behind every model in this row."""
    n, k = len(res["successes"]), sum(res["successes"])
    dist = np.array([distances(g, s) for g, s in zip(tasks["goal_state"], res["final"])])  # (n, 2)
    results = dict(success_rate=k / n, successes=res["successes"], episodes=n, protocol=cfg.protocol, planner=planner,
                   seconds_per_solve=res["seconds"] / max(res["solves"], 1), variant=variant, run=str(cfg.run),
                   tokens=tokens, via=via, labels=labels, reference=ref, ci95=list(wilson(k, n)), split=cfg.split,
                   mean_final_pos_dist=float(dist[:, 0].mean()), mean_final_angle_dist=float(dist[:, 1].mean()),
                   mean_best_pos_dist=float(np.mean(res["best"])), config=asdict(cfg), **extra,
                   tasks={key: tasks[key].tolist() for key in ("episode", "step", "start_state", "goal_state")})
    data.atomic_write(cfg.out, results)
    ceil = "n/a" if ref["ceiling"] is None else f"{ref['ceiling']:.2f} (n={ref['ceiling_episodes']})"
    print(f"{variant} {cfg.protocol} {planner} [{tokens}]: success {k}/{n} = {results['success_rate']:.2f} (95% CI "
          f"{results['ci95'][0]:.2f}-{results['ci95'][1]:.2f}) | random {ref['random']:.2f} | replay "
          f"{ref['replay']:.2f} | ceiling {ceil} | {results['seconds_per_solve']:.3f} s/solve -> {cfg.out}")
    return results


def decode_plan(model, decoder, z0, plan, p0=None):
    """la/vq plans -> (E, H, A) normalised macro actions: step h is decoded from the tokens of frame h (the real
    start frame for h = 0, then the imagined ones) and the planned latent of step h (the seed's evaluator)."""
    cond = model.plan_to_cond(plan)  # (E, H, C)
    zs, _ = model.rollout(z0, cond, p0)  # (E, H, P, D) imagined frames 1..H
    frames = torch.cat([z0[:, None], zs[:, :-1]], 1)  # (E, H, P, D) frames 0..H-1: where each step starts
    return decoder(frames.flatten(0, 1), cond.flatten(0, 1)).view(*plan.shape[:2], -1)  # (E, H, A)


def write_video(path, frames, hits, goal, side=256):
    """mp4 of one episode: simulator frame | goal frame, upscaled to `side` px, step counter and success mark."""
    big = lambda f: cv2.resize(f, (side, side), interpolation=cv2.INTER_NEAREST)  # noqa: E731

    def write(tmp):
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), 10, (2 * side, side))  # 10 Hz = env rate
        for t, (frame, hit) in enumerate(zip(frames, hits)):
            img = cv2.cvtColor(np.concatenate([big(frame), big(goal)], 1), cv2.COLOR_RGB2BGR)  # (side, 2*side, 3)
            cv2.putText(img, f"step {t}/{len(frames) - 1}", (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2)
            cv2.putText(img, "goal", (side + 6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2)
            if hit:
                cv2.putText(img, "success", (6, side - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 160, 0), 2)
            writer.write(img)
        writer.release()
    data.atomic_write(path, write)


def main(cfg: PlanConfig):
    # --- setup: the run (world model; la/vq: its decoder or adapter), device and precision
    t_start = time.perf_counter()
    device, ctx = data.setup(cfg.device, cfg.seed, cfg.dtype)
    data.writable(cfg.out, "--out", RESULT_KEYS)  # a .json, never a checkpoint or another file of the user's
    data.need_disk(Path(cfg.out).parent, 10 ** 6 * (1 + 2 * cfg.videos), f"--out {cfg.out} and its videos")
    model, ckpt, root = wm.load_run(cfg.run, device, cfg.data, cfg.dino_weights)
    mc, stats, H = model.cfg, ckpt["stats"], cfg.horizon
    img = mc.img_size or 224  # goal frames and videos (a state run has no image size of its own)
    # How a plan becomes simulator actions: the baseline plans them; la/vq plan latents (decoder) or actions (adapter).
    via = cfg.via if cfg.via != "auto" else "actions" if mc.variant == "baseline" else "decoder"
    require((via == "actions") == (mc.variant == "baseline"), f"--via {via}: {cfg.run} is a {mc.variant} run; "
            + ("it plans real actions (--via auto)" if mc.variant == "baseline" else "choose decoder or adapter"))
    planner = "cem_categorical" if (mc.variant, via) == ("vq", "decoder") else "cem_gaussian"  # codes or vectors
    data.unused(cfg, ("la_prior",) if (mc.variant, via) != ("la", "decoder") else (), "la latents only")
    data.unused(cfg, ("var_scale",) if planner == "cem_categorical" else ("pseudocount",), f"the planner is {planner}")
    data.unused(cfg, ("alpha",) if not mc.proprio else (), f"{cfg.run} has no proprio")
    head, report = load_head(cfg.run, ckpt, device, via) if via != "actions" else (None, {"labels": 0})
    decoder, adapter = (head, None) if via == "decoder" else (None, head)
    labels = stats["labels"] + report["labels"]  # the world model's (baseline) + its decoder's or adapter's
    input_of = dino.make_input(mc, device, wm.run_dino_weights(ckpt, cfg.dino_weights))
    encode = lambda states: model.encode(input_of(dino.batch_of_states(states, mc)))[:, 0]  # noqa: E731 (E, P, D)
    n, every_step = cfg.episodes or PROTOCOL_EPISODES[cfg.protocol], cfg.protocol == "mpc"
    budget = MPC_BUDGET if every_step else H * mc.frameskip  # open loop: one plan, executed whole
    width = None if planner == "cem_categorical" else mc.cond_dim if via == "decoder" else mc.action_dim
    E = auto_batch(cfg, model, n, device, width, adapter)
    print(f"{mc.variant} ({mc.tokens} tokens) | via {via}, {labels} labels | planner {planner} | {n} episodes, {E} at "
          f"once | budget {budget} env steps | split {cfg.split} of {root}")

    # --- the tasks, and the reference rows on the same tasks
    tasks = make_tasks(root, cfg.split, cfg.protocol, n, cfg.seed, img)
    collapse = None  # a jepa encoder that maps every frame to nearly one point makes the planner chase noise
    if model.encoder is not None:
        with torch.inference_mode():  # the tokens of the 2n start and goal frames
            collapse = train.token_stats(encode(np.r_[tasks["start_state"], tasks["goal_state"]]).float().cpu())
        std = f"median per-dimension token std {collapse['token_std_median']:.2e} < {train.COLLAPSE_STD}"
        require(cfg.allow_collapsed or not collapse["collapsed"], f"{cfg.run}: its jepa encoder has collapsed ({std} "
                f"over the {2 * n} start and goal frames); retrain it, or pass --allow-collapsed to plan anyway")
        if collapse["collapsed"]:
            print(f"WARNING: planning with a collapsed jepa encoder ({std})")
    ref = references(tasks, cfg, stats, budget, every_step, img, Path(cfg.out).parent / "ceiling")

    # --- solve: encode the current frames once, plan (E*N rollouts per iteration), decode to px actions
    # The Gaussian planners' start (H, A|L): normalised macro actions at 0 (the dataset-mean action); la latents at
    # the IDM's own latent statistics stored by train.py (the seed sampled N(0, 1): --la-prior standard)
    mu0, sigma0 = torch.zeros(width or 1), torch.ones(width or 1)  # (A|L,)
    if (mc.variant, via, cfg.la_prior) == ("la", "decoder", "data"):
        mu0, sigma0 = torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"])  # (L,)
    mu0, sigma0 = mu0.float().to(device).expand(H, -1), cfg.var_scale * sigma0.float().to(device).expand(H, -1)
    kw = dict(num_samples=cfg.num_samples, topk=cfg.topk, opt_steps=cfg.opt_steps)
    compiled = cfg.compile and device.type == "cuda"
    cost = torch.compile(rollout_cost, dynamic=False) if compiled else rollout_cost  # fixed (E, N, H) shapes

    def policy_for(idx):
        with torch.inference_mode(), ctx:  # the goals are encoded once per batch
            zg = encode(tasks["goal_state"][idx])  # (E, P, D)
            pg = model.embed_proprio(proprio_of(tasks["goal_state"][idx], stats, device)) if mc.proprio else None
        gens = [torch.Generator(device).manual_seed(int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0]))
                for i in idx.tolist()]  # noise per episode, seeded by (seed, episode index): plans do not depend on E

        def policy(state):
            with torch.inference_mode(), ctx:
                z0 = encode(state)  # (E, P, D)
                p0 = proprio_of(state, stats, device) if mc.proprio else None  # (E, 4)
                cost_fn = lambda s: cost(model, z0, zg, s, p0, pg, cfg.alpha, adapter)  # noqa: E731
                if planner == "cem_categorical":  # (E, H) code indices
                    plan = cem_categorical(cost_fn, len(state), H, mc.num_codes, pseudocount=cfg.pseudocount,
                                           device=device, generator=gens, **kw)
                else:  # (E, H, A|L)
                    plan = cem_gaussian(cost_fn, mu0.expand(len(state), -1, -1), sigma0.expand(len(state), -1, -1),
                                        generator=gens, **kw)
                a = plan if decoder is None else decode_plan(model, decoder, z0, plan, p0)  # (E, H, A)
                return macro_to_env(a.float().cpu().numpy(), stats["action_mean"], stats["action_std"])  # (E, H*F, 2)
        return policy

    if compiled:  # compile outside the timed solves (skip the warm-up)
        t0 = time.perf_counter()
        policy_for(np.arange(min(E, n)))(tasks["start_state"][:min(E, n)])
        print(f"compiled rollout_cost in {time.perf_counter() - t0:.1f} s")
    res = evaluate(tasks, policy_for, E, budget, every_step, img, cfg.out, cfg.videos)

    # --- write RESULTS.json and the one-line summary
    return write_results(cfg, tasks, res, planner, mc.variant, mc.tokens, ref, via, labels, dict(
        batch_episodes=E, budget=budget, device=str(device), data=str(root), token_stats=collapse,
        peak_gpu_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        total_seconds=time.perf_counter() - t_start))


if __name__ == "__main__":
    data.cli(main, PlanConfig, doc=__doc__)
