"""World model: DINO-WM's frame-causal ViT predictor over per-frame tokens, conditioned per frame on ground-truth
actions (`baseline`), continuous latent actions from an inverse dynamics model (`la`), or their EMA
vector-quantised codes (`vq`); plus the token sources and the run folder every later stage reads.

Token sources (--tokens): `state`, one token per frame computed from the simulator state (state_tokens); `dinov2`,
DINO-WM's frozen DINOv2 patch tokens (cached by dino.py encode, or computed on the fly); `jepa`, a pixel encoder
trained with the predictor. The predictor, IDM, VQ and planners see only tokens (B, T, P, D), whatever the source.
Reads RUN/ckpt.pt (load_run; written by train.py). Writes nothing.
Tensor contract: forward(z (B, num_hist+1, P, D), action (B, T, A), proprio (B, T, 4)) -> dict of losses;
rollout(z0 (B, P, D), cond (B, H, C)) -> (B, H, P, D).
GPU: python train.py --data DIR --variant vq --out runs/vq                  (model code; timings in train.py)
CPU: python -m pytest -q test_all.py -k wm                                    (tiny sizes, seconds)
"""
import contextlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import dino
from data import require


@dataclass
class WMConfig:
    variant: Literal["baseline", "la", "vq"] = "baseline"  # conditioning: action labels, IDM latents, or IDM + VQ codes
    tokens: Literal["state", "dinov2", "jepa"] = "dinov2"  # source: simulator state, frozen DINOv2, trained pixels
    dino_name: str = "dinov2_vits14"  # frozen encoder for --tokens dinov2; DINO-WM conf/encoder/dino.yaml ViT-S/14
    dino_size: int = 196  # encoder input side in px (224 resized to 196 -> 14x14 patches, DINO-WM)
    img_size: int = 0  # render size in px for pixel tokens, 0 = the dataset's img_size
    num_hist: int = 1  # context frames seen by the predictor; seed 1, DINO-WM 3
    frameskip: int = 5  # env steps per macro step; DINO-WM and seed 5
    # derived from the dataset and token source by derive() (train.py):
    action_dim: int = field(default=10, metadata={"derived": True})  # A, macro-action width = 2 * frameskip
    visual_dim: int = field(default=384, metadata={"derived": True})  # D, token width (DINOv2 ViT-S/14 384, state 12)
    num_patches: int = field(default=196, metadata={"derived": True})  # P, tokens per frame (DINOv2 14^2, state 1)
    cond_dim: int = 32  # C, per-frame conditioning width; seed 32, DINO-WM's action embedding 10
    proprio: bool = False  # DINO-WM's proprio channels (Linear(4 -> proprio_dim) tiled); the seed drops them
    proprio_dim: int = 10  # proprio embedding width; DINO-WM 10
    depth: int = 6  # predictor blocks; DINO-WM conf/predictor/vit.yaml
    heads: int = 16  # predictor attention heads; DINO-WM 16
    dim_head: int = 64  # predictor head width; DINO-WM 64
    mlp_dim: int = 2048  # predictor FFN width; DINO-WM 2048
    dropout: float = 0.1  # predictor dropout (attention and FFN); DINO-WM 0.1
    idm_depth: int = 4  # IDM spatio-temporal blocks; seed 12 (see the IDM class for the choice of 4)
    idm_heads: int = 6  # IDM attention heads (head width idm_dim / idm_heads); seed 6
    idm_dim: int = 384  # IDM width; seed 384
    idm_mlp_dim: int = 1536  # IDM FFN width; seed 1536
    latent_dim: int = 32  # L, latent action width after latent_action_down; must equal cond_dim; seed 32
    num_codes: int = 32  # K, VQ codebook size; seed's final commit 32
    commitment: float = 0.05  # beta, commitment loss weight; seed 0.05
    ema_decay: float = 0.99  # gamma, EMA decay of the codebook statistics; seed 0.99
    jepa_dim: int = 64  # D of --tokens jepa: one token per frame; LeWM 192 (ViT-tiny CLS), smaller for CPU runs
    jepa_width: int = 16  # channels of the jepa CNN's first layer (doubled twice on the way down); CPU-sized
    jepa_reg: Literal["sigreg", "vcreg"] = "sigreg"  # anti-collapse term: LeWM's SIGReg or PLDM's variance-covariance
    jepa_sigreg: float = 0.09  # SIGReg weight; LeWM config/train/lewm.yaml 0.09 (paper: lambda ~ 0.1)
    jepa_std: float = 18.0  # VCReg std-hinge weight; stable-worldmodel's PLDM Push-T run (PLDM paper Two-Rooms: 3.98)
    jepa_cov: float = 12.0  # VCReg covariance weight; same Push-T run (PLDM Two-Rooms: 6.92)
    jepa_temp_sim: float = 0.2  # VCReg temporal smoothness ||z_t+1 - z_t||^2 weight; same Push-T run (Two-Rooms 0.742)
    jepa_temp_std: float = 0.0  # VCReg std hinge over each window's frames; Push-T run 0.7 (17-frame windows), 0
    #                             here: over our 2 frames it is |z1 - z0| / sqrt(2) and would push every dim apart
    jepa_temp_cov: float = 0.0  # VCReg covariance over each window's frames; Push-T run 0
    jepa_idm: float = 0.0  # PLDM's inverse-dynamics weight (MLP (z_t+1, z_t) -> a_t, MSE); PLDM Two-Rooms 1.07,
    #                        the Push-T run 0. Reads the action labels, so baseline only

    def __post_init__(self):
        data.check_choices(self)
        require(min(self.num_hist, self.frameskip, self.cond_dim, self.depth, self.heads, self.dim_head, self.mlp_dim,
                    self.idm_depth, self.idm_heads, self.idm_mlp_dim, self.latent_dim, self.num_codes) >= 1,
                "model sizes (--num-hist, --depth, --heads, --cond-dim, --idm-*, --latent-dim, --num-codes ...) "
                "must be >= 1")
        require(self.idm_dim % self.idm_heads == 0, f"--idm-dim {self.idm_dim} must be a multiple of --idm-heads")
        require(0 <= self.dropout < 1 and 0 < self.ema_decay < 1 and self.commitment >= 0,
                "--dropout in [0, 1), --ema-decay in (0, 1), --commitment >= 0")
        require(self.variant == "baseline" or self.latent_dim == self.cond_dim,
                f"--latent-dim {self.latent_dim} must equal --cond-dim {self.cond_dim}: la/vq condition on the latent")
        require(self.dino_size % dino.PATCH == 0 and max(self.img_size, self.dino_size) <= data.MAX_IMG,
                f"--dino-size {self.dino_size}: a multiple of {dino.PATCH}; it and --img-size {self.img_size} at most "
                f"{data.MAX_IMG} px")
        require(self.dino_name.removesuffix("_reg") in dino.ARCHS, f"--dino-name {self.dino_name!r}: choose one of "
                f"{', '.join(dino.ARCHS)} (optionally + _reg)")
        require(min(self.jepa_dim, self.jepa_width) >= 2 and min(self.jepa_sigreg, self.jepa_std, self.jepa_cov,
                self.jepa_temp_sim, self.jepa_temp_std, self.jepa_temp_cov) >= 0,
                "--jepa-dim and --jepa-width must be >= 2, the --jepa-* loss weights >= 0")
        if self.tokens != "jepa":  # silently ignoring them would mislead
            jepa = [f for f in self.__dataclass_fields__ if f.startswith("jepa_")]
            data.unused(self, jepa, f"--tokens {self.tokens}")
        require(self.jepa_idm == 0 or (self.tokens == "jepa" and self.variant == "baseline"), f"--jepa-idm "
                f"{self.jepa_idm} trains the jepa encoder on action labels: baseline runs only (la/vq learn without)")


# Shape legend: B batch, T frames, P tokens per frame, D token width, A macro action, C conditioning, L latent action,
# K codes, H horizon, N flattened transitions, W predictor token width = D + proprio_dim + C, S tokens of the IDM.
PROPRIO_IN = 4  # [agent_x, agent_y, agent_vx, agent_vy], z-scored by data.py (DINO-WM datasets/pusht_dset.py)
CKPT_FORMAT = "dinowm-la-v3"  # ckpt.pt "format"; bumped when the checkpoint layout changes
# State tokens: positions in units of UNIT px, and the angle scaled so that 20 deg counts like 20 px (the success
# radii of DINO-WM's eval_state), so the planner's latent MSE weighs position and angle as the success test does.
UNIT = 100.0
ANGLE = 20.0 / UNIT / math.radians(20.0)  # cos/sin of the angle times this: a small turn of 20 deg moves them 0.2
SPEED = 1000.0  # px/s per unit: velocities inform the dynamics but weigh little in the planning cost
# JEPA tokens. SIGReg as LeWM's module.py: 17 knots on t in [0, 3], 1024 random directions per call (lewm.yaml).
SIGREG_KNOTS, SIGREG_PROJ = 17, 1024
# Both regularisers aim at a per-dimension std of 1; an encoder whose median per-dimension token std (eval mode, val
# frames) is below this has collapsed (a collapsed pixel encoder sits at 1e-4 and below), and plan.py refuses it.
COLLAPSE_STD = 0.01


def state_tokens(s):
    """One token per frame from one frame's simulator state only, never the action: (..., 7) -> (..., 1, 12).

    World frame: agent xy, block xy (centred, / UNIT) and the angle as ANGLE * (cos, sin), which has no wrap-around.
    Block frame (rotated by -angle): the agent's position relative to the block and its velocity. These make contact
    local: the same push from the same side looks the same wherever the T is and however it is turned. Plus the
    agent's velocity in the world frame (the PD controller carries it over from one step to the next)."""
    s = torch.as_tensor(s, dtype=torch.float32)
    agent, block, th, vel = s[..., 0:2], s[..., 2:4], s[..., 4], s[..., 5:7]
    c, sn = th.cos(), th.sin()
    rot = lambda v: torch.stack([c * v[..., 0] + sn * v[..., 1], c * v[..., 1] - sn * v[..., 0]], -1)  # noqa: E731
    z = torch.cat([(agent - 256) / UNIT, (block - 256) / UNIT, ANGLE * torch.stack([c, sn], -1),
                   rot(agent - block) / UNIT, rot(vel) / SPEED, vel / SPEED], -1)  # (..., 12)
    return z[..., None, :]  # (..., 1, 12)


def frame_causal_mask(num_patches, num_frames):
    """DINO-WM generate_mask_matrix: token i in frame f_i sees token j iff f_j <= f_i. -> (T*P, T*P) bool."""
    frame = torch.arange(num_frames).repeat_interleave(num_patches)  # (T*P,)
    return frame[None, :] <= frame[:, None]  # (T*P, T*P), True = may attend


def sinusoidal(n, dim):
    """Fixed 1-D sin/cos table, sin on even and cos on odd channels, base 10000 (AdaWorld). -> (n, dim)"""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    pe = torch.zeros(n, dim)  # (n, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


def rotary(x, theta=10000.0):
    """Rotary position embedding over the sequence axis, interleaved pairs as rotary-embedding-torch. (..., S, d)"""
    S, d = x.shape[-2:]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * freqs  # (S, d/2)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., S, d/2) each: pairs (x0, x1), (x2, x3), ...
    out = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)  # (..., S, d/2, 2)
    return out.flatten(-2).type_as(x)  # (..., S, d)


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


def var_cov(x):
    """VICReg's variance and covariance terms over axis 1 (Bardes et al. 2022): x (G, N, D) -> std hinge (),
    squared off-diagonal covariance / (D (D - 1)) () (PLDM's adjust_cov), each averaged over the G groups."""
    x = x - x.mean(1, keepdim=True)
    std = (x.var(1) + 1e-4).sqrt()  # (G, D); eps 1e-4 as VICReg
    cov = x.transpose(1, 2) @ x / max(x.shape[1] - 1, 1)  # (G, D, D)
    D = x.shape[-1]
    off = cov.square().sum((1, 2)) - cov.diagonal(dim1=1, dim2=2).square().sum(-1)  # (G,)
    return F.relu(1 - std).mean(), (off / (D * (D - 1))).mean()  # hinge: push each dimension's std to >= 1


def vcreg(z, mc):
    """PLDM's anti-collapse terms (Sobal et al., arXiv 2502.14819): std hinge and covariance over the batch at every
    frame, temporal smoothness ||z_t+1 - z_t||^2, optionally std and covariance over each window's frames. z (B, T, D)
    -> () weighted sum."""
    z = z.float()
    std, cov = var_cov(z.transpose(0, 1))  # (T, B, D): over the batch, per frame
    loss = mc.jepa_std * std + mc.jepa_cov * cov + mc.jepa_temp_sim * (z[:, 1:] - z[:, :-1]).square().mean()
    if mc.jepa_temp_std or mc.jepa_temp_cov:
        std_t, cov_t = var_cov(z)  # (B, T, D): over each window's frames
        loss = loss + mc.jepa_temp_std * std_t + mc.jepa_temp_cov * cov_t
    return loss


def jepa_reg(z, mc):
    """The weighted anti-collapse loss of jepa tokens: z (B, T, P, D) -> ()."""
    z = z.flatten(2)  # (B, T, P*D)
    return mc.jepa_sigreg * sigreg(z) if mc.jepa_reg == "sigreg" else vcreg(z, mc)


class Attention(nn.Module):
    """Predictor attention (DINO-WM models/vit.py): pre-LN, fused qkv without bias, masked softmax, dropout."""

    def __init__(self, dim, heads, dim_head, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))

    def forward(self, x, mask):
        """(B, N, W), mask (N, N) bool or None -> (B, N, W)"""
        qkv = self.to_qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1))  # (B, N, 3, h, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, dh)
        # Scale dh^-0.5 (SDPA default) as upstream; dropout on the attention weights as upstream's attn dropout.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(o.transpose(1, 2).flatten(2))  # (B, N, W)


class FeedForward(nn.Sequential):
    """Pre-LN MLP: LN -> Linear -> GELU -> Dropout -> Linear -> Dropout (DINO-WM models/vit.py; IDM: dropout 0)."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class ViTPredictor(nn.Module):
    """DINO-WM's predictor: learned positions + pre-LN blocks under a frame-causal mask + final LN."""

    def __init__(self, num_patches, num_frames, dim, depth, heads, dim_head, mlp_dim, dropout):
        super().__init__()
        # randn init (std 1) kept for fidelity with DINO-WM models/vit.py; embedding dropout 0 upstream.
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames * num_patches, dim))  # (1, T*P, W)
        self.layers = nn.ModuleList(nn.ModuleList([Attention(dim, heads, dim_head, dropout),
                                                   FeedForward(dim, mlp_dim, dropout)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        # A buffer built from the arguments (upstream keeps it in a module global, moved to CUDA at construction).
        self.register_buffer("mask", frame_causal_mask(num_patches, num_frames), persistent=False)

    def forward(self, x):
        """(B, T, P, W) with T <= num_frames -> (B, T, P, W); output frame t predicts frame t + 1."""
        B, T, P, W = x.shape
        x = x.flatten(1, 2) + self.pos_embedding[:, :T * P]  # (B, T*P, W), shorter inputs use the first rows
        mask = self.mask[:T * P, :T * P] if T > 1 else None  # one frame: all ones, so let SDPA use its fast path
        for attn, ff in self.layers:
            x = x + attn(x, mask)
            x = x + ff(x)
        return self.norm(x).view(B, T, P, W)


class IDMAttention(nn.Module):
    """IDM self-attention (AdaWorld): pre-LN, separate q/k/v without bias; causal + rotary for the time axis."""

    def __init__(self, dim, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm = nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, queries=None):
        """(N, S, dim) -> (N, S, dim), attention along S (patches of a frame, or frames of a patch); with queries=n
        only the first n positions ask (N, n, dim), all S still answer."""
        h = self.norm(x)
        q, k, v = (f(y).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for f, y in ((self.to_q, h[:, :queries]), (self.to_k, h), (self.to_v, h)))
        if self.causal:  # rotary positions 0..T-1 on q and k (theta 10000), as AdaWorld's temporal attention
            q, k = rotary(q), rotary(k)  # (N, h, S, dh)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (N, h, S, dh)
        return self.to_out(o.transpose(1, 2).flatten(2))  # (N, S, dim)


class IDMBlock(nn.Module):
    """Spatio-temporal block: spatial attention within a frame, causal temporal attention per position, FFN."""

    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.spatial = IDMAttention(dim, heads, causal=False)
        self.temporal = IDMAttention(dim, heads, causal=True)
        self.ff = FeedForward(dim, mlp_dim)

    def forward(self, x, keep=None):
        """(B, T, S, dim) -> (B, T, S, dim), or (B, T, keep, dim): only the first `keep` tokens of every frame are
        updated and returned (the others are still read by the spatial attention)."""
        B, T, S, d = x.shape
        n = keep or S
        x = x[:, :, :n] + self.spatial(x.reshape(B * T, S, d), n).view(B, T, n, d)
        xt = x.transpose(1, 2).reshape(B * n, T, d)  # (B*n, T, dim): one sequence per spatial position
        x = x + self.temporal(xt).view(B, n, T, d).transpose(1, 2)
        return x + self.ff(x)


class IDM(nn.Module):
    """Inverse dynamics model: AdaWorld's latent-action encoder (models/lam.py) without its decoder.

    Default depth 4 instead of the seed's 12: at 12 x 384 the IDM costs ~23.7 GFLOPs per pair, 2.6x the
    predictor's ~9 (both counted from the layer sizes), although it only has to read the agent's displacement
    between two frames. Every block already mixes the two frames (temporal attention) after a full spatial attention,
    so 4 rounds of cross-frame exchange suffice to locate the agent and compare; that makes the IDM cost ~5.9
    GFLOPs per pair (counted; the last block is pruned, see forward), below the predictor. TODO: ablate 4 vs 12 on
    GPU (`--idm-depth 12` restores the seed).
    """

    def __init__(self, in_dim, num_patches, dim, depth, heads, mlp_dim):
        super().__init__()
        self.action_prompt = nn.Parameter(torch.empty(1, 1, 1, in_dim).uniform_(-1, 1))  # (1, 1, 1, D), AdaWorld
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.LayerNorm(dim))
        self.register_buffer("pos", sinusoidal(num_patches + 1, dim), persistent=False)  # (P+1, dim), spatial only
        self.blocks = nn.ModuleList(IDMBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.head = nn.Linear(dim, dim)  # output head; no final norm (AdaWorld)

    def forward(self, z):
        """(B, T, P, D) DINO tokens -> (B, T, dim) the action-prompt token of every frame."""
        B, T = z.shape[:2]
        x = torch.cat([self.action_prompt.expand(B, T, 1, -1).to(z.dtype), z], 2)  # (B, T, P+1, D)
        x = self.proj(x) + self.pos  # (B, T, P+1, dim)
        for block in self.blocks[:-1]:
            x = block(x)
        # Only the prompt token is read, so the last block updates only it (exact, ~22% of the IDM at depth 4): its
        # spatial attention still reads every patch; time mixes positions only with themselves, FFN and head per token.
        return self.head(self.blocks[-1](x, keep=1)[:, :, 0])  # (B, T, dim)


class VectorQuantizer(nn.Module):
    """EMA vector quantiser (seed models/vq_ema.py, one code per transition), fp32 statistics, DDP-consistent.

    Two fixes of the seed: the EMA state is initialised consistently from the first training batch (the seed starts
    cluster_size at 0 next to embedding_avg = E, so its first update inflates every used code ~25x and kills the rest),
    and a dead code is restarted together with its statistics m_k = x, n_k = 1 (the seed resets only E_k, which the
    next update overwrites with the stale m_k / n_k). Under torch.distributed the counts
    and sums are all-reduced and restart candidates come from rank 0, so every replica keeps the same codebook.
    """

    def __init__(self, num_codes, dim, ema_decay, commitment):
        super().__init__()
        self.decay, self.commitment = ema_decay, commitment
        self.register_buffer("embedding", torch.randn(num_codes, dim))  # (K, L) codebook E
        self.register_buffer("cluster_size", torch.ones(num_codes))  # (K,) EMA counts n
        self.register_buffer("embedding_avg", self.embedding.clone())  # (K, L) EMA sums m (consistent: E = m / n)
        self.register_buffer("initialised", torch.tensor(False))  # set by the first training batch

    @torch.no_grad()
    def _candidates(self, x):
        """K random inputs of this batch (rank 0's under DDP); used to initialise and to restart codes."""
        N, K = x.shape[0], self.embedding.shape[0]
        idx = torch.randperm(N, device=x.device)[:K] if N >= K else torch.randint(N, (K,), device=x.device)
        cand = x[idx].contiguous()  # (K, L)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(cand, 0)
        # First training batch (branch-free, so no host sync): E = m = K encoder outputs, n = 1 (consistent).
        fresh = ~self.initialised  # ()
        self.embedding.copy_(torch.where(fresh, cand, self.embedding))
        self.embedding_avg.copy_(torch.where(fresh, cand, self.embedding_avg))
        self.cluster_size.copy_(torch.where(fresh, torch.ones_like(self.cluster_size), self.cluster_size))
        self.initialised.fill_(True)
        return cand

    @torch.no_grad()
    def _ema_update(self, x, codes, cand):
        """n <- g n + (1-g) counts, m <- g m + (1-g) sums, E = m / laplace(n); restart dead codes from cand."""
        K = self.embedding.shape[0]
        onehot = F.one_hot(codes, K).float()  # (N, K)
        stats = torch.cat([onehot.sum(0)[:, None], onehot.T @ x], 1)  # (K, 1 + L): counts | sums
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)  # global counts and sums: identical update on every replica
        g = self.decay
        self.cluster_size.mul_(g).add_(stats[:, 0], alpha=1 - g)
        self.embedding_avg.mul_(g).add_(stats[:, 1:], alpha=1 - g)
        n_tot = self.cluster_size.sum()
        s = ((self.cluster_size + 1e-6) / (n_tot + K * 1e-6) * n_tot).clamp_min(1e-6)  # (K,) Laplace smoothing
        self.embedding.copy_(self.embedding_avg / s[:, None])
        # Dead code (s_k < 1e-3, ~690 unused steps after n_k = 1): restart it AND its statistics.
        dead = (s < 1e-3)[:, None]  # (K, 1)
        self.embedding.copy_(torch.where(dead, cand, self.embedding))
        self.embedding_avg.copy_(torch.where(dead, cand, self.embedding_avg))
        self.cluster_size.copy_(torch.where(dead[:, 0], torch.ones_like(self.cluster_size), self.cluster_size))

    def forward(self, z_e):
        """(N, L) encoder outputs -> z_q straight-through (N, L) fp32, codes (N,) long, commitment loss ()."""
        with torch.autocast(z_e.device.type, enabled=False):  # IMPORTANT: distances and EMA in fp32
            x = z_e.float()  # (N, L)
            cand = self._candidates(x.detach()) if self.training else None
            E = self.embedding  # (K, L)
            d = x.pow(2).sum(1, keepdim=True) - 2 * x @ E.T + E.pow(2).sum(1)  # (N, K) squared distances
            codes = d.argmin(1)  # (N,)
            z_q = E[codes]  # (N, L), gathered before the EMA update (a copy, so the update does not change it)
            if self.training:
                self._ema_update(x.detach(), codes, cand)
            commit = self.commitment * F.mse_loss(x, z_q.detach())  # beta * ||z_e - sg(z_q)||^2
            # IMPORTANT: straight-through estimator, the forward value is z_q, the gradient goes to z_e.
            return x + (z_q - x).detach(), codes, commit


class JEPAEncoder(nn.Module):
    """The pixel encoder of --tokens jepa, trained with the predictor: 4 stride-2 conv blocks, then an MLP projector
    with BatchNorm (LeWM's projector: Linear -> BatchNorm1d -> GELU -> Linear) -> one D-dim token per frame.

    LeWM encodes with a ViT-tiny CLS token; a CNN is cheaper on a CPU budget (PLDM's encoders are CNNs). IMPORTANT:
    with SIGReg the token ends in a BatchNorm without affine parameters. SIGReg's gradient vanishes when the tokens
    shrink towards one point (the statistic is even in the scale), so an encoder without it can collapse while
    SIGReg stays stuck at its maximum; the BatchNorm pins every dimension's batch std at 1 and leaves SIGReg the
    shape (Gaussian marginals, no redundant directions). PLDM's VCReg brings its own std hinge, so it goes without."""

    def __init__(self, img_size, dim, width, final_norm=True):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):  # S -> S/16: 96 px -> 6 x 6 cells of 6 px (the agent: ~6 px)
            blocks += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.convs = nn.Sequential(*blocks)
        cells = (img_size // 16) ** 2
        # Flatten, not pool: the cell index is where things are, and where is what the planner needs.
        self.projector = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * cells, 512), nn.BatchNorm1d(512), nn.GELU(),
                                       nn.Linear(512, dim), nn.BatchNorm1d(dim, affine=False) if final_norm else
                                       nn.Identity())

    def forward(self, obs):
        """uint8 frames (B, T, S, S, 3) -> tokens (B, T, 1, D)."""
        x = obs.flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B*T, 3, S, S) in [-1, 1]
        return self.projector(self.convs(x)).view(*obs.shape[:2], 1, -1)  # (B, T, 1, D)


class WorldModel(nn.Module):
    """Conditioning module (action encoder or IDM [+ VQ]) + optional proprio encoder + ViT predictor."""

    def __init__(self, cfg: WMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = None  # the trained pixel encoder of --tokens jepa; frozen sources arrive as tokens
        if cfg.tokens == "jepa":
            self.encoder = JEPAEncoder(cfg.img_size, cfg.jepa_dim, cfg.jepa_width, cfg.jepa_reg == "sigreg")
        # PLDM's inverse-dynamics head, sized as stable-worldmodel scripts/train/pldm.py (MLP, LayerNorm, hidden 512).
        self.jepa_idm = nn.Sequential(nn.Linear(2 * cfg.jepa_dim, 512), nn.LayerNorm(512), nn.GELU(),
                                      nn.Linear(512, cfg.action_dim)) if cfg.jepa_idm else None
        self.obs_dim = cfg.visual_dim + (cfg.proprio_dim if cfg.proprio else 0)  # channels the loss covers
        # DINO-WM's ProprioceptiveEmbedding is Conv1d(k=1) over time, i.e. a per-frame Linear.
        self.proprio_encoder = nn.Linear(PROPRIO_IN, cfg.proprio_dim) if cfg.proprio else None
        if cfg.variant == "baseline":
            self.action_encoder = nn.Linear(cfg.action_dim, cfg.cond_dim)  # seed: Linear(10 -> 32)
        else:
            self.idm = IDM(cfg.visual_dim, cfg.num_patches, cfg.idm_dim, cfg.idm_depth, cfg.idm_heads, cfg.idm_mlp_dim)
            self.latent_action_down = nn.Linear(cfg.idm_dim, cfg.latent_dim)  # seed name
        if cfg.variant == "vq":
            self.quantizer = VectorQuantizer(cfg.num_codes, cfg.latent_dim, cfg.ema_decay, cfg.commitment)
        self.predictor = ViTPredictor(cfg.num_patches, cfg.num_hist, self.obs_dim + cfg.cond_dim, cfg.depth,
                                      cfg.heads, cfg.dim_head, cfg.mlp_dim, cfg.dropout)

    def encode(self, x):
        """What make_input gives -> tokens (B, T, P, D): the jepa encoder on frames; other sources are tokens."""
        return x if self.encoder is None else self.encoder(x)

    def embed_proprio(self, p):
        """(..., 4) normalised proprio -> (..., proprio_dim), or None without proprio."""
        return self.proprio_encoder(p) if self.proprio_encoder is not None else None

    def observe(self, z, proprio=None):
        """Visual tokens (+ tiled proprio embedding): (B, T, P, D), (B, T, 4) -> (B, T, P, D [+ proprio_dim])."""
        if self.proprio_encoder is None:
            return z
        pe = self.embed_proprio(proprio).to(z.dtype)  # (B, T, proprio_dim)
        return torch.cat([z, pe[:, :, None].expand(-1, -1, z.shape[2], -1)], -1)  # order [visual | proprio]

    def predict(self, obs, cond):
        """Teacher-forced prediction: obs (B, T, P, O), cond (B, T, C) -> (B, T, P, O) predictions of frames 1..T."""
        c = cond.to(obs.dtype)[:, :, None].expand(-1, -1, obs.shape[2], -1)  # (B, T, P, C), tiled on every patch
        return self.predictor(torch.cat([obs, c], -1))[..., :self.obs_dim]  # predicted cond channels are ignored

    def conditioning(self, z, action=None):
        """z (B, T, P, D), action (B, T, A) -> {"cond" (B, T, C), la/vq: "latent" (B, T-1, L), vq: "codes", ...}."""
        if self.cfg.variant == "baseline":
            return {"cond": self.action_encoder(action)}  # (B, T, C)
        u = self.latent_action_down(self.idm(z))  # (B, T, L)
        # Shift convention (seed): a_t = u[t+1], which has seen frames 0..t+1 through causal temporal attention.
        # Only the T-1 real transitions a_0..a_{T-2} are quantised and counted (the seed also counts the copy).
        latent = u[:, 1:]  # (B, T-1, L)
        out = {"latent": latent}
        a = latent
        if self.cfg.variant == "vq":
            q, codes, commit = self.quantizer(latent.flatten(0, 1))  # (N, L), (N,), ()
            a = q.view(latent.shape)  # (B, T-1, L)
            out.update(codes=codes.view(latent.shape[:2]), commit_loss=commit)
        # The last frame (the target) carries a copy, a_{T-1} = a_{T-2}; the loss never reads its channels.
        out["cond"] = torch.cat([a, a[:, -1:]], 1)  # (B, T, C)
        return out

    def forward(self, x, action=None, proprio=None):
        """x: make_input's output for (B, num_hist+1) frames; action (B, T, A), proprio (B, T, 4) -> dict of losses,
        diagnostics and the tokens z (B, T, P, D)."""
        n, z = self.cfg.num_hist, self.encode(x)
        out = self.conditioning(z, action)
        out["tokens"] = z
        obs = self.observe(z, proprio)  # (B, T, P, O)
        pred = self.predict(obs[:, :n], out["cond"][:, :n])  # (B, n, P, O): frames 1..n, teacher forced
        # Targets are detached: frozen DINO tokens, plus DINO-WM's quirky proprio target that comes from the same
        # trainable proprio encoder (so only its input side learns; DINO-WM
        # models/visual_world_model.py).
        target = obs[:, 1:].detach()  # (B, n, P, O)
        if self.encoder is not None:  # jepa as LeWM and PLDM: no stop-gradient, the target frames' encoding learns too
            target = torch.cat([obs[:, 1:, :, :self.cfg.visual_dim], target[..., self.cfg.visual_dim:]], -1)
        out["pred_loss"] = F.mse_loss(pred.float(), target.float())
        out["visual_loss"] = F.mse_loss(pred[..., :self.cfg.visual_dim].float(), z[:, 1:].float()).detach()
        out["loss"] = out["pred_loss"] + out.get("commit_loss", 0.0)  # commit_loss is already beta-weighted
        if self.encoder is not None:  # jepa: the anti-collapse term (weighted), without which z = const is optimal
            out["reg_loss"] = jepa_reg(z, self.cfg)
            if self.jepa_idm is not None:  # the action a_t from (z_t+1, z_t): makes the encoder keep what moved
                zz = torch.cat([z[:, 1:], z[:, :-1]], -1).flatten(2)  # (B, T-1, 2*P*D)
                out["idm_loss"] = F.mse_loss(self.jepa_idm(zz).float(), action[:, :-1].float())
                out["reg_loss"] = out["reg_loss"] + self.cfg.jepa_idm * out["idm_loss"]
            out["loss"] = out["loss"] + out["reg_loss"]
        return out

    def plan_to_cond(self, plan):
        """Planner variable -> conditioning (B, H, C): baseline (B, H, A) actions, la (B, H, L), vq (B, H) codes."""
        if self.cfg.variant == "baseline":
            return self.action_encoder(plan)
        if self.cfg.variant == "la":
            return plan
        return self.quantizer.embedding[plan]  # (B, H, L)

    def rollout(self, z0, cond, proprio0=None, adapter=None):
        """Open-loop imagination: z0 (B, P, D), cond (B, H, C), proprio0 (B, 4) -> zs (B, H, P, D), ps (B, H, pd)|None.

        Frame h carries cond[:, h]; each step predicts from the last <= num_hist frames (history grows, then slides)
        and appends the last output frame (DINO-WM keeps its predicted proprio too). B = E*N samples at once.
        With an adapter (decode.ActionAdapter), cond holds real macro actions (B, H, A) and frame h's conditioning is
        adapter(its tokens, cond[:, h]): computed from the imagined frame, as the IDM would have labelled it.
        """
        n, H, D = self.cfg.num_hist, cond.shape[1], self.cfg.visual_dim
        obs = self.observe(z0[:, None], None if proprio0 is None else proprio0[:, None])  # (B, 1, P, O)
        conds = []
        for h in range(H):
            conds.append(cond[:, h] if adapter is None else adapter(obs[:, h, :, :D], cond[:, h]))  # (B, C)
            lo = max(0, h + 1 - n)
            nxt = self.predict(obs[:, lo:], torch.stack(conds[lo:], 1))[:, -1:]  # (B, 1, P, O)
            obs = torch.cat([obs, nxt], 1)  # (B, h+2, P, O)
        return obs[:, 1:, :, :D], (obs[:, 1:, 0, D:] if self.cfg.proprio else None)


@torch.no_grad()
def _diagnostic_predictions(model, z, action, proprio, perms):
    """Eval-mode visual predictions of frames 1..n under each cond permutation -> list of (B, n, P, D), target."""
    was = model.training
    model.eval()  # dropout off, no EMA update
    n, D = model.cfg.num_hist, model.cfg.visual_dim
    cond = model.conditioning(z, action)["cond"][:, :n]  # (B, n, C)
    obs = model.observe(z, proprio)[:, :n]  # (B, n, P, O)
    preds = [model.predict(obs, cond if p is None else cond[p])[..., :D].float() for p in perms]
    model.train(was)
    return preds, z[:, 1:].float()


def swap_score(model, z, action=None, proprio=None, num_perms=8, generator=None):
    """Information-bypass score (the seed's collapse check): fraction of (i, perm) where sample i, conditioned on
    A[perm(i)], lands closer to target perm(i) than to its own (margin 1e-3 * median distance). High (> 0.65) =
    shortcut."""
    B = z.shape[0]
    perms = [torch.randperm(B, generator=generator).to(z.device) for _ in range(num_perms)]
    preds, tgt = _diagnostic_predictions(model, z, action, proprio, perms)
    tgt = F.normalize(tgt.flatten(1), dim=1)  # (B, n*P*D)
    wins = []
    for perm, pred in zip(perms, preds):
        pred = F.normalize(pred.flatten(1), dim=1)  # (B, n*P*D)
        d_own, d_swap = (pred - tgt).norm(dim=1), (pred - tgt[perm]).norm(dim=1)  # (B,), (B,)
        wins.append((d_swap < d_own - 1e-3 * d_own.median()).float().mean())
    return torch.stack(wins).mean().item()


def shuffle_delta(model, z, action=None, proprio=None, generator=None):
    """Relative MSE increase when the conditioning is permuted within the batch (the seed's check). ~0 = ignored."""
    perm = torch.randperm(z.shape[0], generator=generator).to(z.device)
    (base, shuf), tgt = _diagnostic_predictions(model, z, action, proprio, [None, perm])
    mse_base, mse_shuf = F.mse_loss(base, tgt), F.mse_loss(shuf, tgt)
    return ((mse_shuf - mse_base) / mse_base).item()


def perplexity(codes, K):
    """Codebook usage over a set of code indices (any shape) -> (perplexity exp(H(p)), dead codes = never used)."""
    counts = torch.bincount(codes.flatten(), minlength=K).float()  # (K,)
    p = counts / counts.sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item(), int((counts == 0).sum())


def token_stats(z):
    """Collapse statistics of tokens z (N, D) over N frames: per-dimension std (min, median), the effective rank
    (exp of the entropy of the normalised covariance spectrum, Roy & Vetterli 2007; D = no redundancy, 1 = a line),
    and collapsed = median std < COLLAPSE_STD."""
    z = z.double().flatten(1)  # (N, D)
    std = z.std(0)  # (D,)
    ev = torch.linalg.eigvalsh(torch.cov(z.T)).clamp_min(0)  # (D,)
    p = ev / ev.sum().clamp_min(1e-300)
    rank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum())
    med = std.median().item()
    return {"token_std_min": std.min().item(), "token_std_median": med, "effective_rank": rank.item(),
            "collapsed": med < COLLAPSE_STD}


# What a probe reads from one frame's tokens: agent xy and block xy (px), and the block angle as cos and sin.
PROBE_GROUPS = {"agent": slice(0, 2), "block": slice(2, 4), "angle": slice(4, 6)}


def probe_targets(state):
    """(..., 7) simulator states -> (..., 6) probe targets [agent xy, block xy, cos, sin]."""
    s = torch.as_tensor(state, dtype=torch.float64)
    return torch.cat([s[..., :4], s[..., 4:5].cos(), s[..., 4:5].sin()], -1)


def r2(pred, y):
    """R^2 per target dimension, 1 - SS_res / SS_tot: 1 = read exactly, 0 = no better than the mean. (N, A) -> (A,)"""
    return 1 - (pred - y).pow(2).sum(0) / (y - y.mean(0)).pow(2).sum(0).clamp_min(1e-12)


def linear_probe(x_fit, y_fit, x):
    """Least-squares probe y ~ [x, 1] W fitted on (x_fit, y_fit) -> its predictions at x (N, A) float64; None when
    there are no more fit rows than parameters (the fit would interpolate and say nothing)."""
    ones = lambda v: torch.cat([v.double().flatten(1), torch.ones(len(v), 1, dtype=torch.float64)], 1)  # noqa: E731
    if len(x_fit) <= ones(x_fit[:1]).shape[1]:
        return None
    return ones(x) @ torch.linalg.lstsq(ones(x_fit), y_fit.double()).solution  # (N, A)


def probe_r2(x_fit, y_fit, x, y):
    """What one frame's tokens keep: R^2 of a linear probe per group of PROBE_GROUPS (mean over its dims); NaN with
    too few frames."""
    pred = linear_probe(x_fit, y_fit, x)
    r = r2(pred, y.double()) if pred is not None else torch.full((y.shape[1],), math.nan)  # (6,)
    return {f"probe_{k}": r[s].mean().item() for k, s in PROBE_GROUPS.items()}


def derive(mc, meta):
    """Fill the config fields that follow from the token source and the dataset: A, D, P and the render size."""
    if mc.tokens == "state":
        require(mc.dino_size == 196 and mc.img_size == 0 and mc.dino_name == "dinov2_vits14",
                "--dino-name, --dino-size and --img-size set pixel tokens (dinov2, jepa); this run uses --tokens state")
        return replace(mc, action_dim=2 * mc.frameskip, visual_dim=12, num_patches=1)
    if mc.tokens == "jepa":  # one jepa_dim token per frame from frames rendered at img_size
        size = mc.img_size or meta["img_size"]
        require(size % 16 == 0, f"--tokens jepa renders frames at {size} px: use a multiple of 16 (--img-size 96)")
        return replace(mc, action_dim=2 * mc.frameskip, visual_dim=mc.jepa_dim, num_patches=1, img_size=size)
    width = dino.ARCHS[mc.dino_name.removesuffix("_reg")][0]  # the encoder's width, without building it
    return replace(mc, action_dim=2 * mc.frameskip, visual_dim=width, num_patches=(mc.dino_size // dino.PATCH) ** 2,
                   img_size=mc.img_size or meta["img_size"])


def refuse_pixel_flags(mc, **flags):
    """A state-token run refuses flags that only pixel tokens read (silently ignoring them would mislead)."""
    given = [data.flag(k) for k, v in flags.items() if v]
    require(mc.tokens != "state" or not given, f"{', '.join(given)} apply to pixel tokens (dinov2, jepa); this run "
                                               "uses state tokens: drop them")


def run_dino_weights(ckpt, flag=""):
    """The DINOv2 weights a stage uses for a run: its --dino-weights flag, else the run's own (None = official)."""
    return flag or ckpt["train_config"]["dino_weights"] or None


def windows(mc, root, split, num_frames, dino_weights=None, features="cache", device="cpu", ctx=None):
    """A run's WindowDataset: states only for state tokens; for dinov2 (features) "cache": the feature cache when one
    matches (written by `dino.py encode` with the same encoder, size, weights and dataset), else frames; "memory":
    every frame encoded now into a dino.FeatureStore on device (int8); "off": frames (DINOv2 runs on every batch)."""
    feats = None
    if mc.tokens == "dinov2" and features == "cache":
        feats = dino.load_features(root, split, mc.dino_name, mc.dino_size, dino_weights or None, mc.img_size)
    elif mc.tokens == "dinov2" and features == "memory":
        feats = dino.feature_store(root, split, mc.dino_name, mc.dino_size, dino_weights or None, mc.img_size,
                                   torch.device(device), ctx or contextlib.nullcontext())
    return data.WindowDataset(root, split, num_frames, mc.frameskip, mc.tokens != "state", mc.img_size, feats)


def make_input(mc, device, dino_weights=None):
    """The run's token source, frozen part: batch -> x, what WorldModel.encode reads. state: state_tokens(state);
    dinov2: the cached features, or DINOv2 on the frames now; jepa: the frames themselves (its encoder is trained)."""
    encoder = None
    require(mc.tokens != "dinov2" or dino_weights in (None, "", "random") or Path(dino_weights).is_file(),
            f"--dino-weights {dino_weights}: no such file; pass an official {dino.weights_file(mc.dino_name)} "
            "or random")

    def input_of(batch):
        nonlocal encoder
        if mc.tokens == "state":
            return state_tokens(batch["state"].to(device))  # (B, T, 1, 12)
        if mc.tokens == "jepa":
            return batch["obs"].to(device, non_blocking=True)  # (B, T, S, S, 3) uint8
        if "feat" in batch:
            return batch["feat"].to(device, non_blocking=True).float()  # (B, T, P, D)
        encoder = encoder or dino.load_dinov2(mc.dino_name, dino_weights, device)  # built on first use only
        obs = batch["obs"].to(device, non_blocking=True)  # (B, T, S, S, 3)
        return dino.encode(encoder, obs.flatten(0, 1), mc.dino_size).unflatten(0, obs.shape[:2])  # (B, T, P, D)
    return input_of


def batch_of_states(states, mc):
    """Simulator states (E, 7) -> a batch of one-frame windows for make_input: state, and frames for pixel tokens."""
    batch = {"state": torch.as_tensor(np.asarray(states), dtype=torch.float32)[:, None]}  # (E, 1, 7)
    if mc.tokens != "state":
        batch["obs"] = torch.from_numpy(data.render_batch(np.asarray(states)[:, None], mc.img_size))  # (E, 1, S, S, 3)
    return batch


def load_run(run, device="cpu", data_dir="", dino_weights=None):
    """RUN/ckpt.pt -> (WorldModel in eval mode on device, checkpoint dict, dataset root). The dataset is --data when
    given, else the stored path relative to the run folder (runs moved with their data), else the stored absolute
    path; it must have the fingerprint the run was trained on. dino_weights: the stage's --dino-weights flag, which
    a state-token run refuses."""
    run = Path(run)
    ckpt = data.load_pt(run / "ckpt.pt", f"train a model into {run} with `python train.py --out {run} ...`")
    require(ckpt.get("format") == CKPT_FORMAT, f"{run}/ckpt.pt: format {ckpt.get('format')!r}, this wm.py reads "
                                                f"{CKPT_FORMAT!r}; retrain it with this code")
    mc = WMConfig(**ckpt["model_config"])
    refuse_pixel_flags(mc, dino_weights=dino_weights)
    root = data.dataset_of(run, ckpt["data"], data_dir, f"{mc.tokens}-token run")
    model = WorldModel(mc).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, root
