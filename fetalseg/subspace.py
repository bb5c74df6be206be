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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
