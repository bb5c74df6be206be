"""``fetal-fl app ...``: run the MONAI Label server and exchange models and cases with federated training.

* ``serve``: start MONAI Label with this app behind its hardened front (127.0.0.1 by default);
* ``install-model``: check a federated global model (checkpoint file or finished NVFlare job folder) and make it
  the served model, keeping where it came from;
* ``export-cases``: write the corrected cases as a dataset folder for the site's NVFlare client;
* ``model-info``: what the server would serve (version, origin, validation Dice);
* ``user add|list|revoke``: bearer tokens for a server started with ``--conf auth true``.

Heavy imports (MONAI Label, torch) happen inside the handlers so ``fetal-fl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
UVICORN_APP = "apps.fetal_brain.server:app"


def server_argv(
    *,
    studies: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    conf: Sequence[Sequence[str]] = (),
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
) -> list[str]:
    """``monailabel start_server`` arguments for this app behind its front (what the README shows)."""
    argv = [
        "start_server",
        "--app",
        str(APP_DIR),
        "--studies",
        str(studies),
        "--host",
        host,
        "--port",
        str(int(port)),
        "--uvicorn_app",
        UVICORN_APP,
    ]
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise ValueError("TLS needs both a certificate file and its key file (--ssl-certfile and --ssl-keyfile)")
    if ssl_certfile and ssl_keyfile:
        for what, path in (("certificate", ssl_certfile), ("key", ssl_keyfile)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"TLS {what} file {path} does not exist")
        argv += ["--ssl_certfile", str(ssl_certfile), "--ssl_keyfile", str(ssl_keyfile)]
    for key, value in conf:
        argv += ["--conf", str(key), str(value)]
    return argv


def _conf(args: argparse.Namespace) -> list[list[str]]:
    conf = [list(c) for c in (args.conf or [])]
    if getattr(args, "model_path", None):
        conf.append(["model_path", str(Path(args.model_path).expanduser().resolve())])
    return conf


def _store(args: argparse.Namespace) -> Any:
    from apps.fetal_brain.lib.config import AppConfig
    from apps.fetal_brain.lib.model_store import ModelStore

    config = AppConfig.from_conf(dict(_conf(args)))
    bundle = config.bundle("inference")
    return ModelStore(
        config.resolved_model_path(bundle),
        bundle=bundle,
        device=config.device,
        local_part_path=config.resolved_local_part_path(bundle),
    )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_serve(args: argparse.Namespace) -> int:
    from monailabel.main import Main

    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    conf = _conf(args)
    truthy = {"1", "true", "yes", "on"}
    remote_ok = any(k == "allow_remote" and v.lower() in truthy for k, v in conf)
    auth_on = any(k == "auth" and v.lower() in truthy for k, v in conf)
    local = args.host in {"127.0.0.1", "localhost", "::1"}
    if (not local or remote_ok) and not auth_on:
        raise ValueError(
            f"refusing to serve {args.host} without authentication: add --conf auth true (and create tokens with "
            "'fetal-fl app user add'), or bind 127.0.0.1"
        )
    if not local and not remote_ok:
        log.warning("binding %s, but only this machine is served unless --conf allow_remote true", args.host)
    argv = server_argv(
        studies=args.studies,
        host=args.host,
        port=args.port,
        conf=conf,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    if args.dryrun:
        print(" ".join([sys.executable, "-m", "monailabel.main", *argv]))
        return 0
    main = Main()
    main.action_start_server(main.args_parser().parse_args(argv))
    return 0


def _refuse_local_as_served(source: str, trust_pickle: bool) -> None:
    """The served checkpoint is what ``GET /model`` hands out: a checkpoint holding a local part never goes there."""
    from apps.fetal_brain.lib.exchange import find_checkpoint
    from apps.fetal_brain.lib.model_store import read_checkpoint
    from fetalseg.local_part import NEVER_SENT, holds_local_parts

    path = find_checkpoint(source)
    _, info = read_checkpoint(path, trust_pickle=trust_pickle)
    if holds_local_parts(info):
        raise ValueError(
            f"{path.name} holds a site's local part ({NEVER_SENT}); install the federated global checkpoint as the "
            "model and this site's own local part with --local"
        )


def cmd_install_model(args: argparse.Namespace) -> int:
    from apps.fetal_brain.lib.site_model import install_site_model

    store = _store(args)
    _refuse_local_as_served(args.source, args.trust_pickle)
    # with --local: the local part is checked against THIS global model first (both or neither are installed)
    described = install_site_model(
        args.source,
        store=store,
        local_part=Path(args.local) if args.local else None,
        origin=args.origin,
        job_id=args.job_id,
        fl_round=args.round,
        trust_pickle=args.trust_pickle,
        allow_grid_mismatch=args.allow_grid_mismatch,
    )
    _print_json(described)
    return 0


def cmd_export_cases(args: argparse.Namespace) -> int:
    from apps.fetal_brain.lib.datastore import FetalDatastore
    from apps.fetal_brain.lib.exchange import export_cases

    studies = str(args.studies)
    if studies.startswith(("http://", "https://")):  # the PACS the app serves (docs/pacs.md): same settings
        from apps.fetal_brain.lib.config import AppConfig
        from apps.fetal_brain.lib.dicomweb_store import open_pacs_datastore

        datastore = open_pacs_datastore(studies, AppConfig.from_conf(dict(_conf(args))))
        datastore.remote_series(fresh=True)  # a PACS that is down or refuses us: its reason, not "no cases"
        result = export_cases(datastore, args.out, site=args.site, overwrite=args.overwrite)
        # corrections in the PACS that were not used (QC flags not confirmed, unreadable SEG, ...), with the reason
        result["not_used_from_pacs"] = datastore.not_pulled
        _print_json(result)
        return 0
    folder = Path(studies).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"studies folder {folder} does not exist")
    datastore = FetalDatastore(folder, auto_reload=False)
    _print_json(export_cases(datastore, args.out, site=args.site, overwrite=args.overwrite))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    _print_json(_store(args).describe())
    return 0


def _users(args: argparse.Namespace) -> Any:
    from apps.fetal_brain.lib.auth import UserStore, users_file

    return UserStore(users_file(args.users_file))


def cmd_user_add(args: argparse.Namespace) -> int:
    store = _users(args)
    token = store.add(args.user, args.role, days=None if args.days == 0 else args.days)
    print(f"token for {args.user} ({args.role}), shown only now; give it to the user through a safe channel:")
    print(token)
    print(f"(stored hashed in {store.path})", file=sys.stderr)
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    _print_json(_users(args).list())
    return 0


def cmd_user_revoke(args: argparse.Namespace) -> int:
    _print_json({"revoked": _users(args).revoke(args.who)})
    return 0


def _add_user_commands(sub: Any) -> None:
    user = sub.add_parser(
        "user",
        help="manage access tokens for the server (auth)",
        description="Create, list and revoke bearer tokens for the MONAI Label server started with --conf auth "
        "true. Roles: annotator (info, infer, next case, submit labels, read the datastore), trainer (also "
        "train, add/delete images, download the model, logs), admin (everything). Tokens are stored as salted "
        "sha256 hashes in the users file: --users-file, else $FETAL_BRAIN_USERS_FILE, else "
        "~/.fetal-fl/app_users.json; the server resolves it the same way (--conf users_file PATH or "
        "$FETAL_BRAIN_USERS_FILE; the old $FETAL_FL_USERS_FILE still works, deprecated). A running server sees "
        "changes at once.",
    )
    user_sub = user.add_subparsers(dest="user_command", metavar="<user command>")
    user.set_defaults(handler=lambda _args: user.print_help() or 2)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--users-file", help="users/tokens file (default $FETAL_BRAIN_USERS_FILE or ~/.fetal-fl/...)")
    add = user_sub.add_parser("add", parents=[common], help="create a token (printed once)")
    add.add_argument("user", help="user name (recorded in the audit log)")
    add.add_argument("--role", choices=("annotator", "trainer", "admin"), default="annotator")
    add.add_argument("--days", type=float, default=90.0, help="days until it expires (default 90; 0 = never)")
    add.set_defaults(handler=cmd_user_add)
    lst = user_sub.add_parser("list", parents=[common], help="list tokens (never the secrets)")
    lst.set_defaults(handler=cmd_user_list)
    revoke = user_sub.add_parser("revoke", parents=[common], help="revoke a token id or every token of a user")
    revoke.add_argument("who", help="token id or user name")
    revoke.set_defaults(handler=cmd_user_revoke)


def _add_conf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--conf",
        nargs=2,
        action="append",
        metavar=("KEY", "VALUE"),
        help="app setting, as MONAI Label's --conf (e.g. --conf pixdim 4 --conf patch_size 32); see the README",
    )
    parser.add_argument("--model-path", help="served checkpoint (default: the bundle's models/model.pt)")


def register(subparsers: Any) -> None:
    """Add ``fetal-fl app <serve|install-model|export-cases|model-info|user>``."""
    app = subparsers.add_parser(
        "app",
        help="MONAI Label app: serve, install a federated model, export corrected cases",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = app.add_subparsers(dest="app_command", metavar="<app command>")
    app.set_defaults(handler=lambda _args: app.print_help() or 2)

    serve = sub.add_parser(
        "serve",
        help="start the MONAI Label server for a studies folder",
        description="Start MONAI Label with this app behind its hardened front (inputs checked, /info/ stays "
        "responsive during inference, local clients only unless --conf allow_remote true).",
    )
    serve.add_argument(
        "--studies",
        required=True,
        help="folder of images (NIfTI, NRRD, DICOM series folders), or a PACS's DICOMweb URL (docs/pacs.md)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--dryrun", action="store_true", help="print the equivalent MONAI Label command and exit")
    serve.add_argument("--ssl-certfile", help="TLS certificate (PEM): serve HTTPS")
    serve.add_argument("--ssl-keyfile", help="TLS private key (PEM) of --ssl-certfile")
    _add_conf(serve)
    serve.set_defaults(handler=cmd_serve)

    install = sub.add_parser(
        "install-model",
        help="install a federated global model (+ this site's local part) as the served model",
        description="Check that a checkpoint (file, or the folder of a finished NVFlare job holding "
        "FL_global_model.pt) loads into the bundle's network and gives finite output, then make it the served "
        "model atomically, recording its origin. A running server picks it up on its next inference.",
    )
    install.add_argument("source", help="checkpoint file or finished NVFlare job folder")
    install.add_argument(
        "--local",
        help="this site's local part (local_<site>_<job>.pt in the site's FETAL_FL_SITE_STATE folder): checked to "
        "belong to this global model (same job, same shared weights), installed beside it and served with it, never "
        "handed out",
    )
    install.add_argument("--origin", help="where it came from (default: from the checkpoint, else 'federated')")
    install.add_argument("--job-id", help="NVFlare job id (default: from the checkpoint)")
    install.add_argument("--round", type=int, help="federated round (default: from the checkpoint)")
    install.add_argument(
        "--trust-pickle", action="store_true", help="allow pickled Python objects (only for files you trust)"
    )
    install.add_argument(
        "--allow-grid-mismatch",
        action="store_true",
        help="install a model trained at another voxel size than this app's bundle settings (not recommended)",
    )
    _add_conf(install)
    install.set_defaults(handler=cmd_install_model)

    export = sub.add_parser(
        "export-cases",
        help="export corrected cases as a dataset folder for federated training",
        description="Write every image with a final (corrected) label as images/<id>.nii.gz + labels/<id>.nii.gz, "
        "checked and read back with fetalseg's load_dataset. The folder stays on this site. --studies is the "
        "server's: a folder, or the PACS's DICOMweb URL (corrections stored there as DICOM SEG are used too; "
        "PACS credentials as for serve: --conf pacs_credentials <0600 file> or FETAL_BRAIN_PACS_USER / "
        "FETAL_BRAIN_PACS_PASSWORD, never on the command line). A correction whose volumes the QC flagged is "
        "exported only if the radiologist confirmed it (confirm_qc).",
    )
    export.add_argument("--studies", required=True, help="the MONAI Label studies folder, or the PACS's DICOMweb URL")
    export.add_argument("--out", required=True, help="dataset folder to write")
    export.add_argument("--site", help="site name recorded in the manifest (default: the folder name)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    export.add_argument(
        "--conf",
        nargs=2,
        action="append",
        metavar=("KEY", "VALUE"),
        help="app setting as for serve (for a PACS: pacs_credentials, pacs_cache, pacs_timeout_s, pacs_series)",
    )
    export.set_defaults(handler=cmd_export_cases)

    _add_user_commands(sub)

    from apps.fetal_brain import pacs_demo  # the PACS round trip with a private Orthanc (docs/pacs.md)

    pacs_demo.register(sub)

    info = sub.add_parser(
        "model-info", help="show the served model", description="Print what the server serves (JSON)."
    )
    _add_conf(info)
    info.set_defaults(handler=cmd_model_info)
