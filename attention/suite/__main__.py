"""``python -m attention.suite [--impl NAME ...] [pytest args]``: the property suite from anywhere."""

from __future__ import annotations

import argparse
import sys

import pytest

from .. import registry

#: pytest's warning for an installed plugin's package imported before it could rewrite it.
_ALREADY_IMPORTED = "Module already imported so cannot be rewritten"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attention.suite",
        description="Run the attention property suite on registered implementations or module:attr ones; "
        "other arguments go to pytest (-x, -k, -n auto, ...).",
    )
    parser.add_argument(
        "--impl",
        action="append",
        default=[],
        metavar="NAME",
        help="name or module:attr (repeatable); pytest's --attention-impl works here too",
    )
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    # The whole command line, where each --impl's value still follows it.
    if (misplaced := registry.misplaced_specs(argv, "--impl")) is not None:
        parser.error(misplaced)
    impls = [f"--attention-impl={spec}" for spec in args.impl]
    # This command imported the package before pytest started, so pytest cannot rewrite it as an
    # installed plugin's; the suite's test modules, imported later, still are.
    quiet = ["-W", f"ignore:{_ALREADY_IMPORTED}:pytest.PytestAssertRewriteWarning"]
    # The property suite times nothing: pytest-benchmark's plugin would only leave an empty
    # .benchmarks/ in the caller's folder.
    untimed = ["-p", "no:benchmark"]
    return int(
        pytest.main(["--pyargs", "attention.suite", "-p", "attention.suite.plugin", *untimed, *quiet, *impls, *rest])
    )


if __name__ == "__main__":
    sys.exit(main())
