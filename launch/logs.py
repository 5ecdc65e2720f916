"""Log settings shared by the launchers."""

def quiet_library_logs():
    """absl turns INFO on for every library; keep the terminal for our progress bars."""
    import logging

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("httpx", "httpx2", "openai", "orbax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
