"""U-Net feature taps: forward hooks on named blocks, always removed, and an early stop.

Names follow the U-Net's execution order: ``down.0`` … ``down.N-1``, ``mid``, ``up.0`` …
``up.N-1`` (diffusers' ``down_blocks[i]``, ``mid_block``, ``up_blocks[i]``). A down block
returns ``(hidden_states, skip_states)``; its tap is the hidden state. What each tap returns is
published up front by :func:`feature_info` (timm's ``FeatureInfo`` habit), and the forward pass
stops right after the last block needed, so no later block and no ``conv_out`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from diqa_cli.errors import UsageError

__all__ = ["FeatureInfo", "feature_info", "tap_names", "UNetTaps"]


@dataclass(frozen=True)
class FeatureInfo:
    name: str  # "down.0", "mid", "up.3"
    module: str  # the diffusers module path, e.g. "up_blocks.3"
    channels: int
    reduction: int  # stride relative to the U-Net's input (latent) grid; x vae_scale_factor for pixels


def _blocks(unet) -> list[tuple[str, str, object]]:
    """(name, module path, module) for every tappable block, in execution order."""
    blocks = [(f"down.{i}", f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid", "mid_block", unet.mid_block))
    blocks += [(f"up.{i}", f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    return blocks


def tap_names(unet) -> list[str]:
    """Every valid tap name of ``unet``, in execution order."""
    return [name for name, _, _ in _blocks(unet)]


def _all_info(unet) -> dict[str, FeatureInfo]:
    channels = list(unet.config.block_out_channels)
    reversed_channels = channels[::-1]
    info = {}
    stride = 1
    for name, path, block in _blocks(unet):
        kind, _, index = name.partition(".")
        if getattr(block, "downsamplers", None):
            stride *= 2
        if getattr(block, "upsamplers", None):
            stride //= 2
        if kind == "down":
            width = channels[int(index)]
        elif kind == "mid":
            width = channels[-1]
        else:
            width = reversed_channels[int(index)]
        info[name] = FeatureInfo(name, path, width, stride)
    return info


def feature_info(unet, names) -> list[FeatureInfo]:
    """What each named tap returns (channels, stride), checked against the U-Net's blocks."""
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))  # keep order, drop repeats
    available = _all_info(unet)
    if not names:
        raise UsageError(f"no U-Net features named; choose from {', '.join(available)}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UsageError(f"unknown U-Net feature {unknown[0]!r}; valid names: {', '.join(available)}")
    return [available[n] for n in names]


class _StopForward(Exception):
    """Raised by the last needed hook to end the U-Net pass; never escapes ``UNetTaps``."""


class UNetTaps:
    """Context manager capturing named block outputs from one U-Net call::

        with UNetTaps(unet, ["up.0", "up.1"]) as taps:
            feats = taps(latents, t, text_states)   # {"up.0": tensor, "up.1": tensor}

    Hooks are registered on entry and removed on exit, whatever happens inside.
    """

    def __init__(self, unet, names):
        self.unet = unet
        self.info = feature_info(unet, names)
        self.names = [i.name for i in self.info]
        modules = {name: module for name, _, module in _blocks(unet)}
        order = tap_names(unet)
        self._targets = [(name, modules[name]) for name in self.names]
        self._last = max(self.names, key=order.index)
        self._handles: list = []
        self._captured: dict = {}
        self._full_pass = False

    def __enter__(self) -> "UNetTaps":
        try:
            for name, module in self._targets:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._captured = {}

    def _hook(self, name: str):
        def hook(module, args, output):
            self._captured[name] = output[0] if isinstance(output, tuple) else output
            if name == self._last and not self._full_pass:
                raise _StopForward

        return hook

    def __call__(self, sample, timestep, encoder_hidden_states, **unet_kwargs) -> dict:
        if not self._handles:
            raise RuntimeError("UNetTaps must be used inside a `with` block (hooks are not registered)")
        self._captured = {}
        try:
            self.unet(sample, timestep, encoder_hidden_states, **unet_kwargs)
        except _StopForward:
            pass
        return self._collect()

    def run(self, sample, timestep, encoder_hidden_states, **unet_kwargs) -> tuple:
        """The whole U-Net pass, nothing stopped early: ``(U-Net output sample, features)``, for
        methods that need the noise prediction as well as the taps (LGDM's guided DDIM)."""
        if not self._handles:
            raise RuntimeError("UNetTaps must be used inside a `with` block (hooks are not registered)")
        self._captured = {}
        self._full_pass = True
        try:
            output = self.unet(sample, timestep, encoder_hidden_states, **unet_kwargs).sample
        finally:
            self._full_pass = False
        return output, self._collect()

    def _collect(self) -> dict:
        captured, self._captured = self._captured, {}
        missing = [n for n in self.names if n not in captured]
        if missing:
            raise RuntimeError(f"U-Net pass ended without reaching {', '.join(missing)}")
        return {name: captured[name] for name in self.names}
