"""The `shivacmb models` actions: list, verify (checksums, parity, reduced precision), install and convert."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

from ..errors import ModelError


def models_list(args: argparse.Namespace) -> int:
    from .models import installed_models, model_search_dirs

    entries = installed_models()
    rows: List[Dict[str, Any]] = []
    for entry in entries:
        if isinstance(entry, tuple):
            rows.append({"name": entry[0].name, "path": str(entry[0]), "error": entry[1]})
        else:
            row = entry.summary()
            row["folds"] = len(entry.folds)
            rows.append(row)
    if args.json:
        print(json.dumps({"search_path": [str(p) for p in model_search_dirs()], "models": rows}, indent=2))
        return 0
    if not rows:
        print("no models installed; searched: " + ", ".join(str(p) for p in model_search_dirs()))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "version", "modalities", "folds", "licence", "location")
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], "-", "-", "-", "-", f"{row['path']} [red](unusable: {row['error']})[/red]")
        else:
            table.add_row(row["name"], row["version"], ",".join(row["modalities"]), str(row["folds"]),
                          row["license"], row["path"])
    Console(width=max(120, Console().width)).print(table)
    return 0


def models_verify(args: argparse.Namespace) -> int:
    from .models import installed_models, load_model

    names = args.models or [str(e[0] if isinstance(e, tuple) else e.path) for e in installed_models()]
    if not names:
        print("no models installed")
        return 0
    failed = 0
    for name in names:
        try:
            model = load_model(name)
            print(f"ok      {model.name} {model.version} ({len(model.folds)} fold(s), {model.path})")
            failed += _verify_numbers(args, model)
        except ModelError as err:
            failed += 1
            print(f"FAILED  {err}")
    return ModelError.exit_code if failed else 0


def _verify_numbers(args: argparse.Namespace, model: Any) -> int:
    """The --parity and --precision checks of one model; the number of failed checks."""
    from .official import verify_parity
    from .precisions import verify_precision

    say = lambda line: print(f"        {line}", flush=True)  # noqa: E731
    results = verify_parity(model, args.scan, say) if args.parity else []
    if args.precision != "fp32":
        results += verify_precision(model, args.device, args.precision, args.scan, args.phantoms, say)
    return sum(not r.passed for r in results)


def models_install(args: argparse.Namespace) -> int:
    from .official import install

    result = install(args.source, args.name, args.sha256, args.force, args.scan)
    _converted(result, result.model.name)
    return 0


def models_convert(args: argparse.Namespace) -> int:
    from .official import convert

    result = convert(args.source, args.out, args.name, args.force, args.scan)
    _converted(result, str(result.folder))
    return 0


def _converted(result: Any, model_option: str) -> None:
    worst = max(p.max_abs_diff for p in result.parity)
    print(f"installed {result.model.name} ({len(result.model.folds)} fold(s), converted in {result.seconds:.1f} s, "
          f"parity max abs diff {worst:.1e}) -> {result.folder}{os.sep}; run it with "
          f"`shivacmb segment SCAN --model {model_option}`")
