"""Tests of policy.py (GCBC and GC-IQL baselines): goal sampling, the success test as IQL's reward, IQL's targets,
train -> eval end to end on state tokens and on a (fake) DINOv2 feature cache, and the refusals of a policy used with
the wrong token source or dataset. CPU, one torch thread, tiny data in temp dirs: a few seconds.
    python -m pytest -q tests_policy.py
"""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import data
import dino
import policy
import wm
from data import CollectConfig, UserError
from policy import EvalConfig, TrainConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """6 episodes x 41 frames at 28 px (4 train, 2 val), with a random 4 x 384 'DINOv2' cache in dino.py's format."""
    root, rng = tmp_path_factory.mktemp("policy") / "data", np.random.default_rng(0)
    data.collect(CollectConfig(out=str(root), episodes=6, steps=40, img_size=28, workers=1, val_fraction=1 / 3))
    for split in ("train", "val"):
        n = data.load_meta(root)["splits"][split]["frames"]
        np.save(root / split / "features.npy", rng.normal(0, 1, (n, 4, 384)).astype(np.float16))  # (F, P, D)
        head = dino.cache_header(root, "dinov2_vits14", 28, "random")
        (root / split / "features.json").write_text(json.dumps({**head, "frames": n, "done": n}))
    return root


def tiny(root, out, **kw):
    return TrainConfig(data=str(root), out=str(out), steps=6, batch_size=8, hidden=16, layers=1, log_every=3,
                       device="cpu", **kw)


def test_goal_sampling_stays_in_the_episode(root):
    end = policy.episode_ends(root, "train")  # (F,)
    rng, t = np.random.default_rng(0), np.arange(0, len(end) - 30, 3)
    t = t[t + 29 <= end[t]]  # window starts: a chunk fits
    assert (policy.actor_goals(rng, t, end, 25) == t + 25).all()
    g = policy.actor_goals(rng, t, end, 0)  # uniform future (swm)
    assert ((g > t) & (g <= end[t])).all()
    cfg = tiny(root, "unused")
    tt = np.repeat(t, 200)
    g = policy.value_goals(rng, tt, end, cfg)
    assert np.mean(g == tt) == pytest.approx(cfg.p_current, abs=0.03)
    assert 0 < np.mean(end[g] != end[tt]) <= cfg.p_random  # only random goals leave the episode
    g = policy.value_goals(rng, tt, end, replace(cfg, p_random=0.0, p_future=0.8))
    assert ((g >= tt) & (g <= end[tt]) & (((g - tt) % 5 == 0) | (g == end[tt]))).all()  # whole macro steps ahead


def test_reached_is_the_success_test():
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 512, (400, 7))
    g = s + rng.normal(0, 12, (400, 7)) * [1, 1, 1, 1, 0.02, 1, 1]  # near pairs: both verdicts occur
    g[:, 4] += 2 * np.pi * rng.integers(-1, 2, 400)  # angles that differ by whole turns
    want = np.array([data.is_success(a, b) for a, b in zip(g, s)])
    got = policy.reached(torch.tensor(s), torch.tensor(g)).numpy()
    assert 0 < want.mean() < 1 and (got == want).all()


def test_iql_targets_and_expectile(root):
    """At the goal the Bellman target is 0 (reward 0, episode over); the value loss is the tau-expectile loss."""
    cfg = tiny(root, "unused", algo="iql")
    mc = wm.derive(wm.WMConfig(tokens="state"), data.load_meta(root))
    torch.manual_seed(0)
    nets = policy.build(cfg, mc)
    s = torch.tensor(data.load_split(root, "train")["states"][:8], dtype=torch.float32)  # (B, 7)
    z = wm.state_tokens(torch.stack([s, s], 1))  # (B, 2, 1, 12)
    a0 = torch.randn(8, mc.action_dim)
    with torch.no_grad():
        nets["critic"].mlp[-1].weight.zero_(), nets["critic"].mlp[-1].bias.fill_(-3.0)  # Q = -3 everywhere
    _, critic_loss, w, _ = policy.iql_losses(nets, z[:, 0], z[:, 1], a0, z[:, 0], s, s, z[:, 0], cfg)  # g = s
    assert critic_loss.item() == pytest.approx(9.0)  # (Q - 0)^2
    assert w.shape == (8,) and (w <= policy.AWR_CLIP).all()


def test_train_and_eval_state_tokens(root, tmp_path):
    for algo, goal_steps in (("gcbc", 25), ("iql", 25), ("gcbc", 0)):
        folder = tmp_path / f"{algo}{goal_steps}"
        assert policy.train(tiny(root, folder, algo=algo, goal_steps=goal_steps)) > 0
        assert policy.train(tiny(root, folder, algo=algo, goal_steps=goal_steps)) is None  # the same policy: a no-op
        ck = data.load_pt(folder / "policy.pt", "")  # plain tensors and strings (weights_only)
        assert ck["tokens"] == "state" and ("critic" in ck) == (algo == "iql")
        for protocol, n in (("open-loop", 3), ("mpc", 2)):
            out = tmp_path / "results" / f"{folder.name}-{protocol}.json"
            res = policy.evaluate_policy(EvalConfig(policy=str(folder), out=str(out), episodes=n, protocol=protocol,
                                                    ceiling_episodes=0, videos=0, device="cpu"))
            r = json.loads(out.read_text())
            assert r == json.loads(json.dumps(res)) and len(r["successes"]) == r["episodes"] == n
            assert (r["planner"], r["variant"], r["tokens"], r["run"]) == (algo, algo, "state", str(folder))
            assert r["protocol"] == protocol and 0 <= r["success_rate"] <= 1 and len(r["ci95"]) == 2
            assert set(r["reference"]) >= {"random", "replay", "ceiling", "ceiling_episodes"}
            assert r["budget"] == (50 if protocol == "mpc" else 25)
            # chunk-end goals run whole chunks; uniform-future goals re-query every macro step under mpc
            assert r["mpc_execute"] == (1 if protocol == "mpc" and goal_steps == 0 else 5)


def test_dinov2_feature_cache(root, tmp_path):
    """The dinov2 token source trains from the feature cache and evaluates with the (random) encoder on frames."""
    cfg = tiny(root, tmp_path / "p", tokens="dinov2", dino_size=28, dino_weights="random", patch_dim=2)
    policy.train(cfg)
    r = policy.evaluate_policy(EvalConfig(policy=str(tmp_path / "p"), out=str(tmp_path / "r.json"), episodes=2,
                                          ceiling_episodes=0, videos=0, device="cpu"))
    assert r["tokens"] == "dinov2" and r["episodes"] == 2


def test_wrong_token_source_or_dataset_is_refused(root, tmp_path):
    policy.train(tiny(root, tmp_path / "p"))
    def ev(**kw):
        return policy.evaluate_policy(EvalConfig(policy=str(tmp_path / "p"), out=str(tmp_path / "r.json"), episodes=2,
                                                 ceiling_episodes=0, videos=0, device="cpu", **kw))
    with pytest.raises(UserError, match=r"trained on state tokens, not dinov2"):
        ev(tokens="dinov2")
    other = tmp_path / "other"
    data.collect(CollectConfig(out=str(other), episodes=3, steps=30, img_size=28, workers=1, seed=5))
    fp, theirs = data.load_meta(other)["fingerprint"], data.load_meta(root)["fingerprint"]
    with pytest.raises(UserError) as err:  # names both datasets and the policy's token source
        ev(data=str(other))
    assert fp in str(err.value) and theirs in str(err.value) and "state tokens" in str(err.value)
    with pytest.raises(UserError) as err:
        policy.train(replace(tiny(root, tmp_path / "p"), tokens="dinov2"))
    assert "dinov2" in str(err.value) and "state" in str(err.value)
    with pytest.raises(UserError, match=rf"--data {other} \(fingerprint {fp}; .*fingerprint {theirs}\)"):
        policy.train(tiny(other, tmp_path / "p"))
    with pytest.raises(UserError, match="sum to 1"):
        tiny(root, tmp_path / "q", p_random=0.5)
