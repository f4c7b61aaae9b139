"""Push-T and its data: DINO-WM's simulator (pymunk 7, OpenCV frames), a scripted collector, an importer for
DINO-WM's `pusht_noise`, the window loader every stage trains on, and the plumbing all stages share.

Writes DIR/meta.json (format, source, seed, img_size, env and policy constants, fingerprint, action/proprio mean and
std over real train steps) and DIR/{train,val}/: states.npy float64 (F, 7) [agent_x, agent_y, block_x, block_y,
block_angle, agent_vx, agent_vy], episodes concatenated; actions.npy float32 (F, 2) px, action t applied at state t
(an episode's last one leads nowhere); lengths.npy int64 (E,); optional frames.npy uint8 (F, S, S, 3), else frames
are rendered from states when read. Same arguments on an existing DIR: a no-op; any other existing DIR: an error.
  tiny:   python data.py collect --out runs/tiny/data --episodes 20 --steps 60 && python data.py info runs/tiny/data
  full:   python data.py collect --out data/pusht --episodes 10000 --steps 100   (CPU, one worker per core; 65 MB)
  import: python data.py import-dinowm --src pusht_noise --out data/dinowm [--keep-frames]
"""
import argparse
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import cv2
import numpy as np
import pymunk
import torch
from tqdm import tqdm

@dataclass
class CollectConfig:
    out: str = ""  # dataset folder to create (required)
    episodes: int = 100  # episodes in train + val
    steps: int = 100  # env steps per episode (frames = steps + 1)
    img_size: int = 224  # frame side in px when frames are read; DINO-WM renders 224
    seed: int = 0  # episode i starts from reset(seed + i)
    workers: int = 0  # processes, 0 = one per CPU core; the output does not depend on it
    val_fraction: float = 0.1  # the last episodes form val (at least 1)

    def __post_init__(self):
        require(self.out, "--out DIR is required: the dataset folder to create")
        require(self.episodes >= 2 and self.steps >= 1, f"--episodes {self.episodes} / --steps {self.steps}: need at "
                                                        "least 2 episodes of 1 step")
        require(14 <= self.img_size <= MAX_IMG and self.workers >= 0 and 0 < self.val_fraction < 1 and
                self.episodes * (self.steps + 1) <= 10 ** 8, f"--img-size in 14..{MAX_IMG}, --workers >= 0, "
                "--val-fraction in (0, 1), --episodes x --steps up to 10^8 frames")
        check_choices(self)
        require(self.seed + self.episodes <= 2 ** 32, f"--seed {self.seed}: episode i resets with seed + i < 2^32")


@dataclass
class ImportConfig:
    src: str = ""  # DINO-WM's pusht_noise folder with train/ and val/ (required)
    out: str = ""  # dataset folder to create (required)
    keep_frames: bool = False  # decode the mp4s into frames.npy (large) instead of rendering frames from states

    def __post_init__(self):
        require(self.src and self.out, "--src PUSHT_NOISE_DIR and --out DIR are required")


@dataclass
class InfoConfig:
    root: str = field(default="", metadata={"positional": True})  # dataset folder: python data.py info DIR


@dataclass
class FigureConfig:
    out: str = "assets/pusht.png"  # PNG path
    seed: int = 5  # episode seed

    def __post_init__(self):
        check_choices(self)


# Shapes: F frames in a split, E episodes, T frames in a window, S image side, A = 2 * frameskip macro-action width.
FORMAT = "pusht-v1"
SUCCESS_PX, SUCCESS_ANGLE = 20.0, math.pi / 9  # DINO-WM eval_state: joint agent + block position, block angle
MAX_IMG = 1024  # largest frame side in px a dataset or run may ask for (DINO-WM renders 224)
MAX_WORKERS = 4 * (os.cpu_count() or 1)  # more processes than this only wait for the ones already running
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)  # reported, not tracebacks
WORLD = 512  # world = canvas, px, origin top-left, y down (DINO-WM env/pusht/pusht_env.py window_size)
SIM_HZ, CONTROL_HZ = 100, 10  # 10 physics substeps of 0.01 s per env step (DINO-WM pusht_env.py)
DT = 1.0 / SIM_HZ
KP, KV = 100, 20  # PD gains of the pusher (DINO-WM pusht_env.py); critically damped, omega = 10 rad/s
AGENT_RADIUS = 15
T_CAP = np.array([(-60, 30), (60, 30), (60, 0), (-60, 0)], np.float64)  # add_tee with its hard-coded scale 30
T_STEM = np.array([(-15, 30), (-15, 120), (15, 120), (15, 30)], np.float64)
T_OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], np.float64)
WALLS = [((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506))]  # radius 2
GOAL_POSE = (256.0, 256.0, math.pi / 4)  # the green anchor T: drawn only, not the task goal (pusht_env.py goal_pose)
PROPRIO = [0, 1, 5, 6]  # proprio = [agent_x, agent_y, agent_vx, agent_vy] (DINO-WM pusht_dset.py)
# RGB colours as pusht_env.py draws (pymunk SpaceDebugDrawOptions); "light" = colour x 1.2 capped at 255, rounded.
GOAL_RGB, BLOCK_RGB, BLOCK_LIGHT = (144, 238, 144), (119, 136, 153), (143, 163, 184)
AGENT_RGB, AGENT_LIGHT, WALL_RGB = (65, 105, 225), (78, 126, 255), (211, 211, 211)
ENV = dict(world=WORLD, sim_hz=SIM_HZ, control_hz=CONTROL_HZ, kp=KP, kv=KV, agent_radius=AGENT_RADIUS,
           block_mass=1, block_moment=3000.0, block_cog=[0.0, 45.0], goal_pose=list(GOAL_POSE), pymunk=pymunk.version)
# Scripted contact-seeking pusher: our design (DINO-WM's noisy expert demonstrations cannot be regenerated).
POLICY = dict(  # stored in meta.json; judged by `info`'s statistics
    wander_prob=0.15,  # chance that a new plan is a random walk instead of a push
    wander_steps=[3, 10],  # length of a random walk, env steps
    wander_std=20.0,  # px per axis per step of a random walk; DINO-WM's ACTION_STD x 100 is about 20 px
    candidates=2,  # a push starts at the nearest of this many random contacts (shorter walks, consecutive pushes)
    standoff=[20.0, 30.0],  # px from the T's outline to the agent's centre before a push starts
    push_angle=35.0,  # deg; push direction = inward edge normal turned by U(-35, 35) for varied contacts
    push_cmd=[10.0, 30.0],  # px commanded per step while pushing (steady speed = KP/KV/10 x that per step)
    push_steps=[4, 16],  # length of a push, env steps
    approach_cmd=32.0,  # px cap on the per-step command while moving to the stand-off point
    approach_timeout=30,  # env steps before an unreachable stand-off point is given up
    detour_radius=110.0,  # px around the T's CoG to circle along when the straight path would hit it
    noise_std=6.0,  # px per axis of Gaussian noise on every command
    margin=25.0,  # targets are kept in [margin, 512 - margin]^2: the kinematic agent would pass the walls
)


def _world(local, x, y, th):
    """Body-local points (N, 2) -> world (N, 2) for a body origin at (x, y) turned by th (y down: clockwise)."""
    c, s = math.cos(th), math.sin(th)
    return local @ np.array([[c, s], [-s, c]]) + (x, y)  # (N, 2) = R(th) v + p


@functools.lru_cache(maxsize=1)
def _background():
    """The state-independent layer at 512 px: white and the green anchor T (no outline); walls go on top later."""
    canvas = np.full((WORLD, WORLD, 3), 255, np.uint8)  # (512, 512, 3)
    for poly in (T_CAP, T_STEM):
        cv2.fillPoly(canvas, [np.rint(_world(poly, *GOAL_POSE)).astype(np.int32)], GOAL_RGB)
    return canvas


def render_state(state, img_size=224):
    """RGB frame (S, S, 3) uint8 of a state's first 5 numbers (pusht_env.py _render_frame): drawn at 512 px in pymunk's
    debug-draw order (block cap, stem, agent, walls), then cv2.resize to S (INTER_LINEAR, no anti-aliasing); without
    DINO-WM's red contact marks, so a frame depends on the state only. About 7,000 frames/s at 224 px on one core."""
    canvas = _background().copy()  # (512, 512, 3)
    for poly in (T_CAP, T_STEM):  # each rectangle filled, then outlined: the dark seam is upstream's
        # World pixels rounded half-to-even, as pygame's to_pygame (Python round) does.
        pts = np.rint(_world(poly, state[2], state[3], state[4])).astype(np.int32)  # (4, 2)
        cv2.fillPoly(canvas, [pts], BLOCK_LIGHT)
        cv2.polylines(canvas, [pts], True, BLOCK_RGB, 4)  # pygame's fat segments of radius 2
    centre = (round(state[0]), round(state[1]))
    cv2.circle(canvas, centre, AGENT_RADIUS, AGENT_RGB, -1)
    cv2.circle(canvas, centre, AGENT_RADIUS - 4, AGENT_LIGHT, -1)
    for a, b in WALLS:  # pygame fat segments of radius 2: 4-px lines with round caps
        cv2.line(canvas, a, b, WALL_RGB, 4)
    return canvas if img_size == WORLD else cv2.resize(canvas, (img_size, img_size), interpolation=cv2.INTER_LINEAR)


def distances(goal, state):
    """The success test's terms for (..., 7) states, NumPy or torch: ||d[agent_xy, block_xy]|| px, |d angle| <= pi."""
    if not torch.is_tensor(state):
        goal, state = np.asarray(goal, np.float64), np.asarray(state, np.float64)
    d = (goal[..., 4] - state[..., 4]) % (2 * math.pi)
    ang = torch.minimum(d, 2 * math.pi - d) if torch.is_tensor(d) else np.minimum(d, 2 * math.pi - d)
    pos = ((goal[..., :4] - state[..., :4]) ** 2).sum(-1) ** 0.5
    return (float(pos), float(ang)) if pos.ndim == 0 else (pos, ang)


def is_success(goal_state, state):
    """DINO-WM's eval_state (pusht_env.py): position error < 20 px, angle error < pi / 9; batched, NumPy or torch."""
    pos, ang = distances(goal_state, state)
    return (pos < SUCCESS_PX) & (ang < SUCCESS_ANGLE)


class PushT:
    """Push-T with DINO-WM's physics (env/pusht/pusht_env.py, with_velocity=True), quirks included. State (7,):
    [agent_x, agent_y, block_x, block_y, block_angle mod 2 pi, agent_vx, agent_vy] (px, rad, px/s). Action (2,): PD
    target offset in px relative to the agent (DINO-WM's env action x action_scale 100)."""

    def __init__(self, img_size=224):
        self.img_size = img_size
        self._build()

    def _build(self):
        """A fresh space, built in DINO-WM's _setup() order (walls, agent, block), which fixes contact order."""
        self.space = space = pymunk.Space()
        space.damping = 0  # QUIRK (DINO-WM _setup): bodies lose all velocity every substep; the T stops dead
        space.add(*[pymunk.Segment(space.static_body, a, b, 2) for a, b in WALLS])
        # QUIRK: the agent is KINEMATIC (infinite mass): it passes through walls and can push the T through them.
        # Gravity (0, 0) and friction and elasticity 0 are pymunk's defaults; DINO-WM's `body.friction = 1` is a no-op.
        self.agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        self.agent.position = (256, 400)
        space.add(self.agent, pymunk.Circle(self.agent, AGENT_RADIUS))
        # QUIRK (add_tee): moment = moment_for_poly(cap) twice = 3000 (the stem term reuses the cap's vertices) ...
        moment = pymunk.moment_for_poly(1, T_CAP.tolist()) + pymunk.moment_for_poly(1, T_CAP.tolist())
        self.block = pymunk.Body(1, moment)
        cap, stem = pymunk.Poly(self.block, T_CAP.tolist()), pymunk.Poly(self.block, T_STEM.tolist())
        # ... and the CoG is the mean of the two centroids, (0, 45), not the area centroid (0, 40.7).
        self.block.center_of_gravity = (cap.center_of_gravity + stem.center_of_gravity) / 2
        self.block.position, self.block.angle = (256, 300), 0
        space.add(self.block, cap, stem)

    def reset(self, seed=None):
        """DINO-WM's reset distribution (pusht_env.py reset) from a legacy RandomState; returns the first frame."""
        rs = np.random.RandomState(np.random.randint(0, 25536) if seed is None else seed)  # None: as DINO-WM seed()
        # Draw order as upstream; QUIRK: the angle is Gaussian, randn * 2 pi - pi (from Diffusion Policy).
        state = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400)]
        return self.set_state(state + [rs.randn() * 2 * np.pi - np.pi, 0, 0])

    def set_state(self, state):
        """Place agent and block (5 or 7 numbers; 5 means zero velocity) and return the frame (pusht_env.py)."""
        self.place(state)
        return self.render()

    def place(self, state, settle=True):
        """set_state() without the render. settle=False skips upstream's extra physics step: a model of this env that
        re-places the state get_state() returned (the planner's ceiling) must not advance it a second time."""
        s = np.asarray(state, np.float64).reshape(-1)
        if s.shape not in ((5,), (7,)) or not np.isfinite(s).all():
            raise ValueError(f"PushT.set_state wants 5 or 7 finite numbers, got {np.asarray(state).tolist()}")
        self._build()  # a fresh space also drops cached contact impulses: no dependence on history
        self.agent.velocity = (s[5], s[6]) if len(s) == 7 else (0.0, 0.0)
        self.agent.position = (s[0], s[1])
        self.block.angle = s[4]  # angle first: it rotates about the CoG, then position puts the origin exactly
        self.block.position = (s[2], s[3])
        if settle:
            self.space.step(DT)  # QUIRK (_set_state): one extra physics step; get_state() may differ slightly from s

    def advance(self, action):
        """step() without the render: one 10 Hz control step of 10 PD-driven physics substeps."""
        px, py = self.agent.position
        tx, ty = px + float(action[0]), py + float(action[1])  # the PD target: fixed once per step, never clipped
        for _ in range(SIM_HZ // CONTROL_HZ):
            # DINO-WM's step(): acc = kp (target - pos) + kv (0 - vel); vel += acc dt, in floats with the same IEEE
            # operations in the same order as its Vec2d arithmetic (bit-identical), but 2-3x faster.
            (px, py), (vx, vy) = self.agent.position, self.agent.velocity
            self.agent.velocity = (vx + (KP * (tx - px) + KV * (0 - vx)) * DT,
                                   vy + (KP * (ty - py) + KV * (0 - vy)) * DT)
            self.space.step(DT)

    def replay(self, state, actions, settle=True):
        """place(state, settle), then advance() through the px actions (T, 2) -> the final state (7,)."""
        self.place(state, settle)
        for a in actions:
            self.advance(a)
        return self.get_state()

    def step(self, action):
        self.advance(action)
        return self.render()

    def get_state(self):
        a, b = self.agent, self.block
        return np.array([*a.position, *b.position, b.angle % (2 * np.pi), *a.velocity], np.float64)  # (7,)

    def render(self):
        return render_state(self.get_state(), self.img_size)


def collect_episode(seed, steps):
    """One episode of the scripted pusher from reset(seed): states (steps+1, 7) f64, actions (steps+1, 2) f32 px. A
    plan is a random walk or a push: to a stand-off point outside a random contact (round the T if needed), then in."""
    p, lo, hi = POLICY, POLICY["margin"], WORLD - POLICY["margin"]
    edges = np.roll(T_OUTLINE, -1, axis=0) - T_OUTLINE  # (8, 2)
    lengths = np.linalg.norm(edges, axis=1)
    env, rng = PushT(), np.random.default_rng(seed)
    env.reset(seed)
    states, actions, mode, left = [env.get_state()], [], None, 0
    for _ in range(steps):
        s = states[-1]
        cog = _world(np.array([[0.0, 45.0]]), s[2], s[3], s[4])[0]  # the T's centre of gravity, (0, 45) in its frame
        if left == 0:  # new plan
            if rng.random() < p["wander_prob"]:
                mode, left = "wander", rng.integers(*p["wander_steps"], endpoint=True)
            else:  # a push from the nearest of a few random contacts that keep the agent in and the T off the walls
                plans = []
                for _ in range(20):
                    i = rng.choice(len(edges), p=lengths / lengths.sum())  # uniform along the outline
                    normal = np.array([edges[i][1], -edges[i][0]]) / lengths[i]  # outward for this vertex order
                    contact, normal = _world(np.stack([T_OUTLINE[i] + rng.random() * edges[i], normal]), 0, 0, s[4])
                    turn = math.radians(rng.uniform(-p["push_angle"], p["push_angle"]))
                    direction = _world(-normal[None], 0, 0, turn)[0]
                    standoff = contact + s[2:4] + normal * rng.uniform(*p["standoff"])
                    ahead = cog + 60 * direction  # where the push heads the T
                    if lo <= standoff.min() <= standoff.max() <= hi and 70 <= ahead.min() <= ahead.max() <= WORLD - 70:
                        plans.append((standoff, direction))
                    if len(plans) == p["candidates"]:
                        break
                standoff, direction = min(plans or [(standoff, direction)], key=lambda c: np.linalg.norm(c[0] - s[:2]))
                mode, left, cmd = "approach", p["approach_timeout"], rng.uniform(*p["push_cmd"])
                (ua, va), (ug, vg) = s[:2] - cog, standoff - cog
                way = 1 if (math.atan2(vg, ug) - math.atan2(va, ua)) % (2 * math.pi) < math.pi else -1  # short way
        if mode == "wander":
            offset = rng.normal(0, p["wander_std"], 2)
        elif mode == "approach":
            # Straight to the stand-off point if that path misses the T, else along a circle round it (50 deg on).
            outline = _world(T_OUTLINE, s[2], s[3], s[4]).astype(np.float32)  # (8, 2)
            path = s[:2] + np.linspace(0.15, 0.9, 8)[:, None] * (standoff - s[:2])  # (8, 2)
            goal = standoff
            if not all(cv2.pointPolygonTest(outline, (float(x), float(y)), True) < -AGENT_RADIUS for x, y in path):
                u, v = s[:2] - cog
                phi = math.atan2(v, u) + way * math.radians(50)
                goal = cog + p["detour_radius"] * np.array([math.cos(phi), math.sin(phi)])
            offset = goal - s[:2]
            offset *= min(1.0, p["approach_cmd"] / max(np.linalg.norm(offset), 1e-9))
            if np.linalg.norm(standoff - s[:2]) < 8:  # arrived: push from this step on
                mode, left = "push", rng.integers(*p["push_steps"], endpoint=True)
        if mode == "push":
            offset = cmd * direction
        target = np.clip(s[:2] + offset + rng.normal(0, p["noise_std"], 2), lo, hi)
        action = (target - s[:2]).astype(np.float32)  # applied as stored: replaying actions.npy is bit-exact
        env.advance(action)
        states.append(env.get_state())
        actions.append(action)
        left -= 1
    actions.append(np.zeros(2, np.float32))  # the last frame's action leads nowhere
    return np.stack(states), np.stack(actions)  # (steps+1, 7), (steps+1, 2)


def _fingerprint(splits):
    h = hashlib.sha256()
    for a in (splits[name][key] for name in ("train", "val") for key in ("states", "actions", "lengths")):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _existing(out, args):
    """True if out already holds the dataset these args make (then we stop cleanly); error if it holds another."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    try:
        old, args = load_meta(out).get("args", {}), json.loads(json.dumps(args))
    except UserError as e:
        raise UserError(f"--out {out} exists but is not a dataset ({e}); choose another --out or remove it") from e
    diff = differences(old, args, "the dataset has")
    require(not diff, f"--out {out} holds another dataset: {'; '.join(diff)}. Choose another --out or delete it")
    print(f"{out} already holds this dataset (same arguments); nothing to do")
    return True


@contextlib.contextmanager
def _staging(out):
    """A temp folder next to out, renamed to out on success; under a lock that also clears a killed run's leftovers."""
    lock = f".{out.name}.lock"
    with locked(out.parent, lock, f"another process is writing the dataset {out}: wait for it or choose another --out"):
        for old in out.parent.glob(f".{out.name}.tmp-*"):
            print(f"removing {old}, left by an interrupted earlier run")
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            (tmp / "train").mkdir(), (tmp / "val").mkdir()
            yield tmp
            require(not out.exists() or not any(out.iterdir()), f"--out {out} was filled meanwhile; choose another")
            os.rename(tmp, out)  # atomic, also onto an empty folder: a reader sees no dataset or a complete one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed: only a failed run leaves one to remove
            (out.parent / lock).unlink(missing_ok=True)


def _write(tmp, splits, meta):
    """Arrays and meta.json (fingerprint; train action stats over real steps, proprio over all frames) into tmp."""
    splits = {name: dict(states=np.asarray(sp["states"], np.float64), actions=np.asarray(sp["actions"], np.float32),
                         lengths=np.asarray(sp["lengths"], np.int64)) for name, sp in splits.items()}
    for name, split in splits.items():
        for key, array in split.items():
            np.save(tmp / name / f"{key}.npy", array)
    tr = splits["train"]
    a = np.delete(tr["actions"], np.cumsum(tr["lengths"]) - 1, axis=0).astype(np.float64)  # (F - E, 2) real steps
    pr = tr["states"][:, PROPRIO]  # (F, 4)
    safe = lambda sd: np.where(sd > 0, sd, 1.0).tolist()  # noqa: E731  a constant column would divide by zero
    meta.update(format=FORMAT, env=ENV, fingerprint=_fingerprint(splits), action_mean=a.mean(0).tolist(),
                action_std=safe(a.std(0)), proprio_mean=pr.mean(0).tolist(), proprio_std=safe(pr.std(0)),
                splits={n: dict(episodes=len(s["lengths"]), frames=int(len(s["states"]))) for n, s in splits.items()})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def load_meta(root, verify=False):
    """DIR/meta.json, checked; verify=True recomputes the fingerprint (a dataset is its arrays, not its name)."""
    path, fix = Path(root) / "meta.json", "re-create the dataset with `python data.py collect`"
    require(Path(root).is_dir(), f"dataset folder {root} does not exist; make one with `python data.py collect --out "
                                 f"{root}` (or check the path)")
    meta = load_json(path, f"{root} is not a dataset folder of this data.py; {fix}", ("fingerprint",), FORMAT)
    bad = [k for k, n in dict(action_mean=2, action_std=2, proprio_mean=4, proprio_std=4).items() if not (
        isinstance(meta.get(k), list) and len(meta[k]) == n and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                    and (v > 0 or "std" not in k) for v in meta[k]))]
    require(not bad and isinstance(meta.get("img_size"), int) and 14 <= meta["img_size"] <= MAX_IMG,
            f"{path}: {', '.join(bad) or 'img_size'} missing or malformed; {fix}")
    if verify:
        fp = _fingerprint({name: load_split(root, name) for name in ("train", "val")})
        require(fp == meta["fingerprint"], f"{root}: its arrays (fingerprint {fp}) do not match meta.json's "
                                           f"fingerprint {meta['fingerprint']} (modified or corrupt); re-create it")
    return meta


def train_stats(meta):
    """The train split's normalisation statistics that a checkpoint or policy carries with it."""
    return {k: meta[k] for k in ("action_mean", "action_std", "proprio_mean", "proprio_std")}


def load_split(root, split):
    """dict(states (F, 7) f64, actions (F, 2) f32, lengths (E,) i64, starts (E,) i64, frames (F, S, S, 3) or None)."""
    d, out, fix = Path(root) / split, {}, "re-create the dataset with `python data.py collect`"
    for key, dtype, shape in (("states", np.float64, (7,)), ("actions", np.float32, (2,)), ("lengths", np.int64, ())):
        out[key] = a = load_pt(d / f"{key}.npy", fix, functools.partial(np.load, allow_pickle=False))
        require(a.dtype == dtype and a.shape[1:] == shape,
                f"{d / key}.npy: {a.dtype} {a.shape}, expected {np.dtype(dtype)} (n, {shape}); {fix}")
    n, lengths = len(out["states"]), out["lengths"]
    require(len(lengths) > 0 and lengths.min() >= 1 and lengths.sum() == n and len(out["actions"]) == n,
            f"{d}: lengths.npy (sum {lengths.sum()}) must have positive entries summing to the rows of states.npy ({n})"
            f" and actions.npy ({len(out['actions'])}); {fix}")
    require(np.isfinite(out["states"]).all() and np.isfinite(out["actions"]).all(),
            f"{d}: states.npy or actions.npy holds non-finite numbers; {fix}")
    out["starts"] = np.cumsum(lengths) - lengths  # (E,) global index of each episode's first frame
    out["frames"] = load_pt(d / "frames.npy", "re-import the dataset", functools.partial(
        np.load, mmap_mode="r", allow_pickle=False)) if (d / "frames.npy").is_file() else None
    require(out["frames"] is None or (out["frames"].dtype == np.uint8 and out["frames"].shape[0] == n),
            f"{d}/frames.npy: not uint8 ({n}, S, S, 3); re-import the dataset")
    return out


def collect(cfg):
    """Run the scripted pusher for cfg.episodes episodes of cfg.steps env steps (seed + i for episode i)."""
    out, n_val, workers = Path(cfg.out), max(1, round(cfg.episodes * cfg.val_fraction)), cfg.workers or os.cpu_count()
    require(cfg.episodes - n_val >= 1, f"--episodes {cfg.episodes} with --val-fraction {cfg.val_fraction} leaves no "
                                       "train episode; collect more episodes")
    args = dict(source="collect", episodes=cfg.episodes, steps=cfg.steps, img_size=cfg.img_size, seed=cfg.seed,
                val_fraction=cfg.val_fraction, policy=POLICY)
    if _existing(out, args):
        return
    writable(out.parent / f".{out.name}.tmp-probe", "--out")  # the dataset is staged next to out
    need_disk(out.parent, cfg.episodes * (cfg.steps + 1) * (7 * 8 + 2 * 4), f"collect --out {out}")
    job, t0 = functools.partial(collect_episode, steps=cfg.steps), time.time()
    seeds = range(cfg.seed, cfg.seed + cfg.episodes)
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        runs = pool.imap(job, seeds, chunksize=4) if pool else map(job, seeds)  # any worker count: the same arrays
        episodes = list(tqdm(runs, total=cfg.episodes, desc="collect", unit="ep", disable=None))
    frames, dt = cfg.episodes * (cfg.steps + 1), time.time() - t0
    print(f"collected {cfg.episodes} episodes, {frames} frames in {dt:.1f} s: {frames / dt:.0f} frames/s with "
          f"{workers} worker(s) (states only: frames are rendered when read)")
    splits = {name: dict(states=np.concatenate([e[0] for e in part]), actions=np.concatenate([e[1] for e in part]),
                         lengths=np.full(len(part), cfg.steps + 1, np.int64))
              for name, part in (("train", episodes[:-n_val]), ("val", episodes[-n_val:]))}  # val = the last episodes
    with _staging(out) as tmp:
        _write(tmp, splits, dict(source="collect", img_size=cfg.img_size, seed=cfg.seed, policy=POLICY, args=args))
    print(f"wrote {out}")


class _NoClasses(pickle.Unpickler):
    """For seq_lengths.pkl: refuse every class but NumPy's number builders (np.int64 lists are plausible upstream)."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")}
    ALLOWED |= {("numpy", "dtype"), ("numpy", "ndarray")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load class {module}.{name}; save a plain list of ints instead")


def _read(path, shape):
    """A DINO-WM file as an array, float64 (a torch tensor, weights_only) or as pickled, checked against shape."""
    fix = "--src must be DINO-WM's pusht_noise folder (train/, val/) of plain tensors and lists"
    unpickle = lambda p: np.asarray(_NoClasses(io.BytesIO(p.read_bytes())).load())  # noqa: E731
    x = load_pt(path, fix) if path.suffix == ".pth" else load_pt(path, fix, unpickle)
    x = x.double().numpy() if torch.is_tensor(x) else x
    require(isinstance(x, np.ndarray) and x.ndim == len(shape) and all(not w or w == v for w, v in zip(shape, x.shape)),
            f"{path}: got {getattr(x, 'shape', type(x))}, expected {shape} (0 = any)")
    return x


def import_dinowm(cfg):
    """Convert DINO-WM's pusht_noise (datasets/pusht_dset.py layout) into ours: real steps only, states7 = states ++
    velocities (angle as stored), rel_actions in px; frames.npy from the mp4s with keep_frames, else rendered."""
    src, out = Path(cfg.src), Path(cfg.out)
    require(src.is_dir(), f"--src {src} does not exist; pass DINO-WM's pusht_noise folder (with train/ and val/)")
    args = dict(source="dinowm", src=str(src.resolve()), keep_frames=cfg.keep_frames)
    if _existing(out, args):
        return
    with _staging(out) as tmp:
        splits, img_size = {}, 224  # DINO-WM's render_size, for frames rendered from states
        for name in ("train", "val"):
            d = src / name
            states = _read(d / "states.pth", (0, 0, 5))  # (N, T_max, 5), zero-padded
            n, t_max, _ = states.shape
            vel, act = _read(d / "velocities.pth", (n, t_max, 2)), _read(d / "rel_actions.pth", (n, t_max, 2))
            lengths = _read(d / "seq_lengths.pkl", (n,))
            require(lengths.dtype.kind in "iu" and lengths.min() >= 1 and lengths.max() <= t_max,
                    f"{d}/seq_lengths.pkl: need {n} integers in [1, {t_max}]")
            real = np.arange(t_max) < lengths[:, None]  # (N, T_max) drops the padding
            splits[name] = dict(states=np.concatenate([states, vel], -1)[real], actions=act[real], lengths=lengths)
            if not cfg.keep_frames:
                continue
            starts = tqdm(np.cumsum(lengths) - lengths, desc=f"decode {name}", unit="ep", disable=None)
            for i, start in enumerate(starts):
                mp4 = [p for p in (d / f"obses/episode_{i:03d}.mp4", d / f"obses/episode_{i:04d}.mp4") if p.is_file()]
                require(mp4, f"{d}/obses/episode_{i:03d}.mp4 (or {i:04d}) is missing")
                cap, ep = cv2.VideoCapture(str(mp4[0])), []
                while (got := cap.read())[0]:
                    ep.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))  # OpenCV decodes BGR; decord (upstream): RGB
                cap.release()
                require(len(ep) == lengths[i], f"{mp4[0]}: {len(ep)} frames, but seq_lengths.pkl says {lengths[i]}")
                ep = np.stack(ep)  # (T, S, S, 3)
                if i == 0:  # the first video fixes the size (train's for both splits)
                    img_size = ep.shape[1] if name == "train" else img_size
                    need_disk(tmp, int(lengths.sum()) * img_size ** 2 * 3, f"--keep-frames ({name} frames)")
                    frames = np.lib.format.open_memmap(tmp / name / "frames.npy", "w+", np.uint8,
                                                       (int(lengths.sum()), img_size, img_size, 3))
                require(ep.shape[1:] == frames.shape[1:],
                        f"{d}/obses: episode {i} has {ep.shape[1:]} frames, not {frames.shape[1:]}")
                frames[start:start + lengths[i]] = ep
            del frames  # close the memmap (its pages are the file's) before the folder is renamed
        _write(tmp, splits, dict(source="dinowm", img_size=img_size, seed=None, policy=None, args=args))
    agent, block = replay_drift(load_split(out, "train"))
    print(f"replay check (up to 5 train episodes x 25 steps): mean drift agent {agent:.3f} px, block {block:.3f} px")
    print(f"wrote {out}")


def macro_to_env(a_norm, action_mean, action_std):
    """(..., H, A) z-scored macro actions -> (..., H * A/2, 2) env actions in px (traj_dset.py's "(n f) d" undone)."""
    a = a_norm.reshape(*a_norm.shape[:-2], -1, 2)  # (..., H * frameskip, 2)
    return a * _like(a, action_std) + _like(a, action_mean)


def env_to_macro(a_px, action_mean, action_std, frameskip=5):
    """(..., H * frameskip, 2) env actions in px -> (..., H, 2 * frameskip) z-scored macro actions."""
    a = (a_px - _like(a_px, action_mean)) / _like(a_px, action_std)
    return a.reshape(*a.shape[:-2], -1, 2 * frameskip)  # (..., H, A)


def _like(x, v):
    """v (mean or std) as an array or tensor matching x's kind, dtype and device."""
    if torch.is_tensor(x):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return np.asarray(v, x.dtype if x.dtype.kind == "f" else np.float64)


def render_batch(states, img_size):
    """(..., 7) states, an array -> (..., S, S, 3) uint8 frames."""
    frames = [render_state(s, img_size) for s in states.reshape(-1, states.shape[-1])]
    return np.stack(frames).reshape(*states.shape[:-1], img_size, img_size, 3)


class WindowDataset(torch.utils.data.Dataset):
    """Training windows (DINO-WM datasets/traj_dset.py): num_frames frames at s, s + frameskip, ..., every start s of
    every episode; a batch is one NumPy gather per key (__getitems__): state float32 (B, T, 7); action float32 (B, T,
    A): row k = the frameskip env actions after frame k, time-major (x0, y0, x1, ...), z-scored (the last row leads
    past the window, unused); proprio float32 (B, T, 4) z-scored; index int64 (B,) = global index of frame 0; with
    pixels=True obs uint8 (B, T, S, S, 3) (frames.npy if at img_size, else rendered), or feat (B, T, P, D) when
    features are given: float16 rows of a feature cache, or float32 rows of a dino.FeatureStore on its device."""

    def __init__(self, root, split, num_frames=2, frameskip=5, pixels=False, img_size=None, features=None):
        self.meta, d = load_meta(root), load_split(root, split)
        self.num_frames, self.frameskip, self.pixels = num_frames, frameskip, pixels
        self.img_size = img_size or self.meta["img_size"]
        span = frameskip * num_frames  # frames a window's actions cover
        counts = np.maximum(d["lengths"] - span + 1, 0)  # (E,) windows per episode
        require(counts.sum() > 0, f"{root}/{split}: no episode has the {span} frames one window needs (longest "
                                  f"{d['lengths'].max()}); collect longer episodes or lower --num-hist/--frameskip")
        if (counts == 0).any():
            warnings.warn(f"{root}/{split}: {(counts == 0).sum()} of {len(counts)} episodes are shorter than one "
                          f"window ({span} frames) and are skipped")
        self.window_start = np.concatenate([s + np.arange(n) for s, n in zip(d["starts"], counts)])  # (N,) start frame
        m = {k: np.asarray(v) for k, v in train_stats(self.meta).items()}  # z-scored with the train split's stats
        self.actions = ((d["actions"] - m["action_mean"]) / m["action_std"]).astype(np.float32)  # (F, 2)
        self.proprio = ((d["states"][:, PROPRIO] - m["proprio_mean"]) / m["proprio_std"]).astype(np.float32)  # (F, 4)
        self.states, self.features = d["states"].astype(np.float32), features
        self.frames = d["frames"] if d["frames"] is not None and d["frames"].shape[1] == self.img_size else None
        require(features is None or len(features) == len(self.states),
                f"the feature cache has {0 if features is None else len(features)} rows, {root}/{split} has "
                f"{len(self.states)} frames; rebuild it with `python dino.py encode --data {root}`")

    def __len__(self):
        return len(self.window_start)

    def __getitems__(self, indices):
        g = self.window_start[np.asarray(indices)]  # (B,) global frame of each window's frame 0
        idx = g[:, None] + self.frameskip * np.arange(self.num_frames)  # (B, T)
        span = g[:, None] + np.arange(self.frameskip * self.num_frames)  # (B, T*frameskip) env steps
        B, T = idx.shape
        batch = dict(state=torch.from_numpy(self.states[idx]), proprio=torch.from_numpy(self.proprio[idx]),
                     action=torch.from_numpy(self.actions[span].reshape(B, T, -1)), index=torch.from_numpy(g))
        if self.features is not None:  # NumPy rows of the disk cache, or torch rows of a dino.FeatureStore
            batch["feat"] = torch.as_tensor(self.features[idx.ravel()]).view(B, T, *self.features.shape[1:])
        elif self.pixels:  # rows of frames.npy, or rendered
            obs = self.frames[idx] if self.frames is not None else render_batch(self.states[idx], self.img_size)
            batch["obs"] = torch.from_numpy(obs)  # (B, T, S, S, 3)
        return batch

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def label_subset(n, labels, seed, batch=1):
    """The sorted subset, fixed by seed and count, of `labels` of n labelled windows a labels-only run trains on."""
    require(batch <= n, f"--batch-size {batch}: more than the {n} windows of the train split; lower it")
    if labels < 0:
        return np.arange(n)
    require(1 <= labels <= n, f"--labels {labels}: the train split has {n} labelled windows; choose 1..{n} or -1 (all)")
    return np.sort(np.random.default_rng([seed, labels]).choice(n, labels, replace=False))


def loader(ds, batch_size, sampler, workers=-1, device="cpu", drop_last=False):
    """DataLoader of whole __getitems__ batches in sampler's order; workers (-1: per core) render or read frames."""
    in_memory = ds.features is not None and not isinstance(ds.features, np.ndarray)  # a dino.FeatureStore
    workers = 0 if not ds.pixels or in_memory else os.cpu_count() if workers < 0 else workers
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=torch.utils.data.default_convert, drop_last=drop_last,
                                       persistent_workers=workers > 0, generator=torch.Generator(),
                                       pin_memory=torch.device(device).type == "cuda" and not in_memory)


def replay_drift(split, episodes=5, steps=25):
    """Mean (agent, block) px error replaying recorded actions: ~0 for ours, small drift (no divergence) upstream."""
    env, err = PushT(), []
    for s0 in split["starts"][split["lengths"] > steps][:episodes]:
        env.place(split["states"][s0])
        for t in range(s0, s0 + steps):
            env.advance(split["actions"][t])
            err.append(np.linalg.norm((env.get_state() - split["states"][t + 1])[:4].reshape(2, 2), axis=1))
    return np.mean(err, 0) if err else (float("nan"), float("nan"))


def info(cfg, bench=500):
    """Print counts, action stats, block motion, coverage and loader speed of a dataset folder."""
    meta, splits = load_meta(cfg.root, verify=True), {name: load_split(cfg.root, name) for name in ("train", "val")}
    print(f"{cfg.root}: source {meta['source']}, img_size {meta['img_size']}, seed {meta.get('seed')}, "
          f"fingerprint {meta['fingerprint']} (verified)")
    for name, sp in splits.items():  # block motion: the largest shift of a T vertex over each 5-step window (t, t + 5)
        L, s = sp["lengths"], sp["states"]
        t = np.flatnonzero(np.arange(len(s)) + 5 < np.repeat(sp["starts"] + L, L))  # (W,) windows inside an episode
        c, sn = np.cos(s[:, 4:5]), np.sin(s[:, 4:5])  # (F, 1)
        vx = s[:, 2:3] + T_OUTLINE[:, 0] * c - T_OUTLINE[:, 1] * sn  # (F, 8) world vertices
        vy = s[:, 3:4] + T_OUTLINE[:, 0] * sn + T_OUTLINE[:, 1] * c
        shift = np.hypot(vx[t + 5] - vx[t], vy[t + 5] - vy[t]).max(1)  # (W,) px
        print(f"  {name}: {len(L)} episodes, {L.sum()} frames (lengths {L.min()}..{L.max()}); the block moves in "
              f"{np.mean(shift > 1):.1%} of 5-step windows (> 1 px; > 0.01 px: {np.mean(shift > 0.01):.1%})")
    agent, block = replay_drift(splits["train"])
    print(f"  replay drift (train, up to 5 episodes x 25 steps): agent {agent:.3f} px, block {block:.3f} px")
    print(f"  actions (train, real steps, px): mean {np.round(meta['action_mean'], 3).tolist()}, "
          f"std {np.round(meta['action_std'], 3).tolist()}")
    s = splits["train"]["states"]
    cells = len(np.unique(np.clip(s[:, 2:4] // (WORLD / 8), 0, 7), axis=0))
    bins = len(np.unique(s[:, 4] % (2 * np.pi) // (np.pi / 4)))
    print(f"  coverage (train): block xy in {cells / 64:.2f} of 8x8 cells, block angle in {bins / 8:.2f} of 8 bins")
    try:
        ds = WindowDataset(cfg.root, "train", pixels=True)
    except UserError as e:
        return print(f"  loader benchmark skipped: {e}")
    picks, t0 = np.random.default_rng(0).integers(0, len(ds), bench), time.perf_counter()
    for i in range(0, bench, 50):
        ds.__getitems__(picks[i:i + 50])
    print(f"  loader: {len(ds)} train windows; {bench / (time.perf_counter() - t0):.0f} windows/s "
          f"({ds.num_frames} frames at {ds.img_size} px, {'from frames.npy' if ds.frames is not None else 'rendered'})")


def figure(cfg):
    """A PNG strip of one scripted episode every 5 env steps (one macro action): start ... goal 25 steps later."""
    writable(cfg.out, "--out", png=True)
    states, _ = collect_episode(cfg.seed, 25)  # (26, 7)
    tiles = []
    for t in range(0, 26, 5):
        tile = cv2.cvtColor(render_state(states[t], 224), cv2.COLOR_RGB2BGR)  # (S, S, 3) for cv2.imencode
        label = "start" if t == 0 else "goal (t = 25)" if t == 25 else f"t = {t}"
        cv2.putText(tile, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.pad(tile, ((0, 0), (0, 4), (0, 0)), constant_values=255))  # 4-px white gutter
    write_png(cfg.out, np.concatenate(tiles, 1)[:, :-4])
    print(f"wrote {cfg.out}")


# ---- Plumbing every stage shares: flags from dataclasses, expected errors, device and precision, atomic writes, locks

class UserError(Exception):
    """An expected mistake in the input (a flag, a file): reported as one line with the way out, exit status 2."""


def require(ok, message):
    if not ok:
        raise UserError(message)


def flag(name):
    return "--" + name.replace("_", "-")


def check_choices(cfg):
    """Every config's checks: Literal choices (configs built in code), finite floats (an inf lr means NaN), the seed."""
    for f in dataclasses.fields(cfg):
        choices = typing.get_args(f.type) if typing.get_origin(f.type) is typing.Literal else ()
        v = getattr(cfg, f.name)
        require(not choices or v in choices, f"{flag(f.name)} {v!r}: choose one of {', '.join(map(str, choices))}")
        require(not isinstance(v, float) or math.isfinite(v), f"{flag(f.name)} {v}: give a finite number")
    seed = getattr(cfg, "seed", 0)
    require(0 <= seed < 2 ** 32, f"--seed {seed}: choose a seed in 0 .. 2^32 - 1")
    for name in ("workers", "num_workers"):
        require(getattr(cfg, name, 0) <= MAX_WORKERS, f"{flag(name)}: at most {MAX_WORKERS}, 4 per core")


def unused(cfg, names, why):
    """Refuse flags the run would silently ignore: each field in names must keep its default (why: the reason)."""
    given = [f"{flag(f.name)} {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
             if f.name in names and getattr(cfg, f.name) != f.default]
    require(not given, f"{', '.join(given)}: not used here ({why}); drop {'them' if len(given) > 1 else 'it'}")


def add_flags(parser, cls):
    """A --field-name flag per field of cls, help = its trailing comment; flags not typed stay out (SUPPRESS)."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]:  # derived: computed, not flags
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        pos = f.metadata.get("positional")  # a positional argument is required: no default to show
        kw = dict(help=comments.get(f.name, "") + f" (default: {default!r})" * (not pos), default=argparse.SUPPRESS)
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw.update(action="extend", nargs="+")
        elif typing.get_origin(f.type) is typing.Literal:
            kw["choices"] = typing.get_args(f.type)
        else:
            kw["type"] = type(default)
        parser.add_argument(f.name if pos else flag(f.name), **kw)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block would bury the one line that matters
        raise UserError(f"{message} (see --help)")


def parse_config(*classes, argv=None, doc=None):
    """One config per dataclass from the command line (each validates itself), then the set of field names given."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in classes:
        add_flags(p.add_argument_group(cls.__name__), cls)
    given = vars(p.parse_args(argv))
    return (*(cls(**{k: v for k, v in given.items() if k in cls.__dataclass_fields__}) for cls in classes), set(given))


def cli(main, *classes, doc=None, commands=None):
    """Every script's entry point (commands: {name: (fn, config class)}); an expected error is one line, status 2."""
    try:
        if commands:
            p = Parser(description=doc)
            sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
            for name, (fn, cls) in commands.items():
                add_flags(sub.add_parser(name, help=fn.__doc__.split("\n")[0], description=fn.__doc__), cls)
            args = vars(p.parse_args())
            fn, cls = commands[args.pop("command")]
            return fn(cls(**args))
        *cfgs, given = parse_config(*classes, doc=doc)
        return main(*cfgs, given=given) if "given" in inspect.signature(main).parameters else main(*cfgs)
    except UserError as e:
        print("error:", *str(e).split(), file=sys.stderr)  # one line, whatever a library's message held
        sys.exit(2)
    except OSError as e:  # the machine's fault, not the code's: a full disk, a read-only or foreign folder
        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror}; free space, or write to a folder you may write to",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: files written so far are complete; re-run the command to resume", file=sys.stderr)
        sys.exit(130)


def setup(device="auto", seed=0, dtype="bfloat16", rank=0):
    """Device (auto: cuda if present), seeds, precision (CUDA: bf16 + TF32, or fp32 with TF32 off); (dev, ctx)."""
    require(device != "cuda" or torch.cuda.is_available(),
            "--device cuda: no CUDA device is visible here; use --device cpu (or auto)")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    amp = cuda and dtype == "bfloat16"
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = amp  # IMPORTANT: off for fp32
    print(f"device: {dev} | precision: {'bf16 autocast' if amp else 'fp32 (TF32 off)' if cuda else 'fp32'}")
    return dev, (torch.autocast("cuda", torch.bfloat16) if amp else contextlib.nullcontext())


def differences(stored, asked, has, skip=()):
    """['--flag asked (<has> stored)'] per differing setting: the check of every "same settings or refuse"."""
    return [f"{flag(k)} {v!r} ({has} {stored.get(k)!r})" for k, v in asked.items() if k not in skip and
            stored.get(k) != v]


def merge_resume(path, given, *pairs):
    """Resume from the configs stored in `path`: pairs of (config, stored dict, runtime field names). Given fields must
    equal the stored ones, except runtime fields, which override them; given=None: fields off their defaults count."""
    merged, bad = [], []
    for cfg, stored, runtime in pairs:
        gone = [flag(k) for k, v in stored.items() if k not in cfg.__dataclass_fields__ and v]  # settings removed since
        require(not gone, f"{path} holds a run trained with {', '.join(gone)}, removed since; choose another --out")
        stored = {k: v for k, v in stored.items() if k in cfg.__dataclass_fields__}  # off when removed (0, False, "")
        typed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("derived") and (
            f.name in given if given is not None else getattr(cfg, f.name) != f.default)}
        bad += differences(stored, typed, "the run has", runtime)
        merged.append(type(cfg)(**{**stored, **{k: v for k, v in typed.items() if k in runtime}}))
    require(not bad, f"{path} holds a run with other settings: {'; '.join(bad)}. Drop these flags to resume it, or "
                     "choose another --out")
    return merged


def dataset_of(folder, stored, data_dir="", what="run"):
    """The run's data: --data, else the stored path relative to the folder, else the absolute one; same fingerprint."""
    roots = [Path(data_dir)] if data_dir else [Path(folder) / stored["relative"], Path(stored["root"])]
    root = next((r.resolve() for r in roots if (r / "meta.json").is_file()), None)
    also = f" nor at {data_dir}" if data_dir else ""
    require(root is not None, f"{folder} was trained on the dataset {stored['root']} (fingerprint "
                              f"{stored['fingerprint']}), which is not there any more{also}; pass --data DIR")
    fp = load_meta(root, verify=True)["fingerprint"]
    require(fp == stored["fingerprint"], f"--data {root} (fingerprint {fp}) is not the dataset the {what} {folder} was "
                                         f"trained on ({stored['root']}, fingerprint {stored['fingerprint']})")
    return root


def writable(path, name, keys=None, png=False):
    """Fail before any work if `path` (flag `name`) cannot be written or is a file of the user's. keys (JSON keys, or a
    test of the object): a .json that, where it exists, this script wrote; png: a .png, where it exists a PNG."""
    path, fix = Path(path), f"{name} {path} exists and is not a file this script wrote; choose another path"
    require(not path.is_dir(), f"{name} {path} is a folder; give a file path")
    require(not png or path.suffix == ".png", f"{name} {path}: give a .png path")
    if png and path.exists():
        require(load_pt(path, fix, lambda p: p.read_bytes()[:8]) == b"\x89PNG\r\n\x1a\n", fix)
    if keys is not None:
        require(path.suffix == ".json", f"{name} {path}: give a .json path")
        if path.exists():
            obj = load_json(path, fix, () if callable(keys) else keys)
            require(not callable(keys) or keys(obj), fix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise UserError(f"{name} {path}: cannot write there ({e.strerror}); choose another path") from None


def atomic_write(path, obj):
    """Write a fresh temp file (never a planted link), then rename: no reader sees half a file. obj: data or writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)  # same suffix: cv2 picks video containers by it
    try:
        if callable(obj):
            obj(tmp)
        elif path.suffix == ".json":
            tmp.write_text(json.dumps(obj, indent=1))
        elif path.suffix == ".pt":
            torch.save(obj, tmp)
        else:
            tmp.write_bytes(obj)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        raise UserError(f"{path}: cannot write it ({e.strerror}); free space or choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_pt(path, fix, read=functools.partial(torch.load, map_location="cpu", weights_only=True), fmt=None):
    """read(path), by default torch.load(weights_only=True); a missing or unreadable file, or with fmt one whose
    "format" is another (written by another version of this code), is a UserError naming fix."""
    require(Path(path).is_file(), f"{path} is missing; {fix}")
    try:
        obj = read(path)
    except Exception as e:
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}); {fix}") from e
    got = obj.get("format") if isinstance(obj, dict) else None
    require(fmt is None or got == fmt, f"{path}: format {got!r}, this code reads {fmt!r}; {fix}")
    return obj


def load_json(path, fix, keys=(), fmt=None):
    """A JSON object from path, holding keys; a missing, unreadable or partial file is a UserError naming fix."""
    obj = load_pt(path, fix, lambda p: json.loads(Path(p).read_text()), fmt)
    missing = [k for k in keys if k not in obj] if isinstance(obj, dict) else "all"
    require(not missing, f"{path} is not what it should be (missing {missing}); {fix}")
    return obj


def need_disk(folder, nbytes, what):
    """Refuse up front, never part-way: nbytes more (and 100 MB spare) must fit in the free disk under folder."""
    folder = next(p for p in [Path(folder).resolve(), *Path(folder).resolve().parents] if p.exists())
    free = shutil.disk_usage(folder).free
    require(nbytes + 10 ** 8 <= free, f"{what} needs {nbytes / 1e9:.2f} GB of disk (+0.1 GB spare) under {folder}, "
                                      f"{free / 1e9:.2f} GB are free: free space or write elsewhere")


def output_folder(out, flag_name, marker, data_dir=None):
    """A stage's --out: not around the dataset, and empty or its own (`marker`, or a started run's config and log)."""
    out = Path(out)
    require(str(out) not in ("", "."), f"{flag_name} is empty: name the folder to write into")
    require(not out.exists() or out.is_dir(), f"{flag_name} {out} is a file, not a folder; choose another")
    if data_dir:
        d, o = Path(data_dir).resolve(), out.resolve()
        require(o != d and d not in o.parents and o not in d.parents, f"{flag_name} {out} would write into (or around) "
                                                                       f"the dataset {data_dir}; choose another folder")
    if out.is_dir() and not (out / marker).exists():
        files = {p.name for p in out.iterdir()} - {".lock"}
        fix = f"{flag_name} {out} is not a folder this script wrote; choose an empty or new folder"
        require(files <= {"config.json", "log.jsonl"}, f"{fix} (it holds {', '.join(sorted(files)[:4])})")
        if "config.json" in files:  # a run started here before its first checkpoint
            load_json(out / "config.json", fix, ("train", "model"))


def write_png(path, img_bgr):
    atomic_write(path, cv2.imencode(".png", img_bgr)[1].tobytes())


@contextlib.contextmanager
def locked(folder, name=".lock", busy=""):
    """Hold the OS lock folder/name (freed even if killed; busy: the error if taken); a folder made here is removed
    again when the block fails before writing anything else into it."""
    folder = Path(folder)
    created = not folder.exists()
    writable(folder / name, "--out")  # makes the folder; named as the stages that write there call it
    try:
        with open(folder / name, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(busy or f"{folder} is in use by another process (a train.py or decode.py running in "
                                        "it); wait for it to finish or choose another --out") from None
            yield
    except BaseException:
        if created and {p.name for p in folder.iterdir()} <= {name}:
            shutil.rmtree(folder, ignore_errors=True)
        raise


if __name__ == "__main__":
    cli(None, doc=__doc__, commands={"collect": (collect, CollectConfig), "info": (info, InfoConfig),
                                     "import-dinowm": (import_dinowm, ImportConfig), "figure": (figure, FigureConfig)})
