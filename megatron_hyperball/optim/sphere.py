"""The sphere step in pure math, written so it runs on whole matrices or on shards of them.

For a matrix W (m x n) on the sphere of radius R and a base-optimizer update u (Hyperball; HyperP):

    W'     = W - lr * R * N(u)          exact mode: the relative step is exactly lr
    W'     = W - lr * s * u             shape mode: u as the base optimizer made it, s its scale
    W_next = R * N(W')                  retract to the sphere

All the step needs about the *full* matrix is three sums: ||W||^2, <W, u>, ||u||^2. Each rank
computes them over the elements it holds (``sphere_partials``), a ``SphereIndex`` adds them up
over the ranks that share the matrix (one small all-reduce for all spheres at once), and then
every rank applies ``W_next = a W - b u`` to its own elements (``apply_sphere_step_``), with

    alpha = R / ||W||           (1 once W is on the sphere; rescales a W that is not)
    beta  = lr * R / ||u||      (exact)   or   lr * s   (shape)
    ||W'||^2 = alpha^2 ||W||^2 - 2 alpha beta <W, u> + beta^2 ||u||^2
    a = alpha * R / ||W'||,   b = beta * R / ||W'||           (``sphere_coefficients``)

so no rank ever needs another rank's weights.

One tensor may hold several spheres (a router whose rows are each their own sphere, seed 004's
row-normalized router): ``SphereIndex.several`` gives the sphere of each of its local elements,
the partial sums are per-element sums added into those spheres' rows, and the step scales each
element by its own sphere's (a, b). Everything else is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_hyperball.names import RADIUS_MODES, UPDATE_NORM_MODES, check_radius, check_update_norm  # noqa: F401


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(m, n) of a weight viewed as a matrix: out x (everything else)."""
    if len(shape) == 0:
        return (1, 1)
    return (int(shape[0]), int(math.prod(shape[1:])) if len(shape) > 1 else 1)


def fixed_radius(radius: str | float, shape: tuple[int, int]) -> float | None:
    """The radius a sphere is held at, or None in 'init' mode (R is then ||W|| itself)."""
    if radius == "init":
        return None
    if radius == "sqrt_max_dim":
        return math.sqrt(max(shape))
    return float(radius)


# -- which sphere each local tensor belongs to ------------------------------------------------------

@dataclass
class SphereIndex:
    """Which sphere each local tensor belongs to, and how partial sums become full sums.

    ``index`` maps a local tensor (by identity) to its sphere number; ``shapes[k]`` is the full
    (m, n) of sphere k. Every rank that shares a sphere must number it the same way, including
    ranks whose local slice of it is empty. ``all_reduce_`` turns a (num_spheres, k) tensor of
    local partial sums into full sums in place: the one extension point a distributed adapter
    overrides. The default sums nothing (whole matrices, one process).
    """

    index: dict[int, int]
    shapes: list[tuple[int, int]]
    device: torch.device = torch.device("cpu")
    keys: list[str] | None = None  # stable names of the spheres (checkpointed hook state); default: numbers
    # a tensor holding several spheres: id -> (sphere of each local element (int64, flat local order),
    # the spheres it touches); ``index`` maps it to the first of them
    several: dict[int, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)
    radii: dict[int, float] = field(default_factory=dict)  # fixed radius of a sphere, over its group's mode

    @property
    def num_spheres(self) -> int:
        return len(self.shapes)

    def key(self, k: int) -> str:
        return self.keys[k] if self.keys is not None else str(k)

    def sphere_of(self, p: torch.Tensor) -> int | None:
        return self.index.get(id(p))

    def element_spheres(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The sphere of each local element of a tensor that holds several; None for one sphere."""
        entry = self.several.get(id(p))
        return None if entry is None else entry[0]

    def spheres_of(self, p: torch.Tensor) -> list[int]:
        """Every sphere a local tensor takes part in."""
        entry = self.several.get(id(p))
        if entry is not None:
            return entry[1]
        k = self.sphere_of(p)
        return [] if k is None else [k]

    def all_reduce_(self, partials: torch.Tensor) -> None:
        """Sum each row of partials over the ranks that share that sphere (no-op here)."""


def whole_matrix_index(params: Sequence[torch.Tensor]) -> SphereIndex:
    """Each tensor is a whole matrix and its own sphere."""
    return SphereIndex(
        index={id(p): k for k, p in enumerate(params)},
        shapes=[matrix_shape(p.shape) for p in params],
        device=params[0].device if params else torch.device("cpu"),
    )



# -- the step -------------------------------------------------------------------------------------

def sphere_partials(
    weights: Sequence[torch.Tensor],
    updates: Sequence[torch.Tensor],
    sphere_ids: Sequence[int],
    num_spheres: int,
    device: torch.device,
    element_spheres: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """(num_spheres, 3) fp32 partial sums [||W||^2, <W,u>, ||u||^2] over the local elements.

    ``element_spheres[i]`` (optional): the sphere of each element of tensor i when it holds several."""
    if element_spheres is not None and any(e is not None for e in element_spheres):
        one = [i for i, e in enumerate(element_spheres) if e is None]
        partials = sphere_partials([weights[i] for i in one], [updates[i] for i in one],
                                   [sphere_ids[i] for i in one], num_spheres, device)
        for w, u, e in zip(weights, updates, element_spheres):
            if e is not None:
                w32, u32 = w.float().reshape(-1), u.float().reshape(-1)
                partials.index_add_(0, e, torch.stack([w32 * w32, w32 * u32, u32 * u32], dim=1))
        return partials
    partials = torch.zeros(num_spheres, 3, dtype=torch.float32, device=device)
    if not weights:
        return partials
    w32 = [w.float() for w in weights]
    u32 = [u.float() for u in updates]
    w_sq = torch.stack(torch._foreach_norm(w32)).square()
    u_sq = torch.stack(torch._foreach_norm(u32)).square()
    wu = torch.stack([torch.dot(w.reshape(-1), u.reshape(-1)) for w, u in zip(w32, u32)])
    rows = torch.stack([w_sq, wu, u_sq], dim=1)
    partials.index_add_(0, torch.tensor(list(sphere_ids), device=device), rows)
    return partials


def sphere_coefficients(
    sums: torch.Tensor,
    lr: torch.Tensor,
    radius: torch.Tensor,
    update_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sphere (a, b) with W_next = a * W - b * u, from the full sums (see module doc).

    ``radius`` holds R per sphere, NaN where R is ||W|| itself ('init' mode). ``update_scale``
    holds s per sphere for shape mode, NaN for exact mode.
    """
    sums = sums.double()  # a handful of scalars: do the algebra in float64
    w_sq, wu, u_sq = sums.unbind(-1)
    w_norm, u_norm = w_sq.sqrt(), u_sq.sqrt()
    lr = lr.double()
    r = torch.where(torch.isnan(radius), w_norm, radius.double())
    alpha = r / w_norm
    exact_beta = torch.where(u_norm > 0, lr * r / u_norm, torch.zeros_like(u_norm))
    beta = torch.where(torch.isnan(update_scale), exact_beta, lr * update_scale.double())
    new_sq = alpha * alpha * w_sq - 2 * alpha * beta * wu + beta * beta * u_sq
    c = r / new_sq.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    return (alpha * c).float(), (beta * c).float()


def apply_sphere_step_(
    weights: Sequence[torch.Tensor],
    updates: Sequence[torch.Tensor],
    sphere_ids: Sequence[int],
    a: torch.Tensor,
    b: torch.Tensor,
    element_spheres: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> None:
    """W <- a[k] W - b[k] u for each local tensor of sphere k, in place (elementwise k for a tensor
    with ``element_spheres``)."""
    if element_spheres is not None and any(e is not None for e in element_spheres):
        one = [i for i, e in enumerate(element_spheres) if e is None]
        apply_sphere_step_([weights[i] for i in one], [updates[i] for i in one], [sphere_ids[i] for i in one], a, b)
        for w, u, e in zip(weights, updates, element_spheres):
            if e is not None:
                w.mul_(a[e].view_as(w).to(w.dtype)).sub_(b[e].view_as(w).to(w.dtype) * u)
        return
    if not weights:
        return
    # one host sync per step for all spheres; then one multi-tensor scale and one fused
    # multiply-add per tensor (alpha must be a number, so it cannot be a single foreach call)
    a_loc, b_loc = torch.stack([a, b])[:, list(sphere_ids)].tolist()
    torch._foreach_mul_(list(weights), a_loc)
    for w, u, bi in zip(weights, updates, b_loc):
        w.add_(u, alpha=-bi)
