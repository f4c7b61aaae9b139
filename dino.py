"""DINOv2 ViT encoder written from scratch (exact, offline weights) and the DINO patch-feature cache.

The frozen eyes of DINO-WM: facebookresearch/dinov2's ViT-S/B/L/g (+ _reg) in plain PyTorch. The state_dict is
key for key the official one (official .pth files load with strict=True) and forward_features equals the
official model's, positional-embedding interpolation included (spec/dinov2.md).
Reads:  weights .pth (--dino-weights PATH, else <torch hub dir>/checkpoints/<official file>, else the official
        URL, downloaded once); for `encode`, a dataset DIR in data.py's layout.
Writes: DIR/{split}/features.npy float16 (F, P, D) + features.json {name, size, weights, img_size, fingerprint,
        frames, done}: resumable, and ignored by load_features unless complete and matching.
GPU:    python dino.py encode --data runs/data --device cuda --workers 8    (H200 images/s: not yet measured)
CPU:    python dino.py encode --data runs/quick/data --dino-weights random --size 28
        python dino.py check --weights ~/Downloads/dinov2_vits14_pretrain.pth   (22,056,576 params, shapes)
"""
import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data


@dataclass
class Config:
    data: str = ""  # dataset folder written by data.py (collect or import-dinowm); required
    split: str = "train,val"  # comma-separated splits to encode
    dino_weights: str = ""  # .pth file, "random" (meaningless, for tests), or "" = official file (hub cache/download)
    name: str = "dinov2_vits14"  # encoder; DINO-WM uses ViT-S/14 without registers (conf/encoder/dino.yaml)
    size: int = 196  # encoder input side in px; DINO-WM resizes 224 -> 196 = 14x14 patches (visual_world_model.py)
    img_size: int = 0  # render size in px before that resize, 0 = the dataset's img_size (as train.py)
    batch_size: int = 256  # frames per forward pass; also the resumable chunk
    workers: int = 0  # processes that render or read frames while the encoder runs (0 = in the main process)
    device: str = "auto"  # auto | cpu | cuda (auto picks cuda when present)
    overwrite: bool = False  # discard an existing cache written with other weights, size or name


# Shapes: B batch, S image side (px), P patches = (size/14)^2, D width, R register tokens (0 or 4), N = 1 + R + P.
PATCH = 14  # patch side in px (all DINOv2 hub models)
GRID = 37  # side of the stored positional grid: the hub builds every model at img_size 518 = 37 * 14
ARCHS = {  # name -> (width D, depth, heads of 64 dims, FFN); dinov2/hub/backbones.py, spec/dinov2.md s1
    "dinov2_vits14": (384, 12, 6, "mlp"),
    "dinov2_vitb14": (768, 12, 12, "mlp"),
    "dinov2_vitl14": (1024, 24, 16, "mlp"),
    "dinov2_vitg14": (1536, 40, 24, "swiglu"),
}
BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


def weights_file(name):
    """Official checkpoint file name: register models add _reg4 to the file name only (dinov2/hub/backbones.py)."""
    arch = name.removesuffix("_reg")
    return f"{arch}_reg4_pretrain.pth" if name.endswith("_reg") else f"{arch}_pretrain.pth"


def weights_tag(weights, name="dinov2_vits14"):
    """Identifies the weights in cache headers: "random", or "<file name>:<bytes>" (None/"" = the hub-cache file)."""
    if weights == "random":
        return "random"
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / weights_file(name)
    return f"{path.name}:{path.stat().st_size if path.is_file() else 'missing'}"


def preprocess(frames, size=196):
    """uint8 frames (B, S, S, 3) on any device -> float (B, 3, size, size) in [-1, 1], as DINO-WM feeds DINOv2."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"preprocess expects uint8 RGB frames (B, S, S, 3), got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S) in [0, 1]
    # Normalize(mean 0.5, std 0.5), no ImageNet statistics: DINO-WM datasets/img_transforms.py
    x = (x - 0.5) / 0.5  # (B, 3, S, S) in [-1, 1]
    if x.shape[-2:] != (size, size):  # torchvision Resize(196) in DINO-WM's visual_world_model.py: antialiased bilinear
        x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)  # (B, 3, size, size)
    return x


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)  # bias, no norm (dinov2/layers/patch_embed.py)

    def forward(self, x):
        """(B, 3, H, W) -> (B, H/14 * W/14, D), patches in row-major order."""
        if x.shape[-2] % PATCH or x.shape[-1] % PATCH:
            raise ValueError(f"DINOv2 input sides must be multiples of {PATCH} px, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, D)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # one fused matmul; output columns are [q; k; v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """(B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        # heads are contiguous 64-wide chunks of q, k and v (dinov2/layers/attention.py reshape(B, N, 3, h, D/h))
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, 64)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, 64), softmax(q k^T / 8) v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        """(B, N, D) -> (B, N, D); exact (erf) GELU, nn.GELU's default."""
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        """(B, N, D) -> (B, N, D); ViT-g's FFN (dinov2/layers/swiglu_ffn.py)."""
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # 2 x (B, N, hidden)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # the hub builds init_values=1.0; checkpoints hold trained values

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        # official order of registration, so state_dict keys come out in the file's order; LayerNorm eps 1e-6
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # SwiGLUFFNFused hidden width: (int(4 D * 2/3) + 7) // 8 * 8 = 4096 for ViT-g (dinov2/layers/swiglu_ffn.py)
        self.mlp = Mlp(dim, 4 * dim) if ffn == "mlp" else SwiGLU(dim, (int(4 * dim * 2 / 3) + 7) // 8 * 8)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        """(B, N, D) -> (B, N, D), pre-norm residual blocks with LayerScale on both branches."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


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
        self.patch_embed = PatchEmbed(D)
        self.blocks = nn.ModuleList(Block(D, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Identity()
        self._pos_cache = {}  # (h0, w0, device) -> interpolated table; emptied whenever weights are loaded
        self.register_load_state_dict_post_hook(lambda module, keys: module._pos_cache.clear())

    def interpolate_pos_encoding(self, h0, w0):
        """Positional table for an h0 x w0 patch grid: (1, 1 + h0 * w0, D), the CLS row first (spec/dinov2.md s3)."""
        if (h0, w0) == (GRID, GRID):
            return self.pos_embed  # 518 x 518 input: the stored table, untouched
        key = (h0, w0, self.pos_embed.device)
        if key in self._pos_cache:
            return self._pos_cache[key]
        pe = self.pos_embed.float()
        grid = pe[:, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)  # (1, D, 37, 37)
        if self.interpolate_offset:
            # scale_factor (not size): the kernel then samples at ratio 37 / (h0 + 0.1), so values differ from a
            # size=(h0, w0) resize; the 0.1 guards floor(37 * s) against round-down (facebookresearch/dino issue #8)
            kw = dict(scale_factor=((h0 + self.interpolate_offset) / GRID, (w0 + self.interpolate_offset) / GRID))
        else:
            kw = dict(size=(h0, w0))
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **kw)  # (1, D, h0, w0)
        assert grid.shape[-2:] == (h0, w0), grid.shape
        table = torch.cat((pe[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)  # (1, 1 + h0 * w0, D)
        if not (torch.is_grad_enabled() and self.pos_embed.requires_grad):  # frozen: cache; trained: recompute
            self._pos_cache[key] = table
        return table

    def forward_features(self, x, masks=None):
        """(B, 3, H, W) normalised, H and W multiples of 14 -> dict of normed CLS / register / patch tokens."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)  # (B, P, D)
        if masks is not None:  # (B, P) bool, DINOv2 training only
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + P, D)
        x = x + self.interpolate_pos_encoding(H // PATCH, W // PATCH).to(x.dtype)
        if self.register_tokens is not None:  # inserted after the positional embedding: registers get none
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)  # (B, N, D)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)  # (B, N, D)
        R = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1 : 1 + R],
                "x_norm_patchtokens": x_norm[:, 1 + R :], "x_prenorm": x, "masks": masks}

    def forward(self, x):
        """(B, 3, H, W) -> (B, D): the normed CLS token through the (identity) head, as the hub model."""
        return self.head(self.forward_features(x)["x_norm_clstoken"])


def random_init_(model):
    """Deterministic random weights (own generator, seed 0), so every stage asking for "random" sees one encoder."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # fixed order, so the draws are reproducible
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # LayerNorm weights and LayerScale gammas: 1 (spec/dinov2.md s6)
                p.fill_(1.0)
            else:  # linear / conv weights and tokens: trunc-normal 0.02 as dinov2's init_weights_vit_timm
                nn.init.trunc_normal_(p, std=0.02, generator=g)


def official_weights(name):
    """Path of the official checkpoint in the torch hub cache, downloaded there once if absent."""
    file = weights_file(name)
    path = Path(torch.hub.get_dir()) / "checkpoints" / file
    if path.is_file():
        return path
    url = f"{BASE_URL}/{name.removesuffix('_reg')}/{file}"
    print(f"downloading {url} -> {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)  # writes a temp file, then renames
    except OSError as e:  # offline, DNS, proxy or HTTP error (URLError is an OSError)
        raise FileNotFoundError(
            f"DINOv2 weights {file} are not on this machine and could not be downloaded ({e}).\n"
            f"Fetch {url} elsewhere and put it at {path} (the torch hub cache), or pass "
            f"--dino-weights /path/to/{file}; --dino-weights random runs offline with a meaningless encoder."
        ) from e
    return path


def load_dinov2(name="dinov2_vits14", weights=None, device="cpu"):
    """Frozen DINOv2 in eval mode on device. weights: None/"" = official file, a .pth path, or "random"."""
    with torch.device("meta"):  # no memory, no global-RNG draws; filled below
        model = DinoVisionTransformer(name)
    model = model.to_empty(device="cpu")
    if weights == "random":
        print(f"WARNING: {name} has RANDOM weights (seed 0): features are meaningless, for tests and offline "
              "demos only", file=sys.stderr)
        random_init_(model)
    else:
        path = Path(weights) if weights else official_weights(name)
        if not path.is_file():
            raise FileNotFoundError(f"DINOv2 weights file {path} does not exist; pass --dino-weights PATH to an "
                                    f"official {weights_file(name)}, or random")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("model", sd.get("state_dict", sd))  # unwrap training checkpoints
        try:
            model.load_state_dict(sd, strict=True)  # IMPORTANT: strict, so a LayerScale or key mismatch cannot hide
        except RuntimeError as e:
            raise ValueError(f"{path} does not hold {name} weights (wrong --name?): {str(e)[:600]}") from e
    return model.eval().requires_grad_(False).to(device)


def encode(model, frames, size=196):
    """uint8 frames (B, S, S, 3) -> x_norm_patchtokens float32 (B, P, D) on the model's device."""
    device = model.pos_embed.device
    frames = torch.as_tensor(frames).to(device, non_blocking=True)  # move uint8: 4x fewer bytes than float
    # bf16 on CUDA is a deviation: DINO-WM ran the encoder in fp32 (spec/dinov2.md s7, tolerances in s9)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode(), amp:
        z = model.forward_features(preprocess(frames, size))["x_norm_patchtokens"]  # (B, P, D)
    # clone outside inference mode: inference tensors cannot be saved for backward by a predictor trained on them
    return z.float().clone()  # (B, P, D)


def cache_header(root, name, size, weights, img_size=None):
    """What a feature cache must match: encoder, its input size, weights, render size and the dataset itself."""
    meta = data.load_meta(root)  # its fingerprint changes when the dataset is re-collected
    return dict(name=name, size=size, weights=weights_tag(weights, name), img_size=img_size or meta["img_size"],
                fingerprint=meta.get("fingerprint"))


def load_features(root, split, name="dinov2_vits14", size=196, weights=None, img_size=None):
    """The cached (F, P, D) float16 features as a read-only memmap, or None unless complete and matching."""
    npy, js = Path(root) / split / "features.npy", Path(root) / split / "features.json"
    if not (npy.is_file() and js.is_file()):
        return None
    head = json.loads(js.read_text())
    if any(head.get(k) != v for k, v in cache_header(root, name, size, weights, img_size).items()):
        return None
    return np.load(npy, mmap_mode="r") if head["done"] == head["frames"] else None  # (F, P, D)


def write_json(path, obj):
    """Atomic: a reader (or a resumed run) never sees a half-written header."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_frames(split_dir, states, img_size, span):
    """uint8 (n, S, S, 3) for frames [start, stop): frames.npy if at img_size (as data.WindowDataset), else rendered."""
    start, stop = span
    frames = np.load(split_dir / "frames.npy", mmap_mode="r") if (split_dir / "frames.npy").is_file() else None
    if frames is not None and frames.shape[1] == img_size:  # a path, not the memmap, travels to the workers
        return torch.from_numpy(np.array(frames[start:stop]))  # (n, S, S, 3), a writable copy
    return torch.from_numpy(np.stack([data.render_state(s, img_size) for s in states[start:stop]]))  # (n, S, S, 3)


def encode_split(model, cfg, split, device):
    """Encode every frame of one split into DIR/{split}/features.npy, resuming from the header's "done" count."""
    root = Path(cfg.data)
    states = data.load_split(root, split)["states"]  # (F, 7); also validates frames.npy when present
    npy, js = root / split / "features.npy", root / split / "features.json"
    shape = (len(states), (cfg.size // PATCH) ** 2, model.embed_dim)  # (F, P, D)
    head = {**cache_header(root, cfg.name, cfg.size, cfg.dino_weights or None, cfg.img_size), "frames": shape[0]}
    old = json.loads(js.read_text()) if js.is_file() and npy.is_file() else {}
    same = all(old.get(k) == v for k, v in head.items())
    if old and not same and not cfg.overwrite:
        raise ValueError(f"{js} was written for {old}, not {head}: pass --overwrite to re-encode")
    if same and old["done"] > 0 and not cfg.overwrite:
        done, feats = old["done"], np.load(npy, mmap_mode="r+")  # resume after an interruption
    else:  # header first: a crash before the .npy exists leaves done = 0, which never trusts the old file
        write_json(js, {**head, "done": 0})
        done, feats = 0, np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=shape)
    print(f"{split}: {shape[0]} frames -> {npy} {shape} float16, {done} done before")
    if done == shape[0]:
        return
    spans = [(s, min(s + cfg.batch_size, shape[0])) for s in range(done, shape[0], cfg.batch_size)]
    frames_of = partial(load_frames, root / split, states, head["img_size"])
    loader = torch.utils.data.DataLoader(spans, batch_size=None, num_workers=cfg.workers, collate_fn=frames_of,
                                         pin_memory=device.type == "cuda")  # rendering overlaps encoding
    t0 = time.perf_counter()
    with tqdm(total=shape[0] - done, unit="img", desc=split) as bar:
        for (start, stop), frames in zip(spans, loader):
            feats[start:stop] = encode(model, frames, cfg.size).half().cpu().numpy()  # (n, P, D)
            feats.flush()  # on disk before the header claims them
            write_json(js, {**head, "done": stop})
            bar.update(stop - start)
    seconds = time.perf_counter() - t0  # includes rendering or reading frames: what a user waits for
    print(f"{split}: encoded {shape[0] - done} frames in {seconds:.1f} s: {(shape[0] - done) / seconds:.1f} images/s")


def resolve_device(name):
    """--device: auto -> cuda when present, else cpu; the choice is printed."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    print(f"device: {device}")
    return device


def check(name="dinov2_vits14", weights=None, device="cpu"):
    """Print the parameter count and output shapes: a quick check that a weights file is the right one."""
    device = resolve_device(device)
    model = load_dinov2(name, weights, device)
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, weights {weights_tag(weights, name)}")
    for px in (224, 196):
        x = torch.linspace(-1, 1, 3 * px * px, device=device).reshape(1, 3, px, px)  # (1, 3, px, px)
        with torch.inference_mode():
            out = model.forward_features(x)
        print(f"  {px} px input: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items() if v is not None))


def main(cfg):
    print(asdict(cfg))
    if not cfg.data:
        raise ValueError("dino.py encode needs --data DIR (a dataset folder written by data.py)")
    if cfg.size % PATCH:
        raise ValueError(f"--size must be a multiple of {PATCH} px, got {cfg.size}")
    device = resolve_device(cfg.device)
    model = load_dinov2(cfg.name, cfg.dino_weights or None, device)
    for split in cfg.split.split(","):
        encode_split(model, cfg, split, device)


def parse_args(argv=None):
    """`encode` flags come from Config (help = each field's trailing comment); `check` has its own three."""
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="cache DINO patch features of a dataset", formatter_class=fmt)
    for f in dataclasses.fields(Config):
        kw = dict(action=argparse.BooleanOptionalAction) if f.type in (bool, "bool") else dict(type=type(f.default))
        enc.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=helps.get(f.name, " "), **kw)
    chk = sub.add_parser("check", help="print parameter count and output shapes", formatter_class=fmt)
    chk.add_argument("--weights", default="", help='.pth file, "random", or "" = official file (hub cache/download)')
    chk.add_argument("--name", default=Config.name, help="model name, e.g. dinov2_vits14, dinov2_vitb14_reg")
    chk.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = vars(parse_args())
    if args.pop("command") == "check":
        check(args["name"], args["weights"] or None, args["device"])
    else:
        main(Config(**args))
