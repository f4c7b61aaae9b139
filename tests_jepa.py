"""The jepa token source: SIGReg and VCReg known answers, the encoder's shapes, a jepa run end to end (train, plan,
eval on a tiny dataset) and plan.py's refusal of a collapsed encoder. CPU, about 15 s: python -m pytest -q tests_jepa.py
"""
import json
import math

import pytest
import torch

import data
import decode
import eval as evaluate
import plan
import train
import wm


def sigreg_of_zero(B):
    """SIGReg of B identical rows at 0, from its definition: B * sum_k w_k phi_k (1 - phi_k)^2."""
    t = torch.linspace(0, 3, wm.SIGREG_KNOTS, dtype=torch.float64)
    w = torch.full_like(t, 6 / (wm.SIGREG_KNOTS - 1))
    w[[0, -1]] /= 2
    phi = torch.exp(-t ** 2 / 2)
    return B * (w * phi * (1 - phi) ** 2).sum().item()


def test_sigreg_known_answers():
    """A standard normal batch scores ~1.06 whatever B (the integral of phi (1 - phi^2) over [-3, 3], the statistic's
    expectation); B rows at one point score B * 0.41 (LeWM's Push-T batch 128: ~52); a shrunk batch lies between."""
    torch.manual_seed(0)
    gauss = wm.sigreg(torch.randn(2048, 2, 16)).item()
    expect = math.sqrt(2 * math.pi) * (math.erf(3 / math.sqrt(2)) - math.erf(3 * math.sqrt(1.5)) / math.sqrt(3))
    assert abs(gauss - expect) < 0.25, (gauss, expect)
    assert abs(wm.sigreg(torch.zeros(128, 2, 16)).item() - sigreg_of_zero(128)) < 1e-3
    assert 50 < sigreg_of_zero(128) < 53
    assert gauss < wm.sigreg(0.3 * torch.randn(2048, 2, 16)).item() < sigreg_of_zero(2048)
    # The gradient that rescues a shrunk batch, and the one that vanishes at a collapsed one (why the encoder ends in
    # a BatchNorm): d SIGReg / d scale is large at 0.3 and zero at 0.
    s = torch.tensor([0.3, 0.0], requires_grad=True)
    z = torch.randn(512, 1, 16)
    (wm.sigreg(s[0] * z) + wm.sigreg(s[1] * z)).backward()
    assert s.grad[0] < -10 and s.grad[1].abs() < 1e-6


def test_vcreg_known_answers():
    """PLDM's terms: ~0 on a standard normal batch; std hinge 1 - sqrt(1e-4) = 0.99 on a collapsed one; the covariance
    term is 1 when all dims are the same unit-variance variable (every off-diagonal entry 1)."""
    torch.manual_seed(0)
    std, cov = wm.var_cov(torch.randn(2, 4096, 8))
    assert std < 0.02 and cov < 0.01
    std, cov = wm.var_cov(torch.zeros(2, 64, 8))
    assert abs(std - 0.99) < 1e-6 and cov == 0
    std, cov = wm.var_cov(torch.randn(1, 4096, 1).expand(-1, -1, 8))
    assert std < 0.02 and abs(cov - 1) < 0.1
    mc = wm.WMConfig(tokens="jepa", jepa_reg="vcreg", jepa_temp_sim=0.0)
    assert abs(wm.vcreg(torch.zeros(64, 2, 8), mc).item() - 18 * 0.99) < 1e-4  # weighted: jepa_std * hinge


def test_encoder_shapes_and_gradient():
    """uint8 frames (B, T, S, S, 3) -> (B, T, 1, D); the final BatchNorm makes every dim's batch std 1 in training."""
    enc = wm.JEPAEncoder(img_size=32, dim=16, width=4)
    obs = torch.randint(0, 256, (6, 2, 32, 32, 3), dtype=torch.uint8)
    z = enc(obs)
    assert z.shape == (6, 2, 1, 16)
    assert torch.allclose(z.flatten(0, 2).std(0, unbiased=False), torch.ones(16), atol=1e-2)
    z.square().sum().backward()
    assert enc.convs[0].weight.grad.abs().sum() > 0


def test_token_stats_and_probe():
    """Isotropic tokens: effective rank ~D, not collapsed; constant tokens: collapsed, rank 1; a probe reads a linear
    code of the state exactly and a random code not at all."""
    torch.manual_seed(0)
    st = wm.token_stats(torch.randn(4000, 1, 8))
    assert not st["collapsed"] and st["effective_rank"] > 7.8
    st = wm.token_stats(torch.full((100, 1, 8), 3.0) + 1e-5 * torch.randn(100, 1, 8))
    assert st["collapsed"] and st["token_std_median"] < wm.COLLAPSE_STD
    y = wm.probe_targets(torch.rand(400, 7) * torch.tensor([512, 512, 512, 512, 6.28, 1, 1]))  # (400, 6)
    z = (y @ torch.randn(6, 10, dtype=torch.float64))[:, None]  # (400, 1, 10) a linear code
    r2 = wm.probe_r2(z[:200], y[:200], z[200:], y[200:])
    assert min(r2.values()) > 0.999
    r2 = wm.probe_r2(torch.randn(200, 1, 10), y[:200], torch.randn(200, 1, 10), y[200:])
    assert max(r2.values()) < 0.2


def test_training_log_flags_a_collapsed_encoder(capsys):
    """train.py's validation reports collapsed = True and warns when every frame has (nearly) the same token."""
    z, state = torch.full((64, 1, 8), 0.5) + 1e-6 * torch.randn(64, 1, 8), torch.rand(64, 7)
    assert train.jepa_metrics(z, state)["collapsed"]
    assert "collapsed" in capsys.readouterr().out
    assert not train.jepa_metrics(torch.randn(64, 1, 8), state)["collapsed"]


@pytest.fixture(scope="module")
def jepa_run(tmp_path_factory):
    """A tiny jepa baseline run on 32-px frames (a few seconds)."""
    tmp = tmp_path_factory.mktemp("jepa")
    torch.set_num_threads(1)
    data.collect(data.CollectConfig(out=str(tmp / "data"), episodes=12, steps=40, img_size=32, workers=1))
    raw = train.main(train.TrainConfig(data=str(tmp / "data"), out=str(tmp / "run"), steps=4, batch_size=16,
                                       eval_every=4, val_batches=2, log_every=2, num_workers=0),
                     wm.WMConfig(tokens="jepa", depth=1, heads=2, dim_head=8, mlp_dim=32, dropout=0.0, jepa_dim=16,
                                 jepa_width=4, jepa_idm=1.0))
    assert raw.encoder is not None
    return tmp


def test_jepa_run_trains_and_plans(jepa_run):
    """train.py logs the regulariser and the collapse statistics; plan.py writes tokens "jepa" and the statistics;
    eval.py reports the probes and the exploitation gap."""
    run = jepa_run / "run"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("reg_loss" in r and "idm_loss" in r for r in rows)
    assert any("token_std_median" in r and "probe_agent" in r for r in rows)
    res = plan.main(plan.PlanConfig(run=str(run), out=str(jepa_run / "res.json"), episodes=2, num_samples=8, topk=2,
                                    opt_steps=1, ceiling_episodes=0, videos=0, allow_collapsed=True))
    assert res["tokens"] == "jepa" and "token_std_median" in res["token_stats"]
    metrics, _ = evaluate.main(evaluate.EvalConfig(run=[str(run)], out=str(jepa_run / "m.json"), windows=16,
                                                   probe_windows=32, batch_size=16, gap_tasks=3, workers=0))
    m = next(iter(metrics.values()))
    assert {"probe_agent", "effective_rank", "collapsed", "gap_cost_plan", "gap_plan_cheaper"} <= set(m)


def test_plan_refuses_a_collapsed_encoder(jepa_run):
    """Zero the projector's last layer: every frame maps to one token, and plan.py names the run and the statistic."""
    run, ckpt_path = jepa_run / "run", jepa_run / "run" / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    for k in ("encoder.projector.4.weight", "encoder.projector.4.bias"):
        ckpt["model"][k].zero_()
    torch.save(ckpt, jepa_run / "ckpt_collapsed.pt")
    (jepa_run / "collapsed").mkdir()
    (jepa_run / "collapsed" / "ckpt.pt").write_bytes((jepa_run / "ckpt_collapsed.pt").read_bytes())
    cfg = dict(run=str(jepa_run / "collapsed"), out=str(jepa_run / "r.json"), data=str(jepa_run / "data"), episodes=2,
               num_samples=8, topk=2, opt_steps=1, ceiling_episodes=0, videos=0)
    with pytest.raises(data.UserError, match=r"collapsed.*token std"):
        plan.main(plan.PlanConfig(**cfg))
    assert plan.main(plan.PlanConfig(**cfg, allow_collapsed=True))["token_stats"]["collapsed"]


def test_vq_on_jepa_tokens_trains_decodes_and_plans(jepa_run, tmp_path):
    """The IDM, VQ, decoder and categorical planner see only tokens: a vq run on jepa tokens goes end to end. The
    label-using IDM term is refused outside baseline."""
    with pytest.raises(data.UserError, match="baseline runs only"):
        wm.WMConfig(tokens="jepa", variant="la", jepa_idm=1.0)
    run = tmp_path / "vq"
    train.main(train.TrainConfig(data=str(jepa_run / "data"), out=str(run), steps=3, batch_size=16, eval_every=3,
                                 val_batches=1, stats_batches=1, log_every=3, num_workers=0),
               wm.WMConfig(variant="vq", tokens="jepa", depth=1, heads=2, dim_head=8, mlp_dim=32, dropout=0.0,
                           jepa_dim=16, jepa_width=4, idm_depth=1, idm_heads=2, idm_dim=16, idm_mlp_dim=32,
                           num_codes=4))
    decode.main(decode.DecodeConfig(run=str(run), pairs=64, val_pairs=16, max_epochs=1, code_states=4, workers=0))
    res = plan.main(plan.PlanConfig(run=str(run), out=str(tmp_path / "vq.json"), episodes=2, num_samples=8, topk=2,
                                    opt_steps=1, ceiling_episodes=0, videos=0, allow_collapsed=True))
    assert res["tokens"] == "jepa" and res["planner"] == "cem_categorical"
