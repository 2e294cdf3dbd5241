"""The models' math: plain ``nn.Module``\\ s, no training logic and no device placement."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _block(n_in: int, n_out: int, dropout: float, norm: str = "layer") -> list[nn.Module]:
    layer = nn.LayerNorm(n_out) if norm == "layer" else nn.BatchNorm1d(n_out, eps=1e-3)
    return [nn.Linear(n_in, n_out), layer, nn.ReLU(), nn.Dropout(dropout)]


class MLP(nn.Module):
    """Expression -> class logits: hidden layers of Linear, LayerNorm, ReLU, dropout.

    Inputs are clipped at ``input_clip`` (scaled expression of a gene seen in few cells can be
    huge), as scanpy's ``scale(max_value=10)`` does.
    """

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.2,
                 input_clip: float | None = 10.0):
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [n_in, *hidden]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += _block(a, b, dropout)
        layers.append(nn.Linear(sizes[-1], n_out))
        self.net = nn.Sequential(*layers)
        self.input_clip = input_clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_clip is not None:
            x = x.clamp(max=self.input_clip)
        return self.net(x)


def nb_log_likelihood(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta), elementwise, in float32 whatever the autocast."""
    x, mu, theta = x.float(), mu.float(), theta.float()
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


#: what the encoder reads: log1p counts, log1p of depth-normalized counts, or those standardized per gene
ENCODER_INPUTS = ("log1p", "lognorm", "scaled")


class NBVAE(nn.Module):
    """Variational autoencoder on counts (scVI's model, reduced to what the atlas needs).

    The encoder reads log1p counts (and the batch, one-hot, when there are batches) and gives a
    Gaussian posterior over ``n_latent`` dimensions, whose mean is the embedding. Hidden layers use
    batch normalization, as scVI's do (on PBMC 3k it gave higher ARI than layer normalization). The decoder
    maps a latent point (and the batch) to gene proportions; times the cell's observed total
    counts they are the mean of a negative binomial with one dispersion per gene. Conditioning
    the decoder on the batch lets the latent space drop what only the batch explains.
    """

    def __init__(self, n_genes: int, n_latent: int = 10, hidden: int = 128, n_layers: int = 1, n_batches: int = 0,
                 dropout: float = 0.1, encoder_input: str = "log1p"):
        super().__init__()
        if encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"encoder_input '{encoder_input}' is not one of {ENCODER_INPUTS}")
        self.n_batches = n_batches
        self.encoder_input = encoder_input
        # per-gene standardization of the encoder's input, from batch statistics (as PCA scales genes)
        self.input_norm = nn.BatchNorm1d(n_genes, affine=False) if encoder_input == "scaled" else nn.Identity()
        enc: list[nn.Module] = []
        sizes = [n_genes + n_batches] + [hidden] * n_layers
        for a, b in zip(sizes[:-1], sizes[1:]):
            enc += _block(a, b, dropout, "batch")
        self.encoder = nn.Sequential(*enc)
        self.mean = nn.Linear(hidden, n_latent)
        self.log_var = nn.Linear(hidden, n_latent)
        dec: list[nn.Module] = []
        sizes = [n_latent + n_batches] + [hidden] * n_layers
        for a, b in zip(sizes[:-1], sizes[1:]):
            dec += _block(a, b, 0.0, "batch")
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden, n_genes))
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def _with_batch(self, h: torch.Tensor, batch: torch.Tensor | None) -> torch.Tensor:
        if not self.n_batches:
            return h
        # a batch code outside the training batches (a query) gets no batch vector at all
        onehot = F.one_hot(batch.clamp(0, self.n_batches - 1), self.n_batches).to(h.dtype)
        onehot = onehot * (batch < self.n_batches).unsqueeze(1).to(h.dtype)
        return torch.cat([h, onehot], dim=1)

    def encode(self, x: torch.Tensor, batch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder_input == "log1p":
            h = torch.log1p(x)
        else:  # depth-normalized first, so the encoder need not learn to ignore sequencing depth
            h = torch.log1p(x / x.sum(dim=1, keepdim=True).clamp(min=1) * 1e4)
        h = self.encoder(self._with_batch(self.input_norm(h), batch))
        return self.mean(h), self.log_var(h).clamp(-10, 10)

    def forward(self, x: torch.Tensor, batch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction log-likelihood and KL divergence per cell."""
        mean, log_var = self.encode(x, batch)
        mean, log_var = mean.float(), log_var.float()  # the KL and the sample in float32 under autocast
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var) if self.training else mean
        proportions = torch.softmax(self.decoder(self._with_batch(z, batch)).float(), dim=-1)
        library = x.float().sum(dim=1, keepdim=True)
        ll = nb_log_likelihood(x, proportions * library, torch.exp(self.log_theta)).sum(dim=1)
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(dim=1)
        return {"reconstruction": -ll, "kl": kl, "z": mean}
