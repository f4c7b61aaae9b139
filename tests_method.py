"""End-to-end state-token checks that the method's pairings are right (collect -> train la -> decode -> plan)."""
import numpy as np
import pytest
import torch

import data
import decode
import plan
import train
import wm


@pytest.fixture(scope="module")
def la_run(tmp_path_factory):
    """A small la run on state tokens with its action decoder: ~30 s on one core."""
    tmp = tmp_path_factory.mktemp("method")
    root, run = tmp / "data", tmp / "la"
    torch.set_num_threads(1)
    data.collect(data.CollectConfig(out=str(root), episodes=300, steps=100, workers=1))
    train.main(train.TrainConfig(data=str(root), out=str(run), steps=600, batch_size=128, lr_predictor=2e-3,
                                 lr_action=2e-3, lr_idm=2e-3, eval_every=600, val_batches=4, stats_batches=8,
                                 log_every=300),
               wm.WMConfig(variant="la", tokens="state", depth=2, heads=4, dim_head=32, mlp_dim=256, dropout=0.0,
                           idm_depth=1, idm_heads=4, idm_dim=64, idm_mlp_dim=128))
    decode.main(decode.DecodeConfig(run=str(run), pairs=8000, val_pairs=1000))
    return run


def test_decoded_latents_replay_the_recorded_transitions(la_run):
    """The IDM's latents of the 5 recorded transitions of a task, decoded by the planner's own decoding path
    (plan.decode_plan: step h from frame h) and executed in the simulator, must retrace the recording: the final
    error drops well below the start error. Decoding step h from frame h+1, or a decoder trained on the next macro
    step's action, leaves it near the start error."""
    model, ckpt, root = wm.load_run(la_run)
    decoder, stats = decode.load_decoder(la_run, ckpt, "cpu"), ckpt["stats"]
    tasks = plan.make_tasks(root, "val", "open-loop", 60, 0, 64)
    split = data.load_split(root, "val")
    g = split["starts"][tasks["episode"]] + tasks["step"]  # (n,) global start frames
    z = wm.state_tokens(split["states"][g[:, None] + 5 * np.arange(6)])  # (n, 6, 1, 12) recorded macro steps
    with torch.no_grad():
        pairs = torch.stack([z[:, :-1], z[:, 1:]], 2).flatten(0, 1)  # (n*5, 2, 1, 12)
        latents = model.conditioning(pairs)["latent"][:, 0].view(len(g), 5, -1)  # (n, 5, L)
        a = plan.decode_plan(model, decoder, z[:, 0], latents)  # (n, 5, A)
    acts = data.macro_to_env(a.numpy(), stats["action_mean"], stats["action_std"])  # (n, 25, 2)
    start, final = [], []
    for s0, goal, act in zip(tasks["start_state"], tasks["goal_state"], acts):
        env = data.PushT()
        env.place(s0)
        start.append(plan.distances(goal, env.get_state())[0])
        for x in act:
            env.advance(x)
        final.append(plan.distances(goal, env.get_state())[0])
    assert np.mean(final) < 0.6 * np.mean(start), (np.mean(final), np.mean(start))


def test_la_planning_starts_from_the_runs_latent_prior(la_run, tmp_path, monkeypatch):
    """plan.py's Gaussian CEM over la latents starts from the IDM's own latent mean and std stored with the run,
    which differ from N(0, 1) (the seed's mis-scaled start)."""
    seen = []

    def spy(cost_fn, mu, sigma, *args, **kw):
        seen.append((mu[0, 0].clone(), sigma[0, 0].clone()))
        return cem_gaussian(cost_fn, mu, sigma, *args, **kw)
    cem_gaussian = plan.cem_gaussian
    monkeypatch.setattr(plan, "cem_gaussian", spy)
    plan.main(plan.PlanConfig(run=str(la_run), out=str(tmp_path / "r.json"), episodes=2, num_samples=16, topk=4,
                              opt_steps=1, ceiling_episodes=0, videos=0))
    stats = wm.load_run(la_run)[1]["stats"]
    mean, std = torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"])
    assert seen and (mean.abs().max() > 0.2 or (std - 1).abs().max() > 0.2)  # the prior is not N(0, 1) here
    for mu, sigma in seen:
        torch.testing.assert_close(mu, mean), torch.testing.assert_close(sigma, std)
