"""ecdcfs: a folder of Encodec .ecdc files mounted as .wav files, and ``ecdc-stream``."""


def version() -> str:
    """The version of this package, from its installed metadata (set in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("ecdcfs")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"
