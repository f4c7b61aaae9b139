"""The token sources: DINOv2 with its patch-feature cache, the state token, and the pixel encoder of --tokens jepa.
DINOv2, the frozen eyes of DINO-WM, is facebookresearch/dinov2's ViT-S/B/L/g (+ _reg) in plain PyTorch: key for key the
official state_dict (strict loading), forward_features equal to the official model's, pos-embed interpolation included.
Reads:  weights .pth (--dino-weights PATH, else <torch hub dir>/checkpoints/<official file>, else the official URL,
        downloaded once); for `encode`, a dataset DIR in data.py's layout.
Writes: DIR/{split}/features.npy float16 (F, P, D) + features.json {name, size, weights, img_size, fingerprint, frames,
        dtype, done, images_per_s, peak_gpu_gb}: resumable; refused up front when the disk cannot hold it (then
        train.py --features memory holds a FeatureStore instead: int8 in GPU memory, built at start).
GPU:    python dino.py encode --data runs/full/data   (1.01M frames -> 152 GB of fp16 features; H200: not yet measured)
CPU:    python dino.py encode --data runs/quick/data --dino-weights random --size 28
        python dino.py check --weights ~/Downloads/dinov2_vits14_pretrain.pth   (22,056,576 params, shapes)
"""
import contextlib
import hashlib
import math
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from data import require


@dataclass
class EncodeConfig:
    data: str = ""  # dataset folder written by data.py (collect or import-dinowm); required
    split: str = "train,val"  # comma-separated splits to encode
    dino_weights: str = ""  # .pth file, "random" (meaningless, for tests), or "" = official file (hub cache/download)
    name: str = "dinov2_vits14"  # encoder; DINO-WM uses ViT-S/14 without registers (conf/encoder/dino.yaml)
    size: int = 196  # encoder input side in px; DINO-WM resizes 224 -> 196 = 14x14 patches (visual_world_model.py)
    img_size: int = 0  # render size in px before that resize, 0 = the dataset's img_size (as train.py)
    batch_size: int = 256  # frames per forward pass; also the resumable chunk
    workers: int = -1  # processes that render or read frames while the encoder runs; -1 = one per CPU core
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # CUDA: bf16 autocast, or fp32 with TF32 off (DINO-WM ran fp32)
    overwrite: bool = False  # discard an existing cache written with other weights, size, name or precision

    def __post_init__(self):
        data.check_choices(self)
        require(self.data, "dino.py encode needs --data DIR (a dataset folder written by data.py)")
        require(self.size % PATCH == 0 and 0 < self.size <= data.MAX_IMG, f"--size must be a multiple of {PATCH} px "
                f"in {PATCH}..{data.MAX_IMG}, got {self.size}")
        require(self.name.removesuffix("_reg") in ARCHS, f"--name {self.name!r}: one of {', '.join(ARCHS)} (+ _reg)")
        require(set(self.split.split(",")) <= {"train", "val"}, f"--split {self.split!r}: train, val or train,val")
        require(self.batch_size >= 1 and self.workers >= -1 and 0 <= self.img_size <= data.MAX_IMG,
                f"--batch-size must be >= 1, --workers >= -1, --img-size in 0..{data.MAX_IMG}")


@dataclass
class CheckConfig:
    weights: str = ""  # .pth file, "random", or "" = official file (hub cache/download)
    name: str = "dinov2_vits14"  # model name, e.g. dinov2_vits14, dinov2_vitb14_reg
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # where to run the two test images

    def __post_init__(self):
        data.check_choices(self)
        require(self.name.removesuffix("_reg") in ARCHS, f"--name {self.name!r}: one of {', '.join(ARCHS)} (+ _reg)")


# Shapes: B batch, S image side (px), P patches = (size/14)^2, D width, R register tokens (0 or 4), N = 1 + R + P.
PATCH = 14  # patch side in px (all DINOv2 hub models)
GRID = 37  # side of the stored positional grid: the hub builds every model at img_size 518 = 37 * 14
# name -> (width D, depth, heads of 64 dims, FFN); dinov2/hub/backbones.py
ARCHS = {"dinov2_vits14": (384, 12, 6, "mlp"), "dinov2_vitb14": (768, 12, 12, "mlp"),
         "dinov2_vitl14": (1024, 24, 16, "mlp"), "dinov2_vitg14": (1536, 40, 24, "swiglu")}
DISK_RESERVE = 2 ** 30  # bytes a feature cache leaves free for checkpoints, logs and other writers
STORE_SPARE = 8 * 2 ** 30  # bytes the in-memory store leaves free for training (the seed's la step peaks near 10 GB)


def weights_file(name):
    """Official checkpoint file name: register models add _reg4 to the file name only (dinov2/hub/backbones.py)."""
    return name.removesuffix("_reg") + ("_reg4" if name.endswith("_reg") else "") + "_pretrain.pth"


def weights_tag(weights, name="dinov2_vits14"):
    """The weights by content, for cache headers: "random" or "<file name>:<sha256 prefix>" (None/"" = hub cache)."""
    if weights == "random":
        return "random"
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / weights_file(name)
    if not path.is_file():
        return f"{path.name}:missing"
    with open(path, "rb") as f:
        return f"{path.name}:{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"


def preprocess(frames, size=196):
    """uint8 frames (B, S, S, 3) on any device -> float (B, 3, size, size) in [-1, 1], as DINO-WM feeds DINOv2."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 RGB frames (B, S, S, 3), got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S) in [0, 1]
    x = (x - 0.5) / 0.5  # (B, 3, S, S) in [-1, 1]: Normalize(0.5, 0.5), no ImageNet stats (DINO-WM img_transforms.py)
    if x.shape[-2:] != (size, size):  # torchvision Resize(196) in DINO-WM's visual_world_model.py: antialiased bilinear
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)  # (B, 3, size, size)
    return x


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)  # qkv columns: [q; k; v]

    def forward(self, x):
        """(B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        # heads are contiguous 64-wide chunks of q, k and v (dinov2/layers/attention.py reshape(B, N, 3, h, D/h))
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, 64)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, 64), softmax(q k^T / 8) v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        """(B, N, D) -> (B, N, D); ViT-g's FFN (dinov2/layers/swiglu_ffn.py)."""
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # 2 x (B, N, hidden)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        # official order of registration, so state_dict keys come out in the file's order; LayerNorm eps 1e-6;
        # LayerScale (dinov2/layers/layer_scale.py): a ParameterDict keeps its key ls1.gamma; hub init_values=1.0
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.ls1 = nn.ParameterDict({"gamma": nn.Parameter(torch.ones(dim))})
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # SwiGLUFFNFused hidden width: (int(4 D * 2/3) + 7) // 8 * 8 = 4096 for ViT-g (dinov2/layers/swiglu_ffn.py)
        self.mlp = SwiGLU(dim, (int(4 * dim * 2 / 3) + 7) // 8 * 8) if ffn == "swiglu" else nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))  # dinov2 Mlp, exact (erf) GELU
        self.ls2 = nn.ParameterDict({"gamma": nn.Parameter(torch.ones(dim))})

    def forward(self, x):
        """(B, N, D) -> (B, N, D), pre-norm residual blocks with LayerScale on both branches."""
        x = x + self.attn(self.norm1(x)) * self.ls1.gamma
        return x + self.mlp(self.norm2(x)) * self.ls2.gamma


class DinoVisionTransformer(nn.Module):
    def __init__(self, name="dinov2_vits14"):
        super().__init__()
        if name.removesuffix("_reg") not in ARCHS:
            raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {sorted(ARCHS)} (optionally + '_reg')")
        D, depth, heads, ffn = ARCHS[name.removesuffix("_reg")]
        reg = name.endswith("_reg")
        self.name, self.embed_dim, self.num_register_tokens = name, D, 4 if reg else 0
        # IMPORTANT: plain checkpoints interpolate with a +0.1 scale-factor offset and no antialias; _reg ones with
        # an output size and antialias (dinov2/hub/backbones.py, PR #378). Other choices silently change features.
        self.interpolate_offset, self.interpolate_antialias = (0.0, True) if reg else (0.1, False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, 4, D)) if reg else None
        self.mask_token = nn.Parameter(torch.zeros(1, D))  # only for DINOv2's masked training; kept for strict loading
        # dinov2/layers/patch_embed.py: a conv with bias, no norm; a ModuleDict keeps its key, patch_embed.proj
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, D, kernel_size=PATCH, stride=PATCH)})
        self.blocks = nn.Sequential(*(Block(D, heads, ffn) for _ in range(depth)))  # keys blocks.{i}.*, as a ModuleList
        self.norm, self.head = nn.LayerNorm(D, eps=1e-6), nn.Identity()
        self._pos_cache = {}  # (h0, w0, device) -> interpolated table; emptied whenever weights are loaded
        self.register_load_state_dict_post_hook(lambda module, keys: module._pos_cache.clear())

    def interpolate_pos_encoding(self, h0, w0):
        """Positional table (1, 1 + h0 * w0, D) of an h0 x w0 grid, CLS row first (dinov2 vision_transformer.py)."""
        if (h0, w0) == (GRID, GRID):
            return self.pos_embed  # 518 x 518 input: the stored table, untouched
        key = (h0, w0, self.pos_embed.device)
        if key in self._pos_cache:
            return self._pos_cache[key]
        pe = self.pos_embed.float()
        grid = pe[:, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)  # (1, D, 37, 37)
        # Plain models: scale_factor (not size), so the kernel samples at ratio 37 / (h0 + 0.1) and values differ from
        # a size=(h0, w0) resize; the 0.1 guards floor(37 * s) against round-down (facebookresearch/dino issue #8).
        off = self.interpolate_offset
        kw = dict(scale_factor=((h0 + off) / GRID, (w0 + off) / GRID)) if off else dict(size=(h0, w0))
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **kw)  # (1, D, h0, w0)
        table = torch.cat((pe[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)  # (1, 1 + h0 * w0, D)
        if not (torch.is_grad_enabled() and self.pos_embed.requires_grad):  # frozen: cache; trained: recompute
            self._pos_cache[key] = table
        return table

    def forward_features(self, x):
        """(B, 3, H, W) normalised, H and W multiples of 14 -> dict of normed CLS / register / patch tokens."""
        B, _, H, W = x.shape
        if H % PATCH or W % PATCH:
            raise ValueError(f"DINOv2 input sides must be multiples of {PATCH} px, got {(H, W)}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, P, D), patches in row-major order
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + P, D)
        x = x + self.interpolate_pos_encoding(H // PATCH, W // PATCH).to(x.dtype)
        if self.register_tokens is not None:  # inserted after the positional embedding: registers get none
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)  # (B, N, D)
        x = self.blocks(x)  # (B, N, D)
        x_norm = self.norm(x)  # (B, N, D)
        R = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1 : 1 + R],
                "x_norm_patchtokens": x_norm[:, 1 + R :], "x_prenorm": x, "masks": None}

    def forward(self, x):
        """(B, 3, H, W) -> (B, D): the normed CLS token through the (identity) head, as the hub model."""
        return self.head(self.forward_features(x)["x_norm_clstoken"])


def load_dinov2(name="dinov2_vits14", weights=None, device="cpu"):
    """Frozen DINOv2 in eval mode on device. weights: a .pth path; None/"" = the official file in the torch hub cache,
    downloaded there once if absent; or "random" (own generator, seed 0: every stage asking for it sees one encoder)."""
    with torch.device("meta"):  # no memory, no global-RNG draws; filled below (frozen: in place, no autograd)
        model = DinoVisionTransformer(name).to_empty(device="cpu").requires_grad_(False)
    if weights == "random":
        print(f"WARNING: {name} has RANDOM weights (seed 0): meaningless features (tests, demos)", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        for key, p in model.named_parameters():  # fixed order, so the draws are reproducible
            if key.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # LayerNorm weights (torch init) and LayerScale gammas (hub init_values 1.0): 1
                p.fill_(1.0)
            else:  # linear / conv weights and tokens: trunc-normal 0.02 as dinov2's init_weights_vit_timm
                nn.init.trunc_normal_(p, std=0.02, generator=g)
    else:
        file = weights_file(name)
        path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / file
        if not path.is_file() and not weights:
            url = f"https://dl.fbaipublicfiles.com/dinov2/{name.removesuffix('_reg')}/{file}"
            print(f"downloading {url} -> {path}", file=sys.stderr)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, str(path), progress=True)  # writes a temp file, then renames
            except OSError as e:  # offline, DNS, proxy or HTTP error (URLError is an OSError)
                raise data.UserError(f"DINOv2 weights {file} are not here and could not be downloaded ({e}). Fetch "
                                     f"{url} elsewhere and put it at {path} (the torch hub cache), or pass "
                                     f"--dino-weights /path/to/{file} (random: a meaningless encoder, offline)") from e
        sd = data.load_pt(path, f"pass --dino-weights PATH to an official {file}, or random")
        sd = sd.get("model", sd.get("state_dict", sd)) if isinstance(sd, dict) else sd  # unwrap training checkpoints
        try:
            model.load_state_dict(sd, strict=True)  # IMPORTANT: strict, so a LayerScale or key mismatch cannot hide
        except (RuntimeError, TypeError, AttributeError) as e:
            raise data.UserError(f"{path} does not hold {name} weights (wrong --dino-name?): {str(e)[:300]}") from e
    return model.eval().to(device)


def encode(model, frames, size=196):
    """uint8 frames (B, S, S, 3) -> x_norm_patchtokens float32 (B, P, D) on the model's device. No autocast of its own:
    the caller's context (data.setup: bf16 on CUDA by default, unlike DINO-WM's fp32 encoder; fp32 otherwise)."""
    frames = torch.as_tensor(frames).to(model.pos_embed.device, non_blocking=True)  # uint8: 4x fewer bytes than float
    with torch.inference_mode():
        z = model.forward_features(preprocess(frames, size))["x_norm_patchtokens"]  # (B, P, D)
    return z.float().clone()  # (B, P, D), cloned outside inference mode for predictors that save it for backward


# ---- The feature cache: DIR/{split}/features.npy (F, P, D) float16 + features.json ("done": rows on disk) ------------

def cache_header(root, name, size, weights, img_size=None):
    """What a feature cache must match: encoder, its input size, weights, render size and the dataset itself."""
    meta = data.load_meta(root)  # its fingerprint changes when the dataset is re-collected
    return dict(name=name, size=size, weights=weights_tag(weights, name), img_size=img_size or meta["img_size"],
                fingerprint=meta.get("fingerprint"))


def npy_problem(npy, frames, patches):
    """Why npy is no cache of `frames` rows of `patches` float16 tokens (from its header and size only), or None."""
    try:
        with open(npy, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            want = f.tell() + math.prod(shape) * 2  # header, then the rows
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    if dtype != np.float16 or len(shape) != 3 or shape[:2] != (frames, patches):
        return f"holds {dtype} {shape}, not float16 ({frames}, {patches}, D)"
    size = Path(npy).stat().st_size
    return None if size == want else f"{size:,} bytes instead of {want:,} (truncated?)"


def load_features(root, split, name="dinov2_vits14", size=196, weights=None, img_size=None):
    """The cached float16 (F, P, D) features, a read-only memmap; None unless complete and matching; damaged: error."""
    npy, js = Path(root) / split / "features.npy", Path(root) / split / "features.json"
    if not (npy.is_file() and js.is_file()):
        return None
    given = (("name", name, EncodeConfig.name), ("size", size, EncodeConfig.size), ("dino-weights", weights, ""),
             ("img-size", img_size, 0))  # the flags of the command that rebuilds this cache
    extra = [f"--{flag} {value}" for flag, value, default in given if value and value != default]
    command = " ".join(["python dino.py encode --data", str(root), "--split", split, *extra, "--overwrite"])
    fix = f"rebuild it with `{command}`, or train with --features off (DINOv2 on the fly)"
    head = data.load_json(js, fix, ("done", "frames"))
    header = cache_header(root, name, size, weights, img_size)
    if any(head.get(k) != v for k, v in header.items()) or head["done"] != head["frames"]:
        return None  # other settings, or encoding stopped part-way (`dino.py encode` resumes it)
    problem = npy_problem(npy, head["frames"], (size // PATCH) ** 2)
    require(problem is None, f"{npy} is damaged: {problem}; {fix}")
    feats = np.load(npy, mmap_mode="r")  # (F, P, D)
    last = np.asarray(feats[-1], dtype=np.float32)  # (P, D): the row written last
    require(np.isfinite(last).all() and last.any(), f"{npy} is damaged: its last row is not finite or all zero; {fix}")
    return feats


def cache_plan(cfg, split, model_dim, dtype):
    """Before any work: what encoding one split means; refuses a cache with other settings unless --overwrite."""
    root = Path(cfg.data)
    npy, js = root / split / "features.npy", root / split / "features.json"
    frames = len(data.load_split(root, split)["states"])  # also validates frames.npy when present
    shape = (frames, (cfg.size // PATCH) ** 2, model_dim)  # (F, P, D)
    head = {**cache_header(root, cfg.name, cfg.size, cfg.dino_weights or None, cfg.img_size), "frames": frames,
            "dtype": dtype}  # the precision the rows are computed in
    try:  # a damaged header counts as no cache: encoding starts again at frame 0
        old = data.load_json(js, "", ("done",)) if js.is_file() and npy.is_file() else {}
    except data.UserError as e:
        print(f"{e}: encoding {split} again from frame 0")
        old = {}
    diff = data.differences(old, head, "the cache has")
    require(not old or not diff or cfg.overwrite, f"{js} was written with other settings: {'; '.join(diff)}. Give "
                                                  "the same settings to resume it, or --overwrite to re-encode")
    done = old["done"] if old and not diff and not cfg.overwrite else 0
    if done and (problem := npy_problem(npy, frames, shape[1])):  # a damaged file restarts
        print(f"{npy}: {problem}; encoding {split} again from frame 0")
        done = 0
    allocated = npy.stat().st_blocks * 512 if npy.is_file() else 0  # written blocks (a fresh cache is sparse)
    need = math.prod(shape) * 2 + 4096 - (allocated if done else 0)  # a restart frees the old file's blocks first
    return dict(shape=shape, head=head, done=done, need=need, freed=0 if done else allocated)


def encoded_chunks(model, split_dir, states, img_size, size, device, ctx, start=0, batch_size=256, workers=-1):
    """Frames [start, F) of a split -> yields (start, stop, float32 (n, P, D) on device) while workers load the next."""
    spans = [(s, min(s + batch_size, len(states))) for s in range(start, len(states), batch_size)]
    workers = os.cpu_count() if workers < 0 else workers
    loader = torch.utils.data.DataLoader(spans, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                                         collate_fn=partial(load_frames, split_dir, states, img_size),
                                         generator=torch.Generator())  # leaves the global RNG (model init) alone
    print(f"{split_dir.name}: encoding frames {start}..{len(states)}, {batch_size} per chunk, {workers} loader workers")
    with tqdm(total=len(states) - start, unit="img", desc=f"encode {split_dir.name}", disable=None) as bar:
        for (a, b), frames in zip(spans, loader):
            with ctx:  # bf16 autocast on CUDA unless --dtype float32
                z = encode(model, frames, size)
            yield a, b, z
            bar.update(b - a)


def load_frames(split_dir, states, img_size, span):
    """uint8 (n, S, S, 3) for frames [start, stop): frames.npy if at img_size (as data.WindowDataset), else rendered."""
    start, stop = span
    frames = np.load(split_dir / "frames.npy", mmap_mode="r") if (split_dir / "frames.npy").is_file() else None
    if frames is not None and frames.shape[1] == img_size:  # a path, not the memmap, travels to the workers
        return torch.from_numpy(np.array(frames[start:stop]))  # (n, S, S, 3), a writable copy
    return torch.from_numpy(np.stack([data.render_state(s, img_size) for s in states[start:stop]]))  # (n, S, S, 3)


# ---- The in-memory store (train.py --features memory): each frame encoded once, not twice per window and epoch -------
# For datasets no disk holds as float16 (the full run: 152 GB of float16; 77 GB of int8 fit one H200 next to training).

class FeatureStore:
    """(F, P, D) features as int8 codes, one scale per token, after dividing each channel by its RMS (so a few large
    channels do not cost the others their precision): x ~= q * scale * channel_rms; store[idx] -> float32 (n, P, D)."""

    def __init__(self, frames, patches, dim, device):
        self.q = torch.empty(frames, patches, dim, dtype=torch.int8, device=device)  # (F, P, D)
        self.scale = torch.empty(frames, patches, 1, device=device)  # (F, P, 1)
        self.channel, self.sq_error, self.sq_norm, self.error = None, 0.0, 0.0, 0.0  # channel RMS (D,): first chunk
        self.shape, self.nbytes = self.q.shape, self.q.nbytes + self.scale.nbytes  # D + 4 bytes per token

    def put(self, start, x):
        """Store exact x float32 (n, P, D) as rows start..start+n; error: ||stored - exact|| / ||exact|| so far."""
        if self.channel is None:
            self.channel = x.pow(2).mean((0, 1)).sqrt().clamp_min(1e-6)  # (D,)
        y = x / self.channel
        scale = y.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # (n, P, 1)
        q = (y / scale).round().to(torch.int8)
        self.q[start:start + len(x)], self.scale[start:start + len(x)] = q, scale
        self.sq_error += (q * scale * self.channel - x).pow(2).sum().item()
        self.sq_norm += x.pow(2).sum().item()
        self.error = math.sqrt(self.sq_error / max(self.sq_norm, 1e-30))

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx, device=self.q.device)
        return self.q[idx] * self.scale[idx] * self.channel  # (n, P, D) float32

    def __len__(self):
        return len(self.q)


def available_ram():
    """Bytes of RAM available to new work (Linux MemAvailable: free plus reclaimable page cache)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---- The token sources (--tokens): `state` from the simulator, `dinov2` above, `jepa` trained with the predictor -----
# State tokens: positions in units of UNIT px, and the angle scaled so that 20 deg counts like 20 px (the success
# radii of DINO-WM's eval_state), so the planner's latent MSE weighs position and angle as the success test does.
UNIT = 100.0
ANGLE = 20.0 / UNIT / math.radians(20.0)  # cos/sin of the angle times this: a small turn of 20 deg moves them 0.2
SPEED = 1000.0  # px/s per unit: velocities inform the dynamics but weigh little in the planning cost
SIGREG_KNOTS, SIGREG_PROJ = 17, 1024  # LeWM module.py / lewm.yaml: knots on t in [0, 3]; random directions per call


def state_tokens(s):
    """One token per frame from that frame's simulator state only, never the action: (..., 7) -> (..., 1, 12). The
    agent's offset and velocity in the block frame (rotated by -angle) make contact local: the same push from the same
    side looks the same wherever the T is; the world velocity stays too (the PD controller carries it over)."""
    s = torch.as_tensor(s, dtype=torch.float32)
    agent, block, th, vel = s[..., 0:2], s[..., 2:4], s[..., 4], s[..., 5:7]
    c, sn = th.cos(), th.sin()
    rot = lambda v: torch.stack([c * v[..., 0] + sn * v[..., 1], c * v[..., 1] - sn * v[..., 0]], -1)  # noqa: E731
    return torch.cat([(agent - 256) / UNIT, (block - 256) / UNIT, ANGLE * torch.stack([c, sn], -1),
                      rot(agent - block) / UNIT, rot(vel) / SPEED, vel / SPEED], -1)[..., None, :]  # (..., 1, 12)


def sigreg(z, num_proj=SIGREG_PROJ, knots=SIGREG_KNOTS):
    """LeWM's SIGReg (le-wm module.py, from LeJEPA arXiv 2511.08544): the Epps-Pulley statistic of each 1-d random
    projection of the batch against N(0, 1), averaged over directions and frames. z (B, T, D) -> ().
    Known answers: ~1.06 for a standard normal batch, whatever B; B * 0.41 for a collapsed batch (all rows 0)."""
    z = z.float().transpose(0, 1)  # (T, B, D): one test per frame over the batch, as LeWM's emb.transpose(0, 1)
    t = torch.linspace(0, 3, knots, device=z.device)  # (K,) where the characteristic functions are compared
    phi = torch.exp(-t.square() / 2)  # (K,) characteristic function of N(0, 1), also the integration window
    w = torch.full_like(t, 6 / (knots - 1))  # trapezoid weights of the integral over [-3, 3] (even integrand)
    w[[0, -1]] /= 2
    A = torch.randn(z.shape[-1], num_proj, device=z.device)  # (D, M) fresh directions at every call
    x = (z @ (A / A.norm(dim=0)))[..., None] * t  # (T, B, M, K)
    err = (x.cos().mean(1) - phi).square() + x.sin().mean(1).square()  # (T, M, K) |empirical CF - phi|^2
    return (err @ (w * phi)).mean() * z.shape[1]  # times B: the test statistic, not the distance


def jepa_reg(z, mc):
    """The weighted anti-collapse loss of jepa tokens: z (B, T, P, D) -> (). With jepa_delta (ours), also SIGReg on
    the frame-to-frame changes, each dimension scaled to unit std: changes that only the rare block pushes make
    (mostly zero, heavy-tailed) are far from Gaussian, so the encoder is pushed to encode what moves at every step,
    the agent, which a label-free model otherwise drops (nothing in its loss needs it)."""
    reg = mc.jepa_sigreg * sigreg(z.flatten(2))  # (B, T, P*D)
    if mc.jepa_delta:
        d = (z[:, 1:] - z[:, :-1]).flatten(2).float()  # (B, T-1, P*D)
        reg = reg + mc.jepa_delta * sigreg(d / d.std(0, keepdim=True).detach().clamp_min(1e-6))
    return reg


class JEPAEncoder(nn.Module):
    """The pixel encoder of --tokens jepa, trained with the predictor: stride-2 conv blocks, then LeWM's MLP projector
    -> one D-dim token per frame (LeWM's ViT-tiny costs more on a CPU budget; PLDM's encoders are CNNs). IMPORTANT: the
    token ends in a BatchNorm without affine parameters. SIGReg's gradient vanishes as the tokens shrink to one point
    (the statistic is even in the scale), so the encoder can collapse while SIGReg stays at its maximum; the BatchNorm
    pins each dimension's batch std at 1 and leaves SIGReg the shape (Gaussian marginals, no redundancy)."""

    def __init__(self, img_size, dim, width):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]  # S -> S/16: 96 px -> 6 x 6 cells of 6 px (agent ~6 px)
        self.convs = nn.Sequential(*[layer for cin, cout in zip(chans[:-1], chans[1:]) for layer in (
            nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())])
        cells = (img_size // 16) ** 2
        # Flatten, not pool: the cell index is where things are, and where is what the planner needs.
        self.projector = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * cells, 512), nn.BatchNorm1d(512), nn.GELU(),
                                       nn.Linear(512, dim), nn.BatchNorm1d(dim, affine=False))

    def forward(self, obs):
        """uint8 frames (B, T, S, S, 3) -> tokens (B, T, 1, D)."""
        x = obs.flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B*T, 3, S, S) in [-1, 1]
        return self.projector(self.convs(x)).view(*obs.shape[:2], 1, -1)  # (B, T, 1, D)


def windows(mc, root, split, num_frames, dino_weights=None, features="cache", device="cpu", ctx=None):
    """A run's WindowDataset; dinov2 features "cache": the cache of `dino.py encode` when one matches, else frames;
    "memory": every frame encoded now into an int8 FeatureStore on device; "off": frames (DINOv2 on every batch)."""
    feats, name, size, weights = None, mc.dino_name, mc.dino_size, dino_weights or None
    if mc.tokens == "dinov2" and features == "cache":
        feats = load_features(root, split, name, size, weights, mc.img_size)
    elif mc.tokens == "dinov2" and features == "memory":  # every frame encoded once by a DINOv2 freed afterwards
        device, ctx = torch.device(device), ctx or contextlib.nullcontext()
        states, P, D = data.load_split(root, split)["states"], (size // PATCH) ** 2, ARCHS[name.removesuffix("_reg")][0]
        need = len(states) * P * (D + 4)  # int8 codes + a float32 scale per token
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_ram()
        require(need + STORE_SPARE <= free, f"--features memory: the {split} features of {root} need {need / 1e9:.1f} "
                f"GB of {device.type} memory, {free / 1e9:.1f} GB are free (keeping {STORE_SPARE / 2**30:.0f} GiB for "
                "training): --features cache (after `dino.py encode`) or off")
        model = load_dinov2(name, weights, device)
        feats = FeatureStore(len(states), P, D, device)
        for start, _, z in encoded_chunks(model, Path(root) / split, states, mc.img_size, size, device, ctx):
            feats.put(start, z)
        print(f"{split}: {len(feats)} frames held in {device} memory as int8 ({feats.nbytes / 1e9:.2f} GB); relative "
              f"RMS error against the exact features {feats.error:.2e}")
    return data.WindowDataset(root, split, num_frames, mc.frameskip, mc.tokens != "state", mc.img_size, feats)


def make_input(mc, device, dino_weights=None):
    """The run's frozen token source: batch -> x, what WorldModel.encode reads (jepa: frames; its encoder trains)."""
    encoder = None
    require(mc.tokens != "dinov2" or dino_weights in (None, "", "random") or Path(dino_weights).is_file(),
            f"--dino-weights {dino_weights}: no such file; pass an official {weights_file(mc.dino_name)} or random")

    def input_of(batch):
        nonlocal encoder
        if mc.tokens == "state":
            return state_tokens(batch["state"].to(device))  # (B, T, 1, 12)
        if mc.tokens == "jepa":
            return batch["obs"].to(device, non_blocking=True)  # (B, T, S, S, 3) uint8
        if "feat" in batch:
            return batch["feat"].to(device, non_blocking=True).float()  # (B, T, P, D)
        encoder = encoder or load_dinov2(mc.dino_name, dino_weights, device)  # built on first use only
        obs = batch["obs"].to(device, non_blocking=True)  # (B, T, S, S, 3)
        return encode(encoder, obs.flatten(0, 1), mc.dino_size).unflatten(0, obs.shape[:2])  # (B, T, P, D)
    return input_of


def batch_of_states(states, mc):
    """Simulator states (E, 7) -> a batch of one-frame windows for make_input: state, and frames for pixel tokens."""
    batch = {"state": torch.as_tensor(np.asarray(states), dtype=torch.float32)[:, None]}  # (E, 1, 7)
    if mc.tokens != "state":
        batch["obs"] = torch.from_numpy(data.render_batch(np.asarray(states)[:, None], mc.img_size))  # (E, 1, S, S, 3)
    return batch


def main(cfg: EncodeConfig):
    """Cache DINO patch features of a dataset (resumable; refused up front when the disk cannot hold them)."""
    print(asdict(cfg))
    device, ctx = data.setup(cfg.device, 0, cfg.dtype)
    root = Path(cfg.data)
    dtype = "bfloat16" if device.type == "cuda" and cfg.dtype == "bfloat16" else "float32"  # as data.setup runs it
    plans = {s: cache_plan(cfg, s, ARCHS[cfg.name.removesuffix("_reg")][0], dtype) for s in cfg.split.split(",")}
    need = sum(p["need"] for p in plans.values())
    free = shutil.disk_usage(root).free + sum(p["freed"] for p in plans.values())
    print(f"disk: the feature cache needs {need / 1e9:.1f} GB more, {free / 1e9:.1f} GB are free under {root}")
    require(need + DISK_RESERVE <= free, f"the feature cache needs {need / 1e9:.1f} GB more disk under {root} + "
            f"{DISK_RESERVE / 2**30:.0f} GiB spare, {free / 1e9:.1f} GB are free: free space, or train with --features "
            "memory (int8 in GPU memory) or off (DINOv2 on every batch); train.py --dry-run says the cost of each")
    if all(p["done"] == p["shape"][0] for p in plans.values()):
        return print(f"{cfg.data}: the feature cache of {cfg.split} is complete")
    model = load_dinov2(cfg.name, cfg.dino_weights or None, device)
    for split, plan in plans.items():  # encode the frames not yet in features.npy, resuming at plan["done"]
        (F_, P, D), head, done = plan["shape"], plan["head"], plan["done"]
        npy, js = root / split / "features.npy", root / split / "features.json"
        if done:
            feats = np.load(npy, mmap_mode="r+")  # resume after an interruption
        else:  # header first: a crash before the .npy exists leaves done = 0, which never trusts the old file
            data.atomic_write(js, {**head, "done": 0})
            feats = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(F_, P, D))
        print(f"{split}: {F_} frames -> {npy} {feats.shape} float16 = {feats.nbytes / 1e9:.2f} GB, {done} done before")
        if done == F_:
            continue
        t0 = time.perf_counter()
        states = data.load_split(root, split)["states"]
        for start, stop, z in encoded_chunks(model, root / split, states, head["img_size"], cfg.size, device, ctx,
                                             done, cfg.batch_size, cfg.workers):
            feats[start:stop] = z.half().cpu().numpy()  # (n, P, D)
            feats.flush()  # on disk before the header claims them
            data.atomic_write(js, {**head, "done": stop})
        seconds = time.perf_counter() - t0  # includes rendering or reading frames: what a user waits for
        speed = {"images_per_s": (F_ - done) / seconds, "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9
                 if device.type == "cuda" else None}
        data.atomic_write(js, {**head, "done": F_, **speed})  # the measured speed, for `reproduce.sh gpu-check`
        print(f"{split}: encoded {F_ - done} frames in {seconds:.1f} s: {speed['images_per_s']:.1f} images/s")


def check(cfg: CheckConfig):
    """Print the parameter count and output shapes: a quick check that a weights file is the right one."""
    device, _ = data.setup(cfg.device)
    model = load_dinov2(cfg.name, cfg.weights or None, device)
    print(f"{cfg.name}: {sum(p.numel() for p in model.parameters()):,} parameters, weights "
          f"{weights_tag(cfg.weights or None, cfg.name)}")
    for px in (224, 196):
        x = torch.linspace(-1, 1, 3 * px * px, device=device).reshape(1, 3, px, px)  # (1, 3, px, px)
        with torch.inference_mode():
            out = model.forward_features(x)
        print(f"  {px} px input: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items() if v is not None))


if __name__ == "__main__":
    data.cli(None, doc=__doc__, commands={"encode": (main, EncodeConfig), "check": (check, CheckConfig)})
