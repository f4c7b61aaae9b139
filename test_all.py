"""All tests, in pipeline order: data -> dino -> wm -> train -> decode -> plan -> eval, then the precision/fit plumbing,
the GCBC/IQL policies, the jepa token source, the method end to end, and the GPU-only checks.

Property tests pin the maths and the contracts: the simulator's constants and DINO-WM's PD arithmetic, the DINOv2
state-dict contract and interpolation rule, VQ straight-through/EMA/dead codes (also across two DDP ranks), frame-causal
masks, exact resume, the planners' optima and update rules, metric and regulariser known answers. Expected user errors
are checked as properties, never by wording: data.UserError in-process, or exit status 2 with one stderr line and no
traceback from a command line, naming the flag or file, with nothing half-written.
One tiny state-token pipeline (collect, train baseline/la/vq, decode, plan) is built once and shared by the decode,
plan and eval tests; one tiny DINOv2-token run (random encoder, 28 px) keeps the pixel path tested end to end; one
small la run (~30 s) checks the method's pairings. CPU, one torch thread, tiny sizes, temp dirs: ~2 min on 2 cores.
    python -m pytest -q test_all.py
GPU-only checks (bf16 vs fp32 encoder, compiled vs eager world model, auto_batch's fit) skip without CUDA.
"""
import contextlib
import copy
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import pickle
import runpy
import shutil
import socket
import subprocess
import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pymunk import Vec2d

import data
import decode
import dino
import eval as evaluate  # `eval` would shadow the builtin
import plan
import policy
import train
import wm
from data import PushT, UserError, WindowDataset, is_success, render_state
from decode import ActionDecoder, DecodeConfig
from wm import WMConfig, WorldModel

HERE, CPU, VARIANTS = Path(__file__).resolve().parent, torch.device("cpu"), ("baseline", "la", "vq")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
# One random ViT-S per (name, weights, device): its init is deterministic, and building it costs ~0.5 s on 2 cores.
cached_dinov2 = functools.lru_cache(dino.load_dinov2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and avoids OpenMP spin-waits when the 2 cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cached_dino(monkeypatch):
    """Stages that build the random encoder (through dino.make_input) share one instance."""
    monkeypatch.setattr(dino, "load_dinov2", cached_dinov2)


def user_error(fn, *args, names=(), **kw):
    """fn(*args, **kw) raises data.UserError whose message names each of `names` (flags, files)."""
    with pytest.raises(UserError) as err:
        fn(*args, **kw)
    assert all(str(n) in str(err.value) for n in names), (names, str(err.value))


def tree(folder):
    """Every path under folder, relative: what a refused command must not have written."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def run_script(monkeypatch, script, *argv):
    """`python script argv...` in this process (no interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    runpy.run_path(str(HERE / script), run_name="__main__")


# ---- data.py: the simulator (physics, constants, DINO-WM's arithmetic), rendering, the success test ------------------
PUSH = np.array([170.0, 315.0, 256.0, 300.0, 0.0, 0.0, 0.0])  # agent 20 px left of the cap of the T at (256, 300)


def rollout(env, actions):
    """States (T, 7) after each of the px actions (T, 2)."""
    return np.stack([env.advance(a) or env.get_state() for a in actions])


def noise(seed, n):
    return np.random.default_rng(seed).normal(0, 25, (n, 2))  # (n, 2) px offsets


def test_reset_draws_dinowm_start_states():
    env, rs = PushT(), np.random.RandomState(5)
    env.reset(5)
    want = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)]
    angle = (rs.randn() * 2 * np.pi - np.pi) % (2 * np.pi)  # QUIRK: Gaussian, as upstream
    np.testing.assert_allclose(env.get_state(), want + [angle, 0, 0], atol=1e-6)


def test_the_future_is_a_function_of_state_and_actions():
    a, b, c = PushT(), PushT(), PushT()
    a.reset(7), b.reset(7), c.reset(123), rollout(c, noise(5, 10))
    np.testing.assert_array_equal(rollout(a, noise(1, 40)), rollout(b, noise(1, 40)))  # deterministic
    a.set_state(PUSH), rollout(a, [[30.0, 0.0]] * 3)  # mid-contact ...
    a.set_state(s := a.get_state()), c.set_state(s)  # ... or after a random walk: the same state has the same future
    np.testing.assert_array_equal(rollout(a, [[30.0, 5.0]] * 10), rollout(c, [[30.0, 5.0]] * 10))


def dinowm_step(env, action):
    """DINO-WM's PushTEnv.step physics, literally, in pymunk's Vec2d arithmetic (env/pusht/pusht_env.py)."""
    target = env.agent.position + Vec2d(float(action[0]), float(action[1]))  # relative action: fixed once per step
    for _ in range(100 // 10):  # sim_hz // control_hz
        acceleration = 100 * (target - env.agent.position) + 20 * (Vec2d(0, 0) - env.agent.velocity)
        env.agent.velocity += acceleration * (1.0 / 100)
        env.space.step(1.0 / 100)


def test_advance_is_bit_identical_to_dinowm_vec2d_step():
    rng, ours, theirs, moved = np.random.default_rng(0), PushT(), PushT(), 0
    for _ in range(8):
        s = PUSH + np.r_[rng.uniform(-5, 5, 2), rng.uniform(-10, 10, 2), rng.uniform(-0.3, 0.3), 0, 0]
        ours.place(s), theirs.place(s)
        for a in rng.normal([25.0, 0.0], 15, (8, 2)):  # mostly into the T: contact on most steps
            ours.advance(a), dinowm_step(theirs, a)
            np.testing.assert_array_equal(ours.get_state(), theirs.get_state())
        moved += abs(ours.get_state()[2] - s[2]) > 5
    assert moved >= 6  # the pushes did reach the T


def test_set_state_round_trip_and_place():
    env, s = PushT(), np.array([100.0, 120.0, 300.0, 280.0, 1.0, 0.0, 0.0])
    for given in (s, s[:5], s + [0, 0, 0, 0, 4 * math.pi, 0, 0]):  # 7 numbers; 5 = zero velocity; unwrapped angle
        assert env.set_state(given).shape == (224, 224, 3)
        np.testing.assert_allclose(env.get_state(), s, atol=1e-9)
        assert env.place(given) is None and np.allclose(env.get_state(), s, atol=1e-9)  # place: the same, no frame


def test_set_state_takes_one_extra_physics_step():
    env = PushT()
    env.set_state([100.0, 120.0, 300.0, 280.0, 1.0, 50.0, -30.0])  # a moving agent moves on for 0.01 s
    np.testing.assert_allclose(env.get_state(), [100.5, 119.7, 300.0, 280.0, 1.0, 50.0, -30.0], atol=1e-9)


@pytest.mark.parametrize("bad", [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, float("nan")]])
def test_set_state_refuses_malformed_states(bad):
    with pytest.raises(ValueError):
        PushT().set_state(bad)


def test_physics_constants_are_dinowm_s():
    env = PushT()
    assert env.block.moment == 3000.0 and env.block.mass == 1 and tuple(env.block.center_of_gravity) == (0.0, 45.0)
    assert env.space.damping == 0 and tuple(env.space.gravity) == (0, 0) and env.agent.body_type == env.agent.KINEMATIC
    assert all(sh.friction == 0 and sh.elasticity == 0 for sh in env.space.shapes)
    assert (data.KP, data.KV, data.SIM_HZ, data.CONTROL_HZ) == (100, 20, 100, 10)


def test_pd_step_response_known_answer():
    """A 20 px command from rest: 10 Euler substeps of v += (100 (20 - x) - 20 v) 0.01, x += 0.01 v (worked out by
    hand) move the agent 5.9134 px and leave it at 74.8295 px/s."""
    env = PushT()
    env.set_state([100.0, 100.0, 400.0, 300.0, 0.0, 0.0, 0.0])
    env.step([20.0, 0.0])
    s = env.get_state()
    assert abs(s[0] - 105.9134) < 1e-4 and abs(s[5] - 74.8295) < 1e-4 and s[1] == 100.0 and s[6] == 0.0


def test_the_block_moves_only_while_pushed():
    env = PushT()
    env.set_state([60.0, 60.0, 300.0, 300.0, 0.5, 0.0, 0.0])
    before = env.get_state()
    rollout(env, [[20.0, 0.0]] * 5)
    np.testing.assert_array_equal(env.get_state()[2:5], before[2:5])  # untouched: exactly still
    env.set_state(PUSH), rollout(env, [[30.0, 0.0]] * 3)
    assert env.get_state()[2] - 256.0 > 5  # pushed to the right
    backed = rollout(env, [[-30.0, 0.0]] * 5)  # back off: contact ends, and with damping 0 the T stops dead
    np.testing.assert_array_equal(backed[-1, 2:5], backed[-2, 2:5])


@pytest.mark.parametrize("delta,ok", [
    ([0, 0, 0, 0, 0], True), ([10, 10, 10, 0, 0], True),  # |(10, 10, 10, 0)| = 17.3 < 20
    ([10, 10, 10, 10, 0], False),  # exactly 20: not < 20
    ([0, 0, 0, 0, math.pi / 9 + 1e-3], False), ([0, 0, 0, 0, 2 * math.pi - 0.1], True),  # 0.1 rad across 0
    ([0, 0, 0, 0, 4 * math.pi], True), ([0, 0, 0, 0, 1 + 2 * math.pi], False)])  # unwrapped angles
def test_is_success_thresholds(delta, ok):
    g = np.array([100.0, 100.0, 200.0, 200.0, 0.05, 0.0, 0.0])
    assert is_success(g, g + np.r_[delta, 500.0, 500.0]) == ok  # velocities never count


def test_frame_is_a_function_of_the_state():
    env = PushT(img_size=224)
    env.set_state(PUSH)
    frame = env.step([30.0, 0.0])  # in contact: a renderer drawing contact points would differ
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, render_state(env.get_state(), 224))


def test_render_draws_upstreams_picture_at_any_size():
    big = render_state([100.0, 420.0, 350.0, 350.0, math.pi / 2, 0.0, 0.0], 512)
    assert tuple(big[420, 100]) == data.AGENT_LIGHT and tuple(big[420, 100 + 13]) == data.AGENT_RGB
    assert tuple(big[350, 250]) == data.BLOCK_LIGHT  # y down: angle pi/2 maps local (0, 100) to (-100, 0)
    assert tuple(big[350, 350 - 30]) == data.BLOCK_RGB  # outline of the cap's far edge, local y = 30
    assert tuple(big[267, 245]) == data.GOAL_RGB and tuple(big[5, 200]) == data.WALL_RGB  # anchor T, local (0, 15)
    assert tuple(big[100, 256]) == (255, 255, 255)
    for size, s in zip((224, 196, 64) * 4, np.random.default_rng(0).uniform(-30, 540, (12, 7))):  # partly off canvas
        s[4:] = (s[4] - 255) / 40, 0, 0  # angles in (-7.1, 7.1)
        want = cv2.resize(render_state(s, 512), (size, size), interpolation=cv2.INTER_LINEAR)  # draw at 512, resize
        np.testing.assert_array_equal(render_state(s, size), want)


# ---- data.py: collect, info, the command line, windows, macro actions, the importer, bad input -----------------------
def collect(out, **kw):
    data.collect(data.CollectConfig(**{**dict(out=str(out), episodes=4, steps=30, img_size=64, seed=3, workers=1,
                                              val_fraction=0.25), **kw}))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4 episodes x 31 frames at 64 px, seed 3, one worker (3 train, 1 val)."""
    collect(root := tmp_path_factory.mktemp("small") / "a")
    return root


def test_collect_does_not_depend_on_the_worker_count(small, tmp_path):
    collect(tmp_path / "b", workers=2)
    for split in ("train", "val"):
        a, b = data.load_split(small, split), data.load_split(tmp_path / "b", split)
        assert all(np.array_equal(a[k], b[k]) for k in ("states", "actions", "lengths"))
    assert data.load_meta(small)["fingerprint"] == data.load_meta(tmp_path / "b")["fingerprint"]


def test_collected_layout_statistics_and_exact_replay(small):
    tr, meta, env = data.load_split(small, "train"), data.load_meta(small), PushT()
    assert tr["lengths"].tolist() == [31, 31, 31] and tr["states"].shape == (93, 7) and tr["frames"] is None
    assert (tr["actions"][[30, 61, 92]] == 0).all()  # an episode's last action leads nowhere ...
    real = np.delete(tr["actions"], [30, 61, 92], axis=0).astype(np.float64)  # ... and is left out of the stats
    assert np.allclose(meta["action_mean"], real.mean(0)) and np.allclose(meta["action_std"], real.std(0))
    assert meta["splits"]["val"] == {"episodes": 1, "frames": 31} and meta["img_size"] == 64
    env.reset(3)  # episode i starts from reset(seed + i) ...
    np.testing.assert_array_equal(env.get_state(), tr["states"][0])
    assert max(data.replay_drift(tr, episodes=3, steps=25)) < 1e-9  # ... and its stored actions replay it


def test_collect_again_is_a_no_op_and_other_arguments_are_refused(small, capsys):
    before = (small / "meta.json").read_text()
    collect(small)
    assert "nothing to do" in capsys.readouterr().out
    user_error(collect, small, seed=4, names=["--out", small])
    assert (small / "meta.json").read_text() == before


def test_info_and_the_data_command_line(small, tmp_path, monkeypatch, capsys):
    data.info(data.InfoConfig(root=str(small)), bench=20)
    out = capsys.readouterr().out
    assert all(s in out for s in ("3 episodes, 93 frames", "5-step windows", "8x8", "windows/s", "(verified)", "drift"))
    run_script(monkeypatch, "data.py", "collect", "--out", tmp_path / "c", "--episodes", 3, "--steps", 12,
               "--img-size", 32, "--workers", 1)
    run_script(monkeypatch, "data.py", "info", tmp_path / "c")
    assert "frames/s" in (out := capsys.readouterr().out) and "2 episodes, 26 frames" in out
    assert data.load_meta(tmp_path / "c")["splits"]["val"]["frames"] == 13
    data.figure(data.FigureConfig(out=str(tmp_path / "f.png")))
    assert cv2.imread(str(tmp_path / "f.png")).shape == (224, 6 * 224 + 5 * 4, 3)  # 6 tiles, 4-px gutters


def write_dataset(root, lengths, img_size=32):
    """A hand-made dataset (both splits alike): frame g has agent_x = g and action (g, -g)."""
    f = int(sum(lengths))
    states = np.zeros((f, 7))
    states[:, 0], states[:, 2:4] = np.arange(f), 256.0
    split = dict(states=states, actions=np.stack([np.arange(f), -np.arange(f)], 1).astype(np.float32),
                 lengths=np.array(lengths))
    with data._staging(Path(root)) as tmp:
        data._write(tmp, dict(train=split, val=split), dict(source="test", img_size=img_size, seed=0, args={}))
    return Path(root)


@pytest.fixture(scope="module")
def windows_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("windows") / "d", [12, 9, 15])


@pytest.mark.filterwarnings("ignore:.*shorter than one window")
def test_window_frames_actions_and_proprio(windows_data):
    ds = WindowDataset(windows_data, "train", num_frames=2, frameskip=5, pixels=True)
    assert len(ds) == 3 + 0 + 6  # the 9-frame episode holds no 10-frame window
    mean, std, meta = np.array(ds.meta["action_mean"]), np.array(ds.meta["action_std"]), ds.meta
    item = ds[4]  # second window of the third episode: starts at frame 12 + 9 + 1 = 22
    assert int(item["index"]) == 22 and item["obs"].shape == (2, 32, 32, 3) and item["obs"].dtype == torch.uint8
    np.testing.assert_array_equal(item["state"][:, 0].numpy(), [22, 27])
    raw = np.stack([np.arange(22, 32), -np.arange(22, 32)], 1)  # (10, 2): actions 22..31, time-major
    want = ((raw - mean) / std).reshape(2, 10)  # row k = actions 22+5k .. 26+5k as (x0, y0, x1, y1, ...)
    np.testing.assert_allclose(item["action"].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(item["proprio"][:, 0].numpy(), (np.array([22, 27]) - meta["proprio_mean"][0])
                               / meta["proprio_std"][0], rtol=1e-6)
    np.testing.assert_array_equal(item["obs"][0].numpy(), render_state(ds.states[22], 32))
    assert torch.equal(ds.__getitems__([4, 0])["action"][0], item["action"])  # a batch is one gather


@pytest.mark.filterwarnings("ignore:.*shorter than one window")
def test_windows_read_a_feature_cache_instead_of_frames(windows_data):
    feats = np.arange(36 * 3 * 4, dtype=np.float16).reshape(36, 3, 4)  # (F, P, D)
    item = WindowDataset(windows_data, "train", pixels=True, features=feats)[4]
    assert "obs" not in item and item["feat"].dtype == torch.float16
    np.testing.assert_array_equal(item["feat"].numpy(), feats[[22, 27]])
    assert "obs" not in WindowDataset(windows_data, "train")[0]  # state-only windows carry no pixels


def test_windows_warn_about_short_episodes_and_refuse_all_short(windows_data, tmp_path):
    with pytest.warns(UserWarning, match="1 of 3"):
        WindowDataset(windows_data, "train")
    user_error(WindowDataset, write_dataset(tmp_path / "short", [5, 9]), "train", names=[tmp_path / "short"])


def test_macro_env_round_trip_numpy_and_torch():
    mean, std = [1.5, -2.0], [20.0, 18.0]
    a_px = np.random.default_rng(0).normal(0, 20, (3, 10, 2))  # (E, H * frameskip, 2)
    macro = data.env_to_macro(a_px, mean, std)
    assert macro.shape == (3, 2, 10)
    np.testing.assert_allclose(macro[1, 1, 2:4], (a_px[1, 6] - mean) / std)  # step 6 = macro 1, slot 1
    np.testing.assert_allclose(data.macro_to_env(macro, mean, std), a_px)
    t = torch.tensor(a_px, dtype=torch.float32)
    torch.testing.assert_close(data.macro_to_env(data.env_to_macro(t, mean, std), mean, std), t)
    with pytest.raises((AssertionError, ValueError)):  # 7 env steps are no whole number of macro actions
        data.env_to_macro(a_px[:, :7], mean, std)


def fake_dinowm(root, lengths_by_split, size=64, short_video=None, lengths_obj=None):
    """pusht_noise in DINO-WM's format, made with our simulator: torch.save tensors, a pickle, mp4v videos."""
    for name, lengths in lengths_by_split.items():
        d, n, t_max = root / name, len(lengths), max(lengths)
        (d / "obses").mkdir(parents=True)
        states, vel, act = torch.zeros(n, t_max, 5), torch.zeros(n, t_max, 2), torch.zeros(n, t_max, 2)
        for i, length in enumerate(lengths):
            s, a = data.collect_episode(100 * len(name) + i, length - 1)
            states[i, :length], vel[i, :length], act[i, :length] = map(torch.tensor, (s[:, :5], s[:, 5:], a))
            video = cv2.VideoWriter(str(d / "obses" / f"episode_{i:03d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10,
                                    (size, size))
            for st in s[:length - (short_video == (name, i))]:
                video.write(cv2.cvtColor(render_state(st, size), cv2.COLOR_RGB2BGR))
            video.release()
        for fname, x in (("states", states), ("velocities", vel), ("rel_actions", act), ("abs_actions", act)):
            torch.save(x, d / f"{fname}.pth")
        (d / "seq_lengths.pkl").write_bytes(pickle.dumps(list(lengths) if lengths_obj is None else lengths_obj))
    return root


def import_dinowm(src, out, keep_frames=False):
    data.import_dinowm(data.ImportConfig(src=str(src), out=str(out), keep_frames=keep_frames))
    return Path(out)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    src = fake_dinowm(tmp_path_factory.mktemp("dinowm") / "src", dict(train=[30, 27, 28], val=[29, 26]))
    return src, import_dinowm(src, src.parent / "out", keep_frames=True)


def test_import_converts_states_actions_and_video_frames(imported):
    meta, tr = data.load_meta(imported[1]), data.load_split(imported[1], "train")
    assert meta["source"] == "dinowm" and meta["img_size"] == 64 and tr["lengths"].tolist() == [30, 27, 28]
    want = np.concatenate([data.collect_episode(500 + i, n - 1)[0] for i, n in enumerate([30, 27, 28])])
    np.testing.assert_array_equal(tr["states"], want.astype(np.float32))  # DINO-WM stores float32
    rendered = np.stack([render_state(s, 64) for s in tr["states"][:30]])
    drawn = rendered.min(-1) < 250  # block, agent, goal, walls
    assert tr["frames"].shape == (85, 64, 64, 3)
    assert np.abs(tr["frames"][:30].astype(int) - rendered)[drawn].mean() < 12  # RGB order kept through the mp4
    assert max(data.replay_drift(tr, episodes=3, steps=25)) < 1e-3  # float32 storage only
    data.info(data.InfoConfig(root=str(imported[1])), bench=5)  # the fingerprint covers the stored arrays
    item = WindowDataset(imported[1], "val", pixels=True)[0]  # windows read the stored frames
    np.testing.assert_array_equal(item["obs"].numpy(), data.load_split(imported[1], "val")["frames"][[0, 5]])


def test_import_without_frames_renders_at_224_and_clears_stale_staging(imported, tmp_path):
    (stale := tmp_path / ".out.tmp-killed").mkdir()  # left by an earlier, killed run
    out = import_dinowm(imported[0], tmp_path / "out")
    assert data.load_meta(out)["img_size"] == 224 and data.load_split(out, "val")["frames"] is None
    assert not stale.exists()


def test_import_accepts_numpy_integer_lengths(tmp_path):
    src = fake_dinowm(tmp_path / "src", dict(train=[20], val=[20]), lengths_obj=[np.int64(20)])
    assert data.load_split(import_dinowm(src, tmp_path / "out"), "train")["lengths"].tolist() == [20]


ONE = dict(train=[20], val=[20])
BAD_SOURCES = {  # name: (make a bad pusht_noise folder, the file the error must name, keep_frames)
    "short-video": (lambda s: fake_dinowm(s, dict(train=[20, 21], val=[20]), short_video=("train", 1)),
                    "episode_001.mp4", True),
    "torch-pickle": (lambda s: fake_dinowm(s, ONE, lengths_obj=torch.tensor([20])), "seq_lengths.pkl", False),
    "too-long": (lambda s: fake_dinowm(s, ONE, lengths_obj=[25]), "seq_lengths.pkl", False),
    "bad-shape": (lambda s: torch.save(torch.zeros(1, 20, 3), fake_dinowm(s, ONE) / "train" / "velocities.pth"),
                  "velocities.pth", False),
    "missing": (lambda s: (fake_dinowm(s, ONE) / "train" / "rel_actions.pth").unlink(), "rel_actions.pth", False),
    "garbage": (lambda s: (fake_dinowm(s, ONE) / "train" / "states.pth").write_bytes(b"garbage"), "states.pth", False)}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_import_refuses_bad_input_and_writes_nothing(tmp_path, case):
    make, file, keep_frames = BAD_SOURCES[case]
    make(tmp_path / "src")  # a pickled torch object is refused, never unpickled
    user_error(import_dinowm, tmp_path / "src", tmp_path / "out", keep_frames, names=[file])
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no dataset, no staging folder


@pytest.mark.parametrize("corrupt,file", [
    (lambda d: d.joinpath("meta.json").unlink(), "meta.json"),
    (lambda d: d.joinpath("meta.json").write_text("{not json"), "meta.json"),
    (lambda d: np.save(d / "train" / "states.npy", np.zeros((27, 5))), "states.npy"),
    (lambda d: np.save(d / "train" / "states.npy", np.zeros((26, 7))), "lengths.npy"),
    (lambda d: d.joinpath("train", "actions.npy").write_bytes(b"\x93NUMPY garbage"), "actions.npy"),
    (lambda d: np.save(d / "train" / "actions.npy", np.ones((27, 2), np.float32)), "fingerprint")],
    ids=["no-meta", "meta-not-json", "states-shape", "lengths-sum", "actions-corrupt", "fingerprint"])
def test_damaged_dataset_is_refused_naming_the_file(tmp_path, corrupt, file):
    corrupt(d := write_dataset(tmp_path / "d", [12, 15]))
    user_error(data.info, data.InfoConfig(root=str(d)), bench=2, names=[file])


def test_collect_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    user_error(collect, tmp_path / "junk", names=["--out", tmp_path / "junk"])
    assert tree(tmp_path) == ["junk", "junk/file.txt"]


def test_collect_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(tmp, splits, meta):  # the disk fills up half-way through writing
        np.save(tmp / "train" / "states.npy", splits["train"]["states"])
        raise OSError("disk full")
    monkeypatch.setattr(data, "_write", disk_full)
    with pytest.raises(OSError):
        collect(tmp_path / "out", episodes=2, steps=5)
    assert tree(tmp_path) == []


# ---- data.py: the plumbing every stage shares (flags, configs, resume merge, locks, atomic writes) -------------------
def test_flags_come_from_the_config_fields():
    cfg, mc, given = data.parse_config(train.TrainConfig, WMConfig, argv=[
        "--variant", "vq", "--no-compile", "--steps", "7", "--dino-weights", "random", "--tokens", "state"])
    assert (mc.variant, mc.tokens, cfg.compile, cfg.steps, cfg.dino_weights) == ("vq", "state", False, 7, "random")
    assert given == {"variant", "compile", "steps", "dino_weights", "tokens"}  # only what was typed
    ev, _ = data.parse_config(evaluate.EvalConfig, argv=["--run", "a", "--run", "b", "c", "--windows", "8"])
    assert ev.run == ["a", "b", "c"] and ev.windows == 8
    ev.run.append("d")  # the parsed list is the config's own, not a shared default
    assert data.parse_config(evaluate.EvalConfig, argv=["--results", "r.json"])[0].run == []
    for argv in (["--variant", "nope"], ["--visual-dim", "12"]):  # a choice outside the Literal; a derived field
        with pytest.raises(SystemExit):
            data.parse_config(train.TrainConfig, WMConfig, argv=argv)


@pytest.mark.parametrize("make,flag", [
    (lambda: WMConfig(variant="nope"), "--variant"), (lambda: WMConfig(dino_size=30), "--dino-size"),
    (lambda: WMConfig(variant="la", latent_dim=16), "--latent-dim"), (lambda: train.TrainConfig(steps=0), "--steps"),
    (lambda: plan.PlanConfig(run="r", topk=400), "--topk"), (lambda: DecodeConfig(), "--run"),
    (lambda: evaluate.EvalConfig(), "--run"), (lambda: data.CollectConfig(out="x", episodes=1), "--episodes")])
def test_configs_built_in_code_are_checked_like_flags(make, flag):
    user_error(make, names=[flag])


def test_help_lists_every_flag_with_its_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping
    for argv, classes in ((["train.py"], (train.TrainConfig, WMConfig)), (["decode.py"], (DecodeConfig,)),
                          (["plan.py"], (plan.PlanConfig,)), (["eval.py"], (evaluate.EvalConfig,)),
                          (["data.py", "collect"], (data.CollectConfig,)),
                          (["dino.py", "encode"], (dino.EncodeConfig,))):
        with pytest.raises(SystemExit) as exit_:
            run_script(monkeypatch, *argv, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert exit_.value.code == 0
        for f in (f for cls in classes for f in dataclasses.fields(cls) if not f.metadata.get("derived")):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert data.flag(f.name) in text and f"(default: {default!r})" in text, (argv, f.name)


def test_resume_merge_rules():
    stored, rt = dataclasses.asdict(train.TrainConfig(lr_predictor=1e-3, steps=5)), train.RUNTIME
    merged, = data.merge_resume("run", set(), (train.TrainConfig(), stored, rt))
    assert merged.lr_predictor == 1e-3 and merged.steps == 5  # untyped fields: the run's own
    user_error(data.merge_resume, "run", {"lr_predictor"}, (train.TrainConfig(), stored, rt),
               names=["--lr-predictor", "run"])  # typed, even at its default, and different: refused
    merged, = data.merge_resume("run", {"steps"}, (train.TrainConfig(steps=9), stored, rt))
    assert merged.steps == 9  # a runtime field may change
    merged, = data.merge_resume("run", None, (train.TrainConfig(steps=9), stored, rt))  # configs built in code:
    assert merged.steps == 9 and merged.lr_predictor == 1e-3  # non-default fields count as given


def test_a_locked_folder_refuses_a_second_holder(tmp_path):
    with data.locked(tmp_path / "run"):
        user_error(data.locked(tmp_path / "run").__enter__, names=[tmp_path / "run"])
    with data.locked(tmp_path / "run"):  # released at exit
        pass


def test_a_run_folder_that_is_a_file_is_refused_and_kept(tmp_path):
    (tmp_path / "run").write_text("notes")
    user_error(data.locked(tmp_path / "run").__enter__, names=["--out", tmp_path / "run"])
    assert (tmp_path / "run").read_text() == "notes"


def test_no_room_or_a_busy_folder_is_refused_before_any_work(runs, tmp_path, monkeypatch):
    """A full disk stops collect, train and plan before they start; a dataset being written by another collect, or a
    policy folder another trainer holds, is refused; nothing is written."""
    root, before = runs[0], tree(runs[0])
    with open(tmp_path / ".d.lock", "w") as f:  # a collect of tmp/d running in another process
        fcntl.flock(f, fcntl.LOCK_EX)
        user_error(collect, tmp_path / "d", episodes=4, steps=10, names=["another process", tmp_path / "d"])
    with data.locked(tmp_path / "p"):
        user_error(policy.train, tiny_policy(root / "data", tmp_path / "p"), names=[tmp_path / "p", "in use"])
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 12, 10 ** 12, 10 ** 7))
    user_error(collect, tmp_path / "d", episodes=4, steps=10, names=["disk"])
    user_error(train.main, *train_cfgs(root / "data", tmp_path / "run", "baseline"), names=["disk"])
    user_error(plan.main, tiny_plan(root / "baseline", tmp_path / "r.json"), names=["disk", "--out"])
    assert tree(runs[0]) == before and tree(tmp_path) == [".d.lock", "p", "p/.lock"]  # only what the test made


def test_writes_are_atomic_and_write_errors_name_the_file(tmp_path):
    (tmp_path / "target").write_text("mine")
    for name in ("a.tmp.json", ".a.tmp.json"):  # links planted where a fixed temp name would be
        (tmp_path / name).symlink_to(tmp_path / "target")
    data.atomic_write(path := tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "target").read_text() == "mine"
    for name in ("a.tmp.json", ".a.tmp.json", "target"):
        (tmp_path / name).unlink()

    def crash(tmp):
        tmp.write_text('{"x": ')
        raise OSError("killed")
    with pytest.raises(OSError):
        data.atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"x": 1} and tree(tmp_path) == ["a.json"]  # the old file, whole
    user_error(data.writable, tmp_path, "--out", names=["--out", tmp_path])  # a folder, not a file
    data.writable(tmp_path / "new" / "deeper" / "r.json", "--out")  # missing folders are made later: fine
    for content in (None, b"PK\x03\x04 truncated"):
        if content:
            (tmp_path / "x.pt").write_bytes(content)
        user_error(data.load_pt, tmp_path / "x.pt", "rebuild it", names=[tmp_path / "x.pt", "rebuild it"])


# ---- dino.py: the state-dict contract, forward vs a reference, interpolation, preprocessing, loading, the cache ------
def official_shapes(D=384, depth=12, reg=False, swiglu=False):
    """Key -> shape of the official checkpoints (facebookresearch/dinov2 hub/backbones.py), written out here."""
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


def randomize_(model, seed=1):
    """Every parameter random and away from its default (LN weights near 1, gammas in [0.1, 0.2], non-zero biases,
    large tokens), so swapped norms, a q/k mix-up or a missing LayerScale cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            elif name in ("cls_token", "pos_embed", "register_tokens", "mask_token") or name.endswith("bias"):
                p.copy_(0.5 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def reference_forward(sd, x, reg):
    """DINOv2's forward (dinov2/models/vision_transformer.py and layers/) from the state dict alone, with explicit
    softmax attention -> (prenorm, normed) tokens."""
    B, _, H, W = x.shape
    h0, w0, D = H // 14, W // 14, sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), 1)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)
    if reg:
        grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37), mode="bicubic")
    t = t + torch.cat((sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)), 1)
    if reg:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]), 1)
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


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A .pth in the official layout (keys and shapes from official_shapes) holding random values."""
    g = torch.Generator().manual_seed(2)
    sd = {k: torch.randn(s, generator=g) for k, s in official_shapes().items()}
    torch.save(sd, path := tmp_path_factory.mktemp("weights") / "dinov2_vits14_pretrain.pth")
    return path, sd


@pytest.mark.parametrize("name,D,depth,n_params", [
    ("dinov2_vits14", 384, 12, 22_056_576), ("dinov2_vitb14_reg", 768, 12, 86_583_552),
    ("dinov2_vitl14", 1024, 24, None), ("dinov2_vitg14", 1536, 40, None)])
def test_state_dict_keys_and_shapes_are_the_official_ones(name, D, depth, n_params):
    with torch.device("meta"):  # shapes only, no memory
        sd = dino.DinoVisionTransformer(name).state_dict()
    want = official_shapes(D, depth, reg=name.endswith("_reg"), swiglu="vitg" in name)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert n_params is None or sum(v.numel() for v in sd.values()) == n_params


def test_official_files_load_strictly_into_a_frozen_model(official_file, tmp_path):
    path, sd = official_file
    model = dino.load_dinov2("dinov2_vits14", str(path))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]  # cache headers know the weights by content
    assert dino.weights_tag(str(path)) == f"dinov2_vits14_pretrain.pth:{digest}"
    torch.save({"model": {k: v for k, v in sd.items() if k != "blocks.3.ls1.gamma"}}, tmp_path / "ckpt.pth")
    # a wrapped checkpoint is unwrapped, then strictly refused (naming the missing key); a missing file is named
    for file, missing in (("ckpt.pth", ["blocks.3.ls1.gamma"]), ("nope.pth", [])):
        user_error(dino.load_dinov2, "dinov2_vits14", str(tmp_path / file), names=[tmp_path / file, *missing])


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_forward_equals_the_reference(name):
    with torch.device("meta"):
        model = dino.DinoVisionTransformer(name)
    model, R = randomize_(model.to_empty(device="cpu")).eval(), 4 if name.endswith("_reg") else 0
    x = torch.randn(2, 3, 28, 42)  # non-square 2 x 3 grid: catches a row/column mix-up
    with torch.no_grad():
        out = model.forward_features(x)
        prenorm, normed = reference_forward(model.state_dict(), x, reg=R > 0)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["masks"] is None and out["x_norm_regtokens"].shape == (2, R, 384)
    assert out["x_prenorm"].shape == (2, 1 + R + 6, 384)
    torch.testing.assert_close(out["x_prenorm"], prenorm, atol=1e-4, rtol=1e-4)
    for key, want in (("x_norm_clstoken", normed[:, 0]), ("x_norm_regtokens", normed[:, 1:1 + R]),
                      ("x_norm_patchtokens", normed[:, 1 + R:])):
        torch.testing.assert_close(out[key], want, atol=1e-5, rtol=1e-5)


def test_plain_models_interpolate_positions_with_the_offset_rule():
    vits = cached_dinov2("dinov2_vits14", "random")
    pe = vits.pos_embed
    assert vits.interpolate_pos_encoding(37, 37) is pe  # 518 px: the stored table, unchanged
    for (h0, w0), n in {(14, 14): 197, (16, 16): 257, (2, 3): 7, (39, 39): 1 + 39 * 39, (43, 40): 1 + 43 * 40}.items():
        assert vits.interpolate_pos_encoding(h0, w0).shape == (1, n, 384)
    grid = pe[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    offset = F.interpolate(grid, scale_factor=(14.1 / 37, 14.1 / 37), mode="bicubic", align_corners=False)
    sized = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    table = vits.interpolate_pos_encoding(14, 14)
    torch.testing.assert_close(table[:, 1:], offset.flatten(2).transpose(1, 2), atol=0, rtol=0)
    assert torch.equal(table[:, 0], pe[:, 0])
    assert (table[:, 1:] - sized.flatten(2).transpose(1, 2)).abs().max() > 1e-3  # size= would change the features
    assert vits.interpolate_pos_encoding(14, 14) is table  # cached per grid


def test_register_models_interpolate_to_size_with_antialias():
    reg = dino.load_dinov2("dinov2_vits14_reg", "random")
    grid = reg.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 12), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(reg.interpolate_pos_encoding(16, 12)[:, 1:], want, atol=0, rtol=0)
    reg.load_state_dict({k: v + 1 for k, v in reg.state_dict().items()})  # new weights: no stale cached table
    torch.testing.assert_close(reg.interpolate_pos_encoding(16, 12)[:, 1:], want + 1, atol=1e-5, rtol=0)


def test_output_shapes_and_frozen_use():
    vits, x = cached_dinov2("dinov2_vits14", "random"), torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        out, cls = vits.forward_features(x), vits(x)
    assert {k: tuple(v.shape) for k, v in out.items() if v is not None} == {
        "x_norm_clstoken": (1, 384), "x_norm_regtokens": (1, 0, 384), "x_norm_patchtokens": (1, 256, 384),
        "x_prenorm": (1, 257, 384)}
    assert torch.equal(cls, out["x_norm_clstoken"])
    with pytest.raises(ValueError):  # sides must be multiples of 14
        vits.forward_features(torch.zeros(1, 3, 30, 28))
    z = dino.encode(vits, torch.zeros(3, 56, 56, 3, dtype=torch.uint8), size=28)
    assert z.shape == (3, 4, 384) and z.dtype == torch.float32
    norm = torch.nn.LayerNorm(384)
    norm(z).sum().backward()  # encode's output can feed a trained module (not an inference tensor)
    assert norm.weight.grad is not None


def test_preprocess_scales_to_minus_one_one_and_resizes_antialiased():
    frames = torch.zeros(2, 56, 56, 3, dtype=torch.uint8)
    frames[0], frames[1, :, :28] = 255, 255
    x = dino.preprocess(frames, size=28)
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.float32
    assert torch.all(x[0] == 1) and x[1].min() == -1 and x[1].max() == 1  # mean 0.5 / std 0.5 (DINO-WM)
    full = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
    want = F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(x, want)
    assert not torch.equal(want, F.interpolate(full, size=(28, 28), mode="bilinear", align_corners=False))
    torch.testing.assert_close(dino.preprocess(frames, size=56), full)  # already at size: untouched
    with pytest.raises(ValueError):  # float frames: the caller mixed up frames and preprocessed images
        dino.preprocess(full.permute(0, 2, 3, 1), size=28)


def test_random_init_is_deterministic_and_announced(capsys):
    rng = torch.get_rng_state()
    other = dino.load_dinov2("dinov2_vits14", "random")
    assert "RANDOM" in capsys.readouterr().err
    assert torch.equal(torch.get_rng_state(), rng)  # own generator: the caller's seeding is untouched
    a, b = cached_dinov2("dinov2_vits14", "random").state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["blocks.0.ls1.gamma"], torch.ones(384)) and torch.equal(a["norm.bias"], torch.zeros(384))
    assert 0.015 < a["blocks.0.attn.qkv.weight"].std() < 0.025 and 0.015 < a["pos_embed"].std() < 0.025


def test_weights_come_from_the_hub_cache_else_an_error_says_where_to_put_them(official_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache, no network
    calls = []

    def offline(url, dst, progress=True):
        calls.append((url, dst))
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    user_error(dino.load_dinov2, "dinov2_vits14", names=[cached, "--dino-weights", "random", url])
    assert calls == [(url, str(cached))]
    user_error(dino.load_dinov2, "dinov2_vits14_reg", names=["dinov2_vits14_reg4_pretrain.pth"])
    assert calls[1][0] == url.replace("pretrain", "reg4_pretrain")
    cached.write_bytes(official_file[0].read_bytes())  # as if downloaded: now found without the network
    assert torch.equal(dino.load_dinov2("dinov2_vits14").cls_token, official_file[1]["cls_token"]) and len(calls) == 2
    assert dino.weights_tag(None) == dino.weights_tag(str(official_file[0]))  # "" means that very file


def encode_cfg(root, **kw):
    return dino.EncodeConfig(**{**dict(data=str(root), dino_weights="random", size=28, batch_size=4, workers=0,
                                       device="cpu"), **kw})


def test_feature_cache_holds_the_encoders_tokens_and_is_never_complete_when_damaged(tmp_path, cached_dino):
    """The cache is the encoder's tokens, ignored for another size or weights; a damaged one is refused, and encode
    starts it again."""
    collect(root := tmp_path / "data", episodes=3, steps=7, img_size=32)  # 16 train frames
    dino.main(encode_cfg(root))
    load = functools.partial(dino.load_features, root, "train", size=28, weights="random")
    npy, head = root / "train" / "features.npy", json.loads((root / "train" / "features.json").read_text())
    feats = load()
    assert feats.shape == (16, 4, 384) and feats.dtype == np.float16
    assert head["done"] == head["frames"] == 16 and head["dtype"] == "float32" and head["images_per_s"] > 0
    frames = np.stack([render_state(s, 32) for s in data.load_split(root, "train")["states"]])
    np.testing.assert_allclose(feats, dino.encode(cached_dinov2("dinov2_vits14", "random"), frames, 28).numpy(),
                               atol=2e-2, rtol=1e-2)
    assert dino.load_features(root, "train", size=42, weights="random") is None  # another encoder input size
    assert dino.load_features(root, "train", size=28, weights="other.pth") is None  # other weights
    good = np.array(feats)
    os.truncate(npy, npy.stat().st_size - 100)
    user_error(load, names=[npy, f"dino.py encode --data {root} --split train"])  # the command that rebuilds it
    dino.main(encode_cfg(root))  # encode notices the damage and starts the split again
    np.testing.assert_array_equal(load(), good)
    mm = np.load(npy, mmap_mode="r+")
    mm[-1] = np.nan  # a header that says complete over rows that are not
    mm.flush()
    user_error(load, names=[npy])
    user_error(dino.cache_plan, encode_cfg(root, dtype="bfloat16"), "train", 384, "bfloat16",
               names=[root / "train" / "features.json", "'float32'", "'bfloat16'", "--overwrite"])


# ---- wm.py: state tokens, the token-source config, shapes, causal masks, VQ, learning, rollout, diagnostics ----------
SIZES = dict(cond_dim=8, latent_dim=8, depth=2, heads=2, dim_head=8, mlp_dim=32, idm_depth=1, idm_heads=2, idm_dim=16,
             idm_mlp_dim=32, num_codes=4, proprio_dim=3)


def tiny_wm(variant="baseline", **kw):
    """A world model over 4 tokens of width 16 per frame (the derived fields set by hand)."""
    return WMConfig(variant=variant, **{**SIZES, "visual_dim": 16, "num_patches": 4, **kw})


def batch(B=6, T=2, seed=0):
    """Random tokens z (B, T, 4, 16), actions (B, T, 10), proprio (B, T, 4)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 4, 16, generator=g), torch.randn(B, T, 10, generator=g), torch.randn(B, T, 4, generator=g)


def test_state_tokens_make_contact_look_the_same_wherever_the_t_is():
    rng = np.random.default_rng(0)
    s = np.c_[rng.uniform(50, 450, (5, 4)), rng.uniform(0, 6, 5), rng.normal(0, 50, (5, 2))]  # (N, 7)
    z = dino.state_tokens(s)
    assert z.shape == (5, 1, 12) and dino.state_tokens(torch.tensor(s)[None]).shape == (1, 5, 1, 12)
    phi = 1.3
    R = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])  # turns like the T's angle
    moved = s.copy()  # the same scene turned by phi and shifted
    moved[:, 0:2], moved[:, 2:4], moved[:, 5:7] = s[:, 0:2] @ R.T + 40, s[:, 2:4] @ R.T + 40, s[:, 5:7] @ R.T
    moved[:, 4] += phi
    zm = dino.state_tokens(moved)
    torch.testing.assert_close(zm[..., 6:10], z[..., 6:10], atol=1e-5, rtol=0)  # block frame: agent offset, speed
    assert (zm[..., :6] - z[..., :6]).abs().max() > 0.1  # the world frame does see where the T is


def test_state_tokens_weigh_20_degrees_like_20_px_without_wrap_around():
    s = np.array([[200.0, 200.0, 300.0, 300.0, 6.2, 0.0, 0.0]])
    turned, wrapped, shifted = s.copy(), s.copy(), s.copy()
    turned[0, 4] += math.radians(20)
    wrapped[0, 4] += math.radians(20) - 2 * math.pi  # the same pose, across the wrap-around
    shifted[0, 2] += 20
    z, zt, zw, zs = (dino.state_tokens(x)[0, 0] for x in (s, turned, wrapped, shifted))
    torch.testing.assert_close(zw, zt, atol=1e-5, rtol=0)
    assert abs((zt - z)[4:6].norm() / (zs - z)[:4].norm() - 1) < 0.02  # the angle part moves as far as the position


def test_token_source_config_and_input():
    meta, states = {"img_size": 64}, np.array([[200.0, 200.0, 300.0, 300.0, 1.0, 3.0, 4.0], PUSH])
    assert (mc := wm.derive(WMConfig(tokens="state", frameskip=4), meta)) == WMConfig(
        tokens="state", frameskip=4, action_dim=8, visual_dim=12, num_patches=1)
    x = dino.make_input(mc, CPU)(dino.batch_of_states(states, mc))  # (E, 1, 1, 12): state tokens, no frames
    torch.testing.assert_close(x, dino.state_tokens(states)[:, None])
    px = wm.derive(WMConfig(tokens="dinov2", dino_size=28, dino_name="dinov2_vitb14_reg"), meta)
    assert (px.visual_dim, px.num_patches, px.img_size, px.action_dim) == (768, 4, 64, 10)
    user_error(wm.derive, WMConfig(tokens="state", dino_size=28), meta, names=["--dino-size", "state"])
    user_error(wm.refuse_pixel_flags, WMConfig(tokens="state"), dino_weights="random", names=["--dino-weights"])
    wm.refuse_pixel_flags(WMConfig(tokens="dinov2"), dino_weights="random")  # pixel tokens read it


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_every_variant(variant):
    for n, proprio in ((1, False), (3, True)):
        m = WorldModel(tiny_wm(variant, num_hist=n, proprio=proprio))
        z, a, p = batch(T=n + 1)
        out = m(z, a, p)
        assert out["loss"].shape == () and out["cond"].shape == (6, n + 1, 8) and torch.equal(out["tokens"], z)
        if variant != "baseline":
            assert m.idm(z).shape == (6, n + 1, 16) and out["latent"].shape == (6, n, 8)
        if variant == "vq":
            assert out["codes"].shape == (6, n) and out["commit_loss"].shape == ()
        obs = m.observe(z, p)
        assert obs.shape == (6, n + 1, 4, 16 + 3 * proprio)
        assert m.predict(obs[:, :n], out["cond"][:, :n]).shape == (6, n, 4, 16 + 3 * proprio)
        plans = {"baseline": a[:, :1].expand(-1, 5, -1), "la": torch.randn(6, 5, 8), "vq": torch.randint(4, (6, 5))}
        cond = m.plan_to_cond(plans[variant])
        assert cond.shape == (6, 5, 8)
        zs, ps = m.rollout(z[:, 0], cond, p[:, 0] if proprio else None)
        assert zs.shape == (6, 5, 4, 16) and (ps.shape == (6, 5, 3) if proprio else ps is None)


def test_predictor_and_idm_outputs_do_not_see_later_frames():
    mask = wm.frame_causal_mask(2, 3)  # (T*P, T*P): token i sees token j iff frame(j) <= frame(i)
    assert mask.int().tolist()[1] == [1, 1, 0, 0, 0, 0] and mask[5].all() and not mask[0, 2:].any()
    m, x = WorldModel(tiny_wm("la", num_hist=3)).eval(), torch.randn(2, 4, 4, 16 + 8)
    y = x.clone()
    y[:, 2] = torch.randn(2, 4, 24)  # change frame 2 only (not by a constant: LayerNorm would remove it)
    a, b = m.predictor(x[:, :3]), m.predictor(y[:, :3])
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6) and not torch.allclose(a[:, 2], b[:, 2])
    u, v = m.idm(x[..., :16]), m.idm(y[..., :16])  # the IDM's temporal attention is causal too: u[t] sees <= t
    assert torch.allclose(u[:, :2], v[:, :2], atol=1e-5) and not torch.allclose(u[:, 2], v[:, 2])


def test_idm_last_block_updates_only_the_prompt_token_exactly():
    """The IDM's last block computes only the token it returns; the result equals running every block in full."""
    torch.manual_seed(0)
    idm, z = wm.IDM(16, 4, 16, 3, 2, 32).eval(), torch.randn(2, 3, 4, 16)  # (B, T, P, D)
    x = idm.proj(torch.cat([idm.action_prompt.expand(2, 3, 1, -1), z], 2)) + idm.pos
    for block in idm.blocks:
        x = block(x)  # every token of every block
    assert torch.allclose(idm(z), idm.head(x[:, :, 0]), atol=1e-5)


def clustered(seed=0):
    """(64, 8) inputs around 4 well-separated centres, rows 0..3 one of each."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 8, generator=g) + 3 * torch.randn(4, 8, generator=g).repeat(16, 1)


def test_vq_forward_is_the_nearest_code_and_backward_the_identity():
    torch.manual_seed(0)
    vq, x = wm.VectorQuantizer(4, 8, ema_decay=0.99, commitment=0.05), clustered()
    vq(x)  # the first training batch initialises the codebook
    E, x = vq.embedding.clone(), x.requires_grad_()  # (K, L) before this batch's EMA update
    q, codes, commit = vq(x)
    assert torch.equal(codes, torch.cdist(x, E).argmin(1)) and torch.allclose(q, E[codes], atol=1e-6)
    torch.testing.assert_close(commit, 0.05 * ((x - q) ** 2).mean())  # beta ||z_e - sg(z_q)||^2
    w = torch.randn_like(q)
    (q * w).sum().backward()
    assert torch.equal(x.grad, w)  # straight-through: the identity to the encoder output
    m = WorldModel(tiny_wm("vq"))
    m(*batch())["loss"].backward()  # ... so the gradient reaches the IDM through the quantiser
    assert m.idm.blocks[0].ff[1].weight.grad.abs().sum() > 0 and m.latent_action_down.weight.grad.abs().sum() > 0


def test_vq_first_batch_initialises_a_consistent_codebook():
    torch.manual_seed(0)
    vq, x = wm.VectorQuantizer(4, 8, ema_decay=1 - 1e-9, commitment=0.05), clustered()  # ~no EMA step: the init
    q, codes, _ = vq(x)
    assert vq.initialised and all((x - e).abs().sum(1).min() < 1e-6 for e in vq.embedding)  # E = 4 of its inputs
    torch.testing.assert_close(vq.embedding, vq.embedding_avg / vq.cluster_size[:, None])  # E = m / n, n = 1
    torch.testing.assert_close(q, vq.embedding[codes])


def test_vq_ema_moves_codes_to_their_cluster_means():
    torch.manual_seed(0)
    vq, x = wm.VectorQuantizer(4, 8, ema_decay=0.9, commitment=0.05), clustered()
    _, codes, _ = vq(x)
    gap = lambda: sum((vq.embedding[k] - x[codes == k].mean(0)).norm() for k in codes.unique())  # noqa: E731
    before = gap()
    for _ in range(20):
        _, codes, _ = vq(x)
    assert gap() < 0.2 * before


def test_dead_code_restarts_with_its_statistics():
    torch.manual_seed(0)
    vq, x = wm.VectorQuantizer(4, 8, ema_decay=0.99, commitment=0.05), torch.randn(32, 8)
    vq(x)
    vq.embedding[3], vq.embedding_avg[3], vq.cluster_size[3] = 1e3, 1e3 * 1e-5, 1e-5  # never selected, s_3 < 1e-3
    vq(x)
    assert (vq.embedding[3] - x).abs().sum(1).min() == 0  # revived as an input of this batch ...
    assert vq.cluster_size[3] == 1 and torch.equal(vq.embedding_avg[3], vq.embedding[3])  # ... with n = 1, m = E
    vq(x + 100)  # everything now far away; code 3 may or may not be picked, but must not jump back to 1e3
    assert vq.embedding[3].abs().max() < 200


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfit_one_batch(variant):
    torch.manual_seed(0)
    m, (z, a, p) = WorldModel(tiny_wm(variant, dropout=0.0, mlp_dim=64)), batch(B=8)
    opt, first = torch.optim.Adam(m.parameters(), lr=1e-2), None
    for _ in range(80):
        out = m(z, a, p)
        first = first or out["pred_loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["pred_loss"].item() < first / 10, (variant, first, out["pred_loss"].item())


def test_idm_carries_what_the_frame_lacks():
    """Next frame = frame + a per-sample offset that only the frame pair reveals (fresh samples every step, so no
    memorising): the IDM latent must carry it (la well below the action-free error ~1, shuffling it must hurt)."""
    g, held_out = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    def pair(gen, B=64):
        z0 = torch.randn(B, 4, 16, generator=gen)
        return torch.stack([z0, z0 + torch.randn(B, 1, 16, generator=gen)], 1)  # (B, 2, 4, 16)
    a, errors = torch.zeros(64, 2, 10), {}
    for variant in ("baseline", "la"):  # baseline with all-zero actions = no information about the offset
        torch.manual_seed(0)
        m = WorldModel(tiny_wm(variant, cond_dim=16, latent_dim=16, dim_head=16, mlp_dim=64, idm_dim=32, dropout=0.0))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        for _ in range(300):
            loss = m(pair(g), a)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        z = pair(held_out)
        errors[variant] = m.eval()(z, a)["visual_loss"].item()
    assert errors["baseline"] > 0.8 and errors["la"] < 0.6 * errors["baseline"], errors
    assert train.shuffle_delta(m, z, a) > 1.0  # la's predictor relies on the latent


def test_rollout_equals_single_steps():
    torch.manual_seed(0)
    m = WorldModel(tiny_wm("baseline", num_hist=3, proprio=True)).eval()
    z0, p0, cond = torch.randn(2, 4, 16), torch.randn(2, 4), torch.randn(2, 5, 8)
    zs, ps = m.rollout(z0, cond, p0)
    frames = [torch.cat([z0, m.embed_proprio(p0)[:, None].expand(-1, 4, -1)], -1)]  # (B, P, 19)
    for h in range(5):
        ctx = range(max(0, h - 2), h + 1)  # the last <= 3 frames
        x = torch.stack([torch.cat([frames[k], cond[:, k, None].expand(-1, 4, -1)], -1) for k in ctx], 1)
        frames.append(m.predictor(x)[:, -1, :, :19])
    want = torch.stack(frames[1:], 1)  # (B, H, P, 19)
    assert torch.allclose(zs, want[..., :16], atol=1e-5) and torch.allclose(ps, want[:, :, 0, 16:], atol=1e-5)


@pytest.mark.parametrize("shortcut", [True, False], ids=["dictated-by-conditioning", "conditioning-ignored"])
def test_diagnostics_known_answers(shortcut):
    m, (z, a, p) = WorldModel(tiny_wm("baseline")), batch(B=64)
    a[:, :, 0] = torch.arange(64.0)[:, None]  # the action names its sample; the encoder copies it to cond[..., 0]
    with torch.no_grad():
        m.action_encoder.weight.zero_(), m.action_encoder.bias.zero_()
        m.action_encoder.weight[0, 0] = 1.0
    g = torch.Generator().manual_seed(0)
    if shortcut:  # predicts the target of the sample the conditioning came from: only fixed points fail to win
        m.predict = lambda obs, cond: z[cond[:, 0, 0].round().long(), 1:]  # (B, n, P, D)
        assert train.swap_score(m, z, a, p, generator=g) > 0.95 and train.shuffle_delta(m, z, a, p, generator=g) > 1.0
    else:  # the context dictates
        m.predict = lambda obs, cond: z[:, 1:] + 0.01
        assert train.swap_score(m, z, a, p, generator=g) == 0 and abs(train.shuffle_delta(m, z, a, p, generator=g)) < 1e-6
    assert m.training  # the diagnostics restore the mode


def test_perplexity_known_answers():
    assert train.perplexity(torch.arange(8).repeat(5), 8) == (pytest.approx(8.0), 0)  # uniform usage: PPL = K
    assert train.perplexity(torch.full((40,), 3), 8) == (pytest.approx(1.0), 7)
    assert train.perplexity(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 6) == (pytest.approx(4.0, abs=1e-5), 2)


# ---- train.py (state tokens): exact resume, the run folder, moved data, settings on resume, lock, NaN guard, DDP -----
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 scripted episodes of 60 steps at 28 px (5 train, 1 val): the data of every stage's tests."""
    collect(root := tmp_path_factory.mktemp("pipeline") / "data", episodes=6, steps=60, img_size=28, seed=0,
            val_fraction=0.1)
    return root


def train_cfgs(root, out, variant="vq", steps=6, **kw):
    """A tiny state-token run: batch 4, validation and checkpoint every 3 steps."""
    cfg = train.TrainConfig(**{**dict(data=str(root), out=str(out), steps=steps, batch_size=4, eval_every=3,
                                      val_batches=2, stats_batches=2, log_every=2, num_workers=0, device="cpu",
                                      lr_predictor=1e-3, lr_action=1e-3, lr_idm=1e-3), **kw})
    return cfg, WMConfig(variant=variant, tokens="state", **SIZES)


@pytest.fixture(scope="module")
def vq_run(dataset):
    """A vq run of 6 steps (dropout 0.1: the RNG and the EMA both matter) -> (folder, its final state dict)."""
    raw = train.main(*train_cfgs(dataset, dataset.parent / "vq6"))
    return dataset.parent / "vq6", copy.deepcopy(raw.state_dict())


def test_resume_after_a_kill_is_bit_identical(vq_run, dataset, tmp_path, monkeypatch):
    calls, forward = [], WorldModel.forward

    def killed(self, *args):
        calls.append(self.training)
        if sum(calls) == 5:  # killed during the 5th train step: the step-3 checkpoint must survive
            raise KeyboardInterrupt
        return forward(self, *args)
    monkeypatch.setattr(WorldModel, "forward", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(*train_cfgs(dataset, tmp_path / "part"))
    monkeypatch.setattr(WorldModel, "forward", forward)
    assert torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["step"] == 3
    resumed = train.main(*train_cfgs(dataset, tmp_path / "part")).state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in vq_run[1].items())
    rows = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    kinds = [(r["step"], "loss" in r) for r in rows]  # a train row and a validation row per step at most
    assert len(kinds) == len(set(kinds)) and max(kinds)[0] == 6  # the rows logged after the kill are not repeated


def test_run_folder_holds_what_later_stages_need(vq_run):
    model, ckpt, root = wm.load_run(vq_run[0])
    assert ckpt["step"] == 6 and not model.training and model.quantizer.initialised
    assert root == vq_run[0].parent / "data" and ckpt["data"]["relative"] == "../data"
    assert (model.cfg.visual_dim, model.cfg.num_patches, model.cfg.tokens) == (12, 1, "state")
    assert set(ckpt["stats"]) >= {"action_mean", "action_std", "proprio_mean", "proprio_std", "latent_mean",
                                  "latent_std"} and len(ckpt["stats"]["latent_mean"]) == 8
    assert json.loads((vq_run[0] / "config.json").read_text())["model"]["visual_dim"] == 12
    assert len((vq_run[0] / "log.jsonl").read_text().splitlines()) >= 5


@pytest.fixture
def moved(vq_run, tmp_path):
    """The run and its dataset copied together elsewhere (their relative layout kept) -> the new run folder."""
    for name in ("data", "vq6"):
        shutil.copytree(vq_run[0].parent / name, tmp_path / "moved" / name)
    return tmp_path / "moved" / "vq6"


def test_a_run_moved_with_its_data_finds_it_and_resumes(moved):
    assert wm.load_run(moved)[2] == (moved.parent / "data").resolve()  # the relative path wins over the old one
    assert train.main(*train_cfgs(moved.parent / "data", moved, steps=7)) is not None


def test_a_run_takes_data_from_the_flag_and_checks_its_fingerprint(moved, tmp_path):
    shutil.move(moved.parent / "data", tmp_path / "elsewhere")
    ckpt = torch.load(moved / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "data": {**ckpt["data"], "root": str(tmp_path / "gone")}}, moved / "ckpt.pt")
    user_error(wm.load_run, moved, names=["--data"])  # found nowhere: the way out is named
    assert wm.load_run(moved, data_dir=str(tmp_path / "elsewhere"))[2] == (tmp_path / "elsewhere").resolve()
    other = write_dataset(tmp_path / "other", [12, 15])
    user_error(wm.load_run, moved, data_dir=str(other), names=[other, "--data"])  # another dataset: refused
    assert decode.main(tiny_decode(moved, data=str(tmp_path / "elsewhere")))["label_budget"]  # stages pass it on
    user_error(decode.main, tiny_decode(moved), names=["--data"])


def test_a_missing_or_old_checkpoint_is_refused(vq_run, tmp_path):
    user_error(wm.load_run, tmp_path, names=[tmp_path / "ckpt.pt", "train.py"])
    torch.save({**torch.load(vq_run[0] / "ckpt.pt", weights_only=True), "format": "old"}, tmp_path / "ckpt.pt")
    user_error(wm.load_run, tmp_path, names=[tmp_path / "ckpt.pt"])


@pytest.mark.parametrize("change,flag", [
    (lambda c, m, d: (replace(c, lr_predictor=5e-4), m), "--lr-predictor"),
    (lambda c, m, d: (c, replace(m, num_codes=8)), "--num-codes"),
    (lambda c, m, d: (c, replace(m, variant="la")), "--variant"),
    (lambda c, m, d: (replace(c, steps=2), m), "--steps"),  # below the step the run reached
    (lambda c, m, d: (replace(c, data=str(d)), m), "--data")], ids=["lr", "codes", "variant", "steps", "dataset"])
def test_resume_refuses_other_settings_and_leaves_the_run_alone(vq_run, dataset, windows_data, change, flag):
    before = (vq_run[0] / "ckpt.pt").read_bytes()
    user_error(train.main, *change(*train_cfgs(dataset, vq_run[0]), windows_data), names=[flag])
    assert (vq_run[0] / "ckpt.pt").read_bytes() == before


def test_resume_takes_a_raised_step_count_and_runtime_flags(dataset, tmp_path):
    cfg, mc = train_cfgs(dataset, tmp_path / "run", "baseline", steps=1, val_batches=1, stats_batches=1)
    train.main(cfg, mc)
    train.main(replace(cfg, steps=2, log_every=1, eval_every=2), mc)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["train_config"]["log_every"] == 1


def test_labels_only_training_draws_from_a_fixed_subset(dataset, tmp_path):
    """--labels N: the train stream visits exactly the N windows of the seeded subset (the same N for the same seed),
    the checkpoint records N; too many, too few, or labels for a run that learns without them are refused."""
    assert np.array_equal(data.label_subset(50, 7, 3), data.label_subset(50, 7, 3)) and len(set(
        data.label_subset(50, 7, 3))) == 7 and np.array_equal(data.label_subset(50, -1, 3), np.arange(50))
    cfg, mc = train_cfgs(dataset, tmp_path / "run", "baseline", steps=3, labels=12)
    cfg, mc, _, meta = train.open_run(cfg, mc, None)
    labels, loader = train.make_loaders(cfg, mc, CPU, contextlib.nullcontext(), 0, 0, 1)[:2]
    seen = {int(i) for i in itertools.islice(loader.batch_sampler.sampler, 120)}
    assert labels == 12 and seen == set(data.label_subset(len(loader.dataset), 12, cfg.seed).tolist())
    train.main(cfg, mc)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["stats"]["labels"] == 12
    windows = len(WindowDataset(dataset, "train", 2))
    user_error(train.main, *train_cfgs(dataset, tmp_path / "big", "baseline", labels=windows + 1), names=["--labels"])
    user_error(train.main, *train_cfgs(dataset, tmp_path / "la", "la", labels=10), names=["--labels"])
    user_error(train_cfgs, dataset, tmp_path / "zero", labels=0, names=["--labels"])
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_train_refuses_a_run_folder_in_use(dataset, tmp_path):
    with data.locked(tmp_path / "run"):
        user_error(train.main, *train_cfgs(dataset, tmp_path / "run"), names=[tmp_path / "run"])
    assert tree(tmp_path) == ["run", "run/.lock"]


def test_a_refused_train_leaves_no_run_folder(tmp_path):
    user_error(train.main, *train_cfgs(tmp_path / "no-data", tmp_path / "run"), names=[tmp_path / "no-data"])
    assert tree(tmp_path) == []


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    calls, forward = [], WorldModel.forward

    def poisoned(self, *args):
        out = forward(self, *args)
        calls.append(self.training)
        if self.training and sum(calls) == 5:  # the 5th train step (step 4) goes NaN
            out["loss"] = out["pred_loss"] = out["pred_loss"] * float("nan")
        return out
    monkeypatch.setattr(WorldModel, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="step 4"):
        train.main(*train_cfgs(dataset, tmp_path / "run", variant="baseline", steps=9))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3  # the last good one, kept


def preset_vq():
    """An initialised VQ whose codes are one input of each cluster of clustered(5)."""
    vq = wm.VectorQuantizer(4, 8, ema_decay=0.9, commitment=0.05)
    vq.embedding.copy_(clustered(5)[:4]), vq.embedding_avg.copy_(clustered(5)[:4]), vq.initialised.fill_(True)
    return vq


def ddp_worker(rank, root, tmp, port):
    """Rank `rank` of 2 (gloo): the VQ on its own batches, then 3 steps of train.main; states saved in tmp."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    torch.manual_seed(rank)  # the ranks draw different candidates: only rank 0's may count
    vq = wm.VectorQuantizer(4, 8, ema_decay=0.9, commitment=0.05)
    vq(clustered(rank))  # the first batch: initialise, then one EMA update
    torch.save(vq.state_dict(), f"{tmp}/first{rank}.pt")
    vq = preset_vq()
    vq(clustered(5)[32 * rank:32 * rank + 32])  # half of one batch each
    torch.save(vq.state_dict(), f"{tmp}/ema{rank}.pt")
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.save(train.main(*train_cfgs(root, f"{tmp}/run", steps=3)).state_dict(), f"{tmp}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp(dataset, tmp_path_factory):
    """Two gloo processes on the CPU (forked: no re-import; safe since OpenMP runs one thread) -> their folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(ddp_worker, args=(str(dataset), str(tmp), port), nprocs=2, start_method="fork")
    return tmp


def test_ddp_vq_first_batch_gives_every_rank_the_same_codebook(ddp):
    a, b = (torch.load(ddp / f"first{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_vq_ema_sums_counts_and_sums_over_ranks(ddp):
    ref = preset_vq()
    ref(clustered(5))  # one process, the whole batch
    for rank in (0, 1):
        got = torch.load(ddp / f"ema{rank}.pt", weights_only=True)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=f"rank {rank}: {k}")


def test_ddp_training_keeps_replicas_identical(ddp):
    """(DDP re-broadcasts buffers every step, so this alone would not catch a wrong VQ reduction: see above.)"""
    a, b = (torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["quantizer.initialised"]
    assert torch.load(ddp / "run" / "ckpt.pt", weights_only=True)["step"] == 3


# ---- decode.py: decoder shapes, learning a known map, early stopping, the stores, the run's report and codes --------
def tiny_decode(run, **kw):
    return DecodeConfig(**{**dict(run=str(run), pairs=64, val_pairs=16, max_epochs=2, code_states=8, workers=0,
                                  device="cpu"), **kw})


@pytest.fixture(scope="module")
def runs(dataset):
    """The shared pipeline: state-token runs baseline/la/vq (2 steps each) next to the dataset, decoders for la/vq
    -> (root, {variant: decode.main's report})."""
    root, reports = dataset.parent, {}
    for v in VARIANTS:
        train.main(*train_cfgs(dataset, root / v, v, steps=2, eval_every=2, val_batches=1, stats_batches=1))
        reports[v] = decode.main(tiny_decode(root / v))
        reports[v + "-adapter"] = v != "baseline" and decode.main(tiny_decode(root / v, head="adapter"))
    return root, reports


def fit_linear(seed, n_val, sign, cfg):
    """Fit a fresh ActionDecoder on pairs y = z W (val: sign * z W) -> (val RMSE of the kept weights, history, y)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 10, generator=gen)  # (L, A)
    tr, val = ({"p": torch.randn(n, 4, 8, generator=gen).half(), "z": (z := torch.randn(n, 4, generator=gen)),
                "y": s * z @ W} for n, s in ((4 * n_val, 1.0), (n_val, sign)))  # (N, P, D), (N, L), (N, A)
    torch.manual_seed(0)
    dec = ActionDecoder(8, 4, 10)
    fwd, loss, score = decode.objective("decoder", "la", {})
    hist = decode.fit(dec, tr, val, cfg, CPU, gen, fwd, loss, score)
    return (decode.predict(dec, val, CPU, fwd) - val["y"]).pow(2).mean().sqrt().item(), hist, val["y"]


def test_decoder_shapes_and_branches():
    torch.manual_seed(0)
    p, z = torch.randn(3, 7, 16), torch.randn(3, 4)  # (B, P, D), (B, L)
    plain, delta = ActionDecoder(16, 4, 10), ActionDecoder(16, 4, 10, use_delta=True)
    assert plain(p, z).shape == (3, 10) and delta(p, z, torch.randn(3, 7, 16)).shape == (3, 10)
    # The disabled branch is a learned constant, so the head always sees 128 + 128 + L features (seed).
    assert plain.head[1].in_features == delta.head[1].in_features == 2 * 128 + 4
    assert hasattr(plain, "d_const") and not hasattr(plain, "proj_d") and hasattr(delta, "proj_d")
    same = torch.randn(2, 1, 16).expand(2, 7, 16)  # (B, P, D): attention pooling is a convex combination
    assert torch.allclose(plain.pool(same), same[:, 0], atol=1e-5)


def test_decoder_learns_a_linear_latent_to_action_map():
    rmse, hist, y = fit_linear(0, 256, 1.0, DecodeConfig(run="r", batch_size=64, lr=1e-2, max_epochs=10))
    assert rmse < 0.1 * y.std().item(), hist[-3:]


def test_early_stopping_restores_the_best_weights():
    # Val targets are the negated train targets, so fitting the train set makes val RMSE worse: stop early.
    cfg = DecodeConfig(run="r", batch_size=64, max_epochs=50, patience=3)
    rmse, hist, _ = fit_linear(1, 128, -1.0, cfg)
    best = min(hist, key=lambda h: h["val"])
    assert len(hist) == best["epoch"] + cfg.patience < cfg.max_epochs
    assert abs(rmse - best["val"]) < 1e-5 and rmse < hist[-1]["val"]


class Store(torch.Tensor):
    """A tensor that, like a CUDA one, refuses an index on another device (the meta device itself would not)."""

    def __getitem__(self, idx):
        assert idx.device == self.device, f"a {self.device} store indexed with a {idx.device} index"
        return super().__getitem__(idx)


def test_take_gathers_each_store_where_it_lives():
    host = {k: torch.randn(5, *s) for k, s in (("p", (1, 12)), ("p_next", (1, 12)), ("z", (8,)), ("y", (10,)))}
    pairs = {k: torch.Tensor._make_subclass(Store, v.to("meta") if k == "p" else v) for k, v in host.items()}
    idx = torch.tensor([3, 0])  # a CPU index, as fit's randperm
    b = decode.take(pairs, idx, torch.device("meta"))  # tokens on the device, the rest in host memory
    assert {t.device.type for t in b.values()} == {"meta"} and b["p"].shape == b["p_next"].shape == (2, 1, 12)
    b = decode.take(host, idx, CPU)
    assert all(torch.equal(b[k], host[k][idx]) for k in host)


def test_code_picture_layout():
    steps = np.zeros((10, 5, 2))  # (K, F, 2)
    steps[3, :, 0] = 10.0  # code 3 pushes right by 50 px in total
    img = decode.draw_codes(steps, np.array([5, 0, 1, 9, 0, 0, 2, 0, 0, 1]), "test", cols=4, cell=100)
    assert img.shape == (60 + 3 * 100, 400, 3) and img.dtype == np.uint8
    cell3 = img[60:160, 300:400]  # code 3: row 0, column 3; its arrow is drawn in colour (B > R)
    assert ((cell3[..., 0].astype(int) - cell3[..., 2]) > 100).sum() > 20


def test_decode_reports_accuracy_and_what_each_vq_code_does(runs):
    report, run = runs[1]["vq"], runs[0] / "vq"
    assert report["label_budget"]["train_pairs"] == 64 and len(report["r2_per_dim"]) == 10
    assert report["tokens"] == "state" and report["variant"] == "vq"
    assert json.loads((run / "decode.json").read_text())["val_rmse_px"] == pytest.approx(report["val_rmse_px"])
    assert [c["code"] for c in report["codes"]] == [0, 1, 2, 3] and sum(c["usage"] for c in report["codes"]) == 16
    assert np.array(report["codes"][0]["mean_action_px"]).shape == (5, 2)
    assert (img := cv2.imread(str(run / "codes.png"))) is not None and img.shape[0] > 100


def test_decode_writes_no_codes_for_la_and_nothing_for_baseline(runs):
    root, reports = runs
    assert "codes" not in reports["la"] and not (root / "la" / "codes.png").exists()
    assert reports["baseline"] is None and not {"decode.json", "decoder.pt"} & set(tree(root / "baseline"))


def test_decoder_is_tied_to_its_world_model_checkpoint(runs):
    run = runs[0] / "vq"
    ckpt, saved = (torch.load(run / name, weights_only=True) for name in ("ckpt.pt", "decoder.pt"))
    ref = ActionDecoder(**saved["config"]["arch"])
    ref.load_state_dict(saved["model"])
    p, z = torch.randn(2, 1, 12), torch.randn(2, 8)  # (B, P, D), (B, L)
    assert torch.allclose(decode.load_head(run, ckpt, CPU)[0](p, z), ref.eval()(p, z))  # the saved weights
    user_error(decode.load_head, run, {**ckpt, "ckpt_id": "new"}, CPU, names=["decoder.pt", "decode.py"])
    user_error(decode.load_head, runs[0] / "baseline", ckpt, CPU, names=["decoder.pt", "decode.py"])


def test_decode_refuses_a_missing_checkpoint_or_changed_dataset_and_writes_nothing(runs, tmp_path):
    user_error(decode.main, tiny_decode(tmp_path), names=[tmp_path / "ckpt.pt"])
    ckpt = torch.load(runs[0] / "vq" / "ckpt.pt", weights_only=True)  # the dataset changed since training
    torch.save({**ckpt, "data": {**ckpt["data"], "relative": "gone", "fingerprint": "0" * 16}}, tmp_path / "ckpt.pt")
    user_error(decode.main, tiny_decode(tmp_path), names=["--data"])
    assert tree(tmp_path) == ["ckpt.pt"]


def test_vq_decoder_and_adapter_learn_from_the_codes_the_predictor_saw(runs):
    """vq's labelled pairs carry codebook vectors (what the decoder is fed when planning), never the pre-quantisation
    latents; the adapter's output is always one of the codes."""
    model, ckpt, root = wm.load_run(runs[0] / "vq")
    ds, E = dino.windows(model.cfg, root, "val", 2), model.quantizer.embedding  # (K, L)
    pairs = decode.build_pairs(model, ds, 16, dino.make_input(model.cfg, CPU), tiny_decode(runs[0] / "vq"),
                               contextlib.nullcontext(), CPU, torch.Generator().manual_seed(0), CPU)
    torch.testing.assert_close(pairs["z"], E[pairs["codes"]])  # straight-through: z_e + (z_q - z_e) = z_q
    adapter = decode.load_head(runs[0] / "vq", ckpt, CPU, "adapter")[0]
    out = adapter(pairs["p"].float(), pairs["y"])  # (N, L)
    assert torch.equal(out, E[(out[:, None] - E).abs().sum(-1).argmin(1)])


def test_heads_refuse_what_does_not_fit_the_run(runs, tmp_path):
    """--head adapter on a baseline, an adapter fitted for another checkpoint, --via adapter without an adapter, and
    routes a run cannot take: each refused naming the flag or file, nothing written."""
    root, before = runs[0], tree(runs[0])
    user_error(decode.main, tiny_decode(root / "baseline", head="adapter"), names=["--head adapter", "baseline"])
    ckpt = torch.load(root / "la" / "ckpt.pt", weights_only=True)
    user_error(decode.load_head, root / "la", {**ckpt, "ckpt_id": "new"}, CPU, "adapter", names=["adapter.pt"])
    (bare := tmp_path / "la").mkdir()
    shutil.copy(root / "la" / "ckpt.pt", bare)
    for run, via in ((bare, "adapter"), (root / "baseline", "adapter"), (root / "la", "actions")):
        user_error(plan.main, tiny_plan(run, tmp_path / "r.json", via=via),
                   names=["adapter.pt"] if run == bare else ["--via"])
    user_error(tiny_decode, root / "la", head="adapter", use_delta=True, names=["--use-delta"])
    assert tree(root) == before and tree(tmp_path) == ["la", "la/ckpt.pt"]


# ---- plan.py: planners on known costs and their update rules, batched = separate, rollout_cost, tasks, end to end ----
def test_the_ceilings_model_starts_where_the_env_is(dataset):
    """The ceiling's simulator-as-model replays recorded actions from the state the env reports to exactly the state
    the env reaches: the env placed the start (with set_state's extra physics step) and the model does not again."""
    split = data.load_split(dataset, "val")
    t = split["starts"][0] + 3  # mid-episode: the agent moves
    (env := PushT()).place(split["states"][t])
    start, acts = env.get_state(), split["actions"][t:t + 10]  # (7,), (10, 2)
    rollout(env, acts)
    assert np.abs(start[5:]).max() > 1 and plan.sim_costs(start, env.get_state(), acts[None]).item() == 0



def quadratic(target):
    """cost_fn for a quadratic bowl centred on target (E, H, A): samples (E, N, H, A) -> (E, N)."""
    return lambda x: (x - target[:, None]).square().sum((-1, -2))


def table_cost(table):
    """cost_fn for a separable lookup table (E, H, K): samples (E, N, H) -> (E, N) = sum_h table[e, h, idx_h]."""
    return lambda idx: torch.gather(table[:, None].expand(-1, idx.shape[1], -1, -1), 3, idx[..., None])[..., 0].sum(-1)


@pytest.mark.parametrize("planner,sigma,steps,kw,tol", [(plan.cem_gaussian, 3.0, 15, {}, 0.01),
                                                        (plan.mppi, 0.1, 30, dict(temperature=0.01), 0.05)],
                         ids=["cem_gaussian", "mppi"])
def test_gaussian_planners_find_a_quadratic_minimum(planner, sigma, steps, kw, tol):
    target = torch.randn(3, 3, 2, generator=torch.Generator().manual_seed(0)) * 2  # (E, H, A)
    mu = planner(quadratic(target), torch.zeros(3, 3, 2), torch.full((3, 3, 2), sigma), num_samples=100, topk=10,
                 opt_steps=steps, generator=torch.Generator().manual_seed(1), **kw)
    assert (mu - target).abs().max() < tol


def test_cem_gaussian_keeps_the_mean_as_sample_zero():
    seen, mu0 = [], torch.randn(2, 3, 2)  # (E, H, A)
    plan.cem_gaussian(lambda x: seen.append(x.clone()) or x.square().sum((-1, -2)), mu0, torch.ones(2, 3, 2),
                      num_samples=20, topk=5, opt_steps=2)
    assert torch.equal(seen[0][:, 0], mu0) and not torch.equal(seen[0][:, 1], mu0)


def test_cem_categorical_finds_a_table_argmin():
    E, H, K = 3, 4, 16  # K^H = 65536 sequences, 10 x 300 samples per episode
    table = torch.rand(E, H, K, generator=torch.Generator().manual_seed(0))  # (E, H, K)
    idx = plan.cem_categorical(table_cost(table), E, H, K, num_samples=300, topk=30, opt_steps=10,
                               generator=torch.Generator().manual_seed(1))
    assert idx.dtype == torch.long and idx.shape == (E, H) and torch.equal(idx, table.argmin(-1))


def test_cem_categorical_update_rule():
    """After one iteration whose 30 elites are all code 0 (K = 4), pseudocount 1 gives pi_MLE = (31, 1, 1, 1) / 34,
    momentum 0.7 on the OLD pi gives pi = 0.7/4 + 0.3 pi_MLE, and temperature 1.5 samples code 0 with probability
    pi_0^(2/3) / sum pi^(2/3) = 0.3767; the last 10 % of samples stay uniform."""
    seen, N = [], 50_000
    cost = lambda idx: seen.append(idx[0, :, 0]) or (idx[..., 0] != 0).float()  # noqa: E731  code 0 is cheapest
    plan.cem_categorical(cost, 1, 1, 4, num_samples=N, topk=30, opt_steps=2, generator=torch.Generator().manual_seed(0))
    pi = 0.7 / 4 + 0.3 * torch.tensor([31.0, 1, 1, 1]) / 34
    q0 = (pi[0] ** (1 / 1.5) / (pi ** (1 / 1.5)).sum()).item()
    model_part, uniform_part = seen[1][: N - N // 10], seen[1][N - N // 10:]
    assert abs((model_part == 0).float().mean().item() - q0) < 0.01
    assert abs((uniform_part == 0).float().mean().item() - 0.25) < 0.02


def test_cem_categorical_returns_the_best_sample_ever():
    calls = []

    def cost(idx):  # (E, N, H) -> (E, N): random costs in [0, 1) on the first call, [10, 11) afterwards
        c = torch.rand(idx.shape[:2], generator=torch.Generator().manual_seed(len(calls))) + 10 * bool(calls)
        calls.append((idx, c))
        return c
    best = plan.cem_categorical(cost, 2, 3, 8, num_samples=50, topk=5, opt_steps=4,
                                generator=torch.Generator().manual_seed(0))
    idx, c = calls[0]
    assert torch.equal(best, idx[torch.arange(2), c.argmin(1)])


@pytest.mark.parametrize("name", ["cem_gaussian", "mppi", "cem_categorical"])
def test_batched_planning_equals_separate_calls(name):
    """Per-episode generators: planning E episodes in one call equals E calls of one episode each."""
    E, H, A, K = 3, 4, 2, 8
    target = torch.randn(E, H, A, generator=torch.Generator().manual_seed(0))  # (E, H, A)
    table = torch.rand(E, H, K, generator=torch.Generator().manual_seed(0))  # (E, H, K)

    def solve(sl, seeds):
        kw = dict(num_samples=32, topk=4, opt_steps=3, generator=[torch.Generator().manual_seed(s) for s in seeds])
        if name == "cem_categorical":
            return plan.cem_categorical(table_cost(table[sl]), len(seeds), H, K, **kw)
        n = len(seeds)
        return getattr(plan, name)(quadratic(target[sl]), torch.zeros(n, H, A), torch.ones(n, H, A), **kw)
    batched = solve(slice(0, E), [10, 11, 12])
    assert torch.equal(batched, torch.cat([solve(slice(e, e + 1), [10 + e]) for e in range(E)]))
    assert not torch.equal(batched, solve(slice(0, E), [20, 21, 22]))  # the noise matters


@pytest.mark.parametrize("objective", ["last", "all"])
def test_rollout_cost_equals_per_sample_rollouts(objective):
    """One batched call over E*N plans equals rolling each plan out alone (ordering of the flattening), proprio on."""
    torch.manual_seed(0)
    model = WorldModel(WMConfig(visual_dim=8, num_patches=4, cond_dim=4, proprio=True, proprio_dim=3, depth=1,
                                heads=2, dim_head=4, mlp_dim=8)).eval()
    E, N, H = 2, 3, 4
    z0, zg, p0 = torch.randn(E, 4, 8), torch.randn(E, 4, 8), torch.randn(E, 4)  # (E, P, D), (E, P, D), (E, 4)
    pg, plans = torch.randn(E, 3), torch.randn(E, N, H, 10)  # (E, proprio_dim), (E, N, H, A)
    w = 2.0 ** torch.arange(H) / (2.0 ** torch.arange(H)).sum() / H  # DINO-WM objective "all"
    with torch.no_grad():
        cost = plan.rollout_cost(model, z0, zg, plans, p0, pg, alpha=0.5, objective=objective)  # (E, N)
        for e in range(E):
            for n in range(N):
                zs, ps = model.rollout(z0[e:e + 1], model.plan_to_cond(plans[e, n:n + 1]), p0[e:e + 1])
                err = (zs[0] - zg[e]).square().mean((-1, -2)) + 0.5 * (ps[0] - pg[e]).square().mean(-1)  # (H,)
                assert torch.allclose(cost[e, n], err[-1] if objective == "last" else (err * w).sum(), atol=1e-5)


def test_wilson_interval():
    assert plan.wilson(0, 10)[0] == 0 and 0.2 < plan.wilson(0, 10)[1] < 0.35
    lo, hi = plan.wilson(50, 100)
    assert 0.39 < lo < 0.41 and 0.59 < hi < 0.61


@pytest.mark.parametrize("protocol", ["open-loop", "mpc"])
def test_tasks_are_reproducible_and_their_replay_reaches_the_goal(dataset, tmp_path, protocol):
    a, b = (plan.make_tasks(dataset, "val", protocol, 6, 0, 28) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in ("episode", "step", "start_state", "goal_state", "goal_frame"))
    assert not np.array_equal(a["step"], plan.make_tasks(dataset, "val", protocol, 6, 1, 28)["step"])
    d = data.load_split(dataset, "val")
    g = d["starts"][a["episode"]] + a["step"]  # (n,) global start frames
    assert (a["step"] <= d["lengths"][a["episode"]] - 26).all() and np.array_equal(a["start_state"], d["states"][g])
    if protocol == "mpc":  # rows without replacement, goal = the recorded state 25 steps later
        assert len(set(zip(a["episode"], a["step"]))) == 6 and np.array_equal(a["goal_state"], d["states"][g + 25])
    ok, _, best, clips, _ = plan.run_policy(a, np.arange(6), lambda s: a["actions"], 25, protocol == "mpc", 28, [0])
    assert ok.all() and (best < 20).all()
    frames, hits = clips[0]
    assert len(frames) == len(hits) == 26 and hits[-1] and not hits[0]
    plan.write_video(tmp_path / "ep.mp4", frames, hits, a["goal_frame"][0])
    video = cv2.VideoCapture(str(tmp_path / "ep.mp4"))
    assert video.read()[1].shape == (256, 512, 3) and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 26
    assert not plan.run_policy(a, np.arange(6), lambda s: np.zeros((6, 25, 2)), 25, False, 28)[0].all()


def test_evaluate_does_not_depend_on_the_batch_size(dataset, tmp_path):
    tasks = plan.make_tasks(dataset, "val", "open-loop", 5, 0, 28)
    rng = np.random.default_rng(0)
    acts = np.where(rng.random((5, 1, 1)) < 0.5, tasks["actions"], rng.normal(0, 20, (5, 25, 2)))  # some succeed
    runs_ = [plan.evaluate(tasks, lambda idx: lambda s, idx=idx: acts[idx], E, 25, False, 28, tmp_path / f"{E}.json",
                           videos=1) for E in (2, 5)]
    assert runs_[0]["successes"] == runs_[1]["successes"] and 0 < sum(runs_[0]["successes"]) < 5
    np.testing.assert_array_equal(runs_[0]["final"], runs_[1]["final"])
    assert runs_[0]["solves"] == runs_[1]["solves"] == 5  # one solve per episode (open loop)
    assert tree(tmp_path) == ["2_ep000.mp4", "5_ep000.mp4"]


def tiny_plan(run, out, **kw):
    return plan.PlanConfig(**{**dict(run=str(run), out=str(out), episodes=3, num_samples=8, topk=2, opt_steps=2,
                                     ceiling_episodes=2, workers=1, device="cpu", videos=1), **kw})


PLANS = {"baseline-open-loop": {}, "la-mpc": dict(planner="mppi", la_prior="standard", batch_episodes=2),
         "vq-open-loop": dict(objective="all"), "vq-mpc": dict(via="adapter")}


@pytest.fixture(scope="module")
def planned(runs):
    """RESULTS.json of plan.main for each entry of PLANS, all in one results folder -> {name: path}."""
    out = {}
    for name, extra in PLANS.items():
        variant, protocol = name.split("-", 1)
        out[name] = runs[0] / "results" / f"{name}.json"
        plan.main(tiny_plan(runs[0] / variant, out[name], protocol=protocol, **extra))
    return out


@pytest.mark.parametrize("name", PLANS)
def test_end_to_end_results_json(runs, planned, name):
    variant, protocol = name.split("-", 1)
    r = json.loads(planned[name].read_text())
    assert {"success_rate", "successes", "episodes", "protocol", "planner", "seconds_per_solve", "variant", "run",
            "tokens", "reference", "ci95", "tasks", "config", "mean_final_pos_dist"} <= set(r)
    assert (r["variant"], r["protocol"], r["tokens"], r["run"]) == (variant, protocol, "state", str(runs[0] / variant))
    via = PLANS[name].get("via", "actions" if variant == "baseline" else "decoder")
    planners = {"baseline": "cem_gaussian", "la": "mppi", "vq": "cem_categorical"}
    assert r["via"] == via and r["planner"] == ("cem_gaussian" if via == "adapter" else planners[variant])
    # labels: the baseline's world model saw every labelled train window; la/vq's decoder or adapter 64 + 16 pairs
    windows = len(WindowDataset(runs[0] / "data", "train", 2))
    assert r["labels"] == (windows if variant == "baseline" else 80)
    assert r["episodes"] == len(r["successes"]) == len(r["tasks"]["start_state"]) == 3 and set(r["successes"]) <= {0, 1}
    assert r["success_rate"] == sum(r["successes"]) / 3 and r["ci95"][0] <= r["success_rate"] <= r["ci95"][1]
    ref = r["reference"]  # on the same tasks; the ceiling says on how many
    assert ref["replay"] == 1.0 and 0 <= ref["random"] <= 1 and 0 <= ref["ceiling"] <= 1
    assert ref["ceiling_episodes"] == 2 and len(ref["ceiling_successes"]) == 2
    assert r["seconds_per_solve"] > 0
    assert planned[name].with_name(f"{name}_ep000.mp4").stat().st_size > 0
    assert not planned[name].with_name(f"{name}_ep001.mp4").exists()  # --videos 1


def test_ceiling_is_cached_beside_the_results_and_shared(runs, planned, monkeypatch):
    assert len(list((runs[0] / "results" / "ceiling").glob("ceiling-*.json"))) == 2  # one per protocol budget
    ceil = [json.loads(planned[n].read_text())["reference"] for n in ("baseline-open-loop", "vq-open-loop")]
    assert ceil[0]["ceiling"] == ceil[1]["ceiling"] and ceil[0]["ceiling_successes"] == ceil[1]["ceiling_successes"]
    monkeypatch.setattr(plan.multiprocessing, "Pool", lambda *a: pytest.fail("the ceiling was solved again"))
    again = plan.main(tiny_plan(runs[0] / "baseline", runs[0] / "results" / "again.json", videos=0))
    assert again["reference"]["ceiling"] == ceil[0]["ceiling"]
    monkeypatch.undo()  # a damaged cache is solved again, not a traceback
    cache = sorted((runs[0] / "results" / "ceiling").glob("ceiling-*.json"))
    for c in cache:
        c.write_text('{"ceiling": ')
    again = plan.main(tiny_plan(runs[0] / "baseline", runs[0] / "results" / "again.json", videos=0))
    assert again["reference"]["ceiling"] == ceil[0]["ceiling"] and json.loads(cache[0].read_text())


# ---- eval.py: metric known answers, rollout = one step at h=1, METRICS.json, the tables, the plot, bad input ---------
def test_summary_and_linear_probe_known_answers():
    s = evaluate.summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4 and s["std"] == pytest.approx(1.2910, abs=1e-4)
    assert s["ci95"] == pytest.approx([2.5 - 1.96 * 1.2910 / 2, 2.5 + 1.96 * 1.2910 / 2], abs=1e-4)
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 10, generator=g), torch.randn(10, generator=g)  # (C, A), (A,)
    x_fit, x = torch.randn(400, 6, generator=g), torch.randn(200, 6, generator=g)  # (N, C)
    exact = evaluate.linear_probe(x_fit, x_fit @ W + b, x, x @ W + b, g)
    assert exact["mean"] > 0.999 and exact["n"] == 200 and exact["n_fit"] == 400 and len(exact["per_dim"]) == 10
    noise_ = evaluate.linear_probe(x_fit, torch.randn(400, 10, generator=g), x, torch.randn(200, 10, generator=g), g)
    assert noise_["mean"] < 0.05 and noise_["ci95"][0] < noise_["mean"] < noise_["ci95"][1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rollout_error_at_step_one_is_the_one_step_error(variant):
    torch.manual_seed(0)
    model = WorldModel(tiny_wm(variant, depth=1)).eval()
    z, a = torch.randn(5, 4, 4, 16), torch.randn(5, 4, 10)  # (B, H+1, P, D), (B, H+1, A)
    err = evaluate.rollout_mse(model, z, a)  # (B, H)
    assert err.shape == (5, 3)
    assert torch.allclose(err[:, 0], evaluate.one_step_mse(model, z[:, :2], a[:, :2])[0], atol=1e-5)
    # The error at h depends on the conditioning of steps < h only: changing the last action leaves h=1,2 alone.
    a2, z2 = a.clone(), z.clone()
    a2[:, 2], z2[:, 3] = 5.0, z2[:, 3] + 1.0  # baseline reads actions, la/vq read frames
    assert torch.allclose(evaluate.rollout_mse(model, z2, a2)[:, :2], err[:, :2], atol=1e-5)


def tiny_eval(runs_, out, **kw):
    return evaluate.EvalConfig(run=[str(r) for r in runs_], out=str(out), windows=12, horizon=2, probe_windows=16,
                               batch_size=8, workers=0, device="cpu", **kw)


def test_eval_metrics_side_by_side_with_a_plot(runs, tmp_path, capsys):
    metrics, _ = evaluate.main(tiny_eval([runs[0] / v for v in VARIANTS], tmp_path / "metrics.json"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
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


def test_eval_success_table_runs_from_floor_to_ceiling(planned, tmp_path, capsys):
    evaluate.main(evaluate.EvalConfig(results=[str(p) for p in planned.values()], out=str(tmp_path / "m.json")))
    out = capsys.readouterr().out
    assert "| protocol | random | baseline | la | vq | vq + adapter | ceiling | replay |" in out
    assert "against labelled transitions" not in out and not (tmp_path / "m_labels.png").exists()  # no sweep here
    table = json.loads((tmp_path / "m_success.json").read_text())
    assert list(table) == ["open-loop", "mpc"] and set(table["mpc"]) == {"random", "la", "vq + adapter", "ceiling",
                                                                         "replay"}
    r = json.loads(planned["vq-open-loop"].read_text())
    assert table["open-loop"]["vq"][0]["k"] == sum(r["successes"]) and table["open-loop"]["vq"][0]["n"] == 3
    assert table["open-loop"]["ceiling"][0]["n"] == 2 and table["open-loop"]["replay"][0]["rate"] == 1.0
    assert not (tmp_path / "m.json").exists()  # no run given: no metrics


def test_eval_draws_success_against_labels(planned, tmp_path, capsys):
    """A label sweep (one method at several label counts): a table with one row per method and one column per count,
    the largest heading the fractions, and a PNG of success against labels."""
    paths = [str(planned["vq-open-loop"])]
    for labels, k in ((20, 0), (200, 1), (2000, 3)):
        r = {**json.loads(planned["baseline-open-loop"].read_text()), "labels": labels,
             "successes": [1] * k + [0] * (3 - k)}
        (path := tmp_path / f"b{labels}.json").write_text(json.dumps(r))
        paths.append(str(path))
    evaluate.main(evaluate.EvalConfig(results=paths, out=str(tmp_path / "m.json")))
    out = capsys.readouterr().out
    assert "| method | 20 (1.0%) | 80 (4.0%) | 200 (10.0%) | 2,000 (all) |" in out
    assert "| baseline | 0.00 [0.00, 0.56] | – | 0.33 [0.06, 0.79] | 1.00 [0.44, 1.00] |" in out
    assert "| vq + decoder | – | " in out and (img := cv2.imread(str(tmp_path / "m_labels.png"))) is not None
    assert img.shape == (500, 760, 3)


def test_eval_warns_about_mixed_datasets_and_a_missing_decoder(runs, tmp_path, capsys):
    shutil.copytree(runs[0] / "data", d2 := tmp_path / "data2")  # a copy of the dataset, its states moved ...
    np.save(d2 / "val" / "states.npy", np.load(d2 / "val" / "states.npy") + 1e-3)
    fp = data._fingerprint({s: data.load_split(d2, s) for s in ("train", "val")})
    (d2 / "meta.json").write_text(json.dumps({**json.loads((d2 / "meta.json").read_text()), "fingerprint": fp}))
    ckpt = torch.load(runs[0] / "vq" / "ckpt.pt", weights_only=True)  # ... and a vq run on it, without decoder
    (tmp_path / "vq2").mkdir()
    torch.save({**ckpt, "data": {"root": str(d2), "relative": "../data2", "fingerprint": fp}},
               tmp_path / "vq2" / "ckpt.pt")
    evaluate.main(tiny_eval([runs[0] / "baseline", tmp_path / "vq2"], tmp_path / "m.json"))
    out = capsys.readouterr().out
    assert "trained on different datasets" in out and "missing or stale: run decode.py" in out


@pytest.mark.parametrize("content", ["{not json", json.dumps({"success_rate": 0.5})])
def test_eval_refuses_a_bad_results_file_and_writes_nothing(tmp_path, content):
    (tmp_path / "r.json").write_text(content)
    user_error(evaluate.main, evaluate.EvalConfig(results=[str(tmp_path / "r.json")], out=str(tmp_path / "m.json")),
               names=["--results", tmp_path / "r.json"])
    assert tree(tmp_path) == ["r.json"]


def test_every_command_line_reports_a_user_error_in_one_line(runs, tmp_path):
    """Exit status 2 and one stderr line that names the flag or file, no traceback, nothing written. The commands
    run side by side (each is a fresh interpreter: ~2 s of imports)."""
    root, bad = runs[0], tmp_path / "bad.json"
    bad.write_text("{not json")
    before = (root / "la" / "ckpt.pt").read_bytes()
    cases = {  # name: (argv, what the line must name)
        "collect": (["data.py", "collect", "--out", tmp_path / "c", "--episodes", 1], ["--episodes"]),
        "encode": (["dino.py", "encode", "--data", tmp_path / "c", "--size", 30], ["--size"]),
        "train": (["train.py", "--data", root / "data", "--out", root / "la", "--lr-predictor", 5e-5],
                  ["--lr-predictor"]),  # typed at its default, but the run has another value
        "decode": (["decode.py", "--run", tmp_path / "norun", "--device", "cpu"], [tmp_path / "norun" / "ckpt.pt"]),
        "plan": (["plan.py", "--run", root / "vq", "--planner", "mppi", "--out", tmp_path / "r.json",
                  "--device", "cpu"], ["--planner"]),  # mppi needs continuous plans
        "eval": (["eval.py", "--results", bad, "--out", tmp_path / "m.json", "--device", "cpu"], ["--results", bad])}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {k: subprocess.Popen([sys.executable, *map(str, argv)], cwd=HERE, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (argv, _) in cases.items()}
    failed = []
    for k, p in procs.items():
        err = p.communicate(timeout=300)[1]
        lines = err.strip().splitlines()
        named = len(lines) == 1 and all(str(n) in lines[0] for n in cases[k][1])
        if p.returncode != 2 or "Traceback" in err or not named:
            failed.append(f"{k}: exit {p.returncode}, stderr {err!r}")
    assert not failed, "\n".join(failed)
    assert (root / "la" / "ckpt.pt").read_bytes() == before and tree(tmp_path) == ["bad.json"]


def edited_data(tmp, root, edit):
    """A copy of the dataset at tmp/data, changed by edit(folder) -> the copy."""
    shutil.copytree(root / "data", d := tmp / "data")
    edit(d)
    return d


def edit_meta(**change):
    return lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()), **change}))


def nan_states(d):
    s = np.load(d / "val" / "states.npy")
    s[3, 2] = np.nan
    np.save(d / "val" / "states.npy", s)


def moved_states(d):  # arrays changed under an old meta.json: the fingerprint no longer matches
    np.save(d / "val" / "states.npy", np.load(d / "val" / "states.npy") + 1.0)


def foreign(t, name, text="{}"):
    """A folder of the user's holding one file."""
    (t / "mine").mkdir(exist_ok=True)
    (t / "mine" / name).write_text(text)
    return t / "mine"


def results_without_random(t, r):
    (t / "r.json").write_text(json.dumps(dict(success_rate=0.0, successes=[0], episodes=1, protocol="open-loop",
                                              planner="cem_gaussian", variant="baseline", via="actions", labels=1,
                                              reference={"replay": 1.0})))
    return t / "r.json"


TRAIN = ["train.py", "--variant", "baseline", "--tokens", "state", "--steps", 1, "--device", "cpu"]
PLAN = ["plan.py", "--episodes", 1, "--ceiling-episodes", 0, "--videos", 0, "--device", "cpu"]
# Hostile input, one case per row: (t = a temp folder, r = the shared runs) -> (argv, what the one error line must
# name). Every case must exit 2 with that line, no traceback, and leave every file as it was.
HOSTILE = {
    "plan-out-over-a-checkpoint": lambda t, r: ([*PLAN, "--run", r / "baseline", "--out", r / "baseline" / "ckpt.pt"],
                                                ["--out"]),
    "plan-out-over-a-users-json": lambda t, r: ([*PLAN, "--run", r / "baseline", "--out", r / "data" / "meta.json"],
                                                ["--out"]),
    "train-out-empty": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", ""], ["--out"]),
    "train-out-the-dataset": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", r / "data"], ["--out"]),
    "train-out-a-users-folder": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", foreign(t, "config.json")],
                                              ["--out"]),
    "policy-out-a-users-folder": lambda t, r: (["policy.py", "train", "--data", r / "data", "--steps", 1, "--out",
                                                foreign(t, "notes.txt")], ["--out"]),
    "seed-negative": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", t / "run", "--seed", -1], ["--seed"]),
    "seed-huge": lambda t, r: ([*PLAN, "--run", r / "baseline", "--out", t / "r.json", "--seed", 2 ** 40], ["--seed"]),
    "lr-inf": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", t / "run", "--lr-predictor", "inf"],
                            ["--lr-predictor"]),
    "var-scale-inf": lambda t, r: ([*PLAN, "--run", r / "baseline", "--out", t / "r.json", "--var-scale", "inf"],
                                   ["--var-scale"]),
    "img-size-absurd": lambda t, r: (["data.py", "collect", "--out", t / "d", "--img-size", 100000], ["--img-size"]),
    "jepa-flag-on-a-state-run": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", t / "run", "--jepa-dim", 32],
                                              ["--jepa-dim"]),
    "la-prior-on-vq": lambda t, r: ([*PLAN, "--run", r / "vq", "--out", t / "r.json", "--la-prior", "standard"],
                                    ["--la-prior"]),
    "meta-missing-a-key": lambda t, r: ([*TRAIN, "--data", edited_data(t, r, edit_meta(action_std=None)), "--out",
                                         t / "run"], ["meta.json"]),
    "meta-not-an-object": lambda t, r: ([*TRAIN, "--data", edited_data(t, r, lambda d: (d / "meta.json").write_text(
        "[1, 2]")), "--out", t / "run"], ["meta.json"]),
    "states-not-finite": lambda t, r: ([*TRAIN, "--data", edited_data(t, r, nan_states), "--out", t / "run"],
                                       ["states.npy"]),
    "arrays-changed-under-meta": lambda t, r: ([*PLAN, "--run", r / "baseline", "--out", t / "r.json", "--data",
                                                edited_data(t, r, moved_states)], ["fingerprint"]),
    "results-missing-keys": lambda t, r: (["eval.py", "--results", results_without_random(t, r), "--out",
                                           t / "m.json"], ["--results"]),
    "config-json-corrupt": lambda t, r: (["decode.py", "--run", foreign(t, "config.json", "{oops"), "--dry-run"],
                                         ["config.json"]),
    "labels-zero": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", t / "run", "--labels", 0], ["--labels"]),
    "labels-too-many": lambda t, r: ([*TRAIN, "--data", r / "data", "--out", t / "run", "--labels", 10 ** 6],
                                     ["--labels"]),
    "via-adapter-without-one": lambda t, r: ([*PLAN, "--run", r / "baseline", "--out", t / "r.json", "--via",
                                              "adapter"], ["--via"]),
    "head-adapter-on-a-baseline": lambda t, r: (["decode.py", "--run", r / "baseline", "--head", "adapter",
                                                 "--device", "cpu"], ["--head adapter"]),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_is_refused_in_one_line_and_loses_nothing(runs, tmp_path, monkeypatch, capsys, case):
    """Every row of HOSTILE: exit status 2 and one stderr line naming the flag or file, no traceback, and every file
    of the shared runs and of the temp folder exactly as it was."""
    argv, names = HOSTILE[case](tmp_path, runs[0])
    before = {p: p.read_bytes() for folder in (runs[0], tmp_path) for p in Path(folder).rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        run_script(monkeypatch, *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and all(str(n) in err[0] for n in names), err
    after = {p: p.read_bytes() for folder in (runs[0], tmp_path) for p in Path(folder).rglob("*") if p.is_file()}
    assert after == before


def test_pixel_tokens_end_to_end(dataset, tmp_path, cached_dino):
    """The DINOv2 path (random ViT-S/14 at 28 px, tokens computed on the fly): train la, decode, plan, eval."""
    cfg, mc = train_cfgs(dataset, tmp_path / "la", "la", steps=2, dino_weights="random", val_batches=1,
                         stats_batches=1)
    raw = train.main(cfg, replace(mc, tokens="dinov2", dino_size=28))
    assert (raw.cfg.visual_dim, raw.cfg.num_patches, raw.cfg.img_size) == (384, 4, 28)
    assert decode.main(tiny_decode(tmp_path / "la"))["tokens"] == "dinov2"
    res = plan.main(tiny_plan(tmp_path / "la", tmp_path / "r.json", episodes=2, ceiling_episodes=0, videos=0))
    assert res["tokens"] == "dinov2" and res["reference"]["ceiling"] is None and len(res["successes"]) == 2
    metrics, _ = evaluate.main(tiny_eval([tmp_path / "la"], tmp_path / "m.json"))
    assert metrics["la"]["tokens"] == "dinov2" and math.isfinite(metrics["la"]["rollout_mse"])


def test_features_in_memory_train_like_the_exact_ones(dataset, tmp_path, cached_dino, monkeypatch):
    """--features memory (every frame encoded once, int8 on the device) gives the step-0 validation of DINOv2 run on
    every batch (same weights, same val batches) to int8 precision, and trains; refused when memory is short."""
    rows = {}
    for features in ("off", "memory"):
        cfg, mc = train_cfgs(dataset, tmp_path / features, "la", steps=2, eval_every=2, dino_weights="random",
                             features=features)
        train.main(cfg, replace(mc, tokens="dinov2", dino_size=28))
        rows[features] = [json.loads(line) for line in open(tmp_path / features / "log.jsonl")]
    first = {k: v[0]["val_latent_mse"] for k, v in rows.items()}
    assert first["memory"] == pytest.approx(first["off"], rel=1e-2) and first["memory"] != first["off"]
    assert math.isfinite(rows["memory"][-1]["val_latent_mse"])
    monkeypatch.setattr(dino, "available_ram", lambda: 2 ** 30)  # 1 GiB: less than the spare training needs
    cfg, mc = train_cfgs(dataset, tmp_path / "small", "la", dino_weights="random", features="memory")
    user_error(train.main, cfg, replace(mc, tokens="dinov2", dino_size=28), names=["--features memory", "off"])
    assert not (tmp_path / "small" / "ckpt.pt").exists()


def test_feature_store_rounds_to_int8_per_token_after_channel_scaling():
    """Rows come back in the order asked; the measured error is the true one, under 1 % although one channel is 100x
    the others (one scale per token alone would lose ~13 %)."""
    x = torch.randn(10, 6, 384, generator=torch.Generator().manual_seed(0))  # (F, P, D)
    x[..., 7] *= 100
    store = dino.FeatureStore(10, 6, 384, "cpu")
    store.put(0, x[:4]), store.put(4, x[4:])
    back = store[np.array([9, 0, 4])]
    assert back.shape == (3, 6, 384) and len(store) == 10 and store.nbytes == 10 * 6 * (384 + 4)
    err = ((store[np.arange(10)] - x).norm() / x.norm()).item()
    assert store.error == pytest.approx(err, rel=1e-4) and err < 0.01
    assert (back - x[[9, 0, 4]]).norm() < 0.01 * x[[9, 0, 4]].norm()  # these rows, in this order


# ---- precision, fit, self-measurement: encode's dtype, the disk check, counted FLOPs, --dry-run, auto_batch ----------
SMALL = {**SIZES, "dino_size": 28}  # a tiny world model over 4 DINOv2 patches


def test_encode_runs_in_the_callers_precision():
    """No autocast inside encode: fp32 unless the caller opens one (then its dtype applies to the encoder)."""
    vits = cached_dinov2("dinov2_vits14", "random")
    frames = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        ref = vits.forward_features(dino.preprocess(frames, 28))["x_norm_patchtokens"]  # (2, 4, 384) fp32
    z = dino.encode(vits, frames, 28)
    assert z.dtype == torch.float32 and torch.equal(z, ref)  # bit-exact: nothing in between
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = dino.encode(vits, frames, 28)
    assert zb.dtype == torch.float32 and not torch.equal(zb, ref)  # the caller's bf16 reached the encoder
    torch.testing.assert_close(zb, ref, atol=0.1, rtol=0.05)


def test_cache_refused_up_front_when_the_disk_is_small(tmp_path, monkeypatch, cached_dino):
    collect(root := tmp_path / "data", episodes=3, steps=7, img_size=32)
    monkeypatch.setattr(dino.shutil, "disk_usage", lambda path: type("U", (), {"free": 10_000})())
    user_error(dino.main, encode_cfg(root), names=[root, "--features memory"])
    assert not list(root.glob("*/features.*"))  # nothing written, nothing half-written


def test_peak_memory_counts_what_ops_create():
    """A no-grad chain of 4 linears on 1000 x 1000: two activations of 4 MB are alive at once, parameters excluded."""
    with torch.device("meta"):
        net = torch.nn.Sequential(*[torch.nn.Linear(1000, 1000) for _ in range(4)])
    x = torch.zeros(1000, 1000, device="meta")
    with torch.no_grad():
        flops, peak = dino.measure(lambda: net(x))
    assert flops == 4 * 2 * 1000 ** 3 and peak == 2 * 4 * 1000 ** 2


@pytest.mark.parametrize("variant", ["baseline", "la"])
def test_counted_flops_match_the_layer_formula(variant):
    """FlopCounterMode on the real modules (meta tensors) agrees with train_flops' analytic count."""
    mc = wm.derive(WMConfig(variant=variant, **SMALL), {"img_size": 32})
    with torch.device("meta"):
        model = WorldModel(mc)
    z, a, p = (torch.zeros(3, 2, *s, device="meta") for s in ((4, 384), (10,), (4,)))
    flops, _ = dino.measure(lambda: model(z, a, p)["loss"].backward())
    assert flops / 3 == pytest.approx(train.train_flops(mc), rel=1e-2)  # small terms aside


def test_dry_runs_plan_a_recipe_without_data(tmp_path, monkeypatch, capsys):
    """train.py --dry-run needs no dataset and leaves RUN/config.json; decode.py and plan.py --dry-run plan from it.
    What does not fit is refused, naming the flag that changes it."""
    run, missing = tmp_path / "vq", tmp_path / "not-collected"
    train.main(train.TrainConfig(data=str(missing), out=str(run), batch_size=4, steps=100, eval_every=50,
                                 features="off", dry_run=True), WMConfig(variant="vq", **SMALL))
    assert json.loads((run / "config.json").read_text())["model"]["num_patches"] == 4
    plan.main(plan.PlanConfig(run=str(run), protocol="mpc", num_samples=20, topk=5, opt_steps=3, dry_run=True))
    decode.main(DecodeConfig(run=str(run), pairs=100, val_pairs=10, max_epochs=2, dry_run=True))
    dino.main(dino.EncodeConfig(data=str(missing), frames=1000, size=28, dry_run=True))
    out = capsys.readouterr().out
    for stage in ("train-vq", "plan-vq-mpc", "decode-vq", "encode"):
        assert f"estimate {stage}: " in out
    assert "DINOv2: on every batch (--features off)" in out and "50 episodes x 2 solve(s)" in out
    memory = train.TrainConfig(data=str(missing), out=str(tmp_path / "m"), features="memory", dry_run=True)
    user_error(train.main, memory, WMConfig(tokens="dinov2", **SMALL), names=[missing, "--frames"])
    train.main(replace(memory, frames=1000), WMConfig(tokens="dinov2", **SMALL))
    assert "DINOv2: 1,000 frames encoded once into 0.0 GB of int8 in GPU memory" in capsys.readouterr().out
    user_error(dino.main, dino.EncodeConfig(data=str(missing), dry_run=True), names=[missing, "--frames"])
    user_error(plan.main, plan.PlanConfig(run=str(tmp_path / "none"), dry_run=True),
               names=[tmp_path / "none" / "config.json"])
    monkeypatch.setattr(dino, "H200_BYTES", 2 ** 20)  # a 1 MiB "GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    user_error(train.main, train.TrainConfig(data=str(tmp_path), out=str(tmp_path / "b"), batch_size=4,
                                             features="off", dry_run=True), WMConfig(**SMALL),
               names=["train-baseline", "--batch-size"])


def test_auto_batch_is_the_flag_or_as_many_episodes_as_fit(monkeypatch):
    """--batch-episodes 0 on the CPU: episodes per solve from the counted peak of one episode and the available RAM
    (on this machine: every episode of a tiny plan); else the flag."""
    mc = wm.derive(WMConfig(variant="la", **SMALL), {"img_size": 32})
    model, cfg = WorldModel(mc).eval(), plan.PlanConfig(run="r", num_samples=300)
    assert plan.auto_batch(plan.PlanConfig(run="r", num_samples=8, topk=2), model, 7, CPU) == 7
    assert plan.auto_batch(plan.PlanConfig(run="r", batch_episodes=3), model, 7, CPU) == 3
    per_episode = plan.episode_memory(mc, cfg)[1]
    monkeypatch.setattr(dino, "available_ram", lambda: 10 * per_episode)
    assert plan.auto_batch(cfg, model, 100, CPU) == 5  # half of the free memory
    assert plan.auto_batch(plan.PlanConfig(run="r", batch_episodes=7), model, 100, CPU) == 7
    monkeypatch.setattr(dino, "available_ram", lambda: per_episode)
    user_error(plan.auto_batch, cfg, model, 100, CPU, names=["--num-samples"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    r = subprocess.run(["bash", str(HERE / "reproduce.sh"), "gpu-check", str(tmp_path / "g")], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "no CUDA device" in r.stdout
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("setting", ["FEATURES=disk", "STEPS=1e5"])
def test_full_refuses_a_bad_setting_before_writing(tmp_path, setting):
    name, value = setting.split("=")
    r = subprocess.run(["bash", str(HERE / "reproduce.sh"), "full", "--dry-run", str(tmp_path / "f")], text=True,
                       capture_output=True, env={**os.environ, name: value, "PYTHON": sys.executable}, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and setting in r.stderr and not (tmp_path / "f").exists()


def test_reproduce_refuses_another_dataset_on_a_finished_out(runs, tmp_path):
    """DATA=other on an OUT whose stages ran on another dataset: refused before any stage is skipped or run."""
    (done := tmp_path / "q" / ".done").mkdir(parents=True)
    (done / "dataset").write_text("0" * 16 + "\n")
    r = subprocess.run(["bash", str(HERE / "reproduce.sh"), "quick", str(tmp_path / "q")], text=True,
                       capture_output=True, timeout=60, env={**os.environ, "DATA": str(runs[0] / "data"),
                                                             "PYTHON": sys.executable})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "choose another OUT" in r.stderr
    assert (done / "dataset").read_text() == "0" * 16 + "\n" and sorted(os.listdir(done)) == ["dataset"]


# ---- policy.py (GCBC, GC-IQL): goal sampling, the success test as reward, IQL's targets, train -> eval, refusals -----
@pytest.fixture(scope="module")
def policy_data(tmp_path_factory):
    """6 episodes x 41 frames at 28 px (4 train, 2 val), with a random 4 x 384 'DINOv2' cache in dino.py's format."""
    collect(root := tmp_path_factory.mktemp("policy") / "data", episodes=6, steps=40, img_size=28, seed=0,
            val_fraction=1 / 3)
    rng, head = np.random.default_rng(0), dino.cache_header(root, "dinov2_vits14", 28, "random")
    for split in ("train", "val"):
        n = data.load_meta(root)["splits"][split]["frames"]
        np.save(root / split / "features.npy", rng.normal(0, 1, (n, 4, 384)).astype(np.float16))  # (F, P, D)
        (root / split / "features.json").write_text(json.dumps({**head, "frames": n, "done": n}))
    return root


def tiny_policy(root, out, **kw):
    return policy.TrainConfig(data=str(root), out=str(out), steps=6, batch_size=8, hidden=16, layers=1, log_every=3,
                              device="cpu", **kw)


def policy_eval(folder, out, **kw):
    return policy.evaluate_policy(policy.EvalConfig(**{**dict(policy=str(folder), out=str(out), episodes=2,
                                                              ceiling_episodes=0, videos=0, device="cpu"), **kw}))


def test_policy_goal_sampling_stays_in_the_episode(policy_data):
    end = policy.episode_ends(policy_data, "train")  # (F,)
    rng, t = np.random.default_rng(0), np.arange(0, len(end) - 30, 3)
    t = t[t + 29 <= end[t]]  # window starts: a chunk fits
    every = np.repeat(np.flatnonzero(np.arange(len(end)) < end), 50)  # every frame before its episode's last, 50x
    g = policy.actor_goals(rng, every, end, 25)
    assert (g <= end[every]).all() and (g == every + 25)[every + 25 <= end[every]].all()  # 25 ahead, capped at the end
    g = policy.actor_goals(rng, every, end, 0)  # uniform future (swm)
    assert ((g > every) & (g <= end[every])).all() and (g == end[every]).any()
    cfg, tt = tiny_policy(policy_data, "unused"), np.repeat(t, 200)
    g = policy.value_goals(rng, tt, end, cfg)
    assert np.mean(g == tt) == pytest.approx(cfg.p_current, abs=0.03)
    assert 0 < np.mean(end[g] != end[tt]) <= cfg.p_random  # only random goals leave the episode
    g = policy.value_goals(rng, tt, end, replace(cfg, p_random=0.0, p_future=0.8))
    assert ((g >= tt) & (g <= end[tt]) & (((g - tt) % 5 == 0) | (g == end[tt]))).all()  # whole macro steps ahead


def test_policy_reached_is_the_success_test():
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 512, (400, 7))
    g = s + rng.normal(0, 12, (400, 7)) * [1, 1, 1, 1, 0.02, 1, 1]  # near pairs: both verdicts occur
    g[:, 4] += 2 * np.pi * rng.integers(-1, 2, 400)  # angles that differ by whole turns
    want = np.array([is_success(a, b) for a, b in zip(g, s)])
    got = data.is_success(torch.tensor(g), torch.tensor(s)).numpy()  # batched, torch (IQL) and NumPy
    assert 0 < want.mean() < 1 and (got == want).all() and (data.is_success(g, s) == want).all()


def test_policy_iql_targets_and_expectile(policy_data):
    """At the goal the Bellman target is 0 (reward 0, episode over); the value loss is the tau-expectile loss."""
    cfg = tiny_policy(policy_data, "unused", algo="iql")
    mc = wm.derive(WMConfig(tokens="state"), data.load_meta(policy_data))
    torch.manual_seed(0)
    nets = policy.build(cfg, mc)
    s = torch.tensor(data.load_split(policy_data, "train")["states"][:8], dtype=torch.float32)  # (B, 7)
    z, a0 = dino.state_tokens(torch.stack([s, s], 1)), torch.randn(8, mc.action_dim)  # (B, 2, 1, 12), (B, A)
    with torch.no_grad():  # Q = Q_target = -3 and V = 0 everywhere
        for name, value in (("critic", -3.0), ("critic_target", -3.0), ("value", 0.0)):
            nets[name].mlp[-1].weight.zero_(), nets[name].mlp[-1].bias.fill_(value)
    value_loss, critic_loss, w, _ = policy.iql_losses(nets, z[:, 0], z[:, 1], a0, z[:, 0], s, s, z[:, 0], cfg)  # g = s
    assert critic_loss.item() == pytest.approx(9.0)  # (Q - 0)^2
    assert value_loss.item() == pytest.approx((1 - cfg.expectile) * 9)  # Q_target - V = -3 < 0: weight 1 - tau
    assert w.shape == (8,) and (w <= policy.AWR_CLIP).all()
    with torch.no_grad():
        nets["value"].mlp[-1].bias.fill_(-5.0)
    value_loss = policy.iql_losses(nets, z[:, 0], z[:, 1], a0, z[:, 0], s, s, z[:, 0], cfg)[0]
    assert value_loss.item() == pytest.approx(cfg.expectile * 4)  # Q_target - V = 2 > 0: weight tau


@pytest.mark.parametrize("algo,goal_steps,labels", [("gcbc", 25, -1), ("iql", 25, 12), ("gcbc", 0, -1)])
def test_policy_train_and_eval_state_tokens(policy_data, tmp_path, monkeypatch, algo, goal_steps, labels):
    """Train and evaluate under both protocols; --labels 12 trains on 12 // 5 = 2 chunks of 5 labelled transitions."""
    folder, seen, loader = tmp_path / f"{algo}{goal_steps}", [], data.loader
    monkeypatch.setattr(data, "loader", lambda ds, b, order, *a, **kw: loader(
        ds, b, (seen.append(i) or i for i in order) if kw.get("drop_last") else order, *a, **kw))
    assert policy.train(tiny_policy(policy_data, folder, algo=algo, goal_steps=goal_steps, labels=labels)) > 0
    assert policy.train(tiny_policy(policy_data, folder, algo=algo, goal_steps=goal_steps, labels=labels)) is None
    ck = data.load_pt(folder / "policy.pt", "")  # plain tensors and strings (weights_only)
    assert ck["tokens"] == "state" and ("critic" in ck) == (algo == "iql")
    assert (len(set(seen)), ck["labels"]) == ((2, 10) if labels > 0 else (len(set(seen)), len(
        WindowDataset(policy_data, "train", 2)))) and len(seen) == 6 * 8
    for protocol, n in (("open-loop", 3), ("mpc", 2)):
        out = tmp_path / "results" / f"{folder.name}-{protocol}.json"
        res = policy_eval(folder, out, episodes=n, protocol=protocol)
        r = json.loads(out.read_text())
        assert r == json.loads(json.dumps(res)) and len(r["successes"]) == r["episodes"] == n
        assert (r["planner"], r["variant"], r["tokens"], r["run"]) == (algo, algo, "state", str(folder))
        assert r["via"] == algo and r["labels"] == ck["labels"]
        assert r["protocol"] == protocol and 0 <= r["success_rate"] <= 1 and len(r["ci95"]) == 2
        assert set(r["reference"]) >= {"random", "replay", "ceiling", "ceiling_episodes"}
        assert r["budget"] == (50 if protocol == "mpc" else 25)
        # chunk-end goals run whole chunks; uniform-future goals re-query every macro step under mpc
        assert r["mpc_execute"] == (1 if protocol == "mpc" and goal_steps == 0 else 5)


def test_policy_on_a_dinov2_feature_cache(policy_data, tmp_path, cached_dino):
    """The dinov2 token source trains from the feature cache and evaluates with the (random) encoder on frames."""
    policy.train(tiny_policy(policy_data, tmp_path / "p", tokens="dinov2", dino_size=28, dino_weights="random",
                             patch_dim=2))
    r = policy_eval(tmp_path / "p", tmp_path / "r.json")
    assert r["tokens"] == "dinov2" and r["episodes"] == 2


def test_policy_refuses_another_token_source_or_dataset(policy_data, tmp_path):
    """Each refusal names the flag and both sides: token sources, or the datasets' fingerprints."""
    policy.train(tiny_policy(policy_data, p := tmp_path / "p"))
    before = (p / "policy.pt").read_bytes()
    other = write_dataset(tmp_path / "other", [31, 31], img_size=28)
    fp, theirs = data.load_meta(other)["fingerprint"], data.load_meta(policy_data)["fingerprint"]
    user_error(policy_eval, p, tmp_path / "r.json", tokens="dinov2", names=["--tokens", "dinov2", "state"])
    user_error(policy_eval, p, tmp_path / "r.json", data=str(other), names=["--data", fp, theirs, "state"])
    user_error(policy.train, tiny_policy(policy_data, p, tokens="dinov2"), names=["--tokens", "dinov2", "state"])
    user_error(policy.train, tiny_policy(other, p), names=["--data", other, fp, theirs])
    user_error(tiny_policy, policy_data, tmp_path / "q", p_random=0.5, names=["--p-*"])  # weights that do not sum to 1
    assert not (tmp_path / "r.json").exists() and (p / "policy.pt").read_bytes() == before


# ---- the jepa token source: SIGReg and VCReg known answers, the encoder, collapse statistics, a jepa run end to end --
def sigreg_of_zero(B):
    """SIGReg of B identical rows at 0, from its definition: B * sum_k w_k phi_k (1 - phi_k)^2."""
    t = torch.linspace(0, 3, dino.SIGREG_KNOTS, dtype=torch.float64)
    w = torch.full_like(t, 6 / (dino.SIGREG_KNOTS - 1))
    w[[0, -1]] /= 2
    phi = torch.exp(-t ** 2 / 2)
    return B * (w * phi * (1 - phi) ** 2).sum().item()


def test_sigreg_known_answers():
    """A standard normal batch scores ~1.06 whatever B (the integral of phi (1 - phi^2) over [-3, 3], the statistic's
    expectation); B rows at one point score B * 0.41 (LeWM's Push-T batch 128: ~52); a shrunk batch lies between."""
    torch.manual_seed(0)
    gauss = dino.sigreg(torch.randn(2048, 2, 16)).item()
    expect = math.sqrt(2 * math.pi) * (math.erf(3 / math.sqrt(2)) - math.erf(3 * math.sqrt(1.5)) / math.sqrt(3))
    assert abs(gauss - expect) < 0.25, (gauss, expect)
    assert abs(dino.sigreg(torch.zeros(128, 2, 16)).item() - sigreg_of_zero(128)) < 1e-3
    assert 50 < sigreg_of_zero(128) < 53
    assert gauss < dino.sigreg(0.3 * torch.randn(2048, 2, 16)).item() < sigreg_of_zero(2048)
    # The gradient that rescues a shrunk batch, and the one that vanishes at a collapsed one (why the encoder ends in
    # a BatchNorm): d SIGReg / d scale is large at 0.3 and zero at 0.
    s, z = torch.tensor([0.3, 0.0], requires_grad=True), torch.randn(512, 1, 16)
    (dino.sigreg(s[0] * z) + dino.sigreg(s[1] * z)).backward()
    assert s.grad[0] < -10 and s.grad[1].abs() < 1e-6


def test_vcreg_known_answers():
    """PLDM's terms: ~0 on a standard normal batch; std hinge 1 - sqrt(1e-4) = 0.99 on a collapsed one; the covariance
    term is 1 when all dims are the same unit-variance variable (every off-diagonal entry 1)."""
    torch.manual_seed(0)
    std, cov = dino.var_cov(torch.randn(2, 4096, 8))
    assert std < 0.02 and cov < 0.01
    std, cov = dino.var_cov(torch.zeros(2, 64, 8))
    assert abs(std - 0.99) < 1e-6 and cov == 0
    std, cov = dino.var_cov(torch.randn(1, 4096, 1).expand(-1, -1, 8))
    assert std < 0.02 and abs(cov - 1) < 0.1
    mc = WMConfig(tokens="jepa", jepa_reg="vcreg", jepa_temp_sim=0.0)
    assert abs(dino.vcreg(torch.zeros(64, 2, 8), mc).item() - 18 * 0.99) < 1e-4  # weighted: jepa_std * hinge


def test_jepa_encoder_shapes_and_gradient():
    """uint8 frames (B, T, S, S, 3) -> (B, T, 1, D); the final BatchNorm makes every dim's batch std 1 in training."""
    enc = dino.JEPAEncoder(img_size=32, dim=16, width=4)
    z = enc(torch.randint(0, 256, (6, 2, 32, 32, 3), dtype=torch.uint8))
    assert z.shape == (6, 2, 1, 16)
    assert torch.allclose(z.flatten(0, 2).std(0, unbiased=False), torch.ones(16), atol=1e-2)
    z.square().sum().backward()
    assert enc.convs[0].weight.grad.abs().sum() > 0


def test_token_stats_and_probe():
    """Isotropic tokens: effective rank ~D, not collapsed; constant tokens: collapsed, rank 1; a probe reads a linear
    code of the state exactly and a random code not at all."""
    torch.manual_seed(0)
    st = train.token_stats(torch.randn(4000, 1, 8))
    assert not st["collapsed"] and st["effective_rank"] > 7.8
    st = train.token_stats(torch.full((100, 1, 8), 3.0) + 1e-5 * torch.randn(100, 1, 8))
    assert st["collapsed"] and st["token_std_median"] < train.COLLAPSE_STD
    st = train.token_stats(torch.randn(1, 1, 8).expand(100, 1, 8) + 1e-5 * torch.randn(100, 1, 8))
    assert st["collapsed"]  # every frame the same token: collapsed, however much its dimensions differ
    y = train.probe_targets(torch.rand(400, 7) * torch.tensor([512, 512, 512, 512, 6.28, 1, 1]))  # (400, 6)
    z = (y @ torch.randn(6, 10, dtype=torch.float64))[:, None]  # (400, 1, 10) a linear code
    assert min(train.probe_r2(z[:200], y[:200], z[200:], y[200:]).values()) > 0.999
    assert max(train.probe_r2(torch.randn(200, 1, 10), y[:200], torch.randn(200, 1, 10), y[200:]).values()) < 0.2


def test_training_log_flags_a_collapsed_encoder(capsys):
    """train.py's validation reports collapsed = True and warns when every frame has (nearly) the same token."""
    z, state = torch.full((64, 1, 8), 0.5) + 1e-6 * torch.randn(64, 1, 8), torch.rand(64, 7)
    assert train.jepa_metrics(z, state)["collapsed"]
    assert "collapsed" in capsys.readouterr().out
    assert not train.jepa_metrics(torch.randn(64, 1, 8), state)["collapsed"]


JEPA = dict(tokens="jepa", depth=1, heads=2, dim_head=8, mlp_dim=32, dropout=0.0, jepa_dim=16, jepa_width=4)


@pytest.fixture(scope="module")
def jepa_run(tmp_path_factory):
    """A tiny jepa baseline run on 32-px frames (a few seconds) -> the folder of data/ and run/."""
    collect(root := tmp_path_factory.mktemp("jepa") / "data", episodes=12, steps=40, img_size=32, seed=0,
            val_fraction=0.1)
    raw = train.main(train.TrainConfig(data=str(root), out=str(root.parent / "run"), steps=4, batch_size=16,
                                       eval_every=4, val_batches=2, log_every=2, num_workers=0),
                     WMConfig(**JEPA, jepa_idm=1.0))
    assert raw.encoder is not None
    return root.parent


tiny_jepa_plan = functools.partial(tiny_plan, episodes=2, opt_steps=1, ceiling_episodes=0, videos=0)


def test_jepa_run_trains_and_plans(jepa_run):
    """train.py logs the regulariser and the collapse statistics; plan.py writes tokens "jepa" and the statistics;
    eval.py reports the probes and the exploitation gap."""
    run = jepa_run / "run"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("reg_loss" in r and "idm_loss" in r for r in rows)
    assert any("token_std_median" in r and "probe_agent" in r for r in rows)
    res = plan.main(tiny_jepa_plan(run, jepa_run / "res.json", allow_collapsed=True))
    assert res["tokens"] == "jepa" and "token_std_median" in res["token_stats"]
    metrics, _ = evaluate.main(evaluate.EvalConfig(run=[str(run)], out=str(jepa_run / "m.json"), windows=16,
                                                   probe_windows=32, batch_size=16, gap_tasks=3, workers=0))
    m = next(iter(metrics.values()))
    assert {"probe_agent", "effective_rank", "collapsed", "gap_cost_plan", "gap_plan_cheaper"} <= set(m)


def test_plan_refuses_a_collapsed_encoder(jepa_run):
    """Zero the projector's last layer: every frame maps to one token, and plan.py names the run and the way out."""
    ckpt, run = torch.load(jepa_run / "run" / "ckpt.pt", weights_only=True), jepa_run / "collapsed"
    for k in ("encoder.projector.4.weight", "encoder.projector.4.bias"):
        ckpt["model"][k].zero_()
    run.mkdir()
    torch.save(ckpt, run / "ckpt.pt")
    plan_cfg = functools.partial(tiny_jepa_plan, run, jepa_run / "r.json", data=str(jepa_run / "data"))
    user_error(plan.main, plan_cfg(), names=[run, "--allow-collapsed"])
    assert not (jepa_run / "r.json").exists()
    assert plan.main(plan_cfg(allow_collapsed=True))["token_stats"]["collapsed"]


def test_vq_on_jepa_tokens_trains_decodes_and_plans(jepa_run, tmp_path):
    """The IDM, VQ, decoder and categorical planner see only tokens: a vq run on jepa tokens goes end to end. The
    label-using IDM term is refused outside baseline."""
    user_error(WMConfig, tokens="jepa", variant="la", jepa_idm=1.0, names=["--jepa-idm"])
    train.main(train.TrainConfig(data=str(jepa_run / "data"), out=str(run := tmp_path / "vq"), steps=3, batch_size=16,
                                 eval_every=3, val_batches=1, stats_batches=1, log_every=3, num_workers=0),
               WMConfig(**JEPA, variant="vq", idm_depth=1, idm_heads=2, idm_dim=16, idm_mlp_dim=32, num_codes=4))
    decode.main(tiny_decode(run, max_epochs=1, code_states=4, device="auto"))
    res = plan.main(tiny_jepa_plan(run, tmp_path / "vq.json", allow_collapsed=True))
    assert res["tokens"] == "jepa" and res["planner"] == "cem_categorical"


# ---- the method end to end (state tokens): decoded IDM latents replay the recording, la plans from its own prior ----
@pytest.fixture(scope="module")
def la_run(tmp_path_factory):
    """A small la run on state tokens with its action decoder: ~30 s on one core."""
    collect(root := tmp_path_factory.mktemp("method") / "data", episodes=300, steps=100, img_size=224, seed=0,
            val_fraction=0.1)
    train.main(train.TrainConfig(data=str(root), out=str(root.parent / "la"), steps=600, batch_size=128,
                                 lr_predictor=2e-3, lr_action=2e-3, lr_idm=2e-3, eval_every=600, val_batches=4,
                                 stats_batches=8, log_every=300),
               WMConfig(variant="la", tokens="state", depth=2, heads=4, dim_head=32, mlp_dim=256, dropout=0.0,
                        idm_depth=1, idm_heads=4, idm_dim=64, idm_mlp_dim=128))
    for head in ("decoder", "adapter"):
        decode.main(DecodeConfig(run=str(root.parent / "la"), head=head, pairs=8000, val_pairs=1000))
    return root.parent / "la"


def test_method_decoded_latents_replay_the_recorded_transitions(la_run):
    """The IDM's latents of the 5 recorded transitions of a task, decoded by the planner's own decoding path
    (plan.decode_plan: step h from frame h) and executed in the simulator, must retrace the recording: the final
    error drops well below the start error. Decoding step h from frame h+1, or a decoder trained on the next macro
    step's action, leaves it near the start error."""
    model, ckpt, root = wm.load_run(la_run)
    decoder, stats = decode.load_head(la_run, ckpt, "cpu")[0], ckpt["stats"]
    tasks, split = plan.make_tasks(root, "val", "open-loop", 60, 0, 64), data.load_split(root, "val")
    g = split["starts"][tasks["episode"]] + tasks["step"]  # (n,) global start frames
    z = dino.state_tokens(split["states"][g[:, None] + 5 * np.arange(6)])  # (n, 6, 1, 12) recorded macro steps
    with torch.no_grad():
        pairs = torch.stack([z[:, :-1], z[:, 1:]], 2).flatten(0, 1)  # (n*5, 2, 1, 12)
        latents = model.conditioning(pairs)["latent"][:, 0].view(len(g), 5, -1)  # (n, 5, L)
        a = plan.decode_plan(model, decoder, z[:, 0], latents)  # (n, 5, A)
    acts = data.macro_to_env(a.numpy(), stats["action_mean"], stats["action_std"])  # (n, 25, 2)
    start, final = [], []
    for s0, goal, act in zip(tasks["start_state"], tasks["goal_state"], acts):
        (env := PushT()).place(s0)
        start.append(plan.distances(goal, env.get_state())[0])
        rollout(env, act)
        final.append(plan.distances(goal, env.get_state())[0])
    assert np.mean(final) < 0.6 * np.mean(start), (np.mean(final), np.mean(start))


def test_method_adapter_imagines_the_recorded_actions_to_the_goal(la_run):
    """Through the adapter (decode.py --head adapter), the 5 recorded macro actions of a task carry the imagined
    start to the goal: the imagined final tokens end far closer to the goal's than the start's are, and closer than
    the dataset-mean action gets. An adapter fitted on the next macro step's action misses."""
    model, ckpt, root = wm.load_run(la_run)
    adapter, stats = decode.load_head(la_run, ckpt, "cpu", "adapter")[0], ckpt["stats"]
    tasks = plan.make_tasks(root, "val", "open-loop", 60, 0, 64)
    z0, zg = (dino.state_tokens(tasks[k]) for k in ("start_state", "goal_state"))  # (n, 1, 12) each
    a = torch.as_tensor(data.env_to_macro(tasks["actions"], stats["action_mean"], stats["action_std"]),
                        dtype=torch.float32)  # (n, 5, A) the recorded macro actions
    with torch.no_grad():
        true, mean = (plan.rollout_cost(model, z0, zg, x[:, None], adapter=adapter)[:, 0] for x in (a, 0 * a))  # (n,)
    start = (z0 - zg).square().mean((-1, -2))  # (n,)
    # measured: 0.064 against 0.29 from the start and 0.33 for the mean action; next-step pairing: 0.138
    assert true.mean() < 0.35 * start.mean() and true.mean() < 0.35 * mean.mean(), (true.mean(), mean.mean(),
                                                                                   start.mean())


def test_method_la_planning_starts_from_the_runs_latent_prior(la_run, tmp_path, monkeypatch):
    """plan.py's Gaussian CEM over la latents starts from the IDM's own latent mean and std stored with the run,
    which differ from N(0, 1) (the seed's mis-scaled start)."""
    seen, cem_gaussian = [], plan.cem_gaussian

    def spy(cost_fn, mu, sigma, *args, **kw):
        seen.append((mu[0, 0].clone(), sigma[0, 0].clone()))
        return cem_gaussian(cost_fn, mu, sigma, *args, **kw)
    monkeypatch.setattr(plan, "cem_gaussian", spy)
    plan.main(plan.PlanConfig(run=str(la_run), out=str(tmp_path / "r.json"), episodes=2, num_samples=16, topk=4,
                              opt_steps=1, ceiling_episodes=0, videos=0))
    stats = wm.load_run(la_run)[1]["stats"]
    mean, std = torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"])
    assert seen and (mean.abs().max() > 0.2 or (std - 1).abs().max() > 0.2)  # the prior is not N(0, 1) here
    for mu, sigma in seen:
        torch.testing.assert_close(mu, mean), torch.testing.assert_close(sigma, std)


# ---- GPU only (skipped without CUDA): bf16 encoder vs fp32, compiled vs eager world model, auto_batch fits ----------
@CUDA
def test_gpu_bf16_encoder_matches_fp32(monkeypatch):
    """DINOv2 on Push-T frames under data.setup's precision: bf16 autocast by default, against --dtype float32 (fp32
    with TF32 off) as the reference."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)  # restored
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # (conv patch embedding)
    model = dino.load_dinov2("dinov2_vits14", "random", device="cuda")
    rng = np.random.default_rng(0)
    states = np.concatenate([rng.uniform(100, 400, (8, 4)), rng.uniform(0, 6, (8, 1)), np.zeros((8, 2))], 1)
    frames = torch.as_tensor(data.render_batch(states, 224))  # (B, S, S, 3)
    with torch.no_grad(), data.setup("cuda", 0, "float32")[1]:
        ref = model.forward_features(dino.preprocess(frames.cuda(), 196))["x_norm_patchtokens"]  # (B, P, D) fp32
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    with data.setup("cuda", 0, "bfloat16")[1]:
        z = dino.encode(model, frames, 196)  # (B, P, D)
    assert z.dtype == torch.float32 and z.shape == ref.shape == (8, 196, 384) and not torch.equal(z, ref)
    assert F.cosine_similarity(z, ref, dim=-1).min() > 0.999 and (z - ref).norm() / ref.norm() < 1e-2


@CUDA
def test_gpu_compiled_world_model_matches_eager(monkeypatch):
    """train.py's Module.compile of predictor and IDM (forward, loss, gradients) and plan.py's
    torch.compile(rollout_cost, dynamic=False) agree with eager fp32 on a tiny vq model with proprio."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    eager = WorldModel(tiny_wm("vq", proprio=True, dropout=0.0)).cuda()
    z, a, p = (t.cuda() for t in batch(B=8))
    eager(z, a, p)  # initialise the codebook first, so both copies start from the same state
    compiled = copy.deepcopy(eager)
    compiled.predictor.compile(), compiled.idm.compile()  # as train.py does; state_dict keys unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    outs = []
    for m in (eager, compiled):
        torch.manual_seed(1)  # restart candidates draw from the global RNG
        outs.append(m(z, a, p))
        outs[-1]["loss"].backward()
    assert torch.equal(outs[0]["codes"], outs[1]["codes"])
    for key in ("loss", "pred_loss", "commit_loss"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-4, atol=1e-5)
    for (name, w), w2 in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(w2.grad, w.grad, rtol=1e-3, atol=1e-5, msg=name)
    eager.eval(), compiled.eval()
    z0, zg = torch.randn(2, 2, 4, 16, device="cuda")  # (E, P, D) start and goal tokens
    p0, pg = torch.randn(2, 2, 4, device="cuda")  # (E, 4) start and goal proprio
    codes = torch.randint(4, (2, 16, 5), device="cuda")  # (E, N, H) plans of code indices
    with torch.no_grad():
        pg, cond = eager.embed_proprio(pg), eager.plan_to_cond(codes[:, 0])  # (E, proprio_dim), (E, H, C)
        for want, got in zip(eager.rollout(z0, cond, p0), compiled.rollout(z0, cond, p0)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        want = plan.rollout_cost(eager, z0, zg, codes, p0, pg, 1.0, "all")  # (E, N)
        got = torch.compile(plan.rollout_cost, dynamic=False)(eager, z0, zg, codes, p0, pg, 1.0, "all")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@CUDA
def test_gpu_auto_batch_fits_the_seed_sizes():
    """auto_batch at 300 samples, horizon 5, 196 tokens: the chosen E runs without running out of memory."""
    mc = wm.derive(WMConfig(variant="vq"), {"img_size": 224})
    model, cfg, device = WorldModel(mc).cuda().eval(), plan.PlanConfig(run="r"), torch.device("cuda")
    z, codes = plan.probe(mc, cfg, plan.auto_batch(cfg, model, 100, device), device)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        plan.rollout_cost(model, z, z, codes)
    assert torch.cuda.max_memory_allocated() < torch.cuda.get_device_properties(0).total_memory
