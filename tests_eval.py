"""Tests for eval.py: each metric on synthetic cases with known answers, rollout/one-step consistency on tiny
world models, and the side-by-side table, METRICS.json and plot for two tiny trained runs (CPU, seconds)."""
import json
import shutil
from types import SimpleNamespace

import cv2
import pytest
import torch

import data
import dino
import train
import wm
from eval import EvalConfig, linear_probe, main, one_step_mse, parse_config, rollout_mse, summarize


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids OpenMP spin-waits when the 2 cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StandIn(torch.nn.Module):
    """wm.WorldModel's diagnostic interface (cfg, conditioning, observe, predict) with a chosen behaviour.

    "copy": the IDM leaks the next frame into the latent and the predictor copies it (pure shortcut);
    "ignore": the predictor ignores the conditioning and predicts "no change"."""

    def __init__(self, mode, D):
        super().__init__()
        self.mode, self.cfg = mode, SimpleNamespace(num_hist=1, visual_dim=D, variant="la")

    def conditioning(self, z, action=None):
        nxt = z[:, 1:].flatten(2)  # (B, T-1, P*D): the next frame itself
        return {"cond": torch.cat([nxt, nxt[:, -1:]], 1)}  # (B, T, C)

    def observe(self, z, proprio=None):
        return z

    def predict(self, obs, cond):
        return obs if self.mode == "ignore" else cond.view(obs.shape)  # (B, T, P, D)


def test_swap_and_shuffle_known_answers():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 1, 4, 8, generator=g)  # (B, 1, P, D) context frames
    z = torch.cat([z, z + 0.1 * torch.randn(z.shape, generator=g)], 1)  # (B, 2, P, D): targets near their context
    copy, ignore = StandIn("copy", 8), StandIn("ignore", 8)
    assert wm.swap_score(copy, z, generator=g) > 0.95  # only fixed points of the permutation fail to win
    assert wm.swap_score(ignore, z, generator=g) < 0.05
    assert wm.shuffle_delta(ignore, z, generator=g) == pytest.approx(0.0, abs=1e-6)
    assert wm.shuffle_delta(copy, z, generator=g) > 1.0  # from 0 error to the error of a random other frame


def test_perplexity_dead_codes_and_summaries():
    assert wm.perplexity(torch.arange(8).repeat(5), 8) == (pytest.approx(8.0), 0)  # uniform usage: PPL = K
    assert wm.perplexity(torch.full((40,), 3), 8) == (pytest.approx(1.0), 7)
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4 and s["std"] == pytest.approx(1.2910, abs=1e-4)
    assert s["ci95"] == pytest.approx([2.5 - 1.96 * 1.2910 / 2, 2.5 + 1.96 * 1.2910 / 2], abs=1e-4)


def test_linear_probe_known_answers():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 10, generator=g), torch.randn(10, generator=g)  # (C, A), (A,)
    x_fit, x = torch.randn(400, 6, generator=g), torch.randn(200, 6, generator=g)  # (N, C)
    exact = linear_probe(x_fit, x_fit @ W + b, x, x @ W + b, g)
    assert exact["mean"] > 0.999 and exact["n"] == 200 and exact["n_fit"] == 400 and len(exact["per_dim"]) == 10
    noise = linear_probe(x_fit, torch.randn(400, 10, generator=g), x, torch.randn(200, 10, generator=g), g)
    assert noise["mean"] < 0.05 and noise["ci95"][0] < noise["mean"] < noise["ci95"][1]


@pytest.mark.parametrize("variant", ["baseline", "la", "vq"])
def test_rollout_step_one_equals_one_step(variant):
    """Horizon 1 of the open-loop rollout is the teacher-forced one-step prediction (same frame, same condition)."""
    torch.manual_seed(0)
    model = wm.WorldModel(wm.WMConfig(variant=variant, visual_dim=16, num_patches=4, depth=1, heads=2, dim_head=8,
                                      mlp_dim=32, idm_depth=1, idm_heads=2, idm_dim=16, idm_mlp_dim=32, cond_dim=8,
                                      latent_dim=8, num_codes=4)).eval()
    z, a = torch.randn(5, 4, 4, 16), torch.randn(5, 4, 10)  # (B, H+1, P, D), (B, H+1, A)
    err = rollout_mse(model, z, a)  # (B, H)
    assert err.shape == (5, 3)
    assert torch.allclose(err[:, 0], one_step_mse(model, z[:, :2], a[:, :2])[0], atol=1e-5)
    # The error at h depends on the conditioning of steps < h only: changing the last action leaves h=1,2 alone.
    a2, z2 = a.clone(), z.clone()
    a2[:, 2], z2[:, 3] = 5.0, z2[:, 3] + 1.0  # baseline reads actions, la/vq read frames
    assert torch.allclose(rollout_mse(model, z2, a2)[:, :2], err[:, :2], atol=1e-5)


def test_parse_config_repeated_runs():
    cfg = parse_config(EvalConfig, ["--run", "a", "--run", "b", "c", "--results", "r.json", "--windows", "8"])
    assert cfg.run == ["a", "b", "c"] and cfg.results == ["r.json"] and cfg.windows == 8
    assert parse_config(EvalConfig, []).run == []  # the default list is not shared or mutated


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny dataset with cached random-DINO features, and a baseline and a vq run trained 2 steps on it."""
    root = tmp_path_factory.mktemp("eval")
    data.collect(root / "data", episodes=6, steps=40, img_size=28)
    dino.main(dino.Config(data=str(root / "data"), dino_weights="random", size=28, device="cpu"))
    for variant in ("baseline", "vq"):
        train.main(train.TrainConfig(data=str(root / "data"), out=str(root / variant), steps=2, batch_size=4,
                                     eval_every=2, val_batches=1, stats_batches=1, log_every=1, num_workers=0,
                                     device="cpu", dino_weights="random", dino_size=28),
                   wm.WMConfig(variant=variant, depth=1, heads=2, dim_head=8, mlp_dim=32, idm_depth=1, idm_heads=2,
                               idm_dim=16, idm_mlp_dim=32, cond_dim=8, latent_dim=8, num_codes=4))
    return root


def tiny_eval(root, runs, **kw):
    return EvalConfig(run=[str(root / r) for r in runs], out=str(root / "metrics.json"), windows=12, horizon=2,
                      probe_windows=16, batch_size=8, workers=0, device="cpu", **kw)


def test_table_metrics_and_plot_for_two_runs(tiny_runs, capsys):
    result = {"variant": "vq", "protocol": "open-loop", "success_rate": 0.25, "episodes": 4, "successes": [0, 1, 0, 0],
              "reference": {"random": 0.0, "replay": 1.0}, "seconds_per_solve": 0.5, "run": str(tiny_runs / "vq")}
    (tiny_runs / "r.json").write_text(json.dumps(result))
    metrics = main(tiny_eval(tiny_runs, ["baseline", "vq"], results=[str(tiny_runs / "r.json")]))
    saved = json.loads((tiny_runs / "metrics.json").read_text())
    assert list(saved) == ["baseline", "vq"] and saved["vq"]["perplexity"] == pytest.approx(metrics["vq"]["perplexity"])
    for name in saved:
        assert {"latent_mse", "rollout_mse", "rollout_curve"} <= set(saved[name])
        assert saved[name]["rollout_mse"] == saved[name]["rollout_curve"][-1]["mean"]
        assert saved[name]["latent_mse_stats"]["n"] == 12
    assert {"swap_score", "shuffle_delta", "perplexity", "dead_codes", "probe_r2"} <= set(saved["vq"])
    assert "swap_score" not in saved["baseline"] and 0 <= saved["vq"]["dead_codes"] <= 4
    out = capsys.readouterr().out
    assert "| metric | baseline | vq |" in out and "success rate (open-loop)" in out and "0.25 (n=4" in out
    assert "missing: run decode.py" in out  # vq has no decoder yet: said, not crashed
    img = cv2.imread(str(tiny_runs / "metrics_rollout.png"))
    assert img is not None and img.shape == (480, 720, 3)


def test_different_datasets_warned_and_bad_runs(tiny_runs, tmp_path, capsys):
    # A copy of the dataset with another fingerprint, and a copy of the vq run pointing at it.
    shutil.copytree(tiny_runs / "data", tmp_path / "data2")
    meta = json.loads((tmp_path / "data2" / "meta.json").read_text())
    (tmp_path / "data2" / "meta.json").write_text(json.dumps({**meta, "fingerprint": "f" * 16}))
    ckpt = torch.load(tiny_runs / "vq" / "ckpt.pt", weights_only=True)
    (tmp_path / "vq2").mkdir()
    torch.save({**ckpt, "data": {"root": str(tmp_path / "data2"), "fingerprint": "f" * 16}}, tmp_path / "vq2" / "ckpt.pt")
    cfg = tiny_eval(tiny_runs, ["baseline"])
    cfg.run.append(str(tmp_path / "vq2"))
    cfg.out = str(tmp_path / "m.json")
    main(cfg)
    assert "trained on different datasets" in capsys.readouterr().out
    torch.save({**ckpt, "format": "old"}, tmp_path / "vq2" / "ckpt.pt")  # an older checkpoint layout
    with pytest.raises(ValueError, match="format"):
        main(cfg)
