"""Named groups of the bundle network's parameters: what a job trains, shares or keeps at the site.

Why groups and not all weights: under patient-level DP the noise grows with the number of trained weights (about
√d) while the signal does not, so a private federation trains a small, well-chosen set; a site can also keep a set
local (never sent, FedBN-style). Groups are found from the network's structure, never from a hard-coded list of
names, so they follow the bundle if its network changes.

A spec is group names joined with ``+`` (e.g. ``"norm+bias+head"``); ``"all"`` is every parameter and ``"none"``
the empty set.

* ``norm`` – instance-norm scale and shift (the bundle enables ``affine``; identity at start).
* ``bias`` – convolution biases that receive a gradient (a bias that feeds an instance norm is removed by its mean
  subtraction and never learns; those are left out).
* ``head`` – the output block: every convolution that writes the ``out_channels`` label channels (without the
  biases an instance norm absorbs).

Two more specs train an adapter instead of a group (see :func:`trainable_view`; they stand alone):

* ``lora:<r>`` – a rank-r update ΔW = B·A of every convolution weight (B zero at start).
* ``pgrad:<k>`` – θ = θ0 + U·c, k coefficients along the top-k directions of per-case gradients on PUBLIC data
  (:func:`gradient_basis`; the basis is a file with its provenance and costs no ε).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

ALL, NONE = "all", "none"


def _norm(network: nn.Module) -> list[str]:
    names = []
    for mod_name, module in network.named_modules():
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.affine:
            names += [f"{mod_name}.weight", f"{mod_name}.bias"]
    return names


def _feeds_instance_norm(block: nn.Module) -> bool:
    """MONAI's ``Convolution`` is conv then ``adn`` (norm, dropout, activation); a norm there absorbs the bias."""
    adn = getattr(block, "adn", None)
    return adn is not None and any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in adn.modules())


def _absorbed_biases(network: nn.Module) -> set[str]:
    """Biases that feed an instance norm: their gradient is zero up to rounding, DP noise is all they would get."""
    absorbed = set()
    for mod_name, module in network.named_modules():
        conv = getattr(module, "conv", None)
        if isinstance(conv, nn.modules.conv._ConvNd) and _feeds_instance_norm(module):
            absorbed.add(f"{mod_name}.conv.bias" if mod_name else "conv.bias")
    return absorbed


def _bias(network: nn.Module) -> list[str]:
    absorbed = _absorbed_biases(network)
    return [
        f"{mod_name}.bias" if mod_name else "bias"
        for mod_name, module in network.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd)
        and module.bias is not None
        and (f"{mod_name}.bias" if mod_name else "bias") not in absorbed
    ]


def _head(network: nn.Module) -> list[str]:
    convs = [(n, m) for n, m in network.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        return []
    out_channels = convs[-1][1].out_channels
    absorbed = _absorbed_biases(network)
    # the output block: the trailing run of convolutions that write the label channels
    head: list[str] = []
    for mod_name, module in reversed(convs):
        if module.out_channels != out_channels:
            break
        names = [f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        head = [n for n in names if n not in absorbed] + head
    return head


GROUPS: dict[str, Callable[[nn.Module], list[str]]] = {"norm": _norm, "bias": _bias, "head": _head}


def split_spec(spec: str) -> list[str]:
    """The group names of ``spec``; raises ``ValueError`` naming the known groups for anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a parameter group spec must be a non-empty string, got {spec!r}")
    parts = [p.strip() for p in spec.split("+")]
    if len(parts) > 1 and ({ALL, NONE} & set(parts)):
        raise ValueError(f"{spec!r}: 'all' and 'none' cannot be combined with other groups")
    known = {ALL, NONE, *GROUPS}
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown} in {spec!r}; known: {', '.join(sorted(known))}")
    return parts


def parameter_names(network: nn.Module, spec: str) -> list[str]:
    """Names (as in ``network.named_parameters()``, network order) of the parameters ``spec`` selects."""
    parts = split_spec(spec)
    order = [n for n, _ in network.named_parameters()]
    if parts == [ALL]:
        return order
    if parts == [NONE]:
        return []
    chosen: set[str] = set()
    for part in parts:
        found = GROUPS[part](network)
        if not found:
            raise ValueError(f"parameter group {part!r} is empty for this network (is the bundle's norm affine?)")
        chosen.update(found)
    return [n for n in order if n in chosen]


def count(network: nn.Module, names: Iterable[str]) -> int:
    """Number of scalar weights in the named parameters."""
    params = dict(network.named_parameters())
    return sum(params[n].numel() for n in names)


def freeze_except(network: nn.Module, names: Iterable[str]) -> list[torch.nn.Parameter]:
    """Train only ``names``: every other parameter gets ``requires_grad=False``; returns the trained ones in order."""
    keep = set(names)
    trained = []
    for name, param in network.named_parameters():
        param.requires_grad_(name in keep)
        if name in keep:
            trained.append(param)
    return trained


# -- trainable views: structural groups, low-rank adapters, a public gradient subspace ---------------------------
#
# Why views: the optimizer (and the DP engine, which trains what has ``requires_grad``) should see only the few
# numbers a spec trains, while what a site sends stays in the bundle's own state-dict keys. A view is a module to
# train whose forward is the network's with the adapter added; ``merge_back()`` folds the adapter into the
# network's weights (and resets it to zero), so a weight difference of bundle keys is what leaves the site.

LORA, PGRAD = "lora", "pgrad"
_SHAPED = {LORA: "rank r", PGRAD: "number of basis directions k"}


def validate_spec(spec: str) -> str:
    """``spec`` stripped if it is a valid trained-parameter spec, else ``ValueError`` saying what is allowed.

    Valid: structural groups joined with ``+`` (see :func:`split_spec`), ``lora:<r>`` or ``pgrad:<k>`` (r, k
    positive integers; these two stand alone).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a trained-parameter spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    kind, _ = _shaped(spec)
    if kind is None:
        split_spec(spec)
    return spec


def _shaped(spec: str) -> tuple[str | None, int | None]:
    """``("lora", r)`` / ``("pgrad", k)`` for those specs, ``(None, None)`` for group specs."""
    head = spec.split(":", 1)[0].strip()
    if head not in _SHAPED:
        if ":" in spec:
            raise ValueError(f"{spec!r}: only lora:<r> and pgrad:<k> take a ':' argument")
        return None, None
    if "+" in spec:
        raise ValueError(f"{spec!r}: {head}:<n> cannot be combined with other groups")
    arg = spec.split(":", 1)[1].strip() if ":" in spec else ""
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError(f"{spec!r}: expected {head}:<n> with n the {_SHAPED[head]}, a positive integer")
    return head, int(arg)


class _DeltaView(nn.Module):
    """Forward of ``network`` with ``deltas()`` added to some of its weights (``torch.func.functional_call``).

    The network stays a registered submodule (so ``.to()``, ``train()`` and ``eval()`` reach it) with every one of
    its own parameters frozen; only the adapter's parameters require a gradient.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        for p in network.parameters():
            p.requires_grad_(False)

    def deltas(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        params = dict(self.network.named_parameters())
        merged = {name: params[name] + delta for name, delta in self.deltas().items()}
        return torch.func.functional_call(self.network, merged, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the current deltas to the network's weights and set the adapter back to zero."""
        params = dict(self.network.named_parameters())
        for name, delta in self.deltas().items():
            params[name].add_(delta.detach())
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError


class LoRAView(_DeltaView):
    """ΔW = B·A per convolution weight (B: first dim × r, zero at start; A: r × the rest, Kaiming-uniform).

    Every convolution (and transposed convolution) gets an adapter: a site's shift (contrast, intensity profile,
    head size) reaches every depth of the U-Net, the norm/bias groups already cover per-channel scale and shift,
    and r·(out + in·k³) per layer keeps the count small. After :meth:`merge` B is zero again and A is kept, so the
    next round's adapter starts from the identity like the first.
    """

    def __init__(self, network: nn.Module, rank: int, *, seed: int = 0) -> None:
        super().__init__(network)
        self.rank = int(rank)
        self.targets: list[str] = []
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        gen = torch.Generator().manual_seed(seed)
        for mod_name, module in network.named_modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                w = module.weight
                rows, cols = w.shape[0], w[0].numel()
                a = torch.empty(self.rank, cols, dtype=w.dtype)
                bound = 1.0 / math.sqrt(cols)  # torch's Kaiming-uniform(a=√5) bound, as LoRA initialises A
                a.uniform_(-bound, bound, generator=gen)
                self.a.append(nn.Parameter(a.to(w.device)))
                self.b.append(nn.Parameter(torch.zeros(rows, self.rank, dtype=w.dtype, device=w.device)))
                self.targets.append(f"{mod_name}.weight" if mod_name else "weight")
        if not self.targets:
            raise ValueError("lora: the network has no convolution to adapt")
        self._shapes = {n: p.shape for n, p in network.named_parameters() if n in set(self.targets)}

    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: (b @ a).reshape(self._shapes[n]) for n, a, b in zip(self.targets, self.a, self.b, strict=True)}

    @torch.no_grad()
    def reset(self) -> None:
        for b in self.b:
            b.zero_()


class GradientSubspaceView(_DeltaView):
    """θ = θ0 + U·c: only the k coefficients c are trained (U: orthonormal columns from public gradients)."""

    def __init__(self, network: nn.Module, basis: torch.Tensor, names: list[str]) -> None:
        super().__init__(network)
        params = dict(network.named_parameters())
        self.names = list(names)
        self._shapes = [params[n].shape for n in self.names]
        ref = params[self.names[0]]
        self.register_buffer("basis", basis.to(dtype=ref.dtype, device=ref.device), persistent=False)
        self.coefficients = nn.Parameter(torch.zeros(basis.shape[1], dtype=ref.dtype, device=ref.device))

    def deltas(self) -> dict[str, torch.Tensor]:
        flat = self.basis @ self.coefficients
        out, i = {}, 0
        for name, shape in zip(self.names, self._shapes, strict=True):
            n = math.prod(shape)
            out[name] = flat[i : i + n].view(shape)
            i += n
        return out

    @torch.no_grad()
    def reset(self) -> None:
        self.coefficients.zero_()


class TrainableView:
    """What a spec trains on a network; unpacks as ``(module, names, merge_back)``.

    ``module``: train it (its forward is the network's); ``parameters()``: what the optimizer gets;
    ``names``: the network's state-dict keys training can change (what a site's DIFF carries); ``n_trained``:
    how many numbers are trained (what DP noise scales with); ``merge_back()``: fold the adapter into the
    network's weights and return those keys' current values.
    """

    def __init__(self, spec: str, network: nn.Module, module: nn.Module, names: list[str]) -> None:
        self.spec, self.network, self.module, self.names = spec, network, module, names

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def n_trained(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def merge_back(self) -> dict[str, torch.Tensor]:
        if isinstance(self.module, _DeltaView):
            self.module.merge()
        params = dict(self.network.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def __iter__(self):
        return iter((self.module, self.names, self.merge_back))


def trainable_view(
    network: nn.Module, spec: str, *, basis: str | Path | dict | None = None, seed: int = 0
) -> TrainableView:
    """Set ``network`` up to train only what ``spec`` says (see :func:`validate_spec`).

    Group specs freeze every other parameter and train the network itself. ``lora:<r>`` and ``pgrad:<k>`` freeze
    the whole network and train an adapter that is zero at start (the model is unchanged); ``pgrad`` needs
    ``basis`` (a file or dict from :func:`gradient_basis`; it must describe this network's parameters).
    """
    spec = validate_spec(spec)
    kind, n = _shaped(spec)
    if kind is None:
        names = parameter_names(network, spec)
        freeze_except(network, names)
        return TrainableView(spec, network, network, names)
    if kind == LORA:
        module: _DeltaView = LoRAView(network, int(n), seed=seed)
        return TrainableView(spec, network, module, list(module.targets))
    if basis is None:
        raise ValueError(f"{spec!r} needs a gradient basis estimated from public data (basis=...)")
    record = load_basis(basis) if not isinstance(basis, dict) else basis
    matrix = record["basis"]
    if int(n) > matrix.shape[1]:
        raise ValueError(f"{spec!r}: the basis holds only {matrix.shape[1]} directions")
    names = _match_names(network, list(record["names"]), [tuple(s) for s in record["shapes"]])
    module = GradientSubspaceView(network, matrix[:, : int(n)], names)
    return TrainableView(spec, network, module, names)


def _match_names(network: nn.Module, names: list[str], shapes: list[tuple[int, ...]]) -> list[str]:
    """The network's names for the basis's parameters: equal, or all under one prefix (``net.`` in a job)."""
    params = dict(network.named_parameters())
    own = list(params)
    prefix = own[0][: len(own[0]) - len(names[0])] if names and own and own[0].endswith(names[0]) else ""
    mapped = [prefix + n for n in names]
    bad = [m for m, s in zip(mapped, shapes, strict=True) if m not in params or tuple(params[m].shape) != s]
    if bad or len(mapped) != len(own):
        raise ValueError(
            f"the gradient basis does not describe this network ({len(names)} tensors in the basis, {len(own)} in "
            f"the network; mismatched: {bad[:3]})"
        )
    return mapped


# -- the public gradient basis ----------------------------------------------------------------------------------


def gradient_basis(
    network: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    *,
    provenance: dict | None = None,
    seed: int = 0,
) -> dict:
    """Top-``k`` principal directions of per-sample gradients of ``loss_fn`` at ``network``'s current weights.

    ``samples`` must be PUBLIC data (e.g. several augmented views of each public case, one ``(image, label)`` with
    a batch dimension of 1 each): the basis is then a function of public data only and costs no ε. The matrix of
    gradients is not centred: its leading direction is close to the mean gradient, which is the one that matters
    most for fine-tuning. Returns ``{"basis": d×k orthonormal, "names", "shapes", "singular_values",
    "provenance"}`` (the format :func:`save_basis` writes).
    """
    names = [n for n, _ in network.named_parameters()]
    params = [p for _, p in network.named_parameters()]
    rows = []
    was_training = network.training
    network.train()
    for image, label in samples:
        grads = torch.autograd.grad(loss_fn(network(image), label).mean(), params, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    network.train(was_training)
    if len(rows) < k:
        raise ValueError(f"a {k}-direction basis needs at least {k} gradient samples, got {len(rows)}")
    matrix = torch.stack(rows).detach()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(matrix, q=min(k + 10, *matrix.shape), niter=6)
    # same span, columns orthonormal to float32 rounding (svd_lowrank's float32 columns are off by ~1e-3)
    basis = torch.linalg.qr(v[:, :k].double())[0].to(v.dtype)
    return {
        "basis": basis.contiguous(),
        "names": names,
        "shapes": [list(p.shape) for p in params],
        "singular_values": s[:k].tolist(),
        "provenance": {"samples": len(rows), "k": int(k), "seed": int(seed), **(provenance or {})},
    }


def save_basis(record: dict, path: str | Path) -> Path:
    """Write a basis from :func:`gradient_basis` (next to the public checkpoint it was estimated at)."""
    from fetalseg.plumbing import atomic_open

    path = Path(path)
    with atomic_open(path, "wb") as fh:  # a unique temporary file: concurrent writers never share one
        torch.save(record, fh)
    return path


def load_basis(path: str | Path | dict) -> dict:
    if isinstance(path, dict):
        return path
    from fetalseg.bundle import load_checkpoint_file

    record = load_checkpoint_file(path)
    missing = {"basis", "names", "shapes", "provenance"} - set(record)
    if missing:
        raise ValueError(f"{path}: not a gradient basis (missing {sorted(missing)})")
    return record
