from tcjepa_jax.export.cli import __doc__, run  # noqa: F401  (__doc__: the --help text)

if __name__ == "__main__":
    run()
