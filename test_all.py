"""All tests in pipeline order: data, dino, wm, train, decode, plan, eval, plumbing and hostile input, the DINOv2 pixel
path, policy, jepa, the method end to end, GPU only (skipped without CUDA). A user error is a property, never a
wording: data.UserError naming the flag or file, or exit status 2 with one stderr line naming it and nothing written.
The tiny state-token pipeline `pipe` is built once and shared; one small la run (~1 min) checks the method. Under
2 min on 2 cores, CPU only (CI: 98 s)."""
import contextlib, copy, dataclasses, functools, hashlib, itertools, json, math, os, pickle, runpy  # noqa: E401
import shlex, shutil, socket, subprocess, sys, unittest.mock, urllib.error  # noqa: E401
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import cv2, numpy as np, pytest, torch  # noqa: E401
import torch.distributed as dist, torch.multiprocessing as mp, torch.nn.functional as F  # noqa: E401
from torch.utils.flop_counter import FlopCounterMode
from pymunk import Vec2d

import data, decode, dino, plan, policy, train, wm  # noqa: E401
import eval as evaluate  # `eval` would shadow the builtin
from data import PushT, UserError, WindowDataset, is_success, render_state
from decode import ActionDecoder, DecodeConfig
from wm import WMConfig, WorldModel

HERE, CPU, VARIANTS = Path(__file__).resolve().parent, torch.device("cpu"), ("baseline", "la", "vq")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
cached_dinov2 = functools.lru_cache(dino.load_dinov2)  # one random ViT-S per (name, weights, device): ~0.5 s each
aeq, allclose, close = np.testing.assert_array_equal, np.testing.assert_allclose, torch.testing.assert_close
tload, gen = functools.partial(torch.load, weights_only=True), lambda seed: torch.Generator().manual_seed(seed)
jload = lambda path: json.loads(Path(path).read_text())  # noqa: E731
SIZES = dict(cond_dim=8, latent_dim=8, depth=2, heads=2, dim_head=8, mlp_dim=32, idm_depth=1, idm_heads=2, idm_dim=16,
             idm_mlp_dim=32, num_codes=4, proprio_dim=3)
PLANS = {"baseline-open-loop": {}, "la-mpc": dict(la_prior="standard", batch_episodes=2), "vq-open-loop": {},
         "vq-mpc": dict(via="adapter")}

@pytest.fixture(scope="module", autouse=True)
def one_thread():  # tiny tensors: one intra-op thread is faster, and no OpenMP spin-waits when the 2 cores are busy
    n, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture
def cached_dino(monkeypatch):  # stages that build the random encoder (through dino.make_input) share one instance
    monkeypatch.setattr(dino, "load_dinov2", cached_dinov2)

@pytest.fixture
def drawn(monkeypatch):  # the window indices each training stream (data.loader with drop_last) hands out, in order
    seen, loader = [], data.loader
    monkeypatch.setattr(data, "loader", lambda ds, b, order, *a, **kw: loader(
        ds, b, (seen.append(i) or i for i in order) if kw.get("drop_last") else order, *a, **kw))
    return seen

def user_error(fn, *args, names=(), **kw):  # fn(*args, **kw) raises data.UserError naming each of `names`
    with pytest.raises(UserError) as err:
        fn(*args, **kw)
    assert all(str(n) in str(err.value) for n in names), (names, str(err.value))

def tree(folder):  # every path under folder, relative: what a refused command must not have written
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))

def written(path, text="{}"):  # path, after writing text there (its folder made): a file of the user's
    path.parent.mkdir(parents=True, exist_ok=True), path.write_text(text)
    return path

def run_script(monkeypatch, script, *argv):  # `python script argv...` in this process (no interpreter start-up)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    runpy.run_path(str(HERE / script), run_name="__main__")

def config(cls, *paths, **defaults):  # a tiny config of a stage: cls(**defaults), the leading arguments `paths` as str
    return lambda *args, **kw: cls(**{**defaults, **{k: str(a) for k, a in zip(paths, args)}, **kw})

def collect(out, **kw):
    data.collect(config(data.CollectConfig, "out", episodes=4, steps=30, img_size=64, seed=3, workers=1,
                        val_fraction=0.25)(out, **kw))

tiny_decode = config(DecodeConfig, "run", pairs=64, val_pairs=16, max_epochs=2, code_states=8, workers=0, device="cpu")
tiny_plan = config(plan.PlanConfig, "run", "out", episodes=3, num_samples=8, topk=2, opt_steps=2, ceiling_episodes=2,
                   workers=1, device="cpu", videos=1)
tiny_policy = config(policy.TrainConfig, "data", "out", steps=6, batch_size=8, hidden=16, layers=1, log_every=3,
                     device="cpu")
policy_eval_cfg = config(policy.EvalConfig, "policy", "out", episodes=2, ceiling_episodes=0, videos=0, device="cpu")
encode_cfg = config(dino.EncodeConfig, "data", dino_weights="random", size=28, batch_size=4, workers=0, device="cpu")
import_cfg = config(data.ImportConfig, "src", "out")
tiny_eval = config(evaluate.EvalConfig, "out", windows=12, horizon=2, probe_windows=16, batch_size=8, workers=0,
                   device="cpu")

def train_cfgs(root, out, variant="vq", steps=6, **kw):  # a tiny state-token run, checkpoint every 3 steps
    return config(train.TrainConfig, "data", "out", steps=steps, batch_size=4, eval_every=3, val_batches=2,
                  stats_batches=2, log_every=2, num_workers=0, device="cpu", lr_predictor=1e-3, lr_action=1e-3,
                  lr_idm=1e-3)(root, out, **kw), WMConfig(variant=variant, tokens="state", **SIZES)

def write_dataset(root, lengths, img_size=32):  # both splits alike: frame g has agent_x = g and action (g, -g)
    f, states = int(sum(lengths)), np.zeros((int(sum(lengths)), 7))
    states[:, 0], states[:, 2:4] = np.arange(f), 256.0
    split = dict(states=states, actions=np.stack([np.arange(f), -np.arange(f)], 1).astype(np.float32),
                 lengths=np.array(lengths))
    with data._staging(Path(root)) as tmp:
        data._write(tmp, dict(train=split, val=split), dict(source="test", img_size=img_size, seed=0, args={}))
    return Path(root)

def tiny_wm(variant="baseline", **kw):  # a world model over 4 tokens of width 16 per frame (derived fields by hand)
    return WMConfig(variant=variant, **{**SIZES, "visual_dim": 16, "num_patches": 4, **kw})

def batch(B=6, T=2, seed=0):  # random tokens z (B, T, 4, 16), actions (B, T, 10), proprio (B, T, 4)
    g = gen(seed)
    return torch.randn(B, T, 4, 16, generator=g), torch.randn(B, T, 10, generator=g), torch.randn(B, T, 4, generator=g)

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """data/ (6 x 60 steps, 28 px), vq6/ (6 steps) and weights, baseline/ la/ vq/ (2 steps) + heads, PLANS' results"""
    root = tmp_path_factory.mktemp("pipeline")
    collect(root / "data", episodes=6, steps=60, img_size=28, seed=0, val_fraction=0.1)
    p = SimpleNamespace(root=root, data=root / "data", vq6=root / "vq6", reports={}, planned={})
    p.windows = len(WindowDataset(p.data, "train", 2))  # its 2-frame train windows: the labels a baseline sees
    p.vq6_sd = copy.deepcopy(train.main(*train_cfgs(p.data, p.vq6)).state_dict())
    for v in VARIANTS:
        train.main(*train_cfgs(p.data, root / v, v, steps=2, eval_every=2, val_batches=1, stats_batches=1))
        p.reports[v] = decode.main(tiny_decode(root / v))
        p.reports[v + "-adapter"] = v != "baseline" and decode.main(tiny_decode(root / v, head="adapter"))
    for name, extra in PLANS.items():
        p.planned[name] = root / "results" / f"{name}.json"
        plan.main(tiny_plan(root / name.split("-")[0], p.planned[name], protocol=name.split("-", 1)[1], **extra))
    return p

# ---- data.py: the simulator (DINO-WM's physics and constants), rendering, the success test ---------------------------
PUSH = np.array([170.0, 315.0, 256.0, 300.0, 0.0, 0.0, 0.0])  # agent 20 px left of the cap of the T at (256, 300)

def rollout(env, actions):  # states (T, 7) after each of the px actions (T, 2)
    return np.stack([env.advance(a) or env.get_state() for a in actions])

def test_simulator_is_dinowm_s_and_is_success_and_frames_are_upstreams_at_any_size():
    """Constants, reset, the PD step's known answer, DINO-WM's step bit for bit; set_state/place; same state, future;
    success: position error < 20, angle < pi/9 across the wrap-around, velocities never count, NumPy or torch; frames"""
    env, rs = PushT(), np.random.RandomState(5)
    assert env.block.moment == 3000.0 and env.block.mass == 1 and tuple(env.block.center_of_gravity) == (0.0, 45.0)
    assert env.space.damping == 0 and tuple(env.space.gravity) == (0, 0) and env.agent.body_type == env.agent.KINEMATIC
    assert all(sh.friction == sh.elasticity == 0 for sh in env.space.shapes)  # gains and rates: the known answer below
    env.reset(5)
    want = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)]
    allclose(env.get_state(), want + [(rs.randn() * 2 * np.pi - np.pi) % (2 * np.pi), 0, 0], atol=1e-6)  # Gaussian
    env.set_state([100.0, 100.0, 400.0, 300.0, 0.0, 0.0, 0.0]), env.step([20.0, 0.0])  # 10 PD substeps, by hand:
    s = env.get_state()  # v += (KP (20 - x) - KV v) 0.01, x += 0.01 v; KP, KV = 100, 20: 5.9134 px at 74.8295 px/s
    assert abs(s[0] - 105.9134) < 1e-4 and abs(s[5] - 74.8295) < 1e-4 and s[1] == 100.0 and s[6] == 0.0

    def dinowm_step(env, action):  # DINO-WM's PushTEnv.step physics, literally, in pymunk's Vec2d arithmetic
        target = env.agent.position + Vec2d(float(action[0]), float(action[1]))
        for _ in range(100 // 10):
            env.agent.velocity += (100 * (target - env.agent.position) + 20 * (Vec2d(0, 0) - env.agent.velocity)) * 0.01
            env.space.step(1.0 / 100)
    rng, ours, theirs, moved = np.random.default_rng(1), PushT(), PushT(), 0
    for s in PUSH + rng.uniform(-1, 1, (8, 7)) * [5, 5, 10, 10, 0.3, 0, 0]:  # agent +-5 px, T +-10 px, +-0.3 rad
        ours.place(s), theirs.place(s)
        for a in rng.normal([25.0, 0.0], 15, (8, 2)):  # mostly into the T: contact on most steps
            ours.advance(a), dinowm_step(theirs, a), aeq(ours.get_state(), theirs.get_state())
        moved += abs(ours.get_state()[2] - s[2]) > 5
    assert moved >= 6  # the pushes did reach the T
    s = np.array([100.0, 120.0, 300.0, 280.0, 1.0, 0.0, 0.0])
    for given in (s, s[:5], s + [0, 0, 0, 0, 4 * math.pi, 0, 0]):  # 7 numbers; 5 = zero velocity; unwrapped angle
        assert env.set_state(given).shape == (224, 224, 3) and np.allclose(env.get_state(), s, atol=1e-9)
        assert env.place(given) is None and np.allclose(env.get_state(), s, atol=1e-9)  # place: the same, no frame
    env.set_state([100.0, 120.0, 300.0, 280.0, 1.0, 50.0, -30.0])  # set_state's extra step: the agent moves 0.01 s
    allclose(env.get_state(), [100.5, 119.7, 300.0, 280.0, 1.0, 50.0, -30.0], atol=1e-9)
    for bad in ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, float("nan")]):
        pytest.raises(ValueError, PushT().set_state, bad)
    (a := PushT()).reset(7), (b := PushT()).reset(7), (c := PushT()).reset(123)
    n1, n5 = (np.random.default_rng(seed).normal(0, 25, (n, 2)) for seed, n in ((1, 40), (5, 10)))  # px offsets
    rollout(c, n5), aeq(rollout(a, n1), rollout(b, n1))  # deterministic
    a.set_state(PUSH), rollout(a, [[30.0, 0.0]] * 3)  # mid-contact ...
    a.set_state(s := a.get_state()), c.set_state(s)  # ... or after a random walk: the same state has the same future
    aeq(rollout(a, [[30.0, 5.0]] * 10), rollout(c, [[30.0, 5.0]] * 10))
    env.set_state(still := [60.0, 60.0, 300.0, 300.0, 0.5, 0.0, 0.0])
    rollout(env, [[20.0, 0.0]] * 5), aeq(env.get_state()[2:5], still[2:5])  # the block moves only while pushed
    env.set_state(PUSH), rollout(env, [[30.0, 0.0]] * 2)  # in contact: the frame (uint8) draws no contact points
    aeq(env.step([30.0, 0.0]), np.uint8(render_state(env.get_state(), 224)), strict=True)  # strict: shape, dtype
    assert env.get_state()[2] - 256.0 > 5  # pushed to the right; backing off ends contact, the T stops dead
    aeq((backed := rollout(env, [[-30.0, 0.0]] * 5))[-1, 2:5], backed[-2, 2:5])
    g = np.array([100.0, 100.0, 200.0, 200.0, 0.05, 0.0, 0.0])
    for delta, ok in [([0, 0, 0, 0, 0], True), ([10, 10, 10, 0, 0], True), ([10, 10, 10, 10, 0], False),  # 17.3; 20
                      ([0, 0, 0, 0, math.pi / 9 + 1e-3], False), ([0, 0, 0, 0, 2 * math.pi - 0.1], True),
                      ([0, 0, 0, 0, 4 * math.pi], True), ([0, 0, 0, 0, 1 + 2 * math.pi], False)]:
        assert is_success(g, g + np.r_[delta, 500.0, 500.0]) == ok, delta
    s = (rng := np.random.default_rng(1)).uniform(0, 512, (400, 7))
    g = s + rng.normal(0, 12, (400, 7)) * [1, 1, 1, 1, 0.02, 1, 1]  # near pairs: both verdicts occur
    g[:, 4] += 2 * np.pi * rng.integers(-1, 2, 400)  # angles that differ by whole turns
    want, got = np.array([is_success(a, b) for a, b in zip(g, s)]), is_success(torch.tensor(g), torch.tensor(s))
    assert 0 < want.mean() < 1 and (got.numpy() == want).all() and (is_success(g, s) == want).all()
    big = render_state([100.0, 420.0, 350.0, 350.0, math.pi / 2, 0.0, 0.0], 512)
    assert tuple(big[420, 100]) == data.AGENT_LIGHT and tuple(big[420, 100 + 13]) == data.AGENT_RGB
    assert tuple(big[350, 250]) == data.BLOCK_LIGHT  # y down: angle pi/2 maps local (0, 100) to (-100, 0)
    assert tuple(big[350, 350 - 30]) == data.BLOCK_RGB  # outline of the cap's far edge, local y = 30
    assert tuple(big[267, 245]) == data.GOAL_RGB and tuple(big[5, 200]) == data.WALL_RGB  # anchor T, local (0, 15)
    assert tuple(big[100, 256]) == (255, 255, 255)
    for size, s in zip((224, 196, 64) * 4, np.random.default_rng(0).uniform(-30, 540, (12, 7))):  # partly off canvas
        s[4:] = (s[4] - 255) / 40, 0, 0  # angles in (-7.1, 7.1); drawn at 512 px, resized
        aeq(render_state(s, size), cv2.resize(render_state(s, 512), (size, size), interpolation=cv2.INTER_LINEAR))

# ---- data.py: collect, info, the command line, windows, macro actions, the importer, damaged datasets ----------------
def test_collect_layout_statistics_replay_the_data_command_line_and_refusals(tmp_path, monkeypatch, capsys):
    """collect: layout, statistics, replay, any worker count, a no-op again, refusals, nothing left on failure; info"""
    collect(small := tmp_path / "a"), collect(two := tmp_path / "b", workers=2)  # 4 x 31 frames: 3 train, 1 val
    assert data.load_meta(small, verify=True)["fingerprint"] == data.load_meta(two, verify=True)["fingerprint"]
    tr, meta, env = data.load_split(small, "train"), data.load_meta(small), PushT()
    assert tr["lengths"].tolist() == [31, 31, 31] and tr["states"].shape == (93, 7) and tr["frames"] is None
    assert (tr["actions"][[30, 61, 92]] == 0).all()  # an episode's last action leads nowhere: not in the stats
    real = np.delete(tr["actions"], [30, 61, 92], axis=0).astype(np.float64)
    assert np.allclose(meta["action_mean"], real.mean(0)) and np.allclose(meta["action_std"], real.std(0))
    assert meta["splits"]["val"] == {"episodes": 1, "frames": 31} and meta["img_size"] == 64
    env.reset(3), aeq(env.get_state(), tr["states"][0])  # episode i starts from reset(seed + i) ...
    assert max(data.replay_drift(tr, episodes=3, steps=25)) < 1e-9  # ... and its stored actions replay it
    before, _ = (small / "meta.json").read_text(), capsys.readouterr()
    collect(small)
    assert "nothing to do" in capsys.readouterr().out
    user_error(collect, small, seed=4, names=["--out", small])
    assert (small / "meta.json").read_text() == before
    run_script(monkeypatch, "data.py", "collect", "--out", tmp_path / "c", "--episodes", 3, "--steps", 12,
               "--img-size", 32, "--workers", 1)
    run_script(monkeypatch, "data.py", "info", tmp_path / "c")
    out = capsys.readouterr().out  # collect's speed, then info's report
    assert all(s in out for s in ("frames/s", "2 episodes, 26 frames", "5-step windows", "8x8", "windows/s",
                                  "(verified)", "drift"))
    assert data.load_meta(tmp_path / "c")["splits"]["val"]["frames"] == 13
    data.figure(data.FigureConfig(out=str(tmp_path / "f.png")))
    assert cv2.imread(str(tmp_path / "f.png")).shape == (224, 6 * 224 + 5 * 4, 3)  # 6 tiles, 4-px gutters
    user_error(collect, (junk := written(tmp_path / "x" / "junk" / "file.txt", "x").parent), names=["--out", junk])

    def disk_full(tmp, splits, meta):  # the disk fills up half-way through writing
        np.save(tmp / "train" / "states.npy", splits["train"]["states"])
        raise OSError("disk full")
    monkeypatch.setattr(data, "_write", disk_full)
    pytest.raises(OSError, collect, tmp_path / "x" / "out", episodes=2, steps=5)
    assert tree(tmp_path / "x") == ["junk", "junk/file.txt"]

@pytest.mark.filterwarnings("ignore:.*shorter than one window")
def test_windows_frames_actions_proprio_features_and_macro_actions(tmp_path):
    with pytest.warns(UserWarning, match="1 of 3"):  # an episode shorter than one window
        ds = WindowDataset(write_dataset(tmp_path / "d", [12, 9, 15]), "train", num_frames=2, frameskip=5, pixels=True)
    assert len(ds) == 3 + 0 + 6  # the 9-frame episode holds no 10-frame window
    meta, item = ds.meta, ds[4]  # second window of the third episode: starts at frame 12 + 9 + 1 = 22
    assert int(item["index"]) == 22 and item["obs"].shape == (2, 32, 32, 3) and item["obs"].dtype == torch.uint8
    aeq(item["state"][:, 0].numpy(), [22, 27]), aeq(item["obs"][0].numpy(), render_state(ds.states[22], 32))
    raw = np.stack([np.arange(22, 32), -np.arange(22, 32)], 1)  # (10, 2): actions 22..31 -> row k = 22+5k .. 26+5k
    allclose(item["action"].numpy(), ((raw - meta["action_mean"]) / meta["action_std"]).reshape(2, 10), rtol=1e-6)
    allclose(item["proprio"][:, 0], (np.array([22, 27]) - meta["proprio_mean"][0]) / meta["proprio_std"][0], rtol=1e-6)
    assert torch.equal(ds.__getitems__([4, 0])["action"][0], item["action"])  # a batch is one gather
    feats = np.arange(36 * 3 * 4, dtype=np.float16).reshape(36, 3, 4)  # (F, P, D)
    item = WindowDataset(tmp_path / "d", "train", pixels=True, features=feats)[4]
    assert "obs" not in item and item["feat"].dtype == torch.float16 and (item["feat"].numpy() == feats[[22, 27]]).all()
    assert "obs" not in WindowDataset(tmp_path / "d", "train")[0]  # state-only windows carry no pixels
    user_error(WindowDataset, write_dataset(tmp_path / "short", [5, 9]), "train", names=[tmp_path / "short"])
    mean, std, a_px = [1.5, -2.0], [20.0, 18.0], np.random.default_rng(0).normal(0, 20, (3, 10, 2))  # (E, H * 5, 2)
    macro, t = data.env_to_macro(a_px, mean, std), torch.tensor(a_px, dtype=torch.float32)  # (E, H, 10): time-major
    allclose(macro, ((a_px - mean) / std).reshape(3, 2, 10)), allclose(data.macro_to_env(macro, mean, std), a_px)
    close(data.macro_to_env(data.env_to_macro(t, mean, std), mean, std), t)
    pytest.raises((AssertionError, ValueError), data.env_to_macro, a_px[:, :7], mean, std)  # no whole macro action

def fake_dinowm(root, lengths_by_split, short_video=None, lengths_obj=None):  # pusht_noise as DINO-WM stores it, 64 px
    for name, lengths in lengths_by_split.items():
        d, n, t_max = root / name, len(lengths), max(lengths)
        (d / "obses").mkdir(parents=True)
        states, vel, act = torch.zeros(n, t_max, 5), torch.zeros(n, t_max, 2), torch.zeros(n, t_max, 2)
        for i, length in enumerate(lengths):
            s, a = data.collect_episode(100 * len(name) + i, length - 1)
            states[i, :length], vel[i, :length], act[i, :length] = map(torch.tensor, (s[:, :5], s[:, 5:], a))
            video = cv2.VideoWriter(f"{d}/obses/episode_{i:03d}.mp4", cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 64))
            for st in s[:length - (short_video == (name, i))]:
                video.write(cv2.cvtColor(render_state(st, 64), cv2.COLOR_RGB2BGR))
            video.release()
        for fname, x in (("states", states), ("velocities", vel), ("rel_actions", act), ("abs_actions", act)):
            torch.save(x, d / f"{fname}.pth")
        (d / "seq_lengths.pkl").write_bytes(pickle.dumps(list(lengths) if lengths_obj is None else lengths_obj))
    return root

def test_import_converts_states_actions_and_video_frames(tmp_path):
    """pusht_noise -> our layout (mp4 frames in RGB order, read by windows; else 224-px renders), stale staging gone."""
    src = fake_dinowm(tmp_path / "src", dict(train=np.array([30, 27, 28]), val=[29, 26]))  # NumPy ints; plain ints
    data.import_dinowm(import_cfg(src, out := tmp_path / "frames", keep_frames=True))
    meta, tr = data.load_meta(out), data.load_split(out, "train")
    assert meta["source"] == "dinowm" and meta["img_size"] == 64 and tr["lengths"].tolist() == [30, 27, 28]
    want = np.concatenate([data.collect_episode(500 + i, n - 1)[0] for i, n in enumerate([30, 27, 28])])
    aeq(tr["states"], want.astype(np.float32))  # DINO-WM stores float32
    rendered = np.stack([render_state(s, 64) for s in tr["states"][:30]])
    assert tr["frames"].shape == (85, 64, 64, 3)  # RGB order kept through the mp4, where something is drawn:
    assert np.abs(tr["frames"][:30].astype(int) - rendered)[rendered.min(-1) < 250].mean() < 12
    assert max(data.replay_drift(tr, episodes=3, steps=25)) < 1e-3  # float32 storage only
    data.info(data.InfoConfig(root=str(out)), bench=5)  # the fingerprint covers the stored arrays
    aeq(WindowDataset(out, "val", pixels=True)[0]["obs"].numpy(), data.load_split(out, "val")["frames"][[0, 5]])
    (stale := tmp_path / ".out.tmp-killed").mkdir()  # left by an earlier, killed run
    data.import_dinowm(import_cfg(src, out := tmp_path / "out"))  # no --keep-frames: 224-px renders
    assert data.load_meta(out)["img_size"] == 224 and data.load_split(out, "val")["frames"] is None
    assert not stale.exists() and data.load_split(out, "train")["lengths"].tolist() == [30, 27, 28]

ONE = dict(train=[20], val=[20])
BAD_SOURCES = {  # name: (make a bad pusht_noise folder, the file the error names, keep_frames): HOSTILE's import-*
    "short-video": (lambda s: fake_dinowm(s, dict(train=[20, 21], val=[20]), short_video=("train", 1)),
                    "episode_001.mp4", True),
    "torch-pickle": (lambda s: fake_dinowm(s, ONE, lengths_obj=torch.tensor([20])), "seq_lengths.pkl", False),
    "too-long": (lambda s: fake_dinowm(s, ONE, lengths_obj=[25]), "seq_lengths.pkl", False),
    "bad-shape": (lambda s: torch.save(torch.zeros(1, 20, 3), fake_dinowm(s, ONE) / "train" / "velocities.pth"),
                  "velocities.pth", False),
    "missing": (lambda s: (fake_dinowm(s, ONE) / "train" / "rel_actions.pth").unlink(), "rel_actions.pth", False),
    "garbage": (lambda s: (fake_dinowm(s, ONE) / "train" / "states.pth").write_bytes(b"garbage"), "states.pth", False)}

DAMAGED = {  # name: (damage a dataset of 27 frames, the file the error names): HOSTILE's dataset-*
    "no-meta": (lambda d: d.joinpath("meta.json").unlink(), "meta.json"),
    "meta-not-json": (lambda d: d.joinpath("meta.json").write_text("{not json"), "meta.json"),
    "states-shape": (lambda d: np.save(d / "train" / "states.npy", np.zeros((27, 5))), "states.npy"),
    "lengths-sum": (lambda d: np.save(d / "train" / "states.npy", np.zeros((26, 7))), "lengths.npy"),
    "actions-corrupt": (lambda d: d.joinpath("train", "actions.npy").write_bytes(b"\x93NUMPY garbage"), "actions.npy"),
    "fingerprint": (lambda d: np.save(d / "train" / "actions.npy", np.ones((27, 2), np.float32)), "fingerprint")}

# ---- dino.py: the state-dict contract, forward vs a reference, interpolation, preprocessing, loading, the cache ------
def official_shapes(D=384, depth=12, reg=False, swiglu=False):  # the official files' key -> shape (dinov2 hub)
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1370, D)} | ({"register_tokens": (1, 4, D)} if reg else {})
    shapes |= {"mask_token": (1, D), "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,)}
    H = 4096 if swiglu else 4 * D
    ffn = ({"mlp.w12.weight": (2 * H, D), "mlp.w12.bias": (2 * H,), "mlp.w3.weight": (D, H), "mlp.w3.bias": (D,)}
           if swiglu else
           {"mlp.fc1.weight": (H, D), "mlp.fc1.bias": (H,), "mlp.fc2.weight": (D, H), "mlp.fc2.bias": (D,)})
    block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
             "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ls1.gamma": (D,),
             "norm2.weight": (D,), "norm2.bias": (D,), **ffn, "ls2.gamma": (D,)}
    shapes |= {f"blocks.{i}.{k}": v for i in range(depth) for k, v in block.items()}
    return shapes | {"norm.weight": (D,), "norm.bias": (D,)}

def randomize_(model):  # every parameter random, off its default: a norm swap, q/k mix-up, lost LayerScale all show
    g, tokens = gen(1), ("cls_token", "pos_embed", "register_tokens", "mask_token")
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):  # LayerScale: in (0.1, 0.2)
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):  # LayerNorm scales: near 1
                p.copy_(1 + 0.1 * r)
            else:  # tokens and biases: 0.5 r; matrices: r scaled by fan-in
                p.copy_(0.5 * r if name in tokens or name.endswith("bias") else r / math.sqrt(p[0].numel()))
    return model

def reference_forward(sd, x, reg):  # DINOv2's forward (vision_transformer.py, layers/) from sd -> prenorm, normed
    B, h0, w0, D = len(x), x.shape[2] // 14, x.shape[3] // 14, sd["cls_token"].shape[-1]  # the patch grid: h0 x w0
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), 1)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)
    grid = (F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=True) if reg
            else F.interpolate(grid, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37), mode="bicubic"))
    t = t + torch.cat((sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)), 1)
    t = torch.cat((t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]), 1) if reg else t
    ln = lambda v, k: F.layer_norm(v, (D,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(12):
        b = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        qkv = F.linear(ln(t, f"blocks.{i}.norm1"), b("attn.qkv.weight"), b("attn.qkv.bias"))
        q, k, v = qkv.reshape(B, -1, 3, D // 64, 64).permute(2, 0, 3, 1, 4)
        a = (torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v).transpose(1, 2).reshape(B, -1, D)
        t = t + b("ls1.gamma") * F.linear(a, b("attn.proj.weight"), b("attn.proj.bias"))
        m = F.gelu(F.linear(ln(t, f"blocks.{i}.norm2"), b("mlp.fc1.weight"), b("mlp.fc1.bias")))
        t = t + b("ls2.gamma") * F.linear(m, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
    return t, ln(t, "norm")

@pytest.mark.parametrize("name,D,depth,n_params,forward", [  # forward: the ViT-S whose forward is checked
    ("dinov2_vits14", 384, 12, 22_056_576, "dinov2_vits14"), ("dinov2_vitb14_reg", 768, 12, 86_583_552,
     "dinov2_vits14_reg"), ("dinov2_vitl14", 1024, 24, None, None), ("dinov2_vitg14", 1536, 40, None, None)])
def test_state_dict_keys_and_shapes_are_official_and_forward_equals_the_reference(name, D, depth, n_params, forward):
    with torch.device("meta"):  # shapes only, no memory
        sd, model = dino.DinoVisionTransformer(name).state_dict(), forward and dino.DinoVisionTransformer(forward)
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(D, depth, name.endswith("_reg"), "g14" in name)
    assert n_params is None or sum(v.numel() for v in sd.values()) == n_params
    if not forward:
        return
    model, R = randomize_(model.to_empty(device="cpu")).eval(), 4 if name.endswith("_reg") else 0
    with torch.no_grad():  # a non-square 2 x 3 grid catches a row/column mix-up
        out = model.forward_features(x := torch.randn(2, 3, 28, 42))
        prenorm, norm = reference_forward(model.state_dict(), x, reg=R > 0)
    for key, want, tol in (("x_prenorm", prenorm, 1e-4), ("x_norm_clstoken", norm[:, 0], 1e-5),
                           ("x_norm_regtokens", norm[:, 1:1 + R], 1e-5), ("x_norm_patchtokens", norm[:, 1 + R:], 1e-5)):
        close(out.pop(key), want, atol=tol, rtol=tol)  # values and shapes (R register tokens, 2 x 3 patches)
    assert out == {"masks": None}  # and no other key

def test_official_files_load_strictly_from_a_path_or_the_hub_cache(tmp_path, monkeypatch):
    """Official files load strictly into a frozen model, known by content; else the hub cache, else where to put it."""
    g = gen(2)
    torch.save(sd := {k: torch.randn(s, generator=g) for k, s in official_shapes().items()},
               path := tmp_path / "dinov2_vits14_pretrain.pth")
    model = dino.load_dinov2("dinov2_vits14", str(path))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]  # cache headers know the weights by content
    assert dino.weights_tag(str(path)) == f"dinov2_vits14_pretrain.pth:{digest}"
    torch.save({"model": {k: v for k, v in sd.items() if k != "blocks.3.ls1.gamma"}}, tmp_path / "ckpt.pth")
    for file, missing in (("ckpt.pth", ["blocks.3.ls1.gamma"]), ("nope.pth", [])):  # unwrapped, strict; missing
        user_error(dino.load_dinov2, "dinov2_vits14", str(tmp_path / file), names=[tmp_path / file, *missing])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))  # empty hub cache, no network:
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline := unittest.mock.Mock(
        side_effect=urllib.error.URLError("no network")))  # each download fails; the calls are recorded
    cached = tmp_path / "home" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    user_error(dino.load_dinov2, "dinov2_vits14", names=[cached, "--dino-weights", "random", url])
    user_error(dino.load_dinov2, "dinov2_vits14_reg", names=["dinov2_vits14_reg4_pretrain.pth"])
    assert [c.args for c in offline.call_args_list] == [(url, str(cached)),  # (url, dst); progress= as it likes
                                                        (url.replace("pretrain", "reg4_pretrain"), unittest.mock.ANY)]
    cached.write_bytes(path.read_bytes())  # as if downloaded: now found without the network
    assert torch.equal(dino.load_dinov2("dinov2_vits14").cls_token, sd["cls_token"]) and offline.call_count == 2
    assert dino.weights_tag(None) == dino.weights_tag(str(path))  # "" means that very file

def test_random_encoder_positions_shapes_frozen_use_the_callers_precision_and_preprocessing(capsys):
    """Plain models' positions: scale (h0 + 0.1) / 37, cached; register models: size= with antialias, never stale; a
    deterministic, announced random init; shapes; encode feeds training in the caller's precision; preprocess."""
    pe = (vits := cached_dinov2("dinov2_vits14", "random")).pos_embed
    assert vits.interpolate_pos_encoding(37, 37) is pe  # 518 px: the stored table, unchanged
    for (h0, w0), n in {(14, 14): 197, (16, 16): 257, (2, 3): 7, (39, 39): 1 + 39 * 39, (43, 40): 1 + 43 * 40}.items():
        assert vits.interpolate_pos_encoding(h0, w0).shape == (1, n, 384)
    grid = lambda pe, **kw: F.interpolate(  # noqa: E731  pe's 37 x 37 patch positions, resized: (1, h0 w0, 384)
        pe[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2), mode="bicubic", **kw).flatten(2).transpose(1, 2)
    close((pos := vits.interpolate_pos_encoding(14, 14))[:, 1:], grid(pe, scale_factor=[14.1 / 37] * 2), atol=0, rtol=0)
    assert torch.equal(pos[:, 0], pe[:, 0]) and vits.interpolate_pos_encoding(14, 14) is pos  # cls kept; cached
    assert (pos[:, 1:] - grid(pe, size=(14, 14))).abs().max() > 1e-3  # size= would change the features
    want = grid((reg := dino.load_dinov2("dinov2_vits14_reg", "random")).pos_embed, size=(16, 12), antialias=True)
    close(reg.interpolate_pos_encoding(16, 12)[:, 1:], want, atol=0, rtol=0)
    reg.load_state_dict({k: v + 1 for k, v in reg.state_dict().items()})  # new weights: no stale cached table
    close(reg.interpolate_pos_encoding(16, 12)[:, 1:], want + 1, atol=1e-5, rtol=0)
    rng, other, a = torch.get_rng_state(), dino.load_dinov2("dinov2_vits14", "random"), vits.state_dict()
    assert "RANDOM" in capsys.readouterr().err and torch.equal(torch.get_rng_state(), rng)  # own generator
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in a.items())  # the same init each time
    assert torch.equal(a["blocks.0.ls1.gamma"], torch.ones(384)) and torch.equal(a["norm.bias"], torch.zeros(384))
    assert 0.015 < a["blocks.0.attn.qkv.weight"].std() < 0.025 and 0.015 < a["pos_embed"].std() < 0.025
    frames = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    with torch.inference_mode():  # fp32
        out, cls = vits.forward_features(x := dino.preprocess(frames, 28)), vits(x)
    assert (ref := out["x_norm_patchtokens"]).shape == (2, 4, 384) and torch.equal(cls, out["x_norm_clstoken"])
    pytest.raises(ValueError, vits.forward_features, torch.zeros(1, 3, 30, 28))  # sides must be multiples of 14
    z = dino.encode(vits, frames, 28)  # bit-exact: no autocast inside encode; no inference tensor: training may use it
    assert z.dtype == torch.float32 and torch.equal(z, ref) and not z.is_inference()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = dino.encode(vits, frames, 28)
    assert zb.dtype == torch.float32 and not torch.equal(zb, ref)  # the caller's bf16 reached the encoder
    close(zb, ref, atol=0.1, rtol=0.05)
    (frames := torch.zeros(2, 56, 56, 3, dtype=torch.uint8))[0], frames[1, :, :28] = 255, 255
    x, full = dino.preprocess(frames, size=28), frames.permute(0, 3, 1, 2).float() / 127.5 - 1  # Normalize(0.5, 0.5)
    close(x, want := F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False, antialias=True))
    assert not torch.equal(want, F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False))
    close(dino.preprocess(frames, size=56), full)  # already at size: untouched
    pytest.raises(ValueError, dino.preprocess, full.permute(0, 2, 3, 1), size=28)  # float frames: a mix-up

def test_feature_cache_and_store(tmp_path, cached_dino):
    """The cache: the encoder's tokens, refused on a small disk, per encoder, rebuilt when damaged; the int8 store."""
    collect(root := tmp_path / "data", episodes=3, steps=7, img_size=32)  # 16 train frames
    with unittest.mock.patch.object(dino.shutil, "disk_usage", return_value=SimpleNamespace(free=10_000)):
        user_error(dino.main, encode_cfg(root), names=[root, "--features memory"])
    assert not list(root.glob("*/features.*"))  # nothing written, nothing half-written
    dino.main(encode_cfg(root))
    load = functools.partial(dino.load_features, root, "train", size=28, weights="random")
    npy, head, feats = root / "train" / "features.npy", jload(root / "train" / "features.json"), load()
    assert head["done"] == head["frames"] == 16 and head["dtype"] == "float32" and head["images_per_s"] > 0
    frames = np.stack([render_state(s, 32) for s in data.load_split(root, "train")["states"]])
    allclose(feats, dino.encode(cached_dinov2("dinov2_vits14", "random"), frames, 28).numpy(), atol=2e-2, rtol=1e-2)
    assert (good := np.array(feats)).dtype == np.float16  # (16, 4, 384): allclose checked; good: a copy to rebuild
    assert load(size=42) is None and load(weights="other.pth") is None  # another encoder input size, other weights
    os.truncate(npy, npy.stat().st_size - 100)
    user_error(load, names=[npy, f"dino.py encode --data {root} --split train"])  # the command that rebuilds it
    dino.main(encode_cfg(root)), aeq(load(), good)  # encode notices the damage and starts the split again
    (mm := np.load(npy, mmap_mode="r+"))[-1] = np.nan  # a header that says complete over rows that are not
    mm.flush(), user_error(load, names=[npy])
    user_error(dino.cache_plan, encode_cfg(root, dtype="bfloat16"), "train", 384, "bfloat16",
               names=[root / "train" / "features.json", "'float32'", "'bfloat16'", "--overwrite"])
    (x := torch.randn(10, 6, 384, generator=gen(0)))[..., 7] *= 100  # (F, P, D); int8 per token after channel scaling
    (store := dino.FeatureStore(10, 6, 384, "cpu")).put(0, x[:4]), store.put(4, x[4:])
    every = store[np.arange(10)]  # all rows; and any rows come in the order asked:
    assert torch.equal(store[np.array([9, 0, 4])], every[[9, 0, 4]]) and store.nbytes == 10 * 6 * (384 + 4)
    err = ((every - x).norm() / x.norm()).item()  # < 1 %; one scale per token alone would lose ~13 %
    assert store.error == pytest.approx(err, rel=1e-4) and err < 0.01 and len(store) == 10

# ---- wm.py: state tokens, the token-source config, shapes, causal masks, VQ, learning, rollout, diagnostics ----------
def test_state_tokens_and_the_token_source_config():
    """Contact looks the same wherever the T is; 20 degrees weigh like 20 px, no wrap-around; the derived config."""
    rng = np.random.default_rng(0)
    s = np.c_[rng.uniform(50, 450, (5, 4)), rng.uniform(0, 6, 5), rng.normal(0, 50, (5, 2))]  # (N, 7)
    z, phi = dino.state_tokens(s), 1.3
    assert z.shape == (5, 1, 12) and dino.state_tokens(torch.tensor(s)[None]).shape == (1, 5, 1, 12)
    R = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])  # turns like the T's angle
    moved = np.c_[s[:, 0:2] @ R.T + 40, s[:, 2:4] @ R.T + 40, s[:, 4] + phi, s[:, 5:7] @ R.T]  # turned, shifted
    close((zm := dino.state_tokens(moved))[..., 6:10], z[..., 6:10], atol=1e-5, rtol=0)  # block frame: offset, speed
    assert (zm[..., :6] - z[..., :6]).abs().max() > 0.1  # the world frame does see where the T is
    s = np.array([[200.0, 200.0, 300.0, 300.0, 6.2, 0.0, 0.0]])
    turned, shifted = s + [0, 0, 0, 0, math.radians(20), 0, 0], s + [0, 0, 20, 0, 0, 0, 0]  # zw: turned, 2 pi less
    z, zt, zw, zs = (dino.state_tokens(x)[0, 0] for x in (s, turned, turned - [0, 0, 0, 0, 2 * math.pi, 0, 0], shifted))
    close(zw, zt, atol=1e-5, rtol=0)
    assert abs((zt - z)[4:6].norm() / (zs - z)[:4].norm() - 1) < 0.02  # the angle part moves as far as the position
    meta, states = {"img_size": 64}, np.array([[200.0, 200.0, 300.0, 300.0, 1.0, 3.0, 4.0], PUSH])
    mc = wm.derive(WMConfig(tokens="state", frameskip=4), meta)
    assert mc == WMConfig(tokens="state", frameskip=4, action_dim=8, visual_dim=12, num_patches=1)
    close(dino.make_input(mc, CPU)(dino.batch_of_states(states, mc)), dino.state_tokens(states)[:, None])  # no frames
    px = wm.derive(WMConfig(tokens="dinov2", dino_size=28, dino_name="dinov2_vitb14_reg"), meta)
    assert (px.visual_dim, px.num_patches, px.img_size, px.action_dim) == (768, 4, 64, 10)
    user_error(wm.derive, WMConfig(tokens="state", dino_size=28), meta, names=["--dino-size", "state"])
    user_error(wm.refuse_pixel_flags, WMConfig(tokens="state"), dino_weights="random", names=["--dino-weights"])
    wm.refuse_pixel_flags(WMConfig(tokens="dinov2"), dino_weights="random")  # pixel tokens read it

@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_overfitting_one_batch_and_the_rollout_error_every_variant(variant):
    """Shapes with 1 or 3 context frames; 80 steps fit one batch; eval's error at h = 1 is one-step, causal in h."""
    for n, proprio in ((1, False), (3, True)):
        m, (z, a, p) = WorldModel(tiny_wm(variant, num_hist=n, proprio=proprio)), batch(T=n + 1)
        out, obs = m(z, a, p), m.observe(z, p)
        assert out["loss"].shape == () and out["cond"].shape == (6, n + 1, 8) and torch.equal(out["tokens"], z)
        assert variant == "baseline" or m.idm(z).shape == (6, n + 1, 16) and out["latent"].shape == (6, n, 8)
        assert variant != "vq" or out["codes"].shape == (6, n) and out["commit_loss"].shape == ()
        assert m.predict(obs[:, :n], out["cond"][:, :n]).shape == obs[:, 1:].shape == (6, n, 4, 16 + 3 * proprio)
        plans = {"baseline": a[:, :1].expand(-1, 5, -1), "la": torch.randn(6, 5, 8), "vq": torch.randint(4, (6, 5))}
        assert (cond := m.plan_to_cond(plans[variant])).shape == (6, 5, 8)
        zs, ps = m.rollout(z[:, 0], cond, p[:, 0] if proprio else None)
        assert zs.shape == (6, 5, 4, 16) and (ps.shape == (6, 5, 3) if proprio else ps is None)
    torch.manual_seed(0)
    m, (z, a, p) = WorldModel(tiny_wm(variant, dropout=0.0, mlp_dim=64)), batch(B=8)
    opt, losses = torch.optim.Adam(m.parameters(), lr=1e-2), []
    for _ in range(80):
        losses.append((out := m(z, a, p))["pred_loss"].item())
        opt.zero_grad(), out["loss"].backward(), opt.step()
    assert losses[-1] < losses[0] / 10, (variant, losses[0], losses[-1])
    z, a = torch.randn(5, 4, 4, 16), torch.randn(5, 4, 10)  # (B, H+1, P, D), (B, H+1, A)
    err = evaluate.rollout_mse(m.eval(), z, a)  # (B, H), on the model just fit
    assert err.shape == (5, 3) and torch.allclose(err[:, 0], evaluate.one_step_mse(m, z[:, :2], a[:, :2])[0], atol=1e-5)
    (a2 := a.clone())[:, 2], (z2 := z.clone())[:, 3] = 5.0, z[:, 3] + 1.0  # baseline reads actions, la/vq frames
    assert torch.allclose(evaluate.rollout_mse(m, z2, a2)[:, :2], err[:, :2], atol=1e-5)

def test_predictor_and_idm_are_causal_the_idm_computes_only_its_token_and_rollout_equals_single_steps():
    """Frame-causal predictor and IDM; the IDM's last block as every block in full; rollout = predictor steps."""
    mask = wm.frame_causal_mask(2, 3)  # (T*P, T*P): token i sees token j iff frame(j) <= frame(i)
    assert mask.int().tolist()[1] == [1, 1, 0, 0, 0, 0] and mask[5].all() and not mask[0, 2:].any()
    m, x = WorldModel(tiny_wm("la", num_hist=3, proprio=True, idm_depth=3)).eval(), torch.randn(2, 4, 4, 16 + 3 + 8)
    (y := x.clone())[:, 2] = torch.randn(2, 4, 27)  # change frame 2 only (not by a constant: LayerNorm removes it)
    a, b, u, v = m.predictor(x[:, :3]), m.predictor(y[:, :3]), m.idm(x[..., :16]), m.idm(y[..., :16])
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6) and not torch.allclose(a[:, 2], b[:, 2])
    assert torch.allclose(u[:, :2], v[:, :2], atol=1e-5) and not torch.allclose(u[:, 2], v[:, 2])
    idm, z = m.idm, torch.randn(2, 3, 4, 16)  # (B, T, P, D), 3 blocks
    x = idm.proj(torch.cat([idm.action_prompt.expand(2, 3, 1, -1), z], 2)) + idm.pos
    assert torch.allclose(idm(z), idm.head(torch.nn.Sequential(*idm.blocks)(x)[:, :, 0]), atol=1e-5)  # all tokens
    zs, ps = m.rollout(z0 := torch.randn(2, 4, 16), cond := torch.randn(2, 5, 8), p0 := torch.randn(2, 4))
    frames = [torch.cat([z0, m.embed_proprio(p0)[:, None].expand(-1, 4, -1)], -1)]  # (B, P, 19)
    for h in range(5):
        x = torch.stack([torch.cat([frames[k], cond[:, k, None].expand(-1, 4, -1)], -1)
                         for k in range(max(0, h - 2), h + 1)], 1)  # the last <= 3 frames
        frames.append(m.predictor(x)[:, -1, :, :19])
    want = torch.stack(frames[1:], 1)  # (B, H, P, 19)
    assert torch.allclose(zs, want[..., :16], atol=1e-5) and torch.allclose(ps, want[:, :, 0, 16:], atol=1e-5)

def clustered(seed=0):  # (64, 8) inputs around 4 well-separated centres, rows 0..3 one of each
    return torch.randn(64, 8, generator=(g := gen(seed))) + 3 * torch.randn(4, 8, generator=g).repeat(16, 1)

def test_vq_codebook_init_nearest_code_straight_through_ema_and_dead_codes():
    """First batch: E = m / n = inputs; forward: nearest code, backward: identity; EMA to cluster means; restarts."""
    torch.manual_seed(0)
    vq, x = wm.VectorQuantizer(4, 8, ema_decay=1 - 1e-9, commitment=0.05), clustered()  # ~no EMA step: the init
    q, codes, _ = vq(x)
    assert vq.initialised and all((x - e).abs().sum(1).min() < 1e-6 for e in vq.embedding)  # E = 4 of its inputs
    close(vq.embedding, vq.embedding_avg / vq.cluster_size[:, None]), close(q, vq.embedding[codes])  # E = m / n, n = 1
    vq.decay, E, x = 0.9, vq.embedding.clone(), x.requires_grad_()  # real EMA steps from now; (K, L) E before this one
    q, codes, commit = vq(x)
    assert torch.equal(codes, torch.cdist(x, E).argmin(1)) and torch.allclose(q, E[codes], atol=1e-6)
    close(commit, 0.05 * ((x - q) ** 2).mean())  # beta ||z_e - sg(z_q)||^2
    (q * (w := torch.randn_like(q))).sum().backward()
    assert torch.equal(x.grad, w)  # straight-through: the identity to the encoder output, so it reaches the IDM
    (m := WorldModel(tiny_wm("vq")))(*batch())["loss"].backward()
    assert m.idm.blocks[0].ff[1].weight.grad.abs().sum() > 0 and m.latent_action_down.weight.grad.abs().sum() > 0
    gap = lambda: sum((vq.embedding[k] - x[codes == k].mean(0)).norm() for k in codes.unique())  # noqa: E731
    before = gap()
    for _ in range(20):
        codes = vq(x)[1]
    assert gap() < 0.2 * before
    vq.embedding[3], vq.embedding_avg[3], vq.cluster_size[3] = 1e3, 1e3 * 1e-5, 1e-5  # never selected, s_3 < 1e-3
    vq(x)
    assert (vq.embedding[3] - x).abs().sum(1).min() == 0  # revived as an input of this batch, with n = 1, m = E
    assert vq.cluster_size[3] == 1 and torch.equal(vq.embedding_avg[3], vq.embedding[3])
    vq(x + 100)  # everything now far away; code 3 may or may not be picked, but must not jump back to 1e3
    assert vq.embedding[3].abs().max() < 200

def test_idm_carries_what_the_frame_lacks_and_the_diagnostics_known_answers():
    """Next frame = frame + an offset only the pair reveals: la's error is well below action-free ~1, shuffled worse;
    swap_score ~1 / shuffle_delta > 1 when the conditioning dictates, both 0 when ignored; perplexity, dead codes."""
    g, held_out, a, errors = gen(0), gen(1), torch.zeros(64, 2, 10), {}
    pair = lambda r: torch.stack([z0 := torch.randn(64, 4, 16, generator=r),  # noqa: E731  fresh (64, 2, 4, 16) each
                                  z0 + torch.randn(64, 1, 16, generator=r)], 1)  # step, no memorising: z, z + an offset
    for variant in ("baseline", "la"):  # baseline with all-zero actions = no information about the offset
        torch.manual_seed(0)
        m = WorldModel(tiny_wm(variant, cond_dim=16, latent_dim=16, dim_head=16, mlp_dim=64, idm_dim=32, dropout=0.0))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(300):
            opt.zero_grad(), m(pair(g), a)["loss"].backward(), opt.step()
        errors[variant] = m.eval()(z := pair(held_out), a)["visual_loss"].item()
    assert errors["baseline"] > 0.8 and errors["la"] < 0.6 * errors["baseline"], errors
    assert train.shuffle_delta(m, z, a) > 1.0  # la's predictor relies on the latent
    m, (z, a, p) = WorldModel(tiny_wm("baseline")), batch(B=64)
    a[:, :, 0] = torch.arange(64.0)[:, None]  # the action names its sample; the encoder copies it to cond[..., 0]
    m.action_encoder.load_state_dict({"weight": torch.eye(8, 10), "bias": torch.zeros(8)})  # cond[..., :8] = a[..., :8]
    for shortcut, predict in ((True, lambda obs, cond: z[cond[:, 0, 0].round().long(), 1:]),  # (B, n, P, D): the
                              (False, lambda obs, cond: z[:, 1:] + 0.01)):  # target of cond's sample; or the context's
        m.predict, g = predict, gen(0)  # the shortcut: only fixed points of a permutation fail to win the swap
        swap, shuffled = train.swap_score(m, z, a, p, generator=g), train.shuffle_delta(m, z, a, p, generator=g)
        assert (swap > 0.95 and shuffled > 1) if shortcut else (swap == 0 and abs(shuffled) < 1e-6), (swap, shuffled)
        assert m.training  # the diagnostics restore the mode
    assert train.perplexity(torch.arange(8).repeat(5), 8) == (pytest.approx(8.0), 0)  # uniform usage: PPL = K
    assert train.perplexity(torch.full((40,), 3), 8) == (pytest.approx(1.0), 7)
    assert train.perplexity(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 6) == (pytest.approx(4.0, abs=1e-5), 2)

# ---- train.py (state tokens): the run folder, exact resume, moved data, settings on resume, lock, NaN guard, DDP -----
def kill_at(monkeypatch, n, nan=False):
    """WorldModel.forward: at the n-th training call, a KeyboardInterrupt (a kill), or with nan=True a NaN loss."""
    calls, forward = itertools.count(1), WorldModel.forward  # counts the training calls

    def patched(self, *args):
        if (hit := self.training and next(calls) == n) and not nan:
            raise KeyboardInterrupt
        out = forward(self, *args)
        if hit:
            out["loss"] = out["pred_loss"] = out["pred_loss"] * float("nan")
        return out
    monkeypatch.setattr(WorldModel, "forward", patched)

def test_run_folder_exact_resume_moved_data_old_checkpoints_nan_guard_labels_only(pipe, tmp_path, monkeypatch, drawn):
    """The run folder; old checkpoints refused; killed in step 5, a run resumes from step 3 to the same weights bit for
    bit, no repeated rows; moved with its data, it finds it and resumes (more steps and a runtime flag taken), else
    --data (fingerprint checked, passed on); a NaN loss stops the run and keeps the last good checkpoint; --labels N:
    exactly the N windows of the seeded subset, recorded. In HOSTILE: bad counts, other settings, fewer steps, another
    dataset ("... on a run"), no run, no dataset; a folder in use: the busy-folder test."""
    assert len(set(data.label_subset(50, 7, 3))) == 7 and np.array_equal(data.label_subset(50, -1, 3), np.arange(50))
    train.main(*train_cfgs(pipe.data, tmp_path / "run", "baseline", steps=30, labels=12, eval_every=30))
    assert set(drawn) == set(data.label_subset(pipe.windows, 12, train.TrainConfig.seed).tolist())  # the default seed
    assert len(drawn) >= 30 * 4 and tload(tmp_path / "run" / "ckpt.pt")["stats"]["labels"] == 12
    model, ckpt, _ = wm.load_run(pipe.vq6)  # where it finds its data: moved below
    assert ckpt["step"] == 6 and not model.training and model.quantizer.initialised
    assert (model.cfg.visual_dim, model.cfg.num_patches, model.cfg.tokens) == (12, 1, "state")
    assert set(ckpt["stats"]) >= {"action_mean", "action_std", "proprio_mean", "proprio_std", "latent_mean",
                                  "latent_std"} and len(ckpt["stats"]["latent_mean"]) == 8
    assert jload(pipe.vq6 / "config.json")["model"]["visual_dim"] == 12
    old = shutil.copytree(pipe.vq6, tmp_path / "old")  # a run saved earlier
    torch.save({**ckpt, "format": "old"}, old / "ckpt.pt"), user_error(wm.load_run, old, names=[old / "ckpt.pt"])
    c, mc = train_cfgs(pipe.data, old)
    for warmup, noise in ((0, 0.0), (5, 0.0), (0, 0.5)):  # with settings removed since: resumed if they were off
        torch.save({**ckpt, "train_config": {**ckpt["train_config"], "warmup": warmup},
                    "model_config": {**ckpt["model_config"], "latent_noise": noise}}, old / "ckpt.pt")
        if warmup or noise:
            user_error(train.resume, c, mc, set(), names=["--warmup" if warmup else "--latent-noise", old])
        else:
            assert train.resume(c, mc, set())[2]["step"] == ckpt["step"]
    with monkeypatch.context() as m:
        kill_at(m, 5), pytest.raises(KeyboardInterrupt, train.main, *train_cfgs(pipe.data, tmp_path / "part"))
    assert tload(tmp_path / "part" / "ckpt.pt")["step"] == 3
    resumed = train.main(*train_cfgs(pipe.data, tmp_path / "part")).state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in pipe.vq6_sd.items())
    kinds = [(r["step"], "loss" in r) for r in map(json.loads, open(tmp_path / "part" / "log.jsonl"))]
    assert len(kinds) == len(set(kinds)) >= 5 and max(kinds)[0] == 6  # rows logged after the kill are not repeated
    moved = shutil.copytree(pipe.root, tmp_path / "moved") / "vq6"  # copied elsewhere with its data, layout kept
    assert wm.load_run(moved)[2] == (moved.parent / "data").resolve()  # the relative path wins over the old one
    train.main(*train_cfgs(moved.parent / "data", moved, steps=7, log_every=1))
    ck = tload(moved / "ckpt.pt")
    assert ck["step"] == 7 and ck["train_config"]["log_every"] == 1
    shutil.move(moved.parent / "data", tmp_path / "elsewhere")
    torch.save({**ck, "data": {**ck["data"], "root": str(tmp_path / "gone")}}, moved / "ckpt.pt")
    user_error(wm.load_run, moved, names=["--data"])  # found nowhere: the way out is named
    assert wm.load_run(moved, data_dir=str(tmp_path / "elsewhere"))[2] == (tmp_path / "elsewhere").resolve()
    assert decode.main(tiny_decode(moved, data=str(tmp_path / "elsewhere")))["label_budget"]  # stages pass it on
    kill_at(monkeypatch, 5, nan=True)  # the 5th train step (step 4) goes NaN
    err = pytest.raises(FloatingPointError, train.main, *train_cfgs(pipe.data, tmp_path / "nan", "baseline", 9))
    assert "step 4" in str(err.value) and tload(tmp_path / "nan" / "ckpt.pt")["step"] == 3  # the last good one, kept

def preset_vq():  # an initialised VQ whose codes are one input of each cluster of clustered(5)
    vq = wm.VectorQuantizer(4, 8, ema_decay=0.9, commitment=0.05)
    vq.embedding.copy_(clustered(5)[:4]), vq.embedding_avg.copy_(clustered(5)[:4]), vq.initialised.fill_(True)
    return vq

def ddp_worker(rank, root, tmp, port):
    """Rank `rank` of 2 (gloo): the VQ on its own batches, then 3 steps of train.main; states saved in tmp."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    torch.manual_seed(rank)  # the ranks draw different candidates: only rank 0's may count
    (vq := wm.VectorQuantizer(4, 8, ema_decay=0.9, commitment=0.05))(clustered(rank))  # initialise, one EMA update
    torch.save(vq.state_dict(), f"{tmp}/first{rank}.pt")
    (vq := preset_vq())(clustered(5)[32 * rank:32 * rank + 32])  # half of one batch each
    torch.save(vq.state_dict(), f"{tmp}/ema{rank}.pt")
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.save(train.main(*train_cfgs(root, f"{tmp}/run", steps=3)).state_dict(), f"{tmp}/rank{rank}.pt")

def test_ddp_vq_and_training_agree_across_two_ranks(pipe, tmp_path):
    """Two gloo ranks (spawned: a fork of this threaded process can deadlock): one first-batch codebook, EMA sums over
    ranks, identical replicas after training."""
    with socket.socket() as s:
        port = s.bind(("127.0.0.1", 0)) or s.getsockname()[1]
    mp.start_processes(ddp_worker, args=(str(pipe.data), str(tmp_path), port), nprocs=2, start_method="spawn")
    (ref := preset_vq())(clustered(5))  # one process, the whole batch: DDP's buffer broadcast alone would hide a bug
    for rank, (k, v) in itertools.product((0, 1), ref.state_dict().items()):
        close(tload(tmp_path / f"ema{rank}.pt")[k], v, atol=1e-5, rtol=1e-5, msg=f"rank {rank}: {k}")
    for name in ("first", "rank"):  # the ranks' first-batch codebooks, their replicas after training: the same
        a, b = (tload(tmp_path / f"{name}{rank}.pt") for rank in (0, 1))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["quantizer.initialised"] and tload(tmp_path / "run" / "ckpt.pt")["step"] == 3

# ---- decode.py: decoder shapes, learning a known map, early stopping, the stores, the run's report and codes --------
def fit_linear(seed, n_val, sign, cfg):
    """Fit a fresh ActionDecoder on pairs y = z W (val: sign * z W) -> (val RMSE of the kept weights, history, y)."""
    W = torch.randn(4, 10, generator=(g := gen(seed)))  # (L, A)
    tr, val = ({"p": torch.randn(n, 4, 8, generator=g).half(), "z": (z := torch.randn(n, 4, generator=g)),
                "y": s * z @ W} for n, s in ((4 * n_val, 1.0), (n_val, sign)))  # (N, P, D), (N, L), (N, A)
    torch.manual_seed(0)
    dec, fwd = ActionDecoder(8, 4, 10), lambda net, b: net(b["p"], b["z"])  # decode.main's decoder objective:
    hist = decode.fit(dec, tr, val, cfg, CPU, g, fwd, lambda out, b: F.smooth_l1_loss(out, b["y"]),
                      lambda out, b: (out - b["y"]).pow(2).mean().sqrt())
    return (decode.predict(dec, val, CPU, fwd) - val["y"]).pow(2).mean().sqrt().item(), hist, val["y"]

class Store(torch.Tensor):
    """A tensor that, like a CUDA one, refuses an index on another device (the meta device itself would not)."""

    def __getitem__(self, idx):
        assert idx.device == self.device, f"a {self.device} store indexed with a {idx.device} index"
        return super().__getitem__(idx)

def test_decoder_pooling_learning_early_stopping_and_take_gathers_each_store_where_it_lives():
    torch.manual_seed(0)
    dec, same = ActionDecoder(16, 4, 10), torch.randn(2, 1, 16).expand(2, 7, 16)  # (B, P, D)
    assert dec(torch.randn(3, 7, 16), torch.randn(3, 4)).shape == (3, 10) and hasattr(dec, "d_const")
    assert dec.head[1].in_features == 2 * 128 + 4  # the disabled Delta branch: a learned constant, 128 + 128 + L
    assert torch.allclose(dec.pool(same), same[:, 0], atol=1e-5)  # attention pooling is a convex combination
    rmse, hist, y = fit_linear(0, 256, 1.0, DecodeConfig(run="r", batch_size=64, lr=1e-2, max_epochs=10))
    assert rmse < 0.1 * y.std().item(), hist[-3:]
    rmse, hist, _ = fit_linear(1, 128, -1.0, cfg := DecodeConfig(run="r", batch_size=64, max_epochs=50, patience=3))
    best = min(hist, key=lambda h: h["val"])  # val targets are the negated train targets: fitting makes val worse
    assert len(hist) == best["epoch"] + cfg.patience < cfg.max_epochs
    assert abs(rmse - best["val"]) < 1e-5 and rmse < hist[-1]["val"]
    host = {k: torch.randn(5, *s) for k, s in (("p", (1, 12)), ("z", (8,)), ("y", (10,)))}
    pairs = {k: torch.Tensor._make_subclass(Store, v.to("meta") if k == "p" else v) for k, v in host.items()}
    b = decode.take(pairs, idx := torch.tensor([3, 0]), torch.device("meta"))  # a CPU index, as fit's randperm
    assert {t.device.type for t in b.values()} == {"meta"} and b["p"].shape == (2, 1, 12)
    assert all(torch.equal(v, host[k][idx]) for k, v in decode.take(host, idx, CPU).items())

def test_decode_reports_accuracy_and_what_each_vq_code_does_with_heads_tied_to_their_run(pipe, tmp_path):
    """decode.json, codes.png and its layout (vq only); heads tied to their checkpoint; vq's pairs carry codes;
    a changed dataset, a stale adapter or --via without one: refused, nothing written (a bad route: HOSTILE's)."""
    report, run, root, before = pipe.reports["vq"], pipe.root / "vq", pipe.root, tree(pipe.root)
    assert (report["tokens"], report["variant"], report["label_budget"]["train_pairs"]) == ("state", "vq", 64)
    assert jload(run / "decode.json")["val_rmse_px"] == pytest.approx(report["val_rmse_px"])
    assert [c["code"] for c in report["codes"]] == [0, 1, 2, 3] and sum(c["usage"] for c in report["codes"]) == 16
    assert len(report["r2_per_dim"]) == 10 and np.array(report["codes"][0]["mean_action_px"]).shape == (5, 2)
    assert cv2.imread(str(run / "codes.png")).shape[0] > 100  # None if unreadable: fails too
    assert "codes" not in pipe.reports["la"] and not (root / "la" / "codes.png").exists()
    assert pipe.reports["baseline"] is None and not {"decode.json", "decoder.pt"} & set(tree(root / "baseline"))
    (steps := np.zeros((10, 5, 2)))[3, :, 0] = 10.0  # (K, F, 2): code 3 pushes right by 50 px in total
    img = decode.draw_codes(steps, np.array([5, 0, 1, 9, 0, 0, 2, 0, 0, 1]), "test", cols=4, cell=100)
    assert img.shape == (60 + 3 * 100, 400, 3) and img.dtype == np.uint8
    cell3 = img[60:160, 300:400]  # code 3: row 0, column 3; its arrow is drawn in colour (B > R)
    assert ((cell3[..., 0].astype(int) - cell3[..., 2]) > 100).sum() > 20
    (model, ckpt, data_root), saved = wm.load_run(run), tload(run / "decoder.pt")
    (ref := ActionDecoder(**saved["config"]["arch"])).load_state_dict(saved["model"])
    p, z = torch.randn(2, 1, 12), torch.randn(2, 8)  # (B, P, D), (B, L)
    assert torch.allclose(decode.load_head(run, ckpt, CPU)[0](p, z), ref.eval()(p, z))  # the saved weights
    for head in ("decoder", "adapter"):  # fitted for another checkpoint
        user_error(decode.load_head, run, {**ckpt, "ckpt_id": "new"}, CPU, head, names=[f"{head}.pt", "decode.py"])
    old, mc, arch = shutil.copytree(run, tmp_path / "old"), ckpt["model_config"], saved["config"]["arch"]
    torch.save({**ckpt, "model_config": {**mc, "jepa_reg": "sigreg", "jepa_std": 18.0}}, old / "ckpt.pt")  # saved by
    torch.save({**saved, "config": {"arch": {**arch, "use_delta": False}}}, old / "decoder.pt")  # an earlier version:
    assert wm.load_run(old)[0].cfg == model.cfg and decode.load_head(old, ckpt, CPU)  # options removed since, off: load
    torch.save({**ckpt, "model_config": {**mc, "jepa_reg": "vcreg"}}, old / "ckpt.pt")  # ... on: refused
    torch.save({**saved, "config": {"arch": {**arch, "use_delta": True}}}, old / "decoder.pt")
    user_error(wm.load_run, old, names=[old, "VCReg"])
    user_error(decode.load_head, old, ckpt, CPU, names=["decoder.pt", "--use-delta"])
    shutil.rmtree(old)
    ds, E = dino.windows(model.cfg, data_root, "val", 2), model.quantizer.embedding  # (K, L)
    pairs, part = (decode.build_pairs(model, ds, 16, dino.make_input(model.cfg, CPU), tiny_decode(run),
                                      contextlib.nullcontext(), CPU, gen(0), CPU, n) for n in (0, 6))  # n unlabelled
    close(pairs["z"], E[pairs["codes"]])  # straight-through: z_e + (z_q - z_e) = z_q, what planning feeds
    aeq(part["y"][:10], pairs["y"][:10]), aeq(part["dp"], pairs["dp"]), aeq(part["y"][10:].isnan(), True)
    out = decode.load_head(run, ckpt, CPU, "adapter")[0](pairs["p"].float(), pairs["y"])  # (N, L)
    assert torch.equal(out, E[(out[:, None] - E).abs().sum(-1).argmin(1)])  # the adapter's output is a code
    r, bare = tmp_path / "r", tmp_path / "la"  # a checkpoint whose dataset changed since training
    torch.save({**ckpt, "data": {**ckpt["data"], "relative": "gone", "fingerprint": "0" * 16}}, written(r / "ckpt.pt"))
    user_error(decode.main, tiny_decode(r), names=["--data"])
    ckpt = tload(shutil.copy(root / "la" / "ckpt.pt", written(bare / "ckpt.pt")))
    user_error(plan.main, tiny_plan(bare, tmp_path / "r.json", via="adapter"), names=["adapter.pt", "decode.py"])
    assert tree(root) == before and tree(tmp_path) == ["la", "la/ckpt.pt", "r", "r/ckpt.pt"]
    report = decode.main(tiny_decode(bare, head="adapter", ensemble=3, unlabelled=-1))  # + every other train window
    assert len(report["members_val"]) == 3 and report["labels"] == 64 + 16 == report["label_budget"]["labels"]
    assert report["label_budget"]["unlabelled"] == pipe.windows - 64 and math.isfinite(report["inverse_val_rmse"])
    head, (p, y) = decode.load_head(bare, ckpt, CPU, "adapter")[0], (torch.randn(5, 1, 12), torch.randn(5, 10))
    q = (p - head.token_mean) / head.token_std  # the tokens standardised with the fitting pairs' statistics
    members = torch.stack([net(q, y) for net in head.nets])  # (3, N, L) z-scored
    close(head(p, y), head.mean + head.std * members.mean(0))
    assert (head.token_std != 1).all() and not torch.allclose(head.nets[0](2 * q, y), members[0])  # no LayerNorm
    assert not torch.equal(members[0], members[1])  # each net: its own init and order
    saved = tload(bare / "adapter.pt")  # one of an earlier version, whose nets layer-normed the tokens
    del saved["model"]["token_mean"], saved["model"]["token_std"]
    torch.save(saved, bare / "adapter.pt")
    user_error(decode.load_head, bare, ckpt, CPU, "adapter", names=["adapter.pt", "refit"])

# ---- plan.py: planners on known costs and their update rules, batched = separate, rollout_cost, tasks, end to end ----
def quadratic(target):  # cost_fn of a quadratic bowl centred on target (E, H, A): samples (E, N, H, A) -> (E, N)
    return lambda x: (x - target[:, None]).square().sum((-1, -2))

def table_cost(table):  # cost_fn of a separable table (E, H, K): samples (E, N, H) -> sum_h table[e, h, idx_h] (E, N)
    return lambda idx: torch.gather(table[:, None].expand(-1, idx.shape[1], -1, -1), 3, idx[..., None])[..., 0].sum(-1)

def test_planners_on_known_costs_their_update_rules_batched_equals_separate_and_rollout_cost():
    """Gaussian CEM: the minimum, the mean as sample 0. Categorical CEM over 16^4 sequences: the argmin; elites all
    code 0 (K = 4): pi_MLE = (31, 1, 1, 1) / 34 (pseudocount 1), pi = 0.7/4 + 0.3 pi_MLE (momentum on the OLD pi),
    code 0 drawn with pi_0^(2/3) / sum pi^(2/3) = 0.3767, the last 10 % uniform; the best sample ever returned.
    Per-episode generators: E episodes in one call = E calls; rollout_cost over E*N plans = each plan alone."""
    target, mu0, seen = torch.randn(3, 3, 2, generator=gen(0)) * 2, torch.randn(3, 3, 2, generator=gen(2)), []
    mu = plan.cem_gaussian(lambda x: seen.append(x.clone()) or quadratic(target)(x), mu0, torch.full((3, 3, 2), 3.0),
                           num_samples=100, topk=10, opt_steps=15, generator=gen(1))  # (E, H, A) each
    assert (mu - target).abs().max() < 0.01 and torch.equal(seen[0][:, 0], mu0) and not torch.equal(seen[0][:, 1], mu0)
    E, H, A, K = 3, 4, 2, 8
    target, table = torch.randn(E, H, A, generator=gen(0)), torch.rand(E, H, K, generator=gen(0))

    def solve(name, sl, seeds):
        kw = dict(num_samples=32, topk=4, opt_steps=3, generator=[gen(s) for s in seeds])
        if name == "cem_categorical":
            return plan.cem_categorical(table_cost(table[sl]), len(seeds), H, K, **kw)
        return plan.cem_gaussian(quadratic(target[sl]), torch.zeros_like(target[sl]), torch.ones_like(target[sl]), **kw)
    for name in ("cem_gaussian", "cem_categorical"):
        batched = solve(name, slice(0, E), [10, 11, 12])
        assert torch.equal(batched, torch.cat([solve(name, slice(e, e + 1), [10 + e]) for e in range(E)])), name
        assert not torch.equal(batched, solve(name, slice(0, E), [20, 21, 22])), name  # the noise matters
    table = torch.rand(3, 4, 16, generator=gen(0))  # (E, H, K): K^H = 65536 sequences, 10 x 300 samples per episode
    idx = plan.cem_categorical(table_cost(table), 3, 4, 16, num_samples=300, topk=30, opt_steps=10, generator=gen(1))
    assert idx.dtype == torch.long and idx.shape == (3, 4) and torch.equal(idx, table.argmin(-1))
    seen, N = [], 50_000
    cost = lambda idx: seen.append(idx[0, :, 0]) or (idx[..., 0] != 0).float()  # noqa: E731  code 0 is cheapest
    plan.cem_categorical(cost, 1, 1, 4, num_samples=N, topk=30, opt_steps=2, generator=gen(0))
    pi = 0.7 / 4 + 0.3 * torch.tensor([31.0, 1, 1, 1]) / 34
    q0 = (pi[0] ** (1 / 1.5) / (pi ** (1 / 1.5)).sum()).item()
    assert abs((seen[1][: N - N // 10] == 0).float().mean().item() - q0) < 0.01  # the model's part
    assert abs((seen[1][N - N // 10:] == 0).float().mean().item() - 0.25) < 0.02  # the uniform part
    calls = []

    def cost(idx):  # (E, N, H) -> (E, N): random costs in [0, 1) on the first call, [10, 11) afterwards
        calls.append((idx, c := torch.rand(idx.shape[:2], generator=gen(len(calls))) + 10 * bool(calls)))
        return c
    best = plan.cem_categorical(cost, 2, 3, 8, num_samples=50, topk=5, opt_steps=4, generator=gen(0))
    assert torch.equal(best, calls[0][0][torch.arange(2), calls[0][1].argmin(1)])
    torch.manual_seed(0)
    model = WorldModel(tiny_wm(visual_dim=8, cond_dim=4, proprio=True, depth=1, dim_head=4, mlp_dim=8)).eval()
    E, N, H = 2, 3, 4
    z0, zg, p0 = torch.randn(E, 4, 8), torch.randn(E, 4, 8), torch.randn(E, 4)  # (E, P, D), (E, P, D), (E, 4)
    pg, plans = torch.randn(E, 3), torch.randn(E, N, H, 10)  # (E, proprio_dim), (E, N, H, A)
    with torch.no_grad():
        cost = plan.rollout_cost(model, z0, zg, plans, p0, pg, alpha=0.5)  # (E, N)
        for e, n in itertools.product(range(E), range(N)):
            zs, ps = model.rollout(z0[e:e + 1], model.plan_to_cond(plans[e, n:n + 1]), p0[e:e + 1])
            err = (zs[0, -1] - zg[e]).square().mean() + 0.5 * (ps[0, -1] - pg[e]).square().mean()
            assert torch.allclose(cost[e, n], err, atol=1e-5)

def test_tasks_replay_to_the_goal_batch_free_evaluate_results_json_and_the_ceiling_cache(pipe, tmp_path, monkeypatch):
    """Reproducible tasks whose replay succeeds (videos drawn); batch-size-free evaluate; the ceiling's model start;
    RESULTS.json of every plan in PLANS; the ceiling cached beside the results, shared, solved again if damaged."""
    tasks, rng = plan.make_tasks(pipe.data, "val", "open-loop", 5, 0, 28), np.random.default_rng(0)
    acts = np.where(rng.random((5, 1, 1)) < 0.5, tasks["actions"], rng.normal(0, 20, (5, 25, 2)))  # some succeed
    r2, r5 = (plan.evaluate(tasks, lambda idx: lambda s, idx=idx: acts[idx], E, 25, False, 28, tmp_path / f"{E}.json",
                            videos=1) for E in (2, 5))
    assert r2["successes"] == r5["successes"] and 0 < sum(r2["successes"]) < 5 and r2["solves"] == r5["solves"] == 5
    aeq(r2["final"], r5["final"]), aeq(tree(tmp_path), ["2_ep000.mp4", "5_ep000.mp4"])  # one per episode
    d = data.load_split(pipe.data, "val")
    for protocol in ("open-loop", "mpc"):
        a, b = (plan.make_tasks(pipe.data, "val", protocol, 6, 0, 28) for _ in range(2))
        assert all(np.array_equal(a[k], b[k]) for k in ("episode", "step", "start_state", "goal_state", "goal_frame"))
        assert not np.array_equal(a["step"], plan.make_tasks(pipe.data, "val", protocol, 6, 1, 28)["step"])
        g = d["starts"][a["episode"]] + a["step"]  # (n,) global start frames
        assert (a["step"] <= d["lengths"][a["episode"]] - 26).all() and np.array_equal(a["start_state"], d["states"][g])
        assert protocol == "open-loop" or len(set(zip(a["episode"], a["step"]))) == 6 and np.array_equal(
            a["goal_state"], d["states"][g + 25])  # mpc: rows without replacement, goal = the state 25 steps later
        ok, _, best, clips, _ = plan.run_policy(a, np.arange(6), lambda s: a["actions"], 25, protocol == "mpc", 28, [0])
        frames, hits = clips[0]
        assert ok.all() and (best < 20).all() and len(frames) == len(hits) == 26 and hits[-1] and not hits[0]
        plan.write_video(video := tmp_path / f"{protocol}.mp4", frames, hits, a["goal_frame"][0])
        video = cv2.VideoCapture(str(video))
        assert video.read()[1].shape == (256, 512, 3) and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 26
        assert not plan.run_policy(a, np.arange(6), lambda s: np.zeros((6, 25, 2)), 25, False, 28)[0].all()
    (env := PushT()).place(d["states"][t := d["starts"][0] + 3])  # mid-episode: the agent moves; placed once ...
    start, acts = env.get_state(), d["actions"][t:t + 10]  # (7,), (10, 2)
    rollout(env, acts)  # ... the model replays the actions from the state the env reports, to exactly the env's
    assert np.abs(start[5:]).max() > 1 and plan.sim_costs(start, env.get_state(), acts[None]).item() == 0
    for name, path in pipe.planned.items():
        (variant, protocol), r = name.split("-", 1), jload(path)
        assert {"config", "mean_final_pos_dist"} <= set(r), name  # every other key of RESULTS.json is read below
        via = PLANS[name].get("via", "actions" if variant == "baseline" else "decoder")
        planner = "cem_categorical" if (variant, via) == ("vq", "decoder") else "cem_gaussian"
        assert (r["variant"], r["protocol"], r["via"], r["planner"]) == (variant, protocol, via, planner)
        assert r["tokens"] == "state" and r["run"] == str(pipe.root / variant)
        assert r["labels"] == (pipe.windows if variant == "baseline" else 80)  # every train window, or 64 + 16 pairs
        assert r["episodes"] == len(r["successes"]) == len(r["tasks"]["start_state"]) == 3
        assert set(r["successes"]) <= {0, 1} and r["seconds_per_solve"] > 0
        assert r["success_rate"] == sum(r["successes"]) / 3 and r["ci95"][0] <= r["success_rate"] <= r["ci95"][1]
        ref = r["reference"]  # on the same tasks; the ceiling says on how many
        assert ref["replay"] == 1.0 and 0 <= ref["random"] <= 1 and 0 <= ref["ceiling"] <= 1
        assert ref["ceiling_episodes"] == 2 and len(ref["ceiling_successes"]) == 2
        assert path.with_name(f"{name}_ep000.mp4").stat().st_size > 0
        assert not path.with_name(f"{name}_ep001.mp4").exists()  # --videos 1
    results = pipe.root / "results"
    assert len(list(results.glob("ceiling/ceiling-*.json"))) == 2  # one per protocol budget
    ceil = [jload(pipe.planned[n])["reference"] for n in ("baseline-open-loop", "vq-open-loop")]
    assert ceil[0]["ceiling"] == ceil[1]["ceiling"] and ceil[0]["ceiling_successes"] == ceil[1]["ceiling_successes"]
    monkeypatch.setattr(plan.multiprocessing, "Pool", lambda *a: pytest.fail("the ceiling was solved again"))
    again = plan.main(tiny_plan(pipe.root / "baseline", results / "again.json", videos=0))
    assert again["reference"]["ceiling"] == ceil[0]["ceiling"]
    monkeypatch.undo()  # a damaged cache is solved again, not a traceback
    for c in (cache := sorted(results.glob("ceiling/ceiling-*.json"))):
        c.write_text('{"ceiling": ')
    again = plan.main(tiny_plan(pipe.root / "baseline", results / "again.json", videos=0))
    assert again["reference"]["ceiling"] == ceil[0]["ceiling"] and jload(cache[0])

# ---- eval.py: metric known answers, METRICS.json side by side, the success tables, the plots, bad input -------------
def test_eval_metrics_side_by_side_and_success_tables_from_floor_to_ceiling_and_against_labels(pipe, tmp_path, capsys):
    """METRICS.json, table, rollout plot; mixed datasets, no decoder: warned; success tables, random to replay; a label
    sweep's table and PNG (bad results files: HOSTILE); summarize, Wilson and the linear probe: known answers."""
    s, (lo, hi), g = evaluate.summarize([1.0, 2.0, 3.0, 4.0]), plan.wilson(50, 100), gen(0)
    assert s["mean"] == 2.5 and s["n"] == 4 and s["std"] == pytest.approx(1.2910, abs=1e-4)
    assert s["ci95"] == pytest.approx([2.5 - 1.96 * 1.2910 / 2, 2.5 + 1.96 * 1.2910 / 2], abs=1e-4)
    assert plan.wilson(0, 10)[0] == 0 and 0.2 < plan.wilson(0, 10)[1] < 0.35 and 0.39 < lo < 0.41 and 0.59 < hi < 0.61
    W, b = torch.randn(6, 10, generator=g), torch.randn(10, generator=g)  # (C, A), (A,)
    x_fit, x = torch.randn(400, 6, generator=g), torch.randn(200, 6, generator=g)  # (N, C)
    exact = evaluate.linear_probe(x_fit, x_fit @ W + b, x, x @ W + b, g)
    assert exact["mean"] > 0.999 and exact["n"] == 200 and exact["n_fit"] == 400 and len(exact["per_dim"]) == 10
    noise = evaluate.linear_probe(x_fit, torch.randn(400, 10, generator=g), x, torch.randn(200, 10, generator=g), g)
    assert noise["mean"] < 0.05 and noise["ci95"][0] < noise["mean"] < noise["ci95"][1]
    metrics, _ = evaluate.main(tiny_eval(tmp_path / "metrics.json", run=[str(pipe.root / v) for v in VARIANTS]))
    saved = jload(tmp_path / "metrics.json")
    assert list(saved) == list(VARIANTS) and saved == json.loads(json.dumps(metrics))
    for m in saved.values():
        assert m["rollout_mse"] == m["rollout_curve"][-1]["mean"] and m["latent_mse_stats"]["n"] == 12
        assert m["tokens"] == "state" and len(m["rollout_curve"]) == 2
    assert {"swap_score", "shuffle_delta", "perplexity", "dead_codes", "probe_r2"} <= set(saved["vq"])
    assert "swap_score" not in saved["baseline"] and 0 <= saved["vq"]["dead_codes"] <= 4
    assert saved["la"]["decoder"]["train_pairs"] == saved["vq"]["decoder"]["train_pairs"] == 64
    out = capsys.readouterr().out
    assert "| metric | baseline | la | vq |" in out and "px (80 labels)" in out
    assert cv2.imread(str(tmp_path / "metrics_rollout.png")).shape == (500, 760, 3)
    fp = data.load_meta(d2 := write_dataset(tmp_path / "data2", [31] * 6, 28))["fingerprint"]  # another dataset ...
    torch.save({**tload(pipe.root / "vq" / "ckpt.pt"), "data": {"root": str(d2), "relative": "../data2",
                "fingerprint": fp}}, written(tmp_path / "vq2" / "ckpt.pt"))  # ... and a vq run on it, without decoder
    evaluate.main(tiny_eval(tmp_path / "m.json", run=[str(pipe.root / "baseline"), str(tmp_path / "vq2")]))
    out = capsys.readouterr().out
    assert "trained on different datasets" in out and "missing or stale: run decode.py" in out
    evaluate.main(evaluate.EvalConfig(results=[str(p) for p in pipe.planned.values()], out=str(tmp_path / "s.json")))
    out, table, r = capsys.readouterr().out, jload(tmp_path / "s_success.json"), jload(pipe.planned["vq-open-loop"])
    assert "| protocol | random | baseline | la | vq | vq + adapter | ceiling | replay |" in out
    assert "against labelled transitions" not in out and not (tmp_path / "s_labels.png").exists()  # no sweep here
    assert [*table] == ["open-loop", "mpc"] and {*table["mpc"]} == {"random", "la", "vq + adapter", "ceiling", "replay"}
    assert table["open-loop"]["vq"][0]["k"] == sum(r["successes"]) and table["open-loop"]["vq"][0]["n"] == 3
    assert table["open-loop"]["ceiling"][0]["n"] == 2 and table["open-loop"]["replay"][0]["rate"] == 1.0
    assert not (tmp_path / "s.json").exists()  # no run given: no metrics
    sweep = [str(pipe.planned["vq-open-loop"])] + [str(written(tmp_path / "sweep" / f"b{n}.json", json.dumps(
        {**jload(pipe.planned["baseline-open-loop"]), "labels": n, "successes": [1] * k + [0] * (3 - k)})))
        for n, k in ((20, 0), (130, 1), (pipe.windows, 3))]  # one method at several label counts, up to all windows
    evaluate.main(evaluate.EvalConfig(results=sweep, out=str(tmp_path / "sweep" / "m.json")))
    out = capsys.readouterr().out  # one row per method, one column per count, its fraction of the dataset's windows
    assert pipe.windows == 260 and "| method | 20 (7.7%) | 80 (30.8%) | 130 (50.0%) | 260 (all) |" in out
    assert "| baseline | 0.00 [0.00, 0.56] | – | 0.33 [0.06, 0.79] | 1.00 [0.44, 1.00] |" in out
    assert "| vq + decoder | – | " in out and cv2.imread(str(tmp_path / "sweep/m_labels.png")).shape == (500, 760, 3)

# ---- plumbing every stage shares: flags, configs, resume merge, locks, disk, atomic writes, hostile input ------------
def test_flags_and_help_come_from_config_fields_configs_are_checked_like_flags_merged_on_resume(monkeypatch, capsys):
    """Flags = config fields (given = what was typed, lists the config's own); --help shows defaults; configs checked;
    on resume, untyped fields are the run's, typed ones must match (HOSTILE) unless runtime."""
    cfg, mc, given = data.parse_config(train.TrainConfig, WMConfig, argv=[
        "--variant", "vq", "--no-compile", "--steps", "7", "--dino-weights", "random", "--tokens", "state"])
    assert (mc.variant, mc.tokens, cfg.compile, cfg.steps, cfg.dino_weights) == ("vq", "state", False, 7, "random")
    assert given == {"variant", "compile", "steps", "dino_weights", "tokens"}  # only what was typed
    ev, _ = data.parse_config(evaluate.EvalConfig, argv=["--run", "a", "--run", "b", "c", "--windows", "8"])
    assert ev.run == ["a", "b", "c"] and ev.windows == 8
    ev.run.append("d")  # the parsed list is the config's own, not a shared default
    assert data.parse_config(evaluate.EvalConfig, argv=["--results", "r.json"])[0].run == []
    for make, flag in ((lambda: WMConfig(variant="nope"), "--variant"), (lambda: WMConfig(dino_size=30), "--dino-size"),
                       (lambda: WMConfig(variant="la", latent_dim=16), "--latent-dim"), (DecodeConfig, "--run"),
                       (lambda: train.TrainConfig(steps=0), "--steps"), (evaluate.EvalConfig, "--run"),
                       (lambda: plan.PlanConfig(run="r", topk=400), "--topk"),
                       (lambda: data.CollectConfig(out="x", episodes=1), "--episodes")):
        user_error(make, names=[flag])
    stored, rt = dataclasses.asdict(train.TrainConfig(lr_predictor=1e-3, steps=5)), train.RUNTIME
    for given, steps in ((set(), 5), ({"steps"}, 9), (None, 9)):  # untyped: the run's own; typed runtime fields win;
        merged, = data.merge_resume("run", given, (train.TrainConfig(steps=9), stored, rt))  # None (built in code):
        assert merged.steps == steps and merged.lr_predictor == 1e-3  # non-default fields count as given
    monkeypatch.setenv("COLUMNS", "1000"), capsys.readouterr()  # no line wrapping
    for argv, classes in (("train.py", (train.TrainConfig, WMConfig)), ("decode.py", (DecodeConfig,)),
                          ("plan.py", (plan.PlanConfig,)), ("eval.py", (evaluate.EvalConfig,)),
                          ("data.py collect", (data.CollectConfig,)), ("dino.py encode", (dino.EncodeConfig,))):
        with pytest.raises(SystemExit) as exit_:
            run_script(monkeypatch, *argv.split(), "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert exit_.value.code == 0
        for f in (f for cls in classes for f in dataclasses.fields(cls) if not f.metadata.get("derived")):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert data.flag(f.name) in text and f"(default: {default!r})" in text, (argv, f.name)

def test_no_room_or_a_busy_folder_is_refused_before_any_work_and_writes_are_atomic(pipe, tmp_path, monkeypatch):
    """A dataset, run or policy folder in use is refused, freed at exit; a full disk stops collect, train and plan
    (nothing written); a file as run folder kept; atomic writes past planted links and a crash; errors name the file."""
    root, before = pipe.root, tree(pipe.root)  # held as a collect of t/d, a policy and a train run in other processes:
    with data.locked(tmp_path, ".d.lock"), data.locked(tmp_path / "p"), data.locked(tmp_path / "busy"):
        user_error(collect, tmp_path / "d", episodes=4, steps=10, names=["another process", tmp_path / "d"])
        user_error(policy.train, tiny_policy(root / "data", tmp_path / "p"), names=[tmp_path / "p", "in use"])
        user_error(train.main, *train_cfgs(root / "data", tmp_path / "busy"), names=[tmp_path / "busy"])
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 12, 10 ** 12, 10 ** 7))
    user_error(collect, tmp_path / "d", episodes=4, steps=10, names=["disk"])
    user_error(train.main, *train_cfgs(root / "data", tmp_path / "busy", "baseline"), names=["disk"])  # busy: freed
    user_error(plan.main, tiny_plan(root / "baseline", tmp_path / "r.json"), names=["disk", "--out"])
    assert tree(root) == before and tree(tmp_path) == [".d.lock", "busy", "busy/.lock", "p", "p/.lock"]  # ours only
    user_error(data.locked(file := written(tmp_path / "file", "notes")).__enter__, names=["--out", file])
    assert file.read_text() == "notes"

    def crash(tmp):
        tmp.write_text('{"x": ')
        raise OSError("killed")
    data.atomic_write(path := tmp_path / "w" / "a.json", {"x": 1})
    pytest.raises(OSError, data.atomic_write, path, crash)
    assert jload(path) == {"x": 1} and tree(tmp_path / "w") == ["a.json"]  # the old file, whole
    for name in ("a.tmp.json", ".a.tmp.json"):  # links planted where a fixed temp name would be
        (tmp_path / "w" / name).symlink_to(written(tmp_path / "w" / "target", "mine"))
    data.atomic_write(path, {"x": 2})
    assert (tmp_path / "w" / "target").read_text() == "mine" and jload(path) == {"x": 2}
    user_error(data.writable, tmp_path, "--out", names=["--out", tmp_path])  # a folder, not a file
    data.writable(tmp_path / "new" / "deeper" / "r.json", "--out")  # missing folders are made later: fine
    user_error(data.load_pt, x := tmp_path / "x.pt", "rebuild it", names=[x, "rebuild it"])  # missing, truncated
    x.write_bytes(b"PK\x03\x04 truncated"), user_error(data.load_pt, x, "rebuild it", names=[x, "rebuild it"])

def edited_data(edit):  # a setup: the shared dataset copied to t/data, then changed by edit(folder)
    return lambda t, r: edit(shutil.copytree(r / "data", t / "data"))

def edit_val(split_file, change):  # an edit: np.save(d/val/split_file, change(its array))
    return lambda d: np.save(d / "val" / split_file, change(np.load(d / "val" / split_file)))

def frames_cut_short(d):  # an edit: a train/frames.npy that a full disk cut short
    np.save(f := d / "train" / "frames.npy", np.zeros((len(np.load(d / "train" / "states.npy")), 28, 28, 3), np.uint8))
    os.truncate(f, 1000)

RESULTS = dict(success_rate=0.0, successes=[0], episodes=1, protocol="open-loop", planner="cem_gaussian",
               variant="baseline", via="actions", labels=1, reference={"random": 0.0, "replay": 1.0})  # a valid one
TRAIN = "train.py --variant baseline --tokens state --steps 1 --device cpu"
ON_COPY = TRAIN + " --data {t}/data --out {t}/run"  # training on t/data: the shared dataset, as edited_data changed it
ON_DATA = TRAIN + " --data {r}/data --out {t}/run"  # training on the shared dataset
PLAN = "plan.py --episodes 1 --ceiling-episodes 0 --videos 0 --device cpu"
EVAL = "eval.py --results {t}/r.json --out {t}/m.json --device cpu"
ONE_FLAG = {  # command: bad flags HOSTILE gives it one at a time, each refused in one line naming that flag
    TRAIN + " --data {r}/data": "--out '', --out {r}/data",
    ON_DATA: "--seed -1, --frames -3, --lr-predictor inf, --steps 1e3, --jepa-dim 32, --labels 0, --labels 261, "
             "--batch-size 100000, --variant nope, --visual-dim 12",  # a choice outside the Literal; a derived field
    ON_DATA.replace("baseline", "la"): "--labels 10",  # above: a jepa flag on state tokens; 261 = 260 windows + 1
    "train.py --tokens dinov2 --data {r}/data --out {t}/run": "--dino-size 0",
    PLAN + " --run {r}/baseline": "--out {r}/baseline/ckpt.pt, --out {r}/data/meta.json",  # over a checkpoint, data
    PLAN + " --run {r}/baseline --out {t}/r.json": f"--seed {2 ** 40}, --var-scale inf, --pseudocount 0.1, "
                                                   "--via adapter",  # a pseudocount of codes; it has no adapter
    PLAN + " --run {r}/vq --out {t}/r.json": "--la-prior standard, --via actions",  # vq and la plan latents
    "data.py collect --out {t}/c": "--img-size 100000, --episodes 1, --seed -1, --workers 100000",
    "data.py figure": "--out {r}/baseline/ckpt.pt",
    "dino.py encode --data {t}/c": "--size 30, --size 0",
    "eval.py --run {r}/baseline --device cpu": "--out {r}/data/meta.json",
    "eval.py --run {r}/baseline --out {t}/m.json": "--gap-tasks -1, --plot {r}/baseline/ckpt.pt",
    "decode.py --run {r}/la --device cpu": "--ensemble 2, --unlabelled 5",  # adapter flags, not the decoder's
    "decode.py --run {r}/la --head adapter --device cpu": "--unlabelled -2",
    "policy.py train --data {r}/data --steps 1 --out {t}/p": "--batch-size 100000"}
HOSTILE = {  # name: (command line in t = a temp folder, r = the shared pipeline's root; what the one error line names;
    # a setup(t, r) run first). Each must exit 2 with that one line, no traceback, every file and folder kept.
    "plan-ceiling-cache-a-users-file": (PLAN + " --run {r}/baseline --out {t}/r.json --ceiling-episodes 1", ["--out"],
                                        lambda t, r: written(t / "ceiling", "notes")),
    "train-data-missing": (TRAIN + " --data {t}/no-data --out {t}/run", ["{t}/no-data"]),
    "train-out-a-users-folder": (TRAIN + " --data {r}/data --out {t}/mine", ["--out"],
                                 lambda t, r: written(t / "mine" / "config.json")),
    "policy-out-a-users-folder": ("policy.py train --data {r}/data --steps 1 --out {t}/mine", ["--out"],
                                  lambda t, r: written(t / "mine" / "notes.txt")),
    "policy-out-holds-another-format": ("policy.py train --data {r}/data --steps 1 --out {t}/p", ["{t}/p/policy.pt"],
                                        lambda t, r: torch.save({"format": "old"}, written(t / "p" / ".lock", "")
                                                                .with_name("policy.pt"))),  # of an earlier policy.py
    "meta-missing-a-key": (ON_COPY, ["meta.json"], edited_data(lambda d: written(
        d / "meta.json", json.dumps({**jload(d / "meta.json"), "action_std": None})))),
    "meta-not-an-object": (ON_COPY, ["meta.json"], edited_data(lambda d: written(d / "meta.json", "[1, 2]"))),
    "states-not-finite": (ON_COPY, ["states.npy"], edited_data(edit_val(  # one NaN, at [3, 2] of (F, 7)
        "states.npy", lambda s: np.put(s, 3 * 7 + 2, np.nan) or s))),
    "arrays-changed-under-meta": (PLAN + " --run {r}/baseline --out {t}/r.json --data {t}/data", ["fingerprint"],
                                  edited_data(edit_val("states.npy", lambda s: s + 1.0))),  # an old meta.json
    **{f"results-{k}": (EVAL, ["--results", "{t}/r.json"], lambda t, r, v=v: written(t / "r.json", v))
       for k, v in (("random-missing", json.dumps({**RESULTS, "reference": {"replay": 1.0}})),
                    ("only-a-rate", '{"success_rate": 0.5}'), ("not-json", "{not json"),
                    ("protocol-a-list", json.dumps({**RESULTS, "protocol": ["x"]})))},
    "config-json-corrupt": (TRAIN + " --data {r}/data --out {t}/mine", ["config.json"],
                            lambda t, r: written(t / "mine" / "config.json", "{oops")),
    "head-adapter-on-a-baseline": ("decode.py --run {r}/baseline --head adapter --device cpu",
                                   ["--head adapter", "baseline"]),
    **{f"train.py {arg} on a run": ("train.py --data {r}/data --out {r}/vq6 " + arg, [arg.split()[0], "{r}/vq6"])
       for arg in ("--lr-predictor 5e-5", "--steps 2", "--num-codes 8", "--variant la")},  # 5e-5: typed at its default
    **{f"{cmd.split()[0]} --data on a run": (cmd + " --data {t}/other", ["--data", "{t}/other"],  # another dataset
                                             lambda t, r: write_dataset(t / "other", [12, 9, 15]))
       for cmd in ("train.py --out {r}/vq6", "decode.py --run {r}/vq6 --device cpu")},
    "decode-without-a-run": ("decode.py --run {t}/norun --device cpu", ["{t}/norun/ckpt.pt", "train.py"]),
    "decode-lr-diverges": ("decode.py --run {r}/la --lr 1e30 --pairs 64 --val-pairs 16 --max-epochs 2 --device cpu",
                           ["--lr"]),
    "adapter-saved-as-decoder": (PLAN + " --run {t}/la --out {t}/r.json", ["decoder.pt", "adapter"],
                                 lambda t, r: shutil.copy(shutil.copytree(r / "la", t / "la") / "adapter.pt",
                                                          t / "la" / "decoder.pt")),
    "idm-dim-0": (ON_DATA.replace("baseline", "la") + " --idm-dim 0", ["--idm-"]),
    "dinov2-weights-of-another-model": ("dino.py check --weights {t}/w.pth", ["{t}/w.pth"],
                                        lambda t, r: torch.save({"cls_token": torch.zeros(1, 1, 768)}, t / "w.pth")),
    "meta-action-std-zero": (ON_COPY, ["action_std"], edited_data(lambda d: written(
        d / "meta.json", json.dumps({**jload(d / "meta.json"), "action_std": [0.0, 0.0]})))),
    "frames-cut-short": ("data.py info {t}/data", ["frames.npy"], edited_data(frames_cut_short)),
    **{f"import-{k}": ("data.py import-dinowm --src {t}/src --out {t}/out" + " --keep-frames" * keep_frames, [file],
                       lambda t, r, make=make: make(t / "src"))  # a pickled torch object is refused, never unpickled
       for k, (make, file, keep_frames) in BAD_SOURCES.items()},
    **{f"dataset-{k}": ("data.py info {t}/d", [file],
                        lambda t, r, damage=damage: damage(write_dataset(t / "d", [12, 15])))
       for k, (damage, file) in DAMAGED.items()},
    **{f"{cmd.split(' --')[0]} {arg}": (f"{cmd} {arg}", [arg.split()[0]]) for cmd, args in ONE_FLAG.items()
       for arg in args.split(", ")}}

@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_is_refused_in_one_line_and_loses_nothing(pipe, tmp_path, monkeypatch, capsys, case):
    """Exit status 2, one stderr line naming the flag or file, no traceback, every file and folder as it was."""
    command, names, *setup = HOSTILE[case]
    for make in setup:
        make(tmp_path, pipe.root)
    snapshot = lambda: {p: p.is_file() and p.read_bytes() for f in (pipe.root, tmp_path) for p in f.rglob("*")}  # noqa
    before, fill = snapshot(), lambda s: s.format(t=tmp_path, r=pipe.root)  # noqa: E731
    with pytest.raises(SystemExit) as exit_:
        run_script(monkeypatch, *shlex.split(fill(command)))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and all(fill(n) in err[0] for n in names), err
    assert snapshot() == before

def test_reproduce_sh_refuses_before_writing_and_says_when_there_is_no_gpu(pipe, tmp_path):
    """gpu-check without CUDA: one line, exit 0; bad settings, another DATA on an OUT: exit 2, one line, nothing done"""
    def sh(*argv, timeout=60, **env):
        return subprocess.run(["bash", str(HERE / "reproduce.sh"), *map(str, argv)], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable, **env}, timeout=timeout)
    if not torch.cuda.is_available():
        r = sh("gpu-check", tmp_path / "g", timeout=120)
        assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "no CUDA device" in r.stdout
    file = written(tmp_path / "file", "notes")  # OUT: a file of the user's
    done = written(tmp_path / "q" / ".done" / "dataset", "0" * 16 + "\n")  # the OUT's stages ran on another dataset
    for argv, env, says in ((["full", "--dry-run", tmp_path / "f"], dict(FEATURES="disk"), "FEATURES=disk"),
                            (["full", "--dry-run", tmp_path / "f"], dict(STEPS="1e5"), "STEPS=1e5"),
                            (["quick", file], {}, "OUT="),
                            (["quick", tmp_path / "q"], dict(DATA=str(pipe.data)), "choose another OUT")):
        r = sh(*argv, **env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (argv, r.stderr)
    assert not {"f", "g"} & set(os.listdir(tmp_path)) and file.read_text() == "notes"
    assert done.read_text() == "0" * 16 + "\n" and os.listdir(done.parent) == ["dataset"]  # no stage done

# ---- the DINOv2 pixel path, precision and fit: end to end, features in memory, counted FLOPs, --dry-run, auto_batch --
SMALL = {**SIZES, "dino_size": 28}  # a tiny world model over 4 DINOv2 patches

def test_pixel_tokens_end_to_end_features_in_memory_train_like_exact_ones(pipe, tmp_path, cached_dino, monkeypatch):
    """The DINOv2 path (random ViT-S/14 at 28 px, tokens on the fly): train la, decode, plan, eval; --features memory
    (int8, encoded once) validates like DINOv2 on every batch to int8 precision; it needs memory."""
    for folder, features in (("la", "off"), ("memory", "memory")):
        cfg, mc = train_cfgs(pipe.data, tmp_path / folder, "la", steps=2, dino_weights="random", features=features)
        raw = train.main(cfg, px := replace(mc, tokens="dinov2", dino_size=28))
        assert (raw.cfg.visual_dim, raw.cfg.num_patches, raw.cfg.img_size) == (384, 4, 28)
    off, memory = ([json.loads(line) for line in open(tmp_path / f / "log.jsonl")] for f in ("la", "memory"))
    assert memory[0]["val_latent_mse"] == pytest.approx(off[0]["val_latent_mse"], rel=1e-2)  # step 0, same batches
    assert memory[0]["val_latent_mse"] != off[0]["val_latent_mse"] and math.isfinite(memory[-1]["val_latent_mse"])
    assert decode.main(tiny_decode(tmp_path / "la"))["tokens"] == "dinov2"
    res = plan.main(tiny_plan(tmp_path / "la", tmp_path / "r.json", episodes=2, ceiling_episodes=0, videos=0))
    assert res["tokens"] == "dinov2" and res["reference"]["ceiling"] is None and len(res["successes"]) == 2
    metrics, _ = evaluate.main(tiny_eval(tmp_path / "m.json", run=[str(tmp_path / "la")]))
    assert metrics["la"]["tokens"] == "dinov2" and math.isfinite(metrics["la"]["rollout_mse"])
    monkeypatch.setattr(dino, "available_ram", lambda: 2 ** 30)  # 1 GiB: less than the spare training needs
    user_error(train.main, replace(cfg, out=str(tmp_path / "small")), px, names=["--features memory", "off"])
    assert not (tmp_path / "small" / "ckpt.pt").exists()

def test_counted_flops_dry_runs_without_data_and_auto_batch(tmp_path, monkeypatch, capsys):
    """train_flops, encoder_flops = FlopCounterMode's (meta); --dry-run: no dataset, an estimate per stage, config.json,
    a feature mode that does not fit refused; --batch-episodes 0: as many as half the free RAM holds, else the flag."""
    for variant in ("baseline", "la"):
        with torch.device("meta"), FlopCounterMode(display=False) as counted:  # building counts no FLOPs
            model = WorldModel(mc := wm.derive(WMConfig(variant=variant, **SMALL), {"img_size": 32}))
            model(*(torch.zeros(3, 2, *s) for s in ((4, 384), (10,), (4,))))["loss"].backward()  # z, a, p
        assert counted.get_total_flops() / 3 == pytest.approx(train.train_flops(mc), rel=1e-2), variant
    for name, size in (("dinov2_vits14", 196), ("dinov2_vitb14_reg", 224)):
        with torch.device("meta"), FlopCounterMode(display=False) as counted, torch.no_grad():
            dino.DinoVisionTransformer(name).forward_features(torch.zeros(2, 3, size, size))
        assert counted.get_total_flops() / 2 == pytest.approx(train.encoder_flops(name, size), rel=2e-2), name
    px = WMConfig(variant="vq", tokens="dinov2", **SMALL)  # a pixel run: every refusal below is about its features
    cfg = train.TrainConfig(data=str(missing := tmp_path / "not-collected"), out=str(run := tmp_path / "vq"),
                            batch_size=4, steps=100, eval_every=50, features="off", dry_run=True, frames=1000)
    stages = train.main(cfg, px)
    assert set(stages) == {"train-vq", "decode-vq", "plan-vq-open-loop", "plan-vq-mpc"} and min(stages.values()) > 0
    out = capsys.readouterr().out
    assert all(f"estimate {s}: " in out for s in stages) and jload(run / "config.json")["model"]["num_patches"] == 4
    fwd = 2 * sum(train.model_macs(wm.derive(px, {"img_size": 224})))
    assert stages["train-vq"] > 100 * 4 * (3 * fwd + 2 * train.encoder_flops("dinov2_vits14", 28))  # off: + DINOv2
    user_error(train.main, replace(cfg, frames=0), px, names=[missing, "--frames"])
    monkeypatch.setattr(train, "GPU_BYTES", 2 ** 20)  # a 1 MiB "GPU"
    user_error(train.main, replace(cfg, features="memory"), px, names=["--features memory", "off"])
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 6, 10 ** 6, 10 ** 3))
    user_error(train.main, replace(cfg, features="cache"), px, names=["--features cache", "memory"])
    model, cfg = WorldModel(mc).eval(), plan.PlanConfig(run="r", num_samples=300)  # mc: la's, from the first loop
    assert plan.auto_batch(plan.PlanConfig(run="r", num_samples=8, topk=2), model, 7, CPU, 8) == 7  # a tiny plan: all
    assert plan.auto_batch(plan.PlanConfig(run="r", batch_episodes=3), model, 7, CPU, 8) == 3  # else the flag
    monkeypatch.setattr(dino, "available_ram", unittest.mock.Mock(side_effect=[10 ** 9, 2 * 10 ** 9, 1]))  # per call
    e1, e2 = (plan.auto_batch(cfg, model, 10 ** 9, CPU, 8) for _ in range(2))  # 1 GB free, then 2 GB
    assert 1 < e1 and e2 in (2 * e1, 2 * e1 + 1)  # in proportion to RAM
    user_error(plan.auto_batch, cfg, model, 100, CPU, 8, names=["--num-samples"])  # 1 byte free

# ---- policy.py (GCBC, GC-IQL): goal sampling, IQL's targets, train -> eval, a DINOv2 cache, refusals ----------------
policy_eval = lambda folder, out, **kw: policy.evaluate_policy(policy_eval_cfg(folder, out, **kw))  # noqa: E731

def test_policy_goals_iql_targets_a_dinov2_feature_cache_and_refusals(pipe, tmp_path, cached_dino, monkeypatch):
    """Goals stay in the episode as set; IQL's target at the goal is 0, its value loss an expectile; dinov2 tokens
    train from the cache, evaluate on frames; another token source or dataset names both sides."""
    end, rng = policy.episode_ends(pipe.data, "train"), np.random.default_rng(0)  # (F,)
    tt = np.repeat(np.flatnonzero(np.arange(len(end)) < end), 50)  # every frame before its episode's last, 50x
    aeq(policy.actor_goals(rng, tt, end, 25), np.minimum(tt + 25, end[tt]))  # 25 ahead, capped at the end
    g = policy.actor_goals(rng, tt, end, 0)  # uniform future (swm)
    assert ((g > tt) & (g <= end[tt])).all() and (g == end[tt]).any()
    cfg = tiny_policy(pipe.data, "unused", algo="iql")
    g = policy.value_goals(rng, tt, end, cfg)  # t itself with p_current; only random goals leave the episode:
    assert np.mean(g == tt) == pytest.approx(cfg.p_current, abs=0.03) and 0 < np.mean(end[g] != end[tt]) <= cfg.p_random
    g = policy.value_goals(rng, tt, end, replace(cfg, p_random=0.0, p_future=0.8))
    assert ((g >= tt) & (g <= end[tt]) & (((g - tt) % 5 == 0) | (g == end[tt]))).all()  # whole macro steps ahead
    mc = wm.derive(WMConfig(tokens="state"), data.load_meta(pipe.data))
    nets, s = policy.build(cfg, mc), torch.tensor(data.load_split(pipe.data, "train")["states"][:8]).float()
    z, a0 = dino.state_tokens(s), torch.randn(8, mc.action_dim)  # (B, 1, 12), (B, A)
    for v, weight in ((0.0, 1 - cfg.expectile), (-5.0, cfg.expectile)):  # Q_target - V = -3 < 0: 1 - tau; 2 > 0: tau
        for name, value in (("critic", -3.0), ("critic_target", -3.0), ("value", v)):  # Q = Q_target = -3 and V = v
            torch.nn.init.zeros_(nets[name].mlp[-1].weight), torch.nn.init.constant_(nets[name].mlp[-1].bias, value)
        value_loss, critic_loss, w, _ = policy.iql_losses(nets, z, z, a0, z, s, s, z, cfg)  # s -> s, goal s
        assert value_loss.item() == pytest.approx(weight * (v + 3) ** 2)  # the expectile loss; g = s:
        assert critic_loss.item() == pytest.approx(9.0)  # (Q - 0)^2: reward 0, the episode over
        assert w.shape == (8,) and (w <= policy.AWR_CLIP).all()
    pixels = dict(tokens="dinov2", dino_size=28, dino_weights="random", patch_dim=2)
    dino.main(encode_cfg(cached := shutil.copytree(pipe.data, tmp_path / "data"), batch_size=64))  # its feature cache
    with monkeypatch.context() as m:  # trained from the cache: the encoder never runs
        m.setattr(dino, "encode", lambda *a: pytest.fail("policy.train encoded frames despite the cache"))
        policy.train(tiny_policy(cached, p := tmp_path / "p", **pixels))
    assert (r := policy_eval(p, tmp_path / "p.json"))["tokens"] == "dinov2" and r["episodes"] == 2
    before, other = (p / "policy.pt").read_bytes(), write_dataset(tmp_path / "other", [31, 31], img_size=28)
    fp, theirs = data.load_meta(other)["fingerprint"], data.load_meta(cached)["fingerprint"]
    user_error(policy_eval, p, tmp_path / "r.json", tokens="state", names=["--tokens", "state", "dinov2"])
    user_error(policy_eval, p, tmp_path / "r.json", data=str(other), names=["--data", fp, theirs, "dinov2"])
    user_error(policy.train, tiny_policy(cached, p), names=["--tokens", "state", "dinov2"])  # a state policy
    user_error(policy.train, tiny_policy(other, p, **pixels), names=["--data", other, fp, theirs])
    user_error(tiny_policy, pipe.data, tmp_path / "q", p_random=0.5, names=["--p-*"])  # weights that do not sum to 1
    assert not (tmp_path / "r.json").exists() and (p / "policy.pt").read_bytes() == before

@pytest.mark.parametrize("algo,goal_steps,labels", [("gcbc", 25, -1), ("iql", 25, 12), ("gcbc", 0, -1)])
def test_policy_train_and_eval_state_tokens(pipe, tmp_path, drawn, algo, goal_steps, labels):
    """Train (again: a no-op), evaluate under both protocols; --labels 12 trains on 12 // 5 = 2 chunks of 5."""
    cfg = tiny_policy(pipe.data, folder := tmp_path / algo, algo=algo, goal_steps=goal_steps, labels=labels)
    assert policy.train(cfg) > 0 and policy.train(cfg) is None
    ck = data.load_pt(folder / "policy.pt", "")  # plain tensors and strings (weights_only)
    assert ck["tokens"] == "state" and ("critic" in ck) == (algo == "iql") and len(drawn) == 6 * 8
    assert ck["labels"] == (10 if labels > 0 else pipe.windows) and (labels < 0 or len(set(drawn)) == 2)  # chunks drawn
    for protocol, n, budget in (("open-loop", 3, 25), ("mpc", 2, 50)):
        res = policy_eval(folder, out := tmp_path / f"{folder.name}-{protocol}.json", episodes=n, protocol=protocol)
        want = dict(planner=algo, variant=algo, via=algo, tokens="state", run=str(folder), labels=ck["labels"],
                    episodes=n, protocol=protocol, budget=budget,  # uniform-future goals re-query every mpc step:
                    mpc_execute=1 if protocol == "mpc" and goal_steps == 0 else 5)
        assert (r := jload(out)) == json.loads(json.dumps(res)) and {k: r[k] for k in want} == want
        assert len(r["successes"]) == n and 0 <= r["success_rate"] <= 1 and len(r["ci95"]) == 2
        assert set(r["reference"]) >= {"random", "replay", "ceiling", "ceiling_episodes"}

# ---- the jepa token source: SIGReg known answers, the encoder, collapse statistics, jepa runs end to end -------------
def test_sigreg_known_answers_the_jepa_encoder_token_stats_probes_and_the_collapse_flag(capsys):
    """SIGReg ~1.06 on N(0, 1), B * 0.41 collapsed, between when shrunk, rescuing gradients; uint8 frames -> (B, T, 1,
    D), batch std 1; effective rank, collapse; probes; train.py flags a collapse."""
    torch.manual_seed(0)
    gauss = dino.sigreg(torch.randn(2048, 2, 16)).item()  # the integral of phi (1 - phi^2) over [-3, 3]
    expect = math.sqrt(2 * math.pi) * (math.erf(3 / math.sqrt(2)) - math.erf(3 * math.sqrt(1.5)) / math.sqrt(3))
    assert abs(gauss - expect) < 0.25, (gauss, expect)
    t = torch.linspace(0, 3, dino.SIGREG_KNOTS, dtype=torch.float64)  # SIGReg per row of a batch at 0, from its
    zero = 2 * torch.trapezoid((phi := torch.exp(-t ** 2 / 2)) * (1 - phi) ** 2, t).item()  # definition on [-3, 3]
    assert abs(dino.sigreg(torch.zeros(128, 2, 16)).item() - 128 * zero) < 1e-3  # B identical rows: B * zero
    assert 50 < 128 * zero < 53  # LeWM's Push-T batch 128: ~52
    assert gauss < dino.sigreg(0.3 * torch.randn(2048, 2, 16)).item() < 2048 * zero
    s, z = torch.tensor([0.3, 0.0], requires_grad=True), torch.randn(512, 1, 16)  # why the encoder ends in BatchNorm:
    (dino.sigreg(s[0] * z) + dino.sigreg(s[1] * z)).backward()
    assert s.grad[0] < -10 and s.grad[1].abs() < 1e-6  # large at scale 0.3, none at a collapsed batch
    z = torch.randn(256, 2, 1, 16)  # jepa_delta: tokens that change in every dimension, or in one (the rest still)
    still = torch.cat([z[:, :1], torch.cat([z[:, 1:, :, :1], z[:, :1, :, 1:]], -1)], 1)  # (256, 2, 1, 16)
    reg = {w: [dino.jepa_reg(x, WMConfig(tokens="jepa", jepa_delta=w)).item() for x in (z, still)] for w in (0, 1)}
    assert abs(reg[0][0] - reg[0][1]) < 0.05 and reg[1][0] < 2 and reg[1][1] > 50, reg
    enc = dino.JEPAEncoder(img_size=32, dim=16, width=4)
    z = enc(torch.randint(0, 256, (6, 2, 32, 32, 3), dtype=torch.uint8))  # batch std 1: the final BatchNorm
    assert z.shape == (6, 2, 1, 16) and torch.allclose(z.std((0, 1, 2), unbiased=False), torch.ones(16), atol=1e-2)
    z.square().sum().backward()
    assert enc.convs[0].weight.grad.abs().sum() > 0
    y = train.probe_targets(torch.rand(400, 7) * torch.tensor([512, 512, 512, 512, 6.28, 1, 1]))  # (400, 6)
    z = (y @ torch.randn(6, 10, dtype=torch.float64))[:, None]  # (400, 1, 10) a linear code
    assert min(train.probe_r2(z[:200], y[:200], z[200:], y[200:]).values()) > 0.999
    m = train.jepa_metrics(torch.randn(4000, 1, 8), state := torch.rand(4000, 7))  # random: spread, full rank, no probe
    assert not m["collapsed"] and m["effective_rank"] > 7.8 and max(m[f"probe_{k}"] for k in train.PROBE_GROUPS) < 0.2
    z = torch.randn(1, 1, 8).expand(100, 1, 8) + 1e-5 * torch.randn(100, 1, 8)  # every frame the same token, however
    assert train.jepa_metrics(z, state[:100])["collapsed"] and "collapsed" in capsys.readouterr().out  # its dims differ

def test_jepa_runs_train_plan_and_refuse_a_collapsed_encoder(tmp_path):
    """A jepa run logs its regulariser and statistics, plans, is evaluated; a collapsed one is refused; vq on jepa."""
    jepa = dict(tokens="jepa", depth=1, dropout=0.0, jepa_dim=16, jepa_width=4)  # on train_cfgs' sizes
    small_plan = functools.partial(tiny_plan, episodes=2, opt_steps=1, ceiling_episodes=0, videos=0)
    collect(root := tmp_path / "data", episodes=12, steps=40, img_size=32, seed=0, val_fraction=0.1)
    cfg, mc = train_cfgs(root, run := tmp_path / "run", "baseline", steps=4, batch_size=16, eval_every=4)
    assert train.main(cfg, replace(mc, **jepa, jepa_idm=1.0)).encoder is not None
    rows = [json.loads(line).keys() for line in open(run / "log.jsonl")]
    assert all(any(k <= r for r in rows) for k in ({"reg_loss", "idm_loss"}, {"token_std_median", "probe_agent"}))
    res = plan.main(small_plan(run, tmp_path / "res.json", allow_collapsed=True))
    assert res["tokens"] == "jepa" and "token_std_median" in res["token_stats"]
    metrics, _ = evaluate.main(tiny_eval(tmp_path / "m.json", run=[str(run)], gap_tasks=3))
    assert {"probe_agent", "effective_rank", "collapsed", "gap_cost_plan", "gap_plan_cheaper"} <= set(metrics["run"])
    (ckpt := tload(run / "ckpt.pt"))["model"]["encoder.projector.4.weight"].zero_()  # every frame: one token, the bias
    torch.save(ckpt, written(collapsed := tmp_path / "collapsed" / "ckpt.pt"))
    plan_cfg = functools.partial(small_plan, collapsed.parent, tmp_path / "r.json", data=str(root))
    user_error(plan.main, plan_cfg(), names=[collapsed.parent, "--allow-collapsed"])
    assert not (tmp_path / "r.json").exists() and plan.main(plan_cfg(allow_collapsed=True))["token_stats"]["collapsed"]
    user_error(WMConfig, tokens="jepa", variant="la", jepa_idm=1.0, names=["--jepa-idm"])  # label-using, not baseline
    cfg, mc = train_cfgs(root, tmp_path / "vq", "vq", steps=3, batch_size=16, val_batches=1, stats_batches=1)
    train.main(cfg, replace(mc, **jepa))
    decode.main(tiny_decode(tmp_path / "vq", max_epochs=1, code_states=4, device="auto"))
    res = plan.main(small_plan(tmp_path / "vq", tmp_path / "vq.json", allow_collapsed=True))
    assert res["tokens"] == "jepa" and res["planner"] == "cem_categorical"  # IDM, VQ, decoder see only tokens

# ---- the method end to end (state tokens): decoded IDM latents replay the recording, la plans from its own prior ----
def test_method_decoded_latents_replay_the_recording_adapter_imagines_it_la_plans_from_its_prior(tmp_path):
    """IDM latents of recorded transitions, decoded as the planner does (step h from frame h), retrace the recording;
    through the adapter, the recorded macro actions carry the imagined start far closer to the goal than the start and
    the mean action (1,500 pairs with pseudo-labelled windows about as close as 8,000 pairs, far closer than 1,500
    alone); Gaussian CEM over la latents starts from the run's latent mean and std, not N(0, 1)."""
    collect(root := tmp_path / "data", episodes=300, steps=100, img_size=224, seed=0, val_fraction=0.1)
    train.main(train.TrainConfig(data=str(root), out=str(la_run := tmp_path / "la"), steps=600, batch_size=128,
                                 lr_predictor=2e-3, lr_action=2e-3, lr_idm=2e-3, eval_every=600, val_batches=4,
                                 stats_batches=8, log_every=300),
               WMConfig(variant="la", tokens="state", depth=2, heads=4, dim_head=32, mlp_dim=256, dropout=0.0,
                        idm_depth=1, idm_heads=4, idm_dim=64, idm_mlp_dim=128))
    model, ckpt, root = wm.load_run(la_run)
    adapters = {}  # on 8000 labelled pairs; 1500; 1500 and every other train window, pseudo-labelled
    for name, head, pairs, unlabelled in (("1500", "adapter", 1500, 0), ("1500+", "adapter", 1500, -1),
                                          ("8000", "adapter", 8000, 0), ("decoder", "decoder", 8000, 0)):
        decode.main(DecodeConfig(run=str(la_run), head=head, pairs=pairs, val_pairs=pairs // 8, unlabelled=unlabelled))
        adapters[name] = decode.load_head(la_run, ckpt, "cpu", head)[0]
    decoder, adapter, stats = adapters.pop("decoder"), adapters["8000"], ckpt["stats"]
    tasks, split = plan.make_tasks(root, "val", "open-loop", 60, 0, 64), data.load_split(root, "val")
    g = split["starts"][tasks["episode"]] + tasks["step"]  # (n,) global start frames
    z = dino.state_tokens(split["states"][g[:, None] + 5 * np.arange(6)])  # (n, 6, 1, 12) recorded macro steps
    z0, zg = (dino.state_tokens(tasks[k]) for k in ("start_state", "goal_state"))  # (n, 1, 12); a (n, 5, A): recorded
    a = data.env_to_macro(torch.tensor(tasks["actions"]).float(), stats["action_mean"], stats["action_std"])
    with torch.no_grad():
        pairs = torch.stack([z[:, :-1], z[:, 1:]], 2).flatten(0, 1)  # (n*5, 2, 1, 12)
        latents = model.conditioning(pairs)["latent"][:, 0].view(len(g), 5, -1)  # (n, 5, L)
        decoded = plan.decode_plan(model, decoder, z[:, 0], latents)  # (n, 5, A)
        true, mean = (plan.rollout_cost(model, z0, zg, x[:, None], adapter=adapter)[:, 0] for x in (a, 0 * a))  # (n,)
        few = {k: plan.rollout_cost(model, z0, zg, a[:, None], adapter=h)[:, 0].mean() for k, h in adapters.items()}
    px = data.macro_to_env(decoded.numpy(), stats["action_mean"], stats["action_std"])  # (n, 25, 2)
    start, final = (plan.distances(tasks["goal_state"], np.stack([PushT().replay(s, x) for s, x in zip(
        tasks["start_state"], acts)]))[0] for acts in (px[:, :0], px))  # (n,) px from the goal, before and after
    assert final.mean() < 0.6 * start.mean(), (final.mean(), start.mean())
    assert few["1500+"] < 0.7 * few["1500"], few  # measured 0.042 against 0.089 (8000 pairs: 0.046)
    start = (z0 - zg).square().mean((-1, -2))  # (n,); measured 0.046 against 0.29 and 0.35; next-step pairing: 0.130
    assert true.mean() < 0.35 * min(start.mean(), mean.mean()), (true.mean(), mean.mean(), start.mean())
    with unittest.mock.patch.object(plan, "cem_gaussian", wraps=plan.cem_gaussian) as cem:  # records each call
        plan.main(tiny_plan(la_run, tmp_path / "r.json", episodes=2, opt_steps=1, ceiling_episodes=0, videos=0))
    mean, std = torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"])
    assert cem.called and (mean.abs().max() > 0.2 or (std - 1).abs().max() > 0.2)  # the prior is not N(0, 1) here
    for _, mu, sigma, *_ in (c.args for c in cem.call_args_list):  # each call's start (E, H, L), every episode and step
        close(mu, mean.expand_as(mu)), close(sigma, std.expand_as(sigma))

# ---- GPU only (skipped without CUDA): bf16 encoder vs fp32, compiled vs eager world model, auto_batch fits ----------
@CUDA
def test_gpu_bf16_encoder_matches_fp32_and_auto_batch_fits(monkeypatch):
    """DINOv2 under data.setup's precision: bf16 autocast by default, against --dtype float32 (TF32 off); auto_batch at
    300 samples, horizon 5, 196 tokens: the chosen E runs without running out of memory."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)  # restored
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # (conv patch embedding)
    model, rng = dino.load_dinov2("dinov2_vits14", "random", device="cuda"), np.random.default_rng(0)
    states = np.concatenate([rng.uniform(100, 400, (8, 4)), rng.uniform(0, 6, (8, 1)), np.zeros((8, 2))], 1)
    frames = torch.as_tensor(data.render_batch(states, 224))  # (B, S, S, 3)
    with torch.no_grad(), data.setup("cuda", 0, "float32")[1]:
        ref = model.forward_features(dino.preprocess(frames.cuda(), 196))["x_norm_patchtokens"]  # (B, P, D) fp32
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with data.setup("cuda", 0, "bfloat16")[1]:
        z = dino.encode(model, frames, 196)  # (B, P, D)
    assert z.dtype == torch.float32 and z.shape == ref.shape == (8, 196, 384) and not torch.equal(z, ref)
    assert F.cosine_similarity(z, ref, dim=-1).min() > 0.999 and (z - ref).norm() / ref.norm() < 1e-2
    model, device = WorldModel(wm.derive(WMConfig(variant="vq"), {"img_size": 224})).cuda().eval(), torch.device("cuda")
    E = plan.auto_batch(plan.PlanConfig(run="r"), model, 100, device, None)  # vq plans code indices (N 300, H 5)
    z, codes = torch.zeros(E, 196, 384, device=device), torch.zeros(E, 300, 5, dtype=torch.long, device=device)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        plan.rollout_cost(model, z, z, codes)
    assert torch.cuda.max_memory_allocated() < torch.cuda.get_device_properties(0).total_memory

@CUDA
def test_gpu_compiled_world_model_matches_eager(monkeypatch):
    """Module.compile of predictor and IDM (forward, loss, gradients) and torch.compile(rollout_cost) match eager."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    eager, (z, a, p) = WorldModel(tiny_wm("vq", proprio=True, dropout=0.0)).cuda(), (t.cuda() for t in batch(B=8))
    eager(z, a, p)  # initialise the codebook first, so both copies start from the same state
    (compiled := copy.deepcopy(eager)).predictor.compile(), compiled.idm.compile()  # as train.py does
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    outs = []
    for m in (eager, compiled):
        torch.manual_seed(1)  # restart candidates draw from the global RNG
        outs.append(m(z, a, p)), outs[-1]["loss"].backward()
    assert torch.equal(outs[0]["codes"], outs[1]["codes"])
    for key in ("loss", "pred_loss", "commit_loss"):
        close(outs[1][key], outs[0][key], rtol=1e-4, atol=1e-5)
    for (name, w), w2 in zip(eager.named_parameters(), compiled.parameters()):
        close(w2.grad, w.grad, rtol=1e-3, atol=1e-5, msg=name)
    eager.eval(), compiled.eval()
    (z0, zg), _, (p0, pg) = (t.cuda() for t in batch(B=2, seed=1))  # start and goal: tokens (E, P, D), proprio (E, 4)
    codes = torch.randint(4, (2, 16, 5), device="cuda")  # (E, N, H) plans of code indices
    with torch.no_grad():
        pg, cond = eager.embed_proprio(pg), eager.plan_to_cond(codes[:, 0])  # (E, proprio_dim), (E, H, C)
        for want, got in zip(eager.rollout(z0, cond, p0), compiled.rollout(z0, cond, p0)):
            close(got, want, rtol=1e-4, atol=1e-5)
        want = plan.rollout_cost(eager, z0, zg, codes, p0, pg, 1.0)  # (E, N)
        got = torch.compile(plan.rollout_cost, dynamic=False)(eager, z0, zg, codes, p0, pg, 1.0)
        close(got, want, rtol=1e-4, atol=1e-5)
