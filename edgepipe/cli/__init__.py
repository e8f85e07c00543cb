"""The `edgepipe` command line (entry point: `edgepipe.cli.main:main`)."""
