"""World model: DINO-WM's frame-causal ViT predictor over per-frame tokens, conditioned per frame on ground-truth
actions (`baseline`), continuous latent actions from an inverse dynamics model (`la`), or their EMA vector-quantised
codes (`vq`); plus load_run, the run folder every later stage reads.

The predictor, IDM, VQ and planners see only tokens (B, T, P, D), whatever their source (--tokens, dino.py: the
simulator state, frozen DINOv2 patches, or a pixel encoder trained with the predictor). Reads RUN/ckpt.pt (load_run;
written by train.py). Writes nothing. Tensor contract: forward(z (B, num_hist+1, P, D), action (B, T, A), proprio
(B, T, 4)) -> dict of losses; rollout(z0 (B, P, D), cond (B, H, C)) -> (B, H, P, D).
GPU: python train.py --data DIR --variant vq --out runs/vq                  (model code; timings in train.py)
CPU: python -m pytest -q test_all.py -k wm                                    (tiny sizes, seconds)
"""
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

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
    jepa_sigreg: float = 0.09  # SIGReg weight; LeWM config/train/lewm.yaml 0.09 (paper: lambda ~ 0.1)
    jepa_delta: float = 0.0  # weight of SIGReg on frame-to-frame token changes (dino.jepa_reg; ours): keeps the agent
    jepa_idm: float = 0.0  # PLDM's inverse-dynamics weight (z_t+1, z_t -> a_t; baseline only); Push-T 0, Two-Rooms 1.07

    def __post_init__(self):
        data.check_choices(self)
        require(min(self.num_hist, self.frameskip, self.cond_dim, self.depth, self.heads, self.dim_head, self.mlp_dim,
                    self.idm_depth, self.idm_heads, self.idm_dim, self.idm_mlp_dim, self.latent_dim, self.num_codes,
                    self.proprio_dim) >= 1, "model sizes (--num-hist, --depth, --heads, --cond-dim, --idm-*, "
                "--latent-dim, --num-codes ...) must be >= 1")
        require(self.idm_dim % self.idm_heads == 0, f"--idm-dim {self.idm_dim} must be a multiple of --idm-heads")
        require(0 <= self.dropout < 1 and 0 < self.ema_decay < 1 and self.commitment >= 0,
                "--dropout in [0, 1), --ema-decay in (0, 1), --commitment >= 0")
        require(self.variant == "baseline" or self.latent_dim == self.cond_dim,
                f"--latent-dim {self.latent_dim} must equal --cond-dim {self.cond_dim}: la/vq condition on the latent")
        require(self.dino_size % dino.PATCH == 0 and self.dino_size > 0 and self.img_size >= 0 and
                max(self.img_size, self.dino_size) <= data.MAX_IMG, f"--dino-size {self.dino_size}: a positive "
                f"multiple of {dino.PATCH}; it and --img-size {self.img_size} at most {data.MAX_IMG} px")
        require(self.dino_name.removesuffix("_reg") in dino.ARCHS, f"--dino-name {self.dino_name!r}: choose one of "
                f"{', '.join(dino.ARCHS)} (optionally + _reg)")
        require(min(self.jepa_dim, self.jepa_width) >= 2 and min(self.jepa_sigreg, self.jepa_delta) >= 0,
                "--jepa-dim and --jepa-width must be >= 2, the --jepa-* loss weights >= 0")
        jepa = [f for f in self.__dataclass_fields__ if f.startswith("jepa_") and self.tokens != "jepa"]
        data.unused(self, jepa, f"--tokens {self.tokens}")  # silently ignoring them would mislead
        require(self.jepa_idm == 0 or (self.tokens == "jepa" and self.variant == "baseline"), f"--jepa-idm "
                f"{self.jepa_idm} trains the jepa encoder on action labels: baseline runs only (la/vq learn without)")


# Shape legend: B batch, T frames, P tokens per frame, D token width, A macro action, C conditioning, L latent action,
# K codes, H horizon, N flattened transitions, W predictor token width = D + proprio_dim + C, S tokens of the IDM.
CKPT_FORMAT = "dinowm-la-v3"  # ckpt.pt "format"; bumped when the checkpoint layout changes


def frame_causal_mask(num_patches, num_frames):
    """DINO-WM generate_mask_matrix: token i in frame f_i sees token j iff f_j <= f_i. -> (T*P, T*P) bool."""
    frame = torch.arange(num_frames).repeat_interleave(num_patches)  # (T*P,)
    return frame[None, :] <= frame[:, None]  # (T*P, T*P), True = may attend


def rotary(x, theta=10000.0):
    """Rotary position embedding over the sequence axis, interleaved pairs as rotary-embedding-torch. (..., S, d)"""
    S, d = x.shape[-2:]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * freqs  # (S, d/2)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., S, d/2) each: pairs (x0, x1), (x2, x3), ...
    out = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)  # (..., S, d/2, 2)
    return out.flatten(-2).type_as(x)  # (..., S, d)


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
        # SDPA's default scale dh^-0.5 and dropout on the attention weights, both as upstream
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(o.transpose(1, 2).flatten(2))  # (B, N, W)


def feed_forward(dim, hidden, dropout=0.0):
    """Pre-LN MLP: LN -> Linear -> GELU -> Dropout -> Linear -> Dropout (DINO-WM models/vit.py; IDM: dropout 0)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class ViTPredictor(nn.Module):
    """DINO-WM's predictor: learned positions + pre-LN blocks under a frame-causal mask + final LN."""

    def __init__(self, num_patches, num_frames, dim, depth, heads, dim_head, mlp_dim, dropout):
        super().__init__()
        # randn init (std 1) kept for fidelity with DINO-WM models/vit.py; embedding dropout 0 upstream.
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames * num_patches, dim))  # (1, T*P, W)
        self.layers = nn.ModuleList(nn.ModuleList([Attention(dim, heads, dim_head, dropout),
                                                   feed_forward(dim, mlp_dim, dropout)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("mask", frame_causal_mask(num_patches, num_frames), persistent=False)  # upstream: a global

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
        """(N, S, dim) -> (N, S, dim), attention along S (patches or frames); queries=n: only the first n ask."""
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
        self.ff = feed_forward(dim, mlp_dim)

    def forward(self, x, keep=None):
        """(B, T, S, dim) -> (B, T, keep or S, dim): only the first `keep` tokens per frame are updated and returned."""
        B, T, S, d = x.shape
        n = keep or S
        x = x[:, :, :n] + self.spatial(x.reshape(B * T, S, d), n).view(B, T, n, d)
        xt = x.transpose(1, 2).reshape(B * n, T, d)  # (B*n, T, dim): one sequence per spatial position
        x = x + self.temporal(xt).view(B, n, T, d).transpose(1, 2)
        return x + self.ff(x)


class IDM(nn.Module):
    """Inverse dynamics model: AdaWorld's latent-action encoder (models/lam.py) without its decoder. Depth 4, not the
    seed's 12 (~23.7 GFLOPs per pair from the layer sizes, 2.6x the predictor's ~9, to read the agent's displacement):
    each block mixes the two frames after a full spatial attention, so 4 rounds locate the agent and compare, at ~5.9
    GFLOPs (the last block pruned, see forward). TODO: ablate 4 vs 12 on GPU (`--idm-depth 12` restores the seed)."""

    def __init__(self, in_dim, num_patches, dim, depth, heads, mlp_dim):
        super().__init__()
        self.action_prompt = nn.Parameter(torch.empty(1, 1, 1, in_dim).uniform_(-1, 1))  # (1, 1, 1, D), AdaWorld
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.LayerNorm(dim))
        # fixed spatial positions: a 1-D sin/cos table, sin on even and cos on odd channels, base 10000 (AdaWorld)
        angle = torch.arange(num_patches + 1, dtype=torch.float32)[:, None] * torch.exp(
            torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (P+1, dim/2)
        self.register_buffer("pos", torch.stack([angle.sin(), angle.cos()], -1).flatten(1), persistent=False)
        self.blocks = nn.ModuleList(IDMBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.head = nn.Linear(dim, dim)  # output head; no final norm (AdaWorld)

    def forward(self, z):
        """(B, T, P, D) DINO tokens -> (B, T, dim) the action-prompt token of every frame."""
        x = torch.cat([self.action_prompt.expand(*z.shape[:2], 1, -1).to(z.dtype), z], 2)  # (B, T, P+1, D)
        x = self.proj(x) + self.pos  # (B, T, P+1, dim)
        for block in self.blocks[:-1]:
            x = block(x)
        # Only the prompt token is read, so the last block updates only it (exact, ~22% of the IDM at depth 4): its
        # spatial attention still reads every patch; time mixes positions only with themselves, FFN and head per token.
        return self.head(self.blocks[-1](x, keep=1)[:, :, 0])  # (B, T, dim)


class VectorQuantizer(nn.Module):
    """EMA vector quantiser (seed models/vq_ema.py, one code per transition), fp32 statistics, DDP-consistent. Fixes
    the seed's EMA init (its cluster_size = 0 next to embedding_avg = E inflates every used code ~25x in the first
    update and kills the rest; ours starts consistent from the first batch) and dead-code restart (it resets only E_k,
    which the next update overwrites with the stale m_k / n_k; ours sets m_k = x, n_k = 1 too)."""

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
        fresh = ~self.initialised  # () first training batch: E = m = K inputs, n = 1; branch-free, no host sync
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
        self.cluster_size.mul_(self.decay).add_(stats[:, 0], alpha=1 - self.decay)
        self.embedding_avg.mul_(self.decay).add_(stats[:, 1:], alpha=1 - self.decay)
        n_tot = self.cluster_size.sum()
        s = ((self.cluster_size + 1e-6) / (n_tot + K * 1e-6) * n_tot).clamp_min(1e-6)  # (K,) Laplace smoothing
        # Dead code (s_k < 1e-3, ~690 unused steps after n_k = 1): restart it AND its statistics; the rest E = m / s.
        dead = (s < 1e-3)[:, None]  # (K, 1)
        self.embedding.copy_(torch.where(dead, cand, self.embedding_avg / s[:, None]))
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


class WorldModel(nn.Module):
    """Conditioning module (action encoder or IDM [+ VQ]) + optional proprio encoder + ViT predictor."""

    def __init__(self, cfg: WMConfig):
        super().__init__()
        self.cfg = cfg
        # the trained pixel encoder of --tokens jepa; frozen sources arrive as tokens
        self.encoder = dino.JEPAEncoder(cfg.img_size, cfg.jepa_dim, cfg.jepa_width) if cfg.tokens == "jepa" else None
        # PLDM's inverse-dynamics head, sized as stable-worldmodel scripts/train/pldm.py (MLP, LayerNorm, hidden 512).
        self.jepa_idm = nn.Sequential(nn.Linear(2 * cfg.jepa_dim, 512), nn.LayerNorm(512), nn.GELU(),
                                      nn.Linear(512, cfg.action_dim)) if cfg.jepa_idm else None
        self.obs_dim = cfg.visual_dim + (cfg.proprio_dim if cfg.proprio else 0)  # channels the loss covers
        # DINO-WM's ProprioceptiveEmbedding is Conv1d(k=1) over time, i.e. a per-frame Linear.
        self.proprio_encoder = nn.Linear(len(data.PROPRIO), cfg.proprio_dim) if cfg.proprio else None
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
        out, a = {"latent": latent}, latent
        if self.cfg.variant == "vq":
            q, codes, commit = self.quantizer(latent.flatten(0, 1))  # (N, L), (N,), ()
            a = q.view(latent.shape)  # (B, T-1, L)
            out.update(codes=codes.view(latent.shape[:2]), commit_loss=commit)
        # The last frame (the target) carries a copy, a_{T-1} = a_{T-2}; the loss never reads its channels.
        out["cond"] = torch.cat([a, a[:, -1:]], 1)  # (B, T, C)
        return out

    def forward(self, x, action=None, proprio=None):
        """make_input's x for (B, num_hist+1) frames, action (B, T, A), proprio (B, T, 4) -> losses, tokens z, ..."""
        n, z = self.cfg.num_hist, self.encode(x)
        out = {**self.conditioning(z, action), "tokens": z}
        obs = self.observe(z, proprio)  # (B, T, P, O)
        pred = self.predict(obs[:, :n], out["cond"][:, :n])  # (B, n, P, O): frames 1..n, teacher forced
        # Targets are detached: frozen tokens, plus DINO-WM's quirky proprio target from the same trainable proprio
        # encoder (so only its input side learns; DINO-WM models/visual_world_model.py).
        target = obs[:, 1:].detach()  # (B, n, P, O)
        if self.encoder is not None:  # jepa as LeWM and PLDM: no stop-gradient, the target frames' encoding learns too
            target = torch.cat([obs[:, 1:, :, :self.cfg.visual_dim], target[..., self.cfg.visual_dim:]], -1)
        out["pred_loss"] = F.mse_loss(pred.float(), target.float())
        out["visual_loss"] = F.mse_loss(pred[..., :self.cfg.visual_dim].float(), z[:, 1:].float()).detach()
        out["loss"] = out["pred_loss"] + out.get("commit_loss", 0.0)  # commit_loss is already beta-weighted
        if self.encoder is not None:  # jepa: the anti-collapse term (weighted), without which z = const is optimal
            out["reg_loss"] = dino.jepa_reg(z, self.cfg)
            if self.jepa_idm is not None:  # the action a_t from (z_t+1, z_t): makes the encoder keep what moved
                zz = torch.cat([z[:, 1:], z[:, :-1]], -1).flatten(2)  # (B, T-1, 2*P*D)
                out["idm_loss"] = F.mse_loss(self.jepa_idm(zz).float(), action[:, :-1].float())
                out["reg_loss"] = out["reg_loss"] + self.cfg.jepa_idm * out["idm_loss"]
            out["loss"] = out["loss"] + out["reg_loss"]
        return out

    def plan_to_cond(self, plan):
        """Planner variable -> conditioning (B, H, C): baseline (B, H, A) actions, la (B, H, L), vq (B, H) codes."""
        if self.cfg.variant == "vq":
            return self.quantizer.embedding[plan]  # (B, H, L)
        return self.action_encoder(plan) if self.cfg.variant == "baseline" else plan

    def rollout(self, z0, cond, proprio0=None, adapter=None):
        """Open-loop imagination: z0 (B, P, D), cond (B, H, C), proprio0 (B, 4) -> zs (B, H, P, D), ps (B, H, pd)|None.

        Frame h carries cond[:, h] (with an adapter, decode.ActionAdapter, cond holds macro actions (B, H, A) and frame
        h's conditioning is adapter(imagined tokens, cond[:, h]), as the IDM would label it); each step predicts from
        the last <= num_hist frames (history grows, then slides) and appends the last output frame (DINO-WM keeps its
        predicted proprio too). B = E*N samples at once."""
        n, H, D = self.cfg.num_hist, cond.shape[1], self.cfg.visual_dim
        obs = self.observe(z0[:, None], None if proprio0 is None else proprio0[:, None])  # (B, 1, P, O)
        conds = []
        for h in range(H):
            conds.append(cond[:, h] if adapter is None else adapter(obs[:, h, :, :D], cond[:, h]))  # (B, C)
            lo = max(0, h + 1 - n)
            nxt = self.predict(obs[:, lo:], torch.stack(conds[lo:], 1))[:, -1:]  # (B, 1, P, O)
            obs = torch.cat([obs, nxt], 1)  # (B, h+2, P, O)
        return obs[:, 1:, :, :D], (obs[:, 1:, 0, D:] if self.cfg.proprio else None)


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
    return replace(mc, action_dim=2 * mc.frameskip, visual_dim=dino.ARCHS[mc.dino_name.removesuffix("_reg")][0],
                   num_patches=(mc.dino_size // dino.PATCH) ** 2, img_size=mc.img_size or meta["img_size"])


def refuse_pixel_flags(mc, **flags):
    """A state-token run refuses flags that only pixel tokens read (silently ignoring them would mislead)."""
    given = [data.flag(k) for k, v in flags.items() if v]
    require(mc.tokens != "state" or not given, f"{', '.join(given)} apply to pixel tokens (dinov2, jepa); this run "
                                               "uses state tokens: drop them")


def run_dino_weights(ckpt, flag=""):
    """The DINOv2 weights a stage uses for a run: its --dino-weights flag, else the run's own (None = official)."""
    return flag or ckpt["train_config"]["dino_weights"] or None


def load_run(run, device="cpu", data_dir="", dino_weights=None):
    """RUN/ckpt.pt -> (WorldModel in eval mode on device, checkpoint dict, dataset root: data_dir, else the stored path
    relative to the run, else the absolute one, fingerprint checked). dino_weights: the stage's flag (state refuses)."""
    run = Path(run)
    ckpt = data.load_pt(run / "ckpt.pt", f"train a model into {run} with `python train.py --out {run} ...`",
                        fmt=CKPT_FORMAT)
    saved = ckpt["model_config"]  # a run of an earlier version may name options removed since (VCReg)
    require(saved.get("jepa_reg", "sigreg") == "sigreg", f"{run} was trained with VCReg, which this version removed")
    mc = WMConfig(**{k: v for k, v in saved.items() if k in WMConfig.__dataclass_fields__})
    refuse_pixel_flags(mc, dino_weights=dino_weights)
    root = data.dataset_of(run, ckpt["data"], data_dir, f"{mc.tokens}-token run")
    model = WorldModel(mc).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, root
