"""``python -m trioproxy.bench``: the ``trioproxy bench`` command on its own."""

import argparse

from . import cli

parser = argparse.ArgumentParser(prog="trioproxy bench", description=cli.DESCRIPTION)
cli.add_arguments(parser)
raise SystemExit(cli.run_from_args(parser.parse_args()))
