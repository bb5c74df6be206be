"""The bundle's network on CrypTen tensors: the module tree is walked as built, each layer computed on shares.

No network is re-typed here: :class:`EncryptedNetwork` visits the modules ``fetalseg.bundle.Bundle.network()``
builds (MONAI's ``UNet``, ``ResidualUnit``, ``SkipConnection``, ``Convolution``/``ADN`` sequences) and runs, for each
leaf, the encrypted counterpart of its torch forward. A module with no counterpart raises before any traffic.

CrypTen 0.4.1 lacks the 3D layers the bundle uses; they are built from what it has (each pinned against torch in
``tests/privacy/encrypted_inference/test_layers.py``):

* ``Conv3d``: the depth axis becomes the batch axis and the kernel's depth taps become extra output channels, so one
  CrypTen ``conv2d`` (one Beaver opening of the input, not 27 as im2col would) gives every depth tap; the taps are
  then summed share-wise (no communication).
* ``ConvTranspose3d``: the same with CrypTen's ``conv_transpose2d``; taps are scatter-added into the output depth.
* ``InstanceNorm3d``: mean and variance per channel, then CrypTen's Newton inverse square root on the variance
  times a per-channel scale the model owner calibrated on its own data (:func:`calibrate_instance_norm`), so the
  Newton start is accurate (uncalibrated: 12 % of voxels agreed with plaintext in the spike, calibrated 99.97 %).
* ``LeakyReLU``: ``slope·x + (1 − slope)·relu(x)``; ``PReLU``: ``relu(x) + a·(x − relu(x))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from monai.networks.blocks import ResidualUnit
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

from privacy.encrypted_inference.shims import local

SCALE_EXPONENT = 7  # scales are powers of 4 within 4**±7: exact in CrypTen's 16-bit fixed point (2**-16 .. 2**14)


class UnsupportedLayerError(ValueError):
    """The network holds a module with no encrypted counterpart (raised before any traffic)."""


# -- layers -------------------------------------------------------------------------------------------------------
def _stack_depth_taps(weight: Any, transpose: bool) -> Any:
    """(O, C, kD, kH, kW) -> (kD·O, C, kH, kW) for conv2d; (C, O, kD, ...) -> (C, kD·O, kH, kW) for the transpose."""

    def fn(w: torch.Tensor) -> torch.Tensor:
        if transpose:
            c, o, kd, kh, kw = w.shape
            return w.permute(0, 2, 1, 3, 4).reshape(c, kd * o, kh, kw)
        o, c, kd, kh, kw = w.shape
        return w.permute(2, 0, 1, 3, 4).reshape(kd * o, c, kh, kw)

    return fn(weight) if torch.is_tensor(weight) else local(weight, fn)


def _to_channels_first(d: int, o: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda s: s.reshape(d, o, *s.shape[2:]).permute(1, 0, 2, 3).unsqueeze(0)


def conv3d(x: Any, weight: Any, bias: Any, *, stride: tuple[int, ...], padding: tuple[int, ...]) -> Any:
    """``torch.nn.functional.conv3d`` for an encrypted ``x`` (1, C, D, H, W); weights public or encrypted."""
    o, _, kd, _, _ = weight.shape
    sd, sh, sw = stride
    pd, ph, pw = padding
    xp = local(x, lambda s: nnf.pad(s, (pw, pw, ph, ph, pd, pd))[0].permute(1, 0, 2, 3))  # (Dp, C, Hp, Wp)
    dp = xp.shape[0]
    d_out = (dp - kd) // sd + 1
    y = xp.conv2d(_stack_depth_taps(weight, False), stride=(sh, sw))  # (Dp, kD·O, H', W')

    def sum_taps(s: torch.Tensor) -> torch.Tensor:
        s = s.reshape(dp, kd, o, *s.shape[2:])
        out = s[0 : (d_out - 1) * sd + 1 : sd, 0]
        for t in range(1, kd):
            out = out + s[t : t + (d_out - 1) * sd + 1 : sd, t]
        return out.permute(1, 0, 2, 3).unsqueeze(0)  # (1, O, D', H', W')

    out = local(y, sum_taps)
    return out if bias is None else out + _channel_view(bias)


def conv_transpose3d(
    x: Any,
    weight: Any,
    bias: Any,
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    output_padding: tuple[int, ...],
) -> Any:
    """``torch.nn.functional.conv_transpose3d`` for an encrypted ``x`` (1, C, D, H, W); weights (C, O, k, k, k)."""
    _, o, kd, kh, kw = weight.shape
    d = x.shape[2]
    x2 = local(x, lambda s: s[0].permute(1, 0, 2, 3))  # (D, C, H, W)
    y = x2.conv_transpose2d(_stack_depth_taps(weight, True), stride=tuple(stride[1:]))  # (D, kD·O, Hf, Wf)
    full_d = (d - 1) * stride[0] + kd
    sizes = [
        (n - 1) * s - 2 * p + k + op
        for n, s, p, k, op in zip(x.shape[2:], stride, padding, (kd, kh, kw), output_padding)
    ]

    def place_taps(s: torch.Tensor) -> torch.Tensor:
        s = s.reshape(d, kd, o, *s.shape[2:])
        full = s.new_zeros((full_d, o, *s.shape[3:]))
        for t in range(kd):
            full[t : t + (d - 1) * stride[0] + 1 : stride[0]] += s[:, t]
        full = full.permute(1, 0, 2, 3).unsqueeze(0)  # (1, O, Df, Hf, Wf)
        extra = [max(0, p + n - f) for p, n, f in zip(padding, sizes, full.shape[2:])]
        full = nnf.pad(full, (0, extra[2], 0, extra[1], 0, extra[0]))
        return full[
            :,
            :,
            padding[0] : padding[0] + sizes[0],
            padding[1] : padding[1] + sizes[1],
            padding[2] : padding[2] + sizes[2],
        ]

    out = local(y, place_taps)
    return out if bias is None else out + _channel_view(bias)


def _channel_view(v: Any) -> Any:
    fn = lambda s: s.reshape(1, -1, 1, 1, 1)  # noqa: E731
    return fn(v) if torch.is_tensor(v) else local(v, fn)


def instance_norm(x: Any, weight: Any, bias: Any, *, scale: Any, root_scale: Any, eps: float) -> Any:
    """``torch.nn.functional.instance_norm`` (no running stats) on an encrypted ``x`` (1, C, D, H, W).

    ``scale`` (1, C, 1, 1, 1) brings each channel's variance near 1 where CrypTen's Newton start is accurate:
    1/sqrt(v + eps) = sqrt(scale) / sqrt(scale·(v + eps)); ``root_scale`` is sqrt(scale), computed by the model
    owner in plaintext (both public or both encrypted).
    """
    n = int(np.prod(x.shape[2:]))
    dims = (2, 3, 4)
    mean = x.sum(dim=dims, keepdim=True).div(n)
    xc = x - mean
    var = xc.square().sum(dim=dims, keepdim=True).div(n)  # divide first: sum·scale could near the ring's 2**63
    scaled_var = var * scale + scale * eps
    inv_std = scaled_var.inv_sqrt() * root_scale
    if weight is not None:
        inv_std = inv_std * _channel_view(weight)
    out = xc * inv_std
    return out if bias is None else out + _channel_view(bias)


def leaky_relu(x: Any, slope: float) -> Any:
    """``slope·x + (1 − slope)·relu(x)``: one comparison per element, as ``relu``."""
    return x * slope + x.relu() * (1.0 - slope)


def prelu(x: Any, weight: Any) -> Any:
    """``relu(x) + a·(x − relu(x))`` with ``a`` one per channel (or one for all)."""
    r = x.relu()
    a = (
        weight.reshape(1, -1, 1, 1, 1)
        if torch.is_tensor(weight)
        else local(weight, lambda s: s.reshape(1, -1, 1, 1, 1))
    )
    return r + (x - r) * a


# -- the network walk ------------------------------------------------------------------------------------------------
_PASS_THROUGH = (nn.Dropout, nn.Dropout3d, nn.Identity)


def check_supported(network: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first module :class:`EncryptedNetwork` cannot compute."""
    for name, module in network.named_modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            if module.groups != 1 or tuple(module.dilation) != (1, 1, 1) or module.padding_mode != "zeros":
                raise UnsupportedLayerError(
                    f"{name}: only zero-padded, ungrouped, undilated convolutions are supported"
                )
        elif isinstance(module, nn.InstanceNorm3d):
            if module.track_running_stats:
                raise UnsupportedLayerError(f"{name}: instance norm with running statistics is not supported")
        elif isinstance(module, SkipConnection):
            if module.mode not in ("cat", "add") or module.dim != 1:
                raise UnsupportedLayerError(
                    f"{name}: SkipConnection mode {module.mode!r} dim {module.dim} not supported"
                )
        elif isinstance(module, (nn.LeakyReLU, nn.PReLU, ResidualUnit, UNet, nn.Sequential, *_PASS_THROUGH)):
            pass
        elif isinstance(module, nn.Dropout) or not list(module.children()):
            raise UnsupportedLayerError(f"{name or 'network'}: {type(module).__name__} has no encrypted counterpart")
        else:
            raise UnsupportedLayerError(f"{name or 'network'}: container {type(module).__name__} is not supported")


class EncryptedNetwork:
    """Runs ``network``'s forward on an encrypted input with ``params`` (name -> public tensor or CrypTensor).

    ``network`` supplies only the structure and hyper-parameters (strides, paddings, eps, slopes); its own weight
    values are never read here, so the data owner can hold a network with zero weights. ``norm_scales`` maps each
    instance-norm module's name to its (scale, sqrt(scale)) pair, each (1, C, 1, 1, 1), public or encrypted.
    """

    def __init__(self, network: nn.Module, params: Mapping[str, Any], norm_scales: Mapping[str, Any]) -> None:
        check_supported(network)
        self.network = network.eval()
        self.params = dict(params)
        self.norm_scales = dict(norm_scales)
        self.names = {id(m): n for n, m in network.named_modules()}

    def __call__(self, x: Any) -> Any:
        return self._run(self.network, x)

    def _param(self, module: nn.Module, attr: str) -> Any:
        if getattr(module, attr, None) is None:
            return None
        prefix = self.names[id(module)]
        return self.params[f"{prefix}.{attr}" if prefix else attr]

    def _run(self, module: nn.Module, x: Any) -> Any:
        if isinstance(module, UNet):
            return self._run(module.model, x)
        if isinstance(module, ResidualUnit):
            res = self._run(module.residual, x)
            return self._run(module.conv, x) + res
        if isinstance(module, SkipConnection):
            y = self._run(module.submodule, x)
            if module.mode == "add":
                return x + y
            return _cat_channels(x, y)
        if isinstance(module, nn.Sequential):
            for child in module:
                x = self._run(child, x)
            return x
        if isinstance(module, nn.Conv3d):
            return conv3d(
                x,
                self._param(module, "weight"),
                self._param(module, "bias"),
                stride=tuple(module.stride),
                padding=tuple(module.padding),
            )
        if isinstance(module, nn.ConvTranspose3d):
            return conv_transpose3d(
                x,
                self._param(module, "weight"),
                self._param(module, "bias"),
                stride=tuple(module.stride),
                padding=tuple(module.padding),
                output_padding=tuple(module.output_padding),
            )
        if isinstance(module, nn.InstanceNorm3d):
            scale, root_scale = self.norm_scales[self.names[id(module)]]
            return instance_norm(
                x,
                self._param(module, "weight"),
                self._param(module, "bias"),
                scale=scale,
                root_scale=root_scale,
                eps=float(module.eps),
            )
        if isinstance(module, nn.LeakyReLU):
            return leaky_relu(x, float(module.negative_slope))
        if isinstance(module, nn.PReLU):
            return prelu(x, self._param(module, "weight"))
        if isinstance(module, _PASS_THROUGH):
            return x
        raise UnsupportedLayerError(f"{type(module).__name__} has no encrypted counterpart")


def _cat_channels(x: Any, y: Any) -> Any:
    from privacy.encrypted_inference.shims import crypten_module

    return crypten_module().cat([x, y], dim=1)


# -- instance-norm calibration (model owner, plaintext, its own data) ---------------------------------------------
def norm_modules(network: nn.Module) -> dict[str, nn.InstanceNorm3d]:
    return {n: m for n, m in network.named_modules() if isinstance(m, nn.InstanceNorm3d)}


@torch.no_grad()
def calibrate_instance_norm(network: nn.Module, patches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per instance-norm layer, per channel: 1 / (median over ``patches`` of the variance its input has).

    Run by the model owner on its own data (never the data owner's): the scale brings the variance CrypTen's
    inverse square root sees near 1. Rounded to a power of 4 (a scale like 1/900 would lose 0.4 % to the 16-bit
    fixed point; a power of 4 and its root are exact), within 4**±:data:`SCALE_EXPONENT`; a constant channel gets 1.
    """
    logs: dict[str, list[torch.Tensor]] = {n: [] for n in norm_modules(network)}
    hooks = []
    for name, module in norm_modules(network).items():

        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any, name: str = name) -> None:
            var = inputs[0].double().var(dim=(2, 3, 4), unbiased=False)  # (N, C)
            logs[name].append(var)

        hooks.append(module.register_forward_hook(hook))
    try:
        network.eval()
        for patch in patches:
            network(patch)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for name, chunks in logs.items():
        if not chunks:
            raise ValueError("calibration saw no patches")
        var = torch.cat(chunks, 0)  # (instances, C)
        med = torch.where(var > 1e-12, var, torch.full_like(var, float("nan"))).nanmedian(dim=0).values
        med = torch.where(torch.isnan(med), torch.ones_like(med), med)
        # a power of 4: exact in fixed point, and so is its square root (a power of 2)
        exponent = torch.round(-torch.log(med) / np.log(4.0)).clamp(-SCALE_EXPONENT, SCALE_EXPONENT)
        scales[name] = (4.0**exponent).float().reshape(1, -1, 1, 1, 1)
    return scales
