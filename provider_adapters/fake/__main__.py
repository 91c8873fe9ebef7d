import argparse

from provider_adapters.fake import add_cli_arguments, run_from_args

parser = argparse.ArgumentParser(
    prog="python -m provider_adapters.fake",
    description="Serve the fake Stripe-compatible provider.",
)
add_cli_arguments(parser)
raise SystemExit(run_from_args(parser.parse_args()))
