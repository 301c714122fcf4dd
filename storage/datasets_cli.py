"""Datasets from the command line: a thin layer over :class:`storage.datasets.DatasetStore`.

    python -m storage.datasets_cli --storage-root var/storage create cats --trigger-word sks
    python -m storage.datasets_cli add cats img/*.png img/*.txt more.zip --tags cat,pet
    python -m storage.datasets_cli import-urls cats --file urls.txt [--allow-private 10.0.0.0/8]
    python -m storage.datasets_cli import-prefix cats s3://bucket/photos/ [--source-options '{...}']
    python -m storage.datasets_cli add-outputs cats outputs/2026/11/21/job_x/0.png   (or: add-outputs cats --job job_x)
    python -m storage.datasets_cli list
    python -m storage.datasets_cli show cats [--version 2] [--rows 10]

``--storage-root`` defaults to ``$ATELIER_STORAGE_ROOT`` or ``var/storage``; ``--storage-options``
takes JSON (s3fs options); ``--max-pixels`` caps width x height of added images. Datasets are
named by id or name. Results print as JSON. Exit codes: 0 done, 1 refused by the store (the
message says why), 2 bad arguments (argparse's usage error, also for a malformed ``--job`` id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pydantic import ValidationError

from storage.datasets import DatasetError, DatasetStore
from storage.fs import Storage
from storage.keys import validate_id
from storage.url_import import DEFAULT_MAX_PIXELS, DatasetImportConfig, UrlRefusedError


# DatasetImportConfig field -> the import-urls flag that sets it (for error messages)
_URL_FLAGS = {"allow_private_hosts": "--allow-private", "max_bytes": "--max-bytes",
              "concurrency": "--concurrency", "timeout_s": "--timeout"}


def _tags(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def _print(obj) -> None:
    print(json.dumps(obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj, indent=2))


def _progress(done: int, total: int) -> None:
    print(f"\r{done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m storage.datasets_cli", description=__doc__.split("\n")[0])
    parser.add_argument("--storage-root", default=os.environ.get("ATELIER_STORAGE_ROOT", "var/storage"))
    parser.add_argument("--storage-options", type=json.loads, default={}, help="JSON options for s3fs")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="width x height an added image may have (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="create an empty dataset")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p.add_argument("--trigger-word")
    p.add_argument("--license", default="unknown")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dataset", help="id or name")
    common.add_argument("--tags", help="comma-separated")
    common.add_argument("--license", help="default: the dataset's")

    p = sub.add_parser("add", parents=[common], help="add image files, same-stem .txt captions and .zip archives")
    p.add_argument("files", nargs="+")
    p.add_argument("--captions", type=json.loads, help="JSON object: file name -> caption")

    p = sub.add_parser("import-urls", parents=[common], help="fetch images from http(s) URLs")
    p.add_argument("urls", nargs="*")
    p.add_argument("--file", help="a file with one URL a line")
    p.add_argument("--allow-private", action="append", default=[], help="CIDR or host allowed although private")
    p.add_argument("--max-bytes", type=int, default=DatasetImportConfig().max_bytes)
    p.add_argument("--concurrency", type=int, default=DatasetImportConfig().concurrency)
    p.add_argument("--timeout", type=float, default=DatasetImportConfig().timeout_s)

    p = sub.add_parser("import-prefix", parents=[common],
                       help="add images under a local folder, s3:// URL or key prefix under imports/ "
                            "(nothing else of the storage root)")
    p.add_argument("prefix")
    p.add_argument("--source-options", type=json.loads, default=None, help="JSON fsspec options for the source")

    p = sub.add_parser("add-outputs", parents=[common], help="add generated images by output key or job id")
    p.add_argument("keys", nargs="+", help="output keys (outputs/...), or job ids with --job")
    p.add_argument("--job", action="store_true", help="the arguments are job ids: add their image outputs")

    sub.add_parser("list", help="list datasets")
    p = sub.add_parser("show", help="a dataset's versions, and manifest rows")
    p.add_argument("dataset")
    p.add_argument("--version", type=int)
    p.add_argument("--rows", type=int, default=0, help="manifest rows to print")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 1 when the store refuses it, 2 (argparse's) for bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_pixels <= 0:
        parser.error(f"--max-pixels must be positive, got {args.max_pixels}")
    if args.command == "add-outputs" and args.job:
        for job_id in args.keys:
            try:
                validate_id(job_id, "job id")
            except ValueError as exc:  # a typo, not a missing job: say so before touching storage
                parser.error(f"--job: {exc}")
    store = DatasetStore(Storage(args.storage_root, args.storage_options), max_pixels=args.max_pixels)
    try:
        if args.command == "create":
            _print(store.create(args.name, args.description, args.trigger_word, args.license))
        elif args.command == "list":
            print(json.dumps([i.model_dump(mode="json", exclude={"versions"}) for i in store.list()], indent=2))
        elif args.command == "show":
            dataset_id = store.resolve(args.dataset)
            _print(store.get(dataset_id))
            if args.rows:
                rows = store.manifest(dataset_id, args.version).slice(0, args.rows).to_pylist()
                print(json.dumps(rows, indent=2))
        else:
            dataset_id = store.resolve(args.dataset)
            common = {"tags": _tags(args.tags), "license": args.license}
            if args.command == "add":
                files = []
                for path in args.files:
                    with open(path, "rb") as f:
                        files.append((os.path.basename(path), f.read()))
                result = store.add_files(dataset_id, files, args.captions, source="cli", **common)
            elif args.command == "import-urls":
                urls = list(args.urls)
                if args.file:
                    with open(args.file) as f:
                        urls += [line.strip() for line in f if line.strip() and not line.startswith("#")]
                try:
                    config = DatasetImportConfig(allow_private_hosts=args.allow_private, max_bytes=args.max_bytes,
                                                 concurrency=args.concurrency, timeout_s=args.timeout,
                                                 max_urls=max(len(urls), 1))
                except ValidationError as exc:
                    parser.error("; ".join(f"{_URL_FLAGS.get(e['loc'][0], e['loc'][0])}: {e['msg']}"
                                           for e in exc.errors()))
                result = store.add_from_urls(dataset_id, urls, config, progress=_progress, **common)
            elif args.command == "import-prefix":
                prefix = args.prefix
                if "://" not in prefix and os.path.exists(prefix):
                    prefix = os.path.abspath(prefix)  # a local folder, not a key prefix in the root
                result = store.add_from_prefix(dataset_id, prefix, args.source_options, progress=_progress, **common)
            elif args.job:  # add-outputs
                result = store.add_job_outputs(dataset_id, args.keys, progress=_progress, **common)
            else:
                result = store.add_outputs(dataset_id, args.keys, progress=_progress, **common)
            _print(result)
    except (DatasetError, UrlRefusedError, OSError) as exc:
        print(f"error: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
