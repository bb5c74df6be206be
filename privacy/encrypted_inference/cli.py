"""``fetal-fl private-infer serve|segment|dealer``: encrypted inference between a model owner and a data owner.

Registered by ``privacy.cli.register``. CrypTen and the protocol are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR = 2


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=JSON, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--set {key}: value is not JSON ({exc})") from exc
    return out


def _bundle_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--variant", default=None, help="bundle variant (both parties must use the same)")
    q.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON", help="bundle override, e.g. patch_size=[32,32,32]"
    )
    q.add_argument("--timeout", type=float, default=120.0, help="seconds any single wait may take (default 120)")


def register(subparsers: Any) -> None:
    """Add ``private-infer`` and its sub-commands to the ``fetal-fl`` parser."""
    p = subparsers.add_parser(
        "private-infer",
        help="encrypted inference: segment a scan without showing it, with a model you cannot see",
        description="Two-party secret-shared inference (CrypTen) of the bundle network: the model owner runs "
        "`serve`, a dealer (a third party that colludes with neither) runs `dealer`, the data owner runs `segment`. "
        "Honest-but-curious security; the result is approximate (fixed point). See docs/encrypted_inference.md.",
    )
    sub = p.add_subparsers(dest="private_infer_command", metavar="<command>")
    p.set_defaults(handler=lambda args: (p.print_help(), EXIT_ERROR)[1])

    q = sub.add_parser("serve", help="model owner: serve encrypted inference with these weights")
    q.add_argument("--weights", type=Path, required=True, help="bundle checkpoint (model.pt)")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    q.add_argument("--port", type=int, required=True, help="TCP port for the dealer and the data owners")
    q.add_argument(
        "--public-weights", action="store_true", help="send the weights in the clear (only the scan stays secret)"
    )
    q.add_argument("--max-voxels", type=int, default=128**3, help="largest model-grid volume accepted")
    q.add_argument("--calibration-images", type=Path, nargs="*", default=None, help="own scans for norm calibration")
    q.add_argument("--stats-dir", type=Path, default=None, help="write each session's time/traffic/memory here")
    q.add_argument("--max-sessions", type=int, default=None, help=argparse.SUPPRESS)
    _bundle_args(q)
    q.set_defaults(handler=_serve)

    q = sub.add_parser("dealer", help="dealer: make Beaver triples for the model owner's sessions")
    q.add_argument("--server", required=True, help="model owner HOST:PORT")
    q.add_argument("--stats-dir", type=Path, default=None, help="write each session's time/traffic/memory here")
    q.add_argument("--max-sessions", type=int, default=None, help=argparse.SUPPRESS)
    q.add_argument("--timeout", type=float, default=120.0, help="seconds any single wait may take (default 120)")
    q.set_defaults(handler=_dealer)

    q = sub.add_parser("segment", help="data owner: segment a scan without showing it")
    q.add_argument("image", type=Path, help="the scan (NIfTI/NRRD file or DICOM series folder)")
    q.add_argument("--server", required=True, help="model owner HOST:PORT")
    q.add_argument("--out", type=Path, required=True, help="label map to write (NIfTI, labels 0..7, input grid)")
    q.add_argument("--stats-json", type=Path, default=None, help="write time/traffic/memory of this party here")
    _bundle_args(q)
    q.set_defaults(handler=_segment)


def _fail(exc: BaseException) -> int:
    print(f"fetal-fl private-infer: error: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _serve(args: argparse.Namespace) -> int:
    from privacy.encrypted_inference.layers import UnsupportedLayerError
    from privacy.encrypted_inference.protocol import ModelOwner, PrivateInferenceError

    try:
        owner = ModelOwner(
            args.weights,
            host=args.host,
            port=args.port,
            variant=args.variant,
            overrides=_overrides(args.set),
            encrypted_weights=not args.public_weights,
            max_voxels=args.max_voxels,
            timeout_s=args.timeout,
            calibration_images=args.calibration_images,
            stats_dir=args.stats_dir,
        )
    except (OSError, ValueError, RuntimeError, UnsupportedLayerError, PrivateInferenceError) as exc:
        return _fail(exc)
    try:
        owner.serve_forever(max_sessions=args.max_sessions)
    except KeyboardInterrupt:
        pass
    finally:
        owner.close()
    return 0


def _dealer(args: argparse.Namespace) -> int:
    from privacy.encrypted_inference.protocol import PrivateInferenceError, run_dealer

    try:
        return run_dealer(args.server, timeout_s=args.timeout, max_sessions=args.max_sessions, stats_dir=args.stats_dir)
    except PrivateInferenceError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 0


def _segment(args: argparse.Namespace) -> int:
    from fetalseg.plumbing import atomic_write_json
    from privacy.encrypted_inference.protocol import PrivateInferenceError, segment, write_segmentation

    try:
        result = segment(
            args.image, args.server, variant=args.variant, overrides=_overrides(args.set), timeout_s=args.timeout
        )
        write_segmentation(result, args.out)
    except (PrivateInferenceError, ValueError) as exc:
        return _fail(exc)
    st = result.stats
    if args.stats_json is not None:
        atomic_write_json(args.stats_json, st.to_dict())
    print(
        f"wrote {args.out}: labels 0..7 on the input's grid ({st.extra['windows']} encrypted windows, "
        f"{st.seconds:.1f} s, {st.crypten_bytes / 1e9:.2f} GB sent+received, weights "
        f"{'encrypted' if st.extra['encrypted_weights'] else 'public'}). Approximate: fixed-point secret sharing "
        "(see docs/encrypted_inference.md for the measured agreement with plaintext)."
    )
    return 0
