"""Tests for plan.py: the three planners on known costs, batching invariance, task construction and a tiny
end-to-end evaluation of every variant (CPU, seconds)."""
import functools
import json

import cv2
import numpy as np
import pytest
import torch

import data
import decode
import dino
import plan
import train
from plan import (Config, cem_categorical, cem_gaussian, main, make_tasks, mppi, rollout_cost, run_policy, wilson,
                  write_video)
from wm import WMConfig, WorldModel


def quadratic(target):
    """cost_fn for a quadratic bowl centred on target (E, H, A): samples (E, N, H, A) -> (E, N)."""
    return lambda x: (x - target[:, None]).square().sum((-1, -2))


def table_cost(table):
    """cost_fn for a separable lookup table (E, H, K): samples (E, N, H) -> (E, N) = sum_h table[e, h, idx_h]."""
    return lambda idx: torch.gather(table[:, None].expand(-1, idx.shape[1], -1, -1), 3, idx[..., None])[..., 0].sum(-1)


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_cem_gaussian_finds_quadratic_minimum():
    target = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(0)) * 2  # (E, H, A)
    mu = cem_gaussian(quadratic(target), torch.zeros(3, 3, 2), torch.full((3, 3, 2), 3.0), num_samples=100,
                      topk=10, opt_steps=15, generator=torch.Generator().manual_seed(1))
    assert (mu - target).abs().max() < 0.01


def test_mppi_finds_quadratic_minimum():
    target = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(0)) * 2  # (E, H, A)
    mu = mppi(quadratic(target), torch.zeros(3, 3, 2), torch.full((3, 3, 2), 0.1), num_samples=100, topk=10,
              opt_steps=30, temperature=0.01, generator=torch.Generator().manual_seed(1))
    assert (mu - target).abs().max() < 0.05


def test_cem_categorical_finds_table_argmin():
    E, H, K = 3, 4, 16  # K^H = 65536 sequences, 10 x 300 samples per episode
    table = torch.rand(E, H, K, generator=torch.Generator().manual_seed(0))  # (E, H, K)
    idx = cem_categorical(table_cost(table), E, H, K, num_samples=300, topk=30, opt_steps=10,
                          generator=torch.Generator().manual_seed(1))
    assert idx.dtype == torch.long and idx.shape == (E, H)
    assert torch.equal(idx, table.argmin(-1))


def test_cem_categorical_update_rule():
    """Pins method.md s9.3: after one iteration whose 30 elites are all code 0 (K = 4), pseudocount 1 gives
    pi_MLE = (31, 1, 1, 1) / 34, momentum 0.7 on the OLD pi gives pi = 0.7/4 + 0.3 pi_MLE, and temperature 1.5
    samples code 0 with probability pi_0^(2/3) / sum pi^(2/3) = 0.3767; the last 10 % of samples stay uniform."""
    seen = []

    def cost(idx):  # (1, N, 1) -> (1, N): code 0 is cheapest; remember the samples
        seen.append(idx[0, :, 0])
        return (idx[..., 0] != 0).float()
    N = 50_000
    cem_categorical(cost, 1, 1, 4, num_samples=N, topk=30, opt_steps=2, generator=torch.Generator().manual_seed(0))
    pi = 0.7 / 4 + 0.3 * torch.tensor([31.0, 1, 1, 1]) / 34
    q0 = (pi[0] ** (1 / 1.5) / (pi ** (1 / 1.5)).sum()).item()
    model_part, uniform_part = seen[1][: N - N // 10], seen[1][N - N // 10:]
    assert abs((model_part == 0).float().mean().item() - q0) < 0.01
    assert abs((uniform_part == 0).float().mean().item() - 0.25) < 0.02


def test_cem_categorical_returns_best_ever():
    """The best sample of iteration 1 wins when every later sample costs more (best-ever tracker)."""
    calls = []

    def cost(idx):  # (E, N, H) -> (E, N): random costs in [0, 1) on the first call, [10, 11) afterwards
        c = torch.rand(idx.shape[:2], generator=torch.Generator().manual_seed(len(calls))) + 10 * bool(calls)
        calls.append((idx, c))
        return c
    best = cem_categorical(cost, 2, 3, 8, num_samples=50, topk=5, opt_steps=4,
                           generator=torch.Generator().manual_seed(0))
    idx, c = calls[0]
    assert torch.equal(best, idx[torch.arange(2), c.argmin(1)])


def test_cem_gaussian_keeps_mean_as_sample_zero():
    seen = []
    mu0 = torch.randn(2, 3, 2)  # (E, H, A)

    def cost(x):  # (E, N, H, A) -> (E, N)
        seen.append(x.clone())
        return x.square().sum((-1, -2))
    cem_gaussian(cost, mu0, torch.ones(2, 3, 2), num_samples=20, topk=5, opt_steps=2)
    assert torch.equal(seen[0][:, 0], mu0) and not torch.equal(seen[0][:, 1], mu0)


@pytest.mark.parametrize("name", ["cem_gaussian", "mppi", "cem_categorical"])
def test_batched_equals_separate_calls(name):
    """Per-episode generators: planning E episodes in one call equals E calls of one episode each."""
    E, H, A, K = 3, 4, 2, 8
    target = torch.randn(E, H, A, generator=torch.Generator().manual_seed(0))  # (E, H, A)
    table = torch.rand(E, H, K, generator=torch.Generator().manual_seed(0))  # (E, H, K)

    def solve(sl, g):
        kw = dict(num_samples=32, topk=4, opt_steps=3, generator=g)
        if name == "cem_categorical":
            return cem_categorical(table_cost(table[sl]), len(g), H, K, **kw)
        fn = cem_gaussian if name == "cem_gaussian" else mppi
        return fn(quadratic(target[sl]), torch.zeros(len(g), H, A), torch.ones(len(g), H, A), **kw)
    batched = solve(slice(0, E), gens([10, 11, 12]))
    separate = torch.cat([solve(slice(e, e + 1), gens([10 + e])) for e in range(E)])
    assert torch.equal(batched, separate)
    assert not torch.equal(batched, solve(slice(0, E), gens([20, 21, 22])))  # the noise matters


@pytest.mark.parametrize("objective", ["last", "all"])
def test_rollout_cost_matches_per_sample_rollouts(objective):
    """One batched call over E*N plans equals rolling each plan out alone (ordering of the flattening), proprio on."""
    torch.manual_seed(0)
    model = WorldModel(WMConfig(visual_dim=8, num_patches=4, cond_dim=4, proprio=True, proprio_dim=3, depth=1,
                                heads=2, dim_head=4, mlp_dim=8)).eval()
    E, N, H = 2, 3, 4
    z0, zg, p0 = torch.randn(E, 4, 8), torch.randn(E, 4, 8), torch.randn(E, 4)  # (E, P, D), (E, P, D), (E, 4)
    pg, plan = torch.randn(E, 3), torch.randn(E, N, H, 10)  # (E, proprio_dim), (E, N, H, A)
    with torch.no_grad():
        cost = rollout_cost(model, z0, zg, plan, p0, pg, alpha=0.5, objective=objective)  # (E, N)
        w = 2.0 ** torch.arange(H) / (2.0 ** torch.arange(H)).sum() / H if objective == "all" else None
        for e in range(E):
            for n in range(N):
                zs, ps = model.rollout(z0[e:e + 1], model.plan_to_cond(plan[e, n:n + 1]), p0[e:e + 1])
                err = (zs[0] - zg[e]).square().mean((-1, -2)) + 0.5 * (ps[0] - pg[e]).square().mean(-1)  # (H,)
                want = err[-1] if w is None else (err * w).sum()
                assert torch.allclose(cost[e, n], want, atol=1e-5), (e, n)


def test_wilson():
    lo, hi = wilson(0, 10)
    assert lo == 0 and 0.2 < hi < 0.35
    lo, hi = wilson(50, 100)
    assert 0.39 < lo < 0.41 and 0.59 < hi < 0.61


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """A 6 x 60-step dataset at 28 px and one tiny run per variant (2 training steps; decoder for la/vq)."""
    root = tmp_path_factory.mktemp("plan")
    # One shared random encoder (its init is deterministic, seeded 0): building ViT-S takes seconds on 2 cores.
    mp = pytest.MonkeyPatch()
    cached = functools.lru_cache(dino.load_dinov2)
    for module in (dino, plan):
        mp.setattr(module, "load_dinov2", cached)
    request.addfinalizer(mp.undo)
    # Tiny models are latency-bound: one thread avoids oversubscribing a shared 2-core machine (5x faster here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    data.collect(root / "data", episodes=6, steps=60, img_size=28, seed=0)
    for v in ("baseline", "la", "vq"):
        train.main(train.TrainConfig(data=str(root / "data"), out=str(root / v), steps=2, batch_size=4, eval_every=2,
                                     val_batches=1, stats_batches=1, log_every=1, num_workers=0, device="cpu",
                                     dino_weights="random", dino_size=28, compile=False),
                   WMConfig(variant=v, depth=1, heads=2, dim_head=8, mlp_dim=16, idm_depth=1, idm_heads=2, idm_dim=16,
                            idm_mlp_dim=16, cond_dim=8, latent_dim=8, num_codes=8))
        if v != "baseline":
            decode.main(decode.DecodeConfig(run=str(root / v), pairs=32, val_pairs=8, max_epochs=1, batch_size=16,
                                            code_states=8, workers=0, device="cpu"))
    return root


@pytest.mark.parametrize("protocol", ["open-loop", "mpc"])
def test_tasks_reproducible_and_replay_reaches_goal(tiny, tmp_path, protocol):
    a = make_tasks(tiny / "data", "val", protocol, 6, 0, 28)
    b = make_tasks(tiny / "data", "val", protocol, 6, 0, 28)
    for key in ("episode", "step", "start_state", "goal_state", "goal_frame"):
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["step"], make_tasks(tiny / "data", "val", protocol, 6, 1, 28)["step"])
    d = data.load_split(tiny / "data", "val")
    g = d["starts"][a["episode"]] + a["step"]  # (n,) global start frames
    assert (a["step"] <= d["lengths"][a["episode"]] - 26).all() and np.array_equal(a["start_state"], d["states"][g])
    if protocol == "mpc":  # rows without replacement, goal = the recorded state 25 steps later
        assert len(set(zip(a["episode"], a["step"]))) == 6 and np.array_equal(a["goal_state"], d["states"][g + 25])
    replay = lambda s: a["actions"]  # noqa: E731  (the recorded 25 px actions)
    ok, final, best, clips = run_policy(a, np.arange(6), replay, 25, protocol == "mpc", 28, record=[0])
    assert ok.all() and (best < 20).all()
    frames, hits = clips[0]
    assert len(frames) == len(hits) == 26 and hits[-1] and not hits[0]
    write_video(tmp_path / "ep.mp4", frames, hits, a["goal_frame"][0])
    video = cv2.VideoCapture(str(tmp_path / "ep.mp4"))
    assert video.read()[1].shape == (256, 512, 3) and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 26
    assert not run_policy(a, np.arange(6), lambda s: np.zeros((6, 25, 2)), 25, False, 28)[0].all()


@pytest.mark.parametrize("variant,protocol,extra", [
    ("baseline", "open-loop", {}),
    ("la", "mpc", dict(planner="mppi", la_prior="standard", batch_episodes=2)),
    ("vq", "open-loop", dict(objective="all")),
])
def test_end_to_end_results_json(tiny, tmp_path, variant, protocol, extra):
    out = tmp_path / "results" / f"{variant}.json"
    res = main(Config(run=str(tiny / variant), out=str(out), episodes=3, protocol=protocol, num_samples=8, topk=2,
                      opt_steps=2, device="cpu", videos=1, **extra))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("success_rate", "successes", "episodes", "protocol", "planner", "seconds_per_solve", "variant",
                "reference", "ci95", "tasks", "config", "mean_final_pos_dist"):
        assert key in saved, key
    assert saved["variant"] == variant and saved["episodes"] == 3 and len(saved["successes"]) == 3
    assert set(saved["successes"]) <= {0, 1} and saved["success_rate"] == sum(saved["successes"]) / 3
    assert saved["planner"] == {"baseline": "cem_gaussian", "la": "mppi", "vq": "cem_categorical"}[variant]
    assert saved["reference"]["replay"] == 1.0 and 0 <= saved["reference"]["random"] <= 1
    assert saved["ci95"][0] <= saved["success_rate"] <= saved["ci95"][1]
    assert saved["seconds_per_solve"] > 0 and len(saved["tasks"]["start_state"]) == 3
    assert (out.parent / f"{variant}_ep000.mp4").stat().st_size > 0
    assert not (out.parent / f"{variant}_ep001.mp4").exists()  # --videos 1
