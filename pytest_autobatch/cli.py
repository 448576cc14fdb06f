"""The ``autobatch`` console script: ``autobatch report [BASELINES] [--out DIR] [--no-plots] [--readme FILE]``.

Writes the Markdown report and the PNG plots of the stored baselines and prints the report.
Exit codes: 0 written, 1 nothing to report or unreadable baselines or a missing dependency,
2 bad command line.
"""

from __future__ import annotations

import argparse
import sys

from .errors import AutobatchError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autobatch", description="pytest-autobatch tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report", help="Markdown table and PNG plots from the stored baselines",
        description="Render the stored baselines as a Markdown report (report.md) with one PNG "
                    "plot per model and device: throughput, latency and memory against batch size.")
    report.add_argument("baselines", nargs="?", default="baselines",
                        help="directory holding the baselines (default: baselines)")
    report.add_argument("--out", default="reports",
                        help="directory to write report.md and plots/ into (default: reports)")
    report.add_argument("--no-plots", action="store_true", help="write the Markdown report only")
    report.add_argument("--readme", metavar="FILE",
                        help="also put the report between the report markers of FILE (e.g. README.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .report.markdown import update_readme, write_report
    try:
        report = write_report(args.baselines, args.out, plots=not args.no_plots)
        if args.readme:
            update_readme(args.readme, args.baselines)
    except AutobatchError as exc:
        print(f"autobatch report: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report.read_text(encoding="utf-8"))
    print(f"autobatch report: wrote {report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
