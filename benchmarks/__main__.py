"""`python -m benchmarks [--quick] [--only NAME ...]`: run the benchmarks, write the report.

Each benchmark runs in its own process on `--threads` threads (the loader ones pin themselves to one
core); results go to `benchmarks.json` and `BENCHMARKS.md` in `--out-dir`. With `--only`, the named
benchmarks are run again and replace their entries in an existing `benchmarks.json` (each entry keeps
the time and machine load of its own run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import BenchmarkFailed, load_average, machine, run_isolated, versions
from benchmarks.report import write_report
from benchmarks.suite import SUITE

JSON_NAME, MARKDOWN_NAME = "benchmarks.json", "BENCHMARKS.md"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a smoke run)")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SUITE), metavar="NAME", help=f"of: {', '.join(SUITE)}"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per benchmark (default 2)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where to write the report")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite BENCHMARKS.md from the existing benchmarks.json"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    return parser


def run_child(name: str, options: dict, threads: int) -> None:
    """In a benchmark's own process: run it and print its result as the last line of JSON."""
    torch.set_num_threads(threads)
    result = SUITE[name].resolve()(**options)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, json.loads(args.options), args.threads)
        return 0
    if args.render:
        report = _previous(args.out_dir / JSON_NAME)
        if not report:
            parser.error(
                f"--render: {args.out_dir / JSON_NAME} is missing or not JSON; run the benchmarks first"
            )
        write_report(report, args.out_dir / MARKDOWN_NAME)
        return 0
    names = args.only or list(SUITE)
    json_path = args.out_dir / JSON_NAME
    report = _previous(json_path) if args.only else {}
    report.update(
        command=" ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        threads=args.threads,
        machine=machine(),
        versions=versions(),
    )
    results = report.setdefault("results", {})
    failed = []
    for name in names:
        bench = SUITE[name]
        options = bench.quick if args.quick else bench.full
        if bench.gpu_only and not torch.cuda.is_available():  # a row that says why, not a silent gap
            results[name] = {"skipped": "no CUDA GPU on this machine (the row fills in where one is)"}
            print(f"[benchmarks] {name}: skipped, no CUDA GPU", file=sys.stderr, flush=True)
            continue
        print(f"[benchmarks] {name}: {bench.description} ...", file=sys.stderr, flush=True)
        started_load = load_average()
        try:
            result = run_isolated(name, options, args.threads, bench.env)
        except BenchmarkFailed as error:
            print(f"[benchmarks] {name} FAILED: {error}", file=sys.stderr)
            failed.append(name)
            result = {"failed": str(error)[-2000:]}
        result["run"] = {
            "quick": args.quick,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average_before": started_load,
            "load_average_after": load_average(),
            "options": options,
            "env": bench.env,
        }
        results[name] = result
        print(f"[benchmarks] {name}: done in {result.get('wall_s', '?')} s", file=sys.stderr, flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    write_report(report, args.out_dir / MARKDOWN_NAME)
    print(f"[benchmarks] wrote {json_path} and {args.out_dir / MARKDOWN_NAME}", file=sys.stderr)
    return 1 if failed else 0


def _previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


if __name__ == "__main__":
    raise SystemExit(main())
