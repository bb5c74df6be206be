"""The three processes of encrypted inference and their handshake.

* **Model owner** (:class:`ModelOwner`, ``fetal-fl private-infer serve``): holds the weights; listens on a TCP port
  for the dealer and for data owners, one session at a time. Each session runs in a fresh child process (CrypTen's
  global state is per process; a failed session cannot take the server down).
* **Data owner** (:func:`segment`, ``fetal-fl private-infer segment``): pre-processes its scan with the bundle's
  transforms, sends the model-grid SHAPE (nothing else about the scan) and the model fingerprint, secret-shares
  each sliding-window patch, receives the logits of its patches only, and writes the label map on the input's grid.
* **Dealer** (:func:`run_dealer`, ``fetal-fl private-infer dealer``): CrypTen's trusted third party: it makes the
  Beaver triples and never sees an input or a weight.

Handshake (JSON lines over TCP, before any CrypTen traffic): the data owner sends ``{"role": "data_owner",
"protocol", "model_hash", "shape"}``; the model owner refuses a different fingerprint (bundle version, network
definition, pre-processing, patch size, inferer, parameter shapes), a volume over its voxel limit, or the lack of
a dealer, with a message the data owner prints; else it answers with a fresh rendezvous address for the session
and whether the weights stay encrypted. Every wait has a timeout; a peer that goes away fails the other within
it and nothing is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import resource
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fetalseg.bundle import Bundle
from fetalseg.plumbing import atomic_write_json, free_port
from privacy.encrypted_inference import audit as audit_mod
from privacy.encrypted_inference import layers, shims

PROTOCOL_VERSION = 1
DEFAULT_TIMEOUT_S = 120.0  # any single wait (handshake line, gloo collective, session start)
MAX_LINE = 64 * 1024
DEFAULT_MAX_VOXELS = 128**3  # model-grid voxels a server accepts per scan (2 mm grid: a 256 mm field of view)


class PrivateInferenceError(RuntimeError):
    """A clear, user-facing failure of the protocol (mismatch, refusal, peer gone, bad image)."""


# -- the model both parties must agree on -------------------------------------------------------------------------
def load_bundle(variant: str | None = None, overrides: Mapping[str, Any] | None = None) -> Bundle:
    return Bundle("common", variant=variant, overrides=dict(overrides or {}))


def model_fingerprint(bundle: Bundle, network: nn.Module) -> str:
    """SHA-256 over what both parties must share: bundle version, network definition, pre-processing, patch size,
    grid, inferer and the parameter names and shapes (not their values: the data owner never has them)."""
    parser = bundle.parser
    spec = {
        "protocol": PROTOCOL_VERSION,
        "precision_bits": shims.PRECISION_BITS,
        "bundle_version": bundle.version,
        "network_def": parser.get("network_def"),
        "preprocessing": parser.get("preprocessing_transforms"),
        "inferer": parser.get("inferer"),
        "patch_size": list(bundle.patch_size),
        "pixdim": list(bundle.pixdim),
        "num_classes": bundle.num_classes,
        "sw": [parser.get_parsed_content("sw_batch_size"), parser.get_parsed_content("sw_overlap")],
        "parameters": [[n, list(p.shape)] for n, p in network.named_parameters()],
        "norms": [[n, m.num_features] for n, m in layers.norm_modules(network).items()],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


# -- JSON lines with timeouts ---------------------------------------------------------------------------------------
def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _recv(sock: socket.socket, timeout_s: float | None, what: str) -> dict[str, Any]:
    sock.settimeout(timeout_s)
    buf = bytearray()
    try:
        while not buf.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise PrivateInferenceError(f"{what}: the peer closed the connection")
            buf += chunk
            if len(buf) > MAX_LINE:
                raise PrivateInferenceError(f"{what}: message too long")
    except TimeoutError as exc:
        raise PrivateInferenceError(f"{what}: no answer within {timeout_s:g} s") from exc
    except OSError as exc:
        raise PrivateInferenceError(f"{what}: connection failed ({exc})") from exc
    try:
        message = json.loads(buf)
    except json.JSONDecodeError as exc:
        raise PrivateInferenceError(f"{what}: not a protocol message") from exc
    if not isinstance(message, dict):
        raise PrivateInferenceError(f"{what}: not a protocol message")
    return message


def _connect(server: str, timeout_s: float) -> socket.socket:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise PrivateInferenceError(f"--server must be HOST:PORT, got {server!r}")
    try:
        return socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as exc:
        raise PrivateInferenceError(f"cannot reach the model owner at {server} ({exc})") from exc


# -- one session (runs in each party's process) -------------------------------------------------------------------
@dataclass
class SessionStats:
    role: str
    seconds: float = 0.0
    crypten_bytes: float = 0.0  # CrypTen's own count: sent + received, 8 bytes per ring element
    rounds: int = 0
    peak_rss_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "seconds": self.seconds,
            "crypten_bytes": self.crypten_bytes,
            "rounds": self.rounds,
            "peak_rss_bytes": self.peak_rss_bytes,
            **self.extra,
        }


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _share(cr: Any, values: list[torch.Tensor], shapes: list[torch.Size], *, rank: int, encrypted: bool) -> list:
    """The model owner's tensors for the session: secret-shared (encrypted) or sent in the clear (public)."""
    out = []
    for value, shape in zip(values or [None] * len(shapes), shapes):
        mine = value.detach().float() if rank == 0 else torch.zeros(shape)
        if encrypted:
            out.append(cr.cryptensor(mine, src=0))
        else:
            buf = mine.clone()
            cr.communicator.get().broadcast(buf, 0)
            out.append(buf)
    return out


class _EncryptedPatches(nn.Module):
    """What the bundle's sliding-window inferer calls: one secret-shared patch in, its logits out (data owner)."""

    def __init__(self) -> None:
        super().__init__()
        self.session: Any = None  # (crypten, EncryptedNetwork, rank), set when the session starts
        self.windows = 0

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            raise RuntimeError("no encrypted session")
        cr, net, rank = self.session
        outs = []
        for i in range(patch.shape[0]):  # the layers take one patch at a time
            x = cr.cryptensor(patch[i : i + 1].float() if rank == 1 else torch.zeros_like(patch[i : i + 1]), src=1)
            y = net(x)
            if rank == 1:  # revealed to the data owner only
                outs.append(y.get_plain_text(dst=1))
            else:
                y._tensor.reveal(dst=1)  # the model owner's half of the reveal; it learns nothing
                outs.append(torch.zeros(tuple(y.shape)))
            self.windows += 1
        return torch.cat(outs, 0)


def _run_session(
    *,
    rank: int,
    rendezvous: str,
    bundle: Bundle,
    network: nn.Module,
    volume: torch.Tensor,
    encrypted: bool,
    timeout_s: float,
    state: Mapping[str, torch.Tensor] | None = None,
    norm_scales: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, SessionStats]:
    """One party's side of the computation: share the model, run the sliding window, reveal logits to rank 1."""
    t0 = time.perf_counter()
    cr = shims.init_party(rank=rank, rendezvous=rendezvous, timeout_s=timeout_s)
    audited = audit_mod.from_environment()
    if audited is not None:
        audit_mod.install(cr.communicator.get(), audited[0])
    try:
        names = [n for n, _ in network.named_parameters()]
        shapes = [p.shape for _, p in network.named_parameters()]
        values = [state[n] for n in names] if rank == 0 and state is not None else None
        params = dict(zip(names, _share(cr, values, shapes, rank=rank, encrypted=encrypted)))
        norms = layers.norm_modules(network)
        nshapes = [torch.Size((1, m.num_features, 1, 1, 1)) for m in norms.values()]
        scales = [norm_scales[n] for n in norms] if rank == 0 and norm_scales is not None else None
        roots = [s.sqrt() for s in scales] if scales is not None else None
        shared_scales = _share(cr, scales, nshapes, rank=rank, encrypted=encrypted)
        shared_roots = _share(cr, roots, nshapes, rank=rank, encrypted=encrypted)
        enc = layers.EncryptedNetwork(network, params, dict(zip(norms, zip(shared_scales, shared_roots))))
        patches = _EncryptedPatches()
        patches.session = (cr, enc, rank)
        with torch.no_grad():
            logits = bundle.inferer()(volume, patches)
        stats = shims.communication_stats()
        result = SessionStats(
            role="model_owner" if rank == 0 else "data_owner",
            seconds=time.perf_counter() - t0,
            crypten_bytes=stats["bytes"],
            rounds=stats["rounds"],
            extra={"windows": patches.windows, "encrypted_weights": encrypted},
        )
        if audited is not None:
            audit_mod.write(audited[0], audited[1], role=result.role)
        return logits, result
    finally:
        with contextlib.suppress(Exception):  # after a peer failure: the failure is what the caller must see
            cr.uninit()


def _gloo_failure(exc: BaseException) -> PrivateInferenceError:
    return PrivateInferenceError(f"the encrypted session failed: the other party went away or timed out ({exc})")


# -- model owner ------------------------------------------------------------------------------------------------------
def _model_owner_child(conn: Any, kwargs: dict[str, Any]) -> None:  # in a _Warm process
    """Child process of one session at the model owner: report stats (or the error) through ``conn``."""
    try:
        bundle = load_bundle(kwargs.pop("variant"), kwargs.pop("overrides"))
        network = bundle.network().eval()
        shape = kwargs.pop("shape")
        _, stats = _run_session(rank=0, bundle=bundle, network=network, volume=torch.zeros(1, 1, *shape), **kwargs)
        stats.peak_rss_bytes = _peak_rss()
        conn.send({"ok": stats.to_dict()})
    except BaseException as exc:  # reported to the parent, which keeps serving
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _warm_worker(conn: Any, target: str) -> None:
    """A session process started before it is needed: imports (torch, MONAI, CrypTen: seconds) are paid while the
    party waits, not while the other party does. Receives its arguments, or None to stop."""
    shims.crypten_module()
    args = conn.recv()
    if args is None:
        conn.close()
        return
    {"model_owner": _model_owner_child, "dealer": _dealer_child}[target](conn, *args)


class _Warm:
    """One pre-started session process for ``target``; :meth:`take` hands it over and starts the next."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe(duplex=True)
        self.proc = self.ctx.Process(target=_warm_worker, args=(child, self.target), daemon=True)
        self.proc.start()
        child.close()

    def take(self, *args: Any) -> tuple[Any, Any]:
        proc, conn = self.proc, self.conn
        if not proc.is_alive():
            proc.join()
            self._start()
            proc, conn = self.proc, self.conn
        conn.send(args)
        self._start()
        return proc, conn

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()


def _dealer_child(conn: Any, rendezvous: str, timeout_s: float) -> None:
    try:
        t0 = time.perf_counter()
        shims.init_party(rank=2, rendezvous=rendezvous, timeout_s=timeout_s)
        stats = shims.communication_stats()
        conn.send(
            {
                "ok": SessionStats(
                    role="dealer",
                    seconds=time.perf_counter() - t0,
                    crypten_bytes=stats["bytes"],
                    rounds=stats["rounds"],
                    peak_rss_bytes=_peak_rss(),
                ).to_dict()
            }
        )
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def calibration_patches(bundle: Bundle, images: list[Path] | None, *, seed: int = 0) -> list[torch.Tensor]:
    """The model owner's own calibration data, pre-processed and cut into the inferer's windows.

    ``images``: the model owner's files; default: one synthetic phantom made here (``fetalseg.data``), so a server
    needs no data of its own to start.
    """
    import tempfile

    from monai.inferers import sliding_window_inference

    from fetalseg.data.io import write_nifti
    from fetalseg.data.phantom import generate_phantom, site_profiles
    from fetalseg.inference import Segmenter

    seg = Segmenter(nn.Identity(), bundle=bundle)
    patches: list[torch.Tensor] = []

    def collect(x: torch.Tensor) -> torch.Tensor:
        patches.append(x.clone())
        return x

    with tempfile.TemporaryDirectory(prefix="calib-") as tmp:
        if not images:
            grid = round(128.0 / bundle.pixdim[0])
            ph = generate_phantom(shape=(grid,) * 3, ga_weeks=28.0, profile=site_profiles(1, seed)[0], seed=seed)
            images = [write_nifti(ph.image, ph.affine, Path(tmp) / "phantom.nii.gz")]
        for image in images:
            data = seg.preprocess(image)
            sliding_window_inference(
                data["image"].as_tensor()[None],
                roi_size=bundle.patch_size,
                sw_batch_size=1,
                predictor=collect,
                overlap=float(bundle.parser.get_parsed_content("sw_overlap")),
            )
    return patches


class ModelOwner:
    """``fetal-fl private-infer serve``: one dealer connection, data-owner sessions one at a time."""

    def __init__(
        self,
        weights: Path | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        variant: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        encrypted_weights: bool = True,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        calibration_images: list[Path] | None = None,
        stats_dir: Path | None = None,
        log: Any = None,
    ) -> None:
        from fetalseg.bundle import load_checkpoint

        self.variant, self.overrides = variant, dict(overrides or {})
        self.bundle = load_bundle(variant, overrides)
        network = self.bundle.network().eval()
        if weights is not None:
            load_checkpoint(network, weights)
        layers.check_supported(network)
        self.state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
        self.model_hash = model_fingerprint(self.bundle, network)
        self.norm_scales = layers.calibrate_instance_norm(network, calibration_patches(self.bundle, calibration_images))
        self.encrypted_weights = encrypted_weights
        self.max_voxels, self.timeout_s = int(max_voxels), float(timeout_s)
        self.stats_dir = stats_dir
        self.log = log or (lambda msg: print(msg, flush=True))
        self.listener = socket.create_server((host, port))
        self.host, self.port = self.listener.getsockname()[:2]
        self.dealer: socket.socket | None = None
        self.sessions = 0
        self.warm = _Warm("model_owner")

    def serve_forever(self, *, max_sessions: int | None = None) -> None:
        self.log(f"model owner listening on {self.host}:{self.port} (model {self.model_hash[:12]})")
        while max_sessions is None or self.sessions < max_sessions:
            sock, _addr = self.listener.accept()
            try:
                self._handle(sock)
            except PrivateInferenceError as exc:
                self.log(f"refused or failed: {exc}")
            finally:
                if sock is not self.dealer:
                    sock.close()

    def _handle(self, sock: socket.socket) -> None:
        hello = _recv(sock, self.timeout_s, "hello")
        if hello.get("protocol") != PROTOCOL_VERSION:
            _send(sock, {"error": f"protocol version {hello.get('protocol')} != {PROTOCOL_VERSION}"})
            raise PrivateInferenceError("a peer with another protocol version")
        if hello.get("role") == "dealer":
            if self.dealer is not None:
                self.dealer.close()
            self.dealer = sock
            _send(sock, {"ok": True})
            self.log("dealer connected")
            return
        if hello.get("role") != "data_owner":
            _send(sock, {"error": "unknown role"})
            raise PrivateInferenceError(f"unknown role {hello.get('role')!r}")
        refusal = self._refusal(hello)
        if refusal:
            _send(sock, {"error": refusal})
            raise PrivateInferenceError(refusal)
        self._session(sock, tuple(int(s) for s in hello["shape"]))

    def _refusal(self, hello: Mapping[str, Any]) -> str | None:
        if hello.get("model_hash") != self.model_hash:
            return (
                f"model mismatch: the data owner's bundle has fingerprint {str(hello.get('model_hash'))[:12]}, "
                f"this server's {self.model_hash[:12]} (same bundle version, variant and overrides are needed)"
            )
        shape = hello.get("shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
            return f"the scan's model-grid shape must be three positive sizes, got {shape!r}"
        if int(np.prod(shape)) > self.max_voxels:
            size = "x".join(map(str, shape))
            return f"volume of {size} voxels on the model grid is over this server's limit of {self.max_voxels}"
        if self.dealer is None:
            return "the model owner has no dealer connected (start `fetal-fl private-infer dealer --server ...`)"
        return None

    def _session(self, sock: socket.socket, shape: tuple[int, ...]) -> None:
        rendezvous = f"tcp://{self.host}:{free_port(self.host)}"
        kwargs = dict(
            variant=self.variant,
            overrides=self.overrides,
            shape=shape,
            rendezvous=rendezvous,
            encrypted=self.encrypted_weights,
            timeout_s=self.timeout_s,
            state=self.state,
            norm_scales=self.norm_scales,
        )
        proc, parent = self.warm.take(kwargs)
        self.sessions += 1
        try:
            assert self.dealer is not None
            _send(self.dealer, {"session": rendezvous, "timeout_s": self.timeout_s})
        except OSError:
            self.dealer = None
            proc.kill()
            _send(sock, {"error": "the model owner's dealer went away; try again later"})
            raise PrivateInferenceError("dealer went away") from None
        _send(sock, {"ok": True, "rendezvous": rendezvous, "encrypted_weights": self.encrypted_weights})
        self.log(f"session {self.sessions}: {'x'.join(map(str, shape))} voxels, rendezvous {rendezvous}")
        report = None
        deadline = time.monotonic() + 24 * 3600
        while proc.is_alive() or parent.poll():
            if parent.poll(1.0):
                report = parent.recv()
                break
            if time.monotonic() > deadline:
                break
        proc.join(timeout=self.timeout_s)
        if proc.is_alive():
            proc.kill()
        if report is None or "error" in report:
            self.log(f"session {self.sessions} failed: {(report and report['error']) or 'no report'}")
            self._drop_dealer_if_gone()
            return
        self.log(f"session {self.sessions} done in {report['ok']['seconds']:.1f} s")
        if self.stats_dir is not None:
            atomic_write_json(Path(self.stats_dir) / f"session-{self.sessions}-model_owner.json", report["ok"])

    def _drop_dealer_if_gone(self) -> None:
        if self.dealer is None:
            return
        try:
            self.dealer.settimeout(0.0)
            if self.dealer.recv(1, socket.MSG_PEEK) == b"":
                self.dealer = None
        except BlockingIOError:
            pass
        except OSError:
            self.dealer = None

    def close(self) -> None:
        self.warm.close()
        self.listener.close()
        if self.dealer is not None:
            self.dealer.close()


# -- dealer -----------------------------------------------------------------------------------------------------------
def run_dealer(
    server: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_sessions: int | None = None,
    stats_dir: Path | None = None,
    log: Any = None,
) -> int:
    """Connect to the model owner and serve each session's Beaver triples in a fresh child process."""
    log = log or (lambda msg: print(msg, flush=True))
    sock = _connect(server, timeout_s)
    _send(sock, {"role": "dealer", "protocol": PROTOCOL_VERSION})
    answer = _recv(sock, timeout_s, "dealer registration")
    if "error" in answer:
        raise PrivateInferenceError(f"the model owner refused the dealer: {answer['error']}")
    log(f"dealer registered with {server}")
    done = 0
    warm = _Warm("dealer")
    while max_sessions is None or done < max_sessions:
        try:
            order = _recv(sock, None, "waiting for a session")
        except PrivateInferenceError:
            log("the model owner closed the connection; dealer stops")
            warm.close()
            return 0
        proc, parent = warm.take(str(order["session"]), float(order.get("timeout_s", timeout_s)))
        report = parent.recv() if parent.poll(None) else None
        proc.join(timeout=timeout_s)
        if proc.is_alive():
            proc.kill()
        done += 1
        if report and "ok" in report:
            log(f"session {done}: dealer done in {report['ok']['seconds']:.1f} s")
            if stats_dir is not None:
                atomic_write_json(Path(stats_dir) / f"session-{done}-dealer.json", report["ok"])
        else:
            log(f"session {done}: dealer failed: {report and report.get('error')}")
    warm.close()
    return 0


# -- data owner -------------------------------------------------------------------------------------------------------
@dataclass
class PrivateSegmentation:
    label: np.ndarray
    affine: np.ndarray
    stats: SessionStats
    model_shape: tuple[int, ...]


def prepare(image: Path, bundle: Bundle) -> tuple[Any, dict[str, Any]]:
    """The bundle's pre-processing of the data owner's scan, with a clear error for what the network cannot take."""
    from fetalseg.inference import Segmenter

    image = Path(image)
    if not image.exists():
        raise PrivateInferenceError(f"{image}: no such file")
    seg = Segmenter(_EncryptedPatches(), bundle=bundle)
    try:
        data = seg.preprocess(image)
    except Exception as exc:
        raise PrivateInferenceError(f"{image}: cannot be read as a 3D scan ({type(exc).__name__}: {exc})") from exc
    shape = tuple(data["image"].shape)
    if len(shape) != 4 or shape[0] != 1:
        raise PrivateInferenceError(
            f"{image}: the network takes one-channel 3D volumes; after pre-processing this is {shape}"
        )
    if min(shape[1:]) < 2:
        raise PrivateInferenceError(f"{image}: {shape[1:]} voxels on the model grid is not a 3D volume")
    if not torch.isfinite(data["image"].as_tensor()).all():
        raise PrivateInferenceError(f"{image}: contains NaN or infinite values")
    return seg, data


def segment(
    image: Path,
    server: str,
    *,
    variant: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> PrivateSegmentation:
    """The data owner's side: pre-process, handshake, encrypted sliding window, labels on the input's grid."""
    bundle = load_bundle(variant, overrides)
    network = bundle.network().eval()
    for p in network.parameters():  # the data owner never has weights: only the structure is used
        p.data.zero_()
    seg, data = prepare(image, bundle)
    shape = [int(s) for s in data["image"].shape[1:]]
    sock = _connect(server, timeout_s)
    try:
        _send(
            sock,
            {
                "role": "data_owner",
                "protocol": PROTOCOL_VERSION,
                "model_hash": model_fingerprint(bundle, network),
                "shape": shape,
            },
        )
        answer = _recv(sock, timeout_s, "model owner's answer")
    finally:
        sock.close()
    if "error" in answer:
        raise PrivateInferenceError(f"the model owner refused: {answer['error']}")
    volume = data["image"].as_tensor()[None].float()
    try:
        logits, stats = _run_session(
            rank=1,
            rendezvous=str(answer["rendezvous"]),
            bundle=bundle,
            network=network,
            volume=volume,
            encrypted=bool(answer["encrypted_weights"]),
            timeout_s=timeout_s,
        )
    except PrivateInferenceError:
        raise
    except (RuntimeError, ValueError, OSError) as exc:
        raise _gloo_failure(exc) from exc
    stats.peak_rss_bytes = _peak_rss()
    from fetalseg.inference import _argmax_labels

    label, affine = seg.to_input_space(data, _argmax_labels(logits))
    return PrivateSegmentation(label=label, affine=affine, stats=stats, model_shape=tuple(shape))


def write_segmentation(result: PrivateSegmentation, out: Path) -> Path:
    """Write the label map atomically (the data owner's machine only)."""
    from fetalseg.data.io import write_nifti

    return write_nifti(result.label, result.affine, out, dtype=np.uint8)
