"""The command line: one small function per command, logic lives in the modules.

Heavy libraries (torch, diffusers, ray, open_clip) are imported inside the commands that need
them, so `validate`, `plan` and `status` answer in well under a second.
"""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="omnigen2-batch")
def main() -> None:
    """Batch image production with OmniGen2: recipes in, scored and kept images out."""
